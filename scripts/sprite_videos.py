"""Sprite videos with ground truth on disk, for track.py: frames as PNGs, ground truth as MOTChallenge files.

    python scripts/sprite_videos.py OUT [--preset easy] [--num 4] [--length 60] [--size H W] [--seed S] [--overwrite]
    python scripts/sprite_videos.py --demo          # the demo/ folder of the README (40 frames, 64x64)

OUT/videos/<name>/0000.png ... (one folder per video, the layout data.write_to_disk writes) and
OUT/gt/<name>.txt (`frame,id,x,y,w,h,1,-1,-1,-1`, frame 1-based, the tight box of each object's
visible pixels, objects with at least evaluate.MIN_GT_AREA visible pixels, as evaluate.py counts
them). Score tracks of them with `python track.py OUT/videos --checkpoint CKPT --out DIR --score OUT/gt`.
OUT is written whole at the end (a non-empty one is refused unless --overwrite, which replaces it); bad
arguments print one line and exit with status 2.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import DataError, make_sprites, write_to_disk  # noqa: E402
from evaluate import TEST_SEED, ground_truth_frames  # noqa: E402
from track import ground_truth_file  # noqa: E402
from utils import (Parser, discard_work, interrupted_message, move_into_place, out_folder_problem, seed_arg,  # noqa: E402
                   sigterm_as_interrupt, unwritable_out, work_folder)

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
DEMO = dict(preset="spmot", num=1, length=40, size=(64, 64), seed=TEST_SEED + 666, index=3)


def write_sprite_videos(out_dir, preset: str = "easy", num: int = 4, length: int = 60, size=None,
                        seed: int = TEST_SEED + 666) -> dict:
    """Write `num` sprite videos of `length` frames (size (H, W); None: the preset's) and their
    ground truth. Returns {"videos": folder, "gt": folder, "names": [name], "data": the MovingSprites}."""
    out_dir = Path(out_dir)
    img_h, img_w = size if size is not None else (None, None)
    data = make_sprites(preset, img_h=img_h, img_w=img_w, seq_len=length, num_sequences=num, seed=seed)
    videos = write_to_disk(data, out_dir / "videos", num)
    gt_dir = out_dir / "gt"
    gt_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}" for i in range(num)]
    for i, name in enumerate(names):
        ground_truth_file(gt_dir / f"{name}.txt", ground_truth_frames(data.ground_truth(i)))
    return {"videos": videos, "gt": gt_dir, "names": names, "data": data}


def write_demo(folder=DEMO_DIR) -> Path:
    """demo/: 40 frames (64x64 PNGs) of one 'spmot' sprite video (the bundled checkpoint's training scenes), and demo/ground_truth/demo.txt."""
    folder = Path(folder)
    data = make_sprites(DEMO["preset"], img_h=DEMO["size"][0], img_w=DEMO["size"][1], seq_len=DEMO["length"],
                        num_sequences=DEMO["index"] + 1, seed=DEMO["seed"])
    tmp = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    write_to_disk(data, tmp, DEMO["index"] + 1)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp / f"{DEMO['index']:06d}", folder)
    shutil.rmtree(tmp)
    (folder / "ground_truth").mkdir()
    ground_truth_file(folder / "ground_truth" / "demo.txt", ground_truth_frames(data.ground_truth(DEMO["index"])))
    return folder


def main(argv=None) -> int:
    p = Parser(prog="sprite_videos.py", description="Write sprite videos (PNG frames) and MOTChallenge ground truth.")
    p.add_argument("out", nargs="?", help="output folder (videos/ and gt/ inside)")
    p.add_argument("--demo", action="store_true", help="(re)write the repository's demo/ folder")
    p.add_argument("--preset", default="easy")
    p.add_argument("--num", type=int, default=4, help="videos")
    p.add_argument("--length", type=int, default=60, help="frames per video")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="default: the preset's")
    p.add_argument("--seed", type=seed_arg, default=TEST_SEED + 666)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    args = p.parse_args(argv)
    if args.demo:
        if args.out is not None:
            p.error("--demo (re)writes the repository's demo/ folder: drop OUT")
        print(f"wrote {write_demo()}")
        return 0
    if args.out is None:
        p.error("pass OUT or --demo")
    if problem := out_problem(args):
        print(f"sprite_videos.py: error: {problem}", file=sys.stderr)
        return 2
    try:
        work, made = work_folder(args.out)
    except OSError as e:
        print(f"sprite_videos.py: error: {unwritable_out(args.out, e, 'OUT')}", file=sys.stderr)
        return 2
    try:
        with sigterm_as_interrupt():
            written = write_sprite_videos(work, args.preset, args.num, args.length, args.size, args.seed)
            move_into_place(work, args.out)
    except DataError as e:                 # an unknown preset, a size the preset cannot draw
        print(f"sprite_videos.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:         # Ctrl-C or SIGTERM: nothing half-written
        print(interrupted_message("sprite_videos.py", e, args.out, "OUT"), file=sys.stderr)
        return 130
    finally:
        discard_work(work, made)           # gone already once moved into place
    out = Path(args.out)
    print(f"wrote {len(written['names'])} videos to {out / 'videos'} and their ground truth to {out / 'gt'}")
    return 0


def out_problem(args) -> str | None:
    """What is wrong with the arguments for writing OUT, in one line naming the fix; None if nothing."""
    if args.num < 1 or args.length < 1:
        return f"--num ({args.num}) and --length ({args.length}) must be positive"
    return out_folder_problem(args.out, args.overwrite, name="OUT")


if __name__ == "__main__":
    sys.exit(main())
