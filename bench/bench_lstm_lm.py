"""Tokens per second of the LSTM language model: fused `nn.LSTM` against the per-step loop.

One `LanguageModel` (the LSTM baseline of the RMC LM benchmark: embedding 300, hidden 300,
1 layer, tied full softmax, dropout 0.5, bptt 100) runs with `implementation="fused"`
(`nn.LSTM`) and `implementation="loop"` (explicit per-step cell) on the same weights, after
a check that both give the same loss. Two scopes are timed: `lm`, the whole language model
(embedding, core, 33k-word softmax and loss), and `core`, the LSTM alone on random
embeddings (the softmax dominates the whole model's time and hides the core's difference).
Two passes are timed per scope and batch size:

- forward: `model.eval()` under `torch.no_grad()`, features and the mean loss;
- forward+backward: `model.train()`, `loss = model.loss(features, targets)`, `loss.backward()`
  (core scope: the mean square of the core's output as the loss).

The variants are interleaved in rounds (fused, loop, fused, loop, ...) so that drift on a
shared machine hits both; each figure is the median over `--repeats` rounds, and loop/fused
is the ratio of the two medians (above 1: the loop is slower). Token ids are random (seeded).

Run from the repository root:

    python bench/bench_lstm_lm.py                                 # 1 thread, batch sizes 8 and 64
    python bench/bench_lstm_lm.py --threads 2 --json bench/out/lstm_lm_2threads.json
    python bench/bench_lstm_lm.py --device cuda --batch-sizes 64 --repeats 10

Shapes: `T` time steps (bptt), `B` batch, `V` vocabulary size.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as `python bench/bench_lstm_lm.py` from anywhere

import torch  # noqa: E402

from models import LanguageModel, LMConfig, RNNConfig  # noqa: E402
from models.rnn import IMPLEMENTATIONS  # noqa: E402
from bench.common import machine_info, synchronize, write_results  # noqa: E402

EMSIZE = 300
HIDDEN_SIZE = 300
DROPOUT = 0.5
PASSES = ("forward", "forward+backward")
SCOPES = ("lm", "core")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", "--batch_sizes", dest="batch_sizes", type=int, nargs="+", default=[8, 64],
                        help="batch sizes to time, each with both passes")
    parser.add_argument("--vocab", type=int, default=33278, help="vocabulary size (33278: WikiText-2)")
    parser.add_argument("--bptt", type=int, default=100, help="time steps per batch")
    parser.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES),
                        help="lm: the whole language model; core: the LSTM alone")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (intra-op CPU threads)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds per (batch size, pass); a round runs each implementation once")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the token ids and the dropout masks")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted |loss(fused) - loss(loop)| in the check before timing")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.bptt < 1 or args.threads < 1 or args.repeats < 1:
        parser.error("--batch-sizes, --bptt, --threads and --repeats must be positive")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.vocab < 2:
        parser.error(f"--vocab must be at least 2, got {args.vocab}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available on this machine; use --device cpu")
    return args


def build_model(vocab_size: int, device: torch.device) -> LanguageModel:
    core_config = RNNConfig(input_size=EMSIZE, hidden_size=HIDDEN_SIZE, num_layers=1, implementation="fused")
    config = LMConfig(
        vocab_size=vocab_size, core="LSTM", core_config=dataclasses.asdict(core_config),
        emsize=EMSIZE, dropout=DROPOUT, tie_weights=True,
    )
    return LanguageModel(config).to(device)


def random_batch(
    vocab_size: int, bptt: int, batch_size: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids as `get_batch` would give them: inputs [T, B] and targets [T, B] shifted by one step."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (bptt + 1, batch_size), generator=generator).to(device)  # [T + 1, B]
    return tokens[:-1], tokens[1:]


def forward_loss(model: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The forward pass: mean loss without a graph (the caller sets eval mode)."""
    with torch.no_grad():
        features, _ = model(inputs)
        return model.loss(features, targets)


