"""Schedules, seeding, device picking, file names and temporary output folders (checkpoints: checkpoints.py),
and the share of tracked objects below which train.py and track.py say that tracking has not formed.

The step convention follows the reference: training step s (1-based, the number of optimizer
steps taken including this one) uses temperature `tau_at(cfg, s - 1)` and the z_pres prior,
detach rule and alpha curriculum of step s.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager

import numpy as np
import torch

from common import Config, ConfigError

LOW_TRACKED_SHARE = 0.2   # objects carried over from the previous frame below this share: found anew each frame
UMASK = os.umask(0)              # the process's umask, read once at import (os.umask can only set it)
os.umask(UMASK)


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------

def linear_annealing(step: int, start_step: int, end_step: int, start_value: float, end_value: float) -> float:
    """start_value until start_step, linear to end_value at end_step, end_value after."""
    if start_step < step < end_step:
        return start_value + (end_value - start_value) * (step - start_step) / (end_step - start_step)
    if step >= end_step:
        return end_value
    return start_value


def tau_at(cfg: Config, step: int) -> float:
    """Relaxed-Bernoulli temperature: exp(step * ln(tau_end) / tau_ep), floored at tau_end."""
    return max(math.exp(step * math.log(cfg.tau_end) / cfg.tau_ep), cfg.tau_end)


def z_pres_prior_at(cfg: Config, step: int) -> float:
    """Discovery z_pres prior probability: 0.1 -> z_pres_anneal_end_value over steps 0-500."""
    return linear_annealing(step, cfg.z_pres_anneal_start_step, cfg.z_pres_anneal_end_step,
                            cfg.z_pres_anneal_start_value, cfg.z_pres_anneal_end_value)


def lr_at(cfg: Config, progress: float) -> float:
    """Learning rate at `progress` (0 at the start, 1 at the end of the run): cfg.lr, falling
    linearly to 0 over the last cfg.lr_decay_share of the run (0: constant, as the reference)."""
    if cfg.lr_decay_share <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, max(0.0, (1.0 - progress) / cfg.lr_decay_share))


def step_switches(cfg: Config, step: int) -> tuple[bool, bool]:
    """(detach object state across frames, alpha curriculum active) at training step `step`."""
    return (not cfg.phase_do_remove_detach or step < cfg.remove_detach_step,
            cfg.phase_bg_alpha_curriculum and step < cfg.bg_alpha_curriculum_steps)


def pick_device(name: str, cpu_notice: str | None = None) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> a device; ConfigError for cuda without a GPU. `cpu_notice` is
    printed when 'auto' finds no GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available: pass --device cpu or --device auto")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if cpu_notice:
            print(cpu_notice)
        return torch.device("cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------------------
# File names of sequences
# ------------------------------------------------------------------------------------------------

def safe_name(name: str) -> str:
    """A file-name-safe version of a name: runs of characters other than ASCII letters, digits and
    ._- become one '_' ('seq' for an empty result). Different names may give the same safe name:
    use unique_names for a set of names that must stay apart."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "seq"


def unique_names(names: list[str]) -> list[str]:
    """File-name-safe names, one per name, all different (also ignoring case, for case-insensitive
    file systems) and stable: a name that is safe already and meets no other stays as it is; one that
    had to change ('a b', 'café') or collides gets '-' and 8 hex digits of the SHA-1 of the original
    name appended ('a_b-1a2b3c4d'); equal originals are numbered ('-2', '-3', ...) in order."""
    safe = [safe_name(n) for n in names]
    seen = {}
    for s in safe:
        seen[s.lower()] = seen.get(s.lower(), 0) + 1
    result, taken = [], set()
    for name, s in zip(names, safe):
        if s != name or seen[s.lower()] > 1:
            s = f"{s}-{hashlib.sha1(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
        candidate, k = s, 1
        while candidate.lower() in taken:
            k += 1
            candidate = f"{s}-{k}"
        taken.add(candidate.lower())
        result.append(candidate)
    return result


