"""The task trainers: generated algorithmic tasks, N-th farthest and the DNC tasks (copy, adding, argmax).

A task has no corpus, epochs or BPTT windows: each iteration draws a fresh batch from a
`torch.Generator` seeded by --seed (its state is in the checkpoint, so `--resume` continues
bitwise on CPU), and the test set is drawn once from --test-seed. Every --check-freq iterations
the loop evaluates on it, steps the plateau schedule (on the test loss), and writes
`checkpoint.pt` (resumable) and `best.pt` (best test result).

- `TaskTrainer` (`run_task`): a `tasks.protocol.Task`, one answer per example (`models.TaskModel`).
- `SequenceTaskTrainer` (`run_sequence_task`): a `tasks.protocol.SequenceTask` with a length per
  batch from the curriculum (tasks/curriculum.py, saved in checkpoints), outputs at every step
  (`models.SequenceModel`), metrics over the answer steps. The fixed test set spreads its lengths
  evenly up to the curriculum's current maximum; at the end the model is measured on longer
  sequences (--generalisation-lengths). After each training log line a `pictures` callback the
  script passes in (the DNC scripts: `models.dnc.visualize.MemoryPictures`) draws what it likes.

Under torchrun every process runs the loop on its share of each batch: --batch_size B is the
batch of all processes together, each of the N processes draws its B/N examples from a generator
of its own (seeded --seed + rank: rank 0 continues the single-process stream), and DDP averages
the gradients. A sequence task's batch keeps one length: every rank takes rank 0's draw. The fixed
test sets are dealt out over the ranks (`distributed.map_shared`), so evaluation is bitwise one
process's. Only rank 0 prints, draws and writes files.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import distributed
from errors import UserInputError
from models.core import get_core_class
from models.task_model import SequenceModel, TaskModel, TaskModelConfig
from tasks.curriculum import Curriculum, spread_lengths
from tasks.protocol import SequenceTask, Task
from training.checkpoint import check_task, load_checkpoint
from training.flags import (Flags, FromArgs, check_sequence_args, check_task_args,
                            default_generalisation_lengths)
from training.loop import LoopOptions, LoopState, Trainer, announce, open_views, prepare
from training.run import Run, seed_everything, seed_rank
from views import Views

TASK_MODELS = {"TaskModel": TaskModel, "SequenceModel": SequenceModel}  # by the kind their checkpoints name


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor field of a batch (a NamedTuple) to `device`."""
    return type(batch)(*(field.to(device) if isinstance(field, torch.Tensor) else field for field in batch))


def task_model_config_from_args(args: argparse.Namespace, task: Task | SequenceTask) -> TaskModelConfig:
    """--model, the core's flags and --mlp-sizes; raises ValueError on an unknown core or bad size."""
    core_class = get_core_class(args.model)
    core_config = core_class.config_from_args(args, task.input_size)
    return TaskModelConfig(core=core_class.name, core_config=dataclasses.asdict(core_config),
                           input_size=task.input_size, output_size=task.output_size, mlp_sizes=list(args.mlp_sizes))


@dataclasses.dataclass
class TaskOptions(FromArgs):
    """The task loop's own flags (`from_args`)."""

    iterations: int
    batch_size: int
    check_freq: int
    test_size: int
    test_seed: int



@dataclasses.dataclass
class TaskState(LoopState):
    best_accuracy: float = -1.0
    best_step: int = 0


@dataclasses.dataclass
class SequenceState(LoopState):
    best_metric: float | None = None  # the task's headline metric on the test set, at best_max_length
    best_max_length: int = 0  # a model that trained to a longer curriculum length counts as better
    best_step: int = 0


