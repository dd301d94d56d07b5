"""The adding task in two variants: the published pytorch-dnc one (digits) and Hochreiter & Schmidhuber's.

**published** (`DigitAddingTask`, the default of adding_task.py; pytorch-dnc `tasks/adding_task.py`):
an example of length L is L digits, each uniform over 0 .. V-1 and shown one-hot in channels
0 .. V-1, then an end step with only channel V set (the published `-input_size 6` means V = 5
digit values and the end channel). T = L + 1. The network's outputs are decoded and summed: each
step's output is decoded as the sum of its channels, and the answer is the sum of those over the
example's L + 1 steps (`mask`), to match the sum of the L digits. Loss: the squared error of that
answer (mean over the batch), as published. Metrics: `loss`, `abs_error` (the mean absolute
error of the answer) and `exact` (the fraction of examples whose answer rounds to the sum). For
scale, with V = 5: answering the expected sum 2L gives an absolute error of about 1.13 sqrt(L)
(11.3 at L = 100, 36 at L = 1000) and 2.8 % exact sums at L = 100 (0.9 % at 1000). A net that
outputs each digit at its own step solves any length, so the longer tests measure how small
per-step errors add up. Unlike the published script, which trains on one example per iteration
(its later version repeats that example over the batch), a batch here holds B independent examples.

**standard** (`AddingTask`; Hochreiter & Schmidhuber 1997, experiment 4, in the form of Le et al.
2015): an example of length L has L steps of two channels: a value drawn uniformly from [0, 1), and a
marker that is 1 at exactly two steps, one in the first half (steps 0 .. L//2 - 1) and one in
the second (L//2 .. L-1), and 0 elsewhere. At the last step the network outputs the sum of the
two marked values: a regression with one output, read at step L - 1 only (`mask`).
Loss: the mean squared error at the answer step. Metrics: `mse`, and `accuracy`, the fraction
of examples answered within 0.04 of the sum (Hochreiter & Schmidhuber's criterion for a
solved example). For scale: always answering 1, the mean of the sum, gives an MSE of 1/6
(the variance of the sum of two uniform values), and 7.8 % of examples within 0.04.

The DNC tasks train on lengths up to ~100 and test their generalisation up to ~1000.

Shapes: T steps, B examples, V digit values, K output channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tasks.curriculum import example_lengths

# --------------------------------------------------------------------------- the standard variant (values, markers)

TOLERANCE = 0.04  # an answer within this of the sum counts as right


class Batch(NamedTuple):
    """inputs [T, B, 2] (value, marker); targets [B] float, the sums; mask [T, B] bool, True at each
    example's last step (its answer); lengths [B] long, each example's L (T = max(L))."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


def sample(batch_size: int, length: int | torch.Tensor, generator: torch.Generator | None = None) -> Batch:
    """Draw a batch of standard adding examples (on the generator's device, CPU by default).

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
    """The standard variant as the sequence-task loop uses it (see tasks.protocol.SequenceTask)."""

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


# --------------------------------------------------------------------------- the published variant (digits)

SHOWN_DIGITS = 20  # to_human_readable lists at most this many digits


class DigitBatch(NamedTuple):
    """inputs [T, B, V + 1]; targets [B] float, the sums of the digits; mask [T, B] bool, True on each
    example's L digit steps and its end step (the steps whose outputs are summed); lengths [B] long,
    each example's L (T = max(L) + 1)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


def check_values(values: int) -> None:
    if values < 2:
        raise ValueError(f"the published adding task needs at least 2 digit values (-input_size at least 3), "
                         f"got {values}")


