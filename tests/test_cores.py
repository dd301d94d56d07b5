"""The core contract for every registered core, and fused == loop for LSTM and GRU."""

import dataclasses

import pytest
import torch

import models
from models.core import detach_state, map_state, state_from_tensors, state_tensors
from models.awd import AWDConfig
from models.dnc import DNCConfig, SAMConfig, SDNCConfig
from models.qrnn import QRNNConfig
from models.relational_memory import RMCConfig
from models.rnn import RNNConfig
from models.rnnlib import RNNLibConfig

T, B, D, H = 7, 3, 5, 6

# Small configurations of every registered core: {core name: {case: config overrides}}.
VARIANTS = {
    "lstm": {"fused": {"implementation": "fused"}, "loop": {"implementation": "loop"}},
    "gru": {"fused": {"implementation": "fused"}, "loop": {"implementation": "loop"}},
    "awd": {"lstm": {"cell": "LSTM"}, "gru": {"cell": "GRU"}, "qrnn": {"cell": "QRNN"}},
    "qrnn": {"window1": {"window": 1}, "window2": {"window": 2, "zoneout": 0.2}, "no_output_gate": {"output_gate": False}},
    "rmc": {"fast": {"implementation": "fast"}, "reference": {"implementation": "reference"},
            "memory_gates": {"gate_style": "memory", "num_blocks": 2}},
    "dnc": {"lstm": {}, "gru_two_layers": {"rnn_type": "gru", "num_layers": 2, "num_hidden_layers": 1},
            "checkpointed": {"checkpoint_steps": 2}},
    "sam": {"lstm": {}},
    "sdnc": {"lstm": {}, "unshared_two_layers": {"num_layers": 2, "share_memory": False}},
    "rnnlib": {"lstm": {"cell": "lstm"}, "gru-loop": {"cell": "gru", "implementation": "loop"},
               "elman-widths": {"cell": "elman-sigmoid", "hids": [4, 7]},
               "relu-runs": {"cell": "elman-relu", "hids": [4, H, H]}},
}


def make_core(name: str, **overrides) -> models.Core:
    """A small instance of a registered core."""
    cls = models.get_core_class(name)
    if cls.Config is RNNConfig:
        config = RNNConfig(input_size=D, hidden_size=H, num_layers=2, **overrides)
    elif cls.Config is AWDConfig:
        config = AWDConfig(input_size=D, hidden_size=H, output_size=4, num_layers=2, wdrop=0.3, **overrides)
    elif cls.Config is RMCConfig:
        config = RMCConfig(input_size=D, mem_slots=3, head_size=2, num_heads=2, key_size=3, **overrides)
    elif cls.Config is QRNNConfig:
        config = QRNNConfig(input_size=D, hidden_size=H, num_layers=2, **overrides)
    elif cls.Config in (DNCConfig, SAMConfig, SDNCConfig):
        sparse = {"sparse_reads": 2} if cls.Config is SAMConfig else {"sparse_reads": 2, "temporal_reads": 1}
        config = cls.Config(input_size=D, hidden_size=H, nr_cells=8, read_heads=2, cell_size=3,
                            **(sparse if cls.Config is not DNCConfig else {}), **overrides)
    elif cls.Config is RNNLibConfig:
        config = RNNLibConfig(**{"input_size": D, "hids": [H, H], **overrides})
    else:  # pragma: no cover - every core must be listed above
        raise AssertionError(f"no small config for core {name}")
    return cls(config)


def test_every_registered_core_has_test_variants():
    assert set(VARIANTS) == set(models.CORES)


CORE_CASES = [(name, case) for name in sorted(VARIANTS) for case in VARIANTS[name]]


@pytest.mark.parametrize("name,case", CORE_CASES)
def test_contract_shapes_and_state_structure(name, case):
    torch.manual_seed(0)
    core = make_core(name, **VARIANTS[name][case]).eval()
    x = torch.randn(T, B, D)
    output, state = core(x)
    assert output.shape == (T, B, core.output_size)
    fresh = core.initial_state(B)
    assert type(state) is type(fresh)
    assert [t.shape for t in state_tensors(state)] == [t.shape for t in state_tensors(fresh)]
    again = core.initial_state(B)
    assert all(torch.equal(a, b) for a, b in zip(state_tensors(fresh), state_tensors(again)))  # deterministic
    if name not in ("rmc", "sam", "sdnc"):  # the RMC starts from the identity memory, SAM/SDNC from a fill order
        assert all(torch.count_nonzero(t) == 0 for t in state_tensors(fresh))
    second, _ = core(x, None)
    assert torch.equal(output, second)  # state=None is a fresh, deterministic state


