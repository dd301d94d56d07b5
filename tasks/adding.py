"""The adding problem (Hochreiter & Schmidhuber 1997, experiment 4, in the form of Le et al. 2015).

An example of length L has L steps of two channels: a value drawn uniformly from [0, 1), and a
marker that is 1 at exactly two steps, one in the first half (steps 0 .. L//2 - 1) and one in
the second (L//2 .. L-1), and 0 elsewhere. At the last step the network outputs the sum of the
two marked values: a regression with one output, read at step L - 1 only (`mask`).

Loss: the mean squared error at the answer step. Metrics: `mse`, and `accuracy`, the fraction
of examples answered within 0.04 of the sum (Hochreiter & Schmidhuber's criterion for a
solved example). For scale: always answering 1, the mean of the sum, gives an MSE of 1/6
(the variance of the sum of two uniform values), and 7.8 % of examples within 0.04.

The DNC tasks train on lengths up to ~100 and test their generalisation up to ~1000.

Shapes: T = max(L) steps, B examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from tasks.curriculum import example_lengths

TOLERANCE = 0.04  # an answer within this of the sum counts as right


class Batch(NamedTuple):
    """inputs [T, B, 2] (value, marker); targets [B] float, the sums; mask [T, B] bool, True at each
    example's last step (its answer); lengths [B] long, each example's L (T = max(L))."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


def sample(batch_size: int, length: int | torch.Tensor, generator: torch.Generator | None = None) -> Batch:
    """Draw a batch of adding examples (on the generator's device, CPU by default).

    Args:
        batch_size: B.
        length: L for every example, or a [B] tensor of per-example lengths (shorter examples are
            padded at the end with zero steps, after their answer).
        generator: the only source of randomness; the same state gives the same batch.

    Returns:
        Batch(inputs [T, B, 2], targets [B], mask [T, B], lengths [B]) with T = max(L).

    Raises:
        ValueError: batch_size < 1 or a length < 2.
    """
    lengths = example_lengths(length, batch_size, min_length=2)
    device = generator.device if generator is not None else torch.device("cpu")
    B, T = batch_size, int(lengths.max())
    lengths = lengths.to(device)
    examples = torch.arange(B, device=device)
    steps = torch.arange(T, device=device)[:, None]  # [T, 1]
    values = torch.rand(T, B, generator=generator, device=device) * (steps < lengths)  # zero past each L
    half = lengths // 2
    first = (torch.rand(B, generator=generator, device=device) * half).long()  # uniform in [0, L//2)
    second = half + (torch.rand(B, generator=generator, device=device) * (lengths - half)).long()  # [L//2, L)
    markers = torch.zeros(T, B, device=device)
    markers[first, examples] = 1.0
    markers[second, examples] = 1.0
    targets = values[first, examples] + values[second, examples]
    mask = steps == lengths - 1  # [T, B]
    return Batch(torch.stack([values, markers], dim=-1), targets, mask, lengths)


def answers(outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Each example's output at its answer step: outputs [T, B, 1] -> [B]."""
    return outputs[batch.lengths - 1, torch.arange(outputs.size(1), device=outputs.device), 0]


def loss(outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean squared error of the answers; outputs [T, B, 1]."""
    return (answers(outputs, batch) - batch.targets).pow(2).mean()


def metrics(outputs: torch.Tensor, batch: Batch) -> dict[str, float]:
    """loss (= mse) and accuracy (fraction within TOLERANCE), means over the batch."""
    error = answers(outputs, batch) - batch.targets
    mse = error.pow(2).mean().item()
    return {"loss": mse, "mse": mse, "accuracy": (error.abs() < TOLERANCE).float().mean().item()}


def to_human_readable(batch: Batch, outputs: torch.Tensor | None = None, index: int = 0) -> str:
    """One example: its length, the two marked values with their steps, the sum and, given outputs, the answer."""
    length = int(batch.lengths[index])
    values, markers = batch.inputs[:length, index].unbind(-1)
    marked = markers.nonzero().flatten().tolist()
    terms = " + ".join(f"{values[step].item():.3f} (step {step})" for step in marked)
    line = f"length {length}: {terms} = {batch.targets[index].item():.3f}"
    if outputs is not None:
        line += f"; output {answers(outputs, batch)[index].item():.3f}"
    return line


@dataclass(frozen=True)
class AddingTask:
    """The task as the sequence-task loop uses it (see task_training.SequenceTask)."""

    input_size = 2
    output_size = 1
    min_length = 2
    max_length = None
    metric = "mse"
    higher_is_better = False

    def sample(self, batch_size: int, length: int | torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        return sample(batch_size, length, generator)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return loss(outputs, batch)

    def metrics(self, outputs: torch.Tensor, batch: Batch) -> dict[str, float]:
        return metrics(outputs, batch)

    def to_human_readable(self, batch: Batch, outputs: torch.Tensor | None = None, index: int = 0) -> str:
        return to_human_readable(batch, outputs, index)
