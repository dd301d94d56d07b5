"""The project's training loop against a minimal plain loop: same model, data and batches, ms/batch.

The project's loop is `training.LMTrainer` (the hot loop of every LM script: `Trainer.train_step`,
its non-finite-safe update, the pending loss records read at log lines, the progress bar), built
from the flags of `train_rnn.py` or `main.py` and driven in blocks of K batches through its own
`train_period` (`options.max_steps = state.step + K`; it returns "max-steps" after K batches).
The plain loop is the pytorch/examples pattern written here: a copy of the same model with the
same initial weights, `torch.optim.SGD` with the same lr and weight decay, and per batch detach
the state, `zero_grad`, forward, `model.loss` (+ AR/TAR for `awd`, as `LMTrainer.compute_loss`),
backward, `clip_grad_norm_`, step; the loss is summed as a tensor and read every --log-interval
batches. Both walk the same batches (`data.batchify` / `data.get_batch`, the same window starts),
restarting from the first window (and a fresh state) rather than crossing an epoch's end.

Cases (`--cases`, default all):

- `lstm200`: pytorch/examples' small model: `LanguageModel`, 2-layer LSTM of 200 units, emsize 200,
  tied, dropout 0.2, batch 20, bptt 35, SGD lr 20, clip 0.25 (`train_rnn.py`'s parser);
- `lstm650`: the same at 650 units, dropout 0.5;
- `awd`: the AWD-LSTM stack as `main.py` builds it (its defaults: 3 layers 400/1150, weight drop 0.5,
  AR/TAR alpha 2 / beta 1, SGD lr 30, wdecay 1.2e-6) with `--batch_size 20 --bptt 70
  --no-variable-bptt`, so both loops see the same windows;
- `allocator`: `training.run.keep_freed_memory()` (the glibc set-up the scripts call at start-up)
  on and off, CPU only (the trainer calls it on the CPU; a `default` child replaces it with a no-op,
  since setting glibc's MALLOC_* variables would also turn off glibc's dynamic mmap threshold): the
  `lstm200` case run in child processes (`--allocator keep|default`,
  alternately, `--allocator-runs` each), ms/batch and minor page faults per batch
  (`getrusage(RUSAGE_SELF).ru_minflt` deltas over the timed blocks). This process itself calls
  `keep_freed_memory()` as the scripts do (unless `--allocator default`).

Protocol per case: the two models start from the same weights, and one batch of each with the
same seed must give the same loss and the same weights after the update (fp32; `--tolerance`);
then one warm-up block of each, then `--rounds` rounds of [K project batches, K plain batches]
alternating which goes first. Each figure is the median (and min) ms/batch over the rounds'
blocks; project/plain is the ratio of the medians (target: at most 1.00), "per round" the range of
the ratio within single rounds. `--precision` (a list) sets the project loop's precision; the
plain loop stays fp32. Also printed: the cost of one `train_period` call with no batch (its fixed
cost, paid once per block here and once per epoch in training).

On CUDA only (skipped on the CPU): host syncs per batch of each loop's hot loop, counted as
`torch.cuda.set_sync_debug_mode("warn")` warnings over blocks of 1 and 1 + S batches that hold no log
line (per batch = difference / S; goal 0), with the lines that caused them; and with several
`--precision` values, tokens/s of each case per precision.

Run from the repository root:

    python bench/bench_loop.py --threads 1                        # all cases on CPU (~7 min)
    python bench/bench_loop.py --cases lstm200 --rounds 9 --json bench/out/loop.json
    python bench/bench_loop.py --device cuda --precision fp32 bf16 --batches 100
    python bench/bench_loop.py --cases lstm200 --profile cprofile   # where a block's time goes

`--write-results` replaces (or adds) this benchmark's section of bench/RESULTS.md with the run's
tables; notes written by hand in that section are replaced with it.
"""

from __future__ import annotations

import argparse
import collections
import copy
import cProfile
import gc
import io
import json
import os
import pstats
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as `python bench/bench_loop.py` from anywhere

import torch  # noqa: E402
from torch import nn  # noqa: E402

