"""Schedules, seeding and checkpoints.

The step convention follows the reference: training step s (1-based, the number of optimizer
steps taken including this one) uses temperature `tau_at(cfg, s - 1)` and the z_pres prior,
detach rule and alpha curriculum of step s.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import re
import tempfile

import numpy as np
import torch

from common import Config, ConfigError


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
# Seeding and RNG state
# ------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------
# Checkpoints
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
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # torch's zip writer reports a failed write as a RuntimeError
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        detail = " ".join(str(e).split())[:200]
        raise SaveError(f"cannot write checkpoint '{os.path.basename(path)}' in '{folder}': disk full / not "
                        f"writable ({type(e).__name__}: {detail}); the previous checkpoint is intact: free space "
                        f"or fix the folder, then resume") from e


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint file and check that it is one; returns its dict (config as a Config).

    Always torch.load(weights_only=True): a file holding anything but tensors and plain values
    (which unpickling could turn into code that runs) is refused, not loaded."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint '{path}' is a folder: pass one of its ckpt_*.pt files")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
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
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"'{path}' is not a SCALOR checkpoint (no 'format' tag); pass a .pt file written by train.py")
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
    if problems:
        raise CheckpointError(f"'{path}' is a damaged SCALOR checkpoint: {', '.join(repr(k) for k in problems)} "
                              f"missing or of the wrong type; pass another checkpoint of the run")
    try:
        payload["config"] = Config.from_dict(payload["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint '{path}' holds an unusable config: {e}") from None
    return payload


def load_model_state(model, payload: dict, path: str = "checkpoint", allow_partial: bool = False) -> None:
    """Load weights strictly: a config or key mismatch names what differs; never a silent partial load."""
    diff = model.cfg.diff(payload["config"])
    arch = {k: v for k, v in diff.items() if k in ARCHITECTURE_FIELDS}
    if arch and not allow_partial:
        listed = ", ".join(f"{k}: model {a!r} vs checkpoint {b!r}" for k, (a, b) in sorted(arch.items()))
        raise CheckpointError(f"{path} was trained with another config ({listed}); "
                              f"use its config or pass --allow-partial-load")
    state = payload["model"]
    mismatched = []
    if allow_partial:   # load what fits: tensors of another shape stay as initialised
        own = model.state_dict()
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        state = {k: v for k, v in state.items() if k not in mismatched}
    result = model.load_state_dict(state, strict=not allow_partial)
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
    "bg_prior_rnn_hid_dim", "phase_conv_lstm", "phase_no_background", "using_bg_sbd",
}
