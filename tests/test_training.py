"""The shared training loop: resume, stops, non-finite losses, checkpoints, logs, evaluation."""

import json
import os
import signal
import time

import pytest
import torch

import train_rnn
import training
import training.lm
import training.loop
from data import Corpus, batchify
from errors import UserInputError
from tests.conftest import TINY_LM_FLAGS, write_corpus

FLAGS = TINY_LM_FLAGS + ["--epochs", "2", "--lr", "0.01", "--dropout", "0.3"]


def run(corpus_dir, run_dir, *extra):
    return train_rnn.main(["--data", str(corpus_dir), "--run-dir", str(run_dir), *FLAGS, *extra])


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_run_writes_logs_checkpoints_and_loss_falls(corpus_dir, tmp_path):
    result = run(corpus_dir, tmp_path / "run", "--epochs", "4", "--lr", "0.02")
    run_dir = tmp_path / "run"
    assert {p.name for p in run_dir.iterdir()} >= {"args.json", "log.jsonl", "checkpoint.pt", "checkpoint.json",
                                                   "best.pt", "best.json"}
    meta = json.loads((run_dir / "args.json").read_text())
    assert meta["args"]["epochs"] == 4 and "git_commit" in meta
    events = read_log(run_dir)
    valid = [e for e in events if e["event"] == "valid"]
    train = [e for e in events if e["event"] == "train"]
    assert [e["epoch"] for e in valid] == [1, 2, 3, 4]
    assert train and all({"loss", "ppl", "lr", "step", "tokens_per_s"} <= e.keys() for e in train)
    assert valid[-1]["loss"] < valid[0]["loss"] < torch.log(torch.tensor(41.0)).item()  # below uniform
    test = events[-1]
    assert test["event"] == "test" and test["test_ppl"] == pytest.approx(result["test_ppl"])
    assert result["valid_ppl"] < 25


def test_interrupted_and_resumed_run_is_bitwise_equal(corpus_dir, tmp_path):
    run(corpus_dir, tmp_path / "whole")
    stopped = run(corpus_dir, tmp_path / "parts", "--max-steps", "7")
    assert stopped["stopped"] == "max-steps"
    state = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)["train_state"]
    assert state["step"] == 7 and state["epoch"] == 1 and state["position"] > 0  # mid-epoch
    resumed = train_rnn.main(["--resume", str(tmp_path / "parts")])
    assert resumed["stopped"] is None
    assert_same_weights(weights(tmp_path / "whole" / "checkpoint.pt"), weights(tmp_path / "parts" / "checkpoint.pt"))
    assert resumed["test_loss"] == pytest.approx(run_result_test_loss(tmp_path / "whole"), abs=0)
    # the log of the resumed run holds each step once
    steps = [e["step"] for e in read_log(tmp_path / "parts") if e["event"] == "train"]
    assert steps == sorted(set(steps))


def test_save_interval_checkpoint_resumes_a_crashed_run(corpus_dir, tmp_path, monkeypatch):
    """--save-interval 4: a run that dies at step 7 (no stop, no save of its own) left the checkpoint of
    step 4, and resuming from it gives the uninterrupted run bit for bit."""
    run(corpus_dir, tmp_path / "whole")
    original = training.LMTrainer.train_step

    def train_step(self, batch):
        if self.state.step == 6:
            raise RuntimeError("the machine went away")
        return original(self, batch)

    monkeypatch.setattr(training.LMTrainer, "train_step", train_step)
    with pytest.raises(RuntimeError, match="went away"):
        run(corpus_dir, tmp_path / "parts", "--save-interval", "4")
    assert torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)["train_state"]["step"] == 4
    monkeypatch.setattr(training.LMTrainer, "train_step", original)
    resumed = train_rnn.main(["--resume", str(tmp_path / "parts")])
    assert resumed["stopped"] is None
    assert_same_weights(weights(tmp_path / "whole" / "checkpoint.pt"), weights(tmp_path / "parts" / "checkpoint.pt"))
    assert resumed["test_loss"] == run_result_test_loss(tmp_path / "whole")


def run_result_test_loss(run_dir):
    return [e for e in read_log(run_dir) if e["event"] == "test"][-1]["test_loss"]


