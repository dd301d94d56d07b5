"""The AWD-LSTM regularisers (Merity et al. 2017), as plain functions.

- `locked_dropout`: variational dropout, one mask per sequence shared over time (section 4.2).
- `embedding_dropout`: drops whole word types from the embedding matrix (section 4.3).
- `weight_dropped`: DropConnect on a weight tensor (section 2); the AWD core passes the
  dropped weight to its RNN through `torch.func.functional_call`, so parameters are never
  replaced on the module and train/eval switches, `state_dict`, `.to()` and DDP keep working.

Shapes: `T` time steps, `B` batch, `D` features, `V` vocabulary, `E` embedding size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_probability(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Variational dropout: one Bernoulli mask per (batch, feature), the same at every step.

    Args:
        x: [T, B, D].
        p: drop probability; kept units are scaled by 1 / (1 - p).
        training: identity when False.

    Returns:
        [T, B, D].
    """
    _check_probability(p)
    if not training or p == 0:
        return x
    mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p) / (1 - p)  # [1, B, D], broadcast over T
    return x * mask


def embedding_dropout(weight: torch.Tensor, tokens: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Look up `tokens` in `weight` with whole word types dropped (every occurrence of a word alike).

    Args:
        weight: the embedding matrix [V, E].
        tokens: LongTensor [T, B].
        p: probability of dropping a word type; kept rows are scaled by 1 / (1 - p).
        training: plain lookup when False.

    Returns:
        [T, B, E].
    """
    _check_probability(p)
    if training and p > 0:
        mask = weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)  # [V, 1]
        weight = weight * mask
    return F.embedding(tokens, weight)


def weight_dropped(weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """DropConnect: `weight` with each entry zeroed with probability p (scaled by 1 / (1 - p))."""
    _check_probability(p)
    return F.dropout(weight, p, training)
