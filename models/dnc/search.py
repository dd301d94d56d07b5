"""Nearest-neighbour search over memory rows by cosine similarity, for the sparse memories (SAM, SDNC).

The sparse memories read only the K rows most similar to each read query. This module finds them:

    score[b, q, n] = <query[b, q], memory[b, n]> / max(|memory[b, n]|, eps)      (cosine up to the query's norm)
    indices[b, q]  = the K rows of largest score, best first

The indices carry no gradient: the memory recomputes the differentiable similarity on the K rows it
gathers (`cosine_similarity`, the same formula), so ranking and weighting agree. K is clamped to N, so
any memory with N >= 1 rows works.

Two searches share one small interface (`NearestNeighbourIndex`): built from the memory at the start of
a run of steps, told about every written row (`update`), asked for the K best rows of a batch of queries
(`search`). Neither lives in the recurrent state, which holds tensors only.

- `ExactIndex` (the default): exact top-K on the memory's own device, ties to the lower row number.
  It scores only the rows that can be non-zero (a fresh memory costs almost nothing to search), or
  all rows with one batched matmul when the memory is mostly full.
- `FaissIndex` (optional, `pip install faiss-cpu`): one FAISS index per batch element over the
  L2-normalised rows, on the CPU. By default an exhaustive `IndexFlatIP`, whose written rows are
  overwritten in place, so it returns exactly the exact search's rows (up to the order of ties and float
  rounding).
  With `lists` it is an `IndexIVFFlat` (an approximate search for large memories; `probes` lists are
  scanned per query), trained on a sample of the rows when it is built, written by remove + add. FAISS
  runs on `threads` OpenMP threads (default: `torch.get_num_threads()`).

Building a FAISS index costs O(N W) per batch element (and k-means for IVF), far more than the steps
of a call over a large memory, so the sparse memories keep theirs from one call to the next
(`IndexKeeper`): a call that starts from the memory the previous call returned (the carried state
of the next BPTT window) or from the one the previous call started from (a run repeated from the
same state) takes the kept index, in the second case after rewriting the rows written since with
their values in that memory. Steps then cost O(rows touched + the probed lists) whatever N. An IVF
index's lists are those of the memory it was trained on, so a kept one is rebuilt (at the start of a
call) once the rows written since outnumber the rows that held data when it was built: a memory that
fills from empty is retrained at geometrically spaced fills (trained on zero rows, every row would
land in one list and each search would scan them all), a full one about once per N row writes,
O(W) per written row on average. The `ExactIndex` costs no more to build than one search and stays
per call; the sparse memories also use it instead of an IVF index for a call that starts from a memory
that is `mostly_empty` (at most `SPARSE_FRACTION` of its rows hold data), where it scores only those.

Shapes: `B` batch, `N` memory rows, `W` row width, `Q` queries per batch element, `K` rows per query,
`M` rows written at once.
"""

from __future__ import annotations

import importlib
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

NORM_EPSILON = 1e-6  # rows (and queries) shorter than this are scaled as if this long: zero rows score 0
INDEXES = ("exact", "faiss")
IVF_TRAINING_ROWS_PER_LIST = 40  # k-means samples per inverted list (FAISS warns below 39)
SPARSE_FRACTION = 0.25  # ExactIndex scores only the non-zero rows while at most this share of them are
BLOCK = 64  # rows per block of the two-round top-k over a whole memory (`_top_rows_of_many`)
RETRAIN_FACTOR = 1.0  # a kept IVF index is rebuilt once the rows written since its build outnumber this many
# times the rows that held data then (at least its lists): `IndexKeeper`


