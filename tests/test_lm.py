"""The language model: tying, projection, heads, cutoff checks, and that a tiny model learns."""

import dataclasses

import pytest
import torch

import models
from models.lm import LanguageModel, LMConfig
from models.rnn import RNNConfig

V, E = 30, 8


def make_lm(hidden=E, **overrides) -> LanguageModel:
    core = dataclasses.asdict(RNNConfig(input_size=E, hidden_size=hidden))
    return LanguageModel(LMConfig(vocab_size=V, core="LSTM", core_config=core, emsize=E, dropout=0.0, **overrides))


def test_tied_weights_are_one_parameter():
    model = make_lm()
    assert model.decoder.weight is model.encoder.weight
    assert model.projection is None
    names = [name for name, _ in model.named_parameters()]
    assert "decoder.weight" not in names  # shared: optimised and saved once


def test_tying_with_a_wider_core_adds_a_projection():
    model = make_lm(hidden=12)
    assert model.projection is not None and model.projection.in_features == 12
    features, _ = model(torch.randint(V, (5, 2)))
    assert features.shape == (5, 2, E)


def test_untied_model_decodes_from_the_core_width():
    model = make_lm(hidden=12, tie_weights=False)
    assert model.projection is None and model.decoder.in_features == 12


@pytest.mark.parametrize("adaptive", [False, True])
def test_loss_is_mean_nll_and_log_probs_normalise(adaptive):
    torch.manual_seed(0)
    extra = dict(adaptive_softmax=True, cutoffs=[5, 15], tie_weights=False, div_value=2.0) if adaptive else {}
    model = make_lm(**extra).eval()
    tokens = torch.randint(V, (6, 3))
    targets = torch.randint(V, (6, 3))
    features, state = model(tokens)
    log_probs = model.log_probs(features)
    assert log_probs.shape == (6, 3, V)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(6, 3))
    expected = -log_probs.gather(-1, targets.unsqueeze(-1)).mean()
    torch.testing.assert_close(model.loss(features, targets), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.loss(features, targets, reduction="sum"), expected * 18, rtol=1e-5, atol=1e-4)


def test_adaptive_softmax_is_owned_by_the_model():
    model = make_lm(adaptive_softmax=True, cutoffs=[5, 15], tie_weights=False, div_value=2.0)
    assert any(name.startswith("adaptive.") for name in model.state_dict())
    params = {id(p) for p in model.parameters()}
    assert all(id(p) in params for p in model.adaptive.parameters())


@pytest.mark.parametrize("cutoffs", [[], [0, 10], [10, 5], [5, 30], [5, 5]])
def test_bad_cutoffs_are_rejected_with_the_vocabulary_size(cutoffs):
    with pytest.raises(ValueError, match="cutoffs"):
        make_lm(adaptive_softmax=True, cutoffs=cutoffs, tie_weights=False)


def test_empty_adaptive_cluster_projection_is_rejected():
    with pytest.raises(ValueError, match="div-value"):
        make_lm(adaptive_softmax=True, cutoffs=[5, 15], tie_weights=False, div_value=4.0)


def test_tying_with_adaptive_softmax_is_rejected():
    with pytest.raises(ValueError, match="--no-tied"):
        make_lm(adaptive_softmax=True, cutoffs=[5, 15], tie_weights=True)


HEADS = {"full": {}, "adaptive": dict(adaptive_softmax=True, cutoffs=[5, 15], tie_weights=False, div_value=2.0),
         "split": dict(split_softmax=True, cutoffs=[5, 15])}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_tiny_model_loss_falls(head):
    torch.manual_seed(0)
    model = make_lm(hidden=16, **HEADS[head])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    sequence = torch.arange(40).remainder(V).view(-1, 1).repeat(1, 4)  # a deterministic cycle: [40, 4]
    inputs, targets = sequence[:-1], sequence[1:]
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        features, _ = model(inputs)
        loss = model.loss(features, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0]


def test_lm_config_from_args_unties_for_adaptive_softmax():
    import argparse

    parser = argparse.ArgumentParser()
    models.add_lm_args(parser)
    args = parser.parse_args(["--adaptivesoftmax", "--cutoffs", "5", "15", "--emsize", "8", "--nhid", "8"])
    config = models.lm_config_from_args(args, V)
    assert config.adaptive_softmax and not config.tie_weights
    assert config.core_config["hidden_size"] == 8 and config.core_config["input_size"] == 8


@pytest.mark.parametrize("after", [False, True])
def test_dropout_order_around_the_projection(after):
    """Re-derived with the same random stream: the seed's RMC LM projects the core's output and then drops
    out (`dropout_after_projection`); the default drops the core's output and then projects."""
    core = dataclasses.asdict(RNNConfig(input_size=E, hidden_size=12))
    model = LanguageModel(LMConfig(vocab_size=V, core="LSTM", core_config=core, emsize=E, dropout=0.5,
                                   dropout_after_projection=after)).train()
    tokens = torch.randint(V, (5, 3))
    torch.manual_seed(7)
    features, _ = model(tokens)
    torch.manual_seed(7)
    embedded = torch.nn.functional.dropout(model.encoder(tokens), 0.5)
    raw, _ = model.core(embedded)
    if after:
        expected = torch.nn.functional.dropout(model.projection(raw), 0.5)
    else:
        expected = model.projection(torch.nn.functional.dropout(raw, 0.5))
    torch.testing.assert_close(features, expected)
    dropped_features = (features == 0).float().mean()  # only dropout after the projection zeroes features
    assert (0.3 < dropped_features < 0.7) if after else dropped_features == 0


def test_projection_size_always_projects_and_must_fit_a_tied_decoder():
    model = make_lm(hidden=8, adaptive_softmax=True, cutoffs=[5, 15], tie_weights=False, div_value=2.0,
                    projection_size=8)
    assert model.projection.in_features == model.projection.out_features == 8  # the seed LSTM LM's Linear(nhid, nhid)
    assert model.adaptive.in_features == 8
    with pytest.raises(ValueError, match="embedding size 8"):
        make_lm(hidden=12, projection_size=6)


@pytest.mark.parametrize("script,adaptive,head_width,after", [
    ("train_rmc", False, 192, True),  # 768 -> 192 -> dropout -> tied decoder
    ("train_rmc", True, 192, True),  # 768 -> 192 -> dropout -> adaptive softmax on 192
    ("train_rnn", False, 300, False),  # LSTM 300 -> dropout -> tied decoder, no projection
    ("train_rnn", True, 300, False),  # LSTM 300 -> dropout -> Linear(300, 300) -> adaptive softmax
])
def test_script_heads_follow_the_seed(script, adaptive, head_width, after):
    """The seed project's heads: its RMC LM's output_to_embed_decoder (768 -> emsize) then dropout, before
    the tied decoder or the adaptive softmax; its LSTM LM's decoder_adaptive Linear(nhid, nhid). Both
    evaluate with batch 32."""
    import importlib

    parser = importlib.import_module(script).build_parser()
    flags = ["--data", "unused"] + (["--adaptivesoftmax", "--cutoffs", "1000", "5000"] if adaptive else [])
    args = parser.parse_args(flags)
    assert args.eval_batch_size == 32
    with torch.device("meta"):
        model = LanguageModel(models.lm_config_from_args(args, 10000))
    assert model.config.dropout_after_projection is after
    if script == "train_rmc":
        assert (model.projection.in_features, model.projection.out_features) == (768, 192)
    elif adaptive:
        assert (model.projection.in_features, model.projection.out_features) == (300, 300)
    else:
        assert model.projection is None
    head = model.adaptive if adaptive else model.decoder
    assert head.in_features == head_width
