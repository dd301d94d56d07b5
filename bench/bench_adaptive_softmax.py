"""Adaptive and split softmax against the full softmax: speed and memory at WikiText-103 size, perplexity on PTB.

Two parts, both through the language model's own head (`models.LanguageModel.loss`, the code every
LM script trains with), so the figures are those users get:

1. **Speed and memory** on a 267,735-word vocabulary (WikiText-103), features of size 512 and
   1,280 tokens per batch (e.g. batch 20 x bptt 64), forward+backward of the loss with respect to
   the head's parameters and the features, one CPU thread by default. Heads: the full softmax
   (linear decoder + cross-entropy) and the adaptive softmax with cutoffs [2800, 20000, 76000] and
   [20000, 40000, 200000] (div_value 4), both untied, and the tied split softmax (AWD-LSTM's, the
   head main.py chooses for this vocabulary) with cutoffs [2800, 20000, 76000]: its decoder is the
   embedding, so its head parameters are the embedding's plus 3 tombstones. PyTorch's
   `nn.AdaptiveLogSoftmaxWithLoss` called directly is timed beside ours, to show the model's head
   adds nothing. Targets follow a Zipf law over the frequency-sorted vocabulary (s = 1, as in
   natural text: most tokens fall in the head cluster);
   `--targets uniform` gives the worst case for the adaptive softmax. Memory: the head's parameters
   and the bytes autograd saves for the backward pass (unique storages, counted with
   `torch.autograd.graph.saved_tensors_hooks`); "beyond the embedding" leaves out a weight tied to
   the embedding, which the model holds anyway. Variants are interleaved within each round; medians.
2. **Equal-budget perplexity on Penn Treebank** (`--ptb DIR`, skipped with `--no-ptb`): the same
   small LSTM LM (embedding = hidden = 256, one layer, untied so both heads have the same capacity,
   dropout 0.2, Adam 2e-3, clip 0.25, batch 20, bptt 35) trained for the same wall-clock budget
   (`--budget` seconds each, 2 threads by default) with each head, then the validation perplexity
   over the whole validation split. PTB's vocabulary is 10,000 words, so the speed-up there is small:
   this part checks that the adaptive head learns as well per second, not the WikiText-103 speed.
   The split softmax (cutoffs --ptb-cutoffs) trains the same LSTM tied, as main.py would.

    python bench/bench_adaptive_softmax.py --json bench/out/adaptive_softmax.json
    python bench/bench_adaptive_softmax.py --no-ptb --targets uniform
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as `python bench/bench_adaptive_softmax.py` from anywhere

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import machine_info, synchronize, write_results  # noqa: E402
from data import Corpus, batchify, get_batch  # noqa: E402
from models import LanguageModel, LMConfig  # noqa: E402
from models.core import detach_state  # noqa: E402
from training import evaluate  # noqa: E402

MIB = 2**20
DEFAULT_CUTOFFS = ([2800, 20000, 76000], [20000, 40000, 200000])
SPLIT_CUTOFFS = [2800, 20000, 76000]  # AWD-LSTM's for a vocabulary above 75,000 words


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=267735, help="vocabulary size (267735: WikiText-103)")
    parser.add_argument("--features", type=int, default=512, help="size of the features fed to the head")
    parser.add_argument("--tokens", type=int, default=1280, help="tokens per batch")
    parser.add_argument("--targets", choices=["zipf", "uniform"], default="zipf")
    parser.add_argument("--threads", type=int, default=1, help="threads for the speed part")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ptb", type=Path, default=REPO_ROOT / "data" / "penn", help="Penn Treebank folder")
    parser.add_argument("--no-ptb", dest="no_ptb", action="store_true", help="skip the PTB perplexity part")
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per head on PTB")
    parser.add_argument("--ptb-cutoffs", dest="ptb_cutoffs", type=int, nargs="+", default=[2000, 6000])
    parser.add_argument("--ptb-threads", dest="ptb_threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def head_model(vocab: int, features: int, cutoffs: list[int] | None, split: bool = False) -> LanguageModel:
    """A language model whose head is the one measured; its embedding and core are never run here.

    The full and adaptive heads are untied; the split softmax is tied, its decoder is the embedding.
    """
    if split:
        return LanguageModel(LMConfig(
            vocab_size=vocab, core="LSTM", core_config={"input_size": features, "hidden_size": features},
            emsize=features, dropout=0.0, tie_weights=True, split_softmax=True, cutoffs=list(cutoffs or []),
        ))
    config = LMConfig(
        vocab_size=vocab, core="LSTM", core_config={"input_size": 1, "hidden_size": features},
        emsize=1, dropout=0.0, tie_weights=False, adaptive_softmax=cutoffs is not None,
        cutoffs=list(cutoffs or []),
    )
    model = LanguageModel(config)
    model.encoder = nn.Embedding(1, 1)  # the real one (vocab x emsize) is not part of the head
    return model


def head_parameters(model: LanguageModel) -> list[nn.Parameter]:
    if model.split_softmax is not None:
        return [*model.decoder.parameters(), *model.split_softmax.parameters()]
    head = model.adaptive if model.adaptive is not None else model.decoder
    return list(head.parameters())


def mib(parameters: list[nn.Parameter]) -> float:
    return round(sum(p.numel() * p.element_size() for p in parameters) / MIB, 1)


def check_split_head(name: str, model: LanguageModel, features: torch.Tensor, targets: torch.Tensor) -> None:
    """On a few tokens: the split head's log-probabilities normalise, and its loss is their mean at the targets."""
    with torch.no_grad():
        log_probs = model.log_probs(features[:16])  # [16, 1, V]
        worst = (torch.logsumexp(log_probs, dim=-1)).abs().max().item()
        expected = -log_probs.gather(-1, targets[:16].unsqueeze(-1)).mean().item()
        loss = model.loss(features[:16], targets[:16]).item()
    if worst > 1e-4 or abs(loss - expected) > 1e-4 * max(1.0, abs(expected)):
        raise SystemExit(f"{name}: log-probabilities sum to exp({worst:.2g}) or loss {loss} differs from {expected}")


