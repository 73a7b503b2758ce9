"""Speed and memory of a SCALOR training step (forward + backward + RMSprop) on the GPU.

    python bench.py                       # default config, batch 20, the reference's workload
    python bench.py --precision bf16      # bf16 autocast
    python bench.py --scaling             # step time and memory vs objects in the scene and vs grid
    python bench.py --sync-check          # one training step under torch.cuda.set_sync_debug_mode("error")

Workload (as the reference was measured): per sequence a background of random 8x8 RGB noise
upsampled bilinearly and scaled by 0.5, and 20 filled squares of half-size 4-7 px, colours in
[0.5, 1], constant velocity in [-3, 3] px/frame, wrapping at the edges; four fixed batches cycled.
Steps `--warmup` .. `--warmup + --steps` are timed with CUDA events; the median is reported.
Prints one JSON line per configuration.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from common import Config
from data import bench_batches
from scalor import SCALOR
from utils import seed_everything, tau_at


def build(cfg: Config, device, compile_model: bool, channels_last: bool):
    model = SCALOR(cfg).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=cfg.lr)
    step_model = torch.compile(model) if compile_model else model
    return model, step_model, optimizer


def train_step(model, step_model, optimizer, seq, step: int, precision: str):
    cfg = model.cfg
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = step_model(seq, step=step, tau=tau_at(cfg, step - 1))
        loss = out.loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.cp)
    optimizer.step()
    return loss.detach(), out.counts.detach().mean()


def run(cfg: Config, args, num_objects: int) -> dict:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    seed_everything(cfg.seed)
    model, step_model, optimizer = build(cfg, device, args.compile, args.channels_last)
    batches = [b.to(device) for b in bench_batches(4, cfg.batch_size, cfg.seq_len, cfg.img_h, cfg.img_w,
                                                   num_objects=num_objects, seed=0)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses, objects = [], [], []
    for i in range(args.warmup + args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss, count = train_step(model, step_model, optimizer, batches[i % 4], i + 1, args.precision)
        end.record()
        losses.append(loss)
        objects.append(count)
        if i >= args.warmup:
            times.append((start, end))
    torch.cuda.synchronize()
    ms = [s.elapsed_time(e) for s, e in times]
    median = statistics.median(ms)
    return {
        "ms_per_step": round(median, 2),
        "sequences_per_s": round(cfg.batch_size * 1000 / median, 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "objects_tracked_mean": round(float(torch.stack(objects[args.warmup:]).mean()), 2),
        "loss_first": [round(float(v), 3) for v in losses[:5]],
        "loss_last": round(float(losses[-1]), 3),
        "precision": args.precision, "compile": args.compile, "channels_last": args.channels_last,
        "scene_objects": num_objects,
        "config": {k: getattr(cfg, k) for k in ("img_h", "num_cell_h", "glimpse_size", "max_num_obj", "batch_size",
                                                 "seq_len", "phase_conv_lstm")},
        "device": torch.cuda.get_device_name(),
    }


def sync_check(cfg: Config) -> dict:
    """One training step with host synchronisations turned into errors (the loss read after)."""
    device = torch.device("cuda")
    model, _, optimizer = build(cfg, device, False, False)
    seq = bench_batches(1, cfg.batch_size, cfg.seq_len, cfg.img_h, cfg.img_w, seed=0)[0].to(device)
    train_step(model, model, optimizer, seq, 1, "fp32")           # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(seq, step=2, tau=tau_at(cfg, 1))
        loss = out.loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"sync_check": "passed: forward+backward+step ran with set_sync_debug_mode('error')",
            "loss": float(loss), "objects_tracked": out.counts.mean().item()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--glimpse-size", type=int, default=64)
    p.add_argument("--max-num-obj", type=int, default=45)
    p.add_argument("--seq-len", type=int, default=10)
    p.add_argument("--num-objects", type=int, default=20, help="squares per sequence in the workload")
    p.add_argument("--no-conv-lstm", action="store_true")
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--scaling", action="store_true", help="table over scene objects and grids")
    p.add_argument("--sync-check", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.py needs a CUDA GPU", file=sys.stderr)
        return 2
    cfg = Config(img_h=args.img_size, img_w=args.img_size, num_cell_h=args.grid, num_cell_w=args.grid,
                 glimpse_size=args.glimpse_size, max_num_obj=args.max_num_obj, batch_size=args.batch_size,
                 seq_len=args.seq_len, observe_frames=min(5, args.seq_len - 1), phase_conv_lstm=not args.no_conv_lstm)
    if args.sync_check:
        print(json.dumps(sync_check(cfg)), flush=True)
        return 0
    if not args.scaling:
        print(json.dumps(run(cfg, args, args.num_objects)), flush=True)
        return 0
    for n in (10, 45, 100):      # objects in the scene; cap = every cell of the 8x8 grid
        print(json.dumps({"table": "objects", **run(cfg.replace(max_num_obj=64), args, n)}), flush=True)
    for grid in (4, 8, 16):      # grid sizes at the default cap (at most the number of cells)
        c = cfg.replace(num_cell_h=grid, num_cell_w=grid, max_num_obj=min(cfg.max_num_obj, grid * grid))
        print(json.dumps({"table": "grid", **run(c, args, args.num_objects)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
