"""The N-th farthest task of Santoro et al. 2018 ("Relational recurrent neural networks", section 4.1).

An example is `k` random vectors of size `d`, shown one per step, each tagged with a label
(a random permutation of 0..k-1). Every step also shows two question numbers, N and M, both
drawn uniformly from 0..k-1. The answer is the label of the N-th farthest vector, in
Euclidean distance, from the vector labelled M:

- N counts from 0: N = 0 asks for the farthest vector, N = k - 2 for the nearest other one,
  and N = k - 1 for vector M itself (its distance to itself is 0, so it is always last).
- M is a label, not a position: the reference is the vector whose label is M, so the model
  has to bind labels to vectors, as in the paper.

Step t's features are `[vector_t (d) | one_hot(label_t) (k) | one_hot(N) (k) | one_hot(M) (k)]`,
so F = d + 3k (40 for the paper's 8 vectors of size 16). Vectors are uniform in [-1, 1].
The answer is read after the last step, so the task has one class label per example and no
mask (`Batch.mask` is None: every example counts, with one prediction each).

Shapes: T = k steps, B examples, F = d + 3k features, K = k classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Batch(NamedTuple):
    """A batch of examples.

    inputs: [T, B, F] float; targets: [B] long (the answer's label); mask: None (one answer per
    example, all counted; tasks with per-step outputs use a [T, B] mask here).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor | None = None


def check_sizes(num_vectors: int, vector_size: int) -> None:
    if num_vectors < 2:
        raise ValueError(f"num_vectors must be at least 2, got {num_vectors}")
    if vector_size < 1:
        raise ValueError(f"vector_size must be positive, got {vector_size}")


def feature_size(num_vectors: int, vector_size: int) -> int:
    """F = d + 3k: the vector, its label, N and M as one-hots."""
    return vector_size + 3 * num_vectors


def nth_farthest_answers(
    vectors: torch.Tensor, labels: torch.Tensor, n: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """The label of the n-th farthest vector from the vector labelled m, per example.

    Args:
        vectors: [B, k, d]; labels: [B, k], each row a permutation of 0..k-1; n, m: [B].

    Returns:
        [B] long labels.
    """
    rows = torch.arange(vectors.size(0), device=vectors.device)
    reference_position = (labels == m[:, None]).int().argmax(dim=1)  # [B]
    reference = vectors[rows, reference_position]  # [B, d]
    distances = torch.linalg.vector_norm(vectors - reference[:, None, :], dim=-1)  # [B, k]
    farthest_first = torch.argsort(distances, dim=1, descending=True, stable=True)  # [B, k] positions
    return labels[rows, farthest_first[rows, n]]


def sample(
    batch_size: int, num_vectors: int = 8, vector_size: int = 16, generator: torch.Generator | None = None
) -> Batch:
    """Draw a batch of N-th farthest examples (on the generator's device, CPU by default).

    Args:
        batch_size: B.
        num_vectors: k, the number of vectors, steps and classes.
        vector_size: d.
        generator: the only source of randomness; the same state gives the same batch.

    Returns:
        Batch(inputs [k, B, d + 3k], targets [B], mask None).

    Raises:
        ValueError: batch_size < 1, num_vectors < 2 or vector_size < 1.
    """
    check_sizes(num_vectors, vector_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    k, d, B = num_vectors, vector_size, batch_size
    device = generator.device if generator is not None else torch.device("cpu")
    vectors = torch.rand(B, k, d, generator=generator, device=device) * 2 - 1  # uniform in [-1, 1)
    labels = torch.argsort(torch.rand(B, k, generator=generator, device=device), dim=1)  # random permutations
    n = torch.randint(0, k, (B,), generator=generator, device=device)
    m = torch.randint(0, k, (B,), generator=generator, device=device)
    targets = nth_farthest_answers(vectors, labels, n, m)
    question = torch.cat([F.one_hot(n, k), F.one_hot(m, k)], dim=-1)  # [B, 2k], the same at every step
    inputs = torch.cat(
        [vectors, F.one_hot(labels, k).float(), question[:, None, :].expand(B, k, 2 * k).float()], dim=-1
    )  # [B, k, F]
    return Batch(inputs.transpose(0, 1).contiguous(), targets)  # [B, T, F] -> [T, B, F]


def loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of unnormalised logits [B, K] against targets [B] (no softmax before it)."""
    return F.cross_entropy(logits, targets, reduction=reduction)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of examples whose highest logit is the answer; logits [B, K], targets [B]."""
    return (logits.argmax(dim=-1) == targets).float().mean().item()


def to_human_readable(batch: Batch, index: int = 0, num_vectors: int | None = None) -> str:
    """One example of a batch as text: the question, each step's vector and label, and the answer."""
    inputs = batch.inputs[:, index].cpu()  # [T, F]
    k = num_vectors or inputs.size(0)
    d = inputs.size(1) - 3 * k
    vectors, labels, n, m = torch.split(inputs, [d, k, k, k], dim=-1)
    n_value, m_value = int(n[0].argmax()), int(m[0].argmax())
    answer = int(batch.targets[index])
    lines = [f"N = {n_value}, M = {m_value}: the label of the {n_value}-th farthest vector (0 = farthest) "
             f"from the vector labelled {m_value}"]
    for step in range(inputs.size(0)):
        label = int(labels[step].argmax())
        values = " ".join(f"{value:+.2f}" for value in vectors[step].tolist())
        marks = (" <- M" if label == m_value else "") + (" <- answer" if label == answer else "")
        lines.append(f"  step {step}: label {label} [{values}]{marks}")
    lines.append(f"answer: {answer}")
    return "\n".join(lines)


@dataclass(frozen=True)
class NthFarthest:
    """The task as the task loop uses it: sizes, `sample`, `loss` and `accuracy` over a Batch."""

    num_vectors: int = 8
    vector_size: int = 16

    def __post_init__(self) -> None:
        check_sizes(self.num_vectors, self.vector_size)

    @property
    def input_size(self) -> int:
        return feature_size(self.num_vectors, self.vector_size)

    @property
    def output_size(self) -> int:
        return self.num_vectors

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        return sample(batch_size, self.num_vectors, self.vector_size, generator)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return loss(logits, batch.targets)

    def accuracy(self, logits: torch.Tensor, batch: Batch) -> float:
        return accuracy(logits, batch.targets)

    def to_human_readable(self, batch: Batch, index: int = 0) -> str:
        return to_human_readable(batch, index, self.num_vectors)
