"""The Triton kernels (ForgetMult, the fused QRNN pooling) against their PyTorch references.

The same tests run in two places:

- on a CUDA GPU, in the ordinary suite, on CUDA tensors;
- on CPU tensors under Triton's interpreter, where TRITON_INTERPRET=1 was set before Triton was
  imported. tests/test_triton_interpreter.py launches this module so in a fresh process, so the
  kernels are tested without a GPU; there `models.ops.forget_mult.TRITON_ON_CPU` (a switch for
  tests only) lets CPU tensors reach the kernels.

Elsewhere (no GPU, no interpreter) the module is skipped. Sizes are small, since the interpreter runs
each program in Python: odd sizes (not multiples of any block, so several programs share a row and the
last is partly masked), T = 1, both directions, and explicit launch configs, among them the
time-chunked kernels (tiles of 4 steps, 2 in the fused backward) on lengths that are not a multiple of
the tile. Fresh buffers are NaN-filled as in test_forget_mult.py, so a kernel that leaves part of an
output unwritten fails.
"""

import importlib.util
import os

import pytest
import torch

from models.ops import forget_mult as forget_mult_module
from models.ops.forget_mult import forget_mult, forget_mult_ref
from models.ops.triton_launch import KernelConfig
from models.qrnn import pool_eager, QRNN, QRNNLayer
from tests.conftest import error_ratio, nan_filled_buffers

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if HAS_CUDA else "cpu"

pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not (HAS_CUDA or INTERPRETED),
    reason="needs Triton and a CUDA GPU, or Triton's interpreter (tests/test_triton_interpreter.py runs it so)",
)
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the interpreter has no kernel launches)")

# Largest RMS error relative to the reference's RMS, per dtype (fla's `get_err_ratio`).
ERROR_RATIO = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
F32, BF16 = torch.float32, torch.bfloat16
# The default launch already cuts these small rows into blocks of 32 (several programs per row, the
# last one partly masked); an explicit config checks that `config=` reaches the kernels.
EXPLICIT = KernelConfig(64, 2)
CHUNKED = KernelConfig(32, 1, time_chunk=4)  # the time-chunked kernels: 4 steps per tile


@pytest.fixture(autouse=True)
def triton_on_this_device(monkeypatch):
    """CPU tensors may reach the kernels (interpreter only), and fresh buffers hold NaN."""
    monkeypatch.setattr(forget_mult_module, "TRITON_ON_CPU", INTERPRETED)
    nan_filled_buffers(monkeypatch)


@pytest.fixture(scope="module", autouse=True)
def interpreter_index_fix():
    """Triton 3.6's interpreter turns one-element arrays into loop bounds with `int(array)`, which NumPy 2.4
    refuses; for the interpreter's scalars `array.item()` is the same number. Test-only, and only then."""
    if not INTERPRETED:
        yield
        return
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.ones(1, dtype=np.int32))
        yield
        return
    except TypeError:
        pass
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    yield
    interpreter._patch_lang_tensor = original


def assert_close(actual, expected, dtype, name):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    if actual.numel() == 0:
        return
    assert not actual.isnan().any(), f"{name}: NaN (an element left unwritten?)"
    ratio = error_ratio(actual, expected)
    assert ratio < ERROR_RATIO[dtype], f"{name}: error ratio {ratio:.2e}"


# --------------------------------------------------------------------------- ForgetMult


