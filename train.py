"""Train SCALOR.

    python train.py --small                              # built-in moving sprites, laptop-sized model
    python train.py --data-dir /data/grand_central       # the reference's Grand Central setup
    python train.py --data-dir my_frames --seq-len 8     # any folder of frames (or of videos)
    python train.py --small --resume auto                # continue the newest checkpoint of the run

Every field of `common.Config` is a flag (`num_cell_h` -> `--num-cell-h`, switches as
`--phase-conv-lstm/--no-phase-conv-lstm`); flags given override the defaults (`--small`: the
laptop preset of `common.small_config`) or, on resume, the checkpoint's config.

A run lives in runs/<run name>/: checkpoints/ckpt_<step>.pt (the last --keep-checkpoints kept)
and summary/ (TensorBoard events, and losses.jsonl: one {"step", "loss", "skipped", "time"} line per
step, "time" its end in seconds since the epoch).
"step" is the training iteration (1-based); a skipped (non-finite) iteration counts as a step.

Resume continues exactly: a checkpoint holds the model, optimizer, RNG states and the data
position (epoch, next batch); epoch e visits the data in the order of a permutation seeded by
seed + e, so the resumed run sees the same batches in the same order.

Before the first step the checkpoint and summary folders are created, locked (an flock on each
folder, held while the process lives: a second train.py on the same run is refused) and checked to
be writable; temporary files of checkpoint writes a killed run left are removed. Checkpoints hold
only tensors and plain values and are read with torch.load(weights_only=True): a file that would
run code is refused. A fresh start (no checkpoint resumed) starts losses.jsonl afresh.

Exit codes: 0 done or stopped by SIGINT/SIGTERM (after a checkpoint); 1 too many non-finite steps
in a row (after a checkpoint of the newest state whose weights then gave a finite step);
2 bad input (data, config, checkpoint, an unwritable or locked folder; a one-line message on
stderr, nothing written) or a checkpoint that could not be written (disk full). A run stopped by an
error before its first checkpoint and first logged step removes the folders it made (folders that
existed are kept).

Modules: checkpoints.py (checkpoint files, resume, run folders, loss log), distributed.py
(torchrun), data.py (datasets, `build_dataset`), engine.py (one training step).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import json
import math
import os
import signal
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import utils
import viz
from checkpoints import (CheckpointError, Progress, SaveError, check_branch, checkpoint_step, claim_folders,
                         list_checkpoints, load_training_state, open_loss_log, read_checkpoint, remove_unsaved_run,
                         resume_path, rng_state, take_snapshot, weights_sane, write_checkpoint)
from common import RECIPES, Config, ConfigError, check_flags_at_least, flag_help, small_config
from data import (DATASET_KINDS, SPRITE_PRESETS, DataError, SpriteSpec, build_dataset, dataset_kind, estimate_background,
                  iterate, make_loader)
from distributed import Dist, all_mean, init_distributed, shutdown
import fast
from engine import TrainStep, make_optimizer
from fast import SpeedOptions
from modules import start_background_at
from scalor import SCALOR
from utils import LOW_TRACKED_SHARE, Parser, lr_at, seed_everything, tau_at, z_pres_prior_at


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description="Train SCALOR.", allow_abbrev=False)
    group = parser.add_argument_group("config (common.Config; only flags given override the defaults, "
                                      "the --small preset or a resumed checkpoint's config)")
    types = typing.get_type_hints(Config)
    helps = flag_help()
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        text = f"{helps[field.name]} [{field.default}]".replace("%", "%%")
        if types[field.name] is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            kind = types[field.name]
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                               help=text)

    run = parser.add_argument_group("run")
    run.add_argument("--small", action="store_true",
                     help="laptop preset: 64x64, 4x4 cells, glimpse 32, seq 5, cap 10, batch 8 (flags given win)")
    run.add_argument("--recipe", choices=sorted(RECIPES),
                     help="named config over the --small sizes (common.sprites_config: the measured sprite recipe; "
                          "phase_no_background from the data unless given, and with a background common.SPRITES_BACKGROUND; "
                          "flags given win)")
    run.add_argument("--data-dir", metavar="DIR",
                     help="folder of frames (or of videos); absent: built-in moving sprites")
    run.add_argument("--dataset", choices=DATASET_KINDS,
                     help="default: sprites without --data-dir, else grandcentral if every frame is named "
                          "by a number, else frames")
    run.add_argument("--preset", choices=sorted(SPRITE_PRESETS),
                     help="sprite scenes [easy; on resume, the checkpoint's]")
    run.add_argument("--num-sprite-sequences", type=int, metavar="N",
                     help=f"sprite dataset size [{SpriteSpec.num_sequences:,}, drawn on the fly; on resume, the checkpoint's]")
    run.add_argument("--frame-skip", type=int, metavar="N",
                     help="frames between sequence frames [grandcentral 8, frames 1]")
    run.add_argument("--skip-bad-frames", action="store_true", help="drop unreadable frames instead of failing")
    run.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                     help="data-loader worker processes [4, at most the CPU count]")
    run.add_argument("--run-name", metavar="NAME", help="run folder runs/<name> [sprites-<preset>, grandcentral or the data folder's name; "
                     "-small added with --small]")
    run.add_argument("--ckpt-dir", metavar="DIR", help="checkpoint folder [runs/<name>/checkpoints]")
    run.add_argument("--summary-dir", metavar="DIR", help="TensorBoard folder [runs/<name>/summary]")
    length = run.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, metavar="N", help="train until this step [100000]")
    length.add_argument("--epochs", type=int, metavar="N", help="train for this many passes over the data")
    run.add_argument("--max-minutes", type=float, metavar="M",
                     help="stop after M minutes of training (wall clock), saving a checkpoint, as on SIGTERM")
    run.add_argument("--keep-checkpoints", type=int, default=3, metavar="N", help="keep the last N checkpoints [3]")
    run.add_argument("--resume", metavar="PATH|auto",
                     help="continue from a checkpoint file, or the newest one of the run (auto)")
    run.add_argument("--allow-partial-load", action="store_true",
                     help="resume even if the checkpoint's architecture differs (loads what fits)")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="[auto: CUDA if available]")
    run.add_argument("--max-bad-steps", type=int, default=20, metavar="N",
                     help="stop after this many non-finite steps in a row [20]")
    SpeedOptions.add_arguments(parser)   # --no-cuda-graph, --compile, --precision, ... (shared with bench.py)
    return parser


def check_run_args(args) -> None:
    check_flags_at_least(args, (("workers", 0), ("keep_checkpoints", 1), ("max_bad_steps", 1), ("steps", 1),
                                ("epochs", 1), ("frame_skip", 1), ("num_sprite_sequences", 1)))
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ConfigError(f"--max-minutes={args.max_minutes} must be positive")
    if args.data_dir is not None and args.dataset == "sprites":
        raise ConfigError("--data-dir is not used by the sprites dataset: drop it, "
                          "or pick --dataset grandcentral or frames")
    if args.data_dir is None and args.dataset in ("grandcentral", "frames"):
        raise ConfigError(f"--dataset {args.dataset} needs --data-dir with a folder of frames")
    name = args.run_name
    if name and (name in (".", "..") or "/" in name or os.sep in name):
        raise ConfigError(f"--run-name '{args.run_name}' must be a folder name under runs/, without '/': pass "
                          f"--ckpt-dir and --summary-dir to write elsewhere")


def given_config(args) -> dict:
    """The config fields given as flags."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}


