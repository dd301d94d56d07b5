"""Code written for the L0SG port's `RelationalMemory` (relational_rnn_general.py) runs with only the import
changed (`from relational_rnn_general import RelationalMemory` -> `from models import RelationalMemory`):
its constructor, `initial_state`, the batch-first call with a memory tensor, and the attribute names its
N-th farthest script reads, over the `RMCCore` every script uses (the same parameters).
"""

import pytest
import torch
from torch import nn

from models import RelationalMemory
from models.relational_memory import RMCConfig, RMCCore, RMCState

B, T, D = 3, 5, 6


def port_model(**overrides) -> RelationalMemory:
    """The constructor call of the port's train_nth_farthest.py (its flags' defaults, smaller sizes)."""
    torch.manual_seed(0)
    arguments = dict(mem_slots=4, head_size=8, input_size=D, num_heads=2, num_blocks=1, forget_bias=1.0,
                     input_bias=0.0, gate_style="unit", attention_mlp_layers=2, key_size=6, return_all_outputs=False)
    return RelationalMemory(**{**arguments, **overrides})


def test_the_ports_call_shapes_and_attributes():
    rmc = port_model()
    memory = rmc.initial_state(B, trainable=True).to("cpu")
    assert isinstance(memory, torch.Tensor) and memory.shape == (B, 4, 16)
    torch.testing.assert_close(memory[0], torch.eye(4, 16))  # the identity, padded to the memory width
    logits, memory = rmc(torch.randn(B, T, D), memory)  # batch first
    assert logits.shape == (B, 4 * 16) and memory.shape == (B, 4, 16)
    assert (rmc.mem_slots, rmc.head_size, rmc.num_heads, rmc.mem_size, rmc.mem_slots_plus_input) == (4, 8, 2, 16, 5)
    assert (rmc.key_size, rmc.value_size, rmc.qkv_size, rmc.total_qkv_size, rmc.num_gates) == (6, 8, 20, 40, 32)
    assert rmc.output_size == 64 and rmc.state_size == [4, 16] and rmc.calculate_gate_size() == 16
    assert rmc.qkv_projector.out_features == rmc.total_qkv_size and rmc.input_projector.in_features == D
    assert rmc.input_gate_projector.out_features == rmc.memory_gate_projector.out_features == rmc.num_gates
    assert len(rmc.attention_mlp) == 2 and rmc.attended_memory_layernorm.normalized_shape == (16,)
    assert rmc.attended_memory_layernorm2 is not rmc.attended_memory_layernorm
    assert rmc.qkv_layernorm.normalized_shape == (40,)
    with pytest.raises(ValueError, match="gate_style"):
        port_model(gate_style="slot")


def test_outputs_are_the_cores_on_the_same_weights():
    rmc = port_model(return_all_outputs=True)
    x = torch.randn(B, T, D)
    memory = rmc.initial_state(B)
    outputs, final = rmc(x, memory)
    assert outputs.shape == (T * B, 64)  # every step, concatenated on the first axis as the port does
    core = RMCCore(rmc.core.config)
    core.load_state_dict(rmc.core.state_dict())
    expected, state = core(x.transpose(0, 1))  # the core contract: time-major
    torch.testing.assert_close(outputs, expected.reshape(T * B, 64))
    torch.testing.assert_close(final, state.memory)
    rmc.return_all_outputs = False
    last, _ = rmc(x, memory)
    torch.testing.assert_close(last, expected[-1])
    # The parameters are the core's: one set, trained through either.
    assert {id(p) for p in rmc.parameters()} == {id(p) for p in rmc.core.parameters()}
    assert rmc.input_projector is rmc.core.input_projector
    # One step of the port's forward_step is one step of the core.
    output, next_memory = rmc.forward_step(x[:, 0], memory)
    torch.testing.assert_close(output, expected[0])
    torch.testing.assert_close(next_memory, core(x[:, :1].transpose(0, 1))[1].memory)


def test_memory_is_detached_at_each_call_like_the_port():
    rmc = port_model()
    memory = rmc.initial_state(B).requires_grad_()
    logits, new_memory = rmc(torch.randn(B, T, D), memory)
    logits.sum().backward()
    assert memory.grad is None  # the port repackages (detaches) the memory it is given
    assert new_memory.requires_grad  # the returned memory carries this call's graph
    detached = rmc.repackage_hidden((new_memory, (new_memory,)))
    assert not detached[0].requires_grad and not detached[1][0].requires_grad


def test_the_ports_nth_farthest_training_loop_learns():
    """train_nth_farthest.py's loop: a model holding `relational_memory`, a memory made once, `model(data, memory)`."""

    class RRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.relational_memory = port_model()
            self.output = nn.Linear(self.relational_memory.output_size, 2)

        def forward(self, data, memory):
            logits, memory = self.relational_memory(data, memory)
            return self.output(logits), memory

    model = RRNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    memory = model.relational_memory.initial_state(16, trainable=True).to("cpu")
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        data = torch.randn(16, T, D, generator=generator)
        targets = (data[:, 0, 0] > data[:, -1, 0]).long()  # needs the first step remembered
        y_pred, _ = model(data, memory)
        loss = nn.functional.cross_entropy(y_pred, targets)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimiser.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses


def test_bad_memory_and_options_are_named():
    rmc = port_model()
    with pytest.raises(ValueError, match="initial_state"):
        rmc(torch.randn(B, T, D), torch.zeros(B, 3, 16))
    with pytest.raises(ValueError, match="batch first"):
        rmc(torch.randn(B, D), rmc.initial_state(B))
    with pytest.raises(ValueError, match="RMCCore"):
        port_model(batch_first=True)
    core_state = RMCState(rmc.initial_state(B))
    with pytest.raises(ValueError, match="tensor"):
        rmc(torch.randn(B, T, D), core_state)
    assert isinstance(rmc.core.config, RMCConfig)