def draw_targets(vocab: int, tokens: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.randint(0, vocab, (tokens,), generator=generator)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)  # Zipf, s = 1, over word ranks
    return torch.multinomial(weights, tokens, replacement=True, generator=generator)


class SavedBytes:
    """Sum of the unique storages autograd saves for backward while active."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def speed_part(args: argparse.Namespace, device: torch.device) -> list[dict]:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(args.tokens, 1, args.features, generator=generator).to(device)
    targets = draw_targets(args.vocab, args.tokens, args.targets, generator).view(args.tokens, 1).to(device)

    variants: dict[str, dict] = {}
    torch.manual_seed(0)
    full = head_model(args.vocab, args.features, None).to(device)
    variants["full softmax"] = {"model": full, "cutoffs": None, "impl": "ours"}
    for cutoffs in [cutoffs for cutoffs in DEFAULT_CUTOFFS if cutoffs[-1] < args.vocab]:  # those that fit
        torch.manual_seed(0)
        model = head_model(args.vocab, args.features, cutoffs).to(device)
        variants[f"adaptive {cutoffs}"] = {"model": model, "cutoffs": cutoffs, "impl": "ours"}
        variants[f"adaptive {cutoffs} (torch module)"] = {"model": model, "cutoffs": cutoffs, "impl": "torch"}
    if SPLIT_CUTOFFS[-1] < args.vocab:
        torch.manual_seed(0)
        model = head_model(args.vocab, args.features, SPLIT_CUTOFFS, split=True).to(device)
        variants[f"split {SPLIT_CUTOFFS} (tied)"] = {"model": model, "cutoffs": SPLIT_CUTOFFS, "impl": "ours"}

    def run(variant: dict) -> None:
        model: LanguageModel = variant["model"]
        x = features.detach().requires_grad_()
        if variant["impl"] == "ours":
            loss = model.loss(x, targets)
        else:  # PyTorch's module on the same parameters
            loss = model.adaptive(x.view(-1, args.features), targets.view(-1)).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    # Same weights, same loss: the two adaptive paths must agree before anything is timed.
    for name, variant in variants.items():
        if variant["impl"] == "torch":
            model = variant["model"]
            ours = model.loss(features, targets).item()
            theirs = model.adaptive(features.view(-1, args.features), targets.view(-1)).loss.item()
            if abs(ours - theirs) > 1e-4 * max(1.0, abs(theirs)):
                raise SystemExit(f"{name}: loss {theirs} differs from the model's head {ours}")
        elif variant["model"].split_softmax is not None:
            check_split_head(name, variant["model"], features, targets)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.warmup + args.repeats):
        for name, variant in variants.items():
            synchronize(device)
            start = time.perf_counter()
            run(variant)
            synchronize(device)
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)

    rows = []
    full_ms = statistics.median(times["full softmax"]) * 1000

    def time_vs_adaptive(cutoffs: list[int] | None, ms: float) -> float | str:
        """Time over that of our adaptive softmax with the same cutoffs ('' for the full softmax)."""
        adaptive = f"adaptive {cutoffs}"
        return round(ms / (statistics.median(times[adaptive]) * 1000), 2) if adaptive in times else ""

    for name, variant in variants.items():
        model = variant["model"]
        counter = SavedBytes()
        x = features.detach().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor):
            if variant["impl"] == "ours":
                loss = model.loss(x, targets)
            else:
                loss = model.adaptive(x.view(-1, args.features), targets.view(-1)).loss
        del loss
        ms = statistics.median(times[name]) * 1000
        parameters = head_parameters(model)
        embedding = model.encoder.weight
        rows.append({
            "head": name,
            "ms": round(ms, 2),
            "speedup_vs_full": round(full_ms / ms, 2),
            "time_vs_adaptive": time_vs_adaptive(variant["cutoffs"], ms),
            "parameters_mib": mib(parameters),
            "beyond_embedding_mib": mib([p for p in parameters if p is not embedding]),
            "saved_for_backward_mib": round(counter.total / MIB, 2),
        })
    return rows


class BudgetTrainer:
    """Trains one LM in slices of wall-clock time, carrying its state, position and optimiser."""

    def __init__(self, model: LanguageModel, train: torch.Tensor, bptt: int):
        self.model, self.train, self.bptt = model, train, bptt
        self.optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        self.state = model.initial_state(train.size(1), train.device)
        self.position, self.steps, self.seconds = 0, 0, 0.0

    def run_for(self, seconds: float) -> None:
        self.model.train()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            if self.position >= self.train.size(0) - 1:
                self.position, self.state = 0, self.model.initial_state(self.train.size(1), self.train.device)
            inputs, targets = get_batch(self.train, self.position, self.bptt)
            self.position += self.bptt
            features, self.state = self.model(inputs, detach_state(self.state))
            loss = self.model.loss(features, targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.25)
            self.optimizer.step()
            self.steps += 1
        self.seconds += time.perf_counter() - start


def ptb_part(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """The heads trained in alternating slices of 5 s until each has had `--budget` seconds (fair under load)."""
    torch.set_num_threads(args.ptb_threads)
    corpus = Corpus(args.ptb)
    train = batchify(corpus.train, 20, device, "train")
    valid = batchify(corpus.valid, 10, device, "valid")
    trainers = {}
    heads = [("full softmax", None, False), (f"adaptive {args.ptb_cutoffs}", args.ptb_cutoffs, False),
             (f"split {args.ptb_cutoffs} (tied)", args.ptb_cutoffs, True)]
    for name, cutoffs, split in heads:
        torch.manual_seed(0)
        model = LanguageModel(LMConfig(
            vocab_size=len(corpus.dictionary), core="LSTM", core_config={"input_size": 256, "hidden_size": 256},
            emsize=256, dropout=0.2, tie_weights=split, adaptive_softmax=cutoffs is not None and not split,
            split_softmax=split, cutoffs=list(cutoffs or []),
        )).to(device)
        trainers[name] = BudgetTrainer(model, train, bptt=35)
    while any(trainer.seconds < args.budget for trainer in trainers.values()):
        for trainer in trainers.values():
            if trainer.seconds < args.budget:
                trainer.run_for(min(5.0, args.budget - trainer.seconds))
    rows = []
    for name, trainer in trainers.items():
        with torch.no_grad():
            valid_loss = evaluate(trainer.model, valid, 35)
        rows.append({
            "head": name, "seconds": round(trainer.seconds, 1), "steps": trainer.steps,
            "tokens_per_s": round(trainer.steps * 35 * train.size(1) / trainer.seconds),
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "valid_ppl": round(math.exp(valid_loss), 2),
        })
    return rows


def print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[key]) for key in keys) + " |")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    results: dict = {"machine": machine_info(device), "args": vars(args)}
    print(f"speed: vocabulary {args.vocab:,}, features {args.features}, {args.tokens} tokens, "
          f"{args.targets} targets, {args.threads} thread(s), forward+backward, median of {args.repeats}")
    results["speed"] = speed_part(args, device)
    print_table(results["speed"])
    if not args.no_ptb:
        if not (args.ptb / "train.txt").exists():
            raise SystemExit(f"no Penn Treebank in {args.ptb}: run `bash getdata.sh penn` or pass --no-ptb")
        print(f"PTB, {args.budget:g} s of training per head, {args.ptb_threads} thread(s):")
        results["ptb"] = ptb_part(args, device)
        print_table(results["ptb"])
    results["machine"]["threads"] = args.threads
    write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