def make_config(args, base: Config | None, recipe_background: bool = False) -> Config:
    """Flags given over `base` (a checkpoint's config), or over the defaults / the --small preset /
    the recipe (with its background settings if `recipe_background`).

    observe_frames, when not given, is lowered to seq_len - 1 if it would not fit the sequence."""
    given = given_config(args)
    if base is None:
        base = (RECIPES[args.recipe](background=recipe_background) if args.recipe
                else small_config() if args.small else Config())
    values = {**base.to_dict(), **given}
    if "observe_frames" not in given and values["observe_frames"] >= values["seq_len"]:
        values["observe_frames"] = max(1, values["seq_len"] - 1)
    return Config(**values)


def recipe_for_data(args, cfg: Config, dataset) -> tuple[Config, dict | None]:
    """A new --recipe run's config fitted to its data: without a background module where the frames are
    mostly black (unless --[no-]phase-no-background says), else with the recipe's background settings
    (common.SPRITES_BACKGROUND) under the flags given. Also returns the frames' estimate, if read."""
    given, estimate = given_config(args), None
    if "phase_no_background" not in given:   # decided by the data
        estimate = estimate_background(dataset)
        cfg = cfg.replace(phase_no_background=not estimate["has_background"])
        print(f"notice: --recipe {args.recipe}: phase_no_background={cfg.phase_no_background} (estimated from the frames; "
              f"pass --phase-no-background or --no-phase-no-background to choose)")
    if not cfg.phase_no_background:
        background = make_config(args, None, recipe_background=True).replace(phase_no_background=False)
        added = {k: new for k, (new, _) in background.diff(cfg).items()}
        cfg = background
        if added:
            print(f"notice: --recipe {args.recipe} with a background adds " + ", ".join(f"{k}={v}" for k, v in added.items())
                  + " (README, 'Recipe'; all but the curriculum itself are not in the reference); flags given override them")
    return cfg, estimate


