"""Checkpoints and the files of a run: writing and reading checkpoints, resuming, pruning, the
run folders' lock, and the loss log.

A checkpoint (`ckpt_<step>.pt`) is a dict of tensors and plain values only -- format tag, config,
step, model and optimizer states, RNG states (`rng_state`), data position -- so it loads with
torch.load(weights_only=True), which is the only way it is read: a file that would run code when
unpickled is refused. Writes are atomic (a temporary `.tmp-*.pt` beside it, fsynced, renamed).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import Config, ConfigError
from data import one_line
from distributed import Dist, gather_objects
from utils import seed_everything, set_umask_mode


# ------------------------------------------------------------------------------------------------
# RNG states
# ------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """The RNG states of Python, NumPy, torch (and CUDA) as tensors and plain values, so that a
    checkpoint holding them loads with torch.load(weights_only=True)."""
    version, words, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state returned, or the plain tuples of random.getstate / np.random.get_state
    that some checkpoints hold."""
    py, nps = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(py["state"].tolist()), py["gauss_next"])
    if isinstance(nps, dict):
        nps = (nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
    random.setstate(py)
    np.random.set_state(nps)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------
# Checkpoint files
# ------------------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A file that is not a SCALOR checkpoint, or one that does not fit the model."""


class SaveError(OSError):
    """A checkpoint could not be written (disk full, folder not writable); the message is one line."""


CHECKPOINT_FORMAT = "scalor-checkpoint-v1"


def save_checkpoint(path: str, model=None, optimizer=None, step: int = 0, cfg: Config | None = None,
                    model_state: dict | None = None, optimizer_state: dict | None = None, **extra) -> None:
    """Write atomically: a temporary file in the same folder, flushed, fsynced, then renamed.

    The weights come from `model` or, if given, `model_state` (a state_dict, e.g. a kept snapshot);
    the optimizer's likewise. Everything saved is tensors and plain values, so the file loads with
    torch.load(weights_only=True). A crash or a failed write (a full disk: OSError, or torch's
    RuntimeError from its stream writer) leaves any previous file at `path` intact and no temporary
    file; a failed write raises SaveError naming the folder."""
    cfg = cfg if cfg is not None else model.cfg
    payload = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "step": step,
               "model": model_state if model_state is not None else model.state_dict(), **extra}
    if optimizer_state is not None or optimizer is not None:
        payload["optimizer"] = optimizer_state if optimizer_state is not None else optimizer.state_dict()
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
        set_umask_mode(tmp, 0o666)          # as open() would make it, not mkstemp's owner-only 0600
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:             # a failed write, or Ctrl-C in a script: no temporary file stays
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):   # torch's zip writer reports a failed write as RuntimeError
            raise
        detail = one_line(e, 200)
        raise SaveError(f"cannot write checkpoint '{os.path.basename(path)}' in '{folder}': disk full / not "
                        f"writable ({type(e).__name__}: {detail}); any previous checkpoint is intact: free space "
                        f"or fix the folder, then resume (or, if none was written, start again)") from e


