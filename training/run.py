"""A run's surroundings: its folder and logs, seeds, stop signals, and the process's allocator."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

import distributed
from errors import TrainingError, UserInputError
from training.checkpoint import git_commit, remove_stale_temporaries, write_error_reason
from training.flags import public_args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def seed_rank(seed: int) -> None:
    """Under torchrun, give ranks other than 0 random streams of their own (dropout masks) once the
    model is built; rank 0, like a single process, goes on with the stream of `seed`."""
    if distributed.rank():
        seed_everything(distributed.rank_seed(seed))


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the system at once.

    PyTorch's CPU tensors come from malloc: blocks over 128 KiB are mmap-ed and unmapped when
    freed, and a shrinking heap is trimmed, so a training step that frees and re-allocates its
    8-28 MB buffers page-faults them in again every batch (10-40 ms a batch, millions of faults an
    epoch, on the 2-core machine this was measured on). Raising both thresholds (mmap up to
    glibc's 32 MiB ceiling, trim at 1 GiB) lets the heap keep those pages. Like the
    MALLOC_*_THRESHOLD_ environment variables, which win when set; a no-op off glibc.
    Returns whether the settings took.
    """
    if any(name in os.environ for name in _ALLOCATOR_ENV) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**30))


# --------------------------------------------------------------------------- run folders and logs


def check_writable(folder: Path) -> None:
    """Raise a one-line UserInputError unless a file can be created in `folder` (a read-only folder or
    file system, a full disk's quota), before anything is trained."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserInputError(f"cannot write in the run folder {folder}: {write_error_reason(error)}; make it "
                             f"writable (or choose another --run-dir for a new run)") from None


def json_safe(value: Any) -> Any:
    """Non-finite floats become None, so log.jsonl stays strict JSON (no NaN or Infinity)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class Run:
    """A run folder: `args.json`, `log.jsonl`, checkpoints. Prints log lines and appends them as JSON.

    Opening one (new or resumed) checks that the folder can be written, with a one-line error if not,
    and removes temporary files a process killed mid-save left there. Under torchrun only rank 0
    prints and writes; on the other ranks the same calls do nothing.
    Listeners (`add_listener`: the live views of views.py) receive each logged event after it is
    written; one that fails with an OSError (its server went away) is dropped with a line saying so.
    """

    def __init__(self, path: Path, created: bool = False):
        self.path = Path(path)
        self.main = distributed.is_main()
        self.created = created  # this invocation made the folder (see `setting_up`)
        self.new_files: list[Path] = []  # files of a new run that were not there before it (see `setting_up`)
        if self.main:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise UserInputError(f"cannot create the run folder {self.path}: {write_error_reason(error)}; "
                                     f"choose a writable --run-dir") from None
            check_writable(self.path)
            remove_stale_temporaries(self.path)
        self.log_path = self.path / "log.jsonl"
        self.bar: tqdm | None = None
        self.listeners: list[Callable[[str, dict], None]] = []

    @classmethod
    def create(cls, args: argparse.Namespace, script: str) -> "Run":
        """A new run folder with `args.json`; rank 0 chooses it and tells the other ranks."""
        path = Path(distributed.agree(str(cls._new_path(args, script)) if distributed.is_main() else None))
        run = cls(path, created=distributed.is_main() and not path.exists())
        if run.main:
            run.new_files = [run.path / name for name in ("args.json", "log.jsonl") if not (run.path / name).exists()]
            meta = {
                "args": public_args(args), "script": script, "argv": sys.argv, "git_commit": git_commit(),
                "torch": torch.__version__, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "processes": distributed.world_size(),
            }
            (run.path / "args.json").write_text(json.dumps(meta, indent=2) + "\n")
        return run

    @contextlib.contextmanager
    def setting_up(self):
        """Around a new run's set-up: when it fails (a flag the model or data refuse, Ctrl-C), remove
        the args.json and log.jsonl it wrote where there were none, and the folder if this invocation
        made it and nothing else is in it, so a refused run leaves nothing behind. A resumed run's
        folder is left alone."""
        try:
            yield self
        except BaseException:
            if self.main:
                for path in self.new_files:
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
                if self.created:
                    with contextlib.suppress(OSError):
                        self.path.rmdir()  # only if empty
            raise

    @staticmethod
    def _new_path(args: argparse.Namespace, script: str) -> Path:
        if args.run_dir:
            path = Path(args.run_dir)
            if any((path / name).exists() for name in ("checkpoint.pt", "checkpoint.previous.pt", "best.pt")):
                raise UserInputError(
                    f"run folder {path} already holds checkpoints; continue it with --resume {path}, "
                    f"or choose another --run-dir"
                )
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            path = Path("runs") / f"{args.name or script}-{stamp}"
            suffix = 1
            while path.exists():
                suffix += 1
                path = Path("runs") / f"{args.name or script}-{stamp}-{suffix}"
        return path

    def print(self, line: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def log(self, event: str, **fields: Any) -> None:
        if not self.main:
            return
        record = {"event": event, "time": round(time.time(), 3),
                  **{key: json_safe(value) for key, value in fields.items()}}
        try:
            with open(self.log_path, "a") as file:
                file.write(json.dumps(record) + "\n")
        except OSError as error:
            raise TrainingError(f"could not write {self.log_path}: {write_error_reason(error)}; free some space "
                                f"(or make the folder writable), then continue with --resume {self.path}") from None
        for listener in list(self.listeners):
            try:
                listener(event, record)
            except OSError as error:  # a viewer going away must not end the training run
                self.listeners.remove(listener)
                self.print(f"| {type(listener).__name__}: stopped ({error}); log.jsonl has every event")

    def add_listener(self, listener: Callable[[str, dict], None]) -> None:
        """Call `listener(event, record)` after each logged event (on rank 0)."""
        if self.main:
            self.listeners.append(listener)

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def truncate_log(self, size: int) -> None:
        """Drop log lines written after a checkpoint, since a resumed run redoes that work."""
        if self.main and self.log_path.exists() and self.log_path.stat().st_size > size:
            with open(self.log_path, "r+b") as file:
                file.truncate(size)


# --------------------------------------------------------------------------- stopping

STOP_REQUESTS = (None, "interrupt", "terminate")  # least to most urgent; under torchrun the ranks take the most


class StopSignals:
    """Turn the first Ctrl-C or SIGTERM into a request to stop at the next batch boundary.

    A second Ctrl-C raises KeyboardInterrupt at once.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = "interrupt" if signum == signal.SIGINT else "terminate"

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
