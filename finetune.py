"""Fine-tune a language model saved by main.py with averaged SGD (AWD-LSTM's finetune.py).

Starts a new run from the checkpoint's weights, with averaged SGD from the first step,
evaluating and saving the averaged weights, and stops when validation loss is worse than
the best of all but the last --nonmono evaluations (or after --epochs).

    python finetune.py --checkpoint runs/main-20261121-101500 --batch_size 20 --data data/penn
    python finetune.py --save PTB.pt ...     # the reference's spelling: load PTB.pt, write the best model back
"""

import argparse

import main as awd_main
import training
from errors import UserInputError


def build_parser() -> argparse.ArgumentParser:
    parser = awd_main.build_parser()
    parser.description = __doc__
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint or run folder of main.py to fine-tune (a folder means its best.pt; default: --save)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    flags = training.parse_args(build_parser(), argv)
    if flags.args.resume:
        return training.run_language_model(flags, script="finetune")
    start = flags.args.checkpoint or flags.args.save
    if start is None:
        raise UserInputError("finetune.py needs --checkpoint PATH (or --save PATH) of a model trained by main.py")
    return training.run_language_model(flags, script="finetune",
                                       finetune_from=str(training.best_checkpoint(start)))


if __name__ == "__main__":
    training.cli(main)
