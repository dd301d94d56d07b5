"""The training loop for generated algorithmic tasks: N-th farthest, and the DNC tasks (copy, adding, argmax).

What it shares with the language-model loop in `training.py`, and reuses from it: run folders
(`Run`: args.json with the git commit, log.jsonl, printing beside a tqdm bar), atomic
checkpoints (`save_checkpoint`, `read_checkpoint`), the global RNG snapshot
(`rng_state`/`set_rng_state`), `seed_everything`, `resolve_device`, Ctrl-C / SIGTERM
(`StopSignals`), `parse_args` with its record of typed flags, `resume_args`, `cli`,
non-finite steps (`finite_step`, `skip_nonfinite`), `UserInputError` and `TrainingError`.

What differs: a task has no corpus, epochs or BPTT windows, so `training.add_common_args`
(with --data, --epochs, --bptt, --eval_batch_size, --save-interval) is not used; `add_task_args`
defines the task loop's flags with the same spellings where they mean the same thing.
Each iteration draws a fresh batch from a `torch.Generator` seeded by --seed, whose state the
checkpoint keeps, so `--resume` continues bitwise on CPU. The test set is drawn once from
--test-seed. Every --check-freq iterations the loop evaluates on it, steps the plateau
schedule (`ReduceLROnPlateau` on the test loss, factor --lr-decay, --patience evaluations; the
RMC paper uses a constant Adam rate, so this only acts on a long plateau, and --lr-decay 1 turns
it off), and writes `checkpoint.pt` (resumable) and `best.pt` (best test result).

Two kinds of task share that loop:

- `Task` (N-th farthest, `TaskTrainer`, `run_task`): `sample(batch_size, generator)`, one answer
  per example read from the core's last step by `models.TaskModel`, `loss` and `accuracy`.
- `SequenceTask` (copy, adding, argmax: `SequenceTaskTrainer`, `run_sequence_task`):
  `sample(batch_size, length, generator)` with a length per batch drawn from the curriculum
  (tasks/curriculum.py, saved in checkpoints), outputs at every step from `models.SequenceModel`,
  a masked `loss` and `metrics` over the answer steps only, a headline metric. The fixed test set
  spreads its lengths evenly up to the curriculum's current maximum; at the end the model is
  measured on longer sequences (--generalisation-lengths: the generalisation curve, printed and
  logged as `generalisation` events). Every -summarize_freq iterations (= --log-interval) a
  memory core's state on batch element 0 is drawn as heatmaps into `pictures/step-NNNNNNN.png`
  (with the arrays as .npz) and, with -visdom, into a running Visdom server with the loss curve
  (models/dnc/visualize.py). Their scripts take the published pytorch-dnc flags
  (`sequence_task_parser`).

Under torchrun (see `distributed.py`) every process runs this loop on its share of each
batch: --batch_size B is the batch of all processes together, each of the N processes draws
its B/N examples from a generator of its own (seeded --seed + rank: rank 0 continues the
single-process stream), and DDP averages the gradients, so an iteration is one process's
iteration on the ranks' shares put together. A sequence task's batch keeps one length: every
rank takes rank 0's draw. The fixed test sets are drawn whole on every rank and their batches
dealt out over the ranks (`distributed.map_shared`), so evaluation is bitwise one process's.
Stops, skips, the schedule and the curriculum act alike on every rank; only rank 0 prints,
draws bars and pictures, talks to Visdom and writes files, and checkpoints hold every rank's
generator and RNG states, so --resume with the same number of processes continues bitwise on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn
from tqdm import tqdm

import distributed
import training
from errors import UserInputError
from models.core import CORES, get_core_class
from models.task_model import SequenceModel, TaskModel, TaskModelConfig
from tasks.curriculum import Curriculum, spread_lengths
from training import Run, StopSignals, public_args

TASK_MODELS = {"TaskModel": TaskModel, "SequenceModel": SequenceModel}  # by the kind their checkpoints name

# On --resume these keep the checkpoint's values unless typed again (training.resume_args handles the rest).
TASK_RESUME_OVERRIDABLE = {"iterations", "log_interval", "check_freq", "max_nonfinite",
                           "visdom", "visdom_server", "visdom_port", "visdom_env"}


class Task(Protocol):
    input_size: int
    output_size: int

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Any: ...
    def loss(self, logits: torch.Tensor, batch: Any) -> torch.Tensor: ...
    def accuracy(self, logits: torch.Tensor, batch: Any) -> float: ...


class SequenceTask(Protocol):
    input_size: int
    output_size: int
    min_length: int  # the shortest sequence the task has
    max_length: int | None  # the longest it can answer (argmax: its positions); None: any
    metric: str  # the headline metric, a key of `metrics`
    higher_is_better: bool

    def sample(self, batch_size: int, length: int | torch.Tensor, generator: torch.Generator | None = None) -> Any: ...
    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor: ...
    def metrics(self, outputs: torch.Tensor, batch: Any) -> dict[str, float]: ...
    def to_human_readable(self, batch: Any, outputs: torch.Tensor | None = None, index: int = 0) -> str: ...


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
    if args.seed <= args.test_seed < args.seed + distributed.world_size():
        rank = args.test_seed - args.seed
        which = "--seed" if rank == 0 else f"process {rank}'s seed (--seed + rank)"
        raise UserInputError(f"--test-seed equals {which} ({args.test_seed}), so the test set would repeat training "
                             f"examples; choose another --test-seed")
    distributed.share(args.batch_size, "--batch_size")


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
    """Trains a model on freshly generated batches of a task, evaluating on a fixed test set.

    Under torchrun each rank trains on its own `batch_size` examples (its share of --batch_size)
    through `loss_step`, the DDP-wrapped `compute_loss`; evaluation and checkpoints cover all ranks.
    """

    def __init__(self, model: nn.Module, task: Task, args: argparse.Namespace, device: torch.device, run: Run):
        self.model, self.task, self.args, self.device, self.run = model, task, args, device, run
        self.optimizer = self.make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=args.lr_decay, patience=args.patience
        ) if args.lr_decay < 1 else None
        self.state = TaskTrainState()
        self.batch_size = distributed.share(args.batch_size, "--batch_size")  # this rank's examples
        self.generator = torch.Generator().manual_seed(distributed.rank_seed(args.seed))  # this rank's examples
        self.loss_step = distributed.wrap(model, lambda batch: self.compute_loss(batch))
        self.test_size = min(args.test_size, 2 * args.batch_size) if args.dry_run else args.test_size

    @functools.cached_property
    def test_batches(self) -> list[Any]:
        """The fixed test set, drawn from --test-seed on first use."""
        test_generator = torch.Generator().manual_seed(self.args.test_seed)
        return [self.task.sample(min(self.args.batch_size, self.test_size - start), test_generator)
                for start in range(0, self.test_size, self.args.batch_size)]

    def make_optimizer(self) -> torch.optim.Optimizer:
        params, args = self.model.parameters(), self.args
        if args.optimizer == "adam":
            return torch.optim.Adam(params, lr=args.lr, weight_decay=args.wdecay)
        if args.optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=args.lr, weight_decay=args.wdecay)
        return torch.optim.SGD(params, lr=args.lr, weight_decay=args.wdecay)

    # ---- checkpoints

    def checkpoint_contents(self) -> dict:
        """What `restore` needs; under torchrun every rank must call it (it gathers from all of them).

        `generator` and `rng` are rank 0's states, as one process would save them;
        `rank_generators` and `rank_rngs` add every rank's under torchrun.
        """
        generators = distributed.gather_objects(self.generator.get_state())
        rngs = distributed.gather_objects(training.rng_state())
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "args": public_args(self.args),
            "train_state": dataclasses.asdict(self.state),
            "generator": generators[0],
            "rng": rngs[0],
            **({"rank_generators": generators, "rank_rngs": rngs} if len(generators) > 1 else {}),
        }

    def save(self, name: str = "checkpoint.pt") -> Path:
        """Write `name` in the run folder (atomically). Every rank calls it; rank 0 writes."""
        self.state.log_bytes = self.run.log_size()
        path = self.run.path / name
        contents = self.checkpoint_contents()
        if distributed.is_main():
            training.save_checkpoint(path, self.model, **contents)
        return path

    def restore(self, checkpoint: dict) -> None:
        """Continue from a checkpoint written by `save` (weights already loaded into the model).

        With the number of processes that wrote it, each rank continues its own streams (bitwise
        on CPU). With another number, rank 0 continues the saved streams and the other ranks start
        their own from --seed, their rank and the step reached, so they repeat no earlier examples.
        """
        self.state = type(self.state)(**checkpoint["train_state"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None and checkpoint["scheduler"] is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        generators = checkpoint.get("rank_generators", [checkpoint["generator"]])
        rngs = checkpoint.get("rank_rngs", [checkpoint["rng"]])
        saved = distributed.rank() if len(generators) == distributed.world_size() else 0
        self.generator.set_state(generators[saved])
        training.set_rng_state(rngs[saved])
        if saved != distributed.rank():  # another number of processes: a stream of this rank's own
            self.generator.manual_seed(distributed.rank_seed(self.args.seed) + self.state.step * 2**20)
            training.seed_rank(self.args.seed)
        self.run.truncate_log(self.state.log_bytes)

    # ---- steps and evaluation

    def compute_loss(self, batch: Any) -> torch.Tensor:
        return self.task.loss(self.model(batch.inputs.to(self.device)), to_device(batch, self.device))

    def next_batch(self) -> Any:
        """This rank's share of a fresh training batch, from this rank's generator."""
        return self.task.sample(self.batch_size, self.generator)

    def train_step(self) -> float | None:
        """One optimiser step on a fresh batch; returns its loss (over all ranks), or None when skipped
        as non-finite (on any rank: then on all)."""
        batch = self.next_batch()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_step(batch)
        if training.finite_step(self.model, self.optimizer, loss, self.args.clip):
            self.state.nonfinite_streak = 0
            # the ranks' shares are equal, so the mean of their losses is the whole batch's loss
            return distributed.all_reduce_sum(loss.item())[0] / distributed.world_size()
        training.skip_nonfinite(self.run, self.state, self.args.max_nonfinite, "step skipped")
        return None

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
            logits = model(batch.inputs)
            return logits.size(0), self.task.loss(logits, batch).item(), self.task.accuracy(logits, batch)

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

    def log_train(self, elapsed: float) -> float:
        """Print and log the mean training loss since the last log line; returns it."""
        state = self.state
        loss = state.interval_loss / state.interval_count
        lr = self.optimizer.param_groups[0]["lr"]
        ms_per_step = 1000 * elapsed / state.interval_count
        self.run.print(f"| step {state.step:7d} | lr {lr:.3g} | ms/step {ms_per_step:7.1f} | loss {loss:6.4f}")
        self.run.log("train", step=state.step, lr=lr, loss=loss, ms_per_step=ms_per_step)
        state.interval_loss, state.interval_count = 0.0, 0
        return loss

    def best(self) -> dict:
        """The best test result so far, for the loop's summary."""
        return {"best_accuracy": self.state.best_accuracy, "best_step": self.state.best_step}

    def fit(self) -> dict:
        """Train until --iterations (or two with --dry-run), a stop signal or --max-steps."""
        args, state = self.args, self.state
        last_step = min(args.iterations, state.step + 2) if args.dry_run else args.iterations
        stop_reason = None
        started = time.perf_counter()
        bar = tqdm(total=last_step, initial=state.step, desc="training", disable=None if self.run.main else True,
                   leave=False, dynamic_ncols=True)
        self.run.bar = None if bar.disable else bar
        try:
            with StopSignals() as signals:
                while state.step < last_step:
                    requests = training.STOP_REQUESTS
                    reason = requests[distributed.max_over_ranks(requests.index(signals.reason))]
                    if reason is not None:  # a request on any rank stops all of them before this iteration
                        stop_reason = reason
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
        return {"stopped": stop_reason, "step": state.step, **self.best()}


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor field of a batch (a NamedTuple) to `device`."""
    return type(batch)(*(field.to(device) if isinstance(field, torch.Tensor) else field for field in batch))


# --------------------------------------------------------------------------- sequence tasks (copy, adding, argmax)


@dataclasses.dataclass
class SequenceTrainState:
    """Loop bookkeeping of a sequence task; with weights, optimiser, schedule, generator, RNG and
    curriculum states it resumes a run."""

    step: int = 0  # iterations done in all (skipped ones included)
    best_metric: float | None = None  # the task's headline metric on the test set, at best_max_length
    best_max_length: int = 0  # a model that trained to a longer curriculum length counts as better
    best_step: int = 0
    nonfinite_streak: int = 0
    skipped_steps: int = 0
    interval_loss: float = 0.0
    interval_count: int = 0
    log_bytes: int = 0


class SequenceTaskTrainer(TaskTrainer):
    """The task loop for sequence tasks: curriculum lengths, per-step outputs, metrics, memory pictures.

    Args:
        model: a `SequenceModel`.
        task: a `SequenceTask`.
        curriculum: the length curriculum (its state is saved in checkpoints).
        board: a connected `visualize.VisdomBoard` (-visdom), or None.
    """

    def __init__(self, model: nn.Module, task: SequenceTask, args: argparse.Namespace, device: torch.device,
                 run: Run, curriculum: Curriculum, board: Any = None):
        super().__init__(model, task, args, device, run)
        self.state = SequenceTrainState()
        self.curriculum, self.board = curriculum, board
        self.last_batch: Any = None
        self.test_sets: dict[int, list[Any]] = {}

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The published DNC scripts' optimiser settings."""
        params, args = self.model.parameters(), self.args
        if args.optimizer == "adam":
            return torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=args.wdecay)
        if args.optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=args.lr, momentum=0.9, eps=1e-10, weight_decay=args.wdecay)
        return torch.optim.SGD(params, lr=args.lr, weight_decay=args.wdecay)

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
        generator = torch.Generator().manual_seed(self.args.test_seed)
        return [self.task.sample(len(chunk), chunk, generator) for chunk in lengths.split(self.args.batch_size)]

    def next_batch(self) -> Any:
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

    def restore(self, checkpoint: dict) -> None:
        super().restore(checkpoint)
        self.curriculum.load_state_dict(checkpoint["curriculum"])

    # ---- evaluation

    @torch.no_grad()
    def evaluate_metrics(self, batches: list[Any]) -> dict[str, float]:
        """The task's metrics over `batches`, each batch weighted by its size (under torchrun the
        batches are dealt out over the ranks, with bitwise the single-process result on every rank)."""
        self.model.eval()

        def measure(batch: Any) -> tuple[int, dict[str, float]]:
            batch = to_device(batch, self.device)
            return batch.inputs.size(1), self.task.metrics(self.model(batch.inputs), batch)

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
        improved = improved and math.isfinite(value)
        if improved:
            state.best_metric, state.best_max_length, state.best_step = value, longest, state.step
        lr = self.optimizer.param_groups[0]["lr"]
        self.run.print(f"| step {state.step:7d} | max length {longest:4d} | test {self.describe(metrics)} | lr {lr:.3g}"
                       f"{' | best' if improved else ''}")
        self.run.log("test", step=state.step, max_length=longest, lr=lr, seconds=time.perf_counter() - started,
                     **metrics)
        if self.scheduler is not None and math.isfinite(metrics["loss"]):
            self.scheduler.step(metrics["loss"])
        if improved:
            self.save("best.pt")
        self.save()

    def best(self) -> dict:
        return {"metric": self.task.metric, "best_metric": self.state.best_metric,
                "best_max_length": self.state.best_max_length, "best_step": self.state.best_step}

    def generalisation(self) -> dict[int, dict[str, float]]:
        """The metrics at each --generalisation-lengths length (the two shortest with --dry-run): printed,
        logged, returned."""
        lengths = sorted(self.args.generalisation_lengths)
        results = {}
        for length in lengths[:2] if self.args.dry_run else lengths:
            results[length] = metrics = self.evaluate_metrics(self.generalisation_batches(length))
            self.run.print(f"| generalisation | length {length:5d} | {self.describe(metrics)}")
            self.run.log("generalisation", step=self.state.step, length=length, **metrics)
        return results

    # ---- pictures

    def log_train(self, elapsed: float) -> float:
        """The training log line, then the summary: loss curve and memory pictures (every -summarize_freq)."""
        loss = super().log_train(elapsed)
        self.summarize(loss)
        return loss

    def summarize(self, loss: float) -> None:
        """Draw the memory of the latest batch's element 0 into pictures/ and, with -visdom, Visdom (rank 0)."""
        if not self.run.main:
            return
        from models.dnc import visualize  # matplotlib is imported only when a picture is drawn

        step = self.state.step
        maps: dict[str, visualize.Heatmap] = {}
        if self.model.has_memory_view and self.last_batch is not None:
            self.model.eval()
            with torch.no_grad():
                _, debug = self.model.debug_forward(self.last_batch.inputs[:, :1].to(self.device))
            maps = visualize.heatmaps(debug)
        if maps:
            visualize.save_png(maps, self.run.path / "pictures" / f"step-{step:07d}.png",
                               title=f"{self.model.config.core} memory, batch element 0 (step {step}, "
                                     f"length {int(self.last_batch.lengths[0])}, loss {loss:.4f})")
        if self.board is not None:
            try:
                self.board.loss(step, loss)
                self.board.heatmaps(maps, f"@ {step}")
            except OSError as error:  # the viewer going away must not end the training run
                self.run.print(f"| visdom: lost the server ({error}); pictures still go to {self.run.path / 'pictures'}")
                self.board = None


