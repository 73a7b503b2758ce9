"""Building blocks of SCALOR: encoders, decoders, the ConvLSTM, sampling and spatial transforms, and the
per-frame parameter aliases that sum each parameter's gradients over the frames in one pass.

Every layer stack is built from the configured sizes. At image 64/128, grid 4/8 and glimpse 32/64
the stacks equal the reference implementation's (same layers, widths, kernels, GroupNorm groups;
`tests/test_params.py` pins the parameter counts); other sizes follow the same rules.

Spatial transforms use the reference's convention (`F.affine_grid`/`F.grid_sample`,
align_corners=False): z_where = (sx, sy, tx, ty); a glimpse covers image coordinates
x = sx * u + tx, y = sy * v + ty for glimpse coordinates u, v in [-1, 1].
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import kernels
from common import Config

# GroupNorm groups per channel count, as the reference uses them.
_GROUPS = {8: 4, 16: 4, 32: 8, 64: 8, 128: 16, 256: 16}


def _groups(channels: int) -> int:
    return _GROUPS.get(channels, math.gcd(channels, 8))


def conv_block(cin: int, cout: int, kernel, stride: int = 1, padding=0, groups: int | None = None,
               triton: bool = False):
    """Conv2d -> CELU -> GroupNorm, the reference's unit (the conv as `make_conv` picks it)."""
    return [make_conv(cin, cout, kernel, stride, padding, triton), nn.CELU(),
            nn.GroupNorm(groups or _groups(cout), cout)]


def make_conv(cin: int, cout: int, kernel, stride: int = 1, padding=0, triton: bool = False) -> nn.Conv2d:
    """nn.Conv2d(cin, cout, kernel, stride, padding); with `triton` (cfg.triton_convs), for the
    shapes where the Triton kernels beat cuDNN -- 3x3 and 4x4 of stride 2, padding 1, at most 16
    channels a side -- its twin Conv3x3 or Conv4x4Stride2: same parameters, same state_dict."""
    if triton and max(cin, cout) <= 16 and padding == 1:
        if (kernel, stride) == (3, 1):
            return Conv3x3(cin, cout)
        if (kernel, stride) == (4, 2):
            return Conv4x4Stride2(cin, cout)
    return nn.Conv2d(cin, cout, kernel, stride, padding)


