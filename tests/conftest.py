"""Shared fixtures: small corpora written on the fly, and tiny-model flags for the scripts."""

import random
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Flags that make any LM script tiny and fast on CPU.
TINY_LM_FLAGS = [
    "--emsize", "16", "--nhid", "16", "--batch_size", "4", "--eval_batch_size", "2",
    "--bptt", "8", "--epochs", "1", "--log-interval", "5", "--threads", "1",
]


def write_corpus(folder: Path, lines_per_split: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A corpus with learnable structure: sentences follow a fixed word order with noise."""
    lines_per_split = lines_per_split or {"train": 300, "valid": 40, "test": 40}
    rng = random.Random(seed)
    words = [f"w{index}" for index in range(40)]
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in lines_per_split.items():
        lines = []
        for _ in range(count):
            start = rng.randrange(len(words))
            length = rng.randint(4, 10)
            sentence = [words[(start + step) % len(words)] if rng.random() > 0.1 else rng.choice(words)
                        for step in range(length)]
            lines.append(" ".join(sentence))
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


_EMPTY, _EMPTY_LIKE = torch.empty, torch.empty_like


def _nan_filled(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point():
        tensor.fill_(float("nan"))
    return tensor


def nan_filled_buffers(monkeypatch) -> None:
    """fla's conftest trick, for kernel tests: fresh `torch.empty(_like)` buffers hold NaN, so outputs a
    kernel leaves unwritten cannot pass."""
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: _nan_filled(_EMPTY(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: _nan_filled(_EMPTY_LIKE(*args, **kwargs)))


def error_ratio(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """RMS error relative to the reference's RMS (fla's `get_err_ratio`), for low-precision kernels."""
    difference = (actual.double() - expected.double()).pow(2).mean().sqrt()
    return (difference / expected.double().pow(2).mean().sqrt().clamp_min(1e-12)).item()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and scripts under test may change the count."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _eager_steps_on_the_cpu_unless_asked(request, monkeypatch):
    """Scripts compile the DNC's step by default on the CPU too (`Core.compiles_on_cpu`), a one-off 10-30 s
    per process and shape: far more than the tiny runs of the tests. So in-process runs keep the CUDA-only
    default unless they pass --compile (subprocesses pass --no-compile); tests marked `cpu_compile_default`
    see the real default."""
    if "cpu_compile_default" in request.keywords:
        yield
        return
    import training.loop

    monkeypatch.setattr(training.loop, "compiles_by_default",
                        lambda core, device: device.type == "cuda" and core.compiles_on_cuda)
    yield


@pytest.fixture
def command_line(monkeypatch, capsys):
    """`command_line(module, *argv)` runs a script as `python module.py argv` would, in this process: through
    `training.cli` with `sys.argv` set. Returns (exit code, stdout, stderr); the code is 0 when it returns.
    One real subprocess test per kind of check stays, to show the in-process run is the same thing."""
    import sys

    import training

    def run(module, *argv: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
        capsys.readouterr()
        try:
            training.cli(module.main)
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run