def add_alias(parser: argparse.ArgumentParser, flag: str, *aliases: str) -> None:
    """Let `aliases` (e.g. the published single-dash spellings) name the same option as `flag`."""
    action = parser._option_string_actions[flag]
    for alias in aliases:
        if alias not in parser._option_string_actions:
            action.option_strings.append(alias)
            parser._option_string_actions[alias] = action


MEMORY_CORES = {"dnc": "DNC", "sam": "SAM", "sdnc": "SDNC"}
GENERALISATION_FACTORS = (1, 2, 5, 10)
# The published spellings of flags this repository already has (pytorch-dnc's tasks/*.py).
PUBLISHED_ALIASES = {
    "--lr": ["-lr"], "--optimizer": ["-optim", "--optim"], "--clip": ["-clip"], "--batch_size": ["-batch_size"],
    "--iterations": ["-iterations"], "--check-freq": ["-check_freq"],
    "--log-interval": ["-summarize_freq", "--summarize_freq", "--summarize-freq"],
    "--nhid": ["-nhid"], "--dropouth": ["-dropout", "--dropout"],
}
# The published copy_task.py's defaults; adding_task.py and argmax_task.py change a few.
PUBLISHED_DEFAULTS = dict(
    model=None, input_size=6, nhid=64, dropouth=0.0, rnn_type="lstm", nlayer=1, nhlayer=2, mem_slot=16, mem_size=20,
    read_heads=4, sparse_reads=10, temporal_reads=2, optimizer="adam", lr=1e-4, clip=50.0, batch_size=100,
    sequence_max_length=4, curriculum_increment=0, curriculum_freq=1000, iterations=100000, log_interval=100,
    check_freq=100, test_size=1000, lr_decay=1.0,
)


