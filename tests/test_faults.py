"""Issue 26: never lose a run, never run a stranger's code. One test (or parametrised family) per
defect; each checks the one-line message, the exit code and that nothing is half-written or lost."""
import errno
import fcntl
import json
import os
import re
import signal
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate as ev
import train
from scalor import SCALOR
from checkpoints import read_checkpoint, save_checkpoint
from utils import unique_names
from conftest import run_dirs

TINY = ["--small", "--img-h", "64", "--img-w", "64", "--seq-len", "2", "--batch-size", "2", "--steps", "2",
        "--print-freq", "1000", "--generate-freq", "1000", "--save-freq", "1000", "--num-sprite-sequences", "4",
        "--num-img-summary", "1", "--workers", "0", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run fastest on one thread


def one_error_line(capsys) -> str:
    """The one line on stderr besides the progress bar's."""
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
           if line.strip() and not re.match(r"(train|evaluate): +\d+%", line)]
    assert len(err) == 1, err
    return err[0]


def losses(folder: Path) -> list:
    with open(folder / "summary" / "losses.jsonl") as f:
        return [json.loads(line) for line in f]


def write_frames(folder: Path, names, size=(64, 64)) -> Path:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        w, h = size if not isinstance(name, tuple) else name[1]
        name = name if not isinstance(name, tuple) else name[0]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    save_checkpoint(str(path), SCALOR(tiny_cfg), step=7, cfg=tiny_cfg)
    return path


# ---- 1: a checkpoint that would run code is refused; ours load with weights_only=True ----------------

class RunsCode:
    """Unpickling this makes a folder: the mark of code run by torch.load(weights_only=False)."""

    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return os.mkdir, (self.mark,)


