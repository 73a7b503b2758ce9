"""The model's rules, each checked against numbers: boxes, rejection, cap, hand-off, drop,
KL weighting, schedules, detaching, compositing, background prior, generation, robustness."""
import math

import pytest
import torch

import fast
import scalor as scalor_mod
from common import Config, ConfigError, small_config
from modules import (crop, kl_bernoulli, kl_normal, kl_std_normal, place_windows, scatter_windows,
                     spatial_transform, window_size)
from scalor import SCALOR, FrameContext, Objects, Slots, anchor_box, compact
from utils import lr_at, tau_at, z_pres_prior_at


def _ctx(first, tau, pres_prior, generate=False, nll=False):
    """A frame's context for calling a step of the model on its own (no cap, state detached)."""
    return FrameContext(first=first, generate=generate, nll=nll, tau=tau, pres_prior=pres_prior, capacity=None,
                        detach=True, curriculum=False)


def _seq(cfg, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, cfg.seq_len, 3, cfg.img_h, cfg.img_w, generator=g)


# ---------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------

def test_anchor_box_formula():
    cfg = Config()
    raw = torch.tensor([[0.0, 0.0], [10.0, -10.0], [math.atanh(0.5), math.atanh(-0.2)]])
    box = anchor_box(cfg, raw)
    # raw 0: scale 0.1, ratio 2.5
    assert box[0].tolist() == pytest.approx([0.1 / math.sqrt(2.5), 0.1 * math.sqrt(2.5)], rel=1e-6)
    # saturated: scale 0.13, ratio 2.0
    assert box[1].tolist() == pytest.approx([0.13 / math.sqrt(2.0), 0.13 * math.sqrt(2.0)], rel=1e-6)
    s, r = 0.1 + 0.03 * 0.5, 2.5 - 0.5 * 0.2
    assert box[2].tolist() == pytest.approx([s / math.sqrt(r), s * math.sqrt(r)], rel=1e-6)


