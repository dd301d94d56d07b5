"""Word-level corpora: tokenising, a content-keyed cache, and time-major batches.

A corpus folder holds `train.txt`, `valid.txt` and `test.txt`, one sentence per line.
Tokens are the whitespace-separated words of each line followed by `<eos>`. The
vocabulary is ordered by descending frequency in the training split (the adaptive
softmax relies on it), ties broken by first appearance.

The tokenised corpus is cached beside the text as `corpus.<hash>.pt`, a plain dict of
tensors plus the word list, keyed by a hash of the three files' contents and of
`TOKENIZER_VERSION`; it is read with `torch.load(..., weights_only=True)`, so loading a
cache never executes code.

Shapes: `N` tokens in a split, `B` batch columns, `T` time steps.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
from pathlib import Path

import torch

from errors import UserInputError

log = logging.getLogger(__name__)

TOKENIZER_VERSION = 2  # 2: only "\n" ends a line (1 used str.splitlines)
SPLITS = ("train", "valid", "test")
EOS = "<eos>"
CACHE_PREFIX = "corpus."


class Dictionary:
    """The vocabulary: `idx2word[i]` is word i, `word2idx[w]` its id (pytorch/examples names)."""

    def __init__(self, words: list[str]):
        self.idx2word = list(words)
        self.word2idx = {word: index for index, word in enumerate(self.idx2word)}
        if len(self.word2idx) != len(self.idx2word):
            raise ValueError("vocabulary has duplicate words")

    def __len__(self) -> int:
        return len(self.idx2word)

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    def encode(self, words: list[str]) -> torch.Tensor:
        """Ids of `words` as a LongTensor [len(words)].

        Raises:
            UserInputError: a word is not in the vocabulary (all such words are named).
        """
        unknown = [word for word in words if word not in self.word2idx]
        if unknown:
            shown = ", ".join(repr(word) for word in dict.fromkeys(unknown))
            hint = " (this vocabulary spells unknown words as '<unk>')" if "<unk>" in self else ""
            raise UserInputError(f"not in the vocabulary of {len(self)} words: {shown}{hint}")
        return torch.tensor([self.word2idx[word] for word in words], dtype=torch.long)

    def decode(self, ids: list[int] | torch.Tensor) -> list[str]:
        return [self.idx2word[int(index)] for index in ids]


def read_tokens(path: Path) -> list[str]:
    """The tokens of one split: each line's words followed by `<eos>`.

    Raises:
        UserInputError: the file is not valid UTF-8 (names the file and line).
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise UserInputError(
            f"{path}, line {line}: not valid UTF-8 (byte {raw[error.start]:#04x}); "
            f"re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None
    lines = text.split("\n")  # only newlines end a sentence (str.splitlines also splits at \x0c, \u2028, ...)
    if lines[-1] == "":
        lines.pop()  # the newline that ends the file
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line.split())  # a trailing "\r" is whitespace too
        tokens.append(EOS)
    return tokens


def build_vocabulary(splits: dict[str, list[str]]) -> list[str]:
    """Words by descending training frequency, ties (and words seen only outside train) by first use."""
    counts = collections.Counter(splits["train"])
    first_seen: dict[str, int] = {}
    for name in SPLITS:
        for word in splits[name]:
            first_seen.setdefault(word, len(first_seen))
    return sorted(first_seen, key=lambda word: (-counts[word], first_seen[word]))


def corpus_hash(paths: dict[str, Path]) -> str:
    """Hash of the split files' contents and the tokenizer version (never of their paths)."""
    digest = hashlib.sha256(f"tokenizer-v{TOKENIZER_VERSION}".encode())
    for name in SPLITS:
        content = paths[name].read_bytes()
        digest.update(f"|{name}|{len(content)}|".encode())
        digest.update(content)
    return digest.hexdigest()[:20]


