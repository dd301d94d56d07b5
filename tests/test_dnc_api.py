"""The published DNC / SAM / SDNC API (models/dnc/dnc.py) and the registered cores behind it.

The controller's wiring is checked against a plain re-derivation with a small stand-in memory
whose step is a formula; the rest runs the real memories on tiny sizes.
"""

import argparse
import copy
import inspect

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import models
import models.dnc.dnc as dnc_module
from models.core import detach_state, map_state, state_from_tensors, state_tensors
from models.dnc import DNC, SAM, SDNC, DNCCore, DNCConfig, SAMCore, SDNCCore
from models.rnn import LSTM

CLASSES = {"DNC": DNC, "SAM": SAM, "SDNC": SDNC}
KINDS = sorted(CLASSES)
# Tiny memories of each kind (sparse ones need more cells than rows touched per step).
SIZES = {"DNC": {"nr_cells": 6}, "SAM": {"nr_cells": 12, "sparse_reads": 2},
         "SDNC": {"nr_cells": 12, "sparse_reads": 2, "temporal_reads": 1}}
DEBUG_KEYS = {
    "DNC": {"memory", "link_matrix", "precedence", "read_weights", "write_weights", "usage_vector"},
    "SAM": {"memory", "visible_memory", "read_positions", "read_weights", "write_weights", "usage"},
    "SDNC": {"memory", "visible_memory", "read_positions", "link_matrix", "rev_link_matrix", "precedence",
             "read_weights", "write_weights", "usage"},
}
B, T, D = 3, 5, 5


