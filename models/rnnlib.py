"""Recurrent networks built from cells, after facebookresearch/torch-rnnlib.

A cell is a pair (`Cell`): a step module mapping one time step `(x_t [B, D], state) ->
(y_t [B, H], state)`, and a function giving the initial state for a batch size. Everything
built from cells follows the core contract of `models/core.py` (`forward(x [T, B, D],
state) -> (y [T, B, H], state)`, `initial_state`, `output_size`), so a built network is a core:

- `unroll(cell, x, state)` runs a cell over time;
- `Recurrent(cell, input_size, output_size)`: one cell over time as a module (torch-rnnlib's
  RecurrentTable); `compile_cell=True` runs its step through `torch.compile`;
- `Chain(layers)`: recurrent modules layer over layer, each over the whole sequence with its
  own state (torch-rnnlib's SequenceTable, a scan over layers); any core can be a layer;
- `make_recurrent(cell_fn, input_size, hids)`: a `Chain` of one cell per width in `hids`;
- `RNN`, `LSTM`, `GRU`: stacks of equal widths.

The shipped cells (`elman_cell` with Elman's sigmoid, tanh or ReLU; `lstm_cell`; `gru_cell`)
hold one layer's weights as `nn.RNN` / `nn.LSTM` / `nn.GRU` do (`weight_ih`, `weight_hh`,
`bias_ih`, `bias_hh`, PyTorch's gate order and initialisation). So a `Chain` runs consecutive
layers of one such cell through the kernel those modules call (`torch.lstm`, `torch.gru`,
`torch.rnn_tanh`, `torch.rnn_relu`; cuDNN on GPU), passing it the cells' own parameters: one
call for a run of equal widths, one per layer otherwise. `fused=False` unrolls the same
parameters step by step; the state dict is the same either way. Elman's sigmoid cell has no
fused kernel and is always unrolled, like any cell of your own.

`RNNLibCore` (`--model RNNLIB`) is a `make_recurrent` stack of a shipped cell chosen by name.

Shapes: `T` time steps, `B` batch, `D` a layer's input size, `H` its width (hidden size),
`L` layers in one fused call.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.core import (Core, State, add_argument_once, add_stack_args, lstm_off_cpu_fp16, map_state,
                         register_core)
from models.rnn import IMPLEMENTATIONS

WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # one layer of nn.LSTM & co., in their order


class Cell(NamedTuple):
    """A recurrent cell: how to take one step, and the state to start from.

    `step(x_t [B, D], state) -> (y_t [B, H], new state)` is an `nn.Module`, so its parameters
    belong to the network. `initial_state(batch_size) -> state` may build its tensors on the CPU
    in the default dtype (`torch.zeros(batch_size, H)`): they are moved to the input's device
    and floating-point dtype.
    """

    step: nn.Module
    initial_state: Callable[[int], State]


class LSTMCellState(NamedTuple):
    h: torch.Tensor  # [B, H]
    c: torch.Tensor  # [B, H]


def _check_width(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_sequence(x: torch.Tensor, input_size: int | None) -> None:
    if x.dim() != 3 or x.size(0) == 0 or (input_size is not None and x.size(2) != input_size):
        features = input_size if input_size is not None else "D"
        raise ValueError(f"expected an input sequence [T >= 1, B, {features}], got shape {tuple(x.shape)}")


def _move_state(state: State, device: torch.device | str | None, dtype: torch.dtype | None) -> State:
    """`state` on `device`, its floating-point tensors in `dtype` (None keeps either)."""
    return map_state(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None), state)


class StandardStep(nn.Module):
    """A step whose weights are one layer of `nn.RNN` / `nn.LSTM` / `nn.GRU`.

    Parameters: `weight_ih` [G * H, D], `weight_hh` [G * H, H], `bias_ih` and `bias_hh` [G * H],
    with G gate blocks, all drawn from U(-1/sqrt(H), 1/sqrt(H)) as PyTorch does. `kernel` is the
    fused function that runs layers of this step over a sequence (None: there is none).
    """

    gates: int

    def __init__(self, input_size: int, hidden_size: int, kernel: Callable | None):
        super().__init__()
        _check_width("input_size", input_size)
        _check_width("hidden_size", hidden_size)
        self.input_size, self.hidden_size, self.kernel = input_size, hidden_size, kernel
        self.weight_ih = nn.Parameter(torch.empty(self.gates * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(self.gates * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(self.gates * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(self.gates * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.hidden_size ** -0.5
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def _zeros(self, batch_size: int) -> torch.Tensor:
        return self.weight_hh.new_zeros(batch_size, self.hidden_size)

    def initial_state(self, batch_size: int) -> State:
        """Zeros [B, H] on the weights' device and dtype."""
        return self._zeros(batch_size)

    def _gates(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and hidden contributions to the gates: each [B, G * H]."""
        return F.linear(x, self.weight_ih, self.bias_ih), F.linear(h, self.weight_hh, self.bias_hh)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


NONLINEARITIES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable | None]] = {
    "sigmoid": (torch.sigmoid, None),  # Elman (1990); nn.RNN has no sigmoid
    "tanh": (torch.tanh, torch.rnn_tanh),
    "relu": (torch.relu, torch.rnn_relu),
}


class ElmanStep(StandardStep):
    """`h_t = f(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)`, output `h_t`. State: h [B, H]."""

    gates = 1

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "sigmoid"):
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, got {nonlinearity!r}")
        activation, kernel = NONLINEARITIES[nonlinearity]
        super().__init__(input_size, hidden_size, kernel)
        self.nonlinearity, self.activation = nonlinearity, activation

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        input_part, hidden_part = self._gates(x, h)
        h = self.activation(input_part + hidden_part)
        return h, h

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nonlinearity={self.nonlinearity}"


class LSTMStep(StandardStep):
    """An LSTM step in PyTorch's gate order (input, forget, cell, output). State: `LSTMCellState(h, c)`."""

    gates = 4

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size, torch.lstm)

    def initial_state(self, batch_size: int) -> LSTMCellState:
        return LSTMCellState(self._zeros(batch_size), self._zeros(batch_size))

    def forward(self, x: torch.Tensor, state: LSTMCellState) -> tuple[torch.Tensor, LSTMCellState]:
        input_part, hidden_part = self._gates(x, state.h)
        in_gate, forget_gate, cell_gate, out_gate = (input_part + hidden_part).chunk(4, dim=1)  # 4 x [B, H]
        c = torch.sigmoid(forget_gate) * state.c + torch.sigmoid(in_gate) * torch.tanh(cell_gate)
        h = torch.sigmoid(out_gate) * torch.tanh(c)
        return h, LSTMCellState(h, c)


