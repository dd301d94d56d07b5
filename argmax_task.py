"""The argmax task for the DNC, SAM and SDNC: at the last step, name the position of the largest digit.

The network sees one digit per step (one-hot over -input_size - 1 values), then a query step;
there it must name the position of the largest digit, the first one on ties (tasks/argmax.py).
Loss: cross-entropy over positions; reported: accuracy. Training lengths are drawn uniformly
from 2 to -sequence_max_length (4, with the curriculum flags as in copy_task.py); at the end the
model is measured on longer sequences (--generalisation-lengths; by default 1, 2, 5 and 10 times
the longest training length). The output layer names as many positions as the longest of those
lengths, and the curriculum stops growing there.

Defaults are the published pytorch-dnc argmax_task.py's where it sets them (-input_size 6,
-nhid 100, maximum length 4) and its copy task's otherwise (DNC, 16 cells of 20, 4 read heads,
Adam at 1e-4, clipping 50, batch 100); any core works with --model.

    python argmax_task.py -lr 0.001 -iterations 20000
    python argmax_task.py -memory_type sam -sequence_max_length 8 -curriculum_increment 2
"""

import os

# PyTorch backs large CPU tensors with huge pages when this is set before its first allocation: the
# DNC's fresh link matrix every step (32 MiB at batch 8 and 1,024 cells) then page-faults far less
# (about a third of the step time without it; see bench/bench_dnc.py). Set it to 0 to turn it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402

import training  # noqa: E402
from models.dnc.visualize import MemoryPictures  # noqa: E402
from tasks.argmax import ArgmaxTask  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = training.sequence_task_parser(__doc__)
    parser.set_defaults(nhid=100)
    return parser


def make_task(args: argparse.Namespace) -> ArgmaxTask:
    return ArgmaxTask(values=args.input_size - 1, positions=max(args.generalisation_lengths))


def main(argv: list[str] | None = None) -> dict:
    return training.run_sequence_task(training.parse_sequence_args(build_parser(), argv), script="argmax_task",
                                      make_task=make_task, pictures=MemoryPictures.from_args)


if __name__ == "__main__":
    training.cli(main)
