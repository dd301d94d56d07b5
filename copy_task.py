"""The copy task for the DNC, SAM and SDNC (Graves et al. 2016; Rae et al. 2016), with a length curriculum.

The network sees random binary vectors, an end marker, then blank steps during which it must
output the vectors again (tasks/copy.py; -input_size counts the marker channel, so 6 means
5-bit vectors). Each iteration trains on a fresh batch of one length drawn uniformly from 1 to
the curriculum's maximum, which starts at -sequence_max_length and grows by
-curriculum_increment every -curriculum_freq iterations. Loss and metrics cover the copy phase
only; the headline figure is bit errors per sequence on a fixed test set. At the end the model
copies longer sequences than it trained on (the generalisation curve, --generalisation-lengths).

Defaults are the published pytorch-dnc copy_task.py's: a DNC (-memory_type dnc) with an LSTM
controller of 64 units (1 layer of 2 recurrent layers), 16 cells of 20, 4 read heads; Adam at
1e-4 (betas 0.9, 0.98), gradient clipping 50, batch 100, maximum length 4, no curriculum,
100,000 iterations, a summary every 100 (-summarize_freq) and a test and checkpoint every 100
(-check_freq). Any core works with --model (e.g. --model LSTM as a baseline).

    python copy_task.py -cuda 0 -lr 0.001 -rnn_type lstm -nlayer 1 -nhlayer 2 -dropout 0 -mem_slot 32 \\
        -batch_size 1000 -optim adam -sequence_max_length 8
    python copy_task.py -memory_type sam -mem_slot 32 -sparse_reads 4 -visdom     # watch it in Visdom
    python copy_task.py -sequence_max_length 2 -curriculum_increment 1 -curriculum_freq 1000
"""

import os

# PyTorch backs large CPU tensors with huge pages when this is set before its first allocation: the
# DNC's fresh link matrix every step (32 MiB at batch 8 and 1,024 cells) then page-faults far less
# (about a third of the step time without it; see bench/bench_dnc.py). Set it to 0 to turn it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402

import training  # noqa: E402
from models.dnc.visualize import MemoryPictures  # noqa: E402
from tasks.copy import CopyTask  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return training.sequence_task_parser(__doc__)  # the published copy task's defaults


def make_task(args: argparse.Namespace) -> CopyTask:
    return CopyTask(bits=args.input_size - 1)


def main(argv: list[str] | None = None) -> dict:
    return training.run_sequence_task(training.parse_sequence_args(build_parser(), argv), script="copy_task",
                                      make_task=make_task, pictures=MemoryPictures.from_args)


if __name__ == "__main__":
    training.cli(main)
