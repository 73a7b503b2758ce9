"""MOTA of track.py's exported files against the model's internal scoring, on the same sprite videos.

    python scripts/compare_track_export.py --checkpoint CKPT [--preset easy] [--num 20] [--length 50]
                                           [--out DIR] [--device auto|cpu|cuda] [--window N] [--seed S]
                                           [--[no-]first-frame-rejection] [--no-evaluate] [--overwrite]

1. writes `num` held-out sprite videos of `length` frames at the model's image size, with ground truth
   (scripts/sprite_videos.py; scene seed 20000 for every run, apart from training's and evaluate.py's);
2. runs track.py on them (`tight`: its defaults; `glimpse`: `--box glimpse`; `tight_alpha`: `--masks
   alpha`, each object's own alpha; `tight_raw`: `--masks alpha --duplicate-iou 0`, every prediction as
   the model makes it) and scores the written MOTChallenge files read back (track.score_folder);
3. scores the model's own predictions on the same videos as evaluate.py does (its functions:
   sequence_predictions, accumulate with box / tight box / mask IoU, summarize), over the whole video
   (the state handed across windows, so the same draws as track.py: the tight-box MOTA must equal the
   `tight_raw` export) and cut into non-overlapping seq_len chunks with
   ids restarting (what evaluate.py measures on its own seq_len test sequences);
4. unless --no-evaluate, runs `evaluate.py` itself on its sprite test set (sequences of `length` frames,
   or seq_len when `length` is not longer than the frames generation observes) with the same
   first-frame-rejection setting and takes its tracking_box_tight / tracking_mask MOTA;

and prints one JSON object (also written to OUT/compare.json). The run is written into a folder beside
OUT and moved into place when it has finished; an existing OUT is replaced only with --overwrite.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import evaluate as ev  # noqa: E402
from checkpoints import CheckpointError  # noqa: E402
from common import ConfigError  # noqa: E402
import track  # noqa: E402
from data import DataError, check_preset, load_frame  # noqa: E402
from scripts.sprite_videos import write_sprite_videos  # noqa: E402
from utils import Parser, discard_work, move_into_place, pick_device, seed_arg, seed_everything, tau_at, work_folder  # noqa: E402

SCENE_SEED = 20_000


def internal_scores(model, payload, videos_dir: Path, truths: list, window: int, seed: int, chunk: int | None,
                    device) -> dict:
    """evaluate.py's three MOTAs of the model's predictions on the videos on disk.

    chunk None: each whole video, windows of `window` with the state handed across (track.py's run);
    chunk N: non-overlapping N-frame pieces, each a fresh sequence (ids restart), as evaluate.py cuts."""
    cfg = model.cfg
    step = int(payload.get("step", 0))
    tau = tau_at(cfg, step)
    box, tight, mask = [], [], []
    for i, truth in enumerate(truths):
        paths = sorted((videos_dir / f"{i:06d}").glob("*.png"))
        frames = torch.stack([load_frame(p, None, cfg.img_h, cfg.img_w) for p in paths])
        seed_everything(seed)
        pieces = [(0, len(frames))] if chunk is None else \
            [(s, s + chunk) for s in range(0, len(frames) - chunk + 1, chunk)]
        size = window if chunk is None else chunk
        for start, stop in pieces:
            with torch.no_grad():
                records = [record for _, record in track.run_windows(model, frames[start:stop], size, step, tau, device)]
            preds = ev.sequence_predictions(records, cfg.img_h, cfg.img_w)[0]
            gt = truth[start:stop]
            box.append(ev.accumulate([(g.ids, g.xywh) for g in gt], [(p.ids, p.xywh) for p in preds]))
            tight.append(ev.accumulate([(g.ids, g.xywh) for g in gt], [(p.ids, p.tight) for p in preds]))
            mask.append(ev.accumulate([(g.ids, g.masks) for g in gt], [(p.ids, p.masks) for p in preds],
                                      ev.mask_iou_distance))
    return {name: ev.summarize(accs)["mota"] for name, accs in (("box", box), ("box_tight", tight), ("mask", mask))}


def main(argv=None) -> int:
    p = Parser(description="MOTA of track.py's exported files vs the internal scoring.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--preset", default="easy")
    p.add_argument("--num", type=int, default=20, help="videos")
    p.add_argument("--length", type=int, default=50, help="frames per video")
    p.add_argument("--out", default="compare_track",
                   help="folder of the run (written whole at the end; an existing non-empty one needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--window", type=int, default=None, help="track.py --window (default: the checkpoint's seq_len)")
    p.add_argument("--seed", type=seed_arg, default=0, help="sampling seed (track.py --seed)")
    p.add_argument("--first-frame-rejection", action=argparse.BooleanOptionalAction, default=None,
                   help="for every run here (default: on unless the checkpoint has phase_rejection off, as track.py "
                        "and evaluate.py infer)")
    p.add_argument("--thresholds", default="0.5",
                   help="comma-separated track.py --z-pres-threshold values to export (tight boxes) and score; "
                        "the first is also used for the glimpse-box export (the internal scoring uses 0.5)")
    p.add_argument("--duplicate-iou", type=float, default=track.DUPLICATE_IOU,
                   help="track.py --duplicate-iou of the exports (second tracks, and who keeps an overlap in visible "
                        "masks; tight_raw keeps every track)")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                   help="skip running evaluate.py on its own test set")
    args = p.parse_args(argv)
    try:
        thresholds = check_args(args)
        device = pick_device(args.device)
        model, payload = ev.load_model_for_inference(args.checkpoint, device, args.first_frame_rejection)
    except (CheckpointError, ConfigError, DataError, ev.EvalError) as e:
        print(f"compare_track_export.py: error: {e}", file=sys.stderr)
        return 2
    work, made = None, []
    try:
        work, made = work_folder(args.out, "compare")
        code = compare(args, model, payload, thresholds, device, Path(work))
        if code == 0:
            move_into_place(work, args.out)
        return code
    except OSError as e:
        print(f"compare_track_export.py: error: cannot write --out '{args.out}' ({e.strerror or e}): pass another "
              f"--out", file=sys.stderr)
        return 2
    finally:
        discard_work(work, made)                         # gone already once moved into place


def check_args(args) -> list[float]:
    """ConfigError / DataError (one line) for an argument that cannot work, before anything is written; returns
    the z_pres thresholds."""
    for name in ("num", "length"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)} must be at least 1")
    if args.window is not None and args.window < 1:
        raise ConfigError(f"--window {args.window} must be at least 1")
    check_preset(args.preset)
    try:
        thresholds = [float(v) for v in args.thresholds.split(",")]
    except ValueError:
        raise ConfigError(f"--thresholds '{args.thresholds}' must be comma-separated numbers, e.g. 0.5,0.7") from None
    if not all(0 < t < 1 for t in thresholds):
        raise ConfigError(f"--thresholds '{args.thresholds}': each must lie strictly between 0 and 1")
    if not 0 <= args.duplicate_iou <= 1:
        raise ConfigError(f"--duplicate-iou must lie in [0, 1] (0 keeps all objects), got {args.duplicate_iou}")
    ev.check_out(args)
    return thresholds


def compare(args, model, payload, thresholds: list[float], device, out: Path) -> int:
    """Steps 1-4 of the module docstring, everything written into `out`; returns an exit code."""
    cfg = model.cfg
    window = args.window or cfg.seq_len
    scene_seed = ev.test_scene_seed(cfg.seed, SCENE_SEED)
    written = write_sprite_videos(out / "data", args.preset, args.num, args.length, (cfg.img_h, cfg.img_w), scene_seed)
    data = written["data"]
    truths = [ev.ground_truth_frames(data.ground_truth(i)) for i in range(args.num)]

    ffr = "--first-frame-rejection" if cfg.first_frame_rejection else "--no-first-frame-rejection"
    # (name, box, masks, z_pres threshold, duplicate IoU)
    dup = args.duplicate_iou
    runs = [("tight", "tight", "visible", thresholds[0], dup), ("glimpse", "glimpse", "visible", thresholds[0], dup),
            ("tight_alpha", "tight", "alpha", thresholds[0], dup), ("tight_raw", "tight", "alpha", thresholds[0], 0.0)]
    runs += [(f"tight_{t:g}", "tight", "visible", t, dup) for t in thresholds[1:]]
    exported, by_threshold = {}, {}
    for name, box, masks, threshold, duplicate_iou in runs:
        folder = out / f"tracks_{name}"
        code = track.main([str(written["videos"]), "--checkpoint", args.checkpoint, "--out", str(folder), "--box", box,
                           "--masks", masks, "--window", str(window), "--device", args.device, "--seed", str(args.seed),
                           ffr, "--z-pres-threshold", str(threshold), "--duplicate-iou", str(duplicate_iou),
                           "--score", str(written["gt"])])
        if code != 0:
            return code
        with open(folder / "score.json") as f:
            overall = json.load(f)["overall"]
        if threshold == thresholds[0]:
            exported[name] = overall
        if box == "tight" and masks == "visible":
            by_threshold[f"{threshold:g}"] = overall["mota"]

    result = {
        "checkpoint": os.path.abspath(args.checkpoint), "step": int(payload.get("step", 0)), "preset": args.preset,
        "videos": args.num, "length": args.length, "image_size": [cfg.img_h, cfg.img_w], "window": window,
        "seq_len": cfg.seq_len, "first_frame_rejection": cfg.first_frame_rejection,
        "export_mota": {name: m["mota"] for name, m in exported.items()},
        "export_id_switches": {name: m["id_switches"] for name, m in exported.items()},
        "export_false_positives": {name: m["false_positives"] for name, m in exported.items()},
        "export_misses": {name: m["misses"] for name, m in exported.items()},
        "export_z_pres_threshold": thresholds[0], "export_duplicate_iou": args.duplicate_iou,
        "export_tight_mota_by_z_pres_threshold": by_threshold,
        "internal_whole_video_mota": internal_scores(model, payload, written["videos"], truths, window, args.seed,
                                                     None, device),
        "internal_seq_len_chunks_mota": internal_scores(model, payload, written["videos"], truths, window, args.seed,
                                                        cfg.seq_len, device),
    }
    if args.evaluate:
        eval_out = out / "evaluate"
        code = ev.main(["--checkpoint", args.checkpoint, "--dataset", "sprites", "--preset", args.preset,
                        "--num-sequences", str(args.num), "--out", str(eval_out), "--device", args.device, ffr]
                       + (["--seq-len", str(args.length)] if args.length > cfg.observe_frames else []))
        if code != 0:
            return code
        with open(eval_out / "report.json") as f:
            report = json.load(f)
        result["evaluate_py_mota"] = {k: report[f"tracking_{k}"]["mota"] for k in ("box", "box_tight", "mask")}
    text = json.dumps(ev.json_ready(result), indent=2)
    (out / "compare.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
