"""Corpus tokenising, vocabulary order, the content-keyed cache, and batching."""

import logging

import pytest
import torch

import data
import training.checkpoint
from data import EOS, Corpus, Dictionary, batchify, get_batch
from errors import UserInputError
from tests.conftest import write_corpus


def write_splits(folder, train="a b b c\nc b\n", valid="b a\n", test="c\n"):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{name}.txt").write_text(text)
    return folder


def test_tokens_vocabulary_order_and_ids(tmp_path):
    corpus = Corpus(write_splits(tmp_path / "c", valid="b a zz\n"))
    # train counts: b 3, <eos> 2, c 2, a 1; ties by first appearance (c before <eos>); zz only in valid
    assert corpus.dictionary.idx2word == ["b", "c", EOS, "a", "zz"]
    assert corpus.dictionary.decode(corpus.train) == ["a", "b", "b", "c", EOS, "c", "b", EOS]
    assert corpus.dictionary.decode(corpus.valid) == ["b", "a", "zz", EOS]
    assert corpus.train.dtype == torch.long


def test_blank_lines_give_eos_like_the_reference(tmp_path):
    corpus = Corpus(write_splits(tmp_path / "c", train="a\n\n b \n"))
    assert corpus.dictionary.decode(corpus.train) == ["a", EOS, EOS, "b", EOS]


def test_only_newlines_end_sentences(tmp_path):
    corpus = Corpus(write_splits(tmp_path / "c", train="a\x0cb\u2028c\r\nd\n"), cache=False)
    # form feeds and Unicode line separators are whitespace inside a sentence, not sentence ends
    assert corpus.dictionary.decode(corpus.train) == ["a", "b", "c", EOS, "d", EOS]


def test_cache_is_written_reused_and_holds_only_plain_data(tmp_path, monkeypatch):
    folder = write_splits(tmp_path / "c")
    first = Corpus(folder)
    assert first.cache_path.is_file() and first.cache_path.name.startswith("corpus.")
    stored = torch.load(first.cache_path, weights_only=True)  # plain tensors and a word list
    assert stored["vocab"] == first.dictionary.idx2word

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again although the cache is valid")

    monkeypatch.setattr(data, "read_tokens", fail)
    second = Corpus(folder)
    assert torch.equal(second.train, first.train) and second.dictionary.idx2word == first.dictionary.idx2word


def test_cache_key_is_the_content_not_the_path(tmp_path):
    one = Corpus(write_splits(tmp_path / "one"))
    two = Corpus(write_splits(tmp_path / "two"))
    assert one.cache_path.name == two.cache_path.name


def test_changed_file_rebuilds_cache_and_removes_the_stale_one(tmp_path):
    folder = write_splits(tmp_path / "c")
    old = Corpus(folder)
    (folder / "valid.txt").write_text("a a d\n")
    new = Corpus(folder)
    assert new.cache_path != old.cache_path
    assert not old.cache_path.exists()
    assert new.dictionary.decode(new.valid) == ["a", "a", "d", EOS]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-content"])
def test_corrupt_cache_is_rebuilt_not_fatal(tmp_path, caplog, damage):
    folder = write_splits(tmp_path / "c")
    good = Corpus(folder)
    raw = good.cache_path.read_bytes()
    if damage == "garbage":
        good.cache_path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        good.cache_path.write_bytes(raw[: len(raw) // 2])
    else:
        torch.save({"tokenizer_version": data.TOKENIZER_VERSION, "vocab": ["x"], "train": torch.tensor([5]),
                    "valid": torch.tensor([0]), "test": torch.tensor([0])}, good.cache_path)
    with caplog.at_level(logging.WARNING):
        again = Corpus(folder)
    assert "rebuilding" in caplog.text
    assert torch.equal(again.train, good.train)
    assert torch.load(again.cache_path, weights_only=True)["vocab"] == good.dictionary.idx2word


def test_missing_folder_names_getdata(tmp_path):
    with pytest.raises(UserInputError, match="getdata.sh"):
        Corpus(tmp_path / "nowhere")


def test_missing_split_names_the_file_and_getdata(tmp_path):
    folder = write_splits(tmp_path / "c")
    (folder / "train.txt").unlink()
    with pytest.raises(UserInputError, match=r"train\.txt.*getdata\.sh"):
        Corpus(folder)


def test_non_utf8_names_file_and_line(tmp_path):
    folder = write_splits(tmp_path / "c")
    (folder / "valid.txt").write_bytes(b"fine line\nsecond line\ncaf\xe9 au lait\n")
    with pytest.raises(UserInputError, match=r"valid\.txt, line 3: not valid UTF-8"):
        Corpus(folder)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_split_is_an_error(tmp_path, content):
    folder = write_splits(tmp_path / "c", test=content)
    with pytest.raises(UserInputError, match=r"test\.txt has no words"):
        Corpus(folder)


def test_unwritable_folder_still_loads(tmp_path, monkeypatch, caplog):
    folder = write_splits(tmp_path / "c")

    def refuse(obj, path):
        raise PermissionError("read-only")

    monkeypatch.setattr(training.checkpoint, "atomic_save", refuse)
    with caplog.at_level(logging.WARNING):
        corpus = Corpus(folder)
    assert len(corpus.dictionary) == 4 and "without it" in caplog.text


def test_dictionary_encode_names_unknown_words():
    dictionary = Dictionary(["a", "<unk>", EOS])
    assert dictionary.encode(["a", EOS]).tolist() == [0, 2]
    with pytest.raises(UserInputError, match=r"'zebra', 'yak'.*<unk>"):
        dictionary.encode(["zebra", "a", "yak", "zebra"])


def test_batchify_is_time_major_columns():
    source = batchify(torch.arange(10), 3)
    assert source.shape == (3, 3)
    assert source[:, 0].tolist() == [0, 1, 2] and source[:, 2].tolist() == [6, 7, 8]
    with pytest.raises(UserInputError, match="the test split .* smaller batch size"):
        batchify(torch.arange(5), 4, name="the test split")


def test_get_batch_targets_are_next_tokens_and_window_is_cut_at_end():
    source = batchify(torch.arange(20), 2)  # [10, 2]
    inputs, targets = get_batch(source, 0, 4)
    assert inputs.shape == targets.shape == (4, 2)
    assert torch.equal(targets[:-1], inputs[1:]) and torch.equal(targets, source[1:5])
    inputs, targets = get_batch(source, 7, 4)
    assert inputs.shape == (2, 2) and targets[-1].tolist() == source[-1].tolist()


def test_real_penn_treebank_statistics():
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "penn" / "train.txt").is_file():
        pytest.skip("Penn Treebank not available beside the repository")
    corpus = Corpus(SHARED_DATA / "penn", cache=False)
    assert len(corpus.dictionary) == 10000
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (929589, 73760, 82430)
    assert corpus.dictionary.idx2word[0] == "the"


def test_write_corpus_helper_is_deterministic(tmp_path):
    one = write_corpus(tmp_path / "a", seed=3)
    two = write_corpus(tmp_path / "b", seed=3)
    assert (one / "train.txt").read_text() == (two / "train.txt").read_text()
