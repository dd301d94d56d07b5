"""The one place that knows the checkpoint format.

A checkpoint is a dict of tensors, numbers, strings and containers of them, written atomically
with `torch.save` and read with `weights_only=True` (so loading never runs code):

    format       CHECKPOINT_FORMAT (2); format-1 files (written before the `training/` package) are
                 migrated on reading, see `migrate`
    kind         the model class ("LanguageModel", "TaskModel", "SequenceModel": `models.MODEL_CLASSES`)
    config       the model's config dataclass as a dict; `model` its state_dict
    script       the script that wrote it (format 2 on)
    resumable    False for best.pt (written part-way through an epoch's end), True otherwise
    args         every flag (see `resume_args` for which may change on --resume)
    train_state  the loop's state dataclass (`training.loop.LoopState` and its subclasses)
    optimizer, scheduler, scaler   their state_dicts (scheduler/scaler None when there is none)
    rng          rank 0's Python / NumPy / torch / CUDA random states; rank_rngs every rank's under torchrun
    + the loop's own: hidden and bptt_rng (language models), generator(s) (tasks), curriculum (sequence tasks)

Beside each file a JSON summary (`checkpoint.json`, `best.json`) says what it holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pickle
import random
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import models
from errors import UserInputError
from training.flags import Flags

CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
REPO_ROOT = Path(__file__).resolve().parent.parent

# On --resume, these flags take this invocation's values, typed or default ...
PER_INVOCATION = {"resume", "max_steps", "dry_run", "device", "cuda", "threads", "dist_timeout", "compile"}
# ... these keep the checkpoint's values unless typed again; any other typed flag must match the checkpoint.
RESUME_OVERRIDABLE = {"epochs", "iterations", "log_interval", "save_interval", "check_freq", "data", "max_nonfinite",
                      "visdom", "visdom_server", "visdom_port", "visdom_env", "tensorboard"}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- random states


def numpy_state(generator: Any = np.random) -> list:
    """A NumPy `RandomState`'s (or the global generator's) state as a list of plain values and tensors."""
    kind, keys, *rest = generator.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), *rest]


def set_numpy_state(state: list, generator: Any = np.random) -> None:
    kind, keys, *rest = state
    generator.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


# --------------------------------------------------------------------------- writing and reading


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, **contents: Any) -> None:
    """Write `{format, kind, config, model, **contents}` atomically, plus a JSON summary beside it."""
    path = Path(path)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "kind": type(model).__name__,
        "config": dataclasses.asdict(model.config),
        "model": model.state_dict(),
        **contents,
    }
    atomic_save(checkpoint, path)
    summary = {
        "kind": checkpoint["kind"], "script": contents.get("script"), "config": checkpoint["config"],
        "train_state": contents.get("train_state"), "git_commit": git_commit(),
        "saved": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    tmp = path.with_name(f".{path.stem}.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, path.with_suffix(".json"))


def migrate(checkpoint: dict) -> dict:
    """A format-1 checkpoint in format 2's terms (in place; returns it).

    Format 1 had no `script` or `scaler`, its flags had no `precision` or `plateau_threshold`
    (format-1 runs trained in fp32 with ReduceLROnPlateau's default threshold), and the task
    loops counted the interval's batches in `interval_count`.
    """
    if checkpoint.get("format") == 1:
        checkpoint.setdefault("script", None)
        checkpoint.setdefault("scaler", None)
        args = checkpoint.get("args")
        if isinstance(args, dict):
            args.setdefault("precision", "fp32")
            args.setdefault("plateau_threshold", 1e-4)
        state = checkpoint.get("train_state")
        if isinstance(state, dict) and "interval_count" in state:
            state["interval_batches"] = state.pop("interval_count")
        checkpoint["format"] = 2
    return checkpoint


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint dict on CPU without executing code; a run folder means its checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise UserInputError(f"checkpoint {path} does not exist; pass a checkpoint file or a run folder")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserInputError(
            f"{path} is not a checkpoint this repository can read (not a file of plain tensors; pickled objects are "
            f"never loaded, since unpickling can run code); pass a checkpoint.pt or best.pt written by one of its scripts"
        ) from None
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserInputError(
            f"{path} is not a checkpoint this repository can read ({first_line}); "
            f"pass a checkpoint.pt or best.pt written by one of its scripts"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in READABLE_FORMATS:
        raise UserInputError(f"{path} is not a checkpoint of this repository (format {CHECKPOINT_FORMAT} expected)")
    checkpoint = migrate(checkpoint)
    checkpoint["path"] = str(path)
    return checkpoint


def load_checkpoint(
    path: str | os.PathLike, device: torch.device | str = "cpu", kind: str | None = None
) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model a checkpoint holds from its stored config and load its weights.

    Args:
        path: a checkpoint file, or a run folder (its checkpoint.pt).
        device: where to put the model.
        kind: the model class expected (e.g. "LanguageModel"); another kind is an error.

    Returns:
        (model in eval mode on `device`, the checkpoint dict).

    Raises:
        UserInputError: missing or unreadable file, another kind of model, or weights that
            do not fit the stored config.
    """
    checkpoint = read_checkpoint(path)
    name = checkpoint.get("kind")
    if kind is not None and name != kind:
        raise UserInputError(f"{checkpoint['path']} holds a {name}, not a {kind}; pass a {kind} checkpoint")
    if name not in models.MODEL_CLASSES:
        raise UserInputError(f"{checkpoint['path']} holds an unknown model kind {name!r}")
    model_class, config_class = models.MODEL_CLASSES[name]
    try:
        model = model_class(config_class(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise UserInputError(
            f"{checkpoint['path']} does not fit this version's {name} ({first_line}); "
            f"it was written by another version of the code or edited"
        ) from None
    return model.to(device).eval(), checkpoint


def best_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder means its best.pt (its checkpoint.pt while no evaluation has finished); a file is itself."""
    path = Path(path)
    if path.is_dir() and (path / "best.pt").is_file():
        return path / "best.pt"
    return path


def resume_args(flags: Flags, checkpoint: dict) -> argparse.Namespace:
    """The checkpoint's flags, with the run-control flags the user typed now; a clash is an error."""
    saved = dict(checkpoint["args"])
    args = flags.args
    for name in sorted(flags.typed):
        if name in RESUME_OVERRIDABLE or name in PER_INVOCATION or name not in saved:
            continue
        if getattr(args, name) != saved[name]:
            raise UserInputError(
                f"--{name} {getattr(args, name)} differs from the checkpoint's {saved[name]!r}; drop it to resume "
                f"{checkpoint['path']}, or start a new run without --resume"
            )
    merged = argparse.Namespace(**{**vars(args), **saved})
    for name in PER_INVOCATION | (RESUME_OVERRIDABLE & flags.typed):
        if hasattr(args, name):
            setattr(merged, name, getattr(args, name))
    return merged


def open_resume(flags: Flags, kind: str) -> tuple[argparse.Namespace, dict | None]:
    """(args, checkpoint): with --resume, the checkpoint (which must hold a resumable `kind`) and its flags
    merged with the typed ones; without, (the flags, None)."""
    if not flags.args.resume:
        return flags.args, None
    checkpoint = read_checkpoint(flags.args.resume)
    if checkpoint.get("kind") != kind:
        raise UserInputError(f"{checkpoint['path']} holds a {checkpoint.get('kind')}, not a {kind} "
                             f"(the model of this script)")
    if checkpoint.get("resumable") is False:
        raise UserInputError(
            f"{checkpoint['path']} holds the best weights, not a resumable state; resume from the run "
            f"folder or its checkpoint.pt"
        )
    return resume_args(flags, checkpoint), checkpoint
