"""DNC, SAM and SDNC: the memories, the published controller API and the registered cores.

    from models.dnc import DNC, SAM, SDNC          # the published classes (ixaxaar/pytorch-dnc's API)
    rnn = DNC(input_size=64, hidden_size=128, nr_cells=16, read_heads=4, cell_size=20)
    output, (controller_hidden, memory, read_vectors) = rnn(x, (None, None, None), reset_experience=True)

Importing this package registers the cores "DNC", "SAM" and "SDNC" (`--model` in every script).
Modules: `memory` (DenseMemory), `sparse_memory` (SparseMemory), `sparse_temporal_memory`
(SparseTemporalMemory), `search` (nearest-neighbour search), `dnc` (the controller, the published
classes and the cores), `published` (the memory state in pytorch-dnc 1.1.0's form), `visualize` (heatmaps).
"""

from models.dnc.dnc import (
    DNC,
    SAM,
    SDNC,
    DNCConfig,
    DNCCore,
    DNCState,
    MemoryController,
    SAMConfig,
    SAMCore,
    SDNCConfig,
    SDNCCore,
)
from models.dnc.memory import DenseMemory
from models.dnc.sparse_memory import SparseMemory
from models.dnc.sparse_temporal_memory import SparseTemporalMemory

__all__ = [
    "DNC", "SAM", "SDNC", "DNCConfig", "DNCCore", "DNCState", "MemoryController", "SAMConfig", "SAMCore",
    "SDNCConfig", "SDNCCore", "DenseMemory", "SparseMemory", "SparseTemporalMemory",
]
