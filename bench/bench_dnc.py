"""DNC, SAM and SDNC: forward+backward time and memory saved for backward against the number of cells.

The issue's setting: batch 8, sequence 20, input 64, LSTM controller of 128 units (the published
defaults: one layer of two LSTM layers), 4 read heads, cells of 32; SAM and SDNC with the
published sparse_reads 4 and temporal_reads 4. One pass is the forward pass over the 20 steps and
the backward pass of the mean square of the output (no optimiser step); "ms/step" is its time
divided by the 20 time steps, the unit of the issue's figures (its published-library DNC at 16
cells, 11 ms, cannot be a whole 20-step pass: the controller alone takes longer). Rounds
interleave the models; times are medians. Also reported: the time to construct SAM and SDNC at
65,536 cells (constructor and initial state).

Bytes saved for backward are the unique storages that stay alive from the forward pass to the
backward pass: the tensors autograd saves (`torch.autograd.graph.saved_tensors_hooks`), the link
matrices a DNC's `LinkTape` keeps (its automatic setting from 256 cells), and the inputs of
checkpointed segments (`checkpoint_steps=k`; checkpointing keeps those and saves nothing inside; the
last segment runs without checkpointing and is counted with the rest). `peak` adds what backward
makes on top: the tape's working matrix, or, with segments, the segment inputs plus one segment's
saved tensors (measured by running one segment without checkpointing). "real MiB" is the process's
own view (`real_growth_mib`), gradients and allocator included.

Targets (issue 6): DNC at 1,024 cells <= 120 ms per step and <= 280 MiB saved; SAM and SDNC at
16,384 cells <= 20 ms per step and <= 40 MiB, t(65,536) / t(1,024) <= 3; construction < 1 s.

Transparent huge pages: PyTorch's CPU allocator backs large tensors with huge pages when the
environment variable THP_MEM_ALLOC_ENABLE=1 is set before its first allocation. The DNC allocates a
fresh 32 MiB link matrix per step (batch 8 x 1,024 x 1,024), and without huge pages the page faults on
it cost about a third of the step on this machine; so this script sets the variable unless it is
already set (`THP_MEM_ALLOC_ENABLE=0 python bench/bench_dnc.py` measures without), and the task
scripts (copy_task.py, adding_task.py, argmax_task.py) do the same.

The search of SAM and SDNC: `--nn-index exact` (the default; PyTorch, it scores every row of a memory
full of data, so its time grows with N under `--filled`) or `--nn-index faiss`, exhaustive by default or,
with `--index-lists N` (or `sqrt`: round(sqrt(cells)) lists at each size), FAISS's approximate IVF index
scanning `--index-probes P` lists per query (default 8), kept from pass to pass (each pass restarts from
the same filled memory: the kept index takes back the rows the pass wrote). With an IVF index the table
also gives its recall@K: over the read queries the model makes in one pass from the starting memory, the
share of the exact search's K rows (cosine top-K over that memory) that the index finds.

    python bench/bench_dnc.py                                  # 1 thread, CPU, about 5 min
    python bench/bench_dnc.py --quick                          # one timed round
    python bench/bench_dnc.py --json bench/out/dnc.json --plot bench/out/dnc.png
    python bench/bench_dnc.py --kinds SAM SDNC --filled --nn-index faiss --index-lists sqrt --index-probes 8
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch allocates anything (see above)

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as `python bench/bench_dnc.py` from anywhere

import torch  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import models.dnc.dnc as dnc_module  # noqa: E402
from bench.common import machine_info, synchronize, write_results  # noqa: E402
from models.core import state_tensors  # noqa: E402
from models.dnc import DNC, SAM, SDNC  # noqa: E402
from models.dnc.memory import LinkTape  # noqa: E402
from models.dnc.search import cosine_topk, make_index  # noqa: E402

MIB = 2 ** 20
CLASSES = {"DNC": DNC, "SAM": SAM, "SDNC": SDNC}
TARGETS = {  # kind: (cells, ms per time step, MiB saved for backward)
    "DNC": (1024, 120.0, 280.0),
    "SAM": (16384, 20.0, 40.0),
    "SDNC": (16384, 20.0, 40.0),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dnc-cells", dest="dnc_cells", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--sparse-cells", dest="sparse_cells", type=int, nargs="+", default=[1024, 16384, 65536])
    parser.add_argument("--kinds", nargs="+", choices=list(CLASSES), default=list(CLASSES))
    parser.add_argument("--construction-cells", dest="construction_cells", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="sequence length")
    parser.add_argument("--input", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--read-heads", dest="read_heads", type=int, default=4)
    parser.add_argument("--cell", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--quick", action="store_true", help="one untimed and one timed round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--filled", action="store_true",
                        help="SAM / SDNC start from a memory full of data (random rows, every row accessed) "
                             "rather than an empty one, where the exact search scores only the written rows")
    parser.add_argument("--nn-index", dest="nn_index", choices=("exact", "faiss"), default="exact",
                        help="SAM / SDNC: the nearest-neighbour search (faiss needs faiss-cpu)")
    parser.add_argument("--index-lists", dest="index_lists", type=index_lists_option, default=None,
                        help="SAM / SDNC with --nn-index faiss: IVF lists (a number, or sqrt: round(sqrt(cells)) "
                             "per size); default: an exhaustive flat index")
    parser.add_argument("--index-probes", dest="index_probes", type=int, default=None,
                        help="SAM / SDNC with an IVF index: lists scanned per query (default 8)")
    parser.add_argument("--no-lstm-ratio", dest="lstm_ratio", action="store_false",
                        help="skip the DNC at 16 cells (eager and compiled) against an nn.LSTM of its controller")
    parser.add_argument("--no-compiled-sparse", dest="compiled_sparse", action="store_false",
                        help="skip SAM and SDNC at 1,024 cells eager against their compiled pieces")
    parser.add_argument("--no-rss", dest="rss", action="store_false",
                        help="skip the real memory growth (one fresh process per model)")
    parser.add_argument("--rss-of", dest="rss_of", nargs=2, metavar=("KIND", "CELLS"), default=None,
                        help=argparse.SUPPRESS)  # the child process of real_growth_mib
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--plot", type=Path, default=REPO_ROOT / "bench" / "out" / "dnc.png",
                        help="write the time and memory plot here (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 1
    if args.index_lists is not None and args.nn_index != "faiss":
        parser.error("--index-lists needs --nn-index faiss")
    if args.index_probes is not None and args.index_lists is None:
        parser.error("--index-probes needs --index-lists (and --nn-index faiss)")
    return args


def index_lists_option(text: str) -> int | str:
    """--index-lists: a positive number, or 'sqrt'."""
    if text == "sqrt":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of lists or 'sqrt', got {text!r}")
    return int(text)


def lists_for(cells: int, args: argparse.Namespace) -> int | None:
    """The IVF lists of a memory of `cells` rows (None: no IVF index)."""
    if args.index_lists == "sqrt":
        return max(1, round(math.sqrt(cells)))
    return args.index_lists


def build(kind: str, cells: int, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    options = {}
    if kind != "DNC":
        options = {"nn_index": args.nn_index, "index_lists": lists_for(cells, args), "index_probes": args.index_probes}
    return CLASSES[kind](input_size=args.input, hidden_size=args.hidden, rnn_type="lstm", nr_cells=cells,
                         read_heads=args.read_heads, cell_size=args.cell, batch_first=True, device=device, **options)


def index_recall(model: torch.nn.Module, x: torch.Tensor, memory_state: dict | None) -> float:
    """Recall@K of a SAM / SDNC's IVF index: the read queries of one pass (no gradient) from `memory_state`
    (None: a fresh memory), searched in a new index of the model's settings over the starting memory, against
    the exact cosine top-K over it; the share of the exact rows found."""
    memory = model.core.memories[0]
    queries: list[torch.Tensor] = []
    read = memory._read

    def recording_read(ctx: Any, interface: Any) -> Any:
        queries.append(interface.read_queries.detach().clone())  # [B, R, W]
        return read(ctx, interface)

    memory._read = recording_read
    try:
        with torch.no_grad():
            model(x, None if memory_state is None else (None, memory_state, None))
    finally:
        del memory._read
    start = (memory_state or memory.initial_state(x.size(0), x.device))["memory"]
    asked = torch.cat(queries, dim=1)  # [B, T R, W]
    index = make_index("faiss", start, lists=memory.index_lists, probes=memory.index_probes,
                       threads=torch.get_num_threads())
    found = index.search(asked, memory.sparse_reads)  # [B, T R, K]
    exact = cosine_topk(asked, start, memory.sparse_reads)[1]
    return float((found.unsqueeze(-1) == exact.unsqueeze(-2)).any(-1).float().mean())


def training_step(model: torch.nn.Module, x: torch.Tensor, memory: dict | None = None) -> float:
    model.zero_grad(set_to_none=True)
    synchronize(x.device)
    start = time.perf_counter()
    output, _ = model(x) if memory is None else model(x, (None, memory, None))
    output.pow(2).mean().backward()
    synchronize(x.device)
    return time.perf_counter() - start


class StorageCounter:
    """Unique storages (by data pointer) of the tensors handed to `add`."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}

    def add(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.sizes[storage.data_ptr()] = max(self.sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """MiB kept for backward by one forward pass, and the peak with one segment being recomputed."""
    counter, inputs = StorageCounter(), StorageCounter()
    real_checkpoint = dnc_module.checkpoint
    segments: list[int] = []

    def counting_checkpoint(function, *arguments, **options):
        for leaf in tree_leaves(arguments):
            if isinstance(leaf, torch.Tensor):
                counter.add(leaf)
                inputs.add(leaf)
        segments.append(arguments[0].size(0))
        return real_checkpoint(function, *arguments, **options)

    tapes: list[LinkTape] = []  # the DNC's automatic setting keeps some link matrices on a tape instead
    real_record = LinkTape.record

    def counting_record(tape: LinkTape, link: torch.Tensor, *weights: torch.Tensor) -> int:
        step = real_record(tape, link, *weights)
        if step in tape.kept:
            counter.add(tape.kept[step])
        if step == 0:
            tapes.append(tape)
        return step

    dnc_module.checkpoint = counting_checkpoint
    LinkTape.record = counting_record
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.add, lambda tensor: tensor):
            output, _ = model(x)
        held = counter.total
        # backward replays the matrices it was not kept into one working matrix per tape
        replaying = sum(tape.kept[0].numel() * tape.kept[0].element_size() for tape in tapes
                        if len(tape.updates) > tape.every)
        del output
        segment_bytes = 0
        if segments:  # one segment's saved tensors, without checkpointing
            core = model.core
            configured = core.config.checkpoint_steps
            core.config.checkpoint_steps = 0
            try:
                start = core.initial_state(x.size(0), x.device)  # the segment's input, counted above
                known = {tensor.untyped_storage().data_ptr() for tensor in state_tensors(start)}
                inner = StorageCounter()
                with torch.autograd.graph.saved_tensors_hooks(inner.add, lambda tensor: tensor):
                    output, _ = model(x[:, :max(segments)], start)
                segment_bytes = sum(size for pointer, size in inner.sizes.items() if pointer not in known)
                del output
            finally:
                core.config.checkpoint_steps = configured
    finally:
        dnc_module.checkpoint = real_checkpoint
        LinkTape.record = real_record
    recomputing = inputs.total + segment_bytes if segments else 0
    return {"saved_mib": held / MIB, "peak_mib": max(held + replaying, recomputing) / MIB,
            "checkpointed_segments": len(segments), "link_tape_every": tapes[0].every if tapes else 0}


def construction_seconds(kind: str, cells: int, args: argparse.Namespace, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    model = build(kind, cells, args, device)
    model.core.initial_state(args.batch, device)
    synchronize(device)
    return time.perf_counter() - start


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in dict.fromkeys(row["kind"] for row in rows):
        kind_rows = [row for row in rows if row["kind"] == kind]
        cells = [row["cells"] for row in kind_rows]
        time_axes.plot(cells, [row["ms_per_step"] for row in kind_rows], marker="o", label=kind)
        memory_axes.plot(cells, [row["saved_mib"] for row in kind_rows], marker="o", label=f"{kind} saved")
        if any(row["peak_mib"] != row["saved_mib"] for row in kind_rows):
            memory_axes.plot(cells, [row["peak_mib"] for row in kind_rows], marker="x", linestyle="--",
                             label=f"{kind} peak")
    for axes, label in ((time_axes, "ms per time step (forward+backward)"), (memory_axes, "MiB saved for backward")):
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("memory cells N")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.suptitle("DNC / SAM / SDNC: batch 8, 20 steps, forward+backward")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


def filled_memory(model: torch.nn.Module, batch: int, device: torch.device) -> dict:
    """A SAM / SDNC memory state full of data: random rows, every row accessed once (in a random order)."""
    memory = model.core.memories[0]
    state = memory.initial_state(batch, device)
    generator = torch.Generator().manual_seed(0)
    cells, width = memory.nr_cells, memory.cell_size
    state["memory"] = torch.randn(batch, cells, width, generator=generator).to(device)
    order = torch.stack([torch.randperm(cells, generator=generator) for _ in range(batch)])
    state["usage"] = order.to(device=device, dtype=torch.int32)  # last access steps 0 .. N-1
    state["step"] = torch.full((batch,), cells, dtype=torch.int32, device=device)
    return state


def real_growth_mib(kind: str, cells: int, args: argparse.Namespace) -> float:
    """How much a fresh process's peak resident memory grows over one forward+backward pass (MiB).

    Saved-tensor counts miss what the allocator really holds: gradients and temporaries of the backward
    pass, freed blocks kept for reuse, page granularity. So a child process (the task scripts' allocator
    settings: huge pages, glibc keeping freed memory) first runs a pass of the same kind at 16 cells (so
    lazy imports and thread pools are paid for), builds the model, its input and its state, resets the
    kernel's peak-resident mark (`/proc/self/clear_refs`), runs one pass and reports its peak resident
    size (VmHWM) minus its resident size before the pass (VmRSS). Linux only. (Not `ru_maxrss`: a child
    inherits its parent's mark across fork and exec.)
    """
    options = ["--batch", str(args.batch), "--steps", str(args.steps), "--input", str(args.input),
               "--hidden", str(args.hidden), "--read-heads", str(args.read_heads), "--cell", str(args.cell),
               "--threads", str(args.threads), "--device", args.device, "--rss-of", kind, str(cells)]
    if args.filled:
        options.append("--filled")
    options += ["--nn-index", args.nn_index]
    if args.index_lists is not None:
        options += ["--index-lists", str(args.index_lists)]
    if args.index_probes is not None:
        options += ["--index-probes", str(args.index_probes)]
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), *options], capture_output=True,
                           text=True, check=True, env=os.environ | {"THP_MEM_ALLOC_ENABLE": "1"})
    return float(child.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    """A `VmXXX:   N kB` line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def rss_child(args: argparse.Namespace) -> None:
    """The child of `real_growth_mib`: prints the growth in MiB."""
    from training.run import keep_freed_memory

    keep_freed_memory()
    kind, cells = args.rss_of[0], int(args.rss_of[1])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.steps, args.input, device=device)
    training_step(build(kind, 16, args, device), x)  # one-time costs (lazy imports, thread pools) first
    model = build(kind, cells, args, device)
    memory = filled_memory(model, args.batch, device) if args.filled and kind != "DNC" else None
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak-resident mark (VmHWM) back to the current resident size
    before = _status_kib("VmRSS")
    training_step(model, x, memory)
    print(max(0, _status_kib("VmHWM") - before) / 1024)


def lstm_ratio(args: argparse.Namespace, x: torch.Tensor, device: torch.device) -> dict:
    """The DNC at 16 cells, eager and with its memory step compiled (`--compile`), against the `nn.LSTM` its
    controller is (2 layers of --hidden over the input and the read vectors), forward+backward, interleaved.
    Compiled-cores issue target: at most 8x on the CPU (one thread)."""
    import copy

    eager = build("DNC", 16, args, device)
    compiled = copy.deepcopy(eager)
    assert compiled.compile_steps()
    lstm = torch.nn.LSTM(args.input + args.read_heads * args.cell, args.hidden, num_layers=2,
                         batch_first=True).to(device)
    lstm_x = torch.randn(args.batch, args.steps, args.input + args.read_heads * args.cell, device=device)
    variants = {"dnc": lambda: training_step(eager, x), "dnc-compiled": lambda: training_step(compiled, x),
                "lstm": lambda: training_step(lstm, lstm_x)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.warmup + 2 + 3 * args.repeats):  # two more warm-ups: the compilation
        for name, run in variants.items():
            elapsed = run()
            if round_index >= args.warmup + 2:
                seconds[name].append(elapsed)
    ms = {name: 1000 * statistics.median(values) / args.steps for name, values in seconds.items()}
    return {"ms_per_step": ms, "dnc_over_lstm": ms["dnc"] / ms["lstm"],
            "compiled_dnc_over_lstm": ms["dnc-compiled"] / ms["lstm"]}


def compiled_sparse(args: argparse.Namespace, x: torch.Tensor, device: torch.device, cells: int = 1024) -> dict:
    """SAM and SDNC eager against their compiled pieces (`compile_steps`), forward+backward ms/step, interleaved."""
    import copy

    models = {}
    for kind in ("SAM", "SDNC"):
        eager = build(kind, cells, args, device)
        compiled = copy.deepcopy(eager)
        assert compiled.compile_steps()
        models[kind], models[kind + "-compiled"] = eager, compiled
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(args.warmup + 2 + 3 * args.repeats):  # two more warm-ups: the compilation
        for name, model in models.items():
            elapsed = training_step(model, x)
            if round_index >= args.warmup + 2:
                seconds[name].append(elapsed)
    ms = {name: 1000 * statistics.median(values) / args.steps for name, values in seconds.items()}
    return {"cells": cells, "ms_per_step": ms,
            "compiled_over_eager": {kind: ms[kind + "-compiled"] / ms[kind] for kind in ("SAM", "SDNC")}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.rss_of:
        rss_child(args)
        return {}
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_info(device)
    machine["THP_MEM_ALLOC_ENABLE"] = os.environ.get("THP_MEM_ALLOC_ENABLE")
    print(f"machine: {machine['cpu']}, {machine['threads']} torch threads, torch {machine['torch']}, "
          f"device {machine.get('gpu', machine['device'])}, THP_MEM_ALLOC_ENABLE={machine['THP_MEM_ALLOC_ENABLE']}")
    variants = [(kind, cells) for kind in args.kinds
                for cells in (args.dnc_cells if kind == "DNC" else args.sparse_cells)]
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.steps, args.input, device=device)
    built = {variant: build(*variant, args, device) for variant in variants}
    memories = {variant: filled_memory(model, args.batch, device) if args.filled and variant[0] != "DNC" else None
                for variant, model in built.items()}
    seconds: dict[tuple[str, int], list[float]] = {variant: [] for variant in variants}
    for round_index in range(args.warmup + args.repeats):
        for variant, model in built.items():
            elapsed = training_step(model, x, memories[variant])
            if round_index >= args.warmup:
                seconds[variant].append(elapsed)
        print(f"  round {round_index + 1}/{args.warmup + args.repeats} done", file=sys.stderr, flush=True)
    rows = []
    for (kind, cells), model in built.items():
        ms = 1000 * statistics.median(seconds[(kind, cells)])
        ivf = kind != "DNC" and args.nn_index == "faiss" and args.index_lists is not None
        rows.append({"kind": kind, "cells": cells, "ms_per_step": ms / args.steps, "ms_per_pass": ms,
                     **saved_bytes(model, x),
                     "real_mib": real_growth_mib(kind, cells, args) if args.rss and device.type == "cpu" else None,
                     "index_lists": lists_for(cells, args) if ivf else None,
                     # over an empty memory every query ties among zero rows: no recall to speak of
                     "recall": index_recall(model, x, memories[(kind, cells)]) if ivf and args.filled else None})
    construction = {kind: construction_seconds(kind, args.construction_cells, args, device)
                    for kind in args.kinds if kind != "DNC"}

    print(f"batch {args.batch}, {args.steps} steps, input {args.input}, LSTM {args.hidden} (2 layers), "
          f"{args.read_heads} read heads, cells of {args.cell}; forward+backward, medians of {args.repeats}")
    if any(kind != "DNC" for kind in args.kinds):
        search = "exact (PyTorch)" if args.nn_index == "exact" else (
            "FAISS flat (exhaustive)" if args.index_lists is None else
            f"FAISS IVF, {args.index_lists} lists, {args.index_probes or 8} probes, "
            + ("kept from pass to pass" if args.filled else
               "none built: each pass starts from an empty memory, searched exactly until a quarter full"))
        print(f"SAM / SDNC search: {search}; memory {'full of data' if args.filled else 'empty'} at the start")
    ivf = any(row["index_lists"] is not None for row in rows)
    print(f"{'model':<5} {'cells':>7} {'ms/step':>9} {'ms/pass':>9} {'saved MiB':>10} {'peak MiB':>9} "
          f"{'real MiB':>9} {'checkpointed':>12} {'tape every':>10}"
          + (f" {'lists':>6} {'recall@K':>9}" if ivf else ""))
    for row in rows:
        real = "-" if row["real_mib"] is None else f"{row['real_mib']:.1f}"
        extra = ""
        if ivf:
            extra = (f" {'-':>6}" if row["index_lists"] is None else f" {row['index_lists']:>6}") + (
                f" {'-':>9}" if row["recall"] is None else f" {row['recall']:>9.3f}")
        print(f"{row['kind']:<5} {row['cells']:>7,} {row['ms_per_step']:>9.2f} {row['ms_per_pass']:>9.1f} "
              f"{row['saved_mib']:>10.1f} {row['peak_mib']:>9.1f} {real:>9} {row['checkpointed_segments']:>12} "
              f"{row['link_tape_every'] or '-':>10}" + extra)
    print("real MiB: a fresh process's peak resident growth over one pass (CPU only; the allocator's view)")
    if ivf:
        print("recall@K: of the exact top-K rows of the read queries of one pass over the starting memory, "
              "the share the IVF index finds (--filled only)")
    for kind, value in construction.items():
        print(f"construction of {kind} at {args.construction_cells:,} cells: {value:.3f} s (target < 1 s)")

    checks = []
    by_key = {(row["kind"], row["cells"]): row for row in rows}
    for kind, (cells, ms_target, mib_target) in TARGETS.items():
        row = by_key.get((kind, cells))
        if row is None:
            continue
        checks.append(f"{kind} {cells:,}: {row['ms_per_step']:.2f} ms/step / {ms_target:g} = "
                      f"{row['ms_per_step'] / ms_target:.2f}; "
                      f"saved {row['saved_mib']:.1f} MiB (peak {row['peak_mib']:.1f}) / {mib_target:g} MiB = "
                      f"{row['peak_mib'] / mib_target:.2f}"
                      + ("" if row["real_mib"] is None else
                         f"; real growth {row['real_mib']:.1f} MiB / {mib_target:g} = "
                         f"{row['real_mib'] / mib_target:.2f}"))
        small, large = by_key.get((kind, 1024)), by_key.get((kind, 65536))
        if kind != "DNC" and small and large:
            checks.append(f"{kind} t(65,536) / t(1,024) = {large['ms_per_step'] / small['ms_per_step']:.2f} "
                          f"(target <= 3)")
    print("against the targets (ratio <= 1 meets it; memory judged by the peak):")
    for line in checks:
        print("  " + line)
    ratio = lstm_ratio(args, x, device) if args.lstm_ratio else None
    if ratio is not None:
        ms = ratio["ms_per_step"]
        print(f"DNC 16 cells / nn.LSTM (2 x {args.hidden}) per step, forward+backward: eager {ms['dnc']:.3f} / "
              f"{ms['lstm']:.3f} ms = {ratio['dnc_over_lstm']:.1f}x; compiled memory step {ms['dnc-compiled']:.3f} ms"
              f" = {ratio['compiled_dnc_over_lstm']:.1f}x (target <= 8)")
    sparse = compiled_sparse(args, x, device) if args.compiled_sparse else None
    if sparse is not None:
        ms = sparse["ms_per_step"]
        print(f"compiled pieces at {sparse['cells']:,} cells, ms/step forward+backward: "
              + "; ".join(f"{kind} eager {ms[kind]:.2f}, compiled {ms[kind + '-compiled']:.2f} "
                          f"({sparse['compiled_over_eager'][kind]:.2f}x)" for kind in ("SAM", "SDNC")))
    if args.plot is not None:
        plot(rows, args.plot)
    results = {"benchmark": "dnc", "machine": machine, "config": vars(args) | {"json": None, "plot": None},
               "results": rows, "construction_seconds": construction, "checks": checks, "lstm_ratio": ratio,
               "compiled_sparse": sparse}
    write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
