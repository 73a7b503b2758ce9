"""The fast path of SCALOR, applied from outside once the model is built: the same numbers, less time.

    model = SCALOR(cfg).to(device)
    opts = SpeedOptions.from_args(args).resolved(device)   # or SpeedOptions(): every switch on
    fast.apply(model, opts)                                # in place (and returned)

The plain model (`scalor.py`, `modules.py`) computes the paper's equations in plain PyTorch and runs
anywhere without this module. `apply` swaps in, with the same parameters and state_dict:

- `triton_convs`: the 3x3 and 4x4/2 convolutions (padding 1) of <= 16 channels a side run the Triton
  kernels of `kernels.py` on fp32 CUDA inputs (`Conv3x3`, `Conv4x4Stride2`); `dot_convs`: their
  forward as tensor-core products where `kernels.dot_pays`; `nhwc_weight_grad`: the weight gradient
  of the 17-32 channel ones by the channels-last Triton kernel (`ConvNHWCWeightGrad`);
- always: the glimpse decoder's two heads run as one (`FastGlimpseDecoder`), and the model becomes a
  `FastSCALOR` whose temperature and prior are 0-d tensors (a captured CUDA graph or a compiled
  frame function sees an input whose value changes, not a new constant);
- `checkpoint_glimpses`: the glimpse encoder and decoder recompute their activations in backward
  (`FastGlimpseEncoder.encode_at`, `FastSCALOR.decode_and_place`), and rendering's forward reuses
  the decoder-trunk features that the rejection test and the propagated alpha map computed
  already, running only the appearance head (`given_forward`);
- `fused_param_grads`: each frame uses its own aliases of the parameters, whose gradients are summed
  in T - 1 multi-tensor additions (`FrameParameters`) instead of one addition a use;
- `compile`: torch.compile of the convolution stacks and of the per-frame functions
  (`compile_blocks`, `compile_frames`), with a persistent inductor cache.

`cuda_graph` and `precision` act on the training step (`engine.TrainStep`, `set_precision`).
SpeedOptions are not part of the model: they are not in the Config nor in checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import kernels
from modules import GlimpseDecoder, GlimpseEncoder
from scalor import SCALOR, gather_slots
from utils import z_pres_prior_at

PRECISIONS = ("fp32", "fp32-strict", "tf32", "bf16")


# ------------------------------------------------------------------------------------------------
# The options
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpeedOptions:
    """How to run the model fast; none of it changes the numbers beyond float rounding."""
    checkpoint_glimpses: bool = True      # recompute glimpse encoder/decoder activations in backward:
                                          # far less memory, a little more time, the same numbers
    triton_convs: bool = True             # 3x3 and 4x4/2 convs of <= 16 channels a side (glimpse decoder heads,
                                          # encoders' first layers, background decoder's last) by Triton
                                          # kernels on CUDA in fp32; off: cuDNN. Same numbers
    nhwc_weight_grad: bool = True         # the weight gradient of 3x3 and 4x4/2 convs of 17-32 channels by a
                                          # Triton kernel on CUDA in fp32 (faster than cuDNN's on the decoder
                                          # trunk; docs/PERF_NOTES.md has the measurements); off: cuDNN. Same numbers
    dot_convs: bool = True                # the Triton convs' forward (and 3x3 input gradient) as tensor-core
                                          # products where they pay (kernels.dot_pays; TF32 only) instead of
                                          # fp32 FMAs (a faster step; docs/PERF_NOTES.md has the measurements)
    fused_param_grads: bool = True        # each parameter's gradients from the frames summed in one multi-tensor
                                          # pass at the end of backward (one alias a frame) instead of one
                                          # addition kernel a frame (~2,700 a step at the default config)
    cuda_graph: bool | None = None        # replay each training step from a captured CUDA graph; None: on where
                                          # the step runs on one CUDA GPU in one process (`resolved`)
    compile: bool = False                 # torch.compile the conv stacks and the per-frame code (GPU; the first
                                          # steps compile slowly on a cold cache, kept in ~/.cache/scalor-inductor)
    precision: str = "fp32"               # fp32 (PyTorch defaults), fp32-strict (no TF32), tf32, bf16 autocast
    cudnn_benchmark: bool = True          # let cuDNN time its algorithms once per shape (training shapes are fixed)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of {PRECISIONS}")

    HELP = {
        "checkpoint_glimpses": "recompute the glimpse encoder's and decoder's activations in backward, reusing the "
                               "rejection test's decoder features (default; far less memory)",
        "triton_convs": "run the small-channel 3x3 and 4x4/2 convolutions by the Triton kernels (default; "
                        "--no-triton-convs: cuDNN)",
        "nhwc_weight_grad": "the weight gradients of the 17-32 channel 3x3 and 4x4/2 convolutions by the Triton "
                            "kernel (default); --no-nhwc-weight-grad: by cuDNN",
        "dot_convs": "the Triton convolutions' forward by tensor-core products where they pay (default; TF32 "
                     "only); --no-dot-convs: by fp32 FMAs everywhere",
        "fused_param_grads": "sum each parameter's per-frame gradients in one multi-tensor pass (default); "
                             "--no-fused-param-grads: autograd's one addition a frame",
        "cuda_graph": "replay each training step from a captured CUDA graph (default on one CUDA GPU in one "
                      "process; --no-cuda-graph: eager steps)",
        "compile": "torch.compile the convolution stacks and the per-frame code around them (GPU; faster steps, "
                   "most with the CUDA graph; the first steps take much longer on a cold cache, kept in "
                   "~/.cache/scalor-inductor for later runs)",
        "precision": "GPU numerics: fp32 (PyTorch defaults), fp32-strict (no TF32), tf32, bf16 autocast [fp32]",
        "cudnn_benchmark": "let cuDNN time its algorithms for each convolution shape once (default); "
                           "--no-cudnn-benchmark: its heuristic choice",
    }

    def describe(self, device) -> str:
        """One line naming the path a step takes on `device`, e.g. "CUDA graph, Triton convs, fp32"."""
        if torch.device(device).type != "cuda":
            return "eager (CPU)"
        parts = ["compiled" if self.compile else None, "CUDA graph" if self.cuda_graph else "eager",
                 "Triton convs" if self.triton_convs else None,
                 "recomputed glimpses" if self.checkpoint_glimpses else None, self.precision]
        return ", ".join(p for p in parts if p)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser):
        """The options as flags (`--no-cuda-graph`, `--compile`, `--precision bf16`, ...) in a group of
        `parser`; `from_args` reads them back."""
        group = parser.add_argument_group("speed (fast.SpeedOptions: the same numbers, less time)")
        for field in dataclasses.fields(cls):
            flag = "--" + field.name.replace("_", "-")
            if field.name == "precision":
                group.add_argument(flag, choices=PRECISIONS, default=field.default, help=cls.HELP[field.name])
            else:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                   help=cls.HELP[field.name])
        return group

    @classmethod
    def from_args(cls, args) -> "SpeedOptions":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

    def resolved(self, device, distributed: bool = False, notice=print) -> "SpeedOptions":
        """The options for training on `device` (in `distributed` processes): cuda_graph None becomes on
        for one CUDA GPU in one process, off otherwise; CUDA graph and compile asked for without a CUDA
        device are turned off with a notice."""
        cuda = torch.device(device).type == "cuda"
        graph = self.cuda_graph
        if graph is None:
            graph = cuda and not distributed
        elif graph and not cuda:
            notice("notice: --cuda-graph needs a CUDA device; running eagerly")
            graph = False
        compile_ = self.compile
        if compile_ and not cuda:
            notice("notice: --compile needs a CUDA device; running eagerly")
            compile_ = False
        return dataclasses.replace(self, cuda_graph=graph, compile=compile_)


def set_precision(precision: str, cudnn_benchmark: bool = False) -> None:
    """fp32: PyTorch's defaults (fp32 tensors; cuDNN may use TF32 inside convolutions, matmuls in
    full fp32); fp32-strict: no TF32 anywhere; tf32: TF32 in matmuls too; bf16: autocast to bf16
    (`engine.TrainStep`).

    cudnn_benchmark: let cuDNN time its algorithms for each convolution shape once and keep the
    fastest. Training steps have fixed shapes (fixed object slots), so this costs time in the first
    steps only; same precision class, so the same numbers up to the order of summation inside a
    convolution."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")
    torch.backends.cudnn.allow_tf32 = precision != "fp32-strict"
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.benchmark = cudnn_benchmark


