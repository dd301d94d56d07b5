"""SAM and SDNC memories: each step against a plain dense re-derivation, LRU and write semantics on
hand-built cases, the sparse links, gradients (gradcheck in float64), masks, state handling, sizes."""

import time

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from models.dnc.search import cosine_topk
from models.dnc.sparse_memory import SparseInterface, SparseMemory
from models.dnc.sparse_temporal_memory import SparseTemporalMemory

SAM_KEYS = {"memory", "visible_memory", "read_positions", "read_weights", "write_weights", "usage"}
SDNC_KEYS = SAM_KEYS | {"link_matrix", "rev_link_matrix", "link_index", "rev_link_index", "precedence"}


# --------------------------------------------------------------------------------------------------
# A dense re-derivation of one step, from the equations in the modules' docstrings.


def dense_view(memory, ctx):
    """The context's state as dense tensors: memory, usage, step, read weights [B, R, N], and for the
    SDNC the link matrix from the row lists and from the column lists, and the precedence."""
    batch, cells = ctx.usage.shape
    view = {
        "memory": torch.stack([ctx.memory.dense(element) for element in range(batch)]),
        "usage": ctx.usage.clone(), "step": ctx.step.clone(),
        "read_weights": torch.zeros(batch, memory.read_heads, cells, dtype=ctx.read_weights.dtype).scatter_add(
            2, ctx.read_positions, ctx.read_weights.detach()),
    }
    if isinstance(memory, SparseTemporalMemory):
        def matrix(index_store, value_store, transpose):
            dense = torch.zeros(batch, cells, cells, dtype=ctx.read_weights.dtype)
            for element in range(batch):
                index, value = index_store.dense(element).long(), value_store.dense(element)
                dense[element].scatter_add_(1, index, value)
            return dense.transpose(1, 2) if transpose else dense

        view["links"] = matrix(ctx.link_index, ctx.link_value, False)
        view["rev_links"] = matrix(ctx.rev_link_index, ctx.rev_link_value, True)
        view["precedence"] = torch.zeros(batch, cells, dtype=ctx.precedence.dtype).scatter_add(
            1, ctx.precedence_index, ctx.precedence.detach())
    return view


def keep_largest(values, count, dim):
    """values with all but the `count` largest along `dim` set to zero."""
    top = values.topk(min(count, values.size(dim)), dim=dim).indices
    return torch.zeros_like(values).scatter(dim, top, values.gather(dim, top))


def reference_step(memory, state, interface, mask=None):
    """One SAM / SDNC step on dense tensors. Returns (reads [B, R, W], new dense state)."""
    cells, found = state["memory"].size(1), memory.sparse_reads
    least_used = state["usage"].argmin(1)
    one_hot = F.one_hot(least_used, cells).to(state["memory"].dtype)  # [B, N]
    alpha, gamma = interface.write_gate, interface.interpolation_gate  # [B, 1]
    write = alpha * (gamma * state["read_weights"].mean(1) + (1 - gamma) * one_hot)  # [B, N]
    new_memory = (state["memory"] * (1 - one_hot).unsqueeze(-1)  # R_t = I^U 1^T: the LRU row is set to zero
                  + write.unsqueeze(-1) * interface.write_vector.unsqueeze(1))
    similarity = (torch.einsum("brw,bnw->brn", interface.read_queries, new_memory)
                  / interface.read_queries.norm(dim=-1, keepdim=True).clamp_min(1e-6)
                  / new_memory.norm(dim=-1).clamp_min(1e-6).unsqueeze(1))  # [B, R, N]
    top = similarity.topk(found, dim=-1).indices
    content = torch.zeros_like(similarity).scatter(
        -1, top, torch.softmax(interface.read_strengths.unsqueeze(-1) * similarity.gather(-1, top), dim=-1))
    new_state = {"memory": new_memory}
    if isinstance(memory, SparseTemporalMemory):
        links_kept = memory.temporal_reads
        links = state["links"]
        links = ((1 - write.unsqueeze(2) - write.unsqueeze(1)) * links
                 + write.unsqueeze(2) * state["precedence"].unsqueeze(1))
        links = links * (1 - torch.eye(cells, dtype=links.dtype))
        survivors = (links > 0) & (keep_largest(links, links_kept, 2) > 0) & (keep_largest(links, links_kept, 1) > 0)
        links = links * survivors
        precedence = keep_largest((1 - write.sum(1, keepdim=True)) * state["precedence"] + write, links_kept, 1)
        forward = keep_largest(torch.einsum("bij,bhj->bhi", links, state["read_weights"]), links_kept, 2)
        backward = keep_largest(torch.einsum("bij,bhi->bhj", links, state["read_weights"]), links_kept, 2)
        modes = interface.read_modes  # [B, R, 3]: backward, content, forward
        read_weights = modes[..., :1] * backward + modes[..., 1:2] * content + modes[..., 2:] * forward
        new_state.update(links=links, rev_links=links, precedence=precedence)
    else:
        read_weights = content
    reads = torch.bmm(read_weights, new_memory)  # [B, R, N] x [B, N, W]
    accessed = (write > memory.access_threshold) | (read_weights > memory.access_threshold).any(1)
    new_state["usage"] = torch.where(accessed, (state["step"] + 1).unsqueeze(1), state["usage"])
    new_state["step"] = state["step"] + 1
    new_state["read_weights"] = read_weights
    if mask is not None:
        for key, value in new_state.items():
            keep = mask.view(-1, *[1] * (value.dim() - 1))
            new_state[key] = torch.where(keep, value, state[key])
    return reads, new_state


