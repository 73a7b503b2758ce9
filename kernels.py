"""Triton kernels for 3x3 convolutions (stride 1, padding 1) with few channels over many images.

The glimpse decoder's convolutions at the glimpse resolution have 8-32 channels and run on ~1,000
glimpses at once; cuDNN is far from the memory bound there (its weight-gradient kernels most of all).
`conv3x3` computes the same convolution as `F.conv2d(x, weight, bias, padding=1)`:

- forward: per image, block of 512 pixels and group of up to 8 output channels, fp32 FMAs over the
  9 taps and the input channels, each thread holding all the group's channels of 4 pixels;
- input gradient: the same kernel on the output gradient with the weight transposed and flipped;
- weight gradient: per image and half of its pixels, one product (C_out x pixels) @ (pixels x
  (9 taps x C_in)) per block of pixels with tl.dot, written apart and summed in a fixed order
  (deterministic, no atomics); its products are TF32 where cuDNN may use TF32
  (torch.backends.cudnn.allow_tf32, PyTorch's default, which these kernels replace), else fp32.
  Its loads run along the pixels, contiguous in memory (the shifted index hh * W + ww is p + shift).

Measured on an H200 (900 glimpses of 64x64, docs/PERF_NOTES.md) they beat cuDNN on the glimpse
decoder's heads (16 -> 8 -> 3 and 16 -> 8 -> 1, the first convolutions also stacked as 16 -> 16),
convolutions with 16 channels or fewer on each side.
The kernels are custom operators (torch.ops.scalor.conv3x3 and its weight gradient), so torch.compile
traces through them. `tests/test_kernels.py` checks the three results against F.conv2d's (Triton's
interpreter on CPU) and the operators' registration (torch.library.opcheck).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: conv3x3 is then never asked for
    triton = None


def available() -> bool:
    return triton is not None


def _pad16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


if triton is not None:

    @triton.jit
    def _fma_channel(acc, src, ok, w_tap, c, P, COUT_G: tl.constexpr):
        # acc (COUT_G, BLOCK) += w_tap[c, :] (outer) x[c] at one tap's shifted pixels src (masked by ok)
        xv = tl.load(src + c * P, mask=ok, other=0.0)                             # (BLOCK,)
        wv = tl.load(w_tap + c * COUT_G + tl.arange(0, COUT_G))                   # (COUT_G,)
        return acc + wv[:, None] * xv[None, :]

    @triton.jit
    def _conv3x3_fwd_fma(x_ptr, w_ptr, b_ptr, y_ptr, H, W,
                         CIN: tl.constexpr, COUT: tl.constexpr, COUT_G: tl.constexpr, GROUPS: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        # x (N, CIN, H, W), w packed (GROUPS, 9, CIN, COUT_G) zero-padded, y (N, COUT, H, W); fp32 FMA.
        # Program (image, block of pixels, group of COUT_G output channels). The accumulator is
        # (COUT_G, BLOCK) with the pixels along threads, so each thread holds every output channel of
        # its pixels: one load of x feeds COUT_G FMAs (a (BLOCK, COUT) accumulator spreads the
        # channels over threads and loads each x COUT_G times: 1.85x slower on the H200).
        P = H * W
        blocks = tl.cdiv(P, BLOCK)
        g = tl.program_id(0) % GROUPS
        n = tl.program_id(0) // (GROUPS * blocks)
        p = (tl.program_id(0) // GROUPS % blocks) * BLOCK + tl.arange(0, BLOCK)
        h, w = p // W, p % W
        o = tl.arange(0, COUT_G)
        x_img = x_ptr + n.to(tl.int64) * CIN * P
        w_group = w_ptr + g * 9 * CIN * COUT_G
        acc = tl.zeros((COUT_G, BLOCK), dtype=tl.float32)
        for k in tl.static_range(9):
            hh = h + (k // 3 - 1)
            ww = w + (k % 3 - 1)
            ok = (p < P) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            src = x_img + hh * W + ww
            w_tap = w_group + k * CIN * COUT_G
            if CIN <= 16:   # unrolled: 1.6x faster than the loop; compiling takes ~10 s at 16, ~60 s at 32
                for c in tl.static_range(CIN):
                    acc = _fma_channel(acc, src, ok, w_tap, c, P, COUT_G)
            else:
                for c in range(CIN):
                    acc = _fma_channel(acc, src, ok, w_tap, c, P, COUT_G)
        oc = g * COUT_G + o                                                      # output channels
        if HAS_BIAS:
            acc += tl.load(b_ptr + oc, mask=oc < COUT, other=0.0)[:, None]
        y_img = y_ptr + n.to(tl.int64) * COUT * P
        tl.store(y_img + oc[:, None] * P + p[None, :], acc, mask=(oc < COUT)[:, None] & (p < P)[None, :])

    @triton.jit
    def _conv3x3_wgrad(x_ptr, g_ptr, out_ptr, H, W, CHUNK,
                       CIN: tl.constexpr, CIN_P: tl.constexpr, COUT: tl.constexpr, COUT_P: tl.constexpr,
                       TF32: tl.constexpr, BLOCK: tl.constexpr):
        # program (n, s) sums pixels [s*CHUNK, (s+1)*CHUNK) of image n. The 9 taps are stacked as the
        # columns (tap, c) of one product, so g is loaded once per block of pixels:
        # out[n, s] = sum_p g[n, :, p] (outer) x[n, c, p + shift_tap]  -> (COUT_P, 16, CIN_P), taps 9..15 zero
        n = tl.program_id(0)
        s = tl.program_id(1)
        P = H * W
        j = tl.arange(0, 16 * CIN_P)
        tap = j // CIN_P
        c = j % CIN_P
        dy = tap // 3 - 1
        dx = tap % 3 - 1
        column_ok = (tap < 9) & (c < CIN)
        o = tl.arange(0, COUT_P)
        x_img = x_ptr + n.to(tl.int64) * CIN * P
        g_img = g_ptr + n.to(tl.int64) * COUT * P
        acc = tl.zeros((COUT_P, 16 * CIN_P), dtype=tl.float32)
        for start in range(s * CHUNK, s * CHUNK + CHUNK, BLOCK):
            p = start + tl.arange(0, BLOCK)
            h, w = p // W, p % W
            gt = tl.load(g_img + o[:, None] * P + p[None, :],
                         mask=(o[:, None] < COUT) & (p < P)[None, :], other=0.0)          # (COUT_P, BLOCK)
            hh = h[None, :] + dy[:, None]
            ww = w[None, :] + dx[:, None]
            ok = column_ok[:, None] & (p < P)[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            xt = tl.load(x_img + c[:, None] * P + p[None, :] + (dy * W + dx)[:, None],
                         mask=ok, other=0.0)                                           # (16 * CIN_P, BLOCK)
            if TF32:
                acc += tl.dot(gt, tl.trans(xt), input_precision="tf32")
            else:
                acc += tl.dot(gt, tl.trans(xt), input_precision="ieee")
        out = out_ptr + (n.to(tl.int64) * tl.num_programs(1) + s) * COUT_P * 16 * CIN_P
        tl.store(out + o[:, None] * (16 * CIN_P) + j[None, :], acc)


def _use_tf32() -> bool:
    return torch.backends.cudnn.allow_tf32


def _forward(x, weight, bias, block: int = 512, num_warps: int = 4):
    """y = F.conv2d(x, weight, bias, padding=1) for weight (COUT, CIN, 3, 3)."""
    N, CIN, H, W = x.shape
    COUT = weight.shape[0]
    COUT_G = min(8, triton.next_power_of_2(COUT))   # output channels per program (registers: 8 x 4 pixels)
    groups = triton.cdiv(COUT, COUT_G)
    packed = x.new_zeros(groups * COUT_G, CIN, 9)                    # (out, in, tap), zero-padded
    packed[:COUT] = weight.reshape(COUT, CIN, 9)
    packed = packed.view(groups, COUT_G, CIN, 9).permute(0, 3, 2, 1).contiguous()   # (group, tap, in, out)
    y = x.new_empty(N, COUT, H, W)
    grid = (N * triton.cdiv(H * W, block) * groups,)
    _conv3x3_fwd_fma[grid](x, packed, bias if bias is not None else packed, y, H, W, CIN, COUT, COUT_G, groups,
                           bias is not None, block, num_warps=num_warps)
    return y


def _weight_grad(x, grad_y, block: int = 32, splits: int = 2):
    N, CIN, H, W = x.shape
    COUT = grad_y.shape[1]
    # columns (tap, c): 16 x CIN_P >= 16 as tl.dot needs; padding 8 input channels to 16 cost 1.7x
    CIN_P, COUT_P = triton.next_power_of_2(CIN), _pad16(COUT)
    splits = min(splits, triton.cdiv(H * W, block))
    chunk = triton.cdiv(triton.cdiv(H * W, splits), block) * block
    partial = x.new_empty(N, splits, COUT_P, 16, CIN_P)
    _conv3x3_wgrad[(N, splits)](x, grad_y, partial, H, W, chunk, CIN, CIN_P, COUT, COUT_P, _use_tf32(), block)
    grad = partial.sum((0, 1))[:COUT, :9, :CIN]                     # (COUT, 9, CIN), a fixed order
    return grad.permute(0, 2, 1).reshape(COUT, CIN, 3, 3)


# The kernels are custom operators, so torch.compile traces through them (no graph break): inductor
# fuses the CELU and GroupNorm around them and the glimpse decoder compiles as one graph.

@torch.library.custom_op("scalor::conv3x3", mutates_args=(), schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
def _conv3x3_op(x, weight, bias):
    return _forward(x.contiguous(), weight.contiguous(), bias)


@_conv3x3_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0], x.shape[2], x.shape[3])


@torch.library.custom_op("scalor::conv3x3_weight_grad", mutates_args=(), schema="(Tensor x, Tensor grad_y) -> Tensor")
def _weight_grad_op(x, grad_y):
    return _weight_grad(x.contiguous(), grad_y.contiguous()).contiguous()


@_weight_grad_op.register_fake
def _(x, grad_y):
    return x.new_empty(grad_y.shape[1], x.shape[1], 3, 3)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:   # correlation with the transposed, flipped kernel
        grad_x = _conv3x3_op(grad_y, weight.transpose(0, 1).flip(2, 3), None)
    if ctx.needs_input_grad[1]:
        grad_w = _weight_grad_op(x, grad_y)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_y.sum((0, 2, 3))
    return grad_x, grad_w, grad_b


_conv3x3_op.register_autograd(_backward, setup_context=_setup_context)


def conv3x3(x, weight, bias=None):
    """F.conv2d(x, weight, bias, stride=1, padding=1) by the Triton kernels (x fp32, NCHW): the
    custom operator torch.ops.scalor.conv3x3, differentiable in x, weight and bias."""
    return _conv3x3_op(x, weight, bias)
