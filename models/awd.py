"""The AWD-LSTM recurrent stack (Merity et al. 2017): separate single-layer RNNs with weight drop.

Layer sizes run `input_size -> hidden_size -> ... -> hidden_size -> output_size` (the last
layer outputs the embedding size when the decoder is tied). Each layer's hidden-to-hidden
matrix gets DropConnect (`wdrop`, one mask per forward call, shared over time and batch),
and locked dropout (`dropouth`) sits between layers. The cell is an LSTM or a GRU.

Shapes: `T` time steps, `B` batch, `D` input size, `H_l` layer l's width.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch import nn
from torch.func import functional_call

from models.core import Core, add_argument_once, register_core
from models.regularizers import locked_dropout, weight_dropped
from models.rnn import GRUState, LSTMState

CELLS = {"LSTM": (nn.LSTM, LSTMState), "GRU": (nn.GRU, GRUState)}


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
        rnn_class, self.state_class = CELLS[config.cell]
        self.layers = nn.ModuleList([rnn_class(inputs, outputs) for inputs, outputs in config.layer_sizes()])

    @property
    def output_size(self) -> int:
        return self.config.output_size

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> tuple:
        states = []
        for layer in self.layers:
            weight = layer.weight_hh_l0
            zeros = [torch.zeros(1, batch_size, layer.hidden_size, device=device or weight.device, dtype=weight.dtype)
                     for _ in self.state_class._fields]
            states.append(self.state_class(*zeros))
        return tuple(states)

    def forward(self, x: torch.Tensor, state: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """x [T, B, D] -> output of the last layer [T, B, output_size] (before any output dropout)."""
        if state is None:
            state = self.initial_state(x.size(1), x.device)
        new_state = []
        for index, (layer, layer_state) in enumerate(zip(self.layers, state)):
            dropped = weight_dropped(layer.weight_hh_l0, self.config.wdrop, self.training)
            hidden = tuple(layer_state) if len(layer_state) > 1 else layer_state[0]
            x, hidden = functional_call(layer, {"weight_hh_l0": dropped}, (x, hidden))
            new_state.append(self.state_class(*hidden) if isinstance(hidden, tuple) else self.state_class(hidden))
            if index < len(self.layers) - 1:
                x = locked_dropout(x, self.config.dropouth, self.training)
        return x, tuple(new_state)

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("AWD stack (weight-dropped LSTM/GRU layers)")
        add_argument_once(group, "--nhid", type=int, default=1150, help="hidden units per layer")
        add_argument_once(group, "--nlayers", type=int, default=3, help="number of layers")
        add_argument_once(group, "--dropouth", type=float, default=0.3, help="dropout between recurrent layers")
        add_argument_once(group, "--wdrop", type=float, default=0.0,
                          help="DropConnect on the hidden-to-hidden weights of each layer")
        add_argument_once(group, "--awd-cell", "--awd_cell", dest="awd_cell", default="LSTM",
                          choices=sorted(CELLS), help="cell of the AWD stack")

    @classmethod
    def config_from_args(cls, args: argparse.Namespace, input_size: int) -> AWDConfig:
        tied = getattr(args, "tied", True) and not getattr(args, "adaptivesoftmax", False)
        return AWDConfig(
            input_size=input_size,
            hidden_size=args.nhid,
            output_size=input_size if tied else args.nhid,
            num_layers=args.nlayers,
            cell=args.awd_cell,
            dropouth=args.dropouth if args.dropouth is not None else 0.0,
            wdrop=args.wdrop,
        )
