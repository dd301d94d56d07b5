"""Nothing lost, nothing cryptic: what a run does with another script's checkpoint, a diverging loss, a full
or read-only disk, a damaged checkpoint, bad flags and stop signals.

Each case runs the script's `main` through `training.cli` in-process (one real subprocess checks the
exit statuses of signals), and checks the exit status, that the error is one line naming the problem,
and that every file saved before is byte for byte as it was. A full disk and a read-only folder are
simulated by patching the write (tests run as root here, where chmod does not stop writes).
"""

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import adding_task
import argmax_task
import copy_task
import generate_rmc
import main as awd_main
import train_rnn
import training
import training.checkpoint
from data import Corpus
from tests.conftest import TINY_LM_FLAGS

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "format1"
LM_FLAGS = TINY_LM_FLAGS + ["--epochs", "2", "--lr", "0.01", "--dropout", "0.3", "--seed", "3"]
TASK_FLAGS = ["--model", "LSTM", "--nhid", "8", "-batch_size", "4", "--test-size", "8", "-input_size", "4",
              "-sequence_max_length", "3", "-lr", "0.01", "--threads", "1", "--device", "cpu"]


def run_cli(main, argv, capsys):
    """(exit status, stderr lines, stdout) of `main(argv)` run as the command line runs it."""
    capsys.readouterr()
    try:
        training.cli(lambda _: main(argv))
        status = 0
    except SystemExit as exit:
        status = exit.code
    out = capsys.readouterr()
    return status, out.err.strip().splitlines(), out.out


def files(folder):
    """Every file under `folder` with its bytes."""
    return {path.relative_to(folder): path.read_bytes() for path in sorted(Path(folder).rglob("*")) if path.is_file()}


def assert_one_line_error(status, lines, expected_status, *fragments):
    assert status == expected_status, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Errno" not in lines[0] and "Traceback" not in lines[0]


def lm_run(corpus_dir, run_dir, *extra):
    return train_rnn.main(["--data", str(corpus_dir), "--run-dir", str(run_dir), *LM_FLAGS, *extra])


def step_of(path):
    return torch.load(path, weights_only=True)["train_state"]["step"]


# --------------------------------------------------------------------------- 1. another script's run


@pytest.mark.parametrize("other", [adding_task, argmax_task])
def test_a_task_script_refuses_another_tasks_run(other, tmp_path, capsys):
    copy_task.main(["--run-dir", str(tmp_path / "copy"), *TASK_FLAGS, "-iterations", "4", "-check_freq", "2"])
    before = files(tmp_path / "copy")
    assert torch.load(tmp_path / "copy" / "checkpoint.pt", weights_only=True)["task"] == "CopyTask"
    status, lines, _ = run_cli(other.main, ["--resume", str(tmp_path / "copy")], capsys)
    assert_one_line_error(status, lines, 2, "is a run of copy_task.py, not of", "python copy_task.py --resume")
    assert files(tmp_path / "copy") == before


def test_an_lm_script_refuses_another_lm_scripts_run(corpus_dir, tmp_path, capsys):
    lm_run(corpus_dir, tmp_path / "rnn", "--max-steps", "3")
    before = files(tmp_path / "rnn")
    status, lines, _ = run_cli(awd_main.main, ["--resume", str(tmp_path / "rnn"), "--data", str(corpus_dir)], capsys)
    assert_one_line_error(status, lines, 2, "is a run of train_rnn.py, not of main.py")
    assert files(tmp_path / "rnn") == before


def test_a_format_1_run_is_refused_by_another_script_from_its_args_json(tmp_path, capsys):
    run_dir = shutil.copytree(FIXTURES / "copy", tmp_path / "copy")
    before = files(run_dir)
    status, lines, _ = run_cli(adding_task.main, ["--resume", str(run_dir), "--threads", "1"], capsys)
    assert_one_line_error(status, lines, 2, "is a run of copy_task.py, not of adding_task.py")
    assert files(run_dir) == before


