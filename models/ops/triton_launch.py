"""Launch parameters of the recurrence kernels (ForgetMult, the fused QRNN layer), explicit and tunable.

Both kernels give each program a block of columns (units) and walk over time inside the program, so
time is sequential and columns are parallel. Three things decide their speed on a GPU:

- enough programs to fill the machine: with few columns (batch 8, 320 units) small blocks give more
  programs; with many (B 256, H 1024) the largest block that still leaves `PROGRAMS_PER_SM` programs
  per multiprocessor;
- wide memory accesses: `num_warps` is chosen so that each thread loads and stores `ACCESS_BYTES`
  (128 bits: 4 float32 or 8 bfloat16/float16 values) per step, which Triton turns into vector
  instructions when the row length is a multiple of the vector (it specialises on divisibility by 16);
- bytes in flight: a walk of one row at a time waits one memory round trip per step, so on a GPU long
  walks (`LONG_WALK` steps) load a tile of `time_chunk` steps at once (`CHUNK_VALUES` values per thread
  and array), blocks then being at least one warp of whole vectors.

`choose_config` applies these rules; `KernelConfig` can be passed to the kernels instead (the
benchmarks sweep them: `python bench/bench_forget_mult.py --bandwidth --configs 256x4 1024x4`). The
defaults have not been tuned on a GPU yet; bench/RESULTS.md says which figures are measured.

Imports no Triton, so it is safe everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re

import torch

from models.ops.forget_mult import triton_runs_on_cpu

MIN_BLOCK = 32  # one warp, one value per thread
MAX_BLOCK = 1024
PROGRAMS_PER_SM = 4  # programs wanted per multiprocessor before blocks grow
ACCESS_BYTES = 16  # bytes each thread moves per array and step: one 128-bit access
CHUNK_VALUES = 32  # values per thread and array in a time chunk (rows x vector): registers stay in bounds
MAX_TIME_CHUNK = 16
LONG_WALK = 64  # walks at least this long, on a GPU, take the time-chunked kernels
HOST_SMS = 4  # "multiprocessors" assumed under Triton's interpreter (tests), where nothing is timed


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: columns per program, warps, software-pipelining stages, time chunk.

    `num_stages` None leaves Triton's default. `time_chunk` > 1 picks the time-chunked kernels (that many
    rows loaded at once), forward and backward. Written
    BLOCKxWARPS[xSTAGES][tCHUNK] on the benchmarks' command line: `256x4`, `1024x4t4`, `512x4x3t8`.
    """

    block_size: int
    num_warps: int
    num_stages: int | None = None
    time_chunk: int = 1

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of 2, got {self.block_size}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"num_stages must be positive or None, got {self.num_stages}")
        if self.time_chunk < 1 or self.time_chunk & (self.time_chunk - 1):
            raise ValueError(f"time_chunk must be a power of 2, got {self.time_chunk}")

    @classmethod
    def parse(cls, text: str) -> "KernelConfig":
        """'256x4' -> KernelConfig(256, 4); '512x4x3t8' -> KernelConfig(512, 4, 3, 8)."""
        match = re.fullmatch(r"(\d+)x(\d+)(?:x(\d+))?(?:t(\d+))?", text.strip().lower())
        if match is None:
            raise ValueError(f"a kernel config is BLOCKxWARPS[xSTAGES][tCHUNK], e.g. 256x4 or 1024x4t4, got {text!r}")
        block, warps, stages, chunk = match.groups()
        return cls(int(block), int(warps), int(stages) if stages else None, int(chunk) if chunk else 1)

    def launch_options(self) -> dict:
        """Keyword arguments of a Triton launch."""
        options = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            options["num_stages"] = self.num_stages
        return options

    def __str__(self) -> str:
        return (f"{self.block_size}x{self.num_warps}" + (f"x{self.num_stages}" if self.num_stages else "")
                + (f"t{self.time_chunk}" if self.time_chunk > 1 else ""))


@functools.lru_cache(maxsize=None)
def multiprocessors(device_index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device (`HOST_SMS` for the interpreter's CPU tensors)."""
    if device_index is None:
        return HOST_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _choose(columns: int, rows: int, element_size: int, device_index: int | None, long_walk: bool) -> KernelConfig:
    vector = max(1, ACCESS_BYTES // element_size)  # values in one 128-bit access
    chunked = long_walk and device_index is not None and (CHUNK_VALUES + 1) * columns < 2**31
    # A time chunk needs whole vectors per thread: then a thread holds all the tile's rows of its columns
    # and the scan runs in registers (no shuffles).
    narrowest = 32 * vector if chunked else MIN_BLOCK
    target = PROGRAMS_PER_SM * multiprocessors(device_index)
    block = max(narrowest, min(MAX_BLOCK, 1 << (columns - 1).bit_length()))  # no wider than the columns
    while block > narrowest and rows * -(-columns // block) < target:
        block //= 2
    warps = min(8, max(1, block // (32 * vector)))  # threads that move ACCESS_BYTES each
    chunk = min(MAX_TIME_CHUNK, max(1, CHUNK_VALUES // vector)) if chunked else 1
    return KernelConfig(block, warps, time_chunk=chunk)


def choose_config(columns: int, rows: int, dtype: torch.dtype, device: torch.device,
                  steps: int = 1) -> KernelConfig:
    """The default launch for `rows` independent rows of `columns` columns (programs: rows * blocks per row).

    Args:
        columns: columns one program's block is cut from (ForgetMult: B * H; the QRNN layer: H).
        rows: independent rows of such columns (ForgetMult: 1; the QRNN layer: B).
        dtype: element type of the streamed tensors.
        device: the tensors' device (its multiprocessor count sets how many programs are wanted).
        steps: time steps of the walk; walks of `LONG_WALK` steps or more on a GPU get a time chunk
            (`CHUNK_VALUES` values per thread, at most `MAX_TIME_CHUNK` rows).
    """
    device_index = device.index if device.type == "cuda" else None
    return _choose(columns, rows, dtype.itemsize, device_index, steps >= LONG_WALK)


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context a launch on `tensor` needs: its CUDA device made current when it is not already.

    CPU tensors are allowed only in tests, under Triton's interpreter (`TRITON_ON_CPU`); anything else
    raises a RuntimeError that says so.
    """
    if tensor.device.type != "cuda":
        triton_runs_on_cpu()
        return contextlib.nullcontext()
    if tensor.device.index is None or tensor.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)
