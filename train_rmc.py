"""Relational Memory Core language model (Santoro et al. 2018, "Relational recurrent neural networks").

The seed project's WikiText-2 setup (about 11M parameters): embedding 192 -> RMC with 1
memory slot, head size 192, 4 heads, 1 block, 3 attention-MLP layers, key size 64, forget
bias 1, input bias 0, unit gates -> projection of the 768-wide output to 192 -> dropout ->
softmax tied to the embedding (the seed's order: projection, then dropout); dropout 0.5 on
embeddings and after the projection; Adam lr 0.001 halved when validation has not improved
for 5 epochs; clip 0.1; batch 64, evaluation batch 32; bptt 100; 100 epochs. The decoder and
loss run once over each [T*B] window. `--adaptivesoftmax --cutoffs 1000 5000 20000` for
large vocabularies such as WikiText-103 feeds the 192-wide projection to the adaptive head,
as the seed does; `--no-dropout-after-projection` drops the 768-wide output first instead.
`--model LSTM` (or any core) for the same pipeline with another core.

    python train_rmc.py --data data/wikitext-2
    python train_rmc.py --data data/wikitext-103 --adaptivesoftmax --cutoffs 1000 5000 20000 --cuda
"""

import argparse

import training


def build_parser() -> argparse.ArgumentParser:
    parser = training.lm_parser(__doc__)
    parser.set_defaults(
        data="data/wikitext-2", model="RMC", emsize=192, mem_slots=1, head_size=192, num_heads=4, num_blocks=1,
        attention_mlp_layers=3, key_size=64, forget_bias=1.0, input_bias=0.0, gate_style="unit", dropout=0.5,
        tied=True, optimizer="adam", lr=0.001, clip=0.1, lr_decay=0.5, patience=5, plateau_threshold=1e-4,
        batch_size=64, eval_batch_size=32, bptt=100, epochs=100, log_interval=100,
        adaptive_projection="emsize", dropout_after_projection=True,
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    return training.run_language_model(training.parse_args(build_parser(), argv), script="train_rmc")


if __name__ == "__main__":
    training.cli(main)
