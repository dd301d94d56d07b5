"""The training engine every script shares.

    flags.py       every shared flag group, `parse_args` -> `Flags`, validation, `cli`
    checkpoint.py  the checkpoint format: contents, atomic save, `load_checkpoint` (weights_only), format-1
                   migration, run folder -> best.pt, which flags may change on --resume
    run.py         run folders and log.jsonl, seeds, stop signals, the CPU allocator set-up
    loop.py        ONE `Trainer`: optimiser and schedule, mixed precision, the non-finite-safe update without
                   per-batch host syncs, the fit loop, save / restore, stops; `prepare` / `announce` for scripts
    lm.py          `LMTrainer` (truncated BPTT, validation, NT-ASGD, fine-tuning) and `run_language_model`
    tasks.py       `TaskTrainer`, `SequenceTaskTrainer` (curriculum, pictures) and `run_task` / `run_sequence_task`

A script is a parser with its paper's defaults and a call to `run_language_model`, `run_task` or
`run_sequence_task`, wrapped in `cli`.
"""

from errors import TrainingError, UserInputError
from training.checkpoint import (CHECKPOINT_FORMAT, best_checkpoint, check_model_flag, load_checkpoint,
                                 read_checkpoint, save_checkpoint)
from training.flags import (Flags, HelpFormatter, check_lm_args, check_task_args, cli,
                            default_generalisation_lengths, lm_parser, parse_args, parse_sequence_args, public_args,
                            resolve_device, sequence_task_parser, task_parser)
from training.lm import LMOptions, LMTrainer, check_vocabulary, evaluate, perplexity, run_language_model
from training.loop import LoopOptions, Trainer
from training.run import Run, StopSignals, seed_everything
from training.tasks import SequenceTaskTrainer, TaskOptions, TaskTrainer, run_sequence_task, run_task

__all__ = [
    "CHECKPOINT_FORMAT", "Flags", "HelpFormatter", "LMOptions", "LMTrainer", "LoopOptions", "Run",
    "SequenceTaskTrainer", "StopSignals", "TaskOptions", "TaskTrainer", "Trainer", "TrainingError", "UserInputError",
    "best_checkpoint", "check_lm_args", "check_model_flag", "check_task_args", "check_vocabulary", "cli",
    "default_generalisation_lengths", "evaluate", "lm_parser", "load_checkpoint", "parse_args", "parse_sequence_args",
    "perplexity", "public_args", "read_checkpoint", "resolve_device", "run_language_model", "run_sequence_task",
    "run_task", "save_checkpoint", "seed_everything", "sequence_task_parser", "task_parser",
]
