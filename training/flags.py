"""Every shared flag group, parsing, validation and `cli`.

A script builds its parser from these groups (`lm_parser`, `task_parser`, `sequence_task_parser`),
sets its paper's defaults with `set_defaults`, and calls `parse_args`, which returns `Flags`:
the values and which of them were typed (a resumed run may only change some; see
`training.checkpoint.resume_args`). `check_lm_args` / `check_task_args` reject values the loops
cannot use with a one-line `UserInputError` naming the flag; `cli` prints it (exit 2) or a
`TrainingError` (exit 1) instead of a traceback, and gives runs stopped by a signal the shell's
statuses (see `cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch

import distributed
import models
from errors import TrainingError, UserInputError
from models.core import CORES

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class Flags:
    """Parsed command-line flags.

    Attributes:
        args: every flag's value (saved as the run's `args.json` and in its checkpoints).
        typed: the flags typed on the command line; on --resume the others come from the checkpoint.
    """

    args: argparse.Namespace
    typed: frozenset[str] = frozenset()


class FromArgs:
    """A mixin for the loops' option dataclasses: `from_args` takes each field from the flag of its name."""

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        """The options from parsed flags; a field without a flag keeps its default."""
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)
                      if hasattr(args, field.name)})


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> Flags:
    """`parser.parse_args`, recording which flags the user typed."""
    unset = object()
    probe = argparse.Namespace(**{action.dest: unset for action in parser._actions if action.dest != "help"})
    parser.parse_args(argv, namespace=probe)
    args = parser.parse_args(argv)
    return Flags(args, frozenset(name for name, value in vars(probe).items() if value is not unset))


def public_args(args: argparse.Namespace) -> dict:
    """The flags as a plain dict (for args.json and checkpoints)."""
    return {key: value for key, value in vars(args).items() if not key.startswith("_")}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help that keeps the description's line breaks and ends every option's help with its default
    (after the script's `set_defaults`), unless the help already says "default:" (flags whose default
    is a rule rather than a value). A help says what an unset flag means as "unset: ...", so that a
    script giving the flag a value still shows it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or "default:" in text or "%(default)" in text):
            return text
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"


# --------------------------------------------------------------------------- flag groups


def add_run_args(group: argparse._ActionsContainer, dry_run_help: str) -> None:
    """Flags of any run, language model or task: seed, device, threads, precision, run folder, resume, dry run."""
    group.add_argument("--seed", type=int, default=1111, help="random seed")
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    group.add_argument("--cuda", action="store_true", help="use CUDA (same as --device cuda)")
    group.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    group.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="fp32, or mixed precision: the forward pass under autocast in bf16 or fp16 (fp16 with "
                            "a gradient scaler); weights, loss and optimiser state stay in fp32")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="run the per-step work of the cores that have it (RMC, DNC, SAM, SDNC, loop and "
                            "RNNLIB cells) through torch.compile (unset: on with CUDA but for SAM and SDNC; on "
                            "the CPU only for the DNC, where it pays)")
    group.add_argument("--run-dir", "--run_dir", dest="run_dir", default=None,
                       help="folder for args.json, log.jsonl and checkpoints (default: runs/<name>-<time>)")
    group.add_argument("--name", default=None, help="run name used in the default run folder")
    group.add_argument("--resume", default=None, metavar="PATH",
                       help="continue from a checkpoint file or a run folder (its checkpoint.pt)")
    group.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help=dry_run_help)
    group.add_argument("--dist-timeout", "--dist_timeout", dest="dist_timeout", type=float, default=300.0,
                       help="under torchrun: seconds a process waits for the others (set-up, each exchange) "
                            "before the run fails")


