"""The Triton convolutions (kernels.py: 3x3, and 4x4 of stride 2) against F.conv2d: output, input,
weight and bias gradients.

The kernels run in Triton's CPU interpreter here (conftest sets TRITON_INTERPRET=1); on a GPU the
same comparison is `python -m pytest tests/test_kernels.py` with TRITON_INTERPRET=0 and CUDA tensors
(`--device cuda` is not needed: the test picks CUDA when present and the interpreter is off).
"""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

import fast
import kernels
from common import Config, small_config
from fast import Conv3x3, Conv4x4Stride2, SpeedOptions
from modules import GlimpseDecoder, GlimpseEncoder
from scalor import SCALOR

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0" else "cpu"


@pytest.fixture(autouse=True)
def ieee_fp32():
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False      # fp32 products in the kernels and in cuDNN
    yield
    torch.backends.cudnn.allow_tf32 = before


def _check_against_conv2d(conv, ksize, stride, n, cin, cout, h, w, tf32):
    """conv(x, weight, bias) against F.conv2d(x, weight, bias, stride, padding=1): output and the x,
    weight and bias gradients. fp32 products, or TF32 allowed (the weight gradient's tl.dot; the
    interpreter multiplies in fp32; on a GPU both it and cuDNN's reference round to TF32, so they are
    compared to 1e-2 of the largest value: a weight gradient sums n*h*w products, each with TF32's
    ~5e-4 rounding)."""
    torch.backends.cudnn.allow_tf32 = tf32
    tf32_gpu = tf32 and DEVICE == "cuda"
    gen = torch.Generator().manual_seed(n * 1000 + cin * 10 + cout + h * ksize)
    x = torch.randn(n, cin, h, w, generator=gen).to(DEVICE).requires_grad_()
    weight = (torch.randn(cout, cin, ksize, ksize, generator=gen) / 6).to(DEVICE).requires_grad_()
    bias = torch.randn(cout, generator=gen).to(DEVICE).requires_grad_()
    y = conv(x, weight, bias)
    grad_y = torch.randn(y.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_y)
    y_ref = F.conv2d(x, weight, bias, stride=stride, padding=1)
    grads_ref = torch.autograd.grad(y_ref, (x, weight, bias), grad_y)
    assert y.shape == y_ref.shape
    # The weight and bias gradients sum n*h*w products in another order than cuDNN's: in fp32 they
    # may differ by a few ulps of the sum of the products' magnitudes (~1.5e-4 seen on a GPU for
    # n*h*w = 3,072), so they are compared to 2e-7 (under 2 ulps) of that sum.
    weight_abs = torch.nn.grad.conv2d_weight(x.detach().abs(), weight.shape, grad_y.abs(), stride, padding=1)
    bias_abs = grad_y.abs().sum((0, 2, 3))
    atols = (1e-5, 1e-5, 1e-4 + 2e-7 * weight_abs, 1e-4 + 2e-7 * bias_abs)
    for got, want, atol in zip((y, *grads), (y_ref, *grads_ref), atols):
        if tf32_gpu:     # the weight gradient sums n*h*w products
            torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * float(want.abs().max()))
        elif isinstance(atol, float):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)
        else:
            assert ((got - want).abs() <= atol + 1e-5 * want.abs()).all(), float((got - want).abs().max())


@pytest.mark.parametrize("n, cin, cout, h, w", [(3, 16, 8, 32, 32), (2, 8, 3, 17, 33), (2, 16, 1, 12, 12),
                                                 (2, 32, 32, 8, 8), (2, 8, 12, 23, 23), (1, 8, 1, 1, 1)])
@pytest.mark.parametrize("tf32", [False, True])
def test_conv3x3_matches_conv2d(n, cin, cout, h, w, tf32):
    _check_against_conv2d(kernels.conv3x3, 3, 1, n, cin, cout, h, w, tf32)


