"""Triton's kernels on the CPU: tests/test_triton_kernels.py in a fresh process under Triton's interpreter.

TRITON_INTERPRET must be set before Triton is imported (it decides at `@triton.jit` time whether a kernel
is compiled or interpreted), so the kernel tests cannot run in this process, which may have imported
Triton already (torch.compile does). They run in a child pytest with the variable set; its summary is
this test's result. Skipped where Triton is not installed (`pip install -r requirements-dev.txt`).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="needs Triton (pip install -r requirements-dev.txt); its kernels are then run in "
                           "Triton's interpreter")
def test_triton_kernels_under_the_interpreter():
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
               str(ROOT / "tests" / "test_triton_kernels.py")]
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert " passed" in summary and "skipped" not in summary.split(" passed")[0], summary
