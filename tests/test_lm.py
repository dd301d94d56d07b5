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


@pytest.mark.parametrize("adaptive", [False, True])
def test_tiny_model_loss_falls(adaptive):
    torch.manual_seed(0)
    extra = dict(adaptive_softmax=True, cutoffs=[5, 15], tie_weights=False, div_value=2.0) if adaptive else {}
    model = make_lm(hidden=16, **extra)
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
