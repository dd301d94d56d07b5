"""AWD-LSTM's split softmax: normalised, equal to a per-token reference and (one cluster) to the full
softmax, tied to the embedding, chosen by vocabulary size, and trained, resumed, fine-tuned, sampled and
scored by every LM script."""

import argparse
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import finetune
import generate
import main as awd_main
import models
import pointer
import train_rmc
import train_rnn
import training
from data import Corpus, batchify
from models.lm import LMConfig
from models.split_softmax import SplitSoftmax, default_splits, split_target_log_probs_ref
from tests.conftest import TINY_LM_FLAGS
from tests.test_lm import E, V, make_lm  # the same tiny LSTM language model

CUTOFF_CASES = [[], [5], [5, 15], [1, 29], [10, 11, 20]]  # [1, 29]: a one-word head, a one-word last cluster


def random_head(cutoffs, dtype=torch.float64, seed=0):
    """A split softmax with random (not zero) tombstones, and a random decoder, features and targets."""
    generator = torch.Generator().manual_seed(seed)
    split = SplitSoftmax(E, V, cutoffs).to(dtype)
    with torch.no_grad():
        for param in split.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=dtype))
    weight = torch.randn(V, E, generator=generator, dtype=dtype).requires_grad_()
    bias = torch.randn(V, generator=generator, dtype=dtype).requires_grad_()
    features = torch.randn(40, E, generator=generator, dtype=dtype).requires_grad_()
    targets = torch.randint(V, (40,), generator=generator)
    return split, weight, bias, features, targets


# --------------------------------------------------------------------------- the head itself


