"""Tests of train.py and viz.py: flags, logging, checkpoints, exact resume, errors, NaN steps, SIGTERM."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
import viz
from checkpoints import read_checkpoint
from common import Config, flag_help
from data import build_dataset, dataset_kind
from conftest import run_dirs

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--small", "--img-h", "64", "--img-w", "64", "--seq-len", "3", "--batch-size", "2", "--steps", "4",
        "--print-freq", "2", "--generate-freq", "4", "--save-freq", "2", "--num-sprite-sequences", "8",
        "--num-img-summary", "2", "--workers", "0", "--device", "cpu"]
SCALARS = ["train/total_loss", "train/log_like", "train/kl_what", "train/kl_where", "train/kl_depth",
           "train/kl_pres", "train/kl_bg", "train/tau", "train/z_pres_prior", "train/objects_per_frame",
           "train/steps_per_s", "train/bad_steps", "train/lr"]
IMAGES = ["images/input", "images/reconstruction", "images/background", "images/alpha", "images/boxes",
          "generation/rollout"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run fastest on one thread


def losses(folder: Path) -> list:
    with open(folder / "summary" / "losses.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One 4-step run: checkpoints at steps 2 and 4, scalars at 1, 2, 4, a roll-out at 4."""
    folder = tmp_path_factory.mktemp("short_run")
    before = torch.get_num_threads()
    torch.set_num_threads(1)            # as the tests that compare with it (one_thread): the same sums
    try:
        assert train.main(TINY + run_dirs(folder)) == 0
    finally:
        torch.set_num_threads(before)
    return folder


# ---- flags --------------------------------------------------------------------------------------

def test_every_config_field_is_a_flag_with_its_type():
    parser = train.build_parser()
    args = parser.parse_args(["--num-cell-h", "8", "--no-phase-conv-lstm", "--using-bg-sbd", "--lr", "1e-3",
                              "--tau-ep", "100"])
    assert args.num_cell_h == 8 and isinstance(args.num_cell_h, int)
    assert args.phase_conv_lstm is False and args.using_bg_sbd is True
    assert args.lr == 1e-3 and isinstance(args.tau_ep, float)
    assert train.given_config(args) == dict(num_cell_h=8, phase_conv_lstm=False, using_bg_sbd=True, lr=1e-3,
                                            tau_ep=100.0)
    options = {s for action in parser._actions for s in action.option_strings}
    for name, value in Config().to_dict().items():
        assert "--" + name.replace("_", "-") in options
        if isinstance(value, bool):
            assert "--no-" + name.replace("_", "-") in options


def test_flag_help_is_the_whole_config_comment():
    comments = flag_help()
    helps = {action.dest: action.help for action in train.build_parser()._actions}   # speed flags: fast.SpeedOptions
    assert helps["checkpoint_glimpses"].startswith("recompute the glimpse encoder's and decoder's activations")
    assert comments["pres_logit_factor"] == "z_pres logits = factor * tanh(.)"   # the next section header does not join
    assert comments["first_frame_rejection"].startswith("not in the reference")


