"""QRNN: layers and stacks against a per-step re-derivation, zoneout, bidirectional, padding, the core."""

import argparse
import dataclasses

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import models
import models.qrnn as qrnn_module
from models.core import Core, detach_state, state_from_tensors, state_tensors
from models.lm import LanguageModel, LMConfig
from models.qrnn import QRNN, QRNNConfig, QRNNCore, QRNNLayer, QRNNState
from models.rnn import LSTM

T, B, D, H = 7, 3, 5, 4
DOUBLE = dict(rtol=1e-10, atol=1e-10)


def layer_ref(layer: QRNNLayer, x, h0=None, prev_x=None, forget_mask=None, forget_scale=1.0):
    """One QRNN layer, step by step: window newest first, gates Z, F, O, then h = f z + (1 - f) h.

    Returns outputs [T, B, H], the final h [B, H] and the last W - 1 inputs [W - 1, B, D].
    """
    weight, bias = layer.linear.weight, layer.linear.bias
    size, context = layer.hidden_size, layer.window - 1
    history = list(prev_x) if prev_x is not None else [x.new_zeros(x.shape[1:])] * context
    h = x.new_zeros(x.size(1), size) if h0 is None else h0
    outputs = []
    for step in range(x.size(0)):
        history.append(x[step])
        window = torch.cat(history[::-1][:layer.window], dim=1)  # [x_t, x_{t-1}, ...]: [B, W * D]
        gates = window @ weight.T + (0 if bias is None else bias)
        z = torch.tanh(gates[:, :size])
        f = torch.sigmoid(gates[:, size:2 * size]) * forget_scale
        if forget_mask is not None:
            f = f * forget_mask[step]
        h = f * z + (1 - f) * h
        outputs.append(torch.sigmoid(gates[:, 2 * size:]) * h if layer.output_gate else h)
    last_inputs = torch.stack(history[len(history) - context:]) if context else x.new_zeros(0, *x.shape[1:])
    return torch.stack(outputs), h, last_inputs


def stack_ref(qrnn: QRNN, x, hidden=None):
    """A (bidirectional) QRNN stack from `layer_ref`: the backward layer reads the mirrored sequence."""
    finals = []
    for level in range(qrnn.num_layers):
        first = level * qrnn.directions
        h0 = None if hidden is None else hidden[first]
        output, last, _ = layer_ref(qrnn.layers[first], x, h0)
        finals.append(last)
        if qrnn.bidirectional:
            h0 = None if hidden is None else hidden[first + 1]
            backward, last, _ = layer_ref(qrnn.layers[first + 1], x.flip(0), h0)
            finals.append(last)
            output = torch.cat([output, backward.flip(0)], dim=2)
        x = output
    return x, torch.stack(finals)


def random_state(layer: QRNNLayer, batch: int = B):
    return (torch.randn(batch, layer.hidden_size, dtype=torch.double),
            torch.randn(layer.window - 1, batch, layer.input_size, dtype=torch.double))


# --------------------------------------------------------------------------- one layer


@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("output_gate", [True, False])
def test_layer_matches_step_by_step_reference_with_gradients(window, output_gate):
    torch.manual_seed(0)
    layer = QRNNLayer(D, H, window=window, output_gate=output_gate).double()
    assert layer.linear.weight.shape == ((3 if output_gate else 2) * H, window * D)
    x = torch.randn(T, B, D, dtype=torch.double)
    h0, prev_x = random_state(layer)
    results = []
    for run in (layer.run, lambda *inputs: layer_ref(layer, *inputs)):
        inputs = [t.clone().requires_grad_() for t in (x, h0, prev_x)]
        output, last, last_inputs = run(*inputs)
        (output.pow(2).sum() + last.sin().sum()).backward()
        grads = [t.grad for t in inputs[:2]] + [p.grad for p in layer.parameters()]
        if window > 1:
            grads.append(inputs[2].grad)
        layer.zero_grad()
        results.append([output, last, last_inputs] + grads)
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, **DOUBLE)


def test_layer_forward_is_the_reference_call():
    torch.manual_seed(0)
    layer = QRNNLayer(D, H, window=2, use_cuda=True).double()  # the fused kernels need CUDA: eager here
    x = torch.randn(T, B, D, dtype=torch.double)
    output, h_n = layer(x)
    expected, last, _ = layer_ref(layer, x)
    assert h_n.shape == (1, B, H)
    torch.testing.assert_close(output, expected, **DOUBLE)
    torch.testing.assert_close(h_n[0], last, **DOUBLE)
    assert layer.prev_x is None  # nothing kept without save_prev_x
    assert QRNNLayer(D).hidden_size == D  # hidden_size defaults to input_size


