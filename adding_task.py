"""The adding problem for the DNC, SAM and SDNC: trained on sequences up to ~100 steps, tested up to ~1000.

Each step shows a value in [0, 1) and a marker; two steps are marked, one in each half of the
sequence, and at the last step the network outputs the sum of the two marked values
(tasks/adding.py, Hochreiter & Schmidhuber 1997). Loss: the squared error of that answer.
Reported: the mean squared error and the fraction of answers within 0.04 of the sum (always
answering 1 scores an MSE of 0.167 and 7.8 %). Training lengths are drawn uniformly from 2 to
-sequence_max_length (100, with the curriculum flags as in copy_task.py); the test set covers
that range evenly, and at the end the model is measured at 100, 200, 500 and 1000 steps
(--generalisation-lengths).

The inputs are (value, marker) pairs, so -input_size is 2. The other defaults are the
published pytorch-dnc task scripts' (DNC with a 64-unit LSTM controller, 16 cells of 20, 4 read
heads, Adam at 1e-4, clipping 50, batch 100); any core works with --model.

    python adding_task.py -lr 0.001 -nhid 64 -batch_size 100 -iterations 20000
    python adding_task.py -memory_type sdnc -mem_slot 64 -sparse_reads 4 -temporal_reads 2
    python adding_task.py --model LSTM --nhid 128 -lr 0.001          # the LSTM baseline
"""

import argparse

import task_training
import training
from tasks.adding import AddingTask


def build_parser() -> argparse.ArgumentParser:
    parser = task_training.sequence_task_parser(__doc__)
    parser.set_defaults(input_size=2, sequence_max_length=100)
    return parser


def make_task(args: argparse.Namespace) -> AddingTask:
    if args.input_size != 2:
        raise ValueError(f"the adding problem's inputs are (value, marker) pairs: -input_size must be 2, "
                         f"got {args.input_size}")
    return AddingTask()


def main(argv: list[str] | None = None) -> dict:
    args = task_training.parse_sequence_args(build_parser(), argv)
    return task_training.run_sequence_task(args, script="adding_task", make_task=make_task)


if __name__ == "__main__":
    training.cli(main)