class Corpus:
    """A tokenised corpus folder.

    Attributes:
        dictionary: the `Dictionary`, most frequent training word first.
        train, valid, test: LongTensor [N] of token ids per split.
        cache_path: where the tokenised corpus was read from or written to (None if not cached).

    Raises:
        UserInputError: missing folder or split, non-UTF-8 text, or an empty split.
    """

    def __init__(self, path: str | os.PathLike, cache: bool = True):
        self.path = Path(path)
        paths = self._split_paths()
        key = corpus_hash(paths)
        self.cache_path = self.path / f"{CACHE_PREFIX}{key}.pt" if cache else None
        loaded = self._load_cache(self.cache_path) if cache else None
        if loaded is None:
            loaded = self._tokenize(paths)
            if cache:
                self._write_cache(loaded)
        self.dictionary = Dictionary(loaded["vocab"])
        for name in SPLITS:
            setattr(self, name, loaded[name].long())

    def _split_paths(self) -> dict[str, Path]:
        if not self.path.is_dir():
            raise UserInputError(
                f"data folder {self.path} does not exist; run `bash getdata.sh` to fetch Penn Treebank "
                f"and WikiText-2, or point --data at a folder with train.txt, valid.txt and test.txt"
            )
        paths = {name: self.path / f"{name}.txt" for name in SPLITS}
        missing = [path.name for path in paths.values() if not path.is_file()]
        if missing:
            raise UserInputError(
                f"{self.path} lacks {', '.join(missing)}; run `bash getdata.sh` (or copy the corpus in "
                f"with `bash getdata.sh --from DIR`) so the folder holds train.txt, valid.txt and test.txt"
            )
        return paths

    def _tokenize(self, paths: dict[str, Path]) -> dict:
        splits = {name: read_tokens(path) for name, path in paths.items()}
        for name, tokens in splits.items():
            if not any(token != EOS for token in tokens):
                raise UserInputError(f"{paths[name]} has no words; the {name} split must not be empty")
        vocab = build_vocabulary(splits)
        word2idx = {word: index for index, word in enumerate(vocab)}
        loaded: dict = {"tokenizer_version": TOKENIZER_VERSION, "vocab": vocab}
        for name, tokens in splits.items():
            loaded[name] = torch.tensor([word2idx[token] for token in tokens], dtype=torch.int32)
        return loaded

    @staticmethod
    def _load_cache(path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            vocab = loaded["vocab"]
            valid = (
                loaded["tokenizer_version"] == TOKENIZER_VERSION
                and isinstance(vocab, list)
                and all(isinstance(loaded[name], torch.Tensor) and loaded[name].dim() == 1 for name in SPLITS)
                and all(not loaded[name].is_floating_point() and loaded[name].numel() > 0 for name in SPLITS)
                and all(0 <= int(loaded[name].min()) and int(loaded[name].max()) < len(vocab) for name in SPLITS)
            )
        except Exception as error:  # any unreadable cache is rebuilt, whatever broke it
            log.warning("cache %s is unreadable (%s); rebuilding it", path, error)
            return None
        if not valid:
            log.warning("cache %s is inconsistent; rebuilding it", path)
            return None
        return loaded

    def _write_cache(self, loaded: dict) -> None:
        from training.checkpoint import atomic_save  # here: the training package imports this module

        try:
            atomic_save(loaded, self.cache_path)
        except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError
            log.warning("could not write the corpus cache %s (%s); continuing without it", self.cache_path,
                        str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
            return
        for stale in self.path.glob(f"{CACHE_PREFIX}*.pt"):
            if stale != self.cache_path:
                try:
                    stale.unlink(missing_ok=True)
                except OSError:  # e.g. a read-only folder: an old cache left is harmless
                    pass


def batchify(
    data: torch.Tensor, batch_size: int, device: torch.device | str | None = None, name: str = "a split"
) -> torch.Tensor:
    """Cut a token stream into `batch_size` contiguous columns.

    Args:
        data: LongTensor [N].
        batch_size: number of columns B; the last N mod B tokens are dropped.
        name: how to name the split in the error (e.g. "the test split (--test_batch_size)").

    Returns:
        LongTensor [N // B, B]: column b holds tokens b*(N//B) ... (b+1)*(N//B)-1.

    Raises:
        UserInputError: fewer than 2 tokens per column.
    """
    steps = data.size(0) // batch_size
    if steps < 2:
        raise UserInputError(
            f"{name} of {data.size(0)} tokens cannot fill {batch_size} columns of at least 2 tokens; "
            f"use a smaller batch size"
        )
    # [B * (N // B)] -> [B, N // B] -> [N // B, B]
    return data[: steps * batch_size].view(batch_size, steps).t().contiguous().to(device)


def get_batch(source: torch.Tensor, start: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-word targets of the window starting at row `start`.

    Args:
        source: LongTensor [S, B] from `batchify`.
        start: first row of the window.
        seq_len: wanted length; the window is cut short at the end of `source`.

    Returns:
        inputs [T, B] and targets [T, B] with T = min(seq_len, S - 1 - start).
    """
    length = min(seq_len, source.size(0) - 1 - start)
    return source[start : start + length], source[start + 1 : start + 1 + length]
