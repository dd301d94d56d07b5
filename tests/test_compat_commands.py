"""The original projects' command lines run here: every flag of their scripts is accepted, and every
command of their READMEs runs verbatim in `--dry-run` form (GPU flags dropped on a machine without one).

Originals: salesforce/awd-lstm-lm (main.py, finetune.py, pointer.py, generate.py), L0SG/relational-rnn-pytorch
(train_rmc.py, train_rnn.py, generate_rmc.py, train_nth_farthest.py), ixaxaar/pytorch-dnc 1.1.0
(tasks/copy_task.py, tasks/adding_task.py, tasks/argmax_task.py). The flag lists are copied from their
argparse calls; the commands from their READMEs.
"""

import argparse
import importlib
import shlex
import sys
from pathlib import Path

import pytest
import torch

import generate_rmc
import pointer
import train_rnn
import training
from errors import UserInputError
from tests.conftest import TINY_LM_FLAGS, write_corpus

ROOT = Path(__file__).resolve().parents[1]

# Every argparse flag of the original scripts, as they spell them.
ORIGINAL_FLAGS = {
    "main": "--data --model --emsize --nhid --nlayers --lr --clip --epochs --batch_size --bptt --dropout --dropouth "
            "--dropouti --dropoute --wdrop --seed --nonmono --cuda --log-interval --save --alpha --beta --wdecay "
            "--resume --optimizer --when",
    "finetune": "--data --model --emsize --nhid --nlayers --lr --clip --epochs --batch_size --bptt --dropout "
                "--dropouth --dropouti --dropoute --wdrop --tied --seed --nonmono --cuda --log-interval --save "
                "--alpha --beta --wdecay",
    "pointer": "--data --model --save --cuda --bptt --window --theta --lambdasm",
    "generate": "--data --model --checkpoint --outf --words --seed --cuda --temperature --log-interval",
    "generate_rmc": "--data --checkpoint --outf --words --seed --cuda --temperature --log-interval",
    "train_rmc": "--data --emsize --memslots --headsize --numheads --numblocks --forgetbias --inputbias --gatestyle "
                 "--attmlplayers --keysize --adaptivesoftmax --cutoffs --lr --clip --epochs --batch_size --bptt "
                 "--dropout --tied --seed --cuda --log-interval --onnx-export --resume --name",
    "train_rnn": "--data --model --emsize --nhid --nlayers --lr --clip --epochs --batch_size --bptt --dropout --tied "
                 "--seed --cuda --cudnn --log-interval --save --onnx-export --resume --adaptivesoftmax --cutoffs "
                 "--name",
    "train_nth_farthest": "--cuda",
    "copy_task": "-input_size -rnn_type -nhid -dropout -memory_type -nlayer -nhlayer -lr -optim -clip -batch_size "
                 "-mem_size -mem_slot -read_heads -sparse_reads -temporal_reads -sequence_max_length "
                 "-curriculum_increment -curriculum_freq -cuda -iterations -summarize_freq -check_freq -visdom",
    "adding_task": "-input_size -rnn_type -nhid -dropout -memory_type -nlayer -nhlayer -lr -optim -clip -batch_size "
                   "-mem_size -mem_slot -read_heads -sparse_reads -temporal_reads -sequence_max_length -cuda "
                   "-iterations -summarize_freq -check_freq -visdom",
    "argmax_task": "-input_size -rnn_type -nhid -dropout -memory_type -nlayer -nhlayer -lr -optim -clip -batch_size "
                   "-mem_size -mem_slot -read_heads -sparse_reads -temporal_reads -sequence_max_length -cuda "
                   "-iterations -summarize_freq -check_freq -visdom",
}
# The originals' switches (no value); every other flag takes one.
SWITCHES = {"--cuda", "--tied", "--cudnn", "--adaptivesoftmax", "-visdom"}
DNC_TASK_CUDA = {"copy_task", "adding_task", "argmax_task"}  # pytorch-dnc's -cuda takes a GPU id


@pytest.mark.parametrize("script", sorted(ORIGINAL_FLAGS))
def test_every_flag_of_the_original_script_is_accepted(script):
    parser = importlib.import_module(script).build_parser()
    for flag in ORIGINAL_FLAGS[script].split():
        action = parser._option_string_actions.get(flag)
        assert action is not None, f"{script}.py does not accept {flag}"
        switch = flag in SWITCHES and not (flag == "-cuda" and script in DNC_TASK_CUDA)
        if switch:
            assert action.nargs == 0, f"{script}.py {flag} should be a switch"
        else:
            assert action.nargs != 0, f"{script}.py {flag} should take a value"


