"""SCALOR: discovery, propagation, background, rendering and the ELBO over a video sequence.

The model computes the reference implementation's mathematics with fixed-capacity object slots:
tracked objects live in `max_num_obj` slots per sequence (training) with a mask, so there is no
Python loop over the batch and no host synchronisation in the frame loop. Per frame:

1. propagation  -- every tracked slot: tracker GRU, attention, learned prior, z_where/z_what/
                   z_depth/z_pres, drop rule (running sum of (1 - z_pres) >= 0.6);
2. discovery    -- every grid cell proposes an object; proposals mostly inside the propagated alpha
                   are rejected (from the second frame on); in training at most
                   max_num_obj - tracked survive, by z_pres;
3. rendering    -- only objects whose z_pres is non-zero (in training at most max_num_obj) are
                   decoded with gradients and placed into the frame, each within a small window
                   around its box; compositing is normalised over objects as in the reference.
                   From the second frame on, the decoder trunk's features computed for steps 2 and
                   3 are reused: the forward runs only the appearance head, backward recomputes;
4. background   -- encoder of (frame, 1 - alpha), GRU prior, decoder;
5. hand-off     -- propagated objects with z_pres > 0 and discovered ones with z_pres > 0.7 are
                   compacted (order kept) into the slots of the next frame.

Objects whose z_pres is exactly zero contribute nothing to the frame or its gradient, and pixels
outside a box's window are exactly zero, so these shortcuts leave the numbers unchanged;
`tests/test_equivalence.py` checks them against a plain per-object, per-sample implementation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from common import Config
from modules import (BgDecoder, BgDecoderSBD, BgEncoder, FrameParameters, GlimpseDecoder, GlimpseEncoder, ProposalNet,
                     SequenceEncoder, bernoulli_log_prob, crop, kl_bernoulli, kl_normal, kl_std_normal, normal_log_prob,
                     given_forward, maybe_checkpoint, normal_rsample, pinned, place_windows, relaxed_bernoulli_rsample, scatter_windows, std_normal_log_prob,
                     use_dot_convs, use_nhwc_weight_grad, window_size)
from utils import step_switches, z_pres_prior_at

EPS = 1e-15  # the reference's eps in compositing, rejection and the Bernoulli KL


# ------------------------------------------------------------------------------------------------
# Slot containers
# ------------------------------------------------------------------------------------------------

@dataclass
class Slots:
    """Objects in fixed slots: every field is (B, K, ...). Empty slots hold zeros."""
    mask: torch.Tensor          # (B, K)     1. where a slot holds an object
    z_what: torch.Tensor        # (B, K, z_what_dim)
    z_where: torch.Tensor       # (B, K, 4)  box (sx, sy, tx, ty)
    z_where_bias: torch.Tensor  # (B, K, 4)  last propagation offset (zeros for new objects)
    z_depth: torch.Tensor       # (B, K, 1)
    z_pres: torch.Tensor        # (B, K, 1)
    absence: torch.Tensor       # (B, K, 1)  running sum of (1 - z_pres) while tracked
    tracker_h: torch.Tensor     # (B, K, temporal_rnn_hid_dim)
    prior_h: torch.Tensor       # (B, K, prior_rnn_hid_dim)
    prior_c: torch.Tensor       # (B, K, prior_rnn_hid_dim)
    ids: torch.Tensor           # (B, K)     long, 0 for empty slots

    @classmethod
    def empty(cls, cfg: Config, B: int, K: int, device, dtype=torch.float32) -> "Slots":
        z = lambda *s: torch.zeros(B, K, *s, device=device, dtype=dtype)  # noqa: E731
        return cls(mask=z(), z_what=z(cfg.z_what_dim), z_where=z(4), z_where_bias=z(4), z_depth=z(1),
                   z_pres=z(1), absence=z(1), tracker_h=z(cfg.temporal_rnn_hid_dim),
                   prior_h=z(cfg.prior_rnn_hid_dim), prior_c=z(cfg.prior_rnn_hid_dim),
                   ids=torch.zeros(B, K, device=device, dtype=torch.long))

    def map(self, fn) -> "Slots":
        return Slots(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    @staticmethod
    def cat(a: "Slots", b: "Slots") -> "Slots":
        return Slots(**{f.name: torch.cat((getattr(a, f.name), getattr(b, f.name)), dim=1) for f in fields(a)})


def gather_slots(x, index):
    """x (B, N, ...) indexed by index (B, M) along dim 1 -> (B, M, ...)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


def compact(keep, capacity: int | None = None):
    """Stable compaction: the kept entries of each row first, in their order.

    keep (B, N) bool -> index (B, capacity) into N and valid (B, capacity) bool. Rows keeping more
    than `capacity` entries lose the last ones (training's cap makes this impossible). capacity None:
    as many as the fullest row keeps, at least 1 (a host sync)."""
    if capacity is None:
        capacity = max(1, int(keep.sum(1).max()))
    index = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :capacity]
    valid = torch.arange(capacity, device=keep.device) < keep.sum(1, keepdim=True)
    return index, valid


def anchor_box(cfg: Config, raw):
    """(..., 2) pre-tanh (scale, ratio) -> (..., 2) box half-extents (sx, sy).

    scale = size_anc + var_s tanh(.), ratio = ratio_anc + var_anc tanh(.);
    sx = scale / sqrt(ratio), sy = scale * sqrt(ratio)."""
    scale, ratio = torch.tanh(raw).unbind(-1)
    scale = cfg.size_anc + cfg.var_s * scale
    ratio_sqrt = (cfg.ratio_anc + cfg.var_anc * ratio).sqrt()
    return torch.stack((scale / ratio_sqrt, scale * ratio_sqrt), dim=-1)


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------

