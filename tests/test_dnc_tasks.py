"""The DNC tasks: copy / adding / argmax generators, their metrics, the curriculum, the sequence-task loop
behind copy_task.py, adding_task.py and argmax_task.py, and the memory pictures (models/dnc/visualize.py)."""

import json
import math
import socket
import sys

import numpy as np
import pytest
import torch

import adding_task
import argmax_task
import copy_task
import models
import training
import training.loop
from errors import UserInputError
from models.dnc import visualize
from tasks import adding, argmax, copy
from tasks.curriculum import Curriculum, example_lengths, spread_lengths

SCRIPTS = {"copy": copy_task, "adding": adding_task, "argmax": argmax_task}
# Tiny sizes for every core; DNC-family flags are ignored by the LSTM.
TINY = ["-nhid", "16", "-mem_slot", "6", "-mem_size", "4", "-read_heads", "2", "-sparse_reads", "2",
        "-temporal_reads", "1", "-batch_size", "8", "--test-size", "16", "--threads", "1"]
LSTM = ["--model", "LSTM", "-nhid", "32", "-batch_size", "16", "--test-size", "32", "--threads", "1", "-lr", "1e-2",
        "-input_size", "4", "-sequence_max_length", "3", "--generalisation-lengths", "3", "6"]


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def events(run_dir, kind):
    return [event for event in read_log(run_dir) if event["event"] == kind]


# --------------------------------------------------------------------------- generators


def test_copy_examples_match_a_loop_rederivation():
    lengths = torch.tensor([1, 3, 2, 3])
    batch = copy.sample(4, lengths, bits=3, generator=generator(1))
    assert batch.inputs.shape == (7, 4, 4) and batch.targets.shape == (7, 4, 3) and batch.mask.shape == (7, 4)
    for index, length in enumerate(lengths.tolist()):
        rows = batch.inputs[:, index].tolist()
        vectors = [row[:3] for row in rows[:length]]
        assert all(bit in (0.0, 1.0) for vector in vectors for bit in vector)
        assert all(row[3] == 0 for row in rows[:length])
        assert rows[length] == [0, 0, 0, 1]  # the end marker alone
        assert all(row == [0, 0, 0, 0] for row in rows[length + 1:])  # blank answer phase and padding
        expected_mask = [length < step <= 2 * length for step in range(7)]
        assert batch.mask[:, index].tolist() == expected_mask
        targets = batch.targets[:, index].tolist()
        assert targets[length + 1:2 * length + 1] == vectors
        assert all(row == [0, 0, 0] for step, row in enumerate(targets) if not expected_mask[step])


def test_copy_batch_of_one_length_and_determinism():
    batch = copy.sample(5, 2, bits=4, generator=generator(3))
    assert batch.inputs.shape == (5, 5, 5) and batch.lengths.tolist() == [2] * 5
    again, other = copy.sample(5, 2, 4, generator(3)), copy.sample(5, 2, 4, generator(4))
    assert torch.equal(batch.inputs, again.inputs) and not torch.equal(batch.inputs, other.inputs)
    assert 0.3 < copy.sample(400, 5, 5, generator(0)).inputs[:5, :, :5].mean() < 0.7  # fair bits


def test_adding_examples_match_a_loop_rederivation():
    lengths = torch.tensor([2, 5, 9, 4, 9, 3])
    batch = adding.sample(6, lengths, generator(2))
    assert batch.inputs.shape == (9, 6, 2) and batch.targets.shape == (6,)
    for index, length in enumerate(lengths.tolist()):
        values, markers = zip(*batch.inputs[:, index].tolist())
        assert all(0 <= value < 1 for value in values[:length])
        assert all(value == 0 and marker == 0 for value, marker in zip(values[length:], markers[length:]))
        marked = [step for step, marker in enumerate(markers) if marker == 1]
        assert len(marked) == 2 and marked[0] < length // 2 <= marked[1] < length
        assert batch.targets[index].item() == pytest.approx(values[marked[0]] + values[marked[1]])
        assert batch.mask[:, index].tolist() == [step == length - 1 for step in range(9)]


