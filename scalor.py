"""SCALOR (Jiang et al., ICLR 2020): discovery, propagation, background, rendering and the ELBO over a
video, in plain PyTorch.

Tracked objects live in fixed-capacity slots with a mask (`max_num_obj` per sequence in training),
so there is no Python loop over the batch and no host synchronisation in the frame loop. Where the
paper's equations are computed (`SCALOR.step_frame` runs one frame, in this order):

  propagation   z^trk_t ~ q(z | x_t, z_{t-1}, h_t)    `Propagation`: `attend`, `track`, `where`, `what`,
                                                       `depth`, `presence` (+ the drop rule), `kl`
  its prior     p(z^trk_t | z_{t-1})                   `PropagationPrior.forward`
  discovery     z^dsc_t ~ q(z | x_t, z^trk_t)          `SCALOR.discover` = `propose` -> `reject` -> `cap`,
                                                       then `discovery_kl` (and `discovery_log_imp`)
  rendering     alpha-composite of the objects         `SCALOR.render` = `decode_and_place` -> `composite`
  background    z^bg_t ~ q(z^bg | x_t, 1 - alpha_t)    `SCALOR.background` (GRU prior from t = 1)
  likelihood    log N(x_t | fg_t + (1 - alpha_t) bg_t, sigma^2)   `SCALOR.likelihood`
  objective     sum_t log p(x_t | .) - KL_t            `SCALOROutput.elbo`, `.loss`
  hand-off      the objects kept for frame t + 1       `SCALOR.choose_rendered`, `SCALOR.hand_off`

Only objects whose z_pres is non-zero are decoded and placed, each within a small window around its
box; both are exact (such objects and such pixels contribute exactly zero), and
`tests/test_equivalence.py` checks the model against a plain per-object, per-sample implementation.

Speed is applied from outside: `fast.apply(model, fast.SpeedOptions())` swaps in Triton
convolutions, recomputes the glimpse networks in backward, reuses the decoder features of the
rejection test for rendering, fuses the per-frame parameter gradients and compiles; the hooks it
replaces are `GlimpseEncoder.encode_at`, `SCALOR.decode_and_place`, `SCALOR.step_frame` and
`SCALOR.forward`. The numbers stay the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from common import Config
from modules import (BgDecoder, BgDecoderSBD, BgEncoder, GlimpseDecoder, GlimpseEncoder, ProposalNet, SequenceEncoder,
                     bernoulli_log_prob, crop, kl_bernoulli, kl_normal, kl_std_normal, normal_log_prob, normal_rsample,
                     place_windows, relaxed_bernoulli_rsample, scatter_windows, std_normal_log_prob, window_size)
from utils import step_switches, z_pres_prior_at

# ------------------------------------------------------------------------------------------------
# The reference's constants (its code writes them as numbers; the names say where they act)
# ------------------------------------------------------------------------------------------------

EPS = 1e-15                  # the reference's eps in compositing, rejection and the Bernoulli KL
PRIOR_PRES_BIAS = 5.0        # propagation prior: p(z_pres = 1) = sigmoid(prior_pres_net(h) + 5)
WHERE_STD_BIAS = -2.0        # propagation: std of the z_where offset = softplus(net(.) - 2)
TRANSIT_PRES_BIAS = 2.0      # propagation: z_pres logits = pres_logit_factor * tanh(z_pres_transit(.) + 2)
CENTRE_CLAMP = 1.05          # propagation: box centres clamped to [-1.05, 1.05]
ATTENTION_SCALE = 0.5        # propagation: the attention window's scale (half the frame, a half-size grid)
PRESENT = 0.5                # importance weights: an object counts as present when z_pres > 0.5
# the others are Config fields under the reference's names: pres_logit_factor (8.8),
# where_update_scale (0.2), z_pres_stop_threshold (0.6), z_pres_disc_threshold (0.7),
# explained_ratio_threshold (0.3), proposal_alpha_threshold (0.3), propagated_alpha_threshold (0.1),
# z_pres_masked_prior (1e-8), size_anc / var_s / ratio_anc / var_anc, sigma (0.1).


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

    def detach(self) -> "SCALOROutput":
        """The same output holding no autograd graph (the records are detached already)."""
        tensors = {f.name: getattr(self, f.name).detach() for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **tensors, state=None if self.state is None else self.state.detach())


# ------------------------------------------------------------------------------------------------
# What the steps of a frame hand each other
# ------------------------------------------------------------------------------------------------

@dataclass
class FrameContext:
    """Where a frame is in the video and the schedule's values: what every step of the frame reads."""
    first: bool                 # the video's first frame: nothing tracked, no rejection
    generate: bool              # draw every latent from its prior (generation, after observe_frames)
    nll: bool                   # compute log importance weights (eval mode)
    tau: torch.Tensor | float   # relaxed-Bernoulli temperature
    pres_prior: torch.Tensor | float  # discovery's z_pres prior probability (annealed)
    capacity: int | None        # training: fixed object slots (max_num_obj); None: as the data needs
    detach: bool                # detach the object state handed to the next frame
    curriculum: bool            # the background alpha curriculum is on


