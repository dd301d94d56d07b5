"""The DNC, SAM and SDNC controller: the published API and the registered cores.

One recurrent controller drives any of the three memories (`DenseMemory`, `SparseMemory`,
`SparseTemporalMemory`; the memories own the linear maps from the controller output to their
interface vectors). Per time step t and layer l = 0 .. L-1:

    u^0_t      = x_t                                    the input
    u^l_t      = [xi^{l-1}_t ; r^{l-1}_t]               l > 0: the previous layer's output
    o^l_t, h^l = RNN^l([u^l_t ; r^l_{t-1}], h^l)        num_hidden_layers stacked LSTM / GRU / RNN layers
    xi^l_t     = clamp(o^l_t, -clip, clip)              the memory's input (clip = 0: no clamp)
    r^l_t      = memory.step(xi^l_t)                    read vectors, [B, R * W]
    y_t        = W_out [xi^{L-1}_t ; r^{L-1}_t] + b     the published output layer, -> input_size

Unlike the published library (ixaxaar/pytorch-dnc), the read vectors of step t-1 are part of
the controller's input at step t (it fed the initial read vectors at every step), absent
states start from zeros (it drew a random controller state), and the output follows
`batch_first` (it was inverted). With `share_memory` (the default) all layers use one memory
module and one memory state: at each step layer 0 reads and writes it and layer 1 sees the
result, as the published library did by passing one memory hidden state through its layers;
with `share_memory=False` each layer has its own memory module and state. Dropout acts
between the RNN layers of a controller (`nn.LSTM`'s `dropout`, as published) and on a layer's
output before the next layer.

Masks: a PackedSequence input, or `mask` [T, B] (True = a real step), keeps padded steps
from changing the memory, the controller state and the read vectors; the output there is 0.
So a padded batch ends in the same state as running each sequence at its own length.

Memory saved for backward: the dense memory's state holds an N x N link matrix per batch
element, so keeping every step's link matrix for backward grows as T * N^2. With gradients
enabled and N >= 256 (`CHECKPOINT_MIN_CELLS`) the DNC therefore keeps one link matrix every
ceil(sqrt(T)) steps on a `LinkTape` (`models.dnc.memory`) and replays the others from the last
kept one when backward needs them: a replay is the link update alone (elementwise, no temporal
reads), and the backward writes each step's link gradient over the one it received. Everything
else a step saves is O(N (W + R)) and kept as usual. Outputs and gradients are those of keeping
every matrix; at 1,024 cells, 20 steps and batch 8 this grows the process by about 260 MiB
instead of about 360 MiB for the earlier default (`checkpoint_steps=5`: segments under
`torch.utils.checkpoint`) and is a little faster (bench/RESULTS.md). Smaller DNCs, SAM and SDNC
(which touch O(K) rows per step) keep everything by default; `checkpoint_steps=k` runs segments
of k steps under `torch.utils.checkpoint` instead (non-reentrant, RNG state preserved: each
segment but the last is recomputed during backward, which also drops the other saved tensors; at
1,024 cells it was slower and larger than the tape up to T = 100), and 0 turns both off.

State of the cores: `DNCState(controller, memory, read_vectors)`, tensors only:
- controller: a list with one entry per layer, `(h, c)` for LSTM or `h` for GRU / RNN, each
  [num_hidden_layers, B, H];
- memory: the memory's state dict (shared memory), or a list of dicts, one per layer;
- read_vectors: [L, B, R * W], each layer's latest read vectors ([B, R * W] is accepted for L = 1).
The published classes (`DNC`, `SAM`, `SDNC`) show it to their users as pytorch-dnc 1.1.0 did, the
`(controller_hidden, memory_hidden, read_vectors)` tuple with 1.1.0's memory keys and shapes and the
last layer's read vectors [B, R * W] (`published.py`), and take that form back.

Shapes: `T` time steps, `B` batch, `D` input size, `H` controller hidden size, `L` layers,
`R` read heads, `W` cell size, `N` memory cells, `O` output size (D unless set).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint

from models.core import Core, add_argument_once, add_stack_args, register_core, stack_dropout
from models.dnc import published
from models.dnc.memory import DenseMemory
from models.dnc.sparse_memory import SparseMemory
from models.dnc.sparse_temporal_memory import SparseTemporalMemory

RNN_TYPES = ("lstm", "gru", "rnn")
CHECKPOINT_MIN_CELLS = 256  # from this many cells a DNC keeps its links on a tape (256 KiB a matrix per element)
NONLINEARITIES = ("tanh", "relu")
NN_INDEXES = ("exact", "faiss")

MemoryState = dict[str, torch.Tensor]


class DNCState(NamedTuple):
    """The published `(controller_hidden, memory_hidden, read_vectors)` (see the module docstring)."""

    controller: list
    memory: MemoryState | list[MemoryState]
    read_vectors: torch.Tensor  # [L, B, R * W]


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass
class DNCConfig:
    """A DNC core. The defaults are the published copy task's (`-mem_slot 16 -mem_size 20 -read_heads 4`).

    `output_size` None means `input_size` (the published output layer maps back to the input
    width). `checkpoint_steps`: None = automatic (the link tape from 256 cells, see the module docstring), 0 = keep
    everything, k = segments of k steps under `torch.utils.checkpoint`.
    """

    input_size: int
    hidden_size: int
    rnn_type: str = "lstm"
    num_layers: int = 1
    num_hidden_layers: int = 2
    bias: bool = True
    dropout: float = 0.0
    nr_cells: int = 16
    read_heads: int = 4
    cell_size: int = 20
    nonlinearity: str = "tanh"
    independent_linears: bool = False
    share_memory: bool = True
    clip: float = 20.0
    output_size: int | None = None
    checkpoint_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("input_size", "hidden_size", "num_layers", "num_hidden_layers", "nr_cells", "read_heads",
                     "cell_size"):
            _positive_int(name, getattr(self, name))
        if self.output_size is not None:
            _positive_int("output_size", self.output_size)
        self.rnn_type = str(self.rnn_type).lower()
        if self.rnn_type not in RNN_TYPES:
            raise ValueError(f"rnn_type must be one of {', '.join(RNN_TYPES)}, got {self.rnn_type!r}")
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu' (used by rnn_type='rnn'), "
                             f"got {self.nonlinearity!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (isinstance(self.clip, (int, float)) and self.clip >= 0):
            raise ValueError(f"clip must be a number >= 0 (0 turns clamping off), got {self.clip!r}")
        if self.checkpoint_steps is not None and (isinstance(self.checkpoint_steps, bool)
                                                  or not isinstance(self.checkpoint_steps, int)
                                                  or self.checkpoint_steps < 0):
            raise ValueError(f"checkpoint_steps must be None (automatic), 0 (off) or a positive number of steps, "
                             f"got {self.checkpoint_steps!r}")


@dataclasses.dataclass
class SAMConfig(DNCConfig):
    """A SAM core: `sparse_reads` (K) rows per read head; `nn_index` 'exact' (PyTorch) or 'faiss'.

    With 'faiss', `index_lists` None is an exhaustive flat index (the exact rows); a number of lists makes
    it an approximate IVF index that scans `index_probes` of them per query (None: 8), the sublinear search
    for large memories full of data (`models.dnc.search`).
    """

    sparse_reads: int = 10
    nn_index: str = "exact"
    index_lists: int | None = None
    index_probes: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("sparse_reads", self.sparse_reads)
        if self.nn_index not in NN_INDEXES:
            raise ValueError(f"nn_index must be one of {', '.join(NN_INDEXES)}, got {self.nn_index!r}")
        for name in ("index_lists", "index_probes"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.index_lists is not None and self.nn_index != "faiss":
            raise ValueError(f"index_lists={self.index_lists} is an option of the FAISS index; pass "
                             f"nn_index='faiss' (--nn-index faiss) with it, or leave it None for the exact search")
        if self.index_probes is not None and self.index_lists is None:
            raise ValueError(f"index_probes={self.index_probes} is the number of IVF lists scanned per query; "
                             f"pass nn_index='faiss' and index_lists (--nn-index faiss --index-lists N) with it, "
                             f"or leave it None")


@dataclasses.dataclass
class SDNCConfig(SAMConfig):
    """An SDNC core: SAM plus `temporal_reads` forward and backward temporal reads."""

    temporal_reads: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("temporal_reads", self.temporal_reads)


def _keep_rows(keep: torch.Tensor, new: Any, old: Any) -> Any:
    """`new` where `keep` [B] is True, else `old`, for a recurrent layer's state ([B, H] or an (h, c) pair)."""
    if isinstance(new, tuple):
        return tuple(_keep_rows(keep, n, o) for n, o in zip(new, old))
    return torch.where(keep.unsqueeze(-1), new, old)


