"""ForgetMult: the fast paths against the reference loop, gradcheck, reversal, dispatch, argument errors.

Modelled on fla's tests/ops/test_hgrn.py: outputs, final state and the gradients with respect to f,
x and h0, over odd shapes and each dtype with its own tolerance. As in fla's tests/conftest.py,
fresh buffers from `torch.empty`/`torch.empty_like` are filled with NaN in every test of this file, so
a kernel that leaves part of an output unwritten fails the comparison instead of passing by luck.
The CUDA tests are skipped without a GPU (and the Triton ones without Triton).
"""

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from models.ops import forget_mult as forget_mult_module
from models.ops.forget_mult import forget_mult, forget_mult_ref, forget_mult_torch
from tests.conftest import error_ratio, nan_filled_buffers

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_triton = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and Triton")

# [T, B, H]: one step, batch 1, hidden sizes that are odd and not a multiple of the kernel's block.
SHAPES = [(1, 1, 1), (1, 3, 7), (4, 1, 33), (9, 2, 7), (35, 3, 33)]
CPU_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
# Largest RMS error relative to the reference's RMS (fla's `get_err_ratio`), for low precision.
ERROR_RATIO = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _nan_filled_buffers(monkeypatch):
    nan_filled_buffers(monkeypatch)


def make_inputs(shape, dtype, device="cpu", with_h0=True, seed=0):
    """Gates f in (0, 1), values x and h0 ~ N(0, 1), and random output gradients, all leaves."""
    generator = torch.Generator().manual_seed(seed)
    num_steps, batch_size, hidden_size = shape
    f = torch.rand(shape, generator=generator, dtype=torch.float64)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    h0 = torch.randn(batch_size, hidden_size, generator=generator, dtype=torch.float64) if with_h0 else None
    grad_h = torch.randn(shape, generator=generator, dtype=torch.float64)
    grad_h_last = torch.randn(batch_size, hidden_size, generator=generator, dtype=torch.float64)

    def leaf(tensor):
        return tensor.to(device=device, dtype=dtype).requires_grad_()

    return (leaf(f), leaf(x), leaf(h0) if h0 is not None else None,
            grad_h.to(device=device, dtype=dtype), grad_h_last.to(device=device, dtype=dtype))


def run(function, f, x, h0, reverse, grad_h, grad_h_last):
    """[h, h_last, df, dx, dh0] of `function` with the given output gradients (None: that output unused)."""
    h, h_last = function(f, x, h0, reverse)
    loss = 0
    if grad_h is not None:
        loss = loss + (h.float() * grad_h.float()).sum()
    if grad_h_last is not None:
        loss = loss + (h_last.float() * grad_h_last.float()).sum()
    inputs = [f, x] + ([h0] if h0 is not None else [])
    grads = list(torch.autograd.grad(loss, inputs))
    return [h.detach(), h_last.detach()] + grads


NAMES = ["h", "h_last", "df", "dx", "dh0"]


def test_fresh_buffers_are_nan():
    assert torch.empty(3).isnan().all() and torch.empty_like(torch.zeros(2)).isnan().all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [True, False])
def test_matches_reference(shape, dtype, reverse, with_h0):
    f, x, h0, grad_h, grad_h_last = make_inputs(shape, dtype, with_h0=with_h0, seed=sum(shape))
    expected = run(forget_mult_ref, f, x, h0, reverse, grad_h, grad_h_last)
    actual = run(forget_mult, f, x, h0, reverse, grad_h, grad_h_last)
    for name, actual_tensor, expected_tensor in zip(NAMES, actual, expected):
        assert actual_tensor.dtype == dtype and actual_tensor.shape == expected_tensor.shape, name
        torch.testing.assert_close(actual_tensor, expected_tensor, **CPU_TOLERANCE[dtype], msg=name)


