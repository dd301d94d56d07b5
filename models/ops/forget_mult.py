"""QRNN's ForgetMult recurrence: the reference loop, a fast PyTorch path, and dispatch to the Triton kernel.

Bradbury et al. 2016, "Quasi-Recurrent Neural Networks", f-pooling (section 2, eq. 3), in the form
salesforce/pytorch-qrnn computes it, where the gate weighs the new value (the paper's f_t is our 1 - f_t):

    h_t = f_t * x_t + (1 - f_t) * h_{t-1},    h_{-1} = h0 (zeros when h0 is None)

`reverse=True` runs the same recurrence from t = T - 1 down to 0 (the backward direction of a
bidirectional QRNN): h_t = f_t * x_t + (1 - f_t) * h_{t+1}, with h_T = h0. The final state `h_last` is
the state after the last step processed: h_{T-1} forwards, h_0 in reverse.

Three implementations with one signature and one result (STYLE section 5):

- `forget_mult_ref`: the specification, a plain loop over time differentiated by autograd;
- `forget_mult_torch`: one `torch.autograd.Function` on any device. Its forward runs one
  `torch.lerp(h_{t-1}, x_t, f_t, out=h[t])` per step (lerp is exactly the recurrence) into contiguous
  [B, H] slices of a preallocated output, without an autograd graph. Its backward runs the reverse
  recurrence of the gradient the same way (one in-place `addcmul_` per step) and gets df and dx
  from it in vectorised ops, in two [T, B, H] buffers. The reference under autograd pays for about
  ten graph nodes per step and their backward; see bench/bench_forget_mult.py for the speed-up;
- `forget_mult_triton` (models/ops/forget_mult_triton.py): Triton kernels for CUDA tensors.

`ForgetMult` is torchqrnn's module form of the same recurrence (`output = ForgetMult()(f, x, hidden)`,
returning only h), for code written against salesforce/pytorch-qrnn.

`forget_mult` picks the Triton kernel for float16, bfloat16 and float32 CUDA tensors when Triton is
installed, and `forget_mult_torch` otherwise (CPU, float64, or no Triton: then with a one-time warning).
Triton is imported only when a CUDA tensor arrives, so this module imports without Triton or CUDA.
For tests only, `TRITON_ON_CPU` sends CPU tensors to the Triton kernels too, which Triton's interpreter
(TRITON_INTERPRET=1 before Triton is imported) runs on the host: the kernels' tests then run without a GPU.

Gradients. With g_t the gradient reaching h_t (the output's gradient at t plus what flows back from
the step processed after t), forwards:

    g_t = dL/dh_t + (1 - f_{t+1}) * g_{t+1},   g_{T-1} = dL/dh_{T-1} + dL/dh_last
    df_t = g_t * (x_t - h_{t-1}),   dx_t = g_t * f_t,   dh0 = (1 - f_0) * g_0

and the mirror image in reverse. All paths accumulate in float32 at least (float64 stays float64).

Shapes: `T` time steps, `B` batch, `H` hidden size.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float64 CUDA tensors take forget_mult_torch

# For tests only: True sends CPU tensors to the Triton kernels, which only works under Triton's interpreter
# (TRITON_INTERPRET=1 set before Triton is imported; tests/test_triton_kernels.py runs so). Production code
# never sets it: without a GPU the PyTorch paths are the fast ones.
TRITON_ON_CPU = False

ForgetMultFn = Callable[[Tensor, Tensor, "Tensor | None", bool], "tuple[Tensor, Tensor]"]


def check_arguments(f: Tensor, x: Tensor, h0: Tensor | None, reverse: bool) -> None:
    """Raise ValueError naming the first bad argument of a ForgetMult call.

    Args:
        f: [T, B, H] gates.
        x: [T, B, H] values.
        h0: [B, H] initial state, or None.
        reverse: run from the last step to the first.

    Raises:
        ValueError: if an argument is not a tensor or has a bad shape, dtype or device.
    """
    for name, tensor in (("f", f), ("x", x)):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape [T, B, H], got {type(tensor).__name__}")
    if f.dim() != 3 or min(f.shape) < 1:
        raise ValueError(f"f must have shape [T, B, H] with T, B, H >= 1 (time-major), got shape {tuple(f.shape)}")
    if x.shape != f.shape:
        raise ValueError(f"x must have the shape of f, [T, B, H] = {tuple(f.shape)}, got shape {tuple(x.shape)}")
    if f.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"f must be float16, bfloat16, float32 or float64, got dtype {f.dtype}")
    if x.dtype != f.dtype:
        raise ValueError(f"f and x must have one dtype, got {f.dtype} and {x.dtype}")
    if x.device != f.device:
        raise ValueError(f"f and x must be on one device, got {f.device} and {x.device}")
    if h0 is not None:
        if not isinstance(h0, Tensor):
            raise ValueError(f"h0 must be None or a torch.Tensor of shape [B, H], got {type(h0).__name__}")
        if h0.shape != f.shape[1:]:
            raise ValueError(
                f"h0 must have shape [B, H] = {tuple(f.shape[1:])} to match f, got shape {tuple(h0.shape)}"
            )
        if h0.dtype != f.dtype:
            raise ValueError(f"h0 must have the dtype of f ({f.dtype}), got {h0.dtype}")
        if h0.device != f.device:
            raise ValueError(f"h0 must be on the device of f ({f.device}), got {h0.device}")
    if not isinstance(reverse, bool):
        raise ValueError(f"reverse must be a bool, got {reverse!r}")


def triton_device(tensor: Tensor) -> bool:
    """Whether the Triton kernels may run on `tensor`'s device: CUDA, or CPU under the test switch."""
    return tensor.device.type == "cuda" or (TRITON_ON_CPU and tensor.device.type == "cpu")


