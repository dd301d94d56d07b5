"""The cell-based builder (models/rnnlib.py): custom cells, stacks of any widths, fused == unrolled,
compiled == eager, and the RNNLIB core."""

import argparse
import dataclasses
import warnings

import pytest
import torch
from torch import nn

from models.core import build_core, get_core_class, map_state, state_tensors
from models.rnn import RNNConfig
from models.rnnlib import (
    CELLS, GRU, LSTM, RNN, WEIGHT_NAMES, Cell, Chain, LSTMCellState, Recurrent, RNNLibConfig, RNNLibCore,
    elman_cell, gru_cell, lstm_cell, make_recurrent, unroll,
)

T, B, D, H = 6, 3, 4, 6
# torch.compile's own imports use a deprecated torch.jit API (torch 2.13); not ours to fix.
IGNORE_COMPILER_DEPRECATION = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


class SigmoidElman(nn.Module):
    """h_t = sigmoid(R h_{t-1} + A x_t): the README's example of a cell of your own."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_map = nn.Linear(input_size, hidden_size, bias=False)  # A
        self.recurrent_map = nn.Linear(hidden_size, hidden_size, bias=False)  # R

    def forward(self, x, h):
        h = torch.sigmoid(self.recurrent_map(h) + self.input_map(x))
        return h, h


def elman(input_size: int, hidden_size: int) -> Cell:
    return Cell(SigmoidElman(input_size, hidden_size), lambda batch_size: torch.zeros(batch_size, hidden_size))


def elman_loop(steps: list[SigmoidElman], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The stack written out by hand: every layer at every step, from zero states."""
    hidden = [x.new_zeros(x.size(1), step.recurrent_map.weight.size(0)) for step in steps]
    outputs = []
    for x_t in x:
        layer_input = x_t
        for layer, step in enumerate(steps):
            hidden[layer] = torch.sigmoid(hidden[layer] @ step.recurrent_map.weight.T
                                          + layer_input @ step.input_map.weight.T)
            layer_input = hidden[layer]
        outputs.append(layer_input)
    return torch.stack(outputs), hidden