def test_conv3x3_reads_a_channel_slice_in_place():
    """The stacked heads' halves h[:, :8], h[:, 8:] are channel slices (images 16 planes apart): the
    kernels read them where they are (no copy) and give F.conv2d's output and gradients."""
    h = torch.randn(3, 16, 20, 20, device=DEVICE, requires_grad=True)
    weight = (torch.randn(3, 8, 3, 3, device=DEVICE) / 6).requires_grad_()
    half = h[:, 8:]
    assert kernels._planes(half.detach()).data_ptr() == half.data_ptr()
    assert kernels._planes(half.detach()).stride() == half.stride()            # not copied
    assert kernels._planes(h.detach().transpose(2, 3)).is_contiguous()         # other strides: copied
    y = kernels.conv3x3(half, weight)
    grad_y = torch.randn(y.shape, device=DEVICE)
    grads = torch.autograd.grad(y, (h, weight), grad_y)
    y_ref = F.conv2d(half, weight, padding=1)
    grads_ref = torch.autograd.grad(y_ref, (h, weight), grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads_ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads_ref[1], rtol=1e-5, atol=1e-3)
    assert not grads[0][:, :8].any()


def test_conv3x3_of_no_images():
    """An empty batch (as F.conv2d allows): an empty output and zero weight and bias gradients."""
    x = torch.randn(0, 8, 12, 12, device=DEVICE, requires_grad=True)
    weight = torch.randn(3, 8, 3, 3, device=DEVICE, requires_grad=True)
    bias = torch.randn(3, device=DEVICE, requires_grad=True)
    y = kernels.conv3x3(x, weight, bias)
    assert y.shape == (0, 3, 12, 12)
    grad_x, grad_w, grad_b = torch.autograd.grad(y.sum(), (x, weight, bias))
    assert grad_x.shape == x.shape and not grad_w.any() and not grad_b.any()


def test_conv3x3_without_bias_and_input_grad():
    x = torch.randn(2, 16, 9, 9, device=DEVICE)
    weight = torch.randn(4, 16, 3, 3, device=DEVICE, requires_grad=True)
    y = kernels.conv3x3(x, weight)
    torch.testing.assert_close(y, F.conv2d(x, weight, padding=1), rtol=1e-5, atol=1e-5)
    (grad_w,) = torch.autograd.grad(y.square().sum(), (weight,))
    (want,) = torch.autograd.grad(F.conv2d(x, weight, padding=1).square().sum(), (weight,))
    torch.testing.assert_close(grad_w, want, rtol=1e-5, atol=1e-3)


def test_conv3x3_module_is_a_conv2d():
    """Same parameters and state_dict as nn.Conv2d(cin, cout, 3, padding=1); on the CPU it is one."""
    conv, plain = Conv3x3(16, 8), torch.nn.Conv2d(16, 8, 3, 1, 1)
    assert list(conv.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 16, 32, 32)
    assert torch.equal(conv(x), plain(x))


DEFAULT_TWINS = {   # the default config's convolutions of <= 16 channels a side, 3x3 or 4x4 of stride 2
    "image_enc.image_enc.enc.0": (Conv4x4Stride2, 3, 16), "image_enc.image_enc.enc.3": (Conv3x3, 16, 16),
    "glimpse_enc.enc_cnn.0": (Conv4x4Stride2, 3, 16),
    "glimpse_dec.dec_o.0": (Conv3x3, 16, 8), "glimpse_dec.dec_o.3": (Conv3x3, 8, 3),
    "glimpse_dec.dec_alpha.0": (Conv3x3, 16, 8), "glimpse_dec.dec_alpha.3": (Conv3x3, 8, 1),
    "proposal.mask_enc_net.0": (Conv4x4Stride2, 1, 16), "bg_enc.enc.0": (Conv4x4Stride2, 4, 16),
    "bg_dec.dec.28": (Conv3x3, 16, 16), "bg_dec.bg_dec.0": (Conv3x3, 16, 16), "bg_dec.bg_dec.3": (Conv3x3, 16, 3)}