def pick_device(name: str, ddp: Dist = Dist(), small: bool = False) -> torch.device:
    if ddp.world > 1:
        return torch.device(f"cuda:{ddp.local_rank}") if name != "cpu" and torch.cuda.is_available() else torch.device("cpu")
    return utils.pick_device(name, "notice: no CUDA device found, training on the CPU"
                             + ("" if small else " (slow at full size; try --small)"))


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

class TrainOrder(torch.utils.data.Sampler):
    """This process's sequence indices, epoch after epoch without end, from global batch
    `start_batch` of `epoch` on.

    Epoch e's order is a permutation seeded by seed + e, the same in every process; global batch b
    is order[b*G:(b+1)*G] with G = batch_size * processes, and process r takes its r-th slice of
    batch_size (an incomplete last global batch is dropped). A resumed run continues with exactly
    the batches it would have had. One loader serves every epoch, so its workers start once."""

    def __init__(self, num_items: int, cfg: Config, epoch: int, start_batch: int, ddp: Dist = Dist()):
        self.num_items, self.seed = num_items, cfg.seed
        self.batch, self.rank, self.world = cfg.batch_size, ddp.rank, ddp.world
        if start_batch >= self.batches_per_epoch():   # past the end: the next epoch's first batch
            epoch, start_batch = epoch + 1, 0
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.num_items // (self.batch * self.world)

    def __len__(self) -> int:   # one epoch's share of this process
        return self.batches_per_epoch() * self.batch

    def __iter__(self):
        B, G = self.batch, self.batch * self.world
        epoch, start = self.epoch, self.start_batch
        while self.batches_per_epoch() > 0:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for b in range(start, self.batches_per_epoch()):
                yield from order[b * G + self.rank * B: b * G + (self.rank + 1) * B]
            epoch, start = epoch + 1, 0


def batches(dataset, cfg: Config, epoch: int, start_batch: int, workers: int, pin_memory: bool, ddp: Dist = Dist()):
    """Yield (epoch, global batch index, batch) forever, from batch `start_batch` of epoch `epoch`
    (the next epoch's first batch when `start_batch` is past the end of that epoch)."""
    order = TrainOrder(len(dataset), cfg, epoch, start_batch, ddp)   # its batches_per_epoch: the Run's
    loader = make_loader(dataset, cfg.batch_size, shuffle=False, workers=workers, pin_memory=pin_memory,
                         drop_last=True, seed=cfg.seed, sampler=order)
    epoch, index, per_epoch = order.epoch, order.start_batch, order.batches_per_epoch()
    for batch in iterate(loader):
        yield epoch, index, batch
        index += 1
        if index == per_epoch:
            epoch, index = epoch + 1, 0


# ------------------------------------------------------------------------------------------------
# Setup: everything is validated before anything is written
# ------------------------------------------------------------------------------------------------

@dataclass
class Run:
    cfg: Config
    device: torch.device
    model: SCALOR
    optimizer: torch.optim.Optimizer
    dataset: object
    data_desc: dict
    start: Progress
    total_steps: int
    ckpt_dir: Path
    summary_dir: Path
    keep_checkpoints: int
    resumed: bool
    ddp: Dist = Dist()
    locks: list = dataclasses.field(default_factory=list)   # FolderLocks held until the run ends
    created: list = dataclasses.field(default_factory=list)   # folders this process made for the run
    speed: SpeedOptions = dataclasses.field(default_factory=SpeedOptions)   # resolved for the device
    batches_per_epoch: int = 1   # global batches of batch_size * processes sequences in one epoch

    def release(self) -> None:
        for lock in self.locks:
            lock.release()
        self.locks = []

    def discard_if_unsaved(self) -> None:
        """After an error: remove the run's folders if this process made them and neither a checkpoint
        nor a step's loss line was written (call with the folders still locked, the logs closed)."""
        removed = remove_unsaved_run(self.created, self.ckpt_dir, self.summary_dir)
        if removed:
            print(f"notice: the run stopped before its first checkpoint: removed the folders it made "
                  f"({', '.join(str(p) for p in removed)})")