def test_resume_across_an_epoch_boundary(corpus_dir, tmp_path):
    run(corpus_dir, tmp_path / "whole")
    batches = len(range(0, batchify(Corpus(corpus_dir).train, 4).size(0) - 1, 8))
    run(corpus_dir, tmp_path / "parts", "--max-steps", str(batches + 2))
    train_rnn.main(["--resume", str(tmp_path / "parts" / "checkpoint.pt")])
    assert_same_weights(weights(tmp_path / "whole" / "checkpoint.pt"), weights(tmp_path / "parts" / "checkpoint.pt"))


def stop_with_signal_at(monkeypatch, signum, at_step):
    original = training.LMTrainer.train_step

    def train_step(self, batch):
        original(self, batch)
        if self.state.step + 1 == at_step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(training.LMTrainer, "train_step", train_step)


def test_ctrl_c_saves_a_resumable_checkpoint_and_evaluates(corpus_dir, tmp_path, monkeypatch):
    handler = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN in a background job
    run(corpus_dir, tmp_path / "whole")
    stop_with_signal_at(monkeypatch, signal.SIGINT, at_step=5)
    result = run(corpus_dir, tmp_path / "parts")
    assert result["stopped"] == "interrupt"
    assert torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)["train_state"]["step"] == 5
    # nothing was validated yet: the final evaluation is of the model at the stop, as saved
    model, _ = training.load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    test = batchify(Corpus(corpus_dir).test, 2)
    assert result["test_loss"] == pytest.approx(training.evaluate(model, test, 8), rel=1e-6)
    assert signal.getsignal(signal.SIGINT) is handler  # the handler before the run, restored
    monkeypatch.undo()
    train_rnn.main(["--resume", str(tmp_path / "parts")])
    assert_same_weights(weights(tmp_path / "whole" / "checkpoint.pt"), weights(tmp_path / "parts" / "checkpoint.pt"))


def test_sigterm_saves_and_exits_without_evaluating(corpus_dir, tmp_path, monkeypatch):
    stop_with_signal_at(monkeypatch, signal.SIGTERM, at_step=3)
    result = run(corpus_dir, tmp_path / "run")
    assert result["stopped"] == "terminate" and "test_ppl" not in result
    assert torch.load(result["checkpoint"], weights_only=True)["train_state"]["step"] == 3


def nan_loss_at(monkeypatch, steps):
    original = training.LMTrainer.compute_loss

    def compute_loss(self, inputs, targets):
        loss, hidden, cross_entropy = original(self, inputs, targets)
        if self.state.step + 1 in steps:
            loss = loss * float("nan")
        return loss, hidden, cross_entropy

    monkeypatch.setattr(training.LMTrainer, "compute_loss", compute_loss)


