"""Eager against compiled steps (`--compile`, `Core.compile_steps`) for every core that has one.

Each core runs forward+backward over a window of T steps (`y.pow(2).mean()` as the loss) eagerly
and with its per-step function through `torch.compile`, on the same weights and input, after a
check that both give the same loss. Rounds interleave the two (warm-up rounds include the
compilation); figures are medians and compiled/eager is the ratio of the medians (below 1: the
compiled step is faster). On CUDA the timings synchronise the device.

Cores: `rmc` (the RMC LM's core: 1 slot, head size 192, 4 heads, 1 block, 3 MLP layers, key 64,
input 192), `lstm-loop` and `gru-loop` (2 layers of 200 run by the per-step cell, `--rnn-impl loop`),
`rnnlib-loop` (RNNLIB, 2 LSTM layers of 200 unrolled), `dnc-16` and `dnc-1024` (bench_dnc.py's DNC: input 64,
LSTM controller 128, 4 read heads, cells of 32; the memory's step compiled).

    python bench/bench_compiled_steps.py --threads 1
    python bench/bench_compiled_steps.py --device cuda --batch-size 64 --steps 100 --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as `python bench/bench_compiled_steps.py` from anywhere

import torch  # noqa: E402

from bench.common import machine_info, synchronize, write_results  # noqa: E402
from models.core import Core, build_core  # noqa: E402
from models.dnc import DNCConfig  # noqa: E402
from models.relational_memory import RMCConfig  # noqa: E402
from models.rnn import RNNConfig  # noqa: E402
from models.rnnlib import RNNLibConfig  # noqa: E402

CORES = {
    "rmc": ("RMC", lambda: RMCConfig(input_size=192, mem_slots=1, head_size=192, num_heads=4, num_blocks=1,
                                     attention_mlp_layers=3, key_size=64), 192),
    "lstm-loop": ("LSTM", lambda: RNNConfig(input_size=200, hidden_size=200, num_layers=2, implementation="loop"), 200),
    "gru-loop": ("GRU", lambda: RNNConfig(input_size=200, hidden_size=200, num_layers=2, implementation="loop"), 200),
    "rnnlib-loop": ("RNNLIB", lambda: RNNLibConfig(input_size=200, hids=[200, 200], implementation="loop"), 200),
    # bench_dnc.py's DNC: input 64, LSTM controller 128, 4 read heads, cells of 32
    "dnc-16": ("DNC", lambda: DNCConfig(input_size=64, hidden_size=128, nr_cells=16, cell_size=32, read_heads=4), 64),
    "dnc-1024": ("DNC", lambda: DNCConfig(input_size=64, hidden_size=128, nr_cells=1024, cell_size=32,
                                          read_heads=4), 64),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", nargs="+", choices=sorted(CORES), default=sorted(CORES))
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=20)
    parser.add_argument("--steps", type=int, default=35, help="time steps T of a window")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (the first compiles)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def window(core: Core, x: torch.Tensor) -> tuple[float, float]:
    """(loss, seconds) of one forward+backward over x."""
    core.zero_grad(set_to_none=True)
    synchronize(x.device)
    start = time.perf_counter()
    output, _ = core(x)
    loss = output.pow(2).mean()
    loss.backward()
    synchronize(x.device)
    return loss.item(), time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_info(device)
    print(f"machine: {machine['cpu']}, {machine['threads']} torch threads, torch {machine['torch']}, "
          f"device {machine.get('gpu', machine['device'])}; batch {args.batch_size}, T {args.steps}, forward+backward")
    rows = []
    for name in args.cores:
        kind, make_config, width = CORES[name]
        torch.manual_seed(0)
        eager = build_core(kind, make_config()).to(device)
        compiled = copy.deepcopy(eager)
        assert compiled.compile_steps(), f"{name} has no compiled step"
        x = torch.randn(args.steps, args.batch_size, width, generator=torch.Generator().manual_seed(1)).to(device)
        seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
        for round_index in range(args.warmup + args.repeats):
            losses = {}
            for variant, core in (("eager", eager), ("compiled", compiled)):
                losses[variant], elapsed = window(core, x)
                if round_index >= args.warmup:
                    seconds[variant].append(elapsed)
            if round_index == 0 and abs(losses["eager"] - losses["compiled"]) > 1e-4 * abs(losses["eager"]):
                raise RuntimeError(f"{name}: compiled loss {losses['compiled']} differs from eager {losses['eager']}")
        eager_ms, compiled_ms = (1000 * statistics.median(seconds[v]) for v in ("eager", "compiled"))
        ratios = [c / e for c, e in zip(seconds["compiled"], seconds["eager"])]
        rows.append({"core": name, "eager_ms": eager_ms, "compiled_ms": compiled_ms,
                     "compiled_over_eager": compiled_ms / eager_ms, "round_min": min(ratios), "round_max": max(ratios)})
        print(f"{name:12s} eager {eager_ms:9.2f} ms | compiled {compiled_ms:9.2f} ms | compiled/eager "
              f"{compiled_ms / eager_ms:.2f} (per round {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    results = {"benchmark": "compiled_steps", "machine": machine, "config": vars(args) | {"json": None},
               "results": rows}
    write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