def setup(args, ddp: Dist = Dist()) -> Run:
    check_run_args(args)
    if args.cuda_graph and ddp.world > 1:
        raise ConfigError("--cuda-graph works in single-process runs only: drop it under torchrun")
    device = pick_device(args.device, ddp, small=args.small or args.recipe is not None or args.resume is not None)
    named = args.resume not in (None, "auto")          # --resume FILE: read first, its data names the run
    path = Path(args.resume) if named else None
    payload = read_checkpoint(str(path)) if named else None
    kind, data_dir, frame_skip = run_data(args, payload, notice=args.resume != "auto")   # auto: again below
    run_name = args.run_name or default_run_name(args, kind, data_dir, sprite_flags(args, kind, payload)[0])
    ckpt_dir = Path(args.ckpt_dir or Path("runs") / run_name / "checkpoints")
    summary_dir = Path(args.summary_dir or Path("runs") / run_name / "summary")
    for folder, flag in ((ckpt_dir, "--ckpt-dir"), (summary_dir, "--summary-dir")):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"'{folder}' is a file, not a folder: pass another {flag} or --run-name")

    if not named:
        path = resume_path(args.resume, ckpt_dir)
        try:
            payload = read_checkpoint(str(path)) if path is not None else None
        except CheckpointError as e:      # the run's newest is damaged: say how to resume from the one before
            raise CheckpointError(f"{e}; it is the newest checkpoint in '{ckpt_dir}': move it out of the folder to "
                                  f"resume from the one before") from None
        if args.resume == "auto":
            kind, data_dir, frame_skip = run_data(args, payload)
    if ddp.main:
        for flag, given in (("--preset", args.preset), ("--num-sprite-sequences", args.num_sprite_sequences)):
            if given is not None and kind != "sprites":
                print(f"notice: {flag} applies only to the built-in sprite scenes; ignored with --dataset {kind}")
        if args.frame_skip is not None and kind == "sprites":
            print("notice: --frame-skip applies only to folders of frames; ignored with the built-in sprite scenes")
    if payload is not None and args.small:
        print("notice: resuming, so the config comes from the checkpoint (flags given override it; --small is ignored)")
    cfg = make_config(args, payload["config"] if payload else None)
    preset, num_sprites = sprite_flags(args, kind, payload)
    dataset = build_dataset(kind, cfg, train=True, data_dir=data_dir, preset=preset,
                            num_sequences=num_sprites, frame_skip=frame_skip,
                            skip_bad_frames=args.skip_bad_frames, seed=cfg.seed)
    estimate = None   # data.estimate_background: read from the frames once, where needed
    if args.recipe and payload is None:
        cfg, estimate = recipe_for_data(args, cfg, dataset)
    data_desc = dict(dataset=kind, data_dir=data_dir, preset=preset, frame_skip=frame_skip,
                     num_sequences=len(dataset))
    batches_per_epoch = TrainOrder(len(dataset), cfg, 0, 0, ddp).batches_per_epoch()
    if batches_per_epoch < 1:   # now, before anything is written
        raise DataError(f"the dataset gives {len(dataset)} sequences, fewer than one batch of "
                        f"{cfg.batch_size * ddp.world}: add data or lower --batch-size")

    seed_everything(cfg.seed)
    model = SCALOR(cfg).to(device)
    if cfg.bg_colour_init and payload is None and not cfg.phase_no_background:   # a new run only
        estimate = estimate or estimate_background(dataset)
        start_background_at(model.bg_dec, torch.tensor(estimate["mean_colour"]))
    if ddp.world > 1:   # the same initial weights everywhere, then each process its own noise
        seed_everything(cfg.seed + 1000 * ddp.rank)
    speed = SpeedOptions.from_args(args).resolved(device, distributed=ddp.world > 1)   # notices for CPU runs
    if device.type == "cuda":   # training shapes are fixed: let cuDNN time its algorithms once
        fast.set_precision(speed.precision, cudnn_benchmark=speed.cudnn_benchmark)
    else:                       # --precision acts on CUDA only
        speed = dataclasses.replace(speed, precision="fp32")
    fast.apply(model, speed)      # in place: parameter names and checkpoints unchanged
    optimizer = make_optimizer(model, cuda_graph=speed.cuda_graph)
    start = Progress(step=0, epoch=0, batch_index=0, bad_steps=0, rng={})
    if payload is not None:
        start = load_training_state(model, optimizer, payload, path, args.allow_partial_load, cfg, data_desc, ddp)
    check_branch(ckpt_dir, start.step if payload is not None else None, path if payload is not None else None)
    if start.batch_index >= batches_per_epoch:   # the checkpoint's epoch was longer (other data or batch size)
        start = dataclasses.replace(start, epoch=start.epoch + 1, batch_index=0)
    total_steps = args.epochs * batches_per_epoch if args.epochs else (args.steps or 100000)
    nothing_to_do = start.step >= total_steps             # main() says so; no folder is made for it
    locks, created = ([], []) if nothing_to_do else claim_folders(ckpt_dir, summary_dir, ddp)   # the last check
    return Run(cfg=cfg, device=device, model=model, optimizer=optimizer, dataset=dataset, data_desc=data_desc,
               start=start, total_steps=total_steps, ckpt_dir=ckpt_dir, summary_dir=summary_dir,
               keep_checkpoints=args.keep_checkpoints, resumed=payload is not None, ddp=ddp, locks=locks,
               created=created, speed=speed, batches_per_epoch=batches_per_epoch)


