"""Checkpoints written before the `training/` package (format 1) load and resume exactly as the old code did.

tests/fixtures/format1 holds four runs stopped by --max-steps with the code of commit d2826ab, and
what that code produced when it resumed each of them (see its README). The new code must continue
them bitwise on CPU: the same weights, loop state and results.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import copy_task
import main as awd_main
import train_nth_farthest
import train_rnn
import training
from training.checkpoint import CHECKPOINT_FORMAT

FIXTURES = Path(__file__).parent / "fixtures" / "format1"
RUNS = {  # run folder: (script, its name, --max-steps of the recorded resume, needs --data)
    "lm": (train_rnn, "train_rnn", 195, True),
    "awd": (awd_main, "main", 370, True),
    "nth": (train_nth_farthest, "train_nth_farthest", 17, False),
    "copy": (copy_task, "copy_task", 17, False),
}


def resume(name, tmp_path):
    script, _, max_steps, corpus = RUNS[name]
    run_dir = shutil.copytree(FIXTURES / name, tmp_path / name)
    argv = ["--resume", str(run_dir), "--max-steps", str(max_steps), "--threads", "1", "--device", "cpu"]
    if corpus:
        argv += ["--data", str(shutil.copytree(FIXTURES / "corpus", tmp_path / "corpus"))]
    return run_dir, script.main(argv)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_format_1_run_resumes_as_the_old_code_did(name, tmp_path):
    old = torch.load(FIXTURES / name / "checkpoint.pt", weights_only=True)
    assert old["format"] == 1  # the fixture is what it says
    run_dir, result = resume(name, tmp_path)
    expected = FIXTURES / name / "expected"
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["format"] == CHECKPOINT_FORMAT == 2 and saved["script"] == RUNS[name][1]
    want = torch.load(expected / "model.pt", weights_only=True)
    assert saved["model"].keys() == want.keys()
    for key in want:
        assert torch.equal(saved["model"][key], want[key]), key
    want_state = json.loads((expected / "train_state.json").read_text())
    if "interval_count" in want_state:  # the task loops' name in format 1
        want_state["interval_batches"] = want_state.pop("interval_count")
    got_state = saved["train_state"]
    for key, value in want_state.items():
        if key != "log_bytes":  # the log's size depends on its time fields
            assert got_state[key] == value, key
    want_result = json.loads((expected / "result.json").read_text())
    for key, value in want_result.items():
        if key == "run_dir":
            continue
        if key == "generalisation":
            value = {int(length): metrics for length, metrics in value.items()}
        assert result[key] == value, key


def test_format_1_best_checkpoint_loads_for_generation_and_evaluation():
    model, checkpoint = training.load_checkpoint(FIXTURES / "lm", kind="LanguageModel")  # a folder: checkpoint.pt
    assert checkpoint["format"] == 2 and checkpoint["script"] is None  # migrated on reading
    assert checkpoint["args"]["precision"] == "fp32" and checkpoint["args"]["plateau_threshold"] == 1e-4
    best, best_checkpoint = training.load_checkpoint(training.best_checkpoint(FIXTURES / "lm"), kind="LanguageModel")
    assert best_checkpoint["path"].endswith("best.pt") and best_checkpoint["resumable"] is False
    assert best_checkpoint["train_state"]["best_epoch"] == 1 and checkpoint["train_state"]["epoch"] == 2
    state = torch.load(FIXTURES / "nth" / "checkpoint.pt", weights_only=True)["train_state"]
    assert "interval_count" in state
    assert "interval_batches" in training.read_checkpoint(FIXTURES / "nth")["train_state"]