def test_custom_cell_equals_a_hand_written_loop():
    torch.manual_seed(0)
    net = make_recurrent(elman, D, [5, 7]).double()
    x = torch.randn(T, B, D, dtype=torch.double)
    output, state = net(x)  # the cell's float32 zeros start on x's dtype
    expected, expected_state = elman_loop([layer.step for layer in net.layers], x)
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(state, expected_state):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert net.execution_plan() == [(0, 1, False), (1, 2, False)]  # a cell of your own is unrolled
    single, single_state = unroll(Cell(net.layers[0].step, net.layers[0].make_state), x)
    expected, expected_state = elman_loop([net.layers[0].step], x)
    torch.testing.assert_close(single, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(single_state, expected_state[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_shipped_steps_match_torch_cells(name):
    torch.manual_seed(0)
    step = CELLS[name](D, H).step.double()
    x, h, c = (torch.randn(B, size, dtype=torch.double) for size in (D, H, H))
    if name == "lstm":
        reference = nn.LSTMCell(D, H).double()
        reference.load_state_dict(step.state_dict())  # the same parameter names and layout
        output, state = step(x, LSTMCellState(h, c))
        expected_h, expected_c = reference(x, (h, c))
        torch.testing.assert_close(state.c, expected_c)
    elif name == "gru":
        reference = nn.GRUCell(D, H).double()
        reference.load_state_dict(step.state_dict())
        output, state = step(x, h)
        expected_h = reference(x, h)
    elif name == "elman-sigmoid":
        output, state = step(x, h)
        expected_h = torch.sigmoid(x @ step.weight_ih.T + step.bias_ih + h @ step.weight_hh.T + step.bias_hh)
    else:
        reference = nn.RNNCell(D, H, nonlinearity=name.split("-")[1]).double()
        reference.load_state_dict(step.state_dict())
        output, state = step(x, h)
        expected_h = reference(x, h)
    torch.testing.assert_close(output, expected_h)


@pytest.mark.parametrize("cell_fn", [lstm_cell, elman], ids=["lstm", "custom"])
@pytest.mark.parametrize("fused", [True, False])
def test_make_recurrent_any_widths_and_carried_state(cell_fn, fused):
    torch.manual_seed(0)
    net = make_recurrent(cell_fn, D, [8, 12, 5], fused=fused)
    x = torch.randn(T, B, D)
    output, state = net(x)
    assert output.shape == (T, B, 5) and net.output_size == 5 and len(state) == 3
    assert [state_tensors(layer_state)[0].shape for layer_state in state] == [(B, 8), (B, 12), (B, 5)]
    fresh = net.initial_state(B)
    assert all(torch.count_nonzero(t) == 0 for t in state_tensors(fresh))
    assert [t.shape for t in state_tensors(fresh)] == [t.shape for t in state_tensors(state)]
    first, carried = net(x[:2])
    second, carried = net(x[2:], carried)
    torch.testing.assert_close(torch.cat([first, second]), output, rtol=0, atol=1e-6)
    for a, b in zip(state_tensors(carried), state_tensors(state)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_execution_plan_fuses_runs_of_equal_widths():
    assert make_recurrent(lstm_cell, D, [H, H, H]).execution_plan() == [(0, 3, True)]
    assert make_recurrent(lstm_cell, D, [5, H, H]).execution_plan() == [(0, 1, True), (1, 3, True)]
    assert make_recurrent(lstm_cell, D, [H, H], fused=False).execution_plan() == [(0, 1, False), (1, 2, False)]
    assert RNN(D, H, 2, nonlinearity="sigmoid").execution_plan() == [(0, 1, False), (1, 2, False)]
    mixed = Chain([Recurrent(lstm_cell(D, H), D, H), Recurrent(gru_cell(H, H), H, H), Recurrent(gru_cell(H, H), H, H)])
    assert mixed.execution_plan() == [(0, 1, True), (1, 3, True)]


FUSED_CASES = [("lstm", [H, H, H]), ("gru", [H, H]), ("elman-tanh", [H, H]), ("elman-relu", [5, H, H]),
               ("lstm", [8, 12, 5])]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("cell,hids", FUSED_CASES, ids=[f"{cell}-{hids}" for cell, hids in FUSED_CASES])
def test_fused_and_unrolled_give_equal_outputs_states_and_gradients(cell, hids, dtype, tolerance):
    torch.manual_seed(0)
    fused = make_recurrent(CELLS[cell], D, hids).to(dtype)
    unrolled = make_recurrent(CELLS[cell], D, hids, fused=False).to(dtype)
    assert fused.state_dict().keys() == unrolled.state_dict().keys()
    unrolled.load_state_dict(fused.state_dict())
    assert all(group[2] for group in fused.execution_plan())
    x = torch.randn(T, B, D, dtype=dtype)
    initial = map_state(torch.randn_like, fused.initial_state(B))
    results = []
    for net in (fused, unrolled):
        x_leaf = x.clone().requires_grad_()
        state0 = map_state(lambda t: t.clone().requires_grad_(), initial)
        output, state = net(x_leaf, state0)
        loss = output.pow(2).sum() + sum(t.sin().sum() for t in state_tensors(state))
        loss.backward()
        grads = [x_leaf.grad] + [t.grad for t in state_tensors(state0)] + [p.grad for p in net.parameters()]
        results.append([output, *state_tensors(state), *grads])
    assert type(state) is tuple and len(results[0]) == len(results[1])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name,nonlinearity", [("LSTM", None), ("GRU", None), ("RNN", "tanh"), ("RNN", "relu")])
def test_equal_width_stacks_match_torch_modules(name, nonlinearity):
    torch.manual_seed(0)
    options = {"nonlinearity": nonlinearity} if nonlinearity else {}
    ours = {"LSTM": LSTM, "GRU": GRU, "RNN": RNN}[name](D, H, num_layers=2, **options).double()
    reference = getattr(nn, name)(D, H, num_layers=2, **options).double()
    reference.load_state_dict({f"{weight}_l{index}": getattr(layer.step, weight)
                               for index, layer in enumerate(ours.layers) for weight in WEIGHT_NAMES})
    x = torch.randn(T, B, D, dtype=torch.double)
    expected, expected_hidden = reference(x)
    expected_h = expected_hidden[0] if name == "LSTM" else expected_hidden
    for fused in (True, False):
        ours.fused = fused
        output, state = ours(x)
        torch.testing.assert_close(output, expected)
        h = torch.stack([layer_state.h if name == "LSTM" else layer_state for layer_state in state])
        torch.testing.assert_close(h, expected_h)


@pytest.mark.parametrize("fused", [True, False])
def test_dropout_between_layers_only_in_training(fused):
    torch.manual_seed(0)
    net = LSTM(D, H, num_layers=2, dropout=0.5, fused=fused)
    x = torch.randn(T, B, D)
    net.eval()
    a, _ = net(x)
    b, _ = net(x)
    assert torch.equal(a, b)
    net.train()
    c, _ = net(x)
    assert not torch.allclose(a, c)


def test_chain_runs_any_core_layer_over_layer():
    torch.manual_seed(0)
    first = Recurrent(elman(D, 5), D, 5)
    second = build_core("LSTM", RNNConfig(input_size=5, hidden_size=H, num_layers=2))
    chain = Chain([first, second])
    x = torch.randn(T, B, D)
    output, state = chain(x)
    middle, first_state = first(x)
    expected, second_state = second(middle)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    assert chain.output_size == H and type(state[1]) is type(second_state)
    head, carried = chain(x[:4])
    tail, carried = chain(x[4:], carried)
    torch.testing.assert_close(torch.cat([head, tail]), output, rtol=0, atol=1e-6)


@IGNORE_COMPILER_DEPRECATION
def test_compiled_cell_equals_eager_with_gradients():
    """One compile of forward and backward (about 8 s on the 2-core CPU): outputs, final states and every
    parameter's gradient equal eager's; compiling keeps the parameters and the state dict."""
    torch.manual_seed(0)
    eager = make_recurrent(elman, D, [5])
    compiled = make_recurrent(elman, D, [5], compile_cell=True)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(T, B, D)
    results = []
    for net in (eager, compiled):
        output, state = net(x)
        (output.pow(2).sum() + state[0].sum()).backward()
        results.append([output, *state, *(p.grad for p in net.parameters())])
    assert compiled.layers[0].step._compiled_call_impl is not None
    assert len(results[1]) == len(results[0]) > 3
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_tiny_model_learns_to_repeat_the_previous_symbol():
    torch.manual_seed(0)
    core = build_core("RNNLIB", {"input_size": 3, "hids": [16], "cell": "elman-tanh"})
    readout = nn.Linear(core.output_size, 3)
    optimizer = torch.optim.Adam([*core.parameters(), *readout.parameters()], lr=0.03)
    losses = []
    for _ in range(60):
        symbols = torch.randint(3, (10, 16))  # [T, B]
        output, _ = core(nn.functional.one_hot(symbols, 3).float())
        loss = nn.functional.cross_entropy(readout(output[1:]).flatten(0, 1), symbols[:-1].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]  # chance is ln 3 = 1.1


def test_core_builds_from_flags_and_checkpoint_dicts():
    assert get_core_class("rnnlib") is RNNLibCore
    parser = argparse.ArgumentParser()
    RNNLibCore.add_args(parser)
    args = parser.parse_args(["--cell", "GRU", "--hids", "8", "12", "--dropouth", "0.25"])
    config = RNNLibCore.config_from_args(args, input_size=D)
    assert config == RNNLibConfig(input_size=D, hids=[8, 12], cell="gru", dropout=0.25)
    core = build_core("RNNLIB", dataclasses.asdict(config))  # as a checkpoint rebuilds it
    output, state = core(torch.randn(T, B, D))
    assert output.shape == (T, B, 12) and core.output_size == 12 and len(state) == 2
    args = parser.parse_args(["--nhid", "7", "--nlayers", "3", "--rnn-impl", "loop", "--compile-cell"])
    config = RNNLibCore.config_from_args(args, input_size=D)
    assert config.hids == [7, 7, 7] and config.cell == "lstm" and config.implementation == "loop"
    assert config.compile_cell and config.dropout == 0.0
    looped = build_core("RNNLIB", dataclasses.replace(config, compile_cell=False))
    fused = build_core("RNNLIB", dataclasses.replace(config, compile_cell=False, implementation="fused"))
    fused.load_state_dict(looped.state_dict())
    x = torch.randn(T, B, D)
    torch.testing.assert_close(fused(x)[0], looped(x)[0])


def test_bad_widths_and_cell_names_raise_value_errors():
    with pytest.raises(ValueError, match="hids must be a non-empty list"):
        make_recurrent(lstm_cell, D, [])
    with pytest.raises(ValueError, match=r"every width in hids \[8, 0\] must be a positive integer, got 0"):
        make_recurrent(lstm_cell, D, [8, 0])
    with pytest.raises(ValueError, match="input_size must be a positive integer"):
        make_recurrent(lstm_cell, 0, [8])
    with pytest.raises(ValueError, match="num_layers"):
        LSTM(D, H, num_layers=0)
    with pytest.raises(ValueError, match="cell must be one of elman-sigmoid, .*got 'lstmm'"):
        RNNLibConfig(input_size=D, hids=[8], cell="lstmm")
    with pytest.raises(ValueError, match="hids must be a non-empty list"):
        RNNLibConfig(input_size=D, hids=8)
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        elman_cell(D, H, nonlinearity="softplus")
    with pytest.raises(ValueError, match="layer 1 reads 6 features but layer 0 outputs 5"):
        Chain([Recurrent(lstm_cell(D, 5), D, 5), Recurrent(lstm_cell(6, 6), 6, 6)])
    with pytest.raises(ValueError, match=r"expected an input sequence \[T >= 1, B, 4\]"):
        LSTM(D, H)(torch.randn(T, B, 5))
    with pytest.raises(ValueError, match=r"one entry per layer \(2\), got 1"):
        LSTM(D, H, num_layers=2)(torch.randn(T, B, D), (LSTM(D, H).initial_state(B)[0],))
    with pytest.raises(TypeError, match="a cell is"):
        Recurrent((lambda x, h: (h, h), lambda batch_size: None), D, H)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_reads_the_cells_weights_in_place():
    torch.manual_seed(0)
    net = LSTM(D, H, num_layers=2).double().cuda()
    x = torch.randn(T, B, D, dtype=torch.double, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cuDNN warns when it has to pack a copy of non-flattened weights
        output, state = net(x)
    net.fused = False
    unrolled, unrolled_state = net(x)
    torch.testing.assert_close(output, unrolled)
    for a, b in zip(state_tensors(state), state_tensors(unrolled_state)):
        torch.testing.assert_close(a, b)


def test_compile_steps_marks_the_unrolled_layers_only():
    """`--compile` on an RNNLIB core: layers a fused kernel runs have no steps to compile."""
    from models.rnnlib import RNNLibConfig, RNNLibCore

    fused = RNNLibCore(RNNLibConfig(input_size=3, hids=[4, 4], cell="lstm"))
    assert not fused.compile_steps() and not any(layer.compile_cell for layer in fused.stack.layers)
    looped = RNNLibCore(RNNLibConfig(input_size=3, hids=[4, 4], cell="gru", implementation="loop"))
    assert looped.compile_steps() and all(layer.compile_cell for layer in looped.stack.layers)