def make(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kwargs = {"input_size": D, "hidden_size": 8, "read_heads": 2, "cell_size": 4, **SIZES[kind], **overrides}
    return CLASSES[kind](**kwargs)


def assert_states_close(a, b, atol=1e-6):
    tensors_a, tensors_b = state_tensors(a), state_tensors(b)
    assert len(tensors_a) == len(tensors_b)
    for x, y in zip(tensors_a, tensors_b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def batch_row(state, row: int):
    """Row `row` of every tensor of a published state (controller tensors hold the batch in dim 1)."""
    controller, memory, reads = state
    controller = map_state(lambda t: t[:, row:row + 1], controller)
    memory = map_state(lambda t: t[row:row + 1], memory)
    return controller, memory, reads[row:row + 1]


def published_initial_state(model, batch_size: int):
    """The core's initial state as the published call returns states."""
    return model._published_state(model.core.initial_state(batch_size), pass_through_memory=True)


# ------------------------------------------------------------------------------------------------
# Constructor


PUBLISHED_SIGNATURES = {
    "DNC": ["input_size", "hidden_size", "rnn_type", "num_layers", "num_hidden_layers", "bias", "batch_first",
            "dropout", "bidirectional", "nr_cells", "read_heads", "cell_size", "nonlinearity", "gpu_id",
            "independent_linears", "share_memory", "debug", "clip"],
    "SAM": ["input_size", "hidden_size", "rnn_type", "num_layers", "num_hidden_layers", "bias", "batch_first",
            "dropout", "bidirectional", "nr_cells", "sparse_reads", "read_heads", "cell_size", "nonlinearity",
            "gpu_id", "independent_linears", "share_memory", "debug", "clip"],
    "SDNC": ["input_size", "hidden_size", "rnn_type", "num_layers", "num_hidden_layers", "bias", "batch_first",
             "dropout", "bidirectional", "nr_cells", "sparse_reads", "temporal_reads", "read_heads", "cell_size",
             "nonlinearity", "gpu_id", "independent_linears", "share_memory", "debug", "clip"],
}
PUBLISHED_DEFAULTS = {
    "DNC": {"rnn_type": "lstm", "num_layers": 1, "num_hidden_layers": 2, "bias": True, "batch_first": True,
            "dropout": 0, "bidirectional": False, "nr_cells": 5, "read_heads": 2, "cell_size": 10,
            "nonlinearity": "tanh", "gpu_id": -1, "independent_linears": False, "share_memory": True,
            "debug": False, "clip": 20},
}
PUBLISHED_DEFAULTS["SAM"] = {**PUBLISHED_DEFAULTS["DNC"], "nr_cells": 5000, "read_heads": 4, "sparse_reads": 4}
PUBLISHED_DEFAULTS["SDNC"] = {**PUBLISHED_DEFAULTS["SAM"], "temporal_reads": 4}


@pytest.mark.parametrize("kind", KINDS)
def test_constructor_keeps_the_published_order_and_defaults(kind):
    parameters = inspect.signature(CLASSES[kind]).parameters
    positional = [name for name, p in parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == PUBLISHED_SIGNATURES[kind]
    assert {name: parameters[name].default for name in PUBLISHED_DEFAULTS[kind]} == PUBLISHED_DEFAULTS[kind]
    assert {"device", "share_memory_between_layers"} <= set(parameters)
    model = CLASSES[kind](4, 6)  # the published defaults build, 5000 cells included
    assert model.nr_cells == PUBLISHED_DEFAULTS[kind]["nr_cells"] and model.batch_first and not model.debug
    assert next(model.parameters()).device.type == "cpu"


def test_constructor_aliases_and_options():
    model = make("DNC", num_layers=2, share_memory_between_layers=False, device="cpu")
    assert not model.core.config.share_memory and len(model.core.memories) == 2
    _, (_, memory, _) = model(torch.randn(B, T, D))
    assert isinstance(memory, list) and len(memory) == 2  # one memory state per layer
    shared = make("DNC", num_layers=2)
    assert len(shared.core.memories) == 1
    _, (_, memory, _) = shared(torch.randn(B, T, D))
    assert isinstance(memory, dict)
    with pytest.raises(ValueError, match="disagree"):
        make("DNC", share_memory=False, share_memory_between_layers=True)
    with pytest.raises(ValueError, match="bidirectional"):
        make("DNC", bidirectional=True)
    with pytest.raises(ValueError, match="rnn_type"):
        make("DNC", rnn_type="transformer")
    with pytest.raises(ValueError, match="dropout"):
        make("DNC", dropout=1.5)
    for rnn_type, controller in (("GRU", nn.GRU), ("rnn", nn.RNN)):
        model = make("DNC", rnn_type=rnn_type, nonlinearity="relu", num_hidden_layers=1)
        assert isinstance(model.core.controllers[0], controller)
        output, (hidden, _, _) = model(torch.randn(B, T, D))
        assert output.shape == (B, T, D) and hidden[0].shape == (1, B, 8)  # GRU / RNN: h only
    assert model.core.controllers[0].nonlinearity == "relu"
    assert make("DNC", output_size=3)(torch.randn(B, T, D))[0].shape == (B, T, 3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="gpu_id=-1"):
            make("DNC", gpu_id=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_runs_on_cuda_like_on_the_cpu(kind):
    cpu = make(kind)
    gpu = make(kind, gpu_id=0)
    assert next(gpu.parameters()).device.type == "cuda"
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(B, T, D)
    lengths = [5, 2, 4]
    expected, expected_state = cpu(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    got, state = gpu(pack_padded_sequence(x.cuda(), lengths, batch_first=True, enforce_sorted=False))
    torch.testing.assert_close(got.data.cpu(), expected.data, rtol=1e-4, atol=1e-5)
    assert all(t.device.type == "cuda" for t in state_tensors(state))


# ------------------------------------------------------------------------------------------------
# The controller's wiring, against a plain re-derivation with a formula memory


class FormulaMemory(nn.Module):
    """A stand-in memory with the contract's interface: state m [B, R * W]; a step sets
    m <- m / 2 + tanh(W xi) and reads r = m; masked rows keep m."""

    def __init__(self, input_size, nr_cells, cell_size, read_heads, independent_linears=False):
        super().__init__()
        self.read_size = read_heads * cell_size
        self.project = nn.Linear(input_size, self.read_size)

    def initial_state(self, batch_size, device=None, dtype=torch.float32):
        return {"memory": torch.zeros(batch_size, self.read_size, device=device, dtype=dtype)}

    def begin(self, state):
        return dict(state)

    def step(self, ctx, xi, mask=None):
        new = ctx["memory"] / 2 + torch.tanh(self.project(xi))
        ctx["memory"] = new if mask is None else torch.where(mask.unsqueeze(-1), new, ctx["memory"])
        return ctx["memory"]

    def end(self, ctx):
        return dict(ctx)

    def debug_view(self, ctx):
        return {"memory": ctx["memory"][0].detach()}


class FormulaCore(DNCCore):
    memory_class = FormulaMemory


def formula_reference(core: FormulaCore, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's equations, step by step, from zero states: x [T, B, D] -> y [T, B, O]."""
    config = core.config
    layers = config.num_layers
    hidden = [None] * layers
    reads = [torch.zeros(x.size(1), core.read_size) for _ in range(layers)]
    memories = [torch.zeros(x.size(1), core.read_size) for _ in core.memories]
    outputs = []
    for step in range(x.size(0)):
        layer_input = x[step]
        for layer in range(layers):
            controller_output, hidden[layer] = core.controllers[layer](
                torch.cat([layer_input, reads[layer]], -1)[None], hidden[layer])  # the previous step's reads
            xi = controller_output[0].clamp(-config.clip, config.clip)
            index = 0 if config.share_memory else layer
            memories[index] = memories[index] / 2 + torch.tanh(core.memories[index].project(xi))
            reads[layer] = memories[index]
            layer_input = torch.cat([xi, reads[layer]], -1)
        outputs.append(core.output(layer_input))
    return torch.stack(outputs)


@pytest.mark.parametrize("layers,share", [(1, True), (2, True), (2, False)])
def test_controller_wiring_equals_the_equations(layers, share):
    torch.manual_seed(0)
    core = FormulaCore(DNCConfig(input_size=D, hidden_size=6, num_layers=layers, nr_cells=4, read_heads=2,
                                 cell_size=3, share_memory=share, clip=0.05))  # a clip that acts
    x = torch.randn(T, B, D)
    output, state = core(x)
    torch.testing.assert_close(output, formula_reference(core, x), rtol=0, atol=1e-6)
    assert len(state.memory if not share else [state.memory]) == (layers if not share else 1)


@pytest.mark.parametrize("kind", KINDS)
def test_read_vectors_of_step_t_reach_the_controller_at_t_plus_1(kind, monkeypatch):
    model = make(kind, checkpoint_steps=0)
    memory = model.core.memories[0]
    reads = []
    original_step = memory.step

    def step(ctx, xi, mask=None):
        reads.append(original_step(ctx, xi, mask))
        return reads[-1]

    monkeypatch.setattr(memory, "step", step)
    initial_reads = torch.zeros(B, model.core.read_size, requires_grad=True)  # the published [B, R * W]
    output, _ = model(torch.randn(B, T, D), (None, None, initial_reads))
    # Step 1's output depends on step 0's reads only through the controller's input at step 1.
    (from_previous,) = torch.autograd.grad(output[:, 1].sum(), reads[0], retain_graph=True)
    assert from_previous.abs().sum() > 0
    (from_initial,) = torch.autograd.grad(output[:, 0].sum(), initial_reads)
    assert from_initial.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Calls, layouts, states


@pytest.mark.parametrize("kind", KINDS)
def test_call_forms_and_deterministic_zero_start(kind):
    model = make(kind)
    x = torch.randn(B, T, D)
    output, state = model(x)
    assert output.shape == (B, T, D)
    controller, memory, reads = state
    assert isinstance(controller, list) and len(controller) == 1 and len(controller[0]) == 2  # LSTM (h, c)
    assert controller[0][0].shape == (2, B, 8) and reads.shape == (B, 8) and isinstance(memory, dict)
    for hx in (None, (None, None, None), model.core.initial_state(B)):
        again, again_state = model(x, hx)
        assert torch.equal(again, output)
        assert_states_close(again_state, state, atol=0)
    assert_states_close(model.core.initial_state(B), model.core.initial_state(B), atol=0)
    positional, _ = model(x, (None, None, None), False, True)
    assert torch.equal(positional, output)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_first_layouts(kind):
    batch_first = make(kind)
    time_major = make(kind, batch_first=False)
    time_major.load_state_dict(batch_first.state_dict())
    x = torch.randn(B, T, D)
    expected, expected_state = batch_first(x)
    got, state = time_major(x.transpose(0, 1))
    assert got.shape == (T, B, D)
    torch.testing.assert_close(got.transpose(0, 1), expected, rtol=0, atol=1e-6)
    assert_states_close(state, expected_state)


@pytest.mark.parametrize("kind", KINDS)
def test_reset_experience_and_memory_carry(kind):
    model = make(kind)
    x = torch.randn(B, T, D)
    _, (_, memory, _) = model(x)
    fresh, _ = model(x, (None, None, None))
    remembered, _ = model(x, (None, memory, None))
    assert not torch.allclose(remembered, fresh)
    reset, (_, reset_memory, _) = model(x, (None, memory, None), reset_experience=True)
    assert torch.equal(reset, fresh)
    assert_states_close(reset_memory, memory, atol=0)  # the same run again from the initial memory


@pytest.mark.parametrize("kind", KINDS)
def test_pass_through_memory_false_skips_the_memory(kind):
    model = make(kind)
    x = torch.randn(B, T, D)
    _, (_, memory, reads) = model(x)
    output, (_, same_memory, same_reads) = model(x, (None, memory, reads), pass_through_memory=False)
    assert_states_close(same_memory, memory, atol=0)
    assert same_reads is None  # as pytorch-dnc 1.1.0 returns them without the memory
    through, _ = model(x, (None, memory, reads))
    assert not torch.allclose(output, through)
    # Without the memory, the read vectors given are what every step sees: a plain recurrent net.
    zero_reads, (_, fresh_memory, _) = model(x, (None, None, torch.zeros_like(reads)), pass_through_memory=False)
    assert_states_close(fresh_memory, published_initial_state(model, B)[1], atol=0)
    other_reads, _ = model(x, (None, None, torch.ones_like(reads)), pass_through_memory=False)
    assert not torch.allclose(zero_reads, other_reads)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers", [1, 2])
def test_debug_output(kind, layers):
    model = make(kind, debug=True, num_layers=layers)
    output, (_, memory, _), views = model(torch.randn(B, T, D))
    assert DEBUG_KEYS[kind] <= set(views)
    for key, array in views.items():
        assert array.ndim == 2 and array.shape[0] == T * layers, key
    # Rows are (time step, layer); the last is batch element 0 after the last write.
    torch.testing.assert_close(torch.from_numpy(views["memory"][-1]), memory["memory"][0].reshape(-1))
    assert not (views["memory"][0] == views["memory"][-1]).all()  # each row is a snapshot of its own step
    assert output.shape == (B, T, D)
    model.debug = False
    assert len(model(torch.randn(B, T, D))) == 2
    y, _, views = model.core.debug_forward(torch.randn(T, B, D))
    assert y.shape == (T, B, D) and views["memory"].shape[0] == T * layers


@pytest.mark.parametrize("kind", KINDS)
def test_batch_size_one(kind):
    model = make(kind)
    x = torch.randn(1, T, D)
    output, state = model(x)
    assert output.shape == (1, T, D) and torch.isfinite(output).all()
    initial = published_initial_state(model, 1)
    assert [t.shape for t in state_tensors(state)] == [t.shape for t in state_tensors(initial)]
    again, _ = model(x)
    assert torch.equal(again, output)
    if kind == "DNC":
        # Sparse reads pick the top-K rows; SAM's writes make rows tie in cosine, and float rounding that
        # differs with the batch size (GEMM blocking) can flip such ties, so only the DNC is compared across
        # batch sizes.
        batched, batched_state = model(x.expand(2, T, D))
        torch.testing.assert_close(batched[:1], output, rtol=0, atol=1e-6)
        assert_states_close(batch_row(batched_state, 0), state)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_and_masked_steps_leave_the_state_alone(kind):
    model = make(kind)
    lengths = [5, 2, 4]
    x = torch.randn(3, 5, D)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    output, state = model(packed)
    assert isinstance(output, PackedSequence)
    padded, out_lengths = pad_packed_sequence(output, batch_first=True)
    assert out_lengths.tolist() == lengths
    for row, length in enumerate(lengths):
        # Each sequence ends as if run to its own length (the same batch, so the same arithmetic).
        shorter, shorter_state = model(x[:, :length])
        torch.testing.assert_close(padded[row, :length], shorter[row], rtol=0, atol=1e-6)
        assert_states_close(batch_row(state, row), batch_row(shorter_state, row))
        if kind == "DNC":  # and alone (see test_batch_size_one for the sparse memories)
            alone, alone_state = model(x[row:row + 1, :length])
            torch.testing.assert_close(padded[row, :length], alone[0], rtol=0, atol=1e-6)
            assert_states_close(batch_row(state, row), alone_state)
    mask = torch.arange(5).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # [B, T]
    masked, masked_state = model(x, mask=mask)
    torch.testing.assert_close(masked, padded, rtol=0, atol=1e-6)  # zeros at padded steps too
    assert_states_close(masked_state, state)
    # A row that is padding throughout keeps its initial state exactly.
    mask[1] = False
    _, state = model(x, mask=mask)
    assert_states_close(batch_row(state, 1), batch_row(published_initial_state(model, 3), 0), atol=0)
    with pytest.raises(ValueError, match="mask"):
        model(x, mask=mask[:, :3])


@pytest.mark.parametrize("kind", KINDS)
def test_state_is_tensors_that_copy_move_and_carry(kind):
    model = make(kind)
    x = torch.randn(B, T, D)
    whole, whole_state = model(x)
    first, state = model(x[:, :2])
    assert all(isinstance(t, torch.Tensor) for t in state_tensors(state))
    copied = copy.deepcopy(detach_state(state))
    moved = map_state(lambda t: t.to("cpu", copy=True), state)
    rebuilt = state_from_tensors(published_initial_state(model, B), [t.clone() for t in state_tensors(state)])
    for carried in (state, copied, moved, rebuilt):
        second, carried_state = model(x[:, 2:], carried)
        torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=0, atol=1e-6)
        assert_states_close(carried_state, whole_state)


def test_bad_input_and_state_are_named():
    model = make("DNC")
    with pytest.raises(ValueError, match="input"):
        model(torch.randn(B, T, D + 1))
    _, state = model(torch.randn(B, T, D))
    with pytest.raises(ValueError, match="batch size"):
        model(torch.randn(B + 1, T, D), (None, state[1], None))
    with pytest.raises(ValueError, match="read_vectors"):
        model(torch.randn(B, T, D), (None, None, torch.zeros(B, 3)))
    with pytest.raises(ValueError, match="controller_hidden has 2 layers"):
        model(torch.randn(B, T, D), (state[0] * 2, None, None))


# ------------------------------------------------------------------------------------------------
# Segment checkpointing


def test_checkpointed_segments_equal_the_plain_run(monkeypatch):
    calls = []
    real_checkpoint = dnc_module.checkpoint
    monkeypatch.setattr(dnc_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    model = make("DNC", num_layers=2, dropout=0.3, num_hidden_layers=2)
    model.train()  # dropout on: checkpointing must replay the same masks
    x = torch.randn(B, 7, D)
    lengths_mask = torch.ones(B, 7, dtype=torch.bool)
    lengths_mask[0, 4:] = False
    results = []
    for steps in (0, 2, 3):  # off, every 2 steps, every 3 steps
        model.core.config.checkpoint_steps = steps
        model.zero_grad()
        x_leaf = x.clone().requires_grad_()
        torch.manual_seed(3)
        output, state = model(x_leaf, mask=lengths_mask)
        loss = output.pow(2).sum() + sum(t.sin().sum() for t in state_tensors(state))
        loss.backward()
        results.append([output, *state_tensors(state), x_leaf.grad, *(p.grad for p in model.parameters())])
    assert len(calls) == 3 + 2  # segments of 2 steps (4), then of 3 (3); the last of each runs as it is
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # nothing to save: no checkpointing
        model(x)
    assert len(calls) == 5
    # Automatic: from 256 cells on, the DNC keeps its link matrices on a tape every ceil(sqrt(T)) steps
    # (test_link_tape_equals_the_plain_run), without checkpointed segments.
    assert make("DNC", nr_cells=256).core._segment_length(20, True, False) == (20, False, 5)
    assert make("DNC", nr_cells=256).core._segment_length(20, True, True) == (20, False, 0)  # debug
    assert make("DNC", nr_cells=256, checkpoint_steps=4).core._segment_length(20, True, False) == (4, True, 0)
    assert make("DNC", nr_cells=256, checkpoint_steps=0).core._segment_length(20, True, False) == (20, False, 0)
    assert make("DNC", nr_cells=255).core._segment_length(20, True, False) == (20, False, 0)
    assert make("SAM", nr_cells=4096).core._segment_length(20, True, False) == (20, False, 0)
    with torch.no_grad():
        assert make("DNC", nr_cells=256).core._segment_length(20, True, False) == (20, False, 0)


def test_link_tape_equals_the_plain_run(monkeypatch):
    """The automatic setting of large DNCs (here forced from 1 cell): link matrices kept every 3 of 7 steps
    and replayed in backward give the outputs, states and gradients of keeping them all, with two layers,
    dropout, padding and a state carried in with gradients."""
    tapes = []
    real_tape = models.dnc.memory.LinkTape
    monkeypatch.setattr(models.dnc.memory, "LinkTape", lambda every: tapes.append(every) or real_tape(every))
    model = make("DNC", num_layers=2, dropout=0.3, num_hidden_layers=2)
    model.train()
    x = torch.randn(B, 7, D)
    mask = torch.ones(B, 7, dtype=torch.bool)
    mask[0, 4:] = False
    with torch.no_grad():
        _, carried = model(torch.randn(B, 3, D))
    results = []
    for automatic in (False, True):
        model.core.checkpoint_min_cells = 1 if automatic else None
        model.zero_grad()
        x_leaf = x.clone().requires_grad_()
        state = map_state(lambda tensor: tensor.clone().requires_grad_(), carried)
        torch.manual_seed(3)
        output, new_state = model(x_leaf, state, mask=mask)
        loss = output.pow(2).sum() + sum(t.sin().sum() for t in state_tensors(new_state))
        inputs = [x_leaf, *state_tensors(state), *model.parameters()]
        results.append([output, *state_tensors(new_state), *torch.autograd.grad(loss, inputs)])
    assert tapes == [3]  # ceil(sqrt(7)), one tape for the layers' shared memory, in the automatic run only
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Gradients and learning


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    # Sparse reads are piecewise differentiable: a SAM write spreads one vector over several rows,
    # so rows often tie exactly in cosine, and a finite difference that moves a tied row across the
    # top-K boundary jumps. The seed gives a point away from such a boundary (checked for each kind).
    sizes = {"DNC": {"nr_cells": 4, "cell_size": 2}, "SAM": {"nr_cells": 10, "cell_size": 4, "sparse_reads": 2},
             "SDNC": {"nr_cells": 10, "cell_size": 4, "sparse_reads": 2, "temporal_reads": 1}}[kind]
    torch.manual_seed(1)
    model = CLASSES[kind](input_size=2, hidden_size=3, read_heads=1, num_hidden_layers=1, checkpoint_steps=2,
                          **sizes).double()
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    reads = torch.randn(2, model.core.read_size, dtype=torch.float64, requires_grad=True)

    def run(x, reads):
        output, (_, memory, last_reads) = model(x, (None, None, reads))
        return output, memory["memory"].sum(-1), last_reads  # [B, N]: each row's sum keeps the check short

    assert torch.autograd.gradcheck(run, (x, reads), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_falls_on_a_tiny_copy_problem(kind):
    bits, length, batch = 3, 3, 16
    model = make(kind, input_size=bits + 1, hidden_size=24, read_heads=1, cell_size=6)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        sequence = torch.randint(0, 2, (batch, length, bits), generator=generator).float()
        inputs = torch.zeros(batch, 2 * length + 1, bits + 1)
        inputs[:, :length, :bits] = sequence
        inputs[:, length, bits] = 1  # end marker, then reproduce
        output, _ = model(inputs)
        loss = nn.functional.binary_cross_entropy_with_logits(output[:, length + 1:, :bits], sequence)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


# ------------------------------------------------------------------------------------------------
# The registered cores and their flags


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dropout", type=float, default=0.0)
    LSTM.add_args(parser)  # as in the scripts: the shared --nhid comes from whichever core adds it first
    DNCCore.add_args(parser)
    SAMCore.add_args(parser)
    return parser.parse_args(argv)


def test_cores_are_registered_with_the_published_flags():
    assert {"dnc", "sam", "sdnc"} <= set(models.CORES)
    assert models.get_core_class("SDNC") is SDNCCore
    args = parse(["-nhid", "12", "-rnn_type", "GRU", "-nlayer", "2", "-nhlayer", "1", "-mem_slot", "7",
                  "-mem_size", "3", "-read_heads", "2", "-sparse_reads", "3", "-temporal_reads", "2",
                  "--dropout", "0.25", "--independent-linears", "--controller-clip", "5"])
    config = SDNCCore.config_from_args(args, input_size=9)
    assert (config.hidden_size, config.rnn_type, config.num_layers, config.num_hidden_layers) == (12, "gru", 2, 1)
    assert (config.nr_cells, config.cell_size, config.read_heads, config.sparse_reads, config.temporal_reads) == \
        (7, 3, 2, 3, 2)
    assert config.dropout == 0.25 and config.independent_linears and config.clip == 5.0
    assert config.nn_index == "exact"
    double = parse(["--nhid", "12", "--nlayer", "1", "--nhlayer", "1", "--mem_slot", "7", "--mem_size", "3",
                    "--read_heads", "2", "--sparse_reads", "3", "--dropout", "0.25", "--nn-index", "exact"])
    config = SAMCore.config_from_args(double, input_size=9)
    assert (config.num_layers, config.nr_cells, config.sparse_reads) == (1, 7, 3)
    assert config.dropout == 0.0  # a single recurrent layer: nothing to drop between
    defaults = DNCCore.config_from_args(parse([]), input_size=9)
    assert (defaults.nr_cells, defaults.cell_size, defaults.read_heads, defaults.num_hidden_layers) == (16, 20, 4, 2)


def test_index_flags_reach_the_sparse_memories():
    args = parse(["-mem_slot", "64", "--nn-index", "faiss", "--index-lists", "8", "--index-probes", "3"])
    memory = SDNCCore(SDNCCore.config_from_args(args, input_size=9)).memories[0]
    assert (memory.index, memory.index_lists, memory.index_probes) == ("faiss", 8, 3)
    memory = SAMCore(SAMCore.config_from_args(parse(["--nn-index", "faiss"]), input_size=9)).memories[0]
    assert (memory.index, memory.index_lists, memory.index_probes) == ("faiss", None, 8)  # exhaustive
    with pytest.raises(ValueError, match="--nn-index faiss"):
        SAMCore.config_from_args(parse(["--index-lists", "8"]), input_size=9)


@pytest.mark.parametrize("kind", KINDS)
def test_core_is_the_published_model_time_major(kind):
    published = make(kind)
    core = models.build_core(kind, published.core.config)
    core.load_state_dict(published.core.state_dict())
    x = torch.randn(T, B, D)
    output, state = core(x)
    assert core.output_size == D and output.shape == (T, B, D)
    expected, expected_state = published(x.transpose(0, 1))
    torch.testing.assert_close(output, expected.transpose(0, 1), rtol=0, atol=1e-6)
    assert_states_close(published._published_state(state, pass_through_memory=True), expected_state)