def sample_digits(batch_size: int, length: int | torch.Tensor, values: int = 5,
                  generator: torch.Generator | None = None) -> DigitBatch:
    """Draw a batch of published adding examples (on the generator's device, CPU by default).

    Args:
        batch_size: B.
        length: L for every example, or a [B] tensor of per-example lengths (shorter examples are
            padded at the end with zero steps, after their end step).
        values: V, the number of digit values (0 .. V-1).
        generator: the only source of randomness; the same state gives the same batch.

    Returns:
        DigitBatch(inputs [T, B, V + 1], targets [B], mask [T, B], lengths [B]) with T = max(L) + 1.

    Raises:
        ValueError: batch_size < 1, a length < 2 or values < 2.
    """
    check_values(values)
    lengths = example_lengths(length, batch_size, min_length=2)
    device = generator.device if generator is not None else torch.device("cpu")
    B, longest = batch_size, int(lengths.max())
    lengths = lengths.to(device)
    steps = torch.arange(longest + 1, device=device)[:, None]  # [T, 1]
    present = steps[:longest] < lengths  # [L, B]: the digit steps of each example
    digits = torch.randint(0, values, (longest, B), generator=generator, device=device) * present
    inputs = torch.zeros(longest + 1, B, values + 1, device=device)
    inputs[:longest] = F.one_hot(digits, values + 1).float() * present[..., None]
    inputs[lengths, torch.arange(B, device=device), values] = 1.0  # the end step
    return DigitBatch(inputs, digits.sum(dim=0).float(), steps <= lengths, lengths)


def decoded_sums(outputs: torch.Tensor, batch: DigitBatch) -> torch.Tensor:
    """The answers: each step's output decoded as the sum of its channels, summed over the example's
    steps (padding left out); outputs [T, B, K] -> [B]."""
    return outputs.sum(dim=-1).masked_fill(~batch.mask, 0.0).sum(dim=0)


def digit_loss(outputs: torch.Tensor, batch: DigitBatch) -> torch.Tensor:
    """Squared error of the decoded sums, mean over the batch; outputs [T, B, K]."""
    return (decoded_sums(outputs, batch) - batch.targets).pow(2).mean()


def digit_metrics(outputs: torch.Tensor, batch: DigitBatch) -> dict[str, float]:
    """loss (squared error), abs_error and exact (fraction of answers that round to the sum), means over the batch."""
    answers = decoded_sums(outputs, batch)
    error = answers - batch.targets
    return {"loss": error.pow(2).mean().item(), "abs_error": error.abs().mean().item(),
            "exact": (answers.round() == batch.targets).float().mean().item()}


def digits_to_human_readable(batch: DigitBatch, outputs: torch.Tensor | None = None, index: int = 0) -> str:
    """One example: its length, its digits (the first SHOWN_DIGITS), the sum and, given outputs, the answer."""
    length = int(batch.lengths[index])
    values = batch.inputs.size(-1) - 1
    digits = batch.inputs[:length, index, :values].argmax(dim=-1).tolist()
    terms = " + ".join(map(str, digits[:SHOWN_DIGITS])) + (f" + ... ({length - SHOWN_DIGITS} more)"
                                                            if length > SHOWN_DIGITS else "")
    line = f"length {length}: {terms} = {int(batch.targets[index])}"
    if outputs is not None:
        line += f"; output {decoded_sums(outputs, batch)[index].item():.2f}"
    return line


@dataclass(frozen=True)
class DigitAddingTask:
    """The published variant as the sequence-task loop uses it (see tasks.protocol.SequenceTask).

    Outputs have the input's V + 1 channels, as the published DNC's do; only their sum counts.
    """

    values: int = 5
    min_length = 2
    max_length = None
    metric = "abs_error"
    higher_is_better = False

    def __post_init__(self) -> None:
        check_values(self.values)

    @property
    def input_size(self) -> int:
        return self.values + 1

    @property
    def output_size(self) -> int:
        return self.values + 1

    def sample(self, batch_size: int, length: int | torch.Tensor,
               generator: torch.Generator | None = None) -> DigitBatch:
        return sample_digits(batch_size, length, self.values, generator)

    def loss(self, outputs: torch.Tensor, batch: DigitBatch) -> torch.Tensor:
        return digit_loss(outputs, batch)

    def metrics(self, outputs: torch.Tensor, batch: DigitBatch) -> dict[str, float]:
        return digit_metrics(outputs, batch)

    def to_human_readable(self, batch: DigitBatch, outputs: torch.Tensor | None = None, index: int = 0) -> str:
        return digits_to_human_readable(batch, outputs, index)
