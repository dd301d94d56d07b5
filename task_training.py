"""The training loop for generated algorithmic tasks (N-th farthest now; the DNC tasks later).

What it shares with the language-model loop in `training.py`, and reuses from it: run folders
(`Run`: args.json with the git commit, log.jsonl, printing beside a tqdm bar), atomic
checkpoints (`save_checkpoint`, `read_checkpoint`), the global RNG snapshot
(`rng_state`/`set_rng_state`), `seed_everything`, `resolve_device`, Ctrl-C / SIGTERM
(`StopSignals`), `parse_args` with its record of typed flags, `resume_args`, `cli`,
`UserInputError` and `TrainingError`.

What differs: a task has no corpus, epochs or BPTT windows, so `training.add_common_args`
(with --data, --epochs, --bptt, --eval_batch_size, --save-interval) is not used; `add_task_args`
defines the task loop's flags with the same spellings where they mean the same thing.
Each iteration draws a fresh batch from a `torch.Generator` seeded by --seed, whose state the
checkpoint keeps, so `--resume` continues bitwise on CPU. The test set is drawn once from
--test-seed. Every --check-freq iterations the loop evaluates on it, steps the plateau
schedule (`ReduceLROnPlateau` on the test loss, factor --lr-decay, --patience evaluations; the
RMC paper uses a constant Adam rate, so this only acts on a long plateau, and --lr-decay 1 turns
it off), and writes `checkpoint.pt` (resumable) and `best.pt` (best test accuracy).

Models: `models.TaskModel` = registered core (time-major) -> the last step's output -> MLP ->
logits; its checkpoints load with `training.load_checkpoint`.

A task is any object with `input_size`, `output_size`, `sample(batch_size, generator) -> Batch`,
`loss(logits, batch) -> scalar` and `accuracy(logits, batch) -> float` (see tasks/nth_farthest.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn
from tqdm import tqdm

import training
from errors import UserInputError
from models.core import CORES, get_core_class
from models.task_model import TaskModel, TaskModelConfig
from training import Run, StopSignals, public_args

# On --resume these keep the checkpoint's values unless typed again (training.resume_args handles the rest).
TASK_RESUME_OVERRIDABLE = {"iterations", "log_interval", "check_freq", "max_nonfinite"}


class Task(Protocol):
    input_size: int
    output_size: int

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Any: ...
    def loss(self, logits: torch.Tensor, batch: Any) -> torch.Tensor: ...
    def accuracy(self, logits: torch.Tensor, batch: Any) -> float: ...


# --------------------------------------------------------------------------- the model


def task_model_config_from_args(args: argparse.Namespace, task: Task) -> TaskModelConfig:
    """--model, the core's flags and --mlp-sizes; raises ValueError on an unknown core or bad size."""
    core_class = get_core_class(args.model)
    core_config = core_class.config_from_args(args, task.input_size)
    return TaskModelConfig(core=core_class.name, core_config=dataclasses.asdict(core_config),
                           input_size=task.input_size, output_size=task.output_size, mlp_sizes=list(args.mlp_sizes))


# --------------------------------------------------------------------------- flags


def add_task_args(parser: argparse.ArgumentParser) -> None:
    """The task loop's flags; scripts set their paper's defaults with `set_defaults`."""
    group = parser.add_argument_group("run")
    training.add_run_args(group, dry_run_help="smoke test: two iterations and a test set of at most two batches")
    group.add_argument("--test-seed", "--test_seed", dest="test_seed", type=int, default=2**31 - 1,
                       help="seed of the fixed test set (must differ from --seed)")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--iterations", type=int, default=100000, help="training iterations (one fresh batch each)")
    group.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None,
                       help="stop after this many iterations in all, saving a resumable checkpoint")
    group.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=64, help="batch size")
    group.add_argument("--test-size", "--test_size", dest="test_size", type=int, default=3200,
                       help="examples in the fixed test set")
    training.add_update_args(group, optimizers=("adam", "rmsprop", "sgd"),
                             evaluation="evaluations without test-loss improvement")
    parser.set_defaults(optimizer="adam", lr=1e-4, clip=0.0, patience=20)
    group = parser.add_argument_group("logging")
    group.add_argument("--log-interval", "--log_interval", dest="log_interval", type=int, default=100,
                       help="iterations between training log lines")
    group.add_argument("--check-freq", "--check_freq", dest="check_freq", type=int, default=500,
                       help="iterations between test-set evaluations and checkpoints")


