"""scripts/learning_curve.py: which checkpoint stands for "after M minutes of training"."""
import json
from pathlib import Path

import pytest

from scripts.learning_curve import CurveError, checkpoint_at, main, step_minutes


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
    with pytest.raises(CurveError, match="holds no times"):
        step_minutes(log)


@pytest.mark.parametrize("case, message", [("missing", "holds no summary/losses.jsonl"),
                                           ("no_checkpoints", "holds no checkpoints"),
                                           ("bad_minutes", "--minutes '1,abc'"), ("no_times", "holds no times"),
                                           ("too_early", "no checkpoint of"), ("own_flag", "'--out' after --"),
                                           ("out_under_a_file", "cannot write --out")])
def test_bad_input_is_one_line_exit_2_with_nothing_written(tmp_path, capsys, case, message):
    run = tmp_path / "run"
    if case != "missing":
        (run / "summary").mkdir(parents=True)
        (run / "checkpoints").mkdir()
        time = "" if case == "no_times" else ', "time": 5.0'
        lines = '{"step": 1, "loss": 1.0, "skipped": false%s}\n' % time
        if case == "too_early":                                        # its only checkpoint: after 10 minutes
            lines += '{"step": 2, "loss": 1.0, "skipped": false, "time": 605.0}\n'
        (run / "summary" / "losses.jsonl").write_text(lines)
        if case != "no_checkpoints":
            (run / "checkpoints" / f"ckpt_0000000{2 if case == 'too_early' else 1}.pt").write_bytes(b"")
    minutes = "1,abc" if case == "bad_minutes" else "1"
    out = tmp_path / "curve"
    if case == "out_under_a_file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "curve"
    extra = ["--", "--preset", "spmot", "--out", "elsewhere"] if case == "own_flag" else []
    assert main([str(run), "--minutes", minutes, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not (tmp_path / "curve").exists()
    assert not out.exists() and not (tmp_path / "elsewhere").exists()


def test_each_minute_is_evaluated_once():
    from scripts.learning_curve import parse_minutes
    assert parse_minutes("1,2,1.0,4") == [1.0, 2.0, 4.0]


def test_out_is_written_whole_and_a_failed_evaluation_leaves_the_old_one(tmp_path, checkpoint, capsys):
    """A run of one checkpoint (step 1234) at minute 1: OUT/min_1/report.json and curve.json; a non-empty
    OUT needs --overwrite; an evaluation that fails (a bad evaluate.py flag) leaves the old OUT as it was
    and no work folder."""
    import shutil
    run = tmp_path / "run"
    (run / "summary").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "summary" / "losses.jsonl").write_text('{"step": 1234, "loss": 1.0, "skipped": false, "time": 5.0}\n')
    shutil.copy(checkpoint, run / "checkpoints" / "ckpt_00001234.pt")
    out = tmp_path / "curve"
    flags = [str(run), "--minutes", "1", "--out", str(out)]
    evaluate_flags = ["--", "--num-sequences", "2", "--batch-size", "2", "--device", "cpu", "--protocol", "ocrb",
                      "--ocrb-start-frame", "1"]
    assert main(flags + evaluate_flags) == 0
    assert sorted(p.name for p in out.iterdir()) == ["curve.json", "min_1"]
    row, = json.loads((out / "curve.json").read_text())
    report = json.loads((out / "min_1" / "report.json").read_text())["tracking_ocrb"]
    assert row["step"] == 1234 and row["ocrb_mota"] == report["mota"]
    assert row["ocrb_miss_merged"] == report["errors"]["miss"]["merged"]
    assert main(flags + evaluate_flags) == 2
    assert "exists and is not empty: pass --overwrite" in capsys.readouterr().err
    assert main(flags + ["--overwrite", "--", "--bogus-flag"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["curve.json", "min_1"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
