"""Nearest-neighbour search for the sparse memories: exact search against brute force, the incremental
index against a fresh search after writes, and FAISS against the exact search."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from models.dnc import search
from models.dnc.search import ExactIndex, cosine_similarity, cosine_topk, first_occurrence, make_index


def brute_force_topk(queries, memory, k):
    """Cosine top-k by Python loops over rows: (similarities, indices) lists per batch and query."""
    result = []
    for batch in range(memory.size(0)):
        per_query = []
        for query in queries[batch]:
            scored = []
            for row in range(memory.size(1)):
                value = memory[batch, row]
                cosine = float(query @ value) / (max(float(query.norm()), 1e-6) * max(float(value.norm()), 1e-6))
                scored.append((cosine, row))
            scored.sort(key=lambda pair: -pair[0])
            per_query.append(scored[:k])
        result.append(per_query)
    return result


@pytest.mark.parametrize("cells,k", [(1, 1), (1, 4), (3, 5), (17, 4)])
def test_cosine_topk_is_brute_force(cells, k):
    generator = torch.Generator().manual_seed(cells)
    queries = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    memory = torch.randn(2, cells, 5, generator=generator, dtype=torch.float64)
    similarities, indices = cosine_topk(queries, memory, k)
    assert indices.shape == (2, 3, min(k, cells))  # K is clamped to N
    expected = brute_force_topk(queries, memory, k)
    for batch in range(2):
        for query in range(3):
            assert indices[batch, query].tolist() == [row for _, row in expected[batch][query]]
            torch.testing.assert_close(similarities[batch, query],
                                       torch.tensor([value for value, _ in expected[batch][query]],
                                                    dtype=torch.float64))


def test_cosine_similarity_formula_and_zero_rows():
    queries = torch.tensor([[3.0, 4.0]])
    rows = torch.tensor([[[6.0, 8.0], [0.0, 0.0], [-4.0, 3.0]]])
    torch.testing.assert_close(cosine_similarity(queries, rows), torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(cosine_similarity(queries, rows[:, 2:]),
                               F.cosine_similarity(queries, rows[0, 2:]).view(1, 1))


def test_first_occurrence():
    positions = torch.tensor([[4, 2, 4, 7, 2, 4]])
    assert first_occurrence(positions).tolist() == [[0, 1, 0, 3, 1, 0]]


def _random_writes(generator, batch, cells, width, count):
    rows = torch.randint(0, cells, (batch, count), generator=generator)
    rows[:, -1] = rows[:, 0]  # a repeated row, with the same value
    values = torch.randn(batch, count, width, generator=generator)
    values[:, -1] = values[:, 0]
    values[:, 1] = 0  # writes can make a row zero again
    return rows, values


@pytest.mark.parametrize("zero_fraction", [0.0, 0.6, 0.95, 1.0])
def test_exact_index_follows_writes(zero_fraction):
    """After each batch of writes the index returns the exact top-K of the current memory; a memory
    that is mostly zero takes the sparse path (zero rows stand in as the lowest-numbered ones)."""
    generator = torch.Generator().manual_seed(int(zero_fraction * 100))
    batch, cells, width, k = 3, 23, 4, 4
    memory = torch.randn(batch, cells, width, generator=generator)
    memory[torch.rand(batch, cells, generator=generator) < zero_fraction] = 0
    index = ExactIndex(memory)
    assert index.dense == bool((memory.norm(dim=-1) > 0).sum(1).max() > search.SPARSE_FRACTION * cells)
    current = memory.clone()
    written = [set() for _ in range(batch)]
    for _ in range(5):
        queries = torch.randn(batch, 2, width, generator=generator)
        found = index.search(queries, k)
        expected_scores, expected_rows = cosine_topk(queries, current, k)
        rows_found = current.gather(1, found.view(batch, -1, 1).expand(-1, -1, width)).view(batch, 2, k, width)
        torch.testing.assert_close(cosine_similarity(queries, rows_found), expected_scores)
        for rows in found.view(-1, k):
            assert len(set(rows.tolist())) == k  # distinct rows
        nonzero_best = expected_scores > 0
        assert torch.equal(found[nonzero_best], expected_rows[nonzero_best])  # no ties there
        if not index.dense:  # zero rows found: the lowest-numbered never written, or written with zeros
            for element in range(batch):
                zero_rows = (current[element].norm(dim=-1) == 0).nonzero().squeeze(1).tolist()
                picked = {row for row in found[element].flatten().tolist() if row in zero_rows}
                untouched = [row for row in zero_rows if row not in written[element]]
                assert picked <= set(untouched[:k]) | written[element]
        rows, values = _random_writes(generator, batch, cells, width, 5)
        for element in range(batch):
            written[element].update(rows[element].tolist())
        current.scatter_(1, rows.unsqueeze(-1).expand(-1, -1, width), values)
        index.update(rows, values)


@pytest.mark.parametrize("nonzero_rows", [2, 20])
def test_exact_index_ties_go_to_lower_rows_whatever_the_history(nonzero_rows):
    """Equal scores (zero rows, repeated rows) are resolved by row number, so an index that saw the
    writes finds the same rows as one built on the memory after them (sparse and dense paths)."""
    generator = torch.Generator().manual_seed(nonzero_rows)
    batch, cells, width, k = 2, 24, 3, 6
    memory = torch.zeros(batch, cells, width)
    memory[:, :nonzero_rows] = torch.randn(batch, nonzero_rows, width, generator=generator)
    memory[:, 1] = memory[:, 0]  # a tie between two non-zero rows
    index = ExactIndex(memory)
    rows = torch.tensor([[5, 9, 0], [3, 4, 23]])
    values = torch.zeros(batch, 3, width)
    values[:, 2] = torch.randn(batch, width, generator=generator)
    index.update(rows, values)
    current = memory.scatter(1, rows.unsqueeze(-1).expand(-1, -1, width), values)
    queries = torch.randn(batch, 4, width, generator=generator)
    found = index.search(queries, k)
    assert torch.equal(found, ExactIndex(current).search(queries, k))
    for element in range(batch):
        for query in range(4):
            by_score_then_row = sorted(range(cells), key=lambda row: (-float(
                cosine_similarity(queries[element, query], current[element, row].view(1, -1))), row))
            assert found[element, query].tolist() == by_score_then_row[:k]


def test_exact_index_with_few_rows_and_broadcast_memory():
    memory = torch.zeros(1, 1, 1).expand(2, 3, 4)  # a fresh state's broadcast view
    index = ExactIndex(memory)
    assert not index.dense
    assert index.search(torch.randn(2, 1, 4), 5).tolist() == [[[0, 1, 2]], [[0, 1, 2]]]  # K clamped to N
    index.update(torch.tensor([[1], [2]]), torch.ones(2, 1, 4))
    best = index.search(torch.ones(2, 1, 4), 1)
    assert best.tolist() == [[[1]], [[2]]]


@pytest.mark.parametrize("cells,k", [(64 * 16 + 37, 4), (64 * 40, 5), (64 * 8, 1), (300, 9)])
def test_two_round_top_k_equals_one_round_with_ties(cells, k):
    """The block-maxima top-k of a full memory returns exactly the rows of the plain top-k, ties to the lower
    row included: scores on a coarse grid tie often, also across blocks and in the last, shorter block, and
    a strided (transposed) score tensor reads the same."""
    generator = torch.Generator().manual_seed(cells + k)
    scores = torch.randint(0, 12, (3, 2, cells), generator=generator).float()  # many ties
    scores[0, 0, -1] = 99.0  # the best row is the very last one
    scores[1, :, 64:128] = 50.0  # one whole block tied at the top
    scores[2] -= 20.0  # all negative but the last row: the last block is chosen, past its end nothing counts
    scores[2, :, -1] = 1.0
    expected = search._top_rows(scores, None, k)
    for layout in (scores, scores.transpose(1, 2).contiguous().transpose(1, 2)):
        assert torch.equal(search._top_rows_of_many(layout, k), expected)
    by_score_then_row = sorted(range(cells), key=lambda row: (-float(scores[2, 1, row]), row))
    assert expected[2, 1].tolist() == by_score_then_row[:k]
    assert expected[0, 0, 0] == cells - 1 and expected[2, 1, 0] == cells - 1


def test_make_index_rejects_unknown_kind():
    with pytest.raises(ValueError, match="exact, faiss"):
        make_index("annoy", torch.zeros(1, 2, 3))


def test_missing_faiss_says_how_to_install(monkeypatch):
    real_import = importlib.import_module

    def no_faiss(name, *args):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args)

    monkeypatch.setattr(search.importlib, "import_module", no_faiss)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        make_index("faiss", torch.zeros(1, 2, 3))


@pytest.mark.parametrize("lists", [None, 4])
def test_faiss_exhaustive_equals_exact(lists):
    """IndexFlatIP (and an IVF index probing all its lists) returns exactly the exact top-K, also after
    rows are written; FAISS runs on the threads asked for."""
    faiss = pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(3)
    batch, cells, width, k = 2, 200, 8, 5
    memory = torch.randn(batch, cells, width, generator=generator)
    index = make_index("faiss", memory, lists=lists, probes=lists or 1, threads=1)
    assert faiss.omp_get_max_threads() == 1
    current = memory.clone()
    for _ in range(3):
        queries = torch.randn(batch, 3, width, generator=generator)
        assert torch.equal(index.search(queries, k), cosine_topk(queries, current, k)[1])
        rows, values = _random_writes(generator, batch, cells, width, 6)
        current.scatter_(1, rows.unsqueeze(-1).expand(-1, -1, width), values)
        index.update(rows, values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exact_index_on_gpu_matches_cpu():
    generator = torch.Generator().manual_seed(5)
    memory = torch.randn(2, 50, 8, generator=generator)
    queries = torch.randn(2, 3, 8, generator=generator)
    found = ExactIndex(memory.cuda()).search(queries.cuda(), 4)
    assert found.device.type == "cuda"
    assert torch.equal(found.cpu(), ExactIndex(memory).search(queries, 4))


def test_faiss_ivf_over_a_small_memory_trains_without_warnings(capfd):
    """FAISS wants 39 training rows per list and says so on stderr (C level) for every index it trains, i.e.
    once per batch element and call; a small memory trains on the rows it has, quietly (and probing every
    list still finds the exact rows)."""
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(8)
    memory = torch.randn(2, 1024, 8, generator=generator)
    queries = torch.randn(2, 3, 8, generator=generator)
    index = make_index("faiss", memory, lists=32, probes=32, threads=1)
    assert torch.equal(index.search(queries, 4), cosine_topk(queries, memory, 4)[1])
    assert "WARNING clustering" not in capfd.readouterr().err


# --------------------------------------------------------------------------------------------------
# The FAISS index kept from call to call (IndexKeeper).


class CountingBuild:
    """A keeper's `build`: a new FAISS index over the memory, counted."""

    def __init__(self, lists):
        self.lists, self.count = lists, 0

    def __call__(self, memory):
        self.count += 1
        return make_index("faiss", memory, lists=self.lists, probes=self.lists or 1, threads=1)


