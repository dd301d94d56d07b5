"""The AWD-LSTM recurrent stack (Merity et al. 2017): separate single-layer RNNs with weight drop.

Layer sizes run `input_size -> hidden_size -> ... -> hidden_size -> output_size` (the last
layer outputs the embedding size when the decoder is tied). Each layer gets DropConnect
(`wdrop`, one mask per forward call, shared over time and batch) and locked dropout
(`dropouth`) sits between layers. The cell is an LSTM or a GRU, whose hidden-to-hidden
matrix is dropped, or a QRNN (AWD-LSTM's QRNN recipe: window 2 in the first layer, 1 in the
others, the previous input carried in the state, DropConnect on each layer's gate matrix).

Shapes: `T` time steps, `B` batch, `D` input size, `H_l` layer l's width.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from models.core import (Core, add_argument_once, add_stack_args, lstm_off_cpu_fp16, register_core,
                         stack_dropout)
from models.regularizers import locked_dropout, weight_dropped
from models.qrnn import QRNNLayer
from models.rnn import GRUState, LSTMState


class QRNNLayerState(NamedTuple):
    h: torch.Tensor  # [1, B, H]
    prev_x: torch.Tensor  # [W - 1, B, D], the inputs before the next call's first step


class _QRNNCall(nn.Module):
    """Runs a QRNNLayer as a pure function through `forward`, so `functional_call` can swap its weights."""

    def __init__(self, layer: QRNNLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, state: QRNNLayerState) -> tuple[torch.Tensor, QRNNLayerState]:
        output, h_last, prev_x = self.layer.run(x, state.h[0], state.prev_x)
        return output, QRNNLayerState(h_last.unsqueeze(0), prev_x)


def _build_layer(cell: str, index: int, inputs: int, outputs: int) -> nn.Module:
    if cell == "QRNN":
        return _QRNNCall(QRNNLayer(inputs, outputs, window=2 if index == 0 else 1, output_gate=True))
    return CELLS[cell][0](inputs, outputs)


# cell -> (module class, per-layer state, name of the parameter that gets DropConnect)
CELLS = {
    "LSTM": (nn.LSTM, LSTMState, "weight_hh_l0"),
    "GRU": (nn.GRU, GRUState, "weight_hh_l0"),
    "QRNN": (_QRNNCall, QRNNLayerState, "layer.linear.weight"),
}


@dataclasses.dataclass
class AWDConfig:
    input_size: int
    hidden_size: int
    output_size: int
    num_layers: int = 3
    cell: str = "LSTM"
    dropouth: float = 0.3  # locked dropout between layers
    wdrop: float = 0.5  # DropConnect on each layer's hidden-to-hidden weights

    def __post_init__(self) -> None:
        self.cell = self.cell.upper()
        if self.cell not in CELLS:
            raise ValueError(f"AWD cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if min(self.input_size, self.hidden_size, self.output_size) < 1:
            raise ValueError("input_size, hidden_size and output_size must be positive")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}")
        for name in ("dropouth", "wdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def layer_sizes(self) -> list[tuple[int, int]]:
        widths = [self.input_size] + [self.hidden_size] * (self.num_layers - 1) + [self.output_size]
        return list(zip(widths[:-1], widths[1:]))


@register_core("AWD")
class AWDStack(Core):
    """AWD-LSTM's stack of weight-dropped single-layer RNNs.

    State: a tuple with one `LSTMState(h [1, B, H_l], c [1, B, H_l])` (or `GRUState`) per layer.
    """

    Config = AWDConfig

    def __init__(self, config: AWDConfig):
        super().__init__(config)
        _, self.state_class, self.dropped_name = CELLS[config.cell]
        self.layers = nn.ModuleList([
            _build_layer(config.cell, index, inputs, outputs)
            for index, (inputs, outputs) in enumerate(config.layer_sizes())
        ])

    @property
    def output_size(self) -> int:
        return self.config.output_size

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> tuple:
        states = []
        for layer, (inputs, outputs) in zip(self.layers, self.config.layer_sizes()):
            weight = layer.get_parameter(self.dropped_name)
            options = dict(device=device or weight.device, dtype=weight.dtype)
            if self.config.cell == "QRNN":
                window = layer.layer.window
                states.append(QRNNLayerState(torch.zeros(1, batch_size, outputs, **options),
                                             torch.zeros(window - 1, batch_size, inputs, **options)))
            else:
                zeros = [torch.zeros(1, batch_size, outputs, **options) for _ in self.state_class._fields]
                states.append(self.state_class(*zeros))
        return tuple(states)

    def forward(self, x: torch.Tensor, state: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """x [T, B, D] -> output of the last layer [T, B, output_size] (before any output dropout)."""
        if state is None:
            state = self.initial_state(x.size(1), x.device)
        new_state = []
        for index, (layer, layer_state) in enumerate(zip(self.layers, state)):
            dropped = weight_dropped(layer.get_parameter(self.dropped_name), self.config.wdrop, self.training)
            if self.config.cell == "QRNN":
                x, layer_state = functional_call(layer, {self.dropped_name: dropped}, (x, layer_state))
            else:
                hidden = tuple(layer_state) if len(layer_state) > 1 else layer_state[0]
                def run(x: torch.Tensor, layer=layer, dropped=dropped, hidden=hidden) -> Any:
                    return functional_call(layer, {self.dropped_name: dropped}, (x, hidden))

                x, hidden = lstm_off_cpu_fp16(run, x) if self.config.cell == "LSTM" else run(x)
                layer_state = self.state_class(*hidden) if isinstance(hidden, tuple) else self.state_class(hidden)
            new_state.append(layer_state)
            if index < len(self.layers) - 1:
                x = locked_dropout(x, self.config.dropouth, self.training)
        return x, tuple(new_state)

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("AWD stack (weight-dropped LSTM/GRU layers)")
        add_stack_args(group)
        add_argument_once(group, "--wdrop", type=float, default=0.0,
                          help="DropConnect on each layer's hidden-to-hidden weights (LSTM/GRU) or gate weights (QRNN)")
        add_argument_once(group, "--awd-cell", "--awd_cell", dest="awd_cell", default="LSTM",
                          choices=sorted(CELLS), help="cell of the AWD stack")

    @classmethod
    def config_from_args(cls, args: argparse.Namespace, input_size: int) -> AWDConfig:
        # The last layer outputs the embedding size only for a tied decoder; a task script has no
        # embedding (and no --tied), so its stack ends at --nhid like the other cores.
        tied = getattr(args, "tied", False) and not getattr(args, "adaptivesoftmax", False)
        return AWDConfig(
            input_size=input_size,
            hidden_size=args.nhid,
            output_size=input_size if tied else args.nhid,
            num_layers=args.nlayers,
            cell=args.awd_cell,
            dropouth=stack_dropout(args),
            wdrop=args.wdrop,
        )