@dataclass
class Terms:
    """Per-sample (B,) KL terms and log importance weight of one part of a frame; None: no term."""
    what: torch.Tensor | None = None
    where: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    pres: torch.Tensor | None = None
    bg: torch.Tensor | None = None
    log_imp: torch.Tensor | None = None

    def __add__(self, other: "Terms") -> "Terms":
        def add(a, b):
            return b if a is None else a if b is None else a + b
        return Terms(**{f.name: add(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})


@dataclass
class DecodedAlpha:
    """Glimpses decoded without gradient up to their alpha: what rejection and alpha maps need."""
    features: torch.Tensor      # (B, K, 16, G, G) the decoder trunk's features
    alpha: torch.Tensor         # (B, K, 1, G, G)


@dataclass
class Discovered:
    """Discovery's objects, one per cell: (B, C, ...)."""
    z_what: torch.Tensor        # (B, C, z_what_dim)
    z_where: torch.Tensor       # (B, C, 4)
    z_depth: torch.Tensor       # (B, C, 1)
    z_pres: torch.Tensor        # (B, C, 1)  zero where rejected or capped
    decoded: DecodedAlpha | None  # the rejection test's decodes (None: no rejection this frame)


@dataclass
class Objects:
    """The frame's objects to render, [propagated (B, K); discovered (B, C)] with z_pres > 0
    compacted to R entries: (B, R, ...)."""
    z_what: torch.Tensor        # (B, R, z_what_dim)
    z_where: torch.Tensor       # (B, R, 4)
    z_depth: torch.Tensor       # (B, R, 1)
    z_pres: torch.Tensor        # (B, R)     zero in unused entries
    ids: torch.Tensor           # (B, R)     long
    propagated: torch.Tensor    # (B, R)     bool: tracked from the previous frame
    index: torch.Tensor         # (B, R)     long, into the K + C candidates
    rendered: torch.Tensor      # (B, R)     bool: the entry holds an object


@dataclass
class Rendered:
    """The objects' composite: alpha_map (clamped, straight-through) and foreground, and the glimpses."""
    alpha_map: torch.Tensor     # (B, 1, H, W)
    foreground: torch.Tensor    # (B, 3, H, W)
    o_att: torch.Tensor | None = None      # (B, R, 3, G, G) decoded appearance (detached)
    alpha_att: torch.Tensor | None = None  # (B, R, 1, G, G) decoded alpha (detached)


@dataclass
class Background:
    image: torch.Tensor         # (B, 3, H, W)
    z_bg: torch.Tensor | None   # (B, bg_what_dim); None without background
    bg_h: torch.Tensor          # (B, bg_prior_rnn_hid_dim) the prior GRU's state
    terms: Terms                # bg (KL) and log_imp


@dataclass
class FrameResult:
    recon: torch.Tensor         # (B, 3, H, W)
    log_like: torch.Tensor      # (B,)
    terms: Terms
    counts: torch.Tensor        # (B,) objects handed to the next frame
    record: FrameRecord | None


# ------------------------------------------------------------------------------------------------
# Propagation
# ------------------------------------------------------------------------------------------------

@dataclass
class PropagationPriorOut:
    """The learned prior of the propagated latents, per object (B, K, ...), and the LSTM's new state."""
    h: torch.Tensor
    c: torch.Tensor
    what: tuple                 # (mean, std) of z_what
    where: tuple                # (mean, std) of the z_where offset
    depth: tuple                # (mean, std) of z_depth
    pres_prob: torch.Tensor     # p(z_pres = 1)


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

    def forward(self, s: Slots) -> PropagationPriorOut:
        B, K = s.mask.shape
        inp = self.prior_rnn_inp_net(torch.cat((s.z_what, s.z_where, s.z_where_bias, s.z_depth, s.z_pres), -1))
        h, c = self.prior_rnn(inp.flatten(0, 1), (s.prior_h.flatten(0, 1), s.prior_c.flatten(0, 1)))
        what_mean, what_std = self.prior_what_net(h).chunk(2, -1)
        where_mean, where_std = self.prior_where_bias_net(h).chunk(2, -1)
        depth_mean, depth_std = self.prior_depth_net(h).chunk(2, -1)
        pres_prob = torch.sigmoid(self.prior_pres_net(h) + PRIOR_PRES_BIAS)
        v = lambda t: t.view(B, K, -1)  # noqa: E731
        return PropagationPriorOut(h=v(h), c=v(c), what=(v(what_mean), v(F.softplus(what_std))),
                                   where=(v(where_mean), v(F.softplus(where_std))),
                                   depth=(v(depth_mean), v(F.softplus(depth_std))), pres_prob=v(pres_prob))


class Propagation(nn.Module):
    """Per-object tracker (the reference's PropagationCell without the shared glimpse nets)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        D, Dw, Ht, A = cfg.img_encode_dim, cfg.z_what_dim, cfg.temporal_rnn_hid_dim, cfg.temporal_img_enc_dim
        # attention: image features around the previous centre at ATTENTION_SCALE (a half-size grid)
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

    def forward(self, x, img_enc, s: Slots, glimpse_enc: GlimpseEncoder, ctx: FrameContext):
        """x (B, 3, H, W), img_enc (B, D, h, w), s: tracked slots (B, K).

        Returns the new latents (B, K, ...), z_pres zero for empty or dropped slots, and the
        per-sample KLs and log importance weight (Terms)."""
        prior = self.prior(s)
        att = self.attend(img_enc, s)                                         # (B, K, A)
        h = self.track(s, att)                                                # (B, K, Ht)
        q_where, z_where_bias, z_where = self.where(h, s, att, prior.where if ctx.generate else None)
        q_what, z_what = self.what(h, att, x, z_where, glimpse_enc, prior.what if ctx.generate else None)
        q_depth, z_depth = self.depth(h, z_what, att, prior.depth if ctx.generate else None)
        z_pres_logits, z_pres, absence = self.presence(h, z_where, z_where_bias, z_what, s, prior, ctx)
        new = Slots(mask=s.mask, z_what=z_what, z_where=z_where, z_where_bias=z_where_bias, z_depth=z_depth,
                    z_pres=z_pres, absence=absence, tracker_h=h, prior_h=prior.h, prior_c=prior.c, ids=s.ids)
        terms = self.kl(s.mask[..., None], z_pres, z_pres_logits, prior, q_what, q_where, q_depth)
        if ctx.nll:
            terms.log_imp = self.log_imp(s.mask[..., None], new, z_pres_logits, prior, q_what, q_where, q_depth)
        return new, terms

    def attend(self, img_enc, s: Slots):
        """The attention code (B, K, A): image features cropped around the previous centre."""
        B, K = s.mask.shape
        cfg = self.cfg
        att_where = torch.cat((torch.full_like(s.z_where[..., :2], ATTENTION_SCALE), s.z_where[..., 2:].detach()), -1)
        att = crop(img_enc, att_where, cfg.num_cell_h // 2, cfg.num_cell_w // 2)   # (B, K, D, h/2, w/2)
        return self.att_linear(self.att_conv(att.flatten(0, 1)).flatten(1)).view(B, K, -1)

    def track(self, s: Slots, att):
        """The tracker GRU's new state (B, K, Ht) from the previous latents and the attention code."""
        B, K = s.mask.shape
        rnn_inp = self.temporal_rnn_inp_net(torch.cat((s.z_where, s.z_pres, s.z_what, s.z_where_bias, att), -1))
        return self.tracker(rnn_inp.flatten(0, 1), s.tracker_h.flatten(0, 1)).view(B, K, -1)

    def where(self, h, s: Slots, att, prior=None):
        """z_where: a Gaussian offset (std softplus(. - 2)); the centre moves by where_update_scale *
        tanh(offset), clamped to +-CENTRE_CLAMP; the size from the anchors. prior: sample from it
        instead (generation). -> q (mean, std), the offset, z_where (B, K, 4)."""
        cfg = self.cfg
        where_mean, where_std = self.z_where_transit_bias_net(
            torch.cat((h, s.z_what, s.z_where, s.z_where_bias, att), -1)).chunk(2, -1)
        q_where = prior if prior is not None else (where_mean, F.softplus(where_std + WHERE_STD_BIAS))
        z_where_bias = normal_rsample(*q_where)
        centre = (s.z_where[..., 2:] + cfg.where_update_scale * torch.tanh(z_where_bias[..., 2:])).clamp(
            -CENTRE_CLAMP, CENTRE_CLAMP)
        return q_where, z_where_bias, torch.cat((anchor_box(cfg, z_where_bias[..., :2]), centre), -1)

    def what(self, h, att, x, z_where, glimpse_enc: GlimpseEncoder, prior=None):
        """z_what: a gated blend (sigmoid forget / input gates) of the glimpse encoder at the new box
        and an MLP of the tracker state. prior: sample from it instead. -> q (mean, std), z_what."""
        tmp_mean, tmp_std = self.z_what_from_temporal_net(h).chunk(2, -1)
        forget_gate, input_gate = self.z_what_gate_net(torch.cat((h, att), -1)).chunk(2, -1)
        if prior is not None:
            q_what = prior
        else:
            enc_mean, enc_std = glimpse_enc.encode_at(x, z_where)             # (B, K, z_what_dim)
            enc_std = F.softplus(enc_std)
            q_what = (input_gate * enc_mean + forget_gate * tmp_mean,
                      F.softplus(input_gate * enc_std + forget_gate * F.softplus(tmp_std)))
        return q_what, normal_rsample(*q_what)

    def depth(self, h, z_what, att, prior=None):
        """z_depth from the tracker state, z_what and the attention code. -> q (mean, std), z_depth."""
        depth_mean, depth_std = self.z_depth_transit_net(torch.cat((h, z_what, att), -1)).chunk(2, -1)
        q_depth = prior if prior is not None else (depth_mean, F.softplus(depth_std))
        return q_depth, normal_rsample(*q_depth)

    def presence(self, h, z_where, z_where_bias, z_what, s: Slots, prior: PropagationPriorOut, ctx: FrameContext):
        """z_pres logits = pres_logit_factor * tanh(MLP + 2), z_pres = sigmoid of a relaxed-Bernoulli
        sample; the drop rule: an object whose running sum of (1 - z_pres) reaches
        z_pres_stop_threshold is dropped for good. -> logits, z_pres (zero for empty or dropped
        slots), the running sum (B, K, 1)."""
        cfg = self.cfg
        mask = s.mask[..., None]
        z_pres_logits = cfg.pres_logit_factor * torch.tanh(
            self.z_pres_transit(torch.cat((h, z_where, z_where_bias, z_what), -1)) + TRANSIT_PRES_BIAS)
        sample_logits = _prob_logits(prior.pres_prob) if ctx.generate else z_pres_logits
        z_pres = torch.sigmoid(relaxed_bernoulli_rsample(sample_logits, ctx.tau))
        absence = s.absence + (1 - z_pres) * mask
        z_pres = z_pres * (absence < cfg.z_pres_stop_threshold).to(z_pres.dtype) * mask
        return z_pres_logits, z_pres, absence

    @staticmethod
    def kl(mask, z_pres, z_pres_logits, prior: PropagationPriorOut, q_what, q_where, q_depth) -> Terms:
        """KL of each object's latents from the learned prior: z_what/z_where/z_depth weighted by
        z_pres, z_pres over the occupied slots. (B,) each."""
        weight = z_pres[..., 0]                                              # (B, K), 0 if empty
        return Terms(what=(kl_normal(*q_what, *prior.what).sum(-1) * weight).sum(1),
                     where=(kl_normal(*q_where, *prior.where).sum(-1) * weight).sum(1),
                     depth=(kl_normal(*q_depth, *prior.depth).sum(-1) * weight).sum(1),
                     pres=(kl_bernoulli(torch.sigmoid(z_pres_logits), prior.pres_prob) * mask).sum((1, 2)))

    @staticmethod
    def log_imp(mask, new: Slots, z_pres_logits, prior: PropagationPriorOut, q_what, q_where, q_depth):
        """log p(z) - log q(z) of the objects present (z_pres > 0.5) (B,)."""
        on = (new.z_pres > PRESENT).to(new.z_pres.dtype) * mask                # (B, K, 1)
        lw = lambda z, q, p: ((normal_log_prob(z, *p) - normal_log_prob(z, *q)) * on).sum((1, 2))  # noqa: E731
        pres_on = (new.z_pres > PRESENT).to(new.z_pres.dtype)
        log_imp_pres = (bernoulli_log_prob(pres_on, prior.pres_prob) -
                        bernoulli_log_prob(pres_on, torch.sigmoid(z_pres_logits))) * mask
        return lw(new.z_what, q_what, prior.what) + lw(new.z_depth, q_depth, prior.depth) + \
            lw(new.z_where_bias, q_where, prior.where) + log_imp_pres.sum((1, 2))


def _prob_logits(probs):
    """Logits of probabilities clamped as torch.distributions clamps them."""
    eps = torch.finfo(probs.dtype).eps
    p = probs.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

@dataclass
class Proposals:
    """Discovery's proposal in every cell, before rejection and the cap: (B, C, ...)."""
    z_pres_logits: torch.Tensor  # (B, 1, h, w)
    z_pres: torch.Tensor        # (B, C) sigmoid of the relaxed-Bernoulli sample
    q_what: tuple               # (mean, std) (B, C, z_what_dim)
    q_where: tuple              # (mean, std) (B, C, 4) of the pre-tanh box
    q_depth: tuple              # (mean, std) (B, C, 1)
    z_what: torch.Tensor        # (B, C, z_what_dim)
    z_where_raw: torch.Tensor   # (B, C, 4) the pre-tanh box sample
    z_where: torch.Tensor       # (B, C, 4)
    z_depth: torch.Tensor       # (B, C, 1)


@dataclass
class FrameDecodes:
    """The frame's gradient-free decodes up to alpha (`SCALOR.decode_alpha`), of the propagated
    objects and of the proposals (None where not decoded). Plain rendering decodes afresh; fast.py
    reuses their features."""
    propagated: DecodedAlpha | None
    proposals: DecodedAlpha | None


class SCALOR(nn.Module):
    """The SCALOR model. Each equation group of the paper has its method:

    forward(seq)            the frames in order (`step_frame`), the state handed across windows
    step_frame              one frame: the steps below in the paper's order
    Propagation             q(z^trk_t | .) per tracked object and its learned prior p(z^trk_t | z_{t-1})
    decode_alpha, alpha_map the propagated objects' alpha map, as discovery sees it
    discover                q(z^dsc_t | .) = propose -> reject -> cap, with discovery_kl (KL from N(0, 1)
                            and Bern(annealed prior), weighted by the z_pres before rejection and cap)
    choose_rendered         the objects with z_pres > 0, compacted
    render                  decode_and_place -> composite: alpha = sum alpha z_pres (clamped,
                            straight-through), foreground = normalised sum of alpha z_pres sigmoid(-depth) o
    background              q(z^bg_t | x_t, 1 - alpha_t), prior N(0, 1) then a GRU prior; decoder
    likelihood              y = fg + (1 - alpha) bg, log N(x | y, sigma^2) summed over pixels
    hand_off                tracked objects with z_pres > 0, discovered with z_pres > z_pres_disc_threshold
    """

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

    # --------------------------------------------------------------------------------------------
    # The video, frame by frame
    # --------------------------------------------------------------------------------------------

    def forward(self, seq, step: int = 0, tau=1.0, generate: bool = False, nll: bool = False,
                keep_records: bool = False, z_pres_prior=None, state: VideoState | None = None) -> SCALOROutput:
        """Run the model over a sequence.

        seq (B, T, 3, H, W) in [0, 1]; step: the optimizer step (1-based, as the reference's
        global_step) driving the z_pres prior, detach rule and curriculum; tau: the relaxed-Bernoulli
        temperature (a float or a 0-dim tensor); generate: after cfg.observe_frames frames draw every
        latent from its prior; nll: compute log importance weights (eval mode); keep_records: return
        per-frame records; z_pres_prior: overrides the annealed discovery z_pres prior of `step`
        (float or tensor); state: the `out.state` of the previous window of the same video (None:
        seq starts the video); frame indices (first frame, observe_frames) count from the video's start."""
        cfg = self.cfg
        detach, curriculum = step_switches(cfg, step)
        capacity = cfg.max_num_obj if self.training and cfg.phase_obj_num_contrain else None  # fixed slots
        pres_prior = z_pres_prior_at(cfg, step) if z_pres_prior is None else z_pres_prior
        img_enc_seq, lstm = self.image_enc(seq, None if state is None else state.lstm)   # (B, T, D, h, w)
        if state is None:
            state = self.initial_state(seq, capacity)
        frames = []
        for t in range(seq.shape[1]):
            ctx = FrameContext(first=state.frames_seen == 0, generate=generate and state.frames_seen >= cfg.observe_frames,
                               nll=nll and not self.training, tau=tau, pres_prior=pres_prior, capacity=capacity,
                               detach=detach, curriculum=curriculum)
            state, frame = self.step_frame(seq[:, t], img_enc_seq[:, t], state, ctx, keep_records)
            frames.append(frame)
        return self.collect(frames, replace(state, lstm=lstm))

    def initial_state(self, seq, capacity: int | None) -> VideoState:
        """A video's start: no objects (capacity slots, else 1), ids from 1, zero background prior state."""
        cfg, B = self.cfg, seq.shape[0]
        return VideoState(slots=Slots.empty(cfg, B, capacity or 1, seq.device, seq.dtype),
                          next_id=torch.ones(B, 1, dtype=torch.long, device=seq.device),
                          bg_h=seq.new_zeros(B, cfg.bg_prior_rnn_hid_dim), z_bg=None, lstm=None, frames_seen=0)

    def step_frame(self, x, img_enc, state: VideoState, ctx: FrameContext, keep_record: bool = False):
        """One frame x (B, 3, H, W) with its image features img_enc (B, D, h, w), given the state after
        the previous frame. -> the state after this frame, FrameResult."""
        cfg = self.cfg
        # 1. propagation of the tracked slots
        if ctx.first:
            prop, prop_terms = state.slots, Terms()
        else:
            prop, prop_terms = self.propagation(x, img_enc, state.slots, self.glimpse_enc, ctx)
        # 2. the propagated alpha map, as discovery sees it (no gradient)
        with torch.no_grad():
            prop_decoded = None if ctx.first else self.decode_alpha(prop.z_what)
            alpha_prop = self.alpha_map(prop_decoded, prop) if prop_decoded is not None else \
                x.new_zeros(x.shape[0], 1, cfg.img_h, cfg.img_w)
            alpha_prop = alpha_prop.clamp(EPS, 1 - EPS)
        # 3. discovery
        free = None if ctx.capacity is None else (ctx.capacity - state.slots.mask.sum(1)).long()
        disc, disc_terms = self.discover(x, img_enc, alpha_prop, free, ctx)
        # 4. rendering of the objects whose z_pres is non-zero
        objects, disc_ids, next_id = self.choose_rendered(prop, disc, state.next_id, ctx.capacity)
        rendered = self.render(objects, ctx.curriculum, FrameDecodes(prop_decoded, disc.decoded))
        prop_decoded = disc.decoded = None           # the decodes' memory is free from here
        # 5. background, reconstruction and its likelihood
        bg = self.background(x, rendered.alpha_map, state.bg_h, state.z_bg, ctx)
        y, log_like = self.likelihood(x, rendered, bg.image)
        # 6. hand-off to the next frame
        slots = self.hand_off(prop, disc, disc_ids, ctx.capacity)
        if ctx.detach:
            slots = slots.map(torch.Tensor.detach)
        record = None
        if keep_record:
            record = FrameRecord(
                z_where=objects.z_where.detach(), z_pres=objects.z_pres.detach(),
                z_depth=objects.z_depth[..., 0].detach(), ids=objects.ids * objects.rendered,
                propagated=objects.propagated & objects.rendered, glimpse=rendered.o_att,
                alpha_glimpse=rendered.alpha_att, alpha_map=rendered.alpha_map.detach(),
                foreground=rendered.foreground.detach(), background=bg.image.detach(), tracked=slots.mask.sum(1))
        new_state = VideoState(slots, next_id, bg.bg_h, bg.z_bg, state.lstm, state.frames_seen + 1)
        return new_state, FrameResult(recon=y, log_like=log_like, terms=prop_terms + disc_terms + bg.terms,
                                      counts=slots.mask.sum(1), record=record)

    @staticmethod
    def collect(frames: list, state: VideoState) -> SCALOROutput:
        """The frames' results stacked over time: (B, T) terms, (B, T, 3, H, W) reconstructions."""
        zeros = frames[0].log_like.new_zeros(frames[0].log_like.shape[0])

        def stack(values):
            if all(v is None for v in values):
                return torch.stack([zeros] * len(values), 1)
            return torch.stack([zeros if v is None else v for v in values], 1)

        term = lambda name: stack([getattr(f.terms, name) for f in frames])  # noqa: E731
        return SCALOROutput(recon=torch.stack([f.recon for f in frames], 1), log_like=stack([f.log_like for f in frames]),
                            kl_what=term("what"), kl_where=term("where"), kl_depth=term("depth"), kl_pres=term("pres"),
                            kl_bg=term("bg"), log_imp=term("log_imp"), counts=stack([f.counts for f in frames]),
                            records=[f.record for f in frames if f.record is not None], state=state)

    # --------------------------------------------------------------------------------------------
    # Decoding without gradient: the propagated alpha map, the rejection test
    # --------------------------------------------------------------------------------------------

    def decode_alpha(self, z_what) -> DecodedAlpha:
        """The decoder trunk's features (B, K, 16, G, G) and alpha (B, K, 1, G, G) of objects z_what
        (B, K, z_what_dim)."""
        B, K = z_what.shape[:2]
        feat, alpha = self.glimpse_dec.features_and_alpha(z_what.flatten(0, 1))
        return DecodedAlpha(feat.view(B, K, *feat.shape[1:]), alpha.view(B, K, *alpha.shape[1:]))

    def alpha_map(self, decoded: DecodedAlpha, objects: Slots):
        """Sum of the objects' placed alpha times z_pres: (B, 1, H, W)."""
        cfg = self.cfg
        values, index = place_windows(decoded.alpha, objects.z_where, cfg.img_h, cfg.img_w, *self.window)
        return scatter_windows(values * objects.z_pres[..., None, None], index, cfg.img_h, cfg.img_w)

    # --------------------------------------------------------------------------------------------
    # Discovery
    # --------------------------------------------------------------------------------------------

    def discover(self, x, img_enc, alpha_prop, free, ctx: FrameContext):
        """Propose one object per cell, reject the ones the tracked objects explain, cap their number
        (training: at most `free` (B,) survive). -> Discovered (B, C, ...), Terms: KLs weighted by the
        z_pres from before rejection and cap, log importance weights."""
        proposals = self.propose(x, img_enc, alpha_prop, ctx)
        z_pres, pres_prior, decoded = self.reject(proposals, alpha_prop, ctx)
        z_pres = self.cap(z_pres, free, ctx.generate)
        terms = self.discovery_kl(proposals, pres_prior)
        if ctx.nll:
            terms.log_imp = self.discovery_log_imp(proposals, z_pres, pres_prior)
        return Discovered(z_what=proposals.z_what, z_where=proposals.z_where, z_depth=proposals.z_depth,
                          z_pres=z_pres[..., None], decoded=decoded), terms

    def propose(self, x, img_enc, alpha_prop, ctx: FrameContext) -> Proposals:
        """Per cell: z_pres logits = pres_logit_factor * tanh(.), z_pres = sigmoid of a relaxed-Bernoulli
        sample; z_where, z_depth Gaussians (std softplus); box = anchors for the size, the cell centre
        plus a tanh offset within +-1 cell; z_what from the glimpse encoder at the box. In generation
        the priors: z_pres probability gen_disc_pres_probs, N(0, 1) for the rest."""
        cfg = self.cfg
        B, C = x.shape[0], cfg.num_cells
        hw = (B, 1, cfg.num_cell_h, cfg.num_cell_w)
        if ctx.generate:
            z_pres_logits = x.new_full(hw, math.log(cfg.gen_disc_pres_probs) - math.log1p(-cfg.gen_disc_pres_probs))
            q_depth = (x.new_zeros(hw), x.new_ones(hw))
            q_where = (x.new_zeros(B, 4, *hw[2:]), x.new_ones(B, 4, *hw[2:]))
        else:
            pres_raw, where_raw, depth_raw = self.proposal(img_enc, alpha_prop)
            z_pres_logits = cfg.pres_logit_factor * torch.tanh(pres_raw)
            depth_mean, depth_std = depth_raw.chunk(2, 1)
            where_mean, where_std = where_raw.chunk(2, 1)
            q_depth, q_where = (depth_mean, F.softplus(depth_std)), (where_mean, F.softplus(where_std))
        z_pres = torch.sigmoid(relaxed_bernoulli_rsample(z_pres_logits, ctx.tau))        # (B, 1, h, w)
        z_depth = normal_rsample(*q_depth)
        z_where_raw = normal_rsample(*q_where)                                        # (B, 4, h, w)

        raw = z_where_raw.permute(0, 2, 3, 1).reshape(B, C, 4)
        centre = 2.0 * (self.cell_offset + 0.5 + torch.tanh(raw[..., 2:])) / self.grid_size - 1
        z_where = torch.cat((anchor_box(cfg, raw[..., :2]), centre), -1)             # (B, C, 4)

        if ctx.generate:
            q_what = (x.new_zeros(B, C, cfg.z_what_dim), x.new_ones(B, C, cfg.z_what_dim))
        else:
            mean, std = self.glimpse_enc.encode_at(x, z_where)                       # (B, C, z_what_dim)
            q_what = (mean, F.softplus(std))
        z_what = normal_rsample(*q_what)                                              # (B, C, z_what_dim)
        return Proposals(z_pres_logits=z_pres_logits, z_pres=z_pres.view(B, C), q_what=q_what,
                         q_where=tuple(v.permute(0, 2, 3, 1).reshape(B, C, 4) for v in q_where),
                         q_depth=tuple(v.view(B, C, 1) for v in q_depth), z_what=z_what, z_where_raw=raw,
                         z_where=z_where, z_depth=z_depth.view(B, C, 1))

    def reject(self, p: Proposals, alpha_prop, ctx: FrameContext):
        """From the second frame on (`phase_rejection`), a proposal whose decoded alpha (>
        proposal_alpha_threshold) lies on the propagated alpha (> propagated_alpha_threshold) for at
        least explained_ratio_threshold of its area is rejected: z_pres zero, z_pres prior
        z_pres_masked_prior. `first_frame_rejection`: at the first frame against the proposals kept
        before it. -> z_pres (B, C), the z_pres prior (B, C), the decodes (None: no test)."""
        cfg = self.cfg
        z_pres, pres_prior = p.z_pres, ctx.pres_prior * torch.ones_like(p.z_pres)
        if not cfg.phase_rejection or (ctx.first and not cfg.first_frame_rejection):
            return z_pres, pres_prior, None
        with torch.no_grad():
            decoded = self.decode_alpha(p.z_what)
            if not ctx.first:
                explained = self._explained_ratio(decoded.alpha, p.z_where, alpha_prop)      # (B, C)
            else:
                explained = self._explained_by_kept(decoded.alpha, p.z_where, z_pres)
        keep = (explained < cfg.explained_ratio_threshold).to(z_pres.dtype)
        return z_pres * keep, ctx.pres_prior * keep + cfg.z_pres_masked_prior * (1 - keep), decoded

    @staticmethod
    def cap(z_pres, free, generate: bool):
        """Training: at most `free` (B,) proposals survive, those of the largest z_pres (B, C) (ties:
        the lower cell first). The reference keeps z_pres > the free-th largest value, which keeps
        fewer on ties (none when many saturate at 1.0) and indexes out of range when free >= C.
        In generation nothing new is discovered in training mode."""
        if free is None:
            return z_pres
        if generate:
            return z_pres * 0
        B, C = z_pres.shape
        order = torch.sort(z_pres, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(C, device=order.device).expand(B, C))
        return z_pres * ((rank < free[:, None]) & (z_pres > 0)).to(z_pres.dtype)

    @staticmethod
    def discovery_kl(p: Proposals, pres_prior) -> Terms:
        """KL of z_what, z_where, z_depth from N(0, 1), weighted by the z_pres from before rejection and
        the cap; KL of z_pres from Bern(pres_prior). (B,) each."""
        B, C = p.z_pres.shape
        w = p.z_pres                                                                  # (B, C)
        return Terms(what=(kl_std_normal(*p.q_what).sum(-1) * w).sum(1),
                     where=(kl_std_normal(*p.q_where).sum(-1) * w).sum(1),
                     depth=(kl_std_normal(*p.q_depth).sum(-1) * w).sum(1),
                     pres=kl_bernoulli(torch.sigmoid(p.z_pres_logits.view(B, C)), pres_prior).sum(1))

    @staticmethod
    def discovery_log_imp(p: Proposals, z_pres, pres_prior):
        """log p(z) - log q(z) of the proposals present (z_pres > 0.5) (B,)."""
        B, C = p.z_pres.shape
        on = (p.z_pres > PRESENT).to(p.z_pres.dtype)[..., None]
        lw = lambda z, q: ((std_normal_log_prob(z) - normal_log_prob(z, *q)) * on).sum((1, 2))  # noqa: E731
        pres_on = (z_pres > PRESENT).to(z_pres.dtype)
        return lw(p.z_what, p.q_what) + lw(p.z_depth, p.q_depth) + lw(p.z_where_raw, p.q_where) + \
            (bernoulli_log_prob(pres_on, pres_prior) -
             bernoulli_log_prob(pres_on, torch.sigmoid(p.z_pres_logits.view(B, C)))).sum(1)

    @torch.no_grad()
    def _explained_ratio(self, alpha, z_where, alpha_prop):
        """Fraction of each proposal's alpha (B, C, 1, G, G) above 0.3 lying on the propagated alpha
        (> 0.1): (B, C)."""
        C = alpha.shape[1]
        values, index = place_windows(alpha, z_where, self.cfg.img_h, self.cfg.img_w, *self.window)
        return self._covered_fraction(values, index, alpha_prop.flatten(1)[:, None].expand(-1, C, -1))

    # --------------------------------------------------------------------------------------------
    # Rendering
    # --------------------------------------------------------------------------------------------

    def choose_rendered(self, prop: Slots, disc: Discovered, next_id, capacity: int | None):
        """The frame's objects to render: [propagated (B, K); discovered (B, C)] with z_pres > 0,
        compacted to `capacity` entries (None: as many as the fullest sample has, a host sync).
        Discovered objects get the next free ids. -> Objects (B, R, ...), the discovered objects'
        ids (B, C), the next free id (B, 1)."""
        K = prop.mask.shape[1]
        cand_pres = torch.cat((prop.z_pres, disc.z_pres), 1)[..., 0]                     # (B, K + C)
        visible = cand_pres > 0
        disc_visible = visible[:, K:]
        disc_ids = next_id + torch.cumsum(disc_visible.long(), 1) - 1                     # (B, C)
        next_id = next_id + disc_visible.sum(1, keepdim=True)
        cand = dict(z_what=torch.cat((prop.z_what, disc.z_what), 1),
                    z_where=torch.cat((prop.z_where, disc.z_where), 1),
                    z_depth=torch.cat((prop.z_depth, disc.z_depth), 1),
                    z_pres=cand_pres,
                    ids=torch.cat((prop.ids, torch.where(disc_visible, disc_ids, 0)), 1),
                    propagated=torch.cat((torch.ones_like(visible[:, :K]), torch.zeros_like(disc_visible)), 1))
        index, rendered = compact(visible, capacity)
        chosen = {k: gather_slots(v, index) for k, v in cand.items()}
        chosen["z_pres"] = chosen["z_pres"] * rendered
        return Objects(**chosen, index=index, rendered=rendered), disc_ids, next_id

    def render(self, objects: Objects, curriculum: bool, decodes: FrameDecodes | None = None) -> Rendered:
        """Decode the objects (B, R, ...) and composite them (`composite`). decodes: the frame's
        gradient-free decodes, for `decode_and_place` to reuse (fast.py's does; the plain one decodes)."""
        values, index, o_att, alpha_att = self.decode_and_place(objects, decodes)
        frame = self.composite(values, index, objects, curriculum)
        frame.o_att, frame.alpha_att = o_att.detach(), alpha_att.detach()
        return frame

    def decode_and_place(self, objects: Objects, decodes: FrameDecodes | None = None):
        """The objects' glimpses decoded (o, alpha (B, R, ., G, G)) and placed into the frame within
        their windows: (alpha * o, alpha) values (B, R, 4, h, w) and flat pixel index (B, R, h * w).
        `decodes` is not needed here (fast.py's version reuses their features)."""
        B, R = objects.z_pres.shape
        G = self.cfg.glimpse_size
        o_att, alpha_att = self.glimpse_dec(objects.z_what.flatten(0, 1))
        return self.place(o_att.view(B, R, 3, G, G), alpha_att.view(B, R, 1, G, G), objects.z_where)

    def place(self, o_att, alpha_att, z_where):
        """(alpha * o, alpha) of glimpses (B, R, ., G, G) placed at boxes z_where (B, R, 4): values
        (B, R, 4, h, w), index (B, R, h * w); and o_att, alpha_att themselves."""
        cfg = self.cfg
        values, index = place_windows(torch.cat((alpha_att * o_att, alpha_att), 2), z_where,
                                      cfg.img_h, cfg.img_w, *self.window)                 # (B, R, 4, h, w)
        return values, index, o_att, alpha_att

    def composite(self, values, index, objects: Objects, curriculum: bool) -> Rendered:
        """Placed windows values (B, R, 4, h, w) of (alpha * o, alpha) at index -> the frame's
        alpha_map (B, 1, H, W) = sum of alpha * z_pres, clamped to [EPS, 1 - EPS] with a
        straight-through gradient, and foreground (B, 3, H, W) = the objects' colours weighted by
        alpha * z_pres * sigmoid(-z_depth), normalised over the objects. Alpha curriculum: every
        discovery cell's alpha fixed to bg_alpha_curriculum_value (the tracked objects' alpha without
        its gradient when bg_alpha_curriculum_detach_tracked)."""
        cfg = self.cfg
        z_pres = objects.z_pres[..., None, None, None]                                    # (B, R, 1, 1, 1)
        alpha = z_pres * values[:, :, 3:]                                                # placed alpha * z_pres
        weight = alpha * torch.sigmoid(-objects.z_depth)[..., None, None]                # importance
        colour = z_pres * values[:, :, :3]                                               # placed alpha * o * z_pres
        parts = [alpha, weight, colour * weight]
        if curriculum:
            parts.append(alpha * objects.propagated[..., None, None, None].to(alpha.dtype))
        canvas = scatter_windows(torch.cat(parts, 2), index, cfg.img_h, cfg.img_w)
        alpha_sum = canvas[:, :1]
        if curriculum:
            tracked_alpha = canvas[:, 5:6]
            if cfg.bg_alpha_curriculum_detach_tracked:
                tracked_alpha = tracked_alpha.detach()
            alpha_sum = tracked_alpha + cfg.bg_alpha_curriculum_value * cfg.num_cells
        foreground = canvas[:, 2:5] / (canvas[:, 1:2] + EPS)
        alpha_map = alpha_sum + (alpha_sum.clamp(EPS, 1 - EPS) - alpha_sum).detach()
        return Rendered(alpha_map=alpha_map, foreground=foreground)

    # --------------------------------------------------------------------------------------------
    # Background and likelihood
    # --------------------------------------------------------------------------------------------

    def background(self, x, alpha_map, bg_h, z_bg_prev, ctx: FrameContext) -> Background:
        """The background of frame x (B, 3, H, W): q(z_bg | x, 1 - alpha_map); prior N(0, 1) at the
        video's first frame (z_bg_prev None), afterwards a GRU prior (state bg_h) whose mean is
        z_bg_prev plus a learned offset. `phase_no_background`: black, no KL."""
        cfg = self.cfg
        B = x.shape[0]
        if cfg.phase_no_background:
            return Background(image=x.new_zeros(B, 3, cfg.img_h, cfg.img_w), z_bg=None, bg_h=bg_h,
                              terms=Terms(bg=x.new_zeros(B)))
        if z_bg_prev is None:
            zeros = bg_h.new_zeros(B, cfg.bg_what_dim)
            p_bg = (zeros, torch.ones_like(zeros))
        else:
            bg_h = self.bg_prior_rnn(z_bg_prev, bg_h)
            offset, std = self.bg_prior_net(bg_h).chunk(2, -1)
            p_bg = (offset + z_bg_prev, F.softplus(std))
        if ctx.generate:
            q_bg = p_bg
        else:
            mean, std = self.bg_enc(torch.cat((x, 1 - alpha_map), 1))
            q_bg = (mean, F.softplus(std))
        z_bg = normal_rsample(*q_bg)
        terms = Terms(bg=kl_normal(*q_bg, *p_bg).sum(1))
        if ctx.nll:
            terms.log_imp = (normal_log_prob(z_bg, *p_bg) - normal_log_prob(z_bg, *q_bg)).sum(1)
        return Background(image=self.bg_dec(z_bg), z_bg=z_bg, bg_h=bg_h, terms=terms)

    def likelihood(self, x, rendered: Rendered, bg):
        """The reconstruction y = foreground + (1 - alpha) * background (B, 3, H, W) and the Gaussian
        log-likelihood of x under it, sigma = cfg.sigma, summed over pixels (B,)."""
        sigma = self.cfg.sigma
        y = rendered.foreground + (1 - rendered.alpha_map) * bg
        log_like = (-(x - y) ** 2 / (2 * sigma ** 2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        return y, log_like

    # --------------------------------------------------------------------------------------------
    # Hand-off
    # --------------------------------------------------------------------------------------------

    def hand_off(self, prop: Slots, disc: Discovered, disc_ids, capacity: int | None) -> Slots:
        """The slots for the next frame: tracked objects with z_pres > 0, then discovered ones with
        z_pres > z_pres_disc_threshold, compacted to `capacity` (None: the fullest sample's count)."""
        cfg = self.cfg
        B, C = disc.z_pres.shape[:2]
        new_disc = Slots(mask=torch.ones_like(disc.z_pres[..., 0]), z_what=disc.z_what,
                         z_where=disc.z_where, z_where_bias=torch.zeros_like(disc.z_where),
                         z_depth=disc.z_depth, z_pres=disc.z_pres, absence=torch.zeros_like(disc.z_pres),
                         tracker_h=disc.z_what.new_zeros(B, C, cfg.temporal_rnn_hid_dim),
                         prior_h=disc.z_what.new_zeros(B, C, cfg.prior_rnn_hid_dim),
                         prior_c=disc.z_what.new_zeros(B, C, cfg.prior_rnn_hid_dim), ids=disc_ids)
        keep = torch.cat((prop.z_pres[..., 0] > 0, disc.z_pres[..., 0] > cfg.z_pres_disc_threshold), 1)
        index, valid = compact(keep, capacity)
        both = Slots.cat(prop, new_disc)
        return both.map(lambda v: gather_slots(v, index) * valid.view(*valid.shape, *([1] * (v.dim() - 2))).to(v.dtype))

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