class TaskTrainer(Trainer):
    """Trains a model on freshly generated batches of a task, evaluating on a fixed test set.

    Under torchrun each rank trains on its own `batch_size` examples (its share of --batch_size)
    through `loss_fn`, the DDP-wrapped `compute_loss`; evaluation and checkpoints cover all ranks.
    """

    state_class: type[LoopState] = TaskState

    def __init__(self, model: nn.Module, task: Any, options: LoopOptions, task_options: TaskOptions,
                 device: torch.device, run: Run, args: argparse.Namespace, script: str):
        super().__init__(model, options, device, run, args, script)
        self.task, self.task_options = task, task_options
        self.task_name = type(task).__name__
        self.batch_size = distributed.share(task_options.batch_size, "--batch_size")  # this rank's examples
        self.generator = torch.Generator().manual_seed(distributed.rank_seed(options.seed))  # this rank's examples
        self.loss_fn = distributed.wrap(model, lambda batch: self.compute_loss(batch))
        size = task_options.test_size
        self.test_size = min(size, 2 * task_options.batch_size) if options.dry_run else size
        self.last_step: int | None = None

    @functools.cached_property
    def test_batches(self) -> list[Any]:
        """The fixed test set, drawn from --test-seed on first use."""
        test_generator = torch.Generator().manual_seed(self.task_options.test_seed)
        batch_size = self.task_options.batch_size
        return [self.task.sample(min(batch_size, self.test_size - start), test_generator)
                for start in range(0, self.test_size, batch_size)]

    # ---- batches and loss

    def finished(self) -> bool:
        if self.last_step is None:
            iterations = self.task_options.iterations
            self.last_step = min(iterations, self.state.step + 2) if self.options.dry_run else iterations
        return self.state.step >= self.last_step

    def progress(self) -> tuple[int, int, str]:
        self.finished()
        return self.last_step, self.state.step, "training"

    def next_batch(self) -> Any | None:
        """This rank's share of a fresh training batch, from this rank's generator."""
        return self.task.sample(self.batch_size, self.generator)

    def forward_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        loss = self.loss_fn(batch)
        return loss, loss, self.task_options.batch_size

    def compute_loss(self, batch: Any) -> torch.Tensor:
        return self.task.loss(self.model(batch.inputs.to(self.device)), to_device(batch, self.device))

    def after_batch(self) -> str | None:
        if self.state.step % self.task_options.check_freq == 0 or self.state.step == self.last_step:
            self.pause_clock()
            self.check()
            self.resume_clock()
        return None

    def train_line(self, loss: float, ms_per_batch: float, tokens_per_s: float) -> tuple[str, dict]:
        step, lr = self.state.step, self.lr
        return (f"| step {step:7d} | lr {lr:.3g} | ms/step {ms_per_batch:7.1f} | loss {loss:6.4f}",
                dict(step=step, lr=lr, loss=loss, ms_per_step=ms_per_batch))

    # ---- evaluation

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) over the fixed test set, weighting each batch by its size.

        Under torchrun the batches are dealt out over the ranks and the sums taken in batch order,
        so every rank gets bitwise the single-process result.
        """
        model = model or self.model
        model.eval()

        def measure(batch: Any) -> tuple[int, float, float]:
            batch = to_device(batch, self.device)
            with self.precision.autocast():
                logits = model(batch.inputs)
                loss = self.task.loss(logits, batch)
            return logits.size(0), loss.item(), self.task.accuracy(logits.float(), batch)

        total_loss, total_correct, count = 0.0, 0.0, 0
        for size, loss, accuracy in distributed.map_shared(measure, self.test_batches):
            total_loss += loss * size
            total_correct += accuracy * size
            count += size
        return total_loss / count, total_correct / count

    def check(self) -> None:
        """Evaluate on the test set, keep the best model, step the schedule, write checkpoint.pt."""
        state = self.state
        started = time.perf_counter()
        test_loss, test_accuracy = self.evaluate()
        improved = test_accuracy > state.best_accuracy and self.unsafe_to_save() is None
        if improved:
            state.best_accuracy, state.best_step = test_accuracy, state.step
        lr = self.lr
        self.run.print(f"| step {state.step:7d} | test loss {test_loss:6.4f} | test accuracy {test_accuracy:6.4f}"
                       f" | lr {lr:.3g}{' | best' if improved else ''}")
        self.run.log("test", step=state.step, loss=test_loss, accuracy=test_accuracy, lr=lr,
                     seconds=time.perf_counter() - started)
        self.step_schedule(test_loss)
        if improved:
            self.save("best.pt")
        self.save()

    def results(self) -> dict:
        return {"step": self.state.step, "best_accuracy": self.state.best_accuracy, "best_step": self.state.best_step}

    # ---- checkpoints

    def checkpoint_contents(self) -> dict:
        """`Trainer`'s, plus rank 0's example generator (`generator`) and every rank's under torchrun."""
        generators = distributed.gather_objects(self.generator.get_state())
        return {**super().checkpoint_contents(), "generator": generators[0],
                **({"rank_generators": generators} if len(generators) > 1 else {})}

    def restore_streams(self, checkpoint: dict, same_processes: bool) -> None:
        """Each rank continues its generator; with another number of processes the ranks other than 0
        start a stream of their own from --seed, their rank and the step reached (repeating no examples)."""
        generators = checkpoint.get("rank_generators", [checkpoint["generator"]])
        self.generator.set_state(generators[distributed.rank() if same_processes else 0])
        if not same_processes and distributed.rank():
            self.generator.manual_seed(distributed.rank_seed(self.options.seed) + self.state.step * 2**20)


