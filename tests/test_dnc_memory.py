"""DNC dense memory: every equation against a plain loop re-derivation, the fast link update against its
reference, gradcheck through begin/step/end, masks, and the memory contract."""

import math

import pytest
import torch

from models.dnc import memory as dense
from models.dnc.memory import DenseMemory

B, N, W, R, X = 2, 5, 4, 2, 7
DEBUG_SHAPES = {"memory": (N, W), "link_matrix": (N, N), "precedence": (N,), "read_weights": (R, N),
                "write_weights": (N,), "usage_vector": (N,)}
EPS = 1e-6  # both of the module's constants (similarity and usage)


# ----- plain re-derivations, one number at a time -----

def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def oneplus(x: float) -> float:
    return 1 + math.log(1 + math.exp(x))


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def content_ref(key: list[float], strength: float, memory: list[list[float]]) -> list[float]:
    """softmax_n(strength * cos(key, M[n])) with norms sqrt(|x|^2 + eps)."""
    key_norm = math.sqrt(sum(k * k for k in key) + EPS)
    scores = []
    for row in memory:
        row_norm = math.sqrt(sum(m * m for m in row) + EPS)
        scores.append(strength * sum(k * m for k, m in zip(key, row)) / (key_norm * row_norm))
    return softmax(scores)


def usage_ref(usage, write_weights, read_weights, free_gates):
    out = []
    for n in range(len(usage)):
        retention = 1.0
        for head in range(len(free_gates)):
            retention *= 1 - free_gates[head] * read_weights[head][n]
        out.append((usage[n] + write_weights[n] - usage[n] * write_weights[n]) * retention)
    return out


def allocation_ref(usage):
    stabilised = [EPS + (1 - EPS) * u for u in usage]
    order = sorted(range(len(usage)), key=lambda n: stabilised[n])  # stable: ties lower index first
    allocation, product = [0.0] * len(usage), 1.0
    for n in order:
        allocation[n] = (1 - stabilised[n]) * product
        product *= stabilised[n]
    return allocation


def write_weights_ref(allocation, content, allocation_gate, write_gate):
    return [write_gate * (allocation_gate * a + (1 - allocation_gate) * c) for a, c in zip(allocation, content)]


def memory_ref(memory, write_weights, erase, vector):
    return [[memory[n][w] * (1 - write_weights[n] * erase[w]) + write_weights[n] * vector[w]
             for w in range(len(erase))] for n in range(len(memory))]


def precedence_ref(precedence, write_weights):
    total = sum(write_weights)
    return [(1 - total) * p + w for p, w in zip(precedence, write_weights)]


def link_ref(link, write_weights, precedence):
    cells = len(link)
    return [[0.0 if i == j else
             (1 - write_weights[i] - write_weights[j]) * link[i][j] + write_weights[i] * precedence[j]
             for j in range(cells)] for i in range(cells)]


def directional_ref(link, read_weights):
    """(forward, backward) per head: f[i] = sum_j L[i][j] r[j], b[j] = sum_i L[i][j] r[i]."""
    cells = len(link)
    forward = [[sum(link[i][j] * r[j] for j in range(cells)) for i in range(cells)] for r in read_weights]
    backward = [[sum(link[i][j] * r[i] for i in range(cells)) for j in range(cells)] for r in read_weights]
    return forward, backward


def read_weights_ref(backward, content, forward, modes):
    return [[m[0] * b + m[1] * c + m[2] * f for b, c, f in zip(bh, ch, fh)]
            for bh, ch, fh, m in zip(backward, content, forward, modes)]