@dataclass
class FrameRecord:
    """What logging and evaluation read about one frame (detached). R = rendered objects."""
    z_where: torch.Tensor       # (B, R, 4)   boxes (sx, sy, tx, ty)
    z_pres: torch.Tensor        # (B, R)      0 in unused entries
    z_depth: torch.Tensor       # (B, R)
    ids: torch.Tensor           # (B, R)      long; 0 in unused entries
    propagated: torch.Tensor    # (B, R)      bool: tracked from the previous frame (else discovered)
    glimpse: torch.Tensor       # (B, R, 3, G, G) decoded appearance o
    alpha_glimpse: torch.Tensor  # (B, R, 1, G, G) decoded alpha
    alpha_map: torch.Tensor     # (B, 1, H, W) total foreground alpha (clamped)
    foreground: torch.Tensor    # (B, 3, H, W) normalised composite of the objects
    background: torch.Tensor    # (B, 3, H, W)
    tracked: torch.Tensor       # (B,)        objects handed to the next frame


@dataclass
class VideoState:
    """What the last frame of a window hands the next window's first frame, so a video of any
    length can run in windows (`SCALOR.forward(..., state=)`): the same numbers as one forward over
    the whole video."""
    slots: Slots                # tracked objects, (B, K, ...)
    next_id: torch.Tensor       # (B, 1) long: the id the next discovered object gets
    bg_h: torch.Tensor          # (B, bg_prior_rnn_hid_dim) background prior GRU state
    z_bg: torch.Tensor | None   # (B, bg_what_dim) the last frame's background latent (None: no background)
    lstm: list | None           # per ConvLSTM layer (h, c) (B, conv_lstm_hid_dim, h, w); None without it
    frames_seen: int            # frames of the video already processed

    def detach(self) -> "VideoState":
        lstm = None if self.lstm is None else [(h.detach(), c.detach()) for h, c in self.lstm]
        z_bg = None if self.z_bg is None else self.z_bg.detach()
        return VideoState(self.slots.map(torch.Tensor.detach), self.next_id, self.bg_h.detach(), z_bg, lstm,
                          self.frames_seen)


@dataclass
class SCALOROutput:
    recon: torch.Tensor         # (B, T, 3, H, W)
    log_like: torch.Tensor      # (B, T) Gaussian log-likelihood of each frame (summed over pixels)
    kl_what: torch.Tensor       # (B, T)
    kl_where: torch.Tensor      # (B, T)
    kl_depth: torch.Tensor      # (B, T)
    kl_pres: torch.Tensor       # (B, T)
    kl_bg: torch.Tensor         # (B, T)
    log_imp: torch.Tensor       # (B, T) log p(z) - log q(z) (only with nll=True in eval mode)
    counts: torch.Tensor        # (B, T) objects tracked after each frame
    records: list               # [FrameRecord] per frame when keep_records, else []
    state: VideoState | None = None  # the state after the last frame, for the next window

    @property
    def kl_total(self):
        return self.kl_what + self.kl_where + self.kl_depth + self.kl_pres + self.kl_bg

    def elbo(self):
        """(B,) the reference's per-sample objective: frame-averaged log-likelihood minus KLs."""
        return self.log_like.mean(1) - self.kl_total.mean(1)

    def loss(self):
        """Scalar training loss: -(ELBO) averaged over the batch, as the reference."""
        return -self.elbo().mean()

    def terms(self) -> dict:
        """Batch means of each frame-averaged term (for logging)."""
        return {name: getattr(self, name).mean(1).mean(0) for name in
                ("log_like", "kl_what", "kl_where", "kl_depth", "kl_pres", "kl_bg")}


# ------------------------------------------------------------------------------------------------
# Propagation
# ------------------------------------------------------------------------------------------------

class PropagationPrior(nn.Module):
    """Learned prior of propagated latents: an LSTM over each object's previous latents."""

    def __init__(self, cfg: Config):
        super().__init__()
        inp = cfg.z_what_dim + 4 + 4 + 1 + 1
        hid = cfg.prior_rnn_hid_dim
        self.prior_rnn_inp_net = nn.Linear(inp, cfg.prior_rnn_inp_dim)
        self.prior_rnn = nn.LSTMCell(cfg.prior_rnn_inp_dim, hid)
        self.prior_what_net = nn.Linear(hid, 2 * cfg.z_what_dim)
        self.prior_where_bias_net = nn.Linear(hid, 8)
        self.prior_depth_net = nn.Linear(hid, 2)
        self.prior_pres_net = nn.Linear(hid, 1)

    def forward(self, s: Slots):
        B, K = s.mask.shape
        inp = self.prior_rnn_inp_net(torch.cat((s.z_what, s.z_where, s.z_where_bias, s.z_depth, s.z_pres), -1))
        h, c = self.prior_rnn(inp.flatten(0, 1), (s.prior_h.flatten(0, 1), s.prior_c.flatten(0, 1)))
        what_mean, what_std = self.prior_what_net(h).chunk(2, -1)
        where_mean, where_std = self.prior_where_bias_net(h).chunk(2, -1)
        depth_mean, depth_std = self.prior_depth_net(h).chunk(2, -1)
        pres_prob = torch.sigmoid(self.prior_pres_net(h) + 5.0)
        v = lambda t: t.view(B, K, -1)  # noqa: E731
        return dict(h=v(h), c=v(c), what=(v(what_mean), v(F.softplus(what_std))),
                    where=(v(where_mean), v(F.softplus(where_std))),
                    depth=(v(depth_mean), v(F.softplus(depth_std))), pres_prob=v(pres_prob))


