"""QRNN's ForgetMult: `forget_mult` against the per-step autograd loop `forget_mult_ref`.

The recurrence h_t = f_t * x_t + (1 - f_t) * h_{t-1} at AWD-QRNN language-model sizes: batch 20,
hidden 640 (a mid-sized QRNN layer), sequence lengths 35 (AWD's bptt on PTB), 105 and 500. Inputs
are random and seeded: gates f = sigmoid(N(0, 1)), values x and h0 ~ N(0, 1), and a fixed random
gradient for h and h_last. Two passes are timed per length:

- forward: both functions under `torch.no_grad()` (inference, or the reference without a graph);
- forward+backward: h, h_last = function(f, x, h0), then `torch.autograd.backward` with the fixed
  output gradients, giving df, dx and dh0. For the reference that is PyTorch's autograd over the
  per-step ops (the "Python loop over time" baseline); for `forget_mult` on CPU, the hand-written
  backward of `ForgetMultFunction`; on CUDA, the Triton kernels.

Before timing, both are checked to agree (outputs and gradients) at every length. The variants are
interleaved in rounds (forget_mult, ref, forget_mult, ref, ...) so that drift on a shared machine hits
both; each figure is the median over `--repeats` rounds, and ref/forget_mult is the ratio of the medians
(above 1: forget_mult is faster). On CUDA the table adds the effective memory bandwidth of
`forget_mult`: the bytes the kernels must read and write (forward: f, x, h0 in, h, h_last out;
backward: f, x, h, h0 and the two output gradients in, df, dx, dh0 out) over the median time.

`--bandwidth`: the QRNN issue's bandwidth target. ForgetMult forward and forward+backward at B 256,
H 1024, T 2048 in float32, bfloat16 and float16, as achieved bandwidth (the bytes above over the median
time), against the rate of a plain copy (`dst.copy_(src)` of one [T, B, H] tensor: 2 x its bytes)
measured in the same run, interleaved. The target is 80 % of the copy rate (>= 3.4 TB/s in bfloat16 on
an H200, forward+backward). `--configs` adds launch configurations of the Triton kernels to the default
one (BLOCKxWARPS[xSTAGES][tCHUNK], see models/ops/triton_launch.py), so one run sweeps them. Each
variant is first checked against `forget_mult_torch` on the same inputs (on the CPU, the PyTorch
path against `forget_mult_ref`). On the CPU the same table
comes from the PyTorch path (`--batch-size`, `--hidden` and `--lengths` make it fit).

Run from the repository root:

    python bench/bench_forget_mult.py                        # CPU, 1 thread, T = 35, 105, 500
    python bench/bench_forget_mult.py --threads 2 --json bench/out/forget_mult_2threads.json
    python bench/bench_forget_mult.py --device cuda --dtype bfloat16 --lengths 35 500 2000
    python bench/bench_forget_mult.py --device cuda --bandwidth --configs 256x4 1024x4 256x1t4 512x2t8

Shapes: `T` time steps, `B` batch, `H` hidden size.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as `python bench/bench_forget_mult.py` from anywhere

import torch  # noqa: E402

from bench.common import machine_info, synchronize, time_call, write_results  # noqa: E402
from models.ops.forget_mult import forget_mult, forget_mult_ref, forget_mult_torch  # noqa: E402
from models.ops.triton_launch import choose_config, KernelConfig  # noqa: E402

PASSES = ("forward", "forward+backward")
VARIANTS: dict[str, Callable] = {"forget_mult": forget_mult, "ref": forget_mult_ref}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOLERANCE = {  # (rtol, atol) of the check before timing, per dtype
    torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (1e-1, 1e-1),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                        help="batch size B (default 20; 256 with --bandwidth)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size H (default 640; 1024 with --bandwidth)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="sequence lengths T to time, each with both passes (default 35 105 500; 2048 with "
                             "--bandwidth)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of f, x and h0")
    parser.add_argument("--bandwidth", action="store_true",
                        help="achieved bandwidth against a copy's, float32/bfloat16/float16 (see the docstring)")
    parser.add_argument("--dtypes", choices=sorted(DTYPES), nargs="+", default=["float32", "bfloat16", "float16"],
                        help="--bandwidth: dtypes to measure")
    parser.add_argument("--configs", nargs="*", default=[],
                        help="--bandwidth on CUDA: Triton launch configurations to time beside the default, "
                             "e.g. 256x4 1024x4t4")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (intra-op CPU threads)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed rounds per (length, pass); a round runs each variant once")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before the timed ones")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and output gradients")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    defaults = (256, 1024, [2048]) if args.bandwidth else (20, 640, [35, 105, 500])
    args.batch_size = defaults[0] if args.batch_size is None else args.batch_size
    args.hidden = defaults[1] if args.hidden is None else args.hidden
    args.lengths = defaults[2] if args.lengths is None else args.lengths
    try:
        args.configs = [KernelConfig.parse(text) for text in args.configs]
    except ValueError as error:
        parser.error(str(error))
    if min(args.lengths) < 1 or args.batch_size < 1 or args.hidden < 1 or args.threads < 1 or args.repeats < 1:
        parser.error("--lengths, --batch-size, --hidden, --threads and --repeats must be positive")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available on this machine; use --device cpu")
    args.dtype = DTYPES[args.dtype]
    return args


def make_inputs(
    num_steps: int, batch_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device, seed: int
) -> dict[str, torch.Tensor]:
    """f, x [T, B, H], h0 [B, H] (leaves that require grad) and output gradients grad_h, grad_h_last."""
    generator = torch.Generator().manual_seed(seed)
    shape = (num_steps, batch_size, hidden_size)
    tensors = {
        "f": torch.randn(shape, generator=generator).sigmoid(),
        "x": torch.randn(shape, generator=generator),
        "h0": torch.randn(shape[1:], generator=generator),
        "grad_h": torch.randn(shape, generator=generator),
        "grad_h_last": torch.randn(shape[1:], generator=generator),
    }
    tensors = {name: tensor.to(device=device, dtype=dtype) for name, tensor in tensors.items()}
    for name in ("f", "x", "h0"):
        tensors[name].requires_grad_()
    return tensors


def clear_grads(inputs: dict[str, torch.Tensor]) -> None:
    for name in ("f", "x", "h0"):
        inputs[name].grad = None


def forward(function: Callable, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return function(inputs["f"], inputs["x"], inputs["h0"])


def forward_backward(function: Callable, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    h, h_last = function(inputs["f"], inputs["x"], inputs["h0"])
    torch.autograd.backward((h, h_last), (inputs["grad_h"], inputs["grad_h_last"]))
    return h.detach(), h_last.detach()


PASS_FUNCTIONS = {"forward": forward, "forward+backward": forward_backward}


def check_same_result(inputs: dict[str, torch.Tensor]) -> float:
    """Raise RuntimeError unless both variants give the same h, h_last and gradients.

    Returns:
        The largest |forget_mult - ref| over h, h_last, df, dx and dh0.
    """
    results = {}
    for name, function in VARIANTS.items():
        clear_grads(inputs)
        h, h_last = forward_backward(function, inputs)
        results[name] = [h, h_last] + [inputs[key].grad.clone() for key in ("f", "x", "h0")]
    clear_grads(inputs)
    rtol, atol = TOLERANCE[inputs["f"].dtype]
    largest = 0.0
    for label, fast, ref in zip(("h", "h_last", "df", "dx", "dh0"), results["forget_mult"], results["ref"]):
        fast, ref = fast.double(), ref.double()
        largest = max(largest, (fast - ref).abs().max().item())
        if not torch.allclose(fast, ref, rtol=rtol, atol=atol):
            raise RuntimeError(
                f"{label}: forget_mult and forget_mult_ref differ by up to {(fast - ref).abs().max().item():.2e} "
                f"(rtol {rtol:g}, atol {atol:g}); the fast path does not compute the reference's result"
            )
    return largest


def time_rounds(inputs: dict[str, torch.Tensor], pass_name: str, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, interleaved: `warmup` untimed rounds, then `repeats` timed ones.

    Returns:
        {variant: [seconds of round 1, round 2, ...]}.
    """
    run_pass = PASS_FUNCTIONS[pass_name]
    device = inputs["f"].device
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(warmup + repeats):
        for name, function in VARIANTS.items():
            clear_grads(inputs)  # as an optimizer's zero_grad would; outside the timed region
            synchronize(device)
            start = time.perf_counter()
            run_pass(function, inputs)
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                seconds[name].append(elapsed)
    clear_grads(inputs)
    return seconds