@pytest.mark.parametrize("cfg", [Config(), small_config(), small_config(img_h=128, img_w=128)], ids=["default", "small", "small-128"])
def test_model_parameters_do_not_depend_on_the_kernel_choice(cfg):
    """triton_convs swaps exactly the 3x3 and 4x4-stride-2 convolutions (padding 1) of <= 16 channels
    a side for their Triton twins, and nothing else: same parameters, same state_dict."""
    on, off = (fast.apply(SCALOR(cfg), SpeedOptions(triton_convs=t)) for t in (True, False))
    assert [(k, v.shape) for k, v in on.state_dict().items()] == [(k, v.shape) for k, v in off.state_dict().items()]
    twins = {name: (type(m), m.in_channels, m.out_channels) for name, m in on.named_modules()
             if isinstance(m, (Conv3x3, Conv4x4Stride2))}
    assert not any(isinstance(m, (Conv3x3, Conv4x4Stride2)) for m in off.modules())
    for name, m in off.named_modules():
        small = isinstance(m, torch.nn.Conv2d) and max(m.in_channels, m.out_channels) <= 16 and m.padding == (1, 1) \
            and (m.kernel_size, m.stride) in (((3, 3), (1, 1)), ((4, 4), (2, 2)))
        assert small == (name in twins), name
    if cfg == Config():
        assert twins == DEFAULT_TWINS


def test_conv3x3_is_a_custom_operator_that_compile_traces():
    """torch.ops.scalor.conv3x3 passes torch.library.opcheck (fake shapes, autograd registration,
    schema) and torch.compile traces a head through it in one graph (no graph break)."""
    x = torch.randn(2, 8, 6, 6, device=DEVICE, requires_grad=True)
    weight = torch.randn(3, 8, 3, 3, device=DEVICE, requires_grad=True)
    bias = torch.randn(3, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.scalor.conv3x3.default, (x, weight, bias))
    torch.library.opcheck(torch.ops.scalor.conv3x3.default, (x, weight, None))
    torch.library.opcheck(torch.ops.scalor.conv_weight_grad.default, (x.detach(), torch.randn(2, 3, 6, 6, device=DEVICE), 3, 1))

    def head(x):
        return torch.sigmoid(kernels.conv3x3(F.group_norm(F.celu(x), 4), weight, bias))

    explained = torch._dynamo.explain(head)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


@pytest.mark.parametrize("n, cin, cout, h, w", [(2, 3, 16, 32, 32), (2, 3, 16, 9, 7), (1, 4, 8, 2, 2),
                                                 (3, 1, 16, 16, 16), (1, 3, 20, 5, 6)])
@pytest.mark.parametrize("tf32", [False, True])
def test_conv4x4s2_matches_conv2d(n, cin, cout, h, w, tf32):
    """4x4, stride 2, padding 1 (the glimpse encoder's first layer), on even and odd sizes (the input
    gradient runs per parity class of pixels)."""
    _check_against_conv2d(kernels.conv4x4s2, 4, 2, n, cin, cout, h, w, tf32)