def test_non_finite_loss_is_skipped_and_reported(corpus_dir, tmp_path, monkeypatch, capsys):
    nan_loss_at(monkeypatch, {3, 4})
    result = run(corpus_dir, tmp_path / "run")
    assert result["test_ppl"] < 41
    events = read_log(tmp_path / "run")
    assert [e["step"] for e in events if e["event"] == "nonfinite"] == [3, 4]
    assert "non-finite loss" in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["train_state"]["skipped_steps"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_persistent_non_finite_loss_stops_and_keeps_checkpoints(corpus_dir, tmp_path, monkeypatch):
    run(corpus_dir, tmp_path / "run", "--max-steps", "4")
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    nan_loss_at(monkeypatch, set(range(5, 100)))
    with pytest.raises(training.TrainingError, match="not finite for 3 consecutive steps.*lower --lr"):
        train_rnn.main(["--resume", str(tmp_path / "run"), "--max-nonfinite", "3"])
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_best_checkpoint_is_not_resumable(corpus_dir, tmp_path):
    run(corpus_dir, tmp_path / "run", "--epochs", "1")
    with pytest.raises(UserInputError, match="not a resumable state"):
        train_rnn.main(["--resume", str(tmp_path / "run" / "best.pt")])


def test_log_is_strict_json_and_resumed_log_lines_match(corpus_dir, tmp_path):
    run(corpus_dir, tmp_path / "whole", "--log-interval", "4")
    run(corpus_dir, tmp_path / "parts", "--log-interval", "4", "--max-steps", "6")
    train_rnn.main(["--resume", str(tmp_path / "parts")])

    def train_lines(run_dir):
        lines = (run_dir / "log.jsonl").read_text()
        assert "NaN" not in lines and "Infinity" not in lines
        return [(e["step"], e["loss"]) for e in read_log(run_dir) if e["event"] == "train"]

    assert train_lines(tmp_path / "parts") == train_lines(tmp_path / "whole")


def test_new_run_refuses_a_folder_with_checkpoints(corpus_dir, tmp_path):
    run(corpus_dir, tmp_path / "run", "--max-steps", "2")
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(UserInputError, match="already holds checkpoints; continue it with --resume"):
        run(corpus_dir, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_checkpoint_write_is_atomic(corpus_dir, tmp_path, monkeypatch):
    run(corpus_dir, tmp_path / "run", "--max-steps", "3")
    path = tmp_path / "run" / "checkpoint.pt"
    before = path.read_bytes()
    real_save = torch.save

    def crash_midway(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    model, checkpoint = training.load_checkpoint(path)
    with pytest.raises(training.TrainingError, match="could not write .*checkpoint.pt: disk full"):
        training.save_checkpoint(path, model, args=checkpoint["args"])
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")) == []


def test_resume_rejects_changed_model_flags_and_other_vocabulary(corpus_dir, tmp_path):
    run(corpus_dir, tmp_path / "run", "--max-steps", "2")
    with pytest.raises(UserInputError, match="--nhid 32 differs from the checkpoint's 16"):
        train_rnn.main(["--resume", str(tmp_path / "run"), "--nhid", "32"])
    other = write_corpus(tmp_path / "other", seed=5)
    (other / "valid.txt").write_text("a b c d e f g h i j k l\n" * 20)
    with pytest.raises(UserInputError, match="another vocabulary"):
        train_rnn.main(["--resume", str(tmp_path / "run"), "--data", str(other)])


def test_load_checkpoint_rejects_other_kinds_and_foreign_files(tmp_path, corpus_dir):
    run(corpus_dir, tmp_path / "run", "--max-steps", "2")
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    checkpoint["kind"] = "DNC"
    torch.save(checkpoint, tmp_path / "dnc.pt")
    with pytest.raises(UserInputError, match="holds a DNC, not a LanguageModel"):
        training.load_checkpoint(tmp_path / "dnc.pt", kind="LanguageModel")
    checkpoint["kind"] = "LanguageModel"
    checkpoint["config"]["emsize"] = 24
    torch.save(checkpoint, tmp_path / "edited.pt")
    with pytest.raises(UserInputError, match="does not fit"):
        training.load_checkpoint(tmp_path / "edited.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module, as old repositories saved
    with pytest.raises(UserInputError, match="not a checkpoint this repository can read"):
        training.load_checkpoint(tmp_path / "module.pt")
    with pytest.raises(UserInputError, match="does not exist"):
        training.load_checkpoint(tmp_path / "absent.pt")


def test_evaluate_is_token_weighted_whatever_the_window(corpus_dir):
    torch.manual_seed(0)
    corpus = Corpus(corpus_dir)
    import models

    args = train_rnn.build_parser().parse_args(["--emsize", "8", "--nhid", "8"])
    model = models.LanguageModel(models.lm_config_from_args(args, len(corpus.dictionary)))
    source = batchify(corpus.valid, 3)
    whole = training.evaluate(model, source, bptt=source.size(0))
    windows = training.evaluate(model, source, bptt=7)  # the last window is shorter
    assert windows == pytest.approx(whole, rel=1e-6)


@pytest.mark.parametrize("flag,value,message", [
    ("--bptt", "0", "--bptt must be positive"),
    ("--lr", "-1", "--lr must be above 0"),
    ("--clip", "-0.5", "--clip must be at least 0"),
    ("--lr-decay", "1.5", "--lr-decay must be in"),
    ("--max-steps", "-2", "--max-steps must be at least 0"),
])
def test_bad_flag_values_are_named(corpus_dir, tmp_path, flag, value, message):
    with pytest.raises(UserInputError, match=message):
        run(corpus_dir, tmp_path / "run", flag, value)
    assert not (tmp_path / "run").exists()


def test_plateau_schedule_halves_the_rate_and_can_be_turned_off(corpus_dir, tmp_path):
    # at a negligible rate, validation loss improves by far less than 1e-4 (relative) after the first epoch
    run(corpus_dir, tmp_path / "decay", "--epochs", "3", "--lr", "1e-7", "--patience", "0",
        "--plateau-threshold", "1e-4")
    lrs = [e["lr"] for e in read_log(tmp_path / "decay") if e["event"] == "valid"]
    assert lrs == pytest.approx([1e-7, 1e-7, 0.5e-7], rel=1e-9)  # the rate each epoch trained with
    run(corpus_dir, tmp_path / "flat", "--epochs", "3", "--lr", "1e-7", "--patience", "0", "--lr-decay", "1",
        "--plateau-threshold", "1e-4")
    assert {e["lr"] for e in read_log(tmp_path / "flat") if e["event"] == "valid"} == {1e-7}


def test_plateau_threshold_defaults_follow_each_recipe():
    import main as awd_main
    import train_rmc

    # the seed's train_rnn.py / train_rmc.py build ReduceLROnPlateau with its default threshold
    assert train_rnn.build_parser().parse_args([]).plateau_threshold == 1e-4
    assert train_rmc.build_parser().parse_args([]).plateau_threshold == 1e-4
    assert awd_main.build_parser().parse_args([]).plateau_threshold == 0.0  # (AWD-LSTM: NT-ASGD, no plateau)


def test_plateau_threshold_zero_counts_any_improvement(corpus_dir, tmp_path):
    # as pytorch/examples and AWD-LSTM count: the tiny improvements above keep the rate
    run(corpus_dir, tmp_path / "any", "--epochs", "3", "--lr", "1e-7", "--patience", "0", "--plateau-threshold", "0")
    valid = [e for e in read_log(tmp_path / "any") if e["event"] == "valid"]
    assert valid[2]["loss"] < valid[1]["loss"] < valid[0]["loss"]  # each by under 1e-4 relative
    assert valid[0]["loss"] - valid[2]["loss"] < 1e-4 * valid[0]["loss"]
    assert [e["lr"] for e in valid] == [1e-7] * 3


def test_parse_args_records_explicit_flags():
    flags = training.parse_args(train_rnn.build_parser(), ["--nhid", "300", "--cuda", "--no-tied"])
    assert flags.typed == {"cuda", "nhid", "tied"}
    assert flags.args.nhid == 300 and not any(key.startswith("_") for key in vars(flags.args))


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    flags = training.parse_args(train_rnn.build_parser(), ["--cuda"])
    with pytest.raises(UserInputError, match="CUDA is not available"):
        training.resolve_device(flags.args)


# --------------------------------------------------------------------------- precision, device-side decisions, timing


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_lm_learns_like_fp32_and_resumes(corpus_dir, tmp_path, precision):
    full = run(corpus_dir, tmp_path / "fp32", "--epochs", "3", "--lr", "0.02")
    mixed = run(corpus_dir, tmp_path / precision, "--epochs", "3", "--lr", "0.02", "--precision", precision)
    valid = [e["loss"] for e in read_log(tmp_path / precision) if e["event"] == "valid"]
    assert valid[-1] < valid[0] < torch.log(torch.tensor(41.0)).item()  # learns, below uniform
    assert mixed["valid_loss"] == pytest.approx(full["valid_loss"], rel=0.03)  # within 3 % of fp32's loss
    assert json.loads((tmp_path / precision / "args.json").read_text())["args"]["precision"] == precision
    run(corpus_dir, tmp_path / "parts", "--epochs", "3", "--lr", "0.02", "--precision", precision, "--max-steps", "9")
    with pytest.raises(UserInputError, match="--precision fp32 differs from the checkpoint's"):
        train_rnn.main(["--resume", str(tmp_path / "parts"), "--precision", "fp32"])
    train_rnn.main(["--resume", str(tmp_path / "parts")])
    assert_same_weights(weights(tmp_path / precision / "checkpoint.pt"), weights(tmp_path / "parts" / "checkpoint.pt"))


def test_device_side_decisions_give_the_host_sides_run(corpus_dir, tmp_path, monkeypatch):
    """The GPU's rule (skips decided on the device, fused SGD, read at log lines), run on the CPU."""
    nan_loss_at(monkeypatch, {3, 4})
    host = run(corpus_dir, tmp_path / "host")
    monkeypatch.setattr(training.loop, "decide_on_device", lambda device: True)
    device = run(corpus_dir, tmp_path / "device")
    assert [e["step"] for e in read_log(tmp_path / "device") if e["event"] == "nonfinite"] == [3, 4]
    a, b = weights(tmp_path / "host" / "checkpoint.pt"), weights(tmp_path / "device" / "checkpoint.pt")
    for key in a:  # the hidden state was reset on the device as on the host: the runs agree throughout
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key
    assert device["test_loss"] == pytest.approx(host["test_loss"], rel=1e-5)


def test_log_lines_time_training_only_across_epochs_and_epochs_are_timed(corpus_dir, tmp_path, monkeypatch, capsys):
    """An interval that spans an epoch's end counts its batches' time, not the validation's."""
    real = training.lm.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(training.lm, "evaluate", slow_evaluate)
    batches = len(range(0, batchify(Corpus(corpus_dir).train, 4).size(0) - 1, 8))
    interval = batches // 2 + 3  # the second log line spans the end of epoch 1
    run(corpus_dir, tmp_path / "run", "--epochs", "2", "--log-interval", str(interval))
    train = [e for e in read_log(tmp_path / "run") if e["event"] == "train"]
    spanning = next(e for e in train if e["epoch"] == 2)
    assert spanning["ms_per_batch"] * interval < 250  # 0.5 s of validation would be 500 ms over the interval
    valid = [e for e in read_log(tmp_path / "run") if e["event"] == "valid"]
    assert all(e["epoch_seconds"] >= e["seconds"] >= 0.5 for e in valid)
    assert capsys.readouterr().out.count("| end of epoch") == 2


def test_allocator_keeps_freed_memory_unless_the_environment_says_otherwise(monkeypatch):
    from training.run import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False  # the user's setting wins
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert keep_freed_memory() is True  # glibc on this Linux machine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("script_flags", [[], ["--alpha", "2", "--beta", "1", "--variable-bptt"]])
def test_cuda_lm_hot_loop_makes_no_host_sync_between_log_lines(corpus_dir, tmp_path, monkeypatch, script_flags):
    """train_rnn on the GPU: any host sync inside a training step (after the optimiser's first) is an error."""
    original = training.LMTrainer.train_step

    def train_step(self, batch):
        if self.state.step >= 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            original(self, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(training.LMTrainer, "train_step", train_step)
    nan_loss_at(monkeypatch, {4})
    result = run(corpus_dir, tmp_path / "run", "--cuda", "--log-interval", "1000", *script_flags)
    assert [e["step"] for e in read_log(tmp_path / "run") if e["event"] == "nonfinite"] == [4]
    assert result["test_ppl"] < 41


def test_a_sam_checkpoint_of_the_older_state_layout_resumes_from_a_fresh_hidden_state(corpus_dir, tmp_path, capsys):
    """A SAM language model saved mid-epoch before the sparse state kept its latest write (two tensors fewer
    per memory) resumes: weights, optimiser and counters as saved, the carried state fresh, with a line."""
    run_dir = tmp_path / "run"
    flags = ["--model", "SAM", "-mem_slot", "8", "-mem_size", "3", "-read_heads", "1", "-sparse_reads", "2"]
    run(corpus_dir, run_dir, *flags, "--max-steps", "3")
    path = run_dir / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    model, _ = training.load_checkpoint(path)
    keys = [key for key in model.initial_state(1)[1].keys()]  # the memory dict of the DNC-family state
    assert len(checkpoint["hidden"]) == len(training.lm.state_tensors(model.initial_state(1)))
    # the older layout: the memory dict without write_positions / write_weights
    old = [tensor for tensor, key in zip(checkpoint["hidden"][-len(keys):], keys)
           if key not in ("write_positions", "write_weights")]
    checkpoint["hidden"] = checkpoint["hidden"][:-len(keys)] + old
    torch.save(checkpoint, path)
    capsys.readouterr()
    result = train_rnn.main(["--resume", str(run_dir)])
    out = capsys.readouterr().out
    assert "written by an older version): the rest of this epoch starts from a fresh hidden state" in out
    assert result["stopped"] is None and result["test_loss"] == result["test_loss"]  # finished, finite
    assert torch.load(path, weights_only=True)["train_state"]["step"] > 3  # it went on from step 3
