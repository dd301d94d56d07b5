"""The adding task's published variant (one-hot digits, decoded outputs summed) and adding_task.py's
--variant flag; the standard variant's generator and metrics are tested in test_dnc_tasks.py."""

import json

import pytest
import torch

import adding_task
import training
from errors import UserInputError
from tasks import adding

LSTM = ["--model", "LSTM", "-nhid", "32", "-batch_size", "16", "--test-size", "32", "--threads", "1", "-lr", "1e-2"]


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def events(run_dir, kind):
    return [event for line in (run_dir / "log.jsonl").read_text().splitlines()
            if (event := json.loads(line))["event"] == kind]


# --------------------------------------------------------------------------- the generator


def test_digit_examples_match_a_loop_rederivation():
    lengths = torch.tensor([2, 5, 3, 5, 4])
    batch = adding.sample_digits(5, lengths, values=3, generator=generator(1))
    assert batch.inputs.shape == (6, 5, 4) and batch.targets.shape == (5,) and batch.mask.shape == (6, 5)
    assert batch.targets.dtype == torch.float32 and batch.lengths.tolist() == lengths.tolist()
    for index, length in enumerate(lengths.tolist()):
        rows = batch.inputs[:, index].tolist()
        assert all(sum(row[:3]) == 1 and row[3] == 0 for row in rows[:length])  # one digit, no end channel
        digits = [row.index(1.0) for row in rows[:length]]
        assert rows[length] == [0, 0, 0, 1]  # the end step alone
        assert all(row == [0, 0, 0, 0] for row in rows[length + 1:])  # padding
        assert batch.targets[index].item() == sum(digits)
        assert batch.mask[:, index].tolist() == [step <= length for step in range(6)]


def test_digits_are_uniform_and_seeded():
    batch = adding.sample_digits(300, 10, values=3, generator=generator(2))
    assert batch.inputs.shape == (11, 300, 4) and batch.mask.all()
    counts = batch.inputs[:10, :, :3].sum(dim=(0, 1))  # each digit value, over 3,000 digits
    assert torch.allclose(counts / 3000, torch.full((3,), 1 / 3), atol=0.03)
    assert torch.equal(batch.targets, batch.inputs[:10, :, :3].argmax(-1).sum(0).float())
    again, other = adding.sample_digits(300, 10, 3, generator(2)), adding.sample_digits(300, 10, 3, generator(3))
    assert torch.equal(batch.inputs, again.inputs) and not torch.equal(batch.inputs, other.inputs)
    with pytest.raises(ValueError, match="at least 2 digit values"):
        adding.DigitAddingTask(values=1)
    with pytest.raises(ValueError, match="at least 2"):
        adding.sample_digits(3, 1)


# --------------------------------------------------------------------------- loss and metrics


def test_digit_loss_and_metrics_on_a_hand_made_prediction():
    batch = adding.sample_digits(2, torch.tensor([3, 5]), values=4, generator=generator(0))
    digits = batch.inputs[:, :, :4].argmax(-1).float() * batch.inputs[:, :, :4].sum(-1)  # [T, B], 0 off the digits
    outputs = torch.zeros(6, 2, 5)
    outputs[:, :, 2] = digits  # each digit step decodes to its digit: right sums
    outputs[4:, 0] = float("nan")  # example 0's padding: never counted
    assert adding.decoded_sums(outputs, batch).tolist() == batch.targets.tolist()
    outputs[0, 0, 1] += 0.1  # example 0: 0.3 too high in all, still rounds to the sum
    outputs[3, 0, 4] += 0.2  # (its end step counts too)
    outputs[2, 1, 0] -= 1.5  # example 1: 2 too low
    outputs[5, 1, 3] -= 0.5
    metrics = adding.digit_metrics(outputs, batch)
    assert metrics["abs_error"] == pytest.approx((0.3 + 2) / 2, rel=1e-5)
    assert metrics["loss"] == pytest.approx((0.3 ** 2 + 2 ** 2) / 2, rel=1e-5)
    assert metrics["exact"] == 0.5
    assert adding.digit_loss(outputs, batch).item() == pytest.approx(metrics["loss"], rel=1e-6)
    zeros = torch.zeros(6, 2, 5)
    assert adding.digit_loss(zeros, batch).item() == pytest.approx(batch.targets.pow(2).mean().item())


def test_the_documented_baseline_of_answering_the_expected_sum():
    batch = adding.sample_digits(4000, 100, values=5, generator=generator(4))
    outputs = torch.zeros(101, 4000, 6)
    outputs[:100, :, 0] = 2.0  # the expected digit at each digit step: the answer 2L
    metrics = adding.digit_metrics(outputs, batch)
    assert metrics["abs_error"] == pytest.approx(11.3, abs=0.5) and metrics["exact"] == pytest.approx(0.028, abs=0.01)