def random_state(memory, batch, generator, dtype=torch.float32, warmup=2):
    """A state with a random memory (all rows non-zero: no ties in the searches) after a few steps."""
    state = memory.initial_state(batch, dtype=dtype)
    state["memory"] = torch.randn(batch, memory.nr_cells, memory.cell_size, generator=generator, dtype=dtype)
    with torch.no_grad():
        context = memory.begin(state)
        for _ in range(warmup):
            memory.step(context, torch.randn(batch, memory.input_size, generator=generator, dtype=dtype))
        return memory.end(context)


def make(kind, cells=9, width=4, heads=2, sparse=3, links=2, inputs=6, seed=0, **options):
    torch.manual_seed(seed)
    if kind == "SAM":
        return SparseMemory(inputs, cells, width, heads, sparse_reads=sparse, **options)
    return SparseTemporalMemory(inputs, cells, width, heads, sparse_reads=sparse, temporal_reads=links, **options)


# --------------------------------------------------------------------------------------------------
# Values against the re-derivation.


@pytest.mark.parametrize("kind,cells,links", [("SAM", 9, 2), ("SDNC", 9, 2), ("SDNC", 7, 7)])
def test_steps_match_dense_reference(kind, cells, links):
    """Reads, memory, usage (LRU), read weights (the exact top-K and, for the SDNC, forward/backward
    reads) and the SDNC's links (both lists) and precedence equal the dense re-derivation; the rows
    found are the exact search's. links == cells: no cut, the plain DNC link update."""
    generator = torch.Generator().manual_seed(cells + links)
    memory = make(kind, cells=cells, links=links)
    state = random_state(memory, 3, generator)
    context = memory.begin(state)
    expected = dense_view(memory, context)
    for step in range(6):
        xi = torch.randn(3, memory.input_size, generator=generator)
        mask = torch.tensor([True, step != 2, True])
        with torch.no_grad():
            interface = memory.interface(xi)
            reads = memory.step(context, xi, mask).view(3, memory.read_heads, memory.cell_size)
        expected_reads, expected = reference_step(memory, expected, interface, mask)
        got = dense_view(memory, context)
        torch.testing.assert_close(reads[mask], expected_reads[mask], atol=1e-5, rtol=1e-4)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-4, msg=f"step {step}: {key}")
        content = context.read_positions[:, :, :memory.sparse_reads]
        exact = cosine_topk(interface.read_queries, got["memory"], memory.sparse_reads)[1]
        assert torch.equal(content[mask], exact[mask])
        if kind == "SDNC":
            assert (got["links"] > 0).any()
            assert ((got["links"] > 0).sum(2) <= links).all() and ((got["links"] > 0).sum(1) <= links).all()


def test_links_are_kept_across_calls():
    """The links of one call are where the next call starts (the published library zeroed them)."""
    generator = torch.Generator().manual_seed(0)
    memory = make("SDNC")
    state = random_state(memory, 2, generator, warmup=4)
    assert (state["link_value"] > 0).any()
    context = memory.begin(state)
    torch.testing.assert_close(dense_view(memory, context)["links"],
                               torch.zeros(2, 9, 9).scatter_add(2, state["link_index"].long(), state["link_value"]))


# --------------------------------------------------------------------------------------------------
# Hand-built cases: LRU order and the interpolation gate.


def scripted(memory, interfaces):
    """Make `memory.interface` return the given interfaces in order (xi is then ignored)."""
    queue = list(interfaces)
    memory.interface = lambda xi: queue.pop(0)


def interface_for(query, write_vector, interpolation, write_gate=1.0, strength=50.0):
    batch = query.size(0)
    return SparseInterface(read_queries=query.view(batch, 1, -1), read_strengths=torch.full((batch, 1), strength),
                           write_vector=write_vector, interpolation_gate=torch.full((batch, 1), interpolation),
                           write_gate=torch.full((batch, 1), write_gate), read_modes=None)