def _calls_with_writes(index, current, generator, lists, steps=3):
    """Write random rows into `index` and `current` step by step; after each write, the index finds what a
    new index over `current` finds, which is the exact top-K (an exhaustive index)."""
    batch, cells, width = current.shape
    for _ in range(steps):
        rows, values = _random_writes(generator, batch, cells, width, 5)
        current.scatter_(1, rows.unsqueeze(-1).expand(-1, -1, width), values)
        index.update(rows, values)
        queries = torch.randn(batch, 3, width, generator=generator)
        fresh = make_index("faiss", current, lists=lists, probes=lists or 1, threads=1)
        assert torch.equal(index.search(queries, 5), fresh.search(queries, 5))
        assert torch.equal(index.search(queries, 5), cosine_topk(queries, current, 5)[1])
    return current


@pytest.mark.parametrize("lists", [None, 4])
def test_kept_index_equals_a_new_index_over_the_same_memory(lists):
    """(a) A call from the memory the latest call returned (also detached) and (b) a call repeated from the
    latest call's start, or retried after one cut short, take the kept index without building one, and it
    finds at every step what a new index over the current memory finds (flat, and IVF probing all lists)."""
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(11)
    keeper, build, settings = search.IndexKeeper(), CountingBuild(lists), (lists,)
    start = torch.randn(2, 200, 8, generator=generator)
    lent = keeper.lend(start, settings, build)
    end = _calls_with_writes(lent, start.clone(), generator, lists)
    keeper.returned(lent, end)
    assert build.count == 1
    carried = end.detach()  # (a): the next BPTT window, from the detached state
    lent = keeper.lend(carried, settings, build)
    later = _calls_with_writes(lent, carried.clone(), generator, lists)
    keeper.returned(lent, later)
    for _ in range(2):  # (b): the same call again, from its start; then one cut short (no `returned`)
        lent = keeper.lend(end, settings, build)
        queries = torch.randn(2, 3, 8, generator=generator)
        assert torch.equal(lent.search(queries, 5), cosine_topk(queries, end, 5)[1])  # the writes undone
        _calls_with_writes(lent, end.clone(), generator, lists)
        del lent
    lent = keeper.lend(end, settings, build)
    queries = torch.randn(2, 3, 8, generator=generator)
    assert torch.equal(lent.search(queries, 5), cosine_topk(queries, end, 5)[1])
    assert build.count == 1