def step_ref(memory_module: DenseMemory, state: dict, xi: torch.Tensor):
    """One step for batch element 0 from the equations, with the interface split by hand."""
    raw = memory_module.interface_layer(xi)[0].tolist()
    take = iter(raw)

    def part(size):
        return [next(take) for _ in range(size)]

    read_keys = [part(W) for _ in range(R)]
    read_strengths = [oneplus(x) for x in part(R)]
    write_key = part(W)
    write_strength = oneplus(part(1)[0])
    erase = [sigmoid(x) for x in part(W)]
    vector = part(W)
    free_gates = [sigmoid(x) for x in part(R)]
    allocation_gate = sigmoid(part(1)[0])
    write_gate = sigmoid(part(1)[0])
    modes = [softmax(part(3)) for _ in range(R)]
    s = {key: value[0].tolist() for key, value in state.items()}
    usage = usage_ref(s["usage_vector"], s["write_weights"], s["read_weights"], free_gates)
    write_content = content_ref(write_key, write_strength, s["memory"])  # the memory before the write
    write_weights = write_weights_ref(allocation_ref(usage), write_content, allocation_gate, write_gate)
    memory = memory_ref(s["memory"], write_weights, erase, vector)
    link = link_ref(s["link_matrix"], write_weights, s["precedence"])
    precedence = precedence_ref(s["precedence"], write_weights)
    forward, backward = directional_ref(link, s["read_weights"])  # new links, previous read weights
    read_content = [content_ref(k, beta, memory) for k, beta in zip(read_keys, read_strengths)]  # new memory
    read_weights = read_weights_ref(backward, read_content, forward, modes)
    reads = [[sum(read_weights[h][n] * memory[n][w] for n in range(N)) for w in range(W)] for h in range(R)]
    new_state = {"memory": memory, "link_matrix": link, "precedence": precedence,
                 "read_weights": read_weights, "write_weights": write_weights, "usage_vector": usage}
    return [x for head in reads for x in head], new_state


# ----- helpers -----

def make_memory(independent_linears: bool = False, seed: int = 0, **sizes) -> DenseMemory:
    torch.manual_seed(seed)
    config = dict(input_size=X, nr_cells=N, cell_size=W, read_heads=R)
    config.update(sizes)
    return DenseMemory(**config, independent_linears=independent_linears).double()


def random_state(batch: int = B, cells: int = N, width: int = W, heads: int = R, seed: int = 1) -> dict:
    """A valid mid-run state: weights that sum to at most 1, usage in (0, 1) without ties, zero link diagonal."""
    generator = torch.Generator().manual_seed(seed)

    def simplex(*shape):
        values = torch.rand(*shape, cells + 1, generator=generator, dtype=torch.float64)
        return (values / values.sum(-1, keepdim=True))[..., :cells]

    link = simplex(batch, cells) * (1 - torch.eye(cells, dtype=torch.float64))
    return {"memory": torch.randn(batch, cells, width, generator=generator, dtype=torch.float64),
            "link_matrix": link, "precedence": simplex(batch), "read_weights": simplex(batch, heads),
            "write_weights": simplex(batch),
            "usage_vector": 0.05 + 0.9 * torch.rand(batch, cells, generator=generator, dtype=torch.float64)}


def assert_close(actual: torch.Tensor, expected, tol: float = 1e-12):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def run(memory_module, state, xis, masks=None, **options):
    ctx = memory_module.begin(state, **options)
    reads = [memory_module.step(ctx, xi, None if masks is None else masks[t]) for t, xi in enumerate(xis)]
    return torch.stack(reads), memory_module.end(ctx), ctx


# ----- each equation -----

def test_content_weighting_is_softmax_of_sharpened_cosine():
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(B, 3, W, generator=generator, dtype=torch.float64)
    strengths = 1 + 3 * torch.rand(B, 3, generator=generator, dtype=torch.float64)
    memory = torch.randn(B, N, W, generator=generator, dtype=torch.float64)
    weights = dense.content_weighting(keys, strengths, memory)
    for b in range(B):
        for h in range(3):
            assert_close(weights[b, h], content_ref(keys[b, h].tolist(), strengths[b, h].item(), memory[b].tolist()))