# ------------------------------------------------------------------------------------------------
# Applying them
# ------------------------------------------------------------------------------------------------

def apply(module: nn.Module, opts: SpeedOptions = SpeedOptions()) -> nn.Module:
    """Make `module` (a SCALOR, or any module holding its parts) fast according to `opts`, in place:
    the same parameters, state_dict and numbers. Returns it."""
    if opts.triton_convs:
        use_triton_convs(module)
    if opts.nhwc_weight_grad:
        use_nhwc_weight_grad(module)
    if opts.dot_convs:
        use_dot_convs(module)
    use_fast_modules(module, opts)
    if opts.compile and isinstance(module, SCALOR):
        compile_blocks(module)
        compile_frames(module)
    return module


def use_fast_modules(module: nn.Module, opts: SpeedOptions) -> None:
    """The glimpse networks and the model become their fast twins (`FastGlimpseDecoder`,
    `FastGlimpseEncoder`, `FastSCALOR`): classes with the same parameters and no state of their own."""
    for m in module.modules():
        if isinstance(m, GlimpseDecoder):
            m.__class__ = FastGlimpseDecoder
        elif isinstance(m, GlimpseEncoder):
            m.__class__ = FastGlimpseEncoder
            m.checkpoint = opts.checkpoint_glimpses
        elif isinstance(m, SCALOR):
            m.__class__ = FastSCALOR
            m.speed = opts
            m.frame_params = None


