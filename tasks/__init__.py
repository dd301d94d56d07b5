"""Algorithmic task generators: each exposes `sample(...) -> Batch(inputs, targets, mask)`, time-major,
seeded by an explicit `torch.Generator`, with its own loss, accuracy and readable dump."""