def sprite_flags(args, kind: str, payload) -> tuple[str, int | None]:
    """--preset and --num-sprite-sequences: as given; else, resuming a run on sprites, the checkpoint's;
    else the easy preset at its own size."""
    trained = payload.get("data", {}) if payload else {}
    same = kind == "sprites" and trained.get("dataset") == "sprites"
    if kind != "sprites":                               # neither is used: recorded as every such run has them
        return "easy", None
    preset = args.preset or (trained.get("preset") if same else None) or "easy"
    num = args.num_sprite_sequences
    if num is None and same and preset == trained.get("preset"):
        num = trained.get("num_sequences")
    return preset, num


def run_data(args, payload, notice: bool = True) -> tuple[str, str | None, int | None]:
    """(dataset kind, data folder, frame skip) to train on: as the flags give them (`data.dataset_kind`,
    its notice unless `notice` is off); where a resumed run's flags leave them out, as its checkpoint
    records them, so that resuming trains on the same data: with no data flag at all (--dataset,
    --data-dir, --preset, --num-sprite-sequences), the checkpoint's frames; with its --data-dir, its kind
    (the file names alone may suggest another); without --frame-skip, its frame skip for the same kind."""
    trained = payload.get("data") if payload is not None and isinstance(payload.get("data"), dict) else {}
    kind, data_dir, frame_skip = args.dataset, args.data_dir, args.frame_skip
    trained_kind, trained_dir = trained.get("dataset"), trained.get("data_dir")
    sprites_asked = args.preset is not None or args.num_sprite_sequences is not None
    if kind is None and trained_kind in ("frames", "grandcentral") and trained_dir and not sprites_asked:
        if data_dir is None:
            if not os.path.isdir(trained_dir):
                raise DataError(f"the checkpoint was trained on '{trained_dir}' ({trained_kind}), which is not a "
                                f"folder here: pass --data-dir (a relative path counts from where train.py runs)")
            kind, data_dir = trained_kind, trained_dir
        elif os.path.realpath(data_dir) == os.path.realpath(trained_dir):
            kind = trained_kind
    kind = dataset_kind(kind, data_dir, notice)
    if frame_skip is None and trained_kind == kind:
        frame_skip = trained.get("frame_skip")
    return kind, data_dir, frame_skip


def default_run_name(args, kind: str, data_dir: str | None, preset: str) -> str:
    name = f"sprites-{preset}" if kind == "sprites" else \
        "grandcentral" if kind == "grandcentral" else Path(data_dir).resolve().name
    return name + ("-small" if args.small else "")


# ------------------------------------------------------------------------------------------------
# One step and its logging
# ------------------------------------------------------------------------------------------------

def log_scalars(writer, cfg: Config, step: int, terms: dict, loss: float, objects: float, steps_per_s: float,
                bad_steps: int, lr: float) -> None:
    for name, value in terms.items():
        writer.add_scalar(f"train/{name}", value, step)
    writer.add_scalar("train/total_loss", loss, step)
    writer.add_scalar("train/tau", tau_at(cfg, step - 1), step)
    writer.add_scalar("train/z_pres_prior", z_pres_prior_at(cfg, step), step)
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("train/objects_per_frame", objects, step)
    writer.add_scalar("train/steps_per_s", steps_per_s, step)
    writer.add_scalar("train/bad_steps", bad_steps, step)


def log_images(writer, cfg: Config, step: int, batch, out) -> None:
    """Panels of the first num_img_summary sequences: rows = sequences, columns = frames."""
    n = cfg.num_img_summary
    writer.add_image("images/input", viz.tile(batch[:n]), step)
    writer.add_image("images/reconstruction", viz.tile(out.recon[:n]), step)
    writer.add_image("images/background", viz.record_panel(out.records, "background", n), step)
    writer.add_image("images/alpha", viz.record_panel(out.records, "alpha_map", n), step)
    writer.add_image("images/boxes", viz.boxes_panel(batch, out.records, n, cfg.color_num), step)


