"""The one training loop: `Trainer`, which the language-model and task trainers specialise.

What it owns: the optimiser and plateau schedule, mixed precision (`--precision`), the
non-finite-safe update, the fit loop with its progress bar, log lines, stop requests (Ctrl-C,
SIGTERM, `--max-steps`), checkpoints (save / restore through `training.checkpoint`) and the
start-up every script shares (`prepare`, `announce`). A subclass says what a batch
is (`next_batch`), what its loss is (`forward_loss`), what ends a period (an epoch for language
models; nothing for tasks) and what is evaluated when.

Host syncs. On a GPU the CPU queues kernels ahead of the device; every read of a device value
(`.item()`, `float(loss)`, `if tensor:`) makes it wait until the queue drains. The hot loop
therefore reads nothing between log lines: each step's reported loss and its two flags
(stepped, non-finite) stay on the device and `collect` reads them together once per
`--log-interval` batches, and before any evaluation, checkpoint or stop. The rule for a
non-finite loss or gradient is the documented one, decided on the device:

- the step is skipped: `masked_step` keeps the weights and optimiser state as they were
  (fused SGD / Adam take the flag as `found_inf` and skip in the kernel; other optimisers' updates
  are undone with `torch.where`), and the language model's recurrent state is reset;
- at the next read it is printed, logged (`nonfinite` event with its step) and counted; when
  --max-nonfinite consecutive steps were non-finite the run stops with a one-line error that says
  which step checkpoint.pt holds.

No checkpoint is written while such a streak lasts, nor while any weight is not finite (`save`
reads the pending steps first, and says what it skipped): a diverging run keeps the last state
written before it diverged, and the one before that as checkpoint.previous.pt, in case the weights
already blew up in the finite step just before the streak.

The one exception is an optimiser's first step (it creates its state then), which is decided on
the host. On the CPU reading a value costs nothing, so there every step is decided on the host as
it happens (the same results bit for bit, and messages at the step); `decide_on_device` picks.
Under torchrun the ranks agree on the loss's finiteness with a device-side all-reduce, and on
stop requests at log intervals (on the GPU) or every batch (on the CPU).

Mixed precision: `--precision bf16|fp16` runs the forward pass and loss under `torch.autocast`;
the weights, the loss reduction (autocast's fp32 ops) and the optimiser state stay fp32. fp16
adds a `torch.amp.GradScaler`: a step whose scaled gradients overflow is skipped and the scale
lowered, as the scaler does; it is counted (`overflow_steps`) but is not a non-finite step
unless the loss itself is not finite.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

import distributed
from errors import TrainingError, UserInputError
from models.core import Core
from training.checkpoint import (PREVIOUS, RESUMABLE, SaveFailed, open_resume, rng_state, save_checkpoint,
                                 set_rng_state)
from training.flags import Flags, FromArgs, public_args, resolve_device
from training.run import STOP_REQUESTS, Run, StopSignals, keep_freed_memory, seed_rank
from views import ViewUnavailable, VisdomBoard, Views

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop,
              "asgd": torch.optim.ASGD}
FUSED = ("sgd", "adam")  # optimisers whose fused kernels take `found_inf` (the update is skipped on the device)


def decide_on_device(device: torch.device) -> bool:
    """Whether a step's skip is decided on the device (no host sync): on accelerators, not on the CPU."""
    return device.type != "cpu"


@dataclasses.dataclass
class LoopOptions(FromArgs):
    """What the loop needs from the flags (`from_args`); every script's flags have these."""

    optimizer: str
    lr: float
    wdecay: float = 0.0
    clip: float = 0.0
    lr_decay: float = 1.0
    patience: int = 0
    plateau_threshold: float = 0.0
    max_nonfinite: int = 10
    log_interval: int = 100
    save_interval: int = 0
    max_steps: int | None = None
    precision: str = "fp32"
    compile: bool | None = None  # None: each core's default (`compiles_by_default`)
    dry_run: bool = False
    seed: int = 1111
    sync_free: bool | None = None  # None: `decide_on_device`



@dataclasses.dataclass
class LoopState:
    """The loop's position and bookkeeping; saved in checkpoints as `train_state`."""

    step: int = 0  # batches done in all (skipped ones included)
    nonfinite_streak: int = 0
    skipped_steps: int = 0
    overflow_steps: int = 0  # fp16: steps the gradient scaler skipped
    log_bytes: int = 0  # size of log.jsonl when the checkpoint was written
    interval_loss: float = 0.0  # sums for the next log line, kept so a resumed run logs the same
    interval_batches: int = 0
    interval_tokens: int = 0
    interval_seconds: float = 0.0


