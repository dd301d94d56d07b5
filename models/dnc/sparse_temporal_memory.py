"""The sparse DNC memory (SDNC; Rae et al. 2016, "Scaling memory-augmented neural networks with sparse
reads and writes", supplementary): SAM (`sparse_memory.py`) plus sparse temporal links.

Each step first writes as SAM does, then updates the DNC's temporal link matrix L and precedence p
(Graves et al. 2016) from the write weights w = w^W, kept sparse with K_L = min(temporal_reads, N):

    links       L[i, j] = (1 - w_i - w_j) L_{t-1}[i, j] + w_i p_{t-1}[j],  L[i, i] = 0        (the DNC's update)
                then an entry stays only if it is among the K_L largest of its row and of its column
    precedence  p = (1 - sum_i w_i) p_{t-1} + w, then only its K_L largest entries stay
    reads       f_h = L w^R_{t-1,h} (forward),  b_h = L^T w^R_{t-1,h} (backward), each cut to its K_L
                largest entries; c_h = SAM's content weights over the K rows found for head h;
                w^R_h = pi_h[1] c_h + pi_h[2] f_h + pi_h[0] b_h,   r_h = sum_n w^R_h[n] M[n]
                with read modes pi_h = softmax over (backward, content, forward), as in the DNC.

So every row and every column of L has at most K_L non-zeros. L is stored twice, as fixed-length lists
of K_L (index, value) pairs per row: `link_index/link_value` (row i: the columns j and L[i, j]) and
`rev_link_index/rev_link_value` (column j: the rows i and L[i, j]); a free slot holds its own row
number and 0. The update changes only entries in the rows and columns written (C of them) and adds
entries in written rows x precedence columns. It gathers those entries from both lists (plus the
columns of the precedence, whose length limit may bite), applies the formula, picks the survivors,
and rewrites the lists of the rows and columns involved: O(C K_L) entries per step, whatever N. Each
head reads K + 2 K_L rows (content, forward, backward), and the write of the next step goes to those
rows and the LRU row. Links persist across steps and calls; they are never reset.

Differentiability and memory are as in SAM: the link values are `RowStore`s, so only the gathered and
rewritten list rows carry gradients, and nothing of size N is saved per step.

Compiled (`compile_steps`): as in SAM, the tensor arithmetic between the list stores' gathers and writes
(`link_entries`, `new_lists`, `update_precedence`, `temporal_top`) runs through `torch.compile`.

Shapes as in `sparse_memory.py`, plus `L` = K_L, and `U` entries of L touched by one step.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from models.core import compiled
from models.dnc.sparse_memory import (
    ACCESS_THRESHOLD,
    RowStore,
    SparseInterface,
    SparseMemory,
    SparseMemoryContext,
    _check_positive,
    is_first,
    sum_over_repeats,
)

LINK_KEYS = ("link_index", "link_value", "rev_link_index", "rev_link_value", "precedence_index", "precedence")


@dataclasses.dataclass
class SparseTemporalMemoryContext(SparseMemoryContext):
    """SAM's context plus the links and the precedence."""

    link_index: RowStore  # [B, N, L] int32: the columns of each row's entries
    link_value: RowStore  # [B, N, L] their values
    rev_link_index: RowStore  # [B, N, L] int32: the rows of each column's entries
    rev_link_value: RowStore  # [B, N, L] their values
    precedence_index: Tensor  # [B, L] int64, distinct rows
    precedence: Tensor  # [B, L]