def test_argmax_examples_match_a_loop_rederivation():
    lengths = torch.tensor([2, 6, 4, 6, 5])
    batch = argmax.sample(5, lengths, values=3, positions=8, generator=generator(5))
    assert batch.inputs.shape == (7, 5, 4) and batch.targets.dtype == torch.long
    for index, length in enumerate(lengths.tolist()):
        rows = batch.inputs[:, index].tolist()
        assert all(sum(row[:3]) == 1 and row[3] == 0 for row in rows[:length])
        assert rows[length] == [0, 0, 0, 1]  # the query step
        digits = [row.index(1.0) for row in rows[:length]]
        assert batch.targets[index].item() == digits.index(max(digits))  # the first largest digit
        assert batch.mask[:, index].tolist() == [step == length for step in range(7)]


def test_argmax_answers_on_ties_and_limits():
    torch.manual_seed(0)
    # Many ties: 2 digit values over 6 steps; the answer is always the first 1 (or 0 if none).
    batch = argmax.sample(200, 6, values=2, positions=6, generator=generator(0))
    digits = batch.inputs[:6, :, :2].argmax(-1)  # [T, B]
    first_one = torch.where(digits.any(0), (digits == 1).int().argmax(0), torch.zeros(200, dtype=torch.long))
    assert torch.equal(batch.targets, first_one)
    with pytest.raises(ValueError, match="above the 4 positions"):
        argmax.sample(2, 5, values=3, positions=4)


def test_generators_reject_bad_sizes():
    with pytest.raises(ValueError, match="at least 1 bit"):
        copy.CopyTask(bits=0)
    with pytest.raises(ValueError, match="at least 2"):
        adding.sample(3, 1)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        copy.sample(3, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="batch_size must be positive"):
        example_lengths(2, 0)


# --------------------------------------------------------------------------- losses and metrics


def test_copy_bit_errors_and_loss_on_a_hand_made_prediction():
    batch = copy.sample(2, 2, bits=3, generator=generator(7))
    logits = batch.targets * 4 - 2  # right everywhere in the answer phase, and 0 (-2) elsewhere
    assert copy.bit_errors(logits, batch).tolist() == [0, 0]
    wrong = logits.clone()
    wrong[3, 0] *= -1  # all 3 bits of example 0's first answer step
    wrong[0, 1] = 5.0  # outside the answer phase: not counted
    metrics = copy.metrics(wrong, batch)
    assert copy.bit_errors(wrong, batch).tolist() == [3, 0]
    assert metrics["bit_errors"] == 1.5 and metrics["sequence_accuracy"] == 0.5
    # zero logits: log 2 per answer bit, whatever the targets; outside the mask nothing counts
    zeros = torch.zeros_like(logits)
    zeros[0] = 100.0
    assert copy.loss(zeros, batch).item() == pytest.approx(math.log(2))
    assert copy.loss(logits, batch).item() == pytest.approx(math.log1p(math.exp(-2)))  # each bit right by a logit of 2


def test_copy_loss_counts_only_answer_bits_of_mixed_lengths():
    """Lengths 1 and 3 in one batch (7 steps): the loss is the mean over the 4 answer steps' bits, re-derived
    bit by bit from -log sigmoid; logits outside the answer phase (input phase, marker, padding) get no
    gradient and do not change the loss, however large."""
    batch = copy.sample(2, torch.tensor([1, 3]), bits=3, generator=generator(5))
    logits = torch.randn(7, 2, 3, generator=generator(6), dtype=torch.float64).requires_grad_()
    value = copy.loss(logits, batch.__class__(*(t.double() if t.is_floating_point() else t for t in batch)))
    answer = {0: [2], 1: [4, 5, 6]}  # steps length + 1 .. 2 length
    terms = []
    for example, steps in answer.items():
        for step in steps:
            for bit in range(3):
                x, y = logits[step, example, bit].item(), batch.targets[step, example, bit].item()
                terms.append(-math.log(1 / (1 + math.exp(-x))) if y == 1 else -math.log(1 - 1 / (1 + math.exp(-x))))
    assert value.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    value.backward()
    outside = torch.ones(7, 2, dtype=torch.bool)
    for example, steps in answer.items():
        outside[steps, example] = False
    assert (logits.grad[outside] == 0).all() and (logits.grad[~outside] != 0).all()
    changed = logits.detach().clone()
    changed[outside] = 1e4
    assert copy.loss(changed, batch).item() == pytest.approx(value.item(), rel=1e-6)


