"""A plain SCALOR forward pass: the test oracle for `scalor.SCALOR.forward`.

This computes the reference implementation's mathematics (JindongJiang/SCALOR: scalor.py,
propagation.py, discovery.py) the slow, obvious way and in the reference's structure:

* object lists of variable length per frame, padded to the batch maximum
  (`max_length = int(lengths.max())`); propagation is skipped while nothing is tracked;
* every propagated object and every discovery cell is rendered into a full frame with its own
  affine grid (`modules.spatial_transform(..., inverse=True)`): placed colour, importance map and
  alpha map; importance is normalised over all objects of a frame, then summed;
* rejection compares full-resolution alpha maps; the training cap sorts z_pres as the reference
  does, with the project's two fixes (no cap when the free slots reach the number of cells; on
  ties exactly the free number survive);
* KLs come from `torch.distributions` (Normal + kl_divergence) and the reference's Bernoulli KL;
* glimpses are cropped from the frame repeated once per object;
* the hand-off to the next frame is a Python loop over the batch with `nonzero` indices.

It reuses the model's own layers and weights, and draws its random numbers in exactly the order
and shapes `SCALOR.forward` draws them (see the `_noise_*` helpers), so after the same
`torch.manual_seed` both compute the same sample and must agree to rounding.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence
from torch.distributions.utils import probs_to_logits

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from modules import spatial_transform  # noqa: E402
from utils import z_pres_prior_at  # noqa: E402

EPS = 1e-15


# ------------------------------------------------------------------------------------------------
# Random numbers: the same generator calls, shapes and order as modules.normal_rsample and
# modules.relaxed_bernoulli_rsample.
# ------------------------------------------------------------------------------------------------

def _noise_normal(shape, like):
    """Standard normal noise of `shape`, drawn as `torch.randn_like` on a tensor of that shape."""
    return torch.randn_like(like.new_empty(shape))


def _noise_logistic(shape, like):
    """Logistic noise log u - log(1 - u), u ~ U(0, 1) clamped to [eps, 1 - eps] (`rand_like`)."""
    eps = torch.finfo(like.dtype).eps
    u = torch.rand_like(like.new_empty(shape)).clamp(eps, 1 - eps)
    return torch.log(u) - torch.log1p(-u)


def _rsample(dist: Normal, noise):
    return dist.loc + dist.scale * noise


def _relaxed_bernoulli_logit(logits, noise, tau):
    """Logit-space relaxed-Bernoulli sample from logits (the project's deliberate form)."""
    return (logits + noise) / tau


def kl_z_pres_bernoulli(z_pres_logits, prior_pres_prob, eps=EPS):
    """The reference's Bernoulli KL with eps inside the logs, flattened."""
    q = torch.sigmoid(z_pres_logits).reshape(-1)
    p = prior_pres_prob.reshape(-1)
    return q * (torch.log(q + eps) - torch.log(p + eps)) + \
        (1 - q) * (torch.log(1 - q + eps) - torch.log(1 - p + eps))


def _bernoulli_log_prob(value, probs, eps=EPS):
    return value * torch.log(probs + eps) + (1 - value) * torch.log(1 - probs + eps)


def _anchor(cfg, raw):
    """(N, 2) pre-tanh (scale, ratio) -> (N, 2) half-extents (sx, sy), as the reference."""
    scale, ratio = raw.tanh().chunk(2, 1)
    scale = cfg.size_anc + cfg.var_s * scale
    ratio = cfg.ratio_anc + cfg.var_anc * ratio
    ratio_sqrt = ratio.sqrt()
    return scale / ratio_sqrt, scale * ratio_sqrt


# ------------------------------------------------------------------------------------------------
# Propagation (the reference's PropagationCell + PropagatePrior), over the first max_length slots
# ------------------------------------------------------------------------------------------------

def _prior_cell(P, pre):
    prior = P.prior
    inp = prior.prior_rnn_inp_net(torch.cat((pre["z_what"], pre["z_where"], pre["z_where_bias"],
                                             pre["z_depth"], pre["z_pres"]), dim=1))
    out, hid = prior.prior_rnn(inp, (pre["prior_out"], pre["prior_hid"]))
    what_mean, what_std = prior.prior_what_net(out).chunk(2, -1)
    depth_mean, depth_std = prior.prior_depth_net(out).chunk(2, -1)
    where_mean, where_std = prior.prior_where_bias_net(out).chunk(2, -1)
    pres_prob = torch.sigmoid(prior.prior_pres_net(out) + 5.0)
    return dict(out=out, hid=hid, what=Normal(what_mean, F.softplus(what_std)),
                where=Normal(where_mean, F.softplus(where_std)),
                depth=Normal(depth_mean, F.softplus(depth_std)), pres_prob=pres_prob)


def propagate(model, x, img_enc, pre_b, tau, gen_t, nll, num_noise_slots):
    """pre_b: dict of (bs, max_length, ...) tensors; num_noise_slots: the model's slot count K."""
    cfg, P = model.cfg, model.propagation
    bs, n = pre_b["z_what"].shape[:2]
    bns = bs * n
    H, W, G = cfg.img_h, cfg.img_w, cfg.glimpse_size
    D, nh, nw = img_enc.shape[1:]
    K = num_noise_slots

    def noise_normal(d):
        return _noise_normal((bs, K, d), x)[:, :n].reshape(bns, d)

    obj_mask = (pre_b["z_pres"].view(bs, n) != 0).to(x.dtype)
    pre = {k: v.reshape(bns, -1) for k, v in pre_b.items()}

    prior = _prior_cell(P, pre)

    # attention on the image features at the previous centre, fixed scale 0.5
    z_where_att = x.new_ones(bns, 4) * 0.5
    z_where_att[:, 2:] = pre["z_where"][:, 2:].detach()
    img_enc_att = spatial_transform(img_enc.unsqueeze(1).expand(-1, n, -1, -1, -1).reshape(bns, D, nh, nw),
                                    z_where_att, (bns, D, nh // 2, nw // 2), inverse=False)
    att = P.att_linear(P.att_conv(img_enc_att).view(bns, -1))

    rnn_inp = P.temporal_rnn_inp_net(torch.cat((pre["z_where"], pre["z_pres"], pre["z_what"],
                                                pre["z_where_bias"], att), dim=1))
    h = P.tracker(rnn_inp, pre["tracker_hid"])

    # z_where transition
    where_mean, where_std = P.z_where_transit_bias_net(
        torch.cat((h, pre["z_what"], pre["z_where"], pre["z_where_bias"], att), dim=1)).chunk(2, -1)
    where_std = F.softplus(where_std - 2.0)
    q_where = prior["where"] if gen_t else Normal(where_mean, where_std)
    z_where_bias = _rsample(q_where, noise_normal(4))
    z_where_shift = pre["z_where"][:, 2:] + cfg.where_update_scale * z_where_bias[:, 2:].tanh()
    sx, sy = _anchor(cfg, z_where_bias[:, :2])
    z_where = torch.cat((sx, sy, z_where_shift.clamp(-1.05, 1.05)), dim=1)

    # z_what: glimpse encoder at the new box, gated with the tracker
    x_att = spatial_transform(x.unsqueeze(1).expand(-1, n, -1, -1, -1).reshape(bns, 3, H, W), z_where,
                              (bns, 3, G, G), inverse=False)
    enc_mean, enc_std = model.glimpse_enc(x_att)
    enc_std = F.softplus(enc_std)
    tmp_mean, tmp_std = P.z_what_from_temporal_net(h).chunk(2, -1)
    tmp_std = F.softplus(tmp_std)
    forget_gate, input_gate = P.z_what_gate_net(torch.cat((h, att), dim=1)).chunk(2, -1)
    what_mean = input_gate * enc_mean + forget_gate * tmp_mean
    what_std = F.softplus(input_gate * enc_std + forget_gate * tmp_std)
    q_what = prior["what"] if gen_t else Normal(what_mean, what_std)
    z_what = _rsample(q_what, noise_normal(cfg.z_what_dim))

    depth_mean, depth_std = P.z_depth_transit_net(torch.cat((h, z_what, att), dim=1)).chunk(2, -1)
    q_depth = prior["depth"] if gen_t else Normal(depth_mean, F.softplus(depth_std))
    z_depth = _rsample(q_depth, noise_normal(1))

    z_pres_logits = cfg.pres_logit_factor * torch.tanh(
        P.z_pres_transit(torch.cat((h, z_where, z_where_bias, z_what), dim=1)) + 2.0)
    sample_logits = probs_to_logits(prior["pres_prob"], is_binary=True) if gen_t else z_pres_logits
    pres_noise = _noise_logistic((bs, K, 1), x)[:, :n].reshape(bns, 1)
    z_pres = torch.sigmoid(_relaxed_bernoulli_logit(sample_logits, pres_noise, tau))

    cumsum = pre["cumsum"] + (1 - z_pres) * obj_mask.view(bns, 1)
    z_pres = z_pres * (cumsum < cfg.z_pres_stop_threshold).to(x.dtype)

    # full-resolution renders
    o_att, alpha_att = model.glimpse_dec(z_what)
    alpha_att_hat = alpha_att * z_pres.view(-1, 1, 1, 1)
    y_att = alpha_att_hat * o_att
    y_each_obj = spatial_transform(y_att, z_where, (bns, 3, H, W), inverse=True)
    importance = alpha_att_hat * torch.sigmoid(-z_depth).view(-1, 1, 1, 1)
    importance_full = spatial_transform(importance, z_where, (bns, 1, H, W), inverse=True)
    alpha_map = spatial_transform(alpha_att_hat, z_where, (bns, 1, H, W), inverse=True)

    m = obj_mask.view(bns)
    kl_pres = (kl_z_pres_bernoulli(z_pres_logits, prior["pres_prob"]) * m).view(bs, n).sum(1)
    kl_what = (kl_divergence(q_what, prior["what"]).sum(1) * z_pres.view(bns) * m).view(bs, n).sum(1)
    kl_where = (kl_divergence(q_where, prior["where"]).sum(1) * z_pres.view(bns) * m).view(bs, n).sum(1)
    kl_depth = (kl_divergence(q_depth, prior["depth"]).sum(1) * z_pres.view(bns) * m).view(bs, n).sum(1)

    log_imp = x.new_zeros(bs)
    if nll:
        on = (z_pres > 0.5).to(x.dtype) * m.view(bns, 1)
        imp_what = (prior["what"].log_prob(z_what) - q_what.log_prob(z_what)) * on
        imp_depth = (prior["depth"].log_prob(z_depth) - q_depth.log_prob(z_depth)) * on
        imp_where = (prior["where"].log_prob(z_where_bias) - q_where.log_prob(z_where_bias)) * on
        pres_bin = (z_pres > 0.5).to(x.dtype)
        imp_pres = (_bernoulli_log_prob(pres_bin, prior["pres_prob"]) -
                    _bernoulli_log_prob(pres_bin, torch.sigmoid(z_pres_logits))) * m.view(bns, 1)
        log_imp = imp_what.view(bs, -1).sum(1) + imp_depth.view(bs, -1).sum(1) + \
            imp_where.view(bs, -1).sum(1) + imp_pres.view(bs, -1).sum(1)

    mk = obj_mask.view(bs, n, 1)
    where_dummy = x.new_tensor([0.5, 0.5, 2.0, 2.0]).expand(bs, n, 4)   # the reference's filler box
    mi = obj_mask.view(bs, n, 1, 1, 1)
    return dict(
        y_each_obj=y_each_obj.view(bs, n, 3, H, W) * mi, alpha_map=alpha_map.view(bs, n, 1, H, W) * mi,
        importance_map=importance_full.view(bs, n, 1, H, W) * mi,
        z_what=z_what.view(bs, n, -1) * mk, z_where=z_where.view(bs, n, -1) * mk + where_dummy * (1 - mk),
        z_where_bias=z_where_bias.view(bs, n, -1) * mk, z_depth=z_depth.view(bs, n, -1) * mk,
        z_pres=z_pres.view(bs, n, -1) * mk, tracker_hid=h.view(bs, n, -1) * mk,
        prior_out=prior["out"].view(bs, n, -1), prior_hid=prior["hid"].view(bs, n, -1),
        cumsum=cumsum.view(bs, n, -1),
        kl_what=kl_what, kl_where=kl_where, kl_depth=kl_depth, kl_pres=kl_pres, log_imp=log_imp)


# ------------------------------------------------------------------------------------------------
# Discovery (the reference's ProposalCore + ProposalRejectionCell), every cell at full resolution
# ------------------------------------------------------------------------------------------------

def discover(model, x, img_enc, alpha_map_prop, lengths, t, tau, prior_prob, gen_t, nll):
    cfg, PN = model.cfg, model.proposal
    bs = x.shape[0]
    nh, nw = cfg.num_cell_h, cfg.num_cell_w
    C = nh * nw
    H, W, G = cfg.img_h, cfg.img_w, cfg.glimpse_size
    alpha_map_prop = alpha_map_prop.detach()
    max_num_disc_obj = (cfg.max_num_obj - lengths).long()
    prior_z_pres_prob = torch.tensor(prior_prob, dtype=x.dtype)

    if gen_t:
        z_pres_logits = probs_to_logits(x.new_ones(1) * cfg.gen_disc_pres_probs, is_binary=True) \
            .view(1, 1, 1, 1).expand(bs, -1, nh, nw)
        depth_mean, depth_std = x.new_zeros(bs, 1, nh, nw), x.new_ones(bs, 1, nh, nw)
        where_mean, where_std = x.new_zeros(bs, 4, nh, nw), x.new_ones(bs, 4, nh, nw)
    else:
        mask_enc = PN.mask_enc_net(alpha_map_prop)
        cat_enc = PN.img_mask_cat_enc(torch.cat((img_enc, mask_enc), dim=1))
        z_pres_logits = cfg.pres_logit_factor * torch.tanh(PN.z_pres_net(cat_enc))
        depth_mean, depth_std = PN.z_depth_net(cat_enc).chunk(2, 1)
        depth_std = F.softplus(depth_std)
        where_mean, where_std = PN.z_where_net(cat_enc).chunk(2, 1)
        where_std = F.softplus(where_std)

    z_pres = torch.sigmoid(_relaxed_bernoulli_logit(z_pres_logits, _noise_logistic((bs, 1, nh, nw), x), tau))
    q_depth = Normal(depth_mean, depth_std)
    z_depth = _rsample(q_depth, _noise_normal((bs, 1, nh, nw), x))
    q_where = Normal(where_mean, where_std)
    z_where_origin = _rsample(q_where, _noise_normal((bs, 4, nh, nw), x))

    offset_y, offset_x = torch.meshgrid(torch.arange(nh, dtype=x.dtype), torch.arange(nw, dtype=x.dtype),
                                        indexing="ij")
    sx, sy = _anchor(cfg, z_where_origin[:, :2])
    cx = 2.0 / nw * (offset_x + 0.5 + z_where_origin[:, 2:3].tanh()) - 1
    cy = 2.0 / nh * (offset_y + 0.5 + z_where_origin[:, 3:4].tanh()) - 1
    z_where = torch.cat((sx, sy, cx, cy), dim=1).permute(0, 2, 3, 1).reshape(-1, 4)   # (bs * C, 4)

    z_pres_orgin = z_pres
    if gen_t:
        q_what = Normal(x.new_zeros(bs * C, cfg.z_what_dim), x.new_ones(bs * C, cfg.z_what_dim))
    else:
        x_att = spatial_transform(torch.stack(C * (x,), dim=1).view(-1, 3, H, W), z_where,
                                  (bs * C, 3, G, G), inverse=False)
        what_mean, what_std = model.glimpse_enc(x_att)
        q_what = Normal(what_mean, F.softplus(what_std))
    z_what = _rsample(q_what, _noise_normal((bs, C, cfg.z_what_dim), x).view(bs * C, -1))

    o_att, alpha_att = model.glimpse_dec(z_what)

    rejected = x.new_zeros(bs)
    pres_mask = None
    if cfg.phase_rejection and t > 0:
        alpha_map_raw = spatial_transform(alpha_att, z_where, (bs * C, 1, H, W), inverse=True)
        proposed = (alpha_map_raw > cfg.proposal_alpha_threshold).to(x.dtype)
        tracked = (alpha_map_prop > cfg.propagated_alpha_threshold).to(x.dtype).view(bs, 1, 1, H, W) \
            .expand(-1, C, -1, -1, -1).reshape(-1, 1, H, W)
        explained = (proposed * tracked).view(bs * C, -1).sum(1) / (proposed.view(bs * C, -1).sum(1) + EPS)
        pres_mask = (explained < cfg.explained_ratio_threshold).view(bs, 1, nh, nw).to(x.dtype)
        rejected = ((z_pres > 0) & (pres_mask == 0)).view(bs, -1).sum(1).to(x.dtype)
        z_pres = z_pres * pres_mask

    capped, tie_kept = x.new_zeros(bs), x.new_zeros(bs)
    if model.training and cfg.phase_obj_num_contrain:
        # The reference keeps z_pres > (the k-th largest z_pres), k = max_num_obj - lengths. The
        # project's fixes: nothing to cap when k >= C (the reference indexes out of range), and on
        # ties keep exactly the k largest, first cells first (the reference keeps fewer, e.g. none
        # when many z_pres saturate at 1.0).
        z_pres = z_pres.view(bs, -1)
        cap_mask = torch.ones_like(z_pres)
        for b in range(bs):
            k = int(max_num_disc_obj[b])
            if k < C:
                ranked, order = torch.sort(z_pres[b], descending=True, stable=True)
                cap_mask[b] = 0
                cap_mask[b, order[:k]] = 1
                tie_kept[b] = ((cap_mask[b] == 1) & (z_pres[b] <= ranked[k]) & (z_pres[b] > 0)).sum()
        cap_mask = cap_mask * (z_pres > 0).to(x.dtype)
        if gen_t:
            cap_mask = torch.zeros_like(cap_mask)
        capped = ((z_pres > 0) & (cap_mask == 0)).sum(1).to(x.dtype)
        z_pres = (z_pres * cap_mask).view(bs, 1, nh, nw)

    alpha_att_hat = alpha_att * z_pres.view(-1, 1, 1, 1)
    y_att = alpha_att_hat * o_att
    y_each_cell = spatial_transform(y_att, z_where, (bs * C, 3, H, W), inverse=True)
    importance = alpha_att_hat * torch.sigmoid(-z_depth).view(-1, 1, 1, 1)
    importance_full = spatial_transform(importance, z_where, (bs * C, 1, H, W), inverse=True)
    alpha_map = spatial_transform(alpha_att_hat, z_where, (bs * C, 1, H, W), inverse=True)

    p_what = Normal(x.new_zeros(1), x.new_ones(1))
    p_depth = Normal(x.new_zeros(1), x.new_ones(1))
    p_where = Normal(x.new_zeros(4, 1, 1), x.new_ones(4, 1, 1))
    kl_what = (kl_divergence(q_what, p_what) * z_pres_orgin.view(-1, 1)).view(bs, C, -1)
    kl_depth = (kl_divergence(q_depth, p_depth) * z_pres_orgin).view(bs, C, -1)
    kl_where = kl_divergence(q_where, p_where) * z_pres_orgin
    if pres_mask is not None:
        p_pres = prior_z_pres_prob * pres_mask + cfg.z_pres_masked_prior * (1 - pres_mask)
    else:
        p_pres = prior_z_pres_prob
    kl_pres = kl_z_pres_bernoulli(z_pres_logits, p_pres).view(bs, C, 1)

    log_imp = x.new_zeros(bs)
    if nll:
        on = (z_pres_orgin > 0.5).to(x.dtype)
        imp_what = ((p_what.log_prob(z_what) - q_what.log_prob(z_what)) * on.view(-1, 1)).view(bs, C, -1)
        imp_depth = (p_depth.log_prob(z_depth) - q_depth.log_prob(z_depth)) * on
        imp_where = (p_where.log_prob(z_where_origin) - q_where.log_prob(z_where_origin)) * on
        pres_bin = (z_pres > 0.5).to(x.dtype)
        imp_pres = _bernoulli_log_prob(pres_bin, p_pres) - _bernoulli_log_prob(pres_bin, torch.sigmoid(z_pres_logits))
        log_imp = imp_what.flatten(1).sum(1) + imp_depth.flatten(1).sum(1) + imp_where.flatten(1).sum(1) + \
            imp_pres.flatten(1).sum(1)

    return dict(
        y_each_obj=y_each_cell.view(bs, C, 3, H, W), alpha_map=alpha_map.view(bs, C, 1, H, W),
        importance_map=importance_full.view(bs, C, 1, H, W),
        z_what=z_what.view(bs, C, -1), z_where=z_where.view(bs, C, -1),
        z_where_bias=torch.zeros_like(z_where.view(bs, C, -1)), z_depth=z_depth.view(bs, C, -1),
        z_pres=z_pres.view(bs, C, -1),
        kl_what=kl_what.flatten(1).sum(1), kl_where=kl_where.flatten(1).sum(1),
        kl_depth=kl_depth.flatten(1).sum(1), kl_pres=kl_pres.flatten(1).sum(1), log_imp=log_imp,
        rejected=rejected, capped=capped, tie_kept=tie_kept)


# ------------------------------------------------------------------------------------------------
# The sequence (the reference's SCALOR.forward)
# ------------------------------------------------------------------------------------------------

_STATE_KEYS = ("z_what", "z_where", "z_where_bias", "z_depth", "z_pres", "tracker_hid", "prior_out",
               "prior_hid", "cumsum")


def plain_forward(model, seq, step, tau, generate=False, nll=False):
    """SCALOR over seq (B, T, 3, H, W), computed plainly. Returns a dict of (B, T[, ...]) tensors:
    recon, log_like, kl_what, kl_where, kl_depth, kl_pres, kl_bg, log_imp, counts, and diagnostics
    max_length (objects propagated into each frame, max over the batch), rejected (proposals
    zeroed by rejection), capped (proposals zeroed by the training cap) and tie_kept (proposals
    the cap keeps that the reference's `> k-th largest` rule would drop: ties)."""
    cfg = model.cfg
    bs, T = seq.shape[:2]
    H, W = cfg.img_h, cfg.img_w
    C = cfg.num_cells
    nll = nll and not model.training
    fixed = model.training and cfg.phase_obj_num_contrain
    prior_prob = z_pres_prior_at(cfg, step)
    detach_state = not cfg.phase_do_remove_detach or step < cfg.remove_detach_step
    curriculum = cfg.phase_bg_alpha_curriculum and step < cfg.bg_alpha_curriculum_steps
    dims = dict(z_what=cfg.z_what_dim, z_where=4, z_where_bias=4, z_depth=1, z_pres=1,
                tracker_hid=cfg.temporal_rnn_hid_dim, prior_out=cfg.prior_rnn_hid_dim,
                prior_hid=cfg.prior_rnn_hid_dim, cumsum=1)

    pre = {k: seq.new_zeros(bs, 1, d) for k, d in dims.items()}
    lengths = seq.new_zeros(bs)
    bg_rnn_hid_pre = seq.new_zeros(bs, cfg.bg_prior_rnn_hid_dim)
    bg_what_pre = None

    out = {k: [] for k in ("recon", "log_like", "kl_what", "kl_where", "kl_depth", "kl_pres", "kl_bg",
                           "log_imp", "counts", "max_length", "rejected", "capped", "tie_kept")}
    img_enc_seq, _ = model.image_enc(seq)

    for i in range(T):
        x, img_enc = seq[:, i], img_enc_seq[:, i]
        gen_t = generate and i >= cfg.observe_frames
        max_length = int(lengths.max())
        num_noise_slots = cfg.max_num_obj if fixed else max(1, max_length)

        if max_length != 0:
            prop = propagate(model, x, img_enc, {k: v[:, :max_length] for k, v in pre.items()}, tau, gen_t,
                             nll, num_noise_slots)
        else:
            if i > 0:   # the model propagates its (empty) slots anyway: consume the same noise
                for d in (4, cfg.z_what_dim, 1):
                    _noise_normal((bs, num_noise_slots, d), x)
                _noise_logistic((bs, num_noise_slots, 1), x)
            prop = dict(y_each_obj=x.new_zeros(bs, 1, 3, H, W), alpha_map=x.new_zeros(bs, 1, 1, H, W),
                        importance_map=x.new_zeros(bs, 1, 1, H, W),
                        **{k: x.new_zeros(bs, 1, d) for k, d in dims.items()},
                        **{k: x.new_zeros(bs) for k in ("kl_what", "kl_where", "kl_depth", "kl_pres", "log_imp")})

        alpha_map_prop_sum = prop["alpha_map"].sum(1)
        alpha_map_prop_sum = alpha_map_prop_sum + (alpha_map_prop_sum.clamp(EPS, 1 - EPS) - alpha_map_prop_sum).detach()
        disc = discover(model, x, img_enc, alpha_map_prop_sum, lengths, i, tau, prior_prob, gen_t, nll)

        importance_map = torch.cat((prop["importance_map"], disc["importance_map"]), dim=1)
        importance_map_norm = importance_map / (importance_map.sum(dim=1, keepdim=True) + EPS)
        alpha_map_disc, alpha_map_prop = disc["alpha_map"], prop["alpha_map"]
        if curriculum:
            alpha_map_disc = alpha_map_disc.new_ones(alpha_map_disc.size()) * cfg.bg_alpha_curriculum_value
            if cfg.bg_alpha_curriculum_detach_tracked:   # not in the reference
                alpha_map_prop = alpha_map_prop.detach()
        alpha_map = torch.cat((alpha_map_prop, alpha_map_disc), dim=1).sum(dim=1)
        alpha_map = alpha_map + (alpha_map.clamp(EPS, 1 - EPS) - alpha_map).detach()
        y_each_obj = torch.cat((prop["y_each_obj"], disc["y_each_obj"]), dim=1)
        y_nobg = (y_each_obj * importance_map_norm).sum(dim=1)

        if cfg.phase_no_background:
            bg = x.new_zeros(bs, 3, H, W)
            kl_bg, log_imp_bg = x.new_zeros(bs), x.new_zeros(bs)
        else:
            if i == 0:
                p_bg = Normal(x.new_zeros(1), x.new_ones(1))
            else:
                bg_rnn_hid_pre = model.bg_prior_rnn(bg_what_pre, bg_rnn_hid_pre)
                mean_bias, std = model.bg_prior_net(bg_rnn_hid_pre).chunk(2, -1)
                p_bg = Normal(mean_bias + bg_what_pre, F.softplus(std))
            bg_mean, bg_std = model.bg_enc(torch.cat((x, 1 - alpha_map), dim=1))
            q_bg = p_bg if gen_t else Normal(bg_mean, F.softplus(bg_std))   # gen_t implies i > 0
            z_bg = _rsample(q_bg, _noise_normal((bs, cfg.bg_what_dim), x))
            bg = model.bg_dec(z_bg)
            bg_what_pre = z_bg
            kl_bg = kl_divergence(q_bg, p_bg).sum(1)
            log_imp_bg = (p_bg.log_prob(z_bg) - q_bg.log_prob(z_bg)).sum(1) if nll else x.new_zeros(bs)

        y = y_nobg + (1 - alpha_map) * bg
        log_like = Normal(y.flatten(1), cfg.sigma).log_prob(x.flatten(1)).sum(-1)

        # hand-off: propagated objects with z_pres > 0, discovered ones with z_pres > 0.7
        new_init = {k: x.new_zeros(bs, C, dims[k]) for k in ("tracker_hid", "prior_out", "prior_hid", "cumsum")}
        if max_length != 0:
            both = {k: torch.cat((prop[k], disc[k] if k in disc else new_init[k]), dim=1) for k in _STATE_KEYS}
            z_mask = torch.cat(((prop["z_pres"] > 0).to(x.dtype),
                                (disc["z_pres"] > cfg.z_pres_disc_threshold).to(x.dtype)), dim=1)
        else:
            both = {k: disc[k] if k in disc else new_init[k] for k in _STATE_KEYS}
            z_mask = (disc["z_pres"] > cfg.z_pres_disc_threshold).to(x.dtype)
        num_obj_each = z_mask.sum(dim=1)
        max_num_obj = int(num_obj_each.max())
        pre = {k: seq.new_zeros(bs, max_num_obj, dims[k]) for k in _STATE_KEYS}
        z_mask_pre = seq.new_zeros(bs, max_num_obj, 1)
        for b in range(bs):
            num_obj = int(num_obj_each[b])
            idx = z_mask[b].nonzero()[:, 0]
            for k in _STATE_KEYS:
                pre[k][b, :num_obj] = both[k][b, idx]
            z_mask_pre[b, :num_obj] = z_mask[b, idx]
        if detach_state:
            pre = {k: v.detach() for k, v in pre.items()}
        lengths = z_mask_pre.sum(dim=(1, 2)).view(bs)

        for k, v in (("recon", y), ("log_like", log_like), ("kl_bg", kl_bg), ("counts", lengths),
                     ("log_imp", prop["log_imp"] + disc["log_imp"] + log_imp_bg),
                     ("max_length", x.new_full((bs,), float(max_length))),
                     ("rejected", disc["rejected"]), ("capped", disc["capped"]), ("tie_kept", disc["tie_kept"])):
            out[k].append(v)
        for k in ("kl_what", "kl_where", "kl_depth", "kl_pres"):
            out[k].append(prop[k] + disc[k])

    return {k: torch.stack(v, dim=1) for k, v in out.items()}


def plain_loss(res):
    """The reference's training loss from plain_forward's result."""
    kl = res["kl_what"] + res["kl_where"] + res["kl_depth"] + res["kl_pres"] + res["kl_bg"]
    return -(res["log_like"].mean(1) - kl.mean(1)).mean()
