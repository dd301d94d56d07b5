"""Code written for pytorch-dnc 1.1.0 runs with only the import changed (`from dnc import DNC` ->
`from models.dnc import DNC`): the README's examples verbatim, the patterns of its own tests and task
scripts, and the state they hand back and forth (shapes and keys of 1.1.0, models/dnc/published.py).
"""

import textwrap

import numpy as np
import pytest
import torch

from models.core import state_tensors
from models.dnc import DNC, SAM, SDNC

CLASSES = {"DNC": DNC, "SAM": SAM, "SDNC": SDNC}

# The README's examples (ixaxaar/pytorch-dnc at 1.1.0, "Example usage" and "Debugging"), copied verbatim.
README_EXAMPLE = """
from dnc import {kind}

rnn = {kind}(
  input_size=64,
  hidden_size=128,
  rnn_type='lstm',
  num_layers=4,
  nr_cells=100,
  cell_size=32,
  read_heads=4,{sparse}
  batch_first=True,
  gpu_id=0{debug}
)

(controller_hidden, memory, read_vectors) = (None, None, None)

output, (controller_hidden, memory, read_vectors){debug_out} = \\
  rnn(torch.randn(10, 4, 64), (controller_hidden, memory, read_vectors), reset_experience=True)
"""
SPARSE_ARGUMENTS = {"DNC": "", "SAM": "\n  sparse_reads=4,", "SDNC": "\n  sparse_reads=4,\n  temporal_reads=4,"}


def run_readme_example(kind: str, debug: bool) -> dict:
    """The README's example for `kind`, with the import changed and, without CUDA, gpu_id=0 -> -1."""
    source = README_EXAMPLE.format(kind=kind, sparse=SPARSE_ARGUMENTS[kind], debug=",\n  debug=True" if debug else "",
                                   debug_out=", debug_memory" if debug else "")
    source = source.replace("from dnc import", "from models.dnc import")
    if not torch.cuda.is_available():
        source = source.replace("gpu_id=0", "gpu_id=-1")
    namespace = {"torch": torch}
    torch.manual_seed(0)
    exec(textwrap.dedent(source), namespace)
    return namespace


def published_keys(kind: str, rnn) -> dict[str, tuple]:
    """1.1.0's memory keys and their shapes for the README's sizes (batch 10, 100 cells of 32, 4 heads of 4 reads)."""
    batch, cells, width, heads = 10, rnn.nr_cells, rnn.cell_size, rnn.read_heads
    if kind == "DNC":
        return {"memory": (batch, cells, width), "link_matrix": (batch, 1, cells, cells),
                "precedence": (batch, 1, cells), "read_weights": (batch, heads, cells),
                "write_weights": (batch, 1, cells), "usage_vector": (batch, cells)}
    visible = heads * rnn.core.memories[0].read_entries + 1  # R E + 1 rows: the reads and the LRU row
    keys = {"memory": (batch, cells, width), "visible_memory": (batch, visible, width),
            "read_weights": (batch, cells), "write_weights": (batch, cells), "read_vectors": (batch, heads, width),
            "least_used_mem": (batch, 1), "usage": (batch, cells), "read_positions": (batch, visible)}
    if kind == "SDNC":
        links = rnn.core.memories[0].temporal_reads
        keys.update({"link_matrix": (batch, cells, links), "rev_link_matrix": (batch, cells, links),
                     "precedence": (batch, links)})
    return keys


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_readme_example_runs_and_returns_the_published_shapes(kind):
    names = run_readme_example(kind, debug=False)
    output, controller, memory, reads, rnn = (names[key] for key in
                                              ("output", "controller_hidden", "memory", "read_vectors", "rnn"))
    assert output.shape == (10, 4, 64)  # batch first, as the input
    assert isinstance(controller, list) and len(controller) == 4  # one (h, c) per layer
    assert all(h.shape == c.shape == (2, 10, 128) for h, c in controller)
    assert reads.shape == (10, 4 * 32)  # the last layer's read vectors, [B, R * W]
    assert isinstance(memory, dict)  # one memory shared by the 4 layers
    for key, shape in published_keys(kind, rnn).items():
        assert tuple(memory[key].shape) == shape, key
    # The state goes back in as it came out, and the run goes on from it.
    again, (controller, memory, reads) = rnn(torch.randn(10, 4, 64), (controller, memory, reads))
    assert again.shape == (10, 4, 64) and reads.shape == (10, 128) and torch.isfinite(again).all()


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_readme_debug_example_returns_numpy_rows_per_layer_and_step(kind):
    names = run_readme_example(kind, debug=True)
    debug, memory = names["debug_memory"], names["memory"]
    layers_times = 4 * 4
    cells, width, heads = 100, 32, 4
    assert all(isinstance(value, np.ndarray) and value.shape[0] == layers_times for value in debug.values())
    assert debug["memory"].shape == (layers_times, cells * width)
    assert debug["write_weights"].shape == (layers_times, cells)
    assert debug["read_weights"].shape == (layers_times, heads * cells)
    if kind == "DNC":
        assert debug["link_matrix"].shape == (layers_times, cells * cells)
        assert debug["usage_vector"].shape == (layers_times, cells)
        np.testing.assert_allclose(debug["link_matrix"][-1], memory["link_matrix"][0, 0].detach().reshape(-1).numpy())
    else:
        assert debug["usage"].shape == (layers_times, cells)
        # The dict's latest write and read are the debug view's last row (batch element 0, summed over heads).
        np.testing.assert_allclose(debug["write_weights"][-1], memory["write_weights"][0].detach().numpy(), atol=1e-7)
        np.testing.assert_allclose(debug["read_weights"][-1].reshape(heads, cells).sum(0),
                                   memory["read_weights"][0].detach().numpy(), atol=1e-6)
        # The rows read by the last step (the debug view then names the LRU row that step wrote, the dict
        # the one the next write may take).
        np.testing.assert_array_equal(debug["read_positions"][-1][:-1], memory["read_positions"][0, :-1].numpy())
    np.testing.assert_allclose(debug["memory"][-1], memory["memory"][0].detach().reshape(-1).numpy(), atol=1e-7)


