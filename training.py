"""Everything the training scripts share.

Flags (`add_common_args`), seeding and devices, run folders with `args.json` and
`log.jsonl`, atomic checkpoints and `load_checkpoint`, token-weighted `evaluate`, and the
language-model training loop (`LMTrainer`) with truncated BPTT, gradient clipping, a
plateau schedule, non-finite-loss handling, Ctrl-C / SIGTERM / `--max-steps` stops that
save a resumable checkpoint, and `--resume` that continues a run bitwise on CPU.

A script is a parser with its paper's defaults and a call to `run_language_model`, wrapped
in `cli`, which prints a `UserInputError` or `TrainingError` as one line.

Under torchrun (see `distributed.py`) the same loop runs on every process: the batchified
corpus is split by columns, so N processes with `--batch_size` B see exactly the columns one
process with B sees, DDP averages their gradients to the same update, and evaluation sums
over the processes. Window lengths, stops, skips and optimiser switches are decided alike on
every process; only rank 0 prints, logs and writes checkpoints, which hold the whole batch's
hidden state and every process's random state.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

import distributed
import models
from data import Corpus, atomic_torch_save, batchify, get_batch
from errors import UserInputError
from models.core import detach_state, state_from_tensors, state_tensors

CHECKPOINT_FORMAT = 1
REPO_ROOT = Path(__file__).resolve().parent
# On --resume, these flags take this invocation's values, typed or default ...
PER_INVOCATION = {"resume", "max_steps", "dry_run", "device", "cuda", "threads", "dist_timeout"}
# ... these keep the checkpoint's values unless typed again; any other typed flag must match the checkpoint.
RESUME_OVERRIDABLE = {"epochs", "log_interval", "save_interval", "data", "max_nonfinite"}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. persistent non-finite losses); the message says why and what to do."""


# --------------------------------------------------------------------------- flags and set-up


def add_run_args(group: argparse._ActionsContainer, dry_run_help: str) -> None:
    """Flags of any run, language model or task: seed, device, threads, run folder, resume, dry run."""
    group.add_argument("--seed", type=int, default=1111, help="random seed")
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    group.add_argument("--cuda", action="store_true", help="use CUDA (same as --device cuda)")
    group.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    group.add_argument("--run-dir", "--run_dir", dest="run_dir", default=None,
                       help="folder for args.json, log.jsonl and checkpoints (default: runs/<name>-<time>)")
    group.add_argument("--name", default=None, help="run name used in the default run folder")
    group.add_argument("--resume", default=None, metavar="PATH",
                       help="continue from a checkpoint file or a run folder (its checkpoint.pt)")
    group.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help=dry_run_help)
    group.add_argument("--dist-timeout", "--dist_timeout", dest="dist_timeout", type=float, default=300.0,
                       help="under torchrun: seconds a process waits for the others (set-up, each exchange) "
                            "before the run fails")