class GRUStep(StandardStep):
    """A GRU step in PyTorch's gate order (reset, update, new; reset applied after W_hn, as in
    Cho et al. 2014 and torch-rnnlib). State: h [B, H]."""

    gates = 3

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size, torch.gru)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        input_part, hidden_part = self._gates(x, h)
        input_reset, input_update, input_new = input_part.chunk(3, dim=1)  # 3 x [B, H]
        hidden_reset, hidden_update, hidden_new = hidden_part.chunk(3, dim=1)
        reset = torch.sigmoid(input_reset + hidden_reset)
        update = torch.sigmoid(input_update + hidden_update)
        new = torch.tanh(input_new + reset * hidden_new)
        h = (1 - update) * new + update * h
        return h, h


def elman_cell(input_size: int, hidden_size: int, nonlinearity: str = "sigmoid") -> Cell:
    """An Elman cell (sigmoid by default, as Elman's; "tanh" and "relu" run fused)."""
    step = ElmanStep(input_size, hidden_size, nonlinearity)
    return Cell(step, step.initial_state)


def lstm_cell(input_size: int, hidden_size: int) -> Cell:
    step = LSTMStep(input_size, hidden_size)
    return Cell(step, step.initial_state)


def gru_cell(input_size: int, hidden_size: int) -> Cell:
    step = GRUStep(input_size, hidden_size)
    return Cell(step, step.initial_state)


