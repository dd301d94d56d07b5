"""Sparse Access Memory (SAM; Rae et al. 2016, "Scaling memory-augmented neural networks with sparse
reads and writes"), behind the memory contract of the DNC/SAM/SDNC wrapper.

One step, with `t-1` marking the state it starts from, R read heads and K = min(sparse_reads, N):

    interface   q_h (read queries), beta_h = oneplus(.) (read strengths), a (write vector),
                gamma = sigmoid(.) (interpolation gate), alpha = sigmoid(.) (write gate)
    LRU         U = argmin_n last_access[n]                          the least recently accessed row
    write       w^W = alpha (gamma w^R_{t-1} + (1 - gamma) 1_U)       paper eq. 5; w^R_{t-1} = the R heads'
                                                                      read weights of step t-1, averaged
                M = (1 - 1_U 1^T) M_{t-1} + w^W a^T                    the write section's R_t = I^U 1^T: row
                                                                      U is set to zero, then every row gets its
                                                                      share of a (the published port does so too)
    read        S_h = the K rows n of largest cos(q_h, M[n])          exact search, or FAISS (`search.py`)
                w^R_h[n] = softmax_{n in S_h}(beta_h cos(q_h, M[n]));  r_h = sum_{n in S_h} w^R_h[n] M[n]
    usage       last_access[n] = t for every row written with a total weight > delta, or read by some
                head with a total weight > delta (`access_threshold`, default 0.005)

So a step touches R K + 1 rows: the rows read at t-1 (writes), the LRU row, and the R K rows found now
(reads). The write uses the read weights of the previous step, as in the paper: writes go to the
previously read rows (gamma -> 1) or to the least recently used one (gamma -> 0). Ties in the last
access time (all rows of a fresh memory, rows accessed at the same step) go to the first (lowest) row,
as `argmin` and `min` break them; a fresh memory has last_access[n] = n - N, so it is filled from row 0 up.
The cosine is <q, m> / (max(|q|, 1e-6) max(|m|, 1e-6)): an all-zero row scores 0. With fewer than K
rows, K is N; with N = 1 every step reads and writes row 0.

Speed and memory: nothing of size N is saved for backward, and a step costs O(N) only in one minimum
over the last-access times (integers); everything else scales with the rows touched. Per call, `begin`
takes the row norms of the memory and `end` copies it once, with the written rows put in. In between
the memory is never copied: `RowStore` keeps the rows written since `begin` beside the state's tensor
and remembers where each row's current value is. The search (`search.ExactIndex`) scores only the
rows that can be non-zero (those of the starting memory, while they are at most a quarter of it, and
the rows written since; every other row is zero and scores 0), or else all rows with one matmul, so a
full memory costs O(N W) per search; FAISS's IVF index (`index_lists`) scans only the probed lists, and
is kept from call to call (`search.IndexKeeper`) so that it is not rebuilt per call. The
differentiable path goes only through gathered and written rows: small autograd functions route the
gradient of a gathered row to where its value was made (the state's tensor, or the write of a step of
this call), never through a dense [B, N, W] gradient per step. A fresh state (`initial_state`) is
made of broadcast views, O(N) to make. Not supported: double backward through the memory.

Compiled pieces (`compile_steps`, `--compile`): the row store and the search work on data-dependent
rows and stay eager; the tensor arithmetic between them (the interface, the write's plan and its new
rows, the content weights, the access stamps) runs through `torch.compile`, a few fused kernels per
piece instead of dozens of small ones per step. Compiled, the write keeps all C entries (repeats with
weight 0) instead of cutting them to the C' distinct rows, so that every step has the same shapes;
the result is the same.

Padding: with a mask, rows that are False leave every state tensor exactly as it was; their read
vectors are computed as usual and are to be ignored.

Shapes: `B` batch, `N` cells (nr_cells), `W` cell size, `R` read heads, `K` sparse reads, `E` read
entries per head (K here; K + 2 K_L in the SDNC), `C = R E + 1` written rows per step, `X` the
controller output size (input_size), `M` some number of rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from models.core import compiled
from models.dnc.search import (
    INDEXES,
    IndexKeeper,
    NearestNeighbourIndex,
    cosine_similarity,
    first_occurrence,
    make_index,
    mostly_empty,
)

ACCESS_THRESHOLD = 0.005  # a row counts as accessed when its read or write weight exceeds this (delta)
NEVER = torch.iinfo(torch.int32).min  # a time stamp below every real one


# --------------------------------------------------------------------------------------------------
# Rows of a [B, N, D] state tensor during a call, with gradients routed through the touched rows only.


class RowStore:
    """A [B, N, D] state tensor between `begin` and `end`: the starting tensor plus the rows written since.

    The starting tensor `base` is never modified and never copied while the steps run: every row
    remembers where its current value is (`slots`: -1 for `base`, otherwise the slot of the write that
    made it; slots count the rows written over the call), and the written values are appended to
    `history`. With `track`, `gather` returns rows whose gradient is routed to those places in
    backward: to a dense gradient of `base` (built once per backward pass) or to the writes' values,
    never through a [B, N, D] tensor per step. A chain of scalar tokens orders the backward: the token
    of a write is an input of every later gather and write, so a write's backward runs after all the
    gathers that read its rows. `result` builds the [B, N, D] tensor after the writes, once.

    Args:
        base: [B, N, D] the state tensor the call starts from.
        track: keep the differentiable path (False under `torch.no_grad`, or for index tensors).
    """

    def __init__(self, base: Tensor, track: bool):
        self.shape = tuple(base.shape)
        batch, rows, width = self.shape
        self.base = base
        # [B N, D] view where the strides allow one (initial states are broadcast views: no)
        self.flat_base = base.detach().view(batch * rows, width) if base.is_contiguous() else None
        self.offsets = torch.arange(batch, device=base.device).mul_(rows).unsqueeze(1)  # [B, 1]
        self.slots = torch.full((batch * rows,), -1, dtype=torch.int32, device=base.device)  # [B N]
        self.history = base.new_empty(0, width, requires_grad=False)  # [capacity, D], the first `written` used
        self.written = 0
        self.track = track
        self.base_requires_grad = track and base.requires_grad
        self.token = _Anchor.apply(base, self) if self.base_requires_grad else None
        self._task: int | None = None  # the backward pass the gradient buffers belong to
        self._base_grad: Tensor | None = None  # [B N + 1, D]; the last row swallows the other kind's gradients
        self._history_grad: Tensor | None = None  # [written + 1, D]; likewise

    def _flat(self, rows: Tensor) -> Tensor:
        """Row numbers [B, ...] -> flat row numbers [B * M] of the [B N, D] view."""
        return (rows.reshape(self.shape[0], -1) + self.offsets).reshape(-1)

    def current(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """The current values [M, D] of flat rows [M] (no gradient) and their slots [M] (int64)."""
        slots = self.slots.index_select(0, flat).long()
        if self.flat_base is not None:
            found = self.flat_base.index_select(0, flat)
        else:
            cells = self.shape[1]
            found = self.base.detach()[flat // cells, flat % cells]
        if self.written:
            written = self.history.index_select(0, slots.clamp_min(0))
            found = torch.where((slots >= 0).unsqueeze(-1), written, found)
        return found, slots

    def gather(self, rows: Tensor) -> Tensor:
        """Rows [B, ...] (int64) -> their current values [B, ..., D], differentiable when tracked."""
        flat = self._flat(rows)
        if self.token is None:
            found = self.current(flat)[0]
        else:
            found = _Gather.apply(self.token, self, flat)
        return found.view(*rows.shape, self.shape[2])

    def write(self, rows: Tensor, values: Tensor) -> None:
        """Rows [B, M] (repeats must carry equal values) now hold values [B, M, D]."""
        flat = self._flat(rows)
        flat_new = values.reshape(-1, self.shape[2])  # [B, M, D] -> [B M, D]
        first, count = self.written, flat.numel()
        if first + count > self.history.size(0):
            grown = self.history.new_empty(max(2 * self.history.size(0), first + count), self.shape[2])
            grown[:first] = self.history[:first]
            self.history = grown
        self.history[first:first + count] = flat_new.detach()
        self.slots.index_copy_(0, flat, torch.arange(first, first + count, device=flat.device, dtype=torch.int32))
        self.written += count
        if self.track and torch.is_grad_enabled() and (flat_new.requires_grad or self.token is not None):
            token = self.token if self.token is not None else flat_new.new_zeros(())
            self.token = _Store.apply(token, flat_new, self, first)

    def result(self) -> Tensor:
        """The [B, N, D] tensor after the writes; differentiable w.r.t. `base` and the written values."""
        if not self.written:
            return self.base
        touched = torch.nonzero(self.slots >= 0).squeeze(1)  # flat rows written in this call
        rows = self.current(touched)[0] if self.token is None else _Gather.apply(self.token, self, touched)
        result = torch.empty(self.shape, dtype=self.base.dtype, device=self.base.device)
        result.copy_(self.base)
        cells = self.shape[1]
        return result.index_put_((touched // cells, touched % cells), rows)

    def dense(self, element: int) -> Tensor:
        """The current [N, D] rows of batch element `element` (no gradient; for inspection)."""
        cells = self.shape[1]
        return self.current(torch.arange(element * cells, (element + 1) * cells, device=self.slots.device))[0]

    def release(self) -> None:
        """Drop the per-call tensors (the autograd graph keeps only this object's small parts).

        Dropping `token` also breaks the cycle store -> token -> graph nodes -> ctx.store -> store,
        which Python's garbage collector cannot see through the autograd graph: kept, every call's
        graph would stay alive after its backward pass (a leak of the whole graph per iteration).
        """
        self.base = self.flat_base = self.slots = self.history = self.token = None

    # Backward-pass side: called by the autograd functions below.

    def _sync(self) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:  # a new backward pass: forget buffers a pruned earlier pass left behind
            self._task, self._base_grad, self._history_grad = task, None, None

    def route(self, flat: Tensor, sources: Tensor, grad: Tensor) -> None:
        """Add the gradient [M, D] of gathered rows to where their values came from."""
        self._sync()
        from_base = sources < 0
        batch, cells, width = self.shape
        if self.base_requires_grad:
            if self._base_grad is None:
                self._base_grad = grad.new_zeros(batch * cells + 1, width)
            self._base_grad.index_add_(0, torch.where(from_base, flat, batch * cells), grad)
        if self.written:
            if self._history_grad is None:
                self._history_grad = grad.new_zeros(self.written + 1, width)
            self._history_grad.index_add_(0, torch.where(from_base, self.written, sources), grad)

    def take_history_grad(self, first: int, count: int) -> Tensor | None:
        self._sync()
        if self._history_grad is None:
            return None
        return self._history_grad[first:first + count].clone()

    def take_base_grad(self) -> Tensor | None:
        self._sync()
        grad, self._base_grad, self._history_grad = self._base_grad, None, None
        return None if grad is None else grad[:-1].view(self.shape)


class _Anchor(torch.autograd.Function):
    """The first token of a store's chain; its backward hands `base` the gradient its rows collected."""

    @staticmethod
    def forward(ctx: Any, base: Tensor, store: RowStore) -> Tensor:
        ctx.store = store
        return base.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_token: Tensor) -> tuple[Tensor | None, None]:
        return ctx.store.take_base_grad(), None