def test_adding_metrics_on_a_hand_made_prediction():
    batch = adding.sample(2, torch.tensor([3, 4]), generator(0))
    outputs = torch.full((4, 2, 1), 9.0)  # wrong everywhere but at the answer steps
    outputs[2, 0, 0] = batch.targets[0] + 0.03
    outputs[3, 1, 0] = batch.targets[1] - 0.05
    metrics = adding.metrics(outputs, batch)
    assert metrics["mse"] == pytest.approx((0.03 ** 2 + 0.05 ** 2) / 2, rel=1e-4)
    assert metrics["accuracy"] == 0.5 and metrics["loss"] == metrics["mse"]


def test_argmax_metrics_on_a_hand_made_prediction():
    batch = argmax.sample(4, torch.tensor([2, 3, 4, 4]), values=3, positions=5, generator=generator(0))
    logits = torch.zeros(5, 4, 5)
    for index, length in enumerate(batch.lengths.tolist()):
        logits[length, index, (batch.targets[index] + (index % 2)) % 5] = 10.0  # right for examples 0 and 2
    assert argmax.metrics(logits, batch)["accuracy"] == 0.5
    assert argmax.loss(torch.zeros(5, 4, 5), batch).item() == pytest.approx(math.log(5))


def test_human_readable_dumps():
    batch = copy.sample(2, 2, bits=3, generator=generator(0))
    text = copy.to_human_readable(batch, batch.targets * 4 - 2, index=1)
    assert "length 2" in text and "(0 bit errors)" in text and text.count("\n") == 3
    assert " + " in adding.to_human_readable(adding.sample(1, 6, generator(0)))
    assert "largest first at position" in argmax.to_human_readable(argmax.sample(1, 3, generator=generator(0)))


# --------------------------------------------------------------------------- the curriculum


def test_curriculum_grows_at_the_right_iterations_and_stops_at_its_limit():
    curriculum = Curriculum(max_length=2, increment=3, every=4, min_length=1, limit=9)
    grown = [step for step in range(0, 17) if curriculum.update(step)]
    assert grown == [4, 8, 12] and curriculum.max_length == 9  # 2 -> 5 -> 8 -> 9 (the limit), then no change
    fixed = Curriculum(max_length=3)
    assert not any(fixed.update(step) for step in range(1, 3000)) and fixed.max_length == 3
    lengths = [Curriculum(5, min_length=2).sample_length(g) for g in [generator(0)] for _ in range(300)]
    assert set(lengths) == {2, 3, 4, 5}
    restored = Curriculum(2, 1, 10)
    restored.load_state_dict(curriculum.state_dict())
    assert restored.max_length == 9
    assert spread_lengths(5, 1, 3).tolist() == [1, 2, 2, 2, 3]
    with pytest.raises(ValueError, match="sequence_max_length must be at least 2"):
        Curriculum(1, min_length=2)