def add_update_args(group: argparse._ActionsContainer, optimizers: tuple[str, ...], evaluation: str) -> None:
    """Flags of the parameter update, shared by the LM and task loops; each sets its own defaults.

    `evaluation` names what the plateau schedule counts (e.g. "epochs without validation improvement").
    """
    group.add_argument("--optimizer", choices=optimizers, help="optimiser")
    group.add_argument("--lr", type=float, help="learning rate")
    group.add_argument("--wdecay", type=float, default=0.0, help="weight decay")
    group.add_argument("--clip", type=float, help="gradient norm clipping (0: off)")
    group.add_argument("--lr-decay", "--lr_decay", dest="lr_decay", type=float, default=0.5,
                       help="factor applied to the learning rate when the evaluated loss plateaus (1: off)")
    group.add_argument("--patience", type=int, help=f"{evaluation} before the learning rate is decayed")
    group.add_argument("--max-nonfinite", "--max_nonfinite", dest="max_nonfinite", type=int, default=10,
                       help="stop after this many consecutive non-finite losses or gradients")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags every training script shares; scripts set their paper defaults with `set_defaults`."""
    group = parser.add_argument_group("data and run")
    group.add_argument("--data", default="data/penn", help="corpus folder with train.txt, valid.txt, test.txt")
    add_run_args(group, dry_run_help="smoke test: one epoch of two batches, two evaluation batches")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=40, help="number of epochs")
    group.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None,
                       help="stop after this many training batches in all, saving a resumable checkpoint")
    group.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=20, help="batch size")
    group.add_argument("--eval_batch_size", "--eval-batch-size", dest="eval_batch_size", type=int, default=10,
                       help="batch size for validation")
    group.add_argument("--test_batch_size", "--test-batch-size", dest="test_batch_size", type=int, default=None,
                       help="batch size for the test set (default: --eval_batch_size)")
    group.add_argument("--bptt", type=int, default=35, help="truncated-BPTT window length")
    add_update_args(group, optimizers=("sgd", "adam"), evaluation="epochs without validation improvement")
    parser.set_defaults(optimizer="sgd", lr=20.0, clip=0.25, patience=5)
    group = parser.add_argument_group("logging")
    group.add_argument("--log-interval", "--log_interval", dest="log_interval", type=int, default=200,
                       help="batches between log lines")
    group.add_argument("--save-interval", "--save_interval", dest="save_interval", type=int, default=0,
                       help="also write a resumable checkpoint every this many batches (0: at epoch ends only)")


def add_lm_training_args(parser: argparse.ArgumentParser) -> None:
    """Language-model training flags beyond the shared ones: AWD-LSTM's regularisers and NT-ASGD.

    Their defaults switch everything off; `main.py` sets the paper's values.
    """
    group = parser.add_argument_group("language-model training (AWD-LSTM)")
    group.add_argument("--alpha", type=float, default=0.0,
                       help="activation regularisation: alpha * mean square of the dropped last-layer output")
    group.add_argument("--beta", type=float, default=0.0,
                       help="temporal activation regularisation: beta * mean square of the raw output's change")
    group.add_argument("--variable-bptt", "--variable_bptt", dest="variable_bptt",
                       action=argparse.BooleanOptionalAction, default=False,
                       help="draw each window's length around --bptt and scale the step's lr by length/bptt")
    group.add_argument("--nonmono", type=int, default=0,
                       help="NT-ASGD: switch SGD to averaged SGD when validation loss is worse than the best "
                            "of all but the last NONMONO evaluations (0: never)")
    group.add_argument("--when", type=int, nargs="+", default=[],
                       help="epochs after which the learning rate is divided by 10")
    group.add_argument("--save", default=None, metavar="PATH",
                       help="also write the best model to this checkpoint file")


def lm_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with every flag of the language-model scripts; each script then sets its paper's defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    add_lm_training_args(parser)
    models.add_lm_args(parser)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args`, recording in `args._explicit` which flags the user typed."""
    unset = object()
    probe = argparse.Namespace(**{action.dest: unset for action in parser._actions if action.dest != "help"})
    parser.parse_args(argv, namespace=probe)
    args = parser.parse_args(argv)
    args._explicit = sorted(name for name, value in vars(probe).items() if value is not unset)
    return args


def public_args(args: argparse.Namespace) -> dict:
    return {key: value for key, value in vars(args).items() if not key.startswith("_")}


def check_common_args(args: argparse.Namespace) -> None:
    """Reject flag values the loop cannot use, naming the flag."""
    positive = ["batch_size", "eval_batch_size", "bptt", "log_interval", "max_nonfinite"]
    non_negative = ["epochs", "clip", "wdecay", "save_interval", "patience"]
    for name in positive + non_negative:
        value = getattr(args, name)
        if value < 0 or (name in positive and value == 0):
            raise UserInputError(f"--{name} must be {'positive' if name in positive else 'at least 0'}, got {value}")
    for name in ("test_batch_size", "max_steps"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "test_batch_size" else 0):
            raise UserInputError(f"--{name} must be positive, got {value}")
    if not args.lr > 0:
        raise UserInputError(f"--lr must be above 0, got {args.lr}")
    for name in ("alpha", "beta", "nonmono"):
        if getattr(args, name) < 0:
            raise UserInputError(f"--{name} must be at least 0, got {getattr(args, name)}")
    if not 0 < args.lr_decay <= 1:
        raise UserInputError(f"--lr-decay must be in (0, 1] (1 turns the plateau schedule off), got {args.lr_decay}")
    distributed.share(args.batch_size, "--batch_size")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def seed_rank(seed: int) -> None:
    """Under torchrun, give ranks other than 0 random streams of their own (dropout masks) once the
    model is built; rank 0, like a single process, goes on with the stream of `seed`."""
    if distributed.rank():
        seed_everything(distributed.rank_seed(seed))


def resolve_device(args: argparse.Namespace) -> torch.device:
    name = "cuda" if args.cuda else args.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("CUDA is not available on this machine; drop --cuda or use --device cpu")
    return device


