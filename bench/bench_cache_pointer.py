"""Continuous cache pointer: chunked `cache_pointer` against the `cache_pointer_ref` loop, and against the RNN forward.

Penn Treebank settings of AWD-LSTM's `pointer.py` (`--lambdasm 0.1 --theta 1.0 --window 500 --bptt 5000`)
on a stream the size of PTB's validation set (N = 73,760 tokens), batch size 1. The cache's inputs are
random and seeded: hidden states tanh(N(0, 1)) of size 400 (the size of AWD-LSTM's last layer), word
ids drawn from a Zipf law over 10,000 words (so words repeat inside the window and the pointer mass
is not all zero) and vocabulary log-probabilities uniform in [-10, 0].

Three things are timed in one run:

- `cache_pointer` over all N positions, once per `--chunk-sizes` value, median of `--repeats` runs;
- `cache_pointer_ref`, the per-token loop, once over the first `--ref-tokens` positions (all N by
  default); with a prefix, the time is scaled to N by the number of positions that use the pointer
  (those after the first `window + 1`), and the output says so. Both are compared on that prefix;
- the forward pass of an AWD-LSTM-sized model over the same N tokens at batch 1 in windows of `--bptt`,
  carrying the state, under `no_grad`: embedding 10,000 x 400, three single-layer `nn.LSTM`
  400 -> 1150, 1150 -> 1150, 1150 -> 400, a linear decoder to 10,000 words, `log_softmax` and the
  gather of each target's log-probability. Random weights (PyTorch's default initialisation): the time
  does not depend on them. Reported split into the recurrent part (embedding and LSTMs) and the head.

The share of the cache is cache / (forward + cache), that is, of the whole pointer evaluation.

Run from the repository root:

    python bench/bench_cache_pointer.py                              # 1 thread, PTB validation size
    python bench/bench_cache_pointer.py --ref-tokens 10000 --chunk-sizes 64 512 --no-forward
    python bench/bench_cache_pointer.py --device cuda --threads 1

Shapes: `N` tokens, `D` hidden size, `V` vocabulary size, `T` tokens in a bptt window.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as `python bench/bench_cache_pointer.py` from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from models.cache_pointer import cache_pointer, cache_pointer_ref  # noqa: E402
from bench.common import machine_info, synchronize, write_results  # noqa: E402

EMSIZE = 400
LSTM_SIZES = ((400, 1150), (1150, 1150), (1150, 400))  # AWD-LSTM: 3 layers, 1150 hidden, last layer tied to 400


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=73760, help="tokens in the stream (73760: PTB validation)")
    parser.add_argument("--hidden", type=int, default=400, help="size D of the cached hidden states")
    parser.add_argument("--vocab", type=int, default=10000, help="vocabulary size (10000: PTB)")
    parser.add_argument("--window", type=int, default=500, help="pointer window length")
    parser.add_argument("--theta", type=float, default=1.0, help="inverse temperature of the pointer attention")
    parser.add_argument("--lambdasm", "--lambdah", dest="lambdah", type=float, default=0.1,
                        help="weight of the pointer distribution in the mixture")
    parser.add_argument("--bptt", type=int, default=5000,
                        help="tokens per forward window; also passed to the cache, which then scores the first "
                             "position of each later window by the vocabulary alone, as pointer.py does")
    parser.add_argument("--chunk-sizes", "--chunk_sizes", dest="chunk_sizes", type=int, nargs="+", default=[128, 256, 1024],
                        help="queries per score matrix in cache_pointer; each is timed")
    parser.add_argument("--ref-tokens", "--ref_tokens", dest="ref_tokens", type=int, default=None,
                        help="time cache_pointer_ref on this prefix of the stream and scale to --n (default: all)")
    parser.add_argument("--original-tokens", "--original_tokens", dest="original_tokens", type=int, default=1501,
                        help="prefix on which to time the original pointer.py's algorithm (one-hot history over "
                             "the vocabulary, one token at a time), scaled per pointer position to N (0: skip)")
    parser.add_argument("--forward", action=argparse.BooleanOptionalAction, default=True,
                        help="time the AWD-LSTM-sized forward pass (several minutes on one CPU thread)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (intra-op CPU threads)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of cache_pointer per chunk size")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the weights")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    for name in ("n", "hidden", "vocab", "window", "bptt", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if min(args.chunk_sizes) < 1:
        parser.error(f"--chunk-sizes must be positive, got {args.chunk_sizes}")
    if not 0.0 <= args.lambdah <= 1.0:
        parser.error(f"--lambdasm must lie in [0, 1], got {args.lambdah}")
    if args.n <= args.window + 1:
        parser.error(f"--n {args.n} leaves no position for the pointer; it must exceed --window + 1 "
                     f"= {args.window + 1}")
    if args.ref_tokens is None:
        args.ref_tokens = args.n
    if not args.window + 1 < args.ref_tokens <= args.n:
        parser.error(f"--ref-tokens must lie in ({args.window + 1}, --n = {args.n}], got {args.ref_tokens}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available on this machine; use --device cpu")
    return args


def random_stream(
    num_tokens: int, hidden_size: int, vocab_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, D] in (-1, 1), Zipf-distributed word ids [N + 1] and target log-probabilities [N]."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).tanh()
    word_weights = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)  # Zipf: frequency ~ 1 / rank
    words = torch.multinomial(word_weights, num_tokens + 1, replacement=True, generator=generator)
    target_log_probs = -10 * torch.rand(num_tokens, generator=generator)
    return hidden, words, target_log_probs


@torch.no_grad()
def original_pointer_per_token(
    hidden: torch.Tensor, targets: torch.Tensor, vocab_probs: torch.Tensor, window: int, theta: float,
    lambdah: float,
) -> torch.Tensor:
    """AWD-LSTM pointer.py's algorithm, re-typed for timing: per token, a dense [window, V] one-hot history.

    hidden [N, D], targets [N], vocab_probs [N, V] (softmax output) -> log p(targets) [N].
    """
    next_word_history = torch.nn.functional.one_hot(targets, vocab_probs.size(1)).float()  # [N, V]
    out = torch.empty(targets.numel())
    for position in range(targets.numel()):
        probs = vocab_probs[position]
        if position > window:
            valid_next_word = next_word_history[position - window : position]  # [W, V]
            logits = torch.mv(hidden[position - window : position], hidden[position])  # [W]
            attention = torch.softmax(theta * logits, dim=0).view(-1, 1)  # [W, 1]
            pointer_probs = (attention.expand_as(valid_next_word) * valid_next_word).sum(0)  # [V]
            probs = lambdah * pointer_probs + (1 - lambdah) * probs
        out[position] = torch.log(probs[targets[position]])
    return out


def timed(function, device: torch.device):
    """(seconds, result) of one call, synchronising the device around it."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


