"""Building blocks of SCALOR in plain PyTorch: encoders, decoders, the ConvLSTM, sampling, KLs and
spatial transforms.

Every layer stack is built from the configured sizes. At image 64/128, grid 4/8 and glimpse 32/64
the stacks equal the reference implementation's (same layers, widths, kernels, GroupNorm groups;
`tests/test_params.py` pins the parameter counts); other sizes follow the same rules.

Spatial transforms use the reference's convention (`F.affine_grid`/`F.grid_sample`,
align_corners=False): z_where = (sx, sy, tx, ty); a glimpse covers image coordinates
x = sx * u + tx, y = sy * v + ty for glimpse coordinates u, v in [-1, 1].

Nothing here is about speed: `fast.py` swaps in Triton convolutions, stacked decoder heads,
activation recomputation and the rest after the model is built, with the same parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common import Config, norm_groups


def conv_block(cin: int, cout: int, kernel, stride: int = 1, padding=0, groups: int | None = None,
               norm: bool = True):
    """Conv2d -> CELU -> GroupNorm, the reference's unit (norm False: without the GroupNorm)."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, padding), nn.CELU()]
    return layers + [nn.GroupNorm(groups or norm_groups(cout), cout)] if norm else layers


def upsample_block(cin: int, cout: int, factor: int, norm: bool = True):
    """1x1 conv to cout*factor^2 -> PixelShuffle(factor) -> CELU -> GroupNorm (norm False: without it)."""
    layers = [nn.Conv2d(cin, cout * factor * factor, 1), nn.PixelShuffle(factor), nn.CELU()]
    return layers + [nn.GroupNorm(norm_groups(cout), cout)] if norm else layers


def start_background_at(decoder: nn.Module, colour: torch.Tensor) -> None:
    """Set the bias of a background decoder's last conv (`output_conv`, before its sigmoid) so that a
    zero input to that conv gives `colour` (3,) in (0, 1), clamped to [0.01, 0.99]."""
    conv = decoder.output_conv
    with torch.no_grad():
        conv.bias.copy_(torch.logit(colour.to(conv.bias).clamp(0.01, 0.99)))


def _log2(n: int) -> int:
    return int(round(math.log2(n)))


# ------------------------------------------------------------------------------------------------
# Image encoders
# ------------------------------------------------------------------------------------------------

class ImageEncoder(nn.Module):
    """Frame (3, H, W) -> per-cell features (img_encode_dim, num_cell_h, num_cell_w).

    Stride-2 4x4 convs halve the frame down to the grid (16, 32, 64, then 64 ...; the last one is
    128 wide on frames of 128 px or more when there are four or more), each but the last (from the
    fourth on) followed by a 3x3 conv; then a 1x1 conv to img_encode_dim, a lateral 3x3 branch and
    a 3x3 conv over both.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        num_down = _log2(cfg.cell_size)
        layers, cin = [], 3
        for i in range(num_down):
            last = i == num_down - 1 and num_down >= 4
            if i < 3:
                cout = (16, 32, 64)[i]
            else:
                cout = 128 if last and min(cfg.img_h, cfg.img_w) >= 128 else 64
            layers += conv_block(cin, cout, 4, 2, 1)
            if i <= max(2, num_down - 2):
                layers += conv_block(cout, cout, 3, 1, 1)
            cin = cout
        d = cfg.img_encode_dim
        layers += conv_block(cin, d, 1, groups=16)
        self.enc = nn.Sequential(*layers)
        self.enc_lat = nn.Sequential(*conv_block(d, d, 3, 1, 1, groups=8), *conv_block(d, d, 3, 1, 1, groups=8))
        self.enc_cat = nn.Sequential(*conv_block(2 * d, d, 3, 1, 1, groups=8))

    def forward(self, x):                      # (N, 3, H, W)
        feat = self.enc(x)                     # (N, D, h, w)
        return self.enc_cat(torch.cat((feat, self.enc_lat(feat)), dim=1))


class ConvLSTMCell(nn.Module):
    """ConvLSTM cell with per-cell peephole weights (the reference's gate order i, f, o, c)."""

    def __init__(self, cin: int, hidden: int, map_h: int, map_w: int):
        super().__init__()
        self.hidden = hidden
        self.conv_x = nn.Conv2d(cin, 4 * hidden, 3, padding=1, bias=True)
        self.conv_h = nn.Conv2d(hidden, 4 * hidden, 3, padding=1, bias=False)
        self.Wci = nn.Parameter(torch.zeros(1, hidden, map_h, map_w))
        self.Wcf = nn.Parameter(torch.zeros(1, hidden, map_h, map_w))
        self.Wco = nn.Parameter(torch.zeros(1, hidden, map_h, map_w))

    def forward(self, xs, state=None):          # (B, T, C, h, w) -> (B, T, hidden, h, w), (h, c)
        """state: the (h, c) (B, hidden, h, w) after the previous frame, None at a video's start."""
        B, T = xs.shape[:2]
        gates_x = self.conv_x(xs.flatten(0, 1)).view(B, T, 4 * self.hidden, *xs.shape[-2:])
        if state is None:
            h = xs.new_zeros(B, self.hidden, *xs.shape[-2:])
            c = torch.zeros_like(h)
        else:
            h, c = state
        outs = []
        for t in range(T):
            xi, xf, xo, xc = gates_x[:, t].split(self.hidden, dim=1)
            hi, hf, ho, hc = self.conv_h(h).split(self.hidden, dim=1)
            i = torch.sigmoid(xi + hi + c * self.Wci)
            f = torch.sigmoid(xf + hf + c * self.Wcf)
            o = torch.sigmoid(xo + ho + c * self.Wco)     # peephole on the previous cell state
            c = f * c + i * torch.tanh(xc + hc)
            h = o * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, dim=1), (h, c)


