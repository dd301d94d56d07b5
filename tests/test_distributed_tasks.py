"""torchrun: the task scripts on two processes (CPU, gloo) train as one process on the ranks' draws put together.

Under torchrun rank r draws its --batch_size / 2 examples from a generator seeded --seed + r (a
sequence task's batch has rank 0's length, which every rank draws and rank 0's wins) and DDP
averages the gradients. So two processes make the updates of one process whose every batch is
the two ranks' shares concatenated; `draw_like_two_ranks` makes such a process here, and the
weights must agree to 1e-5 (SGD, no dropout). The test evaluations that rank 0 logs must equal,
bitwise, an evaluation in this process of the saved weights on the same fixed test set. Launches
as in tests/test_distributed.py (../shared/RECIPES.md section 3: OMP_NUM_THREADS=1, a timeout).
"""

import json

import pytest
import torch

import copy_task
import train_nth_farthest
import training
from errors import UserInputError
from training import SequenceTaskTrainer, TaskTrainer
from tasks.copy import CopyTask
from tasks.curriculum import spread_lengths
from tasks.nth_farthest import NthFarthest
from tests.test_distributed import torchrun

RANKS = 2
NTH_FLAGS = ["--num-vectors", "4", "--vector-size", "4", "--model", "LSTM", "--nhid", "16", "--mlp-sizes", "16",
             "--batch_size", "16", "--test-size", "40", "--optimizer", "sgd", "--lr", "0.5", "--threads", "1",
             "--iterations", "8", "--log-interval", "2", "--check-freq", "4"]  # 3 test batches: 2 on rank 0
# A tiny DNC (pictures every 4 steps), a curriculum step at iteration 4, checks at 3, 6 and 8.
COPY_FLAGS = ["-nhid", "16", "-mem_slot", "6", "-mem_size", "4", "-read_heads", "2", "-batch_size", "8",
              "--test-size", "20", "-input_size", "4", "-sequence_max_length", "3", "-curriculum_increment", "1",
              "-curriculum_freq", "4", "--generalisation-lengths", "3", "6", "-optim", "sgd", "-lr", "0.3",
              "--threads", "1", "-iterations", "8", "-summarize_freq", "4", "-check_freq", "3",
              "--no-compile"]  # the DNC compiles by default on the CPU too: not worth it for 8 iterations
COPY_BITS = 3  # -input_size 4: 3 bits and the end marker


def read_log(run_dir, event=None):
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [e for e in log if event is None or e["event"] == event]