def test_content_weighting_of_zero_memory_is_uniform_and_finite():
    keys = torch.randn(B, R, W, dtype=torch.float64, requires_grad=True)
    memory = torch.zeros(B, N, W, dtype=torch.float64, requires_grad=True)
    weights = dense.content_weighting(keys, torch.full((B, R), 5.0, dtype=torch.float64), memory)
    assert_close(weights, torch.full((B, R, N), 1 / N, dtype=torch.float64))
    weights[..., 0].sum().backward()
    assert torch.isfinite(keys.grad).all() and torch.isfinite(memory.grad).all()


def test_usage_with_retention():
    state = random_state()
    free_gates = torch.rand(B, R, dtype=torch.float64)
    usage = dense.update_usage(state["usage_vector"], state["write_weights"], state["read_weights"], free_gates)
    for b in range(B):
        assert_close(usage[b], usage_ref(state["usage_vector"][b].tolist(), state["write_weights"][b].tolist(),
                                         state["read_weights"][b].tolist(), free_gates[b].tolist()))


@pytest.mark.parametrize("usage", [
    [0.9, 0.1, 0.5, 0.3, 0.7],
    [0.5, 0.2, 0.5, 0.2, 0.0],  # ties: lower index first
    [0.0, 0.0, 0.0, 0.0, 0.0],  # a fresh memory
    [1.0, 1.0, 1.0, 1.0, 1.0],  # a full one
])
def test_allocation_by_sorted_usage(usage):
    allocation = dense.allocation_weighting(torch.tensor([usage, usage[::-1]], dtype=torch.float64))
    assert_close(allocation[0], allocation_ref(usage))
    assert_close(allocation[1], allocation_ref(usage[::-1]))
    assert (allocation >= 0).all() and (allocation.sum(-1) <= 1 + 1e-12).all()


def test_allocation_of_fresh_memory_goes_to_cell_zero():
    allocation = dense.allocation_weighting(torch.zeros(1, N))
    assert allocation[0, 0].item() == pytest.approx(1, abs=1e-5)
    assert allocation[0, 1:].sum().item() < 1e-5


def test_write_weights_memory_precedence():
    state = random_state()
    generator = torch.Generator().manual_seed(3)
    allocation = dense.allocation_weighting(state["usage_vector"])
    content = torch.softmax(torch.randn(B, N, generator=generator, dtype=torch.float64), -1)
    allocation_gate, write_gate = torch.rand(2, B, generator=generator, dtype=torch.float64)
    erase = torch.rand(B, W, generator=generator, dtype=torch.float64)
    vector = torch.randn(B, W, generator=generator, dtype=torch.float64)
    write_weights = dense.write_weighting(allocation, content, allocation_gate, write_gate)
    memory = dense.write_memory(state["memory"], write_weights, erase, vector)
    precedence = dense.update_precedence(state["precedence"], write_weights)
    for b in range(B):
        expected_weights = write_weights_ref(allocation[b].tolist(), content[b].tolist(), allocation_gate[b].item(),
                                             write_gate[b].item())
        assert_close(write_weights[b], expected_weights)
        assert_close(memory[b], memory_ref(state["memory"][b].tolist(), expected_weights, erase[b].tolist(),
                                           vector[b].tolist()))
        assert_close(precedence[b], precedence_ref(state["precedence"][b].tolist(), expected_weights))


@pytest.mark.parametrize("function", [dense.link_update_and_temporal_reads, dense.link_update_and_temporal_reads_ref])
def test_link_matrix_and_directional_reads(function):
    state = random_state(heads=3)
    write_weights = 0.8 * torch.softmax(torch.randn(B, N, dtype=torch.float64), -1)
    link, forward, backward = function(state["link_matrix"], write_weights, state["precedence"],
                                       state["read_weights"])
    for b in range(B):
        expected_link = link_ref(state["link_matrix"][b].tolist(), write_weights[b].tolist(),
                                 state["precedence"][b].tolist())
        assert_close(link[b], expected_link)
        assert (link[b].diagonal() == 0).all()
        expected_forward, expected_backward = directional_ref(expected_link, state["read_weights"][b].tolist())
        assert_close(forward[b], expected_forward)
        assert_close(backward[b], expected_backward)