def test_discovery_box_centres_are_cell_centres_plus_tanh_offset(tiny_cfg, monkeypatch):
    cfg = tiny_cfg.replace(num_cell_h=4, num_cell_w=4)
    m = SCALOR(cfg).train()
    # z_where noise zero -> raw = mean; proposal net outputs zero where-mean -> centre offsets 0
    with torch.no_grad():
        for p in m.proposal.z_where_net.parameters():
            p.zero_()
    monkeypatch.setattr(scalor_mod, "normal_rsample", lambda mean, std: mean)
    disc, _ = m.discover(torch.rand(1, 3, 64, 64), torch.rand(1, 64, 4, 4),
                         torch.zeros(1, 1, 64, 64), None, _ctx(True, 1.0, 0.1))
    centres = disc.z_where[0, :, 2:]
    # cell (row 1, col 2) of a 4x4 grid: x = 2/4*(2+0.5)-1 = 0.25, y = 2/4*(1+0.5)-1 = -0.25
    assert centres[1 * 4 + 2].tolist() == pytest.approx([0.25, -0.25], abs=1e-6)
    assert centres[0].tolist() == pytest.approx([-0.75, -0.75], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Spatial transforms
# ---------------------------------------------------------------------------------------------

def _random_boxes(cfg, B, K, seed):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(B, K, 2, generator=g) * 3
    centre = (torch.rand(B, K, 2, generator=g) * 2.3 - 1.15)  # some boxes past the frame edge
    return torch.cat((anchor_box(cfg, raw), centre), -1)


@pytest.mark.parametrize("cfg", [Config(), small_config(), Config(size_anc=0.4, var_s=0.2)])
def test_windowed_placement_equals_full_placement(cfg):
    B, K, G = 2, 7, cfg.glimpse_size
    z_where = _random_boxes(cfg, B, K, 1)
    glimpses = torch.rand(B, K, 2, G, G)
    values, index = place_windows(glimpses, z_where, cfg.img_h, cfg.img_w, *window_size(cfg))
    fast = scatter_windows(values, index, cfg.img_h, cfg.img_w)
    full = spatial_transform(glimpses.flatten(0, 1), z_where.flatten(0, 1), (B * K, 2, cfg.img_h, cfg.img_w), inverse=True)
    plain = full.view(B, K, 2, cfg.img_h, cfg.img_w).sum(1)
    assert torch.allclose(fast, plain, atol=1e-5)
    assert plain.abs().sum() > 0


def test_crop_equals_per_object_affine_grid():
    cfg = Config()
    B, K = 2, 5
    z_where = _random_boxes(cfg, B, K, 2)
    images = torch.rand(B, 3, 128, 128)
    fast = crop(images, z_where, 64, 64)
    plain = spatial_transform(images.repeat_interleave(K, 0), z_where.flatten(0, 1), (B * K, 3, 64, 64))
    assert torch.allclose(fast.flatten(0, 1), plain, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Discovery: rejection, cap, KL weighting
# ---------------------------------------------------------------------------------------------

def _discover(m, t, free, monkeypatch, explained=None, seed=0):
    cfg = m.cfg
    if explained is not None:
        monkeypatch.setattr(m, "_explained_ratio", lambda *a: explained)
    torch.manual_seed(seed)
    x = torch.rand(explained.shape[0] if explained is not None else 2, 3, cfg.img_h, cfg.img_w)
    img_enc = torch.randn(x.shape[0], cfg.img_encode_dim, cfg.num_cell_h, cfg.num_cell_w)
    disc, terms = m.discover(x, img_enc, torch.zeros(x.shape[0], 1, cfg.img_h, cfg.img_w), free, _ctx(t == 0, 0.5, 0.1))
    return disc, terms, terms.log_imp


def test_rejection_threshold_and_only_from_second_frame(tiny_cfg, monkeypatch):
    m = SCALOR(tiny_cfg).eval()
    C = tiny_cfg.num_cells
    explained = torch.zeros(1, C)
    explained[0, :4] = torch.tensor([0.29, 0.2999, 0.3, 0.31])
    explained[0, 4] = 1.0
    disc0, kl0, _ = _discover(m, 0, None, monkeypatch, explained)
    disc1, kl1, _ = _discover(m, 1, None, monkeypatch, explained)
    z0, z1 = disc0.z_pres[0, :, 0], disc1.z_pres[0, :, 0]
    assert (z0 > 0).all()                              # frame 0: nothing rejected
    assert (z1[:2] == z0[:2]).all() and (z1[:2] > 0).all()   # below 0.3: kept
    assert (z1[2:5] == 0).all()                        # 0.3 and above: rejected
    assert (z1[5:] == z0[5:]).all()
    # rejected proposals get the z_pres prior 1e-8; KL of what/where/depth keeps the pre-rejection weights
    assert torch.allclose(kl1.what, kl0.what) and torch.allclose(kl1.where, kl0.where)
    assert torch.allclose(kl1.depth, kl0.depth)
    assert not torch.allclose(kl1.pres, kl0.pres)


def _kept_oracle(cfg, alpha, z_where, z_pres):
    """Plain first-frame explained ratio: full-frame placements, proposals taken one by one by
    decreasing z_pres (ties: lower cell first), each tested against the map of those kept so far."""
    B, C = z_pres.shape
    placed = spatial_transform(alpha.flatten(0, 1), z_where.flatten(0, 1), (B * C, 1, cfg.img_h, cfg.img_w),
                               inverse=True).view(B, C, -1)                 # (B, C, H*W)
    out = torch.zeros(B, C)
    for b in range(B):
        kept_map = torch.zeros(cfg.img_h * cfg.img_w)
        for i in sorted(range(C), key=lambda c: (-float(z_pres[b, c]), c)):
            proposed = placed[b, i] > cfg.proposal_alpha_threshold
            out[b, i] = (proposed & (kept_map > cfg.propagated_alpha_threshold)).sum() / (proposed.sum() + 1e-15)
            if out[b, i] < cfg.explained_ratio_threshold:
                kept_map = kept_map + placed[b, i] * z_pres[b, i]
    return out


def test_first_frame_rejection_weaker_duplicates_explained(tiny_cfg):
    cfg = tiny_cfg.replace(first_frame_rejection=True)
    m = SCALOR(cfg).eval()
    C, G, s = cfg.num_cells, cfg.glimpse_size, cfg.size_anc
    alpha = torch.ones(1, C, 1, G, G)
    centres = {0: (-0.6, -0.6), 1: (-0.6, -0.6),          # a duplicate pair: 0.9 vs 0.95
               2: (0.6, -0.6), 3: (0.6, -0.6),            # 0.8 vs 0.05: the weak one is explained
               4: (-0.6, 0.6), 5: (-0.6, 0.6),            # 0.09 * alpha <= 0.1 covers nothing
               6: (0.6, 0.6), 7: (0.6, 0.6),              # a tie at 1.0: the lower cell ranks first
               8: (-0.2, 0.0), 9: (0.0, 0.0), 10: (0.2, 0.0)}   # a row: 9 overlaps 8 and 10, 8 not 10
    z_pres = torch.tensor([[0.9, 0.95, 0.8, 0.05, 0.09, 0.01, 1.0, 1.0, 0.7, 0.6, 0.5] + [0.0] * (C - 11)])
    z_where = torch.tensor([[[s, s, *centres.get(c, (0.0, 0.8))] for c in range(C)]])
    explained = m._explained_by_kept(alpha, z_where, z_pres)
    assert explained[0, :8].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    # 9 is rejected by 8; rejected, it explains nothing of 10, which stays
    assert explained[0, 8] == 0 and explained[0, 9] >= cfg.explained_ratio_threshold and explained[0, 10] == 0
    # random scenes: the same numbers as full-frame placements and a loop over ranks
    torch.manual_seed(0)
    alpha = torch.rand(2, C, 1, G, G)
    z_where = torch.cat((anchor_box(cfg, torch.randn(2, C, 2)), torch.rand(2, C, 2) * 1.2 - 0.6), -1)
    z_pres = torch.rand(2, C).round(decimals=1)            # ties included
    assert torch.allclose(m._explained_by_kept(alpha, z_where, z_pres), _kept_oracle(cfg, alpha, z_where, z_pres),
                          atol=1e-6)


def test_first_frame_rejection_only_when_asked(tiny_cfg, monkeypatch):
    explained = torch.zeros(1, tiny_cfg.num_cells)
    explained[0, :3] = torch.tensor([0.29, 0.3, 1.0])
    off = SCALOR(tiny_cfg).eval()
    on = SCALOR(tiny_cfg.replace(first_frame_rejection=True)).eval()
    on.load_state_dict(off.state_dict())
    monkeypatch.setattr(on, "_explained_by_kept", lambda *a: explained)
    disc_off, kl_off, _ = _discover(off, 0, None, monkeypatch, explained)   # (_explained_ratio: unused at t = 0)
    disc_on, kl_on, _ = _discover(on, 0, None, monkeypatch, explained)
    z_off, z_on = disc_off.z_pres[0, :, 0], disc_on.z_pres[0, :, 0]
    assert disc_off.decoded is None and (z_off > 0).all()
    assert z_on[0] == z_off[0] and (z_on[1:3] == 0).all() and (z_on[3:] == z_off[3:]).all()
    assert torch.equal(kl_on.what, kl_off.what) and not torch.allclose(kl_on.pres, kl_off.pres)


def test_kl_weighted_by_pre_rejection_z_pres(tiny_cfg, monkeypatch):
    m = SCALOR(tiny_cfg).eval()
    explained = torch.ones(2, tiny_cfg.num_cells)        # everything rejected
    calls = []
    real = scalor_mod.normal_rsample
    monkeypatch.setattr(scalor_mod, "normal_rsample", lambda mu, sd: calls.append((mu, sd)) or real(mu, sd))
    disc, kl, _ = _discover(m, 1, None, monkeypatch, explained)
    assert (disc.z_pres == 0).all()
    # recompute: the z_pres before rejection = sigmoid of the sample; KL what = sum_c z_pres_c * KL_c
    (depth_q, where_q, what_q) = calls
    assert kl.what.abs().sum() > 0
    kl_cells = kl_std_normal(*what_q).sum(-1)          # (B, C)
    ratio = kl.what / kl_cells.sum(1)
    assert ((ratio > 0) & (ratio < 1)).all()           # a z_pres-weighted average, not zero


def test_cap_keeps_free_slots_by_z_pres_in_training_only(tiny_cfg, monkeypatch):
    m = SCALOR(tiny_cfg.replace(max_num_obj=16))
    explained = torch.zeros(2, tiny_cfg.num_cells)
    free = torch.tensor([3, 0])
    disc, _, _ = _discover(m.train(), 1, free, monkeypatch, explained, seed=3)
    z = disc.z_pres[..., 0]
    disc_nocap, _, _ = _discover(m, 1, None, monkeypatch, explained, seed=3)
    z_all = disc_nocap.z_pres[..., 0]
    assert (z_all > 0).all()
    assert int((z[0] > 0).sum()) == 3 and int((z[1] > 0).sum()) == 0
    top3 = z_all[0].topk(3).indices
    assert set(torch.nonzero(z[0]).flatten().tolist()) == set(top3.tolist())
    assert torch.equal(z[0][top3], z_all[0][top3])
    # a cap at least as large as the number of cells keeps everything (the reference indexes out of range)
    disc_big, _, _ = _discover(m, 1, torch.tensor([16, 40]), monkeypatch, explained, seed=3)
    assert torch.equal(disc_big.z_pres[..., 0], z_all)


def test_cap_reached_in_training_and_off_in_eval(tiny_cfg):
    cfg = tiny_cfg.replace(max_num_obj=4, seq_len=3)
    m = SCALOR(cfg)
    with torch.no_grad():  # make every proposal confident
        m.proposal.z_pres_net.bias.fill_(5.0)
    torch.manual_seed(0)
    out = m.train()(_seq(cfg), step=1, tau=0.5)
    assert out.counts.max() == 4 and (out.counts <= 4).all()
    torch.manual_seed(0)
    with torch.no_grad():
        out_eval = m.eval()(_seq(cfg), step=1, tau=0.5)
    assert out_eval.counts.max() > 4


# ---------------------------------------------------------------------------------------------
# Hand-off and drop
# ---------------------------------------------------------------------------------------------

def test_hand_off_above_0_7(tiny_cfg, monkeypatch):
    cfg = tiny_cfg.replace(seq_len=2)
    m = SCALOR(cfg).train()
    C = cfg.num_cells
    z = torch.full((2, C, 1), 0.0)
    z[0, :4, 0] = torch.tensor([0.69, 0.7, 0.7001, 0.95])
    z[1, :2, 0] = torch.tensor([0.71, 0.2])
    real = m.discover

    def fixed(x, img_enc, alpha_prop, free, ctx):
        disc, terms = real(x, img_enc, alpha_prop, free, ctx)
        disc.z_pres = z if ctx.first else torch.zeros_like(z)
        return disc, terms

    monkeypatch.setattr(m, "discover", fixed)
    out = m(_seq(cfg), step=1, tau=0.5, keep_records=True)
    assert out.counts[:, 0].tolist() == [2, 1]
    rec = out.records[0]
    assert rec.ids[0][rec.z_pres[0] > 0].tolist() == [1, 2, 3, 4]    # consecutive ids per sequence


def test_drop_when_running_absence_reaches_0_6(tiny_cfg, monkeypatch):
    m = SCALOR(tiny_cfg).train()
    cfg = tiny_cfg
    s = Slots.empty(cfg, 1, 3, "cpu")
    s.mask[:] = 1
    s.z_pres[:] = 0.9
    s.absence[:] = 0.3
    s.z_where[..., :2] = 0.1
    target = torch.tensor([0.7, 0.71, 0.6999])[None, :, None]            # new z_pres before the rule
    monkeypatch.setattr(scalor_mod, "relaxed_bernoulli_rsample", lambda logits, tau: torch.logit(target.double()).float())
    x = torch.rand(1, 3, 64, 64)
    new, kl = m.propagation(x, torch.randn(1, 64, 4, 4), s, m.glimpse_enc, _ctx(False, 0.5, 0.1))
    # absence 0.3 + (1 - z_pres): 0.6 -> dropped; 0.59 -> kept; 0.6001 -> dropped
    assert new.z_pres[0, :, 0].tolist() == pytest.approx([0.0, 0.71, 0.0], abs=1e-6)
    assert new.absence[0, :, 0].tolist() == pytest.approx([0.6, 0.59, 0.6001], abs=1e-5)


def test_compact_is_stable():
    keep = torch.tensor([[False, True, False, True, True], [False, False, False, False, False]])
    index, valid = compact(keep, 3)
    assert index[0].tolist() == [1, 3, 4]
    assert valid.tolist() == [[True, True, True], [False, False, False]]


# ---------------------------------------------------------------------------------------------
# KL terms and schedules
# ---------------------------------------------------------------------------------------------

def test_bernoulli_kl_by_hand():
    got = kl_bernoulli(torch.tensor([0.3, 0.5]), torch.tensor([0.1, 0.5]))
    want = 0.3 * math.log(0.3 / 0.1) + 0.7 * math.log(0.7 / 0.9)
    assert got[0].item() == pytest.approx(want, rel=1e-5)
    assert got[1].item() == pytest.approx(0.0, abs=1e-7)


def test_normal_kl_by_hand():
    got = kl_normal(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.0), torch.tensor(1.0))
    assert got.item() == pytest.approx(math.log(1 / 2) + (4 + 1) / 2 - 0.5, rel=1e-6)
    assert kl_std_normal(torch.tensor(1.0), torch.tensor(2.0)).item() == pytest.approx(got.item(), rel=1e-6)


def test_schedules():
    cfg = Config()
    assert tau_at(cfg, 0) == 1.0
    assert tau_at(cfg, 10000) == pytest.approx(math.sqrt(0.5))
    assert tau_at(cfg, 20000) == pytest.approx(0.5)
    assert tau_at(cfg, 50000) == 0.5
    assert z_pres_prior_at(cfg, 0) == pytest.approx(0.1)
    assert z_pres_prior_at(cfg, 250) == pytest.approx(0.1 + (1e-3 - 0.1) / 2)
    assert z_pres_prior_at(cfg, 500) == pytest.approx(1e-3)
    assert z_pres_prior_at(cfg, 10**6) == pytest.approx(1e-3)


def test_the_learning_rate_is_constant_by_default_and_falls_linearly_to_0_over_the_last_share():
    assert [lr_at(Config(lr=1e-3), p) for p in (0.0, 0.5, 1.0)] == [1e-3] * 3     # the reference
    cfg = Config(lr=1e-3, lr_decay_share=0.25)
    assert [lr_at(cfg, p) for p in (0.0, 0.5, 0.75)] == [1e-3] * 3
    assert lr_at(cfg, 0.875) == pytest.approx(5e-4) and lr_at(cfg, 1.0) == 0.0 and lr_at(cfg, 2.0) == 0.0
    with pytest.raises(ConfigError, match="lr_decay_share=1.5 must lie in"):
        Config(lr_decay_share=1.5)


# ---------------------------------------------------------------------------------------------
# Detaching across frames
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("step,crosses", [(29_999, False), (30_000, True)])
def test_gradient_crosses_frames_only_after_remove_detach_step(step, crosses):
    # without ConvLSTM and background, frame 1 depends on frame 0 only through the object state
    cfg = small_config(seq_len=2, observe_frames=1, phase_conv_lstm=False, phase_no_background=True)
    m = SCALOR(cfg).train()
    seq = _seq(cfg, B=2).requires_grad_()
    torch.manual_seed(0)
    out = m(seq, step=step, tau=1.0)
    assert out.counts[:, 0].min() > 0
    frame1 = out.log_like[:, 1].sum() - out.kl_total[:, 1].sum()
    (grad,) = torch.autograd.grad(frame1, seq)
    g0 = grad[:, 0].abs().sum().item()
    assert (g0 > 0) == crosses
    assert grad[:, 1].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

class _ConstDecoder(torch.nn.Module):
    def __init__(self, colours, alpha, G):
        super().__init__()
        self.colours, self.alpha, self.G = colours, alpha, G

    def forward(self, z_what):                        # z_what (N, D); colour chosen by z_what[:, 0]
        N = z_what.shape[0]
        o = self.colours[z_what[:, 0].long()][..., None, None].expand(N, 3, self.G, self.G)
        return o, torch.full((N, 1, self.G, self.G), self.alpha)


def test_normalised_compositing_and_straight_through_clamp(tiny_cfg):
    m = SCALOR(tiny_cfg)
    G = tiny_cfg.glimpse_size
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    m.glimpse_dec = _ConstDecoder(colours, 0.8, G)
    z_pres = torch.tensor([[0.9, 0.6]], requires_grad=True)
    depth = torch.tensor([[0.5, -1.0]])
    box = torch.tensor([0.1, 0.25, 0.0, 0.0])
    obj = Objects(z_what=torch.tensor([[[0.0], [1.0]]]), z_where=box.expand(1, 2, 4), z_depth=depth[..., None],
                  z_pres=z_pres, ids=torch.tensor([[1, 2]]), propagated=torch.tensor([[True, False]]),
                  index=torch.tensor([[0, 1]]), rendered=torch.tensor([[True, True]]))
    frame = m.render(obj, curriculum=False)
    w = torch.tensor([0.9, 0.6]) * 0.8 * torch.sigmoid(-depth[0])
    inside = (31, 31)                                 # centre pixel: inside both boxes
    fg = frame.foreground[0, :, inside[0], inside[1]]
    want = (w[:, None] * torch.tensor([0.9, 0.6])[:, None] * 0.8 * colours).sum(0) / w.sum()
    assert torch.allclose(fg, want, atol=1e-5)
    # alpha = 0.9*0.8 + 0.6*0.8 = 1.2 -> clamped to 1, but the gradient passes straight through
    a = frame.alpha_map[0, 0, inside[0], inside[1]]
    assert a.item() == pytest.approx(1.0)
    (g,) = torch.autograd.grad(a, z_pres)
    assert g[0].tolist() == pytest.approx([0.8, 0.8], abs=1e-5)
    assert frame.alpha_map[0, 0, 0, 0].item() == pytest.approx(1e-15, rel=1e-3)  # outside: eps


# ---------------------------------------------------------------------------------------------
# Background prior and generation
# ---------------------------------------------------------------------------------------------

def _record_samples(monkeypatch):
    calls = []
    monkeypatch.setattr(scalor_mod, "normal_rsample", lambda mean, std: calls.append((mean, std)) or mean)
    return calls


def test_background_prior_mean_is_previous_latent_plus_offset(tiny_cfg, monkeypatch):
    cfg = tiny_cfg.replace(seq_len=2)
    m = SCALOR(cfg).eval()
    calls = _record_samples(monkeypatch)
    with torch.no_grad():
        m(_seq(cfg), step=1, tau=0.5, generate=True)    # observe 1 frame, then sample the priors
    bg_calls = [c for c in calls if c[0].shape == (2, cfg.bg_what_dim)]
    z_bg0 = bg_calls[0][0]                             # sample = mean (patched)
    h1 = m.bg_prior_rnn(z_bg0, torch.zeros(2, cfg.bg_prior_rnn_hid_dim))
    offset, std = m.bg_prior_net(h1).chunk(2, -1)
    assert torch.allclose(bg_calls[1][0], z_bg0 + offset, atol=1e-6)
    assert torch.allclose(bg_calls[1][1], torch.nn.functional.softplus(std), atol=1e-6)


def test_generation_samples_priors_after_observe_frames(tiny_cfg, monkeypatch):
    cfg = tiny_cfg.replace(seq_len=4, observe_frames=2)
    m = SCALOR(cfg).eval()
    enc_calls = []
    m.glimpse_enc.register_forward_hook(lambda mod, inp, out: enc_calls.append(inp[0].shape[0]))
    pres_logits = []
    real = scalor_mod.relaxed_bernoulli_rsample
    monkeypatch.setattr(scalor_mod, "relaxed_bernoulli_rsample", lambda lg, tau: pres_logits.append(lg) or real(lg, tau))
    with torch.no_grad():
        torch.manual_seed(0)
        out = m(_seq(cfg), step=1, tau=0.5, generate=True)
    # the glimpse encoder only sees observed frames: frame 0 (discovery), frame 1 (propagation + discovery)
    assert len(enc_calls) == 3
    disc_logits = [lg for lg in pres_logits if lg.dim() == 4]   # discovery: (B, 1, h, w)
    assert len(disc_logits) == 4
    assert torch.allclose(disc_logits[2], torch.full_like(disc_logits[2], math.log(0.1 / 0.9)))
    assert not torch.allclose(disc_logits[1], torch.full_like(disc_logits[1], math.log(0.1 / 0.9)))
    assert out.recon.shape == (2, 4, 3, 64, 64)


# ---------------------------------------------------------------------------------------------
# Robustness: any batch size, empty scenes, default config
# ---------------------------------------------------------------------------------------------

def _assert_trains(m, seq, step=1):
    out = m(seq, step=step, tau=1.0)
    loss = out.loss()
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return out


@pytest.mark.parametrize("B", [1, 3])
def test_forward_backward_any_batch(tiny_cfg, B):
    out = _assert_trains(SCALOR(tiny_cfg).train(), _seq(tiny_cfg, B=B))
    assert out.log_like.shape == (B, tiny_cfg.seq_len)


def test_empty_scene_zero_objects(tiny_cfg):
    m = SCALOR(tiny_cfg).train()
    with torch.no_grad():
        m.proposal.z_pres_net.bias.fill_(-100.0)      # no proposal is confident: nothing is tracked
    out = _assert_trains(m, torch.zeros(2, tiny_cfg.seq_len, 3, 64, 64))
    assert (out.counts == 0).all()
    m.eval()
    with torch.no_grad():
        assert (m(torch.zeros(1, tiny_cfg.seq_len, 3, 64, 64), step=1).counts == 0).all()


def test_default_config_forward_backward_cpu():
    cfg = Config(seq_len=2, observe_frames=1)
    out = _assert_trains(SCALOR(cfg).train(), torch.rand(1, 2, 3, 128, 128))
    assert out.counts.max() <= 45


def test_eval_nll_weights_finite(tiny_cfg):
    m = SCALOR(tiny_cfg).eval()
    with torch.no_grad():
        out = m(_seq(tiny_cfg), step=1000, tau=0.5, nll=True)
    assert torch.isfinite(out.log_imp).all() and (out.log_imp != 0).any()


# ---------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,message", [
    (dict(img_h=100), "not divisible by the grid"),
    (dict(num_cell_h=4), "cells must be square"),
    (dict(max_num_obj=65), "exceeds the 64 cells"),
    (dict(max_num_obj=0), "max_num_obj=0 must be a positive"),
    (dict(observe_frames=10), "observe_frames=10"),
    (dict(glimpse_size=48), "glimpse_size=48"),
    (dict(var_s=0.2), "var_s < size_anc"),
    (dict(cp=0.0), "cp=0.0 .* must be positive: 0 would zero every gradient; pass --cp inf"),
    (dict(seq_len=1, observe_frames=1), "seq_len=1: .* pass --seq-len 2 or more"),
    (dict(conv_lstm_hid_dim=32), "conv_lstm_hid_dim=32 must equal img_encode_dim=64 while phase_conv_lstm"),
    (dict(img_encode_dim=24, conv_lstm_hid_dim=24), "img_encode_dim=24 must be a multiple of 16"),
    (dict(temporal_img_enc_hid_dim=12), "temporal_img_enc_hid_dim=12 must be a multiple of 8"),
    (dict(img_h=32, img_w=32, num_cell_h=2, num_cell_w=2, glimpse_size=16, max_num_obj=4,
          temporal_img_enc_hid_dim=8), "temporal_img_enc_hid_dim=8 with a 2x2 grid"),
    (dict(z_what_enc_dim=4), "z_what_enc_dim=4 leaves one value per GroupNorm group"),
])
def test_config_errors(changes, message):
    """Settings the layers cannot take are one-line errors before anything is built."""
    with pytest.raises(ConfigError, match=message):
        Config(**changes)