# ------------------------------------------------------------------------------------------------
# Command lines and seeding
# ------------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: the error and where to read the flags, not the usage of
    every flag (train.py has about a hundred)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def seed_arg(text: str) -> int:
    """argparse type of a --seed: an integer in NumPy's seed range [0, 2**32 - 1], as Config.seed."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"{seed} must lie in [0, 2**32 - 1]")
    return seed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Output folders: checked first, written whole, nothing left behind on failure
# ------------------------------------------------------------------------------------------------

def input_inside(out: str, inputs: list) -> str | None:
    """The first of the `inputs` paths that is `out` or lies inside it (an output folder that would
    replace or mix with what is read), else None."""
    out = os.path.realpath(out)
    for path in inputs:
        if path is not None:
            real = os.path.realpath(path)
            if real == out or real.startswith(out.rstrip(os.sep) + os.sep):
                return str(path)
    return None


def out_folder_problem(out: str, overwrite: bool, inputs: list = (), name: str = "--out") -> str | None:
    """What forbids writing the output folder `out` whole (a tool's work folder moved into place at the
    end), on one line naming the fix; None if nothing: `out` must not be a file nor hold an input, and
    a non-empty folder is replaced only with --overwrite. `name`: how the command line calls it."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"{name} '{out}' is a file, not a folder: pass another {name}"
    if input_inside(out, [os.getcwd()]) is not None:
        return f"{name} '{out}' holds the current folder, which writing the outputs would replace: pass another {name}"
    inside = input_inside(out, list(inputs))
    if inside is not None:
        return (f"{name} '{out}' holds the input '{inside}', which writing the outputs would replace: "
                f"pass an {name} outside the inputs")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        return f"{name} '{out}' exists and is not empty: pass --overwrite to replace it, or another {name}"
    return None


def unwritable_out(out: str, err: OSError, name: str = "--out") -> str:
    """The one-line error of an output folder `out` that could not be made (`work_folder` raised `err`)."""
    return f"cannot write {name} '{out}' ({err.strerror or type(err).__name__}): pass an {name} in a writable folder"


@contextmanager
def sigterm_as_interrupt():
    """Within: SIGTERM raises KeyboardInterrupt as Ctrl-C does, so a tool's clean-up runs before it stops
    (the default would end the process at once and leave its work folder behind). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def work_folder(out: str, tag: str = "tmp") -> tuple[str, list[str]]:
    """A new temporary folder `.<name>.<tag>-XXXX` beside `out` (the same file system, so the finished
    folder or its files can be renamed into place), and the folders made above it because they were
    missing, for discard_work. If it cannot be made, nothing is left behind."""
    out = os.path.realpath(out)         # a link to a folder: the work goes beside that folder
    parent = os.path.dirname(out)
    made = missing_parents(out)
    try:
        os.makedirs(parent, exist_ok=True)
        path = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.{tag}-", dir=parent)
    except OSError:
        discard_work(None, made)
        raise
    set_umask_mode(path, 0o777)         # mkdtemp's 0700 would follow the folder into place
    return path, made


def move_into_place(work: str, out: str) -> None:
    """Replace `out` by the finished folder `work` (an existing `out` is renamed away first, then removed)."""
    out = os.path.realpath(out)     # a link to a folder: that folder is replaced, as work_folder places `work`
    old = None
    if os.path.isdir(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(work, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def interrupted_message(prog: str, err: KeyboardInterrupt, out: str, name: str = "--out") -> str:
    """The line a tool prints when Ctrl-C (or SIGTERM, sigterm_as_interrupt) stopped it before `out` (its
    output named `name`) was written."""
    return f"{prog}: interrupted ({err.args[0] if err.args else 'SIGINT'}): nothing written to {name} '{out}'"


def missing_parents(out: str) -> list[str]:
    """The folders above `out` that do not exist yet, outermost first."""
    missing, parent = [], os.path.dirname(os.path.abspath(out))
    while parent and not os.path.exists(parent):
        missing.insert(0, parent)
        parent, above = os.path.dirname(parent), parent
        if parent == above:
            break
    return missing


def discard_work(work: str | None, made: list[str]) -> None:
    """Remove a work folder (if still there) and the folders `made` for it that are left empty, so a
    failed run leaves nothing behind; after a success `out` sits in them and they stay."""
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    for folder in reversed(made):
        try:
            os.rmdir(folder)
        except OSError:
            break


def set_umask_mode(path: str, mode: int) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (owner-only) the modes open()/mkdir would give it:
    `mode` (0o666 files, 0o777 folders) less the umask. A file system without modes is left as it is."""
    try:
        os.chmod(path, mode & ~UMASK)
    except OSError:
        pass
