"""Every script runs `--dry-run`; bad input ends in one clear line, never a traceback."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune
import generate
import generate_rmc
import main as awd_main
import pointer
import train_rmc
import train_rnn
import training
from data import Corpus, batchify
from errors import UserInputError
from tests.conftest import TINY_LM_FLAGS

ROOT = Path(__file__).resolve().parents[1]
LM_SCRIPTS = {"train_rnn": train_rnn, "main": awd_main, "train_rmc": train_rmc}


CORE_FLAGS = {
    "LSTM": [], "LSTM-loop": ["--rnn-impl", "loop"], "GRU": [], "GRU-loop": ["--rnn-impl", "loop"],
    "QRNN": ["--qrnn-window", "2"], "AWD": ["--wdrop", "0.2"],
    "RMC": ["--head-size", "8", "--num-heads", "2", "--key-size", "4", "--mem-slots", "2"],
    "DNC": ["-mem_slot", "4", "-mem_size", "3", "-read_heads", "1", "-nhlayer", "1"],
    "SAM": ["-mem_slot", "8", "-mem_size", "3", "-read_heads", "1", "-sparse_reads", "2"],
    "SDNC": ["--mem_slot", "8", "--mem_size", "3", "--read_heads", "1", "--sparse_reads", "2", "--temporal_reads", "1"],
    "RNNLIB": ["--cell", "gru", "--hids", "16", "24"],
}


@pytest.mark.parametrize("script", sorted(LM_SCRIPTS))
@pytest.mark.parametrize("case", sorted(CORE_FLAGS))
def test_lm_script_dry_run(script, case, corpus_dir, tmp_path):
    """Two steps, a short validation and test. The results agree with log.jsonl; best.pt reloads as the core
    asked for and, evaluated here on the same two validation windows, gives the logged validation loss;
    the two steps changed the core's weights."""
    core = case.split("-")[0]
    run_dir = tmp_path / "run"
    result = LM_SCRIPTS[script].main(["--data", str(corpus_dir), "--run-dir", str(run_dir), "--dry-run",
                                      "--model", core, *CORE_FLAGS[case], *TINY_LM_FLAGS])
    assert result["stopped"] is None
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    (valid,) = [e for e in events if e["event"] == "valid"]
    (test,) = [e for e in events if e["event"] == "test"]
    assert (test["valid_loss"], test["test_loss"]) == (result["valid_loss"], result["test_loss"])
    assert result["test_ppl"] == pytest.approx(math.exp(result["test_loss"]))
    assert result["valid_loss"] == pytest.approx(valid["loss"], rel=1e-6)  # best.pt is the model validated
    assert math.isfinite(valid["loss"]) and valid["loss"] > 0
    model, checkpoint = training.load_checkpoint(run_dir / "best.pt")
    assert model.config.core == ("AWD" if script == "main" and core in ("LSTM", "GRU", "QRNN") else core)
    assert checkpoint["train_state"]["step"] == 2
    source = batchify(Corpus(corpus_dir).valid, 2)
    assert training.evaluate(model, source, 8, max_batches=2) == pytest.approx(valid["loss"], rel=1e-5)
    fresh = {key: value for key, value in type(model)(model.config).state_dict().items()}
    trained = checkpoint["model"]
    assert any(not torch.equal(trained[key], fresh[key]) for key in fresh if key.startswith("core."))


@pytest.fixture
def trained_run(corpus_dir, tmp_path):
    def train(*extra):
        run_dir = tmp_path / ("run" + "".join(extra).replace(" ", ""))
        train_rnn.main(["--data", str(corpus_dir), "--run-dir", str(run_dir), "--dry-run", *TINY_LM_FLAGS, *extra])
        return run_dir

    return train


@pytest.mark.parametrize("head", [[], ["--adaptivesoftmax", "--cutoffs", "5", "20", "--div-value", "2"]])
def test_generate_from_checkpoint(trained_run, tmp_path, head):
    run_dir = trained_run(*head)
    text = generate_rmc.main(["--checkpoint", str(run_dir), "--words", "30", "--seed", "3",
                              "--outf", str(tmp_path / "out.txt")])
    words = text.split()
    assert len(words) + text.count("\n") == 31  # one start word, 30 sampled, <eos> printed as newlines
    assert all(word.startswith("w") for word in words)
    assert (tmp_path / "out.txt").read_text().strip() == text.strip()
    again = generate_rmc.main(["--checkpoint", str(run_dir / "best.pt"), "--words", "30", "--seed", "3"])
    assert again == text  # seeded
    prompted = generate_rmc.main(["--checkpoint", str(run_dir), "--words", "5", "--prompt", "w1 w2"])
    assert prompted.startswith("w1 w2 ")


def test_generate_rejects_unknown_prompt_words_and_bad_temperature(trained_run):
    run_dir = trained_run()
    with pytest.raises(UserInputError, match="'zebra'"):
        generate_rmc.main(["--checkpoint", str(run_dir), "--prompt", "w1 zebra"])
    with pytest.raises(UserInputError, match="--temperature"):
        generate_rmc.main(["--checkpoint", str(run_dir), "--temperature", "0"])


def test_generate_from_an_rmc_checkpoint(corpus_dir, tmp_path):
    run_dir = tmp_path / "rmc"
    train_rmc.main(["--data", str(corpus_dir), "--run-dir", str(run_dir), "--dry-run", *TINY_LM_FLAGS,
                    *CORE_FLAGS["RMC"]])
    model, _ = training.load_checkpoint(run_dir / "best.pt")
    assert model.config.core == "RMC"
    text = generate_rmc.main(["--checkpoint", str(run_dir), "--words", "12", "--prompt", "w5 w6"])
    assert text.startswith("w5 w6 ") and len(text.split()) + text.count("\n") == 14


