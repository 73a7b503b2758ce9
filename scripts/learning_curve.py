"""Tracking quality against minutes of training: evaluate.py on a run's checkpoints nearest below
given minutes of wall-clock training.

    python train.py --recipe sprites --preset spmot --max-minutes 8 --save-freq 200 --keep-checkpoints 1000 \
        --run-name curve
    python scripts/learning_curve.py runs/curve --minutes 1,2,4,8 --out curve/ -- --preset spmot --protocol ocrb

The run's minutes are read from its `summary/losses.jsonl` (each step's wall-clock time, counted from
the first logged step); for each minute the newest `ckpt_<step>.pt` saved by then is evaluated with the
evaluate.py flags after `--`, its report written to OUT/min_<M>/, and one table printed (also
OUT/curve.json). OUT is written whole at the end (a non-empty one is refused unless --overwrite, which
replaces it); a failed evaluation leaves nothing.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import evaluate  # noqa: E402
from checkpoints import list_checkpoints  # noqa: E402
from utils import (Parser, discard_work, interrupted_message, move_into_place, out_folder_problem,  # noqa: E402
                   sigterm_as_interrupt, unwritable_out, work_folder)


class CurveError(Exception):
    """Bad input; the one-line message names the problem and the fix."""


OWN_EVALUATE_FLAGS = ("--checkpoint", "--out", "--overwrite")   # evaluate.py flags this script sets


def parse_minutes(text: str) -> list[float]:
    try:
        minutes = [float(m) for m in text.split(",")]
    except ValueError:
        raise CurveError(f"--minutes '{text}' must be comma-separated numbers, e.g. 1,2,4,8") from None
    if not all(m > 0 for m in minutes):
        raise CurveError(f"--minutes '{text}': each must be positive")
    return list(dict.fromkeys(minutes))         # each minute once


def read_run(run: Path) -> tuple[dict[int, float], list[Path]]:
    """The run's step -> minutes and its checkpoints; CurveError if it is not a run folder."""
    losses = run / "summary" / "losses.jsonl"
    if not losses.is_file():
        raise CurveError(f"'{run}' holds no summary/losses.jsonl: pass a run folder written by train.py "
                         "(runs/<--run-name>)")
    checkpoints = list_checkpoints(run / "checkpoints") if (run / "checkpoints").is_dir() else []
    if not checkpoints:
        raise CurveError(f"'{run}' holds no checkpoints/ckpt_*.pt: train with --save-freq and --keep-checkpoints "
                         "high enough to keep one a minute")
    return step_minutes(losses), checkpoints


def step_minutes(losses_path: Path) -> dict[int, float]:
    """step -> minutes since the first logged step, from a run's losses.jsonl (wall-clock: a resumed
    run counts its pause too). A line cut short by a killed run is skipped."""
    records = []
    for line in losses_path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    timed = [r for r in records if "time" in r]
    if not timed:
        raise CurveError(f"'{losses_path}' holds no times: train with this version of train.py")
    start = timed[0]["time"]
    return {r["step"]: (r["time"] - start) / 60 for r in timed}


def checkpoint_at(checkpoints: list[Path], minutes_of: dict[int, float], minute: float) -> Path | None:
    """The newest checkpoint whose step was trained by `minute`."""
    by_then = [p for p in checkpoints if minutes_of.get(int(p.stem.split("_")[1]), float("inf")) <= minute + 1e-9]
    return by_then[-1] if by_then else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = Parser(description="evaluate.py on a run's checkpoints at given minutes of training.",
                                usage="%(prog)s RUN --out OUT [--minutes 1,2,4,8] [--overwrite] [-- EVALUATE-FLAGS ...]",
                                epilog="Flags after -- go to every evaluate.py call (e.g. -- --preset spmot --protocol ocrb).")
    p.add_argument("run", help="the run folder (holding checkpoints/ and summary/)")
    p.add_argument("--minutes", default="1,2,4,8", help="comma-separated minutes of training (default 1,2,4,8)")
    p.add_argument("--out", required=True, help="folder for min_<M>/report.json and curve.json")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    try:
        minutes = parse_minutes(args.minutes)
        owned = [flag for flag in extra if flag.split("=")[0] in OWN_EVALUATE_FLAGS]
        if owned:
            raise CurveError(f"'{owned[0]}' after -- is set by learning_curve.py itself (each checkpoint, into "
                             f"OUT/min_<M>/): drop it")
        minutes_of, checkpoints = read_run(Path(args.run))
        if not any(checkpoint_at(checkpoints, minutes_of, minute) for minute in minutes):
            raise CurveError(f"no checkpoint of '{args.run}' was saved by minute {max(minutes):g}: pass later "
                             f"--minutes or train with a lower --save-freq")
        data_dir = extra[extra.index("--data-dir") + 1] if "--data-dir" in extra[:-1] else None
        if problem := out_folder_problem(args.out, args.overwrite, [args.run, data_dir]):
            raise CurveError(problem)
        try:
            work, made = work_folder(args.out)
        except OSError as e:
            raise CurveError(unwritable_out(args.out, e)) from None
    except CurveError as e:
        print(f"learning_curve.py: error: {e}", file=sys.stderr)
        return 2
    try:
        with sigterm_as_interrupt():
            code = evaluate_minutes(Path(work), minutes, minutes_of, checkpoints, extra)
            if code == 0:
                move_into_place(work, args.out)
        return code
    except KeyboardInterrupt as e:   # Ctrl-C or SIGTERM (also while evaluate.py loads): one line, nothing written
        print(interrupted_message("learning_curve.py", e, args.out), file=sys.stderr)
        return 130
    finally:
        discard_work(work, made)     # gone already once moved into place


def evaluate_minutes(out: Path, minutes: list, minutes_of: dict, checkpoints: list, extra: list) -> int:
    """evaluate.py at each minute into out/min_<M>/, then out/curve.json and the table; evaluate.py's
    exit status if one fails."""
    rows = []
    for minute in minutes:
        path = checkpoint_at(checkpoints, minutes_of, minute)
        if path is None:
            print(f"notice: no checkpoint saved by minute {minute:g}", file=sys.stderr)
            continue
        folder = out / f"min_{minute:g}"
        code = evaluate.main(["--checkpoint", str(path), "--out", str(folder), *extra])
        if code:
            return code
        report = json.loads((folder / "report.json").read_text())
        step = report["step"]
        row = {"minutes": minute, "trained_minutes": round(minutes_of[step], 2), "step": step}
        for kind in ("tracking_box_tight", "tracking_mask"):
            if report.get(kind):
                row[f"mota_{kind[9:]}"] = report[kind]["mota"]
        ocrb = report.get("tracking_ocrb")
        if ocrb:
            row.update({f"ocrb_{k}": ocrb[k] for k in ("mota", "motp", "mostly_tracked", "id_switches")})
            row["ocrb_miss_merged"] = ocrb["errors"]["miss"]["merged"]    # objects lost in a neighbour's mask
        rows.append(row)
    (out / "curve.json").write_text(json.dumps(rows, indent=1))
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
