"""LSTM baseline of the RMC language-model benchmark (Santoro et al. 2018).

Embedding 300 -> 1-layer LSTM 300 -> tied softmax, dropout 0.5, Adam lr 0.001 halved on a
validation plateau of 5 epochs, clip 0.1, batch 64, evaluation batch 32, bptt 100, 100 epochs
(the seed project's train_rnn.py). With `--adaptivesoftmax` the dropped LSTM output goes
through a Linear(nhid, nhid) before the adaptive head, as in the seed's RNNModel. `--rnn-impl loop`
runs the same weights through an explicit per-step cell (the benchmark's "fair" loop);
`--model GRU` (or any registered core) swaps the core.

    python train_rnn.py --data data/wikitext-2
"""

import argparse

import training


def build_parser() -> argparse.ArgumentParser:
    parser = training.lm_parser(__doc__)
    parser.set_defaults(
        data="data/wikitext-2", model="LSTM", emsize=300, nhid=300, nlayers=1, dropout=0.5, tied=True,
        optimizer="adam", lr=0.001, clip=0.1, lr_decay=0.5, patience=5, plateau_threshold=1e-4,
        batch_size=64, eval_batch_size=32, bptt=100, epochs=100, log_interval=100, adaptive_projection="core",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    return training.run_language_model(training.parse_args(build_parser(), argv), script="train_rnn")


if __name__ == "__main__":
    training.cli(main)
