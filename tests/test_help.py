"""Every script's --help shows every option's default (its own, after set_defaults), and says what the
published aliases that differ between scripts set."""

import argparse
import importlib
import re

import pytest

import training

SCRIPTS = ("train_rnn", "train_rmc", "main", "finetune", "pointer", "generate_rmc", "generate",
           "train_nth_farthest", "copy_task", "adding_task", "argmax_task", "plot")


def parser_of(script: str) -> argparse.ArgumentParser:
    module = importlib.import_module(script)
    return (module.build_parser if hasattr(module, "build_parser") else module.generate_rmc.build_parser)()


def option_help(parser: argparse.ArgumentParser, flag: str) -> str:
    """The rendered help of one option, on one line."""
    action = parser._option_string_actions[flag]
    formatter = parser._get_formatter()
    return " ".join(formatter._expand_help(action).split()) if action.help else ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_shows_its_default(script):
    parser = parser_of(script)
    missing = [action.option_strings[0] for action in parser._actions
               if action.option_strings and not isinstance(action, argparse._HelpAction)
               and action.help is not argparse.SUPPRESS and not action.required
               and "default:" not in option_help(parser, action.option_strings[0])]
    assert not missing, f"{script} --help gives no default for {missing}"
    assert "default:" in parser.format_help()


@pytest.mark.parametrize("script, flag, default", [
    ("train_rnn", "--lr", "0.001"), ("main", "--lr", "30.0"), ("copy_task", "--lr", "0.0001"),
    ("train_rnn", "--batch_size", "64"), ("main", "--batch_size", "80"), ("copy_task", "-batch_size", "100"),
    ("main", "--dropouti", "0.65"), ("train_rnn", "--optimizer", "adam"), ("main", "--optimizer", "sgd"),
    ("copy_task", "-mem_slot", "16"), ("train_rmc", "--memslots", "1"), ("copy_task", "--max-steps", "none"),
    ("generate", "--top_k", "0"), ("generate", "--num_samples", "1"),
])
def test_help_shows_the_scripts_own_default(script, flag, default):
    assert option_help(parser_of(script), flag).endswith(f"(default: {default})")


def test_adding_task_variant_defaults_are_named():
    text = option_help(parser_of("adding_task"), "-iterations")
    assert "2000 published, 100000 standard" in text


@pytest.mark.parametrize("script, flag, says", [
    ("copy_task", "-dropout", "unlike the language-model scripts' --dropout (output dropout)"),
    ("copy_task", "-cuda", "-cuda -1 the CPU"),
    ("copy_task", "-cuda", "the language-model scripts' --cuda is a plain switch"),
    ("copy_task", "-nlayer", "the other cores' depth is --nlayers"),
    ("copy_task", "--nlayers", "the DNC, SAM and SDNC count theirs with -nlayer and -nhlayer"),
    ("copy_task", "-mem_slot", "the RMC's slots are --memslots"),
    ("train_rmc", "--memslots", "the DNC's cells are -mem_slot"),
    ("train_rnn", "--dropouth", "unset: the language models' --dropout; 0 in the task scripts) (default: none)"),
    ("main", "--dropouth", "(default: 0.3)"), ("main", "--test_batch_size", "(unset: --eval_batch_size) (default: 1)"),
    ("train_rnn", "--threads", "(0: torch's default) (default: 0)"),
    ("train_rnn", "--cuda", "same as --device cuda"),
    ("copy_task", "--model", "the one -memory_type picks"),
])
def test_help_says_what_confusable_flags_set(script, flag, says):
    assert says in option_help(parser_of(script), flag)


def test_published_spellings_still_set_what_the_help_says(tmp_path):
    parser = parser_of("copy_task")
    args = training.parse_sequence_args(parser, ["-dropout", "0.2", "-nlayer", "2", "-mem_slot", "8", "-cuda",
                                                  "-1"]).args
    assert (args.dropouth, args.nlayer, args.mem_slot, args.device) == (0.2, 2, 8, "cpu")
    assert training.parse_sequence_args(parser, ["--dropout", "0.3"]).args.dropouth == 0.3
    lm = parser_of("train_rnn").parse_args(["--dropout", "0.1", "--nlayers", "3", "--cuda"])
    assert (lm.dropout, lm.dropouth, lm.nlayers, lm.cuda) == (0.1, None, 3, True)
    assert re.search(r"--memslots MEM_SLOTS", parser_of("train_rmc").format_help())
