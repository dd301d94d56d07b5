"""LSTM and GRU cores, each with two interchangeable implementations.

`implementation="fused"` runs `nn.LSTM` / `nn.GRU` (cuDNN on GPU, oneDNN on CPU);
`implementation="loop"` runs an explicit per-step cell over the same parameters (the
RMC benchmark's "fair" for-loop baseline). Both read the same `state_dict`, so a
checkpoint trained with one runs with the other.

Shapes: `T` time steps, `B` batch, `D` input size, `H` hidden size, `L` layers.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.core import (Core, add_argument_once, add_stack_args, compiled, lstm_off_cpu_fp16, register_core,
                         stack_dropout)

IMPLEMENTATIONS = ("fused", "loop")


class LSTMState(NamedTuple):
    h: torch.Tensor  # [L, B, H]
    c: torch.Tensor  # [L, B, H]


class GRUState(NamedTuple):
    h: torch.Tensor  # [L, B, H]


@dataclasses.dataclass
class RNNConfig:
    input_size: int
    hidden_size: int
    num_layers: int = 1
    dropout: float = 0.0  # between layers, as nn.LSTM's `dropout`
    implementation: str = "fused"
    batch_first: bool = False

    def __post_init__(self) -> None:
        if self.input_size < 1 or self.hidden_size < 1:
            raise ValueError(f"input_size and hidden_size must be positive, got {self.input_size}, {self.hidden_size}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")


def lstm_step(input_gates: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh: torch.Tensor,
              b_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step from its precomputed input gates [B, 4H] (PyTorch's gate order i, f, g, o) -> (h, c)."""
    gates = input_gates + F.linear(h, w_hh, b_hh)
    in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, dim=1)
    c = torch.sigmoid(forget_gate) * c + torch.sigmoid(in_gate) * torch.tanh(cell_gate)
    return torch.sigmoid(out_gate) * torch.tanh(c), c