@pytest.mark.parametrize("window", [2, 3])
def test_save_prev_x_across_calls_equals_one_long_call_and_reset_forgets(window):
    torch.manual_seed(0)
    layer = QRNNLayer(D, H, window=window, save_prev_x=True).double()
    x = torch.randn(T, B, D, dtype=torch.double)
    whole, whole_h = layer(x)
    layer.reset()
    outputs, h_n = [], None
    for start, stop in [(0, 1), (1, 4), (4, T)]:  # the first chunk is shorter than the window
        output, h_n = layer(x[start:stop], h_n)  # feeding back the [1, B, H] h_n
        outputs.append(output)
    torch.testing.assert_close(torch.cat(outputs), whole, **DOUBLE)
    torch.testing.assert_close(h_n, whole_h, **DOUBLE)
    torch.testing.assert_close(layer.prev_x, x[T - window + 1:], **DOUBLE)
    assert not layer.prev_x.requires_grad  # detached, as the reference keeps it

    saved = layer.prev_x
    continued, _ = layer(x)
    torch.testing.assert_close(continued, layer_ref(layer, x, prev_x=saved)[0], **DOUBLE)
    layer.reset()
    assert layer.prev_x is None
    fresh, _ = layer(x)
    torch.testing.assert_close(fresh, whole, **DOUBLE)  # zeros before the first step again
    assert not torch.allclose(fresh[0], continued[0])


@pytest.mark.parametrize("window, steps", [(1, T), (2, T), (3, 1)])
def test_next_prev_x_is_a_copy_not_a_view_of_the_input(window, steps):
    """A state that carries prev_x to the next window must not keep the whole input [T, B, D] alive."""
    layer = QRNNLayer(D, H, window=window)
    x = torch.randn(steps, B, D)
    _, _, next_prev_x = layer.run(x, prev_x=torch.randn(window - 1, B, D))
    assert next_prev_x.shape == (window - 1, B, D)
    assert next_prev_x.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_layers_take_the_eager_path_without_cuda():
    layer = QRNNLayer(D, H)
    gates = torch.randn(T, B, 3 * H)
    assert not layer.uses_fused_pool(gates)  # CPU tensors (the Triton kernels are tested in test_triton_kernels.py)


def record_forget_gates(monkeypatch):
    """Make `models.qrnn.forget_mult` record the forget gates it is given."""
    seen = []
    original = qrnn_module.forget_mult

    def recording(f, x, h0=None, reverse=False):
        seen.append(f.detach().clone())
        return original(f, x, h0, reverse=reverse)

    monkeypatch.setattr(qrnn_module, "forget_mult", recording)
    return seen


def test_zoneout_masks_forget_gates_in_training_and_scales_them_in_eval(monkeypatch):
    torch.manual_seed(0)
    zoneout = 0.3
    layer = QRNNLayer(D, 16, window=2, zoneout=zoneout).double()
    x = torch.randn(50, 8, D, dtype=torch.double)
    gates = torch.sigmoid(layer.linear(torch.cat([x, torch.cat([x[:1] * 0, x[:-1]])], dim=2))[..., 16:32])
    seen = record_forget_gates(monkeypatch)

    output, _ = layer.train()(x)
    forget = seen[-1]
    kept = forget != 0
    assert abs((~kept).double().mean().item() - zoneout) < 0.03  # Bernoulli(1 - zoneout), per element
    torch.testing.assert_close(forget[kept], gates[kept], **DOUBLE)  # kept gates are not rescaled
    expected, _, _ = layer_ref(layer, x, forget_mask=kept.double())
    torch.testing.assert_close(output, expected, **DOUBLE)
    again, _ = layer(x)
    assert not torch.equal(seen[-1], forget)  # a fresh mask per call

    output, _ = layer.eval()(x)
    torch.testing.assert_close(seen[-1], gates * (1 - zoneout), **DOUBLE)  # the reference's eval rule
    torch.testing.assert_close(output, layer_ref(layer, x, forget_scale=1 - zoneout)[0], **DOUBLE)
    torch.testing.assert_close(layer(x)[0], output, rtol=0, atol=0)  # deterministic in eval