def small(kind: str, **overrides):
    torch.manual_seed(1111)
    sizes = {"DNC": {}, "SAM": {"sparse_reads": 2}, "SDNC": {"sparse_reads": 2, "temporal_reads": 2}}[kind]
    options = dict(input_size=9, hidden_size=12, num_layers=3, num_hidden_layers=2, nr_cells=12, cell_size=5,
                   read_heads=3, gpu_id=-1, **sizes)
    return CLASSES[kind](**{**options, **overrides})


def copy_data(batch_size=4, length=3, size=9):
    """pytorch-dnc's test_utils.generate_data: a binary sequence, an end marker, then room for the copy."""
    generator = torch.Generator().manual_seed(0)
    data = torch.zeros(batch_size, 2 * length + 1, size)
    data[:, :length, :size - 1] = torch.randint(0, 2, (batch_size, length, size - 1), generator=generator).float()
    data[:, length, -1] = 1
    return data


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_the_published_tests_patterns(kind):
    """The asserts of pytorch-dnc 1.1.0's test/test_*.py (test_rnn_n, test_rnn_no_memory_pass)."""
    rnn = small(kind, dropout=0.2, debug=True)
    data = copy_data()
    output, (chx, mhx, rv), v = rnn(data, None)
    output.transpose(0, 1).sum().backward()
    assert chx[0][0].size() == torch.Size([2, 4, 12])
    assert mhx["memory"].size() == torch.Size([4, 12, 5])
    assert rv.size() == torch.Size([4, 15])  # [B, R * W] whatever num_layers
    (chx, mhx, rv) = (None, None, None)
    for _ in range(3):
        output, (chx, mhx, rv), v = rnn(data, (chx, mhx, rv), pass_through_memory=False)
    assert rv is None and mhx["memory"].size() == torch.Size([4, 12, 5])
    assert torch.equal(mhx["memory"], rnn(data, (None, None, None), pass_through_memory=False)[1][1]["memory"])


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_the_copy_task_loop_of_the_published_scripts(kind):
    """tasks/copy_task.py: the memory goes back in each iteration, detached key by key, with reset_experience."""
    rnn = small(kind, num_layers=1)
    optimizer = torch.optim.Adam(rnn.parameters(), lr=1e-2)
    (chx, mhx, rv) = (None, None, None)
    data = copy_data()
    for _ in range(3):
        optimizer.zero_grad()
        output, (chx, mhx, rv) = rnn(data, (None, mhx, None), reset_experience=True, pass_through_memory=True)
        torch.nn.functional.binary_cross_entropy_with_logits(output, data).backward()
        optimizer.step()
        mhx = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in mhx.items()}
    assert set(mhx) >= {"memory", "read_weights", "write_weights"} and rv.shape == (4, 15)
    fresh, _ = rnn(data, (None, None, None), reset_experience=True)
    torch.testing.assert_close(rnn(data, (None, mhx, None), reset_experience=True)[0], fresh, rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(CLASSES))