_np_core = getattr(np, "_core", None) or np.core
# What unpickling a plain NumPy array needs (a checkpoint holding NumPy's RNG state as its plain
# tuple holds an array): these build arrays and dtypes only, never run other code.
NUMPY_ARRAY_GLOBALS = [_np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint file and check that it is one; returns its dict (config as a Config).

    Always torch.load(weights_only=True): a file holding anything but tensors and plain values
    (which unpickling could turn into code that runs) is refused, not loaded."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint '{path}' is a folder: pass one of its ckpt_*.pt files")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist: pass a ckpt_*.pt file of a run "
                              f"(runs/<name>/checkpoints/) or checkpoints/sprites_small.pt")
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        text = str(e)
        found = re.search(r"(unsupported GLOBAL [^\s]+|Unsupported global: GLOBAL [^\s]+)", text)
        if found:
            raise CheckpointError(f"'{path}' is not a SCALOR checkpoint or holds objects other than tensors and "
                                  f"plain values ({found.group(1)}); refused, nothing of it was run: pass a .pt "
                                  f"file written by train.py") from None
        raise CheckpointError(f"'{path}' is not a readable SCALOR checkpoint ({type(e).__name__}); "
                              f"pass a .pt file written by train.py") from None
    check_format(payload, path)
    problems = [key for key, ok in (("config", isinstance(payload.get("config"), dict)),
                                    ("model", isinstance(payload.get("model"), dict) and all(
                                        isinstance(k, str) and torch.is_tensor(v)
                                        for k, v in payload.get("model").items())),
                                    ("step", type(payload.get("step")) is int and payload.get("step") >= 0))
                if not ok]
    for key in ("epoch", "batch_index", "bad_steps", "world_size"):
        if key in payload and not (type(payload[key]) is int and payload[key] >= 0):
            problems.append(key)
    for key in ("optimizer", "rng"):
        if key in payload and not isinstance(payload[key], dict):
            problems.append(key)
    if "rng_ranks" in payload and not (isinstance(payload["rng_ranks"], list)
                                       and all(isinstance(r, dict) for r in payload["rng_ranks"])):
        problems.append("rng_ranks")
    if problems:
        raise CheckpointError(f"'{path}' is a damaged SCALOR checkpoint: {', '.join(repr(k) for k in problems)} "
                              f"missing or of the wrong type; pass another checkpoint of the run")
    try:
        payload["config"] = Config.from_dict(payload["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint '{path}' holds an unusable config: {e}") from None
    return payload


def check_format(payload, path: str) -> None:
    """CheckpointError unless `payload` is a dict with this code's format tag: a file of another
    program has no tag, one of another version of this code another tag."""
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"'{path}' is not a SCALOR checkpoint (no 'format' tag); pass a .pt file written by train.py")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"'{path}' was written by another version of this code (checkpoint format "
                              f"{one_line(repr(payload['format']), 60)}; this code reads format {CHECKPOINT_FORMAT!r}): "
                              f"pass a checkpoint written by this version's train.py, or use the version that wrote it")


def state_mismatch(own: dict, state: dict) -> tuple[list, list, list]:
    """The keys of `state` (a checkpoint's weights) that do not fit `own` (the model's state_dict):
    (missing from the checkpoint, unexpected in it, of another shape)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in state if k in own and own[k].shape != state[k].shape]
    return missing, unexpected, reshaped


def mismatch_message(path: str, own: dict, state: dict) -> str:
    """One line naming the first two keys of each kind of mismatch (state_mismatch) and the fix."""
    missing, unexpected, reshaped = state_mismatch(own, state)

    def first(keys, shapes=False):
        named = [f"'{k}'" + (f" (checkpoint {list(state[k].shape)}, model {list(own[k].shape)})" if shapes else "")
                 for k in keys[:2]]
        return ", ".join(named) + (", ..." if len(keys) > 2 else "")

    parts = [f"{what} ({len(keys)}): {first(keys, what == 'keys of another shape')}"
             for keys, what in ((missing, "missing keys"), (unexpected, "unexpected keys"),
                                (reshaped, "keys of another shape"))
             if keys]
    return (f"'{path}' holds the weights of another architecture ({'; '.join(parts)}): it was written by another "
            f"model or version of this code; pass a checkpoint written by this code's train.py, or train anew")


def load_model_state(model, payload: dict, path: str = "checkpoint", allow_partial: bool = False) -> None:
    """Load weights strictly: a config or key mismatch names what differs; never a silent partial load.
    CheckpointError (one line) when the weights do not fit the model or are not finite."""
    diff = model.cfg.diff(payload["config"])
    arch = {k: v for k, v in diff.items() if k in ARCHITECTURE_FIELDS}
    if arch and not allow_partial:
        listed = ", ".join(f"{k}: model {a!r} vs checkpoint {b!r}" for k, (a, b) in sorted(arch.items()))
        raise CheckpointError(f"{path} was trained with another config ({listed}); "
                              f"use its config or pass --allow-partial-load")
    state, own = payload["model"], model.state_dict()
    missing, unexpected, mismatched = state_mismatch(own, state)
    if not allow_partial and (missing or unexpected or mismatched):
        raise CheckpointError(mismatch_message(path, own, state))
    if allow_partial:   # load what fits: tensors of another shape stay as initialised
        state = {k: v for k, v in state.items() if k not in mismatched}
    try:
        result = model.load_state_dict(state, strict=not allow_partial)
    except RuntimeError as err:   # keys and shapes fit: e.g. a tensor that cannot be copied
        raise CheckpointError(f"'{path}' does not load into this model ({type(err).__name__}): pass a checkpoint "
                              f"written by this code's train.py, or train anew") from None
    if not weights_sane(model):
        raise CheckpointError(f"'{path}' holds non-finite or diverged weights: pass an earlier checkpoint of the run")
    if allow_partial and (result.missing_keys or result.unexpected_keys or mismatched):
        print(f"partial load from {path}: {len(mismatched)} tensors of another shape and "
              f"{len(result.missing_keys) - len(mismatched)} missing keys left as initialised, "
              f"{len(result.unexpected_keys)} unexpected keys ignored")


# Fields that change the parameters' shapes or meaning.
ARCHITECTURE_FIELDS = {
    "img_h", "img_w", "num_cell_h", "num_cell_w", "glimpse_size", "z_what_dim", "bg_what_dim",
    "img_encode_dim", "conv_lstm_hid_dim", "z_what_enc_dim", "propagate_encode_dim",
    "temporal_rnn_hid_dim", "temporal_rnn_inp_dim", "temporal_img_enc_hid_dim", "temporal_img_enc_dim",
    "z_where_transit_bias_net_hid_dim", "z_depth_transit_net_hid_dim", "z_pres_hid_dim",
    "z_what_from_temporal_hid_dim", "z_what_gate_hid_dim", "prior_rnn_inp_dim", "prior_rnn_hid_dim",
    "bg_prior_rnn_hid_dim", "phase_conv_lstm", "phase_no_background", "using_bg_sbd", "bg_group_norm",
}


CHECKPOINT_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def list_checkpoints(folder: Path) -> list:
    """ckpt_<step>.pt files in `folder`, oldest step first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name)), key=checkpoint_step)