def log_generation(writer, model, cfg: Config, step: int, batch) -> None:
    """Observe cfg.observe_frames frames, then generate from the priors; reconstruction with boxes."""
    seqs = batch[:cfg.num_img_summary]
    model.eval()
    try:   # eval-mode shapes vary from frame to frame: run compiled blocks eagerly rather than recompile
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            out = model(seqs, step=step, tau=tau_at(cfg, step - 1), generate=True, keep_records=True)
    finally:
        model.train()
    writer.add_image("generation/rollout", viz.boxes_panel(out.recon, out.records, len(seqs), cfg.color_num), step)
    writer.add_image("generation/input", viz.tile(seqs), step)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

NO_OBJECT_STEPS = 2000   # steps in a row without any object after which a run with a background is told so
NO_TRACKING_STEPS = 2000  # steps whose logs all show objects found anew in every frame (tracked share below
                          # utils.LOW_TRACKED_SHARE), after which the run is told so


def no_objects_notice(cfg: Config, step: int, last_with_objects: int) -> str | None:
    """The notice for a run whose background module has explained every frame (no object kept)
    since step `last_with_objects`, once NO_OBJECT_STEPS have passed: the authors' remedies."""
    if cfg.phase_no_background or step - last_with_objects != NO_OBJECT_STEPS:
        return None
    return (f"notice: step {step}: no objects found in the last {NO_OBJECT_STEPS} steps, the background explains "
            f"the frames; try more cells (--num-cell-h/--num-cell-w), a weaker background (--using-bg-sbd, a smaller "
            f"--bg-what-dim) or --phase-bg-alpha-curriculum, then watching train/tracked_share "
            f"(README: 'When the foreground does not learn')")


def tracked_share(records: list) -> float | None:
    """Of the objects' presence (the sum of z_pres) in every frame but the first of a logged batch
    (the main process's part of it), the share held by objects tracked from the previous frame: near 1
    when objects are followed from frame to frame, near 0 when they are found anew in every frame (a
    new id each frame). None when that presence is below one object or not finite."""
    sums = torch.stack([torch.stack((r.z_pres.float().sum(), (r.z_pres.float() * r.propagated).sum()))
                        for r in records[1:]])                  # (T - 1, 2): per frame present, carried
    present, carried = sums.sum(0).tolist()
    return carried / present if math.isfinite(present + carried) and present >= 1 else None


def no_tracking_notice(cfg: Config, step: int, last_tracking: int) -> str | None:
    """The notice for a run whose logged tracked share has been below LOW_TRACKED_SHARE at every log
    after step `last_tracking`, once NO_TRACKING_STEPS have passed (the caller tells it once)."""
    if step - last_tracking < NO_TRACKING_STEPS:
        return None
    advice = ("seen with --phase-bg-alpha-curriculum on a textured background: try without it, with "
              "--bg-alpha-curriculum-detach-tracked, or another --seed"
              if cfg.phase_bg_alpha_curriculum and not cfg.bg_alpha_curriculum_detach_tracked else "try another --seed")
    return (f"notice: step {step}: objects are found anew in every frame (train/tracked_share below "
            f"{LOW_TRACKED_SHARE} at every log after step {last_tracking}): tracking has not formed, and the tracks "
            f"get a new id each frame; {advice} (README: 'When the foreground does not learn')")


def install_stop_handlers():
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits 0."""
    stop = {"signal": None}

    def handler(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return stop, previous


def open_logs(run: Run):
    """(TensorBoard writer, losses.jsonl file) of the run's summary folder (made, checked and locked by
    setup). Events and losses of steps after the start (a killed run's, or a fresh start's predecessor
    killed before its first checkpoint) are dropped: purge_step for TensorBoard."""
    writer = SummaryWriter(str(run.summary_dir), purge_step=run.start.step + 1 if run.resumed else 0)
    if not run.resumed:
        writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in run.cfg.to_dict().items()), 0)
    return writer, open_loss_log(run.summary_dir, run.start.step, run.resumed)


def announce(run: Run, step: int) -> None:
    """The run's first line: parameters, device, data, steps, checkpoint folder, speed options."""
    world = run.ddp.world
    print(f"training {sum(p.numel() for p in run.model.parameters()):,} parameters on {run.device}"
          f"{f' x {world} processes' if world > 1 else ''}, {run.data_desc['dataset']} "
          f"({len(run.dataset)} sequences), steps {step + 1}..{run.total_steps}, checkpoints in {run.ckpt_dir}; "
          f"speed: {run.speed.describe(run.device)}",
          flush=True)
    if run.speed.compile:
        print("notice: --compile: on a cold cache the first steps compile first (cached for later runs), "
              "and a few graphs again once at the schedule's switches", flush=True)