class Precision:
    """--precision: the autocast context of the forward pass and, for fp16, the gradient scaler."""

    DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, name: str, device: torch.device):
        self.name, self.dtype, self.device_type = name, self.DTYPES[name], device.type
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def gradient_norm(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    """Clip the gradients to norm `clip` (0: leave them) and return their total norm before clipping."""
    if clip > 0:
        return nn.utils.clip_grad_norm_(params, clip)
    norms = torch._foreach_norm([p.grad for p in params])
    return torch.linalg.vector_norm(torch.stack(norms))


def masked_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """`optimizer.step()` where `ok` (a bool on the device) holds; as if it never ran where it does not.

    Fused optimisers skip in their kernel (`found_inf`, the mechanism `torch.amp.GradScaler` uses);
    for others, the parameters and state tensors are put back with `torch.where`. The optimiser must
    already have its state (see `Trainer.update`).
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = ok.logical_not().to(torch.float32)
        try:
            optimizer.step()
        finally:
            optimizer.found_inf = None
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    tensors = params + [value for p in params for value in optimizer.state[p].values() if torch.is_tensor(value)]
    saved = [tensor.clone() for tensor in tensors]
    optimizer.step()
    with torch.no_grad():
        for tensor, before in zip(tensors, saved):
            tensor.copy_(torch.where(ok, tensor, before))


def compiles_by_default(core: Core, device: torch.device) -> bool:
    """`--compile`'s default for one core: what the core says of its compiled steps on that kind of device
    (`Core.compiles_on_cuda`, `Core.compiles_on_cpu`)."""
    return core.compiles_on_cuda if device.type == "cuda" else core.compiles_on_cpu


def compile_cores(model: nn.Module, device: torch.device, choice: bool | None = True) -> list[str]:
    """Turn on the compiled per-step path of the cores in `model` that have one: all of them (`choice` True),
    none (False) or those whose default it is on `device` (None). Returns their names."""
    cores = [module for module in model.modules() if isinstance(module, Core)]
    if choice is None:
        chosen = [core for core in cores if compiles_by_default(core, device)]
    else:
        chosen = cores if choice else []
    return [type(core).name or type(core).__name__ for core in chosen if core.compile_steps()]


def read_flags(flags: tuple[bool | torch.Tensor, ...]) -> list[bool]:
    """Python bools from a mix of bools and device bools, with one read."""
    if all(isinstance(flag, bool) for flag in flags):
        return list(flags)
    device = next(flag.device for flag in flags if torch.is_tensor(flag))
    return torch.stack([torch.as_tensor(flag, device=device) for flag in flags]).tolist()


class Trainer:
    """Trains `model` with the options' optimiser, schedule and precision; see the module's docstring.

    Subclasses define `next_batch`, `forward_loss`, `finished`, `progress`, `train_line`, `results`
    and, where they need them, `end_period`, `after_batch`, `after_update`, `checkpoint_contents` /
    `restore_streams` and `optimizer_for`.
    """

    state_class: type[LoopState] = LoopState
    optimizer_settings: dict[str, dict] = {}  # extra constructor arguments per optimiser
    skip_action = "step skipped"
    task_name = "task"  # what the model is trained on, stored in checkpoints (`training.checkpoint.check_task`)

    def __init__(self, model: nn.Module, options: LoopOptions, device: torch.device, run: Run,
                 args: argparse.Namespace, script: str):
        self.model, self.options, self.device, self.run, self.args, self.script = (
            model, options, device, run, args, script)
        if device.type == "cpu":
            keep_freed_memory()  # each step's large buffers stay mapped (see its docstring)
        self.sync_free = decide_on_device(device) if options.sync_free is None else options.sync_free
        self.compiled_cores = compile_cores(model, device, options.compile)
        self.precision = Precision(options.precision, device)
        self.optimizer = self.make_optimizer(options.optimizer)
        self.scheduler = self.make_scheduler()
        self.state = self.state_class()
        self.saved_path: Path | None = None  # the newest resumable checkpoint on disk (None: none yet) ...
        self.saved_step = 0  # ... and its step
        self.saved_state: dict | None = None  # ... and the loop's `position` then
        self.keep_previous = True  # whether the next save moves checkpoint.pt to checkpoint.previous.pt
        self.pending: list[tuple[int, int, torch.Tensor, Any, Any]] = []  # steps not yet read from the device
        self.bar: tqdm | None = None
        self.clock = time.perf_counter()
        self.period_started = self.clock
        self.period_batches = 0

    # ---- optimiser and schedule

    def make_optimizer(self, name: str) -> torch.optim.Optimizer:
        settings: dict[str, Any] = {"lr": self.options.lr, "weight_decay": self.options.wdecay,
                                    **self.optimizer_settings.get(name, {})}
        if name == "asgd":  # averaging from the first step on, as AWD-LSTM's NT-ASGD
            settings.update(t0=0, lambd=0.0)
        if self.sync_free:
            if name in FUSED:
                settings["fused"] = True
            elif self.device.type == "cuda":
                settings["capturable"] = True  # their step counters stay on the device
        self.optimizer_started = False
        return OPTIMIZERS[name](self.model.parameters(), **settings)

    def make_scheduler(self) -> torch.optim.lr_scheduler.ReduceLROnPlateau | None:
        options = self.options
        if options.lr_decay >= 1:
            return None
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=options.lr_decay, patience=options.patience,
            threshold=options.plateau_threshold)

    def step_schedule(self, loss: float) -> None:
        if self.scheduler is not None and math.isfinite(loss):
            self.scheduler.step(loss)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- one step

    def train_step(self, batch: Any) -> None:
        """Forward, backward and the guarded update on one batch; its record waits for `collect`."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            loss, report, count = self.forward_loss(batch)
        stepped, bad = self.update(loss)
        self.after_update(bad)
        self.pending.append((self.state.step + 1, count, report.detach(), stepped, bad))
        if bad is True:  # decided on the host: report it now
            self.collect()

    def update(self, loss: torch.Tensor) -> tuple[bool | torch.Tensor, bool | torch.Tensor]:
        """Backward, clip and step unless the loss or gradient is not finite; returns (stepped, non-finite).

        Both are Python bools when decided on the host, device bools otherwise. Under torchrun the
        gradients are averaged over the ranks by the clip, and the ranks agree on the loss's finiteness,
        so every rank takes the same branch.
        """
        finite = distributed.all_true(torch.isfinite(loss.detach()))
        on_host = not self.sync_free or not self.optimizer_started
        if on_host and not bool(finite):
            self.optimizer.zero_grad(set_to_none=True)
            return False, True
        scaler = self.precision.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        stepped = finite & torch.isfinite(gradient_norm(params, self.options.clip))
        bad = stepped.logical_not() if scaler is None else finite.logical_not()
        if on_host:
            stepped, bad = bool(stepped), bool(bad)
            if stepped:
                self.optimizer.step()
                self.optimizer_started = True
            else:
                self.optimizer.zero_grad(set_to_none=True)
        else:
            masked_step(self.optimizer, stepped)
        if scaler is not None:
            scaler.update()
        return stepped, bad

    def collect(self) -> None:
        """Read the records of the steps since the last read (one host sync): add their losses to the
        interval's sums, report non-finite steps, and stop once they persist."""
        if not self.pending:
            return
        entries, self.pending = self.pending, []
        steps, counts, reports, stepped, bad = zip(*entries)
        losses = torch.stack([report.double() for report in reports])  # summed in float64, as Python floats
        if distributed.world_size() > 1:  # the ranks' shares are equal: the mean of their losses is the batch's
            losses = distributed.all_reduce_sum_tensor(losses) / distributed.world_size()
        values = losses.tolist()
        stepped, bad = read_flags(stepped), read_flags(bad)
        state = self.state
        for step, count, value, ok, is_bad in zip(steps, counts, values, stepped, bad):
            if is_bad:
                self.skip_nonfinite(step)
            elif ok:
                state.nonfinite_streak = 0
                state.interval_loss += value
                state.interval_batches += 1
                state.interval_tokens += count
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{value:.3f}")
            else:
                state.overflow_steps += 1

    def skip_nonfinite(self, step: int) -> None:
        """Count, print and log skipped step `step`; raise TrainingError once they persist."""
        state = self.state
        state.nonfinite_streak += 1
        state.skipped_steps += 1
        self.run.print(f"| step {step}: non-finite loss or gradient; {self.skip_action}")
        self.run.log("nonfinite", step=step, **self.where())
        if state.nonfinite_streak >= self.options.max_nonfinite:
            first = step - state.nonfinite_streak + 1
            raise TrainingError(
                f"the loss or gradient was not finite for {state.nonfinite_streak} consecutive steps "
                f"(step {step}); lower --lr or --clip, or check the data. No checkpoint was written during "
                f"them (steps {first}-{step}): {self.on_disk()}"
            )

    def on_disk(self) -> str:
        """What the run folder holds to resume from, in words (for messages)."""
        if self.saved_path is None:
            return f"{self.run.path} holds no resumable checkpoint yet"
        text = f"{self.saved_path} holds step {self.saved_step}"
        if self.saved_path.name == RESUMABLE and (self.run.path / PREVIOUS).is_file():
            text += (f" (if resuming it diverges at once, the weights blew up before that step: resume "
                     f"{self.run.path / PREVIOUS}, the checkpoint before it)")
        return text

    # ---- the loop

    def fit(self) -> dict:
        """Train until `finished`, a stop signal or --max-steps; returns {"stopped": reason or None, ...}."""
        stop = None
        with StopSignals() as signals:
            while stop is None and not self.finished():
                stop = self.train_period(signals)
                if stop is None:
                    stop = self.end_period()
        if stop not in (None, "converged"):
            path = self.save()
            if path is not None:
                self.run.print(f"| stopped ({stop}) at step {self.state.step}: saved resumable checkpoint {path}; "
                               f"continue with --resume {self.run.path}")
            else:
                self.run.print(f"| stopped ({stop}) at step {self.state.step} without saving; {self.on_disk()}")
            if stop == "terminate":  # leave at once
                return {"stopped": stop, "step": self.state.step, "checkpoint": str(path) if path else None}
        return {"stopped": stop, **self.results()}

    def train_period(self, signals: StopSignals) -> str | None:
        """Train until `next_batch` ends the period; returns a stop reason or None."""
        total, initial, desc = self.progress()
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=None if self.run.main else True,
                        leave=False, dynamic_ncols=True)
        self.run.bar = None if self.bar.disable else self.bar
        self.period_started = time.perf_counter()
        self.period_batches = 0
        self.resume_clock()
        try:
            stop = self._train_batches(signals)
        finally:
            self.bar.close()
            self.run.bar = self.bar = None
        self.pause_clock()
        return stop

    def _train_batches(self, signals: StopSignals) -> str | None:
        log_interval = self.options.log_interval
        while True:
            stop = self.stop_request(signals)
            if stop is not None:
                return stop
            if self.finished():
                return None
            batch = self.next_batch()
            if batch is None:
                return None
            self.train_step(batch)
            self.state.step += 1
            self.period_batches += 1
            self.bar.update(1)
            if self.state.step % log_interval == 0:
                self.log_interval()
            stop = self.after_batch()
            if stop is not None:
                return stop

    def stop_request(self, signals: StopSignals) -> str | None:
        """A stop signal (any rank's, the most urgent) or --max-steps reached; None to go on.

        Under torchrun with device-side decisions the ranks compare signals at log intervals only.
        """
        reason = signals.reason
        if distributed.world_size() > 1:
            if self.sync_free and self.state.step % self.options.log_interval:
                reason = None
            else:
                reason = STOP_REQUESTS[distributed.max_over_ranks(STOP_REQUESTS.index(reason))]
        if reason is not None:
            return reason
        if self.options.max_steps is not None and self.state.step >= self.options.max_steps:
            return "max-steps"
        return None

    def resume_clock(self) -> None:
        self.clock = time.perf_counter()

    def pause_clock(self) -> None:
        """Read the pending steps and add the training time since `resume_clock` to the interval's."""
        self.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.state.interval_seconds += time.perf_counter() - self.clock

    def log_interval(self) -> None:
        """The training log line (mean loss over the interval's steps that were not skipped)."""
        self.pause_clock()
        state = self.state
        if state.interval_batches:
            loss = state.interval_loss / state.interval_batches
            elapsed = max(state.interval_seconds, 1e-9)
            line, fields = self.train_line(loss, 1000 * elapsed / state.interval_batches,
                                           state.interval_tokens / elapsed)
            self.run.print(line)
            self.run.log("train", **fields)
            state.interval_loss, state.interval_batches, state.interval_tokens = 0.0, 0, 0
            state.interval_seconds = 0.0
            self.after_log(loss)
        self.resume_clock()

    # ---- checkpoints

    def checkpoint_contents(self) -> dict:
        """What `restore` needs; under torchrun every rank must call it (it gathers from all of them).

        `rng` is rank 0's random state, as one process would save it; `rank_rngs` adds every
        rank's under torchrun.
        """
        rngs = distributed.gather_objects(rng_state())
        scaler = self.precision.scaler
        return {
            "script": self.script,
            "task": self.task_name,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "args": public_args(self.args),
            "train_state": dataclasses.asdict(self.state),
            "rng": rngs[0],
            **({"rank_rngs": rngs} if len(rngs) > 1 else {}),
        }

    def unsafe_to_save(self) -> str | None:
        """Why no checkpoint may be written now (None: it may): a streak of non-finite steps is under
        way, or a weight is not finite. The pending steps are read first; every rank decides alike."""
        self.collect()
        if self.state.nonfinite_streak:
            return f"the last {self.state.nonfinite_streak} steps were not finite"
        weights = [p.detach() for p in self.model.parameters()]
        if weights and not bool(torch.stack([w.isfinite().all() for w in weights]).all()):
            return "some weights are not finite"
        return None

    def save(self, name: str = RESUMABLE, copies: tuple[Path, ...] = ()) -> Path | None:
        """Write `name` in the run folder (atomically), and the same contents to each of `copies`;
        best.pt is marked not resumable. Returns the path, or None when `unsafe_to_save` forbids it
        (it says so). A new checkpoint.pt moves the one it replaces to checkpoint.previous.pt.

        Every rank calls it; rank 0 writes. Pending steps are read first, so a checkpoint never
        holds a step whose skip has not been decided and reported.

        Raises:
            TrainingError: the file could not be written (full disk, read-only folder); what is on
                disk is unchanged and the message says what it holds.
        """
        reason = self.unsafe_to_save()
        if reason is not None:
            self.run.print(f"| step {self.state.step}: {name} not written, since {reason}; {self.on_disk()}")
            self.run.log("save_skipped", step=self.state.step, file=name, reason=reason)
            return None
        path = self.run.path / name
        if name == RESUMABLE and path == self.saved_path and self.saved_state == self.position():
            return path  # nothing has changed since (e.g. --max-steps right after a check): keep the previous one
        self.state.log_bytes = self.run.log_size()
        contents = {**self.checkpoint_contents(), "resumable": name != "best.pt"}
        if distributed.is_main():
            try:
                for target in (path, *copies):
                    save_checkpoint(target, self.model, keep_previous=target == path and name == RESUMABLE
                                    and self.keep_previous, **contents)
            except SaveFailed as error:
                raise TrainingError(f"{error}; {self.on_disk()}. Free some space (or make the folder writable), "
                                    f"then continue with --resume {self.run.path}") from None
        if name == RESUMABLE:
            self.saved_path, self.saved_step, self.keep_previous = path, self.state.step, True
            self.saved_state = self.position()
        return path

    def position(self) -> dict:
        """The loop's state less the log's size and the clock: equal for two saves with no step between them."""
        return {**dataclasses.asdict(self.state), "log_bytes": None, "interval_seconds": None}

    def restore(self, checkpoint: dict) -> None:
        """Continue from a checkpoint written by `save` (weights already loaded into the model).

        With the number of processes that wrote it, each rank continues its own random streams
        (bitwise on CPU). With another number, rank 0 continues the saved streams and the other
        ranks start their own from --seed (see `restore_streams`).
        """
        self.state = self.state_class(**checkpoint["train_state"])
        self.optimizer = self.optimizer_for(self.state)
        self.scheduler = self.make_scheduler()
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.optimizer_started = bool(self.optimizer.state)
        if self.scheduler is not None and checkpoint.get("scheduler") is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.precision.scaler is not None and checkpoint.get("scaler") is not None:
            self.precision.scaler.load_state_dict(checkpoint["scaler"])
        rngs = checkpoint.get("rank_rngs", [checkpoint["rng"]])
        same = len(rngs) == distributed.world_size()
        set_rng_state(rngs[distributed.rank()] if same else checkpoint["rng"])
        if not same:
            seed_rank(self.options.seed)
        self.restore_streams(checkpoint, same)
        self.run.truncate_log(self.state.log_bytes)
        self.saved_path, self.saved_step = Path(checkpoint["path"]), self.state.step
        # resumed from checkpoint.previous.pt (checkpoint.pt unreadable or diverged): the next save replaces
        # checkpoint.pt without moving it over the state resumed from
        self.keep_previous = Path(checkpoint["path"]).name != PREVIOUS

    # ---- hooks

    def next_batch(self) -> Any | None:
        """The next training batch, or None when the period ends (asked only while not `finished`)."""
        raise NotImplementedError

    def forward_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(loss to minimise, loss to report, tokens or examples it covers over all ranks), under autocast."""
        raise NotImplementedError

    def finished(self) -> bool:
        raise NotImplementedError

    def progress(self) -> tuple[int, int, str]:
        """The progress bar of a period: (total, done, description)."""
        raise NotImplementedError

    def train_line(self, loss: float, ms_per_batch: float, tokens_per_s: float) -> tuple[str, dict]:
        """The training log line and the fields of its `train` event."""
        raise NotImplementedError

    def results(self) -> dict:
        """What `fit` returns beside the stop reason (after a stop other than SIGTERM)."""
        return {"step": self.state.step}

    def end_period(self) -> str | None:
        """After a period's last batch: evaluate, checkpoint; returns a stop reason or None."""
        return None

    def after_batch(self) -> str | None:
        """After each batch (tasks evaluate here); returns a stop reason or None."""
        if self.options.save_interval and self.state.step % self.options.save_interval == 0:
            self.save()
        return None

    def after_update(self, bad: bool | torch.Tensor) -> None:
        """After each update, with whether the step was non-finite (e.g. reset a recurrent state)."""

    def after_log(self, loss: float) -> None:
        """After each training log line."""

    def where(self) -> dict:
        """Fields that place a step in the run, for the `nonfinite` event."""
        return {}

    def optimizer_for(self, state: LoopState) -> torch.optim.Optimizer:
        """The optimiser a restored state trains with (NT-ASGD switches it)."""
        return self.make_optimizer(self.options.optimizer)

    def restore_streams(self, checkpoint: dict, same_processes: bool) -> None:
        """Restore the subclass's own random streams and state."""


