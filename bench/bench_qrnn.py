"""One QRNN layer against one `nn.LSTM` layer of the same size, and the QRNN paper's inference grid.

Default mode: shapes (T, B, H) with input size = hidden size, as the QRNN issue states its targets:
(105, 20, 640), (35, 20, 256), (500, 8, 256), (20, 64, 1024). Each round runs the QRNN layer
(window 1, output gate: one matmul for Z, F, O, then the pooling) and `nn.LSTM` on the same random
input; the loss is the sum of the output, so backward reaches every weight and the input. Forward
and forward+backward are timed.

`--grid`: the QRNN paper's figure 4 (right): inference speed-up of a 320-unit QRNN layer over an
equal-sized cuDNN LSTM layer, batch 8-256 and T 32-512, printed as the paper's table (rows batch,
columns T, cells LSTM ms / QRNN ms). The issue's targets are the paper's batch-8 row (5.5, 8.8, 11.0,
12.4, 16.9x) and at least 2.5x at batch 256.

On CUDA the QRNN runs two ways, both timed: `fused` (the default: one Triton kernel after the matrix
product) and `eager` (`use_cuda=False`: PyTorch ops around ForgetMult, the reference). On the CPU both
are the eager path, so one QRNN column is printed. Variants run interleaved in rounds; figures are
medians; on CUDA each call is timed with CUDA events (host launch gaps included). `--grid` on CUDA also
prints the host time of one layer call (no synchronisation), the part of the layer the fusion thins.

    python bench/bench_qrnn.py                          # 1 thread, CPU
    python bench/bench_qrnn.py --device cuda
    python bench/bench_qrnn.py --grid --device cuda     # the paper's grid, eager and fused
    python bench/bench_qrnn.py --grid --batches 8 256 --lengths 32 512 --repeats 3   # a corner of it
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as `python bench/bench_qrnn.py` from anywhere

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import machine_info, time_call, write_results  # noqa: E402
from models.qrnn import QRNNLayer  # noqa: E402

SHAPES = [(105, 20, 640), (35, 20, 256), (500, 8, 256), (20, 64, 1024)]
GRID_UNITS = 320
GRID_BATCHES = [8, 16, 32, 64, 128, 256]
GRID_LENGTHS = [32, 64, 128, 256, 512]
PAPER_BATCH_8 = {32: 5.5, 64: 8.8, 128: 11.0, 256: 12.4, 512: 16.9}  # the target row
TARGET_BATCH_256 = 2.5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per shape")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--grid", action="store_true", help="the QRNN paper's inference grid (320 units)")
    parser.add_argument("--batches", type=int, nargs="+", default=GRID_BATCHES, help="--grid: batch sizes")
    parser.add_argument("--lengths", type=int, nargs="+", default=GRID_LENGTHS, help="--grid: sequence lengths")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="--grid: parameters and input")
    parser.add_argument("--tf32", action="store_true",
                        help="CUDA: let both cuDNN (the LSTM) and cuBLAS (the QRNN's product) use TF32; by default "
                             "neither does (PyTorch's defaults differ: cuDNN on, cuBLAS off, which favours the LSTM)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available on this machine; use --device cpu")
    if args.repeats < 1 or args.warmup < 0 or min(args.batches + args.lengths) < 1:
        parser.error("--repeats, --batches and --lengths must be positive and --warmup at least 0")
    return args


def qrnn_variants(hidden: int, device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """The layer under test: `fused` and `eager` on CUDA (shared weights), one `qrnn` elsewhere."""
    fused = QRNNLayer(hidden, hidden, window=1, output_gate=True).to(device, dtype)
    if device.type != "cuda":
        return {"qrnn": fused}
    eager = QRNNLayer(hidden, hidden, window=1, output_gate=True, use_cuda=False).to(device, dtype)
    eager.load_state_dict(fused.state_dict())
    return {"fused": fused, "eager": eager}


def run_pass(module: nn.Module, x: torch.Tensor, backward: bool) -> None:
    if backward:
        output, _ = module(x)
        output.sum().backward()
    else:
        with torch.no_grad():
            module(x)


def interleaved(modules: dict[str, nn.Module], x: torch.Tensor, backward: bool, warmup: int,
                repeats: int) -> dict[str, float]:
    """Median ms per call of each module, the modules taking turns within each round."""
    seconds: dict[str, list[float]] = {name: [] for name in modules}
    for round_index in range(warmup + repeats):
        for name, module in modules.items():
            module.zero_grad(set_to_none=True)
            x.grad = None
            elapsed = time_call(lambda: run_pass(module, x, backward), x.device)
            if round_index >= warmup:
                seconds[name].append(elapsed)
    return {name: 1000 * statistics.median(values) for name, values in seconds.items()}


def host_microseconds(module: nn.Module, x: torch.Tensor, calls: int = 50) -> float:
    """Host time of one inference call, without waiting for the GPU (what launching the layer costs)."""
    with torch.no_grad():
        module(x)
        torch.cuda.synchronize(x.device)
        started = time.perf_counter()
        for _ in range(calls):
            module(x)
        elapsed = time.perf_counter() - started
        torch.cuda.synchronize(x.device)
    return 1e6 * elapsed / calls


def shapes_mode(args: argparse.Namespace, machine: dict) -> dict:
    device = args.device
    rows = []
    for steps, batch, hidden in SHAPES:
        modules = {**qrnn_variants(hidden, device), "lstm": nn.LSTM(hidden, hidden).to(device)}
        x = torch.randn(steps, batch, hidden, device=device, requires_grad=True)
        row = {"T": steps, "B": batch, "H": hidden}
        for backward, name in ((False, "forward"), (True, "forward+backward")):
            medians = interleaved(modules, x, backward, args.warmup, args.repeats)
            row[name] = {f"{label}_ms": value for label, value in medians.items()}
            row[name].update({f"speed_up_{label}": medians["lstm"] / medians[label]
                              for label in medians if label != "lstm"})
        rows.append(row)
        print(f"  done: {steps} x {batch} x {hidden}", file=sys.stderr, flush=True)
    labels = [label for label in modules if label != "lstm"]
    header = f"{'T':>4} {'B':>3} {'H':>5}  {'pass':<16} {'LSTM ms':>9}" + "".join(
        f" {label + ' ms':>10} {'speed-up':>8}" for label in labels)
    print(header)
    print("-" * len(header))
    for row in rows:
        for name in ("forward", "forward+backward"):
            cells = row[name]
            print(f"{row['T']:>4} {row['B']:>3} {row['H']:>5}  {name:<16} {cells['lstm_ms']:>9.2f}" + "".join(
                f" {cells[label + '_ms']:>10.2f} {cells['speed_up_' + label]:>7.2f}x" for label in labels))
    print(f"medians of {args.repeats} interleaved rounds after {args.warmup} warm-up rounds; "
          "speed-up = LSTM ms / QRNN ms" + ("; fused: the Triton pooling kernel, eager: PyTorch ops "
                                            "(use_cuda=False)" if device.type == "cuda" else ""))
    return {"benchmark": "qrnn_vs_lstm", "machine": machine, "results": rows}


def grid_mode(args: argparse.Namespace, machine: dict) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    qrnns = qrnn_variants(GRID_UNITS, device, dtype)
    lstm = nn.LSTM(GRID_UNITS, GRID_UNITS).to(device, dtype)
    modules = {**qrnns, "lstm": lstm}
    cells = {}
    for batch in args.batches:
        for steps in args.lengths:
            x = torch.randn(steps, batch, GRID_UNITS, device=device, dtype=dtype)
            medians = interleaved(modules, x, False, args.warmup, args.repeats)
            cells[(batch, steps)] = medians
            print(f"  done: batch {batch}, T {steps}", file=sys.stderr, flush=True)
    labels = list(qrnns)
    print(f"inference, one {GRID_UNITS}-unit layer, {args.dtype}: speed-up = LSTM ms / QRNN ms "
          f"(paper, batch 8: {', '.join(f'{value}x' for value in PAPER_BATCH_8.values())}; "
          f"target at batch 256: >= {TARGET_BATCH_256}x)")
    for label in labels:
        print(f"\nQRNN {label} over nn.LSTM")
        print(f"{'batch':>6} " + "".join(f"{'T=' + str(steps):>9}" for steps in args.lengths))
        for batch in args.batches:
            print(f"{batch:>6} " + "".join(
                f"{cells[(batch, steps)]['lstm'] / cells[(batch, steps)][label]:>8.2f}x" for steps in args.lengths))
    print("\nmedian ms per call (LSTM / " + " / ".join(labels) + ")")
    for batch in args.batches:
        print(f"{batch:>6} " + "  ".join(
            "/".join(f"{cells[(batch, steps)][name]:.3g}" for name in ["lstm"] + labels) for steps in args.lengths))
    host = {}
    if device.type == "cuda":
        x = torch.randn(args.lengths[0], args.batches[0], GRID_UNITS, device=device, dtype=dtype)
        host = {label: host_microseconds(module, x) for label, module in qrnns.items()}
        print(f"\nhost time of one layer call at (T {args.lengths[0]}, B {args.batches[0]}), no sync: "
              + ", ".join(f"{label} {value:.1f} us" for label, value in host.items()))
    print(f"medians of {args.repeats} interleaved rounds after {args.warmup} warm-up rounds"
          + ("; CUDA events" if device.type == "cuda" else "; wall time"))
    rows = [{"batch": batch, "T": steps, **{f"{name}_ms": value for name, value in medians.items()}}
            for (batch, steps), medians in cells.items()]
    return {"benchmark": "qrnn_grid", "machine": machine, "dtype": args.dtype, "results": rows,
            "host_us_per_call": host}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    machine = machine_info(args.device)
    machine["tf32"] = args.tf32
    print(f"machine: {machine['cpu']}, {machine['threads']} torch threads, torch {machine['torch']}, "
          f"device {machine.get('gpu', machine['device'])}"
          + (f", TF32 {'on' if args.tf32 else 'off'} for cuDNN and cuBLAS" if args.device.type == "cuda" else ""))
    results = grid_mode(args, machine) if args.grid else shapes_mode(args, machine)
    write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