class SequenceEncoder(nn.Module):
    """Frames (B, T, 3, H, W) -> features (B, T, D, h, w): ImageEncoder per frame, then an
    optional 2-layer ConvLSTM over time (`phase_conv_lstm`)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.image_enc = ImageEncoder(cfg)
        self.conv_lstm = None
        if cfg.phase_conv_lstm:
            d, hid = cfg.img_encode_dim, cfg.conv_lstm_hid_dim
            self.conv_lstm = nn.ModuleList([ConvLSTMCell(d, hid, cfg.num_cell_h, cfg.num_cell_w),
                                            ConvLSTMCell(hid, hid, cfg.num_cell_h, cfg.num_cell_w)])

    def forward(self, seq, lstm_state=None):
        """seq (B, T, 3, H, W); lstm_state: each ConvLSTM layer's (h, c) after the previous frame
        (None at a video's start). -> features (B, T, D, h, w), the layers' (h, c) after the last frame
        (None without ConvLSTM)."""
        B, T = seq.shape[:2]
        feat = self.image_enc(seq.flatten(0, 1))
        feat = feat.view(B, T, *feat.shape[1:])
        if self.conv_lstm is None:
            return feat, None
        states = []
        for i, cell in enumerate(self.conv_lstm):
            feat, layer_state = cell(feat, None if lstm_state is None else lstm_state[i])
            states.append(layer_state)
        return feat, states


# ------------------------------------------------------------------------------------------------
# Glimpses
# ------------------------------------------------------------------------------------------------

class GlimpseEncoder(nn.Module):
    """Glimpse (3, G, G) -> z_what mean and pre-softplus std (the reference's ZWhatEnc).

    Stride-2 convs (16, 32, 64, 128, ...) down to 4x4 (a 3x3 conv after the last one when it is
    narrower than 128), then a 4x4 valid conv to z_what_enc_dim and a linear head."""

    def __init__(self, cfg: Config):
        super().__init__()
        widths = [16, 32, 64, 128]
        num_down = _log2(cfg.glimpse_size // 4)
        layers, cin = [], 3
        for i in range(num_down):
            cout = widths[min(i, 3)]
            layers += conv_block(cin, cout, 4, 2, 1)
            cin = cout
        if cin < 128:
            layers += conv_block(cin, cin, 3, 1, 1)
        layers += conv_block(cin, cfg.z_what_enc_dim, 4)
        self.enc_cnn = nn.Sequential(*layers)
        self.enc_what = nn.Linear(cfg.z_what_enc_dim, 2 * cfg.z_what_dim)
        self.glimpse_size = cfg.glimpse_size

    def forward(self, glimpses):               # (N, 3, G, G)
        mean, std_raw = self.enc_what(self.enc_cnn(glimpses).flatten(1)).chunk(2, -1)
        return mean, std_raw                   # (N, z_what_dim) each

    def encode_at(self, frames, z_where):
        """Crop the glimpses of frames (B, 3, H, W) at boxes z_where (B, K, 4) and encode them:
        z_what mean and pre-softplus std, (B, K, z_what_dim) each."""
        B, K = z_where.shape[:2]
        glimpses = crop(frames, z_where, self.glimpse_size, self.glimpse_size)       # (B, K, 3, G, G)
        mean, std = self(glimpses.flatten(0, 1))
        return mean.view(B, K, -1), std.view(B, K, -1)


class GlimpseDecoder(nn.Module):
    """z_what -> glimpse appearance o (3, G, G) and alpha (1, G, G), both in (0, 1).

    Four PixelShuffle stages of widths 64, 64, 32, 16 whose factors (4 where possible from the
    front, else 2) multiply to G; for G >= 64 a 3x3 conv follows each stage but the last, for smaller
    G one 3x3 conv follows the last. Heads are a 3x3 conv (frames of 64 px or less) or
    3x3 conv -> CELU -> GN -> 3x3 conv."""

    def __init__(self, cfg: Config):
        super().__init__()
        G = cfg.glimpse_size
        factors = [2, 2, 2, 2]
        i = 0
        while math.prod(factors) < G and i < 4:
            factors[i] = 4
            i += 1
        if math.prod(factors) != G:
            raise ValueError(f"glimpse_size={G} is not reachable with four x2/x4 stages (16..256)")
        widths = [64, 64, 32, 16]
        layers = conv_block(cfg.z_what_dim, 128, 1)
        cin = 128
        for s, (f, c) in enumerate(zip(factors, widths)):
            layers += upsample_block(cin, c, f)
            if G >= 64 and s < 3:
                layers += conv_block(c, c, 3, 1, 1)
            cin = c
        if G < 64:
            layers += conv_block(16, 16, 3, 1, 1)
        self.dec = nn.Sequential(*layers)
        head = lambda i, o: nn.Conv2d(i, o, 3, 1, 1)   # noqa: E731
        if min(cfg.img_h, cfg.img_w) <= 64:
            self.dec_o = head(16, 3)
            self.dec_alpha = head(16, 1)
        else:
            self.dec_o = nn.Sequential(*conv_block(16, 8, 3, 1, 1), head(8, 3))
            self.dec_alpha = nn.Sequential(*conv_block(16, 8, 3, 1, 1), head(8, 1))

    def forward(self, z_what):                 # (N, z_what_dim) -> o (N, 3, G, G), alpha (N, 1, G, G)
        feat = self.trunk(z_what)
        return torch.sigmoid(self.dec_o(feat)), torch.sigmoid(self.dec_alpha(feat))

    def trunk(self, z_what):                   # (N, z_what_dim) -> features (N, 16, G, G)
        return self.dec(z_what.view(*z_what.shape, 1, 1))

    def features_and_alpha(self, z_what):      # (N, z_what_dim) -> trunk (N, 16, G, G), alpha (N, 1, G, G)
        """The trunk's features and alpha, without the appearance head (rejection, alpha maps);
        `appearance(features)` completes the decode."""
        feat = self.trunk(z_what)
        return feat, torch.sigmoid(self.dec_alpha(feat))

    def appearance(self, feat):                # trunk (N, 16, G, G) -> o (N, 3, G, G)
        return torch.sigmoid(self.dec_o(feat))


# ------------------------------------------------------------------------------------------------
# Discovery proposal network
# ------------------------------------------------------------------------------------------------

class ProposalNet(nn.Module):
    """Per-cell proposal heads from image features and the encoded propagated alpha map
    (the reference's ProposalCore networks)."""

    def __init__(self, cfg: Config):
        super().__init__()
        num_down = _log2(cfg.cell_size)
        layers, cin = [], 1
        for i in range(num_down):
            cout = (16, 32)[i] if i < 2 else 64
            layers += conv_block(cin, cout, 4, 2, 1)
            if 1 <= i <= max(2, num_down - 2):
                layers += conv_block(cout, cout, 3, 1, 1)
            cin = cout
        layers += conv_block(cin, cfg.propagate_encode_dim, 1)
        self.mask_enc_net = nn.Sequential(*layers)
        d = cfg.img_encode_dim
        self.img_mask_cat_enc = nn.Sequential(*conv_block(d + cfg.propagate_encode_dim, d, 1, groups=16),
                                              *conv_block(d, d, 1, groups=16))
        if min(cfg.img_h, cfg.img_w) >= 128:
            self.z_where_net = nn.Sequential(*conv_block(d, 64, 1), nn.Conv2d(64, 2 * cfg.z_where_dim, 1))
            self.z_pres_net = nn.Sequential(*conv_block(d, 64, 1), nn.Conv2d(64, 1, 1))
            self.z_depth_net = nn.Sequential(*conv_block(d, 32, 1), nn.Conv2d(32, 2, 1))
        else:
            self.z_where_net = nn.Conv2d(d, 2 * cfg.z_where_dim, 1)
            self.z_pres_net = nn.Conv2d(d, 1, 1)
            self.z_depth_net = nn.Conv2d(d, 2, 1)

    def forward(self, img_enc, alpha_prop):   # (B, D, h, w), (B, 1, H, W)
        feat = self.img_mask_cat_enc(torch.cat((img_enc, self.mask_enc_net(alpha_prop)), dim=1))
        return self.z_pres_net(feat), self.z_where_net(feat), self.z_depth_net(feat)


# ------------------------------------------------------------------------------------------------
# Background
# ------------------------------------------------------------------------------------------------

class BgEncoder(nn.Module):
    """(frame, 1 - alpha) (4, H, W) -> background latent mean and pre-softplus std."""

    def __init__(self, cfg: Config):
        super().__init__()
        num_down = _log2(min(cfg.img_h, cfg.img_w) // 4)
        layers, cin = [], 4
        for i in range(num_down):
            cout = (16, 32)[i] if i < 2 else 64
            layers += conv_block(cin, cout, 4, 2, 1, norm=cfg.bg_group_norm)
            cin = cout
        layers.append(nn.Conv2d(cin, 2 * cfg.bg_what_dim, (cfg.img_h >> num_down, cfg.img_w >> num_down)))
        self.enc = nn.Sequential(*layers)

    def forward(self, x):                      # (B, 4, H, W)
        return self.enc(x).flatten(1).chunk(2, -1)


class BgDecoder(nn.Module):
    """Background latent -> image (3, H, W) by 1x1 convs and PixelShuffle stages.

    Stages of factor 4 (a factor-2 stage before the last when log2(side) is odd) with widths
    ..., 256, 128, 64, 16 counted from the last stage; each followed by a 3x3 conv."""

    def __init__(self, cfg: Config):
        super().__init__()
        side = min(cfg.img_h, cfg.img_w)
        self.start_hw = (cfg.img_h // side, cfg.img_w // side)
        k = _log2(side)
        factors = [4] * (k // 2)
        if k % 2:
            factors.insert(len(factors) - 1, 2)
        widths = ([256] * len(factors) + [128, 64, 16])[-len(factors):] if len(factors) >= 3 else [64, 16][-len(factors):]
        norm = cfg.bg_group_norm
        layers = conv_block(cfg.bg_what_dim, 256, 1, norm=norm)
        cin = 256
        for f, c in zip(factors, widths):
            layers += upsample_block(cin, c, f, norm=norm)
            layers += conv_block(c, c, 3, 1, 1, norm=norm)
            cin = c
        self.dec = nn.Sequential(*layers)
        self.bg_dec = nn.Sequential(*conv_block(16, 16, 3, 1, 1, norm=norm),
                                    nn.Conv2d(16, 3, 3, 1, 1))

    @property
    def output_conv(self) -> nn.Conv2d:        # the last conv, before the sigmoid
        return self.bg_dec[-1]

    def forward(self, z_bg):                   # (B, bg_what_dim)
        x = z_bg[..., None, None].expand(-1, -1, *self.start_hw)
        return torch.sigmoid(self.bg_dec(self.dec(x)))


class BgDecoderSBD(nn.Module):
    """Spatial-broadcast background decoder (`using_bg_sbd`): the latent tiled over the frame with
    a (y, x) coordinate grid, then 5x5 convs (3 of them on frames of 128 px or more, else 2)."""

    def __init__(self, cfg: Config):
        super().__init__()
        n = 3 if min(cfg.img_h, cfg.img_w) >= 128 else 2
        layers, cin = [], cfg.bg_what_dim + 2
        for _ in range(n):
            layers += conv_block(cin, 64, 5, 1, 2, norm=cfg.bg_group_norm)
            cin = 64
        self.dec = nn.Sequential(*layers)
        self.bg_dec = nn.Conv2d(64, 3, 3, padding=1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, cfg.img_h), torch.linspace(-1, 1, cfg.img_w), indexing="ij")
        self.register_buffer("position_embedding", torch.stack((ys, xs))[None], persistent=False)

    def forward(self, z_bg):                   # (B, bg_what_dim)
        B = z_bg.shape[0]
        H, W = self.position_embedding.shape[-2:]
        x = torch.cat((self.position_embedding.expand(B, -1, -1, -1), z_bg[..., None, None].expand(-1, -1, H, W)), 1)
        return torch.sigmoid(self.bg_dec(self.dec(x)))

    @property
    def output_conv(self) -> nn.Conv2d:        # the last conv, before the sigmoid
        return self.bg_dec


# ------------------------------------------------------------------------------------------------
# Distributions
# ------------------------------------------------------------------------------------------------

def normal_rsample(mean, std):
    """mean + std * eps, eps ~ N(0, 1) drawn in mean's shape in row-major order whatever mean's
    memory layout (as torch.distributions does), so that a compiled graph, free to lay tensors out
    otherwise, draws the same numbers."""
    return mean + std * torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)


def normal_log_prob(x, mean, std):
    return -((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)


def kl_normal(mean_q, std_q, mean_p, std_p):
    """KL(N(mean_q, std_q) || N(mean_p, std_p)) elementwise (the torch.distributions formula)."""
    var_ratio = (std_q / std_p) ** 2
    t1 = ((mean_q - mean_p) / std_p) ** 2
    return 0.5 * (var_ratio + t1 - 1 - torch.log(var_ratio))


def kl_std_normal(mean_q, std_q):
    """KL(N(mean_q, std_q) || N(0, 1)) elementwise (same formula with mean_p = 0, std_p = 1)."""
    var = std_q ** 2
    return 0.5 * (var + mean_q ** 2 - 1 - torch.log(var))


def std_normal_log_prob(x):
    return -x ** 2 / 2 - 0.5 * math.log(2 * math.pi)


def relaxed_bernoulli_rsample(logits, tau: float):
    """Logit-space sample y of a relaxed Bernoulli at temperature tau; z_pres = sigmoid(y).

    y = (logits + log u - log(1 - u)) / tau with u ~ U(0, 1) clamped away from 0 and 1 as
    torch.distributions does (the reference's NumericalRelaxedBernoulli.rsample)."""
    eps = torch.finfo(logits.dtype).eps
    u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device).clamp(eps, 1 - eps)   # as normal_rsample
    return (logits + torch.log(u) - torch.log1p(-u)) / tau


def kl_bernoulli(q_probs, p_probs, eps: float = 1e-15):
    """KL(Bern(q) || Bern(p)) elementwise, with the reference's eps inside the logs."""
    return q_probs * (torch.log(q_probs + eps) - torch.log(p_probs + eps)) + \
        (1 - q_probs) * (torch.log(1 - q_probs + eps) - torch.log(1 - p_probs + eps))


def bernoulli_log_prob(value, probs, eps: float = 1e-15):
    return value * torch.log(probs + eps) + (1 - value) * torch.log(1 - probs + eps)


# ------------------------------------------------------------------------------------------------
# Spatial transforms
# ------------------------------------------------------------------------------------------------

def _base_coords(n: int, device, dtype):
    """Normalised pixel-centre coordinates of affine_grid with align_corners=False."""
    return torch.linspace(-1, 1, n, device=device, dtype=dtype) * ((n - 1) / n)


def crop(images, z_where, out_h: int, out_w: int):
    """Glimpses of `images` at boxes `z_where` (the reference's forward spatial transform).

    images (B, C, H, W), z_where (B, K, 4) -> (B, K, C, out_h, out_w). All K glimpses of a frame are
    sampled in one grid_sample call with the frame shared, not copied K times."""
    B, K = z_where.shape[:2]
    C = images.shape[1]
    u = _base_coords(out_w, images.device, images.dtype)               # (w,)
    v = _base_coords(out_h, images.device, images.dtype)               # (h,)
    sx, sy, tx, ty = z_where.unbind(-1)                                # (B, K) each
    gx = sx[..., None, None] * u + tx[..., None, None]                 # (B, K, 1, w)
    gy = sy[..., None, None] * v[:, None] + ty[..., None, None]        # (B, K, h, 1)
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)        # (B, K, h, w, 2)
    out = F.grid_sample(images, grid.view(B, K * out_h, out_w, 2), align_corners=False)
    return out.view(B, C, K, out_h, out_w).transpose(1, 2)


def spatial_transform(image, z_where, out_dims, inverse: bool = False):
    """The plain per-object transform (one affine grid per object), as the reference computes it.

    image (N, C, h, w), z_where (N, 4), out_dims (N, C, H, W). With inverse=True a glimpse is placed
    into the frame. Used for full-resolution renders in logging and as the test oracle."""
    sx, sy, tx, ty = z_where.unbind(-1)
    theta = image.new_zeros(image.shape[0], 2, 3)
    if inverse:
        theta[:, 0, 0] = 1 / (sx + 1e-9)
        theta[:, 1, 1] = 1 / (sy + 1e-9)
        theta[:, 0, 2] = -tx / (sx + 1e-9)
        theta[:, 1, 2] = -ty / (sy + 1e-9)
    else:
        theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = sx, sy, tx, ty
    grid = F.affine_grid(theta, torch.Size(out_dims), align_corners=False)
    return F.grid_sample(image, grid, align_corners=False)


def max_box_extent(cfg: Config):
    """Largest box half-extents (sx, sy) the anchor formula can produce."""
    scale = cfg.size_anc + cfg.var_s
    return scale / math.sqrt(cfg.ratio_anc - cfg.var_anc), scale * math.sqrt(cfg.ratio_anc + cfg.var_anc)


def window_size(cfg: Config):
    """(rows, cols) of the pixel window that holds every non-zero pixel of any placed glimpse.

    A glimpse of G pixels placed at half-extent s covers |x - tx| < s (1 + 1/G) in normalised
    coordinates (bilinear sampling reaches one glimpse pixel beyond its border)."""
    sx, sy = max_box_extent(cfg)
    grow = 1 + 1 / cfg.glimpse_size
    rows = min(cfg.img_h, math.ceil(sy * grow * cfg.img_h) + 2)
    cols = min(cfg.img_w, math.ceil(sx * grow * cfg.img_w) + 2)
    return rows, cols


def place_windows(glimpses, z_where, img_h: int, img_w: int, win_h: int, win_w: int):
    """Place glimpses into the frame, computing only a window around each box.

    glimpses (B, K, C, G, G), z_where (B, K, 4) -> values (B, K, C, win_h, win_w) and the flat pixel
    index (B, K, win_h * win_w) of every window pixel in the (H * W) frame. Pixels outside the
    window are exactly zero in the full placement (`spatial_transform(..., inverse=True)`), and the
    window pixels get the same sampling coordinates, so scattering the windows into a zero frame
    reproduces it."""
    B, K, C, G, _ = glimpses.shape
    dev, dt = glimpses.device, glimpses.dtype
    sx, sy, tx, ty = z_where.unbind(-1)                                # (B, K)
    # top-left pixel of the window: the box centre minus the largest possible half-extent
    cx = ((tx + 1) * img_w - 1) / 2
    cy = ((ty + 1) * img_h - 1) / 2
    col0 = torch.floor(cx.detach() - (win_w - 2) / 2).long().clamp(0, img_w - win_w)     # (B, K)
    row0 = torch.floor(cy.detach() - (win_h - 2) / 2).long().clamp(0, img_h - win_h)
    cols = col0[..., None] + torch.arange(win_w, device=dev)           # (B, K, w)
    rows = row0[..., None] + torch.arange(win_h, device=dev)           # (B, K, h)
    xs = _base_coords(img_w, dev, dt)[cols]                            # (B, K, w)
    ys = _base_coords(img_h, dev, dt)[rows]                            # (B, K, h)
    # glimpse coordinates, with the inverse affine of `spatial_transform(..., inverse=True)`
    inv_sx, inv_sy = 1 / (sx + 1e-9), 1 / (sy + 1e-9)
    gx = xs * inv_sx[..., None] + (-tx / (sx + 1e-9))[..., None]
    gy = ys * inv_sy[..., None] + (-ty / (sy + 1e-9))[..., None]
    grid = torch.stack(torch.broadcast_tensors(gx[..., None, :], gy[..., :, None]), dim=-1)  # (B,K,h,w,2)
    values = F.grid_sample(glimpses.reshape(B * K, C, G, G), grid.view(B * K, win_h, win_w, 2),
                           align_corners=False).view(B, K, C, win_h, win_w)
    index = (rows[..., :, None] * img_w + cols[..., None, :]).view(B, K, win_h * win_w)
    return values, index


def scatter_windows(values, index, img_h: int, img_w: int):
    """Sum windows (B, K, C, h, w) with flat pixel index (B, K, h*w) into frames (B, C, H, W)."""
    B, K, C = values.shape[:3]
    src = values.permute(0, 2, 1, 3, 4).reshape(B, C, -1)              # (B, C, K*h*w)
    idx = index.reshape(B, 1, -1).expand(-1, C, -1)
    out = values.new_zeros(B, C, img_h * img_w).scatter_add(2, idx, src)
    return out.view(B, C, img_h, img_w)