def test_narrowest_accepted_widths_run_a_single_glimpse():
    """One sequence, one object slot, a 2x2 grid: the GroupNorm layers at the narrowest widths
    validate accepts still see more than one value per group (train and eval, where a lone glimpse
    is the common case when tracking)."""
    cfg = small_config(img_h=32, img_w=32, num_cell_h=2, num_cell_w=2, glimpse_size=16, max_num_obj=1,
                       seq_len=2, observe_frames=1, batch_size=1, temporal_img_enc_hid_dim=16, z_what_enc_dim=8)
    torch.manual_seed(0)
    model = SCALOR(cfg)
    seq = torch.rand(1, 2, 3, 32, 32)
    _assert_trains(model.train(), seq)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(seq, step=1).recon).all()


def test_cap_keeps_exactly_free_on_ties(tiny_cfg, monkeypatch):
    """Saturated proposals (z_pres == 1.0 in fp32) still leave exactly `free` survivors."""
    m = SCALOR(tiny_cfg).train()
    monkeypatch.setattr(scalor_mod, "relaxed_bernoulli_rsample", lambda logits, tau: torch.full_like(logits, 40.0))
    disc, _, _ = _discover(m, 1, torch.tensor([5, 2]), monkeypatch, torch.zeros(2, tiny_cfg.num_cells))
    z = disc.z_pres[..., 0]
    assert (z > 0).sum(1).tolist() == [5, 2]
    assert z[0, :5].tolist() == [1.0] * 5          # ties broken by cell order


