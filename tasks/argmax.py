"""The argmax task of the published pytorch-dnc `argmax_task.py`: where in the sequence is the largest digit?

An example of length L is L digits, each uniform over 0 .. V-1 and shown one-hot in channels
0 .. V-1, then a query step with only channel V set (the published `-input_size 6` means
V = 5 digits and the query channel). At the query step, step L, the network names the position
(0 .. L-1) of the largest digit, the first one when it occurs more than once (NumPy's argmax):
a classification over `positions` classes, the longest length the task is ever asked about, so
that the same output layer serves the generalisation test on longer sequences. T = L + 1.

Loss: cross-entropy of the logits at the query step. Metric: `accuracy`, the fraction of
examples whose highest logit is the answer.

Shapes: T = max(L) + 1 steps, B examples, V digit values, P positions (classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tasks.curriculum import example_lengths


class Batch(NamedTuple):
    """inputs [T, B, V + 1]; targets [B] long, the answer positions; mask [T, B] bool, True at each
    example's query step; lengths [B] long, each example's L (T = max(L) + 1)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


def check_sizes(values: int, positions: int) -> None:
    if values < 2:
        raise ValueError(f"the argmax task needs at least 2 digit values (input_size at least 3), got {values}")
    if positions < 2:
        raise ValueError(f"the argmax task needs at least 2 positions, got {positions}")


def sample(batch_size: int, length: int | torch.Tensor, values: int = 5, positions: int = 40,
           generator: torch.Generator | None = None) -> Batch:
    """Draw a batch of argmax examples (on the generator's device, CPU by default).

    Args:
        batch_size: B.
        length: L for every example, or a [B] tensor of per-example lengths (shorter examples are
            padded at the end, after their query step).
        values: V, the number of digit values.
        positions: P, the number of answer classes; every L must be at most P.
        generator: the only source of randomness; the same state gives the same batch.

    Returns:
        Batch(inputs [T, B, V + 1], targets [B], mask [T, B], lengths [B]) with T = max(L) + 1.

    Raises:
        ValueError: batch_size < 1, a length < 2 or above `positions`, values < 2 or positions < 2.
    """
    check_sizes(values, positions)
    lengths = example_lengths(length, batch_size, min_length=2)
    if int(lengths.max()) > positions:
        raise ValueError(f"sequence length {int(lengths.max())} is above the {positions} positions this "
                         f"argmax task can name")
    device = generator.device if generator is not None else torch.device("cpu")
    B, longest = batch_size, int(lengths.max())
    lengths = lengths.to(device)
    steps = torch.arange(longest + 1, device=device)[:, None]  # [T, 1]
    digits = torch.randint(0, values, (longest, B), generator=generator, device=device)
    present = steps[:longest] < lengths  # [L, B]
    # The first largest digit has the highest digit * (L + 1) - step; padded steps never win.
    score = torch.where(present, digits * (longest + 1) - steps[:longest], -1)
    targets = score.argmax(dim=0)
    inputs = torch.zeros(longest + 1, B, values + 1, device=device)
    inputs[:longest] = F.one_hot(digits, values + 1).float() * present[..., None]
    inputs[lengths, torch.arange(B, device=device), values] = 1.0  # the query step
    mask = steps == lengths  # [T, B]
    return Batch(inputs, targets, mask, lengths)


def answer_logits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Each example's logits at its query step: [T, B, P] -> [B, P]."""
    return logits[batch.lengths, torch.arange(logits.size(1), device=logits.device)]


def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy at the query step; logits [T, B, P] (no softmax before it)."""
    return F.cross_entropy(answer_logits(logits, batch), batch.targets)


def metrics(logits: torch.Tensor, batch: Batch) -> dict[str, float]:
    """loss and accuracy, means over the batch."""
    answers = answer_logits(logits, batch)
    return {"loss": F.cross_entropy(answers, batch.targets).item(),
            "accuracy": (answers.argmax(dim=-1) == batch.targets).float().mean().item()}


def to_human_readable(batch: Batch, logits: torch.Tensor | None = None, index: int = 0) -> str:
    """One example: its digits, the answer position and, given logits, the predicted one."""
    length = int(batch.lengths[index])
    values = batch.inputs.size(-1) - 1
    digits = batch.inputs[:length, index, :values].argmax(dim=-1).tolist()
    line = f"digits {' '.join(map(str, digits))}: largest first at position {int(batch.targets[index])}"
    if logits is not None:
        line += f"; output {int(answer_logits(logits, batch)[index].argmax())}"
    return line


@dataclass(frozen=True)
class ArgmaxTask:
    """The task as the sequence-task loop uses it (see tasks.protocol.SequenceTask)."""

    values: int = 5
    positions: int = 40
    min_length = 2
    metric = "accuracy"
    higher_is_better = True

    def __post_init__(self) -> None:
        check_sizes(self.values, self.positions)

    @property
    def input_size(self) -> int:
        return self.values + 1

    @property
    def output_size(self) -> int:
        return self.positions

    @property
    def max_length(self) -> int:
        return self.positions

    def sample(self, batch_size: int, length: int | torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        return sample(batch_size, length, self.values, self.positions, generator)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return loss(logits, batch)

    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        return metrics(logits, batch)

    def to_human_readable(self, batch: Batch, logits: torch.Tensor | None = None, index: int = 0) -> str:
        return to_human_readable(batch, logits, index)