@pytest.mark.parametrize("name,case", CORE_CASES)
def test_two_chunks_with_carried_state_equal_one_run(name, case):
    torch.manual_seed(0)
    core = make_core(name, **VARIANTS[name][case]).eval()
    x = torch.randn(T, B, D)
    whole, whole_state = core(x)
    first, state = core(x[:3])
    second, chunked_state = core(x[3:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=0, atol=1e-6)
    for a, b in zip(state_tensors(chunked_state), state_tensors(whole_state)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_batch_first_transposes_input_and_output(name):
    torch.manual_seed(0)
    time_major = make_core(name)
    batch_first = make_core(name, batch_first=True)
    batch_first.load_state_dict(time_major.state_dict())
    x = torch.randn(T, B, D)
    expected, _ = time_major(x)
    got, _ = batch_first(x.transpose(0, 1))
    torch.testing.assert_close(got.transpose(0, 1), expected)


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_fused_and_loop_give_equal_outputs_states_and_gradients(name):
    torch.manual_seed(0)
    fused = make_core(name, implementation="fused").double()
    loop = make_core(name, implementation="loop").double()
    loop.load_state_dict(fused.state_dict())
    x = torch.randn(T, B, D, dtype=torch.double)
    initial = map_state(lambda t: torch.randn_like(t), fused.initial_state(B))
    results = []
    for core in (fused, loop):
        x_leaf = x.clone().requires_grad_()
        h0 = map_state(lambda t: t.clone().requires_grad_(), initial)
        output, state = core(x_leaf, h0)
        loss = output.pow(2).sum() + sum(t.sin().sum() for t in state_tensors(state))
        loss.backward()
        grads = [x_leaf.grad] + [t.grad for t in state_tensors(h0)] + [p.grad for p in core.parameters()]
        results.append((output, state_tensors(state), grads))
    (out_f, state_f, grads_f), (out_l, state_l, grads_l) = results
    torch.testing.assert_close(out_l, out_f, rtol=1e-10, atol=1e-10)
    for a, b in zip(state_l + grads_l, state_f + grads_f):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    core = make_core("LSTM", implementation="loop", dropout=0.5)
    x = torch.randn(T, B, D)
    core.eval()
    a, _ = core(x)
    b, _ = core(x)
    assert torch.equal(a, b)
    core.train()
    c, _ = core(x)
    assert not torch.allclose(a, c)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="implementation"):
        RNNConfig(input_size=3, hidden_size=4, implementation="cudnn")
    with pytest.raises(ValueError, match="num_layers"):
        RNNConfig(input_size=3, hidden_size=4, num_layers=0)
    with pytest.raises(ValueError, match="unknown core 'lstmm'"):
        models.get_core_class("lstmm")


def test_registry_is_case_insensitive_and_builds_from_dicts():
    config = RNNConfig(input_size=D, hidden_size=H)
    core = models.build_core("lstm", dataclasses.asdict(config))
    assert isinstance(core, models.LSTM) and core.config == config


def test_detach_state_handles_any_structure():
    leaf = torch.ones(2, requires_grad=True)
    grown = leaf * 2
    state = {"a": (grown, [grown, None]), "b": models.LSTMState(grown, grown)}
    detached = detach_state(state)
    assert isinstance(detached["b"], models.LSTMState) and detached["a"][1][1] is None
    assert all(not t.requires_grad for t in state_tensors(detached))
    with pytest.raises(TypeError, match="recurrent state"):
        detach_state(object())


def test_state_round_trips_through_plain_tensors():
    state = models.LSTMState(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    template = models.LSTMState(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    restored = state_from_tensors(template, state_tensors(state))
    assert isinstance(restored, models.LSTMState) and torch.equal(restored.c, state.c)
    with pytest.raises(ValueError, match="tensors"):
        state_from_tensors(template, state_tensors(state)[:1])


@pytest.mark.parametrize("name, flags", [("LSTM", []), ("AWD", ["--awd-cell", "LSTM", "--wdrop", "0"]),
                                         ("RNNLIB", ["--cell", "lstm"])])
def test_fused_lstm_runs_in_fp32_under_cpu_fp16_autocast(name, flags):
    """oneDNN has no fp16 LSTM: under `--precision fp16` on the CPU the fused LSTM call runs in fp32."""
    import argparse

    from models.core import build_core, get_core_class

    parser = argparse.ArgumentParser()
    get_core_class(name).add_args(parser)
    args = parser.parse_args(["--nhid", "6", "--nlayers", "2", *flags])
    torch.manual_seed(0)
    core = build_core(name, get_core_class(name).config_from_args(args, 5)).eval()
    x = torch.randn(7, 3, 5)
    expected, _ = core(x, core.initial_state(3))
    with torch.autocast("cpu", dtype=torch.float16):
        output, state = core(x, core.initial_state(3))
    assert torch.equal(output.float(), expected)


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_compiled_loop_step_equals_eager(name):
    """`--compile` with `--rnn-impl loop`: the per-step cell through torch.compile (float64, so fused kernels'
    other summation order stays far below the tolerance); outputs, states and gradients equal eager's."""
    import copy

    from models.core import _COMPILED, build_core
    from models.rnn import RNNConfig

    torch.manual_seed(0)
    eager = build_core(name, RNNConfig(input_size=3, hidden_size=4, num_layers=2, implementation="loop")).double()
    fast = copy.deepcopy(eager)
    assert fast.compile_steps()
    assert not build_core(name, RNNConfig(input_size=3, hidden_size=4)).compile_steps()  # cuDNN/fused: no steps
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    results = []
    for core in (eager, fast):
        output, state = core(x)
        loss = output.pow(2).sum() + sum(t.sum() for t in state)
        results.append([output, *state, *torch.autograd.grad(loss, list(core.parameters()))])
    assert _COMPILED[fast]
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