def triton_runs_on_cpu() -> None:
    """Raise RuntimeError unless the test switch and Triton's interpreter are both on (CPU tensors in a kernel)."""
    if not TRITON_ON_CPU or os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "Triton kernels run on CPU tensors only under Triton's interpreter, for tests: set TRITON_INTERPRET=1 "
            "before importing Triton and models.ops.forget_mult.TRITON_ON_CPU = True"
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the recurrence runs in: float32 for half precision, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def forget_mult_ref(
    f: Tensor, x: Tensor, h0: Tensor | None = None, reverse: bool = False
) -> tuple[Tensor, Tensor]:
    """ForgetMult, one step at a time: the specification the fast paths are tested against.

    Args:
        f: [T, B, H] gates, usually in (0, 1): the weight of the new value at each step.
        x: [T, B, H] values (the QRNN's candidate vectors), same dtype and device as `f`.
        h0: [B, H] state before the first step processed, or None for zeros.
        reverse: run t = T - 1, ..., 0 (h0 is then the state after the end of the sequence).

    Returns:
        h: [T, B, H] the state after each step, h[t] = f[t] * x[t] + (1 - f[t]) * (state before t).
        h_last: [B, H] the state after the last step processed (h[T - 1], or h[0] when reversed).
        Both are computed in float32 (float64 for float64 inputs) and returned in the dtype of `f`.

    Raises:
        ValueError: if an argument has a bad shape, dtype or device.
    """
    check_arguments(f, x, h0, reverse)
    dtype = compute_dtype(f.dtype)
    # unbind, not gates[t]: the backward of indexing would add a [T, B, H] gradient per step (O(T^2)).
    gates, values = f.to(dtype).unbind(0), x.to(dtype).unbind(0)  # T tensors [B, H]
    state = h0.to(dtype) if h0 is not None else torch.zeros_like(gates[0])
    steps = range(f.size(0) - 1, -1, -1) if reverse else range(f.size(0))
    states: list[Tensor] = [state] * f.size(0)
    for step in steps:
        state = gates[step] * values[step] + (1 - gates[step]) * state
        states[step] = state
    return torch.stack(states).to(f.dtype), state.to(f.dtype)


