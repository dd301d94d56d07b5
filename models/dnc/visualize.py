"""Pictures of a DNC / SAM / SDNC memory: heatmaps saved as PNG files and drawn live in Visdom.

The input is the debug dict of a memory core (`core.debug_forward`, or the published API's
`debug=True`): NumPy arrays for batch element 0, one row per (time step, layer), row t * L + l.
`heatmaps` turns it into named 2-D arrays (the window names):

    memory           the memory after the last step, [N slots, W] (the row holds N * W values)
    link_matrix      the temporal links after the last step, [N, N]: row i, column j, how much slot i
                     was written right after slot j. The SDNC keeps K_L entries per row and per
                     column: its row lists are drawn against the slots they point to (with the
                     debug dict's `link_index`; without it, in list order)
    rev_link_matrix  SDNC's column lists (the backward links) against the slots, [N, N]
    read_weights     [time x layer, read heads x slots] (SAM / SDNC: zero outside the rows they read)
    write_weights    [time x layer, slots]
    usage            DNC: [time x layer, N], the usage vector
    last_access      SAM / SDNC: [time x layer, N], the step at which each slot was last read or
                     written (the sparse cores' `usage` key, which is not a usage in [0, 1])
    precedence       [time x layer, N], how much each slot was the latest written (DNC, SDNC)
    read_positions   SAM / SDNC: [time x layer, N], 1 on the slots each step's reads covered and
                     0.5 on the least-used slot it may write (`read_positions`)

Quantities in [0, 1] (weights, usage, links, precedence, read positions) share the colour
scale 0-1, so that read weights spread thin (0.02-0.03) look flat rather than structured; the
memory and the last access step have scales of their own, and each panel's title says which.
With the example's phases (`output_start`), the rows of the input and output phases are told
apart: a line in the PNG, "in"/"out" row names in Visdom. Columns are slot numbers, grouped by
read head with separators where a panel holds several heads.

N is read off the usage rows, so nothing but the dict is needed. Memories of more than
`MAX_SLOTS` slots are drawn in their first `MAX_SLOTS` slots (per read head for the read
weights), so that a large SAM does not turn a summary into megabytes of JSON.

`save_png` writes one figure with a panel per heatmap (matplotlib's Agg canvas, no display
needed) and the arrays beside it as `.npz`, the exact data drawn. A `views.VisdomBoard` shows the
same heatmaps under fixed window ids (each summary updates the same windows in place). In every
picture row 0 is at the bottom, as Visdom draws it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from views import VisdomBoard, VisdomUnavailable  # noqa: F401  (VisdomUnavailable: part of this module's API)

MAX_SLOTS = 512
PNG_COLORMAP, VISDOM_COLORMAP = "viridis", "Viridis"
UNIT = (0.0, 1.0)
WINDOWS = ("memory", "link_matrix", "rev_link_matrix", "read_weights", "write_weights", "usage", "last_access",
           "precedence", "read_positions")


class Heatmap(NamedTuple):
    values: np.ndarray  # [rows, columns]
    title: str
    xlabel: str
    ylabel: str
    scale: tuple[float, float] | None = None  # the colour scale's (low, high); None: the values' own range
    group: int = 0  # columns per read head where a panel holds several (separators between them)
    row_names: list[str] | None = None  # one per row (time steps with their phase), or None


def slot_count(debug: dict[str, np.ndarray]) -> int | None:
    """N, the number of memory slots, from the usage rows (None when the dict has no usage)."""
    for key in ("usage_vector", "usage"):
        if key in debug:
            return int(np.asarray(debug[key]).shape[-1])
    return None


def step_names(rows: int, steps: int | None, output_start: int | None) -> list[str] | None:
    """Names of the rows (time step t, layer l: row t * L + l): "in t3", "out t7 l1"; None without `steps`."""
    if not steps or rows % steps:
        return None
    layers = rows // steps
    names = []
    for row in range(rows):
        step, layer = divmod(row, layers)
        phase = "" if output_start is None else ("out " if step >= output_start else "in ")
        names.append(f"{phase}t{step}" + (f" l{layer}" if layers > 1 else ""))
    return names


def scattered(index: np.ndarray, values: np.ndarray, slots: int, by_column: bool = False) -> np.ndarray:
    """Lists of (slot, value) pairs as a dense [N, N] matrix: row lists (index[i, k] = column j) or,
    with `by_column`, column lists (index[j, k] = row i)."""
    dense = np.zeros((slots, slots), dtype=np.asarray(values).dtype)
    owners = np.repeat(np.arange(slots), index.shape[1])
    others = np.asarray(index).reshape(-1).astype(int)
    if by_column:
        dense[others, owners] = np.asarray(values).reshape(-1)
    else:
        dense[owners, others] = np.asarray(values).reshape(-1)
    return dense


def heatmaps(debug: dict[str, np.ndarray], steps: int | None = None, output_start: int | None = None
             ) -> dict[str, Heatmap]:
    """The named heatmaps of a debug dict (see the module docstring); keys absent from it are skipped.

    Args:
        debug: arrays [rows, features] with rows = time steps x layers, as the memory cores give them.
        steps: the example's time steps T (rows = T x layers), to name the rows; None: unnamed.
        output_start: the first time step of the output phase, to mark the phases; None: unmarked.

    Returns:
        {window name: Heatmap}, in the order of `WINDOWS`; empty for a dict without memory keys.
    """
    slots = slot_count(debug)
    maps: dict[str, Heatmap] = {}
    if "memory" in debug:
        last = np.asarray(debug["memory"])[-1]  # [N * W] after the last step
        if slots and last.size % slots == 0:
            memory = last.reshape(slots, last.size // slots)[:MAX_SLOTS]  # [N, W]
            maps["memory"] = Heatmap(memory, "memory after the last step (own scale)", "cell (word)", "slot")
        else:
            maps["memory"] = Heatmap(np.asarray(debug["memory"]), "memory (own scale)", "slot x cell", "step")
    for key, index_key, title in (("link_matrix", "link_index", "links"),
                                  ("rev_link_matrix", "rev_link_index", "backward links")):
        if key not in debug or not slots or np.asarray(debug[key])[-1].size % slots:
            continue
        last = np.asarray(debug[key])[-1].reshape(slots, -1)  # DNC: [N, N]; SDNC: [N, K_L] entry values
        if last.shape[1] == slots:
            maps[key] = Heatmap(last[:MAX_SLOTS, :MAX_SLOTS], f"{title} after the last step (scale 0-1)",
                                "slot written before", "slot", UNIT)
        elif index_key in debug:  # the SDNC's K_L entries, put at the slots they point to
            index = np.asarray(debug[index_key])[-1].reshape(slots, -1)
            dense = scattered(index, last, slots, by_column=key == "rev_link_matrix")
            kind = "column" if key == "rev_link_matrix" else "row"
            maps[key] = Heatmap(dense[:MAX_SLOTS, :MAX_SLOTS], f"{title} ({kind} lists) after the last step "
                                f"(scale 0-1)", "slot written before", "slot", UNIT)
        else:
            maps[key] = Heatmap(last[:MAX_SLOTS], f"{title} after the last step (scale 0-1)",
                                "entry of the slot's list", "slot", UNIT)
    rows = next((len(np.asarray(value)) for value in debug.values()), 0)
    names = step_names(rows, steps, output_start)
    ylabel = "time step" if steps and rows == steps else "time step x layer"
    if "read_weights" in debug:
        weights = np.asarray(debug["read_weights"])
        group = 0
        if slots and weights.shape[1] % slots == 0:  # [rows, heads * N] -> the first MAX_SLOTS slots per head
            weights = weights.reshape(len(weights), -1, slots)[:, :, :MAX_SLOTS].reshape(len(weights), -1)
            group = min(slots, MAX_SLOTS)
        maps["read_weights"] = Heatmap(weights, "read weights (scale 0-1)", "read head x slot", ylabel, UNIT,
                                       group, names)
    per_slot = (("write_weights", "write_weights", "write weights (scale 0-1)", UNIT),
                ("usage_vector", "usage", "usage (scale 0-1)", UNIT),
                ("usage", "last_access", "last access step of each slot (own scale)", None),
                ("precedence", "precedence", "precedence (scale 0-1)", UNIT))
    for key, name, title, scale in per_slot:
        if key in debug and not (key == "usage" and "usage_vector" in debug):
            maps[name] = Heatmap(np.asarray(debug[key])[:, :MAX_SLOTS], title, "slot", ylabel, scale, 0, names)
    if "read_positions" in debug and slots:
        positions = np.asarray(debug["read_positions"]).astype(int)  # [rows, R K + 1]: rows read, then the LRU
        visited = np.zeros((len(positions), slots), dtype=np.float32)
        rows_index = np.arange(len(positions))
        visited[rows_index, positions[:, -1]] = 0.5
        visited[rows_index[:, None], positions[:, :-1]] = 1.0
        maps["read_positions"] = Heatmap(visited[:, :MAX_SLOTS], "read positions: slots read (1), least used (0.5)",
                                         "slot", ylabel, UNIT, 0, names)
    return {name: maps[name] for name in WINDOWS if name in maps}


def answer_start(mask: np.ndarray) -> int | None:
    """The first step of an example's output phase: where the trailing run of its answer steps (`mask`
    [T], True on them) begins; None when there is no answer step or the answers start at step 0 (no
    separate input phase, as in the published adding task)."""
    answers = np.flatnonzero(np.asarray(mask, dtype=bool))
    if answers.size == 0:
        return None
    start = int(answers[-1])
    while start > 0 and mask[start - 1]:
        start -= 1
    return start or None


def save_png(maps: dict[str, Heatmap], path: str | Path, title: str = "") -> Path:
    """Draw `maps` (`figure`) into `path` (PNG) and save the arrays as `path` with .npz.

    Returns:
        The PNG's path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure(maps, title).savefig(path, dpi=80)
    np.savez_compressed(path.with_suffix(".npz"), **{name: heatmap.values for name, heatmap in maps.items()})
    return path