def test_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="window must be a positive integer, got 0"):
        QRNNLayer(D, H, window=0)
    with pytest.raises(ValueError, match=r"zoneout must be in \[0, 1\), got 1"):
        QRNNLayer(D, H, zoneout=1)
    with pytest.raises(ValueError, match="hidden_size must be positive"):
        QRNNLayer(D, 0)
    layer = QRNNLayer(D, H, window=2)
    with pytest.raises(ValueError, match=r"input must be \[T >= 1, B, 5\]"):
        layer(torch.randn(T, B, D + 1))
    with pytest.raises(ValueError, match="hidden must be"):
        layer(torch.randn(T, B, D), torch.zeros(B, H + 1))
    with pytest.raises(ValueError, match="reverse direction"):
        layer.run(torch.randn(T, B, D), prev_x=torch.zeros(1, B, D), reverse=True)
    with pytest.raises(ValueError, match="call reset"):
        layer.run(torch.randn(T, B, D), prev_x=torch.zeros(1, B + 1, D))
    with pytest.raises(ValueError, match="lengths must lie between 0 and the 7 time steps"):
        layer(torch.randn(T, B, D), lengths=[1, 8, 2])


# --------------------------------------------------------------------------- stacks


def test_stack_shapes_h_n_and_reference():
    torch.manual_seed(0)
    qrnn = QRNN(D, H, num_layers=3, window=2, dropout=0.5).double().eval()
    assert [(layer.input_size, layer.hidden_size) for layer in qrnn.layers] == [(D, H), (H, H), (H, H)]
    x = torch.randn(T, B, D, dtype=torch.double)
    hidden = torch.randn(3, B, H, dtype=torch.double)
    output, h_n = qrnn(x, hidden)
    assert output.shape == (T, B, H) and h_n.shape == (3, B, H)
    expected, expected_h = stack_ref(qrnn, x, hidden)
    torch.testing.assert_close(output, expected, **DOUBLE)
    torch.testing.assert_close(h_n, expected_h, **DOUBLE)
    qrnn.train()
    assert not torch.allclose(qrnn(x, hidden)[0], output)  # dropout between layers in training


def test_stack_of_given_layers_and_its_checks():
    layers = [QRNNLayer(D, H, window=2, save_prev_x=True), QRNNLayer(H, H, window=1, save_prev_x=True)]
    qrnn = QRNN(D, H, layers=layers)
    assert qrnn.num_layers == 2 and qrnn.layers[0] is layers[0]
    output, h_n = qrnn(torch.randn(T, B, D))
    assert output.shape == (T, B, H) and h_n.shape == (2, B, H)
    assert layers[0].prev_x.shape == (1, B, D) and layers[1].prev_x is None
    qrnn.reset()
    assert layers[0].prev_x is None
    with pytest.raises(ValueError, match="layer 1 maps 5 -> 4 features where 4 -> 4 is needed"):
        QRNN(D, H, layers=[QRNNLayer(D, H), QRNNLayer(D, H)])
    with pytest.raises(ValueError, match="layer options"):
        QRNN(D, H, layers=layers, window=2)
    with pytest.raises(ValueError, match="dropout"):
        QRNN(D, H, dropout=1.0)


def test_batch_first_transposes_input_and_output():
    torch.manual_seed(0)
    time_major = QRNN(D, H, num_layers=2, window=2)
    batch_first = QRNN(D, H, num_layers=2, window=2, batch_first=True)
    batch_first.load_state_dict(time_major.state_dict())
    x = torch.randn(T, B, D)
    expected, expected_h = time_major(x)
    output, h_n = batch_first(x.transpose(0, 1))
    torch.testing.assert_close(output.transpose(0, 1), expected, rtol=0, atol=0)
    torch.testing.assert_close(h_n, expected_h, rtol=0, atol=0)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_bidirectional_equals_backward_weights_on_the_reversed_sequence(window):
    torch.manual_seed(0)
    qrnn = QRNN(D, H, num_layers=2, bidirectional=True, window=window).double()
    assert [(layer.input_size, layer.hidden_size) for layer in qrnn.layers] == [(D, H)] * 2 + [(2 * H, H)] * 2
    x = torch.randn(T, B, D, dtype=torch.double)
    hidden = torch.randn(4, B, H, dtype=torch.double)
    output, h_n = qrnn(x, hidden)
    assert output.shape == (T, B, 2 * H) and h_n.shape == (4, B, H)  # h_n: l0 fwd, l0 bwd, l1 fwd, l1 bwd
    expected, expected_h = stack_ref(qrnn, x, hidden)
    torch.testing.assert_close(output, expected, **DOUBLE)
    torch.testing.assert_close(h_n, expected_h, **DOUBLE)