def test_lru_order_on_hand_built_accesses():
    """N = 4, one head reading one row. Writes go to the LRU row (gamma = 0) and the head reads back
    what was written, so rows are used 0, 1, 2, 3. At step 5 row 0 is written and row 1 read, so the
    next rows written are 2 and 3; then rows 0 and 1, both last accessed at step 5, tie and the lower
    goes first: 0, then 1."""
    memory = SparseMemory(3, 4, 4, 1, sparse_reads=1)
    basis = torch.eye(4)
    steps = []  # (query, write vector)
    for row in range(4):  # steps 1-4 fill rows 0..3 with e_0..e_3 and read them back
        steps.append((basis[row], basis[row]))
    steps.append((basis[1], 0.5 * basis[0]))  # step 5: write to LRU row 0, read row 1 (e_1)
    # steps 6-9: rewrite the LRU row with its content (row 0: a quarter of it) and read it back
    steps += [(basis[2], basis[2]), (basis[3], basis[3]), (basis[0], 0.25 * basis[0]), (basis[1], basis[1])]
    scripted(memory, [interface_for(query.view(1, 4), vector.view(1, 4), 0.0) for query, vector in steps])
    context = memory.begin(memory.initial_state(1))
    written, usages = [], []
    for _ in steps:
        memory.step(context, torch.zeros(1, 3))
        written.append(int(context.least_used[0]))
        usages.append(context.usage[0].tolist())
    assert written == [0, 1, 2, 3, 0, 2, 3, 0, 1]
    assert usages[3] == [1, 2, 3, 4]
    assert usages[4] == [5, 5, 3, 4]  # row 0 written, row 1 read at step 5
    assert usages[8] == [8, 9, 6, 7]
    torch.testing.assert_close(context.memory.dense(0)[0], 0.25 * basis[0])  # the LRU row is erased, then written


@pytest.mark.parametrize("previous_read,expected", [
    (2, [[1.0, 2.0], [6.0, -6.0], [7.0, 4.0]]),  # row 1 (LRU): 0 + 0.6 a; row 2 (read): M + 0.2 a
    (1, [[1.0, 2.0], [8.0, -8.0], [5.0, 6.0]]),  # the LRU row was also read: 0 + (0.2 + 0.6) a
])
def test_write_step_by_hand(previous_read, expected):
    """The paper's write section by hand: N = 3, W = 2, one head that read one row at t-1 with weight 1.
    alpha = 0.8, gamma = 0.25, a = (10, -10), row 1 least recently used. w^W = 0.8 (0.25 w^R + 0.75 I^U);
    M_t = (1 - I^U 1^T) M + w^W a^T zeroes row 1 whatever the gates (the old rule, which kept
    1 - alpha (1 - gamma) = 0.4 of it, gives (7.2, -4.4) for row 1)."""
    memory = SparseMemory(3, 3, 2, 1, sparse_reads=1)
    state = memory.initial_state(1)
    state.update(memory=torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]),
                 usage=torch.tensor([[2, 0, 1]], dtype=torch.int32), step=torch.tensor([2], dtype=torch.int32),
                 read_positions=torch.tensor([[[previous_read]]]), read_weights=torch.ones(1, 1, 1))
    scripted(memory, [interface_for(torch.tensor([[1.0, 0.0]]), torch.tensor([[10.0, -10.0]]), 0.25, 0.8)])
    context = memory.begin(state)
    memory.step(context, torch.zeros(1, 3))
    torch.testing.assert_close(context.memory.dense(0), torch.tensor(expected))


@pytest.mark.parametrize("interpolation", [0.0, 1.0])
def test_write_goes_to_lru_or_previous_reads(interpolation):
    """gamma = 0 writes alpha a into the LRU row only (after setting it to zero); gamma = 1 adds
    alpha w^R_{t-1} a to the rows read at the previous step only, and still zeroes the LRU row."""
    generator = torch.Generator().manual_seed(1)
    memory = make("SAM", cells=8, heads=2, sparse=2)
    state = random_state(memory, 2, generator)
    context = memory.begin(state)
    before = dense_view(memory, context)
    write_vector = torch.randn(2, memory.cell_size, generator=generator)
    queries = torch.randn(2, 2, memory.cell_size, generator=generator)
    scripted(memory, [SparseInterface(queries, torch.ones(2, 2), write_vector, torch.full((2, 1), interpolation),
                                      torch.full((2, 1), 0.7), None)])
    memory.step(context, torch.zeros(2, memory.input_size))
    after = dense_view(memory, context)["memory"]
    least_used = state["usage"].argmin(1)
    for element in range(2):
        if interpolation == 0.0:
            expected = before["memory"][element].clone()
            expected[least_used[element]] = 0.7 * write_vector[element]
        else:
            share = 0.7 * before["read_weights"][element].mean(0)  # [N], non-zero on the previous reads
            assert 0 < int((share > 0).sum()) <= 4
            assert share[least_used[element]] == 0
            expected = before["memory"][element] + share.unsqueeze(-1) * write_vector[element]
            expected[least_used[element]] = 0
        torch.testing.assert_close(after[element], expected)