def _unstack(stacked: torch.Tensor) -> list[torch.Tensor]:
    """[K, B, H] -> K separate [B, H] tensors (copies, each at the start of its own allocation)."""
    return [part.clone() for part in stacked.unbind(0)]


def _begin(module: nn.Module, state: MemoryState, snapshots_every: int, checkpointed: bool) -> Any:
    """`module.begin(state)` with what the run asks of it: a `LinkTape` (the DNC's automatic setting), or, in a
    checkpointed segment, a sparse memory's own search index (`_steps`)."""
    if checkpointed and isinstance(module, SparseMemory):
        return module.begin(state, keep_index=False)
    if snapshots_every:
        return module.begin(state, link_snapshots_every=snapshots_every)
    return module.begin(state)


def _cell_function(config: DNCConfig) -> Any:
    """The one-step function of the controller's recurrent layers (the cells nn.LSTM / GRU / RNN run)."""
    if config.rnn_type == "rnn":
        return torch.rnn_relu_cell if config.nonlinearity == "relu" else torch.rnn_tanh_cell
    return torch.lstm_cell if config.rnn_type == "lstm" else torch.gru_cell


class MemoryController(Core):
    """The controller of the module docstring behind the core contract (time-major).

    `y, state = core(x, state, mask=None)`: x [T, B, D] -> y [T, B, O]. `run` gives the published
    options (reset_experience, pass_through_memory, debug) and `debug_forward` the debug dict.
    Subclasses set `memory_class` and, through `memory_options`, the memory's own arguments.
    """

    Config: ClassVar[type] = DNCConfig
    memory_class: ClassVar[type[nn.Module]]
    checkpoint_min_cells: ClassVar[int | None] = None  # the link tape by default from this many cells

    def __init__(self, config: DNCConfig):
        super().__init__(config)
        self.read_size = config.read_heads * config.cell_size
        layer_output_size = config.hidden_size + self.read_size  # [xi ; r]
        rnn_class = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[config.rnn_type]
        rnn_options = {"nonlinearity": config.nonlinearity} if config.rnn_type == "rnn" else {}
        between_rnn_layers = config.dropout if config.num_hidden_layers > 1 else 0.0  # nn.LSTM warns otherwise
        self.controllers = nn.ModuleList(
            rnn_class((config.input_size if layer == 0 else layer_output_size) + self.read_size, config.hidden_size,
                      num_layers=config.num_hidden_layers, bias=config.bias, dropout=between_rnn_layers,
                      **rnn_options)
            for layer in range(config.num_layers)
        )
        self.memories = nn.ModuleList(
            self.memory_class(config.hidden_size, config.nr_cells, config.cell_size, config.read_heads,
                              independent_linears=config.independent_linears, **self.memory_options())
            for _ in range(1 if config.share_memory else config.num_layers)
        )
        if self.memories[0].read_size != self.read_size:
            raise ValueError(f"{type(self.memories[0]).__name__}.read_size is {self.memories[0].read_size}, "
                             f"expected read_heads * cell_size = {self.read_size}")
        self.output = nn.Linear(layer_output_size, self.output_size)
        nn.init.orthogonal_(self.output.weight)  # as published

    def memory_options(self) -> dict[str, Any]:
        """The memory class's arguments beyond the shared ones."""
        return {}

    @property
    def output_size(self) -> int:
        return self.config.output_size or self.config.input_size

    def extra_repr(self) -> str:
        config = self.config
        return (f"rnn_type={config.rnn_type!r}, layers={config.num_layers}x{config.num_hidden_layers}, "
                f"nr_cells={config.nr_cells}, cell_size={config.cell_size}, read_heads={config.read_heads}, "
                f"share_memory={config.share_memory}")

    # ----------------------------------------------------------------------------------------------
    # State.

    def _dtype(self) -> torch.dtype:
        return self.output.weight.dtype

    def initial_controller(self, batch_size: int, device: torch.device | str | None = None) -> list:
        config = self.config
        device = self.output.weight.device if device is None else device

        def zeros() -> torch.Tensor:
            return torch.zeros(config.num_hidden_layers, batch_size, config.hidden_size, device=device,
                               dtype=self._dtype())

        return [(zeros(), zeros()) if config.rnn_type == "lstm" else zeros() for _ in range(config.num_layers)]

    def initial_memory(self, batch_size: int, device: torch.device | str | None = None) -> list[MemoryState]:
        """One memory state per memory module (one in all when shared)."""
        device = self.output.weight.device if device is None else device
        return [memory.initial_state(batch_size, device=device, dtype=self._dtype()) for memory in self.memories]

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> DNCState:
        device = self.output.weight.device if device is None else device
        memory = self.initial_memory(batch_size, device)
        reads = torch.zeros(self.config.num_layers, batch_size, self.read_size, device=device, dtype=self._dtype())
        return DNCState(self.initial_controller(batch_size, device), self._public_memory(memory), reads)

    def _public_memory(self, memory: list[MemoryState]) -> MemoryState | list[MemoryState]:
        return memory[0] if self.config.share_memory else memory

    def _complete_state(self, state: Any, batch_size: int, device: torch.device,
                        reset_experience: bool) -> tuple[list, list[MemoryState] | None, list[torch.Tensor]]:
        """Fill the absent parts of a (controller, memory, read_vectors) state; check the given ones.

        A fresh memory comes back as None: `_steps` makes it, so that a checkpointed first segment
        does not keep the initial memory (an N x N link matrix per element for the DNC) for backward.
        """
        config = self.config
        if state is None:
            state = (None, None, None)
        if not isinstance(state, (tuple, list)) or len(state) != 3:
            raise ValueError("the hidden state must be (controller_hidden, memory_hidden, read_vectors), "
                             "any part None for a fresh one")
        controller, memory, reads = state
        if controller is None:
            controller = self.initial_controller(batch_size, device)
        else:
            if len(controller) != config.num_layers:
                raise ValueError(f"controller_hidden has {len(controller)} layers, the model has {config.num_layers}")
            if config.rnn_type == "lstm":
                controller = [(h.contiguous(), c.contiguous()) for h, c in controller]
            else:
                controller = [h.contiguous() for h in controller]
        if memory is None or reset_experience:
            memories = None
        else:
            memories = [memory] if config.share_memory else list(memory)
            if len(memories) != len(self.memories) or not all(isinstance(part, dict) for part in memories):
                expected = "a dict" if config.share_memory else f"a list of {len(self.memories)} dicts"
                raise ValueError(f"memory_hidden must be {expected} (share_memory={config.share_memory})")
            for part in memories:
                for key, tensor in part.items():
                    if tensor.size(0) != batch_size:
                        raise ValueError(f"memory_hidden[{key!r}] is for batch size {tensor.size(0)}, "
                                         f"the input has {batch_size}; pass None or reset_experience=True")
        if reads is None:
            reads = torch.zeros(config.num_layers, batch_size, self.read_size, device=device, dtype=self._dtype())
        elif reads.dim() == 2 and config.num_layers == 1:
            reads = reads.unsqueeze(0)  # the published [B, R * W]
        if tuple(reads.shape) != (config.num_layers, batch_size, self.read_size):
            raise ValueError(f"read_vectors must be [{config.num_layers}, {batch_size}, {self.read_size}] "
                             f"(layers, batch, read_heads * cell_size), got {list(reads.shape)}")
        return list(controller), memories, list(reads.unbind(0))

    # ----------------------------------------------------------------------------------------------
    # Forward.

    def compile_steps(self) -> bool:
        """Each memory's step through `torch.compile`: the DNC's whole dense step; SAM's and SDNC's tensor
        arithmetic between their row stores and searches (see `models.dnc.sparse_memory`)."""
        compiled = [memory for memory in self.memories if hasattr(memory, "compile_step")]
        for memory in compiled:
            memory.compile_step = True
        return bool(compiled)

    def forward(self, x: torch.Tensor, state: DNCState | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, DNCState]:
        """x [T, B, D], mask [T, B] bool or None -> y [T, B, O], DNCState."""
        output, state, _ = self.run(x, state, mask=mask)
        return output, state

    def debug_forward(self, x: torch.Tensor, state: DNCState | None = None,
                      mask: torch.Tensor | None = None) -> tuple[torch.Tensor, DNCState, dict[str, np.ndarray]]:
        """`forward` plus the published debug dict (see `run`)."""
        return self.run(x, state, mask=mask, debug=True)

    def run(
        self,
        x: torch.Tensor,
        state: Any = None,
        *,
        mask: torch.Tensor | None = None,
        reset_experience: bool = False,
        pass_through_memory: bool = True,
        debug: bool = False,
    ) -> tuple[torch.Tensor, DNCState, dict[str, np.ndarray] | None]:
        """Run the controller and memory over a sequence.

        Args:
            x: [T, B, D].
            state: a DNCState or (controller, memory, read_vectors) with any part None (zeros), or None.
            mask: [T, B] bool, False at padded steps (their state does not change, their output is 0).
            reset_experience: start from the memory's initial state whatever `state` holds (the
                controller state and read vectors are kept, as published).
            pass_through_memory: False skips the memory: it is neither read nor written, the read
                vectors stay those of `state` (zeros by default) and the memory state is returned as given.
            debug: also return, for batch element 0, a dict of numpy arrays with one row per
                (time step, layer) (row t * L + l), each the flattened `memory.debug_view` after that
                step (keys: the memory's, e.g. memory, link_matrix, read_weights ...); empty without
                the memory. Debug runs do not checkpoint.

        Returns:
            y [T, B, O], the new DNCState, and the debug dict (None unless `debug`).
        """
        config = self.config
        if x.dim() != 3 or x.size(-1) != config.input_size:
            raise ValueError(f"input must be [T, B, {config.input_size}] (time-major here), got {list(x.shape)}")
        steps, batch_size = x.shape[:2]
        if steps == 0 or batch_size == 0:
            raise ValueError(f"input has no steps or no batch: {list(x.shape)}")
        controller, memory, reads = self._complete_state(state, batch_size, x.device, reset_experience)
        full_steps: list[bool] | None = None
        if mask is not None:
            if tuple(mask.shape) != (steps, batch_size):
                raise ValueError(f"mask must be [T, B] = [{steps}, {batch_size}], got {list(mask.shape)}")
            mask = mask.to(device=x.device, dtype=torch.bool)
            full_steps = mask.all(dim=1).tolist()  # one host sync, not one per step
        segment, use_checkpoint, snapshots_every = self._segment_length(steps, pass_through_memory, debug)
        debug_rows: list[dict[str, torch.Tensor]] | None = [] if debug else None
        pieces = []
        for start in range(0, steps, segment):
            stop = min(start + segment, steps)
            checkpointed = use_checkpoint and stop < steps
            arguments = (x[start:stop], None if mask is None else mask[start:stop],
                         None if full_steps is None else full_steps[start:stop],
                         controller, memory, reads, pass_through_memory, debug_rows, snapshots_every, checkpointed)
            if checkpointed:
                features, controller, memory, reads = checkpoint(self._steps, *arguments, use_reentrant=False)
            else:
                features, controller, memory, reads = self._steps(*arguments)
            pieces.append(features)
        output = self.output(torch.cat(pieces) if len(pieces) > 1 else pieces[0])  # [T, B, H + R*W] -> [T, B, O]
        if mask is not None:
            output = output.masked_fill(~mask.unsqueeze(-1), 0.0)
        if memory is None:  # pass_through_memory=False from a fresh memory
            memory = self.initial_memory(batch_size, x.device)
        state = DNCState(controller, self._public_memory(memory), torch.stack(reads))
        return output, state, (self._debug_arrays(debug_rows) if debug_rows is not None else None)

    def _segment_length(self, steps: int, pass_through_memory: bool, debug: bool) -> tuple[int, bool, int]:
        """(steps per segment, whether to checkpoint the segments, link matrices kept every this many steps or 0).

        Automatic (`checkpoint_steps=None`) from `checkpoint_min_cells`: one segment, the link matrices on a
        `LinkTape`, one kept every ceil(sqrt(T)) steps (see the module docstring)."""
        per_segment = self.config.checkpoint_steps
        saving = torch.is_grad_enabled() and pass_through_memory and not debug
        if per_segment is None:
            large = self.checkpoint_min_cells is not None and self.config.nr_cells >= self.checkpoint_min_cells
            return steps, False, math.ceil(math.sqrt(steps)) if large and saving and steps > 1 else 0
        if per_segment == 0 or per_segment >= steps or not saving:
            return steps, False, 0
        return per_segment, True, 0

    def _steps(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        full_steps: list[bool] | None,
        controller: list,
        memory: list[MemoryState] | None,
        reads: list[torch.Tensor],
        pass_through_memory: bool,
        debug_rows: list[dict[str, torch.Tensor]] | None,
        snapshots_every: int = 0,
        checkpointed: bool = False,
    ) -> tuple[torch.Tensor, list, list[MemoryState] | None, list[torch.Tensor]]:
        """The steps of one segment: x [S, B, D] -> features [S, B, H + R*W] and the states after them.

        `memory` None is the initial memory. Without `pass_through_memory` the memory is returned as given.
        `snapshots_every` > 0: the dense memories keep their link matrices on a `LinkTape` (`DenseMemory.begin`).
        A `checkpointed` segment runs again in backward and must find the same rows there: the sparse
        memories build its FAISS index afresh both times rather than take the one kept between calls.
        """
        config = self.config
        lstm = config.rnn_type == "lstm"
        # Per layer, per recurrent layer inside it: [B, H] tensors ((h, c) pairs for LSTM). Copies, not views
        # into the stacked state: a view's address shifts the CPU kernels' rounding (by ~1e-9), and the sparse
        # memories' top-K turns such differences into different rows, so a run split into calls would differ.
        hidden = [list(zip(*(_unstack(part) for part in layer_state))) if lstm else _unstack(layer_state)
                  for layer_state in controller]
        reads = list(reads)
        contexts = []
        if pass_through_memory:
            memory = self.initial_memory(x.size(1), x.device) if memory is None else memory
            contexts = [_begin(module, part, snapshots_every, checkpointed)
                        for module, part in zip(self.memories, memory)]
        features = []
        for step in range(x.size(0)):
            keep = None if full_steps is None or full_steps[step] else mask[step]  # [B] or None
            layer_input = x[step]
            for layer in range(config.num_layers):
                xi, new_hidden = self._controller_step(layer, torch.cat([layer_input, reads[layer]], dim=-1),
                                                       hidden[layer])
                if config.clip:
                    xi = xi.clamp(-config.clip, config.clip)
                index = 0 if config.share_memory else layer
                if pass_through_memory:
                    new_reads = self.memories[index].step(contexts[index], xi, keep)  # [B, R * W]
                else:
                    new_reads = reads[layer]
                if keep is not None:
                    new_hidden = [_keep_rows(keep, new, old) for new, old in zip(new_hidden, hidden[layer])]
                    new_reads = torch.where(keep.unsqueeze(-1), new_reads, reads[layer])
                hidden[layer], reads[layer] = new_hidden, new_reads
                layer_input = torch.cat([xi, new_reads], dim=-1)  # [B, H + R * W]
                if debug_rows is not None:
                    debug_rows.append(self.memories[index].debug_view(contexts[index]) if pass_through_memory else {})
                if config.dropout and layer < config.num_layers - 1:
                    layer_input = F.dropout(layer_input, config.dropout, self.training)
            features.append(layer_input)
        if pass_through_memory:
            memory = [module.end(context) for module, context in zip(self.memories, contexts)]
        # [B, H] per recurrent layer -> [num_hidden_layers, B, H]
        controller = [tuple(torch.stack(part) for part in zip(*layer_hidden)) if lstm else torch.stack(layer_hidden)
                      for layer_hidden in hidden]
        return torch.stack(features), controller, memory, reads

    def _controller_step(self, layer: int, rnn_input: torch.Tensor, hidden: list) -> tuple[torch.Tensor, list]:
        """One step of layer `layer`'s recurrent stack, with the weights of its `nn.LSTM`/`nn.GRU`/`nn.RNN`.

        A step of one time step runs the cell functions directly (torch.lstm_cell ...), which is
        faster than the fused module on sequences of length 1; dropout acts between the recurrent
        layers as the module's `dropout` does. rnn_input [B, F] -> (output [B, H], new hidden).
        """
        rnn = self.controllers[layer]
        cell = _cell_function(self.config)
        new_hidden = []
        for depth, weights in enumerate(rnn.all_weights):
            state = cell(rnn_input, hidden[depth], *weights)
            new_hidden.append(state)
            rnn_input = state[0] if isinstance(state, tuple) else state
            if rnn.dropout and self.training and depth < len(hidden) - 1:
                rnn_input = F.dropout(rnn_input, rnn.dropout, True)
        return rnn_input, new_hidden

    @staticmethod
    def _debug_arrays(rows: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
        """Rows of per-step views -> {key: [rows, features]} numpy arrays."""
        if not rows or not rows[0]:
            return {}
        return {key: np.stack([row[key].detach().reshape(-1).cpu().numpy() for row in rows]) for key in rows[0]}

    # ----------------------------------------------------------------------------------------------
    # Command line.

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """The published task scripts' flags (single dash, double dash accepted) and this repository's."""
        group = parser.add_argument_group("DNC / SAM / SDNC cores")
        add_stack_args(group)  # --nhid: the controller's hidden size
        add_argument_once(group, "-nhid", dest="nhid", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        add_argument_once(group, "-rnn_type", "--rnn_type", "--rnn-type", dest="rnn_type", type=str.lower,
                          choices=RNN_TYPES, default="lstm", help="DNC/SAM/SDNC: the controller's recurrent layers")
        add_argument_once(group, "-nlayer", "--nlayer", dest="nlayer", type=int, default=1,
                          help="DNC/SAM/SDNC: controller layers, each with its own memory access (the other cores' "
                               "depth is --nlayers)")
        add_argument_once(group, "-nhlayer", "--nhlayer", dest="nhlayer", type=int, default=2,
                          help="DNC/SAM/SDNC: recurrent layers inside each controller layer")
        add_argument_once(group, "-mem_slot", "--mem_slot", "--mem-slot", dest="mem_slot", type=int, default=16,
                          help="DNC/SAM/SDNC: number of memory cells (nr_cells; the RMC's slots are --memslots)")
        add_argument_once(group, "-mem_size", "--mem_size", "--mem-size", dest="mem_size", type=int, default=20,
                          help="DNC/SAM/SDNC: size of each memory cell (cell_size)")
        add_argument_once(group, "-read_heads", "--read_heads", "--read-heads", dest="read_heads", type=int,
                          default=4, help="DNC/SAM/SDNC: number of read heads")
        add_argument_once(group, "-sparse_reads", "--sparse_reads", "--sparse-reads", dest="sparse_reads", type=int,
                          default=10, help="SAM/SDNC: rows read per read head (K)")
        add_argument_once(group, "-temporal_reads", "--temporal_reads", "--temporal-reads", dest="temporal_reads",
                          type=int, default=2, help="SDNC: forward and backward temporal reads")
        add_argument_once(group, "--independent-linears", "--independent_linears", dest="independent_linears",
                          action=argparse.BooleanOptionalAction, default=False,
                          help="DNC: one linear layer per interface component instead of one split")
        add_argument_once(group, "--nn-index", "--nn_index", dest="nn_index", choices=NN_INDEXES, default="exact",
                          help="SAM/SDNC: nearest-neighbour search, exact (PyTorch) or faiss (needs faiss-cpu)")
        add_argument_once(group, "--index-lists", "--index_lists", dest="index_lists", type=int, default=None,
                          help="SAM/SDNC with --nn-index faiss: an approximate IVF index of this many lists, kept "
                               "from call to call (sublinear steps over a large memory full of data; about "
                               "sqrt(-mem_slot)); none: an exhaustive flat index")
        add_argument_once(group, "--index-probes", "--index_probes", dest="index_probes", type=int, default=None,
                          help="SAM/SDNC with --index-lists: lists scanned per query (none: 8)")
        add_argument_once(group, "--controller-clip", "--controller_clip", dest="controller_clip", type=float,
                          default=20.0, help="DNC: clamp the controller output to [-clip, clip] (0: off)")

    # The flags that must be positive integers, as the user types them (the config's errors name its fields).
    POSITIVE_FLAGS = {"nhid": "--nhid", "nlayer": "-nlayer", "nhlayer": "-nhlayer", "mem_slot": "-mem_slot",
                      "mem_size": "-mem_size", "read_heads": "-read_heads"}

    @classmethod
    def config_from_args(cls, args: argparse.Namespace, input_size: int) -> DNCConfig:
        for name, flag in cls.POSITIVE_FLAGS.items():
            value = getattr(args, name)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value}")
        # Dropout acts between the nlayer * nhlayer recurrent layers of the controller.
        depth = argparse.Namespace(**{**vars(args), "nlayers": args.nlayer * args.nhlayer})
        return cls.Config(
            input_size=input_size,
            hidden_size=args.nhid,
            rnn_type=args.rnn_type,
            num_layers=args.nlayer,
            num_hidden_layers=args.nhlayer,
            dropout=stack_dropout(depth),
            nr_cells=args.mem_slot,
            read_heads=args.read_heads,
            cell_size=args.mem_size,
            independent_linears=args.independent_linears,
            clip=args.controller_clip,
            **cls.config_extras_from_args(args),
        )

    @classmethod
    def config_extras_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {}


@register_core("DNC")
class DNCCore(MemoryController):
    """The DNC (Graves et al. 2016): dense memory, link matrices on a `LinkTape` from 256 cells."""

    Config = DNCConfig
    memory_class = DenseMemory
    checkpoint_min_cells = CHECKPOINT_MIN_CELLS
    # The compiled dense step: 0.64x the eager time at 16 cells on one CPU thread, 0.97x at 1,024 (bench_dnc.py,
    # bench_compiled_steps.py), for a one-off compilation of 10-30 s.
    compiles_on_cpu = True


@register_core("SAM")
class SAMCore(MemoryController):
    """SAM (Rae et al. 2016): sparse reads and writes."""

    # The compiled pieces are on by default with CUDA, as for every per-step core (fewer, fused kernel launches
    # per step; the GPU ratio is unmeasured: `bench/bench_dnc.py --device cuda` prints it), and opt-in on the
    # CPU, where they cost 1.11x (SAM) and 1.64x (SDNC) the eager step at 1,024 cells (inductor's CPU code for
    # the sorts and searches is slower than ATen's).

    Config = SAMConfig
    memory_class = SparseMemory
    POSITIVE_FLAGS = {**MemoryController.POSITIVE_FLAGS, "sparse_reads": "-sparse_reads"}

    def memory_options(self) -> dict[str, Any]:
        config = self.config
        options = {"sparse_reads": config.sparse_reads, "index": config.nn_index, "index_lists": config.index_lists}
        if config.index_probes is not None:
            options["index_probes"] = config.index_probes
        return options

    @classmethod
    def config_extras_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {"sparse_reads": args.sparse_reads, "nn_index": args.nn_index,
                "index_lists": getattr(args, "index_lists", None), "index_probes": getattr(args, "index_probes", None)}


@register_core("SDNC")
class SDNCCore(SAMCore):
    """SDNC: SAM plus sparse temporal links."""

    Config = SDNCConfig
    memory_class = SparseTemporalMemory
    POSITIVE_FLAGS = {**SAMCore.POSITIVE_FLAGS, "temporal_reads": "-temporal_reads"}

    def memory_options(self) -> dict[str, Any]:
        return {**super().memory_options(), "temporal_reads": self.config.temporal_reads}

    @classmethod
    def config_extras_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {**super().config_extras_from_args(args), "temporal_reads": args.temporal_reads}


# --------------------------------------------------------------------------------------------------
# The published classes: constructor and call of ixaxaar/pytorch-dnc over the cores.


def _resolve_device(gpu_id: int, device: torch.device | str | int | None) -> torch.device:
    """`device` if given (an int is a CUDA index), else cuda:gpu_id for gpu_id >= 0, else the CPU."""
    if device is not None:
        resolved = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    else:
        resolved = torch.device("cuda", gpu_id) if gpu_id is not None and gpu_id >= 0 else torch.device("cpu")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{resolved} was asked for (gpu_id={gpu_id}, device={device!r}) but this PyTorch has no "
                         f"CUDA device; pass gpu_id=-1 for the CPU")
    return resolved


