"""generate.py / generate_rmc.py: --top_k restricts sampling to the K most likely words, --num_samples prints
independent texts from the same prompt."""

import pytest
import torch

import generate
import generate_rmc
import train_rnn
import training
from conftest import TINY_LM_FLAGS
from data import Dictionary
from errors import UserInputError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import write_corpus

    root = tmp_path_factory.mktemp("gen")
    run = root / "run"
    train_rnn.main(["--data", str(write_corpus(root / "corpus")), "--run-dir", str(run), *TINY_LM_FLAGS])
    return run


def greedy(run_dir, prompt: list[str], words: int) -> list[str]:
    """The most likely continuation, word by word, computed here from the model's log-probabilities."""
    model, checkpoint = training.load_checkpoint(run_dir / "best.pt")
    dictionary = Dictionary(checkpoint["vocab"])
    with torch.no_grad():
        features, state = model(dictionary.encode(prompt).view(-1, 1))
        out = list(prompt)
        for _ in range(words):
            word = int(model.log_probs(features[-1, 0]).argmax())
            out.append(dictionary.idx2word[word])
            features, state = model(torch.tensor([[word]]), state)
    return out


def test_top_k_1_is_the_most_likely_continuation(run_dir):
    text = generate.main(["--checkpoint", str(run_dir), "--prompt", "w3 w4", "--words", "12", "--top_k", "1",
                          "--seed", "5"])
    assert text == generate_rmc.to_text(greedy(run_dir, ["w3", "w4"], 12))
    # at temperature 1 and no top-k, the same seed gives other words somewhere
    sampled = generate.main(["--checkpoint", str(run_dir), "--prompt", "w3 w4", "--words", "12", "--seed", "5"])
    assert sampled != text


def test_top_k_draws_only_among_the_k_most_likely_words(run_dir, monkeypatch):
    drawn_from = []
    multinomial = torch.multinomial

    def spy(probs, *args, **kwargs):
        drawn_from.append(int((probs > 0).sum()))
        return multinomial(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    generate_rmc.main(["--checkpoint", str(run_dir), "--words", "20", "--top_k", "3", "--temperature", "5"])
    assert drawn_from == [3] * 20
    drawn_from.clear()
    generate_rmc.main(["--checkpoint", str(run_dir), "--words", "4"])
    assert min(drawn_from) > 3  # all words keep some probability without --top_k


def test_num_samples_prints_independent_texts_from_the_prompt(run_dir, tmp_path):
    out = tmp_path / "samples.txt"
    text = generate_rmc.main(["--checkpoint", str(run_dir), "--prompt", "w1", "--words", "15", "--num_samples",
                              "3", "--outf", str(out)])
    samples = text.split(f"\n{generate_rmc.SEPARATOR}\n")
    assert len(samples) == 3 and len(set(samples)) == 3
    for sample in samples:
        assert sample.startswith("w1") and len(sample.split()) + sample.count("\n") == 16
    assert out.read_text() == text + "\n"
    # the first sample is the text a single-sample command prints
    assert samples[0] == generate_rmc.main(["--checkpoint", str(run_dir), "--prompt", "w1", "--words", "15"])


def test_words_count_excludes_the_random_first_word(run_dir):
    text = generate_rmc.main(["--checkpoint", str(run_dir), "--words", "5"])
    assert len(text.split()) + text.count("\n") == 6


@pytest.mark.parametrize("argv, message", [(["--top_k", "-1"], "--top_k must be at least 0"),
                                           (["--num_samples", "0"], "--num_samples must be at least 1")])
def test_bad_values_are_named(run_dir, argv, message):
    with pytest.raises(UserInputError, match=message):
        generate_rmc.main(["--checkpoint", str(run_dir), *argv])