# --------------------------------------------------------------------------------------------------
# Gradients.


def _run(memory, state, xs):
    context = memory.begin(state)
    reads = torch.stack([memory.step(context, x) for x in xs])
    return reads, memory.end(context)


def test_sam_gradcheck():
    generator = torch.Generator().manual_seed(2)
    memory = make("SAM", cells=6, width=3, heads=2, sparse=2, inputs=4).double()
    state = random_state(memory, 2, generator, dtype=torch.float64)
    xs = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64, requires_grad=True)

    def function(xs, start_memory, read_weights):
        reads, end = _run(memory, {**state, "memory": start_memory, "read_weights": read_weights}, xs)
        return reads, end["memory"], end["read_weights"]

    inputs = (xs, state["memory"].clone().requires_grad_(), state["read_weights"].clone().requires_grad_())
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-5, fast_mode=True)
    reads = function(*inputs)[0]
    assert torch.autograd.grad(reads.square().sum(), memory.interface_layer.weight)[0].abs().sum() > 0


def test_sdnc_gradcheck():
    """Through begin/step/end, with respect to the inputs, the memory, the links (one value per link,
    feeding both lists) and the precedence."""
    generator = torch.Generator().manual_seed(4)
    memory = make("SDNC", cells=6, width=3, heads=2, sparse=2, links=2, inputs=4).double()
    state = random_state(memory, 2, generator, dtype=torch.float64, warmup=4)
    present = state["link_value"] > 0
    rev_present = state["rev_link_value"] > 0
    rows, batch_keys = torch.arange(6).view(1, 6, 1), torch.arange(2).view(2, 1, 1) * 36
    keys = batch_keys + rows * 6 + state["link_index"].long()  # (b, i, j) of the row lists' entries
    rev_keys = batch_keys + state["rev_link_index"].long() * 6 + rows  # and of the column lists'
    forward_keys, reverse_keys = keys[present].tolist(), rev_keys[rev_present].tolist()
    assert sorted(forward_keys) == sorted(reverse_keys) and forward_keys  # both lists hold the same links
    reverse_order = torch.tensor([forward_keys.index(key) for key in reverse_keys])
    assert (state["precedence"] > 0).all()  # no kinks at zero
    xs = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64, requires_grad=True)

    def function(xs, start_memory, links, precedence):
        start = dict(state, memory=start_memory, precedence=precedence,
                     link_value=torch.zeros_like(state["link_value"]).masked_scatter(present, links),
                     rev_link_value=torch.zeros_like(state["rev_link_value"]).masked_scatter(
                         rev_present, links[reverse_order]))
        reads, end = _run(memory, start, xs)
        return reads, end["memory"], end["link_value"], end["rev_link_value"], end["precedence"]

    inputs = (xs, state["memory"].clone().requires_grad_(), state["link_value"][present].clone().requires_grad_(),
              state["precedence"].clone().requires_grad_())
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("kind", ["SAM", "SDNC"])
def test_gradients_across_calls_and_checkpointing(kind):
    """Two calls in one graph, and the same under torch.utils.checkpoint, give the same gradients."""
    generator = torch.Generator().manual_seed(6)
    memory = make(kind)
    state = random_state(memory, 2, generator)
    xs = torch.randn(6, 2, memory.input_size, generator=generator)

    def two_calls(checkpointed):
        memory.zero_grad()
        start = dict(state, memory=state["memory"].clone().requires_grad_())

        def call(current, chunk):
            reads, end = _run(memory, current, chunk)
            return reads, end

        if checkpointed:
            reads_1, middle = torch.utils.checkpoint.checkpoint(call, start, xs[:3], use_reentrant=False)
        else:
            reads_1, middle = call(start, xs[:3])
        reads_2, end = call(middle, xs[3:])
        loss = reads_1.square().sum() + reads_2.sin().sum() + end["memory"].square().sum()
        loss.backward()
        return [parameter.grad.clone() for parameter in memory.parameters()] + [start["memory"].grad.clone()]

    for plain, checkpointed in zip(two_calls(False), two_calls(True)):
        torch.testing.assert_close(plain, checkpointed)