LENGTHS = [5, 2, 7, 1]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_padded_batch_equals_each_sequence_alone(bidirectional, packed):
    torch.manual_seed(0)
    qrnn = QRNN(D, H, num_layers=2, window=2, bidirectional=bidirectional).double()
    directions = 2 if bidirectional else 1
    batch = len(LENGTHS)
    x = torch.randn(T, batch, D, dtype=torch.double)
    hidden = torch.randn(2 * directions, batch, H, dtype=torch.double)
    if packed:
        packed_output, h_n = qrnn(pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False), hidden)
        output, lengths = pad_packed_sequence(packed_output, total_length=T)
        assert lengths.tolist() == LENGTHS
    else:
        output, h_n = qrnn(x, hidden, lengths=torch.tensor(LENGTHS))
    for index, length in enumerate(LENGTHS):
        alone, alone_h = qrnn(x[:length, index:index + 1], hidden[:, index:index + 1])
        torch.testing.assert_close(output[:length, index:index + 1], alone, **DOUBLE)
        torch.testing.assert_close(h_n[:, index:index + 1], alone_h, **DOUBLE)
        assert torch.count_nonzero(output[length:, index]) == 0  # padded steps give zeros


def test_packed_sequence_keeps_the_input_layout():
    torch.manual_seed(0)
    qrnn = QRNN(D, H, window=2)
    x = torch.randn(T, 3, D)
    for enforce_sorted, lengths in [(True, [7, 4, 2]), (False, [2, 7, 4])]:
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        output, _ = qrnn(packed)
        assert torch.equal(output.batch_sizes, packed.batch_sizes)
        assert output.sorted_indices is packed.sorted_indices
        padded, _ = pad_packed_sequence(output)
        torch.testing.assert_close(padded, qrnn(x[:padded.size(0)], lengths=lengths)[0][:padded.size(0)])
    with pytest.raises(ValueError, match="carries its own lengths"):
        qrnn(packed, lengths=lengths)


# --------------------------------------------------------------------------- the core


def make_core(**overrides) -> QRNNCore:
    return QRNNCore(QRNNConfig(**{"input_size": D, "hidden_size": H, "num_layers": 2, "window": 2, **overrides}))


def test_core_is_registered_and_builds_from_a_dict():
    config = QRNNConfig(input_size=D, hidden_size=H, window=3)
    core = models.build_core("qrnn", dataclasses.asdict(config))
    assert isinstance(core, QRNNCore) and isinstance(core, Core) and core.config == config
    names = [name for name, _ in core.named_parameters()]
    assert names == ["qrnn.layers.0.linear.weight", "qrnn.layers.0.linear.bias"]


@pytest.mark.parametrize("window", [1, 3])
def test_core_state_structure_and_initial_state(window):
    core = make_core(window=window, bidirectional=True)
    state = core.initial_state(B)
    assert isinstance(state, QRNNState) and isinstance(state.prev_x, tuple)
    assert state.h.shape == (4, B, H)
    assert [tuple(part.shape) for part in state.prev_x] == [(window - 1, B, D), (window - 1, B, 2 * H)]
    assert all(torch.count_nonzero(t) == 0 for t in state_tensors(state))
    output, new_state = core(torch.randn(T, B, D))
    assert output.shape == (T, B, core.output_size) and core.output_size == 2 * H
    assert [t.shape for t in state_tensors(new_state)] == [t.shape for t in state_tensors(state)]