# ------------------------------------------------------------------------------------------------
# Triton convolutions
# ------------------------------------------------------------------------------------------------

def _swappable(m: nn.Module, kernel: int, stride: int) -> bool:
    return type(m) is nn.Conv2d and m.kernel_size == (kernel, kernel) and m.stride == (stride, stride) \
        and m.padding == (1, 1) and m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros"


def use_triton_convs(module: nn.Module) -> int:
    """Turn every nn.Conv2d of `module` that is 3x3 of stride 1 or 4x4 of stride 2, padding 1, with at
    most 16 channels a side into its Triton twin (Conv3x3, Conv4x4Stride2): the shapes where the
    kernels beat cuDNN (the glimpse decoder's heads, the encoders' first layers, the background
    decoder's last). Same module, parameters untouched. Returns how many."""
    count = 0
    for m in module.modules():
        if type(m) is nn.Conv2d and max(m.in_channels, m.out_channels) <= 16:
            if _swappable(m, 3, 1):
                m.__class__ = Conv3x3
                count += 1
            elif _swappable(m, 4, 2):
                m.__class__ = Conv4x4Stride2
                count += 1
    return count


def _triton_fits(x, weight, min_pixels: int = 0) -> bool:
    """Whether the Triton convolutions of `kernels` take this input: fp32 CUDA tensors of at least
    `min_pixels` pixels, outside autocast, with Triton installed."""
    return (x.is_cuda and x.dtype == weight.dtype == torch.float32 and x.shape[-2] * x.shape[-1] >= min_pixels
            and kernels.available() and not torch.is_autocast_enabled("cuda"))


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(cin, cout, 3, padding=1) -- same parameters, same state_dict -- that runs the Triton
    kernels of `kernels.conv3x3` on fp32 CUDA inputs of at least 32x32 pixels outside autocast (put in
    place by `use_triton_convs` for 16 channels or fewer a side, where cuDNN is slow: the glimpse decoder's heads,
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
    the Triton kernels of `kernels.conv4x4s2` on fp32 CUDA inputs outside autocast (put in place by
    `use_triton_convs` for the encoders' first layers, <= 4 -> 16 channels, where the Triton kernels
    run the glimpse encoder's backward faster than cuDNN; docs/PERF_NOTES.md has the measurements);
    cuDNN everywhere else.
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
    that pays (`kernels.dot_pays`): SpeedOptions.dot_convs, on by default. Parameters and state_dict
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
    by `use_nhwc_weight_grad` (SpeedOptions.nhwc_weight_grad, on by default)."""

    def _conv_forward(self, x, weight, bias):
        if _triton_fits(x, weight):
            return kernels.conv_nhwc_weight_grad(x, weight, bias, self.stride[0])
        return super()._conv_forward(x, weight, bias)


def use_nhwc_weight_grad(model: nn.Module) -> int:
    """Turn every plain nn.Conv2d of `model` that is 3x3 of stride 1 or 4x4 of stride 2 (padding 1)
    with 17-32 channels on its wider side into a ConvNHWCWeightGrad (the same module, parameters
    untouched). The kernel beats cuDNN's weight gradient over the glimpses (e.g. the 32 -> 32 3x3
    at 32x32) and is slower at 64 channels, hence the 32-channel bound; over the 20 frames of a
    batch it is slower in isolation, yet the whole step is fastest with those layers swapped too,
    so they are (docs/PERF_NOTES.md has the measurements). Returns how many."""
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
    backward produces it in NCHW, so cuDNN would copy it (the glimpse decoder's last two 1x1 convs:
    900 glimpses x (128, 16, 16) and (64, 32, 32), large copies every step). Marking the gradient
    channels-last in the traced graph lets inductor write it so in the kernel that computes it."""

    def forward(self, x):
        y = super().forward(x)
        if y.is_cuda and torch.compiler.is_compiling():
            y = _ChannelsLastGrad.apply(y)
        return y


# ------------------------------------------------------------------------------------------------
# The fast glimpse networks and model
# ------------------------------------------------------------------------------------------------

def _first_and_rest(head):                     # head -> its first conv, the rest (None for a one-conv head)
    return (head[0], head[1:]) if isinstance(head, nn.Sequential) else (head, None)


class FastGlimpseDecoder(GlimpseDecoder):
    """GlimpseDecoder whose two heads run as one: their first convolutions as one (16 -> 8 + 8, or
    16 -> 3 + 1: one pass over the features, one weight gradient) and their GroupNorms as one (same
    groups of channels): the numbers of dec_o(feat), dec_alpha(feat). `appearance_of_rows` reads the
    rows of features where they lie."""

    def forward(self, z_what):                 # (N, z_what_dim) -> o (N, 3, G, G), alpha (N, 1, G, G)
        o, alpha = self._both_heads(self.trunk(z_what))
        return torch.sigmoid(o), torch.sigmoid(alpha)

    def _both_heads(self, feat):               # trunk (N, 16, G, G) -> dec_o(feat), dec_alpha(feat)
        (first_o, rest_o), (first_a, rest_a) = _first_and_rest(self.dec_o), _first_and_rest(self.dec_alpha)
        h = first_o._conv_forward(feat, torch.cat((first_o.weight, first_a.weight)),
                                  torch.cat((first_o.bias, first_a.bias)))             # (N, Co + Ca, G, G)
        if rest_o is None:                     # one conv each
            return h.split((first_o.out_channels, first_a.out_channels), 1)
        (celu, norm_o, last_o), (_, norm_a, last_a) = rest_o, rest_a                   # CELU -> GN -> conv
        h = F.group_norm(celu(h), norm_o.num_groups + norm_a.num_groups, torch.cat((norm_o.weight, norm_a.weight)),
                         torch.cat((norm_o.bias, norm_a.bias)), norm_o.eps)
        h_o, h_a = h.split((first_o.out_channels, first_a.out_channels), 1)
        return last_o(h_o), last_a(h_a)

    def appearance_of_rows(self, feats, rows):  # trunks (N1, 16, G, G), (N2, ...), rows (M,) -> o (M, 3, G, G)
        """appearance(torch.cat(feats)[rows]): with the Triton kernels the first convolution reads the
        rows where they are (no concatenation, no gather), else the features are gathered first."""
        first, rest = _first_and_rest(self.dec_o)
        if isinstance(first, Conv3x3) and _triton_fits(feats[0], first.weight, Conv3x3.MIN_PIXELS):
            h = kernels.conv3x3_rows(feats[0], feats[1], rows, first.weight, first.bias, first.dot)
        else:
            h = first(torch.cat(feats)[rows])
        return torch.sigmoid(h if rest is None else rest(h))


class FastGlimpseEncoder(GlimpseEncoder):
    """GlimpseEncoder whose crop-and-encode recomputes its activations in backward (`checkpoint`,
    SpeedOptions.checkpoint_glimpses), with the frame's parameter aliases (`pinned`)."""

    checkpoint = True

    def encode_at(self, frames, z_where):
        return maybe_checkpoint(self.checkpoint, pinned(self, super().encode_at), frames, z_where)


class FastSCALOR(SCALOR):
    """SCALOR with the speed options `speed` (SpeedOptions): temperature and prior as 0-d tensors,
    per-frame parameter aliases (`fused_param_grads`), and rendering that recomputes the decoder in
    backward and reuses the frame's gradient-free decodes (`checkpoint_glimpses`)."""

    speed = SpeedOptions()
    frame_params = None

    def forward(self, seq, step: int = 0, tau=1.0, generate: bool = False, nll: bool = False,
                keep_records: bool = False, z_pres_prior=None, state=None):
        # 0-d tensors (a fill, no copy or sync), as the CUDA-graph path always passes them: compiled
        # frame functions see an input whose value changes, not a new constant every step. (On CUDA a
        # Python-float divisor is applied as its reciprocal: the last bit of the z_pres samples.)
        prior = z_pres_prior_at(self.cfg, step) if z_pres_prior is None else z_pres_prior
        tau, prior = (v if torch.is_tensor(v) else torch.full((), v, dtype=seq.dtype, device=seq.device)
                      for v in (tau, prior))
        if self.speed.fused_param_grads and torch.is_grad_enabled() and seq.shape[1] > 1:
            self.frame_params = FrameParameters(self, seq.shape[1])     # each frame its own aliases
        try:
            return super().forward(seq, step, tau, generate, nll, keep_records, prior, state)
        finally:
            if self.frame_params is not None:
                self.frame_params.restore()
                self.frame_params = None

    def step_frame(self, *args, **kwargs):
        if self.frame_params is not None:
            self.frame_params.use_next()
        return super().step_frame(*args, **kwargs)

    def decode_and_place(self, objects, decodes=None):
        """SCALOR.decode_and_place, recomputed in backward (`checkpoint_glimpses`); when the frame's
        gradient-free decodes of the propagated objects and the proposals are both there (with
        recomputation, or without gradient), the forward runs only the appearance head on their
        trunk features and reuses their alpha; backward recomputes the whole decode (`given_forward`)."""
        B, R = objects.z_pres.shape
        G = self.cfg.glimpse_size
        dec = self.glimpse_dec

        def decode_and_place(z_what, z_where):
            o_att, alpha_att = dec(z_what.flatten(0, 1))
            return self.place(o_att.view(B, R, 3, G, G), alpha_att.view(B, R, 1, G, G), z_where)

        decode_and_place = pinned(dec, decode_and_place)   # recomputed in backward with the frame's aliases
        reuse = self.speed.checkpoint_glimpses or not torch.is_grad_enabled()
        if reuse and decodes is not None and decodes.propagated is not None and decodes.proposals is not None:
            prop, disc = decodes.propagated, decodes.proposals
            K, C, index = prop.alpha.shape[1], disc.alpha.shape[1], objects.index
            # rows of [propagated (B*K); discovered (B*C)] rendered: the features stay where they are
            batch = torch.arange(B, device=index.device)[:, None]
            rows = torch.where(index < K, batch * K + index, B * K + batch * C + index - K).flatten()   # (B*R,)
            feats = (prop.features.flatten(0, 1), disc.features.flatten(0, 1))
            alpha = gather_slots(torch.cat((prop.alpha, disc.alpha), 1), index)

            def place_decoded(z_what, z_where):
                o_att = dec.appearance_of_rows(feats, rows)
                return self.place(o_att.view(B, R, 3, G, G), alpha, z_where)
            return given_forward(place_decoded, decode_and_place, (objects.z_what, objects.z_where), dec.parameters())
        return maybe_checkpoint(self.speed.checkpoint_glimpses, decode_and_place, objects.z_what, objects.z_where)


# ------------------------------------------------------------------------------------------------
# Activation recomputation
# ------------------------------------------------------------------------------------------------

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
    additions -- at the default config ~2,700 single additions a step fewer (SpeedOptions.fused_param_grads).
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
        self.next_frame = t + 1

    def use_next(self) -> None:
        """The next frame's aliases (the first frame's on the first call)."""
        self.use(getattr(self, "next_frame", 0))

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


# ------------------------------------------------------------------------------------------------
# Compilation
# ------------------------------------------------------------------------------------------------

def persistent_compile_cache(folder: str = "~/.cache/scalor-inductor") -> None:
    """Inductor's caches (FX graphs, Triton kernels, autotuning) in `folder`, unless the user set
    TORCHINDUCTOR_CACHE_DIR: a second run starts from the first one's compiled code."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(folder).expanduser()))
    import torch._inductor.config as inductor_config
    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True


def use_shuffle_layout_hint(module: nn.Module) -> int:
    """Turn each 1x1 nn.Conv2d that feeds a PixelShuffle into a Conv1x1BeforeShuffle (same
    parameters and numbers; a layout hint under torch.compile on CUDA). Returns how many."""
    count = 0
    for m in module.modules():
        if isinstance(m, nn.Sequential):
            layers = list(m)
            for conv, shuffle in zip(layers, layers[1:]):
                if type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and isinstance(shuffle, nn.PixelShuffle):
                    conv.__class__ = Conv1x1BeforeShuffle
                    count += 1
    return count


def compile_blocks(model) -> None:
    """torch.compile each convolution stack of the model in place (fixed shapes), fusing its
    CELU/GroupNorm passes. Parameter names and state_dict keys are unchanged; the numbers agree with
    eager execution up to the order of summation in the fused reductions. The decoder is compiled
    whole (its forward: rendering's recomputation in backward) and in its two gradient-free parts
    (`features_and_alpha`: rejection and alpha maps; `appearance`, `appearance_of_rows`: rendering's
    forward)."""
    persistent_compile_cache()
    use_shuffle_layout_hint(model)
    if not isinstance(model.glimpse_dec, FastGlimpseDecoder):
        use_fast_modules(model, getattr(model, "speed", SpeedOptions()))
    for block in (model.glimpse_enc, model.glimpse_dec, model.image_enc.image_enc, model.proposal,
                  getattr(model, "bg_enc", None), getattr(model, "bg_dec", None)):
        if block is not None:
            block.compile(dynamic=False)
    dec = model.glimpse_dec
    for name in ("features_and_alpha", "appearance", "appearance_of_rows"):
        if name not in vars(dec):                              # not compiled already
            setattr(dec, name, torch.compile(getattr(dec, name), dynamic=False))


FRAME_FUNCTIONS = ("discover", "choose_rendered", "composite", "background", "likelihood", "hand_off")


def compile_frames(model, backend: str = "inductor") -> None:
    """torch.compile the per-frame code around the convolution stacks, in training with fixed object
    slots (fixed shapes; `phase_obj_num_contrain`): propagation, discovery, the choice of objects to
    render, compositing, background, likelihood, hand-off: hundreds of small operations on
    (B, K, ...) latents a frame, forward and backward, each otherwise a kernel of its own. Random
    numbers come from PyTorch's generator in the eager order and shape (inductor's
    `fallback_random`), so the numbers are eager execution's up to the order of float sums. In
    evaluation (capacities follow the data) the eager functions run. The compiled functions are
    bound to the model like its methods, so a deep copy runs its own. `backend`: torch.compile's
    (the tests trace with "aot_eager"). A plain SCALOR becomes a FastSCALOR first (temperature and
    prior as tensors), its speed options as they are (SpeedOptions() when it had none)."""
    if backend == "inductor":
        persistent_compile_cache()
    use_shuffle_layout_hint(model)
    if not isinstance(model, FastSCALOR):
        use_fast_modules(model, SpeedOptions())
    for name in FRAME_FUNCTIONS:
        _compile_method(model, name, backend)
    _compile_method(model.propagation, "forward", backend)


def _compile_method(module, name: str, backend: str) -> None:
    if name in vars(module):                                   # compiled already
        return
    function = getattr(type(module), name)
    compiled = torch.compile(function, dynamic=False, backend=backend,
                             options={"fallback_random": True} if backend == "inductor" else None)

    @functools.wraps(function)
    def call(self, *args, **kwargs):
        if self.training and self.cfg.phase_obj_num_contrain:
            return compiled(self, *args, **kwargs)
        return function(self, *args, **kwargs)
    setattr(module, name, types.MethodType(call, module))
