"""views.py: --tensorboard writes every logged number as scalars (read back from the event files), a missing
package or server is a one-line error before any run folder exists, and a viewer that goes away is dropped."""

import json
import socket
import sys

import pytest

import copy_task
import train_rnn
import views
from conftest import TINY_LM_FLAGS
from errors import UserInputError
from training.run import Run

TINY_COPY = ["-iterations", "4", "-summarize_freq", "2", "-check_freq", "2", "-nhid", "8", "-mem_slot", "6",
             "-mem_size", "4", "-read_heads", "1", "-batch_size", "4", "--test-size", "8",
             "--generalisation-lengths", "2", "5", "--threads", "1"]


def logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_event_files_hold_the_logged_numbers(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install tensorboard")
    run_dir, board_dir = tmp_path / "copy", tmp_path / "boards"
    copy_task.main(["--run-dir", str(run_dir), "--tensorboard", str(board_dir), *TINY_COPY])
    assert f"| tensorboard: tensorboard --logdir {board_dir}" in capsys.readouterr().out
    found = scalars(board_dir / "copy")
    events = logged(run_dir)
    for kind, field in (("train", "loss"), ("test", "loss"), ("test", "bit_errors"), ("test", "lr"),
                        ("final", "bit_errors")):
        expected = [(event["step"], pytest.approx(event[field], rel=1e-6))
                    for event in events if event["event"] == kind]
        assert found[f"{kind}/{field}"] == expected, (kind, field)
    generalisation = [(event["length"], pytest.approx(event["bit_errors"], rel=1e-6)) for event in events
                      if event["event"] == "generalisation"]
    assert found["generalisation/bit_errors"] == generalisation and [length for length, _ in generalisation] == [2, 5]
    assert not any(tag.endswith(("/step", "/time", "/length")) for tag in found)


def test_bare_tensorboard_writes_into_the_run_folder(tmp_path, corpus_dir):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install tensorboard")
    run_dir = tmp_path / "lm"
    train_rnn.main(["--data", str(corpus_dir), "--run-dir", str(run_dir), *TINY_LM_FLAGS, "--tensorboard"])
    found = scalars(run_dir / "tensorboard")
    valid = [event for event in logged(run_dir) if event["event"] == "valid"]
    assert found["valid/ppl"] == [(event["step"], pytest.approx(event["ppl"], rel=1e-6)) for event in valid]
    assert "test/test_ppl" in found and "train/tokens_per_s" in found


def test_tensorboard_without_the_package_is_a_one_line_error_before_the_run(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(UserInputError, match=r"^--tensorboard needs the tensorboard package: pip install tensorboard$"):
        train_rnn.main(["--data", str(corpus_dir), "--run-dir", str(tmp_path / "lm"), *TINY_LM_FLAGS,
                        "--tensorboard"])
    with pytest.raises(UserInputError, match="pip install tensorboard"):
        copy_task.main(["--run-dir", str(tmp_path / "copy"), "--tensorboard", str(tmp_path / "tb"), *TINY_COPY])
    assert not (tmp_path / "lm").exists() and not (tmp_path / "copy").exists()


def test_visdom_without_a_server_is_a_one_line_error_before_the_run(tmp_path, corpus_dir):
    pytest.importorskip("visdom", reason="visdom is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UserInputError, match=rf"no Visdom server answers at http://127.0.0.1:{port}; start one with "
                                             rf"`python -m visdom.server -port {port}`"):
        train_rnn.main(["--data", str(corpus_dir), "--run-dir", str(tmp_path / "lm"), *TINY_LM_FLAGS, "--visdom",
                        "--visdom-server", "127.0.0.1", "--visdom-port", str(port)])
    assert not (tmp_path / "lm").exists()


def test_a_listener_that_fails_is_dropped_and_the_run_goes_on(tmp_path, capsys):
    run = Run(tmp_path / "run")
    seen = []

    class Gone:
        def __call__(self, event, record):
            raise ConnectionError("server went away")

    run.add_listener(Gone())
    run.add_listener(lambda event, record: seen.append((event, record["loss"])))
    run.log("train", step=1, loss=2.0)
    run.log("train", step=2, loss=1.5)
    assert seen == [("train", 2.0), ("train", 1.5)] and len(run.listeners) == 1
    assert capsys.readouterr().out.count("| Gone: stopped (server went away); log.jsonl has every event") == 1
    assert [event["loss"] for event in logged(tmp_path / "run")] == [2.0, 1.5]


def test_curves_turn_events_into_traces_named_by_run():
    class Board:
        def __init__(self):
            self.points = []

        def line(self, window, trace, x, y, title, xlabel, ylabel):
            self.points.append((window, trace, x, y, title))

    board = Board()
    task = views.VisdomCurves(board, "copy-1", metric="bit_errors")
    task("train", {"step": 10, "loss": 0.5})
    task("train", {"step": 20, "loss": None})  # a non-finite loss: a gap, not a point
    task("test", {"step": 20, "loss": 0.4, "bit_errors": 3.0, "accuracy": 0.9})
    task("curriculum", {"step": 20, "max_length": 5})
    assert board.points == [("loss", "copy-1 train", 10, 0.5, "loss and test bit errors"),
                            ("loss", "copy-1 test loss", 20, 0.4, "loss and test bit errors"),
                            ("loss", "copy-1 test bit_errors", 20, 3.0, "loss and test bit errors")]
    board.points.clear()
    lm = views.VisdomCurves(board, "lm", metric=None)
    lm("valid", {"epoch": 1, "step": 30, "loss": 5.0, "ppl": 148.4})
    lm("test", {"step": 30, "valid_loss": 5.0, "test_loss": 4.9, "test_ppl": 134.3})
    assert [(trace, x, y) for _, trace, x, y, _ in board.points] == [("lm valid", 30, 5.0), ("lm test", 30, 4.9)]
