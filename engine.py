"""One SCALOR training step -- forward, backward, gradient-norm clip, RMSprop -- run eagerly or
replayed from a captured CUDA graph.

The model's training forward has fixed shapes and no host synchronisation, so a whole step can be
captured once and replayed: the CPU then launches one graph instead of thousands of kernels.
What changes from step to step enters through static tensors (the batch, the temperature tau, the
z_pres prior and, under a learning-rate schedule, the learning rate); the two step-dependent switches
(detaching object state before `remove_detach_step`, the alpha curriculum) select one of at most four
graphs.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from utils import step_switches, tau_at, z_pres_prior_at


def make_optimizer(model, cuda_graph: bool = False):
    """The reference's optimizer: RMSprop at cfg.lr (capturable when steps are graph-captured)."""
    return torch.optim.RMSprop(model.parameters(), lr=model.cfg.lr, capturable=cuda_graph)


@dataclass
class StepResult:
    loss: torch.Tensor        # () total loss (device)
    counts: torch.Tensor      # (B, T) objects tracked per frame
    grad_norm: torch.Tensor   # () gradient norm before clipping
    finite: torch.Tensor      # () bool: loss and gradient norm finite (else no update was made)
    terms: dict               # {name: ()} frame-averaged log-likelihood and KL terms
    output: object = None     # the SCALOROutput of eager steps (records when asked for)


class TrainStep:
    """Callable: step_fn(batch, step) -> StepResult, applying one optimizer step.

    `step` is the 1-based optimizer step (temperature tau_at(step - 1), prior of `step`).
    A step whose loss or gradient norm is not finite changes no parameter: eager steps skip the
    optimizer (one host sync); graph-replayed steps zero the gradients on the device instead, so
    RMSprop's running average of squared gradients decays once."""

    def __init__(self, model, optimizer, precision: str = "fp32", cuda_graph: bool = False, warmup: int = 2,
                 forward=None):
        self.model, self.optimizer = model, optimizer
        self.forward = forward if forward is not None else model   # e.g. the DistributedDataParallel wrapper
        self.cfg = model.cfg
        self.precision = precision
        self.cuda_graph = cuda_graph
        self.warmup = warmup
        self.graphs = {}          # key -> (graph, static inputs and outputs)
        self.seen = {}            # key -> eager steps taken (warm-up before capture)
        self.lr = None            # () device tensor the captured graphs read the learning rate from (set_lr)

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps. Captured graphs cannot see a changed float, so with
        CUDA graphs the optimizer reads it from one device tensor, installed before the first capture."""
        if not self.cuda_graph:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            return
        if self.lr is None:
            if self.graphs:
                raise RuntimeError("set_lr after a CUDA graph was captured with a constant learning rate")
            self.lr = torch.tensor(float(lr), device=next(self.model.parameters()).device)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
        self.lr.fill_(lr)

    def _forward_backward(self, batch, step, tau, prior, keep_records=False, inject_nan=False, capturing=False):
        model, cfg = self.model, self.cfg
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.precision == "bf16", cache_enabled=False):
            out = self.forward(batch, step=step, tau=tau, z_pres_prior=prior, keep_records=keep_records)
            loss = out.loss()
        if inject_nan:   # test hook: a NaN loss, and so NaN gradients
            loss = loss * float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.cp)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        if torch.distributed.is_available() and torch.distributed.is_initialized():   # every process agrees
            finite = finite.to(torch.int32)
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            finite = finite.bool()
        if capturing:                 # no host sync possible: zero the gradients of a bad step
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.masked_fill_(~finite, 0.0)     # one kernel a parameter (where + copy: three)
            self.optimizer.step()
        elif bool(finite):
            self.optimizer.step()
        terms = {k: v.detach() for k, v in out.terms().items()}
        # nothing returned may keep this step's autograd graph alive (it would break a later capture)
        return StepResult(loss.detach(), out.counts.detach(), grad_norm.detach(), finite, terms,
                          None if capturing else out.detach())

    def __call__(self, batch, step: int, keep_records: bool = False, inject_nan: bool = False) -> StepResult:
        cfg = self.cfg
        tau, prior = tau_at(cfg, step - 1), z_pres_prior_at(cfg, step)
        if not self.cuda_graph or keep_records or inject_nan:
            return self._forward_backward(batch, step, tau, prior, keep_records, inject_nan)
        key = step_switches(cfg, step)   # the two step-dependent branches of the forward
        if key not in self.graphs:
            if self.seen.get(key, 0) < self.warmup:     # eager warm-up steps on a side stream
                self.seen[key] = self.seen.get(key, 0) + 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    result = self._forward_backward(batch, step, tau, prior)
                torch.cuda.current_stream().wait_stream(side)
                return result
            try:
                self.graphs[key] = self._capture(batch, step)
            except RuntimeError as e:   # an operation that cannot be captured: eager steps from here on
                self.cuda_graph = False
                reason = " ".join(str(e).split())[:200]
                print(f"notice: the CUDA graph capture failed ({type(e).__name__}: {reason}); training goes on with "
                      f"eager steps (--no-cuda-graph skips the capture)", file=sys.stderr, flush=True)
                return self._forward_backward(batch, step, tau, prior)
        graph, static = self.graphs[key]
        static["batch"].copy_(batch, non_blocking=True)
        static["tau"].fill_(tau)
        static["prior"].fill_(prior)
        graph.replay()
        return static["result"]

    def _capture(self, batch, step):
        static = {"batch": batch.clone(), "tau": torch.zeros((), device=batch.device),
                  "prior": torch.zeros((), device=batch.device)}
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # thread_local: data-loader threads (pinned memory) may use CUDA while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static["result"] = self._forward_backward(static["batch"], step, static["tau"], static["prior"],
                                                      capturing=True)
        return graph, static