def checkpoint(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def concatenate(shares):
    """The ranks' shares of a batch as one batch: [T, B, ...] fields along dim 1, [B] fields along dim 0."""
    fields = zip(*shares)
    return type(shares[0])(*(None if parts[0] is None else torch.cat(parts, dim=1 if parts[0].dim() > 1 else 0)
                             for parts in fields))


def draw_like_two_ranks(monkeypatch):
    """Make one process train on what two ranks draw: each batch is the shares of generators seeded
    --seed + rank, concatenated in rank order; a sequence batch takes the length rank 0 draws."""
    def generators(trainer):
        if not hasattr(trainer, "rank_generators"):
            trainer.rank_generators = [torch.Generator().manual_seed(trainer.args.seed + r) for r in range(RANKS)]
        return trainer.rank_generators

    def next_batch(self):
        return concatenate([self.task.sample(self.args.batch_size // RANKS, g) for g in generators(self)])

    def next_sequence_batch(self):
        self.curriculum.update(self.state.step)
        lengths = [self.curriculum.sample_length(g) for g in generators(self)]
        self.last_batch = concatenate([self.task.sample(self.args.batch_size // RANKS, lengths[0], g)
                                       for g in generators(self)])
        return self.last_batch

    monkeypatch.setattr(TaskTrainer, "next_batch", next_batch)
    monkeypatch.setattr(SequenceTaskTrainer, "next_batch", next_sequence_batch)


def assert_close_weights(a_dir, b_dir):
    a, b = checkpoint(a_dir)["model"], checkpoint(b_dir)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


def assert_close_losses(a_dir, b_dir, event):
    a, b = read_log(a_dir, event), read_log(b_dir, event)
    assert [e["step"] for e in a] == [e["step"] for e in b] and a
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (event, x["step"])


@torch.no_grad()
def weighted_means(model, batches, measure):
    """Each batch's measures weighted by its size, summed in order: what one process computes."""
    totals, count = {}, 0
    for batch in batches:
        size = batch.inputs.size(1)
        for name, value in measure(model(batch.inputs), batch).items():
            totals[name] = totals.get(name, 0.0) + value * size
        count += size
    return {name: total / count for name, total in totals.items()}


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory):
    """The tiny-DNC copy task on two processes, with its stdout."""
    run_dir = tmp_path_factory.mktemp("copy") / "two"
    return run_dir, torchrun("copy_task.py", "--run-dir", str(run_dir), *COPY_FLAGS)


def test_copy_task_on_two_processes(copy_run, tmp_path, monkeypatch):
    run_dir, out = copy_run
    # rank 0 alone prints and writes: one of each line and event, pictures, both ranks' generators saved
    assert out.count("| copy_task: DNC SequenceModel") == 1 and "x 2 processes" in out
    assert out.count("| final test") == 1
    assert json.loads((run_dir / "args.json").read_text())["processes"] == RANKS
    assert [e["step"] for e in read_log(run_dir, "test")] == [3, 6, 8]
    assert [(e["step"], e["max_length"]) for e in read_log(run_dir, "curriculum")] == [(4, 4)]
    assert [e["step"] for e in read_log(run_dir, "train")] == [4, 8]
    assert sorted(p.name for p in (run_dir / "pictures").glob("*.png")) == ["step-0000004.png", "step-0000008.png"]
    saved = checkpoint(run_dir)
    assert len(saved["rank_generators"]) == RANKS and len(saved["rank_rngs"]) == RANKS
    assert not torch.equal(*saved["rank_generators"]) and torch.equal(saved["generator"], saved["rank_generators"][0])

    # the logged evaluations are this process's evaluations of the saved weights on the fixed test sets
    model, _ = training.load_checkpoint(run_dir, kind="SequenceModel")
    args, task = saved["args"], CopyTask(bits=COPY_BITS)

    def fixed_set(lengths):
        generator = torch.Generator().manual_seed(args["test_seed"])
        return [task.sample(len(chunk), chunk, generator) for chunk in lengths.split(args["batch_size"])]

    final, = read_log(run_dir, "final")
    expected = weighted_means(model, fixed_set(spread_lengths(args["test_size"], 1, final["max_length"])), task.metrics)
    assert {name: final[name] for name in expected} == expected
    for event in read_log(run_dir, "generalisation"):
        lengths = torch.full((args["test_size"],), event["length"], dtype=torch.long)
        expected = weighted_means(model, fixed_set(lengths), task.metrics)
        assert {name: event[name] for name in expected} == expected

    # one process on the two ranks' draws put together makes the same updates
    draw_like_two_ranks(monkeypatch)
    copy_task.main(["--run-dir", str(tmp_path / "one"), *COPY_FLAGS])
    assert_close_weights(tmp_path / "one", run_dir)
    for event in ("train", "test", "final"):  # the logged training loss is the whole batch's
        assert_close_losses(tmp_path / "one", run_dir, event)


def test_nth_farthest_on_two_processes(tmp_path, monkeypatch):
    run_dir = tmp_path / "two"
    out = torchrun("train_nth_farthest.py", "--run-dir", str(run_dir), *NTH_FLAGS)
    assert out.count("| train_nth_farthest: LSTM TaskModel") == 1
    assert [e["step"] for e in read_log(run_dir, "test")] == [4, 8]

    model, saved = training.load_checkpoint(run_dir, kind="TaskModel")
    args = saved["args"]
    task = NthFarthest(args["num_vectors"], args["vector_size"])
    generator = torch.Generator().manual_seed(args["test_seed"])
    batches = [task.sample(min(args["batch_size"], args["test_size"] - start), generator)
               for start in range(0, args["test_size"], args["batch_size"])]
    expected = weighted_means(model, batches, lambda logits, batch: {"loss": task.loss(logits, batch).item(),
                                                                     "accuracy": task.accuracy(logits, batch)})
    last = read_log(run_dir, "test")[-1]
    assert (last["loss"], last["accuracy"]) == (expected["loss"], expected["accuracy"])

    draw_like_two_ranks(monkeypatch)
    train_nth_farthest.main(["--run-dir", str(tmp_path / "one"), *NTH_FLAGS])
    assert_close_weights(tmp_path / "one", run_dir)
    for event in ("train", "test"):
        assert_close_losses(tmp_path / "one", run_dir, event)


def test_two_process_copy_run_stopped_and_resumed_is_bitwise_equal(copy_run, tmp_path):
    whole, _ = copy_run
    parts = tmp_path / "parts"
    out = torchrun("copy_task.py", "--run-dir", str(parts), *COPY_FLAGS, "--max-steps", "5")
    assert "stopped (max-steps) at step 5" in out
    torchrun("copy_task.py", "--resume", str(parts), "--no-compile")  # --compile is per invocation
    a, b = checkpoint(whole), checkpoint(parts)
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["rank_generators"], b["rank_generators"], strict=True))
    assert a["curriculum"] == b["curriculum"] == {"max_length": 4}
    strip = lambda log: [{k: v for k, v in e.items() if k not in ("time", "seconds", "ms_per_step")}
                         for e in log if e["event"] != "resume"]
    assert strip(read_log(parts)) == strip(read_log(whole))


def test_task_flags_that_do_not_fit_the_processes_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserInputError, match=r"--batch_size 5 does not divide among the 2 processes.*multiple of 2"):
        copy_task.main(["--run-dir", str(tmp_path / "copy"), *COPY_FLAGS, "-batch_size", "5"])
    with pytest.raises(UserInputError, match=r"--test-seed equals process 1's seed \(--seed \+ rank\) \(1112\)"):
        train_nth_farthest.main(["--run-dir", str(tmp_path / "nth"), *NTH_FLAGS, "--seed", "1111",
                                 "--test-seed", "1112"])
    assert not (tmp_path / "copy").exists() and not torch.distributed.is_initialized()