def bytes_moved(num_steps: int, batch_size: int, hidden_size: int, dtype: torch.dtype, pass_name: str) -> int:
    """Bytes the Triton kernels must read and write in one pass (each element once)."""
    element = torch.tensor([], dtype=dtype).element_size()
    sequence, state = num_steps * batch_size * hidden_size, batch_size * hidden_size
    forward_bytes = (3 * sequence + 2 * state) * element  # f, x in, h out: [T, B, H]; h0 in, h_last out: [B, H]
    if pass_name == "forward":
        return forward_bytes
    # f, x, h, grad_h in, df, dx out: [T, B, H]; h0, grad_h_last in, dh0 out: [B, H]
    backward_bytes = (6 * sequence + 3 * state) * element
    return forward_bytes + backward_bytes


def summarize(
    num_steps: int, batch_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device, pass_name: str,
    seconds: dict[str, list[float]],
) -> dict:
    """One table row: medians, ref/forget_mult from the medians and from each round, and GB/s on CUDA."""
    row: dict = {"length": num_steps, "pass": pass_name}
    for name in VARIANTS:
        row[f"{name}_ms"] = 1000 * statistics.median(seconds[name])
        row[f"{name}_all_ms"] = [1000 * value for value in seconds[name]]
    row["ref_over_forget_mult"] = row["ref_ms"] / row["forget_mult_ms"]
    round_ratios = [ref / fast for fast, ref in zip(seconds["forget_mult"], seconds["ref"])]
    row["round_ratio_min"] = min(round_ratios)
    row["round_ratio_max"] = max(round_ratios)
    if device.type == "cuda":
        moved = bytes_moved(num_steps, batch_size, hidden_size, dtype, pass_name)
        row["forget_mult_gb_per_s"] = moved / (row["forget_mult_ms"] / 1000) / 1e9
    return row