def test_curriculum_in_the_loop_survives_resume_bitwise(tmp_path):
    flags = [*LSTM, "-iterations", "10", "-curriculum_increment", "2", "-curriculum_freq", "4",
             "-summarize_freq", "2", "-check_freq", "3"]
    whole = copy_task.main(["--run-dir", str(tmp_path / "whole"), *flags])
    assert [(e["step"], e["max_length"]) for e in events(tmp_path / "whole", "curriculum")] == [(4, 5), (8, 7)]
    assert [e["max_length"] for e in events(tmp_path / "whole", "test")] == [3, 5, 7, 7]  # steps 3, 6, 9, 10
    stopped = copy_task.main(["--run-dir", str(tmp_path / "parts"), *flags, "--max-steps", "6"])
    assert stopped["stopped"] == "max-steps"
    saved = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert saved["curriculum"] == {"max_length": 5} and saved["train_state"]["step"] == 6
    resumed = copy_task.main(["--resume", str(tmp_path / "parts")])
    assert resumed["step"] == 10 and resumed["test"] == whole["test"]
    assert resumed["generalisation"] == whole["generalisation"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert b["curriculum"] == {"max_length": 7}
    strip = lambda log: [{k: v for k, v in e.items() if k not in ("time", "seconds", "ms_per_step")}
                         for e in log if e["event"] != "resume"]
    assert strip(read_log(tmp_path / "parts")) == strip(read_log(tmp_path / "whole"))


# --------------------------------------------------------------------------- the loop and the scripts


def test_tiny_copy_run_learns(tmp_path):
    result = copy_task.main(["--run-dir", str(tmp_path / "run"), *LSTM, "-iterations", "150",
                             "-summarize_freq", "50", "-check_freq", "50"])
    train = events(tmp_path / "run", "train")
    tests = events(tmp_path / "run", "test")
    assert [e["step"] for e in tests] == [50, 100, 150] and all("bit_errors" in e for e in tests)
    assert train[-1]["loss"] < 0.75 * train[0]["loss"]
    assert result["test"]["bit_errors"] < 0.5 * 3 * 3 / 2  # chance is half of the 3 x 2 bits of an average sequence
    assert [e["length"] for e in events(tmp_path / "run", "generalisation")] == [3, 6]
    final, = events(tmp_path / "run", "final")
    assert final["bit_errors"] == result["test"]["bit_errors"] == tests[-1]["bit_errors"]  # the same model and set
    model, checkpoint = training.load_checkpoint(tmp_path / "run" / "best.pt", kind="SequenceModel")
    assert isinstance(model, models.SequenceModel) and checkpoint["train_state"]["best_max_length"] == 3
    assert not (tmp_path / "run" / "pictures").exists()  # an LSTM has no memory to draw


def test_non_finite_steps_are_skipped_and_logged(tmp_path, monkeypatch):
    original = training.SequenceTaskTrainer.compute_loss

    def compute_loss(self, batch):
        loss = original(self, batch)
        return loss * float("nan") if self.state.step + 1 in (2, 3) else loss

    monkeypatch.setattr(training.SequenceTaskTrainer, "compute_loss", compute_loss)
    result = copy_task.main(["--run-dir", str(tmp_path / "run"), *LSTM, "-iterations", "6", "-check_freq", "6"])
    assert result["step"] == 6 and [e["step"] for e in events(tmp_path / "run", "nonfinite")] == [2, 3]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["train_state"]["skipped_steps"] == 2


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_dry_runs_draw_the_dnc_memory(script, tmp_path):
    run_dir = tmp_path / script
    result = SCRIPTS[script].main(["--run-dir", str(run_dir), "--dry-run", *TINY, "-summarize_freq", "2",
                                   "-sequence_max_length", "4", "--generalisation-lengths", "4", "5"])
    assert result["stopped"] is None and result["step"] == 2 and set(result["generalisation"]) == {4, 5}
    assert json.loads((run_dir / "args.json").read_text())["args"]["model"] == "DNC"
    pictures = sorted(path.name for path in (run_dir / "pictures").iterdir())
    assert pictures == ["step-0000002.npz", "step-0000002.png"]
    arrays = np.load(run_dir / "pictures" / "step-0000002.npz")
    assert set(arrays.files) == {"memory", "link_matrix", "read_weights", "write_weights", "usage", "precedence"}
    assert arrays["memory"].shape == (6, 4) and arrays["link_matrix"].shape == (6, 6)


@pytest.mark.parametrize("memory_type", ["sam", "sdnc"])
def test_sparse_memories_run_the_copy_task(memory_type, tmp_path):
    result = copy_task.main(["--run-dir", str(tmp_path / "run"), "--dry-run", *TINY, "-memory_type", memory_type,
                             "-summarize_freq", "2", "--generalisation-lengths", "4"])
    assert result["step"] == 2 and math.isfinite(result["test"]["loss"])
    arrays = np.load(tmp_path / "run" / "pictures" / "step-0000002.npz")
    assert arrays["memory"].shape == (6, 4) and "usage" not in arrays.files  # SAM's usage is the last access step
    assert arrays["last_access"].shape == arrays["read_positions"].shape == (9, 6)  # T = 2 * 4 + 1 steps
    assert set(np.unique(arrays["read_positions"])) <= {0.0, 0.5, 1.0}
    if memory_type == "sdnc":  # sparse links (K_L = -temporal_reads entries per slot), drawn against the slots
        assert arrays["link_matrix"].shape == arrays["rev_link_matrix"].shape == (6, 6)
        assert "precedence" in arrays.files
    else:
        assert "link_matrix" not in arrays.files


def test_rmsprop_has_the_published_settings_and_learns(tmp_path):
    """-optim rmsprop: torch's RMSprop with the published scripts' momentum 0.9 and eps 1e-10; the test loss falls."""
    run_dir = tmp_path / "run"
    copy_task.main(["--run-dir", str(run_dir), *LSTM, "-optim", "rmsprop", "-lr", "3e-3", "-iterations", "60",
                    "-check_freq", "30", "--generalisation-lengths", "3"])
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["optimizer"]
    group = saved["param_groups"][0]
    assert (group["momentum"], group["eps"], group["alpha"], group["lr"]) == (0.9, 1e-10, 0.99, 3e-3)
    assert {"square_avg", "momentum_buffer"} <= set(next(iter(saved["state"].values())))
    tests = events(run_dir, "test")
    assert [e["step"] for e in tests[:2]] == [30, 60]
    assert tests[1]["loss"] < tests[0]["loss"] < math.log(2)  # below guessing each bit


def test_published_flags_parse():
    argv = ["-cuda", "-1", "-lr", "0.001", "-rnn_type", "gru", "-memory_type", "sam", "-nlayer", "2", "-nhlayer", "1",
            "-nhid", "32", "-dropout", "0.1", "-mem_slot", "32", "-mem_size", "8", "-read_heads", "2",
            "-sparse_reads", "3", "-temporal_reads", "1", "-batch_size", "50", "-optim", "rmsprop",
            "-sequence_max_length", "8", "-curriculum_increment", "1", "-curriculum_freq", "500",
            "-iterations", "10", "-summarize_freq", "5", "-check_freq", "7", "-input_size", "5", "-visdom", "-clip", "9"]
    args = training.parse_sequence_args(copy_task.build_parser(), argv).args
    assert (args.device, args.lr, args.rnn_type, args.model, args.nlayer, args.nhlayer, args.nhid, args.dropouth) == \
        ("cpu", 0.001, "gru", "SAM", 2, 1, 32, 0.1)
    assert (args.mem_slot, args.mem_size, args.read_heads, args.sparse_reads, args.temporal_reads) == (32, 8, 2, 3, 1)
    assert (args.batch_size, args.optimizer, args.sequence_max_length, args.curriculum_increment,
            args.curriculum_freq) == (50, "rmsprop", 8, 1, 500)
    assert (args.iterations, args.log_interval, args.check_freq, args.input_size, args.visdom, args.clip) == \
        (10, 5, 7, 5, True, 9.0)
    double = training.parse_sequence_args(copy_task.build_parser(), [a.replace("-", "--", 1) if a.startswith("-")
                                                                     and not a[1].isdigit() else a for a in argv]).args
    assert vars(double) == vars(args)
    parse = lambda *argv: training.parse_sequence_args(copy_task.build_parser(), list(argv)).args
    assert parse("--cuda").device == "cuda:0" and parse("-cuda", "1").device == "cuda:1"
    assert parse().device == "auto" and parse().model == "DNC" and parse("--model", "LSTM", "-memory_type", "sam").model == "LSTM"
    defaults = parse()
    assert (defaults.input_size, defaults.nhid, defaults.lr, defaults.optimizer, defaults.clip, defaults.batch_size,
            defaults.mem_size, defaults.mem_slot, defaults.read_heads, defaults.sparse_reads, defaults.temporal_reads,
            defaults.sequence_max_length, defaults.curriculum_increment, defaults.curriculum_freq, defaults.iterations,
            defaults.log_interval, defaults.check_freq) == \
        (6, 64, 1e-4, "adam", 50.0, 100, 20, 16, 4, 10, 2, 4, 0, 1000, 100000, 100, 100)


def test_default_generalisation_lengths_follow_the_curriculum(tmp_path):
    args = training.parse_sequence_args(copy_task.build_parser(), ["-sequence_max_length", "4",
                                                                        "-curriculum_increment", "2",
                                                                   "-curriculum_freq", "10", "-iterations", "30"]).args
    assert training.default_generalisation_lengths(args) == [10, 20, 50, 100]  # 4 + 2 * 3 = 10 reached
    result = argmax_task.main(["--run-dir", str(tmp_path / "run"), "--dry-run", "--model", "LSTM", *TINY[-6:],
                               "-sequence_max_length", "3", "--test-size", "8"])
    assert set(result["generalisation"]) == {3, 6}  # the two shortest of 3, 6, 15, 30 in a dry run
    assert training.load_checkpoint(tmp_path / "run")[0].config.output_size == 30  # positions up to the longest


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("script, flags, message", [
    ("copy", ["-sequence_max_length", "0"], "-sequence_max_length must be positive"),
    ("copy", ["-curriculum_increment", "-1"], "-curriculum_increment must be at least 0"),
    ("adding", ["--variant", "standard", "-input_size", "6"], "-input_size must be 2"),
    ("adding", ["-sequence_max_length", "1"], "sequence_max_length must be at least 2"),
    ("argmax", ["-sequence_max_length", "8", "--generalisation-lengths", "5"], "above this task's limit of 5"),
    ("copy", ["-input_size", "1"], "at least 1 bit"),
    ("copy", ["--model", "NOPE"], "unknown core 'NOPE'"),
    ("copy", ["-mem_slot", "0"], "-mem_slot must be a positive integer, got 0"),
    ("copy", ["-visdom", "--visdom-server", "127.0.0.1", "--visdom-port", "PORT"], "no Visdom server answers"),
])
def test_bad_flags_are_named(script, flags, message, tmp_path):
    flags = [str(free_port()) if flag == "PORT" else flag for flag in flags]
    with pytest.raises(UserInputError, match=message):
        SCRIPTS[script].main(["--run-dir", str(tmp_path / "bad"), "--dry-run", *TINY, *flags])
    assert not (tmp_path / "bad").exists()  # nothing is created before the flags are checked


def test_visdom_not_installed_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "visdom", None)  # import visdom now raises ImportError
    with pytest.raises(UserInputError, match="-visdom needs the visdom package: pip install visdom"):
        copy_task.main(["--run-dir", str(tmp_path / "run"), "--dry-run", *LSTM, "-visdom"])