def figure(maps: dict[str, Heatmap], title: str = ""):
    """One matplotlib Figure (Agg canvas: no display, no global state) with a panel per heatmap.

    Panels of a shared scale use it; slot axes get integer ticks; read-head groups are separated by
    white lines; the first output row is marked by a red dashed line (rows below it: the input phase).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = min(3, max(1, len(maps)))
    rows = max(1, math.ceil(len(maps) / columns))
    drawing = Figure(figsize=(5 * columns, 4 * rows + 0.5))
    FigureCanvasAgg(drawing)
    drawing.subplots_adjust(left=0.06, right=0.95, bottom=0.08, top=0.9, wspace=0.35, hspace=0.45)
    for index, heatmap in enumerate(maps.values()):
        axis = drawing.add_subplot(rows, columns, index + 1)
        low, high = heatmap.scale or (None, None)
        image = axis.imshow(heatmap.values, origin="lower", aspect="auto", cmap=PNG_COLORMAP, interpolation="nearest",
                            vmin=low, vmax=high)
        axis.set_title(heatmap.title, fontsize=9)
        axis.set_xlabel(heatmap.xlabel)
        axis.set_ylabel(heatmap.ylabel)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        width = heatmap.values.shape[1]
        if heatmap.group and width > heatmap.group:
            heads = width // heatmap.group
            for head in range(1, heads):
                axis.axvline(head * heatmap.group - 0.5, color="white", linewidth=1.5)
            axis.set_xticks([(head + 0.5) * heatmap.group - 0.5 for head in range(heads)],
                            [f"head {head}" for head in range(heads)])
        boundary = first_output_row(heatmap.row_names)
        if boundary is not None:
            axis.axhline(boundary - 0.5, color="red", linestyle="--", linewidth=1.2)
            axis.text(0.99, boundary - 0.5, "output", color="red", fontsize=7, va="bottom", ha="right",
                      transform=axis.get_yaxis_transform())
            axis.text(0.99, boundary - 0.5, "input", color="red", fontsize=7, va="top", ha="right",
                      transform=axis.get_yaxis_transform())
        drawing.colorbar(image, ax=axis)
    if title:
        drawing.suptitle(title)
    return drawing


def first_output_row(row_names: list[str] | None) -> int | None:
    """The first row named as the output phase's, or None."""
    for row, name in enumerate(row_names or ()):
        if name.startswith("out "):
            return row
    return None