@pytest.mark.parametrize("tool", ["train", "evaluate"])
def test_a_checkpoint_that_would_run_code_is_refused(tool, tmp_path, tiny_cfg, monkeypatch, capsys):
    mark = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "scalor-checkpoint-v1", "config": tiny_cfg.to_dict(), "step": 1,
                "model": SCALOR(tiny_cfg).state_dict(), "extra": RunsCode(str(mark))}, evil)
    monkeypatch.chdir(tmp_path)
    if tool == "train":
        assert train.main(TINY + ["--run-name", "evil", "--resume", str(evil)]) == 2
    else:
        assert ev.main(["--checkpoint", str(evil), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert "is not a SCALOR checkpoint or holds objects other than tensors and plain values" in line, line
    assert not mark.exists()                                     # nothing of it ran
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_checkpoints_load_with_weights_only_and_resume_exactly(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train.main(TINY + run_dirs(whole, "--steps", "3")) == 0
    assert train.main(TINY + run_dirs(cut, "--steps", "2")) == 0
    payload = torch.load(cut / "checkpoints" / "ckpt_00000002.pt", weights_only=True)   # no error
    assert isinstance(payload["rng"]["numpy"]["keys"], torch.Tensor)
    assert train.main(TINY + run_dirs(cut, "--steps", "3", "--resume", "auto")) == 0
    assert [r["loss"] for r in losses(cut)] == [r["loss"] for r in losses(whole)]


def test_checkpoints_get_the_modes_open_would_give(tmp_path):
    """Readable by whoever the umask lets read (mkstemp alone would leave them owner-only)."""
    from checkpoints import save_checkpoint
    from common import small_config
    from scalor import SCALOR
    from utils import UMASK
    path = tmp_path / "ck" / "ckpt.pt"
    save_checkpoint(str(path), SCALOR(small_config()), step=1)
    assert path.stat().st_mode & 0o777 == 0o666 & ~UMASK


def test_checkpoints_written_before_the_rng_states_were_tensors_still_resume(tmp_path):
    """Their NumPy RNG state is an array: the few globals that rebuild arrays are allowed, no others."""
    import random
    assert train.main(TINY + run_dirs(tmp_path, "--steps", "1")) == 0
    path = tmp_path / "checkpoints" / "ckpt_00000001.pt"
    payload = torch.load(path, weights_only=True)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    payload.update(rng=old, rng_ranks=[old])
    torch.save(payload, path)
    assert train.main(TINY + run_dirs(tmp_path, "--steps", "2", "--resume", "auto")) == 0
    assert read_checkpoint(str(tmp_path / "checkpoints" / "ckpt_00000002.pt"))["step"] == 2


# ---- 2: track names that map to one safe name stay apart ----------------------------------------------

def test_unique_names_keep_names_apart_and_stable():
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    names = ["000001", "a b", "a_b", nfc, nfd, "cafè", "Vid", "vid", "x", "x"]
    out = unique_names(names)
    assert len({n.lower() for n in out}) == len(names)                     # distinct, even ignoring case
    assert out[0] == "000001"                                               # safe and alone: unchanged
    assert all(n.replace("-", "").replace("_", "").replace(".", "").isalnum() and n.isascii() for n in out)
    assert out == unique_names(names)                                       # stable
    assert unique_names(["a b"])[0] == out[1]                               # ... whatever else is in the list
    assert out[1].startswith("a_b-") and out[2].startswith("a_b-")


def test_exports_of_videos_with_clashing_names_are_all_kept(tmp_path, tiny_checkpoint):
    videos = ["a b", "a_b", unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFC", "cafè")]
    for video in videos:
        write_frames(tmp_path / "frames" / video, [f"{t:04d}.png" for t in range(3)])
    out = tmp_path / "eval"
    assert ev.main(["--dataset", "frames", "--data-dir", str(tmp_path / "frames"), "--checkpoint",
                    str(tiny_checkpoint), "--out", str(out), "--device", "cpu"]) == 0
    tracks = sorted(p.name for p in out.iterdir() if p.name.startswith("tracks_"))
    assert len(tracks) == 4
    with open(out / "predictions.json") as f:
        predictions = json.load(f)
    assert len(predictions) == 4 and sorted(f"tracks_{k}.txt" for k in predictions) == tracks


# ---- 3: a full disk during a checkpoint write -----------------------------------------------------------

def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4096 vs 2048\n"
                           "PytorchStreamWriter failed writing file data/12: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    assert train.main(TINY + run_dirs(tmp_path)) == 2
    line = one_error_line(capsys)
    assert "disk full / not writable" in line and str(tmp_path / "checkpoints") in line, line
    assert list((tmp_path / "checkpoints").iterdir()) == []                 # no .tmp-*.pt, no checkpoint
    assert losses(tmp_path)                          # the steps logged before it stay: they explain the failure


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch, capsys):
    real_open = train.open_loss_log

    class FullDisk:
        def __init__(self, f):
            self.f, self.lines = f, 0

        def write(self, text):
            self.lines += 1
            if self.lines == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)
    monkeypatch.setattr(train, "open_loss_log", lambda *args: FullDisk(real_open(*args)))
    assert train.main(TINY + run_dirs(tmp_path, "--steps", "3", "--save-freq", "1")) == 2
    line = one_error_line(capsys)
    assert "disk full / not writable" in line and "--resume auto" in line, line
    assert [r["step"] for r in losses(tmp_path)] == [1]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["ckpt_00000001.pt"]
    # before the first checkpoint: nothing to resume, the run says so; the step it logged stays
    assert train.main(TINY + run_dirs(tmp_path / "fresh", "--steps", "3")) == 2
    line = one_error_line(capsys)
    assert "no checkpoint was written yet: free space, then start again" in line, line
    assert [r["step"] for r in losses(tmp_path / "fresh")] == [1]


# ---- 4: unwritable folders are found before the first step ---------------------------------------------

@pytest.mark.parametrize("which", ["checkpoint folder not writable", "summary folder not writable",
                                   "summary folder cannot be made"])
def test_unwritable_folders_are_found_before_the_first_step(which, tmp_path, monkeypatch, capsys):
    import tempfile
    flags = run_dirs(tmp_path)
    target = tmp_path / ("checkpoints" if which.startswith("checkpoint") else "summary")
    if which == "summary folder cannot be made":
        target = Path("/proc/scalor-test-nowhere/summary")      # no folder can be made there, even as root
        flags = ["--ckpt-dir", str(tmp_path / "checkpoints"), "--summary-dir", str(target)]
    else:
        real = tempfile.mkstemp

        def refuse(*args, **kwargs):   # as a read-only or full file system answers (root ignores chmod)
            if Path(kwargs.get("dir", "")) == target:
                raise PermissionError(errno.EACCES, "Permission denied")
            return real(*args, **kwargs)
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert train.main(TINY + flags) == 2
    line = one_error_line(capsys)
    assert str(target) in line and ("not writable" in line or "cannot create" in line), line
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "summary").exists()   # removed again


# ---- 5: a second train.py on one run folder is locked out ----------------------------------------------

def test_a_second_trainer_on_the_same_run_folder_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "shared" / "checkpoints"
    folder.mkdir(parents=True)
    holder = os.open(folder, os.O_RDONLY)            # what the first train.py holds while it runs
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert train.main(TINY + ["--run-name", "shared"]) == 2
        line = one_error_line(capsys)
        assert "runs/shared/checkpoints" in line and "in use by another train.py" in line and "--run-name" in line
        assert list(folder.iterdir()) == [] and not (tmp_path / "runs" / "shared" / "summary").exists()
    finally:
        os.close(holder)                              # the first run ends (or dies): the lock is free
    assert train.main(TINY + ["--run-name", "shared", "--steps", "1"]) == 0


def test_a_second_train_py_process_is_refused_while_the_first_runs(tmp_path, capsys):
    import subprocess
    import sys
    import time
    root = Path(__file__).resolve().parents[1]
    first = subprocess.Popen([sys.executable, "train.py"] + TINY + run_dirs(tmp_path, "--steps", "100000"), cwd=root,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        log, deadline = tmp_path / "summary" / "losses.jsonl", time.time() + 120
        while not (log.exists() and log.read_text().count("\n") >= 1):
            assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        assert train.main(TINY + run_dirs(tmp_path)) == 2
        line = one_error_line(capsys)
        assert str(tmp_path / "checkpoints") in line and "in use by another train.py" in line, line
        assert first.poll() is None                   # the first run goes on, its files untouched
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1


# ---- 6: evaluate.py writes --out whole, at the end ------------------------------------------------------

def test_evaluate_refuses_a_non_empty_out_and_replaces_it_whole_with_overwrite(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "stale.txt").write_text("an earlier run's")
    flags = ["--checkpoint", str(tiny_checkpoint), "--num-sequences", "1", "--device", "cpu", "--out", str(out)]
    assert ev.main(flags) == 2
    line = one_error_line(capsys)
    assert "exists and is not empty" in line and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]
    assert ev.main(flags + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["predictions.json", "report.json", "tracks_000000.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "tiny.pt"]      # no temporary folder left


def test_evaluate_failing_at_the_end_leaves_the_previous_out_untouched(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    out = tmp_path / "eval"
    flags = ["--checkpoint", str(tiny_checkpoint), "--num-sequences", "1", "--device", "cpu", "--out", str(out)]
    assert ev.main(flags) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_dump = json.dump

    def full_disk(obj, f, **kwargs):
        real_dump(obj, f, **kwargs)
        if f.name.endswith("report.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(json, "dump", full_disk)
    assert ev.main(flags + ["--overwrite", "--seed", "1"]) == 2
    line = one_error_line(capsys)
    assert "disk full / not writable" in line and str(out) in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "tiny.pt"]


# ---- 7: temporary checkpoint files of a killed run are removed ------------------------------------------

def test_temporary_files_of_a_killed_checkpoint_write_are_removed_at_start(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".tmp-k1ll3d.pt").write_bytes(b"half a checkpoint")
    assert train.main(TINY + run_dirs(tmp_path, "--steps", "1")) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt_00000001.pt"]
    assert "removed 1 temporary files" in capsys.readouterr().out


# ---- 8: losses.jsonl of a run killed before its first checkpoint -----------------------------------------

def test_a_fresh_start_truncates_the_losses_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    (tmp_path / "summary").mkdir()
    (tmp_path / "summary" / "losses.jsonl").write_text(
        '{"step": 1, "loss": 1.0, "skipped": false}\n{"step": 2, "loss": 1.0, "skipped": false}\n')
    assert train.main(TINY + run_dirs(tmp_path, "--steps", "3")) == 0
    assert [r["step"] for r in losses(tmp_path)] == [1, 2, 3]
    assert all(r["loss"] != 1.0 for r in losses(tmp_path))


# ---- 9: every config value is checked before anything is written -----------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--lr", "nan"], "lr=nan must be a finite number"),
    (["--lr", "inf"], "lr=inf must be a finite number"),
    (["--sigma", "nan"], "sigma=nan must be a finite number"),
    (["--sigma", "1e-30"], "sigma=1e-30 must be at least 0.0001"),
    (["--sigma", "0"], "sigma=0.0 must be at least 0.0001"),
    (["--tau-ep", "nan"], "tau_ep=nan must be a finite number"),
    (["--size-anc", "inf"], "size_anc=inf must be a finite number"),
    (["--glimpse-size", "512"], "glimpse_size=512 must not exceed the image side"),
    (["--seed", "-1"], "seed=-1 must lie in [0, 2**32 - 1]"),
    (["--seed", "100000000000000000000"], "seed=100000000000000000000 must lie in"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_config_values_exit_2_before_anything_is_written(flags, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train.main(TINY + ["--run-name", "bad"] + flags) == 2
    line = one_error_line(capsys)
    assert words in line, line
    assert not (tmp_path / "runs").exists()


# ---- 10: images that gave tracebacks ----------------------------------------------------------------------

@pytest.mark.parametrize("skip", [False, True], ids=["stop", "skip-bad-frames"])
@pytest.mark.parametrize("limit, kind", [(10_000, "warning"), (5_000, "error")])
def test_a_frame_over_the_decompression_bomb_limit(limit, kind, skip, tmp_path, monkeypatch, capsys):
    """A 128x128 frame among 64x64 ones: over Pillow's limit (warning) or over twice it (error)."""
    from PIL import Image
    folder = write_frames(tmp_path / "frames", [f"f{n}.png" for n in range(6)] + [("f6.png", (128, 128))])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    flags = TINY + run_dirs(tmp_path / "run", "--dataset", "frames", "--data-dir", str(folder), "--steps", "1")
    if skip:
        assert train.main(flags + ["--skip-bad-frames"]) == 0
        assert "skipped 1 unreadable frames" in capsys.readouterr().out
    else:
        assert train.main(flags) == 2
        line = one_error_line(capsys)
        assert "f6.png' is too large to decode safely" in line, line
        assert not (tmp_path / "run").exists()


def test_an_unreadable_video_folder_is_one_line(tmp_path, monkeypatch, capsys):
    root = tmp_path / "videos"
    write_frames(root / "v1", [f"{t}.png" for t in range(3)])
    write_frames(root / "v2", [f"{t}.png" for t in range(3)])
    real = Path.iterdir

    def iterdir(self):   # chmod 000 does not stop root: refuse as the file system would
        if self == root / "v2":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)
    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert train.main(TINY + run_dirs(tmp_path / "run", "--dataset", "frames", "--data-dir", str(root))) == 2
    line = one_error_line(capsys)
    assert f"cannot read folder '{root / 'v2'}' (Permission denied)" in line, line
    assert not (tmp_path / "run").exists()


def test_superscript_digits_in_frame_names(tmp_path, capsys):
    folder = write_frames(tmp_path / "frames", ["1.png", "2.png", "3.png", "5².png"])
    # not all plain numbers: read as a folder of frames, in natural order
    assert train.main(TINY + run_dirs(tmp_path / "run", "--data-dir", str(folder), "--steps", "1",
                                      "--batch-size", "1")) == 0
    capsys.readouterr()
    assert train.main(TINY + run_dirs(tmp_path / "gc", "--dataset", "grandcentral", "--data-dir", str(folder))) == 2
    assert "5².png' is not named by a number" in one_error_line(capsys)


# ---- 11: a second Ctrl-C during the teardown ---------------------------------------------------------------

def test_repeated_ctrl_c_still_saves_and_exits_0(tmp_path, monkeypatch):
    """Ctrl-C at step 1 stops the run after that step (with a checkpoint); another Ctrl-C while the
    TensorBoard writer closes must not turn into a KeyboardInterrupt."""
    real_close = train.SummaryWriter.close
    real_log = train.log_scalars

    def log_and_interrupt(*args, **kwargs):
        real_log(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)

    def close_and_interrupt(self):
        os.kill(os.getpid(), signal.SIGINT)
        real_close(self)
    monkeypatch.setattr(train, "log_scalars", log_and_interrupt)
    monkeypatch.setattr(train.SummaryWriter, "close", close_and_interrupt)
    before = signal.getsignal(signal.SIGINT)
    try:
        code = train.main(TINY + run_dirs(tmp_path, "--steps", "50"))
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C escaped as a KeyboardInterrupt (exit -2)")
    assert code == 0
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["ckpt_00000002.pt"]   # stopped after step 2
    assert signal.getsignal(signal.SIGINT) is before


# ---- 12: the last good state of a diverged run -------------------------------------------------------------

def test_the_last_good_state_of_a_diverged_run_holds_sane_weights(tmp_path, capsys):
    assert train.main(TINY + run_dirs(tmp_path, "--lr", "1e30", "--steps", "8", "--max-bad-steps", "2")) == 1
    line = one_error_line(capsys)
    (saved,) = list((tmp_path / "checkpoints").iterdir())
    payload = read_checkpoint(str(saved))
    largest = max(float(v.abs().max()) for v in payload["model"].values() if v.is_floating_point() and v.numel())
    assert largest < 1e3, largest                       # not the diverged weights (~1e31)
    assert "had diverged" in line and "lower --lr or --cp and resume from it" in line, line
    # the advised resume works: finite losses from there on
    assert train.main(TINY + run_dirs(tmp_path, "--resume", str(saved), "--lr", "1e-4", "--steps",
                                      str(payload["step"] + 2))) == 0
    tail = losses(tmp_path)[-2:]
    assert [r["step"] for r in tail] == [payload["step"] + 1, payload["step"] + 2]
    assert all(not r["skipped"] and np.isfinite(r["loss"]) for r in tail)


# ---- 13: a checkpoint with the format tag but without its parts -------------------------------------------

@pytest.mark.parametrize("damage", ["no model", "no step", "step not a number", "no config"])
def test_a_checkpoint_missing_its_parts_is_one_line(damage, tmp_path, tiny_cfg, monkeypatch, capsys):
    payload = {"format": "scalor-checkpoint-v1", "config": tiny_cfg.to_dict(), "step": 3,
               "model": SCALOR(tiny_cfg).state_dict()}
    key = {"no model": "model", "no step": "step", "no config": "config"}.get(damage)
    if key:
        del payload[key]
    else:
        payload["step"] = "3"
    torch.save(payload, tmp_path / "damaged.pt")
    monkeypatch.chdir(tmp_path)
    assert train.main(TINY + ["--run-name", "damaged", "--resume", str(tmp_path / "damaged.pt")]) == 2
    line = one_error_line(capsys)
    assert "is a damaged SCALOR checkpoint" in line and repr(key or "step") in line, line
    assert not (tmp_path / "runs").exists()
    assert ev.main(["--checkpoint", str(tmp_path / "damaged.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "is a damaged SCALOR checkpoint" in one_error_line(capsys)


# ---- 14: a checkpoint of another version, weights of another architecture -----------------------------------

def refused_by_train_and_evaluate(name: str, tmp_path: Path, monkeypatch, capsys) -> list:
    """The one-line errors of train.py --resume and evaluate.py --checkpoint on the file `name` in
    `tmp_path`; both exit 2 and write nothing."""
    monkeypatch.chdir(tmp_path)
    assert train.main(TINY + ["--run-name", "other", "--resume", name]) == 2
    lines = [one_error_line(capsys)]
    assert ev.main(["--checkpoint", name, "--out", str(tmp_path / "out")]) == 2
    lines.append(one_error_line(capsys))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()
    return lines


def test_a_checkpoint_of_another_format_version_says_so(tmp_path, tiny_cfg, monkeypatch, capsys):
    payload = {"format": 99, "config": tiny_cfg.to_dict(), "step": 3, "model": SCALOR(tiny_cfg).state_dict()}
    torch.save(payload, tmp_path / "v99.pt")
    for line in refused_by_train_and_evaluate("v99.pt", tmp_path, monkeypatch, capsys):
        assert ("'v99.pt' was written by another version of this code (checkpoint format 99; this code reads "
                "format 'scalor-checkpoint-v1'): pass a checkpoint written by this version's train.py") in line, line
        assert "no 'format' tag" not in line
    del payload["format"]
    torch.save(payload, tmp_path / "untagged.pt")
    for line in refused_by_train_and_evaluate("untagged.pt", tmp_path, monkeypatch, capsys):
        assert "'untagged.pt' is not a SCALOR checkpoint (no 'format' tag)" in line, line


FIX = "it was written by another model or version of this code; pass a checkpoint written by this code's train.py, or train anew"


@pytest.mark.parametrize("change, words", [
    ("renamed", "(missing keys (3): 'image_enc.image_enc.enc.0.weight', 'image_enc.image_enc.enc.0.bias', ...; "
                "unexpected keys (3): 'old.image_enc.image_enc.enc.0.weight', 'old.image_enc.image_enc.enc.0.bias', ...)"),
    ("reshaped", "(keys of another shape (1): 'image_enc.image_enc.enc.0.bias' (checkpoint [3, 1, 7], model [16]))"),
])
def test_weights_of_another_architecture_name_the_keys_and_the_fix(change, words, tmp_path, tiny_cfg, monkeypatch,
                                                                  capsys):
    state = SCALOR(tiny_cfg).state_dict()
    if change == "renamed":
        for key in list(state)[:3]:
            state["old." + key] = state.pop(key)
    else:
        state["image_enc.image_enc.enc.0.bias"] = torch.zeros(3, 1, 7)
    save_checkpoint(str(tmp_path / "other.pt"), model_state=state, step=3, cfg=tiny_cfg)
    for line in refused_by_train_and_evaluate("other.pt", tmp_path, monkeypatch, capsys):
        assert f"'other.pt' holds the weights of another architecture {words}: {FIX}" in line, line


# ---- 15: a run stopped by an error before its first checkpoint leaves no folders it made ---------------------

def corrupt_inside(path: Path) -> None:
    """Scramble a PNG's pixel data, keeping its header and end marker: found only when decoded."""
    data = bytearray(path.read_bytes())
    data[200:len(data) - 100] = bytes(len(data) - 300)
    path.write_bytes(bytes(data))


MIDBAD = ["--dataset", "frames", "--data-dir", "midbad", "--run-name", "t_midbad", "--steps", "30"]


def test_a_corrupt_frame_before_the_first_checkpoint_removes_the_new_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corrupt_inside(write_frames(tmp_path / "midbad", [f"f{n}.png" for n in range(12)]) / "f5.png")
    assert train.main(TINY + MIDBAD) == 2
    out = capsys.readouterr()
    errors = [line for line in out.err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "f5.png' is truncated or corrupt" in errors[0], out.err
    assert "the run stopped before its first checkpoint: removed the folders it made (runs)" in out.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["midbad"]


def test_a_corrupt_frame_in_a_run_folder_that_existed_keeps_that_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corrupt_inside(write_frames(tmp_path / "midbad", [f"f{n}.png" for n in range(12)]) / "f5.png")
    summary = tmp_path / "runs" / "t_midbad" / "summary"
    summary.mkdir(parents=True)
    (summary / "notes.txt").write_text("mine")
    assert train.main(TINY + MIDBAD) == 2
    assert (summary / "notes.txt").read_text() == "mine" and (summary / "losses.jsonl").exists()
    assert sorted(p.name for p in (tmp_path / "runs" / "t_midbad").iterdir()) == ["summary"]   # checkpoints/ was new


def test_an_error_after_a_checkpoint_keeps_the_run_folder(tmp_path, monkeypatch, capsys):
    real = train.batches

    def fail_after_one(*args, **kwargs):   # the second batch meets a corrupt frame
        source = real(*args, **kwargs)
        yield next(source)
        source.close()
        raise train.DataError("frame 'f5.png' is truncated or corrupt (test)")
    monkeypatch.setattr(train, "batches", fail_after_one)
    monkeypatch.chdir(tmp_path)
    assert train.main(TINY + ["--run-name", "kept", "--save-freq", "1", "--steps", "5"]) == 2
    assert "f5.png' is truncated or corrupt" in one_error_line(capsys)
    run = tmp_path / "runs" / "kept"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt_00000001.pt"]
    assert [r["step"] for r in losses(run)] == [1]