def test_kept_ivf_index_is_retrained_as_the_memory_fills():
    """An IVF index built on an empty memory (all rows in one list) is rebuilt at the start of a call once the
    rows written since its build reach its lists, then the rows that held data at the last build: its lists
    follow the contents (no list holds them all), and every step still finds what a new index finds."""
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(15)
    lists = 4
    keeper, build = search.IndexKeeper(), CountingBuild(lists)
    memory = torch.zeros(2, 120, 8)
    builds_at_call, expected, writes, threshold = [], [], 0, 0
    for call in range(8):  # calls of 2 steps of 5 row writes: 10 writes per call
        if call == 0 or writes >= threshold:  # the rule, in plain terms
            writes, threshold = 0, max(lists, int((memory.norm(dim=-1) > 0).sum(1).max()))
        expected.append(expected[-1] + (writes == 0) if expected else 1)
        writes += 10
        lent = keeper.lend(memory, (lists,), build)
        builds_at_call.append(build.count)
        memory = memory.clone()
        for _ in range(2):
            rows, values = _random_writes(generator, 2, 120, 8, 5)
            memory.scatter_(1, rows.unsqueeze(-1).expand(-1, -1, 8), values)
            lent.update(rows, values)
            queries = torch.randn(2, 3, 8, generator=generator)
            rows_found = memory.gather(1, lent.search(queries, 5).view(2, -1, 1).expand(-1, -1, 8)).view(2, 3, 5, 8)
            # the exact rows' scores (which of the many zero rows stand for 0 may differ)
            torch.testing.assert_close(cosine_similarity(queries, rows_found), cosine_topk(queries, memory, 5)[0])
        keeper.returned(lent, memory)
    assert builds_at_call == expected and build.count >= 4  # retrained more than once as the memory filled
    faiss = pytest.importorskip("faiss")
    invlists = keeper.index.indexes[0].invlists
    data_rows = set((memory[0].norm(dim=-1) > 0).nonzero().squeeze(1).tolist())
    per_list = [set(faiss.rev_swig_ptr(invlists.get_ids(number), invlists.list_size(number)).tolist()) & data_rows
                for number in range(lists)]
    assert max(map(len, per_list)) < len(data_rows) - 5  # the rows with data spread over the lists