class _Published(nn.Module):
    """The published call over a core: batch_first layout, PackedSequence, debug output."""

    core_class: ClassVar[type[MemoryController]]

    def _setup(self, config_fields: dict[str, Any], *, batch_first: bool, bidirectional: bool, debug: bool,
               gpu_id: int, device: torch.device | str | int | None, share_memory: bool,
               share_memory_between_layers: bool | None) -> None:
        if bidirectional:
            raise ValueError(f"{type(self).__name__}: bidirectional=True is not supported (the published library "
                             f"accepted it and ignored it); run a second model on the reversed sequence and "
                             f"concatenate the outputs")
        if share_memory_between_layers is not None:
            if share_memory_between_layers != share_memory and share_memory is not True:
                raise ValueError("share_memory and share_memory_between_layers disagree; give one of them")
            share_memory = share_memory_between_layers
        self.core = self.core_class(self.core_class.Config(share_memory=share_memory, **config_fields))
        for name, value in dataclasses.asdict(self.core.config).items():  # published attributes (rnn.nr_cells ...)
            if name != "share_memory":  # would hide nn.Module.share_memory()
                setattr(self, name, value)
        self.batch_first = batch_first
        self.bidirectional = False
        self.debug = debug
        self.gpu_id = gpu_id
        self.to(_resolve_device(gpu_id, device))

    def compile_steps(self) -> bool:
        """The memory's step through `torch.compile` from now on (what `--compile` does in the scripts);
        False for SAM and SDNC, whose sparse steps run eagerly."""
        return self.core.compile_steps()

    def forward(
        self,
        input: torch.Tensor | PackedSequence,
        hx: Any = (None, None, None),
        reset_experience: bool = False,
        pass_through_memory: bool = True,
        *,
        mask: torch.Tensor | None = None,
    ) -> tuple[Any, tuple] | tuple[Any, tuple, dict[str, np.ndarray]]:
        """`output, (controller_hidden, memory_hidden, read_vectors)[, debug] = rnn(input, hx, ...)`.

        Args:
            input: [B, T, D] (batch_first) or [T, B, D], or a PackedSequence.
            hx: (controller_hidden, memory_hidden, read_vectors), parts None for zeros; or None.
                read_vectors: [B, R * W], the last layer's, as returned (the other layers' come from the
                memory dict's layer_read_vectors); [L, B, R * W] gives every layer's.
            reset_experience: reset the memory to its initial state first.
            pass_through_memory: False skips the memory (see `MemoryController.run`).
            mask: [B, T] (batch_first) or [T, B] bool, False at padded steps; not with a PackedSequence.

        Returns:
            output in the input's layout ([B, T, input_size] with batch_first, a PackedSequence for one);
            the new state (controller_hidden, memory_hidden, read_vectors) as pytorch-dnc 1.1.0 returns it:
            controller_hidden a list with one (h, c) or h per layer, each [num_hidden_layers, B, H];
            memory_hidden a dict (a list of dicts, one per layer, without share_memory) with 1.1.0's keys
            and shapes (models/dnc/published.py); read_vectors the last layer's [B, R * W], or None when
            `pass_through_memory=False`; and with debug=True the dict of numpy arrays (rows: step x layer).
        """
        packed = isinstance(input, PackedSequence)
        if packed:
            if mask is not None:
                raise ValueError("give padding either as a PackedSequence or as mask=, not both")
            x, lengths = pad_packed_sequence(input)  # [T, B, D], batch in the caller's order
            mask = torch.arange(x.size(0)).unsqueeze(1) < lengths.unsqueeze(0)  # [T, B]
        else:
            if input.dim() != 3:
                raise ValueError(f"input must be 3-D, [B, T, D] with batch_first else [T, B, D], "
                                 f"got {list(input.shape)}")
            x = input.transpose(0, 1) if self.batch_first else input  # [B, T, D] -> [T, B, D]
            if mask is not None and self.batch_first:
                mask = mask.transpose(0, 1)  # [B, T] -> [T, B]
        output, state, debug = self.core.run(x, self._internal_state(hx, x.size(1)), mask=mask,
                                             reset_experience=reset_experience,
                                             pass_through_memory=pass_through_memory, debug=self.debug)
        state = self._published_state(state, pass_through_memory)
        if packed:
            order = input.sorted_indices if input.sorted_indices is not None else torch.arange(x.size(1))
            order = order.to(output.device)
            # Packed data is time-major, each step holding the still-running sequences in sorted order.
            data = output[:, order][mask.to(output.device)[:, order]]  # [T, B, O] -> [sum(lengths), O]
            output = PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        elif self.batch_first:
            output = output.transpose(0, 1)  # [T, B, O] -> [B, T, O]
        if self.debug:
            return output, state, debug
        return output, state

    def _published_state(self, state: DNCState, pass_through_memory: bool) -> tuple:
        """The core's state as 1.1.0 returns it: (controller_hidden, memory_hidden, last layer's reads or None)."""
        core = self.core
        reads = state.read_vectors  # [L, B, R * W]
        if core.config.share_memory:
            memory = published.to_published(core.memories[0], state.memory, reads.transpose(0, 1),  # [B, L, R * W]
                                            keep_layer_reads=core.config.num_layers > 1)
        else:
            # Each layer's dict keeps its own layer's reads: [B, R * W] -> [B, 1, R * W].
            memory = [published.to_published(module, part, layer_reads.unsqueeze(1), keep_layer_reads=True)
                      for module, part, layer_reads in zip(core.memories, state.memory, reads)]
        return state.controller, memory, (reads[-1] if pass_through_memory else None)

    def _internal_state(self, hx: Any, batch_size: int) -> Any:
        """A published (controller_hidden, memory_hidden, read_vectors) as the core's state.

        The memory dicts go back to the memories' own form; [B, R * W] read vectors become the last
        layer's, the other layers' coming from the memory's layer_read_vectors (zeros without them).
        """
        if hx is None:
            return None
        if not isinstance(hx, (tuple, list)) or len(hx) != 3:
            raise ValueError("the hidden state must be (controller_hidden, memory_hidden, read_vectors), "
                             "any part None for a fresh one")
        controller, memory, reads = hx
        core = self.core
        layers = core.config.num_layers
        stashes: list[torch.Tensor | None] = []
        if memory is not None:
            parts = [memory] if core.config.share_memory else memory
            if not isinstance(parts, (list, tuple)) or len(parts) != len(core.memories) \
                    or not all(isinstance(part, dict) for part in parts):
                expected = "a dict" if core.config.share_memory else f"a list of {len(core.memories)} dicts"
                raise ValueError(f"memory_hidden must be {expected} (share_memory={core.config.share_memory})")
            stashes = [published.layer_reads_of(part) for part in parts]
            internal = [published.from_published(module, part) for module, part in zip(core.memories, parts)]
            memory = internal[0] if core.config.share_memory else internal
        if isinstance(reads, torch.Tensor) and reads.dim() == 2:
            expected = (batch_size, core.read_size)
            if tuple(reads.shape) != expected:
                raise ValueError(f"read_vectors must be {list(expected)} (batch, read_heads * cell_size: the last "
                                 f"layer's, as returned), got {list(reads.shape)}")
            every_layer = reads.new_zeros(layers, batch_size, core.read_size)
            if len(stashes) == 1 and stashes[0] is not None and stashes[0].shape[:2] == (batch_size, layers):
                every_layer = stashes[0].transpose(0, 1).clone()  # shared memory: [B, L, R * W] -> [L, B, R * W]
            elif len(stashes) == layers > 1:
                for layer, stash in enumerate(stashes):
                    if stash is not None and stash.shape[:2] == (batch_size, 1):
                        every_layer[layer] = stash[:, 0]
            every_layer[-1] = reads
            reads = every_layer
        return controller, memory, reads