@pytest.mark.parametrize("used", ["h", "h_last"])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_when_one_output_is_unused(used, reverse):
    """Autograd passes None for the gradient of an unused output; the backward treats it as zeros."""
    f, x, h0, grad_h, grad_h_last = make_inputs((6, 2, 5), torch.float64, seed=1)
    grads = (grad_h, None) if used == "h" else (None, grad_h_last)
    expected = run(forget_mult_ref, f, x, h0, reverse, *grads)
    actual = run(forget_mult, f, x, h0, reverse, *grads)
    for name, actual_tensor, expected_tensor in zip(NAMES, actual, expected):
        torch.testing.assert_close(actual_tensor, expected_tensor, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
def test_half_precision_on_cpu(dtype, reverse):
    """Half-precision inputs run in float32 and come back in their own dtype."""
    f, x, h0, grad_h, grad_h_last = make_inputs((20, 3, 33), dtype, seed=2)
    expected = run(forget_mult_ref, f, x, h0, reverse, grad_h, grad_h_last)
    actual = run(forget_mult, f, x, h0, reverse, grad_h, grad_h_last)
    for name, actual_tensor, expected_tensor in zip(NAMES, actual, expected):
        assert actual_tensor.dtype == dtype, name
        assert error_ratio(actual_tensor, expected_tensor) < ERROR_RATIO[dtype], name


@pytest.mark.parametrize("function", [forget_mult_ref, forget_mult_torch], ids=["ref", "torch"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [True, False])
def test_gradcheck(function, reverse, with_h0):
    f, x, h0, _, _ = make_inputs((4, 2, 3), torch.float64, with_h0=with_h0, seed=3)
    if with_h0:
        assert torch.autograd.gradcheck(lambda f, x, h0: function(f, x, h0, reverse), (f, x, h0))
    else:
        assert torch.autograd.gradcheck(lambda f, x: function(f, x, None, reverse), (f, x))


@pytest.mark.parametrize("function", [forget_mult_ref, forget_mult], ids=["ref", "forget_mult"])
def test_reverse_is_the_time_flipped_sequence(function):
    f, x, h0, _, _ = make_inputs((7, 2, 5), torch.float64, seed=4)
    h, h_last = function(f, x, h0, reverse=True)
    h_flipped, h_last_flipped = function(f.flip(0), x.flip(0), h0)
    torch.testing.assert_close(h, h_flipped.flip(0))
    torch.testing.assert_close(h_last, h_last_flipped)
    torch.testing.assert_close(h_last, h[0])


@pytest.mark.parametrize("function", [forget_mult_ref, forget_mult], ids=["ref", "forget_mult"])
def test_hand_computed(function):
    """h0 = 1, f = (1/2, 1/4), x = (2, 4): h_0 = 1 + 1/2 = 1.5, h_1 = 1 + 3/4 * 1.5 = 2.125; reversed:
    h_1 = 1 + 3/4 = 1.75, h_0 = 1 + 1/2 * 1.75 = 1.875."""
    f = torch.tensor([0.5, 0.25]).view(2, 1, 1)
    x = torch.tensor([2.0, 4.0]).view(2, 1, 1)
    h0 = torch.ones(1, 1)
    h, h_last = function(f, x, h0)
    assert h.flatten().tolist() == [1.5, 2.125] and h_last.item() == 2.125
    h, h_last = function(f, x, h0, reverse=True)
    assert h.flatten().tolist() == [1.875, 1.75] and h_last.item() == 1.875
    h, _ = function(f, x)
    assert h.flatten().tolist() == [1.0, 1.0 + 0.75 * 1.0]


def test_non_contiguous_inputs():
    f_batch_major, x_batch_major, _, _, _ = make_inputs((3, 8, 5), torch.float32, seed=5)  # [B, T, H]
    f, x = f_batch_major.transpose(0, 1), x_batch_major.transpose(0, 1)  # [B, T, H] -> [T, B, H]
    h0 = torch.randn(5, 3).t().requires_grad_()  # [H, B] -> [B, H], column-major
    grad_h = torch.randn(3, 8, 5).transpose(0, 1)  # [B, T, H] -> [T, B, H]
    grad_h_last = torch.randn(3, 5)
    assert not f.is_contiguous() and not h0.is_contiguous() and not grad_h.is_contiguous()
    expected = run(forget_mult_ref, f, x, h0, False, grad_h, grad_h_last)
    actual = run(forget_mult, f, x, h0, False, grad_h, grad_h_last)
    for name, actual_tensor, expected_tensor in zip(NAMES, actual, expected):
        torch.testing.assert_close(actual_tensor, expected_tensor, msg=name)


def test_graph_only_where_needed():
    f, x, h0, _, _ = make_inputs((5, 2, 3), torch.float32, seed=6)
    with torch.no_grad():
        h, h_last = forget_mult(f, x, h0)
    assert not h.requires_grad and not h_last.requires_grad
    x_only = x.detach().requires_grad_()
    h, h_last = forget_mult(f.detach(), x_only, h0.detach())
    (h.sum() + h_last.sum()).backward()
    assert x_only.grad is not None and f.grad is None and h0.grad is None
    assert h_last.data_ptr() != h[-1].data_ptr()  # a copy, not a view into h


def test_double_backward_is_refused():
    f, x, h0, _, _ = make_inputs((3, 1, 2), torch.float64, seed=7)
    h, _ = forget_mult(f, x, h0)
    (grad_f,) = torch.autograd.grad(h.pow(2).sum(), f, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_f.sum().backward()


def bad_calls():
    f, x, h0 = torch.rand(4, 2, 3), torch.rand(4, 2, 3), torch.rand(2, 3)
    return [
        ((f[0], x[0], None), "f must have shape \\[T, B, H\\]"),
        ((f[:0], x[:0], None), "T, B, H >= 1"),
        ((f, x[:3], None), "x must have the shape of f"),
        ((f.long(), x.long(), None), "float16, bfloat16, float32 or float64"),
        ((f, x.double(), None), "f and x must have one dtype"),
        ((f, x, h0[:1]), "h0 must have shape \\[B, H\\] = \\(2, 3\\)"),
        ((f, x, h0.double()), "h0 must have the dtype of f"),
        ((f, x, h0, "yes"), "reverse must be a bool"),
        ((f.numpy(), x, None), "f must be a torch.Tensor"),
        ((f, x, h0.numpy()), "h0 must be None or a torch.Tensor"),
    ]


@pytest.mark.parametrize("function", [forget_mult_ref, forget_mult, forget_mult_torch],
                         ids=["ref", "forget_mult", "torch"])
@pytest.mark.parametrize("index", range(len(bad_calls())))
def test_argument_errors(function, index):
    arguments, message = bad_calls()[index]
    with pytest.raises(ValueError, match=message):
        function(*arguments)


@requires_cuda
def test_device_mismatch_is_an_error():
    f, x = torch.rand(4, 2, 3), torch.rand(4, 2, 3, device="cuda")
    with pytest.raises(ValueError, match="f and x must be on one device"):
        forget_mult(f, x)
    with pytest.raises(ValueError, match="h0 must be on the device of f"):
        forget_mult(x, x, torch.rand(2, 3))


def test_import_needs_neither_triton_nor_cuda():
    """Importing the module must not import the Triton kernels (machines without Triton import it too)."""
    code = (
        "import sys, models.ops, models.ops.forget_mult\n"
        "assert 'models.ops.forget_mult_triton' not in sys.modules, 'the Triton module was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_missing_triton_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.delitem(sys.modules, "models.ops.forget_mult_triton", raising=False)
    forget_mult_module.load_triton_kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="pip install triton"):
            assert forget_mult_module.load_triton_kernel() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert forget_mult_module.load_triton_kernel() is None  # cached: no second warning
            if HAS_CUDA:
                f, x, h0, grad_h, grad_h_last = make_inputs((5, 2, 3), torch.float32, device="cuda", seed=8)
                expected = run(forget_mult_ref, f, x, h0, False, grad_h, grad_h_last)
                actual = run(forget_mult, f, x, h0, False, grad_h, grad_h_last)
                for name, actual_tensor, expected_tensor in zip(NAMES, actual, expected):
                    torch.testing.assert_close(actual_tensor, expected_tensor, msg=name)
    finally:
        forget_mult_module.load_triton_kernel.cache_clear()


# CUDA: [T, B, H] with B * H below, at and across the kernel's 256-column blocks, not multiples of it.
CUDA_SHAPES = [(1, 1, 1), (1, 3, 7), (7, 1, 33), (35, 3, 333), (64, 4, 300), (300, 2, 129)]
CUDA_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5)}


@requires_triton
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [True, False])
def test_triton_matches_reference(shape, dtype, reverse, with_h0):
    from models.ops.forget_mult_triton import forget_mult_triton

    f, x, h0, grad_h, grad_h_last = make_inputs(shape, dtype, device="cuda", with_h0=with_h0, seed=sum(shape))
    expected = run(forget_mult_ref, f, x, h0, reverse, grad_h, grad_h_last)
    for function in (forget_mult, forget_mult_triton):
        actual = run(function, f, x, h0, reverse, grad_h, grad_h_last)
        for name, actual_tensor, expected_tensor in zip(NAMES, actual, expected):
            assert actual_tensor.dtype == dtype and actual_tensor.device.type == "cuda", name
            if dtype == torch.float32:
                torch.testing.assert_close(actual_tensor, expected_tensor, **CUDA_TOLERANCE[dtype], msg=name)
            else:
                ratio = error_ratio(actual_tensor, expected_tensor)
                assert ratio < ERROR_RATIO[dtype], f"{name}: error ratio {ratio:.2e}"


