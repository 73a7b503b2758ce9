"""fast.compile_frames: the per-frame code compiled gives eager execution's numbers, and random
numbers are drawn in the latents' shape whatever layout a compiled graph gives them."""
import shutil
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F

import fast
from data import bench_batches
from fast import compile_frames
from modules import normal_rsample, relaxed_bernoulli_rsample
from scalor import SCALOR
from utils import tau_at, z_pres_prior_at


def _loss_and_grads(model, batch, step):
    torch.manual_seed(1)
    out = model(batch, step=step, tau=tau_at(model.cfg, step - 1), z_pres_prior=z_pres_prior_at(model.cfg, step))
    loss = out.loss()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return loss.detach(), grads


def test_compiled_frame_functions_give_the_eager_numbers(tiny_cfg):
    """Traced in one graph each (no graph break), reused from step to step (tau and the prior enter
    as tensors, not constants), and the same loss and gradients as eager for the same seed, also
    after remove_detach_step (gradients then flow through the state: a few graphs more, once). Traced
    with the aot_eager backend here (inductor's C++ compile of these graphs takes minutes on 2 CPU
    cores; the layout-dependent part of inductor is the noise, tested below)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = fast.apply(SCALOR(tiny_cfg).train(), fast.SpeedOptions())
    batch = bench_batches(1, 2, tiny_cfg.seq_len, tiny_cfg.img_h, tiny_cfg.img_w, num_objects=8, seed=0)[0]
    late = tiny_cfg.remove_detach_step + 1          # the state no longer detached: new graph variants
    want = [_loss_and_grads(model, batch, step) for step in (100, 101, late)]
    compile_frames(model, backend="aot_eager")
    counters = torch._dynamo.utils.counters
    counters.clear()
    got = [_loss_and_grads(model, batch, 100)]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 12                 # seven functions, two of them in two variants (first frame, others)
    got.append(_loss_and_grads(model, batch, 101))
    assert counters["stats"]["unique_graphs"] == graphs    # the next step reuses them
    got.append(_loss_and_grads(model, batch, late))
    graphs_late = counters["stats"]["unique_graphs"]
    assert graphs_late <= graphs + 4                       # once, at the switch, not every step
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    for (loss, grads), (loss_ref, grads_ref) in zip(got, want):
        torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
        for g, r in zip(grads, grads_ref):
            assert (g is None) == (r is None)
            if r is not None:
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * float(r.abs().max()))
    model.eval()                                             # evaluation runs the eager functions
    with torch.no_grad():
        model(batch[:1], step=100)
    assert counters["stats"]["unique_graphs"] == graphs_late


def test_compiled_frame_functions_belong_to_their_model(tiny_cfg):
    """A deep copy of a model with compiled frame functions computes with its own parameters; without
    fixed object slots (capacities follow the data) the eager functions run, no graph is built."""
    torch._dynamo.reset()
    model = fast.apply(SCALOR(tiny_cfg).train(), fast.SpeedOptions())
    compile_frames(model, backend="aot_eager")
    compile_frames(model, backend="aot_eager")               # a second call changes nothing
    copy = deepcopy(model)
    batch = bench_batches(1, 2, tiny_cfg.seq_len, tiny_cfg.img_h, tiny_cfg.img_w, num_objects=8, seed=0)[0]
    copy(batch, step=100).loss().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in copy.proposal.parameters())
    assert all(p.grad is not None for p in copy.propagation.tracker.parameters())

    torch._dynamo.reset()
    free = fast.apply(SCALOR(tiny_cfg.replace(phase_obj_num_contrain=False)).train(), fast.SpeedOptions())
    compile_frames(free, backend="aot_eager")
    counters = torch._dynamo.utils.counters
    counters.clear()
    free(batch, step=100).loss().backward()
    assert counters["stats"]["unique_graphs"] == 0


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_noise_is_drawn_in_shape_order_in_a_compiled_graph():
    """Inductor lays a convolution's output out channels-last on the CPU; noise drawn `_like` it
    would follow that layout and differ from eager's. Drawn in the tensor's shape (with inductor's
    fallback_random), compiled and eager sampling agree."""
    weight = torch.randn(8, 3, 3, 3)
    x = torch.randn(2, 3, 6, 5)

    def sample(x):
        mean, std = F.conv2d(x, weight, padding=1).chunk(2, 1)
        z = normal_rsample(mean, F.softplus(std))
        logits = F.conv2d(x, weight[:1], padding=1)
        return z, relaxed_bernoulli_rsample(logits, torch.tensor(0.5))

    torch.manual_seed(3)
    want = sample(x)
    torch._dynamo.reset()
    compiled = torch.compile(sample, dynamic=False, options={"fallback_random": True})
    torch.manual_seed(3)
    got = compiled(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