def test_conv4x4s2_operators_and_module():
    """The operators pass torch.library.opcheck; Conv4x4Stride2 has nn.Conv2d's parameters and is the
    glimpse encoder's first convolution exactly when triton_convs is on (same state_dict either way)."""
    x = torch.randn(2, 3, 8, 6, device=DEVICE, requires_grad=True)
    weight = torch.randn(5, 3, 4, 4, device=DEVICE, requires_grad=True)
    bias = torch.randn(5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.scalor.conv4x4s2.default, (x, weight, bias))
    torch.library.opcheck(torch.ops.scalor.conv4x4s2.default, (x, weight, None))
    grad_y = torch.randn(2, 5, 4, 3, device=DEVICE)
    torch.library.opcheck(torch.ops.scalor.conv4x4s2_input_grad.default, (grad_y, weight.detach(), 8, 6))
    torch.library.opcheck(torch.ops.scalor.conv_weight_grad.default, (x.detach(), grad_y, 4, 2))
    explained = torch._dynamo.explain(lambda x: F.celu(kernels.conv4x4s2(x, weight, bias)))(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    conv, plain = Conv4x4Stride2(3, 16), torch.nn.Conv2d(3, 16, 4, 2, 1)
    assert list(conv.state_dict()) == list(plain.state_dict())
    cfg = small_config()
    on, off = (fast.apply(GlimpseEncoder(cfg), SpeedOptions(triton_convs=t)) for t in (True, False))
    assert [(k, v.shape) for k, v in on.state_dict().items()] == [(k, v.shape) for k, v in off.state_dict().items()]
    assert isinstance(on.enc_cnn[0], Conv4x4Stride2) and not any(isinstance(m, Conv4x4Stride2) for m in off.modules())


@pytest.mark.parametrize("ksize, stride, n, cin, cout, h, w", [(3, 1, 2, 16, 16, 12, 12), (3, 1, 1, 20, 40, 5, 6),
                                                               (4, 2, 2, 3, 16, 9, 7)])
@pytest.mark.parametrize("tf32", [False, True])
def test_dot_forward_matches_conv2d(ksize, stride, n, cin, cout, h, w, tf32, monkeypatch):
    """With dot=True (the forward, and the 3x3 input gradient, as one tensor-core product per tap,
    channels padded to 16 or a power of two; here on every shape, not only where `dot_pays`)
    conv3x3 and conv4x4s2 still give F.conv2d's output and gradients, and the operators pass
    opcheck with it. On a GPU only with TF32, the one case `dot_pays` runs: there fp32 products
    compile to FMAs, and slowly (over a minute per kernel at 32 -> 64 channels)."""
    monkeypatch.setattr(kernels, "dot_pays", lambda cin, cout, out_pixels: True)
    if tf32 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter multiplies in fp32 either way: the same as tf32=False")
    if not tf32 and DEVICE == "cuda":
        pytest.skip("dot_pays never runs the tensor-core kernel without TF32")
    conv = kernels.conv3x3 if ksize == 3 else kernels.conv4x4s2
    _check_against_conv2d(lambda x, wt, b: conv(x, wt, b, dot=True), ksize, stride, n, cin, cout, h, w, tf32)
    x = torch.randn(2, cin, 6, 6, device=DEVICE, requires_grad=True)
    weight = torch.randn(cout, cin, ksize, ksize, device=DEVICE, requires_grad=True)
    op = torch.ops.scalor.conv3x3 if ksize == 3 else torch.ops.scalor.conv4x4s2
    torch.library.opcheck(op.default, (x, weight, None, True))
    if ksize == 3:   # rows read in place: the same products as on the gathered images
        x1, x2 = torch.randn(3, cin, 5, 7, device=DEVICE), torch.randn(2, cin, 5, 7, device=DEVICE)
        rows = torch.tensor([4, 0, 2, 2], device=DEVICE)
        got = kernels.conv3x3_rows(x1, x2, rows, weight.detach(), None, dot=True)
        want = kernels.conv3x3(torch.cat((x1, x2))[rows], weight.detach(), None, dot=True)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_use_dot_convs_marks_the_triton_convolutions_and_keeps_the_glimpse_networks(monkeypatch):
    """cfg.dot_convs sets `dot` on every Conv3x3 and Conv4x4Stride2 of the model (state_dict
    unchanged); the glimpse decoder (stacked heads, rows read in place) and encoder give the same
    outputs and gradients as with the FMA kernels (1e-5; 1e-4 of the largest entry for gradients).
    On the CPU the kernels run in Triton's interpreter, so the CUDA-only check is bypassed (a whole
    model step there takes minutes)."""
    monkeypatch.setattr(fast, "_triton_fits", lambda x, weight, min_pixels=0: True)
    monkeypatch.setattr(kernels, "dot_pays", lambda cin, cout, out_pixels: True)
    plain, dotted = (fast.apply(SCALOR(Config()), SpeedOptions(dot_convs=d)) for d in (False, True))
    convs = [m for m in dotted.modules() if isinstance(m, (Conv3x3, Conv4x4Stride2))]
    assert len(convs) == len(DEFAULT_TWINS) and all(m.dot for m in convs)
    assert not any(m.dot for m in plain.modules() if isinstance(m, (Conv3x3, Conv4x4Stride2)))
    assert list(plain.state_dict()) == list(dotted.state_dict())
    cfg = small_config()
    gen = torch.Generator().manual_seed(5)
    z_what = torch.randn(3, cfg.z_what_dim, generator=gen).to(DEVICE)
    glimpses = torch.rand(3, 3, cfg.glimpse_size, cfg.glimpse_size, generator=gen).to(DEVICE)
    rows = torch.tensor([2, 0, 1], device=DEVICE)     # of the 2 + 1 images below
    results = []
    for dot in (False, True):
        torch.manual_seed(0)
        no_dot = SpeedOptions(dot_convs=False)
        dec, enc = (fast.apply(m(cfg), no_dot).to(DEVICE) for m in (GlimpseDecoder, GlimpseEncoder))
        if dot:
            assert (fast.use_dot_convs(dec), fast.use_dot_convs(enc)) == (3, 1)
        o, alpha = dec(z_what)
        feat, _ = dec.features_and_alpha(z_what)
        with torch.no_grad():                  # forward only, as in rendering
            o_rows = dec.appearance_of_rows((feat[:2], feat[2:]), rows)
        code = enc(glimpses)
        total = sum(t.square().sum() for t in (o, alpha, *code))
        params = list(dec.parameters()) + list(enc.parameters())
        results.append(((o, alpha, o_rows, *code), torch.autograd.grad(total, params, allow_unused=True)))
    for got, want in zip(results[1][0], results[0][0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, r in zip(results[1][1], results[0][1]):
        assert (g is None) == (r is None)
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


def test_dot_pays_where_measured_faster():
    """The tensor-core forward runs where it beat the FMA kernel on an H200 (16 channels a side; 16
    input channels over few output pixels, the frames), only where products may round to TF32."""
    glimpses, frames = 900 * 64 * 64, 20 * 128 * 128
    torch.backends.cudnn.allow_tf32 = True
    assert kernels.dot_pays(16, 16, 1280 * 64 * 64) and kernels.dot_pays(16, 16, frames)
    assert kernels.dot_pays(16, 3, frames) and not kernels.dot_pays(1, 16, frames // 4)
    assert not any(kernels.dot_pays(cin, cout, glimpses) for cin, cout in ((16, 8), (8, 3), (8, 1), (3, 8), (3, 16)))
    torch.backends.cudnn.allow_tf32 = False
    assert not kernels.dot_pays(16, 16, glimpses)


def test_conv3x3_rows_reads_gathered_images_in_place():
    """conv3x3_rows(x1, x2, rows) is F.conv2d(torch.cat((x1, x2))[rows]) (rows repeated, out of
    order, from both sources), and passes opcheck; the decoder's appearance_of_rows (which gathers
    first on the CPU) equals appearance of the gathered features."""
    gen = torch.Generator().manual_seed(3)
    x1, x2 = (torch.randn(n, 16, 11, 13, generator=gen).to(DEVICE) for n in (4, 6))
    rows = torch.tensor([9, 0, 4, 3, 5, 5, 1], device=DEVICE)
    weight, bias = torch.randn(8, 16, 3, 3, generator=gen).to(DEVICE), torch.randn(8, generator=gen).to(DEVICE)
    torch.testing.assert_close(kernels.conv3x3_rows(x1, x2, rows, weight, bias),
                               F.conv2d(torch.cat((x1, x2))[rows], weight, bias, padding=1), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.scalor.conv3x3_rows.default, (x1, x2, rows, weight, bias))
    explained = torch._dynamo.explain(lambda a, b: torch.sigmoid(kernels.conv3x3_rows(a, b, rows, weight, bias)))(x1, x2)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    for size in (64, 128):                      # one-conv and two-conv heads
        cfg = small_config(img_h=size, img_w=size)
        dec, G = fast.apply(GlimpseDecoder(cfg), SpeedOptions()).to(DEVICE), cfg.glimpse_size
        feats = (torch.randn(3, 16, G, G, device=DEVICE), torch.randn(2, 16, G, G, device=DEVICE))
        rows = torch.tensor([4, 0, 2, 3], device=DEVICE)
        torch.testing.assert_close(dec.appearance_of_rows(feats, rows), dec.appearance(torch.cat(feats)[rows]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ksize, stride, n, cin, cout, h, w",
                         [(3, 1, 2, 32, 32, 8, 8), (3, 1, 3, 3, 5, 6, 7), (3, 1, 1, 20, 40, 4, 9), (3, 1, 2, 64, 16, 1, 5),
                          (4, 2, 2, 16, 32, 8, 8), (4, 2, 3, 5, 20, 7, 9), (4, 2, 1, 32, 64, 2, 2)])
@pytest.mark.parametrize("programs", [256, 3])
def test_weight_grad_nhwc_matches_conv2d(ksize, stride, n, cin, cout, h, w, programs):
    """The channels-last weight gradient (output pixels of all images in chunks, one product per
    tap) equals F.conv2d's for 3x3 of stride 1 and 4x4 of stride 2, padding 1: channel counts that
    are not powers of two or under 16 (padded), odd sizes, rows of one pixel, taps whose source
    leaves the image, more chunks than pixels or few chunks; NCHW, channels-last and other strides
    (a channel slice, swapped image axes) read where they lie."""
    gen = torch.Generator().manual_seed(n * 100 + cin + cout + ksize)
    x = torch.randn(n, cin, h, w, generator=gen).to(DEVICE)
    ho, wo = (h + 2 - ksize) // stride + 1, (w + 2 - ksize) // stride + 1
    grad_y = torch.randn(n, cout, ho, wo, generator=gen).to(DEVICE)
    shape = (cout, cin, ksize, ksize)
    want = torch.nn.grad.conv2d_weight(x, shape, grad_y, stride, padding=1)
    magnitude = torch.nn.grad.conv2d_weight(x.abs(), shape, grad_y.abs(), stride, padding=1)
    wide = torch.cat((x, x), 1)[:, cin:]                                       # a channel slice
    swapped = x.transpose(2, 3).contiguous().transpose(2, 3)                   # W-major images
    for xs, gs in ((x, grad_y), (x.contiguous(memory_format=torch.channels_last),
                                 grad_y.contiguous(memory_format=torch.channels_last)), (wide, grad_y), (swapped, grad_y)):
        assert torch.equal(xs, x)
        got = kernels._weight_grad_nhwc(xs, gs, ksize, stride, block=16, programs=programs)
        assert got.shape == shape
        # fp32 sums of n*ho*wo products in another order: to 1e-6 (8 ulps) of the products' magnitude
        assert ((got - want).abs() <= 1e-6 * magnitude + 1e-6).all(), float((got - want).abs().max())


@pytest.mark.parametrize("ksize, stride, cin, cout, h, w", [(3, 1, 32, 32, 8, 8), (4, 2, 16, 32, 9, 8), (3, 1, 20, 5, 4, 6)])
@pytest.mark.parametrize("tf32", [False, True])
def test_conv_nhwc_weight_grad_matches_conv2d(ksize, stride, cin, cout, h, w, tf32):
    """kernels.conv_nhwc_weight_grad (cuDNN's forward and input gradient, the channels-last Triton
    weight gradient): output and x, weight and bias gradients as F.conv2d's."""
    _check_against_conv2d(lambda x, wt, b: kernels.conv_nhwc_weight_grad(x, wt, b, stride), ksize, stride,
                          2, cin, cout, h, w, tf32)


def test_conv_nhwc_weight_grad_operator_and_compile():
    """The weight gradient is a custom operator (opcheck passes) and torch.compile traces the
    autograd.Function around it in one graph, forward and backward, with eager's gradients (on a
    GPU through inductor)."""
    x = torch.randn(2, 20, 6, 6, device=DEVICE, requires_grad=True)
    weight = torch.randn(24, 20, 3, 3, device=DEVICE, requires_grad=True)
    bias = torch.randn(24, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.scalor.conv_weight_grad_nhwc.default, (x.detach(), torch.randn(2, 24, 6, 6, device=DEVICE), 3, 1))

    def block(x):
        return F.celu(kernels.conv_nhwc_weight_grad(F.celu(x), weight, bias)).square().sum()

    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    want = torch.autograd.grad(block(x), (x, weight, bias))
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"    # inductor's CPU build needs a C++ compiler
    got = torch.autograd.grad(torch.compile(block, backend=backend, fullgraph=True)(x), (x, weight, bias))
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_, rtol=1e-5, atol=1e-5)


def test_use_nhwc_weight_grad_picks_the_17_to_32_channel_layers():
    """cfg.nhwc_weight_grad turns the 3x3 and 4x4/2 convolutions with 17-32 channels on the wider side
    into ConvNHWCWeightGrad (the default model: the decoder trunk's 32 -> 32, the encoders' 16 -> 32
    ...), by default, and changes neither parameters nor state_dict; off, none is."""
    from fast import ConvNHWCWeightGrad
    torch.manual_seed(0)
    plain = fast.apply(SCALOR(Config()), SpeedOptions(nhwc_weight_grad=False))
    torch.manual_seed(0)
    swapped = fast.apply(SCALOR(Config()), SpeedOptions())
    picked = {n: tuple(m.weight.shape) for n, m in swapped.named_modules() if isinstance(m, ConvNHWCWeightGrad)}
    assert picked == {"image_enc.image_enc.enc.6": (32, 16, 4, 4), "image_enc.image_enc.enc.9": (32, 32, 3, 3),
                      "glimpse_enc.enc_cnn.3": (32, 16, 4, 4), "glimpse_dec.dec.21": (32, 32, 3, 3),
                      "proposal.mask_enc_net.3": (32, 16, 4, 4), "proposal.mask_enc_net.6": (32, 32, 3, 3),
                      "bg_enc.enc.3": (32, 16, 4, 4)}
    assert not any(isinstance(m, ConvNHWCWeightGrad) for m in plain.modules())
    a, b = plain.state_dict(), swapped.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nhwc_weight_grad_gives_the_model_the_same_step(tiny_cfg, monkeypatch):
    """A training step of the model with nhwc_weight_grad equals one without (loss to 1e-6,
    gradients to 1e-4 of each tensor's largest entry), eager and with the glimpse encoder compiled
    (aot_eager: the autograd.Function traced into its graph). On the CPU the Triton kernels run in
    the interpreter, so the modules' CUDA-only check is bypassed here."""
    from data import bench_batches
    from utils import tau_at, z_pres_prior_at
    monkeypatch.setattr(fast, "_triton_fits", lambda x, weight, min_pixels=0: True)
    cfg = tiny_cfg.replace(seq_len=2)                       # 2 frames (interpreter)
    only_nhwc = SpeedOptions(triton_convs=False)            # only the new path runs Triton

    def loss_and_grads(model):
        torch.manual_seed(1)
        out = model(batch, step=10, tau=tau_at(cfg, 9), z_pres_prior=z_pres_prior_at(cfg, 10))
        loss = out.loss()
        return loss.detach(), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    batch = bench_batches(1, 2, cfg.seq_len, cfg.img_h, cfg.img_w, num_objects=8, seed=0)[0].to(DEVICE)
    torch.manual_seed(0)
    plain = fast.apply(SCALOR(cfg), dataclasses.replace(only_nhwc, nhwc_weight_grad=False)).to(DEVICE).train()
    torch.manual_seed(0)
    swapped = fast.apply(SCALOR(cfg), only_nhwc).to(DEVICE).train()
    assert sum(isinstance(m, fast.ConvNHWCWeightGrad) for m in swapped.modules()) >= 3
    want = loss_and_grads(plain)
    torch._dynamo.reset()
    for compiled in (False, True):
        if compiled:
            swapped.glimpse_enc.compile(backend="aot_eager", dynamic=False)
        loss, grads = loss_and_grads(swapped)
        torch.testing.assert_close(loss, want[0], rtol=1e-6, atol=0)
        for g, r in zip(grads, want[1]):
            assert (g is None) == (r is None)
            if r is not None:
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


def test_weight_grad_nhwc_refuses_other_kernels_and_takes_no_images():
    """Other kernel sizes are refused (the kernel keeps at most 4 taps a row); no images give a zero
    gradient, as F.conv2d's."""
    with pytest.raises(ValueError, match="3x3 of stride 1 or 4x4 of stride 2"):
        kernels._weight_grad_nhwc(torch.randn(2, 16, 6, 6, device=DEVICE), torch.randn(2, 16, 2, 2, device=DEVICE), 5, 1)
    with pytest.raises(ValueError, match="not 5x5 of stride 1"):
        kernels.conv_nhwc_weight_grad(torch.randn(2, 16, 6, 6, device=DEVICE), torch.randn(16, 16, 5, 5, device=DEVICE))
    x = torch.randn(0, 32, 8, 8, device=DEVICE)
    weight = torch.randn(32, 32, 3, 3, device=DEVICE, requires_grad=True)
    (grad,) = torch.autograd.grad(kernels.conv_nhwc_weight_grad(x, weight).sum(), (weight,))
    assert torch.equal(grad, torch.zeros_like(weight))
