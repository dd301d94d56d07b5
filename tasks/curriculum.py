"""The sequence-length curriculum of the DNC tasks, and the per-example lengths their generators take.

The published copy task draws each batch's length uniformly from 1 to a maximum that grows by
`-curriculum_increment` every `-curriculum_freq` iterations; `Curriculum` is that rule, shared by
copy_task.py, adding_task.py and argmax_task.py. Its only state is the current maximum, which
the task loop saves in checkpoints (`state_dict`), so a resumed run goes on at the same length.

The generators take either one length for the whole batch (training, as published: no
padding) or a length per example (the fixed test sets, which cover every length evenly in
batches of any size). Examples shorter than the batch's longest are padded at the end;
since the models are causal, padding after an example's answer cannot change that answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Curriculum:
    """Lengths from `min_length` to `max_length`; `max_length` grows by `increment` every `every` iterations.

    `limit` caps the growth (a task that answers with a position can only name so many).
    """

    max_length: int
    increment: int = 0
    every: int = 1000
    min_length: int = 1
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.min_length < 1:
            raise ValueError(f"the shortest sequence must have at least 1 step, got {self.min_length}")
        if self.max_length < self.min_length:
            raise ValueError(f"sequence_max_length must be at least {self.min_length} for this task, "
                             f"got {self.max_length}")
        if self.increment < 0:
            raise ValueError(f"curriculum_increment must be at least 0, got {self.increment}")
        if self.every < 1:
            raise ValueError(f"curriculum_freq must be positive, got {self.every}")
        if self.limit is not None and self.max_length > self.limit:
            raise ValueError(f"sequence_max_length {self.max_length} is above this task's limit of {self.limit}")

    def sample_length(self, generator: torch.Generator) -> int:
        """A length drawn uniformly from min_length..max_length (both included)."""
        return int(torch.randint(self.min_length, self.max_length + 1, (1,), generator=generator))

    def update(self, step: int) -> bool:
        """Call after iteration `step` (counted from 1; 0 does nothing); returns whether the maximum grew."""
        if self.increment == 0 or step == 0 or step % self.every != 0:
            return False
        grown = self.max_length + self.increment
        if self.limit is not None:
            grown = min(grown, self.limit)
        changed, self.max_length = grown != self.max_length, grown
        return changed

    def state_dict(self) -> dict:
        return {"max_length": self.max_length}

    def load_state_dict(self, state: dict) -> None:
        self.max_length = int(state["max_length"])


def example_lengths(length: int | torch.Tensor, batch_size: int, min_length: int = 1) -> torch.Tensor:
    """Per-example lengths [B] (long, CPU) from one length for all or a [B] tensor; checks them.

    Raises:
        ValueError: batch_size < 1, a length below `min_length`, or a tensor that is not [batch_size].
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(length, torch.Tensor):
        if length.shape != (batch_size,):
            raise ValueError(f"lengths must have shape ({batch_size},), got {tuple(length.shape)}")
        lengths = length.to(device="cpu", dtype=torch.long)
    else:
        lengths = torch.full((batch_size,), int(length), dtype=torch.long)
    if int(lengths.min()) < min_length:
        raise ValueError(f"sequence length must be at least {min_length}, got {int(lengths.min())}")
    return lengths


def spread_lengths(count: int, min_length: int, max_length: int) -> torch.Tensor:
    """`count` lengths [count] from min_length to max_length, evenly spread and ascending (for test sets)."""
    return torch.linspace(min_length, max_length, count).round().long()
