"""The QRNN layer's pooling fused into one Triton kernel forward and one backward, for CUDA tensors.

After its matrix product, a QRNN layer (models/qrnn.py) turns the gate pre-activations into
Z = tanh, F = sigmoid (times a zoneout mask or scale, and 0 at padded steps), O = sigmoid, runs
ForgetMult c_t = f_t * z_t + (1 - f_t) * c_{t-1} and gates the output h_t = o_t * c_t (paper
eq. 1-4). Done eagerly that is about seven kernels and as many [T, B, H] temporaries per call;
here it is one kernel that reads the product's output once and writes h (and, when a gradient
will be needed, c), and one backward kernel that writes the gradient of the pre-activations.
`QRNNLayer.run` (models/qrnn.py) keeps the eager path as the reference and for CPU tensors.

Layout: `gates` is the product's [T, B, G * H] output, rows Z, F (, O) of the layer's weight, so
gate g of unit u at (t, b) is at ((t * B + b) * G + g) * H + u. Program (i, b) owns units
i * BLOCK .. i * BLOCK + BLOCK - 1 of batch row b and walks over time, the state in float32
registers; contiguous units make the loads vector loads. On long sequences both kernels load a tile
of TIME_CHUNK steps at once (at most `BACKWARD_MAX_CHUNK` in the backward) and solve the recurrence
inside it by a scan, as ForgetMult's chunked kernels do. Lengths come in per batch row, so a
padded step costs no mask tensor: step t of row b is valid when t < lengths[b].

Gradients, with g_t the gradient reaching c_t in the walk back (forward direction; reverse mirrors):

    g_t = v_t * dL/dh_t * o_t + (1 - f_t+1) * g_t+1,   g_T-1 also gets dL/dc_last
    d o_pre = v_t * dL/dh_t * c_t * o_t (1 - o_t),   d z_pre = g_t * f_t * (1 - z_t^2)
    d f_pre = g_t * (z_t - c_t-1) * s_t * sigma_t (1 - sigma_t),   dh0 = (1 - f_0) * g_0

where f_t = sigma_t * s_t, s_t the zoneout mask or scale times the validity v_t.

Shapes: `T` time steps, `B` batch, `H` hidden size, `G` gates (3 with the output gate, else 2).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(
        "models.ops.qrnn_triton needs Triton and a CUDA GPU: `pip install triton` "
        "(the QRNN layer runs its PyTorch path without it)"
    ) from error

from models.ops.forget_mult import TRITON_DTYPES, triton_device
from models.ops.forget_mult_triton import _last_row, _linear_recurrence, _row_or_zeros  # shared kernel pieces
from models.ops.triton_launch import choose_config, device_guard, KernelConfig

# The backward tile holds about three times the forward's arrays (this row's and the next row's gates,
# the cells, the output's gradient): at more than 2 steps of the default launches it spills registers
# (cuobjdump for sm_90, tests/test_triton_compile.py), so its chunk is capped there.
BACKWARD_MAX_CHUNK = 2


@triton.jit
def _tanh(value):
    # 2 sigmoid(2 v) - 1: tanh from the sigmoid Triton has on every backend, the interpreter included.
    return 2.0 * tl.sigmoid(2.0 * value) - 1.0


@triton.jit
def _qrnn_forward_kernel(
    gates_ptr, h0_ptr, lengths_ptr, mask_ptr, output_ptr, cell_ptr, last_ptr,
    num_steps, hidden_size, forget_scale, first_step, direction, gates_first, gates_stride, state_first, state_stride,
    HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_MASK: tl.constexpr, OUTPUT_GATE: tl.constexpr,
    STORE_CELL: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Activations, ForgetMult and the output gate over `num_steps` steps from `first_step` by `direction`."""
    batch = tl.program_id(1)
    units = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    keep = units < hidden_size
    gate_count: tl.constexpr = 3 if OUTPUT_GATE else 2
    state_row = batch * hidden_size + units  # of [B, H]
    state = _row_or_zeros(h0_ptr + state_row, keep, HAS_H0, BLOCK_SIZE)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + batch)
    # Pointers start at the first step's row (offsets from the host, 64-bit when large) and advance by whole
    # steps, so no 32-bit offset overflows.
    gate_ptrs = gates_ptr + gates_first + batch * gate_count * hidden_size + units
    state_offset = state_first + state_row
    output_ptrs = output_ptr + state_offset
    cell_ptrs = cell_ptr + state_offset
    mask_ptrs = mask_ptr + state_offset
    step = first_step
    for _ in range(num_steps):
        candidate = _tanh(tl.load(gate_ptrs, mask=keep, other=0.0).to(tl.float32))
        forget = tl.sigmoid(tl.load(gate_ptrs + hidden_size, mask=keep, other=0.0).to(tl.float32)) * forget_scale
        if HAS_MASK:
            forget *= tl.load(mask_ptrs, mask=keep, other=0.0).to(tl.float32)
        if HAS_LENGTHS:
            valid = (step < length).to(tl.float32)
            forget *= valid
        state += forget * (candidate - state)  # f z + (1 - f) c
        output = state
        if OUTPUT_GATE:
            output = tl.sigmoid(tl.load(gate_ptrs + 2 * hidden_size, mask=keep, other=0.0).to(tl.float32)) * state
        if HAS_LENGTHS:
            output *= valid
        tl.store(output_ptrs, output.to(output_ptr.dtype.element_ty), mask=keep)
        if STORE_CELL:
            tl.store(cell_ptrs, state.to(cell_ptr.dtype.element_ty), mask=keep)
        gate_ptrs += gates_stride
        output_ptrs += state_stride
        cell_ptrs += state_stride
        mask_ptrs += state_stride
        step += direction
    tl.store(last_ptr + state_row, state.to(last_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _qrnn_forward_chunked_kernel(
    gates_ptr, h0_ptr, lengths_ptr, mask_ptr, output_ptr, cell_ptr, last_ptr,
    num_steps, hidden_size, forget_scale, first_step, direction, gates_first, gates_stride, state_first, state_stride,
    HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_MASK: tl.constexpr, OUTPUT_GATE: tl.constexpr,
    STORE_CELL: tl.constexpr, BLOCK_SIZE: tl.constexpr, TIME_CHUNK: tl.constexpr,
):
    """`_qrnn_forward_kernel`, TIME_CHUNK steps at a time: a [TIME_CHUNK, BLOCK_SIZE] tile of each gate is
    loaded at once (more bytes in flight than one step's row), activated, and ForgetMult solved inside
    the tile by an associative scan (as models/ops/forget_mult_triton.py's chunked kernel). Steps past
    the end get f = 0, which leaves the state unchanged."""
    batch = tl.program_id(1)
    units = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    keep = units < hidden_size
    rows = tl.arange(0, TIME_CHUNK)
    gate_count: tl.constexpr = 3 if OUTPUT_GATE else 2
    state_row = batch * hidden_size + units
    state = _row_or_zeros(h0_ptr + state_row, keep, HAS_H0, BLOCK_SIZE)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + batch)
    gate_offsets = rows[:, None] * gates_stride + (batch * gate_count * hidden_size + units)[None, :]
    state_offsets = rows[:, None] * state_stride + state_row[None, :]
    # Base pointers of the current chunk, advanced by whole chunks (64-bit, so no offset overflows).
    gates_chunk = gates_ptr + gates_first
    mask_chunk = mask_ptr + state_first
    output_chunk = output_ptr + state_first
    cell_chunk = cell_ptr + state_first
    for start in range(0, num_steps, TIME_CHUNK):
        inside = (start + rows) < num_steps
        tile_mask = inside[:, None] & keep[None, :]
        candidate = _tanh(tl.load(gates_chunk + gate_offsets, mask=tile_mask, other=0.0).to(tl.float32))
        forget = tl.sigmoid(tl.load(gates_chunk + gate_offsets + hidden_size, mask=tile_mask, other=0.0)
                            .to(tl.float32)) * forget_scale
        forget = tl.where(tile_mask, forget, 0.0)
        if HAS_MASK:
            forget *= tl.load(mask_chunk + state_offsets, mask=tile_mask, other=0.0).to(tl.float32)
        if HAS_LENGTHS:
            valid = ((first_step + (start + rows) * direction) < length).to(tl.float32)[:, None]
            forget *= valid
        decay, drive = tl.associative_scan((1.0 - forget, forget * candidate), 0, _linear_recurrence)
        cells = drive + decay * state[None, :]
        output = cells
        if OUTPUT_GATE:
            output = tl.sigmoid(tl.load(gates_chunk + gate_offsets + 2 * hidden_size, mask=tile_mask, other=0.0)
                                .to(tl.float32)) * cells
        if HAS_LENGTHS:
            output *= valid
        tl.store(output_chunk + state_offsets, output.to(output_ptr.dtype.element_ty), mask=tile_mask)
        if STORE_CELL:
            tl.store(cell_chunk + state_offsets, cells.to(cell_ptr.dtype.element_ty), mask=tile_mask)
        state = _last_row(cells, rows, TIME_CHUNK)
        gates_chunk += TIME_CHUNK * gates_stride
        mask_chunk += TIME_CHUNK * state_stride
        output_chunk += TIME_CHUNK * state_stride
        cell_chunk += TIME_CHUNK * state_stride
    tl.store(last_ptr + state_row, state.to(last_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _qrnn_backward_kernel(
    gates_ptr, cell_ptr, h0_ptr, lengths_ptr, mask_ptr, grad_output_ptr, grad_last_ptr, grad_gates_ptr, grad_h0_ptr,
    num_steps, hidden_size, forget_scale, first_step, direction, gates_first, gates_stride, state_first, state_stride,
    HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_MASK: tl.constexpr, OUTPUT_GATE: tl.constexpr,
    HAS_GRAD_OUTPUT: tl.constexpr, HAS_GRAD_LAST: tl.constexpr, STORE_GRAD_H0: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """The walk back: `first_step` is the forward pass's last step and `direction` the opposite of its own.

    The state before step t is the cell one step further along this walk, except at the walk's last
    step, where it is h0 (zeros without one).
    """
    batch = tl.program_id(1)
    units = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    keep = units < hidden_size
    gate_count: tl.constexpr = 3 if OUTPUT_GATE else 2
    state_row = batch * hidden_size + units
    carry = _row_or_zeros(grad_last_ptr + state_row, keep, HAS_GRAD_LAST, BLOCK_SIZE)
    initial = _row_or_zeros(h0_ptr + state_row, keep, HAS_H0, BLOCK_SIZE)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + batch)
    gate_ptrs = gates_ptr + gates_first + batch * gate_count * hidden_size + units
    grad_gate_ptrs = grad_gates_ptr + gates_first + batch * gate_count * hidden_size + units
    state_offset = state_first + state_row
    cell_ptrs = cell_ptr + state_offset
    mask_ptrs = mask_ptr + state_offset
    grad_output_ptrs = grad_output_ptr + state_offset
    step = first_step
    for index in range(num_steps):
        candidate = _tanh(tl.load(gate_ptrs, mask=keep, other=0.0).to(tl.float32))
        sigma = tl.sigmoid(tl.load(gate_ptrs + hidden_size, mask=keep, other=0.0).to(tl.float32))
        scale = tl.zeros([BLOCK_SIZE], dtype=tl.float32) + forget_scale
        if HAS_MASK:
            scale *= tl.load(mask_ptrs, mask=keep, other=0.0).to(tl.float32)
        if HAS_LENGTHS:
            valid = (step < length).to(tl.float32)
            scale *= valid
        forget = sigma * scale
        cell = tl.load(cell_ptrs, mask=keep, other=0.0).to(tl.float32)
        previous = tl.load(cell_ptrs + state_stride, mask=keep & (index < num_steps - 1), other=0.0).to(tl.float32)
        previous = tl.where(index < num_steps - 1, previous, initial)
        gradient = carry
        if HAS_GRAD_OUTPUT:
            grad_output = tl.load(grad_output_ptrs, mask=keep, other=0.0).to(tl.float32)
            if HAS_LENGTHS:
                grad_output *= valid
            if OUTPUT_GATE:
                out_gate = tl.sigmoid(tl.load(gate_ptrs + 2 * hidden_size, mask=keep, other=0.0).to(tl.float32))
                gradient += grad_output * out_gate
                grad_out_gate = grad_output * cell * out_gate * (1.0 - out_gate)
                tl.store(grad_gate_ptrs + 2 * hidden_size, grad_out_gate.to(grad_gates_ptr.dtype.element_ty),
                         mask=keep)
            else:
                gradient += grad_output
        elif OUTPUT_GATE:
            tl.store(grad_gate_ptrs + 2 * hidden_size, tl.zeros([BLOCK_SIZE], dtype=tl.float32)
                     .to(grad_gates_ptr.dtype.element_ty), mask=keep)
        grad_candidate = gradient * forget * (1.0 - candidate * candidate)
        grad_forget = gradient * (candidate - previous) * scale * sigma * (1.0 - sigma)
        tl.store(grad_gate_ptrs, grad_candidate.to(grad_gates_ptr.dtype.element_ty), mask=keep)
        tl.store(grad_gate_ptrs + hidden_size, grad_forget.to(grad_gates_ptr.dtype.element_ty), mask=keep)
        carry = gradient * (1.0 - forget)
        gate_ptrs += gates_stride
        grad_gate_ptrs += gates_stride
        cell_ptrs += state_stride
        mask_ptrs += state_stride
        grad_output_ptrs += state_stride
        step += direction
    if STORE_GRAD_H0:
        tl.store(grad_h0_ptr + state_row, carry.to(grad_h0_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _qrnn_backward_chunked_kernel(
    gates_ptr, cell_ptr, h0_ptr, lengths_ptr, mask_ptr, grad_output_ptr, grad_last_ptr, grad_gates_ptr, grad_h0_ptr,
    num_steps, hidden_size, forget_scale, first_step, direction, gates_first, gates_stride, state_first, state_stride,
    HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_MASK: tl.constexpr, OUTPUT_GATE: tl.constexpr,
    HAS_GRAD_OUTPUT: tl.constexpr, HAS_GRAD_LAST: tl.constexpr, STORE_GRAD_H0: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TIME_CHUNK: tl.constexpr,
):
    """`_qrnn_backward_kernel`, TIME_CHUNK steps at a time.

    Position p of the walk (p = 0 is the forward pass's last step) has g_p = v_p dL/dh_p o_p +
    (1 - f_{p-1}) g_{p-1}, with g_{-1} = dL/dc_last: a linear recurrence whose a_p is 1 - f one row back
    along the walk (recomputed from that row's pre-activation; 1 at p = 0), solved inside each tile by a
    scan. The state before step p in the forward pass is the cell one row ahead along the walk (h0 at
    the walk's last position).
    """
    batch = tl.program_id(1)
    units = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    keep = units < hidden_size
    rows = tl.arange(0, TIME_CHUNK)
    gate_count: tl.constexpr = 3 if OUTPUT_GATE else 2
    state_row = batch * hidden_size + units
    carry = _row_or_zeros(grad_last_ptr + state_row, keep, HAS_GRAD_LAST, BLOCK_SIZE)
    initial = _row_or_zeros(h0_ptr + state_row, keep, HAS_H0, BLOCK_SIZE)
    grad_initial = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + batch)
    gate_offsets = rows[:, None] * gates_stride + (batch * gate_count * hidden_size + units)[None, :]
    state_offsets = rows[:, None] * state_stride + state_row[None, :]
    gates_chunk = gates_ptr + gates_first
    grad_gates_chunk = grad_gates_ptr + gates_first
    state_chunk = state_first  # 32-bit: the host takes the row kernel where the offsets would not fit
    for start in range(0, num_steps, TIME_CHUNK):
        positions = start + rows
        inside = positions < num_steps
        tile_mask = inside[:, None] & keep[None, :]
        back_mask = (inside & (positions >= 1))[:, None] & keep[None, :]
        candidate = _tanh(tl.load(gates_chunk + gate_offsets, mask=tile_mask, other=0.0).to(tl.float32))
        sigma = tl.sigmoid(tl.load(gates_chunk + gate_offsets + hidden_size, mask=tile_mask, other=0.0)
                           .to(tl.float32))
        sigma_back = tl.sigmoid(tl.load(gates_chunk + gate_offsets + (hidden_size - gates_stride), mask=back_mask,
                                        other=0.0).to(tl.float32))
        scale = tl.zeros([TIME_CHUNK, BLOCK_SIZE], dtype=tl.float32) + forget_scale
        scale_back = tl.where(back_mask, forget_scale, 0.0)
        if HAS_MASK:
            scale *= tl.load(mask_ptr + state_chunk + state_offsets, mask=tile_mask, other=0.0).to(tl.float32)
            scale_back *= tl.load(mask_ptr + state_chunk + state_offsets - state_stride, mask=back_mask,
                                  other=0.0).to(tl.float32)
        if HAS_LENGTHS:
            times = first_step + positions * direction  # each row's step in forward time
            valid = (times < length).to(tl.float32)[:, None]
            scale *= valid
            scale_back *= ((times - direction) < length).to(tl.float32)[:, None]
        forget = sigma * scale
        grad_in = tl.zeros([TIME_CHUNK, BLOCK_SIZE], dtype=tl.float32)
        if HAS_GRAD_OUTPUT:
            grad_output = tl.load(grad_output_ptr + state_chunk + state_offsets, mask=tile_mask, other=0.0
                                  ).to(tl.float32)
            if HAS_LENGTHS:
                grad_output *= valid
            if OUTPUT_GATE:
                out_gate = tl.sigmoid(tl.load(gates_chunk + gate_offsets + 2 * hidden_size, mask=tile_mask,
                                              other=0.0).to(tl.float32))
                cell = tl.load(cell_ptr + state_chunk + state_offsets, mask=tile_mask, other=0.0).to(tl.float32)
                grad_in = grad_output * out_gate
                tl.store(grad_gates_chunk + gate_offsets + 2 * hidden_size,
                         (grad_output * cell * out_gate * (1.0 - out_gate)).to(grad_gates_ptr.dtype.element_ty),
                         mask=tile_mask)
            else:
                grad_in = grad_output
        elif OUTPUT_GATE:
            tl.store(grad_gates_chunk + gate_offsets + 2 * hidden_size, grad_in.to(grad_gates_ptr.dtype.element_ty),
                     mask=tile_mask)
        decays, drives = tl.associative_scan((1.0 - sigma_back * scale_back, grad_in), 0, _linear_recurrence)
        gradient = drives + decays * carry[None, :]
        ahead_mask = (positions + 1 < num_steps)[:, None] & keep[None, :]
        previous = tl.load(cell_ptr + state_chunk + state_offsets + state_stride, mask=ahead_mask, other=0.0
                           ).to(tl.float32)
        at_start = (positions == num_steps - 1)[:, None]  # the forward pass's first step: h0 before it
        previous = tl.where(at_start, initial[None, :], previous)
        tl.store(grad_gates_chunk + gate_offsets,
                 (gradient * forget * (1.0 - candidate * candidate)).to(grad_gates_ptr.dtype.element_ty),
                 mask=tile_mask)
        tl.store(grad_gates_chunk + gate_offsets + hidden_size,
                 (gradient * (candidate - previous) * scale * sigma * (1.0 - sigma))
                 .to(grad_gates_ptr.dtype.element_ty), mask=tile_mask)
        if STORE_GRAD_H0:
            grad_initial += tl.sum(tl.where(at_start, gradient * (1.0 - forget), 0.0), axis=0)
        carry = _last_row(gradient, rows, TIME_CHUNK)
        gates_chunk += TIME_CHUNK * gates_stride
        grad_gates_chunk += TIME_CHUNK * gates_stride
        state_chunk += TIME_CHUNK * state_stride
    if STORE_GRAD_H0:
        tl.store(grad_h0_ptr + state_row, grad_initial.to(grad_h0_ptr.dtype.element_ty), mask=keep)


def _walk(num_steps: int, batch_size: int, width: int, hidden_size: int, backwards_in_time: bool) -> tuple:
    """(first step, direction, gates offset of its row, gates step stride, state offset, state step stride)."""
    first = num_steps - 1 if backwards_in_time else 0
    direction = -1 if backwards_in_time else 1
    return (first, direction, first * batch_size * width, direction * batch_size * width,
            first * batch_size * hidden_size, direction * batch_size * hidden_size)


def _launch_forward(
    gates: Tensor, hidden: Tensor | None, lengths: Tensor | None, forget_mask: Tensor | None, forget_scale: float,
    reverse: bool, output_gate: bool, store_cell: bool, config: KernelConfig | None,
) -> tuple[Tensor, Tensor, Tensor | None, KernelConfig]:
    """Run the forward kernel: output [T, B, H], last [B, H], the cells [T, B, H] when `store_cell`."""
    num_steps, batch_size, width = gates.shape
    hidden_size = width // (3 if output_gate else 2)
    output = torch.empty((num_steps, batch_size, hidden_size), dtype=gates.dtype, device=gates.device)
    last = torch.empty((batch_size, hidden_size), dtype=gates.dtype, device=gates.device)
    # Without an output gate or padding the output is the cell: saved once.
    cell_is_output = not output_gate and lengths is None
    cell = torch.empty_like(output) if store_cell and not cell_is_output else None
    if config is None:
        config = choose_config(hidden_size, batch_size, gates.dtype, gates.device, num_steps)
        if (config.time_chunk + 1) * batch_size * width >= 2**31:  # a tile's offsets are 32-bit
            config = dataclasses.replace(config, time_chunk=1)
    grid = (triton.cdiv(hidden_size, config.block_size), batch_size)
    kernel, chunk = _qrnn_forward_kernel, {}
    if config.time_chunk > 1:
        kernel, chunk = _qrnn_forward_chunked_kernel, {"TIME_CHUNK": config.time_chunk}
    with device_guard(gates):  # absent tensors are stood in for by `gates`; their HAS_* flag keeps them unread
        kernel[grid](
            gates, gates if hidden is None else hidden, gates if lengths is None else lengths,
            gates if forget_mask is None else forget_mask, output, output if cell is None else cell, last,
            num_steps, hidden_size, float(forget_scale), *_walk(num_steps, batch_size, width, hidden_size, reverse),
            HAS_H0=hidden is not None, HAS_LENGTHS=lengths is not None, HAS_MASK=forget_mask is not None,
            OUTPUT_GATE=output_gate, STORE_CELL=cell is not None, BLOCK_SIZE=config.block_size, **chunk,
            **config.launch_options(),
        )
    if store_cell and cell_is_output:
        cell = output
    return output, last, cell, config


class QRNNPoolTriton(torch.autograd.Function):
    """The fused pooling with its fused backward; arguments are checked by `qrnn_pool_triton`."""

    @staticmethod
    def forward(
        ctx: Any, gates: Tensor, hidden: Tensor | None, lengths: Tensor | None, forget_mask: Tensor | None,
        forget_scale: float, reverse: bool, output_gate: bool, config: KernelConfig | None,
    ) -> tuple[Tensor, Tensor]:
        output, last, cell, config = _launch_forward(
            gates, hidden, lengths, forget_mask, forget_scale, reverse, output_gate, True, config
        )
        ctx.save_for_backward(gates, cell, hidden, lengths, forget_mask)
        ctx.options = (forget_scale, reverse, output_gate, config)
        ctx.set_materialize_grads(False)
        return output, last

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor | None, grad_last: Tensor | None) -> tuple:
        gates, cell, hidden, lengths, forget_mask = ctx.saved_tensors
        forget_scale, reverse, output_gate, config = ctx.options
        num_steps, batch_size, _ = gates.shape
        hidden_size = cell.size(2)
        grad_output = grad_output.contiguous() if grad_output is not None else None
        grad_last = grad_last.contiguous() if grad_last is not None else None
        grad_gates = torch.empty_like(gates)  # [T, B, G * H], every element written
        needs_h0 = hidden is not None and ctx.needs_input_grad[1]
        grad_h0 = torch.empty_like(hidden) if needs_h0 else None
        grid = (triton.cdiv(hidden_size, config.block_size), batch_size)
        kernel, chunk = _qrnn_backward_kernel, {}
        steps = min(config.time_chunk, BACKWARD_MAX_CHUNK)
        if steps > 1 and (num_steps + steps + 1) * gates[0].numel() < 2**31:  # its offsets are 32-bit
            kernel, chunk = _qrnn_backward_chunked_kernel, {"TIME_CHUNK": steps}
        with device_guard(gates):
            kernel[grid](
                gates, cell, gates if hidden is None else hidden, gates if lengths is None else lengths,
                gates if forget_mask is None else forget_mask, gates if grad_output is None else grad_output,
                gates if grad_last is None else grad_last, grad_gates, gates if grad_h0 is None else grad_h0,
                num_steps, hidden_size, float(forget_scale),
                *_walk(num_steps, batch_size, gates.size(2), hidden_size, backwards_in_time=not reverse),
                HAS_H0=hidden is not None, HAS_LENGTHS=lengths is not None, HAS_MASK=forget_mask is not None,
                OUTPUT_GATE=output_gate, HAS_GRAD_OUTPUT=grad_output is not None, HAS_GRAD_LAST=grad_last is not None,
                STORE_GRAD_H0=grad_h0 is not None, BLOCK_SIZE=config.block_size, **chunk, **config.launch_options(),
            )
        return grad_gates, grad_h0, None, None, None, None, None, None


def qrnn_pool_triton(
    gates: Tensor, hidden: Tensor | None = None, lengths: Tensor | None = None, forget_mask: Tensor | None = None,
    forget_scale: float = 1.0, reverse: bool = False, output_gate: bool = True, config: KernelConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """A QRNN layer's pooling from its gate pre-activations: one kernel forward, one backward.

    Args:
        gates: [T, B, G * H] the layer's matrix product (pre-activations Z, F and, with the output gate, O),
            contiguous, float16, bfloat16 or float32, on a CUDA device.
        hidden: [B, H] state before the first step processed, or None for zeros; the dtype of `gates`.
        lengths: LongTensor [B] of valid steps per row (padding at the end), or None for all T: padded
            steps keep the state and output zeros.
        forget_mask: [T, B, H] zoneout mask multiplying F (training), or None; the dtype of `gates`.
        forget_scale: a constant multiplying F (1 - zoneout in evaluation, else 1).
        reverse: run from step T - 1 down to 0 (the backward direction of a bidirectional layer).
        output_gate: whether `gates` has O (h = o * c) or not (h = c).
        config: launch parameters; None: `choose_config`'s default for (H, B, T). A `time_chunk` above 1
            takes the time-chunked kernels.

    Returns:
        output [T, B, H] and the state after the last step processed [B, H], in the dtype of `gates`.
        Gradients reach `gates` and `hidden`. Under `torch.no_grad()`, or when neither needs a gradient,
        the kernel runs without autograd and without saving the cells.

    Raises:
        ValueError: if `gates` cannot go to the kernel (device, dtype, layout).
    """
    if not triton_device(gates):
        raise ValueError(f"qrnn_pool_triton needs CUDA tensors, got device {gates.device}; use QRNNLayer.run")
    if gates.dtype not in TRITON_DTYPES:
        raise ValueError(f"qrnn_pool_triton takes float16, bfloat16 or float32, got {gates.dtype}")
    if gates.dim() != 3 or not gates.is_contiguous() or gates.size(2) % (3 if output_gate else 2):
        raise ValueError(f"gates must be a contiguous [T, B, G * H] tensor, got shape {tuple(gates.shape)}")
    chunk = 1 if config is None else config.time_chunk
    if (chunk + 1) * gates.size(1) * gates.size(2) >= 2**31:
        raise ValueError(f"qrnn_pool_triton steps by rows of B * G * H < 2**31 elements (times the time chunk "
                         f"{chunk} + 1), got {tuple(gates.shape)}")
    if torch.is_grad_enabled() and (gates.requires_grad or (hidden is not None and hidden.requires_grad)):
        return QRNNPoolTriton.apply(gates, hidden, lengths, forget_mask, forget_scale, reverse, output_gate, config)
    output, last, _, _ = _launch_forward(
        gates, hidden, lengths, forget_mask, forget_scale, reverse, output_gate, False, config
    )
    return output, last
