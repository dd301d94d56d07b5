"""What the task loops (`training/tasks.py`) need from a task.

- `Task` (N-th farthest): one answer per example, read from the core's last step by
  `models.TaskModel`; `sample(batch_size, generator)`, `loss`, `accuracy`.
- `SequenceTask` (copy, adding, argmax): outputs at every step from `models.SequenceModel`,
  `sample(batch_size, length, generator)` with a length per batch drawn from the curriculum
  (tasks/curriculum.py), a masked `loss` and `metrics` over the answer steps only, a headline metric.

Batches are NamedTuples of tensors (time-major `inputs` first) and plain values.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Task(Protocol):
    input_size: int
    output_size: int

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Any: ...
    def loss(self, logits: torch.Tensor, batch: Any) -> torch.Tensor: ...
    def accuracy(self, logits: torch.Tensor, batch: Any) -> float: ...


class SequenceTask(Protocol):
    input_size: int
    output_size: int
    min_length: int  # the shortest sequence the task has
    max_length: int | None  # the longest it can answer (argmax: its positions); None: any
    metric: str  # the headline metric, a key of `metrics`
    higher_is_better: bool

    def sample(self, batch_size: int, length: int | torch.Tensor, generator: torch.Generator | None = None) -> Any: ...
    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor: ...
    def metrics(self, outputs: torch.Tensor, batch: Any) -> dict[str, float]: ...
    def to_human_readable(self, batch: Any, outputs: torch.Tensor | None = None, index: int = 0) -> str: ...
