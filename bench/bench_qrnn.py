"""One QRNN layer against one `nn.LSTM` layer of the same size: forward+backward time.

Shapes (T, B, H) with input size = hidden size, as the QRNN issue states its targets:
(105, 20, 640), (35, 20, 256), (500, 8, 256), (20, 64, 1024). Each round runs the QRNN
layer (window 1, output gate: one matmul for Z, F, O, then ForgetMult and the output gate)
and `nn.LSTM` on the same random input; the loss is the sum of the output, so backward
reaches every weight and the input. Rounds are interleaved and figures are medians, so
the ratio is measured side by side. Forward-only figures are printed too.

    python bench/bench_qrnn.py                 # 1 thread, CPU
    python bench/bench_qrnn.py --device cuda --threads 1
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

from bench.common import machine_info, synchronize, write_results  # noqa: E402
from models.qrnn import QRNNLayer  # noqa: E402

SHAPES = [(105, 20, 640), (35, 20, 256), (500, 8, 256), (20, 64, 1024)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per shape")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def run_once(module: nn.Module, x: torch.Tensor, backward: bool) -> float:
    synchronize(x.device)
    start = time.perf_counter()
    if backward:
        output, _ = module(x)
        output.sum().backward()
    else:
        with torch.no_grad():
            module(x)
    synchronize(x.device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    machine = machine_info(device)
    print(f"machine: {machine['cpu']}, {machine['threads']} torch threads, torch {machine['torch']}, "
          f"device {machine.get('gpu', machine['device'])}")
    rows = []
    for steps, batch, hidden in SHAPES:
        qrnn = QRNNLayer(hidden, hidden, window=1, output_gate=True).to(device)
        lstm = nn.LSTM(hidden, hidden).to(device)
        x = torch.randn(steps, batch, hidden, device=device, requires_grad=True)
        row = {"T": steps, "B": batch, "H": hidden}
        for backward, name in ((False, "forward"), (True, "forward+backward")):
            seconds = {"qrnn": [], "lstm": []}
            for round_index in range(args.warmup + args.repeats):
                for label, module in (("qrnn", qrnn), ("lstm", lstm)):
                    module.zero_grad(set_to_none=True)
                    x.grad = None
                    elapsed = run_once(module, x, backward)
                    if round_index >= args.warmup:
                        seconds[label].append(elapsed)
            qrnn_ms = 1000 * statistics.median(seconds["qrnn"])
            lstm_ms = 1000 * statistics.median(seconds["lstm"])
            row[name] = {"qrnn_ms": qrnn_ms, "lstm_ms": lstm_ms, "speed_up": lstm_ms / qrnn_ms}
        rows.append(row)
        print(f"  done: {steps} x {batch} x {hidden}", file=sys.stderr, flush=True)
    header = (f"{'T':>4} {'B':>3} {'H':>5}  {'fwd QRNN ms':>11} {'fwd LSTM ms':>11} {'speed-up':>8}  "
              f"{'f+b QRNN ms':>11} {'f+b LSTM ms':>11} {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        forward, both = row["forward"], row["forward+backward"]
        print(f"{row['T']:>4} {row['B']:>3} {row['H']:>5}  {forward['qrnn_ms']:>11.2f} {forward['lstm_ms']:>11.2f} "
              f"{forward['speed_up']:>7.2f}x  {both['qrnn_ms']:>11.2f} {both['lstm_ms']:>11.2f} {both['speed_up']:>7.2f}x")
    print(f"medians of {args.repeats} interleaved rounds after {args.warmup} warm-up rounds; "
          "speed-up = LSTM ms / QRNN ms")
    results = {"benchmark": "qrnn_vs_lstm", "machine": machine, "results": rows}
    write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
