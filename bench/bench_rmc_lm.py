"""The RMC language model against the fused LSTM language model: forward+backward time per batch.

Both models are the seed project's WikiText-2 setups: the LSTM baseline (embedding 300,
one `nn.LSTM` layer of 300, tied) and the RMC LM (embedding 192, 1 memory slot, head size
192, 4 heads, 1 block, 3 MLP layers, key size 64, tied through a projection), with a
vocabulary of 33,278 words, bptt 100, dropout 0.5, at batch sizes 8 and 64, on one CPU
thread. Rounds interleave the models (and the RMC's `reference` implementation, the plain
per-step loop over the same weights, when `--with-reference`); figures are medians and
the ratios are measured side by side. Targets (RMC issue): RMC/LSTM at most 2.0 at batch
8 and at most 1.3 at batch 64.

`--compiled` adds the RMC LM with its step through `torch.compile` (`RMCCore.compile_steps`, what
`--compile` turns on in the scripts; on by default with CUDA) beside the eager one, and prints
compiled/eager and compiled RMC/LSTM (issue targets on an H100/H200, forward at batch 64: at most 1.5;
forward+backward at batch 8 / 64: at most 2.0). The warm-up rounds include the compilation.

    python bench/bench_rmc_lm.py
    python bench/bench_rmc_lm.py --with-reference --batch-sizes 8
    python bench/bench_rmc_lm.py --device cuda --compiled --warmup 3 --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as `python bench/bench_rmc_lm.py` from anywhere

import torch  # noqa: E402

from bench.common import machine_info, synchronize, write_results  # noqa: E402
from models import LanguageModel, LMConfig, RNNConfig  # noqa: E402
from models.relational_memory import RMCConfig  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", dest="batch_sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--vocab", type=int, default=33278, help="vocabulary size (33278: WikiText-2)")
    parser.add_argument("--bptt", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--with-reference", dest="with_reference", action="store_true",
                        help="also time the RMC's plain per-step reference implementation")
    parser.add_argument("--forward-only", dest="forward_only", action="store_true",
                        help="time the forward pass under no_grad instead of forward+backward")
    parser.add_argument("--compiled", action="store_true",
                        help="also time the RMC LM with its step through torch.compile")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def build_models(vocab: int, device: torch.device) -> dict[str, LanguageModel]:
    lstm = LMConfig(vocab_size=vocab, core="LSTM", emsize=300, dropout=0.5, tie_weights=True,
                    core_config=dataclasses.asdict(RNNConfig(input_size=300, hidden_size=300)))
    rmc = RMCConfig(input_size=192, mem_slots=1, head_size=192, num_heads=4, num_blocks=1,
                    attention_mlp_layers=3, key_size=64, forget_bias=1.0, input_bias=0.0, gate_style="unit")
    rmc_lm = LMConfig(vocab_size=vocab, core="RMC", emsize=192, dropout=0.5, tie_weights=True,
                      core_config=dataclasses.asdict(rmc))
    return {"lstm": LanguageModel(lstm).to(device), "rmc": LanguageModel(rmc_lm).to(device)}


def time_pass(model: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor, forward_only: bool) -> float:
    model.zero_grad(set_to_none=True)
    synchronize(inputs.device)
    start = time.perf_counter()
    if forward_only:
        with torch.no_grad():
            features, _ = model(inputs)
            model.loss(features, targets)
    else:
        features, _ = model(inputs)
        model.loss(features, targets).backward()
    synchronize(inputs.device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    lms = build_models(args.vocab, device)
    variants = [("lstm", lms["lstm"], None), ("rmc", lms["rmc"], "fast")]
    if args.with_reference:
        variants.append(("rmc-reference", lms["rmc"], "reference"))
    if args.compiled:
        compiled = copy.deepcopy(lms["rmc"])
        assert compiled.core.compile_steps()
        variants.append(("rmc-compiled", compiled, None))
    machine = machine_info(device)
    print(f"machine: {machine['cpu']}, {machine['threads']} torch threads, torch {machine['torch']}, "
          f"device {machine.get('gpu', machine['device'])}")
    for name, model, _ in variants[:2]:
        print(f"  {name}: {sum(p.numel() for p in model.parameters()):,} parameters")
    rows = []
    for batch_size in args.batch_sizes:
        generator = torch.Generator().manual_seed(batch_size)
        tokens = torch.randint(args.vocab, (args.bptt + 1, batch_size), generator=generator).to(device)
        inputs, targets = tokens[:-1], tokens[1:]
        seconds: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        for round_index in range(args.warmup + args.repeats):
            for name, model, implementation in variants:
                if implementation is not None:
                    model.core.config.implementation = implementation
                model.train(not args.forward_only)
                elapsed = time_pass(model, inputs, targets, args.forward_only)
                if round_index >= args.warmup:
                    seconds[name].append(elapsed)
        row = {"batch_size": batch_size, **{f"{name}_ms": 1000 * statistics.median(values)
                                             for name, values in seconds.items()}}
        row["rmc_over_lstm"] = row["rmc_ms"] / row["lstm_ms"]
        round_ratios = [r / l for r, l in zip(seconds["rmc"], seconds["lstm"])]
        row["round_ratio_min"], row["round_ratio_max"] = min(round_ratios), max(round_ratios)
        if args.with_reference:
            row["reference_over_fast"] = row["rmc-reference_ms"] / row["rmc_ms"]
        if args.compiled:
            row["compiled_over_eager"] = row["rmc-compiled_ms"] / row["rmc_ms"]
            row["compiled_over_lstm"] = row["rmc-compiled_ms"] / row["lstm_ms"]
        rows.append(row)
        print(f"  done: batch {batch_size}", file=sys.stderr, flush=True)
    pass_name = "forward" if args.forward_only else "forward+backward"
    print(f"{pass_name}, vocab {args.vocab}, bptt {args.bptt}; medians of {args.repeats} interleaved rounds")
    for row in rows:
        line = (f"batch {row['batch_size']:>3}: LSTM LM {row['lstm_ms']:8.1f} ms | RMC LM {row['rmc_ms']:8.1f} ms | "
                f"RMC/LSTM {row['rmc_over_lstm']:.2f} (per round {row['round_ratio_min']:.2f}-{row['round_ratio_max']:.2f})")
        if args.with_reference:
            line += f" | RMC reference {row['rmc-reference_ms']:8.1f} ms ({row['reference_over_fast']:.2f}x the fast one)"
        if args.compiled:
            line += (f" | RMC compiled {row['rmc-compiled_ms']:8.1f} ms: {row['compiled_over_eager']:.2f}x eager, "
                     f"{row['compiled_over_lstm']:.2f}x the LSTM")
        print(line)
    results = {"benchmark": "rmc_lm", "machine": machine, "pass": pass_name, "config": vars(args) | {"json": None},
               "results": rows}
    write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