def add_task_model_args(parser: argparse.ArgumentParser, default_mlp_sizes: list[int] | None = None) -> None:
    """--model (any registered core), --mlp-sizes, and the flags of every registered core."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="LSTM",
                       help=f"recurrent core: {', '.join(cls.name for cls in CORES.values())}")
    group.add_argument("--mlp-sizes", "--mlp_sizes", dest="mlp_sizes", type=int, nargs="*",
                       default=default_mlp_sizes or [], help="hidden layer sizes of the output MLP (ReLU between)")
    for cls in CORES.values():
        cls.add_args(parser)


def check_task_args(args: argparse.Namespace) -> None:
    """Reject flag values the loop cannot use, naming the flag."""
    for name in ("iterations", "batch_size", "test_size", "log_interval", "check_freq", "max_nonfinite"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("clip", "wdecay", "patience"):
        if getattr(args, name) < 0:
            raise UserInputError(f"--{name} must be at least 0, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 0:
        raise UserInputError(f"--max-steps must be at least 0, got {args.max_steps}")
    if not args.lr > 0:
        raise UserInputError(f"--lr must be above 0, got {args.lr}")
    if not 0 < args.lr_decay <= 1:
        raise UserInputError(f"--lr-decay must be in (0, 1] (1 turns the plateau schedule off), got {args.lr_decay}")
    if args.test_seed == args.seed:
        raise UserInputError(f"--test-seed equals --seed ({args.seed}), so the test set would repeat training "
                             f"examples; choose another --test-seed")


def task_resume_args(args: argparse.Namespace, checkpoint: dict) -> argparse.Namespace:
    """`training.resume_args`, letting the task loop's own run-control flags be typed again."""
    typed = [name for name in args._explicit if name in TASK_RESUME_OVERRIDABLE]
    probe = argparse.Namespace(**vars(args))
    probe._explicit = [name for name in args._explicit if name not in TASK_RESUME_OVERRIDABLE]
    merged = training.resume_args(probe, checkpoint)
    for name in typed:
        setattr(merged, name, getattr(args, name))
    return merged


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TaskTrainState:
    """Loop bookkeeping; with weights, optimiser, schedule, generator and RNG states it resumes a run."""

    step: int = 0  # iterations done in all (skipped ones included)
    best_accuracy: float = -1.0
    best_step: int = 0
    nonfinite_streak: int = 0
    skipped_steps: int = 0
    interval_loss: float = 0.0  # training losses since the last log line, so a resumed run logs the same
    interval_count: int = 0
    log_bytes: int = 0  # size of log.jsonl when the checkpoint was written