def cli(main: Callable[[list[str] | None], Any]) -> None:
    """Run a script's `main`, printing user-facing errors as one line (exit 2) instead of a traceback."""
    where = f" (rank {distributed.rank()})" if distributed.world_size() > 1 else ""
    try:
        main(None)
    except UserInputError as error:
        print(f"error{where}: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as error:
        print(f"error{where}: {error}", file=sys.stderr)
        sys.exit(1)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# --------------------------------------------------------------------------- run folders and logs


def json_safe(value: Any) -> Any:
    """Non-finite floats become None, so log.jsonl stays strict JSON (no NaN or Infinity)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class Run:
    """A run folder: `args.json`, `log.jsonl`, checkpoints. Prints log lines and appends them as JSON.

    Under torchrun only rank 0 prints and writes; on the other ranks the same calls do nothing.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.main = distributed.is_main()
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
        self.log_path = self.path / "log.jsonl"
        self.bar: tqdm | None = None

    @classmethod
    def create(cls, args: argparse.Namespace, script: str) -> "Run":
        """A new run folder with `args.json`; rank 0 chooses it and tells the other ranks."""
        path = distributed.agree(str(cls._new_path(args, script)) if distributed.is_main() else None)
        run = cls(Path(path))
        if run.main:
            meta = {
                "args": public_args(args), "script": script, "argv": sys.argv, "git_commit": git_commit(),
                "torch": torch.__version__, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "processes": distributed.world_size(),
            }
            (run.path / "args.json").write_text(json.dumps(meta, indent=2) + "\n")
        return run

    @staticmethod
    def _new_path(args: argparse.Namespace, script: str) -> Path:
        if args.run_dir:
            path = Path(args.run_dir)
            if (path / "checkpoint.pt").exists() or (path / "best.pt").exists():
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
        with open(self.log_path, "a") as file:
            file.write(json.dumps(record) + "\n")

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def truncate_log(self, size: int) -> None:
        """Drop log lines written after a checkpoint, since a resumed run redoes that work."""
        if self.main and self.log_path.exists() and self.log_path.stat().st_size > size:
            with open(self.log_path, "r+b") as file:
                file.truncate(size)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


# --------------------------------------------------------------------------- checkpoints


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


def save_checkpoint(path: Path, model: torch.nn.Module, **contents: Any) -> None:
    """Write `{format, kind, config, model, **contents}` atomically, plus a JSON summary beside it.

    `contents` typically holds optimizer, scheduler, args, vocab, train_state, hidden, rng:
    tensors, numbers, strings and containers of them only, so `load_checkpoint` can read it
    with `weights_only=True`.
    """
    path = Path(path)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "kind": type(model).__name__,
        "config": dataclasses.asdict(model.config),
        "model": model.state_dict(),
        **contents,
    }
    atomic_torch_save(checkpoint, path)
    summary = {
        "kind": checkpoint["kind"], "config": checkpoint["config"],
        "train_state": contents.get("train_state"), "git_commit": git_commit(),
        "saved": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    tmp = path.with_name(f".{path.stem}.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, path.with_suffix(".json"))


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
            f"{path} is not a checkpoint this repository can read (not a file of plain tensors; pickled objects are never loaded, "
            f"since unpickling can run code); pass a checkpoint.pt or best.pt written by one of its scripts"
        ) from None
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserInputError(
            f"{path} is not a checkpoint this repository can read ({first_line}); "
            f"pass a checkpoint.pt or best.pt written by one of its scripts"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserInputError(f"{path} is not a checkpoint of this repository (format {CHECKPOINT_FORMAT} expected)")
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


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: models.LanguageModel, source: torch.Tensor, bptt: int, max_batches: int | None = None
) -> float:
    """Mean loss per token over `source` [S, B]: summed token losses divided by the token count."""
    model.eval()
    state = model.initial_state(source.size(1), source.device)
    total, count = 0.0, 0
    for batch, start in enumerate(range(0, source.size(0) - 1, bptt)):
        if max_batches is not None and batch >= max_batches:
            break
        inputs, targets = get_batch(source, start, bptt)
        features, state = model(inputs, state)
        total += model.loss(features, targets, reduction="sum").item()
        count += targets.numel()
    return total / count


# --------------------------------------------------------------------------- stopping


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


# --------------------------------------------------------------------------- language-model training

STOP_REQUESTS = (None, "interrupt", "terminate")  # least to most urgent; under torchrun the ranks take the most


def state_batch_dims(model: models.LanguageModel, device: torch.device) -> list[int | None]:
    """For each tensor of the model's recurrent state, the dimension that indexes the batch (None: none)."""
    one, two = (state_tensors(model.initial_state(size, device)) for size in (1, 2))
    return [next((dim for dim, (a, b) in enumerate(zip(x.shape, y.shape)) if a != b), None) for x, y in zip(one, two)]


def variable_bptt_length(bptt: int, rng: Any = np.random) -> int:
    """AWD-LSTM's window length: around bptt (p=0.95) or bptt/2, plus N(0, 5) noise, at least 5.

    `rng` is a NumPy `RandomState` (NumPy's global generator by default); `LMTrainer` passes its
    own, seeded from --seed and kept in checkpoints, so every rank draws the same lengths.
    """
    base = bptt if rng.random() < 0.95 else bptt / 2.0
    return max(5, int(rng.normal(base, 5)))


def nt_asgd_triggered(history: list[float], valid_loss: float, nonmono: int) -> bool:
    """NT-ASGD's non-monotone trigger: `valid_loss` is worse than the best of all but the last `nonmono`.

    Args:
        history: earlier validation losses, oldest first (without `valid_loss`).
        valid_loss: the newest validation loss.
        nonmono: how many of the latest evaluations the comparison leaves out; 0 never triggers.
    """
    return nonmono > 0 and len(history) > nonmono and valid_loss > min(history[:-nonmono])


def finite_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: float) -> bool:
    """Backward, clip to `clip` (0: off) and step, unless the loss or the gradient norm is not finite.

    Returns whether the optimiser stepped; when it did not, the gradients are cleared. Under
    torchrun the gradients are averaged over the ranks by then, so every rank takes the same branch.
    """
    if distributed.all_ranks(bool(torch.isfinite(loss))):  # under torchrun all ranks step or none
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        if clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        if torch.isfinite(grad_norm):
            optimizer.step()
            return True
    optimizer.zero_grad(set_to_none=True)
    return False


