"""Make a training checkpoint into a small one to ship or share: config, weights, step and the data
description only (no optimizer or RNG states, which only resuming needs).

    python scripts/ship_checkpoint.py runs/NAME/checkpoints/ckpt_00001000.pt checkpoints/sprites_small.pt

The result loads in track.py and evaluate.py like any checkpoint (torch.load(weights_only=True)).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoints import CheckpointError, SaveError, read_checkpoint, save_checkpoint  # noqa: E402


def ship(source: str, target: str) -> dict:
    """Write `target` from `source`; returns what was kept besides the weights."""
    payload = read_checkpoint(source)
    extra = {"data": payload["data"]} if isinstance(payload.get("data"), dict) else {}
    save_checkpoint(target, model_state=payload["model"], step=int(payload["step"]), cfg=payload["config"], **extra)
    return {"step": int(payload["step"]), **extra}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Strip a checkpoint to config, weights, step and data description.")
    p.add_argument("source", help="a checkpoint written by train.py")
    p.add_argument("target", help="the file to write")
    args = p.parse_args(argv)
    try:
        kept = ship(args.source, args.target)
    except (CheckpointError, SaveError) as e:
        print(f"ship_checkpoint.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.target} (step {kept['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
