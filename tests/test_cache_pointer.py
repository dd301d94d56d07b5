"""The continuous cache pointer: chunked against the per-token reference, a hand-computed case, validation."""

import math

import pytest
import torch

from models.cache_pointer import cache_pointer, cache_pointer_ref

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-5, atol=1e-5)}


def random_stream(num_positions: int, hidden_size: int, vocab_size: int, dtype: torch.dtype, seed: int = 0):
    """hidden [N, D], targets [N] and target_log_probs [N]; a small vocabulary makes words repeat in the window."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_positions, hidden_size, generator=generator, dtype=torch.float64).tanh().to(dtype)
    targets = torch.randint(vocab_size, (num_positions,), generator=generator)
    target_log_probs = (-5 * torch.rand(num_positions, generator=generator, dtype=torch.float64)).to(dtype)
    return hidden, targets, target_log_probs


# (N, window, chunk_size, bptt): N below, equal to, just above and far above the window; window 1;
# chunk sizes that do not divide the number of pointer positions, chunk_size 1; the reference's chunking.
CASES = [
    (1, 1, 1, None),
    (5, 8, 4, None),
    (8, 8, 3, None),
    (9, 8, 1024, None),
    (10, 8, 1, None),
    (40, 1, 7, None),
    (60, 4, 1, None),
    (257, 16, 50, None),
    (300, 7, 64, None),
    (300, 20, 1024, None),
    (200, 10, 33, 25),  # bptt > window: the first position of each later chunk uses the vocabulary alone
    (200, 30, 64, 20),  # bptt < window, as in the reference's WikiText-2 setting
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_positions, window, chunk_size, bptt", CASES)
@pytest.mark.parametrize("theta, lambdah", [(1.0, 0.1), (0.5, 0.6), (2.0, 1.0)])
def test_chunked_equals_reference(num_positions, window, chunk_size, bptt, dtype, theta, lambdah):
    hidden, targets, target_log_probs = random_stream(num_positions, 6, 4, dtype, seed=num_positions + window)
    expected = cache_pointer_ref(hidden, targets, target_log_probs, window, theta, lambdah, bptt=bptt)
    actual = cache_pointer(hidden, targets, target_log_probs, window, theta, lambdah, chunk_size=chunk_size, bptt=bptt)
    assert actual.shape == (num_positions,) and actual.dtype == dtype
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
    # Positions up to the window (and, with bptt, chunk starts) are scored by the vocabulary alone.
    alone = [g for g in range(num_positions) if g <= window or (bptt is not None and g % bptt == 0)]
    assert torch.equal(actual[alone], target_log_probs[alone])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lambda_zero_is_the_vocabulary_alone(dtype):
    hidden, targets, target_log_probs = random_stream(120, 5, 3, dtype)
    actual = cache_pointer(hidden, targets, target_log_probs, window=6, theta=1.0, lambdah=0.0, chunk_size=17)
    assert torch.equal(actual, target_log_probs)
    expected = cache_pointer_ref(hidden, targets, target_log_probs, window=6, theta=1.0, lambdah=0.0)
    torch.testing.assert_close(expected, target_log_probs, **TOLERANCE[dtype])


def test_lambda_one_is_the_pointer_alone():
    """With lambdah 1 the vocabulary drops out: -inf where no key in the window points at the target."""
    hidden, targets, target_log_probs = random_stream(150, 5, 8, torch.float64)
    actual = cache_pointer(hidden, targets, target_log_probs, window=5, theta=1.0, lambdah=1.0, chunk_size=32)
    expected = cache_pointer_ref(hidden, targets, target_log_probs, window=5, theta=1.0, lambdah=1.0)
    torch.testing.assert_close(actual, expected)
    scored = torch.arange(150) > 5
    assert torch.isneginf(actual[scored]).any() and torch.isfinite(actual[scored]).any()
    assert not torch.isnan(actual).any()
    assert (actual[scored] <= 0).all()


def hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N = 4, window = 2: only g = 3 may use the pointer, over the keys p = 1 and p = 2.

    <h_1, h_3> = log 3 and <h_2, h_3> = 0, so with theta = 1 the attention is (3/4, 1/4). The word after
    p = 1 is targets[1] = 7 and after p = 2 is targets[2] = 5.
    """
    hidden = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    targets = torch.tensor([7, 7, 5, 7])
    target_log_probs = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.5], dtype=torch.float64))
    return hidden, targets, target_log_probs