def test_resuming_another_kind_of_checkpoint_is_refused(tmp_path):
    copy_task.main(["--run-dir", str(tmp_path / "copy"), "--dry-run", *LSTM])
    import train_nth_farthest

    with pytest.raises(UserInputError, match="holds a SequenceModel, not a TaskModel"):
        train_nth_farthest.main(["--resume", str(tmp_path / "copy")])


def test_bad_flag_is_one_line_on_the_command_line(tmp_path, command_line):
    code, _, stderr = command_line(copy_task, "-sequence_max_length", "0", "--run-dir", tmp_path / "run")
    assert code == 2 and stderr.strip().count("\n") == 0
    assert stderr.startswith("error: -sequence_max_length must be positive")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- pictures


def synthetic_debug(rows=6, slots=5, width=3, heads=2):
    rng = np.random.default_rng(0)
    return {"memory": rng.normal(size=(rows, slots * width)).astype(np.float32),
            "link_matrix": rng.random((rows, slots * slots)).astype(np.float32),
            "precedence": rng.random((rows, slots)).astype(np.float32),
            "read_weights": rng.random((rows, heads * slots)).astype(np.float32),
            "write_weights": rng.random((rows, slots)).astype(np.float32),
            "usage_vector": rng.random((rows, slots)).astype(np.float32)}


