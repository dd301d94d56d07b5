"""AWD-LSTM language model (Merity et al. 2017, "Regularizing and optimizing LSTM language models").

Embedding 400 -> 3 weight-dropped LSTM layers (400 -> 1150 -> 1150 -> 400) -> tied softmax,
with variational dropout on inputs (--dropouti), between layers (--dropouth) and outputs
(--dropout), embedding dropout (--dropoute), DropConnect on hidden-to-hidden weights
(--wdrop), AR/TAR (--alpha/--beta), variable-length BPTT with the lr scaled by length, and
NT-ASGD: SGD until validation stops improving (--nonmono), then averaged SGD, evaluated and
saved with the averaged weights. `--model GRU` or `--model QRNN` swaps the cell (the QRNN
recipe: window 2 in the first layer, DropConnect on each layer's gate matrix); any other
registered core runs with the same regularisers except weight drop.

The softmax is the reference's split softmax over the tied decoder (`--splitsoftmax`, on by
default), with the reference's cutoffs for the vocabulary size: one cluster (the full softmax)
up to 75,000 words, 2800 20000 76000 above (WikiText-103), 4200 35000 180000 above 500,000;
`--cutoffs` chooses others, `--adaptivesoftmax` replaces it by the untied adaptive softmax.

    python main.py --batch_size 20 --data data/penn --dropouti 0.4 --dropouth 0.25 --seed 141 --epochs 500 --save PTB.pt
    python main.py --model QRNN --batch_size 20 --clip 0.2 --wdrop 0.1 --nhid 1550 --nlayers 4 --emsize 400 \
        --dropouth 0.3 --seed 9001 --dropouti 0.4 --epochs 550 --save PTB.pt
"""

import argparse

import models
import training
from models.awd import CELLS


def build_parser() -> argparse.ArgumentParser:
    parser = training.lm_parser(__doc__)
    parser.set_defaults(
        data="data/penn", model="LSTM", emsize=400, nhid=1150, nlayers=3, tied=True, locked_dropout=True,
        dropout=0.4, dropouth=0.3, dropouti=0.65, dropoute=0.1, wdrop=0.5, alpha=2.0, beta=1.0,
        optimizer="sgd", lr=30.0, clip=0.25, wdecay=1.2e-6, lr_decay=1.0, nonmono=5, variable_bptt=True,
        epochs=8000, batch_size=80, eval_batch_size=10, test_batch_size=1, bptt=70, seed=1111, log_interval=200,
    )
    # The reference always trains through its SplitCrossEntropyLoss, split by vocabulary size: the full
    # softmax up to 75,000 words (PTB, WikiText-2), WikiText-103's and One Billion Words' splits above.
    parser.set_defaults(splitsoftmax=True)
    return parser


def awd_config(args: argparse.Namespace, vocab_size: int) -> models.LMConfig:
    """`--model LSTM|GRU` is the AWD stack with that cell; other cores are used as they are."""
    if args.model.upper() in CELLS:
        stack = argparse.Namespace(**{**vars(args), "awd_cell": args.model.upper()})
        return models.lm_config_from_args(stack, vocab_size, core="AWD")
    return models.lm_config_from_args(args, vocab_size)


def main(argv: list[str] | None = None) -> dict:
    return training.run_language_model(training.parse_args(build_parser(), argv), script="main",
                                       config_fn=awd_config)


if __name__ == "__main__":
    training.cli(main)
