"""The N-th farthest task generator and the task training loop (training/tasks.py) behind its script."""

import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import models
import training
import train_nth_farthest
from errors import UserInputError
from tasks import nth_farthest
from training import TrainingError

# A 4x4 task and a tiny LSTM: fast on one CPU thread.
SMOKE = ["--num-vectors", "4", "--vector-size", "4", "--model", "LSTM", "--nhid", "32", "--mlp-sizes", "32",
         "--batch_size", "32", "--test-size", "64", "--lr", "3e-3", "--threads", "1",
         "--log-interval", "5", "--check-freq", "5"]


def run(run_dir, *extra):
    return train_nth_farthest.main(["--run-dir", str(run_dir), *SMOKE, *extra])


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


# --------------------------------------------------------------------------- the generator


def draw(seed, batch_size=16, k=8, d=16):
    return nth_farthest.sample(batch_size, k, d, torch.Generator().manual_seed(seed))


def test_shapes_and_one_hot_blocks():
    k, d, batch_size = 8, 16, 16
    batch = draw(0, batch_size, k, d)
    assert batch.inputs.shape == (k, batch_size, d + 3 * k) == (8, 16, 40)
    assert batch.targets.shape == (batch_size,) and batch.targets.dtype == torch.long
    assert batch.mask is None
    vectors, labels, n, m = torch.split(batch.inputs, [d, k, k, k], dim=-1)
    assert vectors.min() >= -1 and vectors.max() <= 1
    for block in (labels, n, m):
        assert set(block.unique().tolist()) == {0.0, 1.0} and torch.all(block.sum(-1) == 1)
    # labels are a permutation over the steps; the question is the same at every step
    assert torch.equal(labels.argmax(-1).sort(dim=0).values, torch.arange(k)[:, None].expand(k, batch_size))
    assert torch.equal(n, n[:1].expand_as(n)) and torch.equal(m, m[:1].expand_as(m))
    assert 0 <= batch.targets.min() and batch.targets.max() < k


def test_determinism_under_a_seed_and_difference_across_seeds():
    first, again, other = draw(3), draw(3), draw(4)
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.inputs, other.inputs)


def answer_by_loop(inputs, k):
    """The answer of one example [T, F], from its features, by plain Python."""
    d = inputs.size(1) - 3 * k
    rows = inputs.tolist()
    vectors = [row[:d] for row in rows]
    labels = [max(range(k), key=lambda i: row[d + i]) for row in rows]
    n = max(range(k), key=lambda i: rows[0][d + k + i])
    m = max(range(k), key=lambda i: rows[0][d + 2 * k + i])
    reference = vectors[labels.index(m)]
    distances = [sum((a - b) ** 2 for a, b in zip(vector, reference)) ** 0.5 for vector in vectors]
    farthest_first = sorted(range(k), key=lambda position: -distances[position])
    return labels[farthest_first[n]]


@pytest.mark.parametrize("k, d", [(8, 16), (4, 4), (3, 2)])
def test_answer_matches_an_independent_loop(k, d):
    batch = draw(7, 64, k, d)
    for index in range(64):
        assert batch.targets[index].item() == answer_by_loop(batch.inputs[:, index], k)


def test_vector_m_itself_is_the_last_answer():
    k = 5
    vectors = torch.randn(1, k, 3)
    labels = torch.tensor([[3, 0, 4, 1, 2]])
    answer = nth_farthest.nth_farthest_answers(vectors, labels, torch.tensor([k - 1]), torch.tensor([4]))
    assert answer.item() == 4


def test_loss_accuracy_and_human_readable_dump():
    batch = draw(1, 8, 4, 4)
    perfect = F.one_hot(batch.targets, 4).float() * 20
    assert nth_farthest.accuracy(perfect, batch.targets) == 1.0
    assert nth_farthest.loss(perfect, batch.targets).item() < 1e-6
    assert nth_farthest.loss(torch.zeros(8, 4), batch.targets).item() == pytest.approx(torch.log(torch.tensor(4.)).item())
    text = nth_farthest.to_human_readable(batch, index=2)
    assert f"answer: {batch.targets[2].item()}" in text and "<- M" in text and text.count("step ") == 4


def test_bad_sizes_are_value_errors():
    with pytest.raises(ValueError, match="num_vectors must be at least 2"):
        nth_farthest.sample(4, num_vectors=1)
    with pytest.raises(ValueError, match="vector_size must be positive"):
        nth_farthest.NthFarthest(4, 0)


def test_model_rmc_alone_is_the_papers_rmc_with_the_seeds_training():
    """`--model RMC` and nothing else: 8 slots, 8 heads of 32, key size = head size (Sonnet's and the seed's
    default; the language model's flags default to 1 slot, 4 x 192, key 64), 1 block, 2 MLP layers,
    unit gates; the output MLP 4 x 256 on the 8 x 256 memory; Adam 1e-4, batch 1600, clip 0.1 and a
    constant rate (the seed's plateau schedule is never stepped)."""
    args = train_nth_farthest.build_parser().parse_args(["--model", "RMC"])
    task = train_nth_farthest.make_task(args)
    config = training.tasks.task_model_config_from_args(args, task)
    core = config.core_config
    assert (core["mem_slots"], core["num_heads"], core["head_size"], core["num_blocks"]) == (8, 8, 32, 1)
    assert core["attention_mlp_layers"] == 2 and core["gate_style"] == "unit"
    with torch.device("meta"):
        model = models.TaskModel(config)
    assert model.core.key_size == 32 and model.core.output_size == 2048
    assert config.mlp_sizes == [256, 256, 256, 256]
    assert (args.optimizer, args.lr, args.batch_size, args.clip, args.lr_decay) == ("adam", 1e-4, 1600, 0.1, 1.0)
    assert train_nth_farthest.build_parser().parse_args(["--model", "RMC", "--keysize", "16"]).key_size == 16


