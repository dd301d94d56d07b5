"""Pictures of a DNC / SAM / SDNC memory: heatmaps saved as PNG files and drawn live in Visdom.

The input is the debug dict of a memory core (`core.debug_forward`, or the published API's
`debug=True`): NumPy arrays for batch element 0, one row per (layer, time step). `heatmaps`
turns it into named 2-D arrays:

    memory           the memory after the last step, [N slots, W] (the row holds N * W values)
    link_matrix      the temporal links after the last step: DNC [N, N] (row i, column j: how much
                     slot i was written right after slot j); SDNC [N, K_L], the values of each row's
                     K_L sparse entries
    rev_link_matrix  SDNC's backward links after the last step, [N, K_L]
    read_weights     [layer x time, read heads x slots] (SAM / SDNC: zero outside the rows they read)
    write_weights    [layer x time, slots]
    usage            [layer x time, N] (`usage_vector` for the DNC, `usage` for SAM / SDNC)

N is read off the usage rows, so nothing but the dict is needed. Memories of more than
`MAX_SLOTS` slots are drawn in their first `MAX_SLOTS` slots (per read head for the read
weights), so that a large SAM does not turn a summary into megabytes of JSON.

`save_png` writes one figure with a panel per heatmap (matplotlib's Agg canvas, no display
needed) and the arrays beside it as `.npz`, the exact data drawn. `VisdomBoard` sends the same
heatmaps to a running Visdom server under fixed window ids (so each summary updates the same
windows in place) and appends to a loss curve. Visdom is optional: it is imported only when a
board is made, and a missing package or an unreachable server is a `VisdomUnavailable` whose
message says what to run. In every picture row 0 is at the bottom, as Visdom draws it.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

MAX_SLOTS = 512
PNG_COLORMAP, VISDOM_COLORMAP = "viridis", "Viridis"


class Heatmap(NamedTuple):
    values: np.ndarray  # [rows, columns]
    title: str
    xlabel: str
    ylabel: str


class VisdomUnavailable(RuntimeError):
    """Visdom is not installed or its server cannot be reached; the message says what to do."""


def slot_count(debug: dict[str, np.ndarray]) -> int | None:
    """N, the number of memory slots, from the usage rows (None when the dict has no usage)."""
    for key in ("usage_vector", "usage"):
        if key in debug:
            return int(np.asarray(debug[key]).shape[-1])
    return None


def heatmaps(debug: dict[str, np.ndarray]) -> dict[str, Heatmap]:
    """The named heatmaps of a debug dict (see the module docstring); keys absent from it are skipped.

    Args:
        debug: arrays [rows, features] with rows = layers x time steps, as the memory cores give them.

    Returns:
        {window name: Heatmap}, in the order memory, link_matrix, rev_link_matrix, read_weights,
        write_weights, usage; empty for a dict without memory keys.
    """
    slots = slot_count(debug)
    maps: dict[str, Heatmap] = {}
    if "memory" in debug:
        last = np.asarray(debug["memory"])[-1]  # [N * W] after the last step
        if slots and last.size % slots == 0:
            memory = last.reshape(slots, last.size // slots)[:MAX_SLOTS]  # [N, W]
            maps["memory"] = Heatmap(memory, "memory (last step)", "cell (word)", "slot")
        else:
            maps["memory"] = Heatmap(np.asarray(debug["memory"]), "memory", "slot x cell", "layer x time")
    for key, title in (("link_matrix", "links"), ("rev_link_matrix", "backward links")):
        if key in debug and slots and np.asarray(debug[key])[-1].size % slots == 0:
            last = np.asarray(debug[key])[-1].reshape(slots, -1)  # DNC: [N, N]; SDNC: [N, K_L] link values
            xlabel = "slot written before" if last.shape[1] == slots else "sparse entry of the row"
            maps[key] = Heatmap(last[:MAX_SLOTS, :MAX_SLOTS], f"{title} (last step)", xlabel, "slot")
    for key, title, xlabel in (("read_weights", "read weights", "read head x slot"),
                               ("write_weights", "write weights", "slot")):
        if key in debug:
            weights = np.asarray(debug[key])
            if slots and weights.shape[1] % slots == 0:  # [rows, heads * N] -> the first MAX_SLOTS slots per head
                weights = weights.reshape(len(weights), -1, slots)[:, :, :MAX_SLOTS].reshape(len(weights), -1)
            maps[key] = Heatmap(weights, title, xlabel, "layer x time")
    for key in ("usage_vector", "usage"):
        if key in debug:
            maps["usage"] = Heatmap(np.asarray(debug[key])[:, :MAX_SLOTS], "usage", "slot", "layer x time")
            break
    return maps


def save_png(maps: dict[str, Heatmap], path: str | Path, title: str = "") -> Path:
    """Draw `maps` as one figure of panels into `path` (PNG) and save the arrays as `path` with .npz.

    Returns:
        The PNG's path.
    """
    from matplotlib.figure import Figure  # the object API with the Agg canvas: no display, no global state

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = min(3, max(1, len(maps)))
    rows = max(1, math.ceil(len(maps) / columns))
    figure = Figure(figsize=(5 * columns, 4 * rows + 0.5))
    figure.subplots_adjust(left=0.06, right=0.97, bottom=0.08, top=0.9, wspace=0.3, hspace=0.35)
    for index, heatmap in enumerate(maps.values()):
        axis = figure.add_subplot(rows, columns, index + 1)
        image = axis.imshow(heatmap.values, origin="lower", aspect="auto", cmap=PNG_COLORMAP, interpolation="nearest")
        axis.set_title(heatmap.title, fontsize=10)
        axis.set_xlabel(heatmap.xlabel)
        axis.set_ylabel(heatmap.ylabel)
        figure.colorbar(image, ax=axis)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=80)
    np.savez_compressed(path.with_suffix(".npz"), **{name: heatmap.values for name, heatmap in maps.items()})
    return path


class VisdomBoard:
    """A connection to a running Visdom server: heatmaps under fixed window ids, and a loss curve.

    Args:
        server: the server's address, with or without http:// (e.g. localhost).
        port: its port (`python -m visdom.server` listens on 8097).
        env: the Visdom environment the windows go to.

    Raises:
        VisdomUnavailable: visdom is not installed, or no server answers at server:port.
    """

    LOSS_WINDOW = "loss"

    def __init__(self, server: str = "localhost", port: int = 8097, env: str = "main"):
        try:
            import visdom
        except ImportError:
            raise VisdomUnavailable("-visdom needs the visdom package: pip install visdom") from None
        self.env = env
        address = server if "://" in server else f"http://{server}"
        self.url = f"{address}:{port}"
        try:
            with warnings.catch_warnings():  # visdom 0.2 calls the deprecated logger.warn
                warnings.simplefilter("ignore", DeprecationWarning)
                self.vis = visdom.Visdom(server=address, port=port, env=env, raise_exceptions=True,
                                         use_incoming_socket=False)
                connected = self.vis.check_connection()
        except Exception:  # visdom raises ConnectionError, requests' errors or its own, depending on the failure
            connected = False
        if not connected:
            raise VisdomUnavailable(f"no Visdom server answers at {self.url}; start one with "
                                    f"`python -m visdom.server -port {port}` (or fix --visdom-server/--visdom-port)")
        self.loss_started = self.vis.win_exists(self.LOSS_WINDOW) is True

    def heatmaps(self, maps: dict[str, Heatmap], caption: str = "") -> None:
        """Draw each heatmap in the window named after it, replacing what the window showed."""
        for name, heatmap in maps.items():
            self.vis.heatmap(
                X=heatmap.values, win=name, env=self.env,
                opts=dict(title=f"{heatmap.title} {caption}".strip(), xlabel=heatmap.xlabel,
                          ylabel=heatmap.ylabel, colormap=VISDOM_COLORMAP),
            )

    def loss(self, step: int, value: float, name: str = "train") -> None:
        """Append (step, value) to the loss curve (created on the first call unless the env has it)."""
        self.vis.line(X=np.array([step]), Y=np.array([value]), win=self.LOSS_WINDOW, env=self.env, name=name,
                      update="append" if self.loss_started else None,
                      opts=dict(title="training loss", xlabel="iteration", ylabel="loss", showlegend=True))
        self.loss_started = True


class MemoryPictures:
    """The sequence-task loop's summary callback: a memory core's state on one example, drawn as heatmaps
    into the run folder's pictures/step-NNNNNNN.png (with the arrays as .npz) and, with a board, into Visdom
    with the loss curve. Cores without a memory view get the loss curve only.

    Build it with `from_args` (-visdom, --visdom-server, --visdom-port, --visdom-env); the loop calls it
    on rank 0 after each training log line.
    """

    def __init__(self, board: VisdomBoard | None = None):
        self.board = board

    @classmethod
    def from_args(cls, args, script: str) -> "MemoryPictures":
        """With -visdom, connected to the server (raises VisdomUnavailable when none answers)."""
        if not args.visdom:
            return cls()
        return cls(VisdomBoard(args.visdom_server, args.visdom_port, args.visdom_env or script))

    def __call__(self, step: int, loss: float, model, batch, run) -> None:
        import torch

        maps: dict[str, Heatmap] = {}
        if model.has_memory_view and batch is not None:
            model.eval()
            device = next(model.parameters()).device
            with torch.no_grad():
                _, debug = model.debug_forward(batch.inputs[:, :1].to(device))
            maps = heatmaps(debug)
        if maps:
            save_png(maps, run.path / "pictures" / f"step-{step:07d}.png",
                     title=f"{model.config.core} memory, batch element 0 (step {step}, "
                           f"length {int(batch.lengths[0])}, loss {loss:.4f})")
        if self.board is not None:
            try:
                self.board.loss(step, loss)
                self.board.heatmaps(maps, f"@ {step}")
            except OSError as error:  # the viewer going away must not end the training run
                run.print(f"| visdom: lost the server ({error}); pictures still go to {run.path / 'pictures'}")
                self.board = None
