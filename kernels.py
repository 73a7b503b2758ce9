"""Triton kernels for small convolutions (padding 1) with few channels over many images.

The glimpse networks' convolutions at the glimpse resolution have 1-16 channels a side and run on
~1,000 glimpses at once; cuDNN is far from the memory bound there (its weight-gradient kernels most
of all). `conv3x3` computes F.conv2d(x, weight, bias, padding=1) for 3x3 weights, `conv4x4s2`
F.conv2d(x, weight, bias, stride=2, padding=1) for 4x4 weights:

- forward (one kernel for both): per image, block of 512 output pixels and group of up to 8 output
  channels, fp32 FMAs over the taps and the input channels, each thread holding all the group's
  channels of 4 pixels;
- forward with `dot=True` (SpeedOptions.dot_convs, on by default), where `dot_pays` (16 channels or more a
  side, or 16 input channels over the few pixels of the frames; only where products may round to
  TF32, i.e. cuDNN may use TF32: PyTorch's default and our `fp32` precision, not `fp32-strict`):
  per image and block of 256 output pixels, all output channels, one tensor-core product
  (C_out x C_in) @ (C_in x pixels) per tap, channels zero-padded to 16 (faster than the FMA kernel
  on such shapes, e.g. the stacked heads' 16 -> 16 at 64x64; docs/PERF_NOTES.md has the measurements);
- input gradient: for 3x3 the forward kernel on the output gradient with the weight transposed and
  flipped; for 4x4 of stride 2 a kernel per parity class of input pixels (each receives from 2x2
  outputs through 2x2 of the taps);
- weight gradient: per image and part of its output pixels (halves of a glimpse, smaller parts of
  a few large frames), one product (C_out x pixels) @ (pixels x (taps x C_in)) per block of
  pixels with tl.dot, written apart and summed in a fixed order (deterministic, no atomics); its
  products are TF32 where cuDNN may use TF32
  (torch.backends.cudnn.allow_tf32, PyTorch's default, which these kernels replace), else fp32.
  For 3x3 its loads run along the pixels, contiguous in memory (the shifted index hh * W + ww is
  p + shift).

The 3x3 kernels are faster than cuDNN on the glimpse decoder's heads (16 -> 8 -> 3 and 16 -> 8 -> 1,
the first convolutions also stacked as 16 -> 16); the 4x4 stride-2 kernels on the glimpse encoder's
first layer (3 -> 16, forward and backward); docs/PERF_NOTES.md has the measurements.
`fast.use_triton_convs` puts them in every such layer of at most 16 channels a side. The kernels are custom operators (torch.ops.scalor.conv3x3, conv4x4s2,
their gradients), so torch.compile traces through them. `tests/test_kernels.py` checks every result against F.conv2d's
(Triton's interpreter on CPU) and the operators' registration (torch.library.opcheck).

`_weight_grad_nhwc` is the weight gradient of a 3x3 (stride 1) or 4x4 (stride 2) convolution,
made for channels-last tensors (it reads any strides in place) with 16-64 channels a side (the glimpse decoder's 32 -> 32 trunk layer at
32x32, which inductor already runs channels-last): chunks of output pixels x row offsets, one
(C_out x pixels) @ (pixels x C_in) product per tap (TF32 where cuDNN may use it). It is faster
than cuDNN over the glimpses at up to 32 channels (32 -> 32 at 32x32, 4x4/2 16 -> 32), on NCHW and
channels-last inputs, and slower over the few large frames and at 64 channels of 16x16
(`python bench.py --weight-grads` compares them; docs/PERF_NOTES.md has the measurements). `conv_nhwc_weight_grad` is
F.conv2d with it as the weight gradient (forward and input gradient stay cuDNN's, or inductor's
choice when compiled); `fast.use_nhwc_weight_grad` (SpeedOptions.nhwc_weight_grad, on by default) puts
it in the layers of 17-32 channels.
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
    def _dot(a, b, TF32: tl.constexpr):
        # a @ b in TF32 where cuDNN may use it (torch.backends.cudnn.allow_tf32), else in fp32
        if TF32:
            return tl.dot(a, b, input_precision="tf32")
        else:
            return tl.dot(a, b, input_precision="ieee")

    @triton.jit
    def _source_image(x_ptr, x2_ptr, rows_ptr, n, N1, XN, X2N, HAS_ROWS: tl.constexpr):
        # image n of x (images XN apart); with HAS_ROWS image rows[n] of the concatenation [x (N1
        # images); x2 (X2N apart)]: the forward kernels' gather, fused into their loads
        if HAS_ROWS:
            r = tl.load(rows_ptr + n).to(tl.int64)
            if r < N1:
                img = x_ptr + r * XN
            else:
                img = x2_ptr + (r - N1) * X2N
        else:
            img = x_ptr + n.to(tl.int64) * XN
        return img

    @triton.jit
    def _conv_fwd_fma(x_ptr, x2_ptr, rows_ptr, N1, XN, X2N, w_ptr, b_ptr, y_ptr, H, W, HO, WO,
                      CIN: tl.constexpr, COUT: tl.constexpr, COUT_G: tl.constexpr, GROUPS: tl.constexpr,
                      KSIZE: tl.constexpr, STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROWS: tl.constexpr,
                      BLOCK: tl.constexpr):
        # x (N, CIN, H, W) with images XN apart (planes contiguous: a channel slice of a wider tensor
        # is read in place), w packed (GROUPS, KSIZE^2, CIN, COUT_G) zero-padded, y (N, COUT, HO, WO);
        # padding 1; fp32 FMA. With HAS_ROWS, output image n is computed from image rows[n] of the
        # concatenation [x (N1 images); x2] (a gather fused into the loads). Program (image, block of output pixels, group of COUT_G output
        # channels). The accumulator is (COUT_G, BLOCK) with the pixels along threads, so each thread
        # holds every output channel of its pixels: one load of x feeds COUT_G FMAs (a (BLOCK, COUT)
        # accumulator spreads the channels over threads and loads each x COUT_G times: slower).
        if STRIDE == 1:   # 3x3, padding 1: the output is the input's size (the same code as for 3x3 alone)
            HO = H
            WO = W
        P = H * W
        PO = HO * WO
        blocks = tl.cdiv(PO, BLOCK)
        g = tl.program_id(0) % GROUPS
        n = tl.program_id(0) // (GROUPS * blocks)
        p = (tl.program_id(0) // GROUPS % blocks) * BLOCK + tl.arange(0, BLOCK)
        h, w = p // WO, p % WO
        o = tl.arange(0, COUT_G)
        x_img = _source_image(x_ptr, x2_ptr, rows_ptr, n, N1, XN, X2N, HAS_ROWS)
        w_group = w_ptr + g * KSIZE * KSIZE * CIN * COUT_G
        acc = tl.zeros((COUT_G, BLOCK), dtype=tl.float32)
        for k in tl.static_range(KSIZE * KSIZE):
            hh = STRIDE * h + (k // KSIZE - 1)
            ww = STRIDE * w + (k % KSIZE - 1)
            ok = (p < PO) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            src = x_img + hh * W + ww
            w_tap = w_group + k * CIN * COUT_G
            if CIN <= 16:   # unrolled: faster than the loop, but its compile time grows fast with CIN
                for c in tl.static_range(CIN):
                    acc = _fma_channel(acc, src, ok, w_tap, c, P, COUT_G)
            else:
                for c in range(CIN):
                    acc = _fma_channel(acc, src, ok, w_tap, c, P, COUT_G)
        oc = g * COUT_G + o                                                      # output channels
        if HAS_BIAS:
            acc += tl.load(b_ptr + oc, mask=oc < COUT, other=0.0)[:, None]
        y_img = y_ptr + n.to(tl.int64) * COUT * PO
        tl.store(y_img + oc[:, None] * PO + p[None, :], acc, mask=(oc < COUT)[:, None] & (p < PO)[None, :])

    @triton.jit
    def _conv_fwd_dot(x_ptr, x2_ptr, rows_ptr, N1, XN, X2N, w_ptr, b_ptr, y_ptr, H, W, HO, WO,
                      CIN: tl.constexpr, CIN_P: tl.constexpr, COUT: tl.constexpr, COUT_P: tl.constexpr,
                      KSIZE: tl.constexpr, STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROWS: tl.constexpr,
                      TF32: tl.constexpr, BLOCK: tl.constexpr):
        # The same convolution as _conv_fwd_fma (same x, x2, rows, y), with one product per tap on
        # the tensor cores instead of FMAs: acc (COUT_P, BLOCK) += w_tap (COUT_P, CIN_P) @ x at the
        # tap's shifted pixels (CIN_P, BLOCK); w (COUT, CIN, KSIZE, KSIZE) contiguous, read as is (no
        # packing kernel: its few KB stay in the caches), padding by masked loads; channels
        # padded to 16 or a power of two. Program (image, block of output pixels), all channels.
        if STRIDE == 1:
            HO = H
            WO = W
        P = H * W
        PO = HO * WO
        blocks = tl.cdiv(PO, BLOCK)
        n = tl.program_id(0) // blocks
        p = (tl.program_id(0) % blocks) * BLOCK + tl.arange(0, BLOCK)
        h, w = p // WO, p % WO
        c = tl.arange(0, CIN_P)
        o = tl.arange(0, COUT_P)
        x_img = _source_image(x_ptr, x2_ptr, rows_ptr, n, N1, XN, X2N, HAS_ROWS)
        acc = tl.zeros((COUT_P, BLOCK), dtype=tl.float32)
        for k in tl.static_range(KSIZE * KSIZE):
            hh = STRIDE * h + (k // KSIZE - 1)
            ww = STRIDE * w + (k % KSIZE - 1)
            ok = (p < PO) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            xt = tl.load(x_img + c[:, None] * P + (hh * W + ww)[None, :], mask=(c < CIN)[:, None] & ok[None, :],
                         other=0.0)                                              # (CIN_P, BLOCK)
            wt = tl.load(w_ptr + (o[:, None] * CIN + c[None, :]) * (KSIZE * KSIZE) + k,
                         mask=(o < COUT)[:, None] & (c < CIN)[None, :], other=0.0)      # (COUT_P, CIN_P)
            acc += _dot(wt, xt, TF32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + o, mask=o < COUT, other=0.0)[:, None]
        y_img = y_ptr + n.to(tl.int64) * COUT * PO
        tl.store(y_img + o[:, None] * PO + p[None, :], acc, mask=(o < COUT)[:, None] & (p < PO)[None, :])

    @triton.jit
    def _conv4x4s2_input_grad(g_ptr, w_ptr, dx_ptr, H, W, HO, WO,
                              COUT: tl.constexpr, CIN: tl.constexpr, CIN_G: tl.constexpr, GROUPS: tl.constexpr,
                              BLOCK: tl.constexpr):
        # Input gradient of a 4x4 convolution of stride 2, padding 1: g (N, COUT, HO, WO), w packed
        # (GROUPS, 16 taps, COUT, CIN_G), dx (N, CIN, H, W). Pixel (i, j) = (2a + pi, 2b + pj) receives
        # from the 2x2 outputs (a + pi - th, b + pj - tw) through taps (1 - pi + 2 th, 1 - pj + 2 tw),
        # th, tw in {0, 1}: a program takes one parity class (pi, pj), a block of its pixels and a
        # group of CIN_G input channels.
        HA = (H + 1) // 2
        WB = (W + 1) // 2
        blocks = tl.cdiv(HA * WB, BLOCK)
        g = tl.program_id(0) % GROUPS
        rest = tl.program_id(0) // GROUPS
        q = (rest % blocks) * BLOCK + tl.arange(0, BLOCK)
        parity = rest // blocks % 4
        n = rest // blocks // 4
        pi = parity // 2
        pj = parity % 2
        a, b = q // WB, q % WB
        i, j = 2 * a + pi, 2 * b + pj
        valid = (q < HA * WB) & (i < H) & (j < W)
        c = tl.arange(0, CIN_G)
        g_img = g_ptr + n.to(tl.int64) * COUT * HO * WO
        w_group = w_ptr + g * 16 * COUT * CIN_G
        acc = tl.zeros((CIN_G, BLOCK), dtype=tl.float32)
        for t in tl.static_range(4):
            uh = a + pi - t // 2
            vw = b + pj - t % 2
            ok = valid & (uh >= 0) & (uh < HO) & (vw >= 0) & (vw < WO)
            w_tap = w_group + ((1 - pi + 2 * (t // 2)) * 4 + (1 - pj + 2 * (t % 2))) * COUT * CIN_G
            src = g_img + uh * WO + vw
            for o in tl.static_range(COUT):
                acc = _fma_channel(acc, src, ok, w_tap, o, HO * WO, CIN_G)
        cc = g * CIN_G + c                                                       # input channels
        dx_img = dx_ptr + n.to(tl.int64) * CIN * H * W
        tl.store(dx_img + cc[:, None] * (H * W) + (i * W + j)[None, :], acc, mask=(cc < CIN)[:, None] & valid[None, :])

    @triton.jit
    def _conv_wgrad(x_ptr, g_ptr, out_ptr, XN, H, W, HO, WO, CHUNK,
                    CIN: tl.constexpr, CIN_P: tl.constexpr, COUT: tl.constexpr, COUT_P: tl.constexpr,
                    KSIZE: tl.constexpr, STRIDE: tl.constexpr, TF32: tl.constexpr, BLOCK: tl.constexpr):
        # program (n, s) sums output pixels [s*CHUNK, (s+1)*CHUNK) of image n (x's images XN apart). The KSIZE^2 <= 16 taps are
        # stacked as the columns (tap, c) of one product, so g is loaded once per block of pixels:
        # out[n, s] = sum_p g[n, :, p] (outer) x[n, c, at p's tap]  -> (COUT_P, 16, CIN_P), unused taps zero
        n = tl.program_id(0)
        s = tl.program_id(1)
        if STRIDE == 1:   # 3x3, padding 1: the output is the input's size (the same code as for 3x3 alone)
            HO = H
            WO = W
        P = H * W
        PO = HO * WO
        j = tl.arange(0, 16 * CIN_P)
        tap = j // CIN_P
        c = j % CIN_P
        dy = tap // KSIZE - 1
        dx = tap % KSIZE - 1
        column_ok = (tap < KSIZE * KSIZE) & (c < CIN)
        o = tl.arange(0, COUT_P)
        x_img = x_ptr + n.to(tl.int64) * XN
        g_img = g_ptr + n.to(tl.int64) * COUT * PO
        acc = tl.zeros((COUT_P, 16 * CIN_P), dtype=tl.float32)
        for start in range(s * CHUNK, s * CHUNK + CHUNK, BLOCK):
            p = start + tl.arange(0, BLOCK)
            h, w = p // WO, p % WO
            gt = tl.load(g_img + o[:, None] * PO + p[None, :],
                         mask=(o[:, None] < COUT) & (p < PO)[None, :], other=0.0)         # (COUT_P, BLOCK)
            hh = STRIDE * h[None, :] + dy[:, None]
            ww = STRIDE * w[None, :] + dx[:, None]
            ok = column_ok[:, None] & (p < PO)[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            if STRIDE == 1:   # hh * W + ww is p + shift: loads contiguous along the pixels
                xt = tl.load(x_img + c[:, None] * P + p[None, :] + (dy * W + dx)[:, None],
                             mask=ok, other=0.0)                                       # (16 * CIN_P, BLOCK)
            else:
                xt = tl.load(x_img + c[:, None] * P + hh * W + ww, mask=ok, other=0.0)
            acc += _dot(gt, tl.trans(xt), TF32)
        out = out_ptr + (n.to(tl.int64) * tl.num_programs(1) + s) * COUT_P * 16 * CIN_P
        tl.store(out + o[:, None] * (16 * CIN_P) + j[None, :], acc)

    @triton.jit
    def _conv_wgrad_nhwc(x_ptr, g_ptr, out_ptr, NPIX, H, W, HO, WO, CHUNK, XN, XC, XH, XW, GN, GC, GH, GW,
                         CIN: tl.constexpr, CIN_P: tl.constexpr, COUT: tl.constexpr, COUT_P: tl.constexpr,
                         KSIZE: tl.constexpr, STRIDE: tl.constexpr, TF32: tl.constexpr, BLOCK: tl.constexpr):
        # Weight gradient of a KSIZE x KSIZE convolution (KSIZE 3 or 4, padding 1): x (N, CIN, H, W)
        # and g (N, COUT, HO, WO) of any strides (XN, XC, XH, XW and GN, ...), channels-last at full
        # speed (channel stride 1: vector loads). Program (s, dy) sums output pixels
        # [s*CHUNK, (s+1)*CHUNK) of the flattened images (NPIX = N*HO*WO) for the KSIZE taps of row
        # offset dy:
        # out[s, dy, dx] = sum_p g[p, :] (outer) x[source of p through tap (dy, dx), :] over the
        # pixels whose source lies inside their image -> (COUT_P, CIN_P) each, padding zero.
        # One (COUT_P x BLOCK) @ (BLOCK x CIN_P) product per tap and block: the channels are the
        # product's sides, the pixels its depth (the NCHW kernel above stacks the taps as columns
        # instead, which spills registers beyond 16 channels).
        s = tl.program_id(0)
        dy = tl.program_id(1)
        o = tl.arange(0, COUT_P)
        c = tl.arange(0, CIN_P)
        acc0 = tl.zeros((COUT_P, CIN_P), dtype=tl.float32)
        acc1 = tl.zeros((COUT_P, CIN_P), dtype=tl.float32)
        acc2 = tl.zeros((COUT_P, CIN_P), dtype=tl.float32)
        acc3 = tl.zeros((COUT_P, CIN_P), dtype=tl.float32)      # KSIZE 4 only
        for start in range(s * CHUNK, s * CHUNK + CHUNK, BLOCK):
            p = start + tl.arange(0, BLOCK)
            live = p < NPIX
            n = (p // (HO * WO)).to(tl.int64)
            wo = p % WO
            ho = p // WO % HO
            hh = STRIDE * ho + dy - 1
            gt = tl.load(g_ptr + (n * GN + ho * GH + wo * GW)[:, None] + o[None, :] * GC,
                         mask=live[:, None] & (o < COUT)[None, :], other=0.0)           # (BLOCK, COUT_P)
            gt = tl.trans(gt)                                                           # (COUT_P, BLOCK)
            row_ok = live & (hh >= 0) & (hh < H)
            row = n * XN + hh * XH                                                      # source row's start
            for dx in tl.static_range(KSIZE):
                ww = STRIDE * wo + dx - 1
                ok = row_ok & (ww >= 0) & (ww < W)
                xt = tl.load(x_ptr + (row + ww * XW)[:, None] + c[None, :] * XC,
                             mask=ok[:, None] & (c < CIN)[None, :], other=0.0)          # (BLOCK, CIN_P)
                part = _dot(gt, xt, TF32)
                if dx == 0:
                    acc0 += part
                elif dx == 1:
                    acc1 += part
                elif dx == 2:
                    acc2 += part
                else:
                    acc3 += part
        out = out_ptr + ((s * KSIZE + dy) * KSIZE).to(tl.int64) * COUT_P * CIN_P + o[:, None] * CIN_P + c[None, :]
        tl.store(out, acc0)
        tl.store(out + COUT_P * CIN_P, acc1)
        tl.store(out + 2 * COUT_P * CIN_P, acc2)
        if KSIZE == 4:
            tl.store(out + 3 * COUT_P * CIN_P, acc3)


def _use_tf32() -> bool:
    return torch.backends.cudnn.allow_tf32


def dot_pays(cin: int, cout: int, out_pixels: int) -> bool:
    """Whether `_forward(dot=True)` runs the tensor-core kernel for a convolution of `cin` -> `cout`
    channels with `out_pixels` output pixels over all images, rather than the FMA one (TF32, 4 warps,
    blocks of 256 pixels; docs/PERF_NOTES.md has the measurements): it pays with 16 or more
    channels a side (the stacked heads' 16 -> 16 over the glimpses, the background decoder's 16 -> 16
    over the frames), and from 16 input channels over few output pixels, where the FMA kernel's grid
    is too small to fill the GPU (the background decoder's 16 -> 3 over the frames). Elsewhere the
    FMA kernel is faster (16 -> 8 and 8 -> 3 over the glimpses, 3 -> 16 of stride 2), as it is
    wherever products may not round to TF32 (fp32-strict): there the dot kernel's products compile
    to plain FMAs, and slowly (most of all at wide channels)."""
    return _use_tf32() and cin >= 16 and (cout >= 16 or out_pixels <= 2 ** 20)


def _out_size(n: int, ksize: int, stride: int) -> int:
    return (n + 2 - ksize) // stride + 1                             # padding 1


def _pad_dim(w, dim: int, size: int):
    """w zero-padded at the end of dimension `dim` (of 3) to `size` (w itself when it has that size):
    weight packing in one copy kernel, two when padded."""
    extra = size - w.shape[dim]
    return w if extra == 0 else torch.nn.functional.pad(w, (0, 0) * (2 - dim) + (0, extra))


def _planes(x):
    """x (N, C, H, W) as the kernels read it: each channel a contiguous H x W plane, planes H * W
    apart, images any distance apart (x.stride(0)): as it is when so (a channel slice such as the
    stacked heads' halves), else a contiguous copy."""
    N, C, H, W = x.shape
    if (W == 1 or x.stride(3) == 1) and (H == 1 or x.stride(2) == W) and (C == 1 or x.stride(1) == H * W):
        return x
    return x.contiguous()


def _forward(x, weight, bias, stride: int = 1, block: int | None = None, num_warps: int = 4, x2=None, rows=None,
             dot: bool = False):
    """y = F.conv2d(x, weight, bias, stride, padding=1) for weight (COUT, CIN, K, K) contiguous, K^2 <=
    16; with x2 and rows (M,) long, of torch.cat((x, x2))[rows] instead (without gathering it). x and
    x2 as `_planes` gives them. By `_conv_fwd_fma` (fp32 FMAs; blocks of 512 pixels by default), or,
    with `dot` where `dot_pays`, by `_conv_fwd_dot` (one tensor-core product per tap, TF32 where
    cuDNN may use it, channels zero-padded to 16 or the next power of two; blocks of 256)."""
    N, CIN, H, W = x.shape
    COUT, K = weight.shape[0], weight.shape[-1]
    HO, WO = _out_size(H, K, stride), _out_size(W, K, stride)
    M = N if rows is None else rows.shape[0]
    y = x.new_empty(M, COUT, HO, WO)
    x2 = x if x2 is None else x2
    if dot and dot_pays(CIN, COUT, M * HO * WO):
        block = block or 256
        _conv_fwd_dot[(M * triton.cdiv(HO * WO, block),)](
            x, x2, weight if rows is None else rows, N, x.stride(0), x2.stride(0), weight,
            bias if bias is not None else weight, y, H, W, HO, WO, CIN, _pad16(CIN), COUT, _pad16(COUT), K, stride,
            bias is not None, rows is not None, _use_tf32(), block, num_warps=num_warps)
        return y
    block = block or 512
    COUT_G = min(8, triton.next_power_of_2(COUT))   # output channels per program (registers: 8 x 4 pixels)
    groups = triton.cdiv(COUT, COUT_G)
    packed = _pad_dim(weight.reshape(COUT, CIN, K * K), 0, groups * COUT_G)                     # (out, in, tap)
    packed = packed.view(groups, COUT_G, CIN, K * K).permute(0, 3, 2, 1).contiguous()   # (group, tap, in, out)
    grid = (M * triton.cdiv(HO * WO, block) * groups,)
    _conv_fwd_fma[grid](x, x2, packed if rows is None else rows, N, x.stride(0), x2.stride(0), packed,
                        bias if bias is not None else packed, y, H, W, HO, WO, CIN, COUT, COUT_G,
                        groups, K, stride, bias is not None, rows is not None, block, num_warps=num_warps)
    return y


def _input_grad_4x4s2(grad_y, weight, H: int, W: int, block: int = 512, num_warps: int = 4):
    """dx (N, CIN, H, W) of y = F.conv2d(x, weight, stride=2, padding=1), weight (COUT, CIN, 4, 4)."""
    N, COUT, HO, WO = grad_y.shape
    CIN = weight.shape[1]
    CIN_G = min(8, triton.next_power_of_2(CIN))
    groups = triton.cdiv(CIN, CIN_G)
    packed = _pad_dim(weight.reshape(COUT, CIN, 16), 1, groups * CIN_G)                          # (out, in, tap)
    packed = packed.view(COUT, groups, CIN_G, 16).permute(1, 3, 0, 2).contiguous()   # (group, tap, out, in)
    dx = grad_y.new_empty(N, CIN, H, W)
    grid = (N * 4 * triton.cdiv(((H + 1) // 2) * ((W + 1) // 2), block) * groups,)
    _conv4x4s2_input_grad[grid](grad_y, packed, dx, H, W, HO, WO, COUT, CIN, CIN_G, groups, block,
                                num_warps=num_warps)
    return dx


def _weight_grad(x, grad_y, ksize: int = 3, stride: int = 1, block: int = 32):
    """dL/dweight (COUT, CIN, K, K) of y = F.conv2d(x, weight, stride=stride, padding=1), x as
    `_planes` gives it, grad_y contiguous."""
    N, CIN, H, W = x.shape
    COUT, HO, WO = grad_y.shape[1:]
    # columns (tap, c): 16 x CIN_P >= 16 as tl.dot needs; CIN_P a power of 2, not 16: padding 8 input
    # channels to 16 is slower
    CIN_P, COUT_P = triton.next_power_of_2(CIN), _pad16(COUT)
    # programs (image, part of its pixels): 2 parts per glimpse (the fastest split over ~900 glimpses); for a few
    # large frames (the background's 20 of 128^2) more parts, so that ~1,000 programs fill the GPU
    splits = min(max(2, triton.cdiv(1024, max(N, 1))), triton.cdiv(HO * WO, block))
    chunk = triton.cdiv(triton.cdiv(HO * WO, splits), block) * block
    partial = x.new_empty(N, splits, COUT_P, 16, CIN_P)
    _conv_wgrad[(N, splits)](x, grad_y, partial, x.stride(0), H, W, HO, WO, chunk, CIN, CIN_P, COUT, COUT_P, ksize, stride,
                             _use_tf32(), block)
    grad = partial.sum((0, 1))[:COUT, :ksize * ksize, :CIN]           # (COUT, K^2, CIN), a fixed order
    return grad.permute(0, 2, 1).reshape(COUT, CIN, ksize, ksize)


def _check_3x3_or_4x4s2(caller: str, ksize: int, stride: int) -> None:
    if (ksize, stride) not in ((3, 1), (4, 2)):   # the NHWC kernel keeps at most 4 taps a row
        raise ValueError(f"{caller}: 3x3 of stride 1 or 4x4 of stride 2 only, not {ksize}x{ksize} of stride {stride}")


def _weight_grad_nhwc(x, grad_y, ksize: int = 3, stride: int = 1, block: int = 64, programs: int = 256,
                      num_warps: int = 4):
    """dL/dweight (COUT, CIN, K, K) of y = F.conv2d(x, weight, stride=stride, padding=1) for a 3x3
    weight of stride 1 or a 4x4 one of stride 2, from x (N, CIN, H, W) and grad_y (N, COUT, HO, WO)
    read where they lie, any strides (fastest channels-last, as measured): ~`programs` chunks of
    output pixels x K row offsets, summed in a fixed order (deterministic). The defaults are the
    fastest settings for channels-last inputs (docs/PERF_NOTES.md has the measurements)."""
    _check_3x3_or_4x4s2("_weight_grad_nhwc", ksize, stride)
    N, CIN, H, W = x.shape
    COUT, HO, WO = grad_y.shape[1:]
    npix = N * HO * WO
    if npix == 0:
        return x.new_zeros(COUT, CIN, ksize, ksize)
    CIN_P, COUT_P = _pad16(CIN), _pad16(COUT)
    chunk = triton.cdiv(triton.cdiv(npix, programs), block) * block
    splits = triton.cdiv(npix, chunk)
    partial = x.new_empty(splits, ksize, ksize, COUT_P, CIN_P)
    _conv_wgrad_nhwc[(splits, ksize)](x, grad_y, partial, npix, H, W, HO, WO, chunk, *x.stride(), *grad_y.stride(),
                                      CIN, CIN_P, COUT, COUT_P, ksize, stride, _use_tf32(), block, num_warps=num_warps)
    grad = partial.sum(0)[:, :, :COUT, :CIN]                            # (K, K, COUT, CIN), a fixed order
    return grad.permute(2, 3, 0, 1).contiguous()


# The kernels are custom operators, so torch.compile traces through them (no graph break): inductor
# fuses the CELU and GroupNorm around them and the glimpse networks compile as one graph each.

@torch.library.custom_op("scalor::conv3x3", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, bool dot=False) -> Tensor")
def _conv3x3_op(x, weight, bias, dot=False):
    return _forward(_planes(x), weight.contiguous(), bias, dot=dot)


@_conv3x3_op.register_fake
def _(x, weight, bias, dot=False):
    return x.new_empty(x.shape[0], weight.shape[0], x.shape[2], x.shape[3])


@torch.library.custom_op("scalor::conv3x3_rows", mutates_args=(),
                         schema="(Tensor x1, Tensor x2, Tensor rows, Tensor weight, Tensor? bias, bool dot=False) -> Tensor")
def _conv3x3_rows_op(x1, x2, rows, weight, bias, dot=False):
    return _forward(_planes(x1), weight.contiguous(), bias, x2=_planes(x2), rows=rows.contiguous(), dot=dot)


@_conv3x3_rows_op.register_fake
def _(x1, x2, rows, weight, bias, dot=False):
    return x1.new_empty(rows.shape[0], weight.shape[0], x1.shape[2], x1.shape[3])


@torch.library.custom_op("scalor::conv4x4s2", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, bool dot=False) -> Tensor")
def _conv4x4s2_op(x, weight, bias, dot=False):
    return _forward(_planes(x), weight.contiguous(), bias, stride=2, dot=dot)


@_conv4x4s2_op.register_fake
def _(x, weight, bias, dot=False):
    return x.new_empty(x.shape[0], weight.shape[0], _out_size(x.shape[2], 4, 2), _out_size(x.shape[3], 4, 2))


@torch.library.custom_op("scalor::conv4x4s2_input_grad", mutates_args=(),
                         schema="(Tensor grad_y, Tensor weight, int H, int W) -> Tensor")
def _input_grad_4x4s2_op(grad_y, weight, H, W):
    return _input_grad_4x4s2(grad_y.contiguous(), weight.contiguous(), H, W)


@_input_grad_4x4s2_op.register_fake
def _(grad_y, weight, H, W):
    return grad_y.new_empty(grad_y.shape[0], weight.shape[1], H, W)


@torch.library.custom_op("scalor::conv_weight_grad", mutates_args=(),
                         schema="(Tensor x, Tensor grad_y, int ksize, int stride) -> Tensor")
def _weight_grad_op(x, grad_y, ksize, stride):
    return _weight_grad(_planes(x), grad_y.contiguous(), ksize, stride).contiguous()


@_weight_grad_op.register_fake
def _(x, grad_y, ksize, stride):
    return x.new_empty(grad_y.shape[1], x.shape[1], ksize, ksize)


@torch.library.custom_op("scalor::conv_weight_grad_nhwc", mutates_args=(), tags=(torch.Tag.flexible_layout,),
                         schema="(Tensor x, Tensor grad_y, int ksize, int stride) -> Tensor")
def _weight_grad_nhwc_op(x, grad_y, ksize, stride):
    # flexible layout: inductor hands over its (channels-last) buffers as they are; the kernel reads any strides
    return _weight_grad_nhwc(x, grad_y, ksize, stride)


@_weight_grad_nhwc_op.register_fake
def _(x, grad_y, ksize, stride):
    return x.new_empty(grad_y.shape[1], x.shape[1], ksize, ksize)


class _ConvNHWCWeightGrad(torch.autograd.Function):
    """F.conv2d(x, weight, bias, stride, padding=1) (cuDNN, or inductor's choice when compiled) whose
    input gradient is cuDNN's and whose weight gradient is `_weight_grad_nhwc`'s."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride: int):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.has_bias = stride, bias is not None
        return torch.nn.functional.conv2d(x, weight, bias, stride, 1)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        s = ctx.stride
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad_y, x, weight, None, [s, s], [1, 1], [1, 1], False,
                                                         [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad_nhwc_op(x, grad_y, weight.shape[-1], s)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def conv_nhwc_weight_grad(x, weight, bias=None, stride: int = 1):
    """F.conv2d(x, weight, bias, stride, padding=1) for a 3x3 weight of stride 1 or a 4x4 one of
    stride 2, differentiable, with the weight gradient by the channels-last Triton kernel
    (`_weight_grad_nhwc`) and everything else as F.conv2d does it."""
    _check_3x3_or_4x4s2("conv_nhwc_weight_grad", weight.shape[-1], stride)
    return _ConvNHWCWeightGrad.apply(x, weight, bias, stride)


def _setup_context(ctx, inputs, output):
    x, weight, bias, dot = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.dot = bias is not None, dot


def _backward(ctx, grad_y):
    """Gradients of conv3x3 (3x3 weight, stride 1) and conv4x4s2 (4x4 weight, stride 2)."""
    x, weight = ctx.saved_tensors
    ksize = weight.shape[-1]
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        if ksize == 3:   # correlation with the transposed, flipped kernel
            grad_x = _conv3x3_op(grad_y, weight.transpose(0, 1).flip(2, 3), None, ctx.dot)
        else:
            grad_x = _input_grad_4x4s2_op(grad_y, weight, x.shape[2], x.shape[3])
    if ctx.needs_input_grad[1]:
        grad_w = _weight_grad_op(x, grad_y, ksize, 1 if ksize == 3 else 2)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_y.sum((0, 2, 3))
    return grad_x, grad_w, grad_b, None


_conv3x3_op.register_autograd(_backward, setup_context=_setup_context)
_conv4x4s2_op.register_autograd(_backward, setup_context=_setup_context)


def conv3x3(x, weight, bias=None, dot: bool = False):
    """F.conv2d(x, weight, bias, stride=1, padding=1) by the Triton kernels (x fp32, NCHW): the
    custom operator torch.ops.scalor.conv3x3, differentiable in x, weight and bias. `dot`: the
    forward and the input gradient by tensor-core products (`_conv_fwd_dot`) where `dot_pays`,
    else FMAs."""
    return _conv3x3_op(x, weight, bias, dot)


def conv3x3_rows(x1, x2, rows, weight, bias=None, dot: bool = False):
    """F.conv2d(torch.cat((x1, x2))[rows], weight, bias, padding=1) without gathering the images
    (rows: (M,) long, in [0, len(x1) + len(x2))): the custom operator torch.ops.scalor.conv3x3_rows,
    forward only (no gradient)."""
    if x1.shape[1:] != x2.shape[1:] or x1.dtype != x2.dtype:
        raise ValueError("conv3x3_rows: x1 and x2 differ in image shape or dtype")
    return _conv3x3_rows_op(x1, x2, rows, weight, bias, dot)


def conv4x4s2(x, weight, bias=None, dot: bool = False):
    """F.conv2d(x, weight, bias, stride=2, padding=1) for a 4x4 weight by the Triton kernels (x fp32,
    NCHW): the custom operator torch.ops.scalor.conv4x4s2, differentiable in x, weight and bias.
    `dot`: the forward by tensor-core products (`_conv_fwd_dot`) where `dot_pays`."""
    return _conv4x4s2_op(x, weight, bias, dot)
