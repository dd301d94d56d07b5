"""Sample text from any language-model checkpoint of this repository (LSTM, GRU, RMC, ...).

    python generate_rmc.py --checkpoint runs/train_rnn-20261121-101500 --words 200 --temperature 0.8
    python generate_rmc.py --checkpoint best.pt --prompt "the company said" --top_k 40 --num_samples 3
    python generate.py --data data/penn --checkpoint PTB.pt          # AWD-LSTM's generate.py spelling

The original scripts' `--data` (the corpus the model was trained on: here the vocabulary comes with the
checkpoint, and a given --data is checked against it), `--model` (unused there and here: the checkpoint
holds the model) and `--log-interval` (a progress line on stderr every that many words) are accepted.

A run folder means its best.pt (or checkpoint.pt when no epoch has finished). `<eos>`
is printed as a line break. Works with full, adaptive and split softmax heads. Without --prompt the
text starts from a random word, so --words 5 prints 6 words. The default --seed is fixed: the
same command prints the same text; give another --seed for other text.
"""

import argparse
import sys
from pathlib import Path

import torch

import training
from data import EOS, Corpus, Dictionary
from errors import UserInputError

SEPARATOR = "---"  # the line between --num_samples texts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    parser.add_argument("--words", type=int, default=100,
                        help="number of words to sample after the prompt, or after the random first word when "
                             "there is no prompt (so --words 5 prints 6 words)")
    parser.add_argument("--temperature", type=float, default=1.0, help="higher is more diverse; must be > 0")
    parser.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=0,
                        help="sample only among the K most likely words (0: among all)")
    parser.add_argument("--num_samples", "--num-samples", dest="num_samples", type=int, default=1,
                        help="independent texts to print, each from the prompt (a line '---' between them)")
    parser.add_argument("--prompt", default="", help="words to start from (each must be in the vocabulary)")
    parser.add_argument("--seed", type=int, default=1111,
                        help="random seed; fixed by default, so the same command repeats the same text")
    parser.add_argument("--outf", default=None, help="also write the text to this file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cuda", action="store_true", help="use CUDA (same as --device cuda)")
    parser.add_argument("--data", default=None,
                        help="the corpus folder the model was trained on: its vocabulary must be the checkpoint's "
                             "(default: not checked; the vocabulary comes with the checkpoint)")
    parser.add_argument("--model", default=None, help="accepted for the original scripts; the checkpoint decides")
    parser.add_argument("--log-interval", "--log_interval", dest="log_interval", type=int, default=100,
                        help="a progress line on stderr every this many generated words")
    return parser


@torch.no_grad()
def generate(model, dictionary: Dictionary, words: int, temperature: float, prompt: list[str],
             generator: torch.Generator, device: torch.device, top_k: int = 0, log_interval: int = 0) -> list[str]:
    """Prompt words (a random word without a prompt) followed by `words` sampled words (a progress line on
    stderr every `log_interval`).

    Each word is drawn from softmax(log p / temperature), restricted to the `top_k` most likely
    words when `top_k` > 0.
    """
    state = model.initial_state(1, device)
    if prompt:
        tokens = dictionary.encode(prompt).to(device).view(-1, 1)  # [T, 1]
    else:
        tokens = torch.randint(len(dictionary), (1, 1), generator=generator).to(device)
        prompt = dictionary.decode(tokens.view(-1))
    features, state = model(tokens, state)
    out = list(prompt)
    for index in range(words):
        if log_interval and index % log_interval == 0:
            print(f"| generated {index}/{words} words", file=sys.stderr)
        log_probs = model.log_probs(features[-1, 0]) / temperature  # [V]
        if 0 < top_k < log_probs.numel():
            top = log_probs.topk(top_k)
            log_probs = torch.full_like(log_probs, float("-inf")).scatter(0, top.indices, top.values)
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
    if args.outf and not Path(args.outf).parent.is_dir():
        raise UserInputError(f"--outf {args.outf}: the folder {Path(args.outf).parent} does not exist; create it "
                             f"or choose another path")
    if args.log_interval < 0:
        raise UserInputError(f"--log-interval must be at least 0 (0: no progress lines), got {args.log_interval}")
    if args.top_k < 0:
        raise UserInputError(f"--top_k must be at least 0 (0: sample among all words), got {args.top_k}")
    if args.num_samples < 1:
        raise UserInputError(f"--num_samples must be at least 1, got {args.num_samples}")
    device = training.resolve_device(args)
    model, checkpoint = training.load_checkpoint(training.best_checkpoint(args.checkpoint), device,
                                                 kind="LanguageModel")
    note = training.check_model_flag(checkpoint, args.model)
    if note:
        print(note, file=sys.stderr)
    if args.data is not None:
        training.check_vocabulary(checkpoint, Corpus(args.data), args.data)
    dictionary = Dictionary(checkpoint["vocab"])
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    samples = [generate(model, dictionary, args.words, args.temperature, args.prompt.split(), generator, device,
                        args.top_k, args.log_interval) for _ in range(args.num_samples)]
    text = f"\n{SEPARATOR}\n".join(to_text(words) for words in samples)
    print(text)
    if args.outf:
        try:
            Path(args.outf).write_text(text + "\n")
        except OSError as error:
            raise UserInputError(f"--outf {args.outf}: could not write it ({error.strerror or error}); choose "
                                 f"another path") from None
        count = sum(len(words) for words in samples)
        print(f"| wrote {args.num_samples} sample(s), {count} words, to {args.outf}", file=sys.stderr)
    return text


if __name__ == "__main__":
    training.cli(main)