# --------------------------------------------------------------------------- start-up shared by every script


def prepare(flags: Flags, kind: str, check: Callable[[argparse.Namespace], None], script: str | None = None
            ) -> tuple[argparse.Namespace, dict | None, torch.device]:
    """(args, checkpoint or None, device): --resume merged and checked (a run of another script is
    refused), flags validated, threads set, the device chosen (under torchrun cuda:LOCAL_RANK for a
    CUDA request)."""
    args, checkpoint = open_resume(flags, kind, script)
    check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, checkpoint, distributed.device(resolve_device(args))


def open_views(args: argparse.Namespace, board: VisdomBoard | None = None) -> Views:
    """What --visdom and --tensorboard ask for, checked before the run folder is made (on rank 0; the
    other ranks get none): a missing package or an unreachable server is a one-line error.

    Args:
        board: a Visdom connection made already (a sequence task's memory pictures), to share.
    """
    if not distributed.is_main():
        return Views()
    try:
        return Views.from_args(args, board)
    except ViewUnavailable as error:
        raise UserInputError(str(error)) from None


def announce(trainer: Trainer, checkpoint: dict | None, what: str) -> None:
    """Restore a resumed run and print what is being trained."""
    run = trainer.run
    if checkpoint is not None:
        trainer.restore(checkpoint)
        run.log("resume", step=trainer.state.step, **trainer.where())
        place = "".join(f" {key} {value}," for key, value in trainer.where().items())
        run.print(f"| resumed {checkpoint['path']} at{place} step {trainer.state.step}")
    parameters = sum(p.numel() for p in trainer.model.parameters())
    processes = f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    precision = f", {trainer.precision.name}" if trainer.precision.name != "fp32" else ""
    compiled = f", compiled steps: {', '.join(trainer.compiled_cores)}" if trainer.compiled_cores else ""
    run.print(f"| {trainer.script}: {what}, {parameters:,} parameters, device {trainer.device}{processes}"
              f"{precision}{compiled}, run folder {run.path}")