def test_digits_human_readable():
    task = adding.DigitAddingTask(values=5)
    short = task.sample(1, 3, generator(0))
    digits = short.inputs[:3, 0, :5].argmax(-1).tolist()
    assert task.to_human_readable(short) == f"length 3: {' + '.join(map(str, digits))} = {sum(digits)}"
    long = task.sample(2, 30, generator(0))
    text = task.to_human_readable(long, torch.ones(31, 2, 6), index=1)
    assert text.count(" + ") == 20 and "(10 more)" in text and text.endswith("; output 186.00")  # 31 steps of 6


# --------------------------------------------------------------------------- adding_task.py


def test_variant_defaults():
    args = adding_task.parse_args([]).args
    assert (args.variant, args.input_size, args.iterations, args.sequence_max_length) == ("published", 6, 2000, 100)
    assert (args.model, args.nhid, args.lr, args.clip, args.batch_size, args.mem_slot, args.mem_size) == \
        ("DNC", 64, 1e-4, 50.0, 100, 16, 20)
    assert training.default_generalisation_lengths(args) == [100, 200, 500, 1000]
    task = adding_task.make_task(args)
    assert (task.input_size, task.output_size, task.metric, task.higher_is_better) == (6, 6, "abs_error", False)
    standard = adding_task.parse_args(["--variant", "standard"]).args
    assert (standard.input_size, standard.iterations) == (2, 100000)
    assert isinstance(adding_task.make_task(standard), adding.AddingTask)
    typed = adding_task.parse_args(["-input_size", "4", "-iterations", "7"]).args
    assert (typed.input_size, typed.iterations) == (4, 7) and adding_task.make_task(typed).values == 3


@pytest.mark.parametrize("variant, metrics", [("published", {"loss", "abs_error", "exact"}),
                                              ("standard", {"loss", "mse", "accuracy"})])
def test_dry_run_of_each_variant(variant, metrics, tmp_path):
    result = adding_task.main(["--run-dir", str(tmp_path / "run"), "--dry-run", *LSTM, "--variant", variant,
                               "-sequence_max_length", "4", "--generalisation-lengths", "4", "8"])
    assert result["step"] == 2 and set(result["test"]) == metrics and set(result["generalisation"]) == {4, 8}
    assert result["metric"] == ("abs_error" if variant == "published" else "mse")
    saved = json.loads((tmp_path / "run" / "args.json").read_text())["args"]
    assert saved["variant"] == variant and saved["input_size"] == (6 if variant == "published" else 2)


def test_a_standard_run_resumes_as_standard(tmp_path):
    flags = [*LSTM, "--variant", "standard", "-sequence_max_length", "4", "--generalisation-lengths", "4",
             "-iterations", "4", "-check_freq", "2"]
    assert adding_task.main(["--run-dir", str(tmp_path / "run"), *flags, "--max-steps", "2"])["step"] == 2
    resumed = adding_task.main(["--resume", str(tmp_path / "run")])  # no --variant typed: the checkpoint's
    assert resumed["step"] == 4 and resumed["metric"] == "mse"


@pytest.mark.parametrize("flags, message", [
    (["-input_size", "2"], "add --variant standard"),
    (["-input_size", "1"], "at least 2 digit values"),
    (["--variant", "standard", "-input_size", "6"], "-input_size must be 2"),
    (["-sequence_max_length", "1"], "sequence_max_length must be at least 2"),
])
def test_bad_flags_are_named(flags, message, tmp_path):
    with pytest.raises(UserInputError, match=message):
        adding_task.main(["--run-dir", str(tmp_path / "bad"), "--dry-run", *LSTM, *flags])
    assert not (tmp_path / "bad").exists()


def test_tiny_published_run_learns(tmp_path):
    result = adding_task.main(["--run-dir", str(tmp_path / "run"), *LSTM, "-input_size", "4",
                               "-sequence_max_length", "5", "--generalisation-lengths", "5", "10",
                               "-iterations", "150", "-summarize_freq", "50", "-check_freq", "50"])
    train, tests = events(tmp_path / "run", "train"), events(tmp_path / "run", "test")
    assert [e["step"] for e in tests] == [50, 100, 150] and all("abs_error" in e for e in tests)
    assert train[-1]["loss"] < 0.2 * train[0]["loss"]
    assert result["test"]["abs_error"] < 0.5 and result["test"]["exact"] > 0.5