def format_table(rows: list[dict], on_cuda: bool) -> str:
    header = (
        f"{'T':>5}  {'pass':<16}  {'forget_mult ms':>14}  {'ref ms':>9}  {'ref/forget_mult':>15}  {'per round':>13}"
        + (f"  {'GB/s':>7}" if on_cuda else "")
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['length']:>5}  {row['pass']:<16}  {row['forget_mult_ms']:>14.3f}  {row['ref_ms']:>9.3f}  "
            f"{row['ref_over_forget_mult']:>15.2f}  {row['round_ratio_min']:>6.2f}-{row['round_ratio_max']:<6.2f}"
            + (f"  {row['forget_mult_gb_per_s']:>7.1f}" if on_cuda else "")
        )
    return "\n".join(lines)


def copy_rate(inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    """A plain copy of one [T, B, H] tensor into another, the reference rate of the memory system."""
    source = inputs["x"].detach()
    target = torch.empty_like(source)
    return lambda: target.copy_(source)


def bandwidth_variants(device: torch.device, configs: list[KernelConfig]) -> dict[str, Callable]:
    """ForgetMult functions to time: the default launch and each of `configs` (CUDA); the PyTorch path (CPU)."""
    if device.type != "cuda":
        return {"torch path": forget_mult}
    from models.ops.forget_mult_triton import forget_mult_triton

    variants = {"default": forget_mult_triton}
    for config in configs:
        variants[str(config)] = lambda f, x, h0, config=config: forget_mult_triton(f, x, h0, config=config)
    return variants


def results_of(function: Callable, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """h, h_last, df, dx, dh0 of one forward+backward."""
    clear_grads(inputs)
    h, h_last = forward_backward(function, inputs)
    results = [h, h_last] + [inputs[key].grad.clone() for key in ("f", "x", "h0")]
    clear_grads(inputs)
    return results


def check_against(function: Callable, expected: list[torch.Tensor], inputs: dict[str, torch.Tensor]) -> float:
    """Largest |function - expected| over h, h_last, df, dx, dh0; RuntimeError beyond the dtype's tolerance."""
    rtol, atol = TOLERANCE[inputs["f"].dtype]
    largest = 0.0
    for label, got, want in zip(("h", "h_last", "df", "dx", "dh0"), results_of(function, inputs), expected):
        difference = (got.double() - want.double()).abs().max().item()
        largest = max(largest, difference)
        if not torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol):
            raise RuntimeError(f"{label}: the variant and its reference differ by up to {difference:.2e}")
    return largest


def bandwidth_mode(args: argparse.Namespace, machine: dict) -> dict:
    device, num_steps = args.device, args.lengths[0]
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        inputs = make_inputs(num_steps, args.batch_size, args.hidden, dtype, device, args.seed)
        variants = bandwidth_variants(device, args.configs)
        # The kernels against the PyTorch path on CUDA; on the CPU that path against the per-step loop.
        expected = results_of(forget_mult_torch if device.type == "cuda" else forget_mult_ref, inputs)
        differences = {name: check_against(function, expected, inputs) for name, function in variants.items()}
        del expected
        copy = copy_rate(inputs)
        timings: dict[str, list[float]] = {"copy": []}
        for name in variants:
            timings[f"{name} forward"], timings[f"{name} forward+backward"] = [], []
        for round_index in range(args.warmup + args.repeats):
            elapsed = {"copy": time_call(copy, device)}
            for name, function in variants.items():
                for pass_name in PASSES:
                    clear_grads(inputs)
                    elapsed[f"{name} {pass_name}"] = time_call(
                        functools.partial(PASS_FUNCTIONS[pass_name], function, inputs), device)
            if round_index >= args.warmup:
                for key, value in elapsed.items():
                    timings[key].append(value)
        clear_grads(inputs)
        element = inputs["f"].element_size()
        copy_seconds = statistics.median(timings["copy"])
        copy_bytes = 2 * num_steps * args.batch_size * args.hidden * element
        copy_rate_gb = copy_bytes / copy_seconds / 1e9
        for name in variants:
            config = name
            if name == "default" and device.type == "cuda":
                config = f"default = {choose_config(args.batch_size * args.hidden, 1, dtype, device, num_steps)}"
            row = {"dtype": dtype_name, "config": config, "copy_gb_per_s": copy_rate_gb,
                   "max_difference": differences[name]}
            for pass_name in PASSES:
                seconds = statistics.median(timings[f"{name} {pass_name}"])
                moved = bytes_moved(num_steps, args.batch_size, args.hidden, dtype, pass_name)
                row[f"{pass_name}_ms"] = 1000 * seconds
                row[f"{pass_name}_gb_per_s"] = moved / seconds / 1e9
                row[f"{pass_name}_of_copy"] = row[f"{pass_name}_gb_per_s"] / copy_rate_gb
            rows.append(row)
        print(f"  done: {dtype_name}", file=sys.stderr, flush=True)
        del inputs, copy
    header = (f"{'dtype':<9} {'config':<22} {'copy GB/s':>9}  {'fwd ms':>8} {'fwd GB/s':>9} {'of copy':>7}  "
              f"{'f+b ms':>8} {'f+b GB/s':>9} {'of copy':>7}  {'max diff':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['dtype']:<9} {row['config']:<22} {row['copy_gb_per_s']:>9.1f}  {row['forward_ms']:>8.3f} "
              f"{row['forward_gb_per_s']:>9.1f} {row['forward_of_copy']:>6.0%}  {row['forward+backward_ms']:>8.3f} "
              f"{row['forward+backward_gb_per_s']:>9.1f} {row['forward+backward_of_copy']:>6.0%}  "
              f"{row['max_difference']:>8.1e}")
    print(f"B {args.batch_size}, H {args.hidden}, T {num_steps}, h0 given; medians of {args.repeats} interleaved "
          f"rounds after {args.warmup} warm-up rounds ({'CUDA events' if device.type == 'cuda' else 'wall time'}); "
          "GB/s = bytes the kernels must read and write / median time (forward: f, x in, h out; backward: f, x, h, "
          "dL/dh in, df, dx out); copy: 2 x one [T, B, H] tensor's bytes / its median time; target: "
          "forward+backward at 80 % of the copy rate")
    return {"benchmark": "forget_mult_bandwidth", "machine": machine,
            "config": {"batch_size": args.batch_size, "hidden": args.hidden, "length": num_steps,
                       "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed},
            "results": rows}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_info(args.device)
    on_cuda = args.device.type == "cuda"
    if on_cuda:
        machine["triton"] = importlib.util.find_spec("triton") is not None  # forget_mult's kernel, or its fallback
    print(
        f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['threads']} torch threads, "
        f"torch {machine['torch']}, device {machine.get('gpu', machine['device'])}"
        + (f", triton {'installed' if machine['triton'] else 'missing'}" if on_cuda else "")
    )
    if args.bandwidth:
        results = bandwidth_mode(args, machine)
        write_results(args.json, results)
        return results
    print(
        f"forget_mult: B {args.batch_size}, H {args.hidden}, {str(args.dtype).replace('torch.', '')}, h0 given, "
        f"T in {args.lengths}; {args.warmup} warmup + {args.repeats} timed rounds"
    )

    rows = []
    differences = {}
    for num_steps in args.lengths:
        inputs = make_inputs(num_steps, args.batch_size, args.hidden, args.dtype, args.device, args.seed)
        differences[num_steps] = check_same_result(inputs)
        for pass_name in PASSES:
            seconds = time_rounds(inputs, pass_name, args.warmup, args.repeats)
            rows.append(summarize(num_steps, args.batch_size, args.hidden, args.dtype, args.device, pass_name, seconds))
            print(f"  done: T {num_steps}, {pass_name}", file=sys.stderr, flush=True)
    print("same result: " + ", ".join(f"T {length} max |forget_mult - ref| = {value:.1e}"
                                      for length, value in differences.items()))
    print(format_table(rows, on_cuda))
    print("medians of the timed rounds; ref/forget_mult = ref ms / forget_mult ms (above 1: forget_mult is faster); "
          "per round: range of that ratio within single rounds"
          + ("; GB/s: bytes the kernels read and write / forget_mult's median time" if on_cuda else ""))

    results = {
        "benchmark": "forget_mult",
        "machine": machine,
        "config": {
            "batch_size": args.batch_size, "hidden": args.hidden, "lengths": args.lengths,
            "dtype": str(args.dtype).replace("torch.", ""), "warmup": args.warmup, "repeats": args.repeats,
            "seed": args.seed,
        },
        "max_differences": differences,
        "results": rows,
    }
    write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
