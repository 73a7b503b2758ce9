"""Parameter counts equal the reference's, in total and per part, at every size it supports."""
import pytest

from common import Config
from scalor import SCALOR


def count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_default_total_and_switches():
    assert count(SCALOR(Config())) == 5_000_002
    assert count(SCALOR(Config(using_bg_sbd=True))) == 2_812_754
    assert count(SCALOR(Config(phase_conv_lstm=False))) == 4_385_090
    assert count(SCALOR(Config(phase_conv_lstm=False, using_bg_sbd=True))) == 2_197_842


def test_default_parts():
    m = SCALOR(Config())
    assert count(m.image_enc) == 993_568
    assert count(m.image_enc.conv_lstm) == 614_912
    assert count(m.glimpse_enc) == 452_560
    assert count(m.glimpse_dec) == 304_084
    assert count(m.propagation) == 459_288
    assert count(m.propagation.prior) == 68_299
    assert count(m.propagation) - count(m.propagation.prior) == 390_989
    assert count(m.proposal) == 177_787
    assert count(m.bg_enc) == 194_276
    assert count(m.bg_dec) == 2_413_555
    assert count(SCALOR(Config(using_bg_sbd=True)).bg_dec) == 226_307
    assert count(m.bg_prior_rnn) == 4_224
    assert count(m.bg_prior_net) == 660


# Counted on the reference implementation (JindongJiang/SCALOR) for each size it builds:
# (img, grid, glimpse): totals for (conv_lstm, sbd) = (1,0), (1,1), (0,0), (0,1) and parts.
REFERENCE = {
    (64, 4, 32): (2833826, 2088690, 2237346, 1492210, 308832, 596480, 227088, 171028, 292685, 167131, 128548, 868851, 123715),
    (64, 4, 64): (3190290, 2445154, 2593810, 1848674, 308832, 596480, 452560, 302020, 292685, 167131, 128548, 868851, 123715),
    (64, 8, 32): (2819106, 2073970, 2204194, 1459058, 243104, 614912, 227088, 171028, 390989, 101403, 128548, 868851, 123715),
    (64, 8, 64): (3175570, 2430434, 2560658, 1815522, 243104, 614912, 452560, 302020, 390989, 101403, 128548, 868851, 123715),
    (128, 4, 32): (4732370, 2545122, 4135890, 1948642, 481440, 596480, 227088, 173092, 292685, 280571, 194276, 2413555, 226307),
    (128, 4, 64): (5088834, 2901586, 4492354, 2305106, 481440, 596480, 452560, 304084, 292685, 280571, 194276, 2413555, 226307),
    (128, 8, 32): (4643538, 2456290, 4028626, 1841378, 378656, 614912, 227088, 173092, 390989, 177787, 194276, 2413555, 226307),
    (128, 8, 64): (5000002, 2812754, 4385090, 2197842, 378656, 614912, 452560, 304084, 390989, 177787, 194276, 2413555, 226307),
}


@pytest.mark.parametrize("size", sorted(REFERENCE))
def test_reference_sizes(size):
    img, grid, glimpse = size
    (lstm_full, lstm_sbd, plain_full, plain_sbd, img_enc, conv_lstm, g_enc, g_dec, prop_nets, proposal,
     bg_enc, bg_dec, bg_sbd) = REFERENCE[size]
    base = dict(img_h=img, img_w=img, num_cell_h=grid, num_cell_w=grid, glimpse_size=glimpse, max_num_obj=min(45, grid * grid))
    m = SCALOR(Config(**base))
    assert count(m) == lstm_full
    assert count(SCALOR(Config(**base, using_bg_sbd=True))) == lstm_sbd
    assert count(SCALOR(Config(**base, phase_conv_lstm=False))) == plain_full
    assert count(SCALOR(Config(**base, phase_conv_lstm=False, using_bg_sbd=True))) == plain_sbd
    assert count(m.image_enc.image_enc) == img_enc
    assert count(m.image_enc.conv_lstm) == conv_lstm
    assert count(m.glimpse_enc) == g_enc
    assert count(m.glimpse_dec) == g_dec
    assert count(m.propagation) - count(m.propagation.prior) == prop_nets
    assert count(m.proposal) == proposal
    assert count(m.bg_enc) == bg_enc
    assert count(m.bg_dec) == bg_dec
    assert count(SCALOR(Config(**base, using_bg_sbd=True)).bg_dec) == bg_sbd


def test_reference_groupnorm_groups_at_default():
    """Same widths are normalised with different group counts in the reference; keep them."""
    m = SCALOR(Config())
    gn = [mod for mod in m.image_enc.image_enc.enc if mod.__class__.__name__ == "GroupNorm"]
    assert [g.num_groups for g in gn] == [4, 4, 8, 8, 8, 8, 16, 16]
    assert m.image_enc.image_enc.enc_lat[2].num_groups == 8
    assert m.proposal.img_mask_cat_enc[2].num_groups == 16


@pytest.mark.parametrize("changes", [
    dict(img_h=256, img_w=256, num_cell_h=16, num_cell_w=16, max_num_obj=100),
    dict(img_h=128, img_w=256, num_cell_h=8, num_cell_w=16),
    dict(img_h=64, img_w=128, num_cell_h=4, num_cell_w=8, glimpse_size=32, max_num_obj=20),
])
def test_other_sizes_build_and_run(changes):
    import torch
    cfg = Config(seq_len=2, observe_frames=1, **changes)
    m = SCALOR(cfg)
    out = m(torch.rand(1, 2, 3, cfg.img_h, cfg.img_w), step=1)
    assert out.recon.shape == (1, 2, 3, cfg.img_h, cfg.img_w)
    assert torch.isfinite(out.loss())
    assert out.counts.max() <= cfg.max_num_obj
