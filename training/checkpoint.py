"""The one place that knows the checkpoint format.

A checkpoint is a dict of tensors, numbers, strings and containers of them, written atomically
with `torch.save` and read with `weights_only=True` (so loading never runs code):

    format       CHECKPOINT_FORMAT (2); format-1 files (written before the `training/` package) are
                 migrated on reading, see `migrate`
    kind         the model class ("LanguageModel", "TaskModel", "SequenceModel": `models.MODEL_CLASSES`)
    config       the model's config dataclass as a dict; `model` its state_dict
    script       the script that wrote it (format 2 on; for format 1 the run's args.json says, see `written_by`)
    task         what it was trained on: "language model", or the task's class (e.g. "CopyTask"); added within
                 format 2 (absent from older files, which are then checked by `script` alone)
    resumable    False for best.pt (written part-way through an epoch's end), True otherwise
    args         every flag (see `resume_args` for which may change on --resume)
    train_state  the loop's state dataclass (`training.loop.LoopState` and its subclasses)
    optimizer, scheduler, scaler   their state_dicts (scheduler/scaler None when there is none)
    rng          rank 0's Python / NumPy / torch / CUDA random states; rank_rngs every rank's under torchrun
    + the loop's own: hidden and bptt_rng (language models), generator(s) (tasks), curriculum (sequence tasks)

Beside each file a JSON summary (`checkpoint.json`, `best.json`) says what it holds. Writing a new
checkpoint.pt moves the one before it to `checkpoint.previous.pt` (and its summary), so a checkpoint.pt
that turns out unreadable or diverged still leaves a state to resume (`--resume` falls back to it on its
own when checkpoint.pt cannot be read). A write that fails (a full disk, a read-only folder) leaves the
files as they were and raises `SaveFailed`; temporary files a killed process left behind
(`.checkpoint.pt.XXXX.tmp`) are removed by the next start or save.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import json
import os
import pickle
import random
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import distributed
import models
from errors import TrainingError, UserInputError
from training.flags import Flags

CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
REPO_ROOT = Path(__file__).resolve().parent.parent
RESUMABLE, PREVIOUS = "checkpoint.pt", "checkpoint.previous.pt"  # the newest resumable state, and the one before
# Temporary files of `atomic_save` and `save_checkpoint` in a run folder (a process killed mid-save leaves one).
STALE_TEMPORARY = re.compile(r"^\.(checkpoint|best)\.(pt\.[A-Za-z0-9_]+|json)\.tmp$")

# On --resume, these flags take this invocation's values, typed or default ...
PER_INVOCATION = {"resume", "max_steps", "dry_run", "device", "cuda", "threads", "dist_timeout", "compile",
                  "onnx_export"}
# ... these keep the checkpoint's values unless typed again; any other typed flag must match the checkpoint.
RESUME_OVERRIDABLE = {"epochs", "iterations", "log_interval", "save_interval", "check_freq", "data", "max_nonfinite",
                      "visdom", "visdom_server", "visdom_port", "visdom_env", "tensorboard"}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class SaveFailed(TrainingError):
    """A checkpoint could not be written (full disk, read-only folder); the files on disk are as they were."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"could not write {path}: {reason}")
        self.path, self.reason = path, reason


def write_error_reason(error: BaseException) -> str:
    """What went wrong in a write, in words: torch reports a full disk as a RuntimeError of its zip writer."""
    if isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no space left on the device"
        if error.errno == errno.EROFS:
            return "the file system is read-only"
        if error.errno in (errno.EACCES, errno.EPERM):
            return "permission denied (the folder is not writable)"
        return error.strerror or str(error)
    return "the write failed (is the disk full?)"


def remove_stale_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Delete the temporary files a process killed mid-save left in `folder` (of `name` only, if given)."""
    removed = []
    try:
        candidates = list(Path(folder).glob(f".{name}.*.tmp" if name else ".*.tmp"))
    except OSError:
        return removed
    for candidate in candidates:
        if name is None and not STALE_TEMPORARY.match(candidate.name):
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except OSError:
            pass
    return removed


def atomic_save(obj: object, path: str | os.PathLike, previous: str | os.PathLike | None = None) -> None:
    """`torch.save` to a temporary file in the same folder, then rename: never a half-written file.

    With `previous`, an existing file at `path` is first moved there (the last good state is kept).
    On any error the temporary file is removed and the files at `path` and `previous` are as before.
    """
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
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


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, keep_previous: bool = False,
                    **contents: Any) -> None:
    """Write `{format, kind, config, model, **contents}` atomically, plus a JSON summary beside it.

    With `keep_previous` the file it replaces becomes checkpoint.previous.pt (its summary too).

    Raises:
        SaveFailed: the file could not be written (the files on disk are unchanged).
    """
    path = Path(path)
    previous = path.with_name(PREVIOUS) if keep_previous else None
    try:
        _write_checkpoint(path, model, previous, contents)
    except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError
        raise SaveFailed(path, write_error_reason(error)) from None


def _write_checkpoint(path: Path, model: torch.nn.Module, previous: Path | None, contents: dict) -> None:
    remove_stale_temporaries(path.parent, path.name)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "kind": type(model).__name__,
        "config": dataclasses.asdict(model.config),
        "model": model.state_dict(),
        **contents,
    }
    moves_previous = previous is not None and path.exists()
    atomic_save(checkpoint, path, previous)
    summary = {
        "kind": checkpoint["kind"], "script": contents.get("script"), "task": contents.get("task"),
        "config": checkpoint["config"], "train_state": contents.get("train_state"), "git_commit": git_commit(),
        "saved": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    write_summary(path, summary, previous if moves_previous else None)


def write_summary(path: Path, summary: dict, previous: Path | None) -> None:
    """The JSON summary beside checkpoint `path` (the replaced one's moved beside `previous`).

    Best effort: the summary only describes the checkpoint, so a failure to write it is not one to stop
    a run for (the checkpoint itself is written by then).
    """
    summary_path, tmp = path.with_suffix(".json"), path.with_name(f".{path.stem}.json.tmp")
    try:
        if previous is not None and summary_path.exists():
            os.replace(summary_path, previous.with_suffix(".json"))
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        os.replace(tmp, summary_path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


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


class UnreadableCheckpoint(UserInputError):
    """A file `torch.load` cannot read (truncated, damaged, not a checkpoint); `reason` says which."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is not a checkpoint this repository can read ({reason}); pass a checkpoint.pt "
                         f"or best.pt written by one of its scripts")
        self.path, self.reason = path, reason


