"""The memory state as the published library (pytorch-dnc 1.1.0) hands it to its users, and back.

The memories keep their state in the form their steps need (`DenseMemory.initial_state`,
`SparseMemory.initial_state`); the published classes (`DNC`, `SAM`, `SDNC` in dnc.py) show it to the
user with 1.1.0's keys and shapes, and take it back in either form. `to_published` adds and reshapes,
`from_published` undoes it, so a state handed out and given back continues the run exactly.

DNC (`DenseMemory`), 1.1.0's six keys with its singleton dimensions:
    memory [B, N, W], link_matrix [B, 1, N, N], precedence [B, 1, N], read_weights [B, R, N],
    write_weights [B, 1, N], usage_vector [B, N].

SAM (`SparseMemory`), 1.1.0's keys:
    memory [B, N, W]; read_positions [B, R E + 1] int64, the rows read by the latest step (E per head),
    then the least recently used row; visible_memory [B, R E + 1, W], those rows; read_weights [B, N]
    and write_weights [B, N], the latest step's, summed over the heads; read_vectors [B, R, W], the
    latest read; least_used_mem [B, 1] int64, the row the next write may take; usage [B, N], here the
    step of each row's last access (int32; 1.1.0 kept a float usage, the smallest is the LRU row in both);
and this repository's: step [B] int32, head_read_weights [B, R, E] (each head's weights of the rows of
read_positions), write_positions [B, C] (the rows of the latest write, C = R E + 1).

SDNC (`SparseTemporalMemory`): SAM's, plus link_matrix and rev_link_matrix [B, N, K_L], the values of
each row's (column's) K_L sparse links (1.1.0: [B, N, 2 K_L]), precedence [B, K_L] (1.1.0: [B, 2 K_L]),
and the links' indices (link_index, rev_link_index [B, N, K_L], precedence_index [B, K_L]).

With more than one controller layer, each memory dict also holds layer_read_vectors
[B, layers using this memory, R * W]: the read vectors of every layer (1.1.0 returns only the last
layer's, and with the read vectors of step t fed back at step t + 1 each layer needs its own).

Shapes: `B` batch, `N` cells, `W` cell size, `R` read heads, `E` rows read per head (SAM: K; SDNC:
K + 2 K_L), `K_L` temporal reads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.dnc.memory import DenseMemory
from models.dnc.sparse_memory import SparseMemory, first_occurrence, is_first
from models.dnc.sparse_temporal_memory import SparseTemporalMemory

MemoryState = dict[str, Tensor]

DENSE_KEYS = ("memory", "link_matrix", "precedence", "read_weights", "write_weights", "usage_vector")
DENSE_SINGLETONS = ("link_matrix", "precedence", "write_weights")  # 1.1.0 keeps a dimension of 1 at dim 1
LAYER_READS = "layer_read_vectors"


def to_published(memory: nn.Module, state: MemoryState, layer_reads: Tensor | None,
                 keep_layer_reads: bool = False) -> MemoryState:
    """The state of `memory` as 1.1.0 shows it (module docstring).

    Args:
        memory: the memory module the state belongs to.
        state: its state (`initial_state` / `end` form).
        layer_reads: [B, L_m, R * W], the latest read vectors of the layers using this memory, the last
            of them the latest to read it.
        keep_layer_reads: keep them as layer_read_vectors (a model of more than one layer).
    """
    if isinstance(memory, SparseMemory):
        public = _sparse_to_published(memory, state, None if layer_reads is None else layer_reads[:, -1])
    elif isinstance(memory, DenseMemory):
        public = {key: (value.unsqueeze(1) if key in DENSE_SINGLETONS else value) for key, value in state.items()}
    else:  # a memory of someone else's: as it is
        public = dict(state)
    if keep_layer_reads and layer_reads is not None:
        public[LAYER_READS] = layer_reads
    return public


def from_published(memory: nn.Module, public: MemoryState) -> MemoryState:
    """The state `memory`'s steps take, from a published dict (or from one already in that form)."""
    if isinstance(memory, SparseMemory):
        return _sparse_from_published(memory, public)
    if isinstance(memory, DenseMemory):
        state = {key: value for key, value in public.items() if key in DENSE_KEYS}
        for key in DENSE_SINGLETONS:
            value = state.get(key)
            if value is not None and value.dim() == (4 if key == "link_matrix" else 3):
                state[key] = value.squeeze(1)  # [B, 1, ...] -> [B, ...]
        return state
    return {key: value for key, value in public.items() if key != LAYER_READS}


def layer_reads_of(public: MemoryState) -> Tensor | None:
    """The layer_read_vectors a published dict holds, or None."""
    return public.get(LAYER_READS)


def _sparse_to_published(memory: SparseMemory, state: MemoryState, reads: Tensor | None) -> MemoryState:
    batch, cells = state["memory"].shape[:2]
    positions, weights = state["read_positions"], state["read_weights"]  # [B, R, E] each
    least_used = state["usage"].argmin(dim=1, keepdim=True)  # [B, 1]
    visible = torch.cat([positions.reshape(batch, -1), least_used], dim=1)  # [B, R E + 1]
    dtype = weights.dtype
    dense_reads = weights.new_zeros(batch, cells).scatter_add(1, positions.reshape(batch, -1),
                                                              weights.reshape(batch, -1))  # [B, N]
    write_positions = state.get("write_positions")
    dense_writes = weights.new_zeros(batch, cells)
    if write_positions is not None:
        dense_writes = dense_writes.scatter_add(1, write_positions, state["write_weights"].to(dtype))
    public = dict(state)
    if reads is None:
        reads = weights.new_zeros(batch, memory.read_heads * memory.cell_size)
    public.update({
        # indexing, not gather: gather's backward would keep the whole [B, N, W] memory alive
        "visible_memory": state["memory"][torch.arange(batch, device=visible.device).unsqueeze(1), visible],
        "read_positions": visible,
        "read_weights": dense_reads,
        "head_read_weights": weights,
        "write_weights": dense_writes,
        "read_vectors": reads.reshape(batch, memory.read_heads, memory.cell_size),  # [B, R W] -> [B, R, W]
        "least_used_mem": least_used,
    })
    if isinstance(memory, SparseTemporalMemory):
        public["link_matrix"] = state["link_value"]
        public["rev_link_matrix"] = state["rev_link_value"]
    return public


def _sparse_from_published(memory: SparseMemory, public: MemoryState) -> MemoryState:
    keys = set(memory.state_keys()) | {"write_positions", "write_weights"}
    state = {key: value for key, value in public.items() if key in keys}  # in the given order
    positions = public.get("read_positions")
    if positions is None or positions.dim() == 3:  # missing (the memory names it), or the steps' own form
        return state
    batch = positions.size(0)
    heads, entries = memory.read_heads, memory.read_entries
    if positions.shape != (batch, heads * entries + 1) or "head_read_weights" not in public:
        raise ValueError(f"memory_hidden['read_positions'] must be [B, {heads * entries + 1}] with "
                         f"'head_read_weights' beside it, as this model returned it; pass None for a fresh memory")
    state["read_positions"] = positions[:, :heads * entries].reshape(batch, heads, entries)  # [B, R E] -> [B, R, E]
    state["read_weights"] = public["head_read_weights"]
    write_positions = public.get("write_positions")
    if write_positions is not None:
        # The dense write weights at each row's first entry, 0 at the other entries (as the steps keep them).
        first = is_first(first_occurrence(write_positions))
        state["write_weights"] = torch.where(first, public["write_weights"].gather(1, write_positions), 0)
    return state