# The shipped cells by name (`--cell`): (input_size, hidden_size) -> Cell.
CELLS: dict[str, Callable[[int, int], Cell]] = {
    "elman-sigmoid": functools.partial(elman_cell, nonlinearity="sigmoid"),
    "elman-tanh": functools.partial(elman_cell, nonlinearity="tanh"),
    "elman-relu": functools.partial(elman_cell, nonlinearity="relu"),
    "lstm": lstm_cell,
    "gru": gru_cell,
}


def unroll(cell: Cell, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
    """Run a cell over a sequence, one step at a time.

    Args:
        cell: a `Cell` (or any `(step, initial_state)` pair).
        x: [T, B, D], T >= 1.
        state: the cell's state; None starts from `cell.initial_state(B)` on x's device and dtype.

    Returns:
        outputs [T, B, H] and the state after the last step.

    Raises:
        ValueError: x is not a non-empty [T, B, D] sequence.
    """
    step, initial_state = cell
    _check_sequence(x, None)
    if state is None:
        state = _move_state(initial_state(x.size(1)), x.device, x.dtype)
    outputs = []
    for x_t in x.unbind(0):  # [T, B, D] -> T x [B, D]
        y_t, state = step(x_t, state)
        outputs.append(y_t)
    return torch.stack(outputs), state  # T x [B, H] -> [T, B, H]


class Recurrent(nn.Module):
    """One cell run over time: a recurrent layer with the core contract (torch-rnnlib's RecurrentTable).

    Args:
        cell: a `Cell` (or a `(step, initial_state)` pair); `step` must be an `nn.Module`.
        input_size: D, features of each input step.
        output_size: H, features of each output step.
        compile_cell: compile the step in place (`nn.Module.compile`, i.e. `torch.compile`) the
            first time the layer runs: one graph serves every time step. Parameters and the
            state dict are unchanged.

    Raises:
        ValueError: a size is not a positive integer. TypeError: the step is not an `nn.Module`.
    """

    def __init__(self, cell: Cell, input_size: int, output_size: int, compile_cell: bool = False):
        super().__init__()
        step, initial_state = cell
        if not isinstance(step, nn.Module) or not callable(initial_state):
            raise TypeError(f"a cell is (step: nn.Module, initial_state: callable), got ({type(step).__name__}, "
                            f"{type(initial_state).__name__})")
        _check_width("input_size", input_size)
        _check_width("output_size", output_size)
        self.step = step
        self.make_state = initial_state
        self.input_size, self.output_size, self.compile_cell = input_size, output_size, compile_cell

    def initial_state(self, batch_size: int, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> State:
        """The cell's initial state, on `device` in `dtype` (default: those of the step's parameters)."""
        weight = next(self.step.parameters(), None)
        if weight is not None:
            device = weight.device if device is None else device
            dtype = weight.dtype if dtype is None else dtype
        return _move_state(self.make_state(batch_size), device, dtype)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x [T, B, D] -> y [T, B, H]; state None starts from `initial_state` on x's device and dtype."""
        _check_sequence(x, self.input_size)
        if state is None:
            state = self.initial_state(x.size(1), x.device, x.dtype)
        # Compiled here rather than at construction: a copy (copy.deepcopy, pickling) drops compilation.
        if self.compile_cell and self.step._compiled_call_impl is None:
            self.step.compile()
        return unroll(Cell(self.step, self.make_state), x, state)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.output_size}" + (", compile_cell=True" if self.compile_cell else "")


# Fused kernel -> the module that owns such weights (used to lay them out for cuDNN).
FUSED_MODULES: dict[Callable, tuple[type[nn.RNNBase], dict]] = {
    torch.lstm: (nn.LSTM, {}),
    torch.gru: (nn.GRU, {}),
    torch.rnn_tanh: (nn.RNN, {"nonlinearity": "tanh"}),
    torch.rnn_relu: (nn.RNN, {"nonlinearity": "relu"}),
}


def _run_fused(steps: list[StandardStep], x: torch.Tensor, states: list[State], dropout: float,
               training: bool) -> tuple[torch.Tensor, list[State]]:
    """Layers of one standard step through its fused kernel, on the steps' own parameters.

    Args:
        steps: L steps with the same kernel; each after the first reads and writes the first's width H.
        x: [T, B, D].
        states: one state per layer (h [B, H], or `LSTMCellState`).
        dropout: between the L layers, in training only (as `nn.LSTM`'s).

    Returns:
        outputs of the last layer [T, B, H] and the L new states.
    """
    weights = [getattr(step, name) for step in steps for name in WEIGHT_NAMES]
    # has_biases, num_layers, dropout, train, bidirectional, batch_first: the arguments nn.LSTM passes
    options = (True, len(steps), dropout, training, False, False)
    kernel = steps[0].kernel
    if kernel is torch.lstm:
        hx = (torch.stack([state.h for state in states]), torch.stack([state.c for state in states]))  # 2 x [L, B, H]
        output, h, c = lstm_off_cpu_fp16(lambda x: kernel(x, hx, weights, *options), x)
        return output, [LSTMCellState(h_l, c_l) for h_l, c_l in zip(h.unbind(0), c.unbind(0))]
    output, h = kernel(x, torch.stack(list(states)), weights, *options)  # L x [B, H] -> [L, B, H]
    return output, list(h.unbind(0))


class Chain(nn.Module):
    """Recurrent modules layer over layer (torch-rnnlib's SequenceTable: a scan over layers).

    Layer l reads layer l-1's whole output sequence and carries its own state; the state of the
    chain is a tuple with one entry per layer. A layer is any module with the core contract:
    a `Recurrent`, another `Chain`, a registered core.

    With `fused=True`, consecutive `Recurrent` layers of one shipped cell with a fused kernel
    (LSTM, GRU, tanh or ReLU Elman) run as one kernel call on their own parameters as long as
    each layer after the first reads and writes the first's width; see `execution_plan`.

    Args:
        layers: the modules, first to last.
        dropout: dropout on the sequences between layers, in training only (as `nn.LSTM`'s).
        fused: run shipped cells through their fused kernel; False unrolls every layer.

    Raises:
        ValueError: no layers, dropout outside [0, 1), or a layer whose `input_size` is not the
            previous layer's `output_size` (where the layers have those attributes).
    """

    def __init__(self, layers: Sequence[nn.Module], dropout: float = 0.0, fused: bool = True):
        super().__init__()
        if len(layers) == 0:
            raise ValueError("a Chain needs at least one layer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        for index in range(1, len(layers)):
            inputs = getattr(layers[index], "input_size", None)
            outputs = getattr(layers[index - 1], "output_size", None)
            if inputs is not None and outputs is not None and inputs != outputs:
                raise ValueError(f"layer {index} reads {inputs} features but layer {index - 1} outputs {outputs}")
        self.layers = nn.ModuleList(layers)
        self.dropout, self.fused = dropout, fused

    @property
    def input_size(self) -> int | None:
        return getattr(self.layers[0], "input_size", None)

    @property
    def output_size(self) -> int:
        return self.layers[-1].output_size

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> tuple:
        return tuple(layer.initial_state(batch_size, device) for layer in self.layers)

    def execution_plan(self, fused: bool | None = None) -> list[tuple[int, int, bool]]:
        """How `forward` runs the layers: `(start, stop, fused)` for each group of layers.

        A fused group is layers `start .. stop - 1` in one kernel call; an unfused one is a single
        layer called on its own. `fused` defaults to `self.fused`.
        """
        fused = self.fused if fused is None else fused
        plan: list[tuple[int, int, bool]] = []
        for index, layer in enumerate(self.layers):
            step = layer.step if isinstance(layer, Recurrent) else None
            fusable = fused and isinstance(step, StandardStep) and step.kernel is not None
            if fusable and plan and plan[-1][2]:
                previous = self.layers[index - 1].step
                if step.kernel is previous.kernel and step.input_size == step.hidden_size == previous.hidden_size:
                    plan[-1] = (plan[-1][0], index + 1, True)
                    continue
            plan.append((index, index + 1, fusable))
        return plan

    def forward(self, x: torch.Tensor, state: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """x [T, B, D] -> the last layer's output [T, B, H_last]; the state has one entry per layer."""
        _check_sequence(x, self.input_size)
        states = list(state) if state is not None else [None] * len(self.layers)
        if len(states) != len(self.layers):
            raise ValueError(f"a Chain's state has one entry per layer ({len(self.layers)}), got {len(states)}")
        for start, stop, fused in self.execution_plan():
            if start > 0 and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
            if not fused:
                x, states[start] = self.layers[start](x, states[start])
                continue
            layers = self.layers[start:stop]
            group_states = [layer.initial_state(x.size(1), x.device, x.dtype) if layer_state is None else layer_state
                            for layer, layer_state in zip(layers, states[start:stop])]
            x, states[start:stop] = _run_fused([layer.step for layer in layers], x, group_states,
                                               self.dropout, self.training)
        return x, tuple(states)

    def flatten_parameters(self) -> None:
        """On CUDA, lay each fused group's weights out in one buffer, as cuDNN reads them (in place).

        cuDNN then reads the cells' parameters where they are instead of packing a copy at every
        call. This is `nn.RNNBase.flatten_parameters` applied to the cells' parameters; moving the
        chain (`.to`, `.cuda`, `.double`) calls it, and on the CPU it does nothing.
        """
        for start, stop, fused in self.execution_plan(fused=True):
            steps = [layer.step for layer in self.layers[start:stop]]
            if not fused or not steps[0].weight_hh.is_cuda:
                continue
            module_class, options = FUSED_MODULES[steps[0].kernel]
            # A stand-in without storage of its own (meta device), given the cells' parameters.
            stand_in = module_class(steps[0].input_size, steps[0].hidden_size, num_layers=len(steps),
                                    device="meta", **options)
            for layer, step in enumerate(steps):
                for name in WEIGHT_NAMES:
                    setattr(stand_in, f"{name}_l{layer}", getattr(step, name))
            stand_in.flatten_parameters()

    def _apply(self, fn, recurse: bool = True):
        module = super()._apply(fn, recurse)
        self.flatten_parameters()
        return module

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, fused={self.fused}"


def _layers(cell_fn: Callable[[int, int], Cell], input_size: int, hids: Sequence[int],
            compile_cell: bool) -> list[Recurrent]:
    _check_width("input_size", input_size)
    if isinstance(hids, (int, str)) or len(hids) == 0:
        raise ValueError(f"hids must be a non-empty list of layer widths, got {hids!r}")
    for width in hids:
        _check_width(f"every width in hids {list(hids)}", width)
    widths = [input_size, *hids]
    return [Recurrent(cell_fn(inputs, outputs), inputs, outputs, compile_cell=compile_cell)
            for inputs, outputs in zip(widths[:-1], widths[1:])]


def make_recurrent(cell_fn: Callable[[int, int], Cell], input_size: int, hids: Sequence[int], dropout: float = 0.0,
                   fused: bool = True, compile_cell: bool = False) -> Chain:
    """Stack one cell per width in `hids`; the chain creates and carries every layer's state.

    Args:
        cell_fn: `(input_size, hidden_size) -> Cell`: a shipped one (`lstm_cell`, `CELLS[name]`)
            or your own.
        input_size: D, features of each input step.
        hids: the layers' widths, first to last: layer l reads `hids[l - 1]` features (D for the
            first) and outputs `hids[l]`.
        dropout, fused: as in `Chain`.
        compile_cell: as in `Recurrent`, for every layer that is unrolled.

    Returns:
        a `Chain` of `Recurrent` layers: x [T, B, D] -> y [T, B, hids[-1]], with a state tuple
        of one cell state per layer.

    Raises:
        ValueError: `hids` empty or a width not a positive integer, or a bad `dropout`.
    """
    return Chain(_layers(cell_fn, input_size, hids, compile_cell), dropout=dropout, fused=fused)


class RNN(Chain):
    """`num_layers` Elman layers of width `hidden_size` (nonlinearity "tanh", "relu" or "sigmoid").

    Tanh and ReLU run fused as `nn.RNN`; the state is one h [B, H] per layer.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 dropout: float = 0.0, fused: bool = True, compile_cell: bool = False):
        _check_width("num_layers", num_layers)
        cell_fn = functools.partial(elman_cell, nonlinearity=nonlinearity)
        super().__init__(_layers(cell_fn, input_size, [hidden_size] * num_layers, compile_cell), dropout, fused)


class LSTM(Chain):
    """`num_layers` LSTM layers of width `hidden_size`, fused as `nn.LSTM`; one `LSTMCellState` per layer."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 fused: bool = True, compile_cell: bool = False):
        _check_width("num_layers", num_layers)
        super().__init__(_layers(lstm_cell, input_size, [hidden_size] * num_layers, compile_cell), dropout, fused)


class GRU(Chain):
    """`num_layers` GRU layers of width `hidden_size`, fused as `nn.GRU`; one h [B, H] per layer."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 fused: bool = True, compile_cell: bool = False):
        _check_width("num_layers", num_layers)
        super().__init__(_layers(gru_cell, input_size, [hidden_size] * num_layers, compile_cell), dropout, fused)


@dataclasses.dataclass
class RNNLibConfig:
    input_size: int
    hids: list[int]  # the layers' widths, first to last
    cell: str = "lstm"  # a name in CELLS
    dropout: float = 0.0  # between layers
    implementation: str = "fused"  # "loop" unrolls the shipped cells too
    compile_cell: bool = False  # torch.compile the step of every unrolled layer

    def __post_init__(self) -> None:
        self.cell = self.cell.lower()
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        _check_width("input_size", self.input_size)
        if isinstance(self.hids, (int, str)) or len(self.hids) == 0:
            raise ValueError(f"hids must be a non-empty list of layer widths, got {self.hids!r}")
        self.hids = list(self.hids)
        for width in self.hids:
            _check_width(f"every width in hids {self.hids}", width)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")


@register_core("RNNLIB")
class RNNLibCore(Core):
    """A `make_recurrent` stack of a shipped cell. State: a tuple of one cell state per layer."""

    Config = RNNLibConfig

    def __init__(self, config: RNNLibConfig):
        super().__init__(config)
        self.stack = make_recurrent(CELLS[config.cell], config.input_size, config.hids, dropout=config.dropout,
                                    fused=config.implementation == "fused", compile_cell=config.compile_cell)

    @property
    def output_size(self) -> int:
        return self.config.hids[-1]

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> tuple:
        return self.stack.initial_state(batch_size, device)

    def forward(self, x: torch.Tensor, state: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        return self.stack(x, state)

    def compile_steps(self) -> bool:
        """`compile_cell` for every layer the stack unrolls (those run by a fused kernel have no steps)."""
        unrolled = [self.stack.layers[start] for start, _, fused in self.stack.execution_plan() if not fused]
        for layer in unrolled:
            layer.compile_cell = True
        return bool(unrolled)

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("RNNLIB core (a stack built from cells, models/rnnlib.py)")
        add_stack_args(group)
        add_argument_once(group, "--cell", type=str.lower, choices=sorted(CELLS), default="lstm",
                          help="RNNLIB: the cell of every layer")
        add_argument_once(group, "--hids", type=int, nargs="+", default=None,
                          help="RNNLIB: the layers' widths, first to last (default: --nlayers times --nhid)")
        add_argument_once(group, "--rnn-impl", "--rnn_impl", dest="rnn_impl", choices=IMPLEMENTATIONS,
                          default="fused", help="fused: nn.LSTM/nn.GRU/nn.RNN kernels (cuDNN on GPU); "
                          "loop: explicit per-step cell, same weights")
        add_argument_once(group, "--compile-cell", "--compile_cell", dest="compile_cell",
                          action=argparse.BooleanOptionalAction, default=False,
                          help="RNNLIB: torch.compile the step of every layer that is unrolled")

    @classmethod
    def config_from_args(cls, args: argparse.Namespace, input_size: int) -> RNNLibConfig:
        hids = args.hids if args.hids else [args.nhid] * args.nlayers
        between = args.dropouth if args.dropouth is not None else getattr(args, "dropout", 0.0)
        return RNNLibConfig(
            input_size=input_size,
            hids=hids,
            cell=args.cell,
            dropout=between if len(hids) > 1 else 0.0,
            implementation=args.rnn_impl,
            compile_cell=args.compile_cell,
        )