def skip_nonfinite(run: Run, state: Any, max_nonfinite: int, action: str, **fields: Any) -> None:
    """Count, print and log a skipped non-finite step; raise TrainingError once they persist.

    `state` has `step`, `nonfinite_streak` and `skipped_steps` (TrainState, the task loop's state).
    """
    state.nonfinite_streak += 1
    state.skipped_steps += 1
    run.print(f"| step {state.step + 1}: non-finite loss or gradient; {action}")
    run.log("nonfinite", step=state.step + 1, **fields)
    if state.nonfinite_streak >= max_nonfinite:
        raise TrainingError(
            f"the loss or gradient was not finite for {state.nonfinite_streak} consecutive steps "
            f"(step {state.step + 1}); lower --lr or --clip, or check the data. Checkpoints already "
            f"in {run.path} are unchanged"
        )


@dataclasses.dataclass
class TrainState:
    """Loop position and bookkeeping; with the weights, optimiser, RNG and hidden state it resumes a run."""

    epoch: int = 1
    position: int = 0  # row of the batchified training data where the next batch starts
    step: int = 0  # training batches done in all
    best_valid_loss: float = math.inf
    best_epoch: int = 0
    nonfinite_streak: int = 0
    skipped_steps: int = 0
    log_bytes: int = 0  # size of log.jsonl when the checkpoint was written
    valid_history: list[float] = dataclasses.field(default_factory=list)  # every validation loss, in order
    asgd: bool = False  # averaged SGD is on (after the NT-ASGD switch, or from the start when fine-tuning)
    interval_loss: float = 0.0  # running sums for the next log line, kept so a resumed run logs the same
    interval_batches: int = 0
    interval_tokens: int = 0