def sequence_task_parser(description: str | None) -> argparse.ArgumentParser:
    """Every flag of copy_task.py, adding_task.py and argmax_task.py, with the published copy task's defaults.

    The published single-dash spellings (`-lr -optim -batch_size -nhid -dropout -iterations
    -summarize_freq -check_freq -cuda -memory_type -sequence_max_length ...`) work beside the
    double-dash ones; the memory cores add theirs (`-rnn_type -nlayer -nhlayer -mem_slot -mem_size
    -read_heads -sparse_reads -temporal_reads`).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(parser)
    add_task_model_args(parser)
    group = parser.add_argument_group("DNC task", "published pytorch-dnc flags (single or double dash)")
    group.add_argument("-memory_type", "--memory_type", "--memory-type", dest="memory_type", default="dnc",
                       choices=sorted(MEMORY_CORES), help="memory: picks --model DNC, SAM or SDNC unless --model is given")
    group.add_argument("-input_size", "--input_size", "--input-size", dest="input_size", type=int,
                       help="input channels of the task (see the script)")
    group.add_argument("-sequence_max_length", "--sequence_max_length", "--sequence-max-length",
                       dest="sequence_max_length", type=int,
                       help="longest training sequence at the start (lengths are drawn uniformly up to it)")
    group.add_argument("-curriculum_increment", "--curriculum_increment", "--curriculum-increment",
                       dest="curriculum_increment", type=int,
                       help="added to the longest training length every -curriculum_freq iterations")
    group.add_argument("-curriculum_freq", "--curriculum_freq", "--curriculum-freq", dest="curriculum_freq", type=int,
                       help="iterations between curriculum increments")
    group.add_argument("--generalisation-lengths", "--generalization-lengths", "--generalisation_lengths",
                       dest="generalisation_lengths", type=int, nargs="+", default=None,
                       help="lengths measured at the end (default: 1, 2, 5 and 10 times the longest training "
                            "length the curriculum reaches in --iterations)")
    # The published -cuda takes a GPU id; it replaces the run flags' plain --cuda switch.
    cuda = parser.add_argument_group("device", conflict_handler="resolve")
    cuda.add_argument("-cuda", "--cuda", dest="cuda", type=int, nargs="?", const=0, default=None, metavar="GPU",
                      help="GPU id as published (-1: CPU; a bare --cuda: GPU 0); default: --device")
    group = parser.add_argument_group("pictures", "memory heatmaps every -summarize_freq iterations: always PNG "
                                      "files in the run folder's pictures/, with -visdom also a Visdom server")
    group.add_argument("-visdom", "--visdom", dest="visdom", action="store_true",
                       help="draw the heatmaps and the loss curve in a running Visdom server")
    group.add_argument("--visdom-server", "--visdom_server", dest="visdom_server", default="localhost",
                       help="the Visdom server's address")
    group.add_argument("--visdom-port", "--visdom_port", dest="visdom_port", type=int, default=8097,
                       help="the Visdom server's port")
    group.add_argument("--visdom-env", "--visdom_env", dest="visdom_env", default=None,
                       help="the Visdom environment (default: the script's name)")
    for flag, aliases in PUBLISHED_ALIASES.items():
        add_alias(parser, flag, *aliases)
    parser.set_defaults(**PUBLISHED_DEFAULTS)
    return parser


def parse_sequence_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`training.parse_args`, then -cuda as a device and -memory_type as --model unless --model was typed."""
    args = training.parse_args(parser, argv)
    if args.cuda is not None:
        args.device = "cpu" if args.cuda < 0 else f"cuda:{args.cuda}"
    args.cuda = False
    if args.model is None:
        args.model = MEMORY_CORES[args.memory_type]
    return args


