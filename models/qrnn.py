"""Quasi-recurrent neural networks (Bradbury et al. 2016), with the API of salesforce/pytorch-qrnn.

A QRNN layer computes a candidate Z, a forget gate F and (QRNN-fo) an output gate O for every
time step at once, by one linear map over a window of the last `window` inputs (a causal
convolution, paper eq. 1), then runs the only sequential part, the ForgetMult recurrence

    c_t = f_t * z_t + (1 - f_t) * c_{t-1},        h_t = o_t * c_t

(fo-pooling, paper eq. 4, with the roles of f and 1 - f swapped as in the reference code:
f weighs the new candidate). After the layer's one matrix product, the rest of a layer (the gate
activations, ForgetMult, the output gate, zoneout and padding) runs either

- fused: one Triton kernel forward and one backward (`models.ops.qrnn_triton`), for float16,
  bfloat16 and float32 CUDA tensors when Triton is installed and the layer's `use_cuda` is True
  (the default), so that a layer call costs its matrix product and one recurrence kernel; or
- eagerly (`pool_eager`): PyTorch ops around `models.ops.forget_mult.forget_mult`, the reference
  the fused path is tested against, taken on CPU, for float64, without Triton, or with `use_cuda=False`.

Three layers of API, thinnest last:

- `QRNNLayer.run` / `QRNN.run`: pure functions of the input, the initial hidden state and the
  previous inputs; they return the new ones and keep nothing on the module.
- `QRNNLayer` / `QRNN` `forward`: the reference's call signature, `output, h_n = qrnn(x, h0)`,
  with `save_prev_x` keeping the last inputs on the layer until `reset()`.
- `QRNNCore`: the repository's core contract, `y, QRNNState(h, prev_x) = core(x, state)`.

torchqrnn's imports map to this module: `from torchqrnn import QRNN, QRNNLayer, ForgetMult` becomes
`from models.qrnn import QRNN, QRNNLayer, ForgetMult` (ForgetMult lives in models/ops/forget_mult.py).

Beyond the reference: windows larger than 2, `batch_first`, `bias=False`, a bidirectional QRNN
(the backward direction runs ForgetMult in reverse, its window looking at later inputs), and
variable-length batches (`lengths` or a `PackedSequence`): padded steps get f = 0, so the state
passes through them unchanged, and their outputs are zero.

Shapes: `T` time steps, `B` batch, `D` a layer's input size, `H` hidden size, `W` window,
`L` layers, `K` directions (1, or 2 when bidirectional).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from models.core import add_argument_once, add_stack_args, Core, register_core, stack_dropout
from models.ops.forget_mult import (  # noqa: F401 (ForgetMult: torchqrnn's import path)
    TRITON_DTYPES, ForgetMult, forget_mult, triton_device)


class QRNNState(NamedTuple):
    """State of a QRNN stack.

    `h`: [L * K, B, H], ordered like `nn.LSTM`'s h_n (layer-major, forward then backward).
    `prev_x`: one tensor per layer, [W - 1, B, D_l], that layer's last W - 1 inputs (oldest
    first), which the next call's window looks back at. With W = 1 each is a zero-length
    [0, B, D_l] tensor, so the state is always plain tensors in tuples.
    """

    h: torch.Tensor
    prev_x: tuple[torch.Tensor, ...]


def _check_lengths(lengths: torch.Tensor | Sequence[int], steps: int, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """`lengths` as a LongTensor [B] on `device`, checked to lie in [0, T]."""
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
    if lengths.shape != (batch_size,):
        raise ValueError(f"lengths must have one entry per sequence ({batch_size}), got shape {tuple(lengths.shape)}")
    if lengths.numel() and (lengths.min() < 0 or lengths.max() > steps):
        raise ValueError(f"lengths must lie between 0 and the {steps} time steps, got {lengths.tolist()}")
    return lengths


@functools.lru_cache(maxsize=None)
def load_fused_pool() -> Callable | None:
    """`qrnn_pool_triton`, or None when Triton cannot be imported (`forget_mult` warns about that once)."""
    try:
        from models.ops.qrnn_triton import qrnn_pool_triton
    except ImportError:
        return None
    return qrnn_pool_triton


def pool_eager(gates: torch.Tensor, hidden: torch.Tensor | None, valid: torch.Tensor | None,
               forget_mask: torch.Tensor | None, forget_scale: float, reverse: bool, output_gate: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer after its matrix product, in PyTorch ops: the reference of `qrnn_pool_triton`.

    Args:
        gates: [T, B, G * H] pre-activations, rows Z, F (, O).
        hidden: [B, H] initial state in the dtype of `gates`, or None for zeros.
        valid: [T, B, 1] 1 at valid steps and 0 at padded ones, or None.
        forget_mask: [T, B, H] zoneout mask multiplying F, or None.
        forget_scale: constant multiplying F (1 - zoneout in evaluation), used without a mask.
        reverse: run ForgetMult from the last step to the first.
        output_gate: h = o * c (QRNN-fo) or h = c (QRNN-f).

    Returns:
        output [T, B, H] and the state after the last step processed [B, H].
    """
    gate_count = 3 if output_gate else 2
    candidate, forget, *output_gates = gates.chunk(gate_count, dim=2)  # G x [T, B, H]
    candidate = torch.tanh(candidate)
    forget = torch.sigmoid(forget)
    # Paper section 2.1 (zoneout): f = 0 keeps the previous state for that unit and step.
    if forget_mask is not None:
        forget = forget * forget_mask
    elif forget_scale != 1:
        forget = forget * forget_scale
    if valid is not None:
        forget = forget * valid  # padded steps carry the state through
    cell, last = forget_mult(forget.contiguous(), candidate.contiguous(), hidden, reverse=reverse)
    output = torch.sigmoid(output_gates[0]) * cell if output_gate else cell  # paper eq. 4
    if valid is not None:
        output = output * valid
    return output, last


