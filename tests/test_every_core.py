"""Every registered core runs in every task script (`--model NAME` with the core's own flags).

The language-model scripts get the same treatment in tests/test_scripts.py. Cores are read
from `models.CORES`, so a newly registered core is covered here as soon as it has an entry
in `CORE_FLAGS` (its tiny sizes); a core without one fails loudly.
"""

import json
import math

import pytest
import torch

import adding_task
import argmax_task
import copy_task
import models
import train_nth_farthest
import training

# Tiny sizes of each core, spelled with the core's own flags (DNC-family flags as published).
CORE_FLAGS = {
    "LSTM": ["--nhid", "8"],
    "GRU": ["--nhid", "8", "--rnn-impl", "loop"],
    "QRNN": ["--nhid", "8", "--nlayers", "2", "--qrnn-window", "2"],
    "AWD": ["--nhid", "8", "--nlayers", "2", "--wdrop", "0.2", "--awd-cell", "LSTM"],
    "RMC": ["--mem-slots", "2", "--head-size", "4", "--num-heads", "2", "--key-size", "4", "--attention-mlp-layers", "1"],
    "DNC": ["-nhid", "8", "-mem_slot", "4", "-mem_size", "3", "-read_heads", "1", "-nhlayer", "1"],
    "SAM": ["-nhid", "8", "-mem_slot", "8", "-mem_size", "3", "-read_heads", "1", "-nhlayer", "1", "-sparse_reads", "2"],
    "SDNC": ["-nhid", "8", "-mem_slot", "8", "-mem_size", "3", "-read_heads", "1", "-nhlayer", "1", "-sparse_reads", "2",
             "-temporal_reads", "1"],
    "RNNLIB": ["--cell", "elman-tanh", "--hids", "8", "6"],
}

# Tiny tasks: each script with its own flags, batch 4, a test set of two batches, one thread.
RUN = ["--dry-run", "--batch_size", "4", "--test-size", "8", "--threads", "1"]
SEQUENCE = ["-sequence_max_length", "3", "--generalisation-lengths", "3", "4"]
SCRIPTS = {
    "train_nth_farthest": (train_nth_farthest, ["--num-vectors", "3", "--vector-size", "2", "--mlp-sizes", "8"]),
    "copy_task": (copy_task, ["-input_size", "3", *SEQUENCE]),
    "adding_task": (adding_task, SEQUENCE),
    "argmax_task": (argmax_task, ["-input_size", "3", *SEQUENCE]),
}


def test_every_registered_core_has_tiny_flags():
    registered = {cls.name for cls in models.CORES.values()}
    assert registered <= set(CORE_FLAGS), f"add tiny flags to CORE_FLAGS for {sorted(registered - set(CORE_FLAGS))}"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("core", sorted(models.CORES))
def test_task_script_dry_run_with_every_core(script, core, tmp_path):
    name = models.CORES[core].name
    if name not in CORE_FLAGS:
        pytest.fail(f"core {name} has no entry in CORE_FLAGS (tests/test_every_core.py): add its tiny flags")
    module, task_flags = SCRIPTS[script]
    run_dir = tmp_path / "run"
    result = module.main(["--run-dir", str(run_dir), "--model", name, *CORE_FLAGS[name], *RUN, *task_flags])
    assert result["stopped"] is None and result["step"] == 2
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "best.pt").is_file()
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    (test,) = [e for e in events if e["event"] == "test"]  # the dry run's one evaluation, at step 2
    assert test["step"] == 2
    if script == "train_nth_farthest":
        assert math.isfinite(result["test_loss"]) and 0 <= result["test_accuracy"] <= 1
        assert (test["loss"], test["accuracy"]) == (result["test_loss"], result["test_accuracy"])
        assert result["best_accuracy"] == result["test_accuracy"] and result["best_step"] == 2
    else:
        metric = result["metric"]
        assert math.isfinite(result["test"]["loss"]) and math.isfinite(result["test"][metric])
        assert (test["loss"], test[metric]) == (result["test"]["loss"], result["test"][metric])
        logged = {e["length"]: e["loss"] for e in events if e["event"] == "generalisation"}
        assert logged == {length: metrics["loss"] for length, metrics in result["generalisation"].items()} != {}
        assert all(math.isfinite(loss) for loss in logged.values())
    model, checkpoint = training.load_checkpoint(run_dir / "best.pt")
    assert model.config.core == name
    # the two training steps reached every parameter: Adam's first moment is non-zero for each of them
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["optimizer"]
    assert len(saved["state"]) == len(list(model.parameters())) > 0
    assert all(state["exp_avg"].abs().sum() > 0 and int(state["step"]) == 2 for state in saved["state"].values())
    if name == "AWD":  # no embedding to tie to in a task: the stack ends at --nhid, not at the task's input size
        assert model.core.output_size == 8