def test_cudnn_picks_the_fused_lstm():
    parser = train_rnn.build_parser()
    assert parser.parse_args(["--cudnn"]).rnn_impl == "fused"
    assert parser.parse_args(["--rnn-impl", "loop"]).rnn_impl == "loop"


# ------------------------------------------------------------------------------------------------
# The READMEs' commands, verbatim, in --dry-run form


def corpora(root: Path, rare_words: int = 0) -> None:
    """Tiny corpora under the names the commands use (the AWD character-level ones are words here too);
    `rare_words` more words, once each, in WikiText-2's training text (for adaptive-softmax cutoffs)."""
    for name in ("penn", "wikitext-2", "wikitext-103", "enwik8", "pennchar"):
        write_corpus(root / "data" / name, {"train": 60, "valid": 16, "test": 16})  # 32 evaluation columns
    if rare_words:
        train = root / "data" / "wikitext-2" / "train.txt"
        rare = [f"r{index}" for index in range(rare_words)]
        lines = [" ".join(rare[start:start + 500]) for start in range(0, rare_words, 500)]
        train.write_text(train.read_text() + "\n".join(lines) + "\n")


def split_command(command: str) -> tuple[str, list[str]]:
    """`python [-u] SCRIPT ARGS` -> (module name, ARGS), GPU flags dropped when there is no GPU."""
    words = shlex.split(command)
    assert words[0] == "python"
    words = words[1:]
    if words[0] == "-u":
        words = words[1:]
    script, argv = Path(words[0]), words[1:]
    if not torch.cuda.is_available():
        argv = [word for word in argv if word != "--cuda"]
        while "-cuda" in argv:
            index = argv.index("-cuda")
            del argv[index:index + 2]
    return script.stem, argv


def run_command(command: str, dry_run: bool = True):
    module, argv = split_command(command)
    if dry_run and "--help" not in argv:
        argv = [*argv, "--dry-run"]
    return importlib.import_module(module).main(argv)