class LMTrainer:
    """Trains a `LanguageModel` on a corpus with truncated BPTT.

    Subclasses (e.g. AWD-LSTM) override `sequence_length`, `compute_loss` or `after_validation`.

    Under torchrun each rank trains on its share of the batch's columns (`batch_size` of them)
    through `loss_step`, the DDP-wrapped `compute_loss`; evaluation and checkpoints cover all ranks.
    """

    def __init__(self, model: models.LanguageModel, corpus: Corpus, args: argparse.Namespace,
                 device: torch.device, run: Run):
        self.model, self.corpus, self.args, self.device, self.run = model, corpus, args, device, run
        self.batch_size = distributed.share(args.batch_size, "--batch_size")  # this rank's columns
        train = batchify(corpus.train, args.batch_size, name="the training split (--batch_size)")
        self.train_data = distributed.columns(train).to(device)
        self.valid_data, self.valid_shared = self.evaluation_share(
            batchify(corpus.valid, args.eval_batch_size, name="the validation split (--eval_batch_size)"))
        self.test_data, self.test_shared = self.evaluation_share(
            batchify(corpus.test, args.test_batch_size or args.eval_batch_size,
                     name="the test split (--test_batch_size)"))
        self.loss_step = distributed.wrap(model, lambda inputs, targets: self.compute_loss(inputs, targets),
                                          find_unused_parameters=model.adaptive is not None)
        self.bptt_rng = np.random.RandomState(args.seed % 2**32)  # window lengths, the same on every rank
        self.state_dims = state_batch_dims(model, device)
        self.optimizer = self.make_optimizer()
        self.scheduler = None
        if args.lr_decay < 1:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=args.lr_decay, patience=args.patience
            )
        self.state = TrainState()
        self.hidden = model.initial_state(self.batch_size, device)
        self.eval_batches = 2 if args.dry_run else None

    def evaluation_share(self, source: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """This rank's columns of a batchified evaluation split on the device, and whether it is a share.

        When the split's batch size does not divide among the ranks (e.g. AWD-LSTM's test batch
        of 1), every rank evaluates all of it and the ranks take rank 0's result.
        """
        if source.size(1) % distributed.world_size():
            return source.to(self.device), False
        return distributed.columns(source).to(self.device), distributed.world_size() > 1

    def evaluate_split(self, model: models.LanguageModel, split: str) -> float:
        """Mean loss per token of `model` on "valid" or "test" over all ranks' columns, the same on every rank."""
        if split == "valid":
            source, shared = self.valid_data, self.valid_shared
        else:
            source, shared = self.test_data, self.test_shared
        loss = evaluate(model, source, self.args.bptt, self.eval_batches)
        if shared:
            rows = source.size(0) - 1
            if self.eval_batches is not None:
                rows = min(rows, self.eval_batches * self.args.bptt)
            tokens = rows * source.size(1)
            total, count = distributed.all_reduce_sum(loss * tokens, tokens)
            loss = total / count
        return distributed.agree(loss)  # one value for the decisions taken on it, whatever the rounding

    def make_optimizer(self, asgd: bool = False) -> torch.optim.Optimizer:
        params = self.model.parameters()
        if asgd:  # averaging from the first step on, as AWD-LSTM's NT-ASGD
            return torch.optim.ASGD(params, lr=self.args.lr, t0=0, lambd=0.0, weight_decay=self.args.wdecay)
        if self.args.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.args.lr, weight_decay=self.args.wdecay)
        return torch.optim.SGD(params, lr=self.args.lr, weight_decay=self.args.wdecay)

    # ---- hooks

    def sequence_length(self) -> int:
        if self.args.variable_bptt:
            return variable_bptt_length(self.args.bptt, self.bptt_rng)
        return self.args.bptt

    def compute_loss(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, models.State, torch.Tensor]:
        """Loss to minimise for one window, the core's state after it, and the cross-entropy alone.

        With --alpha / --beta the loss adds activation regularisation on the dropped output and
        temporal activation regularisation on the raw output of the core's last layer.
        """
        alpha, beta = self.args.alpha, self.args.beta
        features, hidden, (raw, dropped) = self.model(inputs, self.hidden, return_outputs=True)
        cross_entropy = self.model.loss(features, targets)
        loss = cross_entropy
        if alpha:
            loss = loss + alpha * dropped.pow(2).mean()
        if beta and raw.size(0) > 1:
            loss = loss + beta * (raw[1:] - raw[:-1]).pow(2).mean()
        return loss, hidden, cross_entropy

    def after_validation(self, valid_loss: float) -> str | None:
        """NT-ASGD switch, --when decays and the plateau schedule; returns a stop reason or None."""
        args, state = self.args, self.state
        history = state.valid_history
        triggered = nt_asgd_triggered(history, valid_loss, args.nonmono)
        history.append(valid_loss)
        if triggered and state.asgd and getattr(args, "stop_when_nonmono", False):
            self.run.print(f"| validation loss stopped improving under averaged SGD: done (epoch {state.epoch})")
            return "converged"
        if triggered and not state.asgd and args.optimizer == "sgd":
            self.switch_to_asgd()
        if state.epoch in args.when:
            for group in self.optimizer.param_groups:
                group["lr"] /= 10
            self.run.print(f"| epoch {state.epoch} is in --when: learning rate divided by 10")
        if self.scheduler is not None:
            self.scheduler.step(valid_loss)
        return None

    def switch_optimizer_quietly(self) -> None:
        self.state.asgd = True
        self.optimizer = self.make_optimizer(asgd=True)
        if self.scheduler is not None:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=self.args.lr_decay, patience=self.args.patience
            )

    def switch_to_asgd(self) -> None:
        self.switch_optimizer_quietly()
        self.run.print(f"| switching to averaged SGD (NT-ASGD) after epoch {self.state.epoch}")
        self.run.log("asgd", epoch=self.state.epoch, step=self.state.step)

    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """Under averaged SGD, swap the averaged weights into the model for evaluation and saving."""
        saved = []
        if self.state.asgd:
            with torch.no_grad():
                for param in self.model.parameters():
                    average = self.optimizer.state.get(param, {}).get("ax")
                    if average is not None:
                        saved.append((param, param.detach().clone()))
                        param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in saved:
                    param.copy_(value)

    # ---- checkpoints

    def checkpoint_contents(self) -> dict:
        """What `restore` needs; under torchrun every rank must call it (it gathers from all of them).

        `hidden` is the whole batch's state (every rank's columns) and `rng` rank 0's random
        state, as one process would save them; `rank_rngs` adds every rank's under torchrun.
        """
        hidden = [distributed.gather_columns(tensor, dim) if dim is not None else tensor
                  for tensor, dim in zip(state_tensors(self.hidden), self.state_dims)]
        rngs = distributed.gather_objects(rng_state())
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "args": public_args(self.args),
            "vocab": self.corpus.dictionary.idx2word,
            "train_state": dataclasses.asdict(self.state),
            "hidden": [tensor.cpu() for tensor in hidden],
            "rng": rngs[0],
            **({"rank_rngs": rngs} if len(rngs) > 1 else {}),
            "bptt_rng": numpy_state(self.bptt_rng),
        }

    def save(self, name: str = "checkpoint.pt", copy_best: bool = True) -> Path:
        """Write `name` in the run folder; best.pt (also copied to --save unless `copy_best` is False) is
        marked not resumable, since it is taken mid-way through the end of an epoch.

        Every rank calls it; rank 0 writes.
        """
        self.state.log_bytes = self.run.log_size()
        path = self.run.path / name
        contents = {**self.checkpoint_contents(), "resumable": name != "best.pt"}
        if distributed.is_main():
            save_checkpoint(path, self.model, **contents)
            if name == "best.pt" and copy_best and self.args.save:
                save_checkpoint(Path(self.args.save), self.model, **contents)
        return path

    def restore(self, checkpoint: dict) -> None:
        """Continue from a checkpoint written by `save` (weights already loaded into the model).

        A checkpoint of any number of processes resumes with any number that divides the batch;
        it is bitwise on CPU when that number is the same.
        """
        self.state = TrainState(**checkpoint["train_state"])
        if self.state.asgd:
            self.switch_optimizer_quietly()
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.hidden = state_from_tensors(
            self.hidden, [distributed.columns(tensor, dim) if dim is not None else tensor
                          for tensor, dim in zip(checkpoint["hidden"], self.state_dims)])
        rngs = checkpoint.get("rank_rngs", [checkpoint["rng"]])
        if len(rngs) == distributed.world_size():
            set_rng_state(rngs[distributed.rank()])
        else:  # another number of processes: rank 0 continues the saved stream, the others start their own
            set_rng_state(checkpoint["rng"])
            seed_rank(self.args.seed)
        # checkpoints written before the trainer had its own generator drew the lengths from NumPy's global one
        set_numpy_state(checkpoint.get("bptt_rng", checkpoint["rng"]["numpy"]), self.bptt_rng)
        self.run.truncate_log(self.state.log_bytes)

    # ---- the loop

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float | None:
        """One optimiser step; returns the cross-entropy, or None when the step was skipped as non-finite.

        With --variable-bptt the step's learning rate is scaled by window length / bptt.
        """
        lr_scale = inputs.size(0) / self.args.bptt if self.args.variable_bptt else 1.0
        base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] *= lr_scale
        try:
            return self._train_step(inputs, targets)
        finally:
            for group, lr in zip(self.optimizer.param_groups, base_lrs):
                group["lr"] = lr

    def _train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float | None:
        self.model.train()
        self.hidden = detach_state(self.hidden)
        self.optimizer.zero_grad(set_to_none=True)
        loss, next_hidden, cross_entropy = self.loss_step(inputs, targets)
        if finite_step(self.model, self.optimizer, loss, self.args.clip):
            self.hidden = next_hidden
            self.state.nonfinite_streak = 0
            # the ranks' shares are equal, so the mean of their losses is the whole batch's loss
            return distributed.all_reduce_sum(cross_entropy.item())[0] / distributed.world_size()
        self.hidden = self.model.initial_state(self.batch_size, self.device)
        skip_nonfinite(self.run, self.state, self.args.max_nonfinite, "step skipped, state reset",
                       epoch=self.state.epoch)
        return None

    def batches_per_epoch(self) -> int:
        return math.ceil((self.train_data.size(0) - 1) / self.args.bptt)

    def fit(self) -> dict:
        """Train until `--epochs`, a stop signal or `--max-steps`; then evaluate the best model on test."""
        args, state = self.args, self.state
        stop_reason = None
        with StopSignals() as signals:
            last_epoch = state.epoch if args.dry_run else args.epochs
            while state.epoch <= last_epoch and stop_reason is None:
                stop_reason = self.train_epoch(signals)
                if stop_reason is None:
                    stop_reason = self.end_epoch()
        if stop_reason == "terminate":
            path = self.save()
            self.run.print(f"| terminated: saved resumable checkpoint {path}")
            return {"stopped": stop_reason, "checkpoint": str(path)}
        if stop_reason not in (None, "converged"):
            path = self.save()
            self.run.print(f"| stopped ({stop_reason}) at step {state.step}: saved resumable checkpoint {path}; "
                           f"continue with --resume {self.run.path}")
        return {"stopped": stop_reason, **self.final_evaluation()}

    def train_epoch(self, signals: StopSignals) -> str | None:
        args, state = self.args, self.state
        last_row = self.train_data.size(0) - 1
        total_batches = 2 if args.dry_run else self.batches_per_epoch()
        batches_this_epoch = 0
        started = time.perf_counter()
        bar = tqdm(total=total_batches, initial=min(state.position // args.bptt, total_batches),
                   desc=f"epoch {state.epoch}", disable=None if self.run.main else True, leave=False,
                   dynamic_ncols=True)
        self.run.bar = None if bar.disable else bar
        try:
            while state.position < last_row:
                reason = STOP_REQUESTS[distributed.max_over_ranks(STOP_REQUESTS.index(signals.reason))]
                if reason is not None:  # a request on any rank stops all of them before this batch
                    return reason
                if args.max_steps is not None and state.step >= args.max_steps:
                    return "max-steps"
                if args.dry_run and batches_this_epoch == total_batches:
                    break
                inputs, targets = get_batch(self.train_data, state.position, self.sequence_length())
                loss = self.train_step(inputs, targets)
                state.position += inputs.size(0)
                state.step += 1
                batches_this_epoch += 1
                bar.update(1)
                if loss is not None:
                    state.interval_loss += loss
                    state.interval_batches += 1
                    state.interval_tokens += targets.numel() * distributed.world_size()
                    bar.set_postfix(loss=f"{loss:.3f}")
                if state.interval_batches and state.step % args.log_interval == 0:
                    elapsed = time.perf_counter() - started
                    self.log_train(state.interval_loss / state.interval_batches, state.interval_batches,
                                   state.interval_tokens, elapsed)
                    state.interval_loss, state.interval_batches, state.interval_tokens = 0.0, 0, 0
                    started = time.perf_counter()
                if args.save_interval and state.step % args.save_interval == 0:
                    self.save()
        finally:
            bar.close()
            self.run.bar = None
        return None

    def log_train(self, loss: float, batches: int, tokens: int, elapsed: float) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        ms_per_batch = 1000 * elapsed / batches
        self.run.print(
            f"| epoch {self.state.epoch:3d} | step {self.state.step:6d} | lr {lr:.3g} | "
            f"ms/batch {ms_per_batch:7.1f} | tok/s {tokens / elapsed:8.0f} | loss {loss:5.2f} | ppl {perplexity(loss):8.2f}"
        )
        self.run.log("train", epoch=self.state.epoch, step=self.state.step, lr=lr, loss=loss,
                     ppl=perplexity(loss), ms_per_batch=ms_per_batch, tokens_per_s=tokens / elapsed)

    def end_epoch(self) -> str | None:
        """Validate (with averaged weights under ASGD), keep the best model, apply schedules, checkpoint.

        Returns a stop reason (fine-tuning converged) or None.
        """
        state = self.state
        started = time.perf_counter()
        with self.evaluation_weights():
            valid_loss = self.evaluate_split(self.model, "valid")
            improved = valid_loss < state.best_valid_loss
            if improved:
                state.best_valid_loss, state.best_epoch = valid_loss, state.epoch
                self.save("best.pt")
        self.run.print(f"| end of epoch {state.epoch:3d} | valid loss {valid_loss:5.2f} | "
                       f"valid ppl {perplexity(valid_loss):8.2f}{' | best' if improved else ''}"
                       f"{' | averaged weights' if state.asgd else ''}")
        self.run.log("valid", epoch=state.epoch, step=state.step, loss=valid_loss, ppl=perplexity(valid_loss),
                     lr=self.optimizer.param_groups[0]["lr"], asgd=state.asgd,
                     seconds=time.perf_counter() - started)
        stop_reason = self.after_validation(valid_loss)
        state.epoch += 1
        state.position = 0
        self.hidden = self.model.initial_state(self.batch_size, self.device)
        self.save()
        return stop_reason

    def final_evaluation(self) -> dict:
        """Valid and test loss of the best model so far (the current one if nothing was validated yet).

        Rank 0 reads best.pt and sends its weights to the other ranks, which need not see the file.
        """
        best = self.run.path / "best.pt"
        model = self.model
        if distributed.agree(self.run.main and best.exists()):
            model = load_checkpoint(best, self.device)[0] if self.run.main else copy.deepcopy(self.model)
            distributed.broadcast_module(model)
        valid_loss = self.evaluate_split(model, "valid")
        test_loss = self.evaluate_split(model, "test")
        self.run.print(f"| end of training | valid ppl {perplexity(valid_loss):8.2f} | "
                       f"test ppl {perplexity(test_loss):8.2f}")
        self.run.log("test", step=self.state.step, valid_loss=valid_loss, valid_ppl=perplexity(valid_loss),
                     test_loss=test_loss, test_ppl=perplexity(test_loss))
        return {"valid_loss": valid_loss, "valid_ppl": perplexity(valid_loss),
                "test_loss": test_loss, "test_ppl": perplexity(test_loss)}


# --------------------------------------------------------------------------- entry point for LM scripts


def resume_args(args: argparse.Namespace, checkpoint: dict) -> argparse.Namespace:
    """The checkpoint's flags, with the run-control flags the user typed now; a clash is an error."""
    saved = dict(checkpoint["args"])
    for name in args._explicit:
        if name in RESUME_OVERRIDABLE or name in PER_INVOCATION or name not in saved:
            continue
        if getattr(args, name) != saved[name]:
            raise UserInputError(
                f"--{name} {getattr(args, name)} differs from the checkpoint's {saved[name]!r}; drop it to resume "
                f"{checkpoint['path']}, or start a new run without --resume"
            )
    merged = argparse.Namespace(**{**vars(args), **saved})
    for name in PER_INVOCATION | (RESUME_OVERRIDABLE & set(args._explicit)):
        setattr(merged, name, getattr(args, name))
    return merged


def check_vocabulary(checkpoint: dict, corpus: Corpus, data: str) -> None:
    if checkpoint["vocab"] != corpus.dictionary.idx2word:
        raise UserInputError(
            f"{checkpoint['path']} was trained on another vocabulary ({len(checkpoint['vocab'])} words) than "
            f"{data} ({len(corpus.dictionary)} words); pass the --data it was trained on"
        )


def run_language_model(
    args: argparse.Namespace,
    script: str,
    config_fn: Callable[[argparse.Namespace, int], models.LMConfig] = models.lm_config_from_args,
    finetune_from: str | None = None,
) -> dict:
    """Build corpus, model and trainer from flags, train, and test the best model.

    Args:
        args: parsed flags (`parse_args`).
        script: the script's name, for the run folder and logs.
        config_fn: builds the model config from the flags and the vocabulary size.
        finetune_from: a checkpoint whose weights start a new run under averaged SGD that stops
            when validation stops improving (AWD-LSTM's finetune.py).

    With `args.resume` the run continues from its checkpoint instead (see `resume_args`). Under
    torchrun every process runs this; --resume and `finetune_from` then need the checkpoint
    readable on every machine.
    """
    checkpoint = read_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:
        if checkpoint.get("kind") != "LanguageModel":
            raise UserInputError(f"{checkpoint['path']} holds a {checkpoint.get('kind')}, not a language model")
        if checkpoint.get("resumable") is False:
            raise UserInputError(
                f"{checkpoint['path']} holds the best weights, not a resumable state; resume from the run "
                f"folder or its checkpoint.pt"
            )
        args = resume_args(args, checkpoint)
    check_common_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.device(resolve_device(args))
    with distributed.session(device, args.dist_timeout):
        return _train_language_model(args, script, config_fn, finetune_from, checkpoint, device)


def _train_language_model(
    args: argparse.Namespace,
    script: str,
    config_fn: Callable[[argparse.Namespace, int], models.LMConfig],
    finetune_from: str | None,
    checkpoint: dict | None,
    device: torch.device,
) -> dict:
    """`run_language_model` once the flags are checked, inside the process group under torchrun."""
    seed_everything(args.seed)
    corpus = Corpus(args.data)
    if checkpoint is not None:
        check_vocabulary(checkpoint, corpus, args.data)
        model, _ = load_checkpoint(checkpoint["path"], device, kind="LanguageModel")
        run = Run(Path(checkpoint["path"]).parent)
    elif finetune_from is not None:
        model, start = load_checkpoint(finetune_from, device, kind="LanguageModel")
        check_vocabulary(start, corpus, args.data)
        run = Run.create(args, script)
        run.log("finetune", start=start["path"])
    else:
        try:
            model = models.LanguageModel(config_fn(args, len(corpus.dictionary))).to(device)
        except ValueError as error:
            raise UserInputError(str(error)) from None
        run = Run.create(args, script)
    seed_rank(args.seed)
    trainer = LMTrainer(model, corpus, args, device, run)
    if checkpoint is not None:
        trainer.restore(checkpoint)
        run.log("resume", step=trainer.state.step, epoch=trainer.state.epoch)
        run.print(f"| resumed {checkpoint['path']} at epoch {trainer.state.epoch}, step {trainer.state.step}")
    elif finetune_from is not None:
        trainer.switch_optimizer_quietly()
        start_loss = trainer.evaluate_split(model, "valid")
        trainer.state.best_valid_loss = start_loss  # fine-tuning must beat the model it starts from
        trainer.save("best.pt", copy_best=False)
        run.print(f"| fine-tuning {finetune_from} with averaged SGD from valid ppl {perplexity(start_loss):.2f}")
        run.log("valid", epoch=0, step=0, loss=start_loss, ppl=perplexity(start_loss), asgd=False)
    parameters = sum(p.numel() for p in model.parameters())
    processes = f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    run.print(f"| {script}: {model.config.core} language model, {parameters:,} parameters, "
              f"vocabulary {len(corpus.dictionary):,}, device {device}{processes}, run folder {run.path}")
    return {"run_dir": str(run.path), **trainer.fit()}
