"""Make a training checkpoint into a small one to ship or share: config, weights, step and the data
description only (no optimizer or RNG states, which only resuming needs).

    python scripts/ship_checkpoint.py runs/NAME/checkpoints/ckpt_00001000.pt checkpoints/sprites_small.pt --overwrite

The result loads in track.py and evaluate.py like any checkpoint (torch.load(weights_only=True)).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoints import CheckpointError, SaveError, read_checkpoint, save_checkpoint  # noqa: E402
from utils import Parser, missing_parents  # noqa: E402


def ship(source: str, target: str) -> dict:
    """Write `target` from `source`; returns what was kept besides the weights."""
    payload = read_checkpoint(source)
    extra = {"data": payload["data"]} if isinstance(payload.get("data"), dict) else {}
    save_checkpoint(target, model_state=payload["model"], step=int(payload["step"]), cfg=payload["config"], **extra)
    return {"step": int(payload["step"]), **extra}


def target_problem(source: str, target: str, overwrite: bool = False) -> str | None:
    """What makes `target` unusable, in one line naming the fix; None if nothing: the source itself (its
    optimizer and random states would be lost), a folder, a path under a file, or (without `overwrite`)
    any file that exists."""
    if os.path.exists(target) and os.path.exists(source) and os.path.samefile(source, target):
        return f"the target '{target}' is the source: its optimizer and random states would be lost; pass another file"
    if os.path.isdir(target):
        return f"the target '{target}' is a folder: pass a file name, e.g. {os.path.join(target, 'model.pt')}"
    if os.path.exists(target) and not overwrite:
        return f"the target '{target}' exists: pass --overwrite to replace it, or another file"
    missing = missing_parents(target)                   # the nearest folder above that exists, or a file
    parent = os.path.dirname(missing[0] if missing else os.path.abspath(target))
    if not os.path.isdir(parent):
        return f"the target '{target}' lies under '{parent}', which is a file: pass a path in a folder"
    return None


def main(argv=None) -> int:
    p = Parser(description="Strip a checkpoint to config, weights, step and data description.")
    p.add_argument("source", help="a checkpoint written by train.py")
    p.add_argument("target", help="the file to write")
    p.add_argument("--overwrite", action="store_true", help="replace the target if it exists")
    args = p.parse_args(argv)
    problem = target_problem(args.source, args.target, args.overwrite)
    if problem:
        print(f"ship_checkpoint.py: error: {problem}", file=sys.stderr)
        return 2
    try:
        kept = ship(args.source, args.target)
    except (CheckpointError, SaveError) as e:
        print(f"ship_checkpoint.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.target} (step {kept['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