def test_read_weights_mix_backward_content_forward():
    generator = torch.Generator().manual_seed(4)
    backward, content, forward = torch.rand(3, B, R, N, generator=generator, dtype=torch.float64)
    modes = torch.softmax(torch.randn(B, R, 3, generator=generator, dtype=torch.float64), -1)
    weights = dense.read_weighting(backward, content, forward, modes)
    for b in range(B):
        assert_close(weights[b], read_weights_ref(backward[b].tolist(), content[b].tolist(), forward[b].tolist(),
                                                  modes[b].tolist()))


def test_whole_step_against_the_equations():
    """Interface split and activations, and the order of the updates (write content on the old memory,
    read content on the new one, temporal reads through the new links from the previous read weights)."""
    memory_module = make_memory()
    state = random_state()
    xi = torch.randn(B, X, dtype=torch.float64)
    with torch.no_grad():
        reads, new_state, _ = run(memory_module, state, [xi])
        expected_reads, expected_state = step_ref(memory_module, state, xi)
    assert_close(reads[0, 0], expected_reads)
    for key, value in expected_state.items():
        assert_close(new_state[key][0], value)


def test_links_use_the_precedence_before_it_is_updated():
    """Two writes by allocation into a fresh memory, to cell 0 and then to a cell k: the link L[k, 0] (k written
    right after 0) is 1, because the link update at step 2 takes the precedence of step 1 (e_0). Updating
    the precedence first would make it e_k at step 2 and leave L[k, 0] = 0. Then a forward read from
    cell 0 lands on cell k, and a backward read from cell k on cell 0."""
    memory_module = make_memory()
    ones = lambda *shape: torch.ones(1, *shape, dtype=torch.float64)

    def interface(read_modes, write_gate=1.0):
        return dense.Interface(
            read_keys=ones(R, W), read_strengths=ones(R), write_key=ones(W), write_strength=ones(),
            erase_vector=ones(W), write_vector=ones(W), free_gates=0 * ones(R), allocation_gate=ones(),
            write_gate=write_gate * ones(), read_modes=torch.tensor([read_modes], dtype=torch.float64))

    content_only = [[0.0, 1.0, 0.0]] * R
    queue = [interface(content_only), interface(content_only)]
    memory_module.interface = lambda xi: queue.pop(0)
    state = memory_module.initial_state(1, dtype=torch.float64)
    xi = torch.zeros(1, X, dtype=torch.float64)
    _, first, _ = run(memory_module, state, [xi])
    assert first["write_weights"][0, 0].item() == pytest.approx(1, abs=1e-5)
    _, state, _ = run(memory_module, first, [xi])
    second = int(state["write_weights"][0].argmax())
    assert second != 0 and state["write_weights"][0, second].item() == pytest.approx(1, abs=1e-5)
    link = state["link_matrix"][0]
    assert link[second, 0].item() == pytest.approx(1, abs=1e-5)
    assert link.sum().item() == pytest.approx(1, abs=1e-4)
    assert state["precedence"][0, second].item() == pytest.approx(1, abs=1e-5)
    # head 0 reads forward from cell 0, head 1 backward from cell k; nothing is written
    state["read_weights"] = torch.zeros(1, R, N, dtype=torch.float64)
    state["read_weights"][0, 0, 0] = state["read_weights"][0, 1, second] = 1.0
    queue[:] = [interface([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], write_gate=0.0)]
    _, state, _ = run(memory_module, state, [xi])
    expected = torch.zeros(R, N, dtype=torch.float64)
    expected[0, second] = expected[1, 0] = 1.0
    assert_close(state["read_weights"][0], expected, tol=1e-4)


# ----- the fast link update -----

