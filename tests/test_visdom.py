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
from tasks.curriculum import spread_lengths

visdom = pytest.importorskip("visdom", reason="visdom is not installed: run bash tools/install_dev.sh")
CHROMIUM = shutil.which("chromium")
ENV = "dnc_test"
WINDOWS = ("memory", "link_matrix", "read_weights", "write_weights", "usage", "precedence")
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


def longest_test_example(args: dict):
    """The test set's last batch at the run's maximum length, redrawn from --test-seed as the loop draws it;
    its last example is the longest, the one the pictures show."""
    task = CopyTask(bits=args["input_size"] - 1)
    generator = torch.Generator().manual_seed(args["test_seed"])
    lengths = spread_lengths(args["test_size"], task.min_length, args["sequence_max_length"])
    batches = [task.sample(len(chunk), chunk, generator) for chunk in lengths.split(args["batch_size"])]
    return batches[-1]


def client(port: int, env: str):
    return visdom.Visdom(server="http://127.0.0.1", port=port, env=env, raise_exceptions=True,
                         use_incoming_socket=False)


def window_data(vis, name: str, env: str) -> list[dict]:
    return json.loads(vis.get_window_data(name, env=env))["content"]["data"]


def traces(vis, env: str, window: str = "loss") -> dict[str, tuple[list, list]]:
    return {trace["name"]: (trace["x"], trace["y"]) for trace in window_data(vis, window, env)}


def logged(run_dir, kind: str) -> list[dict]:
    return [event for event in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
            if event["event"] == kind]