def test_awd_scripts_dry_run_chain(trained_run, corpus_dir, tmp_path):
    main_dir = tmp_path / "main"
    awd_main.main(["--data", str(corpus_dir), "--run-dir", str(main_dir), "--dry-run", *TINY_LM_FLAGS])
    result = finetune.main(["--data", str(corpus_dir), "--run-dir", str(tmp_path / "ft"), "--dry-run",
                            "--checkpoint", str(main_dir), *TINY_LM_FLAGS])
    valid = [json.loads(line) for line in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    valid = [e for e in valid if e["event"] == "valid"]
    assert [e["epoch"] for e in valid] == [0, 1]  # the start, then the one epoch
    assert result["valid_loss"] == pytest.approx(min(e["loss"] for e in valid), rel=1e-6)  # the better of the two
    scores = pointer.main(["--checkpoint", str(tmp_path / "ft"), "--data", str(corpus_dir), "--window", "5",
                           "--bptt", "20"])
    assert set(scores) == {"valid", "test"}
    model, _ = training.load_checkpoint(tmp_path / "ft" / "best.pt")
    corpus = Corpus(corpus_dir)
    for split in ("valid", "test"):
        tokens = getattr(corpus, split)
        assert scores[split]["tokens"] == tokens.numel() - 1
        plain = training.evaluate(model, batchify(tokens, 1), 20)
        assert scores[split]["ppl"] == pytest.approx(math.exp(plain), rel=1e-5)
    assert len(generate.main(["--checkpoint", str(tmp_path / "ft"), "--words", "5"]).split()) >= 1


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_one_line_error(code, stderr, message):
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr


def test_cli_error_is_one_line_in_a_real_process(tmp_path):
    """The one real `python script.py` run: exit code 2 and one line on stderr, no traceback."""
    result = cli("train_rnn.py", "--data", "/nonexistent/corpus", "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(result.returncode, result.stderr, "getdata.sh")


@pytest.mark.parametrize(
    "argv,message",
    [
        ([train_rnn, "--data", "/nonexistent/corpus"], "getdata.sh"),
        ([train_rnn, "--data", "{corpus}", "--adaptivesoftmax", "--cutoffs", "10", "99999"], "--cutoffs"),
        ([train_rnn, "--data", "{corpus}", "--model", "Transformer"], "unknown core 'Transformer'"),
        ([train_rnn, "--resume", "{corpus}/train.txt"], "not a checkpoint"),
        ([generate_rmc, "--checkpoint", "/nonexistent.pt"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line(argv, message, corpus_dir, tmp_path, command_line):
    script, *argv = [arg.replace("{corpus}", str(corpus_dir)) if isinstance(arg, str) else arg for arg in argv]
    if script is train_rnn:
        argv += ["--run-dir", str(tmp_path / "run")]
    code, _, stderr = command_line(script, *argv)
    assert_one_line_error(code, stderr, message)
    assert not (tmp_path / "run").exists()  # stopped before making a run folder


def test_cli_non_utf8_names_file_and_line(corpus_dir, tmp_path, command_line):
    (corpus_dir / "test.txt").write_bytes(b"ok\n\xff\xfe bad\n")
    code, _, stderr = command_line(train_rnn, "--data", corpus_dir, "--run-dir", tmp_path / "run")
    assert_one_line_error(code, stderr, "test.txt, line 2: not valid UTF-8")


def test_train_rnn_help_lists_core_flags(command_line):
    code, stdout, _ = command_line(train_rnn, "--help")
    assert code == 0
    for flag in ("--rnn-impl", "--adaptivesoftmax", "--resume", "--max-steps", "--dry-run", "--dropout-after-projection",
                 "--adaptive-projection"):
        assert flag in stdout


def test_checkpoint_runs_with_the_other_implementation(trained_run, corpus_dir):
    from data import Corpus, batchify

    run_dir = trained_run()
    model, _ = training.load_checkpoint(run_dir / "best.pt")
    source = batchify(Corpus(corpus_dir).valid, 2)
    fused = training.evaluate(model, source, 8)
    model.core.config.implementation = "loop"
    assert training.evaluate(model, source, 8) == pytest.approx(fused, rel=1e-5)
    assert torch.get_num_threads() >= 1


def test_compile_flag_runs_the_rmc_step_compiled_with_the_eager_result(corpus_dir, tmp_path, capsys):
    """--compile (default on with CUDA only) turns on the RMC's compiled step; the run matches the eager one."""
    flags = ["--data", str(corpus_dir), *TINY_LM_FLAGS, "--memslots", "2", "--headsize", "4", "--numheads", "2",
             "--keysize", "4", "--attmlplayers", "2", "--dry-run", "--dropout", "0",
             "--optimizer", "sgd", "--lr", "1"]  # (Adam would turn rounding-level gradients into whole steps)
    eager = train_rmc.main([*flags, "--run-dir", str(tmp_path / "eager")])
    assert "compiled steps" not in capsys.readouterr().out  # eager on the CPU unless asked
    fast = train_rmc.main([*flags, "--run-dir", str(tmp_path / "compiled"), "--compile"])
    assert "compiled steps: RMC" in capsys.readouterr().out
    assert json.loads((tmp_path / "compiled" / "args.json").read_text())["args"]["compile"] is True
    assert fast["valid_loss"] == pytest.approx(eager["valid_loss"], rel=1e-5)
    assert fast["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-5)
    eager_weights = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)["model"]
    fast_weights = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)["model"]
    for key in eager_weights:
        torch.testing.assert_close(fast_weights[key], eager_weights[key], rtol=1e-4, atol=1e-6)