def import_faiss() -> Any:
    """The `faiss` module, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        raise ImportError("the 'faiss' nearest-neighbour index needs FAISS: pip install faiss-cpu "
                          "(or use the default index='exact')") from None


def first_occurrence(positions: Tensor) -> Tensor:
    """For each entry of positions [..., M], the index of the first entry with the same position."""
    same = positions.unsqueeze(-1) == positions.unsqueeze(-2)  # [..., M, M]
    return same.to(torch.uint8).argmax(dim=-1)  # argmax returns the first maximum


def inverse_norms(rows: Tensor, eps: float = NORM_EPSILON) -> Tensor:
    """1 / max(|row|, eps) over the last dimension: [..., W] -> [...]."""
    return rows.norm(dim=-1).clamp_min(eps).reciprocal()


def cosine_similarity(queries: Tensor, rows: Tensor, eps: float = NORM_EPSILON) -> Tensor:
    """Differentiable cosine similarity of each query with its own rows.

    Args:
        queries: [..., W].
        rows: [..., K, W], the rows each query is compared with.

    Returns:
        [..., K]: <q, m> / (max(|q|, eps) max(|m|, eps)); 0 for an all-zero row or query.
    """
    dot = (rows * queries.unsqueeze(-2)).sum(-1)  # [..., K, W] * [..., 1, W] -> [..., K]
    return dot * inverse_norms(rows, eps) * inverse_norms(queries, eps).unsqueeze(-1)


@torch.no_grad()
def cosine_topk(queries: Tensor, memory: Tensor, k: int, memory_inverse_norms: Tensor | None = None,
                eps: float = NORM_EPSILON) -> tuple[Tensor, Tensor]:
    """Exact top-K rows by cosine similarity (no gradient).

    Args:
        queries: [B, Q, W].
        memory: [B, N, W], N >= 1.
        k: rows wanted per query; clamped to N.
        memory_inverse_norms: [B, N] `inverse_norms(memory)` if already known.

    Returns:
        similarities: [B, Q, min(k, N)], best first.
        indices: [B, Q, min(k, N)] int64 row numbers.
    """
    k = min(k, memory.size(1))
    if memory_inverse_norms is None:
        memory_inverse_norms = inverse_norms(memory, eps)
    scores = torch.bmm(queries, memory.transpose(1, 2))  # [B, Q, W] x [B, W, N] -> [B, Q, N]
    scores.mul_(memory_inverse_norms.unsqueeze(1))
    top, indices = scores.topk(k, dim=-1)
    return top * inverse_norms(queries, eps).unsqueeze(-1), indices


class NearestNeighbourIndex(Protocol):
    """What the sparse memories ask of a search built over their working memory."""

    def search(self, queries: Tensor, k: int) -> Tensor:
        """queries [B, Q, W] -> indices [B, Q, min(k, N)] (int64, on the queries' device)."""
        ...

    def update(self, rows: Tensor, values: Tensor) -> None:
        """Rows [B, M] (repeats allowed, with equal values) now hold values [B, M, W]."""
        ...


class ExactIndex:
    """Exact search over a memory given as the [B, N, W] tensor a call starts from plus the rows written since.

    Only rows that can be non-zero are scored: the starting memory's non-zero rows (found once, here)
    and the rows written since (`update`). Every other row is all-zero and scores exactly 0, so the K
    lowest-numbered of them stand for all of them. A fresh memory therefore costs O(rows written) per
    search instead of O(N W). When more than `SPARSE_FRACTION` of the starting rows are non-zero, the
    starting memory is scored with one matmul over all its rows per search instead (rows written since
    are scored from their new values). Either way the result is the exact top-K, best first, with ties
    (such as zero rows, all scoring 0) going to the lower row number: the same rows whatever was
    written when, so a sequence run in pieces finds what it finds run whole.

    Args:
        memory: [B, N, W] the memory at the start; kept by reference, must not change.
    """

    def __init__(self, memory: Tensor):
        base = memory.detach()
        batch, cells, _ = base.shape
        self.cells = cells
        norms = _row_norms(base)  # [B, N]
        nonzero = norms > 0
        most = int(nonzero.sum(1).max())
        self.dense = most > SPARSE_FRACTION * cells
        inverse = norms.clamp_min(NORM_EPSILON).reciprocal()
        if self.dense:
            self.base, self.base_inverse_norms = base, inverse  # [B, N, W], [B, N]
        else:
            # the non-zero rows, ascending, padded with N (which sorts last)
            if most:
                numbers = torch.arange(cells, device=base.device).expand(batch, cells)
                ordered = torch.where(nonzero, numbers, cells).sort(dim=1).values  # [B, N]
                self.base_rows = ordered[:, :most].contiguous()  # [B, A]
            else:
                self.base_rows = torch.empty(batch, 0, dtype=torch.long, device=base.device)
            found = self.base_rows.clamp_max(cells - 1)
            self.base = base.gather(1, found.unsqueeze(-1).expand(-1, -1, base.size(-1)))  # [B, A, W]
            self.base_inverse_norms = inverse.gather(1, found)  # [B, A]
            # + a last column where updates of rows not in the list land
            self.base_valid = torch.cat([self.base_rows < cells, nonzero.new_zeros(batch, 1)], dim=1)
        # The rows written since the start, one entry each (the latest value), in order of first write.
        self.entry_of = torch.full((batch, cells), -1, dtype=torch.int32, device=base.device)  # [B, N]
        self.counts = torch.zeros(batch, dtype=torch.long, device=base.device)  # [B] entries in use
        self.size = 0  # max(counts)
        self.rows = torch.empty(batch, 0, dtype=torch.long, device=base.device)  # [B, capacity], N = unused
        self.values = base.new_empty(batch, 0, base.size(-1))  # [B, capacity, W]
        self.inverse_norms = base.new_empty(batch, 0)  # [B, capacity]

    @torch.no_grad()
    def search(self, queries: Tensor, k: int) -> Tensor:
        k = min(k, self.cells)
        batch, count = queries.size(0), self.size
        if count:
            valid = torch.arange(count, device=queries.device) < self.counts.unsqueeze(1)  # [B, count]
            written = self._scores(queries, self.values[:, :count], self.inverse_norms[:, :count], valid)
        if self.dense:
            scores = torch.bmm(queries, self.base.transpose(1, 2))  # [B, Q, W] x [B, W, N] -> [B, Q, N]
            scores.mul_(self.base_inverse_norms.unsqueeze(1))
            if count:  # rows written since score by their new values; unused entries repeat entry 0's
                first = (self.counts > 0).view(batch, 1, 1)
                rows = torch.where(valid, self.rows[:, :count], torch.where(first.view(batch, 1), self.rows[:, :1], 0))
                fill = torch.where(first, written[:, :, :1], scores[:, :, :1])  # [B, Q, 1]
                scores.scatter_(2, rows.unsqueeze(1).expand_as(written), torch.where(valid.unsqueeze(1), written, fill))
            return _top_rows_of_many(scores, k)
        parts = []  # (scores [B, Q, M], rows [B, M]) of the candidates
        if self.base_rows.size(1):
            parts.append((self._scores(queries, self.base, self.base_inverse_norms, self.base_valid[:, :-1]),
                          self.base_rows))
        zero_rows = self._zero_rows(k)  # [B, K]
        zero_scores = torch.where(zero_rows < self.cells, 0.0, float("-inf")).to(queries.dtype)
        parts.append((zero_scores.unsqueeze(1).expand(-1, queries.size(1), -1), zero_rows))
        if count:
            parts.append((written, self.rows[:, :count]))
        rows, order = torch.cat([part[1] for part in parts], dim=1).sort(dim=1)  # candidates by row number
        scores = torch.cat([part[0] for part in parts], dim=2).gather(2, order.unsqueeze(1).expand(
            -1, queries.size(1), -1))
        return _top_rows(scores, rows.clamp_max(self.cells - 1), k)

    def _zero_rows(self, k: int) -> Tensor:
        """The k lowest-numbered rows that are neither non-zero at the start nor written since: [B, k]
        (N where there are fewer). The j-th of them is j + the number of those other rows below it."""
        members = torch.cat([self.base_rows, self.rows[:, :self.size]], dim=1).sort(dim=1).values  # [B, S]
        wanted = torch.arange(k, device=members.device).repeat(members.size(0), 1)  # j: [B, k]
        if not members.size(1):
            return wanted
        first = torch.ones_like(members, dtype=torch.bool)
        first[:, 1:] = members[:, 1:] != members[:, :-1]
        members_so_far = first.long().cumsum(1)  # distinct members up to each entry
        below = members - members_so_far + 1  # non-members below each member: non-decreasing
        place = torch.searchsorted(below.contiguous(), wanted, right=True)  # entries whose member lies below the answer
        counted = members_so_far.gather(1, (place - 1).clamp_min(0)) * (place > 0)
        return (wanted + counted).clamp_max(self.cells)

    @staticmethod
    def _scores(queries: Tensor, rows: Tensor, inverse_norms: Tensor, valid: Tensor) -> Tensor:
        """[B, Q, W] x rows [B, M, W] -> [B, Q, M] <q, m>/|m|, -inf where not valid."""
        scores = torch.bmm(queries, rows.transpose(1, 2)).mul_(inverse_norms.unsqueeze(1))
        return scores.masked_fill_(~valid.unsqueeze(1), float("-inf"))

    @torch.no_grad()
    def update(self, rows: Tensor, values: Tensor) -> None:
        values = values.detach()
        if not self.dense and self.base_rows.size(1):  # a starting row written now: its starting value is stale
            place = torch.searchsorted(self.base_rows, rows.contiguous()).clamp_max(self.base_rows.size(1) - 1)
            listed = self.base_rows.gather(1, place) == rows
            self.base_valid.scatter_(1, torch.where(listed, place, self.base_rows.size(1)), False)
        first_index = first_occurrence(rows)  # [B, M]; repeats carry equal values
        entry = self.entry_of.gather(1, rows).long()  # [B, M], -1 for rows not written before
        new = (entry < 0) & (first_index == torch.arange(rows.size(1), device=rows.device))
        entry = torch.where(new, self.counts.unsqueeze(1) + new.long().cumsum(1) - 1, entry)
        entry = entry.gather(1, first_index)  # repeats share their first entry
        self.counts += new.sum(1)
        self.size = int(self.counts.max())
        if self.size > self.rows.size(1):
            self._grow(max(2 * self.rows.size(1), self.size))
        self.rows.scatter_(1, entry, rows)
        self.values.scatter_(1, entry.unsqueeze(-1).expand_as(values), values)
        self.inverse_norms.scatter_(1, entry, inverse_norms(values))
        self.entry_of.scatter_(1, rows, entry.to(torch.int32))

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.rows.size(1)
        batch = self.rows.size(0)
        self.rows = torch.cat([self.rows, self.rows.new_full((batch, extra), self.cells)], dim=1)
        self.values = torch.cat([self.values, self.values.new_zeros(batch, extra, self.values.size(2))], dim=1)
        self.inverse_norms = torch.cat([self.inverse_norms, self.inverse_norms.new_zeros(batch, extra)], dim=1)


class FaissIndex:
    """FAISS search over the L2-normalised rows of a [B, N, W] memory, one CPU index per batch element.

    Args:
        memory: [B, N, W], any device (copied to the CPU as float32).
        lists: None for an exhaustive `IndexFlatIP`; otherwise the number of inverted lists of an
            `IndexIVFFlat` (clamped to N), trained on up to 40 rows per list.
        probes: lists scanned per query (IVF only; clamped to `lists`).
        threads: FAISS OpenMP threads; None: `torch.get_num_threads()`.

    Raises:
        ImportError: if FAISS is not installed.
    """

    def __init__(self, memory: Tensor, lists: int | None = None, probes: int = 1, threads: int | None = None):
        faiss = import_faiss()
        self.faiss = faiss
        self.threads = torch.get_num_threads() if threads is None else threads
        faiss.omp_set_num_threads(self.threads)
        batch, cells, width = memory.shape
        self.cells, self.width = cells, width
        rows = _normalised_numpy(memory)  # [B, N, W]
        self.lists = None if lists is None else max(1, min(lists, cells))
        self.indexes = []
        for element in range(batch):
            if self.lists is None:
                index = faiss.IndexFlatIP(width)
                index.add(rows[element])
            else:
                quantizer = faiss.IndexFlatIP(width)
                index = faiss.IndexIVFFlat(quantizer, width, self.lists, faiss.METRIC_INNER_PRODUCT)
                index.set_direct_map_type(faiss.DirectMap.Hashtable)  # so rows can be removed by id
                step = max(1, cells // (IVF_TRAINING_ROWS_PER_LIST * self.lists))
                # A small memory has fewer than FAISS's wished-for 39 rows per list: train on what there is
                # without its warning on every call (one per batch element).
                index.cp.min_points_per_centroid = 1
                index.train(np.ascontiguousarray(rows[element, ::step]))
                index.add_with_ids(rows[element], np.arange(cells, dtype=np.int64))
                index.nprobe = max(1, min(probes, self.lists))
            self.indexes.append(index)

    def search(self, queries: Tensor, k: int) -> Tensor:
        k = min(k, self.cells)
        self.faiss.omp_set_num_threads(self.threads)
        found = []
        for index, element_queries in zip(self.indexes, _normalised_numpy(queries)):
            _, indices = index.search(element_queries, k)  # [Q, K] int64; -1 where fewer than K were found
            found.append(_fill_missing(indices))
        return torch.from_numpy(np.stack(found)).to(queries.device)

    def update(self, rows: Tensor, values: Tensor) -> None:
        self.faiss.omp_set_num_threads(self.threads)
        rows_numpy = rows.detach().cpu().numpy()
        values_numpy = _normalised_numpy(values)
        for index, element_rows, element_values in zip(self.indexes, rows_numpy, values_numpy):
            if self.lists is None:
                # IndexFlat stores its rows as one float array: overwrite them in place
                stored = self.faiss.rev_swig_ptr(index.get_xb(), self.cells * self.width).reshape(self.cells, -1)
                stored[element_rows] = element_values
            else:
                unique_rows, first = np.unique(element_rows, return_index=True)
                index.remove_ids(unique_rows)
                index.add_with_ids(np.ascontiguousarray(element_values[first]), unique_rows)


class KeptIndex:
    """One call's use of a kept index: searches and writes go to it, and the written rows are noted so
    that a later call from the same starting memory can put their starting values back (`IndexKeeper`).

    Args:
        index: the kept index (a `FaissIndex`).
        written: the keeper's list of the rows [B, M] written since its starting memory; appended to.
    """

    def __init__(self, index: NearestNeighbourIndex, written: list[Tensor]):
        self.index = index
        self.written = written

    def search(self, queries: Tensor, k: int) -> Tensor:
        return self.index.search(queries, k)

    def update(self, rows: Tensor, values: Tensor) -> None:
        self.written.append(rows.detach())  # before the update: a write cut short is rewritten too
        self.index.update(rows, values)


class _Remembered:
    """A memory tensor held by a detached reference (so its storage stays allocated and no other tensor
    can take its address) with what identifies its contents then: storage address and offset, shape,
    strides, dtype, device and in-place version (shared by `.detach()`ed views, bumped by every
    in-place change). A tensor with the same key is the same data, unchanged."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor.detach()
        self.key = _identity(tensor)

    def matches(self, tensor: Tensor) -> bool:
        return self.key is not None and _identity(tensor) == self.key


def _identity(tensor: Tensor) -> tuple | None:
    """What `_Remembered` compares; None for tensors without a version counter (inference mode)."""
    if tensor.is_inference():
        return None
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
            tensor.dtype, tensor.device, tensor._version)


class IndexKeeper:
    """A sparse memory's FAISS index, kept from one call to the next (`SparseMemory.begin` / `end`).

    `lend(memory, ...)` at the start of a call returns a search over `memory` [B, N, W]:
    (a) the kept index as it is when `memory` is the memory the latest call returned (`returned`);
    (b) the kept index with the rows written since its starting memory rewritten to their values in
        `memory`, when `memory` is that starting memory (a run repeated from the same state, or
        retried after an exception in the middle of a call);
    otherwise a new index (`build(memory)`), which is kept from then on. The index then holds exactly
    the rows of `memory`: with an exhaustive index (flat, or IVF probing every list) the searches are
    those of a new index; an IVF index keeps the lists it was trained on (the memory it was built
    from), so an approximate search may differ from a new index's where that memory and this one
    differ, as it differs from call to call without a kept index. An IVF index is also rebuilt, in
    (a) or (b), once the rows written since its build (counted up to `memory`) reach `RETRAIN_FACTOR`
    times the rows that held data at its build, and at least its number of lists: its lists then
    follow the memory's contents as they change, or fill from empty.

    Identity, not values, decides (comparing values would cost O(N W) per call): see `_Remembered`.
    Only one call uses the index at a time: while the call that took it is alive (begun, not ended,
    its context still referenced), another call builds a new index. The keeper is a cache, not state:
    it is not in `state_dict`, and copies (`copy.deepcopy`, pickling, `torch.save` of the module) are
    empty keepers (FAISS's objects cannot be pickled) that build at their first call.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.forget()

    def __reduce__(self) -> tuple:
        return (type(self), ())

    def forget(self) -> None:
        """Drop the kept index: the next call builds a new one."""
        self.index: NearestNeighbourIndex | None = None
        self.settings: Any = None
        self.start: _Remembered | None = None  # the memory the kept index's rows were last equal to
        self.end: _Remembered | None = None  # the memory the latest call returned (None until it ends)
        self.written: list[Tensor] = []  # the rows [B, M] written since `start`
        self.user: weakref.ref | None = None  # the `KeptIndex` of the call using the index now
        self.retrain_after: float | None = None  # IVF: rebuild once this many rows were written since the build
        self.writes_before_start = 0  # rows written between the build and `start`

    def lend(self, memory: Tensor, settings: Any, build: Callable[[Tensor], NearestNeighbourIndex]) -> KeptIndex:
        """The search for a call starting from memory [B, N, W] (class docstring); `settings` (the index's
        options) must equal the kept index's for it to be reused."""
        with self._lock:
            case = None
            if self.index is not None and self.settings == settings and (self.user is None or self.user() is None):
                if self.end is not None and self.end.matches(memory):
                    case = "returned"  # (a)
                elif self.start is not None and self.start.matches(memory):
                    case = "started"  # (b)
            since_build = self.writes_before_start  # row writes from the build to `memory`
            if case == "returned":
                since_build += sum(rows.size(1) for rows in self.written)
            if case is not None and not self._stale(since_build):
                if case == "returned":
                    self.start, self.end, self.written = self.end, None, []
                else:
                    if self.written:  # back to the starting values
                        rows = torch.cat(self.written, dim=1)  # [B, M], repeats carry equal values
                        base = self.start.tensor
                        self.index.update(rows, base.gather(1, rows.unsqueeze(-1).expand(-1, -1, base.size(-1))))
                    self.end, self.written = None, []
                self.writes_before_start = since_build
                return self._lent()
            self.forget()
            self.index, self.settings, self.start = build(memory), settings, _Remembered(memory)
            if getattr(self.index, "lists", None) is not None:  # IVF: retrain as the contents change
                self.retrain_after = RETRAIN_FACTOR * max(filled_rows(memory), self.index.lists)
            return self._lent()

    def _stale(self, writes: int) -> bool:
        """Whether an IVF index after `writes` row writes since its build is to be trained again."""
        return self.retrain_after is not None and writes >= self.retrain_after

    def _lent(self) -> KeptIndex:
        lent = KeptIndex(self.index, self.written)
        self.user = weakref.ref(lent)
        return lent

    def returned(self, index: NearestNeighbourIndex, memory: Tensor) -> None:
        """The call that was lent `index` ended with memory [B, N, W]: the kept index now holds its rows."""
        with self._lock:
            if self.user is not None and self.user() is index:
                self.end, self.user = _Remembered(memory), None


def _top_rows_of_many(scores: Tensor, k: int) -> Tensor:
    """`_top_rows(scores, None, k)` over many rows, in two rounds: the best k blocks of BLOCK rows by their
    best score, then the best k of those blocks' rows.

    Exact, ties included: order rows by (score descending, row ascending) and blocks by (best score
    descending, block ascending). Every block ranked above a row's block holds a row ranked above that row
    (its own best, whose row number is lower on a tie of bests, blocks being runs of rows), so a row of the
    k best lies in one of the k best blocks. A full memory's search thus reads its [B, Q, N] scores once
    (the maxima) instead of a top-k over all N (four times slower on the CPU at 65,536 rows).

    Args:
        scores: [B, Q, N] (any strides).

    Returns:
        [B, Q, min(k, N)] rows, best first.
    """
    count = scores.size(-1)
    k = min(k, count)
    blocks = count // BLOCK
    if blocks < 4 * k:
        return _top_rows(scores, None, k)
    whole = blocks * BLOCK
    maxima = scores[..., :whole].unflatten(-1, (blocks, BLOCK)).amax(-1)  # [B, Q, blocks]
    if whole < count:  # a last, shorter block
        maxima = torch.cat([maxima, scores[..., whole:].amax(-1, keepdim=True)], dim=-1)
    chosen = _top_rows(maxima, None, k).sort(dim=-1).values  # [B, Q, k] blocks, ascending
    rows = (chosen.unsqueeze(-1) * BLOCK + torch.arange(BLOCK, device=scores.device)).flatten(-2)  # [B, Q, k BLOCK]
    inside = rows < count  # rows past the end of the last block
    candidates = scores.gather(-1, rows.clamp_max(count - 1)).masked_fill_(~inside, float("-inf"))
    return _top_rows(candidates, rows, k)


def _top_rows(scores: Tensor, rows: Tensor | None, k: int) -> Tensor:
    """The k best candidates per query, ties going to the lower row number, best first.

    Args:
        scores: [B, Q, M] candidate scores (at least k finite per query).
        rows: [B, M] (shared by the queries) or [B, Q, M] the candidates' rows, ascending, or None for
            rows 0..M-1.

    Returns:
        [B, Q, k] rows.
    """
    count = scores.size(-1)
    best, places = scores.topk(min(k + 1, count), dim=-1)  # [B, Q, k (+ 1)]
    if k < count and bool((best[..., k - 1] == best[..., k]).any()):  # a tie across the cut: lower rows first
        threshold = best[..., k - 1:k]  # [B, Q, 1], the k-th best score
        above = scores > threshold
        tied = scores == threshold
        taken = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))  # k per query
        places = torch.arange(count, device=scores.device)
        places = torch.where(taken, places, count).topk(k, dim=-1, largest=False).values
    else:
        places = places[..., :k].sort(dim=-1).values
    # best first; ties stay in row order
    places = places.gather(-1, scores.gather(-1, places).argsort(dim=-1, descending=True, stable=True))
    if rows is None:
        return places
    if rows.dim() == 2:
        rows = rows.unsqueeze(1).expand(-1, scores.size(1), -1)
    return rows.gather(-1, places)


def make_index(kind: str, memory: Tensor, lists: int | None = None, probes: int = 1,
               threads: int | None = None) -> NearestNeighbourIndex:
    """The search named `kind` ('exact' or 'faiss') over `memory` [B, N, W] (see the classes)."""
    if kind == "exact":
        return ExactIndex(memory)
    if kind == "faiss":
        return FaissIndex(memory, lists=lists, probes=probes, threads=threads)
    raise ValueError(f"unknown nearest-neighbour index {kind!r}; choose one of {', '.join(INDEXES)}")


def filled_rows(memory: Tensor) -> int:
    """The most rows holding data (non-zero) in one batch element of memory [B, N, W]."""
    return int((_row_norms(memory.detach()) > 0).sum(1).max())


def mostly_empty(memory: Tensor) -> bool:
    """Whether no batch element of memory [B, N, W] has more than `SPARSE_FRACTION` of its rows non-zero
    (where `ExactIndex` scores only the rows that hold data)."""
    return filled_rows(memory) <= SPARSE_FRACTION * memory.size(1)


def _row_norms(rows: Tensor) -> Tensor:
    """|row| of [B, N, W] -> [B, N]; computed once per distinct row of a broadcast (expanded) tensor."""
    distinct = rows[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in rows.stride()[:2])]
    return distinct.norm(dim=-1).expand(rows.shape[:2])


def _normalised_numpy(rows: Tensor) -> np.ndarray:
    """[..., W] -> float32 numpy rows scaled to unit length (zero rows stay zero), contiguous."""
    with torch.no_grad():
        scaled = rows * inverse_norms(rows).unsqueeze(-1)
    return np.ascontiguousarray(scaled.to(device="cpu", dtype=torch.float32).numpy())


def _fill_missing(indices: np.ndarray) -> np.ndarray:
    """Replace FAISS's -1 (an IVF probe found fewer than K rows) by the query's best row (or row 0)."""
    missing = indices < 0
    if missing.any():
        best = np.where(indices[:, :1] >= 0, indices[:, :1], 0)  # [Q, 1]
        indices = np.where(missing, best, indices)
    return indices