@pytest.mark.parametrize("cells", [5, 13])
def test_fast_link_update_matches_reference_in_blocks(monkeypatch, cells):
    """Blocks of a few rows (the last one shorter), and gradients through any subset of the outputs."""
    monkeypatch.setattr(dense, "LINK_BLOCK_BYTES", 3 * B * cells * 8)  # 3 rows of float64 per block
    state = random_state(cells=cells, heads=3, seed=5)
    write_weights = 0.8 * torch.softmax(torch.randn(B, cells, dtype=torch.float64), -1)
    inputs = [state["link_matrix"], write_weights, state["precedence"], state["read_weights"]]
    inputs = [tensor.clone().requires_grad_() for tensor in inputs]
    fast = dense.link_update_and_temporal_reads(*inputs)
    reference = dense.link_update_and_temporal_reads_ref(*inputs)
    for actual, expected in zip(fast, reference):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for used in ([0, 1, 2], [0], [1], [2], [1, 2]):
        seeds = [torch.randn_like(fast[index]) for index in used]
        fast_grads = torch.autograd.grad([fast[i] for i in used], inputs, seeds, retain_graph=True,
                                         allow_unused=True, materialize_grads=True)
        reference_grads = torch.autograd.grad([reference[i] for i in used], inputs, seeds, retain_graph=True,
                                              allow_unused=True, materialize_grads=True)
        for actual, expected in zip(fast_grads, reference_grads):
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(dense.link_update_and_temporal_reads, inputs)


def _link_chain(cells: int, steps: int, tape, link_requires_grad: bool = True):
    """`steps` link updates from a random state; a loss over every output and the last matrix; its gradients."""
    state = random_state(cells=cells, heads=3, seed=6)
    generator = torch.Generator().manual_seed(7)
    link = state["link_matrix"].clone().requires_grad_(link_requires_grad)
    weights = [0.8 * torch.softmax(torch.randn(B, cells, generator=generator, dtype=torch.float64), -1)
               for _ in range(steps)]
    precedences = [torch.softmax(torch.randn(B, cells, generator=generator, dtype=torch.float64), -1)
                   for _ in range(steps)]
    reads = [torch.softmax(torch.randn(B, 3, cells, generator=generator, dtype=torch.float64), -1)
             for _ in range(steps)]
    inputs = [tensor.requires_grad_() for tensor in (*weights, *precedences, *reads)]
    links, outputs, current = [], [], link
    for t in range(steps):
        current, forward, backward = dense.link_update_and_temporal_reads(current, weights[t], precedences[t],
                                                                          reads[t], tape)
        links.append(current.detach().clone())
        outputs += [forward, backward]
    loss = sum((output * torch.linspace(-1, 1, output.numel(), dtype=torch.float64).view_as(output)).sum()
               for output in outputs) + current.sin().sum()
    grads = torch.autograd.grad(loss, ([link] if link_requires_grad else []) + inputs)
    return links, outputs, grads


@pytest.mark.parametrize("link_requires_grad", [True, False])
def test_link_tape_equals_keeping_every_matrix(monkeypatch, link_requires_grad):
    """A `LinkTape` keeps steps 0, 3, 6 of 8 and replays the rest in backward (in blocks of 3 rows): the same
    matrices bit for bit, the same outputs and gradients; the backward writes dL_{t-1} over the dL_t its
    later step handed back (not over the user's gradient of the last matrix)."""
    cells = 7
    monkeypatch.setattr(dense, "LINK_BLOCK_BYTES", 3 * B * cells * 8)
    overwrites = []
    real_backward = dense.LinkUpdateAndTemporalReads._backward

    def spy(*args, **kwargs):
        overwrites.append(kwargs["overwrite"])
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(dense.LinkUpdateAndTemporalReads, "_backward", staticmethod(spy))
    plain = _link_chain(cells, 8, None, link_requires_grad)
    assert not any(overwrites)
    overwrites.clear()
    tape = dense.LinkTape(3)
    taped = _link_chain(cells, 8, tape, link_requires_grad)
    assert sorted(tape.kept) == [0, 3, 6] and len(tape.updates) == 8
    for step in range(1, 8):  # replayed or kept, L_{step-1} is what the forward made
        assert torch.equal(tape.link(step), plain[0][step - 1])
    for got, want in zip(taped[1], plain[1]):
        assert torch.equal(got, want)
    assert len(taped[2]) == len(plain[2])
    for got, want in zip(taped[2], plain[2]):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)
    # backward runs step 7 first (the user's gradient of the last matrix), then steps 6 .. 0 on their own
    assert overwrites == [False] + [True] * 7
    with pytest.raises(ValueError, match="every must be a positive"):
        dense.LinkTape(0)


