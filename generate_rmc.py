"""Sample text from any language-model checkpoint of this repository (LSTM, GRU, RMC, ...).

    python generate_rmc.py --checkpoint runs/train_rnn-20261121-101500 --words 200 --temperature 0.8
    python generate_rmc.py --checkpoint best.pt --prompt "the company said"

A run folder means its best.pt (or checkpoint.pt when no epoch has finished). `<eos>`
is printed as a line break. Works with full, adaptive and split softmax heads.
"""

import argparse
import sys
from pathlib import Path

import torch

import training
from data import EOS, Dictionary
from errors import UserInputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    parser.add_argument("--words", type=int, default=100, help="number of words to generate")
    parser.add_argument("--temperature", type=float, default=1.0, help="higher is more diverse; must be > 0")
    parser.add_argument("--prompt", default="", help="words to start from (each must be in the vocabulary)")
    parser.add_argument("--seed", type=int, default=1111, help="random seed")
    parser.add_argument("--outf", default=None, help="also write the text to this file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cuda", action="store_true", help="use CUDA (same as --device cuda)")
    return parser


@torch.no_grad()
def generate(model, dictionary: Dictionary, words: int, temperature: float, prompt: list[str],
             generator: torch.Generator, device: torch.device) -> list[str]:
    """Prompt words followed by `words` sampled words."""
    state = model.initial_state(1, device)
    if prompt:
        tokens = dictionary.encode(prompt).to(device).view(-1, 1)  # [T, 1]
    else:
        tokens = torch.randint(len(dictionary), (1, 1), generator=generator).to(device)
        prompt = dictionary.decode(tokens.view(-1))
    features, state = model(tokens, state)
    out = list(prompt)
    for _ in range(words):
        log_probs = model.log_probs(features[-1, 0]) / temperature  # [V]
        word = torch.multinomial(log_probs.softmax(-1).cpu(), 1, generator=generator)
        out.append(dictionary.idx2word[int(word)])
        features, state = model(word.to(device).view(1, 1), state)
    return out


def to_text(words: list[str]) -> str:
    """Words as text, one line per `<eos>`."""
    lines, line = [], []
    for word in words:
        if word == EOS:
            lines.append(" ".join(line))
            line = []
        else:
            line.append(word)
    lines.append(" ".join(line))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    if args.temperature <= 0:
        raise UserInputError(f"--temperature must be above 0, got {args.temperature}")
    if args.words < 0:
        raise UserInputError(f"--words must be at least 0, got {args.words}")
    device = training.resolve_device(args)
    model, checkpoint = training.load_checkpoint(training.best_checkpoint(args.checkpoint), device,
                                                 kind="LanguageModel")
    dictionary = Dictionary(checkpoint["vocab"])
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    words = generate(model, dictionary, args.words, args.temperature, args.prompt.split(), generator, device)
    text = to_text(words)
    print(text)
    if args.outf:
        Path(args.outf).write_text(text + "\n")
        print(f"| wrote {len(words)} words to {args.outf}", file=sys.stderr)
    return text


if __name__ == "__main__":
    training.cli(main)
