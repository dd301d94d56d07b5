"""copy_task.py -visdom against a real Visdom server on loopback: the windows read back through Visdom's API
hold the memory of the debug dict, and a headless Chromium screenshot of the page shows the heatmaps drawn.

tools/install_dev.sh installs what this needs (visdom 0.2.4 with its JavaScript assets, Debian's
chromium); without them the test is skipped.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

import copy_task
import training
from models.dnc import visualize
from tasks.copy import CopyTask
from tasks.curriculum import Curriculum

visdom = pytest.importorskip("visdom", reason="visdom is not installed: run bash tools/install_dev.sh")
CHROMIUM = shutil.which("chromium")
ENV = "dnc_test"
WINDOWS = ("memory", "link_matrix", "read_weights", "write_weights", "usage")
VIRIDIS_YELLOW = np.array([253, 231, 37])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def visdom_port(tmp_path):
    """A Visdom server on 127.0.0.1 only, with its environments in tmp_path; always stopped afterwards."""
    port = free_port()
    log_path = tmp_path / "visdom.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "visdom.server", "-port", str(port), "-bind_local",
             "-env_path", str(tmp_path / "envs"), "-logging_level", "WARNING"],
            stdout=log, stderr=subprocess.STDOUT, process_group=0,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                pytest.fail(f"the Visdom server exited with {server.returncode}:\n{log_path.read_text()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the Visdom server did not answer within 30 s:\n{log_path.read_text()}")
                time.sleep(0.1)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def last_training_batch(args: dict, iterations: int):
    """The batch the run drew at iteration `iterations`, redrawn from its seed as the loop draws them."""
    task = CopyTask(bits=args["input_size"] - 1)
    curriculum = Curriculum(args["sequence_max_length"], args["curriculum_increment"], args["curriculum_freq"])
    generator = torch.Generator().manual_seed(args["seed"])
    for step in range(iterations):
        curriculum.update(step)
        batch = task.sample(args["batch_size"], curriculum.sample_length(generator), generator)
    return batch


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # visdom 0.2.4's client calls logger.warn
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: run bash tools/install_dev.sh")
def test_copy_task_draws_memory_heatmaps_in_visdom(visdom_port, tmp_path):
    run_dir = tmp_path / "run"
    copy_task.main(["--run-dir", str(run_dir), "-visdom", "--visdom-server", "127.0.0.1",
                    "--visdom-port", str(visdom_port), "--visdom-env", ENV, "--model", "DNC",
                    "-iterations", "4", "-summarize_freq", "2", "-check_freq", "4", "-nhid", "16", "-mem_slot", "12",
                    "-mem_size", "8", "-read_heads", "2", "-batch_size", "8", "--test-size", "16",
                    "--generalisation-lengths", "4", "--threads", "1"])

    vis = visdom.Visdom(server="http://127.0.0.1", port=visdom_port, env=ENV, raise_exceptions=True,
                        use_incoming_socket=False)
    assert vis.check_connection()
    for window in (*WINDOWS, "loss"):
        assert vis.win_exists(window, env=ENV), window

    def window(name):
        return json.loads(vis.get_window_data(name, env=ENV))["content"]["data"]

    # Each heatmap holds the latest summary's data (step 4), the same as the PNG's arrays ...
    arrays = np.load(run_dir / "pictures" / "step-0000004.npz")
    assert sorted(arrays.files) == sorted(WINDOWS)
    for name in WINDOWS:
        np.testing.assert_array_equal(np.array(window(name)[0]["z"], dtype=np.float32), arrays[name])
    # ... and the memory is that of the debug dict of the step-4 model on the batch of iteration 4, element 0.
    model, checkpoint = training.load_checkpoint(run_dir / "checkpoint.pt", kind="SequenceModel")
    assert checkpoint["train_state"]["step"] == 4
    batch = last_training_batch(checkpoint["args"], 4)
    with torch.no_grad():
        _, debug = model.debug_forward(batch.inputs[:, :1])
    np.testing.assert_array_equal(np.array(window("memory")[0]["z"], dtype=np.float32),
                                  debug["memory"][-1].reshape(12, 8))
    # The loss curve has one point per summary, the logged training losses.
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    losses = [event["loss"] for event in logged if event["event"] == "train"]
    curve = window("loss")[0]
    assert curve["x"] == [2, 4] and curve["y"] == pytest.approx(losses)

    # A person looking at the page sees the heatmaps: Viridis yellow is drawn only by plotly's heatmaps.
    screenshot = tmp_path / "page.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1400,1000", "--virtual-time-budget=15000",
         f"--screenshot={screenshot}", f"http://127.0.0.1:{visdom_port}/env/{ENV}"],
        capture_output=True, timeout=120, check=True,
    )
    from PIL import Image  # installed with visdom

    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    yellow = (np.abs(pixels - VIRIDIS_YELLOW).sum(axis=-1) < 40).sum()
    assert yellow > 500, f"{yellow} Viridis-yellow pixels: the heatmaps were not drawn"


def test_board_names_the_fix_when_no_server_answers():
    with pytest.raises(visualize.VisdomUnavailable, match=r"python -m visdom.server -port \d+"):
        visualize.VisdomBoard("127.0.0.1", free_port(), ENV)