def _valid_steps(lengths: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """1 where step t < lengths[b], else 0: [T, B, 1]."""
    time = torch.arange(steps, device=lengths.device).unsqueeze(1)  # [T, 1]
    return (time < lengths.unsqueeze(0)).to(dtype).unsqueeze(2)  # [T, B] -> [T, B, 1]


class QRNNLayer(nn.Module):
    """One QRNN layer (salesforce/pytorch-qrnn's `QRNNLayer`, same constructor and call).

    Args:
        input_size: D, features of each input step.
        hidden_size: H; None means `input_size` (what the reference documents; its code kept None).
        save_prev_x: keep the last W - 1 inputs of each `forward` call (detached, as the reference
            does) for the next call's window, as for a language model reading a long stream;
            call `reset()` before an unrelated sequence. Without it the window sees zeros before
            each call's first step.
        zoneout: probability of zoning out a unit at a step. In training F is multiplied by a
            Bernoulli(1 - zoneout) mask drawn per element, without rescaling (F = 0 keeps the old
            state); in evaluation F is multiplied by 1 - zoneout, its expectation. Both as the reference.
        window: W, how many inputs (the current and W - 1 before it) each step sees. The reference
            supports 1 and 2; any W >= 1 works here.
        output_gate: QRNN-fo (h = o * c) when True, QRNN-f (h = c) when False.
        use_cuda: run the fused Triton kernels on CUDA tensors (the default; see the module
            docstring). False keeps the eager PyTorch path there too (the reference's meaning:
            not its CUDA kernel), as the benchmarks do for their eager column.
        bias: whether the gate linear has a bias (not in the reference layer, which always has one).

    Raises:
        ValueError: on a non-positive size or window, or zoneout outside [0, 1).

    The gates come from `self.linear` (`weight` [G * H, W * D], `bias` [G * H], G = 3 with the
    output gate, else 2), rows ordered Z, F, O; its input at step t is the concatenation
    [x_t, x_{t-1}, ..., x_{t-W+1}] (newest first, the reference's [X, X_{-1}] order).
    """

    def __init__(self, input_size: int, hidden_size: int | None = None, save_prev_x: bool = False,
                 zoneout: float = 0, window: int = 1, output_gate: bool = True, use_cuda: bool = True,
                 bias: bool = True):
        super().__init__()
        hidden_size = input_size if hidden_size is None else hidden_size
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"input_size and hidden_size must be positive, got {input_size} and {hidden_size}")
        if int(window) != window or window < 1:
            raise ValueError(f"window must be a positive integer, got {window}")
        if not 0.0 <= zoneout < 1.0:
            raise ValueError(f"zoneout must be in [0, 1), got {zoneout}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.save_prev_x = save_prev_x
        self.zoneout = zoneout
        self.window = int(window)
        self.output_gate = output_gate
        self.use_cuda = use_cuda
        self.prev_x: torch.Tensor | None = None  # only for the stateful `forward` with save_prev_x
        gates = 3 if output_gate else 2
        # One matmul over the concatenated window is faster than W smaller ones.
        self.linear = nn.Linear(self.window * input_size, gates * hidden_size, bias=bias)

    def extra_repr(self) -> str:
        return (f"window={self.window}, zoneout={self.zoneout}, output_gate={self.output_gate}, "
                f"save_prev_x={self.save_prev_x}")

    def reset(self) -> None:
        """Forget the saved previous inputs (call before a sequence unrelated to the last one)."""
        self.prev_x = None

    def _window_inputs(self, x: torch.Tensor, prev_x: torch.Tensor | None, reverse: bool) -> torch.Tensor:
        """The linear's input: [T, B, D] -> [T, B, W * D].

        Forward: step t sees [x_t, x_{t-1}, ..., x_{t-W+1}], reaching into `prev_x` ([W - 1, B, D],
        zeros when None) before step 0. Reverse: step t sees [x_t, x_{t+1}, ..., x_{t+W-1}], with
        zeros after the last step: the forward window on the time-mirrored sequence.
        """
        if self.window == 1:
            return x
        steps, context = x.size(0), self.window - 1
        if reverse:
            padded = torch.cat([x, x.new_zeros(context, *x.shape[1:])])  # [T + W - 1, B, D]
            shifted = [padded[offset:offset + steps] for offset in range(self.window)]
        else:
            if prev_x is None:
                prev_x = x.new_zeros(context, *x.shape[1:])
            padded = torch.cat([prev_x, x])  # [W - 1 + T, B, D]
            shifted = [padded[context - offset:context - offset + steps] for offset in range(self.window)]
        return torch.cat(shifted, dim=2)  # W x [T, B, D] -> [T, B, W * D]

    def run(self, x: torch.Tensor, hidden: torch.Tensor | None = None, prev_x: torch.Tensor | None = None,
            lengths: torch.Tensor | Sequence[int] | None = None, reverse: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer as a pure function: nothing is read from or kept on the module.

        Args:
            x: [T, B, D].
            hidden: initial state [B, H] (or [1, B, H]); None means zeros.
            prev_x: [W - 1, B, D], the inputs before x[0] for the window; None means zeros.
                Must be None when `reverse` (the reverse window looks at later inputs).
            lengths: LongTensor [B] (or ints) of valid steps per sequence, padded at the end; None
                means all T. The state passes padded steps unchanged and their outputs are zero.
            reverse: run from each sequence's last valid step back to step 0.

        Returns:
            output [T, B, H]; final state [B, H] (at each sequence's last valid step, or at step 0
            when `reverse`); and the last W - 1 valid inputs [W - 1, B, D] (continuing `prev_x`
            when a sequence is shorter than W - 1), for the window of a following call.

        Raises:
            ValueError: on inputs of the wrong shape, or `prev_x` with `reverse`.
        """
        self.check_run_arguments(x, hidden, prev_x, reverse)
        if lengths is not None:
            lengths = _check_lengths(lengths, x.size(0), x.size(1), x.device)
        return self.run_checked(x, hidden, prev_x, lengths, reverse)

    def check_run_arguments(self, x: torch.Tensor, hidden: torch.Tensor | None, prev_x: torch.Tensor | None,
                            reverse: bool) -> None:
        """Raise ValueError naming a bad argument of `run` (shapes only: no device work)."""
        if x.dim() != 3 or x.size(2) != self.input_size or x.size(0) == 0:
            raise ValueError(f"QRNN layer input must be [T >= 1, B, {self.input_size}], got {tuple(x.shape)}")
        batch_size, context = x.size(1), self.window - 1
        if hidden is not None and tuple(hidden.shape) not in ((batch_size, self.hidden_size),
                                                              (1, batch_size, self.hidden_size)):
            raise ValueError(f"hidden must be [{batch_size}, {self.hidden_size}], got {tuple(hidden.shape)}")
        if prev_x is not None:
            if reverse:
                raise ValueError("prev_x precedes the sequence; the reverse direction cannot use it")
            if prev_x.shape != (context, batch_size, self.input_size):
                raise ValueError(f"prev_x must be [{context}, {batch_size}, {self.input_size}] (window - 1, B, D), "
                                 f"got {tuple(prev_x.shape)}; call reset() when the batch size changes")

    def uses_fused_pool(self, gates: torch.Tensor) -> bool:
        """Whether this call's pooling takes the fused Triton kernels (see the module docstring)."""
        return (self.use_cuda and gates.dtype in TRITON_DTYPES and triton_device(gates)
                and load_fused_pool() is not None)

    def run_checked(self, x: torch.Tensor, hidden: torch.Tensor | None, prev_x: torch.Tensor | None,
                    lengths: torch.Tensor | None, reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`run` after its checks: `lengths` is None or a checked LongTensor [B] on the device of `x`."""
        steps, batch_size, _ = x.shape
        if hidden is not None and hidden.dim() == 3:
            hidden = hidden[0]  # [1, B, H] -> [B, H], as the layer itself returns it
        valid = None
        if lengths is not None:
            valid = _valid_steps(lengths, steps, x.dtype)  # [T, B, 1]
            x = x * valid  # the reverse window must see zeros after each sequence's end

        # Paper eq. 1: all gates of all steps in one product over the window.
        gates = self.linear(self._window_inputs(x, prev_x, reverse))  # [T, B, G * H]
        forget_mask, forget_scale = None, 1.0
        if self.zoneout:
            if self.training:  # a Bernoulli(1 - zoneout) mask per element, not rescaled (the reference's rule)
                forget_mask = gates.new_empty(steps, batch_size, self.hidden_size).bernoulli_(1 - self.zoneout)
            else:
                forget_scale = 1 - self.zoneout  # the mask's expectation
        if hidden is not None:
            hidden = hidden.to(gates.dtype)  # e.g. a float32 state with float16 gates under autocast
        if self.uses_fused_pool(gates):
            output, last = load_fused_pool()(
                gates, None if hidden is None else hidden.contiguous(), lengths, forget_mask, forget_scale,
                reverse, self.output_gate,
            )
        else:
            output, last = pool_eager(gates, hidden, valid, forget_mask, forget_scale, reverse, self.output_gate)
        return output, last, self._next_prev_x(x, prev_x, lengths)

    def _next_prev_x(self, x: torch.Tensor, prev_x: torch.Tensor | None,
                     lengths: torch.Tensor | None) -> torch.Tensor:
        """The last W - 1 valid inputs [W - 1, B, D] (continuing `prev_x` for sequences shorter than W - 1).

        A copy, never a view of `x`: a state that keeps it must not keep the whole input alive.
        """
        steps, batch_size, _ = x.shape
        context = self.window - 1
        if context == 0:
            return x.new_empty(0, batch_size, self.input_size)
        if lengths is None and steps >= context:
            return x[steps - context:].clone()  # [W - 1, B, D]
        if prev_x is None:
            prev_x = x.new_zeros(context, batch_size, self.input_size)
        history = torch.cat([prev_x, x])  # [W - 1 + T, B, D]
        if lengths is None:
            return history[steps:]  # [W - 1, B, D]
        rows = lengths.unsqueeze(0) + torch.arange(context, device=x.device).unsqueeze(1)  # [W - 1, B]
        return history.gather(0, rows.unsqueeze(2).expand(context, batch_size, self.input_size))

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None = None,
                lengths: torch.Tensor | Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference call: `output, h_n = layer(x, hidden)`.

        Args:
            x: [T, B, D].
            hidden: [B, H] or [1, B, H]; None means zeros.
            lengths: optional LongTensor [B] of valid steps per sequence (see `run`).

        Returns:
            output [T, B, H] and h_n [1, B, H]. With `save_prev_x` (and W > 1) the last W - 1
            inputs are kept, detached, for the next call.
        """
        prev_x = self.prev_x if self.save_prev_x else None
        output, last, next_prev_x = self.run(x, hidden, prev_x, lengths)
        if self.save_prev_x and self.window > 1:
            # As the reference: no gradient flows into the previous call's inputs.
            self.prev_x = next_prev_x.detach()
        return output, last.unsqueeze(0)  # [B, H] -> [1, B, H]


class QRNN(nn.Module):
    """A stack of QRNN layers (salesforce/pytorch-qrnn's `QRNN`, same constructor and call).

    Args:
        input_size: D, features of the input.
        hidden_size: H; None means `input_size`.
        num_layers: L (ignored when `layers` is given).
        bias: whether the gate linears have biases.
        batch_first: input and output are [B, T, ...] instead of [T, B, ...] (not for packed input).
        dropout: dropout between layers (standard, a fresh mask per element), in training only.
        bidirectional: add a backward layer per layer, which runs ForgetMult in reverse with its
            own weights and a window over the current and later inputs; outputs are
            concatenated [forward, backward] on features, so layers above see 2 * H.
        layers: prebuilt `QRNNLayer`s, L * K of them in h_n order (layer-major, forward then
            backward), e.g. with a different window per layer; they must chain (each layer's
            input size is the width below it) and share one hidden size.
        **layer_kwargs: `QRNNLayer` options for the layers built here (save_prev_x, zoneout,
            window, output_gate, use_cuda).

    Raises:
        ValueError: on a bad size, dropout, `layers` that do not chain, or options given with `layers`.

    Layer l > 0 takes the previous layer's output width; the reference built every layer with
    `input_size` inputs, which only worked when input_size == hidden_size.
    """

    def __init__(self, input_size: int, hidden_size: int | None = None, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0, bidirectional: bool = False,
                 layers: Sequence[QRNNLayer] | None = None, **layer_kwargs):
        super().__init__()
        hidden_size = input_size if hidden_size is None else hidden_size
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        directions = 2 if bidirectional else 1
        if layers:
            layer_kwargs.pop("use_cuda", None)  # ignored everywhere (the tensors' device decides), as torchqrnn allows
            if layer_kwargs:
                raise ValueError(f"layer options {sorted(layer_kwargs)} apply only when QRNN builds its layers; "
                                 "set them on the given layers")
            if len(layers) % directions:
                raise ValueError(f"a bidirectional QRNN needs two layers per level, got {len(layers)} layers")
            num_layers = len(layers) // directions
            hidden_size = layers[0].hidden_size
        else:
            if num_layers < 1:
                raise ValueError(f"num_layers must be at least 1, got {num_layers}")
            layers = [
                QRNNLayer(input_size if index < directions else hidden_size * directions, hidden_size,
                          bias=bias, **layer_kwargs)
                for index in range(num_layers * directions)
            ]
        for index, layer in enumerate(layers):
            expected = input_size if index < directions else hidden_size * directions
            if layer.hidden_size != hidden_size or layer.input_size != expected:
                raise ValueError(
                    f"layer {index} maps {layer.input_size} -> {layer.hidden_size} features where "
                    f"{expected} -> {hidden_size} is needed (the layers must chain and share one hidden size)"
                )
        self.layers = nn.ModuleList(layers)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = dropout
        self.bidirectional = bidirectional
        self.directions = directions

    def reset(self) -> None:
        """Forget the saved previous inputs of every layer (see `QRNNLayer.save_prev_x`)."""
        for layer in self.layers:
            layer.reset()

    def forward_layers(self) -> list[QRNNLayer]:
        """The forward-direction layer of each level (the ones whose window reads `prev_x`)."""
        return [self.layers[level * self.directions] for level in range(self.num_layers)]

    def run(self, x: torch.Tensor, hidden: torch.Tensor | None = None,
            prev_x: Sequence[torch.Tensor | None] | None = None,
            lengths: torch.Tensor | Sequence[int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """The stack as a pure function, time-major.

        Args:
            x: [T, B, D].
            hidden: [L * K, B, H] initial states; None means zeros.
            prev_x: per layer [W_l - 1, B, D_l] (or None for zeros), the inputs before x[0].
            lengths: optional LongTensor [B] of valid steps per sequence (padding at the end).

        Returns:
            output [T, B, K * H]; h_n [L * K, B, H]; per layer its last W_l - 1 inputs
            [W_l - 1, B, D_l].
        """
        expected = (self.num_layers * self.directions, x.size(1), self.hidden_size)
        if hidden is not None and hidden.shape != expected:
            raise ValueError(f"hidden must be {list(expected)} (layers * directions, B, H), got {list(hidden.shape)}")
        if prev_x is not None and len(prev_x) != self.num_layers:
            raise ValueError(f"prev_x needs one entry per layer ({self.num_layers}), got {len(prev_x)}")
        if lengths is not None:
            lengths = _check_lengths(lengths, x.size(0), x.size(1), x.device)
        finals, next_prev_x = [], []
        for level in range(self.num_layers):
            first = level * self.directions
            forward_layer = self.layers[first]
            layer_hidden = None if hidden is None else hidden[first]
            layer_prev_x = None if prev_x is None else prev_x[level]
            forward_layer.check_run_arguments(x, layer_hidden, layer_prev_x, reverse=False)
            # lengths were checked once above (the check reads them on the host).
            output, last, layer_prev_x = forward_layer.run_checked(x, layer_hidden, layer_prev_x, lengths, False)
            finals.append(last)
            next_prev_x.append(layer_prev_x)
            if self.bidirectional:
                backward_layer = self.layers[first + 1]
                layer_hidden = None if hidden is None else hidden[first + 1]
                backward_layer.check_run_arguments(x, layer_hidden, None, reverse=True)
                backward_output, backward_last, _ = backward_layer.run_checked(x, layer_hidden, None, lengths, True)
                finals.append(backward_last)
                output = torch.cat([output, backward_output], dim=2)  # 2 x [T, B, H] -> [T, B, 2H]
            x = output
            if self.dropout and level < self.num_layers - 1:
                x = F.dropout(x, p=self.dropout, training=self.training)
        return x, torch.stack(finals), tuple(next_prev_x)  # h_n: L * K x [B, H] -> [L * K, B, H]

    def forward(self, input: torch.Tensor | PackedSequence, hidden: torch.Tensor | None = None,
                lengths: torch.Tensor | Sequence[int] | None = None
                ) -> tuple[torch.Tensor | PackedSequence, torch.Tensor]:
        """The reference call: `output, h_n = qrnn(input, hidden)`.

        Args:
            input: [T, B, D] ([B, T, D] with batch_first), or a `PackedSequence`.
            hidden: [L * K, B, H]; None means zeros.
            lengths: optional LongTensor [B] of valid steps per sequence (not with a PackedSequence,
                which carries its own).

        Returns:
            output [T, B, K * H] ([B, T, K * H] with batch_first; a `PackedSequence` laid out like
            the input for packed input) and h_n [L * K, B, H] (each sequence's state after its
            last valid step; the backward direction's after step 0), in the input's batch order.
        """
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("a PackedSequence carries its own lengths; do not pass lengths too")
            x, lengths = pad_packed_sequence(input)  # [T, B, D] in the original batch order, lengths [B]
        else:
            x = input.transpose(0, 1) if self.batch_first else input  # [B, T, D] -> [T, B, D]
        saved = [layer.prev_x if layer.save_prev_x else None for layer in self.forward_layers()]
        output, h_n, next_prev_x = self.run(x, hidden, saved, lengths)
        for layer, layer_prev_x in zip(self.forward_layers(), next_prev_x):
            if layer.save_prev_x and layer.window > 1:
                layer.prev_x = layer_prev_x.detach()
        if packed:
            order = input.sorted_indices
            if order is not None:
                output, lengths = output.index_select(1, order), lengths.index_select(0, order.cpu())
            data = pack_padded_sequence(output, lengths.cpu(), enforce_sorted=True).data
            output = PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        elif self.batch_first:
            output = output.transpose(0, 1)  # [T, B, K * H] -> [B, T, K * H]
        return output, h_n


@dataclasses.dataclass
class QRNNConfig:
    input_size: int
    hidden_size: int
    num_layers: int = 1
    dropout: float = 0.0  # between layers
    window: int = 1
    zoneout: float = 0.0
    output_gate: bool = True
    bidirectional: bool = False
    batch_first: bool = False
    save_prev_x: bool = True  # False: every call's window sees zeros before its first step

    def __post_init__(self) -> None:
        if self.input_size < 1 or self.hidden_size < 1:
            raise ValueError(f"input_size and hidden_size must be positive, got {self.input_size}, {self.hidden_size}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if not 0.0 <= self.zoneout < 1.0:
            raise ValueError(f"zoneout must be in [0, 1), got {self.zoneout}")


@register_core("QRNN")
class QRNNCore(Core):
    """The QRNN stack behind the core contract. State: `QRNNState(h [L * K, B, H], prev_x)`.

    The previous inputs travel in the state, not on the module, so two chunks with the state
    carried equal one run (with `save_prev_x=False` the window sees zeros before each call and
    the state's `prev_x` stays zero). Parameters are `qrnn.layers.{i}.linear.weight` / `.bias`.
    """

    Config = QRNNConfig

    def __init__(self, config: QRNNConfig):
        super().__init__(config)
        self.qrnn = QRNN(
            config.input_size, config.hidden_size, num_layers=config.num_layers, dropout=config.dropout,
            bidirectional=config.bidirectional, window=config.window, zoneout=config.zoneout,
            output_gate=config.output_gate,
        )

    @property
    def output_size(self) -> int:
        return self.config.hidden_size * self.qrnn.directions

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> QRNNState:
        weight = self.qrnn.layers[0].linear.weight
        device = weight.device if device is None else device
        config = self.config
        h = torch.zeros(config.num_layers * self.qrnn.directions, batch_size, config.hidden_size,
                        device=device, dtype=weight.dtype)
        prev_x = tuple(
            torch.zeros(layer.window - 1, batch_size, layer.input_size, device=device, dtype=weight.dtype)
            for layer in self.qrnn.forward_layers()
        )
        return QRNNState(h, prev_x)

    def forward(self, x: torch.Tensor, state: QRNNState | None = None,
                lengths: torch.Tensor | Sequence[int] | None = None) -> tuple[torch.Tensor, QRNNState]:
        """x [T, B, D] ([B, T, D] with batch_first) -> y [T, B, K * H] and the new state.

        `lengths` (LongTensor [B], optional) marks padded steps at the end of shorter sequences;
        the state then holds each sequence's values after its own last valid step.
        """
        if self.config.batch_first:
            x = x.transpose(0, 1)  # [B, T, D] -> [T, B, D]
        if state is None:
            state = self.initial_state(x.size(1), x.device)
        prev_x = state.prev_x if self.config.save_prev_x else None
        output, h, next_prev_x = self.qrnn.run(x, state.h, prev_x, lengths)
        if not self.config.save_prev_x:
            next_prev_x = tuple(torch.zeros_like(part) for part in next_prev_x)
        if self.config.batch_first:
            output = output.transpose(0, 1)  # [T, B, K * H] -> [B, T, K * H]
        return output, QRNNState(h, next_prev_x)

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("QRNN core")
        add_stack_args(group)
        add_argument_once(group, "--qrnn-window", "--qrnn_window", dest="qrnn_window", type=int, default=1,
                          help="QRNN: inputs each step's gates see (the current one and window - 1 before it)")
        add_argument_once(group, "--zoneout", type=float, default=0.0,
                          help="QRNN: probability of keeping a unit's previous state at a step (forget-gate zoneout)")
        add_argument_once(group, "--output-gate", "--output_gate", dest="output_gate",
                          action=argparse.BooleanOptionalAction, default=True,
                          help="QRNN: fo-pooling with an output gate (--no-output-gate: f-pooling)")
        add_argument_once(group, "--save-prev-x", "--save_prev_x", dest="save_prev_x",
                          action=argparse.BooleanOptionalAction, default=True,
                          help="QRNN: carry the last inputs to the next BPTT window's convolution")

    @classmethod
    def config_from_args(cls, args: argparse.Namespace, input_size: int) -> QRNNConfig:
        return QRNNConfig(
            input_size=input_size,
            hidden_size=args.nhid,
            num_layers=args.nlayers,
            dropout=stack_dropout(args),
            window=args.qrnn_window,
            zoneout=args.zoneout,
            output_gate=args.output_gate,
            save_prev_x=args.save_prev_x,
        )
