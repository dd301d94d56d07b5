"""torchrun: two processes on CPU (gloo) train and evaluate exactly as one process on the whole batch.

Each launch is `python -m torch.distributed.run --standalone --nproc_per_node 2` with
OMP_NUM_THREADS=1 under a timeout (about 8 s, mostly imports). Dropout is off, so nothing
random differs between ranks; AWD-LSTM's variable window lengths stay on (they must agree).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import distributed
import main as awd_main
import train_rnn
from errors import UserInputError
from tests.conftest import TINY_LM_FLAGS

REPO = Path(__file__).resolve().parents[1]
RNN_FLAGS = [*TINY_LM_FLAGS, "--epochs", "2", "--lr", "0.01", "--dropout", "0"]
# lr 2 makes NT-ASGD switch after epoch 3 (nonmono 1); test batch 1 does not divide among 2 ranks
AWD_FLAGS = ["--emsize", "12", "--nhid", "16", "--nlayers", "2", "--batch_size", "4", "--eval_batch_size", "2",
             "--test_batch_size", "1", "--bptt", "8", "--log-interval", "5", "--threads", "1", "--lr", "2",
             "--epochs", "4", "--nonmono", "1", "--dropout", "0", "--dropouth", "0", "--dropouti", "0",
             "--dropoute", "0", "--wdrop", "0"]
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def torchrun(*argv: str) -> str:
    done = subprocess.run([*LAUNCH, *argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def read_log(run_dir, event):
    return [e for e in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if e["event"] == event]


def assert_close_checkpoints(a_dir, b_dir):
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a_dir, b_dir))
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-5, msg=key)
    for x, y in zip(a["hidden"], b["hidden"], strict=True):  # the whole batch's state, gathered
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    for key in ("step", "epoch", "position", "asgd"):
        assert a["train_state"][key] == b["train_state"][key], key
    return a, b


def assert_same_evaluation(a_dir, b_dir):
    for event in ("valid", "test"):
        a, b = read_log(a_dir, event), read_log(b_dir, event)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            for key in ("loss", "valid_loss", "test_loss"):
                if key in x:
                    assert y[key] == pytest.approx(x[key], rel=1e-5), (event, key)


def test_train_rnn_on_two_processes_equals_one_process(corpus_dir, tmp_path):
    flags = ["--data", str(corpus_dir), *RNN_FLAGS]
    train_rnn.main([*flags, "--run-dir", str(tmp_path / "one")])
    out = torchrun("train_rnn.py", *flags, "--run-dir", str(tmp_path / "two"))
    assert out.count("| end of training") == 1  # rank 0 alone prints
    assert_close_checkpoints(tmp_path / "one", tmp_path / "two")
    assert_same_evaluation(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "args.json").read_text())["processes"] == 2


def test_main_on_two_processes_with_resume_equals_one_process(corpus_dir, tmp_path):
    """Variable windows, the NT-ASGD switch (after epoch 3), a stop and --resume, all on two ranks."""
    flags = ["--data", str(corpus_dir), *AWD_FLAGS]
    awd_main.main([*flags, "--run-dir", str(tmp_path / "whole")])
    assert read_log(tmp_path / "whole", "asgd")
    stop = ["--max-steps", str(read_log(tmp_path / "whole", "valid")[2]["step"] + 5)]  # under averaged SGD
    awd_main.main([*flags, *stop, "--run-dir", str(tmp_path / "one")])
    torchrun("main.py", *flags, *stop, "--run-dir", str(tmp_path / "two"))
    one, two = assert_close_checkpoints(tmp_path / "one", tmp_path / "two")
    assert two["train_state"]["asgd"] and len(two["rank_rngs"]) == 2
    assert torch.equal(one["bptt_rng"][1], two["bptt_rng"][1]) and one["bptt_rng"][2:] == two["bptt_rng"][2:]
    assert_same_evaluation(tmp_path / "one", tmp_path / "two")  # valid and test of the stopped run
    torchrun("main.py", "--resume", str(tmp_path / "two"))
    assert_close_checkpoints(tmp_path / "whole", tmp_path / "two")
    assert_same_evaluation(tmp_path / "whole", tmp_path / "two")


def test_resume_with_another_number_of_processes(corpus_dir, tmp_path):
    """A run stopped on one process continues on two and is finished on one again: the same weights,
    hidden state and evaluations as the run that never stopped (checkpoints hold the whole batch)."""
    flags = ["--data", str(corpus_dir), *RNN_FLAGS]
    train_rnn.main([*flags, "--run-dir", str(tmp_path / "whole")])
    steps = read_log(tmp_path / "whole", "valid")[-1]["step"]
    train_rnn.main([*flags, "--run-dir", str(tmp_path / "parts"), "--max-steps", "3"])
    torchrun("train_rnn.py", "--resume", str(tmp_path / "parts"), "--max-steps", str(steps - 4))
    two = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert two["train_state"]["step"] == steps - 4 and len(two["rank_rngs"]) == 2
    result = train_rnn.main(["--resume", str(tmp_path / "parts")])
    assert result["stopped"] is None
    assert_close_checkpoints(tmp_path / "whole", tmp_path / "parts")
    assert_same_evaluation(tmp_path / "whole", tmp_path / "parts")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the command in parentheses
                found.append(int(entry.name))
    return found


def rank_of(pid: int) -> int | None:
    environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    return next((int(item[5:]) for item in environ if item.startswith(b"RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_a_killed_rank_fails_the_run_naming_it(corpus_dir, tmp_path):
    run_dir = tmp_path / "run"
    argv = ["train_rnn.py", "--data", str(corpus_dir), "--run-dir", str(run_dir), *RNN_FLAGS, "--epochs", "50"]
    launcher = subprocess.Popen([*LAUNCH, *argv], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        log = run_dir / "log.jsonl"
        while not log.exists() or '"event": "train"' not in log.read_text():  # training has started
            assert launcher.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        (victim,) = [pid for pid in children(launcher.pid) if rank_of(pid) == 1]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        out, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0
    assert time.monotonic() - killed < 60
    root_cause = out.split("Root Cause", 1)[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "SIGKILL" in root_cause, out


def test_without_torchrun_nothing_changes(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    model = torch.nn.Linear(2, 2)
    step = lambda x: model(x).sum()  # noqa: E731
    assert distributed.wrap(model, step) is step
    tensor = torch.arange(6).view(2, 3)
    assert distributed.columns(tensor) is tensor and distributed.gather_columns(tensor, 1) is tensor
    assert distributed.all_reduce_sum(1.5, 2) == [1.5, 2] and distributed.agree("x") == "x"
    assert distributed.all_ranks(False) is False and distributed.max_over_ranks(2) == 2
    assert distributed.share(5, "--batch_size") == 5 and distributed.rank_seed(7) == 7
    assert distributed.device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    with distributed.session(torch.device("cpu"), timeout=1):
        assert not torch.distributed.is_initialized()


def test_a_batch_that_does_not_divide_among_the_ranks_is_one_line(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserInputError, match=r"--batch_size 5 does not divide among the 2 processes.*multiple of 2"):
        train_rnn.main(["--data", str(corpus_dir), "--run-dir", str(tmp_path / "run"), *RNN_FLAGS,
                        "--batch_size", "5"])
    assert not (tmp_path / "run").exists() and not torch.distributed.is_initialized()
