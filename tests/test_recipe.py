"""The sprite training recipe (common.sprites_config, train.py --recipe sprites) and the background
estimate (data.estimate_background) that decides its phase_no_background."""
import pytest
import torch

import train
from common import RECIPES, small_config, sprites_config
from data import estimate_background, make_sprites
from scalor import SCALOR


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run fastest on one thread


def test_sprites_recipe_values():
    cfg = sprites_config()
    assert (cfg.batch_size, cfg.lr, cfg.tau_ep, cfg.z_pres_anneal_end_value) == (64, 3e-4, 4000.0, 1e-9)
    assert (cfg.bg_what_dim, cfg.using_bg_sbd) == (64, False)          # a background that can hold a texture
    assert (cfg.phase_bg_alpha_curriculum, cfg.bg_alpha_curriculum_steps) == (True, 500)
    small = small_config()
    changed = cfg.diff(small)
    assert set(changed) == {"batch_size", "lr", "tau_ep", "z_pres_anneal_end_value", "bg_what_dim",
                            "using_bg_sbd", "phase_bg_alpha_curriculum",
                            "bg_alpha_curriculum_steps"}               # the --small sizes otherwise
    assert cfg.phase_no_background is False and cfg.first_frame_rejection is False     # not hard-coded
    assert sprites_config(lr=1e-3).lr == 1e-3
    assert RECIPES["sprites"] is sprites_config


@pytest.mark.parametrize("preset, has_background", [("easy", False), ("spmot", False), ("crowded", False),
                                                     ("few", True), ("dynamic_bg", True), ("stream", True)])
def test_background_estimate(preset, has_background):
    data = make_sprites(preset, seq_len=5, num_sequences=20, seed=2)
    estimate = estimate_background(data, num_sequences=6)
    assert estimate["has_background"] is has_background
    assert estimate["sequences"] == 6
    if has_background:
        assert estimate["black_fraction"] < 0.05
    else:
        assert estimate["black_fraction"] > 0.6


def test_recipe_flag_config_and_background_from_the_data(tmp_path, capsys):
    def setup(*flags):
        args = train.build_parser().parse_args(
            ["--recipe", "sprites", "--seq-len", "3", "--batch-size", "2", "--num-sprite-sequences", "8",
             "--workers", "0", "--device", "cpu", "--ckpt-dir", str(tmp_path / "ck"),
             "--summary-dir", str(tmp_path / "sum"), *flags])
        return train.setup(args).cfg

    black = setup("--preset", "easy")
    assert black.phase_no_background is True
    assert (black.lr, black.tau_ep, black.z_pres_anneal_end_value, black.batch_size) == (3e-4, 4000.0, 1e-9, 2)
    assert "phase_no_background=True (estimated from the frames" in capsys.readouterr().out
    assert setup("--preset", "few").phase_no_background is False
    assert "phase_no_background=False (estimated" in capsys.readouterr().out
    assert setup("--preset", "easy", "--no-phase-no-background").phase_no_background is False   # the user's choice
    assert "estimated" not in capsys.readouterr().out
    args = train.build_parser().parse_args(["--recipe", "sprites", "--lr", "1e-3"])
    assert train.make_config(args, None) == sprites_config(lr=1e-3)                          # flags given win


def _loss_and_grads(cfg, seq):
    torch.manual_seed(0)
    model = SCALOR(cfg).train()
    torch.manual_seed(1)
    out = model(seq, step=10, tau=0.7)
    out.loss().backward()
    return out.loss().item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("no_background", [True, False])
def test_recipe_curriculum_matters_only_with_a_background(tiny_cfg, no_background):
    """The recipe keeps the alpha curriculum on for every data set: without a background module
    (black background) it leaves the loss and every gradient exactly as they are; with one it does not."""
    cfg = tiny_cfg.replace(phase_no_background=no_background, bg_alpha_curriculum_steps=500)
    seq = torch.rand(2, cfg.seq_len, 3, cfg.img_h, cfg.img_w, generator=torch.Generator().manual_seed(3))
    loss_off, grads_off = _loss_and_grads(cfg.replace(phase_bg_alpha_curriculum=False), seq)
    loss_on, grads_on = _loss_and_grads(cfg.replace(phase_bg_alpha_curriculum=True), seq)
    same = loss_on == loss_off and len(grads_on) == len(grads_off) and all(
        torch.equal(a, b) for a, b in zip(grads_on, grads_off))
    assert same is no_background