def lstm_layer_loop(
    x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, weights: list[torch.Tensor], step_fn: Callable = lstm_step
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer, one step at a time.

    Args:
        x: [T, B, D]; h, c: [B, H]; weights: w_ih [4H, D], w_hh [4H, H], b_ih [4H], b_hh [4H].
        step_fn: `lstm_step`, or the same compiled.

    Returns:
        outputs [T, B, H], final h [B, H], final c [B, H].
    """
    w_ih, w_hh, b_ih, b_hh = weights
    input_gates = F.linear(x, w_ih, b_ih)  # all steps at once: [T, B, 4H]
    outputs = []
    for step in range(x.size(0)):
        h, c = step_fn(input_gates[step], h, c, w_hh, b_hh)
        outputs.append(h)
    return torch.stack(outputs), h, c


def gru_step(input_gates: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
    """One GRU step from its precomputed input gates [B, 3H] (gate order r, z, n; reset after W_hn) -> h."""
    input_reset, input_update, input_new = input_gates.chunk(3, dim=1)
    hidden_reset, hidden_update, hidden_new = F.linear(h, w_hh, b_hh).chunk(3, dim=1)
    reset = torch.sigmoid(input_reset + hidden_reset)
    update = torch.sigmoid(input_update + hidden_update)
    new = torch.tanh(input_new + reset * hidden_new)
    return (1 - update) * new + update * h


def gru_layer_loop(x: torch.Tensor, h: torch.Tensor, weights: list[torch.Tensor],
                   step_fn: Callable = gru_step) -> tuple[torch.Tensor, torch.Tensor]:
    """One GRU layer, one step at a time.

    Args:
        x: [T, B, D]; h: [B, H]; weights: w_ih [3H, D], w_hh [3H, H], b_ih [3H], b_hh [3H].
        step_fn: `gru_step`, or the same compiled.

    Returns:
        outputs [T, B, H], final h [B, H].
    """
    w_ih, w_hh, b_ih, b_hh = weights
    input_gates = F.linear(x, w_ih, b_ih)  # [T, B, 3H]
    outputs = []
    for step in range(x.size(0)):
        h = step_fn(input_gates[step], h, w_hh, b_hh)
        outputs.append(h)
    return torch.stack(outputs), h


class _StackedRNN(Core):
    """Shared body of the LSTM and GRU cores: parameters live in an `nn.LSTM`/`nn.GRU`."""

    Config = RNNConfig
    fused_class: type[nn.RNNBase]

    def __init__(self, config: RNNConfig):
        super().__init__(config)
        self.rnn = self.fused_class(
            config.input_size, config.hidden_size, num_layers=config.num_layers, dropout=config.dropout
        )
        self.compile_step = False  # the loop's step through torch.compile (`compile_steps`)

    def compile_steps(self) -> bool:
        """The `--rnn-impl loop` step through `torch.compile` (the fused kernel has no steps)."""
        self.compile_step = self.config.implementation == "loop"
        return self.compile_step

    @property
    def output_size(self) -> int:
        return self.config.hidden_size

    def _zeros(self, batch_size: int, device: torch.device | str | None) -> torch.Tensor:
        device = self.rnn.weight_hh_l0.device if device is None else device
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        return torch.zeros(shape, device=device, dtype=self.rnn.weight_hh_l0.dtype)

    def _layer_weights(self, layer: int) -> list[torch.Tensor]:
        return [getattr(self.rnn, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def _between_layers(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        if layer < self.config.num_layers - 1 and self.config.dropout > 0:
            return F.dropout(x, self.config.dropout, self.training)
        return x

    def forward(self, x: torch.Tensor, state=None):
        if self.config.batch_first:
            x = x.transpose(0, 1)  # [B, T, D] -> [T, B, D]
        if state is None:
            state = self.initial_state(x.size(1), x.device)
        if self.config.implementation == "fused":
            output, state = self._forward_fused(x, state)
        else:
            output, state = self._forward_loop(x, state)
        if self.config.batch_first:
            output = output.transpose(0, 1)  # [T, B, H] -> [B, T, H]
        return output, state

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("LSTM / GRU core")
        add_stack_args(group)
        add_argument_once(
            group, "--rnn-impl", "--rnn_impl", dest="rnn_impl", choices=IMPLEMENTATIONS, default="fused",
            help="fused: nn.LSTM/nn.GRU (cuDNN on GPU); loop: explicit per-step cell, same weights",
        )
        # The seed project's train_rnn.py: --cudnn picks nn.LSTM over its default per-step cell loop.
        add_argument_once(group, "--cudnn", dest="rnn_impl", action="store_const", const="fused",
                          help="the fused implementation (the same as --rnn-impl fused, the default here)")

    @classmethod
    def config_from_args(cls, args: argparse.Namespace, input_size: int) -> RNNConfig:
        return RNNConfig(
            input_size=input_size,
            hidden_size=args.nhid,
            num_layers=args.nlayers,
            dropout=stack_dropout(args),
            implementation=args.rnn_impl,
        )


@register_core("LSTM")
class LSTM(_StackedRNN):
    """Stacked LSTM core. State: `LSTMState(h [L, B, H], c [L, B, H])`."""

    fused_class = nn.LSTM

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> LSTMState:
        return LSTMState(self._zeros(batch_size, device), self._zeros(batch_size, device))

    def _forward_fused(self, x: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        output, (h, c) = lstm_off_cpu_fp16(lambda x: self.rnn(x, (state.h.contiguous(), state.c.contiguous())), x)
        return output, LSTMState(h, c)

    def _forward_loop(self, x: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        final_h, final_c = [], []
        for layer in range(self.config.num_layers):
            x, h, c = lstm_layer_loop(x, state.h[layer], state.c[layer], self._layer_weights(layer),
                                      compiled(self, "lstm_step", lstm_step))
            final_h.append(h)
            final_c.append(c)
            x = self._between_layers(x, layer)
        return x, LSTMState(torch.stack(final_h), torch.stack(final_c))


@register_core("GRU")
class GRU(_StackedRNN):
    """Stacked GRU core. State: `GRUState(h [L, B, H])`."""

    fused_class = nn.GRU

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> GRUState:
        return GRUState(self._zeros(batch_size, device))

    def _forward_fused(self, x: torch.Tensor, state: GRUState) -> tuple[torch.Tensor, GRUState]:
        output, h = self.rnn(x, state.h.contiguous())
        return output, GRUState(h)

    def _forward_loop(self, x: torch.Tensor, state: GRUState) -> tuple[torch.Tensor, GRUState]:
        final_h = []
        for layer in range(self.config.num_layers):
            x, h = gru_layer_loop(x, state.h[layer], self._layer_weights(layer), compiled(self, "gru_step", gru_step))
            final_h.append(h)
            x = self._between_layers(x, layer)
        return x, GRUState(torch.stack(final_h))