def test_bool_flags_take_no_value(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.build_parser().parse_args(["--phase-conv-lstm", "False"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: False" in capsys.readouterr().err
    for flags, message in ((["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
                           (["--recipe", "nope"], "argument --recipe: invalid choice: 'nope'")):
        with pytest.raises(SystemExit) as exit_info:
            train.build_parser().parse_args(flags)
        err = capsys.readouterr().err                        # one line, not the usage of every flag
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err and "--help)" in err


def test_small_preset_then_flags_given():
    args = train.build_parser().parse_args(["--small", "--seq-len", "3", "--batch-size", "2"])
    cfg = train.make_config(args, None)
    assert (cfg.img_h, cfg.img_w, cfg.num_cell_h, cfg.glimpse_size, cfg.max_num_obj) == (64, 64, 4, 32, 10)
    assert (cfg.seq_len, cfg.batch_size, cfg.observe_frames) == (3, 2, 2)   # observe_frames fitted to seq_len
    assert train.make_config(train.build_parser().parse_args([]), None) == Config()
    base = Config(lr=1e-3)   # a resumed config keeps its values unless flags are given
    assert train.make_config(train.build_parser().parse_args(["--small"]), base) == base


# ---- a short run: TensorBoard, checkpoints -------------------------------------------------------

def test_short_run_logs_every_scalar_and_panel(short_run):
    events = EventAccumulator(str(short_run / "summary"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert set(SCALARS) <= set(tags["scalars"])
    assert set(IMAGES) <= set(tags["images"])
    assert [e.step for e in events.Scalars("train/total_loss")] == [1, 2, 4]
    shares = events.Scalars("train/tracked_share") if "train/tracked_share" in tags["scalars"] else []
    assert all(0 <= e.value <= 1 and e.step in (1, 2, 4) for e in shares)   # the real share: logged when defined
    logged = {e.step: e.value for e in events.Scalars("train/total_loss")}
    for record in losses(short_run):
        if record["step"] in logged:
            assert logged[record["step"]] == pytest.approx(record["loss"], rel=1e-6)
    times = [record["time"] for record in losses(short_run)]                   # wall clock of each step
    assert times == sorted(times) and time.time() - 3600 < times[0]
    assert [e.value for e in events.Scalars("train/bad_steps")] == [0, 0, 0]
    input_panel = events.Images("images/input")[-1]
    assert (input_panel.height, input_panel.width) == (2 * 64 + 3, 3 * 64 + 4)   # 2 sequences x 3 frames
    assert [e.step for e in events.Images("generation/rollout")] == [4]


def test_short_run_checkpoint(short_run):
    names = sorted(p.name for p in (short_run / "checkpoints").iterdir())
    assert names == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    payload = read_checkpoint(str(short_run / "checkpoints" / "ckpt_00000004.pt"))
    args = train.build_parser().parse_args(TINY)
    assert payload["step"] == 4
    assert payload["config"] == train.make_config(args, None)
    assert (payload["epoch"], payload["batch_index"]) == (1, 0)   # 8 sequences = 4 batches of 2
    assert {"model", "optimizer", "rng"} <= set(payload)


def test_keeps_the_last_checkpoints(tmp_path):
    assert train.main(TINY + run_dirs(tmp_path, "--steps", "3", "--save-freq", "1", "--keep-checkpoints", "2")) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt_00000002.pt", "ckpt_00000003.pt"]


def test_max_minutes_stops_with_a_checkpoint(tmp_path, capsys):
    assert train.main(TINY + run_dirs(tmp_path, "--steps", "50", "--max-minutes", "1e-6")) == 0
    captured = capsys.readouterr()
    assert "--max-minutes 1e-06: stopped after step 1; saved" in captured.out + captured.err
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["ckpt_00000001.pt"]
    assert read_checkpoint(str(tmp_path / "checkpoints" / "ckpt_00000001.pt"))["step"] == 1


def test_gpu_only_flags_on_the_cpu_give_notices(tmp_path, capsys):
    assert train.main(TINY + run_dirs(tmp_path, "--steps", "1", "--compile", "--cuda-graph")) == 0
    out = capsys.readouterr().out
    assert "notice: --compile needs a CUDA device; running eagerly" in out
    assert "notice: --cuda-graph needs a CUDA device; running eagerly" in out
    assert "compile for up to" not in out          # the compile-time notice is for GPU runs only


def test_max_minutes_must_be_positive(tmp_path, capsys):
    assert train.main(TINY + run_dirs(tmp_path, "--max-minutes", "0")) == 2
    assert capsys.readouterr().err.strip() == "error: --max-minutes=0.0 must be positive"
    assert not (tmp_path / "checkpoints").exists()


# ---- exact resume -----------------------------------------------------------------------------------

def test_resume_continues_exactly(short_run, tmp_path, capsys):
    # 2 steps, stop, resume the newest checkpoint for 2 more: the losses of one 4-step run
    assert train.main(TINY + run_dirs(tmp_path, "--steps", "2", "--resume", "auto")) == 0
    assert "starting a fresh run" in capsys.readouterr().out
    assert train.main(TINY + run_dirs(tmp_path, "--steps", "4", "--resume", "auto")) == 0
    resumed = [(r["step"], r["loss"]) for r in losses(tmp_path)]
    assert resumed == [(r["step"], r["loss"]) for r in losses(short_run)]
    assert read_checkpoint(str(tmp_path / "checkpoints" / "ckpt_00000004.pt"))["step"] == 4


def test_the_lr_schedule_runs_by_step_and_resumes_exactly(tmp_path, monkeypatch):
    """--lr-decay-share 0.5 over 4 steps: lr, lr, lr, lr/2 (progress 0, 1/4, 2/4, 3/4 before each step),
    logged, and the same losses when the run is stopped by a signal after step 2 and resumed."""
    decay = ["--lr-decay-share", "0.5", "--lr", "1e-4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(TINY + run_dirs(straight) + decay) == 0
    events = EventAccumulator(str(straight / "summary"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([1e-4, 1e-4, 5e-5])
    groups = read_checkpoint(str(straight / "checkpoints" / "ckpt_00000004.pt"))["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([5e-5] * len(groups))

    class StopAfter2(train.TrainStep):
        def __call__(self, batch, step, keep_records=False, inject_nan=False):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return super().__call__(batch, step, keep_records, inject_nan)
    with monkeypatch.context() as patch:
        patch.setattr(train, "TrainStep", StopAfter2)
        assert train.main(TINY + run_dirs(split) + decay) == 0
    assert len(losses(split)) == 2
    assert train.main(TINY + run_dirs(split, "--resume", "auto") + decay) == 0
    assert [r["loss"] for r in losses(split)] == [r["loss"] for r in losses(straight)]


def test_resume_keeps_the_sprite_preset_and_size(tmp_path):
    """A run on another preset resumed without --preset / --num-sprite-sequences trains on its own data."""
    flags = [f for f in TINY if f not in ("--num-sprite-sequences", "8")]
    assert train.main(flags + run_dirs(tmp_path, "--steps", "2", "--preset", "few", "--num-sprite-sequences", "6")) == 0
    run = train.setup(train.build_parser().parse_args(flags + run_dirs(tmp_path, "--resume", "auto")))
    run.release()
    assert (run.data_desc["preset"], run.data_desc["num_sequences"], run.start.step) == ("few", 6, 2)
    run = train.setup(train.build_parser().parse_args(flags + run_dirs(tmp_path, "--resume", "auto", "--preset", "easy")))
    run.release()
    assert run.data_desc["preset"] == "easy"                     # a preset given wins, at the default size:
    assert run.data_desc["num_sequences"] == 100_000              # many scenes, so the model cannot fit them


def test_resume_keeps_the_frames_it_was_trained_on(tmp_path, capsys):
    """A run on a folder of frames resumed without --dataset / --data-dir / --frame-skip trains on the same
    frames, as the same kind (numbered names would read as Grand Central) and with the same frame skip."""
    folder = write_frames(tmp_path / "numbered", [(64, 64)] * 12)
    for n in range(12):
        (folder / f"f{n}.png").rename(folder / f"{n:04d}.png")
    flags = [f for f in TINY if f not in ("--num-sprite-sequences", "8")]
    run_folder = tmp_path / "run"
    assert train.main(flags + run_dirs(run_folder, "--steps", "2", "--data-dir", str(folder), "--dataset", "frames",
                                       "--frame-skip", "2")) == 0
    trained = dict(dataset="frames", data_dir=str(folder), frame_skip=2)
    for given in ([], ["--data-dir", str(folder)]):
        run = train.setup(train.build_parser().parse_args(flags + run_dirs(run_folder, "--resume", "auto", *given)))
        run.release()
        assert {k: run.data_desc[k] for k in trained} == trained and run.start.step == 2
        out = capsys.readouterr().out
        assert "the data position will not match" not in out and "read as Grand Central" not in out
    run = train.setup(train.build_parser().parse_args(flags + run_dirs(run_folder, "--resume", "auto", "--preset",
                                                                       "few")))    # asks for sprites: given wins
    run.release()
    assert (run.data_desc["dataset"], run.data_desc["preset"]) == ("sprites", "few")
    elsewhere = tmp_path / "other"                                    # another run's folder: not mixed into
    assert train.main(flags + run_dirs(elsewhere, "--steps", "1")) == 0
    assert train.main(flags + run_dirs(elsewhere, "--resume", str(run_folder / "checkpoints" / "ckpt_00000002.pt"),
                                       "--steps", "3")) == 2
    assert "holds the checkpoints of another run" in capsys.readouterr().err
    assert sorted(p.name for p in (elsewhere / "checkpoints").iterdir()) == ["ckpt_00000001.pt"]
    folder.rename(tmp_path / "moved")                                 # the recorded folder is gone: said so
    assert train.main(flags + run_dirs(run_folder, "--resume", "auto", "--steps", "3")) == 2
    assert f"the checkpoint was trained on '{folder}' (frames), which is not a folder here" in capsys.readouterr().err


def test_resuming_the_shipped_checkpoint_says_why_the_random_streams_restart(tmp_path, capsys, monkeypatch):
    shipped = str(ROOT / "checkpoints" / "sprites_small.pt")
    args = train.build_parser().parse_args(["--resume", shipped, "--steps", "100", "--batch-size", "2", "--num-sprite-sequences", "4",
                                            "--workers", "0", "--device", "cpu", *run_dirs(tmp_path)])
    run = train.setup(args)
    run.release()
    out = capsys.readouterr().out
    assert "holds no random-number states" in out and "processes" not in out and "try --small" not in out
    assert run.start.step >= run.total_steps and not list(tmp_path.iterdir())   # nothing to do: no folder made
    assert run.data_desc["preset"] == "spmot"                   # the checkpoint's preset, not the default
    monkeypatch.chdir(tmp_path)                                  # no --run-name: the run is named by that preset
    run = train.setup(train.build_parser().parse_args(["--resume", shipped, "--steps", "100", "--workers", "0",
                                                       "--device", "cpu"]))
    run.release()
    assert run.ckpt_dir == Path("runs") / "sprites-spmot" / "checkpoints" and not list(tmp_path.iterdir())


def test_epoch_order_is_seeded_and_resumable():
    args = train.build_parser().parse_args(TINY)
    cfg = train.make_config(args, None)
    dataset = build_dataset("sprites", cfg, train=True, num_sequences=args.num_sprite_sequences, seed=cfg.seed)
    stream = train.batches(dataset, cfg, 0, 0, 0, False)
    first = [next(stream) for _ in range(6)]          # 4 batches per epoch: epoch 0, then 2 of epoch 1
    assert [(e, i) for e, i, _ in first] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    later = train.batches(dataset, cfg, 0, 3, 0, False)
    for expected in first[3:]:
        epoch, index, batch = next(later)
        assert (epoch, index) == expected[:2] and torch.equal(batch, expected[2])
    past_the_end = train.batches(dataset, cfg, 0, 4, 0, False)      # batch 4 of epoch 0 is epoch 1's first
    epoch, index, batch = next(past_the_end)
    assert (epoch, index) == (1, 0) and torch.equal(batch, first[4][2])
    assert not torch.equal(first[0][2], first[4][2])   # each epoch has its own order


# ---- bad input: exit 2, one line, nothing written ------------------------------------------------

def write_frames(folder: Path, sizes, modes=None) -> Path:
    """PNG frames f0.png, f1.png, ... of the given (width, height) sizes and PIL modes."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n, (w, h) in enumerate(sizes):
        mode = (modes or ["RGB"] * len(sizes))[n]
        pixels = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        image = Image.fromarray(pixels[..., :3]).convert(mode) if mode != "RGBA" else Image.fromarray(pixels, "RGBA")
        image.save(folder / f"f{n}.png")
    return folder


def bad_input_cases(tmp_path, short_run):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("no frames here")
    truncated = write_frames(tmp_path / "truncated", [(64, 64)] * 6)
    data = (truncated / "f2.png").read_bytes()
    (truncated / "f2.png").write_bytes(data[:len(data) // 2])
    write_frames(tmp_path / "mixed", [(64, 64)] * 3 + [(48, 64)] * 3)
    write_frames(tmp_path / "few", [(64, 64)] * 2)
    write_frames(tmp_path / "videos" / "a", [(64, 64)] * 4)
    frames = ["--dataset", "frames", "--data-dir"]
    ckpt = str(short_run / "checkpoints" / "ckpt_00000004.pt")
    return {
        "missing data dir": (["--data-dir", str(tmp_path / "nowhere")], "does not exist"),
        "empty data dir": (["--data-dir", str(tmp_path / "empty")], "is empty"),
        "no frames of a known type": (["--data-dir", str(tmp_path / "texts")], "no frames (.png/.jpg/.jpeg)"),
        "truncated frame": (frames + [str(truncated)], "f2.png' is truncated"),
        "mixed frame sizes": (frames + [str(tmp_path / "mixed")], "have mixed sizes"),
        "fewer frames than a sequence": (frames + [str(tmp_path / "few")], "one sequence needs 3 (--seq-len 3, "
                                          "--frame-skip 1): add frames or lower --seq-len or --frame-skip"),
        "grandcentral on folders of frames": (["--dataset", "grandcentral", "--data-dir", str(tmp_path / "videos")],
                                              "but its subfolders hold frames ('a'): Grand Central reads one folder "
                                              "of numbered frames; pass --dataset frames to read each subfolder as a video"),
        "image not divisible by the grid": (["--img-h", "100"], "img_h"),
        "cap above the cells": (["--max-num-obj", "17"], "exceeds the 16 cells"),
        "observe_frames >= seq_len": (["--observe-frames", "3"], "observe_frames=3"),
        "not a checkpoint": (["--resume", str(tmp_path / "junk.pt")], "not a readable SCALOR checkpoint"),
        "checkpoint of another config": (["--resume", ckpt, "--num-cell-h", "8", "--num-cell-w", "8"], "num_cell_h"),
        "a zero logging interval": (["--save-freq", "0"], "save_freq=0 must be a positive integer"),
        "a file as the checkpoint folder": (["--ckpt-dir", str(tmp_path / "junk.pt")], "is a file, not a folder"),
    }


@pytest.mark.parametrize("case", ["missing data dir", "empty data dir", "no frames of a known type", "truncated frame",
                                  "mixed frame sizes", "fewer frames than a sequence",
                                  "grandcentral on folders of frames", "image not divisible by the grid",
                                  "cap above the cells", "observe_frames >= seq_len", "not a checkpoint",
                                  "checkpoint of another config", "a zero logging interval",
                                  "a file as the checkpoint folder"])
def test_bad_input_exits_2_with_one_line(case, tmp_path, short_run, monkeypatch, capsys):
    flags, words = bad_input_cases(tmp_path, short_run)[case]
    monkeypatch.chdir(tmp_path)
    assert train.main(TINY + ["--run-name", "bad"] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "runs").exists()


def test_grayscale_and_rgba_frames_are_converted(tmp_path, monkeypatch):
    folder = write_frames(tmp_path / "modes", [(64, 64)] * 6, modes=["L", "RGBA", "P", "RGB", "L", "RGBA"])
    monkeypatch.chdir(tmp_path)
    flags = [f for f in TINY if f not in ("--num-sprite-sequences", "8")]
    assert train.main(flags + ["--dataset", "frames", "--data-dir", str(folder), "--steps", "1"]) == 0


def test_fresh_run_refuses_a_folder_with_checkpoints(short_run, capsys):
    assert train.main(TINY + run_dirs(short_run)) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert len(list((short_run / "checkpoints").iterdir())) == 2


# ---- non-finite steps ----------------------------------------------------------------------------

def inject_nan_at(monkeypatch, steps) -> None:
    """Make the loss NaN (and so the gradients) at the given steps: the training step wrapped."""
    class NaNAt(train.TrainStep):
        def __call__(self, batch, step, keep_records=False, inject_nan=False):
            return super().__call__(batch, step, keep_records, inject_nan=step in steps)
    monkeypatch.setattr(train, "TrainStep", NaNAt)


def test_nan_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    inject_nan_at(monkeypatch, {2, 3})
    assert train.main(TINY + run_dirs(tmp_path, "--max-bad-steps", "3")) == 0
    assert [r["skipped"] for r in losses(tmp_path)] == [False, True, True, False]
    text = (tmp_path / "summary" / "losses.jsonl").read_text()
    assert "NaN" not in text and [r["loss"] is None for r in losses(tmp_path)] == [False, True, True, False]  # strict JSON
    events = EventAccumulator(str(tmp_path / "summary"), size_guidance={"scalars": 0})
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/bad_steps")} == {1: 0, 2: 1, 3: 2, 4: 2}
    assert read_checkpoint(str(tmp_path / "checkpoints" / "ckpt_00000004.pt"))["bad_steps"] == 2


def test_too_many_nan_steps_save_the_last_good_state_and_exit_1(tmp_path, monkeypatch, capsys):
    """The saved state is the newest whose weights then gave a finite step: non-finite steps can come
    from the weights of the last finite step (a learning rate too high), which no lower --lr repairs.
    With steps 2 and 3 non-finite and a snapshot every 2 steps, the weights after step 1 gave none, the
    start's gave step 1: the start is saved; with steps 4 and 5 non-finite instead, step 2's weights are,
    beside step 3's checkpoint."""
    inject_nan_at(monkeypatch, {2, 3, 4})
    assert train.main(TINY + run_dirs(tmp_path, "--steps", "6", "--max-bad-steps", "2", "--save-freq", "10")) == 1
    err = capsys.readouterr().err
    assert "step 3" in err and "(step 0)" in err
    assert len(losses(tmp_path)) == 3
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["ckpt_00000000.pt"]
    payload = read_checkpoint(str(tmp_path / "checkpoints" / "ckpt_00000000.pt"))
    assert (payload["step"], payload["epoch"], payload["batch_index"]) == (0, 0, 0)
    monkeypatch.undo()
    inject_nan_at(monkeypatch, {1, 2})                                            # no finite step at all
    assert train.main(TINY + run_dirs(tmp_path / "never", "--steps", "3", "--max-bad-steps", "2")) == 1
    assert "saved the state it started from (no step since was finite) (step 0)" in capsys.readouterr().err
    monkeypatch.undo()                                                            # the cause removed: it resumes
    assert train.main(TINY + run_dirs(tmp_path, "--resume", "auto", "--steps", "2", "--max-bad-steps", "2",
                                      "--save-freq", "10")) == 0
    inject_nan_at(monkeypatch, {4, 5})
    later = tmp_path / "later"
    assert train.main(TINY + run_dirs(later, "--steps", "9", "--max-bad-steps", "2", "--save-freq", "3",
                                      "--keep-checkpoints", "1")) == 1           # the older one is kept too
    assert sorted(p.name for p in (later / "checkpoints").iterdir()) == ["ckpt_00000002.pt", "ckpt_00000003.pt"]
    assert "another --run-name, or --ckpt-dir and --summary-dir): the newer ckpt_00000003.pt gave no finite step" \
        in capsys.readouterr().err


def test_no_objects_notice_once_after_the_patience_and_only_with_a_background():
    cfg = Config()
    notices = [train.no_objects_notice(cfg, step, 100) for step in range(100, 100 + 3 * train.NO_OBJECT_STEPS)]
    assert [i for i, n in enumerate(notices) if n] == [train.NO_OBJECT_STEPS]
    assert "--num-cell-h" in notices[train.NO_OBJECT_STEPS] and "--phase-bg-alpha-curriculum" in notices[
        train.NO_OBJECT_STEPS]
    assert train.no_objects_notice(cfg.replace(phase_no_background=True), 100 + train.NO_OBJECT_STEPS, 100) is None


def test_a_run_that_keeps_no_objects_is_told_once(tmp_path, monkeypatch, capsys):
    class NoObjectsFrom2(train.TrainStep):      # every frame empty from step 2 on
        def __call__(self, batch, step, keep_records=False, inject_nan=False):
            result = super().__call__(batch, step, keep_records, inject_nan)
            return dataclasses.replace(result, counts=result.counts * (step < 2))
    monkeypatch.setattr(train, "TrainStep", NoObjectsFrom2)
    monkeypatch.setattr(train, "NO_OBJECT_STEPS", 2)
    assert train.main(TINY + run_dirs(tmp_path, "--steps", "6")) == 0
    out = capsys.readouterr().out
    assert out.count("no objects found in the last 2 steps") == 1 and "notice: step 3:" in out


def test_tracked_share_of_known_records():
    """Frames 2.. only: presence held by tracked objects over all presence, over the batch; None below
    one object or when not finite."""
    frame = lambda pres, prop: types.SimpleNamespace(z_pres=torch.tensor(pres), propagated=torch.tensor(prop))
    first = frame([[1.0, 1.0]], [[False, False]])                   # discoveries of frame 1 do not count
    records = [first, frame([[1.0, 0.5, 0.0]], [[True, False, True]]), frame([[0.5, 1.0, 1.0]], [[True, True, False]])]
    assert train.tracked_share(records) == pytest.approx((1.0 + 0.5 + 1.0) / 4.0)
    batch_of_two = [frame([[1.0], [1.0]], [[False], [False]]), frame([[1.0], [0.5]], [[True], [False]]),
                    frame(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool))]    # no object in frame 3
    assert train.tracked_share(batch_of_two) == pytest.approx(1.0 / 1.5)
    assert train.tracked_share([first, frame([[0.4, 0.5]], [[True, True]])]) is None
    assert train.tracked_share([first, frame([[0.0, 1.0]], [[True, False]])]) == 0.0
    assert train.tracked_share([first, frame([[float("nan"), 1.0]], [[True, False]])]) is None


def test_no_tracking_notice_after_the_patience():
    cfg = Config()
    assert train.no_tracking_notice(cfg, 100 + train.NO_TRACKING_STEPS - 1, 100) is None
    notice = train.no_tracking_notice(cfg, 100 + train.NO_TRACKING_STEPS, 100)
    assert notice.startswith(f"notice: step {100 + train.NO_TRACKING_STEPS}: objects are found anew in every frame")
    assert "every log after step 100" in notice and "--phase-bg-alpha-curriculum" not in notice
    curriculum = train.no_tracking_notice(cfg.replace(phase_bg_alpha_curriculum=True), 100 + train.NO_TRACKING_STEPS, 100)
    assert "--phase-bg-alpha-curriculum on a textured background: try without it" in curriculum
    assert "--bg-alpha-curriculum-detach-tracked" in curriculum
    detached = cfg.replace(phase_bg_alpha_curriculum=True, bg_alpha_curriculum_detach_tracked=True)
    assert "detach" not in train.no_tracking_notice(detached, 100 + train.NO_TRACKING_STEPS, 100)


@pytest.mark.parametrize("share, told", [(0.0, True), (None, False), (0.9, False)])
def test_a_run_whose_objects_are_never_tracked_is_told_once(share, told, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "tracked_share", lambda records: share)
    monkeypatch.setattr(train, "NO_TRACKING_STEPS", 2)
    assert train.main(TINY + run_dirs(tmp_path, "--steps", "6", "--print-freq", "1")) == 0
    out = capsys.readouterr().out
    assert out.count("objects are found anew in every frame") == int(told)
    if told:
        assert "notice: step 2:" in out and "after step 0)" in out     # the patience counted from the start
    events = EventAccumulator(str(tmp_path / "summary"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [e.value for e in events.Scalars("train/tracked_share")] if share is not None else []
    assert logged == ([] if share is None else [pytest.approx(share)] * 6)
    assert ("train/tracked_share" in events.Tags()["scalars"]) is (share is not None)


# ---- SIGTERM ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("to_group", [False, True])
def test_sigterm_saves_and_exits_0(tmp_path, to_group):
    """SIGTERM to the trainer, or to its whole process group with loader workers (as `timeout`
    and schedulers send it): the step finishes, a checkpoint is written, exit code 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    flags = TINY + run_dirs(tmp_path, "--steps", "100000", "--save-freq", "100000", "--workers", "2" if to_group else "1")
    proc = subprocess.Popen([sys.executable, "train.py"] + flags, cwd=ROOT, env=env, start_new_session=to_group,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = tmp_path / "summary" / "losses.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.2)
    if to_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:]
    checkpoints = list((tmp_path / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    payload = read_checkpoint(str(checkpoints[0]))
    assert payload["step"] == len(losses(tmp_path)) >= 2


# ---- viz -------------------------------------------------------------------------------------------

def test_tile_has_white_borders():
    grid = viz.tile(torch.zeros(2, 3, 1, 4, 5))
    assert grid.shape == (3, 2 * 4 + 3, 3 * 5 + 4)
    assert grid[:, 0].eq(1).all() and grid[:, :, 0].eq(1).all() and grid[:, 5].eq(1).all()
    assert grid[:, 1:5, 1:6].eq(0).all()


def test_boxes_are_drawn_where_z_where_says():
    assert viz.box_pixels((0.5, 0.25, 0.0, 0.0), 64, 64) == (16.0, 24.0, 48.0, 40.0)
    image = torch.zeros(3, 64, 64)
    z_where = torch.tensor([[0.5, 0.25, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [float("nan")] * 4])
    drawn = viz.draw_boxes(image, z_where, torch.tensor([0.9, 0.2, 0.9]), torch.tensor([3, 4, 5]),
                           torch.tensor([True, False, True]))
    colour = torch.tensor(viz.id_color(3)) / 255.0
    assert torch.allclose(drawn[:, 40, 16:49], colour[:, None].expand(3, 33), atol=1e-6)   # solid bottom edge
    assert drawn[:, 48, :].eq(0).all()                          # z_pres 0.2: not drawn
    dashed = viz.draw_boxes(image, z_where[:1], torch.tensor([0.9]), torch.tensor([3]), torch.tensor([False]))
    lit = dashed[:, 40, 16:49].sum(0) > 0
    assert 0 < lit.sum() < 33                                   # discovered: dashed bottom edge
    assert image.eq(0).all()                                    # input untouched
    assert len({viz.id_color(i) for i in range(1, 20)}) == 19


# ---- interrupted runs continue as if never stopped ------------------------------------------------

def test_sigterm_then_resume_gives_the_uninterrupted_losses(tmp_path):
    whole = tmp_path / "whole"
    assert train.main(TINY + run_dirs(whole, "--steps", "6")) == 0
    cut = tmp_path / "cut"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "train.py"] + TINY + run_dirs(cut, "--steps", "100000"), cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log, deadline = cut / "summary" / "losses.jsonl", time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    stopped_at = len(losses(cut))
    assert 2 <= stopped_at < 6
    assert train.main(TINY + run_dirs(cut, "--steps", "6", "--resume", "auto")) == 0
    assert [r["loss"] for r in losses(cut)] == [r["loss"] for r in losses(whole)]


KILL_DURING_WRITE = """
import sys, torch
sys.path.insert(0, {root!r})
from common import small_config
from scalor import SCALOR
from checkpoints import save_checkpoint
model = SCALOR(small_config())
save_checkpoint({path!r}, model, step=1)
print("first", flush=True)
ballast = torch.rand(150_000_000)          # 600 MB: the next write takes a while
while True:
    save_checkpoint({path!r}, model, step=2, ballast=ballast)
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / "ckpt_00000001.pt"
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_WRITE.format(root=str(ROOT), path=str(path))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first"
    deadline = time.time() + 60
    while not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir()):   # the second write has begun
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    payload = read_checkpoint(str(path))
    assert payload["step"] == 1 and "ballast" not in payload


@pytest.mark.skipif(torch.cuda.is_available(), reason="the notice is for machines without a GPU")
def test_cpu_notice_suggests_small_only_without_it(capsys):
    assert train.pick_device("auto", small=True) == torch.device("cpu")
    assert capsys.readouterr().out.strip() == "notice: no CUDA device found, training on the CPU"
    train.pick_device("auto")
    assert "try --small" in capsys.readouterr().out


def test_resuming_an_older_checkpoint_where_newer_ones_lie_is_refused(short_run, capsys):
    """Keeping the newest checkpoints would delete the new branch's at once (and --resume auto
    would later pick the old branch): the run names the problem instead."""
    older = str(short_run / "checkpoints" / "ckpt_00000002.pt")
    assert train.main(TINY + run_dirs(short_run, "--resume", older, "--steps", "5")) == 2
    err = capsys.readouterr().err
    assert "newer than step 2 (ckpt_00000004.pt)" in err and "--ckpt-dir" in err
    assert sorted(p.name for p in (short_run / "checkpoints").iterdir()) == ["ckpt_00000002.pt", "ckpt_00000004.pt"]


def test_allow_partial_load_loads_what_fits(short_run, tmp_path, capsys):
    """Another z_what size: the tensors of another shape stay as initialised, the rest is loaded."""
    ckpt = str(short_run / "checkpoints" / "ckpt_00000004.pt")
    flags = TINY + run_dirs(tmp_path, "--resume", ckpt, "--z-what-dim", "16", "--allow-partial-load", "--steps", "5")
    assert train.main(flags) == 0
    out = capsys.readouterr().out
    assert "partial load from" in out and "tensors of another shape" in out
    other = TINY + run_dirs(tmp_path / "gn", "--resume", ckpt, "--no-bg-group-norm", "--steps", "5")
    assert train.main(other) == 2                          # a switch that changes the weights names itself
    assert "bg_group_norm: model False vs checkpoint True" in capsys.readouterr().err
    assert train.main(other + ["--allow-partial-load"]) == 0 and "partial load from" in capsys.readouterr().out


def test_a_run_name_is_a_folder_name_and_a_damaged_newest_checkpoint_names_the_way_on(short_run, tmp_path, capsys):
    """--run-name with '/' would write outside runs/; a damaged newest checkpoint of --resume auto says how to go
    on from the one before."""
    assert train.main(TINY + ["--run-name", "../escape"]) == 2
    assert "--run-name '../escape' must be a folder name under runs/" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    newest = run / "checkpoints" / "ckpt_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert train.main(TINY + run_dirs(run, "--resume", "auto", "--steps", "5")) == 2
    err = capsys.readouterr().err.strip()
    assert "it is the newest checkpoint in" in err and "move it out of the folder" in err and "\n" not in err


def test_a_frame_found_corrupt_mid_run_ends_the_run_with_workers(tmp_path, capsys):
    """The setup reads headers and end markers only: a frame damaged inside is met by a loader
    worker mid-run. The run stops with the one-line error and exit 2, and the workers (which ignore
    SIGTERM) are shut down: before, the interpreter's exit waited on them forever."""
    folder = write_frames(tmp_path / "frames", [(64, 64)] * 12)
    data = bytearray((folder / "f5.png").read_bytes())
    data[200:len(data) - 100] = bytes(len(data) - 300)       # zeroed inside, header and end marker kept
    (folder / "f5.png").write_bytes(bytes(data))
    script = (f"import sys, train; sys.exit(train.main({TINY!r} + ['--dataset', 'frames', '--data-dir', {str(folder)!r}, "
              f"'--workers', '2', '--steps', '20', '--num-sprite-sequences', '8']"
              f" + {run_dirs(tmp_path / 'run')!r}))")
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: frame '{folder / 'f5.png'}' is truncated or corrupt")
    assert not (tmp_path / "run").exists()      # made by this run, which wrote no checkpoint: removed


def test_numbered_frames_are_read_as_grand_central_with_a_notice(tmp_path, capsys):
    folder = write_frames(tmp_path / "numbered", [(64, 64)] * 3)
    for n in range(3):
        (folder / f"f{n}.png").rename(folder / f"{n:04d}.png")
    args = train.build_parser().parse_args(["--data-dir", str(folder)])
    assert dataset_kind(args.dataset, args.data_dir) == "grandcentral"
    assert "pass --dataset frames for a video of your own" in capsys.readouterr().out


def test_a_folder_as_checkpoint_says_so(short_run, tmp_path, capsys):
    assert train.main(TINY + run_dirs(tmp_path, "--resume", str(short_run / "checkpoints"))) == 2
    assert "is a folder: pass one of its ckpt_*.pt files" in capsys.readouterr().err


def test_resume_drops_the_losses_logged_after_the_checkpoint(short_run, tmp_path):
    """A run killed after its last checkpoint logged steps 5 and 6 (and half a line): resuming from
    step 4 logs them again, once."""
    import shutil
    shutil.copytree(short_run, tmp_path / "run")
    with open(tmp_path / "run" / "summary" / "losses.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.0, "skipped": false}\n{"step": 6, "loss": 1.0, "skipped": false}\n{"step": 7, "lo')
    assert train.main(TINY + run_dirs(tmp_path / "run", "--resume", "auto", "--steps", "6")) == 0
    assert [entry["step"] for entry in losses(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    assert all(entry["loss"] != 1.0 for entry in losses(tmp_path / "run"))


def test_resume_with_another_batch_size_keeps_the_data_position(short_run, tmp_path):
    """Step 2 of batch 2 has used 4 sequences of the epoch's order (which does not depend on the
    batch size): with batch 4 the run continues at its global batch 1, not 2."""
    ckpt = str(short_run / "checkpoints" / "ckpt_00000002.pt")
    args = train.build_parser().parse_args(TINY + run_dirs(tmp_path, "--resume", ckpt, "--batch-size", "4"))
    run = train.setup(args)
    assert (run.start.step, run.start.epoch, run.start.batch_index) == (2, 0, 1)


@pytest.mark.parametrize("dataset", ["frames", "grandcentral", None])
def test_a_preset_given_with_a_data_dir_is_ignored_with_a_notice(dataset, tmp_path, capsys):
    folder = write_frames(tmp_path / "numbered", [(96, 64)] * 12)   # 3:2, as Grand Central's crops need
    for n in range(12):
        (folder / f"f{n}.png").rename(folder / f"{n:04d}.png")
    chosen = ["--dataset", dataset] if dataset else []
    flags = TINY + run_dirs(tmp_path / "run", "--data-dir", str(folder), *chosen, "--frame-skip", "1",
                            "--train-station-cropping-origin", "32", "--steps", "1")
    notice = "notice: --preset applies only to the built-in sprite scenes; ignored with --dataset "
    assert train.main(flags + ["--preset", "spmot"]) == 0
    assert notice in capsys.readouterr().out
    assert train.main(flags + ["--resume", "auto", "--steps", "2"]) == 0   # not given: no notice
    assert "--preset" not in capsys.readouterr().out
    assert train.main(TINY + run_dirs(tmp_path / "sprites", "--preset", "spmot", "--steps", "1")) == 0
    assert "--preset applies only" not in capsys.readouterr().out
    assert train.main(TINY + run_dirs(tmp_path / "skip", "--frame-skip", "3", "--steps", "1")) == 0    # the other way
    assert "notice: --frame-skip applies only to folders of frames" in capsys.readouterr().out