@pytest.mark.parametrize("kind", ["SAM", "SDNC"])
def test_nothing_of_size_n_is_saved_for_backward(kind):
    """The bytes autograd saves during a call do not depend on the number of cells."""
    def saved_bytes(cells):
        memory = make(kind, cells=cells, width=8, heads=2, sparse=4, links=4, inputs=16)
        storages = {}

        def pack(tensor):
            # Keep the tensor: a saved tensor whose node is dropped at once would free its storage, and a
            # later one could reuse the address and be missed (counts varied from run to run).
            storages[tensor.untyped_storage().data_ptr()] = (tensor.untyped_storage().nbytes(), tensor)
            return tensor

        generator = torch.Generator().manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            reads, end = _run(memory, memory.initial_state(4), torch.randn(5, 4, 16, generator=generator))
        (reads.sum() + end["memory"].sum()).backward()
        return sum(nbytes for nbytes, _ in storages.values())

    assert saved_bytes(64) == saved_bytes(4096)


@pytest.mark.parametrize("kind", ["SAM", "SDNC"])
def test_a_call_leaves_nothing_alive_after_backward(kind):
    """Once a call's outputs and graph are dropped, its row stores are freed by reference counting
    alone (a reference cycle through the autograd graph would leak every iteration's graph)."""
    import gc
    import weakref

    from models.dnc.sparse_memory import RowStore

    created = []
    original_init = RowStore.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        created.append(weakref.ref(self))

    memory = make(kind, cells=16, width=4, heads=2, sparse=3, inputs=6)
    xs = torch.randn(4, 3, 6, requires_grad=True)
    RowStore.__init__ = recording_init
    gc.disable()
    try:
        reads, end = _run(memory, memory.initial_state(3), xs)
        (reads.sum() + end["memory"].sum()).backward()
        del reads, end
        alive = [ref for ref in created if ref() is not None]
    finally:
        RowStore.__init__ = original_init
        gc.enable()
    assert created and not alive


# --------------------------------------------------------------------------------------------------
# State handling, masks, sizes.


@pytest.mark.parametrize("kind", ["SAM", "SDNC"])
def test_pieces_equal_whole(kind):
    """A sequence run as two calls, the state carried over, gives what it gives run whole (from a fresh
    memory, where searches meet many zero rows of equal score)."""
    generator = torch.Generator().manual_seed(10)
    memory = make(kind, cells=12)
    xs = torch.randn(7, 2, memory.input_size, generator=generator)
    whole_reads, whole = _run(memory, memory.initial_state(2), xs)
    first_reads, middle = _run(memory, memory.initial_state(2), xs[:3])
    second_reads, end = _run(memory, middle, xs[3:])
    torch.testing.assert_close(torch.cat([first_reads, second_reads]), whole_reads)
    for key, value in whole.items():
        torch.testing.assert_close(end[key], value, msg=key)


@pytest.mark.parametrize("kind", ["SAM", "SDNC"])
def test_mask_keeps_padded_rows_and_begin_does_not_mutate(kind):
    generator = torch.Generator().manual_seed(7)
    memory = make(kind)
    state = random_state(memory, 3, generator)
    copies = {key: value.clone() for key, value in state.items()}
    xs = torch.randn(4, 3, memory.input_size, generator=generator)
    context = memory.begin(state)
    for x in xs:
        memory.step(context, x, torch.tensor([True, False, True]))
    end = memory.end(context)
    for key, value in state.items():
        assert torch.equal(value, copies[key]), key  # begin/step/end left the given state alone
        assert torch.equal(end[key][1], copies[key][1]), key  # the padded row did not change
        assert end[key].shape == value.shape and end[key].dtype == value.dtype
    assert not torch.equal(end["memory"][0], copies["memory"][0])
    alone = memory.begin({key: value[2:] for key, value in state.items()})  # row 2 on its own
    for x in xs:
        memory.step(alone, x[2:])
    for key, value in memory.end(alone).items():
        torch.testing.assert_close(value[0], end[key][2])


@pytest.mark.parametrize("kind", ["SAM", "SDNC"])
@pytest.mark.parametrize("cells", [1, 2])
def test_tiny_memories(kind, cells):
    """Any N >= 1 works, with fewer rows than sparse_reads and temporal_reads (both clamped to N)."""
    memory = make(kind, cells=cells, sparse=4, links=4)
    assert memory.sparse_reads == cells
    state = memory.initial_state(2)
    context = memory.begin(state)
    generator = torch.Generator().manual_seed(cells)
    expected = dense_view(memory, context)
    for _ in range(4):
        xi = torch.randn(2, memory.input_size, generator=generator)
        with torch.no_grad():
            interface = memory.interface(xi)
        reads = memory.step(context, xi)
        assert torch.isfinite(reads).all()
        _, expected = reference_step(memory, expected, interface)
        torch.testing.assert_close(dense_view(memory, context)["memory"], expected["memory"])
    end = memory.end(context)
    assert end["memory"].shape == (2, cells, memory.cell_size)