class TaskTrainer:
    """Trains a model on freshly generated batches of a task, evaluating on a fixed test set."""

    def __init__(self, model: nn.Module, task: Task, args: argparse.Namespace, device: torch.device, run: Run):
        self.model, self.task, self.args, self.device, self.run = model, task, args, device, run
        self.optimizer = self.make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=args.lr_decay, patience=args.patience
        ) if args.lr_decay < 1 else None
        self.state = TaskTrainState()
        self.generator = torch.Generator().manual_seed(args.seed)
        test_size = min(args.test_size, 2 * args.batch_size) if args.dry_run else args.test_size
        test_generator = torch.Generator().manual_seed(args.test_seed)
        self.test_batches = [task.sample(min(args.batch_size, test_size - start), test_generator)
                             for start in range(0, test_size, args.batch_size)]

    def make_optimizer(self) -> torch.optim.Optimizer:
        params, args = self.model.parameters(), self.args
        if args.optimizer == "adam":
            return torch.optim.Adam(params, lr=args.lr, weight_decay=args.wdecay)
        if args.optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=args.lr, weight_decay=args.wdecay)
        return torch.optim.SGD(params, lr=args.lr, weight_decay=args.wdecay)

    # ---- checkpoints

    def save(self, name: str = "checkpoint.pt") -> Path:
        self.state.log_bytes = self.run.log_size()
        path = self.run.path / name
        training.save_checkpoint(
            path, self.model,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            args=public_args(self.args),
            train_state=dataclasses.asdict(self.state),
            generator=self.generator.get_state(),
            rng=training.rng_state(),
        )
        return path

    def restore(self, checkpoint: dict) -> None:
        """Continue from a checkpoint written by `save` (weights already loaded into the model)."""
        self.state = TaskTrainState(**checkpoint["train_state"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None and checkpoint["scheduler"] is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.generator.set_state(checkpoint["generator"])
        training.set_rng_state(checkpoint["rng"])
        self.run.truncate_log(self.state.log_bytes)

    # ---- steps and evaluation

    def compute_loss(self, batch: Any) -> torch.Tensor:
        return self.task.loss(self.model(batch.inputs.to(self.device)), to_device(batch, self.device))

    def train_step(self) -> float | None:
        """One optimiser step on a fresh batch; returns its loss, or None when skipped as non-finite."""
        batch = self.task.sample(self.args.batch_size, self.generator)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.compute_loss(batch)
        if training.finite_step(self.model, self.optimizer, loss, self.args.clip):
            self.state.nonfinite_streak = 0
            return loss.item()
        training.skip_nonfinite(self.run, self.state, self.args.max_nonfinite, "step skipped")
        return None

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) over the fixed test set, weighting each batch by its size."""
        model = model or self.model
        model.eval()
        total_loss, total_correct, count = 0.0, 0.0, 0
        for batch in self.test_batches:
            batch = to_device(batch, self.device)
            logits = model(batch.inputs)
            size = logits.size(0)
            total_loss += self.task.loss(logits, batch).item() * size
            total_correct += self.task.accuracy(logits, batch) * size
            count += size
        return total_loss / count, total_correct / count

    def check(self) -> None:
        """Evaluate on the test set, keep the best model, step the schedule, write checkpoint.pt."""
        state = self.state
        started = time.perf_counter()
        test_loss, test_accuracy = self.evaluate()
        improved = test_accuracy > state.best_accuracy
        if improved:
            state.best_accuracy, state.best_step = test_accuracy, state.step
        lr = self.optimizer.param_groups[0]["lr"]
        self.run.print(f"| step {state.step:7d} | test loss {test_loss:6.4f} | test accuracy {test_accuracy:6.4f}"
                       f" | lr {lr:.3g}{' | best' if improved else ''}")
        self.run.log("test", step=state.step, loss=test_loss, accuracy=test_accuracy, lr=lr,
                     seconds=time.perf_counter() - started)
        if self.scheduler is not None and math.isfinite(test_loss):
            self.scheduler.step(test_loss)
        if improved:
            self.save("best.pt")
        self.save()

    def log_train(self, elapsed: float) -> None:
        state = self.state
        loss = state.interval_loss / state.interval_count
        lr = self.optimizer.param_groups[0]["lr"]
        ms_per_step = 1000 * elapsed / state.interval_count
        self.run.print(f"| step {state.step:7d} | lr {lr:.3g} | ms/step {ms_per_step:7.1f} | loss {loss:6.4f}")
        self.run.log("train", step=state.step, lr=lr, loss=loss, ms_per_step=ms_per_step)
        state.interval_loss, state.interval_count = 0.0, 0

    def fit(self) -> dict:
        """Train until --iterations (or two with --dry-run), a stop signal or --max-steps."""
        args, state = self.args, self.state
        last_step = min(args.iterations, state.step + 2) if args.dry_run else args.iterations
        stop_reason = None
        started = time.perf_counter()
        bar = tqdm(total=last_step, initial=state.step, desc="training", disable=None, leave=False, dynamic_ncols=True)
        self.run.bar = None if bar.disable else bar
        try:
            with StopSignals() as signals:
                while state.step < last_step:
                    if signals.reason is not None:
                        stop_reason = signals.reason
                        break
                    if args.max_steps is not None and state.step >= args.max_steps:
                        stop_reason = "max-steps"
                        break
                    loss = self.train_step()
                    state.step += 1
                    bar.update(1)
                    if loss is not None:
                        state.interval_loss += loss
                        state.interval_count += 1
                        bar.set_postfix(loss=f"{loss:.3f}")
                    if state.interval_count and state.step % args.log_interval == 0:
                        self.log_train(time.perf_counter() - started)
                        started = time.perf_counter()
                    if state.step % args.check_freq == 0 or state.step == last_step:
                        self.check()
        finally:
            bar.close()
            self.run.bar = None
        if stop_reason is not None:
            path = self.save()
            self.run.print(f"| stopped ({stop_reason}) at step {state.step}: saved resumable checkpoint {path}; "
                           f"continue with --resume {self.run.path}")
        return {"stopped": stop_reason, "step": state.step, "best_accuracy": state.best_accuracy,
                "best_step": state.best_step}


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor field of a batch (a NamedTuple) to `device`."""
    return type(batch)(*(field.to(device) if isinstance(field, torch.Tensor) else field for field in batch))


# --------------------------------------------------------------------------- entry point for task scripts


def run_task(args: argparse.Namespace, script: str, make_task: Callable[[argparse.Namespace], Task]) -> dict:
    """Build task, model and trainer from flags (or from `--resume`'s checkpoint) and train.

    Args:
        args: parsed flags (`training.parse_args`).
        script: the script's name, for the run folder and logs.
        make_task: builds the task from the flags; a ValueError becomes a UserInputError.

    Returns:
        {"run_dir", "stopped", "step", "best_accuracy", "best_step", "test_loss", "test_accuracy"},
        the last two from the current model at the end (left out after SIGTERM).
    """
    checkpoint = training.read_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:
        if checkpoint.get("kind") != "TaskModel":
            raise UserInputError(f"{checkpoint['path']} holds a {checkpoint.get('kind')}, not a task model")
        args = task_resume_args(args, checkpoint)
    check_task_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = training.resolve_device(args)
    training.seed_everything(args.seed)
    try:
        task = make_task(args)
        config = task_model_config_from_args(args, task) if checkpoint is None else None
    except ValueError as error:
        raise UserInputError(str(error)) from None
    if checkpoint is not None:
        model, _ = training.load_checkpoint(checkpoint["path"], device, kind="TaskModel")
        run = Run(Path(checkpoint["path"]).parent)
    else:
        try:
            model = TaskModel(config).to(device)
        except ValueError as error:
            raise UserInputError(str(error)) from None
        run = Run.create(args, script)
    trainer = TaskTrainer(model, task, args, device, run)
    if checkpoint is not None:
        trainer.restore(checkpoint)
        run.log("resume", step=trainer.state.step)
        run.print(f"| resumed {checkpoint['path']} at step {trainer.state.step}")
    parameters = sum(p.numel() for p in model.parameters())
    run.print(f"| {script}: {model.config.core} task model, {parameters:,} parameters, device {device}, "
              f"run folder {run.path}")
    result = {"run_dir": str(run.path), **trainer.fit()}
    if result["stopped"] == "terminate":  # leave at once; the checkpoint is saved
        return result
    test_loss, test_accuracy = trainer.evaluate()
    return {**result, "test_loss": test_loss, "test_accuracy": test_accuracy}