def add_view_args(group: argparse._ActionsContainer) -> None:
    """Live views of any run (views.py): Visdom curves (and a sequence task's memory heatmaps), TensorBoard."""
    group.add_argument("--visdom", dest="visdom", action="store_true",
                       help="draw the loss curves live in a running Visdom server (python -m visdom.server)")
    group.add_argument("--visdom-server", "--visdom_server", dest="visdom_server", default="localhost",
                       help="the Visdom server's address")
    group.add_argument("--visdom-port", "--visdom_port", dest="visdom_port", type=int, default=8097,
                       help="the Visdom server's port")
    group.add_argument("--visdom-env", "--visdom_env", dest="visdom_env", default=None,
                       help="the Visdom environment (default: the run folder's name, one per run; name a shared one "
                            "to see several runs' curves together)")
    group.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                       help="also write every logged number as TensorBoard scalars into DIR/<run folder name> "
                            "(a bare --tensorboard: the run folder's tensorboard/); needs pip install tensorboard")


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
    group.add_argument("--plateau-threshold", "--plateau_threshold", dest="plateau_threshold", type=float,
                       help="relative improvement the plateau schedule counts as progress (0: any improvement, "
                            "as the original language-model scripts; 1e-4: ReduceLROnPlateau's default)")
    group.add_argument("--max-nonfinite", "--max_nonfinite", dest="max_nonfinite", type=int, default=10,
                       help="stop after this many consecutive non-finite losses or gradients")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The language-model loop's flags; scripts set their paper defaults with `set_defaults`."""
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
                       help="batch size for the test set (unset: --eval_batch_size)")
    group.add_argument("--bptt", type=int, default=35, help="truncated-BPTT window length")
    add_update_args(group, optimizers=("sgd", "adam"), evaluation="epochs without validation improvement")
    parser.set_defaults(optimizer="sgd", lr=20.0, clip=0.25, patience=5, plateau_threshold=0.0)
    group = parser.add_argument_group("logging")
    group.add_argument("--log-interval", "--log_interval", dest="log_interval", type=int, default=200,
                       help="batches between log lines (losses are read from the device only then)")
    group.add_argument("--save-interval", "--save_interval", dest="save_interval", type=int, default=0,
                       help="also write a resumable checkpoint every this many batches (0: at epoch ends only)")
    add_view_args(group)


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
    group.add_argument("--onnx-export", "--onnx_export", dest="onnx_export", default="", metavar="PATH",
                       help="at the end, export the best model to this ONNX file (needs `pip install onnx "
                            "onnxscript`): tokens [bptt, 1] -> log-probabilities [bptt, 1, V] from a fresh state")


def lm_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with every flag of the language-model scripts; each script then sets its paper's defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_common_args(parser)
    add_lm_training_args(parser)
    models.add_lm_args(parser)
    return parser


def add_task_args(parser: argparse.ArgumentParser) -> None:
    """The task loop's flags; scripts set their paper's defaults with `set_defaults`."""
    group = parser.add_argument_group("run")
    add_run_args(group, dry_run_help="smoke test: two iterations and a test set of at most two batches")
    group.add_argument("--test-seed", "--test_seed", dest="test_seed", type=int, default=2**31 - 1,
                       help="seed of the fixed test set (must differ from --seed)")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--iterations", type=int, default=100000, help="training iterations (one fresh batch each)")
    group.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None,
                       help="stop after this many iterations in all, saving a resumable checkpoint")
    group.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=64, help="batch size")
    group.add_argument("--test-size", "--test_size", dest="test_size", type=int, default=3200,
                       help="examples in the fixed test set")
    add_update_args(group, optimizers=("adam", "rmsprop", "sgd"), evaluation="evaluations without test-loss improvement")
    parser.set_defaults(optimizer="adam", lr=1e-4, clip=0.0, patience=20, plateau_threshold=1e-4)
    group = parser.add_argument_group("logging")
    group.add_argument("--log-interval", "--log_interval", dest="log_interval", type=int, default=100,
                       help="iterations between training log lines (losses are read from the device only then)")
    group.add_argument("--check-freq", "--check_freq", dest="check_freq", type=int, default=500,
                       help="iterations between test-set evaluations and checkpoints")
    add_view_args(group)


def add_task_model_args(parser: argparse.ArgumentParser, default_mlp_sizes: list[int] | None = None) -> None:
    """--model (any registered core), --mlp-sizes, and the flags of every registered core."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="LSTM",
                       help=f"recurrent core: {', '.join(cls.name for cls in CORES.values())}")
    group.add_argument("--mlp-sizes", "--mlp_sizes", dest="mlp_sizes", type=int, nargs="*",
                       default=default_mlp_sizes or [], help="hidden layer sizes of the output MLP (ReLU between)")
    for cls in CORES.values():
        cls.add_args(parser)


def task_parser(description: str | None, default_mlp_sizes: list[int] | None = None) -> argparse.ArgumentParser:
    """A parser with the task loop's flags and every core's; the script adds its task's flags and defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_task_args(parser)
    add_task_model_args(parser, default_mlp_sizes)
    return parser


# --------------------------------------------------------------------------- the sequence tasks' published flags

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


def add_alias(parser: argparse.ArgumentParser, flag: str, *aliases: str) -> None:
    """Let `aliases` (e.g. the published single-dash spellings) name the same option as `flag`."""
    action = parser._option_string_actions[flag]
    for alias in aliases:
        if alias not in parser._option_string_actions:
            action.option_strings.append(alias)
            parser._option_string_actions[alias] = action