def give_up(run: Run, kept, verified, good: Progress, step: int, bad_in_row: int, bar) -> None:
    """After too many non-finite steps in a row: save `verified` (the newest snapshot whose weights then
    gave a finite step), else `kept` (the start's: no step since was finite), not pruned at once when
    newer checkpoints lie beside it, and say so on stderr (rank 0)."""
    last = verified or kept
    newer = [p.name for p in list_checkpoints(run.ckpt_dir) if checkpoint_step(p) > last.progress.step]
    path = write_checkpoint(run, last.progress, last, prune=not newer)
    if not run.ddp.main:
        return
    why = "" if weights_sane(run.model) else f" (the weights after step {good.step} had diverged)"
    what = "the newest state whose weights then gave a finite step" if verified else \
        "the state it started from (no step since was finite)"
    how = (f"resume from it as a new run (--resume {path} with another --run-name, or --ckpt-dir "
           f"and --summary-dir): the newer {newer[0]}{' ...' if len(newer) > 1 else ''} gave no "
           f"finite step") if newer else "resume from it"
    bar.write(f"error: step {step}: {bad_in_row} non-finite steps in a row; saved {what} (step "
              f"{last.progress.step}){why} to {path}; lower --lr or --cp and {how}", file=sys.stderr)


def train(run: Run, args) -> int:
    """Train from run.start to run.total_steps; returns the exit code.

    Under torchrun every process steps on its own shard of each global batch; one
    DistributedDataParallel averages the gradients; losses and metrics are averaged over the
    processes; only rank 0 writes logs, images and checkpoints."""
    cfg, model, ddp = run.cfg, run.model, run.ddp
    forward = model
    if ddp.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        forward = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    speed = run.speed
    step_fn = TrainStep(model, run.optimizer, precision=speed.precision, cuda_graph=speed.cuda_graph, forward=forward)
    writer, losses = open_logs(run) if ddp.main else (None, None)
    stop, previous = install_stop_handlers()
    pin = run.device.type == "cuda"
    data = batches(run.dataset, cfg, run.start.epoch, run.start.batch_index, args.workers, pin, ddp)
    good = run.start if run.start.rng else dataclasses.replace(run.start, rng=rng_state())
    step, bad_steps, bad_in_row, saved_at = good.step, good.bad_steps, 0, good.step
    # CPU copies of the state, taken at the start and at the finite logging and checkpoint steps whose
    # weights pass weights_sane: `kept`, the newest, and `verified`, the newest whose weights then gave a
    # finite step. A run that gives up on non-finite steps saves `verified`: the weights of its last finite
    # step may be what makes every later step non-finite.
    kept, verified = take_snapshot(run, good), None
    last_log = (time.time(), step)
    started = time.time()
    deadline = started + 60 * args.max_minutes if args.max_minutes else math.inf
    time_share = 0.0                            # the share of --max-minutes used, agreed after each step
    if ddp.main:
        announce(run, step)
    recent = collections.deque(maxlen=50)       # the last 50 steps' losses, for the progress bar
    last_with_objects = step                    # the last step whose batch kept any object
    last_tracking, told_tracking = step, False  # the last log whose objects were tracked across frames
    bar = tqdm(total=run.total_steps, initial=step, desc="train", dynamic_ncols=True, disable=not ddp.main)
    model.train()
    code = 0
    try:
        while step < run.total_steps:
            epoch, index, batch = next(data)
            step += 1
            batch = batch.to(run.device, non_blocking=pin)
            log_now = step == 1 or step % cfg.print_freq == 0
            lr = lr_at(cfg, max((step - 1) / run.total_steps, time_share))
            if cfg.lr_decay_share > 0:
                step_fn.set_lr(lr)
            result = step_fn(batch, step, keep_records=log_now and ddp.main)
            # one small all-reduce: loss, objects, "stop requested" (a signal or --max-minutes) and the share
            # of --max-minutes used, agreed by every process: all stop after the same step, at the same lr
            now = time.time()
            out_of_time = now >= deadline
            stop_now = stop["signal"] is not None or out_of_time
            used = (now - started) / (60 * args.max_minutes) if args.max_minutes else 0.0
            flags = torch.tensor((float(stop_now), used), device=result.loss.device)
            summary = all_mean(torch.cat((result.loss.view(1), result.counts.float().mean().view(1), flags)), ddp)
            loss, objects, stop_any, time_share = summary.tolist()
            ok = bool(result.finite)
            position = (epoch, index + 1) if index + 1 < run.batches_per_epoch else (epoch + 1, 0)
            if ok:
                verified = kept                 # kept's weights (or later ones, after a finite step on them) gave this
                bad_in_row = 0
                good = Progress(step, *position, bad_steps, rng_state())
                if log_now and weights_sane(model):
                    kept = take_snapshot(run, good)
            else:
                bad_in_row, bad_steps = bad_in_row + 1, bad_steps + 1
                if writer:
                    writer.add_scalar("train/bad_steps", bad_steps, step)
                bar.write(f"step {step}: non-finite loss or gradient norm (loss {loss}); step skipped "
                          f"({bad_in_row} in a row)")
            if losses:
                record = {"step": step, "loss": loss if math.isfinite(loss) else None,     # JSON has no NaN
                          "skipped": not ok, "time": round(time.time(), 3)}
                losses.write(json.dumps(record) + "\n")
                losses.flush()
            if log_now:
                terms = all_mean(torch.stack(list(result.terms.values())), ddp)
                if writer:
                    now = time.time()
                    steps_per_s = (step - last_log[1]) / (now - last_log[0])
                    log_scalars(writer, cfg, step, dict(zip(result.terms, terms.tolist())), loss, objects, steps_per_s,
                                bad_steps, lr)
                    log_images(writer, cfg, step, batch, result.output)
                    last_log = (now, step)
            if log_now and ddp.main:
                share = tracked_share(result.output.records)
                if writer and share is not None:
                    writer.add_scalar("train/tracked_share", share, step)
                if share is None or share >= LOW_TRACKED_SHARE:
                    last_tracking = step
                elif not told_tracking and (notice := no_tracking_notice(cfg, step, last_tracking)):
                    bar.write(notice)
                    told_tracking = True
            if writer and step % cfg.generate_freq == 0:
                log_generation(writer, model, cfg, step, batch)
            bar.update(1)
            recent.append(loss)                 # single steps swing widely: the bar shows a running mean too
            bar.set_postfix(loss=f"{loss:.1f}", mean50=f"{sum(recent) / len(recent):.1f}", obj=f"{objects:.2f}")
            if objects > 0:
                last_with_objects = step
            elif ddp.main and (notice := no_objects_notice(cfg, step, last_with_objects)):
                bar.write(notice)

            if bad_in_row >= args.max_bad_steps:
                give_up(run, kept, verified, good, step, bad_in_row, bar)
                code = 1
                break
            if ok and step % cfg.save_freq == 0:
                if weights_sane(model):
                    write_checkpoint(run, good)
                    saved_at = step
                    if kept.progress.step != step:  # no checkpoint newer than `kept`: see the give-up above
                        kept = take_snapshot(run, good)
                elif ddp.main:
                    bar.write(f"step {step}: the weights have diverged (beyond ~1e19); no checkpoint written")
            if stop_any > 0:
                path = write_checkpoint(run, Progress(step, *position, bad_steps, rng_state()))
                if ddp.main:
                    why = stop["signal"] or (f"--max-minutes {args.max_minutes:g}" if out_of_time else "signal")
                    bar.write(f"{why}: stopped after step {step}; saved {path}")
                break
        else:
            if saved_at != step:
                write_checkpoint(run, Progress(step, *position, bad_steps, rng_state()))
    finally:   # the stop handlers stay until the teardown is done: a second Ctrl-C cannot break it
        try:
            bar.close()
            data.close()
            if losses:
                losses.close()
            if writer:
                writer.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return code


