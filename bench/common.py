"""Helpers the benchmarks share: device synchronisation and a description of the machine."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "date": datetime.date.today().isoformat(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_results(path: Path | None, results: dict) -> None:
    """Write a benchmark's results as JSON when `--json PATH` was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {path}")


RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
LAST_SECTION = "## Not measured yet: GPU figures"  # stays the last section of RESULTS.md


def write_results_section(title: str, body: str, path: Path = RESULTS_PATH) -> None:
    """Replace the section `## {title}` of RESULTS.md (up to the next `## ` heading) with `body`.

    A missing section is added before the closing "not measured yet" section, or at the end.
    """
    heading = f"## {title}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"{heading}\n\n{body.rstrip()}\n\n"
    lines = text.splitlines(keepends=True)
    starts = [index for index, line in enumerate(lines) if line.rstrip("\n") == heading]
    if starts:
        start = starts[0]
        end = next((index for index in range(start + 1, len(lines)) if lines[index].startswith("## ")), len(lines))
        lines[start:end] = [section]
    else:
        at = next((index for index, line in enumerate(lines) if line.startswith(LAST_SECTION)), len(lines))
        if at == len(lines) and lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines[at:at] = [section if at < len(lines) else "\n" + section]
    path.write_text("".join(lines).rstrip("\n") + "\n")
    print(f"wrote the section '{heading}' of {path}")


def time_call(function, device: torch.device) -> float:
    """Seconds one call of `function()` takes on `device`: CUDA events on a GPU (the device's timeline from
    the first launch to the last kernel's end, host gaps included), wall time on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    started = time.perf_counter()
    function()
    return time.perf_counter() - started
