"""The copy task (Graves et al. 2014, the NTM paper; the DNC and SAM papers' first test), as the
published pytorch-dnc `copy_task.py` sets it up.

An example of length L is L random binary vectors of `bits` bits (each bit 1 with probability
1/2), then one step with only the end-marker channel set, then L blank steps during which the
network must output the L vectors in order. Inputs have `bits + 1` channels, so the published
`-input_size 6` means 5 bits and the marker; T = 2L + 1 steps:

    steps 0 .. L-1      the vectors (marker channel 0)
    step  L             the end marker alone
    steps L+1 .. 2L     blank inputs; the targets are the vectors: the answer phase (`mask`)

Loss: binary cross-entropy of the per-step logits against the target bits, over the answer
phase only, averaged over its steps and bits (so it does not grow with L). Metrics, also over
the answer phase only: `bit_errors`, the number of wrong bits in a sequence (a bit reads 1 when
its logit is above 0, i.e. sigmoid above 1/2) averaged over sequences, which the task loop
reports as bit errors per sequence; `sequence_accuracy`, the fraction copied without an error.

Shapes: T steps, B examples, bits = the vector width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tasks.curriculum import example_lengths


class Batch(NamedTuple):
    """inputs [T, B, bits + 1]; targets [T, B, bits] (zero outside the answer phase); mask [T, B] bool,
    True on each example's answer phase; lengths [B] long, each example's L (T = 2 * max(L) + 1)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


def sample(batch_size: int, length: int | torch.Tensor, bits: int = 5,
           generator: torch.Generator | None = None) -> Batch:
    """Draw a batch of copy examples (on the generator's device, CPU by default).

    Args:
        batch_size: B.
        length: L for every example, or a [B] tensor of per-example lengths (shorter examples are
            padded at the end with blank steps outside the mask).
        bits: width of the vectors; the inputs have one more channel, the end marker.
        generator: the only source of randomness; the same state gives the same batch.

    Returns:
        Batch(inputs [T, B, bits + 1], targets [T, B, bits], mask [T, B], lengths [B]) with T = 2 max(L) + 1.

    Raises:
        ValueError: batch_size < 1, a length < 1, or bits < 1.
    """
    if bits < 1:
        raise ValueError(f"the copy task needs at least 1 bit per vector (input_size at least 2), got {bits}")
    lengths = example_lengths(length, batch_size)
    device = generator.device if generator is not None else torch.device("cpu")
    B, longest = batch_size, int(lengths.max())
    T = 2 * longest + 1
    lengths = lengths.to(device)
    steps = torch.arange(T, device=device)[:, None]  # [T, 1]
    vectors = torch.randint(0, 2, (longest, B, bits), generator=generator, device=device).float()
    vectors = vectors * (steps[:longest] < lengths)[..., None]  # blank past each example's L
    inputs = torch.zeros(T, B, bits + 1, device=device)
    inputs[:longest, :, :bits] = vectors
    inputs[lengths, torch.arange(B, device=device), bits] = 1.0  # the end marker at step L
    mask = (steps > lengths) & (steps <= 2 * lengths)  # [T, B]
    source = (steps - lengths - 1).clamp(0, longest - 1)  # [T, B]: which vector step t must reproduce
    targets = vectors.gather(0, source[..., None].expand(T, B, bits)) * mask[..., None]
    return Batch(inputs, targets, mask, lengths)


def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean binary cross-entropy per answer-phase bit; logits [T, B, bits] (no sigmoid before it)."""
    per_bit = F.binary_cross_entropy_with_logits(logits, batch.targets, reduction="none")  # [T, B, bits]
    mask = batch.mask[..., None].to(per_bit.dtype)
    return (per_bit * mask).sum() / (mask.sum() * logits.size(-1))


def bit_errors(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Wrong bits per sequence [B] over the answer phase; a bit reads 1 where its logit is above 0."""
    wrong = (logits > 0) != (batch.targets > 0.5)  # [T, B, bits]
    return (wrong & batch.mask[..., None]).sum(dim=(0, 2))


def metrics(logits: torch.Tensor, batch: Batch) -> dict[str, float]:
    """loss, bit_errors (per sequence) and sequence_accuracy, each a mean over the batch's sequences."""
    errors = bit_errors(logits, batch).float()
    return {"loss": loss(logits, batch).item(), "bit_errors": errors.mean().item(),
            "sequence_accuracy": (errors == 0).float().mean().item()}


def to_human_readable(batch: Batch, logits: torch.Tensor | None = None, index: int = 0) -> str:
    """One example as rows of bits: the input vectors, the targets and, given logits, the output."""
    length = int(batch.lengths[index])
    bits = batch.targets.size(-1)

    def rows(values: torch.Tensor) -> str:  # [L, bits] 0/1
        return " ".join("".join(str(int(bit)) for bit in row) for row in values.tolist())

    lines = [f"length {length}, {bits} bits per vector",
             f"input:  {rows(batch.inputs[:length, index, :bits])}",
             f"target: {rows(batch.targets[length + 1:2 * length + 1, index])}"]
    if logits is not None:
        output = (logits[length + 1:2 * length + 1, index] > 0).int()
        lines.append(f"output: {rows(output)}  ({int(bit_errors(logits, batch)[index])} bit errors)")
    return "\n".join(lines)


@dataclass(frozen=True)
class CopyTask:
    """The task as the sequence-task loop uses it (see tasks.protocol.SequenceTask)."""

    bits: int = 5
    min_length = 1
    max_length = None  # any length can be copied
    metric = "bit_errors"  # the headline metric: bit errors per sequence
    higher_is_better = False

    def __post_init__(self) -> None:
        if self.bits < 1:
            raise ValueError(f"the copy task needs at least 1 bit per vector (input_size at least 2), got {self.bits}")

    @property
    def input_size(self) -> int:
        return self.bits + 1

    @property
    def output_size(self) -> int:
        return self.bits

    def sample(self, batch_size: int, length: int | torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        return sample(batch_size, length, self.bits, generator)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return loss(logits, batch)

    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        return metrics(logits, batch)

    def to_human_readable(self, batch: Batch, logits: torch.Tensor | None = None, index: int = 0) -> str:
        return to_human_readable(batch, logits, index)