@pytest.mark.parametrize("cutoffs", CUTOFF_CASES)
def test_log_probs_normalise_over_the_vocabulary_in_float64(cutoffs):
    split, weight, bias, features, targets = random_head(cutoffs)
    log_probs = split.log_probs(weight, bias, features)
    assert log_probs.shape == (40, V)
    torch.testing.assert_close(torch.logsumexp(log_probs, dim=-1), torch.zeros(40, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(split.target_log_probs(weight, bias, features, targets),
                               log_probs.gather(1, targets.unsqueeze(1)).squeeze(1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cutoffs", CUTOFF_CASES)
def test_loss_and_gradients_equal_the_per_token_reference(cutoffs):
    split, weight, bias, features, targets = random_head(cutoffs)
    inputs = [weight, bias, features, *split.parameters()]
    fast = split.target_log_probs(weight, bias, features, targets)
    fast_grads = torch.autograd.grad(fast.sum(), inputs)
    ref = split_target_log_probs_ref(weight, bias, split.tail_vectors, split.tail_bias, features, targets, cutoffs)
    ref_grads = torch.autograd.grad(ref.sum(), inputs)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    for got, expected in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(split.loss(weight, bias, features, targets), -ref.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(split.loss(weight, bias, features, targets, reduction="sum"), -ref.sum(),
                               rtol=0, atol=1e-11)


def test_a_hand_computed_two_cluster_case():
    """V = 3, cutoffs [1]: the head is word 0 and one tombstone; word 1 and 2 share the tail."""
    split = SplitSoftmax(1, 3, [1]).double()
    with torch.no_grad():
        split.tail_vectors.fill_(2.0)
        split.tail_bias.fill_(-1.0)
    weight = torch.tensor([[1.0], [3.0], [-1.0]], dtype=torch.float64)
    bias = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    x = torch.tensor([[2.0]], dtype=torch.float64)
    head = [1 * 2 + 0.5, 2 * 2 - 1]  # word 0, tombstone: 2.5, 3
    tail = [3 * 2 + 0.0, -1 * 2 + 1]  # words 1, 2: 6, -1
    p_tail = math.exp(3) / (math.exp(2.5) + math.exp(3))
    expected = [math.log(1 - p_tail),
                math.log(p_tail) + tail[0] - math.log(math.exp(tail[0]) + math.exp(tail[1])),
                math.log(p_tail) + tail[1] - math.log(math.exp(tail[0]) + math.exp(tail[1]))]
    assert head[0] - math.log(math.exp(head[0]) + math.exp(head[1])) == pytest.approx(expected[0])
    got = split.log_probs(weight, bias, x)[0].tolist()
    assert got == pytest.approx(expected, abs=1e-14)
    for word in range(3):
        assert split.target_log_probs(weight, bias, x, torch.tensor([word])).item() == pytest.approx(expected[word])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_cluster_is_the_full_softmax(dtype):
    split, weight, bias, features, targets = random_head([], dtype=dtype)
    assert list(split.parameters()) == []  # no tombstones
    full = F.log_softmax(features @ weight.t() + bias, dim=-1)  # written out, not through F.linear
    tolerance = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else {}
    torch.testing.assert_close(split.log_probs(weight, bias, features), full, **tolerance)
    torch.testing.assert_close(split.loss(weight, bias, features, targets),
                               -full.gather(1, targets.unsqueeze(1)).mean(), **tolerance)


def test_a_language_model_with_one_cluster_computes_what_the_full_softmax_model_does():
    torch.manual_seed(0)
    split_model = make_lm(split_softmax=True).eval()  # 30 words: AWD's rule gives no cutoffs
    assert split_model.config.cutoffs == [] and split_model.split_softmax is not None
    full_model = make_lm().eval()
    full_model.load_state_dict(split_model.state_dict())
    tokens, targets = torch.randint(V, (6, 3)), torch.randint(V, (6, 3))
    features, _ = split_model(tokens)
    assert torch.equal(split_model.loss(features, targets), full_model.loss(features, targets))
    assert torch.equal(split_model.log_probs(features), full_model.log_probs(features))
    assert torch.equal(split_model.target_log_probs(features, targets), full_model.target_log_probs(features, targets))


def test_empty_tail_clusters_in_a_batch_are_skipped():
    split, weight, bias, features, _ = random_head([5, 15])
    targets = torch.randint(5, (40,))  # every target in the head
    fast = split.target_log_probs(weight, bias, features, targets)
    ref = split_target_log_probs_ref(weight, bias, split.tail_vectors, split.tail_bias, features, targets, [5, 15])
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- in the language model


def test_the_tied_embedding_is_trained_by_the_head_and_the_tails():
    model = make_lm(split_softmax=True, cutoffs=[5, 15])
    assert model.decoder.weight is model.encoder.weight and model.config.tie_weights
    features = torch.randn(4, 3, E)  # fed to the head directly: no gradient through the embedding lookup

    def embedding_grad(targets):
        model.zero_grad(set_to_none=True)
        model.loss(features, targets).backward()
        return model.encoder.weight.grad.abs().sum(-1)  # [V]

    tail = embedding_grad(torch.randint(15, V, (4, 3)))  # every target in the second tail cluster
    assert (tail[:5] > 0).all()  # the head's normaliser
    assert (tail[15:] > 0).all()  # the cluster's own softmax
    assert (tail[5:15] == 0).all()  # a cluster no target is in
    assert (model.split_softmax.tail_vectors.grad.abs().sum(-1) > 0).all()  # both tombstones are in the head
    head = embedding_grad(torch.randint(5, (4, 3)))
    assert (head[:5] > 0).all() and (head[5:] == 0).all()


def test_the_only_extra_parameters_are_the_tombstones():
    full, split = make_lm(), make_lm(split_softmax=True, cutoffs=[5, 15])
    extra = sum(p.numel() for p in split.parameters()) - sum(p.numel() for p in full.parameters())
    assert extra == 2 * (E + 1)
    assert {"split_softmax.tail_vectors", "split_softmax.tail_bias"} <= set(split.state_dict())


def test_an_untied_split_softmax_trains_its_own_decoder():
    model = make_lm(hidden=12, split_softmax=True, cutoffs=[5, 15], tie_weights=False)
    assert model.decoder.weight is not model.encoder.weight and model.decoder.in_features == 12
    model.loss(torch.randn(4, 3, 12), torch.randint(15, V, (4, 3))).backward()
    assert model.encoder.weight.grad is None and (model.decoder.weight.grad[15:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("vocab,expected", [
    (10_000, []), (75_000, []), (75_001, [2800, 20000]), (76_001, [2800, 20000, 76000]),
    (267_735, [2800, 20000, 76000]), (500_000, [2800, 20000, 76000]), (500_001, [4200, 35000, 180000]),
    (793_471, [4200, 35000, 180000]),
])
def test_default_splits_are_awd_lstms(vocab, expected):
    assert default_splits(vocab) == expected


def test_config_records_the_chosen_cutoffs_and_checks_given_ones():
    config = LMConfig(vocab_size=80_000, emsize=4, split_softmax=True)
    assert config.cutoffs == [2800, 20000, 76000]
    assert LMConfig(**dataclasses.asdict(config)).cutoffs == config.cutoffs  # a checkpoint rebuilds the same
    with pytest.raises(ValueError, match="--cutoffs 5 30 do not fit a vocabulary of 30 words"):
        make_lm(split_softmax=True, cutoffs=[5, 30])
    with pytest.raises(ValueError, match="choose one"):
        make_lm(split_softmax=True, adaptive_softmax=True, cutoffs=[5, 15], tie_weights=False)


def parse(*argv, parser=None):
    if parser is None:
        parser = argparse.ArgumentParser()
        models.add_lm_args(parser)
    return parser.parse_args([*argv, "--emsize", "8", "--nhid", "8"])


def test_flags_keep_the_tie_and_adaptivesoftmax_replaces_the_split():
    config = models.lm_config_from_args(parse("--splitsoftmax", "--cutoffs", "5", "15"), V)
    assert config.split_softmax and config.tie_weights and config.cutoffs == [5, 15]
    config = models.lm_config_from_args(parse("--split-softmax", "--adaptivesoftmax", "--cutoffs", "5", "15"), V)
    assert config.adaptive_softmax and not config.split_softmax and not config.tie_weights
    assert not models.lm_config_from_args(parse(), V).split_softmax  # off by default outside main.py
    awd = awd_main.build_parser()
    assert awd_main.awd_config(parse(parser=awd), 100_000).cutoffs == [2800, 20000, 76000]  # main.py: AWD's rule
    assert not awd_main.awd_config(parse("--no-splitsoftmax", parser=awd), 100_000).split_softmax
    config = awd_main.awd_config(parse("--adaptivesoftmax", "--cutoffs", "5", "15", parser=awd), V)
    assert config.adaptive_softmax and not config.split_softmax


# --------------------------------------------------------------------------- through the scripts

SPLIT = ["--splitsoftmax", "--cutoffs", "5", "20"]
SCRIPT_FLAGS = {
    "train_rnn": (train_rnn, ["--lr", "0.01"]),
    "train_rmc": (train_rmc, ["--lr", "0.003", "--head-size", "8", "--num-heads", "2", "--key-size", "4",
                              "--mem-slots", "2"]),
    "main": (awd_main, ["--lr", "5", "--nlayers", "2", "--test_batch_size", "1"]),
}


def events(run_dir, name):
    return [e for e in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if e["event"] == name]


@pytest.mark.parametrize("script", sorted(SCRIPT_FLAGS))
def test_each_script_family_trains_a_split_softmax_model(script, corpus_dir, tmp_path):
    module, flags = SCRIPT_FLAGS[script]
    run_dir = tmp_path / "run"
    result = module.main(["--data", str(corpus_dir), "--run-dir", str(run_dir), *TINY_LM_FLAGS, *flags, *SPLIT,
                          "--epochs", "3"])
    model, _ = training.load_checkpoint(run_dir / "best.pt")
    assert model.split_softmax is not None and model.split_softmax.cutoffs == [5, 20]
    assert model.decoder.weight is model.encoder.weight
    valid = [e["loss"] for e in events(run_dir, "valid")]
    assert len(valid) == 3 and valid[-1] < valid[0] and valid[-1] < math.log(41)  # learns, below uniform (41 words)
    assert result["test_loss"] < math.log(41)


def test_resume_is_bitwise_with_the_split_softmax(corpus_dir, tmp_path):
    flags = ["--data", str(corpus_dir), *TINY_LM_FLAGS, "--lr", "0.01", *SPLIT, "--epochs", "2"]
    train_rnn.main([*flags, "--run-dir", str(tmp_path / "whole")])
    stopped = train_rnn.main([*flags, "--run-dir", str(tmp_path / "parts"), "--max-steps", "7"])
    assert stopped["stopped"] == "max-steps"
    train_rnn.main(["--resume", str(tmp_path / "parts")])
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    parts = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)["model"]
    assert "split_softmax.tail_vectors" in whole and whole.keys() == parts.keys()
    assert all(torch.equal(whole[key], parts[key]) for key in whole)


def test_finetune_pointer_and_generate_take_a_split_softmax_model(corpus_dir, tmp_path):
    main_dir, ft_dir = tmp_path / "main", tmp_path / "ft"
    flags = ["--data", str(corpus_dir), *TINY_LM_FLAGS, *SCRIPT_FLAGS["main"][1]]
    awd_main.main([*flags, *SPLIT, "--run-dir", str(main_dir), "--dry-run"])
    start, _ = training.load_checkpoint(main_dir / "best.pt")
    result = finetune.main([*flags, "--run-dir", str(ft_dir), "--epochs", "2", "--checkpoint", str(main_dir)])
    tuned, _ = training.load_checkpoint(ft_dir / "best.pt")
    assert tuned.split_softmax.cutoffs == [5, 20] and result["test_loss"] < math.log(41)
    assert not torch.equal(tuned.split_softmax.tail_vectors, start.split_softmax.tail_vectors)  # trained
    scores = pointer.main(["--checkpoint", str(ft_dir), "--data", str(corpus_dir), "--window", "5", "--bptt", "20",
                           "--theta", "1.0", "--lambdasm", "0.1"])
    valid = batchify(Corpus(corpus_dir).valid, 1)
    assert scores["valid"]["ppl"] == pytest.approx(math.exp(training.evaluate(tuned, valid, 20)), rel=1e-5)
    assert 1 < scores["valid"]["cache_ppl"] < 41
    text = generate.main(["--checkpoint", str(ft_dir), "--words", "30", "--seed", "3", "--prompt", "w1 w2"])
    assert text.startswith("w1 w2 ") and len(text.split()) + text.count("\n") == 32
    assert generate.main(["--checkpoint", str(ft_dir), "--words", "30", "--seed", "3", "--prompt", "w1 w2"]) == text


def test_bf16_autocast_gives_a_float32_loss_close_to_fp32():
    torch.manual_seed(0)
    model = make_lm(split_softmax=True, cutoffs=[5, 15]).eval()
    with torch.no_grad():
        model.split_softmax.tail_vectors.normal_()
    tokens, targets = torch.randint(V, (6, 3)), torch.linspace(0, V - 1, 18).long().view(6, 3)  # every cluster
    features, _ = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = model(tokens)
        loss = model.loss(low, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, model.loss(features, targets), rtol=2e-2, atol=2e-2)


def test_two_processes_train_a_split_softmax_model_as_one_does(corpus_dir, tmp_path):
    """torchrun: each rank's tokens reach other tail clusters; DDP still averages to the one-process update."""
    from tests.test_distributed import RNN_FLAGS, assert_close_checkpoints, assert_same_evaluation, torchrun

    flags = ["--data", str(corpus_dir), *RNN_FLAGS, *SPLIT]
    train_rnn.main([*flags, "--run-dir", str(tmp_path / "one")])
    torchrun("train_rnn.py", *flags, "--run-dir", str(tmp_path / "two"))
    one, _ = assert_close_checkpoints(tmp_path / "one", tmp_path / "two")
    assert "split_softmax.tail_vectors" in one["model"]
    assert_same_evaluation(tmp_path / "one", tmp_path / "two")