# Each list runs in order in one folder: main.py's --save is what finetune.py and pointer.py read.
README_COMMANDS = {
    # salesforce/awd-lstm-lm README
    "awd-ptb": [
        "python main.py --batch_size 20 --data data/penn --dropouti 0.4 --dropouth 0.25 --seed 141 --epoch 500 "
        "--save PTB.pt",
        "python finetune.py --batch_size 20 --data data/penn --dropouti 0.4 --dropouth 0.25 --seed 141 --epoch 500 "
        "--save PTB.pt",
        "python pointer.py --data data/penn --save PTB.pt --lambdasm 0.1 --theta 1.0 --window 500 --bptt 5000",
    ],
    "awd-ptb-qrnn": [
        "python -u main.py --model QRNN --batch_size 20 --clip 0.2 --wdrop 0.1 --nhid 1550 --nlayers 4 --emsize 400 "
        "--dropouth 0.3 --seed 9001 --dropouti 0.4 --epochs 550 --save PTB.pt",
        "python -u finetune.py --model QRNN --batch_size 20 --clip 0.2 --wdrop 0.1 --nhid 1550 --nlayers 4 "
        "--emsize 400 --dropouth 0.3 --seed 404 --dropouti 0.4 --epochs 300 --save PTB.pt",
        "python pointer.py --model QRNN --lambdasm 0.1 --theta 1.0 --window 500 --bptt 5000 --save PTB.pt",
    ],
    "awd-wt2": [
        "python main.py --epochs 750 --data data/wikitext-2 --save WT2.pt --dropouth 0.2 --seed 1882",
        "python finetune.py --epochs 750 --data data/wikitext-2 --save WT2.pt --dropouth 0.2 --seed 1882",
        "python pointer.py --save WT2.pt --lambdasm 0.1279 --theta 0.662 --window 3785 --bptt 2000 "
        "--data data/wikitext-2",
    ],
    "awd-wt2-qrnn": [
        "python -u main.py --epochs 500 --data data/wikitext-2 --clip 0.25 --dropouti 0.4 --dropouth 0.2 "
        "--nhid 1550  --nlayers 4 --seed 4002 --model QRNN --wdrop 0.1 --batch_size 40 --save WT2.pt",
        "python finetune.py --epochs 500 --data data/wikitext-2 --clip 0.25 --dropouti 0.4 --dropouth 0.2 "
        "--nhid 1550 --nlayers 4 --seed 4002 --model QRNN --wdrop 0.1 --batch_size 40 --save WT2.pt",
        "python -u pointer.py --save WT2.pt --model QRNN --lambdasm 0.1279 --theta 0.662 --window 3785 --bptt 2000 "
        "--data data/wikitext-2",
    ],
    "awd-enwik8": [
        "python -u main.py --epochs 50 --nlayers 3 --emsize 400 --nhid 1840 --alpha 0 --beta 0 --dropoute 0 "
        "--dropouth 0.1 --dropouti 0.1 --dropout 0.4 --wdrop 0.2 --wdecay 1.2e-6 --bptt 200 --batch_size 128 "
        "--optimizer adam --lr 1e-3 --data data/enwik8 --save ENWIK8.pt --when 25 35",
    ],
    "awd-pennchar": [
        "python -u main.py --epochs 500 --nlayers 3 --emsize 200 --nhid 1000 --alpha 0 --beta 0 --dropoute 0 "
        "--dropouth 0.25 --dropouti 0.1 --dropout 0.1 --wdrop 0.5 --wdecay 1.2e-6 --bptt 150 --batch_size 128 "
        "--optimizer adam --lr 2e-3 --data data/pennchar --save PTBC.pt --when 300 400",
    ],
    "awd-wt103-qrnn": [
        "python -u main.py --epochs 14 --nlayers 4 --emsize 400 --nhid 2500 --alpha 0 --beta 0 --dropoute 0 "
        "--dropouth 0.1 --dropouti 0.1 --dropout 0.1 --wdrop 0 --wdecay 0 --bptt 140 --batch_size 60 "
        "--optimizer adam --lr 1e-3 --data data/wikitext-103 --save WT103.12hr.QRNN.pt --when 12 --model QRNN",
    ],
    # L0SG/relational-rnn-pytorch README
    "rmc-lm": ["python train_rmc.py --cuda ", "python train_rnn.py --cuda"],
    "rmc-lm-adaptive": ["python train_rmc.py --cuda --adaptivesoftmax --cutoffs 1000 5000 20000"],
    "rmc-nth-farthest": ["python train_nth_farthest.py --cuda"],
    # ixaxaar/pytorch-dnc 1.1.0 README
    "dnc-copy": [
        "python ./tasks/copy_task.py -cuda 0 -optim rmsprop -batch_size 32 -mem_slot 64",
        "python ./tasks/copy_task.py -cuda 0 -lr 0.001 -rnn_type lstm -nlayer 1 -nhlayer 2 -dropout 0 -mem_slot 32 "
        "-batch_size 1000 -optim adam -sequence_max_length 8",
        "python ./tasks/copy_task.py -cuda 0 -lr 0.001 -rnn_type lstm -memory_type sdnc -nlayer 1 -nhlayer 2 "
        "-dropout 0 -mem_slot 100 -mem_size 10  -read_heads 1 -sparse_reads 10 -batch_size 20 -optim adam "
        "-sequence_max_length 10",
        "python ./tasks/copy_task.py -cuda 0 -lr 0.001 -rnn_type lstm -memory_type sdnc -nlayer 1 -nhlayer 2 "
        "-dropout 0 -mem_slot 100 -mem_size 10  -read_heads 1 -sparse_reads 4 -temporal_reads 4 -batch_size 20 "
        "-optim adam -sequence_max_length 4 -curriculum_increment 2 -curriculum_freq 10000",
        "python ./tasks/copy_task.py -cuda 0",
    ],
    "dnc-adding-argmax": [
        "python ./tasks/adding_task.py -cuda 0 -lr 0.0001 -rnn_type lstm -memory_type sam -nlayer 1 -nhlayer 1 "
        "-nhid 100 -dropout 0 -mem_slot 1000 -mem_size 32 -read_heads 1 -sparse_reads 4 -batch_size 20 "
        "-optim rmsprop -input_size 3 -sequence_max_length 100",
        "python ./tasks/argmax_task.py -cuda 0 -lr 0.0001 -rnn_type lstm -memory_type dnc -nlayer 1 -nhlayer 1 "
        "-nhid 100 -dropout 0 -mem_slot 100 -mem_size 10 -read_heads 2 -batch_size 1 -optim rmsprop "
        "-sequence_max_length 15 -input_size 10 -iterations 10000",
    ],
}
# Full-size models on CPU: the largest take minutes even for two batches of a tiny corpus.
SLOW = {"rmc-lm-adaptive", "awd-ptb-qrnn", "awd-wt2", "awd-wt2-qrnn", "awd-enwik8", "awd-pennchar", "awd-wt103-qrnn"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
                                  for name in README_COMMANDS])
