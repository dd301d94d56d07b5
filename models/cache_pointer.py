"""Continuous cache pointer (Grave et al. 2016) as AWD-LSTM's `pointer.py` evaluates it.

Grave et al., "Improving Neural Language Models with a Continuous Cache" (section "Neural cache model"):
the cache stores, for earlier positions p, the key h_p (the last recurrent layer's output at p; in
`pointer.py`, `rnn_outs[-1]` of `model(..., return_h=True)`, taken before the output dropout, which is
off in evaluation) and the word that followed it, w_{p+1}. At position g, with query h_g and the
model's next-word distribution p_vocab(. | g), over the positions p in [g - window, g):

    a_p    = softmax_p(theta * <h_p, h_g>)                        attention over the window
    ptr(w) = sum of a_p over those p with w_{p+1} = w             cache distribution
    p(w)   = lambdah * ptr(w) + (1 - lambdah) * p_vocab(w | g)     linear interpolation

Positions g <= window use p_vocab alone (the reference's `if start_idx + idx > window`), so when the
pointer is used its window is always full: exactly `window` keys. Evaluation runs over the token
stream with batch size 1; the loss is the mean of -log p(w_{g+1}) over the positions.

Two functions with one signature (section 5 of STYLE.md): `cache_pointer_ref`, a per-token loop in
float64 that is the specification, and `cache_pointer`, which handles T queries at a time with one
[T, window + T - 1] score matrix against the keys they can see, masked to each query's band. Neither
builds a one-hot history or any tensor of vocabulary size: the pointer mass on the target is the
attention summed over keys whose next word equals the query's target.

Checked against salesforce/awd-lstm-lm `pointer.py` (its `evaluate`, the version with `--model` and
validation-set evaluation, and its first commit); differences from the description above:

- Scores are raw dot products <h_p, h_g>. The repository's first commit divided them by both norms
  (cosine similarity); later versions removed that, and those are what is reproduced here.
- Chunk boundaries. `pointer.py` runs the model over chunks of `--bptt` tokens and tests
  `start_idx + idx > window`, where `start_idx` is the length of the history kept from earlier chunks
  (at most `window`) and `idx` the position within the chunk. Once `window` tokens have been seen, that
  test is false at `idx = 0`, so the first token of every later chunk is scored by p_vocab alone even
  though its window is full: the reference uses the pointer at g iff `g > window and g % bptt != 0`.
  Pass `bptt` to reproduce that exactly; the default `bptt=None` (one chunk holding the whole stream)
  gives `g > window`, the same as the reference with `--bptt` at least the stream's length. On PTB's
  validation set (73,760 tokens) with `--bptt 5000` it concerns 14 positions, g = 5000, 10000, ..., 70000
  (the reference's README says `--bptt` does not change the result; at these positions it does).
- The mean. `pointer.py` divides the summed -log p by `len(data_source)`, the number of tokens N + 1,
  not by the N scored positions. These functions return per-position log-probabilities; the caller
  takes the mean (divide by N for the loss as described above).
- Precision. The reference mixes float32 probabilities and takes their log; `cache_pointer` mixes in
  log space (`logaddexp`), so lambdah = 0 returns `target_log_probs` exactly and a vocabulary
  probability below float32's range does not round to 0. Its attention is a float32 softmax, as the
  reference's: keys weighing under about 1e-38 of the heaviest one count as 0.

Shapes: `N` positions (tokens scored), `D` hidden size, `T` queries in a chunk, `K` keys a chunk sees.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def _check_arguments(
    hidden: Tensor,
    targets: Tensor,
    target_log_probs: Tensor,
    window: int,
    lambdah: float,
    theta: float,
    bptt: int | None,
) -> None:
    """Raise ValueError naming the first bad argument."""
    if hidden.dim() != 2 or hidden.size(0) < 1 or hidden.size(1) < 1:
        raise ValueError(f"hidden must have shape [N, D] with N, D >= 1, got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point tensor, got dtype {hidden.dtype}")
    num_positions = hidden.size(0)
    if targets.shape != (num_positions,):
        raise ValueError(
            f"targets must have shape [N] = ({num_positions},) to match hidden, got shape {tuple(targets.shape)}"
        )
    if targets.dtype != torch.long:
        raise ValueError(f"targets must be word ids of dtype torch.long, got dtype {targets.dtype}")
    if target_log_probs.shape != (num_positions,):
        raise ValueError(
            f"target_log_probs must have shape [N] = ({num_positions},) to match hidden, "
            f"got shape {tuple(target_log_probs.shape)}"
        )
    if not target_log_probs.is_floating_point():
        raise ValueError(f"target_log_probs must be a floating-point tensor, got dtype {target_log_probs.dtype}")
    if not (targets.device == hidden.device == target_log_probs.device):
        raise ValueError(
            f"hidden, targets and target_log_probs must be on one device, got {hidden.device}, "
            f"{targets.device} and {target_log_probs.device}"
        )
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if not 0.0 <= lambdah <= 1.0:
        raise ValueError(f"lambdah must lie in [0, 1], got {lambdah!r}")
    if not math.isfinite(theta):
        raise ValueError(f"theta must be finite, got {theta!r}")
    if bptt is not None and (isinstance(bptt, bool) or not isinstance(bptt, numbers.Integral) or bptt < 1):
        raise ValueError(f"bptt must be None or an integer >= 1, got {bptt!r}")


def _uses_pointer(position: int, window: int, bptt: int | None) -> bool:
    """Whether the reference mixes the pointer in at `position` (see the module docstring on chunks)."""
    return position > window and (bptt is None or position % bptt != 0)


def _result_dtype(hidden: Tensor, target_log_probs: Tensor) -> torch.dtype:
    """At least float32, so that half-precision inputs are not scored in half precision."""
    return torch.promote_types(torch.promote_types(hidden.dtype, target_log_probs.dtype), torch.float32)


def cache_pointer_ref(
    hidden: Tensor,
    targets: Tensor,
    target_log_probs: Tensor,
    window: int,
    theta: float,
    lambdah: float,
    bptt: int | None = None,
) -> Tensor:
    """Log-probability of each target under the cache-mixed distribution: the specification, one position at a time.

    Args:
        hidden: [N, D] float, the last recurrent layer's output at each position (query and key).
        targets: [N] long, targets[g] = w_{g+1}, the word that follows position g.
        target_log_probs: [N] float, log p_vocab(targets[g] | g).
        window: number of earlier positions the cache holds, >= 1.
        theta: inverse temperature of the attention over the cache.
        lambdah: weight of the pointer distribution in the mixture, in [0, 1].
        bptt: None for `g > window`; the reference's `--bptt` to also score the first position of
            each later chunk by the vocabulary alone, as it does (see the module docstring).

    Returns:
        [N] log p(targets[g]) for every position g, computed in float64 and returned in the promoted
        dtype of `hidden` and `target_log_probs` (at least float32).

    Raises:
        ValueError: if an argument has a bad value, shape, dtype or device.
    """
    _check_arguments(hidden, targets, target_log_probs, window, lambdah, theta, bptt)
    keys = hidden.double()
    log_probs = target_log_probs.double().clone()
    for position in range(hidden.size(0)):
        if not _uses_pointer(position, window, bptt):
            continue
        cached = slice(position - window, position)
        attention = torch.softmax(theta * (keys[cached] @ keys[position]), dim=0)  # [window]
        pointer_mass = attention[targets[cached] == targets[position]].sum()
        vocab_prob = target_log_probs[position].double().exp()
        log_probs[position] = torch.log(lambdah * pointer_mass + (1.0 - lambdah) * vocab_prob)
    return log_probs.to(_result_dtype(hidden, target_log_probs))


def cache_pointer(
    hidden: Tensor,
    targets: Tensor,
    target_log_probs: Tensor,
    window: int,
    theta: float,
    lambdah: float,
    chunk_size: int = 128,
    bptt: int | None = None,
) -> Tensor:
    """Log-probability of each target under the cache-mixed distribution, `chunk_size` queries at a time.

    Same result as `cache_pointer_ref`. For the queries g in [start, end) of a chunk (only g > window
    can use the pointer, so the first chunk starts at window + 1), the keys are the positions
    [start - window, end - 1); query i sees keys j with i <= j < i + window, a band of exactly `window`
    keys. Memory per chunk is O(chunk_size * (window + chunk_size)), independent of the vocabulary.

    Args:
        hidden: [N, D] float, the last recurrent layer's output at each position (query and key).
        targets: [N] long, targets[g] = w_{g+1}, the word that follows position g.
        target_log_probs: [N] float, log p_vocab(targets[g] | g).
        window: number of earlier positions the cache holds, >= 1.
        theta: inverse temperature of the attention over the cache.
        lambdah: weight of the pointer distribution in the mixture, in [0, 1].
        chunk_size: queries per score matrix, >= 1. Each query pays for window + chunk_size - 1
            scores, so on CPU chunks well below the window are fastest (at window 500, D 400, one
            thread: 128 about 3 times faster than 1024; see bench/bench_cache_pointer.py).
        bptt: None for `g > window`; the reference's `--bptt` to also score the first position of
            each later chunk by the vocabulary alone, as it does (see the module docstring).

    Returns:
        [N] log p(targets[g]) for every position g, in the promoted dtype of `hidden` and
        `target_log_probs` (at least float32), on their device.

    Raises:
        ValueError: if an argument has a bad value, shape, dtype or device.
    """
    _check_arguments(hidden, targets, target_log_probs, window, lambdah, theta, bptt)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    dtype = _result_dtype(hidden, target_log_probs)
    device = hidden.device
    num_positions = hidden.size(0)
    hidden = hidden.to(dtype)
    log_probs = target_log_probs.to(dtype).clone()
    first_query = window + 1
    if num_positions <= first_query:
        return log_probs

    log_lambda = math.log(lambdah) if lambdah > 0.0 else -math.inf
    log_one_minus_lambda = math.log1p(-lambdah) if lambdah < 1.0 else -math.inf
    # The band depends only on (query row, key column), so one mask serves every chunk: key column j
    # of query row i is position start - window + j, visible iff it lies in [g - window, g), g = start + i.
    largest_chunk = min(chunk_size, num_positions - first_query)
    offsets = (
        torch.arange(largest_chunk + window - 1, device=device)[None, :]
        - torch.arange(largest_chunk, device=device)[:, None]
    )  # [T, K]: key column minus query row
    outside_band = (offsets < 0) | (offsets >= window)  # [T, K]

    for start in range(first_query, num_positions, chunk_size):
        end = min(start + chunk_size, num_positions)
        num_queries = end - start
        num_keys = num_queries + window - 1
        queries = hidden[start:end] * theta  # [T, D]
        keys = hidden[start - window : end - 1]  # [K, D]
        key_next_words = targets[start - window : end - 1]  # [K]
        query_targets = targets[start:end]  # [T]

        # Attention a_p = softmax over the band of theta * <h_p, h_g>, as a stable softmax whose
        # numerator is kept unnormalised so the target's mass comes from the same exponentials.
        scores = queries @ keys.T  # [T, D] @ [D, K] -> [T, K]
        scores.masked_fill_(outside_band[:num_queries, :num_keys], -math.inf)
        weights = (scores - scores.amax(dim=1, keepdim=True)).exp_()  # [T, K], 0 outside the band
        total_weight = weights.sum(dim=1)  # [T], >= 1: the band's largest score contributes exp(0)
        points_at_target = key_next_words[None, :] == query_targets[:, None]  # [T, K]
        target_weight = weights.masked_fill_(~points_at_target, 0.0).sum(dim=1)  # [T]
        log_pointer = target_weight.log() - total_weight.log()  # [T], -inf where no key points at the target

        # p = lambdah * ptr + (1 - lambdah) * p_vocab, in log space.
        vocab = log_probs[start:end]
        mixed = torch.logaddexp(log_lambda + log_pointer, log_one_minus_lambda + vocab)
        if bptt is not None:
            chunk_starts = torch.arange(start, end, device=device) % bptt == 0  # [T]
            mixed = torch.where(chunk_starts, vocab, mixed)
        log_probs[start:end] = mixed
    return log_probs
