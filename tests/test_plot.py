"""plot.py on the log.jsonl of tiny real runs: the figure's lines hold the logged values, the PNG is drawn."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import copy_task
import plot
import train_nth_farthest
import train_rnn
from conftest import TINY_LM_FLAGS
from errors import UserInputError

REPO = Path(__file__).resolve().parents[1]


def events(run_dir: Path, kind: str) -> list[dict]:
    return [event for event in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
            if event["event"] == kind]


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    """Two tiny language-model runs of 2 epochs (LSTM and GRU), logging every 5 batches."""
    from conftest import write_corpus

    root = tmp_path_factory.mktemp("lm")
    corpus = write_corpus(root / "corpus")
    flags = [*TINY_LM_FLAGS, "--data", str(corpus), "--epochs", "2", "--log-interval", "25"]
    runs = []
    for model in ("LSTM", "GRU"):
        run_dir = root / f"tiny-{model.lower()}"
        train_rnn.main([*flags, "--model", model, "--run-dir", str(run_dir)])
        runs.append(run_dir)
    return runs


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("copy") / "tiny-dnc"
    copy_task.main(["--run-dir", str(run_dir), "-iterations", "6", "-summarize_freq", "2", "-check_freq", "3",
                    "-nhid", "8", "-mem_slot", "6", "-mem_size", "4", "-read_heads", "1", "-batch_size", "4",
                    "--test-size", "8", "--generalisation-lengths", "2", "5", "--threads", "1"])
    return run_dir


def lines_by_label(axis) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {line.get_label(): (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
            for line in axis.get_lines()}


def test_language_model_runs_overlay_train_valid_and_test_perplexity(lm_runs, tmp_path):
    output = plot.main([*map(str, lm_runs), "-o", str(tmp_path / "curves.png")])
    figure = plot.build_figure([plot.read_run(run) for run in lm_runs], ["ppl"])
    (axis,) = figure.axes
    lines = lines_by_label(axis)
    assert sorted(lines) == sorted(f"tiny-{model} {split}" for model in ("lstm", "gru")
                                   for split in ("train", "valid", "final test"))
    for run in lm_runs:
        train, valid, (test,) = events(run, "train"), events(run, "valid"), events(run, "test")
        x, y = lines[f"{run.name} train"]
        np.testing.assert_array_equal(x, [event["step"] for event in train])
        np.testing.assert_allclose(y, [event["ppl"] for event in train])
        x, y = lines[f"{run.name} valid"]
        assert len(valid) == 2
        np.testing.assert_array_equal(x, [event["step"] for event in valid])
        np.testing.assert_allclose(y, [event["ppl"] for event in valid])
        assert lines[f"{run.name} final test"][1].tolist() == pytest.approx([test["test_ppl"]])
    # one colour per run, shared by its splits
    colours = {line.get_label(): line.get_color() for line in axis.get_lines()}
    assert colours["tiny-lstm train"] == colours["tiny-lstm valid"] != colours["tiny-gru valid"]
    assert axis.get_yscale() == "log" and axis.get_xlabel().startswith("training step")
    assert axis.get_ylabel() == "perplexity"
    assert [text.get_text() for text in axis.get_legend().get_texts()] == [line.get_label()
                                                                         for line in axis.get_lines()]
    image = plt_image(output)
    assert image.shape[2] in (3, 4) and image.shape[0] > 200 and image[..., :3].std() > 0.05  # drawn, not blank


def plt_image(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_epoch_axis_puts_validation_at_whole_epochs_and_training_between(lm_runs):
    run = plot.read_run(lm_runs[0])
    figure = plot.build_figure([run], ["loss"], x_axis="epoch")
    lines = lines_by_label(figure.axes[0])
    valid, train = events(lm_runs[0], "valid"), events(lm_runs[0], "train")
    assert lines["tiny-lstm valid"][0].tolist() == [1.0, 2.0]
    np.testing.assert_allclose(lines["tiny-lstm valid"][1], [event["loss"] for event in valid])
    # a training step s of epoch e sits at e - 1 + (s - end of epoch e-1) / (steps of epoch e)
    ends = [0] + [event["step"] for event in valid]
    expected = [event["epoch"] - 1 + (event["step"] - ends[event["epoch"] - 1])
                / (ends[event["epoch"]] - ends[event["epoch"] - 1]) for event in train]
    np.testing.assert_allclose(lines["tiny-lstm train"][0], expected)
    assert all(0 < x <= 2 for x in expected) and figure.axes[0].get_yscale() == "linear"


def test_time_axis_counts_minutes_from_the_first_log_line(lm_runs):
    figure = plot.build_figure([plot.read_run(lm_runs[0])], ["ppl"], x_axis="time")
    logged = [json.loads(line) for line in (lm_runs[0] / "log.jsonl").read_text().splitlines()]
    train = events(lm_runs[0], "train")
    x, _ = lines_by_label(figure.axes[0])["tiny-lstm train"]
    np.testing.assert_allclose(x, [(event["time"] - logged[0]["time"]) / 60 for event in train])
    assert figure.axes[0].get_xlabel() == "wall-clock time (min)"


def test_sequence_task_run_draws_every_test_metric_and_the_generalisation_curve(copy_run):
    run = plot.read_run(copy_run)
    metrics = plot.default_metrics([run])
    test = events(copy_run, "test")
    assert set(metrics) == {key for key in test[0] if key not in plot.NOT_METRICS} | {"loss"}
    figure = plot.build_figure([run], ["loss", "bit_errors"])
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == ["loss", "bit errors", "loss, generalisation", "bit errors, generalisation"]
    loss = lines_by_label(figure.axes[0])
    assert sorted(loss) == ["tiny-dnc final test", "tiny-dnc test", "tiny-dnc train"]
    np.testing.assert_array_equal(loss["tiny-dnc test"][0], [3, 6])
    np.testing.assert_allclose(loss["tiny-dnc test"][1], [event["loss"] for event in test])
    np.testing.assert_allclose(loss["tiny-dnc train"][1], [event["loss"] for event in events(copy_run, "train")])
    bits = lines_by_label(figure.axes[1])
    np.testing.assert_allclose(bits["tiny-dnc test"][1], [event["bit_errors"] for event in test])
    curve = lines_by_label(figure.axes[3])["tiny-dnc"]
    generalisation = events(copy_run, "generalisation")
    assert curve[0].tolist() == [2, 5] and figure.axes[3].get_xlabel() == "sequence length"
    np.testing.assert_allclose(curve[1], [event["bit_errors"] for event in generalisation])


def test_a_language_model_and_a_task_run_share_the_loss_panel(lm_runs, copy_run, tmp_path):
    runs = [plot.read_run(lm_runs[0]), plot.read_run(copy_run)]
    (axis, _) = plot.build_figure(runs, ["loss"]).axes
    assert {label.split()[0] for label in lines_by_label(axis)} == {"tiny-lstm", "tiny-dnc"}


def test_nth_farthest_run_draws_test_accuracy(tmp_path):
    run_dir = tmp_path / "nth"
    train_nth_farthest.main(["--run-dir", str(run_dir), "--num-vectors", "3", "--vector-size", "2", "--model",
                             "LSTM", "--nhid", "8", "--mlp-sizes", "8", "--batch_size", "8", "--iterations", "4",
                             "--check-freq", "2", "--log-interval", "2", "--test-size", "8", "--threads", "1"])
    figure = plot.build_figure([plot.read_run(run_dir)], ["accuracy"])
    x, y = lines_by_label(figure.axes[0])["nth test"]
    assert x.tolist() == [2, 4]
    np.testing.assert_allclose(y, [event["accuracy"] for event in events(run_dir, "test")])


def test_nonfinite_logged_values_break_the_line(tmp_path):
    run_dir = tmp_path / "nan-run"
    run_dir.mkdir()
    log = [{"event": "train", "time": 0.0, "step": 1, "loss": 1.0}, {"event": "train", "time": 1.0, "step": 2,
                                                                        "loss": None},
           {"event": "train", "time": 2.0, "step": 3, "loss": 0.5}, {"event": "test", "time": 2.0, "step": 3,
                                                                      "loss": 0.7, "accuracy": 0.5}]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(event) + "\n" for event in log))
    x, y = lines_by_label(plot.build_figure([plot.read_run(run_dir)], ["loss"]).axes[0])["nan-run train"]
    assert x.tolist() == [1, 2, 3] and y[0] == 1.0 and np.isnan(y[1]) and y[2] == 0.5


def test_same_folder_names_are_told_apart_by_path(lm_runs, tmp_path):
    twin = tmp_path / "elsewhere" / lm_runs[0].name
    twin.mkdir(parents=True)
    (twin / "log.jsonl").write_text((lm_runs[0] / "log.jsonl").read_text())
    labels = lines_by_label(plot.build_figure([plot.read_run(lm_runs[0]), plot.read_run(twin)], ["ppl"]).axes[0])
    assert f"{twin} valid" in labels and f"{lm_runs[0]} valid" in labels


@pytest.mark.parametrize("argv, message", [
    (["{tmp}"], "is not a run folder (it has no log.jsonl)"),
    (["{tmp}/missing"], "does not exist"),
    (["{lm}", "--metric", "bit_errors"], "--metric bit_errors: no run logged it; these runs have: ppl, loss"),
    (["{copy}", "--x", "epoch"], "--x epoch needs language-model runs"),
    (["{lm}", "-o", "{tmp}/curves.pdf"], "plot.py writes PNG files"),
])
def test_errors_are_one_line(argv, message, lm_runs, copy_run, tmp_path):
    argv = [arg.format(tmp=tmp_path, lm=lm_runs[0], copy=copy_run) for arg in argv]
    result = subprocess.run([sys.executable, str(REPO / "plot.py"), *argv, "-o", str(tmp_path / "c.png")]
                            if "-o" not in argv else [sys.executable, str(REPO / "plot.py"), *argv],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr


def test_read_run_rejects_a_log_that_is_not_json(tmp_path):
    (tmp_path / "log.jsonl").write_text("not json\n")
    with pytest.raises(UserInputError, match="line 1 is not JSON"):
        plot.read_run(tmp_path)


def test_a_running_runs_half_written_last_line_is_left_out(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"event": "train", "time": 0, "step": 1, "loss": 1.0}\n{"event": "tra')
    run = plot.read_run(tmp_path)
    assert [event["step"] for event in run.events] == [1]