def test_glimpse_checkpointing_gives_the_same_loss_and_gradients(tiny_cfg):
    grads = []
    for ckpt in (False, True):
        cfg = tiny_cfg
        torch.manual_seed(0)
        m = fast.apply(SCALOR(cfg).train(), fast.SpeedOptions(checkpoint_glimpses=ckpt))
        torch.manual_seed(1)
        loss = m(_seq(cfg), step=40_000, tau=0.7).loss()
        loss.backward()
        grads.append((loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters()])))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)


def test_given_forward_returns_given_values_and_backpropagates_through_full():
    """Rendering reuses the rejection's trunk features: the forward returns what `given` computed,
    the backward recomputes `full` and gives the gradients plain autograd gives (several inputs,
    one without gradient, a frozen parameter)."""
    from fast import given_forward
    torch.manual_seed(0)
    lin, frozen = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2).requires_grad_(False)
    x, y = torch.randn(4, 3, requires_grad=True), torch.randn(4, 2)      # y: no gradient
    w = torch.randn(4, 2)
    full = lambda x, y: (frozen(torch.tanh(lin(x))) * y, x.detach().argmax(1))  # noqa: E731
    given = lambda x, y: (torch.full((4, 2), 7.0), torch.zeros(4, dtype=torch.long))  # noqa: E731
    params = list(lin.parameters()) + list(frozen.parameters())
    out, idx = given_forward(given, full, (x, y), params)
    assert (out == 7.0).all() and not idx.requires_grad                 # the forward is `given`'s
    (out * w).sum().backward()
    got = [x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone()]
    assert frozen.weight.grad is None and y.grad is None
    x.grad = lin.weight.grad = lin.bias.grad = None
    (full(x, y)[0] * w).sum().backward()
    for a, b in zip(got, [x.grad, lin.weight.grad, lin.bias.grad]):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)
    with torch.no_grad():   # without gradient it is `given` alone
        assert (given_forward(given, full, (x, y), params)[0] == 7.0).all()