def unreadable_reason(path: Path) -> str:
    """Why `torch.load` could not read `path`, in words (torch's own texts run to several sentences)."""
    try:
        with open(path, "rb") as file:
            head = file.read(512)
    except OSError as error:
        return f"it cannot be read: {error.strerror or error}"
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):  # torch.save writes a zip archive
        return "the file is truncated or damaged: its archive is incomplete, as when cut short while written or copied"
    try:
        head.decode("utf-8")
        return "it is a text file"
    except UnicodeDecodeError:
        return "it is not a file written by torch.save"


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint dict on CPU without executing code; a run folder means its checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / RESUMABLE
    if not path.is_file():
        raise UserInputError(f"checkpoint {path} does not exist; pass a checkpoint file or a run folder")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not str(error).startswith("Weights only load failed"):  # the file is not a pickle at all
            raise UnreadableCheckpoint(path, unreadable_reason(path)) from None
        raise UserInputError(
            f"{path} is not a checkpoint this repository can read (not a file of plain tensors; pickled objects are "
            f"never loaded, since unpickling can run code); pass a checkpoint.pt or best.pt written by one of its scripts"
        ) from None
    except Exception:
        raise UnreadableCheckpoint(path, unreadable_reason(path)) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in READABLE_FORMATS:
        raise UserInputError(f"{path} is not a checkpoint of this repository (format {CHECKPOINT_FORMAT} expected)")
    checkpoint = migrate(checkpoint)
    checkpoint["path"] = str(path)
    return checkpoint


def read_resumable(path: str | os.PathLike, announce: Callable[[str], None] = print) -> dict:
    """`read_checkpoint` for --resume: when a run's checkpoint.pt cannot be read (cut short by a crash,
    damaged), its checkpoint.previous.pt is read instead, saying so through `announce`."""
    path = Path(path)
    newest = path / RESUMABLE if path.is_dir() else path
    previous = newest.with_name(PREVIOUS)
    if newest.name != RESUMABLE or not previous.is_file():
        return read_checkpoint(newest)
    try:
        return read_checkpoint(newest)
    except UnreadableCheckpoint as error:
        reason = error.reason
        try:
            checkpoint = read_checkpoint(previous)
        except UserInputError:
            raise error from None
    step = (checkpoint.get("train_state") or {}).get("step")
    announce(f"| {newest} cannot be read ({reason}); resuming from the checkpoint before it, {previous} (step {step})")
    return checkpoint


def written_by(checkpoint: dict) -> str | None:
    """The script that wrote a checkpoint: stored since format 2; for older ones, the run's args.json says."""
    if checkpoint.get("script"):
        return checkpoint["script"]
    try:
        return json.loads((Path(checkpoint["path"]).parent / "args.json").read_text()).get("script")
    except (OSError, ValueError, AttributeError):
        return None


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


def check_model_flag(checkpoint: dict, model: str | None) -> str | None:
    """The original scripts' `--model` beside a checkpoint (generate.py, pointer.py): there the loaded model
    decides and the flag was unused; a note when it names another core than the checkpoint's run, else None."""
    trained = checkpoint.get("args", {}).get("model")
    if model is None or trained is None or str(model).upper() == str(trained).upper():
        return None
    return f"note: --model {model} ignored: {checkpoint.get('path', 'the checkpoint')} holds a {trained} model"


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


def open_resume(flags: Flags, kind: str, script: str | None = None) -> tuple[argparse.Namespace, dict | None]:
    """(args, checkpoint): with --resume, the checkpoint (which must hold a resumable `kind` written by
    `script`) and its flags merged with the typed ones; without, (the flags, None)."""
    if not flags.args.resume:
        return flags.args, None
    checkpoint = read_resumable(flags.args.resume, print if distributed.is_main() else lambda line: None)
    if checkpoint.get("kind") != kind:
        raise UserInputError(f"{checkpoint['path']} holds a {checkpoint.get('kind')}, not a {kind} "
                             f"(the model of this script)")
    writer = written_by(checkpoint)
    if script is not None and writer is not None and writer != script:
        raise UserInputError(f"{checkpoint['path']} is a run of {writer}.py, not of {script}.py; continue it with "
                             f"`python {writer}.py --resume {flags.args.resume}`, or start a new run without --resume")
    if checkpoint.get("resumable") is False:
        raise UserInputError(
            f"{checkpoint['path']} holds the best weights, not a resumable state; resume from the run "
            f"folder or its checkpoint.pt"
        )
    return resume_args(flags, checkpoint), checkpoint


def check_task(checkpoint: dict | None, task: str) -> None:
    """On --resume, the task built from the flags must be the one the checkpoint was trained on."""
    stored = checkpoint.get("task") if checkpoint is not None else None
    if stored is not None and stored != task:
        raise UserInputError(f"{checkpoint['path']} was trained on the task {stored}, not {task}; resume it with "
                             f"the flags it was trained with, or start a new run without --resume")