@pytest.mark.parametrize("cls", [SparseMemory, SparseTemporalMemory])
def test_construction_at_65536_cells_is_fast(cls):
    start = time.perf_counter()
    memory = cls(128, 65536, 32, 4)
    state = memory.initial_state(8)
    assert time.perf_counter() - start < 5
    assert state["memory"].shape == (8, 65536, 32)


@pytest.mark.parametrize("kind,keys", [("SAM", SAM_KEYS), ("SDNC", SDNC_KEYS)])
def test_debug_view_keys(kind, keys):
    memory = make(kind)
    context = memory.begin(memory.initial_state(2))
    memory.step(context, torch.randn(2, memory.input_size))
    view = memory.debug_view(context)
    assert set(view) == keys
    assert all(not value.requires_grad for value in view.values())
    assert view["memory"].shape == (9, 4) and view["read_weights"].shape == (2, 9)


def test_no_grad_matches_grad_and_independent_linears():
    generator = torch.Generator().manual_seed(8)
    for independent in (False, True):
        memory = make("SDNC", independent_linears=independent)
        state = random_state(memory, 2, generator)
        xs = torch.randn(3, 2, memory.input_size, generator=generator)
        reads, end = _run(memory, state, xs)
        with torch.no_grad():
            reads_no_grad, end_no_grad = _run(memory, state, xs)
        torch.testing.assert_close(reads, reads_no_grad)
        for key in end:
            torch.testing.assert_close(end[key], end_no_grad[key])


