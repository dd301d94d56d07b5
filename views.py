"""Live views of a run, fed by the events it logs: Visdom windows and TensorBoard event files.

Both packages are optional and imported only when asked for. `Views.from_args` connects (with
--visdom) and checks the packages before a run folder is made, so a missing package or an
unreachable server is a one-line error (`ViewUnavailable`, whose message says what to run);
`Views.start(run)` then attaches them to the run, whose every `log` event they receive:

    VisdomCurves       the loss window: the training loss with the validation loss (language
                       models, and the final test loss) or with the test loss and the task's
                       headline test metric (tasks), one trace per run named after its folder
    TensorBoardScalars every number of every event as a scalar `<event>/<field>` (train/loss,
                       valid/ppl, test/bit_errors, ...) at the event's step

Each run draws into a Visdom environment of its own, named after its run folder, unless
--visdom-env names a shared one, where the traces of several runs sit side by side. The run
prints the page to open (http://HOST:PORT/env/ENV). Visdom's own session messages are kept
off the terminal.
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

NOT_SCALARS = {"event", "time", "step", "epoch", "length"}


class ViewUnavailable(RuntimeError):
    """A view's package is not installed or its server cannot be reached; the message says what to do."""


class VisdomUnavailable(ViewUnavailable):
    """Visdom is not installed or its server cannot be reached."""


class VisdomBoard:
    """A connection to a running Visdom server: lines appended by trace name, heatmaps by window name.

    Args:
        server: the server's address, with or without http:// (e.g. localhost).
        port: its port (`python -m visdom.server` listens on 8097).
        env: the Visdom environment the windows go to (`use_env` may set it later).

    Raises:
        VisdomUnavailable: visdom is not installed, or no server answers at server:port.
    """

    def __init__(self, server: str = "localhost", port: int = 8097, env: str = "main"):
        try:
            import visdom
        except ImportError:
            raise VisdomUnavailable("--visdom needs the visdom package: pip install visdom") from None
        self.env = env
        address = server if "://" in server else f"http://{server}"
        self.url = f"{address}:{port}"
        # "Setting up a new session..." and the like are Visdom's own chatter: off the terminal.
        logging.getLogger("visdom").setLevel(logging.ERROR)
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

    def use_env(self, env: str) -> str:
        """Draw into `env` from now on; returns the page that shows it."""
        self.env = env
        return self.page()

    def page(self) -> str:
        return f"{self.url}/env/{self.env}"

    def line(self, window: str, trace: str, x: float, y: float, title: str, xlabel: str, ylabel: str) -> None:
        """Append (x, y) to the trace named `trace` of `window` (window and trace made on first use)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.vis.line(X=np.array([x], dtype=float), Y=np.array([y], dtype=float), win=window, env=self.env,
                          name=trace, update="append",
                          opts=dict(title=title, xlabel=xlabel, ylabel=ylabel, showlegend=True))

    def heatmap(self, window: str, values: np.ndarray, opts: dict) -> None:
        """Draw `values` [rows, columns] in `window`, replacing what it showed (row 0 at the bottom)."""
        self.vis.heatmap(X=values, win=window, env=self.env, opts=opts)

    def close(self, window: str) -> None:
        """Remove `window` from the environment if it is there."""
        if self.vis.win_exists(window, env=self.env):
            self.vis.close(win=window, env=self.env)


class VisdomCurves:
    """A run's log events as Visdom lines in one window, `loss`, with traces named "<run> <what>".

    Language models: train (every --log-interval batches), valid (each epoch) and the final test
    loss. Tasks: train, test loss and the headline test metric (e.g. bit errors) at each evaluation.

    Args:
        board: the connection.
        run_name: the run's folder name, which starts every trace's name.
        metric: a task's headline metric, also drawn from its test events (None: language models).
    """

    WINDOW = "loss"

    def __init__(self, board: VisdomBoard, run_name: str, metric: str | None = None):
        self.board, self.run_name, self.metric = board, run_name, metric
        self.title = "loss" if metric is None else f"loss and test {metric.replace('_', ' ')}"

    def __call__(self, event: str, record: dict) -> None:
        step = record.get("step")
        if step is None:
            return
        if event == "train":
            self.point(f"{self.run_name} train", step, record.get("loss"))
        elif event == "valid":
            self.point(f"{self.run_name} valid", step, record.get("loss"))
        elif event == "test" and "test_loss" in record:  # a language model's final test
            self.point(f"{self.run_name} test", step, record.get("test_loss"))
        elif event == "test":
            self.point(f"{self.run_name} test loss", step, record.get("loss"))
            if self.metric not in (None, "loss"):
                self.point(f"{self.run_name} test {self.metric}", step, record.get(self.metric))

    def point(self, trace: str, step: int, value: float | None) -> None:
        if value is None or not math.isfinite(value):  # a non-finite loss is logged as null: leave a gap
            return
        self.board.line(self.WINDOW, trace, step, value, self.title, "step", "loss" if self.metric is None else "")


class TensorBoardScalars:
    """Every number of every logged event as a TensorBoard scalar `<event>/<field>` at the event's step
    (the generalisation curve's at its sequence length). Flushed at each event, so a killed run
    keeps what it logged."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def __call__(self, event: str, record: dict) -> None:
        step = record.get("length" if event == "generalisation" else "step")
        if step is None:
            return
        for key, value in record.items():
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{event}/{key}", value, global_step=step, walltime=record.get("time"))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_tensorboard() -> None:
    """Raise ViewUnavailable unless torch.utils.tensorboard can be imported (it needs the tensorboard package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ViewUnavailable("--tensorboard needs the tensorboard package: pip install tensorboard") from None


class Views:
    """What --visdom and --tensorboard ask for, checked at start and attached to the run by `start`.

    Args:
        board: a Visdom connection, or None.
        env: the Visdom environment given with --visdom-env (None: the run folder's name).
        tensorboard: None (off), "" (the run folder's tensorboard/) or a folder that gets a
            subfolder per run (so `tensorboard --logdir DIR` compares runs).
    """

    def __init__(self, board: VisdomBoard | None = None, env: str | None = None, tensorboard: str | None = None):
        self.board, self.env, self.tensorboard = board, env, tensorboard
        self.listeners: list[Callable[[str, dict], None]] = []

    @classmethod
    def from_args(cls, args: argparse.Namespace, board: VisdomBoard | None = None) -> "Views":
        """Connect to Visdom (-visdom; unless `board` is already connected) and check TensorBoard
        (--tensorboard). Raises ViewUnavailable with what to do."""
        tensorboard = getattr(args, "tensorboard", None)
        if tensorboard is not None:
            check_tensorboard()
        if board is None and getattr(args, "visdom", False):
            board = VisdomBoard(args.visdom_server, args.visdom_port)
        return cls(board, getattr(args, "visdom_env", None), tensorboard)

    def start(self, run: Any, metric: str | None = None) -> None:
        """Attach the views to `run` (a `training.run.Run`; rank 0) and say where to look.

        Args:
            metric: a task's headline test metric for the loss window (None for language models).
        """
        if self.board is not None:
            page = self.board.use_env(self.env or run.path.name)
            run.print(f"| visdom: {page}")
            self.listeners.append(VisdomCurves(self.board, run.path.name, metric))
        if self.tensorboard is not None:
            log_dir = Path(self.tensorboard) / run.path.name if self.tensorboard else run.path / "tensorboard"
            self.listeners.append(TensorBoardScalars(log_dir))
            run.print(f"| tensorboard: tensorboard --logdir {log_dir.parent if self.tensorboard else log_dir}")
        for listener in self.listeners:
            run.add_listener(listener)
