"""Evaluate a language model with the continuous cache pointer (Grave et al. 2016; AWD-LSTM's pointer.py).

The model runs over each split with batch size 1 in windows of --bptt tokens; the last
recurrent layer's output at each position is the cache key and query, and the cache's
distribution over the last --window positions' next words is mixed into the softmax with
weight --lambdasm. The cache is computed by `models.cache_pointer.cache_pointer`, a chunk of
queries at a time (tests check it against a per-token reference). Prints perplexity with
and without the cache.

The defaults are the reference pointer.py's own: its tuned WikiText-2 values (window 3785,
theta 0.6625523432485668, lambda 0.12785920428335693) with --bptt 5000. Its README runs Penn
Treebank with --lambdasm 0.1 --theta 1.0 --window 500, given on the command line as below.

    python pointer.py --checkpoint runs/main-... --data data/penn --lambdasm 0.1 --theta 1.0 --window 500 --bptt 5000
    python pointer.py --save WT2.pt --data data/wikitext-2 --lambdasm 0.1279 --theta 0.662 --window 3785 --bptt 2000

`--model` (the reference's type of network) is accepted; the checkpoint holds the model and decides.
"""

import argparse
import json
import time
from pathlib import Path

import torch

import training
from data import Corpus, batchify, get_batch
from errors import UserInputError
from models.cache_pointer import cache_pointer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    parser.add_argument("--checkpoint", "--save", dest="checkpoint", required=True,
                        help="language-model checkpoint, or a run folder (its best.pt)")
    parser.add_argument("--data", default="data/penn", help="corpus folder the model was trained on")
    parser.add_argument("--splits", nargs="+", choices=("valid", "test"), default=["valid", "test"],
                        help="the splits to evaluate")
    # The reference pointer.py's defaults (tuned on WikiText-2), to the digit.
    parser.add_argument("--window", type=int, default=3785, help="cache size in positions")
    parser.add_argument("--theta", type=float, default=0.6625523432485668,
                        help="inverse temperature of the cache attention")
    parser.add_argument("--lambdasm", type=float, default=0.12785920428335693,
                        help="weight of the cache in the mixture")
    parser.add_argument("--bptt", type=int, default=5000, help="tokens per forward window")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cuda", action="store_true", help="use CUDA (same as --device cuda)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--model", default=None, help="accepted for the reference's commands; the checkpoint decides")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="smoke test: the first two --bptt windows of each split only")
    return parser


@torch.no_grad()
def forward_split(model, tokens: torch.Tensor, bptt: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Run the model over a token stream with batch 1.

    Returns:
        hidden [N, H] (the core's raw output, the cache keys and queries), targets [N] and the
        model's log-probability of each target [N], for the N = len(tokens) - 1 positions.
    """
    model.eval()
    source = batchify(tokens, 1, device)  # [N + 1, 1]
    state = model.initial_state(1, device)
    hidden, targets, log_probs = [], [], []
    for start in range(0, source.size(0) - 1, bptt):
        inputs, window_targets = get_batch(source, start, bptt)
        features, state, (raw, _) = model(inputs, state, return_outputs=True)
        hidden.append(raw[:, 0])  # [T, 1, H] -> [T, H]
        targets.append(window_targets[:, 0])
        log_probs.append(model.target_log_probs(features, window_targets)[:, 0])
    return torch.cat(hidden), torch.cat(targets), torch.cat(log_probs)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.window < 1 or args.bptt < 1:
        raise UserInputError(f"--window and --bptt must be positive, got {args.window} and {args.bptt}")
    if not 0 <= args.lambdasm <= 1:
        raise UserInputError(f"--lambdasm must be in [0, 1], got {args.lambdasm}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = training.resolve_device(args)
    model, checkpoint = training.load_checkpoint(training.best_checkpoint(args.checkpoint), device,
                                                 kind="LanguageModel")
    note = training.check_model_flag(checkpoint, args.model)
    if note:
        print(note)
    corpus = Corpus(args.data)
    training.check_vocabulary(checkpoint, corpus, args.data)
    results = {}
    for split in args.splits:
        started = time.perf_counter()
        tokens = getattr(corpus, split)
        if args.dry_run:
            tokens = tokens[:2 * args.bptt + 1]
        hidden, targets, log_probs = forward_split(model, tokens, args.bptt, device)
        forward_seconds = time.perf_counter() - started
        started = time.perf_counter()
        mixed = cache_pointer(hidden, targets, log_probs, args.window, args.theta, args.lambdasm)
        cache_seconds = time.perf_counter() - started
        plain_ppl = training.perplexity(-log_probs.double().mean().item())
        cache_ppl = training.perplexity(-mixed.double().mean().item())
        results[split] = {"ppl": plain_ppl, "cache_ppl": cache_ppl, "relative_gain": 1 - cache_ppl / plain_ppl,
                          "tokens": targets.numel(), "forward_s": forward_seconds, "cache_s": cache_seconds}
        print(f"| {split:5s} | ppl {plain_ppl:8.2f} | with cache {cache_ppl:8.2f} | "
              f"gain {100 * (1 - cache_ppl / plain_ppl):5.1f}% | forward {forward_seconds:6.1f} s | "
              f"cache {cache_seconds:5.2f} s | {targets.numel():,} tokens")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    training.cli(main)