def test_heatmaps_of_a_debug_dict(tmp_path):
    debug = synthetic_debug()
    maps = visualize.heatmaps(debug)
    assert list(maps) == ["memory", "link_matrix", "read_weights", "write_weights", "usage", "precedence"]
    np.testing.assert_array_equal(maps["memory"].values, debug["memory"][-1].reshape(5, 3))
    np.testing.assert_array_equal(maps["link_matrix"].values, debug["link_matrix"][-1].reshape(5, 5))
    np.testing.assert_array_equal(maps["read_weights"].values, debug["read_weights"])
    np.testing.assert_array_equal(maps["usage"].values, debug["usage_vector"])
    np.testing.assert_array_equal(maps["precedence"].values, debug["precedence"])
    # quantities in [0, 1] share the scale 0-1; the memory has its own, and the titles say which
    for name in ("link_matrix", "read_weights", "write_weights", "usage", "precedence"):
        assert maps[name].scale == (0.0, 1.0) and "scale 0-1" in maps[name].title, name
    assert maps["memory"].scale is None and "own scale" in maps["memory"].title
    assert visualize.heatmaps({"hidden": np.zeros((2, 3))}) == {}
    path = visualize.save_png(maps, tmp_path / "pictures" / "step.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = np.load(tmp_path / "pictures" / "step.npz")
    assert all(np.array_equal(saved[name], heatmap.values) for name, heatmap in maps.items())


def test_sparse_debug_dict_names_last_access_and_draws_read_positions_and_links_against_slots():
    """SAM / SDNC: `usage` is the last access step (not a usage), read positions become a slot map, and
    the SDNC's K_L link entries are drawn at the slots they point to."""
    rows, slots = 3, 5
    rng = np.random.default_rng(1)
    debug = {"memory": rng.normal(size=(rows, slots * 2)).astype(np.float32),
             "read_weights": rng.random((rows, 2 * slots)).astype(np.float32),
             "write_weights": rng.random((rows, slots)).astype(np.float32),
             "usage": np.array([[0, -1, 2, 5, -5]] * rows, dtype=np.float32),
             "read_positions": np.array([[1, 3, 4], [0, 0, 2], [2, 4, 2]]),
             "link_matrix": np.tile(np.array([[.5, .1], [0, 0], [.9, .2], [0, 0], [.3, 0]], np.float32).reshape(1, -1),
                                    (rows, 1)),
             "link_index": np.tile(np.array([[2, 4], [1, 1], [0, 3], [3, 3], [1, 4]]).reshape(1, -1), (rows, 1)),
             "rev_link_matrix": np.tile(np.array([[.9, 0], [.3, 0], [.5, 0], [.2, 0], [.1, 0]],
                                                 np.float32).reshape(1, -1), (rows, 1)),
             "rev_link_index": np.tile(np.array([[2, 0], [4, 1], [0, 2], [2, 3], [0, 4]]).reshape(1, -1), (rows, 1))}
    maps = visualize.heatmaps(debug)
    assert "usage" not in maps and maps["last_access"].scale is None
    assert "last access step" in maps["last_access"].title
    np.testing.assert_array_equal(maps["last_access"].values, debug["usage"])
    expected = np.zeros((rows, slots), np.float32)
    expected[0, [1, 3]] = 1; expected[0, 4] = 0.5  # noqa: E702  rows read, then the least-used row
    expected[1, 0] = 1; expected[1, 2] = 0.5  # noqa: E702
    expected[2, [2, 4]] = 1  # the least-used row 2 was also read: 1 wins
    np.testing.assert_array_equal(maps["read_positions"].values, expected)
    forward = np.zeros((slots, slots), np.float32)
    for row, (columns, values) in enumerate(zip([[2, 4], [1, 1], [0, 3], [3, 3], [1, 4]],
                                                [[.5, .1], [0, 0], [.9, .2], [0, 0], [.3, 0]])):
        for column, value in zip(columns, values):
            if value:
                forward[row, column] = value
    np.testing.assert_allclose(maps["link_matrix"].values, forward)
    assert maps["link_matrix"].xlabel == "slot written before"
    backward = np.zeros((slots, slots), np.float32)
    backward[2, 0], backward[4, 1], backward[0, 2], backward[2, 3], backward[0, 4] = .9, .3, .5, .2, .1
    np.testing.assert_allclose(maps["rev_link_matrix"].values, backward)
    assert maps["read_weights"].group == slots


def test_rows_name_the_phases_and_the_png_marks_them_with_slot_ticks_and_head_separators():
    debug = synthetic_debug(rows=2 * 7, slots=5, heads=3)  # 7 steps of 2 layers
    mask = np.array([False, False, False, False, True, True, True])
    start = visualize.answer_start(mask)
    assert start == 4
    assert visualize.answer_start(np.ones(5, bool)) is None and visualize.answer_start(np.zeros(5, bool)) is None
    assert visualize.answer_start(np.array([1, 1, 0, 0, 1], bool)) == 4  # the trailing run of answers
    maps = visualize.heatmaps(debug, steps=7, output_start=start)
    names = maps["write_weights"].row_names
    assert names[:2] == ["in t0 l0", "in t0 l1"] and names[8:10] == ["out t4 l0", "out t4 l1"]
    assert maps["write_weights"].ylabel == "time step x layer"
    drawing = visualize.figure(maps)
    panel = {axis.get_title(): axis for axis in drawing.axes}
    reads = panel["read weights (scale 0-1)"]
    vertical = sorted(line.get_xdata()[0] for line in reads.get_lines() if line.get_color() == "white")
    assert vertical == [4.5, 9.5]  # between the three heads of 5 slots
    assert [tick.get_text() for tick in reads.get_xticklabels()] == ["head 0", "head 1", "head 2"]
    boundary = [line.get_ydata()[0] for line in reads.get_lines() if line.get_color() == "red"]
    assert boundary == [7.5]  # below row 8, the first output row
    writes = panel["write weights (scale 0-1)"]
    assert all(float(tick).is_integer() for tick in writes.get_xticks())
    assert writes.images[0].get_clim() == (0.0, 1.0)
    memory = panel["memory after the last step (own scale)"]
    assert memory.images[0].get_clim() == (debug["memory"][-1].min(), debug["memory"][-1].max())
    opts = visualize.visdom_opts(maps["read_weights"], "@ 3")
    assert opts["rownames"] == names and opts["columnnames"][5] == "h1 s0" and (opts["xmin"], opts["xmax"]) == (0, 1)
    assert visualize.visdom_opts(maps["memory"])["rownames"] == ["0", "1", "2", "3", "4"]


def test_large_memories_are_drawn_in_their_first_slots():
    maps = visualize.heatmaps(synthetic_debug(rows=2, slots=visualize.MAX_SLOTS + 10, width=2))
    assert maps["memory"].values.shape == (visualize.MAX_SLOTS, 2)
    assert maps["link_matrix"].values.shape == (visualize.MAX_SLOTS, visualize.MAX_SLOTS)
    assert maps["read_weights"].values.shape == (2, 2 * visualize.MAX_SLOTS)  # 2 heads
    assert maps["write_weights"].values.shape == maps["usage"].values.shape == (2, visualize.MAX_SLOTS)


@pytest.mark.parametrize("core, fused", [("DNC", True), ("SAM", False)])
def test_device_side_decisions_and_bf16_in_the_sequence_loop(tmp_path, monkeypatch, core, fused):
    """The GPU's rule (skips decided on the device, reads at log lines) gives the CPU's run; bf16 trains.

    The DNC runs with fused Adam (its kernel skips the NaN step), which rounds differently from the
    for-loop Adam: equal to 1e-5. SAM's top-K reads turn such roundings into other rows read, so it
    runs the other device-side path (the update undone with torch.where), which must be bitwise equal.
    """
    flags = ["--model", core, *TINY, "-iterations", "6", "-check_freq", "3", "-summarize_freq", "2", "-lr", "1e-3"]
    original = training.SequenceTaskTrainer.compute_loss

    def compute_loss(self, batch):  # a NaN at step 4: skipped, logged, and the weights keep their values
        loss = original(self, batch)
        return loss * float("nan") if self.state.step + 1 == 4 else loss

    monkeypatch.setattr(training.SequenceTaskTrainer, "compute_loss", compute_loss)
    host = copy_task.main(["--run-dir", str(tmp_path / "host"), *flags])
    monkeypatch.setattr(training.loop, "decide_on_device", lambda device: True)
    if not fused:
        monkeypatch.setattr(training.loop, "FUSED", ())
    device = copy_task.main(["--run-dir", str(tmp_path / "device"), *flags])
    assert [e["step"] for e in events(tmp_path / "device", "nonfinite")] == [4]
    a = torch.load(tmp_path / "host" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "device" / "checkpoint.pt", weights_only=True)["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6) if fused else torch.equal(a[key], b[key]), key
    assert device["test"]["loss"] == pytest.approx(host["test"]["loss"], rel=1e-5)
    monkeypatch.undo()
    # --compile (the DNC's default on the CPU): the compiled step under autocast, which once failed to trace
    bf16 = copy_task.main(["--run-dir", str(tmp_path / "bf16"), *flags, "--precision", "bf16", "--compile"])
    assert math.isfinite(bf16["test"]["loss"]) and bf16["test"]["loss"] == pytest.approx(host["test"]["loss"], rel=0.05)


@pytest.mark.cpu_compile_default
def test_the_dnc_compiles_its_step_by_default_on_the_cpu_too(tmp_path, capsys):
    """`--compile` unset: on the CPU the DNC's dense step is compiled (it pays there, `compiles_on_cpu`) and
    trains as the eager step does; an LSTM is not compiled; --no-compile keeps the DNC eager."""
    flags = [*TINY, "--test-size", "8", "-input_size", "4", "-sequence_max_length", "3", "-iterations", "3",
             "-summarize_freq", "1", "-check_freq", "3", "--generalisation-lengths", "3"]
    copy_task.main(["--run-dir", str(tmp_path / "default"), *flags])
    assert ", compiled steps: DNC," in capsys.readouterr().out
    copy_task.main(["--run-dir", str(tmp_path / "eager"), *flags, "--no-compile"])
    assert "compiled steps" not in capsys.readouterr().out
    compiled, eager = (events(tmp_path / name, "train") for name in ("default", "eager"))
    assert [event["loss"] for event in compiled] == pytest.approx([event["loss"] for event in eager], rel=1e-4)
    copy_task.main(["--run-dir", str(tmp_path / "lstm"), *LSTM, "-iterations", "1", "-check_freq", "1"])
    assert "compiled steps" not in capsys.readouterr().out