def check_sequence_args(args: argparse.Namespace) -> None:
    """Reject flag values the sequence loop cannot use, naming the flag (the curriculum checks its own)."""
    for name in ("sequence_max_length", "curriculum_freq"):
        if getattr(args, name) < 1:
            raise UserInputError(f"-{name} must be positive, got {getattr(args, name)}")
    if args.curriculum_increment < 0:
        raise UserInputError(f"-curriculum_increment must be at least 0, got {args.curriculum_increment}")
    if args.generalisation_lengths is not None and min(args.generalisation_lengths) < 1:
        raise UserInputError(f"--generalisation-lengths must be positive, got {args.generalisation_lengths}")
    if not 0 < args.visdom_port < 65536:
        raise UserInputError(f"--visdom-port must be a port number (1-65535), got {args.visdom_port}")


def default_generalisation_lengths(args: argparse.Namespace) -> list[int]:
    """1, 2, 5 and 10 times the longest training length the curriculum reaches in --iterations."""
    reached = args.sequence_max_length + args.curriculum_increment * (args.iterations // args.curriculum_freq)
    return sorted({reached * factor for factor in GENERALISATION_FACTORS})


def connect_board(args: argparse.Namespace, script: str) -> Any:
    """A `VisdomBoard` for -visdom; no package or no server is a one-line UserInputError."""
    from models.dnc import visualize

    try:
        return visualize.VisdomBoard(args.visdom_server, args.visdom_port, args.visdom_env or script)
    except visualize.VisdomUnavailable as error:
        raise UserInputError(str(error)) from None


# --------------------------------------------------------------------------- entry points for task scripts


def resume_or_start(args: argparse.Namespace, kind: str) -> tuple[argparse.Namespace, dict | None]:
    """(args, checkpoint): with --resume, the checkpoint's flags merged with the typed ones; else (args, None)."""
    if not args.resume:
        return args, None
    checkpoint = training.read_checkpoint(args.resume)
    if checkpoint.get("kind") != kind:
        raise UserInputError(f"{checkpoint['path']} holds a {checkpoint.get('kind')}, not a {kind} "
                             f"(the model of this script)")
    return task_resume_args(args, checkpoint), checkpoint


def set_up_process(args: argparse.Namespace) -> torch.device:
    """Threads, device (under torchrun cuda:LOCAL_RANK for a CUDA request) and seeds."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.device(training.resolve_device(args))
    training.seed_everything(args.seed)
    return device


def build_task(args: argparse.Namespace, make_task: Callable[[argparse.Namespace], Any],
               checkpoint: dict | None) -> tuple[Any, TaskModelConfig | None]:
    """The task, and the model config for a new run (None when resuming); ValueError -> UserInputError."""
    try:
        task = make_task(args)
        return task, (task_model_config_from_args(args, task) if checkpoint is None else None)
    except ValueError as error:
        raise UserInputError(str(error)) from None


def open_run(args: argparse.Namespace, script: str, kind: str, config: TaskModelConfig | None,
             checkpoint: dict | None, device: torch.device) -> tuple[nn.Module, Run]:
    """The model (new from `config`, or the checkpoint's) and its run folder (new, or the checkpoint's)."""
    if checkpoint is not None:
        model, _ = training.load_checkpoint(checkpoint["path"], device, kind=kind)
        return model, Run(Path(checkpoint["path"]).parent)
    try:
        model = TASK_MODELS[kind](config).to(device)
    except ValueError as error:
        raise UserInputError(str(error)) from None
    return model, Run.create(args, script)


def start(trainer: TaskTrainer, checkpoint: dict | None, script: str) -> None:
    """Restore a resumed run and print what is being trained."""
    run, model = trainer.run, trainer.model
    processes = f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    if checkpoint is not None:
        trainer.restore(checkpoint)
        run.log("resume", step=trainer.state.step)
        run.print(f"| resumed {checkpoint['path']} at step {trainer.state.step}")
    parameters = sum(p.numel() for p in model.parameters())
    run.print(f"| {script}: {model.config.core} {type(model).__name__}, {parameters:,} parameters, "
              f"device {trainer.device}{processes}, run folder {run.path}")


def run_task(args: argparse.Namespace, script: str, make_task: Callable[[argparse.Namespace], Task]) -> dict:
    """Build task, model and trainer from flags (or from `--resume`'s checkpoint) and train.

    Args:
        args: parsed flags (`training.parse_args`).
        script: the script's name, for the run folder and logs.
        make_task: builds the task from the flags; a ValueError becomes a UserInputError.

    Returns:
        {"run_dir", "stopped", "step", "best_accuracy", "best_step", "test_loss", "test_accuracy"},
        the last two from the current model at the end (left out after SIGTERM).

    Under torchrun every process runs this (inside `distributed.session`); --resume then needs the
    checkpoint readable on every machine.
    """
    args, checkpoint = resume_or_start(args, "TaskModel")
    check_task_args(args)
    device = set_up_process(args)
    with distributed.session(device, args.dist_timeout):
        return _train_task(args, script, make_task, checkpoint, device)


def _train_task(args: argparse.Namespace, script: str, make_task: Callable[[argparse.Namespace], Task],
                checkpoint: dict | None, device: torch.device) -> dict:
    """`run_task` inside the process group (a function of its own, so the trainer is freed before the group)."""
    task, config = build_task(args, make_task, checkpoint)
    model, run = open_run(args, script, "TaskModel", config, checkpoint, device)
    training.seed_rank(args.seed)
    trainer = TaskTrainer(model, task, args, device, run)
    start(trainer, checkpoint, script)
    result = {"run_dir": str(run.path), **trainer.fit()}
    if result["stopped"] == "terminate":  # leave at once; the checkpoint is saved
        return result
    test_loss, test_accuracy = trainer.evaluate()
    return {**result, "test_loss": test_loss, "test_accuracy": test_accuracy}


def run_sequence_task(args: argparse.Namespace, script: str,
                      make_task: Callable[[argparse.Namespace], SequenceTask]) -> dict:
    """Build a sequence task, its curriculum, model and trainer from flags (or `--resume`) and train.

    Args:
        args: parsed flags (`parse_sequence_args`).
        script: the script's name, for the run folder, logs and the default Visdom environment.
        make_task: builds the task from the flags (after --generalisation-lengths is resolved);
            a ValueError becomes a UserInputError.

    Returns:
        {"run_dir", "stopped", "step", "metric", "best_metric", "best_max_length", "best_step", "test",
        "generalisation"}: `test` holds the current model's metrics on the test set at the final
        maximum length, `generalisation` {length: metrics}; both left out after SIGTERM.

    Under torchrun every process runs this (inside `distributed.session`); only rank 0 connects to Visdom.
    """
    args, checkpoint = resume_or_start(args, "SequenceModel")
    check_task_args(args)
    check_sequence_args(args)
    device = set_up_process(args)
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
    board = connect_board(args, script) if args.visdom and distributed.is_main() else None
    with distributed.session(device, args.dist_timeout):
        return _train_sequence_task(args, script, task, config, curriculum, board, checkpoint, device)


def _train_sequence_task(args: argparse.Namespace, script: str, task: SequenceTask, config: TaskModelConfig,
                         curriculum: Curriculum, board: Any, checkpoint: dict | None, device: torch.device) -> dict:
    """`run_sequence_task` inside the process group (a function of its own, so the trainer is freed
    before the group)."""
    model, run = open_run(args, script, "SequenceModel", config, checkpoint, device)
    training.seed_rank(args.seed)
    trainer = SequenceTaskTrainer(model, task, args, device, run, curriculum, board)
    start(trainer, checkpoint, script)
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
