"""Fine-tune a language model saved by main.py with averaged SGD (AWD-LSTM's finetune.py).

Starts a new run from the checkpoint's weights, with averaged SGD from the first step,
evaluating and saving the averaged weights, and stops when validation loss is worse than
the best of all but the last --nonmono evaluations (or after --epochs).

    python finetune.py --checkpoint runs/main-20261121-101500 --batch_size 20 --data data/penn
    python finetune.py --save PTB.pt ...     # the reference's spelling: load PTB.pt, write the best model back
"""

import argparse
from pathlib import Path

import main as awd_main
import training
from errors import UserInputError


def build_parser() -> argparse.ArgumentParser:
    parser = awd_main.build_parser()
    parser.description = __doc__
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint or run folder of main.py to fine-tune (a folder means its best.pt)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = training.parse_args(build_parser(), argv)
    if args.resume:
        return training.run_language_model(args, script="finetune")
    start = args.checkpoint or args.save
    if start is None:
        raise UserInputError("finetune.py needs --checkpoint PATH (or --save PATH) of a model trained by main.py")
    path = Path(start)
    if path.is_dir() and (path / "best.pt").is_file():
        path = path / "best.pt"
    args.stop_when_nonmono = True
    return training.run_language_model(args, script="finetune", finetune_from=str(path))


if __name__ == "__main__":
    training.cli(main)