def last_line(err: Exception) -> str:
    """The error's last line: a loader worker's error re-raised in the main process ends with the
    worker's traceback, whose last line is 'data.DataError: <message>' (the prefix is dropped)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return lines[-1].removeprefix(prefix) if len(lines) > 1 else lines[-1]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ddp = init_distributed(args.device)
        run = setup(args, ddp)
    except (DataError, ConfigError, CheckpointError) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {last_line(err)}", file=sys.stderr)
        return 2
    finished = False
    try:
        if run.start.step >= run.total_steps:
            print(f"checkpoint is at step {run.start.step}, the run ends at step {run.total_steps}: nothing to do")
            return 0
        code = train(run, args)
        finished = True
        return code
    except (DataError, SaveError) as err:   # e.g. a corrupt frame met during training, a full disk
        print(f"error: {last_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
            raise
        then = (f"the last checkpoint in '{run.ckpt_dir}' is intact: free space, then resume with --resume auto"
                if list_checkpoints(run.ckpt_dir) else "no checkpoint was written yet: free space, then start again")
        print(f"error: writing the run's logs failed ({err.strerror}): disk full / not writable; {then}",
              file=sys.stderr)
        return 2
    finally:
        if not finished:   # stopped on an error: a run that saved and logged nothing leaves no folders behind
            run.discard_if_unsaved()
        run.release()
        shutdown(ddp)


if __name__ == "__main__":
    sys.exit(main())