def sequence_task_parser(description: str | None) -> argparse.ArgumentParser:
    """Every flag of copy_task.py, adding_task.py and argmax_task.py, with the published copy task's defaults.

    The published single-dash spellings (`-lr -optim -batch_size -nhid -dropout -iterations
    -summarize_freq -check_freq -cuda -memory_type -sequence_max_length ...`) work beside the
    double-dash ones; the memory cores add theirs (`-rnn_type -nlayer -nhlayer -mem_slot -mem_size
    -read_heads -sparse_reads -temporal_reads`).
    """
    parser = task_parser(description)
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
                      help="the GPU to run on, a number as published: -cuda 0 is GPU 0, -cuda -1 the CPU, a bare "
                           "-cuda GPU 0 (the language-model scripts' --cuda is a plain switch; default: --device)")
    add_alias(parser, "--visdom", "-visdom")
    parser._option_string_actions["--visdom"].help = (
        "draw the memory heatmaps and the loss and test curves live in a running Visdom server (the heatmaps "
        "also go to the run folder's pictures/ as PNG files every -summarize_freq iterations, with or without it)")
    for flag, aliases in PUBLISHED_ALIASES.items():
        add_alias(parser, flag, *aliases)
    # Here the published -dropout / --dropout name --dropouth; say so, since the LM scripts' --dropout differs.
    parser._option_string_actions["--dropouth"].help = (
        "dropout between the recurrent layers of the controller (or core); -dropout and --dropout are its "
        "published spellings here, unlike the language-model scripts' --dropout (output dropout)")
    parser._option_string_actions["--model"].help += " (default: the one -memory_type picks)"
    parser.set_defaults(**PUBLISHED_DEFAULTS)
    return parser


def parse_sequence_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> Flags:
    """`parse_args`, then -cuda as a device and -memory_type as --model unless --model was typed."""
    flags = parse_args(parser, argv)
    args = flags.args
    if args.cuda is not None:
        args.device = "cpu" if args.cuda < 0 else f"cuda:{args.cuda}"
    args.cuda = False
    if args.model is None:
        args.model = MEMORY_CORES[args.memory_type]
    return flags