def test_link_tape_backward_twice():
    """retain_graph: a second backward over the same taped steps replays again and gives the same gradients
    (its first step's gradient is the user's, never one a backward handed back earlier)."""
    state = random_state(cells=6, heads=2, seed=9)
    link = state["link_matrix"].clone().requires_grad_()
    weights = (0.5 * torch.softmax(torch.randn(4, B, 6, dtype=torch.float64), -1)).requires_grad_()
    tape, current, total = dense.LinkTape(2), link, 0
    for t in range(4):
        current, forward, backward = dense.link_update_and_temporal_reads(current, weights[t], state["precedence"],
                                                                          state["read_weights"], tape)
        total = total + forward.square().sum() + backward.sum()
    total = total + current.square().sum()
    first = torch.autograd.grad(total, [link, weights], retain_graph=True)
    second = torch.autograd.grad(total, [link, weights])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_write_memory_gradients():
    """`WriteMemory`'s hand-written backward against autograd on the formula M (1 - w e^T) + w v^T."""
    generator = torch.Generator().manual_seed(8)
    inputs = [torch.randn(B, N, W, generator=generator, dtype=torch.float64),
              torch.rand(B, N, generator=generator, dtype=torch.float64),
              torch.rand(B, W, generator=generator, dtype=torch.float64),
              torch.randn(B, W, generator=generator, dtype=torch.float64)]
    inputs = [tensor.requires_grad_() for tensor in inputs]
    memory, weights, erase, vector = inputs
    expected = memory * (1 - weights.unsqueeze(-1) * erase.unsqueeze(1)) + weights.unsqueeze(-1) * vector.unsqueeze(1)
    got = dense.write_memory(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
    seed = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, seed), torch.autograd.grad(expected, inputs, seed)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert torch.autograd.gradcheck(dense.write_memory, inputs)


# ----- the memory contract -----

def test_gradcheck_through_begin_step_end():
    memory_module = make_memory()
    state = random_state()
    keys = list(state)
    xis = torch.randn(3, B, X, dtype=torch.float64, requires_grad=True)
    masks = [None, torch.tensor([True, False]), None]
    state_inputs = [state[key].clone().requires_grad_() for key in keys]

    def function(xis, *state_tensors):
        reads, final, _ = run(memory_module, dict(zip(keys, state_tensors)), list(xis), masks)
        return (reads, *(final[key] for key in keys))

    assert torch.autograd.gradcheck(function, (xis, *state_inputs))


def test_mask_keeps_padded_rows_unchanged():
    memory_module = make_memory()
    state = random_state(batch=3)
    xis = torch.randn(4, 3, X, dtype=torch.float64)
    masks = [torch.tensor([True, False, True]), torch.tensor([True, False, False]),
             torch.tensor([True, True, True]), torch.tensor([True, False, True])]
    with torch.no_grad():
        reads, final, _ = run(memory_module, state, list(xis), masks)
        # row 1 takes only step 2, row 2 steps 0, 2 and 3: the same as running those steps unmasked
        # (alone, so equal up to rounding: a batch of one may sum in another order)
        for row, steps in ((0, [0, 1, 2, 3]), (1, [2]), (2, [0, 2, 3])):
            row_state = {key: value[row:row + 1] for key, value in state.items()}
            row_reads, row_final, _ = run(memory_module, row_state, [xis[t, row:row + 1] for t in steps])
            for key in final:
                assert_close(final[key][row:row + 1], row_final[key])
            assert_close(reads[steps[-1], row:row + 1], row_reads[-1])
    assert torch.isfinite(reads).all()
    # a row masked at every step keeps its state exactly
    with torch.no_grad():
        _, final, _ = run(memory_module, state, list(xis), [torch.tensor([True, False, True])] * 4)
    for key in final:
        assert torch.equal(final[key][1], state[key][1]), key