class Propagation(nn.Module):
    """Per-object tracker (the reference's PropagationCell without the shared glimpse nets)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        D, Dw, Ht, A = cfg.img_encode_dim, cfg.z_what_dim, cfg.temporal_rnn_hid_dim, cfg.temporal_img_enc_dim
        # attention: image features around the previous centre at scale 0.5 (a half-size grid)
        self.att_conv = nn.Sequential(nn.Conv2d(D, cfg.temporal_img_enc_hid_dim, 1), nn.CELU(),
                                      nn.GroupNorm(8, cfg.temporal_img_enc_hid_dim))
        self.att_linear = nn.Linear(cfg.temporal_img_enc_hid_dim * (cfg.num_cell_h // 2) * (cfg.num_cell_w // 2), A)
        self.temporal_rnn_inp_net = nn.Linear(4 + 1 + Dw + 4 + A, cfg.temporal_rnn_inp_dim)
        self.tracker = nn.GRUCell(cfg.temporal_rnn_inp_dim, Ht)
        mlp = lambda i, h, o: nn.Sequential(nn.Linear(i, h), nn.CELU(), nn.Linear(h, o))  # noqa: E731
        self.z_where_transit_bias_net = mlp(Ht + Dw + 4 + 4 + A, cfg.z_where_transit_bias_net_hid_dim, 8)
        self.z_depth_transit_net = mlp(Ht + Dw + A, cfg.z_depth_transit_net_hid_dim, 2)
        self.z_what_from_temporal_net = mlp(Ht, cfg.z_what_from_temporal_hid_dim, 2 * Dw)
        self.z_what_gate_net = nn.Sequential(mlp(Ht + A, cfg.z_what_gate_hid_dim, 2), nn.Sigmoid())
        self.z_pres_transit = mlp(Ht + 4 + 4 + Dw, cfg.z_pres_hid_dim, 1)
        self.prior = PropagationPrior(cfg)

    def forward(self, x, img_enc, s: Slots, glimpse_enc, tau: float, generate: bool, nll: bool):
        """x (B, 3, H, W), img_enc (B, D, h, w), s: tracked slots (B, K).

        Returns the new latents (B, K, ...) with z_pres zero for empty or dropped slots, the
        per-sample KLs (B,) and log importance weights (B,)."""
        cfg = self.cfg
        B, K = s.mask.shape
        mask = s.mask[..., None]                                             # (B, K, 1)
        prior = self.prior(s)

        att_where = torch.cat((torch.full_like(s.z_where[..., :2], 0.5), s.z_where[..., 2:].detach()), -1)
        att = crop(img_enc, att_where, cfg.num_cell_h // 2, cfg.num_cell_w // 2)   # (B, K, D, h/2, w/2)
        att_code = self.att_linear(self.att_conv(att.flatten(0, 1)).flatten(1)).view(B, K, -1)

        rnn_inp = self.temporal_rnn_inp_net(torch.cat((s.z_where, s.z_pres, s.z_what, s.z_where_bias, att_code), -1))
        h = self.tracker(rnn_inp.flatten(0, 1), s.tracker_h.flatten(0, 1)).view(B, K, -1)

        # z_where: a Gaussian offset; centre moves by at most where_update_scale, size from anchors
        where_mean, where_std = self.z_where_transit_bias_net(
            torch.cat((h, s.z_what, s.z_where, s.z_where_bias, att_code), -1)).chunk(2, -1)
        q_where = prior["where"] if generate else (where_mean, F.softplus(where_std - 2.0))
        z_where_bias = normal_rsample(*q_where)
        centre = (s.z_where[..., 2:] + cfg.where_update_scale * torch.tanh(z_where_bias[..., 2:])).clamp(-1.05, 1.05)
        z_where = torch.cat((anchor_box(cfg, z_where_bias[..., :2]), centre), -1)

        # z_what: gated blend of the glimpse encoder at the new box and the tracker state
        tmp_mean, tmp_std = self.z_what_from_temporal_net(h).chunk(2, -1)
        forget_gate, input_gate = self.z_what_gate_net(torch.cat((h, att_code), -1)).chunk(2, -1)
        if generate:
            q_what = prior["what"]
        else:
            enc_mean, enc_std = encode_glimpses(cfg, glimpse_enc, x, z_where)       # (B, K, z_what_dim)
            enc_std = F.softplus(enc_std)
            q_what = (input_gate * enc_mean + forget_gate * tmp_mean,
                      F.softplus(input_gate * enc_std + forget_gate * F.softplus(tmp_std)))
        z_what = normal_rsample(*q_what)

        depth_mean, depth_std = self.z_depth_transit_net(torch.cat((h, z_what, att_code), -1)).chunk(2, -1)
        q_depth = prior["depth"] if generate else (depth_mean, F.softplus(depth_std))
        z_depth = normal_rsample(*q_depth)

        z_pres_logits = cfg.pres_logit_factor * torch.tanh(
            self.z_pres_transit(torch.cat((h, z_where, z_where_bias, z_what), -1)) + 2.0)
        sample_logits = _prob_logits(prior["pres_prob"]) if generate else z_pres_logits
        z_pres = torch.sigmoid(relaxed_bernoulli_rsample(sample_logits, tau))
        absence = s.absence + (1 - z_pres) * mask
        z_pres = z_pres * (absence < cfg.z_pres_stop_threshold).to(z_pres.dtype) * mask

        weight = z_pres[..., 0]                                              # (B, K), 0 if empty
        kl_pres = (kl_bernoulli(torch.sigmoid(z_pres_logits), prior["pres_prob"]) * mask).sum((1, 2))
        kl_what = (kl_normal(*q_what, *prior["what"]).sum(-1) * weight).sum(1)
        kl_where = (kl_normal(*q_where, *prior["where"]).sum(-1) * weight).sum(1)
        kl_depth = (kl_normal(*q_depth, *prior["depth"]).sum(-1) * weight).sum(1)

        log_imp = x.new_zeros(B)
        if nll:
            on = (z_pres > 0.5).to(z_pres.dtype) * mask                      # (B, K, 1)
            lw = lambda z, q, p: ((normal_log_prob(z, *p) - normal_log_prob(z, *q)) * on).sum((1, 2))  # noqa: E731
            pres_on = (z_pres > 0.5).to(z_pres.dtype)
            log_imp_pres = (bernoulli_log_prob(pres_on, prior["pres_prob"]) -
                            bernoulli_log_prob(pres_on, torch.sigmoid(z_pres_logits))) * mask
            log_imp = lw(z_what, q_what, prior["what"]) + lw(z_depth, q_depth, prior["depth"]) + \
                lw(z_where_bias, q_where, prior["where"]) + log_imp_pres.sum((1, 2))

        new = Slots(mask=s.mask, z_what=z_what, z_where=z_where, z_where_bias=z_where_bias, z_depth=z_depth,
                    z_pres=z_pres, absence=absence, tracker_h=h, prior_h=prior["h"], prior_c=prior["c"], ids=s.ids)
        return new, dict(what=kl_what, where=kl_where, depth=kl_depth, pres=kl_pres), log_imp


def encode_glimpses(cfg: Config, glimpse_enc, x, z_where):
    """Crop glimpses of frames x (B, 3, H, W) at boxes z_where (B, K, 4) and encode them:
    z_what mean and pre-softplus std, (B, K, z_what_dim) each."""
    B, K = z_where.shape[:2]

    def run(x, z_where):
        glimpses = crop(x, z_where, cfg.glimpse_size, cfg.glimpse_size)             # (B, K, 3, G, G)
        mean, std = glimpse_enc(glimpses.flatten(0, 1))
        return mean.view(B, K, -1), std.view(B, K, -1)

    return maybe_checkpoint(cfg.checkpoint_glimpses, pinned(glimpse_enc, run), x, z_where)


def _prob_logits(probs):
    """Logits of probabilities clamped as torch.distributions clamps them."""
    eps = torch.finfo(probs.dtype).eps
    p = probs.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

class SCALOR(nn.Module):

    def __init__(self, cfg: Config | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else Config()
        self.cfg = cfg
        self.image_enc = SequenceEncoder(cfg)
        self.glimpse_enc = GlimpseEncoder(cfg)        # shared by discovery and propagation
        self.glimpse_dec = GlimpseDecoder(cfg)        # shared by discovery and propagation
        self.propagation = Propagation(cfg)
        self.proposal = ProposalNet(cfg)               # discovery-only networks
        if not cfg.phase_no_background:
            self.bg_enc = BgEncoder(cfg)
            self.bg_dec = BgDecoderSBD(cfg) if cfg.using_bg_sbd else BgDecoder(cfg)
            self.bg_prior_rnn = nn.GRUCell(cfg.bg_what_dim, cfg.bg_prior_rnn_hid_dim)
            self.bg_prior_net = nn.Linear(cfg.bg_prior_rnn_hid_dim, 2 * cfg.bg_what_dim)
        rows, cols = torch.meshgrid(torch.arange(cfg.num_cell_h, dtype=torch.float32),
                                    torch.arange(cfg.num_cell_w, dtype=torch.float32), indexing="ij")
        self.register_buffer("cell_offset", torch.stack((cols, rows), -1).view(-1, 2), persistent=False)  # (C, 2)
        self.register_buffer("grid_size", torch.tensor([float(cfg.num_cell_w), float(cfg.num_cell_h)]), persistent=False)
        self.window = window_size(cfg)
        if cfg.nhwc_weight_grad:
            use_nhwc_weight_grad(self)
        if cfg.dot_convs:
            use_dot_convs(self)

    # --------------------------------------------------------------------------------------------
    def forward(self, seq, step: int = 0, tau=1.0, generate: bool = False, nll: bool = False,
                keep_records: bool = False, z_pres_prior=None, state: VideoState | None = None) -> SCALOROutput:
        """Run the model over a sequence.

        seq (B, T, 3, H, W) in [0, 1]; step: the optimizer step (1-based, as the reference's
        global_step) driving the z_pres prior, detach rule and curriculum; tau: the relaxed-Bernoulli
        temperature (a float, or a 0-dim tensor so a captured CUDA graph can be replayed with new
        values); generate: after cfg.observe_frames frames draw every latent from its prior;
        nll: compute log importance weights (eval mode); keep_records: return per-frame records;
        z_pres_prior: overrides the annealed discovery z_pres prior of `step` (float or tensor);
        state: the `out.state` of the previous window of the same video (None: seq starts the video);
        frame indices (first frame, observe_frames) count from the video's start."""
        frame_params = None
        if self.cfg.fused_param_grads and torch.is_grad_enabled() and seq.shape[1] > 1:
            frame_params = FrameParameters(self, seq.shape[1])     # each frame its own aliases
        try:
            return self._forward(seq, step, tau, generate, nll, keep_records, z_pres_prior, frame_params, state)
        finally:
            if frame_params is not None:
                frame_params.restore()

    def _forward(self, seq, step, tau, generate: bool, nll: bool, keep_records: bool, z_pres_prior,
                 frame_params: FrameParameters | None, video: VideoState | None) -> SCALOROutput:
        cfg = self.cfg
        B, T = seq.shape[:2]
        dev, dt = seq.device, seq.dtype
        prior_prob = z_pres_prior_at(cfg, step) if z_pres_prior is None else z_pres_prior
        # 0-d tensors (a fill, no copy or sync), as the CUDA-graph path always passed them: the compiled
        # frame functions of engine.compile_frames see an input whose value changes, not a new
        # constant every step. (On CUDA a Python-float divisor is applied as its reciprocal: eager
        # CUDA runs differ from those before this change in the last bit of the z_pres samples.)
        tau, prior_prob = (v if torch.is_tensor(v) else torch.full((), v, dtype=dt, device=dev) for v in (tau, prior_prob))
        detach_state, curriculum = step_switches(cfg, step)
        nll = nll and not self.training
        fixed = self.training and cfg.phase_obj_num_contrain   # fixed capacity, no host syncs

        img_enc_seq, lstm_state = self.image_enc(seq, None if video is None else video.lstm)  # (B, T, D, h, w)
        if video is None:
            state = Slots.empty(cfg, B, cfg.max_num_obj if fixed else 1, dev, dt)
            next_id = torch.ones(B, 1, dtype=torch.long, device=dev)
            bg_h = seq.new_zeros(B, cfg.bg_prior_rnn_hid_dim)
            z_bg_prev, start = None, 0
        else:
            state, next_id, bg_h, z_bg_prev, start = video.slots, video.next_id, video.bg_h, video.z_bg, video.frames_seen
        terms = {k: [] for k in ("log_like", "what", "where", "depth", "pres", "bg", "log_imp", "counts")}
        recons, records = [], []

        for t in range(T):
            if frame_params is not None:
                frame_params.use(t)
            x, img_enc = seq[:, t], img_enc_seq[:, t]
            first = start + t == 0                                          # the video's first frame
            gen_t = generate and start + t >= cfg.observe_frames
            K = state.mask.shape[1]

            # 1. propagation of the tracked slots
            if not first:
                prop, kl_prop, imp_prop = self.propagation(x, img_enc, state, self.glimpse_enc, tau, gen_t, nll)
            else:
                prop = state
                kl_prop = {k: x.new_zeros(B) for k in ("what", "where", "depth", "pres")}
                imp_prop = x.new_zeros(B)

            # 2. the propagated alpha map, as discovery sees it (no gradient)
            with torch.no_grad():
                if not first:
                    prop_decoded = self._decode_alpha(prop.z_what)                     # trunk, alpha
                    alpha_prop = self._alpha_map(prop_decoded[1], prop.z_where, prop.z_pres)
                else:
                    prop_decoded = None
                    alpha_prop = x.new_zeros(B, 1, cfg.img_h, cfg.img_w)
                alpha_prop = alpha_prop.clamp(EPS, 1 - EPS)

            # 3. discovery
            free = (cfg.max_num_obj - state.mask.sum(1)).long() if fixed else None
            disc, kl_disc, imp_disc = self._discover(x, img_enc, alpha_prop, first, tau, prior_prob, gen_t, nll, free)

            # 4. render the objects whose z_pres is non-zero
            C = cfg.num_cells
            disc_decoded = disc.pop("decoded")
            rend, index, rendered, disc_ids, next_id = self._candidates(prop, disc, next_id,
                                                                        cfg.max_num_obj if fixed else None)
            decoded = None   # the rendered objects' trunk features and alpha, when steps 2 and 3 decoded them
            reuse = cfg.checkpoint_glimpses or not torch.is_grad_enabled()
            if reuse and prop_decoded is not None and disc_decoded is not None:
                # rows of [propagated (B*K); discovered (B*C)] rendered: the features stay where they are
                rows = torch.where(index < K, torch.arange(B, device=dev)[:, None] * K + index,
                                   B * K + torch.arange(B, device=dev)[:, None] * C + index - K)     # (B, R)
                decoded = dict(feats=(prop_decoded[0].flatten(0, 1), disc_decoded[0].flatten(0, 1)),
                               rows=rows.flatten(), alpha=gather_slots(torch.cat((prop_decoded[1], disc_decoded[1]), 1), index))
            prop_decoded = disc_decoded = None
            frame = self._render(rend, curriculum, C, decoded)
            decoded = None

            # 5. background, and the frame's reconstruction
            y, log_like, bg, kl_bg, imp_bg, bg_h, z_bg_prev = self._background(x, frame, bg_h, z_bg_prev, gen_t, nll)

            # 6. hand-off: tracked objects with z_pres > 0 and discovered ones with z_pres > 0.7
            state = self._hand_off(prop, disc, disc_ids, cfg.max_num_obj if fixed else None)
            if detach_state:
                state = state.map(torch.Tensor.detach)

            recons.append(y)
            for k, v in (("log_like", log_like), ("bg", kl_bg), ("log_imp", imp_prop + imp_disc + imp_bg),
                         ("counts", state.mask.sum(1))):
                terms[k].append(v)
            for k in ("what", "where", "depth", "pres"):
                terms[k].append(kl_prop[k] + kl_disc[k])
            if keep_records:
                records.append(FrameRecord(
                    z_where=rend["z_where"].detach(), z_pres=rend["z_pres"].detach(),
                    z_depth=rend["z_depth"][..., 0].detach(), ids=rend["ids"] * rendered,
                    propagated=rend["propagated"] & rendered, glimpse=frame["o_att"].detach(),
                    alpha_glimpse=frame["alpha_att"].detach(), alpha_map=frame["alpha_map"].detach(),
                    foreground=frame["foreground"].detach(), background=bg.detach(), tracked=state.mask.sum(1)))

        st = lambda k: torch.stack(terms[k], 1)  # noqa: E731
        return SCALOROutput(recon=torch.stack(recons, 1), log_like=st("log_like"), kl_what=st("what"),
                            kl_where=st("where"), kl_depth=st("depth"), kl_pres=st("pres"), kl_bg=st("bg"),
                            log_imp=st("log_imp"), counts=st("counts"), records=records,
                            state=VideoState(state, next_id, bg_h, z_bg_prev, lstm_state, start + T))

    # --------------------------------------------------------------------------------------------
    def _background(self, x, frame: dict, bg_h, z_bg_prev, generate: bool, nll: bool):
        """The background of frame x (B, 3, H, W) given the objects' alpha_map and foreground, the
        background prior's state bg_h and the previous z_bg (None at the first frame).

        Returns the reconstruction y (B, 3, H, W), its log-likelihood (B,), the background (B, 3, H, W),
        its KL (B,) and log importance weight (B,), and the prior's new state and z_bg."""
        cfg = self.cfg
        B = x.shape[0]
        z_bg = None
        if cfg.phase_no_background:
            bg = x.new_zeros(B, 3, cfg.img_h, cfg.img_w)
            kl_bg, imp_bg = x.new_zeros(B), x.new_zeros(B)
        else:
            if z_bg_prev is None:
                p_bg = (torch.zeros_like(bg_h[:, :cfg.bg_what_dim]), torch.ones_like(bg_h[:, :cfg.bg_what_dim]))
            else:
                bg_h = self.bg_prior_rnn(z_bg_prev, bg_h)
                offset, std = self.bg_prior_net(bg_h).chunk(2, -1)
                p_bg = (offset + z_bg_prev, F.softplus(std))
            if generate:
                q_bg = p_bg
            else:
                mean, std = self.bg_enc(torch.cat((x, 1 - frame["alpha_map"]), 1))
                q_bg = (mean, F.softplus(std))
            z_bg = normal_rsample(*q_bg)
            bg = self.bg_dec(z_bg)
            kl_bg = kl_normal(*q_bg, *p_bg).sum(1)
            imp_bg = (normal_log_prob(z_bg, *p_bg) - normal_log_prob(z_bg, *q_bg)).sum(1) if nll else x.new_zeros(B)

        y = frame["foreground"] + (1 - frame["alpha_map"]) * bg
        log_like = (-(x - y) ** 2 / (2 * cfg.sigma ** 2) - math.log(cfg.sigma)
                    - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        return y, log_like, bg, kl_bg, imp_bg, bg_h, z_bg

    def _candidates(self, prop: Slots, disc: dict, next_id, capacity: int | None):
        """The frame's objects to render: [propagated (B, K); discovered (B, C)] with z_pres > 0,
        compacted to `capacity` entries (None: as many as the fullest sample has, a host sync).

        Returns their latents rend (B, R, ...) with z_pres zero in unused entries, index (B, R) into
        K + C, rendered (B, R) bool, the discovered objects' new ids (B, C) and the next free id."""
        K = prop.mask.shape[1]
        cand_pres = torch.cat((prop.z_pres, disc["z_pres"]), 1)[..., 0]                 # (B, K + C)
        visible = cand_pres > 0
        disc_visible = visible[:, K:]
        disc_ids = next_id + torch.cumsum(disc_visible.long(), 1) - 1                     # (B, C)
        next_id = next_id + disc_visible.sum(1, keepdim=True)
        cand = dict(z_what=torch.cat((prop.z_what, disc["z_what"]), 1),
                    z_where=torch.cat((prop.z_where, disc["z_where"]), 1),
                    z_depth=torch.cat((prop.z_depth, disc["z_depth"]), 1),
                    z_pres=cand_pres,
                    ids=torch.cat((prop.ids, torch.where(disc_visible, disc_ids, 0)), 1),
                    propagated=torch.cat((torch.ones_like(visible[:, :K]), torch.zeros_like(disc_visible)), 1))
        index, rendered = compact(visible, capacity)
        rend = {k: gather_slots(v, index) for k, v in cand.items()}
        rend["z_pres"] = rend["z_pres"] * rendered
        return rend, index, rendered, disc_ids, next_id

    def _hand_off(self, prop: Slots, disc: dict, disc_ids, capacity: int | None) -> Slots:
        """The slots for the next frame: tracked objects with z_pres > 0, then discovered ones with
        z_pres > z_pres_disc_threshold, compacted to `capacity` (None: the fullest sample's count)."""
        cfg = self.cfg
        B, C = disc["z_pres"].shape[:2]
        new_disc = Slots(mask=torch.ones_like(disc["z_pres"][..., 0]), z_what=disc["z_what"],
                         z_where=disc["z_where"], z_where_bias=torch.zeros_like(disc["z_where"]),
                         z_depth=disc["z_depth"], z_pres=disc["z_pres"], absence=torch.zeros_like(disc["z_pres"]),
                         tracker_h=disc["z_what"].new_zeros(B, C, cfg.temporal_rnn_hid_dim),
                         prior_h=disc["z_what"].new_zeros(B, C, cfg.prior_rnn_hid_dim),
                         prior_c=disc["z_what"].new_zeros(B, C, cfg.prior_rnn_hid_dim), ids=disc_ids)
        keep = torch.cat((prop.z_pres[..., 0] > 0, disc["z_pres"][..., 0] > cfg.z_pres_disc_threshold), 1)
        index, valid = compact(keep, capacity)
        both = Slots.cat(prop, new_disc)
        return both.map(lambda v: gather_slots(v, index) * valid.view(*valid.shape, *([1] * (v.dim() - 2))).to(v.dtype))

    def _decode_alpha(self, z_what):
        """Decoder trunk features (B, K, 16, G, G) and alpha (B, K, 1, G, G) of objects z_what
        (B, K, z_what_dim): what rejection and alpha maps need, and what rendering reuses."""
        B, K = z_what.shape[:2]
        feat, alpha = self.glimpse_dec.features_and_alpha(z_what.flatten(0, 1))
        return feat.view(B, K, *feat.shape[1:]), alpha.view(B, K, *alpha.shape[1:])

    def _alpha_map(self, alpha, z_where, z_pres):
        """Sum of the objects' placed alpha (B, K, 1, G, G) times z_pres: (B, 1, H, W)."""
        cfg = self.cfg
        values, index = place_windows(alpha, z_where, cfg.img_h, cfg.img_w, *self.window)
        return scatter_windows(values * z_pres[..., None, None], index, cfg.img_h, cfg.img_w)

    def _render(self, obj: dict, curriculum: bool, num_cells: int, decoded=None) -> dict:
        """Decode and composite objects (B, R, ...): normalised importance weights
        alpha * z_pres * sigmoid(-z_depth), alpha summed and clamped with a straight-through gradient.

        decoded: the trunk features computed already without gradient, as `feats` (propagated
        (B*K, 16, G, G), discovered (B*C, ...)) and the rendered objects' `rows` (B*R,) in their
        concatenation, and the objects' `alpha` (B, R, 1, G, G) (given only with glimpse recomputation
        on, or without gradient): the forward then runs only the appearance head, and backward
        recomputes the whole decode."""
        cfg = self.cfg
        B, R = obj["z_pres"].shape
        G = cfg.glimpse_size

        def place(o_att, alpha_att, z_where):
            values, index = place_windows(torch.cat((alpha_att * o_att, alpha_att), 2), z_where,
                                          cfg.img_h, cfg.img_w, *self.window)           # (B, R, 4, h, w)
            return values, index, o_att, alpha_att

        def decode_and_place(z_what, z_where):
            o_att, alpha_att = self.glimpse_dec(z_what.flatten(0, 1))
            return place(o_att.view(B, R, 3, G, G), alpha_att.view(B, R, 1, G, G), z_where)

        decode_and_place = pinned(self.glimpse_dec, decode_and_place)   # recomputed in backward

        def place_decoded(z_what, z_where):
            o_att = self.glimpse_dec.appearance_of_rows(decoded["feats"], decoded["rows"])
            return place(o_att.view(B, R, 3, G, G), decoded["alpha"], z_where)

        if decoded is not None:
            values, index, o_att, alpha_att = given_forward(place_decoded, decode_and_place, (obj["z_what"], obj["z_where"]),
                                                            self.glimpse_dec.parameters())
        else:
            values, index, o_att, alpha_att = maybe_checkpoint(cfg.checkpoint_glimpses, decode_and_place,
                                                               obj["z_what"], obj["z_where"])
        frame = self._composite(values, index, obj["z_pres"], obj["z_depth"], obj["propagated"], curriculum, num_cells)
        return dict(frame, o_att=o_att.detach(), alpha_att=alpha_att.detach())

    def _composite(self, values, index, z_pres, z_depth, propagated, curriculum: bool, num_cells: int) -> dict:
        """Placed windows values (B, R, 4, h, w) of (alpha * o, alpha) at index -> the frame's
        alpha_map (B, 1, H, W), clamped with a straight-through gradient, and foreground (B, 3, H, W)."""
        cfg = self.cfg
        z_pres = z_pres[..., None, None, None]                                           # (B, R, 1, 1, 1)
        alpha = z_pres * values[:, :, 3:]                                                # placed alpha * z_pres
        weight = alpha * torch.sigmoid(-z_depth)[..., None, None]                        # importance
        colour = z_pres * values[:, :, :3]                                               # placed alpha * o * z_pres
        parts = [alpha, weight, colour * weight]
        if curriculum:
            parts.append(alpha * propagated[..., None, None, None].to(alpha.dtype))
        canvas = scatter_windows(torch.cat(parts, 2), index, cfg.img_h, cfg.img_w)
        alpha_sum = canvas[:, :1]
        if curriculum:   # every discovery cell's alpha fixed to bg_alpha_curriculum_value
            alpha_sum = canvas[:, 5:6] + cfg.bg_alpha_curriculum_value * num_cells
        foreground = canvas[:, 2:5] / (canvas[:, 1:2] + EPS)
        alpha_map = alpha_sum + (alpha_sum.clamp(EPS, 1 - EPS) - alpha_sum).detach()
        return dict(alpha_map=alpha_map, foreground=foreground)

    def _discover(self, x, img_enc, alpha_prop, first_frame: bool, tau, prior_prob, generate: bool,
                  nll: bool, free):
        """Propose one object per cell, reject the explained ones, cap their number (training).

        Returns per-cell latents (B, C, ...) with z_pres zeroed where rejected or capped, the KLs
        (B,) weighted by the z_pres from before rejection and cap, and log importance weights."""
        cfg = self.cfg
        B, C = x.shape[0], cfg.num_cells
        hw = (B, 1, cfg.num_cell_h, cfg.num_cell_w)
        if generate:
            z_pres_logits = x.new_full(hw, math.log(cfg.gen_disc_pres_probs) - math.log1p(-cfg.gen_disc_pres_probs))
            q_depth = (x.new_zeros(hw), x.new_ones(hw))
            q_where = (x.new_zeros(B, 4, *hw[2:]), x.new_ones(B, 4, *hw[2:]))
        else:
            pres_raw, where_raw, depth_raw = self.proposal(img_enc, alpha_prop)
            z_pres_logits = cfg.pres_logit_factor * torch.tanh(pres_raw)
            depth_mean, depth_std = depth_raw.chunk(2, 1)
            where_mean, where_std = where_raw.chunk(2, 1)
            q_depth, q_where = (depth_mean, F.softplus(depth_std)), (where_mean, F.softplus(where_std))
        z_pres = torch.sigmoid(relaxed_bernoulli_rsample(z_pres_logits, tau))          # (B, 1, h, w)
        z_depth = normal_rsample(*q_depth)
        z_where_raw = normal_rsample(*q_where)                                        # (B, 4, h, w)

        raw = z_where_raw.permute(0, 2, 3, 1).reshape(B, C, 4)
        centre = 2.0 * (self.cell_offset + 0.5 + torch.tanh(raw[..., 2:])) / self.grid_size - 1
        z_where = torch.cat((anchor_box(cfg, raw[..., :2]), centre), -1)             # (B, C, 4)

        if generate:
            q_what = (x.new_zeros(B, C, cfg.z_what_dim), x.new_ones(B, C, cfg.z_what_dim))
        else:
            mean, std = encode_glimpses(cfg, self.glimpse_enc, x, z_where)           # (B, C, z_what_dim)
            q_what = (mean, F.softplus(std))
        z_what = normal_rsample(*q_what)                                              # (B, C, z_what_dim)

        z_pres_before = z_pres.view(B, C)
        z_pres = z_pres_before
        pres_prior = prior_prob * torch.ones_like(z_pres_before)
        decoded = None
        if cfg.phase_rejection and (not first_frame or cfg.first_frame_rejection):
            with torch.no_grad():
                decoded = self._decode_alpha(z_what)                                   # trunk, alpha
                if not first_frame:
                    explained = self._explained_ratio(decoded[1], z_where, alpha_prop)    # (B, C)
                else:
                    explained = self._explained_by_kept(decoded[1], z_where, z_pres)
            keep = (explained < cfg.explained_ratio_threshold).to(z_pres.dtype)
            z_pres = z_pres * keep
            pres_prior = prior_prob * keep + cfg.z_pres_masked_prior * (1 - keep)
        if free is not None:   # training cap: at most `free` survive, by z_pres
            if generate:
                z_pres = z_pres * 0
            else:
                # the `free` largest z_pres (the reference keeps z_pres > the free-th largest value,
                # which keeps fewer on ties, e.g. none when many saturate at 1.0, and indexes out of
                # range when free >= C)
                order = torch.sort(z_pres, dim=1, descending=True, stable=True).indices
                rank = torch.empty_like(order).scatter_(1, order, torch.arange(C, device=order.device).expand(B, C))
                z_pres = z_pres * ((rank < free[:, None]) & (z_pres > 0)).to(z_pres.dtype)

        w = z_pres_before                                                             # KL weights (B, C)
        q_depth_c = [v.view(B, C, 1) for v in q_depth]
        q_where_c = [v.permute(0, 2, 3, 1).reshape(B, C, 4) for v in q_where]
        kl = dict(what=(kl_std_normal(*q_what).sum(-1) * w).sum(1),
                  where=(kl_std_normal(*q_where_c).sum(-1) * w).sum(1),
                  depth=(kl_std_normal(*q_depth_c).sum(-1) * w).sum(1),
                  pres=kl_bernoulli(torch.sigmoid(z_pres_logits.view(B, C)), pres_prior).sum(1))

        log_imp = x.new_zeros(B)
        if nll:
            on = (w > 0.5).to(w.dtype)[..., None]
            lw = lambda z, q: ((std_normal_log_prob(z) - normal_log_prob(z, *q)) * on).sum((1, 2))  # noqa: E731
            pres_on = (z_pres > 0.5).to(z_pres.dtype)
            log_imp = lw(z_what, q_what) + lw(z_depth.view(B, C, 1), q_depth_c) + lw(raw, q_where_c) + \
                (bernoulli_log_prob(pres_on, pres_prior) -
                 bernoulli_log_prob(pres_on, torch.sigmoid(z_pres_logits.view(B, C)))).sum(1)

        disc = dict(z_what=z_what, z_where=z_where, z_depth=z_depth.view(B, C, 1), z_pres=z_pres[..., None],
                    decoded=decoded)
        return disc, kl, log_imp

    @torch.no_grad()
    def _explained_ratio(self, alpha, z_where, alpha_prop):
        """Fraction of each proposal's alpha (B, C, 1, G, G) above 0.3 lying on the propagated alpha
        (> 0.1): (B, C)."""
        C = alpha.shape[1]
        values, index = place_windows(alpha, z_where, self.cfg.img_h, self.cfg.img_w, *self.window)
        return self._covered_fraction(values, index, alpha_prop.flatten(1)[:, None].expand(-1, C, -1))

    @torch.no_grad()
    def _explained_by_kept(self, alpha, z_where, z_pres):
        """First-frame rejection (`first_frame_rejection`): the explained fraction of each proposal
        (alpha (B, C, 1, G, G)) as `_explained_ratio` measures it, against the alpha map (alpha *
        z_pres, summed) of the proposals kept before it, in place of the propagated objects: proposals
        are taken by decreasing z_pres (B, C) (ties: the lower cell first), each kept when explained
        below explained_ratio_threshold (greedy; a rejected proposal explains nothing). (B, C)."""
        cfg = self.cfg
        B, C = z_pres.shape
        values, index = place_windows(alpha, z_where, cfg.img_h, cfg.img_w, *self.window)
        order = torch.sort(z_pres, dim=1, descending=True, stable=True).indices       # rank -> cell
        rows = torch.arange(B, device=z_pres.device)
        kept_map = values.new_zeros(B, 1, cfg.img_h * cfg.img_w)                     # alpha of those kept
        explained = values.new_zeros(B, C)
        for rank in range(C):
            cell = order[:, rank]                                                     # (B,)
            window, idx = values[rows, cell][:, None], index[rows, cell][:, None]     # (B, 1, 1, h, w), (B, 1, h*w)
            ratio = self._covered_fraction(window, idx, kept_map)[:, 0]               # (B,)
            explained[rows, cell] = ratio
            kept = (ratio < cfg.explained_ratio_threshold).to(values.dtype)
            weight = (z_pres[rows, cell] * kept)[:, None, None, None, None]
            kept_map = kept_map + scatter_windows(window * weight, idx, cfg.img_h, cfg.img_w).flatten(2)
        return explained

    def _covered_fraction(self, values, index, alpha_cover):
        """Fraction of each proposal's window pixels with alpha (values (B, C, 1, h, w)) above
        proposal_alpha_threshold where alpha_cover (B, C, H*W) exceeds propagated_alpha_threshold."""
        cfg = self.cfg
        proposed = (values[:, :, 0] > cfg.proposal_alpha_threshold).flatten(2)       # (B, C, h*w)
        covered = torch.gather(alpha_cover, 2, index) > cfg.propagated_alpha_threshold  # (B, C, h*w)
        area = proposed.sum(2).to(values.dtype)
        return (proposed & covered).sum(2).to(values.dtype) / (area + EPS)