def gradients(function, f, x, h0, reverse, grad_h, grad_h_last):
    """[h, h_last, df, dx, dh0] of `function` with the given output gradients."""
    h, h_last = function(f, x, h0, reverse)
    loss = (h.float() * grad_h).sum() + (h_last.float() * grad_h_last).sum()
    inputs = [f, x] + ([h0] if h0 is not None else [])
    return [h.detach(), h_last.detach()] + list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("shape, dtype, with_h0, config", [
    ((1, 1, 1), F32, True, None), ((1, 3, 7), F32, False, None), ((4, 1, 33), F32, True, None),
    ((9, 2, 37), F32, False, EXPLICIT), ((5, 2, 33), BF16, True, None),
    # chunked: T = 1 (one partial tile), T not a multiple of the chunk, exactly two tiles
    ((1, 2, 7), F32, True, CHUNKED), ((9, 2, 37), F32, True, CHUNKED), ((8, 1, 5), F32, False, CHUNKED),
    ((6, 3, 11), BF16, True, CHUNKED),
], ids=str)
@pytest.mark.parametrize("reverse", [False, True])
def test_forget_mult_kernel_matches_reference(shape, dtype, with_h0, config, reverse):
    from models.ops.forget_mult_triton import forget_mult_triton

    generator = torch.Generator().manual_seed(sum(shape))
    f = torch.rand(shape, generator=generator)
    x = torch.randn(shape, generator=generator)
    h0 = torch.randn(shape[1:], generator=generator) if with_h0 else None
    grad_h, grad_h_last = torch.randn(shape, generator=generator), torch.randn(shape[1:], generator=generator)
    leaves = [None if t is None else t.to(DEVICE, dtype).requires_grad_() for t in (f, x, h0)]
    grad_h, grad_h_last = grad_h.to(DEVICE), grad_h_last.to(DEVICE)
    expected = gradients(forget_mult_ref, *leaves, reverse, grad_h, grad_h_last)
    actual = gradients(lambda *a: forget_mult_triton(*a, config=config), *leaves, reverse, grad_h, grad_h_last)
    for name, got, want in zip(["h", "h_last", "df", "dx", "dh0"], actual, expected):
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("used", ["h", "h_last"])
@pytest.mark.parametrize("config", [None, CHUNKED], ids=str)
def test_forget_mult_kernel_with_one_output_unused(used, config):
    """Autograd passes None for an unused output's gradient: the kernels' HAS_GRAD_* paths."""
    from models.ops.forget_mult_triton import forget_mult_triton

    generator = torch.Generator().manual_seed(2)
    f, x, h0 = torch.rand(6, 2, 5, generator=generator), torch.randn(6, 2, 5, generator=generator), torch.randn(2, 5)
    results = []
    for function in (forget_mult_ref, lambda *a: forget_mult_triton(*a, config=config)):
        leaves = [t.to(DEVICE).requires_grad_() for t in (f, x, h0)]
        h, h_last = function(*leaves, True)
        (h.pow(2).sum() if used == "h" else h_last.pow(2).sum()).backward()
        results.append([h.detach(), h_last.detach()] + [t.grad for t in leaves])
    for name, got, want in zip(["h", "h_last", "df", "dx", "dh0"], *results):
        assert_close(got, want, F32, name)


def test_forget_mult_dispatches_to_the_kernel():
    f = torch.rand(3, 2, 5, device=DEVICE, requires_grad=True)
    h, _ = forget_mult(f, torch.rand(3, 2, 5, device=DEVICE))
    assert type(h.grad_fn).__name__ == "ForgetMultTritonBackward"


# --------------------------------------------------------------------------- the fused QRNN pooling