def test_begin_and_steps_do_not_modify_the_given_state():
    memory_module = make_memory()
    state = {key: value.requires_grad_() for key, value in random_state().items()}
    copies = {key: value.detach().clone() for key, value in state.items()}
    versions = {key: value._version for key, value in state.items()}
    reads, final, _ = run(memory_module, state, list(torch.randn(3, B, X, dtype=torch.float64)))
    (reads.sum() + sum(value.sum() for value in final.values())).backward()
    for key, value in state.items():
        assert value._version == versions[key], key
        assert torch.equal(value.detach(), copies[key]), key


def test_zero_memory_gives_finite_reads_and_gradients():
    memory_module = make_memory().float()
    xis = (50 * torch.randn(4, B, X)).requires_grad_()
    reads, final, _ = run(memory_module, memory_module.initial_state(B), list(xis))
    assert torch.isfinite(reads).all() and all(torch.isfinite(value).all() for value in final.values())
    (reads.sum() + final["memory"].sum()).backward()
    assert torch.isfinite(xis.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in memory_module.parameters())


def test_initial_state_is_zeros_with_contract_shapes():
    memory_module = make_memory()
    state = memory_module.initial_state(3, dtype=torch.float64)
    assert list(state) == list(DEBUG_SHAPES)
    for key, shape in DEBUG_SHAPES.items():
        assert state[key].shape == (3, *shape) and state[key].dtype == torch.float64
        assert not state[key].any()
    assert memory_module.read_size == R * W


def test_independent_linears_give_the_same_interface():
    shared, independent = make_memory(False), make_memory(True)
    assert shared.interface_size == independent.interface_size == W * R + 3 * W + 5 * R + 3
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in independent.parameters())
    # with the shared layer's rows copied into the per-part layers, both compute the same step
    with torch.no_grad():
        start = 0
        for name, layer in independent.interface_layers.items():
            size = independent.interface_sizes[name]
            layer.weight.copy_(shared.interface_layer.weight[start:start + size])
            layer.bias.copy_(shared.interface_layer.bias[start:start + size])
            start += size
        state, xis = random_state(), list(torch.randn(2, B, X, dtype=torch.float64))
        reads_shared, final_shared, _ = run(shared, state, xis)
        reads_independent, final_independent, _ = run(independent, state, xis)
    torch.testing.assert_close(reads_independent, reads_shared, rtol=1e-12, atol=1e-12)
    for key in final_shared:
        torch.testing.assert_close(final_independent[key], final_shared[key], rtol=1e-12, atol=1e-12)