@pytest.mark.parametrize("function", [cache_pointer_ref, cache_pointer])
@pytest.mark.parametrize("target, pointer_mass", [(7, 0.75), (5, 0.25), (3, 0.0)])
def test_hand_computed_case(function, target, pointer_mass):
    hidden, targets, target_log_probs = hand_case()
    targets[3] = target
    lambdah = 0.2
    actual = function(hidden, targets, target_log_probs, 2, 1.0, lambdah)
    # g = 0, 1, 2 are not > window: the vocabulary alone, although g = 2 would see a full window.
    # g = 3: p = 0.2 * ptr + 0.8 * 0.5, i.e. 0.55 for 7, 0.45 for 5, 0.40 for a word not in the window.
    expected = torch.tensor([0.1, 0.2, 0.3, lambdah * pointer_mass + (1 - lambdah) * 0.5], dtype=torch.float64).log()
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("function", [cache_pointer_ref, cache_pointer])
@pytest.mark.parametrize("theta, attention_on_7", [
    (2.0, 0.9),  # softmax(2 log 3, 0) = (9, 1) / 10
    (0.5, math.sqrt(3) / (math.sqrt(3) + 1)),  # softmax(log 3 / 2, 0) = (sqrt 3, 1) / (sqrt 3 + 1)
    (0.0, 0.5),  # theta 0: a uniform attention over the window
])
@pytest.mark.parametrize("target", [7, 5])
def test_hand_computed_case_with_theta(function, theta, attention_on_7, target):
    """The same case with theta != 1: the scores log 3 and 0 are scaled by theta before the softmax."""
    hidden, targets, target_log_probs = hand_case()
    targets[3] = target
    lambdah = 0.2
    pointer_mass = attention_on_7 if target == 7 else 1 - attention_on_7
    actual = function(hidden, targets, target_log_probs, 2, theta, lambdah)
    expected = torch.tensor(lambdah * pointer_mass + (1 - lambdah) * 0.5, dtype=torch.float64).log()
    torch.testing.assert_close(actual[3], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(actual[:3], target_log_probs[:3], rtol=0, atol=0)


@pytest.mark.parametrize("function", [cache_pointer_ref, cache_pointer])
def test_chunk_start_uses_the_vocabulary_alone_with_bptt(function):
    """With bptt = 3 the reference's second chunk starts at g = 3 and scores it by the vocabulary alone."""
    hidden, targets, target_log_probs = hand_case()
    actual = function(hidden, targets, target_log_probs, 2, 1.0, 0.2, bptt=3)
    assert torch.equal(actual, target_log_probs)
    actual = function(hidden, targets, target_log_probs, 2, 1.0, 0.2, bptt=4)
    torch.testing.assert_close(actual[3], torch.tensor(0.55, dtype=torch.float64).log())


@pytest.mark.parametrize("function", [cache_pointer_ref, cache_pointer])
def test_cache_raises_a_recently_repeated_word(function):
    """A rare word (p_vocab = 1e-4) seen 3 positions back, from a near-identical state, becomes likely."""
    hidden, targets, _ = random_stream(80, 16, 1000, torch.float32, seed=3)
    target_log_probs = torch.full((80,), math.log(0.05))
    rare_word, position, earlier = 1000, 70, 67
    targets[earlier] = targets[position] = rare_word
    target_log_probs[position] = math.log(1e-4)
    hidden[position] = 4 * hidden[earlier]  # the query points at the key whose next word is the rare word
    lambdah = 0.1
    actual = function(hidden, targets, target_log_probs, 10, 1.0, lambdah)
    assert actual[position] > math.log(lambdah * 0.9)  # most of the pointer mass lands on the repeated word
    assert actual[position] - target_log_probs[position] > 6  # over 400 times more likely than without the cache


def test_positions_do_not_see_the_future():
    """Changing what comes after position g changes nothing at or before g."""
    hidden, targets, target_log_probs = random_stream(90, 4, 3, torch.float64)
    before = cache_pointer(hidden, targets, target_log_probs, window=7, theta=1.0, lambdah=0.3, chunk_size=16)
    changed_hidden, changed_targets, changed_log_probs = hidden.clone(), targets.clone(), target_log_probs.clone()
    changed_hidden[50:] = -changed_hidden[50:]
    changed_targets[50:] = (changed_targets[50:] + 1) % 3
    changed_log_probs[50:] -= 1
    after = cache_pointer(changed_hidden, changed_targets, changed_log_probs, 7, 1.0, 0.3, chunk_size=16)
    assert torch.equal(after[:50], before[:50])
    assert not torch.equal(after[50:], before[50:])


@pytest.mark.parametrize("function", [cache_pointer_ref, cache_pointer])
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(lambdah=-0.1), "lambdah"),
        (dict(lambdah=1.5), "lambdah"),
        (dict(lambdah=float("nan")), "lambdah"),
        (dict(window=0), "window"),
        (dict(window=2.5), "window"),
        (dict(theta=float("inf")), "theta"),
        (dict(bptt=0), "bptt"),
        (dict(hidden=torch.zeros(6)), "hidden"),
        (dict(hidden=torch.zeros(0, 3)), "hidden"),
        (dict(hidden=torch.zeros(6, 3, dtype=torch.long)), "hidden"),
        (dict(targets=torch.zeros(5, dtype=torch.long)), "targets"),
        (dict(targets=torch.zeros(6)), "targets"),
        (dict(target_log_probs=torch.zeros(6, 1)), "target_log_probs"),
        (dict(target_log_probs=torch.zeros(6, dtype=torch.long)), "target_log_probs"),
    ],
)
def test_bad_arguments_raise_value_error(function, change, message):
    arguments = dict(
        hidden=torch.zeros(6, 3), targets=torch.zeros(6, dtype=torch.long), target_log_probs=torch.zeros(6),
        window=2, theta=1.0, lambdah=0.1,
    )
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        function(**arguments)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.0])
def test_bad_chunk_size_raises_value_error(chunk_size):
    hidden, targets, target_log_probs = random_stream(6, 3, 3, torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        cache_pointer(hidden, targets, target_log_probs, 2, 1.0, 0.1, chunk_size=chunk_size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_equals_reference(dtype):
    hidden, targets, target_log_probs = random_stream(700, 32, 20, dtype)
    expected = cache_pointer_ref(hidden, targets, target_log_probs, 50, 1.0, 0.1, bptt=300)
    on_cuda = [tensor.cuda() for tensor in (hidden, targets, target_log_probs)]
    actual = cache_pointer(*on_cuda, 50, 1.0, 0.1, chunk_size=128, bptt=300)
    assert actual.device.type == "cuda"
    # TF32 may be on for CUDA matmuls; the scores are O(10), so allow for its 10-bit mantissa.
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(actual.cpu(), expected, **tolerance)