def test_kept_index_is_rebuilt_for_another_or_changed_memory():
    """A copy with the same values, an in-place change (even of a view), other settings, and a call while
    the one that took the index is still running all build a new index; the search then follows the memory
    as it is now."""
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(12)
    keeper, build, settings = search.IndexKeeper(), CountingBuild(None), (None,)
    start = torch.randn(2, 100, 8, generator=generator)
    queries = torch.randn(2, 3, 8, generator=generator)
    keeper.returned(keeper.lend(start, settings, build), start)
    assert build.count == 1
    keeper.lend(start.clone(), settings, build)  # same values, other storage
    assert build.count == 2
    keeper.returned(keeper.lend(start, settings, build), start)
    assert build.count == 3
    start[:, 5] = -10 * queries[:, 0]  # in place: row 5 is now the worst row for query 0
    start.detach()[1, 7] = 10 * queries[1, 1]  # in place through a detached view: row 7 the best for query 1
    lent = keeper.lend(start, settings, build)
    assert build.count == 4
    found = lent.search(queries, 100)
    assert found[0, 0, -1] == 5 and found[1, 1, 0] == 7
    assert torch.equal(found[..., :5], cosine_topk(queries, start, 5)[1])
    assert keeper.lend(start, settings, build) is not lent and build.count == 5  # `lent` still in use
    keeper.lend(start, (4,), build)  # other settings
    assert build.count == 6


def test_index_keeper_copies_and_pickles_empty():
    """FAISS's objects cannot be pickled: copies of a keeper (deepcopy, pickle) are empty and build again."""
    import copy
    import pickle

    pytest.importorskip("faiss")
    keeper, build = search.IndexKeeper(), CountingBuild(None)
    memory = torch.randn(1, 10, 4)
    keeper.returned(keeper.lend(memory, (None,), build), memory)
    for copied in (copy.deepcopy(keeper), pickle.loads(pickle.dumps(keeper))):
        assert copied.index is None and copied.start is None
        copied.lend(memory, (None,), build)
    assert build.count == 3