def forward_backward_loss(model: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training pass without the optimizer step: mean loss and its gradients (the caller sets train mode)."""
    features, _ = model(inputs)
    loss = model.loss(features, targets)
    loss.backward()
    return loss.detach()


def core_forward(model: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The core alone on embeddings `inputs` [T, B, E], without a graph; `targets` is unused."""
    with torch.no_grad():
        output, _ = model.core(inputs)
        return output.pow(2).mean()


def core_forward_backward(model: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The core alone, with gradients of the mean square of its output."""
    output, _ = model.core(inputs)
    loss = output.pow(2).mean()
    loss.backward()
    return loss.detach()


PASS_FUNCTIONS: dict[tuple[str, str], Callable[[LanguageModel, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    ("lm", "forward"): forward_loss,
    ("lm", "forward+backward"): forward_backward_loss,
    ("core", "forward"): core_forward,
    ("core", "forward+backward"): core_forward_backward,
}


def scope_inputs(scope: str, inputs: torch.Tensor, seed: int) -> torch.Tensor:
    """Token ids [T, B] for the lm scope; random embeddings [T, B, E] for the core scope."""
    if scope == "lm":
        return inputs
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*inputs.shape, EMSIZE, generator=generator).to(inputs.device)


def set_implementation(model: LanguageModel, implementation: str) -> None:
    model.core.config.implementation = implementation  # same parameters, other code path


def check_same_loss(
    model: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor, seed: int, tolerance: float
) -> dict[str, float]:
    """Raise RuntimeError unless both implementations give the same loss, in eval and in train mode.

    In train mode the dropout masks are made equal by reseeding before each run.

    Returns:
        {pass name: |loss(fused) - loss(loop)|}.
    """
    differences = {}
    for (scope, pass_name), run_pass in PASS_FUNCTIONS.items():
        model.train(pass_name == "forward+backward")
        losses = {}
        for implementation in IMPLEMENTATIONS:
            set_implementation(model, implementation)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            losses[implementation] = run_pass(model, scope_inputs(scope, inputs, seed), targets).item()
        difference = abs(losses["fused"] - losses["loop"])
        if not difference <= tolerance:
            raise RuntimeError(
                f"{scope} {pass_name}: fused loss {losses['fused']:.6f} and loop loss {losses['loop']:.6f} differ by "
                f"{difference:.2e} > --tolerance {tolerance:g}; the two implementations do not compute the same model"
            )
        differences[f"{scope} {pass_name}"] = difference
    model.zero_grad(set_to_none=True)
    return differences


def time_rounds(
    model: LanguageModel,
    scope: str,
    pass_name: str,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    warmup: int,
    repeats: int,
) -> dict[str, list[float]]:
    """Seconds per batch of each implementation, interleaved: `warmup` untimed rounds, then `repeats` timed ones.

    Returns:
        {implementation: [seconds of round 1, round 2, ...]}.
    """
    run_pass = PASS_FUNCTIONS[scope, pass_name]
    model.train(pass_name == "forward+backward")
    device = inputs.device
    seconds: dict[str, list[float]] = {implementation: [] for implementation in IMPLEMENTATIONS}
    for round_index in range(warmup + repeats):
        for implementation in IMPLEMENTATIONS:
            set_implementation(model, implementation)
            model.zero_grad(set_to_none=True)  # as an optimizer step would; outside the timed region
            synchronize(device)
            start = time.perf_counter()
            run_pass(model, inputs, targets)
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                seconds[implementation].append(elapsed)
    model.zero_grad(set_to_none=True)
    return seconds


def summarize(scope: str, batch_size: int, bptt: int, pass_name: str, seconds: dict[str, list[float]]) -> dict:
    """One table row: medians, tokens per second, and loop/fused from the medians and from each round."""
    tokens = bptt * batch_size
    row: dict = {"scope": scope, "batch_size": batch_size, "pass": pass_name, "tokens_per_batch": tokens}
    for implementation in IMPLEMENTATIONS:
        median = statistics.median(seconds[implementation])
        row[f"{implementation}_ms"] = 1000 * median
        row[f"{implementation}_tokens_per_s"] = tokens / median
        row[f"{implementation}_all_ms"] = [1000 * value for value in seconds[implementation]]
    row["loop_over_fused"] = row["loop_ms"] / row["fused_ms"]
    round_ratios = [loop / fused for fused, loop in zip(seconds["fused"], seconds["loop"])]
    row["round_ratio_min"] = min(round_ratios)
    row["round_ratio_max"] = max(round_ratios)
    return row


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'scope':<5}  {'batch':>5}  {'pass':<16}  {'fused ms':>9}  {'loop ms':>9}  {'fused tok/s':>11}  {'loop tok/s':>10}  "
        f"{'loop/fused':>10}  {'per round':>11}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['scope']:<5}  {row['batch_size']:>5}  {row['pass']:<16}  {row['fused_ms']:>9.1f}  {row['loop_ms']:>9.1f}  "
            f"{row['fused_tokens_per_s']:>11.0f}  {row['loop_tokens_per_s']:>10.0f}  {row['loop_over_fused']:>10.2f}  "
            f"{row['round_ratio_min']:>5.2f}-{row['round_ratio_max']:.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.vocab, args.device)
    machine = machine_info(args.device)
    print(
        f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['threads']} torch threads, "
        f"torch {machine['torch']}, device {machine.get('gpu', machine['device'])}"
    )
    print(
        f"model: LSTM LM, emsize {EMSIZE}, hidden {HIDDEN_SIZE}, 1 layer, tied, dropout {DROPOUT}, "
        f"vocab {args.vocab}, bptt {args.bptt}; {args.warmup} warmup + {args.repeats} timed rounds"
    )

    # The weights are shared whatever the batch size, so one (small) batch is enough for the check.
    check_inputs, check_targets = random_batch(args.vocab, args.bptt, min(args.batch_sizes), args.seed, args.device)
    differences = check_same_loss(model, check_inputs, check_targets, args.seed, args.tolerance)
    print("same loss: " + ", ".join(f"{name} |fused - loop| = {value:.1e}" for name, value in differences.items()))

    rows = []
    for scope in args.scopes:
        for batch_size in args.batch_sizes:
            tokens, targets = random_batch(args.vocab, args.bptt, batch_size, args.seed, args.device)
            inputs = scope_inputs(scope, tokens, args.seed)
            for pass_name in PASSES:
                seconds = time_rounds(model, scope, pass_name, inputs, targets, args.warmup, args.repeats)
                rows.append(summarize(scope, batch_size, args.bptt, pass_name, seconds))
                print(f"  done: {scope}, batch {batch_size}, {pass_name}", file=sys.stderr, flush=True)
    print(format_table(rows))
    print("medians of the timed rounds; loop/fused = loop ms / fused ms (above 1: the loop is slower); "
          "per round: range of that ratio within single rounds")

    results = {
        "benchmark": "lstm_lm",
        "machine": machine,
        "config": {
            "emsize": EMSIZE, "hidden_size": HIDDEN_SIZE, "num_layers": 1, "tied": True, "dropout": DROPOUT,
            "vocab": args.vocab, "bptt": args.bptt, "batch_sizes": args.batch_sizes, "scopes": args.scopes,
            "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed,
        },
        "loss_differences": differences,
        "results": rows,
    }
    write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
