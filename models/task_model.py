"""Recurrent cores read out through an MLP: the models of the algorithmic tasks.

`TaskModel` reads the core's last step (one answer per example: N-th farthest); `SequenceModel`
reads every step (the DNC tasks, whose losses pick the answer steps with a mask). Both take the
same `TaskModelConfig`, so checkpoints of either rebuild through `training.load_checkpoint`.

Shapes: `T` time steps, `B` batch, `F` input features, `D` the core's output size, `K` outputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from models.core import build_core


@dataclasses.dataclass
class TaskModelConfig:
    core: str  # a registered core's name (models.CORES)
    core_config: dict  # the core's config dataclass as a dict
    input_size: int
    output_size: int
    mlp_sizes: list[int] = dataclasses.field(default_factory=list)  # hidden layers of the output MLP

    def __post_init__(self) -> None:
        if self.input_size < 1 or self.output_size < 1:
            raise ValueError(f"input_size and output_size must be positive, got {self.input_size}, {self.output_size}")
        if any(size < 1 for size in self.mlp_sizes):
            raise ValueError(f"MLP layer sizes must be positive, got {self.mlp_sizes}")


class TaskModel(nn.Module):
    """A core read out at its last step through an MLP: inputs [T, B, F] -> logits [B, K]."""

    def __init__(self, config: TaskModelConfig):
        super().__init__()
        self.config = config
        self.core = build_core(config.core, config.core_config)
        sizes = [self.core.output_size, *config.mlp_sizes]
        layers: list[nn.Module] = []
        for size_in, size_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(size_in, size_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], config.output_size))
        self.mlp = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs: [T, B, F] -> logits [B, K] from the core's output at step T - 1 (fresh state each call)."""
        outputs, _ = self.core(inputs)  # [T, B, D]
        return self.mlp(outputs[-1])


class SequenceModel(TaskModel):
    """A core read out at every step through the MLP: inputs [T, B, F] -> outputs [T, B, K]."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs: [T, B, F] -> outputs [T, B, K] (fresh state each call)."""
        outputs, _ = self.core(inputs)  # [T, B, D]
        return self.mlp(outputs)

    @property
    def has_memory_view(self) -> bool:
        """Whether the core can show its memory (`debug_forward`: the DNC, SAM and SDNC cores)."""
        return hasattr(self.core, "debug_forward")

    def debug_forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """`forward` plus the core's debug dict: NumPy arrays for batch element 0, one row per
        (layer, time step) (see models/dnc/visualize.py). Only for cores with `has_memory_view`."""
        outputs, _, debug = self.core.debug_forward(inputs, None)
        return self.mlp(outputs), debug