class DNC(_Published):
    """`DNC(input_size, hidden_size, ...)`: the published constructor (ixaxaar/pytorch-dnc), dense memory.

    `device` overrides `gpu_id` (>= 0: cuda:gpu_id); `share_memory_between_layers` is an alias of
    `share_memory`; `clip` clamps the controller output (0: off); `checkpoint_steps` and
    `output_size` are this repository's (see DNCConfig). The model lives in `self.core`.
    """

    core_class = DNCCore

    def __init__(self, input_size: int, hidden_size: int, rnn_type: str = "lstm", num_layers: int = 1,
                 num_hidden_layers: int = 2, bias: bool = True, batch_first: bool = True, dropout: float = 0,
                 bidirectional: bool = False, nr_cells: int = 5, read_heads: int = 2, cell_size: int = 10,
                 nonlinearity: str = "tanh", gpu_id: int = -1, independent_linears: bool = False,
                 share_memory: bool = True, debug: bool = False, clip: float = 20, *,
                 device: torch.device | str | int | None = None, share_memory_between_layers: bool | None = None,
                 checkpoint_steps: int | None = None, output_size: int | None = None):
        super().__init__()
        self._setup(dict(input_size=input_size, hidden_size=hidden_size, rnn_type=rnn_type, num_layers=num_layers,
                         num_hidden_layers=num_hidden_layers, bias=bias, dropout=dropout, nr_cells=nr_cells,
                         read_heads=read_heads, cell_size=cell_size, nonlinearity=nonlinearity,
                         independent_linears=independent_linears, clip=clip, checkpoint_steps=checkpoint_steps,
                         output_size=output_size),
                    batch_first=batch_first, bidirectional=bidirectional, debug=debug, gpu_id=gpu_id, device=device,
                    share_memory=share_memory, share_memory_between_layers=share_memory_between_layers)