def test_bad_arguments_and_states():
    with pytest.raises(ValueError, match="nr_cells"):
        SparseMemory(4, 0, 3, 1)
    with pytest.raises(ValueError, match="index"):
        SparseMemory(4, 5, 3, 1, index="annoy")
    with pytest.raises(ValueError, match="temporal_reads"):
        SparseTemporalMemory(4, 5, 3, 1, temporal_reads=0)
    memory = make("SAM")
    with pytest.raises(ValueError, match="initial_state"):
        memory.begin({"memory": torch.zeros(1, 9, 4)})
    with pytest.raises(ValueError, match="nr_cells"):
        memory.begin(make("SAM", cells=5).initial_state(1))
    context = memory.begin(memory.initial_state(2))
    with pytest.raises(ValueError, match="xi"):
        memory.step(context, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mask"):
        memory.step(context, torch.zeros(2, memory.input_size), torch.ones(2))


def test_faiss_index_gives_the_same_steps():
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(9)
    exact, with_faiss = make("SAM", cells=40), make("SAM", cells=40, index="faiss", index_threads=1)
    with_faiss.load_state_dict(exact.state_dict())
    state = random_state(exact, 2, generator)
    xs = torch.randn(4, 2, exact.input_size, generator=generator)
    reads, end = _run(exact, state, xs)
    reads_faiss, end_faiss = _run(with_faiss, state, xs)
    torch.testing.assert_close(reads, reads_faiss)
    torch.testing.assert_close(end["memory"], end_faiss["memory"])


@pytest.mark.parametrize("kind", ["SAM", "SDNC"])
def test_compiled_pieces_equal_eager(kind):
    """`compile_steps` (`--compile`): the tensor arithmetic between the row stores and the search through
    torch.compile (inductor on the CPU; the write keeps all C entries there) gives the eager step's reads,
    end state and gradients, with padding rows too. From a random memory: at exact ties of score (a fresh
    memory) a last-bit difference of the fused arithmetic may pick the other of two equal rows."""
    import copy

    from models.core import _COMPILED

    generator = torch.Generator().manual_seed(4)
    eager = make(kind, cells=12).double()
    fast = copy.deepcopy(eager)
    fast.compile_step = True
    state = random_state(eager, 3, generator, dtype=torch.float64)
    xs = torch.randn(5, 3, eager.input_size, generator=generator, dtype=torch.float64)
    masks = torch.ones(5, 3, dtype=torch.bool)
    masks[3:, 1] = False
    results = []
    for memory in (eager, fast):
        start = {key: value.clone().requires_grad_(key == "memory") for key, value in state.items()}
        context = memory.begin(start)
        reads = torch.stack([memory.step(context, x, mask) for x, mask in zip(xs, masks)])
        end = memory.end(context)
        loss = reads.square().sum() + sum(value.sum() for value in end.values() if value.is_floating_point())
        results.append((reads, end, torch.autograd.grad(loss, [start["memory"], *memory.parameters()])))
    pieces = {"interface", "write_plan", "new_rows", "content_weights", "access_stamps"}
    if kind == "SDNC":
        pieces |= {"link_entries", "new_lists", "precedence", "temporal_top"}
    assert set(_COMPILED[fast]) == pieces and eager not in _COMPILED
    (reads, end, grads), (want_reads, want_end, want_grads) = results[1], results[0]
    torch.testing.assert_close(reads, want_reads, rtol=1e-10, atol=1e-12)
    assert end.keys() == want_end.keys()
    for key in want_end:
        torch.testing.assert_close(end[key], want_end[key], rtol=1e-10, atol=1e-12, msg=key)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# The FAISS index kept from call to call (search.IndexKeeper).


def _count_faiss_builds(monkeypatch):
    """Counts the FAISS indexes the sparse memories build from now on: a list that grows by one per build."""
    from models.dnc import sparse_memory

    builds = []
    real_make_index = sparse_memory.make_index

    def counting(kind, *args, **kwargs):
        builds.extend([kind] if kind == "faiss" else [])
        return real_make_index(kind, *args, **kwargs)

    monkeypatch.setattr(sparse_memory, "make_index", counting)
    return builds


@pytest.mark.parametrize("kind", ["SAM", "SDNC"])
@pytest.mark.parametrize("lists", [None, 4])
def test_kept_faiss_index_gives_what_a_new_index_per_call_gives(kind, lists, monkeypatch):
    """A run in three calls, the state carried over detached (the kept index taken as it is), each call
    also run twice from its start (the second time the kept index takes back the first time's writes):
    the same reads, states and gradients as with a new index per call, and no index built (flat, and IVF
    probing all its lists: both exhaustive; the IVF index's retraining put off)."""
    from models.dnc import search

    pytest.importorskip("faiss")
    monkeypatch.setattr(search, "RETRAIN_FACTOR", float("inf"))
    generator = torch.Generator().manual_seed(13)
    memory = make(kind, cells=40, index="faiss", index_threads=1, index_lists=lists, index_probes=lists or 8)
    state = random_state(memory, 2, generator)  # its end is the kept index's memory
    xs = torch.randn(9, 2, memory.input_size, generator=generator)
    builds = _count_faiss_builds(monkeypatch)

    def pieces(keep_index, repeat):
        results, current = [], state
        for chunk in xs.split(3):
            start = {key: value.detach() for key, value in current.items()}
            for _ in range(2 if repeat else 1):
                memory.zero_grad()
                context = memory.begin(start, keep_index=keep_index)
                reads = torch.stack([memory.step(context, x) for x in chunk])
                current = memory.end(context)
                (reads.square().sum() + current["memory"].sin().sum()).backward()
            results.append((reads, current, [parameter.grad.clone() for parameter in memory.parameters()]))
        return results

    fresh = pieces(keep_index=False, repeat=False)
    assert len(builds) == 3
    kept = pieces(keep_index=True, repeat=True)
    assert len(builds) == 3
    for (reads, end, grads), (want_reads, want_end, want_grads) in zip(kept, fresh):
        torch.testing.assert_close(reads, want_reads, rtol=0, atol=0)
        for key in want_end:
            torch.testing.assert_close(end[key], want_end[key], rtol=0, atol=0, msg=key)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want)


def test_kept_faiss_index_is_rebuilt_after_an_in_place_change(monkeypatch):
    """A memory changed in place after the call that returned it is searched as it is now (a new index)."""
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(14)
    memory = make("SAM", cells=40, index="faiss", index_threads=1)
    state = random_state(memory, 2, generator)
    builds = _count_faiss_builds(monkeypatch)
    with torch.no_grad():
        context = memory.begin(state)
        query = memory.interface(torch.randn(2, memory.input_size, generator=generator)).read_queries  # [B, R, W]
        state["memory"][:, 17] = 5 * query[:, 0]  # now the best row of head 0's query
        assert context.index.search(query, 1)[:, 0, 0].tolist() != [17, 17]  # the running call's index: unchanged
        memory.end(context)
        state["memory"][:, 17] = 5 * query[:, 0]
        index = memory.begin(state).index
    assert builds == ["faiss"]
    assert index.search(query, 1)[:, 0, 0].tolist() == [17, 17]


