"""scripts/learning_curve.py: which checkpoint stands for "after M minutes of training"."""
import json
from pathlib import Path

import pytest

from scripts.learning_curve import checkpoint_at, step_minutes


def test_minutes_come_from_the_loss_log_and_pick_the_newest_checkpoint_saved_by_then(tmp_path):
    log = tmp_path / "losses.jsonl"
    times = {1: 1000.0, 100: 1030.0, 200: 1060.0, 300: 1090.0, 400: 1120.0}     # 30 s a 100 steps
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0, "skipped": False, "time": t}) + "\n"
                           for s, t in times.items()))
    minutes = step_minutes(log)
    assert minutes == pytest.approx({1: 0.0, 100: 0.5, 200: 1.0, 300: 1.5, 400: 2.0})
    found = [Path(f"ckpt_{s:08d}.pt") for s in (100, 200, 300, 400)]
    assert checkpoint_at(found, minutes, 1.0).name == "ckpt_00000200.pt"
    assert checkpoint_at(found, minutes, 1.9).name == "ckpt_00000300.pt"
    assert checkpoint_at(found, minutes, 2.0).name == "ckpt_00000400.pt"
    assert checkpoint_at(found, minutes, 0.4) is None


def test_a_line_cut_short_by_a_killed_run_is_skipped(tmp_path):
    log = tmp_path / "losses.jsonl"
    log.write_text('{"step": 1, "loss": 1.0, "skipped": false, "time": 10.0}\n'
                   '{"step": 2, "loss": 1.0, "skipped": false, "time": 70.0}\n{"step": 3, "lo')
    assert step_minutes(log) == {1: 0.0, 2: 1.0}


def test_a_log_without_times_is_refused(tmp_path):
    log = tmp_path / "losses.jsonl"
    log.write_text('{"step": 1, "loss": 1.0, "skipped": false}\n')
    with pytest.raises(SystemExit, match="holds no times"):
        step_minutes(log)
