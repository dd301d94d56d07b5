"""Relational Memory Core: port fidelity against the SPEC equations, fast == reference, the core contract."""

import argparse
import copy
import dataclasses

import pytest
import torch

from models.core import _COMPILED, detach_state, state_tensors
from models.lm import LanguageModel, LMConfig
from models.relational_memory import RelationalMemory, RMCConfig, RMCCore, RMCState

T, B, D = 4, 2, 5
SMALL = dict(input_size=D, mem_slots=3, head_size=4, num_heads=2, num_blocks=2, attention_mlp_layers=2, key_size=3)


def make_core(**overrides) -> RMCCore:
    torch.manual_seed(0)
    core = RMCCore(RMCConfig(**{**SMALL, **overrides})).double()
    with torch.no_grad():  # random LayerNorm affines and biases, so that a mix-up of them shows
        for name, parameter in core.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.3 * torch.randn_like(parameter))
    return core


def spec_rmc(core: RMCCore, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The SPEC equations, written out per batch element and per head: x [T, B, R, D] -> (y, memory)."""
    config = core.config
    params = dict(core.named_parameters())
    slots, heads, head_size = config.mem_slots, config.num_heads, config.head_size
    key_size = config.key_size or head_size
    d = heads * head_size

    def layer_norm(z, gamma, beta):  # row-wise over the last axis
        mean = z.mean(-1, keepdim=True)
        variance = ((z - mean) ** 2).mean(-1, keepdim=True)
        return (z - mean) / torch.sqrt(variance + 1e-5) * gamma + beta

    def linear(z, name):
        return z @ params[name + ".weight"].T + params[name + ".bias"]

    def mlp(z):
        for layer in range(config.attention_mlp_layers):
            if layer > 0:
                z = torch.clamp(z, min=0)
            z = linear(z, f"mlp.{layer}")
        return z

    initial = torch.zeros(slots, d, dtype=x.dtype)
    for slot in range(min(slots, d)):
        initial[slot, slot] = 1.0
    outputs = torch.zeros(x.size(0), x.size(1), slots * d, dtype=x.dtype)
    finals = []
    for b in range(x.size(1)):
        memory = initial
        for t in range(x.size(0)):
            u = linear(x[t, b], "input_projector")  # [R, d]
            z = torch.cat([memory, u])
            for block in range(config.num_blocks):
                prefix = f"blocks.{block}."
                p = layer_norm(linear(z, prefix + "qkv"), params[prefix + "qkv_norm.weight"],
                               params[prefix + "qkv_norm.bias"])
                attended = []
                for head in range(heads):
                    chunk = p[:, head * (2 * key_size + head_size):(head + 1) * (2 * key_size + head_size)]
                    q, k, v = chunk[:, :key_size], chunk[:, key_size:2 * key_size], chunk[:, 2 * key_size:]
                    logits = q @ k.T / key_size ** 0.5
                    weights = torch.exp(logits - logits.max(1, keepdim=True).values)
                    attended.append(weights / weights.sum(1, keepdim=True) @ v)
                z = layer_norm(z + torch.cat(attended, 1), params[prefix + "attention_norm.weight"],
                               params[prefix + "attention_norm.bias"])
                z = layer_norm(z + mlp(z), params[prefix + "mlp_norm.weight"], params[prefix + "mlp_norm.bias"])
            proposal = z[:slots]
            if config.gate_style is None:
                memory = proposal
            else:
                gates = linear(u.reshape(-1), "input_gate_projector") + linear(torch.tanh(memory),
                                                                              "memory_gate_projector")
                size = gates.size(1) // 2
                input_gate = 1 / (1 + torch.exp(-(gates[:, :size] + config.input_bias)))
                forget_gate = 1 / (1 + torch.exp(-(gates[:, size:] + config.forget_bias)))
                memory = input_gate * torch.tanh(proposal) + forget_gate * memory
            outputs[t, b] = memory.reshape(-1)
        finals.append(memory)
    return outputs, torch.stack(finals)


CASES = {
    "unit": {},
    "memory": {"gate_style": "memory", "input_bias": 0.4, "forget_bias": -0.5},
    "none": {"gate_style": None},
    "slots_above_width": {"mem_slots": 11, "num_blocks": 1},  # identity truncated to d = 8 columns
    "one_slot_one_block": {"mem_slots": 1, "num_blocks": 1, "attention_mlp_layers": 3},
    "default_key_size": {"key_size": None, "num_blocks": 3},
    "matrix_input": {"treat_input_as_matrix": True, "input_rows": 3},
}


@pytest.mark.parametrize("implementation", ["reference", "fast"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_spec_equations(case, implementation):
    core = make_core(implementation=implementation, **CASES[case])
    rows = core.input_rows
    x = torch.randn(T, B, rows * D, dtype=torch.float64)
    output, state = core(x)
    expected_output, expected_memory = spec_rmc(core, x.reshape(T, B, rows, D))
    torch.testing.assert_close(output, expected_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(state.memory, expected_memory, rtol=0, atol=1e-6)
    if rows > 1:  # [T, B, R, D] is the same input as [T, B, R * D]
        torch.testing.assert_close(core(x.reshape(T, B, rows, D))[0], output, rtol=0, atol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_equals_reference_with_gradients(case):
    fast = make_core(implementation="fast", trainable_biases=True, **CASES[case])
    reference = make_core(implementation="reference", trainable_biases=True, **CASES[case])
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(T + 2, B, fast.input_rows * D, dtype=torch.float64)
    memory = torch.randn(B, fast.mem_slots, fast.mem_size, dtype=torch.float64)
    results = []
    for core in (fast, reference):
        inputs = x.clone().requires_grad_()
        start = memory.clone().requires_grad_()
        output, state = core(inputs, RMCState(start))
        weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)
        ((output * weights).sum() + state.memory.square().sum()).backward()
        grads = {name: p.grad for name, p in core.named_parameters()}
        results.append((output, state.memory, inputs.grad, start.grad, grads))
    (out_f, mem_f, gx_f, gm_f, grads_f), (out_r, mem_r, gx_r, gm_r, grads_r) = results
    torch.testing.assert_close(out_f, out_r, rtol=0, atol=1e-10)
    torch.testing.assert_close(mem_f, mem_r, rtol=0, atol=1e-10)
    torch.testing.assert_close(gx_f, gx_r, rtol=0, atol=1e-9)
    torch.testing.assert_close(gm_f, gm_r, rtol=0, atol=1e-9)
    assert set(grads_f) == set(grads_r)
    for name in grads_f:
        if name in ("forget_bias", "input_bias") and fast.config.gate_style is None:
            assert grads_f[name] is None and grads_r[name] is None  # no gates, no gate biases in the graph
            continue
        assert grads_f[name] is not None, name
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=0, atol=1e-9, msg=name)


def test_parameters_mlp_distinct_and_shared_per_block_layers():
    core = make_core(num_blocks=3, attention_mlp_layers=3)
    names = {name for name, _ in core.named_parameters()}
    assert {f"mlp.{layer}.weight" for layer in range(3)} <= names
    assert not any(name.startswith("blocks.") and "mlp." in name for name in names)  # one MLP for all blocks
    assert {f"blocks.{block}.qkv.weight" for block in range(3)} <= names
    assert len({id(layer.weight) for layer in core.mlp}) == 3
    assert not torch.equal(core.mlp[0].weight, core.mlp[1].weight)
    assert len({id(block.qkv_norm.weight) for block in core.blocks}) == 3
    assert core.blocks[0].qkv.weight.shape == (2 * (2 * 3 + 4), 8)  # H(2k + h) x d
    assert core.input_gate_projector.weight.shape == (16, 8) and core.memory_gate_projector.weight.shape == (16, 8)


def test_initialisation_follows_sonnet():
    torch.manual_seed(0)
    core = RMCCore(RMCConfig(input_size=400, mem_slots=2, head_size=50, num_heads=4))
    weight = core.input_projector.weight  # fan_in 400: std 0.05, cut at 2 std
    assert weight.abs().max() <= 0.1 and 0.035 < weight.std() < 0.05
    assert torch.count_nonzero(core.input_projector.bias) == 0
    assert torch.equal(core.blocks[0].qkv_norm.weight, torch.ones(4 * (2 * 50 + 50)))
    assert core.blocks[0].attention_norm.eps == 1e-5


def test_identity_initial_memory_and_constant_biases():
    core = RMCCore(RMCConfig(**SMALL))
    memory = core.initial_state(B).memory
    assert memory.shape == (B, 3, 8) and not memory.requires_grad
    torch.testing.assert_close(memory[1], torch.eye(3, 8))
    assert torch.equal(RMCCore(RMCConfig(**{**SMALL, "mem_slots": 10})).initial_state(1).memory[0], torch.eye(10, 8))
    names = {name for name, _ in core.named_parameters()}
    assert "forget_bias" not in names and "input_bias" not in names
    assert core.forget_bias == 1.0 and core.input_bias == 0.0
    trainable = RMCCore(RMCConfig(**SMALL, trainable_biases=True))
    assert {"forget_bias", "input_bias"} <= {name for name, _ in trainable.named_parameters()}


@pytest.mark.parametrize("field,value", [
    ("mem_slots", 0), ("head_size", -1), ("num_heads", 0), ("num_blocks", 0), ("attention_mlp_layers", 0),
    ("key_size", 0), ("gate_style", "cell"), ("implementation", "cuda"), ("input_rows", 2), ("forget_bias", float("nan")),
])
def test_config_errors_name_the_bad_value(field, value):
    with pytest.raises(ValueError, match=field) as error:
        RMCConfig(**{**SMALL, field: value})
    assert repr(value) in str(error.value) or str(value) in str(error.value)


def test_relational_memory_constructor_of_the_port():
    """The port's constructor builds an RMCCore with Sonnet's maths (tests/test_compat_rmc.py: its call)."""
    torch.manual_seed(0)
    rmc = RelationalMemory(mem_slots=2, head_size=4, input_size=D, num_heads=2, key_size=3,
                           implementation="reference")
    assert isinstance(rmc.core, RMCCore) and rmc.core.config.attention_mlp_layers == 2 and rmc.output_size == 16
    assert rmc.core.config.implementation == "reference" and rmc.core.config.key_size == 3
    x = torch.randn(B, T, D)
    output, memory = rmc(x, rmc.initial_state(B))
    core = RMCCore.from_config(rmc.core.config)
    core.load_state_dict(rmc.core.state_dict())
    expected, state = core(x.transpose(0, 1))  # [B, T, D] -> [T, B, D]
    torch.testing.assert_close(output, expected[-1])
    torch.testing.assert_close(memory, state.memory)


@pytest.mark.parametrize("implementation", ["reference", "fast"])
def test_two_chunks_with_carried_state_equal_one_run(implementation):
    core = make_core(implementation=implementation)
    x = torch.randn(7, B, D, dtype=torch.float64)
    whole, whole_state = core(x)
    first, state = core(x[:3])
    assert isinstance(state, RMCState) and all(isinstance(t, torch.Tensor) for t in state)
    second, chunked_state = core(x[3:], detach_state(state))
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=0, atol=1e-12)
    for a, b in zip(state_tensors(chunked_state), state_tensors(whole_state)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert whole.shape == (7, B, core.output_size) and core.output_size == 3 * 8


def test_flags_and_config_from_args():
    parser = argparse.ArgumentParser()
    RMCCore.add_args(parser)
    args = parser.parse_args([])
    config = RMCCore.config_from_args(args, input_size=192)
    assert (config.mem_slots, config.head_size, config.num_heads, config.num_blocks) == (1, 192, 4, 1)
    assert (config.attention_mlp_layers, config.key_size, config.gate_style) == (3, 64, "unit")
    args = parser.parse_args(["--memslots", "2", "--num-heads", "3", "--gatestyle", "none", "--key-size", "0",
                              "--forget_bias", "2", "--rmc-implementation", "reference"])
    config = RMCCore.config_from_args(args, input_size=7)
    assert (config.mem_slots, config.num_heads, config.gate_style, config.key_size) == (2, 3, None, None)
    assert (config.forget_bias, config.implementation, config.input_size) == (2.0, "reference", 7)


def test_tiny_language_model_learns():
    torch.manual_seed(0)
    rmc = RMCConfig(input_size=16, mem_slots=2, head_size=8, num_heads=2, key_size=4)
    model = LanguageModel(LMConfig(vocab_size=6, core="RMC", core_config=dataclasses.asdict(rmc), emsize=16,
                                   dropout=0.0))
    assert isinstance(model.core, RMCCore)
    tokens = torch.arange(31).remainder(6).view(-1, 1).repeat(1, 2)  # [T + 1, B]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(40):
        features, _ = model(tokens[:-1])
        loss = model.loss(features, tokens[1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("gate_style, blocks", [("unit", 1), (None, 2)])
def test_compiled_step_equals_eager(gate_style, blocks):
    """`compile_steps` (torch.compile of the fast path's step, inductor on the CPU): outputs, final memory and
    every gradient equal the eager fast path's, over two windows (the state carried) and a shorter last one.
    In float64, so that the fused kernels' other order of summation stays far below the tolerance."""
    torch.manual_seed(0)
    eager = RMCCore(RMCConfig(input_size=5, mem_slots=3, head_size=4, num_heads=2, num_blocks=blocks,
                              gate_style=gate_style, attention_mlp_layers=2, key_size=3)).double()
    fast = copy.deepcopy(eager)
    assert fast.compile_steps() and not eager.compile_step
    reference = copy.deepcopy(eager)
    reference.config = dataclasses.replace(reference.config, implementation="reference")
    assert not reference.compile_steps()  # the reference stays eager
    results = []
    for core in (eager, fast):
        state = core.initial_state(2)
        outputs = []
        for length in (4, 4, 3):
            x = torch.randn(length, 2, 5, generator=torch.Generator().manual_seed(length), dtype=torch.float64)
            output, state = core(x, state)
            outputs.append(output)
        loss = sum(output.pow(2).sum() for output in outputs) + state.memory.sum()
        grads = torch.autograd.grad(loss, list(core.parameters()))
        results.append((torch.cat(outputs), state.memory, grads))
    (out_a, mem_a, grads_a), (out_b, mem_b, grads_b) = results
    assert "step" in _COMPILED[fast] and eager not in _COMPILED  # the compiled step did run
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mem_b, mem_a, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
    # a copy (as the final evaluation makes on ranks other than 0) compiles its own step, on its own weights
    copied, halved = copy.deepcopy(fast), copy.deepcopy(eager)
    with torch.no_grad():
        for param in [*copied.parameters(), *halved.parameters()]:
            param.mul_(0.5)
    x = torch.randn(2, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(copied(x)[0], halved(x)[0], rtol=1e-10, atol=1e-12)
    assert _COMPILED[copied]["step"] is not _COMPILED[fast]["step"]


def test_a_compiler_that_fails_falls_back_to_the_eager_step(monkeypatch):
    """A machine whose compiler fails (no C++ compiler, a broken Triton) runs the eager step with a warning."""
    def broken_compile(function, **options):
        def fails(*args):
            raise RuntimeError("BackendCompilerFailed: no working C++ compiler")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    torch.manual_seed(0)
    core = RMCCore(RMCConfig(input_size=5, mem_slots=2, head_size=4, num_heads=2, attention_mlp_layers=2))
    expected = copy.deepcopy(core)(torch.ones(3, 2, 5))[0]
    assert core.compile_steps()
    with pytest.warns(UserWarning, match="torch.compile of the step failed .* running it eagerly"):
        output = core(torch.ones(3, 2, 5))[0]
    torch.testing.assert_close(output, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_step_equals_eager_on_cuda():
    torch.manual_seed(0)
    eager = RMCCore(RMCConfig(input_size=5, mem_slots=3, head_size=8, num_heads=2, num_blocks=2,
                              attention_mlp_layers=2, key_size=4)).cuda()
    fast = copy.deepcopy(eager)
    assert fast.compile_steps()
    x = torch.randn(6, 4, 5, device="cuda")
    results = []
    for core in (eager, fast):
        output, state = core(x)
        grads = torch.autograd.grad(output.pow(2).sum() + state.memory.sum(), list(core.parameters()))
        results.append([output, state.memory, *grads])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
