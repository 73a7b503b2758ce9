"""The background module's two options that are not in the reference: `bg_group_norm=False` (the
background encoder and decoder without GroupNorm) and `bg_colour_init` (a new run starts the
background decoder at the training frames' mean colour)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train
from common import Config, small_config
from data import estimate_background, make_sprites
from modules import BgDecoder, BgDecoderSBD, BgEncoder, start_background_at
from scalor import SCALOR
from test_equivalence import assert_equal, config, run_both

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run fastest on one thread


def count(module):
    return sum(p.numel() for p in module.parameters())


def group_norm_parameters(module):
    return sum(count(m) for m in module.modules() if isinstance(m, nn.GroupNorm))


@pytest.mark.parametrize("sbd", [False, True])
def test_without_group_norm_drops_exactly_the_background_group_norms(sbd):
    with_norm, without = SCALOR(Config(using_bg_sbd=sbd)), SCALOR(Config(using_bg_sbd=sbd, bg_group_norm=False))
    for part in ("bg_enc", "bg_dec"):
        ours, reference = getattr(without, part), getattr(with_norm, part)
        assert not any(isinstance(m, nn.GroupNorm) for m in ours.modules())
        assert count(ours) == count(reference) - group_norm_parameters(reference) > 0
    assert count(without) == count(with_norm) - group_norm_parameters(with_norm.bg_enc) - \
        group_norm_parameters(with_norm.bg_dec)                                   # nothing else changes


def test_encoder_without_group_norm_is_strided_convs_and_celus():
    """The layer written out: four 4x4 stride-2 convs each followed by CELU, then the full-size conv."""
    torch.manual_seed(0)
    cfg = small_config(bg_group_norm=False)
    enc = BgEncoder(cfg)
    x = torch.rand(2, 4, cfg.img_h, cfg.img_w)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    h = x
    for conv in convs[:-1]:
        h = F.celu(F.conv2d(h, conv.weight, conv.bias, stride=2, padding=1))
    mean, std = F.conv2d(h, convs[-1].weight, convs[-1].bias).flatten(1).chunk(2, -1)
    ours = enc(x)
    torch.testing.assert_close(ours[0], mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], std, rtol=0, atol=1e-6)


def test_train_background_without_group_norm():
    """The fast model and the plain oracle agree without the background's GroupNorm."""
    cfg = config({}, max_num_obj=6, bg_what_dim=16, using_bg_sbd=False, bg_group_norm=False)
    _, _, ours, plain, g1, g2 = run_both(cfg, train=True, step=100, tau=1.0)
    assert_equal(ours, plain, g1, g2, torch.float32)


@pytest.mark.parametrize("decoder", [BgDecoder, BgDecoderSBD])
def test_start_gives_the_colour_before_anything_is_learned(decoder):
    cfg = small_config(bg_what_dim=8)
    dec = decoder(cfg)
    colour = torch.tensor([0.2, 0.35, 0.5])
    start_background_at(dec, colour)
    last = dec.output_conv
    assert last is [m for m in dec.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.zero_()                                  # the output is then the bias alone
    image = dec(torch.randn(3, cfg.bg_what_dim))             # (3, 3, H, W)
    torch.testing.assert_close(image, colour.view(1, 3, 1, 1).expand_as(image), rtol=0, atol=1e-6)
    start_background_at(dec, torch.tensor([0.0, 1.0, 0.5]))              # clamped into the sigmoid's reach
    torch.testing.assert_close(torch.sigmoid(last.bias), torch.tensor([0.01, 0.99, 0.5]), rtol=0, atol=1e-6)


def test_estimate_gives_the_frames_mean_colour():
    data = make_sprites("few", seq_len=4, num_sequences=6, seed=3)
    estimate = estimate_background(data, num_sequences=6)
    expected = torch.stack([data[i] for i in range(6)]).double().mean(dim=(0, 1, 3, 4))
    torch.testing.assert_close(torch.tensor(estimate["mean_colour"], dtype=torch.float64), expected, rtol=0, atol=1e-9)


def test_train_starts_a_new_run_at_the_mean_colour_unless_told_not_to(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "estimate_background", lambda data: calls.append(1) or estimate_background(data))

    def setup(*flags):
        args = train.build_parser().parse_args(
            ["--recipe", "sprites", "--preset", "few", "--seq-len", "3", "--batch-size", "2",
             "--num-sprite-sequences", "8", "--workers", "0", "--device", "cpu", "--ckpt-dir", str(tmp_path / "ck"),
             "--summary-dir", str(tmp_path / "sum"), *flags])
        return train.setup(args)

    run = setup()                                            # the recipe asks for it where there is a background
    assert len(calls) == 1                                   # the recipe's estimate serves the colour too
    assert run.cfg.bg_colour_init and not run.cfg.bg_group_norm and not run.cfg.phase_no_background
    colour = torch.tensor(estimate_background(run.dataset)["mean_colour"], dtype=torch.float32)
    torch.testing.assert_close(torch.sigmoid(run.model.bg_dec.output_conv.bias), colour, rtol=0, atol=1e-6)
    default = setup("--run-name", "other", "--ckpt-dir", str(tmp_path / "ck2"), "--summary-dir", str(tmp_path / "s2"),
                    "--no-bg-colour-init")
    assert not default.cfg.bg_colour_init
    assert not torch.allclose(torch.sigmoid(default.model.bg_dec.output_conv.bias), colour, atol=1e-2)