import main as awd_main  # noqa: E402
import models  # noqa: E402
import train_rnn  # noqa: E402
import training  # noqa: E402
import training.loop  # noqa: E402
from bench.common import machine_info, synchronize, write_results, write_results_section  # noqa: E402
from data import Corpus, batchify, get_batch  # noqa: E402
from models.core import detach_state  # noqa: E402
from training.run import keep_freed_memory  # noqa: E402

MODEL_CASES = ("lstm200", "lstm650", "awd")
CASES = MODEL_CASES + ("allocator",)
PRECISIONS = ("fp32", "bf16")
# K per case when --batches is not given: CPU batches of the larger models take 1-5 s.
DEFAULT_BATCHES = {"cpu": {"lstm200": 20, "lstm650": 10, "awd": 5}, "cuda": {"lstm200": 20, "lstm650": 20, "awd": 20}}
SECTION_TITLE = "Training loop (`bench/bench_loop.py`)"
SYNC_MESSAGE = "called a synchronizing"  # set_sync_debug_mode("warn"): "called a synchronizing CUDA operation"


def default_data() -> Path:
    for path in (REPO_ROOT / "data" / "penn", REPO_ROOT.parent / "shared" / "data" / "penn"):
        if (path / "train.txt").is_file():
            return path
    return REPO_ROOT / "data" / "penn"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="what to run (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (intra-op CPU threads)")
    parser.add_argument("--batches", type=int, default=None,
                        help="K, batches per timed block (default per case: CPU 20 / 10 / 5 for lstm200 / lstm650 / "
                             "awd, CUDA 20)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; a round runs each loop's block once")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"],
                        help="the project loop's --precision (the plain loop stays fp32); several: one comparison "
                             "each, and tokens/s per precision")
    parser.add_argument("--log-interval", dest="log_interval", type=int, default=200,
                        help="both loops read their losses every this many batches (the project's --log-interval)")
    parser.add_argument("--data", type=Path, default=default_data(), help="Penn Treebank folder (train/valid/test.txt)")
    parser.add_argument("--seed", type=int, default=1111, help="seed of the weights and dropout masks")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted difference of loss and weights after the first (fp32) batch")
    parser.add_argument("--sync-batches", dest="sync_batches", type=int, default=20,
                        help="CUDA: S, the batches whose host syncs are counted (fewer than --log-interval - 2)")
    parser.add_argument("--allocator", choices=["keep", "default"], default="keep",
                        help="keep: call training.run.keep_freed_memory() at start-up as the scripts do; "
                             "default: leave glibc's malloc settings (used by the allocator case's child runs)")
    parser.add_argument("--allocator-runs", dest="allocator_runs", type=int, default=2,
                        help="allocator case: child runs per setting, in the order keep, default, default, keep, ...")
    parser.add_argument("--allocator-rounds", dest="allocator_rounds", type=int, default=3,
                        help="allocator case: --rounds of each child run")
    parser.add_argument("--profile", choices=["cprofile", "torch"], default=None,
                        help="after timing, profile one block of each loop and print the top entries")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--write-results", dest="write_results", action="store_true",
                        help="replace (or add) this benchmark's section of bench/RESULTS.md with this run's tables")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.rounds < 1 or args.log_interval < 1 or args.sync_batches < 1:
        parser.error("--threads, --rounds, --log-interval and --sync-batches must be positive")
    if args.batches is not None and args.batches < 1:
        parser.error(f"--batches must be positive, got {args.batches}")
    if args.allocator_runs < 0 or args.allocator_rounds < 1:
        parser.error("--allocator-runs must be at least 0 and --allocator-rounds positive")
    args.cases = [case for case in CASES if case in args.cases]  # fixed order, no repeats
    args.precision = list(dict.fromkeys(args.precision))
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available on this machine; use --device cpu")
    if args.device.type == "cpu" and args.precision != ["fp32"]:
        print("note: bf16 autocast on the CPU times the CPU's bf16 kernels, not a GPU's", file=sys.stderr)
    if not (args.data / "train.txt").is_file():
        parser.error(f"no Penn Treebank in {args.data}: run `bash getdata.sh penn` or pass --data DIR")
    return args