def test_a_checkpoint_of_another_task_is_refused_even_under_the_right_script_name(tmp_path, capsys):
    copy_task.main(["--run-dir", str(tmp_path / "copy"), *TASK_FLAGS, "-iterations", "2", "-check_freq", "2"])
    path = tmp_path / "copy" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["script"] = "adding_task"  # as if adding_task.py had written it: the stored task still differs
    torch.save(checkpoint, path)
    before = files(tmp_path / "copy")
    status, lines, _ = run_cli(adding_task.main, ["--resume", str(path)], capsys)
    assert_one_line_error(status, lines, 2, "was trained on the task CopyTask, not DigitAddingTask")
    assert files(tmp_path / "copy") == before


# --------------------------------------------------------------------------- 2. divergence


def nan_loss_from(monkeypatch, first_step, blow_up_at=None):
    """Non-finite losses from `first_step` on; with `blow_up_at`, that step's update multiplies the
    weights by 1e20 (finite, as a huge but finite loss's step does)."""
    compute_loss = training.LMTrainer.compute_loss
    after_update = training.LMTrainer.after_update

    def nan_compute_loss(self, inputs, targets):
        loss, hidden, cross_entropy = compute_loss(self, inputs, targets)
        if self.state.step + 1 >= first_step:
            loss = loss * float("nan")
        return loss, hidden, cross_entropy

    def blowing_after_update(self, bad):
        after_update(self, bad)
        if self.state.step + 1 == blow_up_at:
            with torch.no_grad():
                for param in self.model.parameters():
                    param.mul_(1e20)

    monkeypatch.setattr(training.LMTrainer, "compute_loss", nan_compute_loss)
    monkeypatch.setattr(training.LMTrainer, "after_update", blowing_after_update)


def test_no_checkpoint_is_written_during_a_non_finite_streak(corpus_dir, tmp_path, monkeypatch, capsys):
    lm_run(corpus_dir, tmp_path / "run", "--max-steps", "4", "--save-interval", "2")
    run_dir = tmp_path / "run"
    assert step_of(run_dir / "checkpoint.pt") == 4 and step_of(run_dir / "checkpoint.previous.pt") == 2
    before = files(run_dir)
    nan_loss_from(monkeypatch, first_step=5)
    status, lines, out = run_cli(train_rnn.main, ["--resume", str(run_dir), "--max-nonfinite", "4"], capsys)
    assert_one_line_error(status, lines, 1, "not finite for 4 consecutive steps (step 8)",
                          "No checkpoint was written during them (steps 5-8)", f"{run_dir / 'checkpoint.pt'} holds step 4")
    assert "| step 6: checkpoint.pt not written, since the last 2 steps were not finite" in out
    after = files(run_dir)
    del before[Path("log.jsonl")], after[Path("log.jsonl")]  # the log records the skipped steps
    assert after == before


def test_weights_blown_up_by_a_finite_step_leave_the_state_before_them(corpus_dir, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    nan_loss_from(monkeypatch, first_step=7, blow_up_at=6)
    status, lines, _ = run_cli(lambda argv: lm_run(corpus_dir, run_dir, *argv),
                               ["--save-interval", "2", "--max-nonfinite", "3"], capsys)
    assert_one_line_error(status, lines, 1, "(steps 7-9)", f"{run_dir / 'checkpoint.pt'} holds step 6",
                          f"resume {run_dir / 'checkpoint.previous.pt'}, the checkpoint before it")
    previous = torch.load(run_dir / "checkpoint.previous.pt", weights_only=True)
    assert previous["train_state"]["step"] == 4
    assert max(float(w.abs().max()) for w in previous["model"].values()) < 100  # not the blown-up weights
    kept = (run_dir / "checkpoint.previous.pt").read_bytes()
    monkeypatch.undo()
    result = train_rnn.main(["--resume", str(run_dir / "checkpoint.previous.pt"), "--max-steps", "6"])
    assert result["stopped"] == "max-steps" and step_of(run_dir / "checkpoint.pt") == 6
    assert float(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]["encoder.weight"].abs().max()) < 100
    # the blown-up checkpoint.pt was replaced, not moved over the state resumed from
    assert (run_dir / "checkpoint.previous.pt").read_bytes() == kept