def test_readme_commands_run_verbatim_as_dry_runs(name, tmp_path, monkeypatch):
    corpora(tmp_path, rare_words=20_100 if name == "rmc-lm-adaptive" else 0)  # cutoffs up to 20,000 need the words
    monkeypatch.chdir(tmp_path)
    for command in README_COMMANDS[name]:
        result = run_command(command)
        if isinstance(result, dict) and "test_ppl" in result:
            assert result["test_ppl"] > 1, command
        elif isinstance(result, dict) and "valid" in result:  # pointer.py
            assert result["valid"]["cache_ppl"] > 1, command
    saved = [word for command in README_COMMANDS[name] for word in [shlex.split(command)] if "--save" in word]
    for words in saved:
        assert (tmp_path / words[words.index("--save") + 1]).is_file()


def test_dnc_task_help_and_script_path(tmp_path):
    """`python ./tasks/copy_task.py --help` (pytorch-dnc's README) from the repository root, in a real process."""
    import subprocess

    done = subprocess.run([sys.executable, "./tasks/copy_task.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "-mem_slot" in done.stdout and "-memory_type" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["python train_rmc.py --cuda", "python ./tasks/copy_task.py -cuda 0"])
def test_gpu_flags_without_a_gpu_say_so_in_one_line(command, tmp_path, monkeypatch):
    corpora(tmp_path)
    monkeypatch.chdir(tmp_path)
    words = shlex.split(command)
    with pytest.raises(UserInputError, match="CUDA is not available"):
        importlib.import_module(Path(words[1]).stem).main([*words[2:], "--dry-run"])


# ------------------------------------------------------------------------------------------------
# What the flags new to these scripts do


@pytest.fixture
def trained(corpus_dir, tmp_path):
    run_dir = tmp_path / "run"
    train_rnn.main(["--data", str(corpus_dir), "--run-dir", str(run_dir), "--dry-run", *TINY_LM_FLAGS])
    return run_dir


def test_generate_checks_data_notes_model_and_logs_progress(trained, corpus_dir, tmp_path, capsys):
    text = generate_rmc.main(["--checkpoint", str(trained), "--data", str(corpus_dir), "--words", "5",
                              "--log-interval", "2", "--model", "LSTM", "--seed", "3"])
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("| generated")] == [
        "| generated 0/5 words", "| generated 2/5 words", "| generated 4/5 words"]
    assert "note" not in err
    assert text == generate_rmc.main(["--checkpoint", str(trained), "--words", "5", "--seed", "3"])  # same sampling
    generate_rmc.main(["--checkpoint", str(trained), "--words", "1", "--model", "QRNN"])
    err = capsys.readouterr().err
    assert "--model QRNN ignored" in err and "holds a LSTM model" in err
    other = write_corpus(tmp_path / "other", {"train": 20, "valid": 4, "test": 4}, seed=5)
    (other / "train.txt").write_text((other / "train.txt").read_text() + "zebra\n")
    with pytest.raises(UserInputError, match="another vocabulary"):
        generate_rmc.main(["--checkpoint", str(trained), "--data", str(other)])


def test_pointer_dry_run_reads_two_windows_and_notes_model(trained, corpus_dir, capsys):
    full = pointer.main(["--checkpoint", str(trained), "--data", str(corpus_dir), "--bptt", "7", "--window", "5"])
    dry = pointer.main(["--save", str(trained), "--data", str(corpus_dir), "--bptt", "7", "--window", "5",
                        "--dry-run", "--model", "QRNN"])
    assert dry["valid"]["tokens"] == 14 and full["valid"]["tokens"] > 14
    assert "--model QRNN ignored" in capsys.readouterr().out


def test_onnx_export_needs_onnx_and_exports_the_best_model(corpus_dir, tmp_path, monkeypatch):
    argv = ["--data", str(corpus_dir), "--dry-run", *TINY_LM_FLAGS, "--onnx-export", str(tmp_path / "model.onnx")]
    monkeypatch.setitem(sys.modules, "onnx", None)  # not installed: stop before training, say what to install
    with pytest.raises(UserInputError, match="pip install onnx"):
        train_rnn.main([*argv, "--run-dir", str(tmp_path / "a")])
    monkeypatch.setitem(sys.modules, "onnx", argparse.Namespace())
    exported = {}

    def export(module, arguments, path, **options):
        exported.update(module=module, arguments=arguments, path=path)

    monkeypatch.setattr(torch.onnx, "export", export)
    train_rnn.main([*argv, "--run-dir", str(tmp_path / "b")])
    (tokens,) = exported["arguments"]
    assert exported["path"] == str(tmp_path / "model.onnx") and tokens.shape == (8, 1)  # [bptt, 1]
    best, _ = training.load_checkpoint(tmp_path / "b" / "best.pt", torch.device("cpu"))
    best.eval()
    features, _ = best(tokens)
    torch.testing.assert_close(exported["module"](tokens), best.log_probs(features))
