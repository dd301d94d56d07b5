"""Code written for salesforce/pytorch-qrnn (`torchqrnn`) runs with only the import changed:
`from torchqrnn import QRNN, QRNNLayer, ForgetMult` -> `from models.qrnn import QRNN, QRNNLayer, ForgetMult`.
"""

import textwrap

import pytest
import torch

from models.ops.forget_mult import forget_mult_ref

# The README's usage example, verbatim.
README_EXAMPLE = """
import torch
from torchqrnn import QRNN

seq_len, batch_size, hidden_size = 7, 20, 256
size = (seq_len, batch_size, hidden_size)
X = torch.autograd.Variable(torch.rand(size), requires_grad=True).cuda()

qrnn = QRNN(hidden_size, hidden_size, num_layers=2, dropout=0.4)
qrnn.cuda()
output, hidden = qrnn(X)

print(output.size(), hidden.size())
"""


def run(source: str) -> dict:
    """`source` with torchqrnn's import changed; without CUDA, also without its `.cuda()` calls."""
    source = textwrap.dedent(source).replace("from torchqrnn import", "from models.qrnn import")
    if not torch.cuda.is_available():
        source = source.replace(".cuda()", "")
    namespace: dict = {}
    torch.manual_seed(0)
    exec(source, namespace)
    return namespace


def test_readme_example_runs_with_the_published_shapes(capsys):
    names = run(README_EXAMPLE)
    assert names["output"].shape == (7, 20, 256) and names["hidden"].shape == (2, 20, 256)
    assert "torch.Size([7, 20, 256]) torch.Size([2, 20, 256])" in capsys.readouterr().out
    names["output"].sum().backward()
    assert names["X"].grad is not None and names["X"].grad.abs().sum() > 0
    # hidden is each layer's cell state c after the last step (before the output gate), as in torchqrnn.
    qrnn = names["qrnn"].eval()
    output, hidden = qrnn(names["X"])
    _, c_last = qrnn.layers[-1](qrnn.layers[0](names["X"])[0])
    torch.testing.assert_close(hidden[-1], c_last[0])


def test_forget_mult_module_as_the_readme_calls_it():
    """`output = ForgetMult()(f, x, hidden)`: h [T, B, H], equal to the plain loop, gradients included."""
    names = run("""
        import torch
        from torchqrnn import ForgetMult

        seq, batch, hidden_size = 35, 4, 13
        f = torch.sigmoid(torch.randn(seq, batch, hidden_size, dtype=torch.float64)).requires_grad_()
        x = torch.randn(seq, batch, hidden_size, dtype=torch.float64, requires_grad=True)
        hidden = torch.randn(batch, hidden_size, dtype=torch.float64, requires_grad=True)
        output = ForgetMult()(f, x, hidden)
        without_hidden = ForgetMult()(f, x)
        loop = ForgetMult()(f, x, hidden, use_cuda=False)
    """)
    f, x, hidden, output = names["f"], names["x"], names["hidden"], names["output"]
    expected, _ = forget_mult_ref(f, x, hidden)
    assert output.shape == (35, 4, 13)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(names["loop"], expected)
    torch.testing.assert_close(names["without_hidden"], forget_mult_ref(f, x)[0])
    # A step by hand: h_0 = f_0 x_0 + (1 - f_0) hidden.
    torch.testing.assert_close(output[0], f[0] * x[0] + (1 - f[0]) * hidden)
    weights = torch.randn_like(output)
    got = torch.autograd.grad((output * weights).sum(), (f, x, hidden))
    want = torch.autograd.grad((expected * weights).sum(), (f, x, hidden))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_forget_mult_is_a_module_importable_where_torchqrnn_has_it():
    import models
    from models.ops.forget_mult import ForgetMult as beside_the_function
    from models.qrnn import ForgetMult

    assert ForgetMult is beside_the_function is models.ForgetMult and issubclass(ForgetMult, torch.nn.Module)
    with pytest.raises(ValueError):
        ForgetMult()(torch.rand(3, 2, 4), torch.rand(3, 2, 5))  # mismatched shapes are named, not broadcast


def test_documented_constructor_and_layers_argument():
    """The README's `QRNN(input_size, hidden_size, num_layers, dropout, layers, save_prev_x, window, zoneout,
    output_gate, use_cuda)` and `reset()`, with QRNNLayers built by hand."""
    names = run("""
        import torch
        from torchqrnn import QRNN, QRNNLayer

        layers = [QRNNLayer(16, 32, save_prev_x=True, window=2, zoneout=0.1, output_gate=True),
                  QRNNLayer(32, 32, save_prev_x=True, window=1, output_gate=False)]
        qrnn = QRNN(16, 32, layers=layers, dropout=0.2, use_cuda=False)
        qrnn.eval()
        X = torch.rand(5, 3, 16)
        first, h = qrnn(X[:2])
        second, h = qrnn(X[2:], h)
        qrnn.reset()
        again, _ = qrnn(X[2:])
        qrnn.reset()
        whole, h_whole = qrnn(X)
    """)
    assert names["first"].shape == (2, 3, 32) and names["h"].shape == (2, 3, 32)
    # save_prev_x carries the window across calls, so two calls equal one; reset() forgets it.
    torch.testing.assert_close(torch.cat([names["first"], names["second"]]), names["whole"])
    assert not torch.allclose(names["again"], names["second"])