def test_debug_view_is_batch_element_zero_of_the_latest_state():
    memory_module = make_memory()
    reads, final, ctx = run(memory_module, random_state(), list(torch.randn(2, B, X, dtype=torch.float64)))
    view = memory_module.debug_view(ctx)
    assert list(view) == list(DEBUG_SHAPES)
    for key, shape in DEBUG_SHAPES.items():
        assert view[key].shape == shape and not view[key].requires_grad
        assert torch.equal(view[key], final[key][0])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="nr_cells"):
        DenseMemory(X, 0, W, R)
    memory_module = make_memory()
    with pytest.raises(ValueError, match="lacks"):
        memory_module.begin({"memory": torch.zeros(B, N, W)})
    with pytest.raises(ValueError, match="nr_cells"):
        memory_module.begin(make_memory(nr_cells=N + 1).initial_state(B))
    ctx = memory_module.begin(memory_module.initial_state(B, dtype=torch.float64))
    with pytest.raises(ValueError, match="xi"):
        memory_module.step(ctx, torch.zeros(B, X + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        memory_module.step(ctx, torch.zeros(B, X, dtype=torch.float64), torch.ones(B))


@pytest.mark.parametrize("snapshots_every", [0, 3])
def test_compiled_step_equals_eager(snapshots_every):
    """`--compile`: the memory's step through torch.compile gives the eager step's reads, state and gradients,
    with and without padding; whole, or (with a `LinkTape`) in two compiled halves around the link update."""
    import copy

    from models.core import _COMPILED

    eager = make_memory()
    fast = copy.deepcopy(eager)
    fast.compile_step = True
    generator = torch.Generator().manual_seed(3)
    xis = torch.randn(4, B, X, generator=generator, dtype=torch.float64)
    masks = torch.ones(4, B, dtype=torch.bool)
    masks[2:, 0] = False  # row 0 is padding in the last two steps
    results = []
    for module in (eager, fast):
        state = {key: value.clone().requires_grad_(key == "memory") for key, value in random_state().items()}
        options = {"link_snapshots_every": snapshots_every} if snapshots_every else {}
        reads, final, _ = run(module, state, xis[:2], **options)  # unmasked, then masked: both specialisations
        more, final, ctx = run(module, final, xis[2:], masks[2:], **options)
        assert (ctx.tape is not None) == bool(snapshots_every)
        loss = reads.pow(2).sum() + more.pow(2).sum() + sum(value.sum() for value in final.values())
        grads = torch.autograd.grad(loss, [state["memory"], *module.parameters()])
        results.append([reads, more, *final.values(), *grads])
    assert set(_COMPILED[fast]) == ({"write_step", "read_step"} if snapshots_every else {"step"})
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_every_memory_has_compiled_steps():
    """DNC: the whole dense step; SAM and SDNC: their tensor pieces (tests/test_sparse_memory.py)."""
    import argparse

    from models.core import build_core, get_core_class

    parser = argparse.ArgumentParser()
    get_core_class("SDNC").add_args(parser)
    args = parser.parse_args(["-nhid", "8", "-mem_slot", "6", "-mem_size", "4", "-read_heads", "2"])
    for name in ("DNC", "SAM", "SDNC"):
        core = build_core(name, get_core_class(name).config_from_args(args, 5))
        assert not any(memory.compile_step for memory in core.memories)
        assert core.compile_steps() and all(memory.compile_step for memory in core.memories)
    from models.dnc import DNC, SAM  # the published API has it too

    assert DNC(input_size=5, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2).compile_steps()
    assert SAM(input_size=5, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2).compile_steps()


@pytest.mark.cpu_compile_default
def test_which_cores_compile_by_default():
    """`--compile` unset: with CUDA every core with a compiled path; on the CPU only the DNC (SAM's and SDNC's
    pieces are slower there); `--compile` compiles every core that has a path, `--no-compile` none."""
    import argparse

    from models.core import build_core, get_core_class
    from training.loop import compile_cores

    parser = argparse.ArgumentParser()
    for name in ("SDNC", "RMC", "LSTM"):
        get_core_class(name).add_args(parser)
    args = parser.parse_args(["-nhid", "8", "-mem_slot", "6", "-mem_size", "4", "-read_heads", "2"])

    def compiled(name, device, choice):
        core = build_core(name, get_core_class(name).config_from_args(args, 5))
        return compile_cores(core, torch.device(device), choice)

    assert [compiled(name, "cuda", None) for name in ("DNC", "SAM", "SDNC", "RMC", "LSTM")] == [
        ["DNC"], ["SAM"], ["SDNC"], ["RMC"], []]  # (the fused LSTM has no per-step path to compile)
    assert [compiled(name, "cpu", None) for name in ("DNC", "SAM", "RMC")] == [["DNC"], [], []]
    assert [compiled(name, "cpu", True) for name in ("SAM", "SDNC", "RMC")] == [["SAM"], ["SDNC"], ["RMC"]]
    assert compiled("DNC", "cpu", False) == []