class SAM(_Published):
    """`SAM(input_size, hidden_size, ...)`: the published constructor, sparse memory (see DNC for the extras).

    `nn_index`: 'exact' (PyTorch matmul + topk, default) or 'faiss'. With 'faiss', `index_lists` makes the
    index an approximate IVF index of that many lists (None: exhaustive), `index_probes` the lists scanned
    per query (default 8): the sublinear search for large memories full of data (see SAMConfig).
    """

    core_class = SAMCore

    def __init__(self, input_size: int, hidden_size: int, rnn_type: str = "lstm", num_layers: int = 1,
                 num_hidden_layers: int = 2, bias: bool = True, batch_first: bool = True, dropout: float = 0,
                 bidirectional: bool = False, nr_cells: int = 5000, sparse_reads: int = 4, read_heads: int = 4,
                 cell_size: int = 10, nonlinearity: str = "tanh", gpu_id: int = -1, independent_linears: bool = False,
                 share_memory: bool = True, debug: bool = False, clip: float = 20, *,
                 device: torch.device | str | int | None = None, share_memory_between_layers: bool | None = None,
                 checkpoint_steps: int | None = None, output_size: int | None = None, nn_index: str = "exact",
                 index_lists: int | None = None, index_probes: int | None = None):
        super().__init__()
        self._setup(dict(input_size=input_size, hidden_size=hidden_size, rnn_type=rnn_type, num_layers=num_layers,
                         num_hidden_layers=num_hidden_layers, bias=bias, dropout=dropout, nr_cells=nr_cells,
                         sparse_reads=sparse_reads, read_heads=read_heads, cell_size=cell_size,
                         nonlinearity=nonlinearity, independent_linears=independent_linears, clip=clip,
                         checkpoint_steps=checkpoint_steps, output_size=output_size, nn_index=nn_index,
                         index_lists=index_lists, index_probes=index_probes),
                    batch_first=batch_first, bidirectional=bidirectional, debug=debug, gpu_id=gpu_id, device=device,
                    share_memory=share_memory, share_memory_between_layers=share_memory_between_layers)