def visdom_opts(heatmap: Heatmap, caption: str = "") -> dict:
    """The heatmap's Visdom options: title, axes, colour map and scale, slot and step names."""
    rows, width = heatmap.values.shape
    opts = dict(title=f"{heatmap.title} {caption}".strip(), xlabel=heatmap.xlabel, ylabel=heatmap.ylabel,
                colormap=VISDOM_COLORMAP)
    if heatmap.scale is not None:
        opts["xmin"], opts["xmax"] = heatmap.scale
    if heatmap.group:
        opts["columnnames"] = [f"h{column // heatmap.group} s{column % heatmap.group}" for column in range(width)]
    elif heatmap.xlabel.startswith("slot"):
        opts["columnnames"] = [str(column) for column in range(width)]
    if heatmap.row_names is not None and len(heatmap.row_names) == rows:
        opts["rownames"] = heatmap.row_names
    elif heatmap.ylabel == "slot":
        opts["rownames"] = [str(row) for row in range(rows)]
    return opts


class MemoryPictures:
    """The sequence-task loop's summary callback: a memory core's state on a fixed example (the
    test set's longest), drawn as heatmaps into the run folder's pictures/step-NNNNNNN.png (with the
    arrays as .npz) and, with a board, into Visdom. Cores without a memory view draw nothing here
    (their loss curves come from `views.VisdomCurves`).

    Build it with `from_args` (-visdom, --visdom-server, --visdom-port); the loop calls it on rank 0
    after each training log line. The board's environment is set when the run starts
    (`views.Views.start`); windows of the environment that this core does not draw (a DNC's links
    on a SAM run's page, with a shared --visdom-env) are closed at the first summary.
    """

    def __init__(self, board: VisdomBoard | None = None):
        self.board = board
        self.cleared = False

    @classmethod
    def from_args(cls, args, script: str) -> "MemoryPictures":
        """With -visdom, connected to the server (raises VisdomUnavailable when none answers)."""
        if not args.visdom:
            return cls()
        return cls(VisdomBoard(args.visdom_server, args.visdom_port))

    def __call__(self, step: int, loss: float, model, batch: Any, run) -> None:
        """Draw the memory of `model` on the last example of `batch` (the loop passes the test set's
        last batch, whose last example is its longest)."""
        import torch

        if not model.has_memory_view or batch is None:
            return
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            _, debug = model.debug_forward(batch.inputs[:, -1:].to(device))
        mask = batch.mask[:, -1].cpu().numpy()
        length = int(batch.lengths[-1])
        maps = heatmaps(debug, steps=batch.inputs.size(0), output_start=answer_start(mask))
        if not maps:
            return
        save_png(maps, run.path / "pictures" / f"step-{step:07d}.png",
                 title=f"{model.config.core} memory on the longest test example (length {length}), "
                       f"step {step}, training loss {loss:.4f}")
        if self.board is None:
            return
        try:
            if not self.cleared:  # another core's windows left in a shared environment
                for window in WINDOWS:
                    if window not in maps:
                        self.board.close(window)
                self.cleared = True
            for name, heatmap in maps.items():
                self.board.heatmap(name, heatmap.values, visdom_opts(heatmap, f"@ {step}"))
        except OSError as error:  # the viewer going away must not end the training run
            run.print(f"| visdom: lost the server ({error}); pictures still go to {run.path / 'pictures'}")
            self.board = None