def pool_inputs(steps, batch_size, hidden_size, dtype, output_gate=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    gate_count = 3 if output_gate else 2
    gates = torch.randn(steps, batch_size, gate_count * hidden_size, generator=generator) * 2
    hidden = torch.randn(batch_size, hidden_size, generator=generator)
    grad_output = torch.randn(steps, batch_size, hidden_size, generator=generator)
    grad_last = torch.randn(batch_size, hidden_size, generator=generator)
    return [t.to(DEVICE, dtype) for t in (gates, hidden)] + [t.to(DEVICE) for t in (grad_output, grad_last)]


def pool_results(pool, gates, hidden, grad_output, grad_last, **options):
    """[output, last, d gates, d hidden] of a pooling function, given the output gradients (None: unused)."""
    gates = gates.detach().requires_grad_()
    hidden = hidden.detach().requires_grad_() if hidden is not None else None
    output, last = pool(gates, hidden, **options)
    loss = 0
    if grad_output is not None:
        loss = loss + (output.float() * grad_output).sum()
    if grad_last is not None:
        loss = loss + (last.float() * grad_last).sum()
    inputs = [gates] + ([hidden] if hidden is not None else [])
    return [output.detach(), last.detach()] + list(torch.autograd.grad(loss, inputs))


def fused(gates, hidden, valid=None, lengths=None, forget_mask=None, forget_scale=1.0, reverse=False,
          output_gate=True, config=None):
    from models.ops.qrnn_triton import qrnn_pool_triton

    return qrnn_pool_triton(gates, hidden, lengths, forget_mask, forget_scale, reverse, output_gate, config)


def eager(gates, hidden, valid=None, lengths=None, forget_mask=None, forget_scale=1.0, reverse=False,
          output_gate=True, config=None):
    return pool_eager(gates, hidden, valid, forget_mask, forget_scale, reverse, output_gate)


# (T, B, H, output gate, h0, zoneout: None / "mask" / "scale", lengths, dtype, config)
POOL_CASES = [
    (1, 1, 1, True, False, None, None, F32, None),
    (1, 3, 7, True, True, None, None, BF16, None),
    (5, 2, 33, True, True, None, None, F32, None),
    (5, 2, 33, False, True, None, None, F32, EXPLICIT),
    (4, 3, 7, True, False, "mask", None, F32, None),
    (4, 3, 7, False, True, "scale", None, F32, None),
    (5, 4, 5, True, True, None, [5, 2, 0, 4], F32, None),
    (5, 4, 5, False, False, "mask", [1, 5, 3, 4], F32, None),
    (5, 2, 37, True, True, "scale", [5, 3], BF16, None),
    # the forward's time-chunked kernel: tiles of 4 steps, the last one partial, with padding and zoneout
    (1, 2, 7, True, True, None, None, F32, CHUNKED),
    (6, 3, 9, True, True, "mask", [6, 0, 3], F32, CHUNKED),
    (9, 2, 5, False, False, "scale", [2, 9], F32, CHUNKED),
    (7, 2, 33, True, True, None, None, BF16, CHUNKED),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda case: "-".join(map(str, case)))
@pytest.mark.parametrize("reverse", [False, True])
def test_fused_pool_matches_eager(case, reverse):
    """Outputs, last state and the gradients of the gate pre-activations and h0, against `pool_eager`."""
    steps, batch_size, hidden_size, output_gate, with_h0, zoneout, lengths, dtype, config = case
    gates, hidden, grad_output, grad_last = pool_inputs(steps, batch_size, hidden_size, dtype, output_gate,
                                                        seed=steps * batch_size + hidden_size)
    options = dict(reverse=reverse, output_gate=output_gate)
    if zoneout == "mask":
        options["forget_mask"] = torch.rand(steps, batch_size, hidden_size, generator=torch.Generator().manual_seed(1)
                                            ).lt(0.7).to(DEVICE, dtype)
    elif zoneout == "scale":
        options["forget_scale"] = 0.75
    if lengths is not None:
        options["lengths"] = torch.tensor(lengths, device=DEVICE)
        options["valid"] = (torch.arange(steps).unsqueeze(1) < torch.tensor(lengths)).to(DEVICE, dtype).unsqueeze(2)
    hidden = hidden if with_h0 else None
    expected = pool_results(eager, gates, hidden, grad_output, grad_last, **options)
    actual = pool_results(fused, gates, hidden, grad_output, grad_last, config=config, **options)
    for name, got, want in zip(["output", "last", "d gates", "d h0"], actual, expected):
        assert_close(got, want, dtype, name)
    if lengths is not None:
        padded = options["valid"].squeeze(2) == 0  # [T, B]
        assert torch.count_nonzero(actual[0][padded]) == 0 and torch.count_nonzero(actual[2][padded]) == 0


@pytest.mark.parametrize("used", ["output", "last"])
@pytest.mark.parametrize("config", [None, CHUNKED], ids=str)
def test_fused_pool_with_one_output_unused(used, config):
    gates, hidden, grad_output, grad_last = pool_inputs(5, 2, 9, torch.float32, seed=3)
    grads = (grad_output, None) if used == "output" else (None, grad_last)
    expected = pool_results(eager, gates, hidden, *grads)
    actual = pool_results(fused, gates, hidden, *grads, config=config)
    for name, got, want in zip(["output", "last", "d gates", "d h0"], actual, expected):
        assert_close(got, want, torch.float32, name)


@pytest.mark.parametrize("function", ["pool", "pool chunked", "forget_mult"])
def test_backward_writes_nothing_into_its_inputs_when_h0_needs_no_gradient(function):
    """With an h0 that needs no gradient the kernels must not store dh0 anywhere (e.g. into a stand-in)."""
    from models.ops.forget_mult_triton import forget_mult_triton

    gates, hidden, grad_output, _ = pool_inputs(4, 2, 9, torch.float32, seed=6)
    if function == "forget_mult":
        gates = gates[..., :9].sigmoid().contiguous()
        x = torch.randn(4, 2, 9, device=DEVICE)
        inputs = [gates.clone().requires_grad_(), x.clone().requires_grad_()]
        h, _ = forget_mult_triton(*inputs, hidden)
    else:
        inputs = [gates.clone().requires_grad_()]
        h, _ = fused(inputs[0], hidden, config=CHUNKED if function == "pool chunked" else None)
    saved = [t.detach().clone() for t in inputs] + [hidden.clone()]
    (h * grad_output).sum().backward()
    for before, after in zip(saved, [t.detach() for t in inputs] + [hidden]):
        assert torch.equal(before, after)
    expected = pool_results(eager, gates, hidden, grad_output, None)[2] if function != "forget_mult" else None
    if expected is not None:
        assert_close(inputs[0].grad, expected, torch.float32, "d gates")


def test_fused_pool_without_grad_runs_without_autograd():
    gates, hidden, _, _ = pool_inputs(4, 2, 9, torch.float32, seed=4)
    with torch.no_grad():
        output, last = fused(gates.requires_grad_(), hidden)
    assert output.grad_fn is None and not output.requires_grad
    expected_output, expected_last = eager(gates.detach(), hidden)
    assert_close(output, expected_output, torch.float32, "output")
    assert_close(last, expected_last, torch.float32, "last")


def test_fused_pool_rejects_what_it_cannot_run():
    from models.ops.qrnn_triton import qrnn_pool_triton

    gates = torch.randn(3, 2, 12, device=DEVICE)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        qrnn_pool_triton(gates.double())
    with pytest.raises(ValueError, match="contiguous"):
        qrnn_pool_triton(gates.transpose(0, 1))
    with pytest.raises(ValueError, match="G \\* H"):
        qrnn_pool_triton(gates[..., :11].contiguous())


# --------------------------------------------------------------------------- layers and stacks, fused vs eager


def layer_results(layer, x, hidden, prev_x, lengths, reverse, seed) -> dict:
    """Output, last state, next prev_x and the gradients that exist (x, hidden, prev_x, weight, bias) of `run`."""
    layer.zero_grad()
    inputs = {name: t.detach().requires_grad_() for name, t in (("x", x), ("hidden", hidden), ("prev_x", prev_x))
              if t is not None}
    torch.manual_seed(seed)  # the same zoneout mask on both paths
    output, last, next_prev_x = layer.run(inputs["x"], inputs.get("hidden"), inputs.get("prev_x"),
                                          lengths=lengths, reverse=reverse)
    loss = output.float().pow(2).sum() + last.float().sin().sum() + next_prev_x.float().sum()
    loss.backward()
    results = {"output": output.detach(), "last": last.detach(), "next prev_x": next_prev_x.detach()}
    gradients = {**{f"d {name}": t.grad for name, t in inputs.items()},
                 "d weight": layer.linear.weight.grad, "d bias": layer.linear.bias.grad}
    return {**results, **{name: grad for name, grad in gradients.items() if grad is not None}}


# (T, B, D, H, window, output gate, zoneout, training, lengths, h0 and prev_x given, dtype)
LAYER_CASES = [
    (1, 2, 3, 5, 1, True, 0.0, True, None, True, F32),
    (4, 3, 4, 7, 2, True, 0.0, True, None, True, F32),
    (4, 3, 4, 7, 2, False, 0.25, True, None, False, F32),
    (5, 2, 3, 9, 3, True, 0.25, False, None, True, BF16),
    (5, 3, 4, 5, 2, True, 0.0, True, [5, 1, 3], True, F32),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda case: "-".join(map(str, case)))
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_fused_equals_eager(case, reverse):
    steps, batch_size, input_size, hidden_size, window, output_gate, zoneout, training, lengths, given, dtype = case
    torch.manual_seed(0)
    layer = QRNNLayer(input_size, hidden_size, window=window, output_gate=output_gate, zoneout=zoneout)
    layer = layer.to(DEVICE, dtype).train(training)
    x = torch.randn(steps, batch_size, input_size, device=DEVICE, dtype=dtype)
    hidden = torch.randn(batch_size, hidden_size, device=DEVICE, dtype=dtype) if given else None
    prev_x = torch.randn(window - 1, batch_size, input_size, device=DEVICE, dtype=dtype) if given else None
    if reverse:
        prev_x = None
    lengths = torch.tensor(lengths, device=DEVICE) if lengths is not None else None
    layer.use_cuda = True
    assert layer.uses_fused_pool(x)
    actual = layer_results(layer, x, hidden, prev_x, lengths, reverse, seed=5)
    layer.use_cuda = False
    assert not layer.uses_fused_pool(x)
    expected = layer_results(layer, x, hidden, prev_x, lengths, reverse, seed=5)
    assert actual.keys() == expected.keys()
    assert {"d x", "d weight", "d bias"} <= actual.keys() and ("d hidden" in actual) == given
    for name in expected:
        assert_close(actual[name], expected[name], dtype, name)


def test_bidirectional_stack_fused_equals_eager_with_packed_lengths():
    torch.manual_seed(0)
    qrnn = QRNN(3, 5, num_layers=2, window=2, bidirectional=True, zoneout=0.2).to(DEVICE)
    x = torch.randn(4, 3, 3, device=DEVICE)
    hidden = torch.randn(4, 3, 5, device=DEVICE)
    lengths = torch.tensor([4, 1, 3], device=DEVICE)
    results = []
    for use_cuda in (True, False):
        for layer in qrnn.layers:
            layer.use_cuda = use_cuda
        qrnn.zero_grad()
        inputs = [t.detach().requires_grad_() for t in (x, hidden)]
        torch.manual_seed(1)
        output, h_n = qrnn(*inputs, lengths=lengths)
        (output.pow(2).sum() + h_n.sum()).backward()
        results.append([output, h_n] + [t.grad for t in inputs] + [p.grad for p in qrnn.parameters()])
    for index, (got, want) in enumerate(zip(*results)):
        assert_close(got.detach(), want.detach(), torch.float32, f"result {index}")


@requires_gpu
def test_layer_call_is_one_product_and_one_kernel():
    """The point of the fusion: a layer's inference forward launches the product and the pooling kernel only."""
    layer = QRNNLayer(320, 320).cuda().eval()
    x = torch.randn(32, 8, 320, device="cuda")
    with torch.no_grad():
        layer.run(x)  # compile the kernel first
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            layer.run(x)
            torch.cuda.synchronize()
    kernels = [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("_qrnn_forward" in name for name in kernels) == 1, kernels
    # the product (cuBLAS: one kernel, two with a split-K reduction) and the pooling; no elementwise kernels
    assert len(kernels) <= 3 and not any("elementwise" in name.lower() for name in kernels), kernels


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_launches_on_the_gpu_match_eager(dtype):
    """The GPU's default configs (time-chunked on long sequences, wide blocks) against the eager layer."""
    torch.manual_seed(0)
    for steps, batch_size, hidden_size in [(100, 8, 320), (70, 64, 1000)]:
        layer = QRNNLayer(hidden_size, hidden_size).to(DEVICE, dtype)
        x = torch.randn(steps, batch_size, hidden_size, device=DEVICE, dtype=dtype)
        hidden = torch.randn(batch_size, hidden_size, device=DEVICE, dtype=dtype)
        layer.use_cuda = True
        actual = layer_results(layer, x, hidden, None, None, False, seed=0)
        layer.use_cuda = False
        expected = layer_results(layer, x, hidden, None, None, False, seed=0)
        for name in expected:
            assert_close(actual[name], expected[name], dtype, name)
        f = torch.rand(steps, batch_size, hidden_size, device=DEVICE, dtype=dtype)
        h, h_last = forget_mult(f, x, hidden)
        h_ref, h_last_ref = forget_mult_ref(f, x, hidden)
        assert_close(h, h_ref, dtype, "forget_mult h")
        assert_close(h_last, h_last_ref, dtype, "forget_mult h_last")