class SequenceTaskTrainer(TaskTrainer):
    """The task loop for sequence tasks: curriculum lengths, per-step outputs, metrics, pictures.

    Args (beyond `TaskTrainer`'s):
        curriculum: the length curriculum (its state is saved in checkpoints).
        pictures: called on rank 0 after each training log line as
            `pictures(step, loss, model, batch, run)` with the test set's last batch (whose last example
            is the longest: a fixed example to draw); or None.
    """

    state_class = SequenceState
    # the published DNC scripts' optimiser settings
    optimizer_settings = {"adam": dict(betas=(0.9, 0.98), eps=1e-9), "rmsprop": dict(momentum=0.9, eps=1e-10)}

    def __init__(self, model: nn.Module, task: SequenceTask, options: LoopOptions, task_options: TaskOptions,
                 device: torch.device, run: Run, args: argparse.Namespace, script: str, curriculum: Curriculum,
                 pictures: Callable[..., None] | None = None):
        super().__init__(model, task, options, task_options, device, run, args, script)
        self.curriculum, self.pictures = curriculum, pictures
        self.last_batch: Any = None
        self.test_sets: dict[int, list[Any]] = {}

    # ---- data

    @property
    def test_batches(self) -> list[Any]:
        """The fixed test set at the curriculum's current maximum: lengths spread evenly from the
        task's shortest to that maximum, drawn from --test-seed (the same every time for a maximum)."""
        longest = self.curriculum.max_length
        if longest not in self.test_sets:  # only the current one is kept
            self.test_sets = {longest: self.draw(spread_lengths(self.test_size, self.task.min_length, longest))}
        return self.test_sets[longest]

    def generalisation_batches(self, length: int) -> list[Any]:
        """A fixed set of --test-size examples (two batches at most with --dry-run), all of `length`."""
        return self.draw(torch.full((self.test_size,), length, dtype=torch.long))

    def draw(self, lengths: torch.Tensor) -> list[Any]:
        generator = torch.Generator().manual_seed(self.task_options.test_seed)
        return [self.task.sample(len(chunk), chunk, generator) for chunk in lengths.split(self.task_options.batch_size)]

    def next_batch(self) -> Any | None:
        """Apply the curriculum for the iterations done, then this rank's share of a fresh batch of one
        length drawn from it: every rank draws a length from its generator and all take rank 0's, so
        the whole batch has one length, as in one process."""
        if self.curriculum.update(self.state.step):
            self.run.print(f"| step {self.state.step:7d} | curriculum: maximum length {self.curriculum.max_length}")
            self.run.log("curriculum", step=self.state.step, max_length=self.curriculum.max_length)
        length = distributed.agree(self.curriculum.sample_length(self.generator))
        self.last_batch = self.task.sample(self.batch_size, length, self.generator)
        return self.last_batch

    # ---- checkpoints

    def checkpoint_contents(self) -> dict:
        return {**super().checkpoint_contents(), "curriculum": self.curriculum.state_dict()}

    def restore_streams(self, checkpoint: dict, same_processes: bool) -> None:
        super().restore_streams(checkpoint, same_processes)
        self.curriculum.load_state_dict(checkpoint["curriculum"])

    # ---- evaluation

    @torch.no_grad()
    def evaluate_metrics(self, batches: list[Any]) -> dict[str, float]:
        """The task's metrics over `batches`, each batch weighted by its size (under torchrun the
        batches are dealt out over the ranks, with bitwise the single-process result on every rank)."""
        self.model.eval()

        def measure(batch: Any) -> tuple[int, dict[str, float]]:
            batch = to_device(batch, self.device)
            with self.precision.autocast():
                outputs = self.model(batch.inputs)
            return batch.inputs.size(1), self.task.metrics(outputs.float(), batch)

        totals: dict[str, float] = {}
        count = 0
        for size, metrics in distributed.map_shared(measure, batches):
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value * size
            count += size
        return {name: total / count for name, total in totals.items()}

    def describe(self, metrics: dict[str, float]) -> str:
        return " | ".join(f"{name} {value:7.4f}" for name, value in metrics.items())

    def check(self) -> None:
        """Evaluate on the test set at the current maximum length, keep the best model, write checkpoint.pt."""
        state, task = self.state, self.task
        started = time.perf_counter()
        metrics = self.evaluate_metrics(self.test_batches)
        value, longest = metrics[task.metric], self.curriculum.max_length
        if state.best_metric is None or longest > state.best_max_length:
            improved = True
        elif longest == state.best_max_length:
            improved = value > state.best_metric if task.higher_is_better else value < state.best_metric
        else:
            improved = False
        improved = improved and math.isfinite(value) and self.unsafe_to_save() is None
        if improved:
            state.best_metric, state.best_max_length, state.best_step = value, longest, state.step
        lr = self.lr
        self.run.print(f"| step {state.step:7d} | max length {longest:4d} | test {self.describe(metrics)} | lr {lr:.3g}"
                       f"{' | best' if improved else ''}")
        self.run.log("test", step=state.step, max_length=longest, lr=lr, seconds=time.perf_counter() - started,
                     **metrics)
        self.step_schedule(metrics["loss"])
        if improved:
            self.save("best.pt")
        self.save()

    def results(self) -> dict:
        state = self.state
        return {"step": state.step, "metric": self.task.metric, "best_metric": state.best_metric,
                "best_max_length": state.best_max_length, "best_step": state.best_step}

    def generalisation(self) -> dict[int, dict[str, float]]:
        """The metrics at each --generalisation-lengths length (the two shortest with --dry-run): printed,
        logged, returned."""
        lengths = sorted(self.args.generalisation_lengths)
        results = {}
        for length in lengths[:2] if self.options.dry_run else lengths:
            results[length] = metrics = self.evaluate_metrics(self.generalisation_batches(length))
            self.run.print(f"| generalisation | length {length:5d} | {self.describe(metrics)}")
            self.run.log("generalisation", step=self.state.step, length=length, **metrics)
        return results

    def after_log(self, loss: float) -> None:
        if self.pictures is not None and self.run.main:
            self.pictures(self.state.step, loss, self.model, self.test_batches[-1], self.run)


