"""Speed and memory of a SCALOR training step (forward + backward + RMSprop) on the GPU.

    python bench.py                       # default config, batch 20, the reference's workload, the default
                                          # fast path (fast.SpeedOptions: Triton convs, CUDA graph, ...)
    python bench.py --compile             # ... compiled too (the inductor cache persists in ~/.cache/scalor-inductor)
    python bench.py --no-cuda-graph       # eager steps
    python bench.py --precision bf16      # bf16 autocast
    python bench.py --scaling             # step time and memory vs objects in the scene and vs grid
    python bench.py --sync-check          # one training step under torch.cuda.set_sync_debug_mode("error")
    python bench.py --weight-grads        # weight gradients of the 17-64 channel convolutions: cuDNN vs Triton

Workload (as the reference was measured): per sequence a background of random 8x8 RGB noise
upsampled bilinearly and scaled by 0.5, and 20 filled squares of half-size 4-7 px, colours in
[0.5, 1], constant velocity in [-3, 3] px/frame, wrapping at the edges; four fixed batches cycled.
Steps `--warmup` .. `--warmup + --steps` are timed with CUDA events; the median is reported.
Prints one JSON line per configuration. `peak_allocated_gib` covers every step, warm-up included
(cuDNN's algorithm search, graph capture); `steady_peak_allocated_gib` only the timed steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

import fast
from common import Config, ConfigError, check_flags_at_least
from data import bench_batches
from engine import TrainStep, make_optimizer
from fast import SpeedOptions, compile_blocks, compile_frames, set_precision
from scalor import SCALOR
from utils import Parser, seed_everything


def build(cfg: Config, device, args, speed: SpeedOptions):
    model = SCALOR(cfg).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fast.apply(model, speed)
    if args.compile_blocks:
        compile_blocks(model)
    if args.compile_frames:
        compile_frames(model)
    optimizer = make_optimizer(model, cuda_graph=speed.cuda_graph)
    return model, TrainStep(model, optimizer, precision=speed.precision, cuda_graph=speed.cuda_graph)


def run(cfg: Config, args, num_objects: int, speed: SpeedOptions) -> dict:
    device = torch.device("cuda")
    set_precision(speed.precision, cudnn_benchmark=speed.cudnn_benchmark)
    seed_everything(cfg.seed)
    model, step_fn = build(cfg, device, args, speed)
    batches = [b.to(device) for b in bench_batches(4, cfg.batch_size, cfg.seq_len, cfg.img_h, cfg.img_w,
                                                   num_objects=num_objects, seed=0)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses, objects = [], [], []
    warmup_peak = 0
    started = time.perf_counter()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:   # from here the steady state: cuDNN's algorithm search and capture are done
            torch.cuda.synchronize()
            warmup_s = time.perf_counter() - started      # compiling, algorithm search, capture
            warmup_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = step_fn(batches[i % 4], i + 1)
        end.record()
        losses.append(result.loss.clone())
        objects.append(result.counts.mean())
        if i >= args.warmup:
            times.append((start, end))
    torch.cuda.synchronize()
    if args.profile:
        profile(step_fn, batches, args.warmup + args.steps, args.profile)
    ms = [s.elapsed_time(e) for s, e in times]
    median = statistics.median(ms)
    return {
        "ms_per_step": round(median, 2),
        "sequences_per_s": round(cfg.batch_size * 1000 / median, 2),
        "peak_allocated_gib": round(max(warmup_peak, torch.cuda.max_memory_allocated()) / 2**30, 2),
        "steady_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "objects_tracked_mean": round(float(torch.stack(objects[args.warmup:]).mean()), 2),
        "warmup_s": round(warmup_s, 1),
        "loss_first": [round(float(v), 3) for v in losses[:5]],
        "loss_last": round(float(losses[-1]), 3),
        "loss_trace": {i + 1: round(float(losses[i]), 1) for i in range(0, len(losses), max(1, len(losses) // 10))},
        **dataclasses.asdict(speed), "channels_last": args.channels_last,
        "compile_blocks": args.compile_blocks or speed.compile, "compile_frames": args.compile_frames or speed.compile,
        "scene_objects": num_objects,
        "config": {k: getattr(cfg, k) for k in ("img_h", "num_cell_h", "glimpse_size", "max_num_obj", "batch_size",
                                                 "seq_len", "phase_conv_lstm")},
        "device": torch.cuda.get_device_name(),
    }


def profile(step_fn, batches, first_step: int, num_steps: int, rows: int = 30) -> None:
    """Profile num_steps more steps and print (stderr) the GPU kernels by total time."""
    from torch.profiler import ProfilerActivity
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(num_steps):
            step_fn(batches[i % 4], first_step + i + 1)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70),
          file=sys.stderr, flush=True)


def sync_check(cfg: Config, speed: SpeedOptions) -> dict:
    """One eager training step with host synchronisations turned into errors (loss read after)."""
    set_precision("fp32")
    model = fast.apply(SCALOR(cfg).cuda().train(), dataclasses.replace(speed, compile=False))
    step_fn = TrainStep(model, make_optimizer(model))
    seq = bench_batches(1, cfg.batch_size, cfg.seq_len, cfg.img_h, cfg.img_w, seed=0)[0].cuda()
    step_fn(seq, 1)                                   # warm-up (lazy initialisation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = step_fn(seq, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"sync_check": "passed: forward+backward+clip+RMSprop ran under set_sync_debug_mode('error')",
            "loss": float(result.loss), "objects_tracked": float(result.counts.mean())}


# (images, channels in, out, input size, kernel, stride) of the default config's 17-64 channel 3x3 and
# 4x4/2 convolutions at batch 20: 900 = 45 slots x 20 tracked glimpses, 1,280 = 64 cells x 20 proposals
WEIGHT_GRAD_SHAPES = ((900, 32, 32, 32, 3, 1),    # glimpse decoder trunk, 32 -> 32 at 32x32
                      (900, 64, 64, 16, 3, 1),    # glimpse decoder trunk, 64 -> 64 at 16x16
                      (1280, 16, 32, 32, 4, 2),   # glimpse encoder of the proposals, 16 -> 32
                      (900, 16, 32, 32, 4, 2),    # glimpse encoder of the tracked objects
                      (20, 16, 32, 64, 4, 2),     # image encoder, 16 -> 32 at 64x64
                      (20, 32, 32, 32, 3, 1))     # image encoder, 32 -> 32 at 32x32


def _median_us(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return round(statistics.median(times), 1)


def weight_grad_table(speed: SpeedOptions):
    """For each shape of WEIGHT_GRAD_SHAPES: the weight gradient's time (us, median of 20) in cuDNN
    (NCHW and channels-last tensors) and in kernels._weight_grad_nhwc (channels-last and NCHW,
    read in place), and the largest difference of the Triton result from cuDNN's (relative to its
    largest entry)."""
    import kernels
    set_precision(speed.precision, cudnn_benchmark=speed.cudnn_benchmark)
    conv_backward = torch.ops.aten.convolution_backward
    for n, cin, cout, size, k, s in WEIGHT_GRAD_SHAPES:
        out_size = kernels._out_size(size, k, s)
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(n, cin, size, size, device="cuda", generator=gen)
        weight = torch.randn(cout, cin, k, k, device="cuda", generator=gen) / (cin * k * k) ** 0.5
        grad_y = torch.randn(n, cout, out_size, out_size, device="cuda", generator=gen)
        row = {"table": "weight_grad", "images": n, "channels": [cin, cout], "size": size, "kernel": k, "stride": s}
        for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xs, ws, gs = (t.contiguous(memory_format=fmt) for t in (x, weight, grad_y))
            cudnn = lambda: conv_backward(gs, xs, ws, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1,  # noqa: E731
                                          [False, True, False])[1]
            row[f"cudnn_{layout}_us"] = _median_us(cudnn)
            row[f"triton_{layout}_us"] = _median_us(lambda: kernels._weight_grad_nhwc(xs, gs, k, s))
            want = cudnn()
            row[f"triton_{layout}_max_rel_diff"] = float((kernels._weight_grad_nhwc(xs, gs, k, s) - want).abs().max()
                                                         / want.abs().max())
        yield row


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--glimpse-size", type=int, default=64)
    p.add_argument("--max-num-obj", type=int, default=45)
    p.add_argument("--seq-len", type=int, default=10)
    p.add_argument("--num-objects", type=int, default=20, help="squares per sequence in the workload")
    p.add_argument("--no-conv-lstm", action="store_true")
    SpeedOptions.add_arguments(p)   # the same speed flags as train.py: --no-cuda-graph, --compile, --precision, ...
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile-blocks", action="store_true", help="torch.compile the conv stacks only")
    p.add_argument("--compile-frames", action="store_true",
                   help="torch.compile the per-frame code only (propagation, discovery, rendering, hand-off)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more steps and print the GPU kernels by total time")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--scaling", action="store_true",
                   help="tables: scenes of 10/45/100 squares, each with a cap of as many, on a 16x16 grid; "
                        "grids 4x4/8x8/16x16 at the cap --max-num-obj (at most the cells)")
    p.add_argument("--sync-check", action="store_true")
    p.add_argument("--weight-grads", action="store_true",
                   help="time the weight gradients of the default config's 17-64 channel 3x3 and 4x4/2 convolutions "
                        "in cuDNN and in the Triton kernel (the default nhwc_weight_grad's), one JSON line per shape")
    args = p.parse_args(argv)
    try:
        check_flags_at_least(args, (("warmup", 0), ("steps", 1), ("num_objects", 0), ("profile", 0)))
        cfg = Config(img_h=args.img_size, img_w=args.img_size, num_cell_h=args.grid, num_cell_w=args.grid,
                     glimpse_size=args.glimpse_size, max_num_obj=args.max_num_obj, batch_size=args.batch_size,
                     seq_len=args.seq_len, observe_frames=max(0, min(5, args.seq_len - 1)),
                     phase_conv_lstm=not args.no_conv_lstm)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: bench.py needs a CUDA GPU (it times GPU training steps)", file=sys.stderr)
        return 2
    speed = SpeedOptions.from_args(args).resolved("cuda")     # one GPU, one process: the CUDA graph by default
    if args.sync_check:
        print(json.dumps(sync_check(cfg, speed)), flush=True)
        return 0
    if args.weight_grads:
        for row in weight_grad_table(speed):
            print(json.dumps(row), flush=True)
        return 0
    if not args.scaling:
        print(json.dumps(run(cfg, args, args.num_objects, speed)), flush=True)
        return 0
    for n in (10, 45, 100):      # objects in the scene, with a cap of as many; a 16x16 grid holds 100
        c = cfg.replace(num_cell_h=16, num_cell_w=16, max_num_obj=n)
        print(json.dumps({"table": "objects", **run(c, args, n, speed)}), flush=True)
    for grid in (4, 8, 16):      # grid sizes at the default cap (at most the number of cells)
        c = cfg.replace(num_cell_h=grid, num_cell_w=grid, max_num_obj=min(cfg.max_num_obj, grid * grid))
        print(json.dumps({"table": "grid", **run(c, args, args.num_objects, speed)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