def drop_losses_after(path: Path, step: int) -> None:
    """Rewrite losses.jsonl (atomically) without the lines of steps after `step` and broken lines
    (a run killed mid-write)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.match(path.name).group(1))


def prune_checkpoints(folder: Path, keep: int) -> None:
    for path in list_checkpoints(folder)[:-keep]:
        path.unlink()


def resume_path(resume: str | None, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume: --resume's file, the newest of `ckpt_dir` for 'auto' (None, with a
    notice, if there is none), or None without --resume."""
    if resume is None:
        return None
    if resume != "auto":
        return Path(resume)
    found = list_checkpoints(ckpt_dir)
    if not found:
        print(f"notice: no checkpoint in '{ckpt_dir}', starting a fresh run")
        return None
    return found[-1]


# ------------------------------------------------------------------------------------------------
# Progress, snapshots and the checkpoints of a run
# ------------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """Where training stands after a step: what a checkpoint needs besides model and optimizer."""
    step: int           # iterations done
    epoch: int          # data position: epoch of the next batch
    batch_index: int    # ... and its index within that epoch
    bad_steps: int      # non-finite steps skipped so far
    rng: dict           # utils.rng_state() after the step


@dataclass
class Snapshot:
    """A CPU copy of the model and optimizer states after a step, and where training stood then."""
    progress: Progress
    model_state: dict | None       # None on processes other than rank 0 (only rank 0 writes)
    optimizer_state: dict | None