def copy_run(run_dir, port, *extra):
    return copy_task.main(["--run-dir", str(run_dir), "-visdom", "--visdom-server", "127.0.0.1",
                           "--visdom-port", str(port), "-iterations", "4", "-summarize_freq", "2", "-check_freq", "4",
                           "-nhid", "16", "-mem_slot", "12", "-mem_size", "8", "-read_heads", "2", "-batch_size", "8",
                           "--test-size", "16", "--generalisation-lengths", "4", "--threads", "1", *extra])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # visdom 0.2.4's client calls logger.warn
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: run bash tools/install_dev.sh")
def test_copy_task_draws_memory_heatmaps_in_visdom(visdom_port, tmp_path, capfd):
    run_dir = tmp_path / "run"
    copy_run(run_dir, visdom_port, "--visdom-env", ENV, "--model", "DNC")
    printed = capfd.readouterr()
    assert f"| visdom: http://127.0.0.1:{visdom_port}/env/{ENV}" in printed.out
    assert "session" not in printed.out + printed.err  # Visdom's own chatter stays out

    vis = client(visdom_port, ENV)
    assert vis.check_connection()
    for window in (*WINDOWS, "loss"):
        assert vis.win_exists(window, env=ENV), window

    # Each heatmap holds the latest summary's data (step 4), the same as the PNG's arrays ...
    arrays = np.load(run_dir / "pictures" / "step-0000004.npz")
    assert sorted(arrays.files) == sorted(WINDOWS)
    for name in WINDOWS:
        np.testing.assert_array_equal(np.array(window_data(vis, name, ENV)[0]["z"], dtype=np.float32), arrays[name])
    # ... and the memory is that of the debug dict of the step-4 model on the longest test example.
    model, checkpoint = training.load_checkpoint(run_dir / "checkpoint.pt", kind="SequenceModel")
    assert checkpoint["train_state"]["step"] == 4
    batch = longest_test_example(checkpoint["args"])
    assert int(batch.lengths[-1]) == 4  # the longest test length
    with torch.no_grad():
        _, debug = model.debug_forward(batch.inputs[:, -1:])
    np.testing.assert_array_equal(np.array(window_data(vis, "memory", ENV)[0]["z"], dtype=np.float32),
                                  debug["memory"][-1].reshape(12, 8))
    # rows name the time steps and their phase: 4 vectors and the end marker in, 4 steps out
    reads = window_data(vis, "read_weights", ENV)[0]
    assert reads["y"] == [f"in t{step}" for step in range(5)] + [f"out t{step}" for step in range(5, 9)]
    assert reads["x"][:2] == ["h0 s0", "h0 s1"] and reads["x"][12] == "h1 s0"
    assert (reads["zmin"], reads["zmax"]) == (0, 1)
    # The loss window: the training loss at each summary, the test loss and bit errors at each test, by run.
    curves = traces(vis, ENV)
    tests = logged(run_dir, "test")
    assert curves["run train"] == ([2, 4], pytest.approx([event["loss"] for event in logged(run_dir, "train")]))
    assert curves["run test loss"] == ([4], pytest.approx([event["loss"] for event in tests]))
    assert curves["run test bit_errors"] == ([4], pytest.approx([event["bit_errors"] for event in tests]))

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


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_each_run_has_its_own_env_and_a_shared_env_keeps_runs_apart(visdom_port, tmp_path, capfd):
    # By default each run draws into an environment named after its run folder.
    copy_run(tmp_path / "dnc-a", visdom_port, "--model", "DNC")
    copy_run(tmp_path / "dnc-b", visdom_port, "--model", "DNC", "--seed", "7")
    assert "/env/dnc-b" in capfd.readouterr().out
    vis = client(visdom_port, "main")
    assert {"dnc-a", "dnc-b"} <= set(vis.get_env_list())
    for name in ("dnc-a", "dnc-b"):  # each env's loss window holds its own run's points only, once
        curves = traces(vis, name)
        assert curves[f"{name} train"][0] == [2, 4] and all(trace.startswith(name) for trace in curves)
    # In a shared environment the second run adds traces of its own instead of appending to the first's,
    # and its memory windows replace the other core's (no DNC links on a SAM run's page).
    copy_run(tmp_path / "dnc", visdom_port, "--model", "DNC", "--visdom-env", "shared")
    copy_run(tmp_path / "sam", visdom_port, "--model", "SAM", "--visdom-env", "shared", "-sparse_reads", "2")
    curves = traces(vis, "shared")
    assert curves["dnc train"][0] == curves["sam train"][0] == [2, 4]
    assert curves["sam test bit_errors"][1] == pytest.approx([logged(tmp_path / "sam", "test")[0]["bit_errors"]])
    for window in ("link_matrix", "usage"):
        assert not vis.win_exists(window, env="shared"), window
    for window in ("memory", "read_weights", "last_access", "read_positions"):
        assert vis.win_exists(window, env="shared"), window
    arrays = np.load(tmp_path / "sam" / "pictures" / "step-0000004.npz")
    np.testing.assert_array_equal(np.array(window_data(vis, "last_access", "shared")[0]["z"], dtype=np.float32),
                                  arrays["last_access"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_language_model_draws_train_and_valid_loss_live(visdom_port, tmp_path, capfd):
    from conftest import TINY_LM_FLAGS, write_corpus

    import train_rnn

    run_dir = tmp_path / "lm"
    train_rnn.main(["--data", str(write_corpus(tmp_path / "corpus")), "--run-dir", str(run_dir), *TINY_LM_FLAGS,
                    "--epochs", "2", "--log-interval", "20", "--visdom", "--visdom-server", "127.0.0.1",
                    "--visdom-port", str(visdom_port)])
    assert f"| visdom: http://127.0.0.1:{visdom_port}/env/lm" in capfd.readouterr().out
    curves = traces(client(visdom_port, "lm"), "lm")
    train, valid, (test,) = logged(run_dir, "train"), logged(run_dir, "valid"), logged(run_dir, "test")
    assert curves["lm train"] == ([event["step"] for event in train], pytest.approx([event["loss"] for event in train]))
    assert curves["lm valid"] == ([event["step"] for event in valid], pytest.approx([event["loss"] for event in valid]))
    assert curves["lm test"] == ([test["step"]], pytest.approx([test["test_loss"]]))
    assert len(valid) == 2


def test_board_names_the_fix_when_no_server_answers():
    with pytest.raises(visualize.VisdomUnavailable, match=r"python -m visdom.server -port \d+"):
        visualize.VisdomBoard("127.0.0.1", free_port(), ENV)