def default_generalisation_lengths(args: argparse.Namespace) -> list[int]:
    """1, 2, 5 and 10 times the longest training length the curriculum reaches in --iterations."""
    reached = args.sequence_max_length + args.curriculum_increment * (args.iterations // args.curriculum_freq)
    return sorted({reached * factor for factor in GENERALISATION_FACTORS})


# --------------------------------------------------------------------------- validation


def _require(args: argparse.Namespace, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
             prefix: str = "--") -> None:
    for name in positive + non_negative:
        value = getattr(args, name)
        if value is None:
            continue
        if value < 0 or (name in positive and value == 0):
            flag = prefix + (name if prefix == "-" else name.replace("_", "-"))
            raise UserInputError(f"{flag} must be {'positive' if name in positive else 'at least 0'}, got {value}")


def check_update_args(args: argparse.Namespace) -> None:
    """The flags every loop shares: the update, the schedule, logging, stopping."""
    _require(args, positive=("batch_size", "log_interval", "max_nonfinite"),
             non_negative=("clip", "wdecay", "patience", "plateau_threshold", "max_steps"))
    if not args.lr > 0:
        raise UserInputError(f"--lr must be above 0, got {args.lr}")
    if not 0 < args.lr_decay <= 1:
        raise UserInputError(f"--lr-decay must be in (0, 1] (1 turns the plateau schedule off), got {args.lr_decay}")
    distributed.share(args.batch_size, "--batch_size")
    if not 0 < args.visdom_port < 65536:
        raise UserInputError(f"--visdom-port must be a port number (1-65535), got {args.visdom_port}")


def check_lm_args(args: argparse.Namespace) -> None:
    """Reject flag values the language-model loop cannot use, naming the flag."""
    check_update_args(args)
    _require(args, positive=("eval_batch_size", "test_batch_size", "bptt"),
             non_negative=("epochs", "save_interval", "alpha", "beta", "nonmono"))
    if getattr(args, "save", None) and not Path(args.save).parent.is_dir():
        raise UserInputError(f"--save {args.save}: the folder {Path(args.save).parent} does not exist; create it "
                             f"or choose another path")
    if getattr(args, "onnx_export", ""):
        try:
            import onnx  # noqa: F401 (only whether it is installed)
        except ImportError:
            raise UserInputError("--onnx-export needs the onnx package: pip install onnx onnxscript") from None


# The flags of the output layers that split the vocabulary at --cutoffs (dest: as typed); a head that also
# takes --cutoffs adds its flag here.
CUTOFF_HEADS = {"adaptivesoftmax": "--adaptivesoftmax", "splitsoftmax": "--splitsoftmax"}


def check_softmax_args(args: argparse.Namespace) -> None:
    """--cutoffs without an output layer that uses them is an error: ignoring them would train a full
    softmax while the user believes the vocabulary is split (a warning scrolls past unread)."""
    cutoffs = getattr(args, "cutoffs", None)
    if cutoffs and not any(getattr(args, name, False) for name in CUTOFF_HEADS):
        heads = " or ".join(CUTOFF_HEADS.values())
        raise UserInputError(f"--cutoffs {' '.join(map(str, cutoffs))} only applies to an output layer that splits "
                             f"the vocabulary into clusters ({heads}); add one, or drop --cutoffs")


def check_task_args(args: argparse.Namespace) -> None:
    """Reject flag values the task loop cannot use, naming the flag."""
    check_update_args(args)
    _require(args, positive=("iterations", "test_size", "check_freq"))
    if args.seed <= args.test_seed < args.seed + distributed.world_size():
        rank = args.test_seed - args.seed
        which = "--seed" if rank == 0 else f"process {rank}'s seed (--seed + rank)"
        raise UserInputError(f"--test-seed equals {which} ({args.test_seed}), so the test set would repeat training "
                             f"examples; choose another --test-seed")


def check_sequence_args(args: argparse.Namespace) -> None:
    """Reject flag values the sequence loop cannot use, naming the flag (the curriculum checks its own)."""
    check_task_args(args)
    _require(args, positive=("sequence_max_length", "curriculum_freq"), non_negative=("curriculum_increment",),
             prefix="-")
    if args.generalisation_lengths is not None and min(args.generalisation_lengths) < 1:
        raise UserInputError(f"--generalisation-lengths must be positive, got {args.generalisation_lengths}")


# --------------------------------------------------------------------------- devices and the command line


def resolve_device(args: argparse.Namespace) -> torch.device:
    """--device / --cuda as a torch device; a one-line error when it does not exist here."""
    name = "cuda" if getattr(args, "cuda", False) else args.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("CUDA is not available on this machine; drop --cuda or use --device cpu")
    return device


# Exit statuses of `cli`: a run stopped by Ctrl-C or SIGTERM (its checkpoint saved) exits as the shell
# reports a process ended by that signal, 128 + its number, so a scheduler can tell it from a finished one.
EXIT_STATUS = {"interrupt": 130, "terminate": 143}
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's failure (a RuntimeError of c10's)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def cli(main: Callable[[list[str] | None], Any]) -> None:
    """Run a script's `main`, printing user-facing errors as one line instead of a traceback.

    Exit statuses: 0 finished (or stopped by --max-steps); 1 training cannot go on (`TrainingError`,
    e.g. persistent non-finite losses or a full disk; out of memory); 2 bad input (`UserInputError`);
    130 stopped by Ctrl-C, 143 by SIGTERM, after saving a resumable checkpoint (a second Ctrl-C
    leaves at once, also 130).
    """
    where = f" (rank {distributed.rank()})" if distributed.world_size() > 1 else ""
    try:
        result = main(None)
    except UserInputError as error:
        print(f"error{where}: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as error:
        print(f"error{where}: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"error{where}: interrupted before a checkpoint could be saved (a second Ctrl-C does not wait "
              f"for one); the checkpoints written before are kept", file=sys.stderr)
        sys.exit(EXIT_STATUS["interrupt"])
    except OSError as error:
        if error.errno not in DISK_ERRORS:
            raise
        from training.checkpoint import write_error_reason  # here: the checkpoint module imports this one

        print(f"error{where}: could not write {error.filename or 'a file'}: {write_error_reason(error)}; free "
              f"some space or choose a writable folder", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as error:
        if not out_of_memory(error):
            raise
        asked = re.search(r"allocate ([0-9.]+ ?[A-Za-z]+)", str(error))
        print(f"error{where}: out of memory{f' (asked for {asked.group(1)} more)' if asked else ''}; use shorter "
              f"sequences, a smaller batch or a smaller model", file=sys.stderr)
        sys.exit(1)
    if isinstance(result, dict) and result.get("stopped") in EXIT_STATUS:
        sys.exit(EXIT_STATUS[result["stopped"]])