class SparseTemporalMemory(SparseMemory):
    """The SDNC memory: SAM with sparse temporal links (module docstring).

    Args:
        temporal_reads: K_L, the non-zeros kept per row and column of the links and in the precedence,
            and the rows each head reads forward and backward (clamped to N).
        Everything else as `SparseMemory`.

    Raises:
        ValueError: if a size or option is out of range.
    """

    READ_MODES = 3  # backward, content, forward

    def __init__(self, input_size: int, nr_cells: int, cell_size: int, read_heads: int,
                 independent_linears: bool = False, sparse_reads: int = 4, temporal_reads: int = 4,
                 index: str = "exact", index_lists: int | None = None, index_probes: int = 8,
                 index_threads: int | None = None, access_threshold: float = ACCESS_THRESHOLD):
        _check_positive(type(self).__name__, "temporal_reads", temporal_reads)
        super().__init__(input_size, nr_cells, cell_size, read_heads, independent_linears=independent_linears,
                         sparse_reads=sparse_reads, index=index, index_lists=index_lists,
                         index_probes=index_probes, index_threads=index_threads, access_threshold=access_threshold)
        self.temporal_reads = min(temporal_reads, nr_cells)  # L

    @property
    def read_entries(self) -> int:
        """E = K + 2 L: content, forward and backward rows per head."""
        return self.sparse_reads + 2 * self.temporal_reads

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temporal_reads={self.temporal_reads}"

    # ----------------------------------------------------------------------------------------------
    # The memory contract (what SAM does, plus the links).

    def initial_state(self, batch_size: int, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """SAM's empty state plus empty links and precedence (free slots: own row number, value 0)."""
        state = super().initial_state(batch_size, device=device, dtype=dtype)
        cells, links = self.nr_cells, self.temporal_reads
        own_rows = torch.arange(cells, device=device, dtype=torch.int32).view(1, cells, 1)
        own_rows = own_rows.expand(batch_size, cells, links)  # [B, N, L] int32
        no_links = torch.zeros(1, 1, 1, device=device, dtype=dtype).expand(batch_size, cells, links)  # [B, N, L]
        state.update({
            "link_index": own_rows, "link_value": no_links, "rev_link_index": own_rows, "rev_link_value": no_links,
            "precedence_index": torch.arange(links, device=device).expand(batch_size, links).clone(),  # [B, L]
            "precedence": torch.zeros(batch_size, links, device=device, dtype=dtype),  # [B, L]
        })
        return state

    def _initial_read_positions(self, batch_size: int, device: torch.device | str | None) -> Tensor:
        content = torch.arange(self.sparse_reads, device=device)
        temporal = torch.arange(self.temporal_reads, device=device)
        positions = torch.cat([content, temporal, temporal])  # [E]
        return positions.expand(batch_size, self.read_heads, self.read_entries).clone()

    def state_keys(self) -> tuple[str, ...]:
        """SAM's keys plus the links and the precedence."""
        return super().state_keys() + LINK_KEYS

    def begin(self, state: dict[str, Tensor], keep_index: bool = True) -> SparseTemporalMemoryContext:
        """Start a run of steps from `state`; the tensors are not modified (see `SparseMemory.begin`)."""
        base = super().begin(state, keep_index)
        track = base.memory.track
        fields = {field.name: getattr(base, field.name) for field in dataclasses.fields(base)}
        return SparseTemporalMemoryContext(
            **fields,
            link_index=RowStore(state["link_index"], track=False),
            link_value=RowStore(state["link_value"], track),
            rev_link_index=RowStore(state["rev_link_index"], track=False),
            rev_link_value=RowStore(state["rev_link_value"], track),
            precedence_index=state["precedence_index"],
            precedence=state["precedence"],
        )

    def end(self, ctx: SparseTemporalMemoryContext) -> dict[str, Tensor]:
        """The state after the steps (a new dict; keys and shapes as `initial_state`)."""
        state = super().end(ctx)
        state.update({
            "link_index": ctx.link_index.result(), "link_value": ctx.link_value.result(),
            "rev_link_index": ctx.rev_link_index.result(), "rev_link_value": ctx.rev_link_value.result(),
            "precedence_index": ctx.precedence_index, "precedence": ctx.precedence,
        })
        for store in (ctx.link_index, ctx.link_value, ctx.rev_link_index, ctx.rev_link_value):
            store.release()
        return state

    def debug_view(self, ctx: SparseTemporalMemoryContext) -> dict[str, Tensor]:
        """SAM's view plus link_matrix [N, L] (the values of each row's entries), rev_link_matrix [N, L]
        (each column's), link_index / rev_link_index [N, L] (the columns / rows those entries are at) and
        precedence [N], of batch element 0 after the latest step."""
        view = super().debug_view(ctx)
        with torch.no_grad():
            precedence = ctx.precedence.new_zeros(self.nr_cells)
            precedence.scatter_add_(0, ctx.precedence_index[0], ctx.precedence[0].detach())
            view.update({"link_matrix": ctx.link_value.dense(0), "rev_link_matrix": ctx.rev_link_value.dense(0),
                         "link_index": ctx.link_index.dense(0), "rev_link_index": ctx.rev_link_index.dense(0),
                         "precedence": precedence})
        return view

    # ----------------------------------------------------------------------------------------------
    # Links, precedence and temporal reads.

    def _after_write(self, ctx: SparseTemporalMemoryContext, write_positions: Tensor, write_weights: Tensor,
                     row_weights: Tensor, mask: Tensor | None) -> None:
        self._update_links(ctx, write_positions, row_weights, mask)
        self._update_precedence(ctx, write_positions, write_weights, mask)

    def _update_links(self, ctx: SparseTemporalMemoryContext, write_positions: Tensor, row_weights: Tensor,
                      mask: Tensor | None) -> None:
        """The DNC link update on the entries it can change, then the K_L-per-row-and-column cut."""
        batch, written = write_positions.shape
        cells, links = self.nr_cells, self.temporal_reads
        precedence_index = ctx.precedence_index
        # The entries (rows i, columns j, old values L[i, j]) that the update may change: (a) the lists of
        # the written rows, (b) the column lists of the written rows and (d) of the precedence's rows
        # (whose length limit may bite), (c) the new entries, written rows x precedence rows.
        written_rows = write_positions.unsqueeze(-1).expand(batch, written, links)  # [B, C, L]
        column_owners = torch.cat([write_positions, precedence_index], dim=1)  # [B, C + L]
        column_rows = ctx.rev_link_index.gather(column_owners).long().view(batch, -1)  # (b), (d): [B, (C + L) L]
        column_columns = column_owners.unsqueeze(-1).expand(-1, -1, links).reshape(batch, -1)
        new_columns = precedence_index.unsqueeze(1).expand(batch, written, links)  # (c)
        rows = torch.cat([written_rows.reshape(batch, -1), column_rows, written_rows.reshape(batch, -1)], dim=1)
        columns = torch.cat([ctx.link_index.gather(write_positions).long().view(batch, -1), column_columns,
                             new_columns.reshape(batch, -1)], dim=1)  # [B, U]
        old = torch.cat([ctx.link_value.gather(write_positions).view(batch, -1),
                         ctx.rev_link_value.gather(column_owners).view(batch, -1),
                         row_weights.new_zeros(batch, written * links)], dim=1)  # [B, U]
        entries = compiled(self, "link_entries", link_entries)
        owners, partners, values, keep, group_first, group_start = entries(
            rows, columns, old, write_positions, row_weights, precedence_index, ctx.precedence, cells, links)
        # The row lists (link_*) are owned by the rows, the column lists (rev_link_*) by the columns.
        _rewrite_lists(compiled(self, "new_lists", new_lists), (ctx.link_index, ctx.rev_link_index),
                       (ctx.link_value, ctx.rev_link_value),
                       owners, partners, values, keep, group_first, group_start, cells,
                       None if mask is None else mask.repeat(2))

    def _update_precedence(self, ctx: SparseTemporalMemoryContext, write_positions: Tensor,
                           write_weights: Tensor, mask: Tensor | None) -> None:
        """p = (1 - sum w) p_{t-1} + w over the old entries and the written rows, cut to the L largest."""
        ctx.precedence_index, ctx.precedence = compiled(self, "precedence", update_precedence)(
            ctx.precedence_index, ctx.precedence, write_positions, write_weights, mask, self.temporal_reads)

    def _read(self, ctx: SparseTemporalMemoryContext, interface: SparseInterface) -> tuple[Tensor, Tensor, Tensor]:
        """Content rows, then forward and backward rows from the links; weights mixed by the read modes."""
        (forward_positions, backward_positions), (forward, backward) = self._temporal_weights(ctx)
        content_positions = ctx.index.search(interface.read_queries.detach(), self.sparse_reads)  # [B, R, K]
        positions = torch.cat([content_positions, forward_positions, backward_positions], dim=-1)  # [B, R, E]
        rows = ctx.memory.gather(positions)  # [B, R, E, W]
        content = compiled(self, "content_weights", self._content_weights)(
            interface, rows[:, :, :self.sparse_reads])  # [B, R, K]
        backward_mode, content_mode, forward_mode = interface.read_modes.unsqueeze(-1).unbind(2)  # 3 x [B, R, 1]
        weights = torch.cat([content_mode * content, forward_mode * forward, backward_mode * backward], dim=-1)
        return positions, weights, rows

    def _temporal_weights(self, ctx: SparseTemporalMemoryContext
                          ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """f = L w^R_{t-1} and b = L^T w^R_{t-1} per head, each cut to its L largest rows.

        f[i] = sum_j L[i, j] w[j] sums over the column lists of the rows read at t-1, b over their row lists.

        Returns:
            (forward rows, backward rows): [B, R, L] each.
            (forward weights, backward weights): [B, R, L] each.
        """
        batch, heads, entries = ctx.read_positions.shape
        previous = ctx.read_positions.reshape(batch, heads * entries)  # [B, R E]
        # forward from the column lists, backward from the row lists, stacked on the batch: [2 B, R E, L]
        targets = torch.cat([ctx.rev_link_index.gather(previous), ctx.link_index.gather(previous)]).long()
        values = torch.cat([ctx.rev_link_value.gather(previous), ctx.link_value.gather(previous)])
        return compiled(self, "temporal_top", temporal_top)(ctx.read_weights, targets, values, self.temporal_reads)


def link_entries(rows: Tensor, columns: Tensor, old: Tensor, write_positions: Tensor, row_weights: Tensor,
                 precedence_index: Tensor, precedence: Tensor, cells: int, links: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The link update on the U entries it may change, and which of them stay.

    Args:
        rows, columns, old: [B, U] the entries (i, j, L_{t-1}[i, j]); the last C L are the new ones (old 0).
        write_positions, row_weights: [B, C'] the written rows and their write weights.
        precedence_index, precedence: [B, L] p_{t-1}.

    Returns:
        The entries for the two kinds of lists, stacked on the batch ([2 B, U]: the row lists, owned by
        the rows, then the column lists, owned by the columns), sorted by (owner, partner): owners,
        partners, values L_t[i, j], keep (the entries that stay: one per (i, j), non-zero, among the L
        largest of their row and column), group_first (an owner's first entry) and group_start (the place
        of its owner's first entry).
    """
    batch, count = rows.shape
    written = write_positions.size(1)
    is_new = torch.zeros_like(rows)
    is_new[:, count - written * links:] = 1
    # One entry per (i, j): sort by (i, j) with existing entries before new ones, keep the first.
    keys, order = ((rows * cells + columns) * 2 + is_new).sort(dim=1)
    rows, columns, old = rows.gather(1, order), columns.gather(1, order), old.gather(1, order)
    pairs = keys // 2
    unique = torch.ones_like(pairs, dtype=torch.bool)
    unique[:, 1:] = pairs[:, 1:] != pairs[:, :-1]

    row_weight, column_weight = _lookup(write_positions, row_weights, torch.cat([rows, columns], 1)).chunk(2, 1)
    column_precedence = _lookup(precedence_index, precedence, columns)  # p_{t-1}[j]
    values = ((1 - row_weight - column_weight) * old + row_weight * column_precedence) * (rows != columns)

    with torch.no_grad():  # which entries stay: non-zero, among the L largest of their row and column
        score = torch.where(unique, values.detach(), -1.0)
        ranks = rank_in_groups(torch.cat([rows, columns]), score.repeat(2, 1))  # [2 B, U]
        keep = unique & (score > 0) & (ranks < links).view(2, batch, -1).all(0)
    return _by_owner(torch.cat([rows, columns]), torch.cat([columns, rows]), values.repeat(2, 1),
                     keep.repeat(2, 1), cells)


def update_precedence(precedence_index: Tensor, precedence: Tensor, write_positions: Tensor, write_weights: Tensor,
                      mask: Tensor | None, links: int) -> tuple[Tensor, Tensor]:
    """p = (1 - sum w) p_{t-1} + w over the old entries [B, L] and the written rows [B, C'], cut to the L
    largest: (rows [B, L], values [B, L]); padding rows of mask [B] keep theirs."""
    kept = (1 - write_weights.sum(1, keepdim=True)) * precedence  # [B, L]
    positions = torch.cat([precedence_index, write_positions], dim=1)  # [B, L + C']
    totals, first_index = sum_over_repeats(positions, torch.cat([kept, write_weights], dim=1))
    score = torch.where(is_first(first_index), totals.detach(), -1.0)  # repeats last: L distinct rows
    top = score.topk(links, dim=1).indices  # [B, L]
    index, values = positions.gather(1, top), totals.gather(1, top)
    if mask is not None:
        keep = mask.unsqueeze(-1)
        index = torch.where(keep, index, precedence_index)
        values = torch.where(keep, values, precedence)
    return index, values


def temporal_top(read_weights: Tensor, targets: Tensor, values: Tensor, links: int
                 ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Forward and backward read weights from the lists of the rows read at t-1, each cut to its L largest.

    Args:
        read_weights: [B, R, E] w^R_{t-1}.
        targets, values: [2 B, R E, L] the column lists (forward) then the row lists (backward) of those rows.

    Returns:
        (forward rows, backward rows), (forward weights, backward weights): [B, R, L] each.
    """
    batch, heads, entries = read_weights.shape
    contributions = read_weights.repeat(2, 1, 1).unsqueeze(-1) * values.view(2 * batch, heads, entries, -1)
    targets = targets.view(2 * batch, heads, -1)  # [2 B, R, E L]
    totals, first_index = sum_over_repeats(targets, contributions.view(2 * batch, heads, -1))
    score = torch.where(is_first(first_index), totals.detach(), -1.0)
    top = score.topk(links, dim=-1).indices  # [2 B, R, L]
    return targets.gather(-1, top).chunk(2), totals.gather(-1, top).chunk(2)


def _lookup(positions: Tensor, values: Tensor, query: Tensor) -> Tensor:
    """values [B, M] at positions [B, M] (repeats must carry equal values), read at rows query [B, U]; 0 elsewhere."""
    ordered, order = positions.sort(dim=1)
    place = torch.searchsorted(ordered.contiguous(), query.contiguous()).clamp_max(positions.size(1) - 1)
    found = ordered.gather(1, place) == query
    return torch.where(found, values.gather(1, order.gather(1, place)), 0)


def rank_in_groups(groups: Tensor, scores: Tensor) -> Tensor:
    """For each entry of [B, M], its rank by descending score among the entries of its group (0 = best;
    ties by position)."""
    by_score = scores.argsort(dim=1, descending=True, stable=True)
    by_group = groups.gather(1, by_score).argsort(dim=1, stable=True)
    order = by_score.gather(1, by_group)  # [B, M]: sorted by group, then score
    sorted_groups = groups.gather(1, order)
    places = torch.arange(groups.size(1), device=groups.device).expand_as(groups)
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[:, 1:] = sorted_groups[:, 1:] != sorted_groups[:, :-1]
    group_start = torch.where(starts, places, 0).cummax(dim=1).values
    return torch.empty_like(places).scatter_(1, order, places - group_start)


def _by_owner(owners: Tensor, partners: Tensor, values: Tensor, keep: Tensor, cells: int
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Updated list entries [2 B, U] sorted by (owner, partner), with each owner's first entry
    (group_first) and the place of its owner's first entry (group_start): see `link_entries`."""
    batch, updated = owners.shape
    order = (owners * cells + partners).sort(dim=1).indices
    owners, partners = owners.gather(1, order), partners.gather(1, order)
    keep, values = keep.gather(1, order), values.gather(1, order)
    places = torch.arange(updated, device=owners.device).expand(batch, updated)
    group_first = torch.ones_like(keep)
    group_first[:, 1:] = owners[:, 1:] != owners[:, :-1]
    group_start = torch.where(group_first, places, 0).cummax(dim=1).values  # [B, U]
    return owners, partners, values, keep, group_first, group_start


def _rewrite_lists(make_lists: Callable[..., tuple[Tensor, Tensor]], indexes: tuple[RowStore, RowStore],
                   value_stores: tuple[RowStore, RowStore], owners: Tensor, partners: Tensor, values: Tensor,
                   keep: Tensor, group_first: Tensor, group_start: Tensor, cells: int, mask: Tensor | None) -> None:
    """Rewrite the lists of every owner in `owners` after an update of some of their entries.

    Two kinds of lists at once, stacked on the batch: the first half of the rows of the arguments
    belongs to the first store of each pair, the second half to the second.

    Args:
        make_lists: `new_lists`, or its compiled form.
        indexes: two [B, N, L] stores of the lists' partners.
        value_stores: two [B, N, L] stores of the lists' values.
        owners, partners: [2 B, U] the updated entries (owner's list, partner in it; repeats allowed),
            sorted by (owner, partner) (`_by_owner`).
        values: [2 B, U] their new values.
        keep: [2 B, U] bool, the entries that stay (one per (owner, partner) at most; at most L per owner
            together with the owner's entries that were not updated).
        group_first, group_start: [2 B, U] from `_by_owner`.
        cells: N.
        mask: [2 B] bool or None; False batch rows keep their lists.
    """
    # The owners' old lists; their entries that were not updated are carried over unchanged.
    halves = owners.chunk(2)
    old_partners = torch.cat([store.gather(half) for store, half in zip(indexes, halves)]).long()  # [2 B, U, L]
    old_values = torch.cat([store.gather(half) for store, half in zip(value_stores, halves)])  # [2 B, U, L]
    new_partners, new_values = make_lists(owners, partners, values, keep, group_first, group_start, old_partners,
                                          old_values, cells, mask)
    for store, half, part in zip(indexes, halves, new_partners.chunk(2)):
        store.write(half, part)
    for store, half, part in zip(value_stores, halves, new_values.chunk(2)):
        store.write(half, part)


def new_lists(owners: Tensor, partners: Tensor, values: Tensor, keep: Tensor, group_first: Tensor,
              group_start: Tensor, old_partners: Tensor, old_values: Tensor, cells: int, mask: Tensor | None
              ) -> tuple[Tensor, Tensor]:
    """The owners' new lists: partners and values [2 B, U, L] (every entry gets its owner's list), from the
    updated entries (`_rewrite_lists`) and the owners' old lists [2 B, U, L]."""
    batch, updated = owners.shape
    links = old_partners.size(2)
    places = torch.arange(updated, device=owners.device).expand(batch, updated)
    keys = owners * cells + partners  # ascending
    old_keys = (owners.unsqueeze(-1) * cells + old_partners).view(batch, -1)  # [2 B, U L]
    found = torch.searchsorted(keys.contiguous(), old_keys.contiguous()).clamp_max(updated - 1)
    updated_entry = (keys.gather(1, found) == old_keys).view(batch, updated, links)
    carried = group_first.unsqueeze(-1) & ~updated_entry & (old_values.detach() > 0)  # [2 B, U, L]
    # Slots: an owner's kept entries first (in partner order), then its carried ones.
    kept_so_far = keep.long().cumsum(1)
    kept_slot = kept_so_far - 1 - (kept_so_far - keep.long()).gather(1, group_start)
    kept_in_group = torch.zeros_like(kept_so_far).scatter_add(1, group_start, keep.long())
    carried_slot = kept_in_group.unsqueeze(-1) + carried.long().cumsum(-1) - 1  # [2 B, U, L]
    # A table of sources with one list per entry (filled at group starts); the last column is a dump.
    dump = updated * links
    zero_source = updated + updated * links  # index of the appended 0 below
    sources = torch.full((batch, dump + 1), zero_source, dtype=torch.long, device=owners.device)
    new_partners = torch.cat([owners.unsqueeze(-1).expand(batch, updated, links).reshape(batch, dump),
                              owners[:, :1]], dim=1)  # free slots point at their own row
    kept_target = torch.where(keep, group_start * links + kept_slot, dump)
    sources.scatter_(1, kept_target, places)
    new_partners.scatter_(1, kept_target, partners)
    carried_target = torch.where(carried, places.unsqueeze(-1) * links + carried_slot, dump).view(batch, -1)
    sources.scatter_(1, carried_target, updated + torch.arange(dump, device=owners.device).expand(batch, dump))
    new_partners.scatter_(1, carried_target, old_partners.reshape(batch, dump))
    # Every entry takes its group's list, so that repeated owners write equal lists.
    from_start = group_start.unsqueeze(-1).expand(batch, updated, links)
    sources = sources[:, :dump].view(batch, updated, links).gather(1, from_start)
    new_partners = new_partners[:, :dump].view(batch, updated, links).gather(1, from_start)
    candidates = torch.cat([values, old_values.reshape(batch, dump), values.new_zeros(batch, 1)], dim=1)
    new_values = candidates.gather(1, sources.view(batch, dump)).view(batch, updated, links)
    if mask is not None:
        unchanged = ~mask.view(batch, 1, 1)
        new_values = torch.where(unchanged, old_values, new_values)
        new_partners = torch.where(unchanged, old_partners, new_partners)
    return new_partners, new_values