class _Gather(torch.autograd.Function):
    """Current rows of a store; backward routes their gradient by where the rows' values were at gather time."""

    @staticmethod
    def forward(ctx: Any, token: Tensor, store: RowStore, flat: Tensor) -> Tensor:
        ctx.store = store
        found, slots = store.current(flat)
        ctx.save_for_backward(flat, slots)
        return found

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        flat, sources = ctx.saved_tensors
        ctx.store.route(flat, sources, grad)
        return grad.new_zeros(()), None, None


class _Store(torch.autograd.Function):
    """A write of rows [M, D]; backward hands them the gradient that later gathers routed to them."""

    @staticmethod
    def forward(ctx: Any, token: Tensor, values: Tensor, store: RowStore, first: int) -> Tensor:
        ctx.store, ctx.first, ctx.count = store, first, values.size(0)
        return token.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_token: Tensor) -> tuple[Tensor, Tensor | None, None, None]:
        return grad_token.new_zeros(()), ctx.store.take_history_grad(ctx.first, ctx.count), None, None


# --------------------------------------------------------------------------------------------------
# Small helpers on lists of rows.


def sum_over_repeats(positions: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Totals of values [..., M] over the entries that share a position.

    Returns:
        totals: [..., M], the total of the entry's position at its first entry, 0 at repeats.
        first_index: [..., M], `first_occurrence(positions)`.
    """
    first_index = first_occurrence(positions)
    return torch.zeros_like(values).scatter_add(-1, first_index, values), first_index


def is_first(first_index: Tensor) -> Tensor:
    """[..., M] bool: True where `first_occurrence` points at the entry itself."""
    return first_index == torch.arange(first_index.size(-1), device=first_index.device)


def plan_write(usage: Tensor, read_positions: Tensor, read_weights: Tensor, write_gate: Tensor,
               interpolation_gate: Tensor, read_heads: int, cut: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Paper eq. 5 on the C entries (the previous read entries, then the LRU row), merged per row.

    Args:
        usage: [B, N] last access steps; read_positions, read_weights: [B, R, E] of step t-1;
        write_gate (alpha), interpolation_gate (gamma): [B, 1].
        cut: keep only the first C' = max distinct rows over the batch (eager: less later work; the rest
            are repeats), or all C (compiled: the same shapes every step).

    Returns:
        least_used: [B, 1] the LRU row U.
        positions: [B, C'] the written rows, each row's first entry first (repeats at the end).
        weights: [B, C'] w^W of the row at its first entry, 0 at repeats.
        row_weights: [B, C'] w^W of the entry's row.
    """
    batch = usage.size(0)
    # the first minimum, as argmin would give, in about 0.4x argmin's time on the CPU (int32, one thread)
    least_used = usage.min(dim=1, keepdim=True).indices  # [B, 1]
    positions = torch.cat([read_positions.reshape(batch, -1), least_used], dim=1)  # [B, C]
    previous_reads = read_weights.reshape(batch, -1) / read_heads  # mean over heads: [B, R E]
    lru_share = write_gate * (1 - interpolation_gate)  # alpha (1 - gamma): [B, 1]
    weights = torch.cat([write_gate * interpolation_gate * previous_reads, lru_share], dim=1)  # [B, C]
    totals, first_index = sum_over_repeats(positions, weights)  # [B, C] each
    distinct = is_first(first_index)
    order = distinct.to(torch.uint8).argsort(dim=1, descending=True, stable=True)  # each row's first entry first
    if cut:
        order = order[:, :int(distinct.sum(1).max())]  # [B, C']
    row_weights = totals.gather(1, first_index.gather(1, order))
    return least_used, positions.gather(1, order), totals.gather(1, order), row_weights


def written_rows(old_rows: Tensor, positions: Tensor, least_used: Tensor, row_weights: Tensor, write_vector: Tensor,
                 mask: Tensor | None) -> Tensor:
    """The rows after the write: [B, C', W] (old_rows [B, C', W] at positions [B, C'], `plan_write`'s outputs,
    write_vector a [B, W]; padding rows of mask [B] keep their old rows)."""
    # The paper's erase R_t = I^U 1^T sets the LRU row to zero whatever the gates; then every row adds its share of a.
    erase = (positions == least_used).to(old_rows.dtype).unsqueeze(-1)  # [B, C', 1]
    new_rows = (1 - erase) * old_rows + row_weights.unsqueeze(-1) * write_vector.unsqueeze(1)
    if mask is not None:
        new_rows = torch.where(mask.view(-1, 1, 1), new_rows, old_rows)
    return new_rows


def access_stamps(step: Tensor, write_positions: Tensor, row_weights: Tensor, read_positions: Tensor,
                  read_weights: Tensor, mask: Tensor | None, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """The rows a step accessed and their new last-access stamps.

    Args:
        step: [B] steps taken before this one; write_positions, row_weights: [B, C'] (`plan_write`);
        read_positions, read_weights: [B, R, E] this step's reads; mask: [B] or None (padding rows
        access nothing and do not count the step); threshold: delta.

    Returns:
        positions: [B, C' + R E] rows; stamps: [B, C' + R E] the step number where the row's total write
        weight or one head's total read weight on it exceeds delta, else NEVER (for scatter amax);
        now: [B] the steps taken after this one.
    """
    batch = step.size(0)
    now = step + 1  # [B]
    positions = torch.cat([write_positions, read_positions.reshape(batch, -1)], dim=1)  # [B, C' + R E]
    read_totals = sum_over_repeats(read_positions, read_weights)[0]  # per head and row: [B, R, E]
    accessed = torch.cat([row_weights, read_totals.reshape(batch, -1)], dim=1) > threshold
    if mask is not None:
        accessed = accessed & mask.unsqueeze(-1)
        now = torch.where(mask, now, step)
    return positions, torch.where(accessed, now.unsqueeze(-1), NEVER), now


def canonical_entries(positions: Tensor, weights: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Rows and weights [B, M] of a write as [B, size] (size >= M) in one form per write: each row's
    first entry keeps its place and weight, every other entry (repeats, padding) becomes the first row
    with weight 0. So the state is the same whatever the batch's other rows made M."""
    first = is_first(first_occurrence(positions))
    positions = torch.where(first, positions, positions[:, :1])
    weights = torch.where(first, weights, 0)
    missing = size - positions.size(1)
    if missing:
        positions = torch.cat([positions, positions[:, :1].expand(-1, missing)], dim=1)
        weights = torch.cat([weights, weights.new_zeros(weights.size(0), missing)], dim=1)
    return positions, weights


def oneplus(x: Tensor) -> Tensor:
    """1 + softplus(x): the strengths' activation, in [1, inf)."""
    return 1 + F.softplus(x)


class SparseInterface(NamedTuple):
    """The interface vector split into its parts, after their activations."""

    read_queries: Tensor  # [B, R, W]
    read_strengths: Tensor  # [B, R], >= 1
    write_vector: Tensor  # [B, W]
    interpolation_gate: Tensor  # [B, 1], in (0, 1)
    write_gate: Tensor  # [B, 1], in (0, 1)
    read_modes: Tensor | None  # [B, R, 3] (SDNC: backward, content, forward), else None


@dataclasses.dataclass
class SparseMemoryContext:
    """The state between `begin` and `end`, updated in place or replaced per step."""

    memory: RowStore  # [B, N, W]
    index: NearestNeighbourIndex
    usage: Tensor  # [B, N] int32 last access step, working copy
    step: Tensor  # [B] int32 steps taken
    read_positions: Tensor  # [B, R, E] int64
    read_weights: Tensor  # [B, R, E]
    write_positions: Tensor  # [B, C] int64, the latest step's (`canonical_entries`)
    write_weights: Tensor  # [B, C]
    least_used: Tensor  # [B] int64, the latest step's LRU row


class SparseMemory(nn.Module):
    """SAM's memory: N cells of width W, R read heads of K sparse reads, one write (module docstring).

    Args:
        input_size: X, the width of the controller output xi the interface is read from.
        nr_cells: N >= 1.
        cell_size: W.
        read_heads: R.
        independent_linears: one Linear per interface part (True) or one Linear split into the parts.
        sparse_reads: K, rows read per head (clamped to N).
        index: 'exact' (PyTorch, any device) or 'faiss' (`pip install faiss-cpu`; CPU indexes, kept from
            one call to the next: `search.IndexKeeper`).
        index_lists: FAISS only: None for an exhaustive flat index, else the IVF lists (approximate).
        index_probes: FAISS IVF only: lists scanned per query.
        index_threads: FAISS only: OpenMP threads; None: `torch.get_num_threads()`.
        access_threshold: delta, the weight above which a read or write counts as an access.

    Raises:
        ValueError: if a size or option is out of range.
    """

    READ_MODES = 0  # interface read modes per head (the SDNC has 3)

    def __init__(self, input_size: int, nr_cells: int, cell_size: int, read_heads: int,
                 independent_linears: bool = False, sparse_reads: int = 4, index: str = "exact",
                 index_lists: int | None = None, index_probes: int = 8, index_threads: int | None = None,
                 access_threshold: float = ACCESS_THRESHOLD):
        super().__init__()
        name = type(self).__name__
        for option, value in (("input_size", input_size), ("nr_cells", nr_cells), ("cell_size", cell_size),
                              ("read_heads", read_heads), ("sparse_reads", sparse_reads),
                              ("index_probes", index_probes)):
            _check_positive(name, option, value)
        for option, value in (("index_lists", index_lists), ("index_threads", index_threads)):
            if value is not None:
                _check_positive(name, option, value)
        if index not in INDEXES:
            raise ValueError(f"{name}: index must be one of {', '.join(INDEXES)}, got {index!r}")
        if not 0 <= access_threshold < 1:
            raise ValueError(f"{name}: access_threshold must be in [0, 1), got {access_threshold!r}")
        self.input_size = input_size
        self.nr_cells = nr_cells
        self.cell_size = cell_size
        self.read_heads = read_heads
        self.independent_linears = bool(independent_linears)
        self.sparse_reads = min(sparse_reads, nr_cells)  # K
        self.index = index
        self.index_lists = index_lists
        self.index_probes = index_probes
        self.index_threads = index_threads
        self.access_threshold = access_threshold
        self.read_size = read_heads * cell_size
        self.interface_sizes = {  # the interface parts, in the order of the split Linear's outputs
            "read_queries": read_heads * cell_size, "read_strengths": read_heads, "write_vector": cell_size,
            "interpolation_gate": 1, "write_gate": 1,
        }
        if self.READ_MODES:
            self.interface_sizes["read_modes"] = self.READ_MODES * read_heads
        self.interface_size = sum(self.interface_sizes.values())
        if self.independent_linears:
            self.interface_layers = nn.ModuleDict(
                {part: nn.Linear(input_size, size) for part, size in self.interface_sizes.items()})
        else:
            self.interface_layer = nn.Linear(input_size, self.interface_size)
        self.compile_step = False  # the step's tensor arithmetic through torch.compile (`compile_steps`)
        self.index_keeper = IndexKeeper()  # the FAISS index kept between calls (`begin`); not state

    @property
    def read_entries(self) -> int:
        """E: the rows each head reads per step."""
        return self.sparse_reads

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, nr_cells={self.nr_cells}, cell_size={self.cell_size}, "
                f"read_heads={self.read_heads}, sparse_reads={self.sparse_reads}, index={self.index!r}, "
                f"independent_linears={self.independent_linears}")

    def interface(self, xi: Tensor) -> SparseInterface:
        """xi [B, X] -> the interface parts, activated (shapes in `SparseInterface`)."""
        if self.independent_linears:
            parts = {part: layer(xi) for part, layer in self.interface_layers.items()}
        else:
            parts = dict(zip(self.interface_sizes, torch.split(self.interface_layer(xi),
                                                               list(self.interface_sizes.values()), dim=-1)))
        batch = xi.size(0)
        read_modes = None
        if self.READ_MODES:
            # [B, 3 R] -> [B, R, 3], softmax over the modes of each head
            read_modes = torch.softmax(parts["read_modes"].view(batch, self.read_heads, self.READ_MODES), dim=-1)
        return SparseInterface(
            read_queries=parts["read_queries"].view(batch, self.read_heads, self.cell_size),  # [B, R W] -> [B, R, W]
            read_strengths=oneplus(parts["read_strengths"]),
            write_vector=parts["write_vector"],
            interpolation_gate=torch.sigmoid(parts["interpolation_gate"]),
            write_gate=torch.sigmoid(parts["write_gate"]),
            read_modes=read_modes,
        )

    # ----------------------------------------------------------------------------------------------
    # The memory contract.

    def initial_state(self, batch_size: int, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """An empty memory, batch first: zeros, a fill order from row 0, reads of weight 0.

        The [B, N, ...] tensors are broadcast views (`expand`) of one row, so that a fresh state costs
        O(N) to make whatever the batch size and width; `end` returns ordinary tensors. They cannot be
        written in place: to start from other contents, put new tensors in the dict.
        """
        cells = self.nr_cells
        heads, entries = self.read_heads, self.read_entries
        # never accessed: row 0 least recently, then row 1, ...
        fill_order = torch.arange(-cells, 0, device=device, dtype=torch.int32)
        return {
            "memory": torch.zeros(1, 1, 1, device=device, dtype=dtype).expand(batch_size, cells, self.cell_size),
            "usage": fill_order.expand(batch_size, cells),  # [B, N] int32 last access step
            "step": torch.zeros(batch_size, dtype=torch.int32, device=device),  # [B]
            "read_positions": self._initial_read_positions(batch_size, device),  # [B, R, E]
            "read_weights": torch.zeros(batch_size, heads, entries, device=device, dtype=dtype),  # [B, R, E]
            # The latest step's write (not used by the next step; the published state shows it).
            "write_positions": torch.zeros(batch_size, self._written_rows(), device=device, dtype=torch.long),
            "write_weights": torch.zeros(batch_size, self._written_rows(), device=device, dtype=dtype),  # [B, C]
        }

    def _initial_read_positions(self, batch_size: int, device: torch.device | str | None) -> Tensor:
        positions = torch.arange(self.sparse_reads, device=device)  # [K]
        return positions.expand(batch_size, self.read_heads, self.sparse_reads).clone()

    def state_keys(self) -> tuple[str, ...]:
        """The keys of the state dict."""
        return ("memory", "usage", "step", "read_positions", "read_weights")

    def begin(self, state: dict[str, Tensor], keep_index: bool = True) -> SparseMemoryContext:
        """Start a run of steps from `state` (as made by `initial_state` or `end`); the tensors are not modified.

        Args:
            state: the state to start from.
            keep_index: with index='faiss', take the index kept from the previous call when this state's
                memory is the one that call returned or started from (`search.IndexKeeper`), and keep this
                call's; False builds a new index and leaves the kept one alone (checkpointed segments,
                which are run again in backward and must find the same rows there).

        Raises:
            ValueError: if a state tensor is missing or the memory does not have this module's [N, W].
        """
        self._check_state(state)
        track = torch.is_grad_enabled()
        memory = RowStore(state["memory"], track)
        batch = memory.shape[0]
        return SparseMemoryContext(
            memory=memory,
            index=self._search_index(state["memory"], keep_index),
            usage=state["usage"].clone(memory_format=torch.contiguous_format),
            step=state["step"],
            read_positions=state["read_positions"],
            read_weights=state["read_weights"],
            # The latest write, as `initial_state` makes it when the state has none (a state from before it was kept).
            write_positions=(state["write_positions"] if "write_positions" in state else
                             torch.zeros(batch, self._written_rows(), dtype=torch.long, device=memory.offsets.device)),
            write_weights=(state["write_weights"] if "write_weights" in state else
                           state["read_weights"].new_zeros(batch, self._written_rows())),
            least_used=torch.zeros(batch, dtype=torch.long, device=memory.offsets.device),
        )

    def _search_index(self, memory: Tensor, keep_index: bool) -> NearestNeighbourIndex:
        """The search over memory [B, N, W] for a call: FAISS's kept from call to call, the exact one per call
        (it holds the starting memory by reference and costs no more to build than a search).

        An IVF index (`index_lists`) over a memory that is mostly zero rows would put them all in one list
        (they score 0 against every centroid) and scan that list whenever a query probes it, O(N) per search:
        a call that starts with at most `SPARSE_FRACTION` of its rows holding data (every sequence of a task
        run with `reset_experience`, the first windows of a run) searches exactly instead, over the rows that
        hold data and those written since, which costs less and finds the exact rows."""
        threads = torch.get_num_threads() if self.index_threads is None else self.index_threads

        def build(start: Tensor) -> NearestNeighbourIndex:
            return make_index(self.index, start, lists=self.index_lists, probes=self.index_probes, threads=threads)

        if self.index == "faiss" and self.index_lists is not None and mostly_empty(memory):
            return make_index("exact", memory)
        if self.index != "faiss" or not keep_index:
            return build(memory)
        keeper = self.__dict__.get("index_keeper")
        if keeper is None:  # a module pickled whole before the keeper existed
            keeper = self.index_keeper = IndexKeeper()
        return keeper.lend(memory, (self.index_lists, self.index_probes, threads), build)

    def _written_rows(self) -> int:
        """C = R E + 1."""
        return self.read_heads * self.read_entries + 1

    def _check_state(self, state: dict[str, Tensor]) -> None:
        name = type(self).__name__
        missing = [key for key in self.state_keys() if key not in state]
        if missing:
            raise ValueError(f"{name} state lacks {missing}; start from memory.initial_state(batch_size)")
        memory = state["memory"]
        if memory.dim() != 3 or memory.shape[1:] != (self.nr_cells, self.cell_size):
            raise ValueError(f"{name} state memory must be [B, {self.nr_cells}, {self.cell_size}] "
                             f"(nr_cells, cell_size), got {tuple(memory.shape)}; was it made by another memory?")
        expected = (memory.size(0), self.read_heads, self.read_entries)
        if tuple(state["read_positions"].shape) != expected:
            raise ValueError(f"{name} state read_positions must be {list(expected)} [B, read_heads, reads per "
                             f"head], got {list(state['read_positions'].shape)}; was it made by another memory?")

    def step(self, ctx: SparseMemoryContext, xi: Tensor, mask: Tensor | None = None) -> Tensor:
        """One write and read: xi [B, X] -> read vectors [B, R * W] (head-major).

        Args:
            ctx: from `begin`; updated.
            xi: [B, X] controller output.
            mask: [B] bool or None; False rows are padding and leave their state unchanged.

        Raises:
            ValueError: if xi or mask has the wrong shape.
        """
        batch = ctx.memory.shape[0]
        name = type(self).__name__
        if xi.dim() != 2 or xi.shape != (batch, self.input_size):
            raise ValueError(f"{name}.step: xi must be [B, input_size] = [{batch}, {self.input_size}], "
                             f"got {tuple(xi.shape)}")
        if mask is not None and (mask.shape != (batch,) or mask.dtype != torch.bool):
            raise ValueError(f"{name}.step: mask must be a bool tensor of shape [{batch}], "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        interface = compiled(self, "interface", self.interface)(xi)
        write_positions, write_weights, row_weights = self._write(ctx, interface, mask)
        self._after_write(ctx, write_positions, write_weights, row_weights, mask)
        positions, weights, rows = self._read(ctx, interface)
        reads = torch.matmul(weights.unsqueeze(-2), rows).squeeze(-2)  # [B, R, 1, E] x [B, R, E, W] -> [B, R, W]
        self._update_usage(ctx, write_positions, row_weights, positions, weights, mask)
        write_positions, write_weights = canonical_entries(write_positions, write_weights, self._written_rows())
        if mask is not None:
            keep = mask.view(batch, 1, 1)
            positions = torch.where(keep, positions, ctx.read_positions)
            weights = torch.where(keep, weights, ctx.read_weights)
            write_positions = torch.where(mask.unsqueeze(-1), write_positions, ctx.write_positions)
            write_weights = torch.where(mask.unsqueeze(-1), write_weights, ctx.write_weights)
        ctx.read_positions, ctx.read_weights = positions, weights
        ctx.write_positions, ctx.write_weights = write_positions, write_weights
        return reads.reshape(batch, self.read_size)  # [B, R, W] -> [B, R W]

    def _write(self, ctx: SparseMemoryContext, interface: SparseInterface,
               mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Paper eq. 5 and the erase/add write on the previously read rows and the LRU row (`plan_write`,
        `written_rows`): C' <= C rows eagerly, all C compiled.

        Returns:
            positions: [B, C'] the written rows (the LRU row among them; repeats possible at the end).
            weights: [B, C'] w^W of the row at its first entry, 0 at repeats.
            row_weights: [B, C'] w^W of the entry's row.
        """
        plan = compiled(self, "write_plan", plan_write)
        least_used, positions, weights, row_weights = plan(
            ctx.usage, ctx.read_positions, ctx.read_weights, interface.write_gate, interface.interpolation_gate,
            self.read_heads, not self.compile_step)
        ctx.least_used = least_used.squeeze(1)
        old_rows = ctx.memory.gather(positions)  # [B, C', W]
        new_rows = compiled(self, "new_rows", written_rows)(old_rows, positions, least_used, row_weights,
                                                            interface.write_vector, mask)
        ctx.memory.write(positions, new_rows)
        ctx.index.update(positions, new_rows.detach())
        return positions, weights, row_weights

    def _after_write(self, ctx: SparseMemoryContext, write_positions: Tensor, write_weights: Tensor,
                     row_weights: Tensor, mask: Tensor | None) -> None:
        """Hook for the SDNC's temporal links; SAM has none."""

    def _read(self, ctx: SparseMemoryContext, interface: SparseInterface) -> tuple[Tensor, Tensor, Tensor]:
        """Content reads of the K nearest rows per head.

        Returns:
            positions: [B, R, E] the rows read.
            weights: [B, R, E] their read weights.
            rows: [B, R, E, W] their contents.
        """
        positions = ctx.index.search(interface.read_queries.detach(), self.sparse_reads)  # [B, R, K]
        rows = ctx.memory.gather(positions)  # [B, R, K, W]
        return positions, compiled(self, "content_weights", self._content_weights)(interface, rows), rows

    @staticmethod
    def _content_weights(interface: SparseInterface, rows: Tensor) -> Tensor:
        """Rows [B, R, K, W] found for each head -> softmax over them of beta_h cos(q_h, row): [B, R, K]."""
        similarity = cosine_similarity(interface.read_queries, rows)  # [B, R, K]
        return torch.softmax(interface.read_strengths.unsqueeze(-1) * similarity, dim=-1)

    def _update_usage(self, ctx: SparseMemoryContext, write_positions: Tensor, row_weights: Tensor,
                      read_positions: Tensor, read_weights: Tensor, mask: Tensor | None) -> None:
        """last_access = t where a row is written (total weight) or read (by a head) above the threshold."""
        stamps = compiled(self, "access_stamps", access_stamps)
        positions, stamps, ctx.step = stamps(ctx.step, write_positions, row_weights.detach(), read_positions,
                                             read_weights.detach(), mask, self.access_threshold)
        ctx.usage.scatter_reduce_(1, positions, stamps, reduce="amax")

    def end(self, ctx: SparseMemoryContext) -> dict[str, Tensor]:
        """The state after the steps (a new dict; keys and shapes as `initial_state`)."""
        state = {"memory": ctx.memory.result(), "usage": ctx.usage, "step": ctx.step,
                 "read_positions": ctx.read_positions, "read_weights": ctx.read_weights,
                 "write_positions": ctx.write_positions, "write_weights": ctx.write_weights}
        ctx.memory.release()
        keeper = self.__dict__.get("index_keeper")
        if keeper is not None:  # the kept index (if this call was lent it) now holds the returned memory
            keeper.returned(ctx.index, state["memory"])
        return state

    def debug_view(self, ctx: SparseMemoryContext) -> dict[str, Tensor]:
        """Batch element 0 after the latest step, detached: SAM's debug keys.

        memory [N, W]; visible_memory [R E + 1, W], the rows read by the latest step and its LRU row;
        read_positions [R E + 1] those rows; read_weights [R, N] per head; write_weights [N]; usage [N]
        (the last access step of each row).
        """
        with torch.no_grad():
            memory = ctx.memory.dense(0)
            positions = torch.cat([ctx.read_positions[0].reshape(-1), ctx.least_used[:1]])
            read_weights = memory.new_zeros(self.read_heads, self.nr_cells)
            read_weights.scatter_add_(1, ctx.read_positions[0], ctx.read_weights[0].detach().to(memory.dtype))
            write_weights = memory.new_zeros(self.nr_cells)
            write_weights.scatter_add_(0, ctx.write_positions[0], ctx.write_weights[0].detach().to(memory.dtype))
            return {"memory": memory, "visible_memory": memory[positions], "read_positions": positions,
                    "read_weights": read_weights, "write_weights": write_weights, "usage": ctx.usage[0].clone()}


def _check_positive(name: str, option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {option} must be a positive integer, got {value!r}")