@requires_triton
def test_forget_mult_dispatches_to_triton_on_cuda():
    f, x, h0, _, _ = make_inputs((3, 2, 5), torch.float32, device="cuda", seed=9)
    assert "Triton" in type(forget_mult(f, x, h0)[0].grad_fn).__name__
    f, x, h0, _, _ = make_inputs((3, 2, 5), torch.float64, device="cuda", seed=9)
    assert "Triton" not in type(forget_mult(f, x, h0)[0].grad_fn).__name__  # float64 takes the PyTorch path


@requires_triton
def test_triton_rejects_what_it_cannot_run():
    from models.ops.forget_mult_triton import forget_mult_triton

    with pytest.raises(ValueError, match="needs CUDA tensors"):
        forget_mult_triton(torch.rand(2, 1, 3), torch.rand(2, 1, 3))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        forget_mult_triton(torch.rand(2, 1, 3, device="cuda").double(), torch.rand(2, 1, 3, device="cuda").double())


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
def test_torch_path_on_cuda(dtype, reverse):
    f, x, h0, grad_h, grad_h_last = make_inputs((35, 3, 33), dtype, device="cuda", seed=10)
    expected = run(forget_mult_ref, f, x, h0, reverse, grad_h, grad_h_last)
    actual = run(forget_mult_torch, f, x, h0, reverse, grad_h, grad_h_last)
    for name, actual_tensor, expected_tensor in zip(NAMES, actual, expected):
        torch.testing.assert_close(actual_tensor, expected_tensor, **CPU_TOLERANCE[dtype], msg=name)