def _triton_fits(x, weight, min_pixels: int = 0) -> bool:
    """Whether the Triton convolutions of `kernels` take this input: fp32 CUDA tensors of at least
    `min_pixels` pixels, outside autocast, with Triton installed."""
    return (x.is_cuda and x.dtype == weight.dtype == torch.float32 and x.shape[-2] * x.shape[-1] >= min_pixels
            and kernels.available() and not torch.is_autocast_enabled("cuda"))


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(cin, cout, 3, padding=1) -- same parameters, same state_dict -- that runs the Triton
    kernels of `kernels.conv3x3` on fp32 CUDA inputs of at least 32x32 pixels outside autocast (made
    by `make_conv` for 16 channels or fewer a side, where cuDNN is slow: the glimpse decoder's heads,
    the background decoder's last layers); cuDNN everywhere else. `_conv_forward(x, weight, bias)`
    makes the same choice for other weights (stacked heads). `dot` (set by `use_dot_convs`): the
    forward and input gradient by tensor-core products where `kernels.dot_pays`, else FMAs."""

    MIN_PIXELS = 32 * 32
    dot = False

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, 1, 1)

    def _conv_forward(self, x, weight, bias):
        if _triton_fits(x, weight, self.MIN_PIXELS):
            return kernels.conv3x3(x, weight, bias, self.dot)
        return super()._conv_forward(x, weight, bias)


class Conv4x4Stride2(nn.Conv2d):
    """nn.Conv2d(cin, cout, 4, stride=2, padding=1) -- same parameters, same state_dict -- that runs
    the Triton kernels of `kernels.conv4x4s2` on fp32 CUDA inputs outside autocast (made by
    `make_conv` for the encoders' first layers, <= 4 -> 16 channels: cuDNN takes ~1 ms over the
    glimpse encoder's backward per 1,280 glimpses, the Triton kernels 0.5); cuDNN everywhere else.
    `dot` (set by `use_dot_convs`): the forward by tensor-core products where `kernels.dot_pays`."""

    dot = False

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 4, 2, 1)

    def _conv_forward(self, x, weight, bias):
        if _triton_fits(x, weight):
            return kernels.conv4x4s2(x, weight, bias, self.dot)
        return super()._conv_forward(x, weight, bias)


def use_dot_convs(model: nn.Module) -> int:
    """Let every Conv3x3 and Conv4x4Stride2 of `model` run its Triton forward (and, for 3x3, its
    input gradient) as one tensor-core product per tap (`kernels._conv_fwd_dot`; TF32 where cuDNN
    may use it, as cuDNN's own convolutions in fp32 mode) instead of fp32 FMAs, on the shapes where
    that pays (`kernels.dot_pays`): cfg.dot_convs, on by default. Parameters and state_dict
    unchanged. Returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, (Conv3x3, Conv4x4Stride2)):
            m.dot = True
            count += 1
    return count


class ConvNHWCWeightGrad(nn.Conv2d):
    """nn.Conv2d -- 3x3 of stride 1 or 4x4 of stride 2, padding 1; same parameters, same state_dict
    -- whose weight gradient runs in the channels-last Triton kernel (`kernels.conv_nhwc_weight_grad`)
    on fp32 CUDA inputs outside autocast; its forward and input gradient stay cuDNN's. Put in place
    by `use_nhwc_weight_grad` (cfg.nhwc_weight_grad, on by default)."""

    def _conv_forward(self, x, weight, bias):
        if _triton_fits(x, weight):
            return kernels.conv_nhwc_weight_grad(x, weight, bias, self.stride[0])
        return super()._conv_forward(x, weight, bias)


def use_nhwc_weight_grad(model: nn.Module) -> int:
    """Turn every plain nn.Conv2d of `model` that is 3x3 of stride 1 or 4x4 of stride 2 (padding 1)
    with 17-32 channels on its wider side into a ConvNHWCWeightGrad (the same module, parameters
    untouched). On an H200 the kernel beats cuDNN's weight gradient over the glimpses (32 -> 32 3x3
    at 32x32, 900 glimpses: 427 against 780 us) and is slower at 64 channels; over the 20 frames of
    a batch it is slower in isolation (102-120 against 60-64 us), yet the uncompiled step measured
    fastest with these layers swapped too (358.0 / 358.5 ms against 359.0 / 359.3 with only the
    layers over 2^16 output pixels or more, and 364.2 with none). Returns how many."""
    count = 0
    for m in model.modules():
        if type(m) is not nn.Conv2d:
            continue
        shape_ok = (m.kernel_size, m.stride) in (((3, 3), (1, 1)), ((4, 4), (2, 2)))
        if shape_ok and m.padding == (1, 1) and m.groups == 1 and m.dilation == (1, 1) \
                and 16 < max(m.in_channels, m.out_channels) <= 32:
            m.__class__ = ConvNHWCWeightGrad     # a subclass without state of its own: nothing else changes
            count += 1
    return count


def upsample_block(cin: int, cout: int, factor: int):
    """1x1 conv to cout*factor^2 -> PixelShuffle(factor) -> CELU -> GroupNorm."""
    return [Conv1x1BeforeShuffle(cin, cout * factor * factor, 1), nn.PixelShuffle(factor), nn.CELU(),
            nn.GroupNorm(_groups(cout), cout)]


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity whose backward hands the gradient on in channels-last layout (same values)."""

    @staticmethod
    def forward(x):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=torch.channels_last)


class Conv1x1BeforeShuffle(nn.Conv2d):
    """nn.Conv2d(cin, cout, 1) feeding a PixelShuffle -- same parameters, same state_dict, same
    numbers. Inside torch.compile on CUDA, inductor runs the convolutions in channels-last, and
    cuDNN's backward then wants its output gradient in channels-last too; the pixel shuffle's
    backward produces it in NCHW, so cuDNN copied it (the glimpse decoder's last two 1x1 convs: 900
    glimpses x (128, 16, 16) and (64, 32, 32), 4.3 ms a step in a profile). Marking the gradient
    channels-last in the traced graph lets inductor write it so in the kernel that computes it."""

    def forward(self, x):
        y = super().forward(x)
        if y.is_cuda and torch.compiler.is_compiling():
            y = _ChannelsLastGrad.apply(y)
        return y


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
            layers += conv_block(cin, cout, 4, 2, 1, triton=cfg.triton_convs)
            if i <= max(2, num_down - 2):
                layers += conv_block(cout, cout, 3, 1, 1, triton=cfg.triton_convs)
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
            layers += conv_block(cin, cout, 4, 2, 1, triton=cfg.triton_convs)
            cin = cout
        if cin < 128:
            layers += conv_block(cin, cin, 3, 1, 1, triton=cfg.triton_convs)
        layers += conv_block(cin, cfg.z_what_enc_dim, 4)
        self.enc_cnn = nn.Sequential(*layers)
        self.enc_what = nn.Linear(cfg.z_what_enc_dim, 2 * cfg.z_what_dim)

    def forward(self, glimpses):               # (N, 3, G, G)
        mean, std_raw = self.enc_what(self.enc_cnn(glimpses).flatten(1)).chunk(2, -1)
        return mean, std_raw                   # (N, z_what_dim) each


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
                layers += conv_block(c, c, 3, 1, 1, triton=cfg.triton_convs)
            cin = c
        if G < 64:
            layers += conv_block(16, 16, 3, 1, 1, triton=cfg.triton_convs)
        self.dec = nn.Sequential(*layers)
        # the heads run at the glimpse resolution with <= 16 channels: Triton kernels there
        head = lambda i, o: make_conv(i, o, 3, 1, 1, cfg.triton_convs)   # noqa: E731
        if min(cfg.img_h, cfg.img_w) <= 64:
            self.dec_o = head(16, 3)
            self.dec_alpha = head(16, 1)
        else:
            self.dec_o = nn.Sequential(*conv_block(16, 8, 3, 1, 1, triton=cfg.triton_convs), head(8, 3))
            self.dec_alpha = nn.Sequential(*conv_block(16, 8, 3, 1, 1, triton=cfg.triton_convs), head(8, 1))

    def forward(self, z_what):                 # (N, z_what_dim) -> o (N, 3, G, G), alpha (N, 1, G, G)
        feat = self.dec(z_what.view(*z_what.shape, 1, 1))
        o, alpha = self._both_heads(feat)
        return torch.sigmoid(o), torch.sigmoid(alpha)

    @staticmethod
    def _first_and_rest(head):                 # head -> its first conv, the rest (None for a one-conv head)
        return (head[0], head[1:]) if isinstance(head, nn.Sequential) else (head, None)

    def _both_heads(self, feat):               # trunk (N, 16, G, G) -> dec_o(feat), dec_alpha(feat)
        """The two heads with their first convolutions run as one (16 -> 8 + 8, or 16 -> 3 + 1: one
        pass over the features, one weight gradient) and their GroupNorms as one (same groups of
        channels): the numbers of dec_o(feat), dec_alpha(feat)."""
        (first_o, rest_o), (first_a, rest_a) = self._first_and_rest(self.dec_o), self._first_and_rest(self.dec_alpha)
        h = first_o._conv_forward(feat, torch.cat((first_o.weight, first_a.weight)),
                                  torch.cat((first_o.bias, first_a.bias)))             # (N, Co + Ca, G, G)
        if rest_o is None:                     # one conv each
            return h.split((first_o.out_channels, first_a.out_channels), 1)
        (celu, norm_o, last_o), (_, norm_a, last_a) = rest_o, rest_a                   # CELU -> GN -> conv
        h = F.group_norm(celu(h), norm_o.num_groups + norm_a.num_groups, torch.cat((norm_o.weight, norm_a.weight)),
                         torch.cat((norm_o.bias, norm_a.bias)), norm_o.eps)
        h_o, h_a = h.split((first_o.out_channels, first_a.out_channels), 1)
        return last_o(h_o), last_a(h_a)

    def features_and_alpha(self, z_what):      # (N, z_what_dim) -> trunk (N, 16, G, G), alpha (N, 1, G, G)
        """The trunk's features and alpha, without the appearance head (rejection, alpha maps);
        `appearance(features)` completes the decode."""
        feat = self.dec(z_what.view(*z_what.shape, 1, 1))
        return feat, torch.sigmoid(self.dec_alpha(feat))

    def appearance(self, feat):                # trunk (N, 16, G, G) -> o (N, 3, G, G)
        return torch.sigmoid(self.dec_o(feat))

    def appearance_of_rows(self, feats, rows):  # trunks (N1, 16, G, G), (N2, ...), rows (M,) -> o (M, 3, G, G)
        """appearance(torch.cat(feats)[rows]): with the Triton kernels the first convolution reads the
        rows where they are (no concatenation, no gather), else the features are gathered first."""
        first, rest = self._first_and_rest(self.dec_o)
        if isinstance(first, Conv3x3) and _triton_fits(feats[0], first.weight, Conv3x3.MIN_PIXELS):
            h = kernels.conv3x3_rows(feats[0], feats[1], rows, first.weight, first.bias, first.dot)
        else:
            h = first(torch.cat(feats)[rows])
        return torch.sigmoid(h if rest is None else rest(h))


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
            layers += conv_block(cin, cout, 4, 2, 1, triton=cfg.triton_convs)
            if 1 <= i <= max(2, num_down - 2):
                layers += conv_block(cout, cout, 3, 1, 1, triton=cfg.triton_convs)
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
            layers += conv_block(cin, cout, 4, 2, 1, triton=cfg.triton_convs)
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
        layers = conv_block(cfg.bg_what_dim, 256, 1)
        cin = 256
        for f, c in zip(factors, widths):
            layers += upsample_block(cin, c, f)
            layers += conv_block(c, c, 3, 1, 1, triton=cfg.triton_convs)
            cin = c
        self.dec = nn.Sequential(*layers)
        self.bg_dec = nn.Sequential(*conv_block(16, 16, 3, 1, 1, triton=cfg.triton_convs),
                                    make_conv(16, 3, 3, 1, 1, cfg.triton_convs))

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
            layers += conv_block(cin, 64, 5, 1, 2)
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


_AUTOCAST_DEVICES = ("cuda", "cpu")


class _GivenForward(torch.autograd.Function):
    """Outputs of `given(*inputs)`; backward recomputes `full(*inputs)` with gradient, under the
    forward's autocast state, and backpropagates through it into the inputs and `params`. The first
    output is the differentiable one."""

    @staticmethod
    def forward(ctx, given, full, num_inputs, *args):
        ctx.full, ctx.num_inputs = full, num_inputs
        ctx.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES]
        ctx.autocast_cache = torch.is_autocast_cache_enabled()
        ctx.save_for_backward(*args)
        outputs = given(*args[:num_inputs])
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *unused):
        args = ctx.saved_tensors
        n = ctx.num_inputs
        needs = ctx.needs_input_grad[3:]
        inputs = [x.detach().requires_grad_(r) for x, r in zip(args[:n], needs[:n])]
        targets = [x for x, r in zip(inputs + list(args[n:]), needs) if r]
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            for device, enabled, dtype in ctx.autocast:   # as torch.utils.checkpoint restores it
                if enabled != torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            # the cast cache too (global): a compiled `full` then meets the forward's state, no recompile
            stack.callback(torch.set_autocast_cache_enabled, torch.is_autocast_cache_enabled())
            torch.set_autocast_cache_enabled(ctx.autocast_cache)
            out = ctx.full(*inputs)[0]
        grads = iter(torch.autograd.grad(out, targets, grad_out, allow_unused=True))
        return (None, None, None, *(next(grads) if r else None for r in needs))


def given_forward(given, full, inputs, params):
    """given(*inputs), with the gradient of full(*inputs) (which must compute the same values; only
    its first output is differentiable) recomputed in backward: activation recomputation whose
    forward reuses results computed already. `params`: the parameters `full` uses."""
    params = [p for p in params if p.requires_grad]
    if not torch.is_grad_enabled() or not (params or any(x.requires_grad for x in inputs)):
        return given(*inputs)
    return _GivenForward.apply(given, full, len(inputs), *inputs, *params)


def maybe_checkpoint(enabled: bool, fn, *args):
    """fn(*args), recomputing its activations in backward when `enabled` and gradients are on.

    The functions checkpointed here draw no random numbers, so the recomputation is exact."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


# ------------------------------------------------------------------------------------------------
# Per-frame parameter aliases: each parameter's gradients from the frames summed at once
# ------------------------------------------------------------------------------------------------

class _FanOut(torch.autograd.Function):
    """`copies` aliases of each of P tensors (copy c of tensor i at c * P + i). Backward sums each
    tensor's gradients over the copies with multi-tensor additions (about `copies` launches in all),
    where autograd would add the gradient of every use one kernel at a time. Copies are summed from
    the last to the first, the order in which backward produces them."""

    @staticmethod
    def forward(ctx, copies: int, *tensors):
        ctx.copies, ctx.count = copies, len(tensors)
        ctx.set_materialize_grads(False)
        return tuple(t.view_as(t) for _ in range(copies) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        P = ctx.count
        sums = [None] * P
        for c in reversed(range(ctx.copies)):
            add = []
            for i, g in enumerate(grads[c * P:(c + 1) * P]):
                if g is None:
                    continue
                if sums[i] is None:
                    sums[i] = g
                else:
                    add.append(i)
            if add:
                added = torch._foreach_add([sums[i] for i in add], [grads[c * P + i] for i in add])
                for i, s in zip(add, added):
                    sums[i] = s
        return (None, *sums)


def _trainable_slots(module: nn.Module) -> list:
    """(submodule, name) of each parameter of `module` that requires a gradient."""
    return [(m, name) for m in module.modules() for name, p in m._parameters.items()
            if p is not None and p.requires_grad]


def _put(slots: list, tensors) -> None:
    """Put `tensors` in place of the parameters at `slots`, in order."""
    for (m, name), t in zip(slots, tensors):
        m._parameters[name] = t


class FrameParameters:
    """The parameters of `model` (its modules' `_parameters` entries) as T sets of aliases, one a
    frame, put in place frame by frame (`use(t)`) and restored by `restore()`: the frames' gradients
    of each parameter then meet in one autograd node (_FanOut) that sums them with multi-tensor
    additions -- at the default config ~2,700 single additions a step fewer (cfg.fused_param_grads).
    The values are the parameters' own; only the order of the float sums changes. Frozen parameters
    stay as they are.

    Recomputation in backward runs after `restore()`: a function recomputed there takes its frame's
    aliases with `pinned(module, fn)`."""

    def __init__(self, model: nn.Module, frames: int):
        self.slots = _trainable_slots(model)
        self.originals = [m._parameters[name] for m, name in self.slots]
        self.aliases = _FanOut.apply(frames, *self.originals)     # (frames * P) tensors

    def use(self, t: int) -> None:
        P = len(self.slots)
        _put(self.slots, self.aliases[t * P:(t + 1) * P])

    def restore(self) -> None:
        _put(self.slots, self.originals)


def pinned(module: nn.Module, fn):
    """fn, run with the parameter tensors `module` holds now (a frame's aliases, see FrameParameters)
    put back in place for the call: a recomputation in backward then uses the tensors whose
    gradients it must return. fn itself without gradients (nothing is recomputed) and inside
    torch.compile (recomputation is the graph's)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return fn
    slots = _trainable_slots(module)
    tensors = [m._parameters[name] for m, name in slots]

    def call(*args):
        before = [m._parameters[name] for m, name in slots]
        _put(slots, tensors)
        try:
            return fn(*args)
        finally:
            _put(slots, before)
    return call