def test_sam_with_a_kept_index_copies_pickles_and_saves_weights_only():
    """After a call the model (holding a FAISS index) deep-copies and pickles (`torch.save`); the copies
    run and give the original's output; the index is not in the state_dict. (From a memory of random rows:
    ties of score, as between a fresh memory's zero rows, may come back in another order from an IVF index
    whose rows were moved.)"""
    import copy
    import io

    from models.dnc import SAM

    pytest.importorskip("faiss")
    torch.manual_seed(0)
    model = SAM(6, 12, nr_cells=48, read_heads=2, cell_size=4, sparse_reads=3, nn_index="faiss", index_lists=4,
                index_probes=4)
    exact = SAM(6, 12, nr_cells=48, read_heads=2, cell_size=4, sparse_reads=3)
    assert model.core.memories[0].index_lists == 4 and model.core.memories[0].index_probes == 4
    x = torch.randn(2, 5, 6)
    _, (controller, memory_state, reads) = model(x)
    state = (controller, dict(memory_state, memory=torch.randn(2, 48, 4)), reads)
    first, _ = model(x, state)
    assert model.core.memories[0].index_keeper.index is not None
    assert model.state_dict().keys() == exact.state_dict().keys()
    expected, _ = model(x, state)  # the kept index, the first call's writes taken back
    torch.testing.assert_close(expected, first, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert twin.core.memories[0].index_keeper.index is None
        output, _ = twin(x, state)
        torch.testing.assert_close(output, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["SAM", "SDNC"])
def test_ivf_index_waits_for_a_memory_with_data(kind, monkeypatch):
    """With IVF lists, a call from a memory at most a quarter full (a fresh one: every sequence of a task run
    with reset_experience) searches exactly, as the exact index does, and builds no FAISS index (one trained
    on zero rows would put them all in one list and scan it); a call from a fuller memory builds one."""
    from models.dnc.search import SPARSE_FRACTION, ExactIndex, KeptIndex

    pytest.importorskip("faiss")
    ivf = make(kind, cells=40, index="faiss", index_threads=1, index_lists=4, index_probes=1)
    exact = make(kind, cells=40)
    exact.load_state_dict(ivf.state_dict())
    builds = _count_faiss_builds(monkeypatch)
    generator = torch.Generator().manual_seed(17)
    xs = torch.randn(6, 2, ivf.input_size, generator=generator)
    fresh = ivf.initial_state(2)
    assert isinstance(ivf.begin(fresh).index, ExactIndex)
    for got, want in zip(_run(ivf, fresh, xs), _run(exact, fresh, xs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert builds == []
    quarter = ivf.initial_state(2)
    quarter["memory"] = torch.zeros(2, 40, ivf.cell_size)
    quarter["memory"][:, :int(SPARSE_FRACTION * 40)] = torch.randn(2, int(SPARSE_FRACTION * 40), ivf.cell_size)
    assert isinstance(ivf.begin(quarter).index, ExactIndex) and builds == []
    quarter["memory"][1, 39] = 1.0  # one row more than a quarter in one batch element
    assert isinstance(ivf.begin(quarter).index, KeptIndex) and builds == ["faiss"]


def test_checkpointed_segments_build_their_own_index(monkeypatch):
    """Checkpointed segments run again in backward: they build a new index each time (the same one, so
    backward finds the rows forward found) and leave the kept index to the last, plain segment; the
    gradients are those of the run without checkpointing."""
    pytest.importorskip("faiss")
    from models.dnc import SAM
    from models.dnc.search import IndexKeeper

    torch.manual_seed(0)
    model = SAM(6, 12, nr_cells=48, read_heads=2, cell_size=4, sparse_reads=3, nn_index="faiss")
    x = torch.randn(2, 6, 6)
    gradients = []
    lends = []
    real_lend = IndexKeeper.lend
    monkeypatch.setattr(IndexKeeper, "lend", lambda self, *args: lends.append(1) or real_lend(self, *args))
    for steps in (0, 2):
        model.zero_grad()
        model.core.config.checkpoint_steps = steps
        builds = _count_faiss_builds(monkeypatch)
        lends.clear()
        output, _ = model(x)
        output.square().sum().backward()
        gradients.append([parameter.grad.clone() for parameter in model.parameters()])
        # without: one call, the kept index; with: two checkpointed segments (built in forward and in
        # backward) and the last segment, which takes the kept index (built: it starts from a new memory)
        assert (len(builds), len(lends)) == ((1, 1) if steps == 0 else (5, 1))
    for plain, checkpointed in zip(*gradients):
        torch.testing.assert_close(plain, checkpointed)


def test_index_options_are_checked():
    from models.dnc import SAM, SDNC

    with pytest.raises(ValueError, match="nn_index='faiss'"):
        SAM(6, 12, nr_cells=48, index_lists=4)
    with pytest.raises(ValueError, match="index_lists"):
        SDNC(6, 12, nr_cells=48, nn_index="faiss", index_probes=4)
    with pytest.raises(ValueError, match="index_lists must be a positive integer"):
        SAM(6, 12, nr_cells=48, nn_index="faiss", index_lists=0)
