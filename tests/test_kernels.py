"""The Triton 3x3 convolution (kernels.py) against F.conv2d: output, input, weight and bias gradients.

The kernels run in Triton's CPU interpreter here (conftest sets TRITON_INTERPRET=1); on a GPU the
same comparison is `python -m pytest tests/test_kernels.py` with TRITON_INTERPRET=0 and CUDA tensors
(`--device cuda` is not needed: the test picks CUDA when present and the interpreter is off).
"""
import os

import pytest
import torch
import torch.nn.functional as F

import kernels
from common import small_config
from modules import Conv3x3, GlimpseDecoder

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0" else "cpu"


@pytest.fixture(autouse=True)
def ieee_fp32():
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False      # fp32 products in the kernels and in cuDNN
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("n, cin, cout, h, w", [(3, 16, 8, 32, 32), (2, 8, 3, 17, 33), (2, 16, 1, 12, 12),
                                                 (2, 32, 32, 8, 8), (2, 8, 12, 23, 23), (1, 8, 1, 1, 1)])
@pytest.mark.parametrize("tf32", [False, True])
def test_conv3x3_matches_conv2d(n, cin, cout, h, w, tf32):
    """fp32 products, and with TF32 allowed (the weight gradient's tl.dot; the interpreter multiplies
    in fp32; on a GPU both it and cuDNN's reference round to TF32, so they are compared to 1e-2 of
    the largest value: a weight gradient sums n*h*w products, each with TF32's ~5e-4 rounding)."""
    torch.backends.cudnn.allow_tf32 = tf32
    tf32_gpu = tf32 and DEVICE == "cuda"
    gen = torch.Generator().manual_seed(n * 1000 + cin * 10 + cout)
    x = torch.randn(n, cin, h, w, generator=gen).to(DEVICE).requires_grad_()
    weight = (torch.randn(cout, cin, 3, 3, generator=gen) / 6).to(DEVICE).requires_grad_()
    bias = torch.randn(cout, generator=gen).to(DEVICE).requires_grad_()
    y = kernels.conv3x3(x, weight, bias)
    grad_y = torch.randn(y.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_y)
    y_ref = F.conv2d(x, weight, bias, padding=1)
    grads_ref = torch.autograd.grad(y_ref, (x, weight, bias), grad_y)
    assert y.shape == y_ref.shape
    for got, want, atol in zip((y, *grads), (y_ref, *grads_ref), (1e-5, 1e-5, 1e-4, 1e-4)):
        if tf32_gpu:     # the weight gradient sums n*h*w products
            torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * float(want.abs().max()))
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)


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


@pytest.mark.parametrize("size", [64, 128])
def test_decoder_parameters_do_not_depend_on_the_kernel_choice(size):
    cfg = small_config(img_h=size, img_w=size)
    on, off = (GlimpseDecoder(cfg.replace(triton_convs=t)) for t in (True, False))
    assert [(k, v.shape) for k, v in on.state_dict().items()] == [(k, v.shape) for k, v in off.state_dict().items()]
    assert sum(isinstance(m, Conv3x3) for m in on.modules()) == (2 if size == 64 else 4) and not any(isinstance(m, Conv3x3) for m in off.modules())


def test_conv3x3_is_a_custom_operator_that_compile_traces():
    """torch.ops.scalor.conv3x3 passes torch.library.opcheck (fake shapes, autograd registration,
    schema) and torch.compile traces a head through it in one graph (no graph break)."""
    x = torch.randn(2, 8, 6, 6, device=DEVICE, requires_grad=True)
    weight = torch.randn(3, 8, 3, 3, device=DEVICE, requires_grad=True)
    bias = torch.randn(3, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.scalor.conv3x3.default, (x, weight, bias))
    torch.library.opcheck(torch.ops.scalor.conv3x3.default, (x, weight, None))
    torch.library.opcheck(torch.ops.scalor.conv3x3_weight_grad.default, (x.detach(), torch.randn(2, 3, 6, 6, device=DEVICE)))

    def head(x):
        return torch.sigmoid(kernels.conv3x3(F.group_norm(F.celu(x), 4), weight, bias))

    explained = torch._dynamo.explain(head)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