def to_cpu(value):
    """A copy of a (nested) state dict with every tensor copied to the CPU."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def take_snapshot(run, progress: Progress) -> Snapshot:
    if not run.ddp.main:
        return Snapshot(progress, None, None)
    return Snapshot(progress, to_cpu(run.model.state_dict()), to_cpu(run.optimizer.state_dict()))


def weights_sane(model) -> bool:
    """Whether every weight is finite and their sum of squares is finite in fp32: weights beyond
    ~1e19 (a run diverged by a huge learning rate) overflow every normalisation layer, so the next
    loss is not finite. One fused reduction and one host sync."""
    with torch.no_grad():
        total = torch.stack([p.detach().float().square().sum() for p in model.parameters()]).sum()
    return bool(torch.isfinite(total))


def write_checkpoint(run, progress: Progress, snapshot: Snapshot | None = None, prune: bool = True) -> Path:
    """Write a checkpoint (rank 0), with every process's RNG states; all processes must call it.
    The weights are the model's now, or those of `snapshot` (whose progress is then `progress`). Then
    only the newest --keep-checkpoints are kept, unless `prune` is off (an older state written last)."""
    path = run.ckpt_dir / f"ckpt_{progress.step:08d}.pt"
    rng_ranks = gather_objects(progress.rng, run.ddp)
    if run.ddp.main:
        states = {} if snapshot is None else dict(model_state=snapshot.model_state,
                                                   optimizer_state=snapshot.optimizer_state)
        save_checkpoint(str(path), run.model, run.optimizer, progress.step, run.cfg, **states, rng=progress.rng,
                        rng_ranks=rng_ranks, world_size=run.ddp.world, epoch=progress.epoch,
                        batch_index=progress.batch_index, bad_steps=progress.bad_steps, data=run.data_desc)
        if prune:
            prune_checkpoints(run.ckpt_dir, run.keep_checkpoints)
    return path


def load_training_state(model, optimizer, payload: dict, path: Path, allow_partial: bool, cfg: Config,
                        data_desc: dict, ddp: Dist = Dist()) -> Progress:
    """Weights, optimizer, RNG states and data position from a checkpoint; CheckpointError if unusable."""
    load_model_state(model, payload, str(path), allow_partial=allow_partial)
    architecture_same = not set(model.cfg.diff(payload["config"])) & ARCHITECTURE_FIELDS
    if "optimizer" in payload and architecture_same:
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
            raise CheckpointError(f"{path} holds an unusable optimizer state ({type(err).__name__}: "
                                  f"{one_line(err, 200)}); pass another checkpoint of the run") from None
        capturable = optimizer.defaults.get("capturable", False)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr    # a given --lr wins over the checkpoint's
            group["capturable"] = capturable   # this run's choice (CUDA graph or not)
        for state in optimizer.state.values():   # capturable RMSprop keeps its step count on the device
            if "step" in state:
                state["step"] = state["step"].to(next(model.parameters()).device if capturable else "cpu")
    else:
        print(f"notice: optimizer state of {path} not used; RMSprop starts afresh")
    saved_world = payload.get("world_size", 1)
    ranks = payload.get("rng_ranks") or ([payload["rng"]] if "rng" in payload else [])
    rng = {}
    if len(ranks) == ddp.world:       # the same number of processes: each continues its own streams
        try:
            set_rng_state(ranks[ddp.rank])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as err:
            raise CheckpointError(f"{path} holds unusable random-number states ({type(err).__name__}: "
                                  f"{one_line(err, 200)}); pass another checkpoint of the run") from None
        rng = rng_state()             # the same states, as this version writes them
    else:                              # another number of processes: fresh per-process streams
        seed_everything(cfg.seed + 1000 * ddp.rank + payload["step"])
        if ddp.main and not ranks:
            print(f"notice: {path} holds no random-number states (a shipped checkpoint): the random streams "
                  f"start afresh")
        elif ddp.main:
            print(f"notice: {path} was written by {saved_world} processes, this run has {ddp.world}: "
                  f"the data position carries over, the random streams start afresh")
    if payload.get("data", data_desc) != data_desc:
        print(f"notice: {path} was trained on {payload['data']}, now {data_desc}: the data position will not match")
    # the data position in sequences of the epoch (the epoch's order does not depend on the batch
    # size), in global batches of this run (rounded down): other process counts or batch sizes
    saved_batch = payload["config"].batch_size
    batch_index = payload.get("batch_index", 0) * saved_world * saved_batch // (ddp.world * cfg.batch_size)
    return Progress(step=payload["step"], epoch=payload.get("epoch", 0), batch_index=batch_index,
                    bad_steps=payload.get("bad_steps", 0), rng=rng)


# ------------------------------------------------------------------------------------------------
# Run folders: lock, writability, leftovers; the loss log
# ------------------------------------------------------------------------------------------------

class FolderLock:
    """An exclusive flock on a folder itself (no lock file to leave behind): held while the process
    lives, released by the kernel when it dies, whatever the way."""

    def __init__(self, folder: Path):
        self.fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.release()


def make_folders(folders) -> tuple[list, list]:
    """Create the (folder, flag) folders and check each before the first step: locked against a
    second train.py, writable (a probe file created, written, synced and removed), and without the
    temporary checkpoint files a killed run left behind (removed under the lock). Returns the locks
    and the folders created here (parents first); ConfigError with one line otherwise, after
    removing the folders created here."""
    created, locks = [], []
    try:
        for folder, flag in folders:
            where = f"pass another {flag} or --run-name, or fix the folder"
            missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"cannot create '{folder}' ({err.strerror or err}): {where}") from None
            finally:
                created += [p for p in missing if p.is_dir()]
            if any(lock_folder == folder.resolve() for lock_folder, _ in locks):
                continue
            try:
                locks.append((folder.resolve(), FolderLock(folder)))
            except BlockingIOError:
                raise ConfigError(f"'{folder}' is in use by another train.py (it holds the folder's lock): "
                                  f"let that run end, or pass another --run-name (or {flag})") from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                    raise ConfigError(f"cannot open '{folder}' ({err.strerror or err}): {where}") from None
                print(f"notice: the file system of '{folder}' cannot lock it ({err.strerror}): a second train.py "
                      f"on this run would not be stopped")
            try:
                fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(b"scalor write probe\n")
                        f.flush()
                        os.fsync(f.fileno())
                finally:
                    os.remove(probe)
            except OSError as err:
                raise ConfigError(f"cannot write to '{folder}' ({flag}): disk full / not writable "
                                  f"({err.strerror or err}): {where}") from None
        return [lock for _, lock in locks], created
    except ConfigError:
        for _, lock in locks:
            lock.release()
        for path in reversed(created):
            try:
                path.rmdir()
            except OSError:
                pass
        raise


def remove_stale_temporaries(ckpt_dir: Path) -> None:
    """Remove the .tmp-* files of checkpoint writes a killed run left (call with the folder locked)."""
    stale = [p for p in ckpt_dir.iterdir() if p.name.startswith(".tmp-") and p.is_file()]
    for path in stale:
        path.unlink()
    if stale:
        print(f"notice: removed {len(stale)} temporary files of unfinished checkpoint writes in '{ckpt_dir}'")


def check_branch(ckpt_dir: Path, resumed_step: int | None, resumed_path: Path | None = None) -> None:
    """ConfigError if the run would mix with another in `ckpt_dir`: a fresh run (resumed_step None)
    where checkpoints lie, a run resumed from a checkpoint outside `ckpt_dir` (`resumed_path`) where
    checkpoints of another run lie, or a resumed one where newer checkpoints lie (keeping the newest
    would delete this branch's, and --resume auto would later pick the other)."""
    found = list_checkpoints(ckpt_dir)
    if resumed_step is None and found:
        raise ConfigError(f"'{ckpt_dir}' already holds checkpoints: pass --resume auto to continue that run, "
                          f"or another --run-name (or both --ckpt-dir and --summary-dir: the loss log starts anew)")
    if found and resumed_path is not None and Path(resumed_path).resolve().parent != Path(ckpt_dir).resolve():
        raise ConfigError(f"'{ckpt_dir}' holds the checkpoints of another run than '{resumed_path}': pass another "
                          f"--run-name for this one (or --resume auto to continue the run there)")
    newer = [p for p in found if resumed_step is not None and checkpoint_step(p) > resumed_step]
    if newer:
        raise ConfigError(f"'{ckpt_dir}' holds checkpoints newer than step {resumed_step} ({newer[-1].name}): "
                          f"continue from the newest (--resume auto), or pass another --run-name for this branch (or both "
                          f"--ckpt-dir and --summary-dir: the loss log is cut back to the resumed step)")


def claim_folders(ckpt_dir: Path, summary_dir: Path, ddp: Dist = Dist()) -> tuple[list, list]:
    """Rank 0 makes, locks and checks the run's folders and removes stale temporary files
    (make_folders, remove_stale_temporaries); every process raises the same ConfigError if that
    fails, so none is left waiting. Returns rank 0's locks and the folders it created (none elsewhere)."""
    locks, created, error = [], [], None
    if ddp.main:   # only rank 0 writes
        try:
            locks, created = make_folders(((ckpt_dir, "--ckpt-dir"), (summary_dir, "--summary-dir")))
            remove_stale_temporaries(ckpt_dir)
        except ConfigError as err:
            error = str(err)
    error = next((e for e in gather_objects(error, ddp) if e), None)
    if error:
        for lock in locks:
            lock.release()
        raise ConfigError(error)
    return locks, created


def remove_unsaved_run(created: list, ckpt_dir: Path, summary_dir: Path) -> list:
    """After a run stopped on an error: if `ckpt_dir` holds no checkpoint and no step was logged
    (summary/losses.jsonl empty: the logs of steps done explain the failure and stay), remove the
    folders this run created (`created`, parents first): the checkpoint and summary folders with what
    the run wrote in them, the others if left empty. Folders that existed before are kept. Returns
    the outermost folders removed."""
    log = summary_dir / "losses.jsonl"
    if list_checkpoints(ckpt_dir) or (log.exists() and log.stat().st_size > 0):
        return []
    for path in reversed(created):
        if path in (ckpt_dir, summary_dir):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.rmdir()
            except OSError:   # not empty: something else lives there
                pass
    removed = [path for path in created if not path.exists()]
    return [path for path in removed if path.parent not in removed]


def open_loss_log(summary_dir: Path, start_step: int, resumed: bool):
    """losses.jsonl opened for appending one line a step: a resumed run keeps the lines up to its
    checkpoint's step (those after it, a killed run's, are dropped); a fresh start begins it afresh."""
    path = summary_dir / "losses.jsonl"
    if resumed:
        drop_losses_after(path, start_step)
    return open(path, "a" if resumed else "w")