def test_non_finite_weights_are_never_saved(corpus_dir, tmp_path, monkeypatch, capsys):
    after_update = training.LMTrainer.after_update

    def poison(self, bad):
        after_update(self, bad)
        if self.state.step + 1 == 4:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("inf")

    monkeypatch.setattr(training.LMTrainer, "after_update", poison)
    result = lm_run(corpus_dir, tmp_path / "run", "--save-interval", "2", "--max-steps", "4")
    assert result["stopped"] == "max-steps"
    assert "| step 4: checkpoint.pt not written, since some weights are not finite" in capsys.readouterr().out
    assert step_of(tmp_path / "run" / "checkpoint.pt") == 2


def test_task_checks_write_nothing_during_a_streak(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    copy_task.main(["--run-dir", str(run_dir), *TASK_FLAGS, "-iterations", "20", "-check_freq", "2",
                    "--max-steps", "4"])
    before = files(run_dir)
    compute_loss = training.SequenceTaskTrainer.compute_loss

    def nan_after_4(self, batch):
        loss = compute_loss(self, batch)
        return loss * float("nan") if self.state.step + 1 > 4 else loss

    monkeypatch.setattr(training.SequenceTaskTrainer, "compute_loss", nan_after_4)
    status, lines, out = run_cli(copy_task.main, ["--resume", str(run_dir), "--max-nonfinite", "3"], capsys)
    assert_one_line_error(status, lines, 1, "(steps 5-7)", f"{run_dir / 'checkpoint.pt'} holds step 4")
    assert "| step 6: checkpoint.pt not written" in out
    after = files(run_dir)
    del before[Path("log.jsonl")], after[Path("log.jsonl")]
    assert after == before


# --------------------------------------------------------------------------- 3. full and read-only disks, memory


def full_disk(monkeypatch):
    """torch.save writes a little, then fails as its zip writer does on a full disk."""
    real_save = torch.save

    def save(obj, file, *args, **kwargs):
        if hasattr(file, "write"):
            file.write(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2048 vs 1984")

    monkeypatch.setattr(torch, "save", save)
    return real_save


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(corpus_dir, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    lm_run(corpus_dir, run_dir, "--max-steps", "4", "--save-interval", "2")
    before = files(run_dir)
    full_disk(monkeypatch)
    status, lines, _ = run_cli(train_rnn.main, ["--resume", str(run_dir), "--max-steps", "8"], capsys)
    assert_one_line_error(status, lines, 1, f"could not write {run_dir / 'checkpoint.pt'}: the write failed (is the "
                          f"disk full?)", f"{run_dir / 'checkpoint.pt'} holds step 4", f"--resume {run_dir}")
    after = files(run_dir)
    del before[Path("log.jsonl")], after[Path("log.jsonl")]
    assert after == before  # no temporary file left, nothing replaced


def test_a_full_disk_for_the_corpus_cache_goes_on_without_it(corpus_dir, monkeypatch, caplog):
    full_disk(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="data"):
        corpus = Corpus(corpus_dir)
    assert "continuing without it" in caplog.text and len(corpus.dictionary) == 41
    assert sorted(path.name for path in corpus_dir.iterdir()) == ["test.txt", "train.txt", "valid.txt"]


def read_only(monkeypatch, folder):
    """Creating files in `folder` fails as on a read-only file system."""
    real_open, real_mkdir = os.open, os.mkdir
    folder = str(folder)

    def guarded_open(path, flags, *args, **kwargs):
        if str(path).startswith(folder) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if str(path).startswith(folder):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def test_a_read_only_run_folder_is_refused_before_anything_is_written(corpus_dir, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    lm_run(corpus_dir, run_dir, "--max-steps", "2")
    before = files(run_dir)
    read_only(monkeypatch, run_dir)
    status, lines, _ = run_cli(train_rnn.main, ["--resume", str(run_dir)], capsys)
    assert_one_line_error(status, lines, 2, f"cannot write in the run folder {run_dir}: the file system is read-only")
    assert files(run_dir) == before


@pytest.mark.parametrize("exists", [False, True])
def test_a_read_only_run_dir_for_a_new_run_is_refused(exists, corpus_dir, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "readonly"
    parent.mkdir()
    run_dir = parent / "run"
    if exists:
        run_dir.mkdir()
    read_only(monkeypatch, parent)
    status, lines, _ = run_cli(train_rnn.main, ["--data", str(corpus_dir), "--run-dir", str(run_dir), *LM_FLAGS],
                               capsys)
    reason = "cannot write in the run folder" if exists else "cannot create the run folder"
    assert_one_line_error(status, lines, 2, f"{reason} {run_dir}: the file system is read-only", "--run-dir")
    assert [path.name for path in parent.rglob("*")] == (["run"] if exists else [])


def test_outf_into_a_missing_folder_is_one_line(corpus_dir, tmp_path, capsys):
    lm_run(corpus_dir, tmp_path / "run", "--max-steps", "2")
    outf = tmp_path / "missing" / "out.txt"
    status, lines, _ = run_cli(generate_rmc.main, ["--checkpoint", str(tmp_path / "run"), "--words", "3",
                                                   "--outf", str(outf)], capsys)
    assert_one_line_error(status, lines, 2, f"--outf {outf}: the folder {outf.parent} does not exist")
    assert not outf.parent.exists()


def test_lengths_whose_batches_cannot_fit_in_memory_are_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    status, lines, _ = run_cli(argmax_task.main, ["--run-dir", str(run_dir), "-sequence_max_length", "100000",
                                                  "--device", "cpu", "--dry-run"], capsys)
    assert_one_line_error(status, lines, 2, "(1,000,000 steps, -batch_size 100, 1,000,006 inputs and outputs a step)",
                          "GiB of memory of cpu", "use a smaller -sequence_max_length")
    assert not run_dir.exists()


def test_out_of_memory_during_training_is_one_line(capsys):
    def main(argv):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 128000 bytes. Error code 12 (Cannot allocate memory)")

    status, lines, _ = run_cli(main, [], capsys)
    assert_one_line_error(status, lines, 1, "out of memory (asked for 128000 bytes more)")


def test_a_corpus_cache_with_a_negative_id_is_rebuilt(corpus_dir):
    corpus = Corpus(corpus_dir)
    cached = torch.load(corpus.cache_path, weights_only=True)
    cached["train"][5] = -1
    torch.save(cached, corpus.cache_path)
    rebuilt = Corpus(corpus_dir)
    assert torch.equal(rebuilt.train, corpus.train) and int(rebuilt.train.min()) >= 0
    assert torch.equal(torch.load(rebuilt.cache_path, weights_only=True)["train"].long(), corpus.train)


# --------------------------------------------------------------------------- 4. recovery and messages


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(corpus_dir, tmp_path, capsys):
    lm_run(corpus_dir, tmp_path / "whole", "--max-steps", "4")
    run_dir = tmp_path / "run"
    lm_run(corpus_dir, run_dir, "--max-steps", "4", "--save-interval", "2")  # checkpoints at steps 2 and 4
    newest = run_dir / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut short, as by a crash mid-copy
    kept = (run_dir / "checkpoint.previous.pt").read_bytes()
    capsys.readouterr()
    result = train_rnn.main(["--resume", str(run_dir), "--max-steps", "4"])
    out = capsys.readouterr().out
    assert (f"| {newest} cannot be read (the file is truncated or damaged: its archive is incomplete, as when cut "
            f"short while written or copied); resuming from the checkpoint before it, "
            f"{run_dir / 'checkpoint.previous.pt'} (step 2)") in out
    assert result["stopped"] == "max-steps"
    assert (run_dir / "checkpoint.previous.pt").read_bytes() == kept  # not replaced by the damaged file
    assert step_of(newest) == 4
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    resumed = torch.load(newest, weights_only=True)["model"]
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)  # bitwise the uninterrupted run


@pytest.mark.parametrize("content, reason", [
    (lambda data: b"this is a text file\n", "it is a text file"),
    (lambda data: b"", "the file is empty"),
    (lambda data: data[: len(data) // 3], "the file is truncated or damaged"),
    (lambda data: data[:-300], "the file is truncated or damaged"),
])
def test_unreadable_checkpoints_get_a_whole_sentence(content, reason, tmp_path, capsys):
    copy_task.main(["--run-dir", str(tmp_path / "copy"), *TASK_FLAGS, "-iterations", "2", "-check_freq", "2"])
    path = tmp_path / "copy" / "checkpoint.pt"
    path.write_bytes(content(path.read_bytes()))
    before = files(tmp_path / "copy")
    status, lines, _ = run_cli(copy_task.main, ["--resume", str(path)], capsys)
    assert_one_line_error(status, lines, 2, f"{path} is not a checkpoint this repository can read ({reason}",
                          "pass a checkpoint.pt or best.pt written by one of its scripts")
    assert lines[0].endswith("scripts") and "(101)" not in lines[0]
    assert files(tmp_path / "copy") == before


@pytest.mark.parametrize("flags, message", [
    (["-memory_type", "sam", "-sparse_reads", "0"], "-sparse_reads must be a positive integer, got 0"),
    (["-memory_type", "dnc", "-mem_slot", "0"], "-mem_slot must be a positive integer, got 0"),
])
def test_memory_flags_are_named_as_typed(flags, message, tmp_path, capsys):
    status, lines, _ = run_cli(copy_task.main, ["--run-dir", str(tmp_path / "run"), *flags], capsys)
    assert_one_line_error(status, lines, 2, message)
    assert not (tmp_path / "run").exists()


def test_cutoffs_without_a_split_softmax_are_an_error(corpus_dir, tmp_path, capsys):
    status, lines, _ = run_cli(train_rnn.main, ["--data", str(corpus_dir), "--run-dir", str(tmp_path / "run"),
                                                *LM_FLAGS, "--cutoffs", "10", "20"], capsys)
    assert_one_line_error(status, lines, 2, "--cutoffs 10 20 only applies to an output layer that splits the "
                          "vocabulary into clusters (--adaptivesoftmax or --splitsoftmax); add one, or drop --cutoffs")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("exists", [False, True])
def test_a_run_refused_at_start_leaves_no_folder_behind(exists, corpus_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    if exists:
        run_dir.mkdir()
    status, lines, _ = run_cli(train_rnn.main, ["--data", str(corpus_dir), "--run-dir", str(run_dir), *LM_FLAGS,
                                                "--batch_size", "5000"], capsys)  # refused after the folder is made
    assert_one_line_error(status, lines, 2, "cannot fill 5000 columns")
    assert (list(run_dir.iterdir()) == []) if exists else not run_dir.exists()


def test_temporary_files_left_by_a_killed_save_are_removed(corpus_dir, tmp_path):
    run_dir = tmp_path / "run"
    lm_run(corpus_dir, run_dir, "--max-steps", "2")
    stale = []
    for name in ("checkpoint.pt", "best.pt"):  # what atomic_save leaves when killed mid-write
        handle, path = tempfile.mkstemp(dir=run_dir, prefix=f".{name}.", suffix=".tmp")
        os.write(handle, b"PK\x03\x04 half a checkpoint")
        os.close(handle)
        stale.append(Path(path))
    (run_dir / ".checkpoint.json.tmp").write_text("{")
    (run_dir / ".my-notes.tmp").write_text("not ours")
    train_rnn.main(["--resume", str(run_dir), "--max-steps", "3"])
    assert not any(path.exists() for path in stale) and not (run_dir / ".checkpoint.json.tmp").exists()
    assert (run_dir / ".my-notes.tmp").read_text() == "not ours"


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signals_exit_with_the_shells_statuses(signum, status, corpus_dir, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "train_rnn.py", "--data", str(corpus_dir), "--run-dir", str(run_dir), *LM_FLAGS,
         "--epochs", "100000", "--log-interval", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith("| epoch"):  # training is under way
                break
        process.send_signal(signum)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == status, err
    reason = "interrupt" if signum == signal.SIGINT else "terminate"
    assert f"| stopped ({reason}) at step" in out and "Traceback" not in err
    assert step_of(run_dir / "checkpoint.pt") >= 1
