"""Triton kernels of ForgetMult (forward and backward) for CUDA tensors.

The recurrence and its gradients are written out in models/ops/forget_mult.py, beside the reference.
The [T, B, H] tensors are seen as T rows of N = B * H columns. Each program owns a block of columns
and walks over the T rows one after the other, keeping the state of its columns in registers
(float32 whatever the input dtype): sequential in time, parallel over columns, as salesforce/
pytorch-qrnn's CUDA kernel and fla's `fused_recurrent_hgrn` do. Each element is read and written
once per pass, so the kernels are bound by memory bandwidth.

Two pairs of kernels: row by row (one row of loads in flight per program), and time-chunked (a tile of
TIME_CHUNK rows loaded at once, the recurrence inside it by an associative scan), which keeps more bytes
in flight where B * H is large and the walk is bound by memory latency. The block size, warps and time
chunk come from `models.ops.triton_launch.choose_config` unless a `KernelConfig` is passed, as the
bandwidth benchmark does to sweep them.

A direction is a first row and a row stride: forwards, row 0 with stride +N; reversed, row T - 1 with
stride -N. The backward pass walks the rows in the opposite order of its forward pass.

This module imports Triton at the top; `models.ops.forget_mult` imports it only when a CUDA tensor
arrives, so machines without Triton never load it. Tests run the kernels on CPU tensors under Triton's
interpreter (`models.ops.forget_mult.TRITON_ON_CPU`, tests/test_triton_kernels.py).

Shapes: `T` time steps, `B` batch, `H` hidden size, `N` = B * H columns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(
        "models.ops.forget_mult_triton needs Triton and a CUDA GPU: `pip install triton` "
        "(forget_mult falls back to the PyTorch loop without it)"
    ) from error

from models.ops.forget_mult import TRITON_DTYPES, check_arguments, triton_device
from models.ops.triton_launch import choose_config, device_guard, KernelConfig


@triton.jit
def _row_or_zeros(pointers, mask, PRESENT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """A [BLOCK_SIZE] row of an optional tensor (h0, a gradient of the last state) as float32: loaded where it
    is PRESENT, zeros where the caller passed none."""
    if PRESENT:
        row = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    else:
        row = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    return row


@triton.jit
def _forget_mult_forward_kernel(
    f_ptr,
    x_ptr,
    h0_ptr,
    h_ptr,
    h_last_ptr,
    num_steps,
    num_columns,
    first_offset,
    step_stride,
    HAS_H0: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """h_t = f_t * x_t + (1 - f_t) * h_previous over `num_steps` rows, starting at `first_offset`."""
    columns = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = columns < num_columns
    state = _row_or_zeros(h0_ptr + columns, mask, HAS_H0, BLOCK_SIZE)
    # (pointer + first row) + columns: pointers advance by whole rows, so no 32-bit offset overflows.
    f_ptrs = f_ptr + first_offset + columns
    x_ptrs = x_ptr + first_offset + columns
    h_ptrs = h_ptr + first_offset + columns
    for _ in range(num_steps):
        gate = tl.load(f_ptrs, mask=mask, other=0.0).to(tl.float32)
        value = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        state = gate * value + (1.0 - gate) * state
        tl.store(h_ptrs, state.to(h_ptr.dtype.element_ty), mask=mask)
        f_ptrs += step_stride
        x_ptrs += step_stride
        h_ptrs += step_stride
    tl.store(h_last_ptr + columns, state.to(h_last_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_step(
    f_ptrs, x_ptrs, grad_h_ptrs, grad_f_ptrs, grad_x_ptrs, previous, carry, mask, HAS_GRAD_H: tl.constexpr
):
    """One row of the backward walk; returns the carry (1 - f_t) * g_t to the row processed next."""
    gate = tl.load(f_ptrs, mask=mask, other=0.0).to(tl.float32)
    value = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    gradient = carry
    if HAS_GRAD_H:
        gradient += tl.load(grad_h_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_f_ptrs, (gradient * (value - previous)).to(grad_f_ptrs.dtype.element_ty), mask=mask)
    tl.store(grad_x_ptrs, (gradient * gate).to(grad_x_ptrs.dtype.element_ty), mask=mask)
    return gradient * (1.0 - gate)


@triton.jit
def _forget_mult_backward_kernel(
    f_ptr,
    x_ptr,
    h_ptr,
    h0_ptr,
    grad_h_ptr,
    grad_h_last_ptr,
    grad_f_ptr,
    grad_x_ptr,
    grad_h0_ptr,
    num_steps,
    num_columns,
    first_offset,
    step_stride,
    HAS_H0: tl.constexpr,
    HAS_GRAD_H: tl.constexpr,
    HAS_GRAD_H_LAST: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """The reverse recurrence g_t = dL/dh_t + (1 - f_later) * g_later, with df, dx and dh0.

    `first_offset` is the row of the last step of the forward pass and `step_stride` the opposite of
    the forward pass's, so the row one stride ahead holds h_previous of the current row, except at
    the walk's last row, whose h_previous is h0.
    """
    columns = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = columns < num_columns
    carry = _row_or_zeros(grad_h_last_ptr + columns, mask, HAS_GRAD_H_LAST, BLOCK_SIZE)
    f_ptrs = f_ptr + first_offset + columns
    x_ptrs = x_ptr + first_offset + columns
    h_ptrs = h_ptr + first_offset + columns
    grad_h_ptrs = grad_h_ptr + first_offset + columns
    grad_f_ptrs = grad_f_ptr + first_offset + columns
    grad_x_ptrs = grad_x_ptr + first_offset + columns
    for _ in range(num_steps - 1):
        previous = tl.load(h_ptrs + step_stride, mask=mask, other=0.0).to(tl.float32)
        carry = _backward_step(
            f_ptrs, x_ptrs, grad_h_ptrs, grad_f_ptrs, grad_x_ptrs, previous, carry, mask, HAS_GRAD_H
        )
        f_ptrs += step_stride
        x_ptrs += step_stride
        h_ptrs += step_stride
        grad_h_ptrs += step_stride
        grad_f_ptrs += step_stride
        grad_x_ptrs += step_stride
    initial = _row_or_zeros(h0_ptr + columns, mask, HAS_H0, BLOCK_SIZE)
    carry = _backward_step(f_ptrs, x_ptrs, grad_h_ptrs, grad_f_ptrs, grad_x_ptrs, initial, carry, mask, HAS_GRAD_H)
    if HAS_H0:
        tl.store(grad_h0_ptr + columns, carry.to(grad_h0_ptr.dtype.element_ty), mask=mask)


# ---- Time-chunked kernels: TIME_CHUNK rows loaded at once, the recurrence inside a chunk by a scan.
#
# A row-by-row walk has one row of loads in flight per program: at large B * H its speed is one DRAM
# round trip per step, short of the copy rate. These kernels load TIME_CHUNK rows of a block at once (a
# [TIME_CHUNK, BLOCK_SIZE] tile, so TIME_CHUNK times the bytes in flight), solve the linear recurrence
# h_t = a_t h_{t-1} + b_t inside the tile with an associative scan, then carry the tile's last state to
# the next. Rows past the sequence's end get (a, b) = (1, 0), which leaves the state unchanged.


@triton.jit
def _linear_recurrence(a_earlier, b_earlier, a_later, b_later):
    """Compose h -> a_e h + b_e, then h -> a_l h + b_l: (a_l a_e, a_l b_e + b_l)."""
    return a_later * a_earlier, a_later * b_earlier + b_later


@triton.jit
def _last_row(tile, rows, TIME_CHUNK: tl.constexpr):
    """Row TIME_CHUNK - 1 of a [TIME_CHUNK, BLOCK_SIZE] tile (rows lie within a thread: a few adds)."""
    return tl.sum(tl.where(rows[:, None] == TIME_CHUNK - 1, tile, 0.0), axis=0)


@triton.jit
def _forget_mult_forward_chunked_kernel(
    f_ptr,
    x_ptr,
    h0_ptr,
    h_ptr,
    h_last_ptr,
    num_steps,
    num_columns,
    first_offset,
    step_stride,
    HAS_H0: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TIME_CHUNK: tl.constexpr,
):
    """`_forget_mult_forward_kernel`, TIME_CHUNK rows at a time."""
    columns = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = columns < num_columns
    rows = tl.arange(0, TIME_CHUNK)
    state = _row_or_zeros(h0_ptr + columns, mask, HAS_H0, BLOCK_SIZE)
    offsets = rows[:, None] * step_stride + columns[None, :]  # [TIME_CHUNK, BLOCK_SIZE] within the chunk
    f_chunk = f_ptr + first_offset
    x_chunk = x_ptr + first_offset
    h_chunk = h_ptr + first_offset
    for start in range(0, num_steps, TIME_CHUNK):
        tile_mask = ((start + rows) < num_steps)[:, None] & mask[None, :]
        gate = tl.load(f_chunk + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        value = tl.load(x_chunk + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        decay, drive = tl.associative_scan((1.0 - gate, gate * value), 0, _linear_recurrence)
        states = drive + decay * state[None, :]
        tl.store(h_chunk + offsets, states.to(h_ptr.dtype.element_ty), mask=tile_mask)
        state = _last_row(states, rows, TIME_CHUNK)
        f_chunk += TIME_CHUNK * step_stride
        x_chunk += TIME_CHUNK * step_stride
        h_chunk += TIME_CHUNK * step_stride
    tl.store(h_last_ptr + columns, state.to(h_last_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forget_mult_backward_chunked_kernel(
    f_ptr,
    x_ptr,
    h_ptr,
    h0_ptr,
    grad_h_ptr,
    grad_h_last_ptr,
    grad_f_ptr,
    grad_x_ptr,
    grad_h0_ptr,
    num_steps,
    num_columns,
    first_offset,
    step_stride,
    HAS_H0: tl.constexpr,
    HAS_GRAD_H: tl.constexpr,
    HAS_GRAD_H_LAST: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TIME_CHUNK: tl.constexpr,
):
    """`_forget_mult_backward_kernel`, TIME_CHUNK rows at a time.

    Position p of the walk (p = 0 is the forward pass's last step) has g_p = dL/dh_p + (1 - f_{p-1}) g_{p-1}:
    a linear recurrence whose a_p is 1 - f one row back along the walk (1 at p = 0, where g_{-1} is
    dL/dh_last), and the state before step p in the forward pass is h one row ahead along the walk
    (h0 at the walk's last position).
    """
    columns = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = columns < num_columns
    rows = tl.arange(0, TIME_CHUNK)
    carry = _row_or_zeros(grad_h_last_ptr + columns, mask, HAS_GRAD_H_LAST, BLOCK_SIZE)
    initial = _row_or_zeros(h0_ptr + columns, mask, HAS_H0, BLOCK_SIZE)
    grad_initial = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    offsets = rows[:, None] * step_stride + columns[None, :]
    chunk = first_offset  # 32-bit: the host takes the row kernel where the offsets would not fit
    for start in range(0, num_steps, TIME_CHUNK):
        positions = start + rows
        inside = positions < num_steps
        tile_mask = inside[:, None] & mask[None, :]
        gate = tl.load(f_ptr + chunk + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        value = tl.load(x_ptr + chunk + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        if HAS_GRAD_H:
            grad_h = tl.load(grad_h_ptr + chunk + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        else:
            grad_h = tl.zeros([TIME_CHUNK, BLOCK_SIZE], dtype=tl.float32)
        back_mask = (inside & (positions >= 1))[:, None] & mask[None, :]
        gate_back = tl.load(f_ptr + chunk + offsets - step_stride, mask=back_mask, other=0.0).to(tl.float32)
        # Rows past the end are never stored, and the carry out of the last chunk is not used.
        decays, drives = tl.associative_scan((1.0 - gate_back, grad_h), 0, _linear_recurrence)
        gradient = drives + decays * carry[None, :]
        ahead_mask = (positions + 1 < num_steps)[:, None] & mask[None, :]
        previous = tl.load(h_ptr + chunk + offsets + step_stride, mask=ahead_mask, other=0.0).to(tl.float32)
        at_start = (positions == num_steps - 1)[:, None]  # the forward pass's first step: h0 before it
        previous = tl.where(at_start, initial[None, :], previous)
        tl.store(grad_f_ptr + chunk + offsets, (gradient * (value - previous)).to(grad_f_ptr.dtype.element_ty),
                 mask=tile_mask)
        tl.store(grad_x_ptr + chunk + offsets, (gradient * gate).to(grad_x_ptr.dtype.element_ty), mask=tile_mask)
        grad_initial += tl.sum(tl.where(at_start, gradient * (1.0 - gate), 0.0), axis=0)
        carry = _last_row(gradient, rows, TIME_CHUNK)
        chunk += TIME_CHUNK * step_stride
    if HAS_H0:
        tl.store(grad_h0_ptr + columns, grad_initial.to(grad_h0_ptr.dtype.element_ty), mask=mask)


def _walk(num_steps: int, num_columns: int, backwards_in_time: bool) -> tuple[int, int]:
    """(offset of the first row, row stride) of a walk over the rows, in elements."""
    if backwards_in_time:
        return (num_steps - 1) * num_columns, -num_columns
    return 0, num_columns


def _forward_kernel(config: KernelConfig) -> tuple[Any, dict]:
    """The forward kernel for `config` and its TIME_CHUNK argument (none for the row-by-row kernel)."""
    if config.time_chunk == 1:
        return _forget_mult_forward_kernel, {}
    return _forget_mult_forward_chunked_kernel, {"TIME_CHUNK": config.time_chunk}


def _backward_kernel(config: KernelConfig, num_steps: int, num_columns: int) -> tuple[Any, dict]:
    """The backward kernel: the chunked one indexes with 32-bit offsets (fewer registers than a 64-bit
    pointer per array), so tensors past 2**31 elements take the row kernel."""
    if config.time_chunk == 1 or (num_steps + config.time_chunk + 1) * num_columns >= 2**31:
        return _forget_mult_backward_kernel, {}
    return _forget_mult_backward_chunked_kernel, {"TIME_CHUNK": config.time_chunk}


class ForgetMultTriton(torch.autograd.Function):
    """ForgetMult through the two Triton kernels; inputs are checked by `forget_mult_triton`."""

    @staticmethod
    def forward(
        ctx: Any, f: Tensor, x: Tensor, h0: Tensor | None, reverse: bool, config: KernelConfig | None
    ) -> tuple[Tensor, Tensor]:
        f, x = f.contiguous(), x.contiguous()
        h0 = h0.contiguous() if h0 is not None else None
        num_steps, batch_size, hidden_size = f.shape
        num_columns = batch_size * hidden_size
        h = torch.empty(f.shape, dtype=f.dtype, device=f.device)  # [T, B, H], every element written
        h_last = torch.empty((batch_size, hidden_size), dtype=f.dtype, device=f.device)
        first_offset, step_stride = _walk(num_steps, num_columns, backwards_in_time=reverse)
        if config is None:
            config = choose_config(num_columns, 1, f.dtype, f.device, num_steps)
        grid = (triton.cdiv(num_columns, config.block_size),)
        kernel, chunk = _forward_kernel(config)
        with device_guard(f):
            kernel[grid](
                f, x, h0 if h0 is not None else f, h, h_last,  # f stands in for an absent h0, never read
                num_steps, num_columns, first_offset, step_stride,
                HAS_H0=h0 is not None, BLOCK_SIZE=config.block_size, **chunk, **config.launch_options(),
            )
        ctx.reverse = reverse
        ctx.config = config
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(f, x, h, h0)
        return h, h_last

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_h: Tensor | None, grad_h_last: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None, None, None]:
        f, x, h, h0 = ctx.saved_tensors
        config = ctx.config
        num_steps, batch_size, hidden_size = f.shape
        num_columns = batch_size * hidden_size
        grad_h = grad_h.contiguous() if grad_h is not None else None
        grad_h_last = grad_h_last.contiguous() if grad_h_last is not None else None
        grad_f = torch.empty(f.shape, dtype=f.dtype, device=f.device)  # [T, B, H]
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [T, B, H]
        grad_h0 = torch.empty(h0.shape, dtype=h0.dtype, device=h0.device) if h0 is not None else None
        first_offset, step_stride = _walk(num_steps, num_columns, backwards_in_time=not ctx.reverse)
        grid = (triton.cdiv(num_columns, config.block_size),)
        kernel, chunk = _backward_kernel(config, num_steps, num_columns)
        with device_guard(f):
            # f stands in for absent tensors; the HAS_* flags keep the kernel from touching them.
            kernel[grid](
                f, x, h, h0 if h0 is not None else f,
                grad_h if grad_h is not None else f, grad_h_last if grad_h_last is not None else f,
                grad_f, grad_x, grad_h0 if grad_h0 is not None else f,
                num_steps, num_columns, first_offset, step_stride,
                HAS_H0=h0 is not None, HAS_GRAD_H=grad_h is not None, HAS_GRAD_H_LAST=grad_h_last is not None,
                BLOCK_SIZE=config.block_size, **chunk, **config.launch_options(),
            )
        return grad_f, grad_x, grad_h0, None, None


def forget_mult_triton(
    f: Tensor, x: Tensor, h0: Tensor | None = None, reverse: bool = False, config: KernelConfig | None = None
) -> tuple[Tensor, Tensor]:
    """ForgetMult on a CUDA GPU with the Triton kernels; same result as `forget_mult_ref` up to rounding.

    Args:
        f: [T, B, H] gates on a CUDA device, float16, bfloat16 or float32.
        x: [T, B, H] values, same dtype and device as `f`.
        h0: [B, H] state before the first step processed, or None for zeros; same dtype and device.
        reverse: run t = T - 1, ..., 0 (h0 is then the state after the end of the sequence).
        config: block size, warps and stages of both kernels; None: `choose_config`'s default.

    Returns:
        h: [T, B, H] the state after each step, and h_last: [B, H] the state after the last step
        processed, both in the dtype of `f`; the state is carried in float32.

    Raises:
        ValueError: if an argument has a bad shape, dtype or device, or is not a CUDA tensor of a
            dtype the kernels take (float64: use `forget_mult`, which runs the PyTorch path).
    """
    check_arguments(f, x, h0, reverse)
    if not triton_device(f):
        raise ValueError(f"forget_mult_triton needs CUDA tensors, got device {f.device}; use forget_mult")
    if f.dtype not in TRITON_DTYPES:
        raise ValueError(f"forget_mult_triton takes float16, bfloat16 or float32, got {f.dtype}; use forget_mult")
    if f.size(1) * f.size(2) >= 2**31:
        raise ValueError(
            f"forget_mult_triton steps by rows of B * H < 2**31 elements, got B * H = {f.size(1) * f.size(2)}"
        )
    if config is not None and (config.time_chunk + 1) * f.size(1) * f.size(2) >= 2**31:
        raise ValueError(f"config {config}: a chunk of {config.time_chunk} + 1 rows must hold < 2**31 elements")
    return ForgetMultTriton.apply(f, x, h0, reverse, config)