def test_given_forward_recomputes_under_the_forward_autocast():
    """bf16 autocast around the forward, backward outside it (as TrainStep does): the recomputation
    runs in bf16 as torch.utils.checkpoint's would, so the gradients are those of the bf16 function."""
    from fast import given_forward
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    x, w = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
    full = lambda x: (torch.tanh(lin(x)).float(),)  # noqa: E731
    grads = []
    for use_given in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = given_forward(full, full, (x,), lin.parameters())[0] if use_given else full(x)[0]
        (out * w).sum().backward()
        grads.append((x.grad.clone(), lin.weight.grad.clone()))
        x.grad = lin.weight.grad = lin.bias.grad = None
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_given_forward_recomputes_under_the_forward_autocast_cache_setting():
    """TrainStep runs the forward with autocast's cast cache off and backward outside it: the
    recomputation sees the cache off too (a compiled `full` is guarded on it and would otherwise
    compile a second time), and the setting outside is restored."""
    from fast import given_forward
    seen = []

    def full(x):
        seen.append(torch.is_autocast_cache_enabled())
        return (x * 2,)
    x = torch.randn(4, requires_grad=True)
    assert torch.is_autocast_cache_enabled()
    with torch.autocast("cpu", enabled=False, cache_enabled=False):
        out = given_forward(full, full, (x,), [])[0]
    out.sum().backward()
    assert seen == [False, False] and torch.is_autocast_cache_enabled()
    assert torch.equal(x.grad, torch.full((4,), 2.0))