# --------------------------------------------------------------------------- the loop


def test_4x4_lstm_learns_above_chance(tmp_path):
    result = run(tmp_path / "run", "--iterations", "400", "--batch_size", "64", "--test-size", "512",
                 "--nhid", "64", "--mlp-sizes", "64", "--check-freq", "100", "--log-interval", "100")
    assert result["stopped"] is None and result["step"] == 400
    assert result["test_accuracy"] > 0.4  # chance is 1/4
    events = read_log(tmp_path / "run")
    tests = [e for e in events if e["event"] == "test"]
    assert [e["step"] for e in tests] == [100, 200, 300, 400]
    assert all({"loss", "accuracy", "lr"} <= e.keys() for e in tests)
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"args.json", "log.jsonl", "checkpoint.pt", "best.pt"}
    model, checkpoint = training.load_checkpoint(tmp_path / "run" / "best.pt", kind="TaskModel")
    assert checkpoint["train_state"]["best_accuracy"] == pytest.approx(result["best_accuracy"])
    assert isinstance(model, models.TaskModel) and model.config.mlp_sizes == [64]


def test_interrupted_and_resumed_run_is_bitwise_equal(tmp_path):
    whole = run(tmp_path / "whole", "--iterations", "16")
    stopped = run(tmp_path / "parts", "--iterations", "16", "--max-steps", "7")
    assert stopped["stopped"] == "max-steps" and stopped["step"] == 7
    resumed = train_nth_farthest.main(["--resume", str(tmp_path / "parts")])
    assert resumed["stopped"] is None and resumed["step"] == 16
    a, b = weights(tmp_path / "whole" / "checkpoint.pt"), weights(tmp_path / "parts" / "checkpoint.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert resumed["test_loss"] == whole["test_loss"]
    strip = lambda events: [{k: v for k, v in e.items() if k not in ("time", "seconds", "ms_per_step")}
                            for e in events if e["event"] in ("train", "test")]
    assert strip(read_log(tmp_path / "parts")) == strip(read_log(tmp_path / "whole"))


def test_resume_rejects_a_changed_task_flag(tmp_path):
    run(tmp_path / "run", "--iterations", "4", "--max-steps", "2")
    with pytest.raises(UserInputError, match="--num_vectors 5 differs from the checkpoint's 4"):
        train_nth_farthest.main(["--resume", str(tmp_path / "run"), "--num-vectors", "5"])
    result = train_nth_farthest.main(["--resume", str(tmp_path / "run"), "--iterations", "6"])
    assert result["step"] == 6


def nan_loss_at(monkeypatch, steps):
    original = training.TaskTrainer.compute_loss

    def compute_loss(self, batch):
        loss = original(self, batch)
        return loss * float("nan") if self.state.step + 1 in steps else loss

    monkeypatch.setattr(training.TaskTrainer, "compute_loss", compute_loss)


def test_non_finite_loss_is_skipped_reported_and_stops_when_persistent(tmp_path, monkeypatch, capsys):
    nan_loss_at(monkeypatch, {3, 4})
    result = run(tmp_path / "skip", "--iterations", "8")
    assert result["step"] == 8
    assert [e["step"] for e in read_log(tmp_path / "skip") if e["event"] == "nonfinite"] == [3, 4]
    assert "non-finite loss" in capsys.readouterr().out
    nan_loss_at(monkeypatch, set(range(7, 100)))
    with pytest.raises(TrainingError, match="not finite for 3 consecutive steps"):
        run(tmp_path / "stop", "--iterations", "20", "--max-nonfinite", "3")
    saved = torch.load(tmp_path / "stop" / "checkpoint.pt", weights_only=True)
    assert saved["train_state"]["step"] == 5  # the last evaluation's checkpoint is kept


def test_dry_run(tmp_path):
    result = run(tmp_path / "dry", "--dry-run", "--check-freq", "100")
    assert result["step"] == 2 and result["stopped"] is None
    assert (tmp_path / "dry" / "checkpoint.pt").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--model", "NOPE", "unknown core 'NOPE'"),
    ("--num-vectors", "1", "num_vectors must be at least 2"),
    ("--batch_size", "0", "--batch-size must be positive"),
    ("--test-seed", "1111", "--test-seed equals --seed"),
])
def test_bad_flags_are_named(tmp_path, flag, value, message):
    with pytest.raises(UserInputError, match=message):
        run(tmp_path / "bad", flag, value)


def test_bad_flag_is_one_line_on_the_command_line(tmp_path, command_line):
    code, _, stderr = command_line(train_nth_farthest, "--model", "NOPE", "--run-dir", tmp_path / "run")
    assert code == 2 and stderr.strip().count("\n") == 0
    assert stderr.startswith("error: unknown core 'NOPE'")


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, monkeypatch):
    original = training.TaskTrainer.train_step

    def train_step(self, batch):
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch)

    monkeypatch.setattr(training.TaskTrainer, "train_step", train_step)
    result = run(tmp_path / "run", "--iterations", "10")
    assert result["stopped"] == "interrupt" and result["step"] == 4
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["train_state"]["step"] == 4