class AWDLSTMSizedModel(nn.Module):
    """Embedding, three single-layer LSTMs and a decoder, the sizes of AWD-LSTM on PTB (no dropout: evaluation)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.encoder = nn.Embedding(vocab_size, EMSIZE)
        self.rnns = nn.ModuleList([nn.LSTM(input_size, hidden_size) for input_size, hidden_size in LSTM_SIZES])
        self.decoder = nn.Linear(EMSIZE, vocab_size)

    def recurrent(self, tokens: torch.Tensor, states: list | None) -> tuple[torch.Tensor, list]:
        """tokens [T, 1] -> the last layer's output [T, D] and the LSTMs' states."""
        output = self.encoder(tokens)  # [T, 1, E]
        states = states or [None] * len(self.rnns)
        new_states = []
        for rnn, state in zip(self.rnns, states):
            output, state = rnn(output, state)
            new_states.append(state)
        return output.squeeze(1), new_states  # [T, 1, D] -> [T, D]

    def target_log_probs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden [T, D], targets [T] -> log p_vocab(target) [T]."""
        log_probs = F.log_softmax(self.decoder(hidden), dim=-1)  # [T, V]
        return log_probs.gather(1, targets[:, None]).squeeze(1)  # [T, 1] -> [T]


def time_forward(model: AWDLSTMSizedModel, words: torch.Tensor, bptt: int, device: torch.device) -> dict:
    """Seconds of the recurrent part and of the head over the stream words[:-1] -> words[1:], in windows of bptt."""
    num_tokens = words.numel() - 1
    recurrent_seconds = head_seconds = 0.0
    states = None
    with torch.no_grad():
        model.recurrent(words[:50, None], None)  # warm-up: first-call allocations and kernel selection
        for start in range(0, num_tokens, bptt):
            end = min(start + bptt, num_tokens)
            inputs, targets = words[start:end, None], words[start + 1 : end + 1]  # [T, 1], [T]
            seconds, (hidden, states) = timed(lambda: model.recurrent(inputs, states), device)
            recurrent_seconds += seconds
            seconds, _ = timed(lambda: model.target_log_probs(hidden, targets), device)
            head_seconds += seconds
            print(f"  forward: {end}/{num_tokens} tokens", file=sys.stderr, flush=True)
    return {
        "recurrent_s": recurrent_seconds,
        "head_s": head_seconds,
        "forward_s": recurrent_seconds + head_seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = args.device
    machine = machine_info(device)
    print(
        f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['threads']} torch threads, "
        f"torch {machine['torch']}, Python {machine['python']}, device {machine.get('gpu', machine['device'])}"
    )
    print(
        f"stream: N {args.n}, D {args.hidden}, vocab {args.vocab}, window {args.window}, theta {args.theta:g}, "
        f"lambda {args.lambdah:g}, bptt {args.bptt}; random seeded data (seed {args.seed})"
    )
    hidden, words, target_log_probs = random_stream(args.n, args.hidden, args.vocab, args.seed)
    hidden, words, target_log_probs = hidden.to(device), words.to(device), target_log_probs.to(device)
    targets = words[1:]
    pointer = dict(window=args.window, theta=args.theta, lambdah=args.lambdah, bptt=args.bptt)

    chunk_rows = []
    full_result = None
    for chunk_size in args.chunk_sizes:
        timed(lambda: cache_pointer(hidden[: 2 * args.window + 2], targets[: 2 * args.window + 2],
                                    target_log_probs[: 2 * args.window + 2], chunk_size=chunk_size, **pointer), device)
        seconds = []
        for _ in range(args.repeats):
            elapsed, full_result = timed(
                lambda: cache_pointer(hidden, targets, target_log_probs, chunk_size=chunk_size, **pointer), device
            )
            seconds.append(elapsed)
        chunk_rows.append({"chunk_size": chunk_size, "cache_s": statistics.median(seconds), "all_s": seconds})
        print(f"  cache_pointer, chunk {chunk_size}: {statistics.median(seconds):.3f} s", file=sys.stderr, flush=True)

    prefix = args.ref_tokens
    ref_seconds, ref_result = timed(
        lambda: cache_pointer_ref(hidden[:prefix], targets[:prefix], target_log_probs[:prefix], **pointer), device
    )
    pointer_positions_prefix = prefix - (args.window + 1)
    pointer_positions_all = args.n - (args.window + 1)
    ref_scaled_seconds = ref_seconds * pointer_positions_all / pointer_positions_prefix
    max_difference = (full_result[:prefix].double() - ref_result.double()).abs().max().item()
    mean_nll = {
        "vocabulary alone": -target_log_probs.double().mean().item(),
        "with the cache": -full_result.double().mean().item(),
    }

    original = None
    if args.original_tokens:
        prefix_original = min(args.original_tokens, args.n)
        # a full vocabulary distribution per token, as the original needs, whose target entries match ours
        generator = torch.Generator().manual_seed(args.seed)
        vocab_logits = torch.randn(prefix_original, args.vocab, generator=generator)
        vocab_logits[torch.arange(prefix_original), targets[:prefix_original].cpu()] = -1e9
        target_p = target_log_probs[:prefix_original].cpu().double().exp().float()
        vocab_probs = torch.softmax(vocab_logits, dim=1) * (1 - target_p).unsqueeze(1)
        vocab_probs[torch.arange(prefix_original), targets[:prefix_original].cpu()] = target_p
        original_seconds, original_result = timed(lambda: original_pointer_per_token(
            hidden[:prefix_original].cpu(), targets[:prefix_original].cpu(), vocab_probs, args.window, args.theta,
            args.lambdah), torch.device("cpu"))
        positions = max(1, prefix_original - (args.window + 1))
        original = {
            "tokens": prefix_original, "seconds": original_seconds,
            "us_per_pointer_position": 1e6 * original_seconds / positions,
            "seconds_for_n": original_seconds * pointer_positions_all / positions,
            "max_difference": (original_result.double()
                               - cache_pointer_ref(hidden[:prefix_original], targets[:prefix_original],
                                                   target_log_probs[:prefix_original], args.window, args.theta,
                                                   args.lambdah).cpu().double()).abs().max().item(),
        }

    forward = None
    if args.forward:
        model = AWDLSTMSizedModel(args.vocab).to(device).eval()
        forward = time_forward(model, words, args.bptt, device)

    print()
    if prefix == args.n:
        print(f"cache_pointer_ref: {ref_seconds:.2f} s over all {args.n} tokens "
              f"({1e6 * ref_seconds / pointer_positions_all:.1f} us per pointer position)")
    else:
        print(f"cache_pointer_ref: {ref_seconds:.2f} s over the first {prefix} tokens, "
              f"{1e6 * ref_seconds / pointer_positions_prefix:.1f} us per pointer position; scaled to {args.n} "
              f"tokens by {pointer_positions_all}/{pointer_positions_prefix} pointer positions: "
              f"{ref_scaled_seconds:.2f} s (an estimate, not a measurement)")
    print(f"max |cache_pointer - cache_pointer_ref| over those {prefix} tokens: {max_difference:.1e} "
          f"(log-probabilities; cache_pointer in float32, the reference in float64)")
    print(f"mean NLL of the random stream: {mean_nll['vocabulary alone']:.4f} vocabulary alone, "
          f"{mean_nll['with the cache']:.4f} with the cache")
    if original is not None:
        print(f"original pointer.py algorithm (one-hot history, per token): {original['seconds']:.2f} s over the first "
              f"{original['tokens']} tokens, {original['us_per_pointer_position']:.0f} us per pointer position; "
              f"scaled to {args.n} tokens: {original['seconds_for_n']:.1f} s (an estimate); "
              f"max |original - cache_pointer_ref| {original['max_difference']:.1e}")
    if forward is not None:
        print(f"forward over {args.n} tokens, batch 1, bptt {args.bptt}: {forward['forward_s']:.2f} s "
              f"(embedding + 3 LSTMs {forward['recurrent_s']:.2f} s, decoder + log_softmax + gather "
              f"{forward['head_s']:.2f} s)")
    header = f"{'chunk':>6}  {'cache s':>8}  {'ref s (N)':>10}  {'speed-up':>8}  {'cache share':>11}"
    print(header)
    print("-" * len(header))
    for row in chunk_rows:
        row["ref_s_for_n"] = ref_scaled_seconds
        row["speed_up"] = ref_scaled_seconds / row["cache_s"]
        share = "-"
        if forward is not None:
            row["cache_share"] = row["cache_s"] / (forward["forward_s"] + row["cache_s"])
            row["ref_share"] = ref_scaled_seconds / (forward["forward_s"] + ref_scaled_seconds)
            share = f"{100 * row['cache_share']:.2f} %"
        if original is not None:
            row["speed_up_over_original"] = original["seconds_for_n"] / row["cache_s"]
        print(f"{row['chunk_size']:>6}  {row['cache_s']:>8.3f}  {ref_scaled_seconds:>10.2f}  "
              f"{row['speed_up']:>7.0f}x  {share:>11}"
              + (f"  {row['speed_up_over_original']:>6.0f}x over the original" if original is not None else ""))
    print(f"cache s: median of {args.repeats} runs over all {args.n} tokens; speed-up = ref s / cache s; "
          "cache share = cache / (forward + cache)")
    if forward is not None:
        print(f"with cache_pointer_ref instead, the cache's share would be {100 * chunk_rows[0]['ref_share']:.1f} %")

    results = {
        "benchmark": "cache_pointer",
        "machine": machine,
        "config": {
            "n": args.n, "hidden": args.hidden, "vocab": args.vocab, "window": args.window, "theta": args.theta,
            "lambdah": args.lambdah, "bptt": args.bptt, "chunk_sizes": args.chunk_sizes,
            "ref_tokens": args.ref_tokens, "repeats": args.repeats, "seed": args.seed,
        },
        "ref_s": ref_seconds,
        "ref_s_for_n": ref_scaled_seconds,
        "max_difference": max_difference,
        "mean_nll": mean_nll,
        "forward": forward,
        "original": original,
        "results": chunk_rows,
    }
    write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