# --------------------------------------------------------------------------- the two loops


def case_argv(case: str, precision: str, args: argparse.Namespace) -> list[str]:
    """The project's flags for `case` (parsed by train_rnn.py's or main.py's parser)."""
    data = os.path.relpath(args.data.resolve(), REPO_ROOT)  # only shown: the trainers get the corpus itself
    common = ["--data", data, "--device", str(args.device), "--threads", str(args.threads),
              "--precision", precision, "--log-interval", str(args.log_interval), "--seed", str(args.seed),
              "--batch_size", "20"]
    if case == "awd":  # main.py's defaults otherwise (AR/TAR 2 / 1, weight drop 0.5, lr 30, wdecay 1.2e-6)
        return common + ["--bptt", "70", "--no-variable-bptt"]
    nhid, dropout = {"lstm200": ("200", "0.2"), "lstm650": ("650", "0.5")}[case]
    return common + ["--model", "LSTM", "--emsize", nhid, "--nhid", nhid, "--nlayers", "2", "--dropout", dropout,
                     "--tied", "--optimizer", "sgd", "--lr", "20", "--clip", "0.25", "--bptt", "35"]


def case_flags(case: str, precision: str, args: argparse.Namespace) -> tuple[argparse.Namespace, Callable, str]:
    """(parsed flags, model config function, the equivalent script command) of `case`."""
    argv = case_argv(case, precision, args)
    if case == "awd":
        parser, config_fn, script = awd_main.build_parser(), awd_main.awd_config, "main.py"
    else:
        parser, config_fn, script = train_rnn.build_parser(), models.lm_config_from_args, "train_rnn.py"
    flags = training.parse_args(parser, argv).args
    training.check_lm_args(flags)
    return flags, config_fn, f"{script} {shlex.join(argv)}"


def window_start(position: int, batches: int, bptt: int, rows: int) -> int | None:
    """Where a block of `batches` full windows from `position` starts: `position`, or 0 (None) when the
    block would reach the epoch's end (the caller then also starts a fresh state)."""
    return position if position + batches * bptt <= rows - 1 else None


class ProjectLoop:
    """`training.LMTrainer`'s own hot loop, driven in blocks through `train_period`."""

    name = "project"

    def __init__(self, trainer: training.LMTrainer):
        self.trainer = trainer
        self.signals = training.StopSignals()  # not entered: no handlers, never a stop request
        self.bptt = trainer.lm.bptt

    @property
    def step(self) -> int:
        return self.trainer.state.step

    def run(self, batches: int) -> None:
        trainer = self.trainer
        if window_start(trainer.state.position, batches, self.bptt, trainer.train_data.size(0)) is None:
            trainer.state.position = 0
            trainer.hidden = trainer.model.initial_state(trainer.batch_size, trainer.device)
        trainer.options.max_steps = trainer.state.step + batches
        stop = trainer.train_period(self.signals)
        if stop != "max-steps":
            raise RuntimeError(f"train_period returned {stop!r} instead of 'max-steps' after {batches} batches")

    def period_cost(self) -> float:
        """Seconds of one `train_period` call that trains no batch (bar, clocks, the pending read)."""
        trainer = self.trainer
        trainer.options.max_steps = trainer.state.step
        synchronize(trainer.device)
        start = time.perf_counter()
        trainer.train_period(self.signals)
        synchronize(trainer.device)
        return time.perf_counter() - start