class SDNC(_Published):
    """`SDNC(input_size, hidden_size, ...)`: the published constructor, sparse memory with temporal links
    (`nn_index`, `index_lists`, `index_probes` as SAM's)."""

    core_class = SDNCCore

    def __init__(self, input_size: int, hidden_size: int, rnn_type: str = "lstm", num_layers: int = 1,
                 num_hidden_layers: int = 2, bias: bool = True, batch_first: bool = True, dropout: float = 0,
                 bidirectional: bool = False, nr_cells: int = 5000, sparse_reads: int = 4, temporal_reads: int = 4,
                 read_heads: int = 4, cell_size: int = 10, nonlinearity: str = "tanh", gpu_id: int = -1,
                 independent_linears: bool = False, share_memory: bool = True, debug: bool = False, clip: float = 20,
                 *, device: torch.device | str | int | None = None, share_memory_between_layers: bool | None = None,
                 checkpoint_steps: int | None = None, output_size: int | None = None, nn_index: str = "exact",
                 index_lists: int | None = None, index_probes: int | None = None):
        super().__init__()
        self._setup(dict(input_size=input_size, hidden_size=hidden_size, rnn_type=rnn_type, num_layers=num_layers,
                         num_hidden_layers=num_hidden_layers, bias=bias, dropout=dropout, nr_cells=nr_cells,
                         sparse_reads=sparse_reads, temporal_reads=temporal_reads, read_heads=read_heads,
                         cell_size=cell_size, nonlinearity=nonlinearity, independent_linears=independent_linears,
                         clip=clip, checkpoint_steps=checkpoint_steps, output_size=output_size, nn_index=nn_index,
                         index_lists=index_lists, index_probes=index_probes),
                    batch_first=batch_first, bidirectional=bidirectional, debug=debug, gpu_id=gpu_id, device=device,
                    share_memory=share_memory, share_memory_between_layers=share_memory_between_layers)