@pytest.mark.parametrize("window", [1, 2, 3])
def test_core_two_chunks_with_carried_state_equal_one_run(window):
    torch.manual_seed(0)
    core = make_core(window=window, dropout=0.3, zoneout=0.2).eval()
    x = torch.randn(T, B, D)
    whole, whole_state = core(x)
    first, state = core(x[:2])
    second, chunked_state = core(x[2:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=0, atol=1e-6)
    for a, b in zip(state_tensors(chunked_state), state_tensors(whole_state)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if window > 1:
        torch.testing.assert_close(whole_state.prev_x[0], x[T - window + 1:], rtol=0, atol=0)


def test_core_without_save_prev_x_starts_each_call_from_zeros():
    torch.manual_seed(0)
    core = make_core(save_prev_x=False)
    x = torch.randn(T, B, D)
    whole, _ = core(x)
    first, state = core(x[:3])
    assert all(torch.count_nonzero(part) == 0 for part in state.prev_x)
    second, _ = core(x[3:], state)
    assert not torch.allclose(torch.cat([first, second]), whole)


def test_core_state_detaches_and_round_trips():
    torch.manual_seed(0)
    core = make_core()
    _, state = core(torch.randn(T, B, D, requires_grad=True))
    assert all(t.requires_grad for t in state_tensors(state))  # the core itself never detaches
    detached = detach_state(state)
    assert isinstance(detached, QRNNState) and isinstance(detached.prev_x, tuple)
    assert not any(t.requires_grad for t in state_tensors(detached))
    restored = state_from_tensors(core.initial_state(B), [t.detach() for t in state_tensors(state)])
    assert isinstance(restored, QRNNState)
    for a, b in zip(state_tensors(restored), state_tensors(detached)):
        assert torch.equal(a, b)


def test_core_padded_batch_state_equals_each_sequence_alone():
    torch.manual_seed(0)
    core = make_core(window=3).double()
    batch = len(LENGTHS)
    x = torch.randn(T, batch, D, dtype=torch.double)
    start = QRNNState(torch.randn(2, batch, H, dtype=torch.double),
                      (torch.randn(2, batch, D, dtype=torch.double), torch.randn(2, batch, H, dtype=torch.double)))
    output, state = core(x, start, lengths=LENGTHS)
    for index, length in enumerate(LENGTHS):
        alone_start = QRNNState(start.h[:, index:index + 1], tuple(part[:, index:index + 1] for part in start.prev_x))
        alone, alone_state = core(x[:length, index:index + 1], alone_start)
        torch.testing.assert_close(output[:length, index:index + 1], alone, **DOUBLE)
        for a, b in zip(state_tensors(state), state_tensors(alone_state)):
            torch.testing.assert_close(a[:, index:index + 1], b, **DOUBLE)  # prev_x too, even for length 1


def test_core_batch_first():
    torch.manual_seed(0)
    core = make_core()
    batch_first = make_core(batch_first=True)
    batch_first.load_state_dict(core.state_dict())
    x = torch.randn(T, B, D)
    output, state = batch_first(x.transpose(0, 1))
    expected, expected_state = core(x)
    torch.testing.assert_close(output.transpose(0, 1), expected, rtol=0, atol=0)
    torch.testing.assert_close(state.h, expected_state.h, rtol=0, atol=0)


def test_flags_build_the_config_and_share_flags_with_other_cores():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dropout", type=float, default=0.25)
    LSTM.add_args(parser)
    QRNNCore.add_args(parser)  # --nhid, --nlayers, --dropouth are already there
    args = parser.parse_args(["--nhid", "12", "--nlayers", "3", "--qrnn-window", "2", "--zoneout", "0.1",
                              "--no-output-gate"])
    config = QRNNCore.config_from_args(args, input_size=8)
    assert config == QRNNConfig(input_size=8, hidden_size=12, num_layers=3, dropout=0.25, window=2,
                                zoneout=0.1, output_gate=False)
    with pytest.raises(ValueError, match="window must be at least 1, got 0"):
        QRNNConfig(input_size=8, hidden_size=12, window=0)
    with pytest.raises(ValueError, match="zoneout"):
        QRNNConfig(input_size=8, hidden_size=12, zoneout=-0.1)


def test_tiny_qrnn_language_model_loss_falls():
    torch.manual_seed(0)
    vocab, emsize = 30, 8
    core_config = dataclasses.asdict(QRNNConfig(input_size=emsize, hidden_size=16, window=2))
    model = LanguageModel(LMConfig(vocab_size=vocab, core="QRNN", core_config=core_config, emsize=emsize,
                                   dropout=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    sequence = torch.arange(40).remainder(vocab).view(-1, 1).repeat(1, 4)  # a deterministic cycle: [40, 4]
    inputs, targets = sequence[:-1], sequence[1:]
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        features, _ = model(inputs)
        loss = model.loss(features, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0]