class PlainLoop:
    """The pytorch/examples loop (plus AWD-LSTM's AR/TAR) on its own copy of the model."""

    name = "plain"

    def __init__(self, model: models.LanguageModel, corpus: Corpus, flags: argparse.Namespace, device: torch.device):
        self.model, self.device = model, device
        self.train_data = batchify(corpus.train, flags.batch_size).to(device)  # [S, B]
        self.bptt, self.batch_size, self.clip = flags.bptt, flags.batch_size, flags.clip
        self.alpha, self.beta, self.log_interval = flags.alpha, flags.beta, flags.log_interval
        self.optimizer = torch.optim.SGD(model.parameters(), lr=flags.lr, weight_decay=flags.wdecay)
        self.hidden = model.initial_state(self.batch_size, device)
        self.position = 0
        self.step = 0
        self.total_loss = torch.zeros((), device=device)
        self.last_loss: float | None = None  # mean loss of the last log interval
        self.first_loss: torch.Tensor | None = None

    def run(self, batches: int) -> None:
        model = self.model
        if window_start(self.position, batches, self.bptt, self.train_data.size(0)) is None:
            self.position = 0
            self.hidden = model.initial_state(self.batch_size, self.device)
        model.train()
        for _ in range(batches):
            inputs, targets = get_batch(self.train_data, self.position, self.bptt)  # [T, B] each
            self.position += inputs.size(0)
            self.hidden = detach_state(self.hidden)
            self.optimizer.zero_grad()
            if self.alpha or self.beta:
                features, self.hidden, (raw, dropped) = model(inputs, self.hidden, return_outputs=True)
            else:
                features, self.hidden = model(inputs, self.hidden)
            cross_entropy = model.loss(features, targets)
            loss = cross_entropy
            if self.alpha:
                loss = loss + self.alpha * dropped.pow(2).mean()
            if self.beta and raw.size(0) > 1:
                loss = loss + self.beta * (raw[1:] - raw[:-1]).pow(2).mean()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), self.clip)
            self.optimizer.step()
            self.total_loss += cross_entropy.detach()
            if self.first_loss is None:
                self.first_loss = cross_entropy.detach()
            self.step += 1
            if self.step % self.log_interval == 0:
                self.last_loss = self.total_loss.item() / self.log_interval
                self.total_loss.zero_()


Loop = ProjectLoop | PlainLoop


