"""The adding task for the DNC, SAM and SDNC: trained on sequences up to ~100 steps, tested up to ~1000.

Two variants (tasks/adding.py), picked with --variant:

- published (the default), as pytorch-dnc's tasks/adding_task.py: one-hot digits 0 .. V-1 and
  an end step (-input_size 6: V = 5 and the end channel); the outputs of every step are decoded
  (summed over their channels) and summed, and that answer should be the sum of the digits.
  Loss: its squared error. Reported: the mean absolute error of the answer and the fraction of
  answers that round to the sum (answering the expected sum 2L scores 11.3 and 2.8 % at L = 100).
- standard (Hochreiter & Schmidhuber 1997): (value, marker) pairs, -input_size 2; two steps are
  marked, one in each half, and at the last step the network outputs the sum of the two marked
  values. Loss: its squared error. Reported: the mean squared error and the fraction of answers
  within 0.04 (always answering 1 scores 0.167 and 7.8 %).

Training lengths are drawn uniformly from 2 to -sequence_max_length (100, with the curriculum
flags as in copy_task.py); the test set covers that range evenly, and at the end the model is
measured at 100, 200, 500 and 1000 steps (--generalisation-lengths), the published script's
ten-fold test range. -input_size and -iterations default to the variant's: 6 and 2,000 (the
published adding task's) for published, 2 and 100,000 for standard. The other defaults are the
published pytorch-dnc task scripts' (DNC with a 64-unit LSTM controller, 16 cells of 20, 4 read
heads, Adam at 1e-4, clipping 50, batch 100); any core works with --model.

    python adding_task.py -lr 0.001
    python adding_task.py --variant standard -lr 0.001 -iterations 20000
    python adding_task.py -memory_type sdnc -mem_slot 64 -sparse_reads 4 -temporal_reads 2
    python adding_task.py --model LSTM --nhid 128 -lr 0.001          # the LSTM baseline
"""

import os

# PyTorch backs large CPU tensors with huge pages when this is set before its first allocation: the
# DNC's fresh link matrix every step (32 MiB at batch 8 and 1,024 cells) then page-faults far less
# (about a third of the step time without it; see bench/bench_dnc.py). Set it to 0 to turn it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402

import training  # noqa: E402
from models.dnc.visualize import MemoryPictures  # noqa: E402
from tasks.adding import AddingTask, DigitAddingTask  # noqa: E402

# Each variant's -input_size and -iterations, used unless typed.
VARIANT_DEFAULTS = {"published": {"input_size": 6, "iterations": 2000},
                    "standard": {"input_size": 2, "iterations": 100000}}


def build_parser() -> argparse.ArgumentParser:
    parser = training.sequence_task_parser(__doc__)
    parser.add_argument_group("adding task").add_argument(
        "--variant", choices=sorted(VARIANT_DEFAULTS), default="published",
        help="published: one-hot digits, the decoded outputs summed (pytorch-dnc); "
             "standard: (value, marker) pairs (Hochreiter & Schmidhuber)")
    parser.set_defaults(input_size=None, iterations=None, sequence_max_length=100)
    for flag, (published, standard) in {"-input_size": (6, 2), "-iterations": (2000, 100000)}.items():
        parser._option_string_actions[flag].help += f" (default: {published} published, {standard} standard)"
    return parser


def parse_args(argv: list[str] | None = None) -> training.Flags:
    """The flags, with -input_size and -iterations from --variant where not typed."""
    flags = training.parse_sequence_args(build_parser(), argv)
    for name, value in VARIANT_DEFAULTS[flags.args.variant].items():
        if getattr(flags.args, name) is None:
            setattr(flags.args, name, value)
    return flags


def make_task(args: argparse.Namespace) -> AddingTask | DigitAddingTask:
    if args.variant == "published":
        if args.input_size == 2:  # e.g. resuming a standard run saved before --variant existed
            raise ValueError("-input_size 2 is the standard variant's (value, marker) pairs: add --variant standard, "
                             "or give the published variant -input_size 3 or more")
        return DigitAddingTask(values=args.input_size - 1)
    if args.input_size != 2:
        raise ValueError(f"the standard adding problem's inputs are (value, marker) pairs: -input_size must be 2, "
                         f"got {args.input_size}")
    return AddingTask()


def main(argv: list[str] | None = None) -> dict:
    return training.run_sequence_task(parse_args(argv), script="adding_task", make_task=make_task,
                                      pictures=MemoryPictures.from_args)


if __name__ == "__main__":
    training.cli(main)