@pytest.mark.parametrize("size", [64, 128])
def test_decoder_runs_both_heads_at_once_with_the_same_numbers(size):
    """GlimpseDecoder.forward stacks the two heads' first convolutions (and, on 128-px frames, their
    GroupNorms): outputs and every gradient equal those of dec_o and dec_alpha run apart, and of the
    gradient-free parts (features_and_alpha, appearance) that rendering's forward uses."""
    from modules import GlimpseDecoder
    cfg = small_config(img_h=size, img_w=size, glimpse_size=32)
    torch.manual_seed(0)
    dec = fast.apply(GlimpseDecoder(cfg), fast.SpeedOptions())
    for p in dec.parameters():       # GroupNorm affine away from 1 / 0, so a wrong pairing would show
        p.data += 0.1 * torch.randn_like(p)
    z = torch.randn(6, cfg.z_what_dim)
    w_o, w_a = torch.randn(6, 3, 32, 32), torch.randn(6, 1, 32, 32)
    results = []
    for both in (True, False):
        dec.zero_grad()
        if both:
            o, alpha = dec(z)
        else:
            feat = dec.dec(z.view(*z.shape, 1, 1))
            o, alpha = torch.sigmoid(dec.dec_o(feat)), torch.sigmoid(dec.dec_alpha(feat))
        ((o * w_o).sum() + (alpha * w_a).sum()).backward()
        results.append((o.detach(), alpha.detach(), [p.grad.clone() for p in dec.parameters()]))
    (o1, a1, g1), (o2, a2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a1, a2, rtol=1e-5, atol=1e-6)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        feat, alpha = dec.features_and_alpha(z)
        torch.testing.assert_close(alpha, a1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dec.appearance(feat), o1, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Layout hint and the captured step's guard
# ---------------------------------------------------------------------------------------------

def test_conv_before_shuffle_is_a_conv2d_and_its_hint_keeps_the_numbers():
    """Conv1x1BeforeShuffle has nn.Conv2d's parameters and numbers; the hint it adds inside
    torch.compile on CUDA is the identity forward and hands on the same gradient, in channels-last,
    and traces without a graph break."""
    from fast import Conv1x1BeforeShuffle, _ChannelsLastGrad
    conv, plain = Conv1x1BeforeShuffle(8, 32, 1), torch.nn.Conv2d(8, 32, 1)
    assert list(conv.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(conv(x), plain(x))

    y = torch.randn(2, 32, 5, 5, requires_grad=True)
    grad = torch.randn(2, 32, 5, 5)
    out = _ChannelsLastGrad.apply(y)
    assert torch.equal(out, y)
    (g,) = torch.autograd.grad(out, y, grad)
    assert torch.equal(g, grad) and g.is_contiguous(memory_format=torch.channels_last)

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    f = lambda t: torch.nn.functional.pixel_shuffle(_ChannelsLastGrad.apply(t * 2), 2).square().sum()  # noqa: E731
    (g,) = torch.autograd.grad(torch.compile(f, backend="aot_eager")(y), y)
    assert torch.equal(g, 8 * y.detach()) and sum(counters["graph_break"].values()) == 0


def test_captured_step_zeroes_the_gradients_of_a_non_finite_step(tiny_cfg):
    """A step captured in a CUDA graph cannot skip the optimizer: with a NaN loss its gradients are
    zeroed on the device, so RMSprop leaves every parameter where it was (the branch run on the CPU)."""
    from engine import TrainStep, make_optimizer
    model = SCALOR(tiny_cfg).train()
    before = [p.detach().clone() for p in model.parameters()]
    step = TrainStep(model, make_optimizer(model))
    result = step._forward_backward(_seq(tiny_cfg), 1, 1.0, 0.1, inject_nan=True, capturing=True)
    assert not bool(result.finite)
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def _adds_in_backward(loss):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        adds = foreach = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            self.adds += name.startswith("aten.add.")
            self.foreach += name.startswith("aten._foreach_add")
            return func(*args, **(kwargs or {}))
    with Count() as count:
        loss.backward()
    return count.adds, count.foreach


def test_fused_param_grads_give_the_same_loss_and_gradients_with_fewer_additions(tiny_cfg):
    """cfg.fused_param_grads: each frame uses its own aliases of the parameters and their gradients
    are summed in T - 1 multi-tensor additions. Same loss, gradients to float-summation order (also
    through the recomputed glimpse encoder and decoder), the model's own Parameters back in place
    after the forward, and far fewer single additions in backward."""
    results = {}
    for fused in (False, True):
        cfg = tiny_cfg
        torch.manual_seed(0)
        model = fast.apply(SCALOR(cfg).train(), fast.SpeedOptions(fused_param_grads=fused))
        params = list(model.parameters())
        torch.manual_seed(1)
        loss = model(_seq(cfg), step=100, tau=tau_at(cfg, 99), z_pres_prior=z_pres_prior_at(cfg, 100)).loss()
        assert list(model.parameters()) == params and all(type(p) is torch.nn.Parameter for p in params)
        adds, foreach = _adds_in_backward(loss)
        results[fused] = loss.detach(), [p.grad for p in params], adds, foreach
    (loss, grads, adds, _), (loss_f, grads_f, adds_f, foreach_f) = results[False], results[True]
    assert torch.equal(loss_f, loss)
    for g, r in zip(grads_f, grads):
        assert (g is None) == (r is None)
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6 * float(r.abs().max()))
    assert foreach_f == tiny_cfg.seq_len - 1
    assert adds_f < 0.6 * adds        # 3 frames at the small config: 620 -> 328


def test_fused_param_grads_restore_the_parameters_after_an_error(tiny_cfg, monkeypatch):
    model = fast.apply(SCALOR(tiny_cfg).train(), fast.SpeedOptions())
    params = list(model.parameters())

    def fail(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(model, "background", fail)
    with pytest.raises(RuntimeError, match="boom"):
        model(_seq(tiny_cfg), step=1)
    assert list(model.parameters()) == params and all(type(p) is torch.nn.Parameter for p in params)


def test_fused_param_grads_leave_frozen_parameters_alone(tiny_cfg):
    model = fast.apply(SCALOR(tiny_cfg).train(), fast.SpeedOptions())
    model.bg_dec.requires_grad_(False)
    model(_seq(tiny_cfg), step=100).loss().backward()
    assert all(p.grad is None for p in model.bg_dec.parameters())
    assert all(p.grad is not None for p in model.glimpse_dec.parameters())


# ---------------------------------------------------------------------------------------------
# Windows: a video processed in pieces, the state handed across
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training,generate", [(False, False), (True, False), (False, True)])
def test_windows_with_handed_state_equal_one_forward(tiny_cfg, training, generate):
    """Frames 0-1 then 2-4 with `state=` give the frames, terms, ids and state of one forward over
    0-4 (same noise: the draws happen in the same order), in eval, training (fixed slots) and
    generation (observe_frames counted from the video's start)."""
    cfg = tiny_cfg.replace(seq_len=5, observe_frames=3)
    torch.manual_seed(0)
    model = SCALOR(cfg).train(training)
    seq = _seq(cfg)
    with torch.no_grad():
        torch.manual_seed(1)
        whole = model(seq, step=10, tau=0.7, keep_records=True, generate=generate)
        torch.manual_seed(1)
        first = model(seq[:, :2], step=10, tau=0.7, keep_records=True, generate=generate)
        second = model(seq[:, 2:], step=10, tau=0.7, keep_records=True, generate=generate, state=first.state)
    assert first.state.frames_seen == 2 and second.state.frames_seen == 5
    for name in ("recon", "log_like", "kl_what", "kl_where", "kl_depth", "kl_pres", "kl_bg", "counts"):
        joined = torch.cat((getattr(first, name), getattr(second, name)), 1)
        torch.testing.assert_close(joined, getattr(whole, name), rtol=0, atol=0)
    for a, b in zip(first.records + second.records, whole.records):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.z_where, b.z_where)
    assert torch.equal(second.state.next_id, whole.state.next_id)
    assert torch.equal(second.state.slots.ids, whole.state.slots.ids)
    assert all(torch.equal(x, y) for (h1, c1), (h2, c2) in zip(second.state.lstm, whole.state.lstm)
               for x, y in ((h1, h2), (c1, c2)))


def _tensors(value):
    """Every tensor inside value: dataclasses, lists, tuples and dicts walked through."""
    import dataclasses
    if torch.is_tensor(value):
        yield value
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


@pytest.mark.parametrize("speed", [False, True])
def test_a_training_step_returns_nothing_that_keeps_its_autograd_graph(tiny_cfg, speed):
    """A CUDA-graph capture fails while an earlier step's autograd graph is alive (its AccumulateGrad
    nodes): the step's result, output records and the handed-on video state included, must hold no
    tensor with a grad_fn or requiring gradients."""
    from engine import TrainStep, make_optimizer
    torch.manual_seed(0)
    model = SCALOR(tiny_cfg).train()
    if speed:
        model = fast.apply(model, fast.SpeedOptions())
    step_fn = TrainStep(model, make_optimizer(model))
    result = step_fn(_seq(tiny_cfg), 1, keep_records=True)
    found = list(_tensors(result))
    assert result.output.state is not None and len(found) > 20
    assert not [t.shape for t in found if t.grad_fn is not None or t.requires_grad]


def test_a_failed_cuda_graph_capture_goes_on_with_eager_steps(tiny_cfg, monkeypatch, capsys):
    """When the capture of the training step fails (an operation that cannot be captured), the step
    runs eagerly instead, the run goes on without CUDA graphs, and one notice says so."""
    from engine import TrainStep, make_optimizer
    from utils import step_switches
    torch.manual_seed(0)
    model = SCALOR(tiny_cfg).train()
    step_fn = TrainStep(model, make_optimizer(model), cuda_graph=True)
    step_fn.seen[step_switches(tiny_cfg, 1)] = step_fn.warmup          # warm-up done: the next step captures

    def fail(batch, step):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
    monkeypatch.setattr(step_fn, "_capture", fail)
    before = [p.detach().clone() for p in model.parameters()]
    result = step_fn(_seq(tiny_cfg), 1)
    assert bool(result.finite) and not step_fn.cuda_graph and not step_fn.graphs
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))   # the step was taken
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("notice: the CUDA graph capture failed (RuntimeError: CUDA error")
    assert step_fn(_seq(tiny_cfg), 2).output is not None                           # eager from then on