def timed_block(loop: Loop, batches: int, device: torch.device) -> tuple[float, int]:
    """(seconds, minor page faults) of one block of `batches` batches."""
    synchronize(device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    loop.run(batches)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def check_same_step(project: ProjectLoop, plain: PlainLoop, seed: int) -> dict[str, float]:
    """One batch of each from the same weights and the same seed: |loss difference| and the largest
    |weight difference| after the update (0 when both loops compute the same step)."""
    if not torch.equal(project.trainer.train_data, plain.train_data):
        raise RuntimeError("the two loops batchified the training split differently")
    state = project.trainer.state
    before = state.interval_loss, state.interval_batches
    torch.manual_seed(seed)
    project.run(1)
    if state.interval_batches != before[1] + 1:
        raise RuntimeError("the project's first step was skipped (non-finite loss or gradient)")
    project_loss = state.interval_loss - before[0]
    torch.manual_seed(seed)
    plain.run(1)
    plain_loss = plain.first_loss.item()
    with torch.no_grad():
        weights = max((a.float() - b.float()).abs().max().item()
                      for a, b in zip(project.trainer.model.parameters(), plain.model.parameters()))
    return {"project_loss": project_loss, "plain_loss": plain_loss, "loss": abs(project_loss - plain_loss),
            "weights": weights}


# --------------------------------------------------------------------------- CUDA: host syncs


def count_syncs(loop: Loop, batches: int) -> tuple[int, collections.Counter]:
    """Host syncs of one block of `batches` batches, and the lines that caused them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loop.run(batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [warning for warning in caught if SYNC_MESSAGE in str(warning.message)]
    where = collections.Counter(f"{Path(warning.filename).name}:{warning.lineno}" for warning in syncs)
    return len(syncs), where


def syncs_per_batch(loop: Loop, batches: int, log_interval: int) -> dict:
    """Host syncs per batch of the hot loop: blocks of 1 and 1 + `batches` batches between two log lines;
    the difference removes what a block costs once (the end-of-period read and synchronisation)."""
    batches = min(batches, log_interval - 3)
    if batches < 1:
        return {"skipped": f"--log-interval {log_interval} leaves no room for a block between log lines"}
    to_log = (-loop.step) % log_interval  # batches until the step after which a log line is written
    if to_log:
        loop.run(to_log)
    torch.cuda.synchronize()
    one, _ = count_syncs(loop, 1)
    many, where = count_syncs(loop, 1 + batches)
    return {"per_batch": (many - one) / batches, "block_of_1": one, f"block_of_{1 + batches}": many,
            "lines": dict(where.most_common(8))}


# --------------------------------------------------------------------------- one case


def profile_block(loop: Loop, batches: int, kind: str, device: torch.device) -> str:
    """The top entries of a profile of one block."""
    if kind == "cprofile":
        profiler = cProfile.Profile()
        profiler.enable()
        loop.run(batches)
        synchronize(device)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
        return out.getvalue()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        loop.run(batches)
        synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=18)


def run_case(case: str, precision: str, corpus: Corpus, args: argparse.Namespace) -> dict:
    device = args.device
    batches = args.batches or DEFAULT_BATCHES[device.type][case]
    flags, config_fn, command = case_flags(case, precision, args)
    training.seed_everything(args.seed)
    model = models.LanguageModel(config_fn(flags, len(corpus.dictionary))).to(device)
    plain = PlainLoop(copy.deepcopy(model), corpus, flags, device)  # same initial weights (ties kept)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"\n{case} ({precision}): {parameters:,} parameters; project loop = {command}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_loop-") as folder:
        trainer = training.LMTrainer(model, corpus, training.LoopOptions.from_args(flags),
                                     training.LMOptions.from_args(flags), device, training.Run(Path(folder)),
                                     flags, "bench")
        project = ProjectLoop(trainer)
        check = check_same_step(project, plain, args.seed)
        same = check["loss"] <= args.tolerance and check["weights"] <= args.tolerance
        verdict = "the same step" if same else (
            "different steps" if precision == "fp32" else f"differ as expected ({precision} against fp32)")
        print(f"  first batch: loss project {check['project_loss']:.6f}, plain {check['plain_loss']:.6f} "
              f"(|diff| {check['loss']:.1e}), largest weight difference after the step {check['weights']:.1e}: "
              f"{verdict}", flush=True)
        if precision == "fp32" and not same:
            raise RuntimeError(f"{case}: the plain loop does not compute the project's step (--tolerance "
                               f"{args.tolerance:g}); the comparison would not be of the same work")
        loops = {"project": project, "plain": plain}
        for loop in loops.values():  # warm-up block
            timed_block(loop, batches, device)
        seconds: dict[str, list[float]] = {"project": [], "plain": []}
        faults: dict[str, list[int]] = {"project": [], "plain": []}
        for round_index in range(args.rounds):
            order = ("project", "plain") if round_index % 2 == 0 else ("plain", "project")
            for name in order:
                elapsed, page_faults = timed_block(loops[name], batches, device)
                seconds[name].append(elapsed)
                faults[name].append(page_faults)
            print(f"  round {round_index + 1}/{args.rounds}: project {1000 * seconds['project'][-1] / batches:.1f}, "
                  f"plain {1000 * seconds['plain'][-1] / batches:.1f} ms/batch", flush=True)
        period_ms = 1000 * statistics.median(project.period_cost() for _ in range(5))
        row = summarize(case, precision, batches, flags, seconds, faults, period_ms, check, command)
        if device.type == "cuda":
            row["syncs"] = {name: syncs_per_batch(loop, args.sync_batches, args.log_interval)
                            for name, loop in loops.items()}
            for name, result in row["syncs"].items():
                print(f"  host syncs per batch, {name}: {result.get('per_batch', result.get('skipped'))} "
                      f"{result.get('lines', '')}", flush=True)
        if args.profile:
            for name, loop in loops.items():
                print(f"\n  profile of one {name} block ({batches} batches, {args.profile}):")
                print(profile_block(loop, batches, args.profile, device))
        trainer.run.bar = None
    del trainer, project, plain, loops, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def summarize(case: str, precision: str, batches: int, flags: argparse.Namespace, seconds: dict[str, list[float]],
              faults: dict[str, list[int]], period_ms: float, check: dict, command: str) -> dict:
    tokens = flags.batch_size * flags.bptt
    row: dict[str, Any] = {"case": case, "precision": precision, "batches": batches, "rounds": len(seconds["plain"]),
                           "tokens_per_batch": tokens, "command": command, "first_batch_check": check,
                           "period_ms": period_ms}
    for name in ("project", "plain"):
        per_batch = [1000 * value / batches for value in seconds[name]]
        row[f"{name}_ms"] = statistics.median(per_batch)
        row[f"{name}_min_ms"] = min(per_batch)
        row[f"{name}_all_ms"] = per_batch
        row[f"{name}_tokens_per_s"] = 1000 * tokens / row[f"{name}_ms"]
        row[f"{name}_faults_per_batch"] = statistics.median(faults[name]) / batches
    row["ratio"] = row["project_ms"] / row["plain_ms"]
    row["min_ratio"] = row["project_min_ms"] / row["plain_min_ms"]
    rounds = [project / plain for project, plain in zip(seconds["project"], seconds["plain"])]
    row["round_ratio_min"], row["round_ratio_max"] = min(rounds), max(rounds)
    return row


# --------------------------------------------------------------------------- allocator case (child processes)


def run_allocator_case(args: argparse.Namespace) -> dict:
    """lstm200 in child processes with and without `keep_freed_memory()`, alternately (keep, default, default,
    keep, ...); per setting the medians over all the children's timed blocks."""
    if args.device.type != "cpu":
        return {"skipped": "the allocator case is CPU only"}
    if any(name in os.environ for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return {"skipped": "MALLOC_*_THRESHOLD_ is set in the environment, so keep_freed_memory() is a no-op"}
    settings = ["keep", "default"]
    order = [settings[(run + run // 2) % 2] for run in range(2 * args.allocator_runs)]  # ABBA...
    blocks: dict[str, dict[str, list]] = {setting: collections.defaultdict(list) for setting in settings}
    took: dict[str, list] = {setting: [] for setting in settings}
    for index, setting in enumerate(order):
        with tempfile.TemporaryDirectory(prefix="bench_loop-allocator-") as folder:
            out = Path(folder) / "child.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--cases", "lstm200", "--allocator", setting,
                       "--rounds", str(args.allocator_rounds), "--threads", str(args.threads), "--device", "cpu",
                       "--data", str(args.data), "--seed", str(args.seed), "--log-interval", str(args.log_interval),
                       "--json", str(out)]
            if args.batches:
                command += ["--batches", str(args.batches)]
            print(f"\nallocator run {index + 1}/{len(order)}: {setting}", flush=True)
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
            if done.returncode != 0:
                raise RuntimeError(f"allocator child ({setting}) failed:\n{done.stdout}\n{done.stderr}")
            child = json.loads(out.read_text())
        row = child["results"][0]
        took[setting].append(child["allocator_set_up"])
        for name in ("project", "plain"):
            blocks[setting][f"{name}_ms"].extend(row[f"{name}_all_ms"])
            blocks[setting][f"{name}_faults"].append(row[f"{name}_faults_per_batch"])
        print(f"  project {row['project_ms']:.1f} ms/batch, {row['project_faults_per_batch']:.0f} faults/batch; "
              f"plain {row['plain_ms']:.1f} ms/batch, {row['plain_faults_per_batch']:.0f} faults/batch", flush=True)
    rows = []
    for setting in settings:
        result = {"setting": setting, "set_up_took": took[setting], "children": order.count(setting)}
        for name in ("project", "plain"):
            result[f"{name}_ms"] = statistics.median(blocks[setting][f"{name}_ms"])
            result[f"{name}_faults_per_batch"] = statistics.median(blocks[setting][f"{name}_faults"])
        rows.append(result)
    return {"order": order, "rounds": args.allocator_rounds, "rows": rows}


# --------------------------------------------------------------------------- output


def format_table(rows: list[dict]) -> str:
    header = (f"{'case':<8} {'prec':<5} {'K':>3} {'project ms':>10} {'plain ms':>9} {'proj/plain':>10} "
              f"{'per round':>11} {'min proj':>9} {'min plain':>9} {'min ratio':>9} {'proj tok/s':>10} "
              f"{'faults/batch p/p':>17}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['case']:<8} {row['precision']:<5} {row['batches']:>3} {row['project_ms']:>10.1f} "
            f"{row['plain_ms']:>9.1f} {row['ratio']:>10.3f} "
            f"{row['round_ratio_min']:>5.2f}-{row['round_ratio_max']:.2f} "
            f"{row['project_min_ms']:>9.1f} {row['plain_min_ms']:>9.1f} {row['min_ratio']:>9.3f} "
            f"{row['project_tokens_per_s']:>10.0f} "
            f"{row['project_faults_per_batch']:>8.0f}/{row['plain_faults_per_batch']:<8.0f}")
    return "\n".join(lines)


def precision_summary(rows: list[dict]) -> list[dict]:
    """Per case with several precisions: the project loop's tokens/s per precision and against fp32."""
    out = []
    for case in dict.fromkeys(row["case"] for row in rows):
        by_precision = {row["precision"]: row["project_tokens_per_s"] for row in rows if row["case"] == case}
        if len(by_precision) > 1 and "fp32" in by_precision:
            out.append({"case": case, "tokens_per_s": by_precision,
                        "speed_up": {name: value / by_precision["fp32"] for name, value in by_precision.items()}})
    return out


def markdown_section(results: dict) -> str:
    """This benchmark's section of bench/RESULTS.md."""
    machine, rows = results["machine"], results["results"]
    load = results["load_average"]
    lines = [
        "The project's loop (`training.LMTrainer.train_period`, built from the scripts' flags) against a plain",
        "pytorch/examples loop written in the benchmark, on a copy of the same model with the same initial weights,",
        "the same SGD settings and the same batches (first batch of each checked: same loss and same weights after",
        "the update). Blocks of K batches, interleaved: one warm-up block each, then rounds of [project, plain]",
        "alternating which goes first; medians (and mins) of ms/batch over the rounds; project/plain is the ratio",
        "of the medians (target: at most 1.00). Page faults: minor faults per batch (median block).",
        "",
        f"Machine ({machine['date']}): {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
        f"{machine['threads']} torch thread(s), PyTorch {machine['torch']}, device "
        f"{machine.get('gpu', machine['device'])}; load average {load['start']:.2f} at the start, {load['end']:.2f} "
        "at the end (the machine is shared: compare the ratios, measured side by side).",
        "",
        f"`{results['command']}`",
        "",
        "| case | precision | K x rounds | project ms/batch | plain ms/batch | project/plain | per round | "
        "min project | min plain | min ratio | project tokens/s | page faults/batch project / plain | "
        "`train_period` fixed cost ms |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['precision']} | {row['batches']} x {row['rounds']} | {row['project_ms']:.1f} | "
            f"{row['plain_ms']:.1f} | {row['ratio']:.3f} | {row['round_ratio_min']:.2f}-{row['round_ratio_max']:.2f} | "
            f"{row['project_min_ms']:.1f} | {row['plain_min_ms']:.1f} | {row['min_ratio']:.3f} | "
            f"{row['project_tokens_per_s']:,.0f} | {row['project_faults_per_batch']:,.0f} / "
            f"{row['plain_faults_per_batch']:,.0f} | {row['period_ms']:.2f} |")
    lines.append("")
    lines.append("Cases: " + "; ".join(f"`{row['case']}` = `{row['command']}`" for row in rows
                                       if row["precision"] == rows[0]["precision"]) + ".")
    allocator = results.get("allocator")
    if allocator and "rows" in allocator:
        lines += [
            "",
            f"`training.run.keep_freed_memory()` on (`keep`, as the scripts start) and off (`default`: glibc's own "
            f"settings), lstm200 in child processes run in the order {', '.join(allocator['order'])}, "
            f"{allocator['rounds']} rounds each; medians over all their blocks:",
            "",
            "| allocator | project ms/batch | plain ms/batch | page faults/batch project | page faults/batch plain |",
            "|---|--:|--:|--:|--:|",
        ]
        for row in allocator["rows"]:
            lines.append(f"| {row['setting']} | {row['project_ms']:.1f} | {row['plain_ms']:.1f} | "
                         f"{row['project_faults_per_batch']:,.0f} | {row['plain_faults_per_batch']:,.0f} |")
    gpu = [row for row in rows if "syncs" in row]
    lines.append("")
    if gpu:
        lines.append("Host syncs per batch (CUDA, `torch.cuda.set_sync_debug_mode(\"warn\")`): " + "; ".join(
            f"{row['case']} {row['precision']}: project {row['syncs']['project'].get('per_batch')}, plain "
            f"{row['syncs']['plain'].get('per_batch')}" for row in gpu) + ".")
    else:
        lines.append("GPU figures (host syncs per batch of the hot loop, tokens/s fp32 vs bf16 of `awd` and "
                     "`lstm650`): unmeasured, no GPU in this run; `python bench/bench_loop.py --device cuda "
                     "--precision fp32 bf16 --cases lstm650 awd` gives them.")
    for summary in results.get("precision_summary", []):
        lines.append(f"- {summary['case']}: " + ", ".join(
            f"{name} {value:,.0f} tokens/s ({summary['speed_up'][name]:.2f}x)"
            for name, value in summary["tokens_per_s"].items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.allocator == "keep":
        set_up = keep_freed_memory()
    else:  # glibc's own settings: the trainer's call (training.loop) does nothing in this process
        set_up = False
        training.loop.keep_freed_memory = lambda: False
    torch.set_num_threads(args.threads)
    machine = machine_info(args.device)
    load_start = os.getloadavg()[0]
    print(f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['threads']} torch threads, "
          f"torch {machine['torch']}, device {machine.get('gpu', machine['device'])}, load average {load_start:.2f}; "
          f"keep_freed_memory(): {'on' if set_up else 'off'}")
    results: dict[str, Any] = {"benchmark": "loop", "machine": machine, "allocator_set_up": set_up,
                               "command": "python bench/bench_loop.py " + shlex.join(sys.argv[1:] if argv is None
                                                                                    else argv),
                               "results": []}
    model_cases = [case for case in args.cases if case in MODEL_CASES]
    if model_cases:
        corpus = Corpus(args.data, cache=os.access(args.data, os.W_OK))
        print(f"data: {args.data}, vocabulary {len(corpus.dictionary):,}, {corpus.train.numel():,} training tokens")
        for case in model_cases:
            for precision in args.precision:
                results["results"].append(run_case(case, precision, corpus, args))
        print()
        print(format_table(results["results"]))
        print("ms per batch; medians of the timed rounds (min: fastest block); proj/plain = ratio of the medians "
              "(target <= 1.00); per round: that ratio within single rounds; faults: minor page faults per batch")
        for row in results["results"]:
            print(f"  {row['case']} {row['precision']}: one train_period call with no batch costs "
                  f"{row['period_ms']:.2f} ms")
        results["precision_summary"] = precision_summary(results["results"])
        for summary in results["precision_summary"]:
            print(f"tokens/s of the project loop, {summary['case']}: " + ", ".join(
                f"{name} {value:,.0f} ({summary['speed_up'][name]:.2f}x)"
                for name, value in summary["tokens_per_s"].items()))
        if args.device.type != "cuda":
            print("host syncs per batch: CUDA only, skipped on the CPU")
    if "allocator" in args.cases:
        results["allocator"] = run_allocator_case(args)
        if "rows" in results["allocator"]:
            print("\nallocator   project ms  plain ms  project faults/batch  plain faults/batch")
            for row in results["allocator"]["rows"]:
                print(f"{row['setting']:<10} {row['project_ms']:>11.1f} {row['plain_ms']:>9.1f} "
                      f"{row['project_faults_per_batch']:>21,.0f} {row['plain_faults_per_batch']:>19,.0f}")
        else:
            print(f"\nallocator case skipped: {results['allocator']['skipped']}")
    results["load_average"] = {"start": load_start, "end": os.getloadavg()[0]}
    write_results(args.json, results)
    if args.write_results:
        if not results["results"]:
            print("--write-results: no model case was run; RESULTS.md left as it is")
        else:
            write_results_section(SECTION_TITLE, markdown_section(results))
    return results


if __name__ == "__main__":
    main()