# --------------------------------------------------------------------------- entry points for task scripts


def build_task(args: argparse.Namespace, make_task: Callable[[argparse.Namespace], Any],
               checkpoint: dict | None) -> tuple[Any, TaskModelConfig | None]:
    """The task, and the model config for a new run (None when resuming); ValueError -> UserInputError."""
    try:
        task = make_task(args)
        config = task_model_config_from_args(args, task) if checkpoint is None else None
    except ValueError as error:
        raise UserInputError(str(error)) from None
    check_task(checkpoint, type(task).__name__)
    return task, config


def memory_bytes(device: torch.device) -> int:
    """The memory of `device`: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_sequence_memory(args: argparse.Namespace, task: SequenceTask, device: torch.device) -> None:
    """Refuse lengths whose batches cannot fit in memory, before anything is built.

    A sequence model's inputs and outputs at every step of one batch of the longest sequences the
    run uses (the curriculum's last maximum, or the longest --generalisation-lengths) are a lower
    bound of what a step needs (activations and the memory's state come on top): when even they
    exceed the device's memory (e.g. argmax_task.py -sequence_max_length 100000, whose output layer
    names a million positions), the run could only end out of memory.
    """
    reached = args.sequence_max_length + args.curriculum_increment * (args.iterations // args.curriculum_freq)
    if task.max_length is not None:
        reached = min(reached, task.max_length)
    longest = max(reached, *args.generalisation_lengths)
    needed = longest * args.batch_size * (task.input_size + task.output_size) * 4  # fp32
    available = memory_bytes(device)
    if needed > available:
        raise UserInputError(
            f"one batch of the longest sequences of this run ({longest:,} steps, -batch_size {args.batch_size}, "
            f"{task.input_size + task.output_size:,} inputs and outputs a step) needs {needed / 2**30:,.0f} GiB for "
            f"its inputs and outputs alone, more than the {available / 2**30:,.0f} GiB of memory of {device}; use a "
            f"smaller -sequence_max_length, --generalisation-lengths or -batch_size")


def open_run(args: argparse.Namespace, script: str, kind: str, config: TaskModelConfig | None,
             checkpoint: dict | None, device: torch.device) -> tuple[nn.Module, Run]:
    """The model (new from `config`, or the checkpoint's) and its run folder (new, or the checkpoint's)."""
    if checkpoint is not None:
        model, _ = load_checkpoint(checkpoint["path"], device, kind=kind)
        return model, Run(Path(checkpoint["path"]).parent)
    try:
        model = TASK_MODELS[kind](config).to(device)
    except ValueError as error:
        raise UserInputError(str(error)) from None
    return model, Run.create(args, script)


def run_task(flags: Flags, script: str, make_task: Callable[[argparse.Namespace], Task]) -> dict:
    """Build task, model and trainer from flags (or from `--resume`'s checkpoint) and train.

    Returns:
        {"run_dir", "stopped", "step", "best_accuracy", "best_step", "test_loss", "test_accuracy"},
        the last two from the current model at the end (left out after SIGTERM).
    """
    args, checkpoint, device = prepare(flags, "TaskModel", check_task_args, script)
    seed_everything(args.seed)
    with distributed.session(device, args.dist_timeout):
        return _train_task(args, script, make_task, checkpoint, device)


def _train_task(args: argparse.Namespace, script: str, make_task: Callable[[argparse.Namespace], Task],
                checkpoint: dict | None, device: torch.device) -> dict:
    """`run_task` inside the process group (a function of its own, so the trainer is freed before the group)."""
    task, config = build_task(args, make_task, checkpoint)
    views = open_views(args)
    model, run = open_run(args, script, "TaskModel", config, checkpoint, device)
    with run.setting_up():
        seed_rank(args.seed)
        trainer = TaskTrainer(model, task, LoopOptions.from_args(args), TaskOptions.from_args(args), device, run,
                              args, script)
        announce(trainer, checkpoint, f"{model.config.core} {type(model).__name__}")
        views.start(run, metric="accuracy")
    result = {"run_dir": str(run.path), **trainer.fit()}
    if result["stopped"] == "terminate":  # leave at once; the checkpoint is saved
        return result
    test_loss, test_accuracy = trainer.evaluate()
    return {**result, "test_loss": test_loss, "test_accuracy": test_accuracy}


def run_sequence_task(flags: Flags, script: str, make_task: Callable[[argparse.Namespace], SequenceTask],
                      pictures: Callable[[argparse.Namespace, str], Any] | None = None) -> dict:
    """Build a sequence task, its curriculum, model and trainer from flags (or `--resume`) and train.

    Args:
        flags: parsed flags (`training.parse_sequence_args`).
        script: the script's name, for the run folder, logs and checkpoints.
        make_task: builds the task from the flags (after --generalisation-lengths is resolved);
            a ValueError becomes a UserInputError.
        pictures: builds the summary callback from the (resumed) flags and the script's name, on rank 0
            only (e.g. `models.dnc.visualize.MemoryPictures.from_args`); a RuntimeError it raises (such
            as `VisdomUnavailable`: no package, no server) becomes a one-line error.

    Returns:
        {"run_dir", "stopped", "step", "metric", "best_metric", "best_max_length", "best_step", "test",
        "generalisation"}: `test` holds the current model's metrics on the test set at the final
        maximum length, `generalisation` {length: metrics}; both left out after SIGTERM.
    """
    args, checkpoint, device = prepare(flags, "SequenceModel", check_sequence_args, script)
    seed_everything(args.seed)
    if args.generalisation_lengths is None:
        args.generalisation_lengths = default_generalisation_lengths(args)
    task, config = build_task(args, make_task, checkpoint)
    try:
        curriculum = Curriculum(args.sequence_max_length, args.curriculum_increment, args.curriculum_freq,
                                task.min_length, task.max_length)
    except ValueError as error:
        raise UserInputError(str(error)) from None
    if min(args.generalisation_lengths) < task.min_length:
        raise UserInputError(f"--generalisation-lengths must be at least {task.min_length} for this task, "
                             f"got {args.generalisation_lengths}")
    check_sequence_memory(args, task, device)
    callback = None
    if pictures is not None and distributed.is_main():
        try:
            callback = pictures(args, script)
        except RuntimeError as error:  # e.g. visualize.VisdomUnavailable: no package or no server
            raise UserInputError(str(error)) from None
    views = open_views(args, getattr(callback, "board", None))
    with distributed.session(device, args.dist_timeout):
        return _train_sequence_task(args, script, task, config, curriculum, callback, views, checkpoint, device)


def _train_sequence_task(args: argparse.Namespace, script: str, task: SequenceTask, config: TaskModelConfig | None,
                         curriculum: Curriculum, pictures: Any, views: Views, checkpoint: dict | None,
                         device: torch.device) -> dict:
    """`run_sequence_task` inside the process group (a function of its own, so the trainer is freed
    before the group)."""
    model, run = open_run(args, script, "SequenceModel", config, checkpoint, device)
    with run.setting_up():
        seed_rank(args.seed)
        trainer = SequenceTaskTrainer(model, task, LoopOptions.from_args(args), TaskOptions.from_args(args), device,
                                      run, args, script, curriculum, pictures)
        announce(trainer, checkpoint, f"{model.config.core} {type(model).__name__}")
        views.start(run, metric=task.metric)
    result = {"run_dir": str(run.path), **trainer.fit()}
    if result["stopped"] == "terminate":
        return result
    test = trainer.evaluate_metrics(trainer.test_batches)
    run.print(f"| final test | max length {curriculum.max_length:4d} | {trainer.describe(test)}")
    run.log("final", step=trainer.state.step, max_length=curriculum.max_length, **test)
    if run.main:
        example = to_device(trainer.test_batches[-1], device)
        with torch.no_grad():
            run.print("| a test example:\n" + task.to_human_readable(example, model(example.inputs), index=-1))
    return {**result, "test": test, "generalisation": trainer.generalisation()}