@pytest.mark.parametrize("share", [True, False])
def test_state_handed_back_continues_the_run_for_any_number_of_layers(kind, share):
    rnn = small(kind, share_memory=share)
    x = torch.randn(4, 8, 9)
    whole, (_, whole_memory, whole_reads) = rnn(x)
    first, hidden = rnn(x[:, :3])
    controller, memory, reads = hidden
    assert reads.shape == (4, 15)
    if share:
        assert isinstance(memory, dict) and memory["layer_read_vectors"].shape == (4, 3, 15)
    else:  # 1.1.0: one dict per layer, each with the keys of a single memory
        assert isinstance(memory, list) and len(memory) == 3
        assert all(part["memory"].shape == (4, 12, 5) and part["layer_read_vectors"].shape == (4, 1, 15)
                   for part in memory)
    second, (_, memory, reads) = rnn(x[:, 3:], hidden)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(reads, whole_reads, rtol=0, atol=1e-6)
    for a, b in zip(state_tensors(memory), state_tensors(whole_memory)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # The other layers' reads come from layer_read_vectors: without them the run differs.
    stripped = [{k: v for k, v in part.items() if k != "layer_read_vectors"}
                for part in ([hidden[1]] if share else hidden[1])]
    different, _ = rnn(x[:, 3:], (hidden[0], stripped[0] if share else stripped, hidden[2]))
    assert not torch.allclose(different, second)
    # None read vectors start every layer's reads from zeros, as 1.1.0 starts the last read from zeros.
    zero_reads, _ = rnn(x[:, 3:], (hidden[0], hidden[1], None))
    every_layer_zero, _ = rnn(x[:, 3:], (hidden[0], hidden[1], torch.zeros(3, 4, 15)))
    torch.testing.assert_close(zero_reads, every_layer_zero, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["SAM", "SDNC"])
def test_sparse_memory_dict_keys_agree_with_each_other(kind):
    rnn = small(kind, num_layers=1)
    _, (_, memory, reads) = rnn(torch.randn(4, 6, 9))
    rows = memory["read_positions"]  # [B, R E + 1]
    visible = memory["memory"].gather(1, rows.unsqueeze(-1).expand(-1, -1, 5))  # [B, R E + 1, W]
    torch.testing.assert_close(memory["visible_memory"], visible)
    assert torch.equal(memory["least_used_mem"][:, 0], memory["usage"].argmin(1))
    assert torch.equal(rows[:, -1:], memory["least_used_mem"])
    torch.testing.assert_close(memory["read_vectors"].reshape(4, -1), reads)
    # The [B, N] read weights are each head's weights of the rows read, summed over the heads.
    heads = memory["head_read_weights"]  # [B, R, E]
    expected = torch.zeros(4, 12)
    for b in range(4):
        for position, weight in zip(rows[b, :-1].tolist(), heads[b].reshape(-1).tolist()):
            expected[b, position] += weight
    torch.testing.assert_close(memory["read_weights"], expected)
    if kind == "SAM":  # content reads only: each head's weights sum to 1
        torch.testing.assert_close(memory["read_weights"].sum(1), torch.full((4,), 3.0))
    assert (memory["write_weights"] >= 0).all() and memory["write_weights"].sum() > 0
    if kind == "SDNC":
        assert memory["link_matrix"] is memory["link_value"] and memory["rev_link_matrix"] is memory["rev_link_value"]


def test_dnc_memory_dict_keeps_the_published_singleton_dimensions_and_goes_back_in():
    rnn = small("DNC", num_layers=1)
    x = torch.randn(4, 6, 9)
    _, (_, memory, _) = rnn(x)
    assert set(memory) == {"memory", "link_matrix", "precedence", "read_weights", "write_weights", "usage_vector"}
    assert memory["link_matrix"].shape == (4, 1, 12, 12) and memory["precedence"].shape == (4, 1, 12)
    assert memory["write_weights"].shape == (4, 1, 12) and memory["read_weights"].shape == (4, 3, 12)
    # Indexing as 1.1.0's code does: the link matrix of element 0.
    assert memory["link_matrix"][0][0].shape == (12, 12)
    carried, _ = rnn(x, (None, memory, None))
    squeezed = {k: (v.squeeze(1) if k in ("link_matrix", "precedence", "write_weights") else v)
                for k, v in memory.items()}
    torch.testing.assert_close(rnn(x, (None, squeezed, None))[0], carried, rtol=0, atol=0)  # the steps' own form too


def test_bad_published_state_is_named():
    rnn = small("SAM", num_layers=2)
    _, (_, memory, reads) = rnn(torch.randn(4, 6, 9))
    with pytest.raises(ValueError, match="read_vectors must be \\[4, 15\\]"):
        rnn(torch.randn(4, 6, 9), (None, memory, reads[:, :7]))
    broken = {k: v for k, v in memory.items() if k != "head_read_weights"}
    with pytest.raises(ValueError, match="head_read_weights"):
        rnn(torch.randn(4, 6, 9), (None, broken, reads))
    with pytest.raises(ValueError, match="memory_hidden must be a dict"):
        rnn(torch.randn(4, 6, 9), (None, [memory], reads))


@pytest.mark.parametrize("cls", [SAM, SDNC])
def test_the_published_state_saves_nothing_of_size_n_for_backward(cls):
    """Turning the state into 1.1.0's dict (visible_memory, dense [B, N] weights) keeps no [B, N, W]
    memory alive for backward: the bytes autograd saves over a call do not grow with the number of cells
    (a gather of visible_memory from the memory saved all of it, 64 MiB at 65,536 cells)."""
    def saved_bytes(cells):
        torch.manual_seed(0)
        rnn = cls(input_size=6, hidden_size=8, nr_cells=cells, cell_size=8, read_heads=2, batch_first=True)
        storages = {}

        def pack(tensor):
            storages[tensor.untyped_storage().data_ptr()] = (tensor.untyped_storage().nbytes(), tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output, (_, memory, _) = rnn(torch.randn(3, 5, 6), (None, None, None), reset_experience=True)
        (output.sum() + memory["visible_memory"].sum()).backward()
        return sum(nbytes for nbytes, _ in storages.values())

    assert saved_bytes(4096) == saved_bytes(64)