class ForgetMultFunction(torch.autograd.Function):
    """ForgetMult with a hand-written backward; PyTorch ops only, so it runs on any device."""

    @staticmethod
    def forward(ctx: Any, f: Tensor, x: Tensor, h0: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        dtype = compute_dtype(f.dtype)
        gates = f.contiguous().to(dtype)
        values = x.contiguous().to(dtype)
        h = torch.empty(f.shape, dtype=dtype, device=f.device)  # [T, B, H], every step written below
        steps = list(zip(h.unbind(0), gates.unbind(0), values.unbind(0)))  # contiguous [B, H] views
        if reverse:
            steps.reverse()
        previous = h0.contiguous().to(dtype) if h0 is not None else None
        for state, gate, value in steps:
            if previous is None:
                torch.mul(gate, value, out=state)
            else:
                torch.lerp(previous, value, gate, out=state)  # previous + f_t * (x_t - previous)
            previous = state
        h_last = previous.to(f.dtype, copy=True)  # a copy, not a view of h
        h = h.to(f.dtype)
        ctx.reverse = reverse
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(f, x, h, h0)
        return h, h_last

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_h: Tensor | None, grad_h_last: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        f, x, h, h0 = ctx.saved_tensors
        reverse = ctx.reverse
        dtype = compute_dtype(f.dtype)
        gates = f.contiguous().to(dtype)
        # Two [T, B, H] buffers in all (fresh large buffers are slow to fault in): `gradient` holds g_t
        # and then becomes dx; `keep` holds 1 - f and then becomes df.
        gradient = torch.empty(f.shape, dtype=dtype, device=f.device)  # g_t: [T, B, H]
        if grad_h is None:
            gradient.zero_()
        else:
            gradient.copy_(grad_h)
        keep = torch.rsub(gates, 1)  # 1 - f: [T, B, H]
        steps = list(zip(gradient.unbind(0), keep.unbind(0)))  # in forward processing order
        if not reverse:
            steps.reverse()
        later_gradient, later_keep = steps[0]
        if grad_h_last is not None:
            later_gradient.add_(grad_h_last)
        for gradient_step, keep_step in steps[1:]:
            gradient_step.addcmul_(later_keep, later_gradient)  # g_t = dL/dh_t + (1 - f_later) * g_later
            later_gradient, later_keep = gradient_step, keep_step
        # The loop ends at the first step processed, whose previous state is h0.
        needs_f, needs_x, needs_h0, _ = ctx.needs_input_grad
        grad_h0 = None
        if needs_h0 and h0 is not None:
            grad_h0 = torch.mul(later_keep, later_gradient).to(h0.dtype)
        grad_f = None
        if needs_f:
            # df_t = g_t * (x_t - h_previous(t)), with h_previous(t) = h[t - 1] forwards, h[t + 1] reversed.
            values = x.contiguous().to(dtype)
            states = h.to(dtype)
            later, earlier = slice(1, None), slice(None, -1)
            current, previous = (earlier, later) if reverse else (later, earlier)
            first = -1 if reverse else 0
            difference = keep  # 1 - f is no longer needed
            torch.sub(values[current], states[previous], out=difference[current])
            if h0 is None:
                difference[first].copy_(values[first])
            else:
                torch.sub(values[first], h0.to(dtype), out=difference[first])
            grad_f = difference.mul_(gradient).to(f.dtype)
        grad_x = gradient.mul_(gates).to(x.dtype) if needs_x else None  # dx_t = g_t * f_t, last use of g
        return grad_f, grad_x, grad_h0, None


def forget_mult_torch(
    f: Tensor, x: Tensor, h0: Tensor | None = None, reverse: bool = False
) -> tuple[Tensor, Tensor]:
    """ForgetMult through `ForgetMultFunction` (PyTorch ops, any device), whatever the device.

    Same arguments, result and errors as `forget_mult_ref`; gradients for f, x and h0.
    """
    check_arguments(f, x, h0, reverse)
    return ForgetMultFunction.apply(f, x, h0, reverse)


@functools.lru_cache(maxsize=None)
def load_triton_kernel() -> ForgetMultFn | None:
    """`forget_mult_triton`, or None (after one warning) when Triton cannot be imported."""
    try:
        from models.ops.forget_mult_triton import forget_mult_triton
    except ImportError as error:
        warnings.warn(
            f"forget_mult: Triton is not available ({error}); CUDA tensors take the PyTorch loop "
            "(forget_mult_torch), which is much slower. Install it with `pip install triton`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return forget_mult_triton


def forget_mult(
    f: Tensor, x: Tensor, h0: Tensor | None = None, reverse: bool = False
) -> tuple[Tensor, Tensor]:
    """ForgetMult, fast: the Triton kernel for CUDA tensors, `forget_mult_torch` elsewhere.

    h[t] = f[t] * x[t] + (1 - f[t]) * h[t - 1] over t = 0, ..., T - 1 (t = T - 1, ..., 0 when
    `reverse`), starting from h0. Same result as `forget_mult_ref` up to rounding.

    Args:
        f: [T, B, H] gates, usually in (0, 1): the weight of the new value at each step; float16,
            bfloat16, float32 or float64. Non-contiguous tensors are copied to contiguous ones.
        x: [T, B, H] values (the QRNN's candidate vectors), same dtype and device as `f`.
        h0: [B, H] state before the first step processed, or None for zeros; same dtype and device.
        reverse: run t = T - 1, ..., 0 (for the backward direction of a bidirectional QRNN; h0 is then
            the state after the end of the sequence).

    Returns:
        h: [T, B, H] the state after each step, in the dtype of `f`.
        h_last: [B, H] the state after the last step processed (h[T - 1], or h[0] when reversed).

    Raises:
        ValueError: if an argument has a bad shape, dtype or device.
    """
    check_arguments(f, x, h0, reverse)
    if f.dtype in TRITON_DTYPES and triton_device(f):
        kernel = load_triton_kernel()
        if kernel is not None:
            return kernel(f, x, h0, reverse)
    return ForgetMultFunction.apply(f, x, h0, reverse)


class ForgetMult(torch.nn.Module):
    """torchqrnn's `ForgetMult` module: `h = ForgetMult()(f, x, hidden_init=None, use_cuda=True)`.

    h_t = f_t * x_t + (1 - f_t) * h_{t-1} through `forget_mult` (the Triton kernel on CUDA, the
    PyTorch path elsewhere). torchqrnn chose its CUDA kernel or a Python loop with `use_cuda`, and
    asserted that the tensors were on the GPU when it asked for the kernel; here the tensors' device
    decides, so `use_cuda` is accepted and ignored and CPU tensors work with its default.

    Args (of `forward`):
        f: [T, B, H] forget gates (the weight of the new value), usually in (0, 1).
        x: [T, B, H] candidate values, same dtype and device as `f`.
        hidden_init: [B, H] the state before the first step, or None for zeros.
        use_cuda: accepted for torchqrnn's signature; ignored.

    Returns:
        h: [T, B, H] the state after each step (torchqrnn returns no separate final state: it is h[-1]).
    """

    def forward(self, f: Tensor, x: Tensor, hidden_init: Tensor | None = None, use_cuda: bool = True) -> Tensor:
        return forget_mult(f, x, hidden_init)[0]
