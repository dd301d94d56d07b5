"""AWD-LSTM: regularisers, the weight-dropped stack, AR/TAR, variable BPTT, NT-ASGD, main.py/finetune.py."""

import copy

import numpy as np
import pytest
import torch

import finetune
import main as awd_main
import models
import training
from data import Corpus, batchify, get_batch
from training.lm import nt_asgd_triggered, variable_bptt_length
from models.awd import AWDConfig, AWDStack
from models.regularizers import embedding_dropout, locked_dropout, weight_dropped
from tests.conftest import write_corpus

AWD_FLAGS = ["--emsize", "12", "--nhid", "16", "--nlayers", "2", "--batch_size", "4", "--eval_batch_size", "2",
             "--test_batch_size", "1", "--bptt", "8", "--log-interval", "5", "--threads", "1", "--lr", "5"]


# --------------------------------------------------------------------------- regularisers


def test_locked_dropout_shares_one_mask_over_time_and_scales():
    torch.manual_seed(0)
    x = torch.ones(6, 4, 50)
    out = locked_dropout(x, 0.3, training=True)
    assert torch.equal(out, out[:1].expand_as(out))  # same mask at every step
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.7))
    assert 0.1 < (out[0] == 0).float().mean() < 0.5
    assert not torch.equal(out[:, 0], out[:, 1])  # but a different mask per sequence
    assert locked_dropout(x, 0.3, training=False) is x
    with pytest.raises(ValueError, match="dropout probability"):
        locked_dropout(x, 1.0, training=True)


def test_embedding_dropout_drops_whole_word_types():
    torch.manual_seed(0)
    weight = torch.randn(20, 5)
    tokens = torch.arange(20).repeat(3).view(6, 10)  # every word three times
    out = embedding_dropout(weight, tokens, 0.5, training=True)
    dropped = out.abs().sum(-1) == 0  # [T, B]
    for word in range(20):
        where = tokens == word
        assert dropped[where].all() or not dropped[where].any()  # all occurrences alike
    kept = ~dropped
    torch.testing.assert_close(out[kept], 2 * weight[tokens[kept]])
    assert 0 < dropped.float().mean() < 1
    torch.testing.assert_close(embedding_dropout(weight, tokens, 0.5, training=False), weight[tokens])


def test_weight_dropped_is_dropconnect():
    torch.manual_seed(0)
    weight = torch.ones(100, 100)
    dropped = weight_dropped(weight, 0.5, training=True)
    assert 0.4 < (dropped == 0).float().mean() < 0.6 and dropped.max() == 2
    assert torch.equal(weight_dropped(weight, 0.5, training=False), weight)


def test_weight_dropped_rescales_by_one_over_keep_probability():
    """p = 0.3: kept entries are w / 0.7 exactly (not w / 0.3, which p = 0.5 cannot tell apart), and the
    dropped weight is unbiased: its mean over many masks is w."""
    torch.manual_seed(0)
    weight = torch.randn(40, 30, dtype=torch.float64)
    dropped = weight_dropped(weight, 0.3, training=True)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], weight[kept] / 0.7, rtol=1e-15, atol=0)
    assert 0.2 < 1 - kept.double().mean() < 0.4
    mean = torch.stack([weight_dropped(weight, 0.3, training=True) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, weight, rtol=0, atol=0.08)


def test_stack_runs_its_lstm_with_the_rescaled_dropconnect_weight():
    """In training the stack's LSTM runs with weight_hh * mask / (1 - wdrop), re-derived with the same mask
    on a plain nn.LSTM; the other weights are untouched."""
    stack = make_stack(num_layers=1, output_size=10, wdrop=0.3).train()
    x = torch.randn(6, 2, 6)
    torch.manual_seed(5)
    out, _ = stack(x)
    torch.manual_seed(5)
    mask = torch.nn.functional.dropout(torch.ones_like(stack.layers[0].weight_hh_l0), 0.3) != 0
    plain = copy.deepcopy(stack.layers[0])
    with torch.no_grad():
        plain.weight_hh_l0.copy_(stack.layers[0].weight_hh_l0 * mask / 0.7)
    expected, _ = plain(x)
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------- the weight-dropped stack


def make_stack(**overrides):
    return AWDStack(AWDConfig(**{"input_size": 6, "hidden_size": 10, "output_size": 6, "num_layers": 3,
                                 "dropouth": 0.2, "wdrop": 0.5, **overrides}))


def test_stack_sizes_state_and_eval_equals_plain_layers():
    torch.manual_seed(0)
    stack = make_stack().eval()
    x = torch.randn(7, 2, 6)
    out, state = stack(x)
    assert out.shape == (7, 2, 6)
    assert [tuple(s.h.shape) for s in state] == [(1, 2, 10), (1, 2, 10), (1, 2, 6)]
    expected = x
    for layer in stack.layers:  # no DropConnect and no locked dropout in eval
        expected, _ = layer(expected)
    torch.testing.assert_close(out, expected)


def test_train_eval_train_eval_keeps_parameters_intact():
    torch.manual_seed(0)
    stack = make_stack()
    keys = list(stack.state_dict())
    x = torch.randn(5, 3, 6)
    stack.eval()
    first, _ = stack(x)
    stack.train()
    a, _ = stack(x)
    b, _ = stack(x)
    assert not torch.allclose(a, b)  # a fresh DropConnect mask per call
    (a.sum() + b.sum()).backward()
    assert stack.layers[0].weight_hh_l0.grad.abs().sum() > 0  # gradients reach the raw weight
    stack.eval()
    second, _ = stack(x)
    assert torch.equal(first, second)
    assert list(stack.state_dict()) == keys and "layers.0.weight_hh_l0" in keys
    assert all(isinstance(layer.weight_hh_l0, torch.nn.Parameter) for layer in stack.layers)
    moved = copy.deepcopy(stack).double()
    out, _ = moved(x.double())
    assert out.dtype == torch.float64


def test_qrnn_cell_follows_awd_lstm_recipe():
    torch.manual_seed(0)
    stack = make_stack(cell="qrnn")
    windows = [layer.layer.window for layer in stack.layers]
    assert windows == [2, 1, 1]
    names = [name for name, _ in stack.named_parameters()]
    assert "layers.0.layer.linear.weight" in names
    x = torch.randn(5, 2, 6)
    a, _ = stack(x)
    b, _ = stack(x)
    assert not torch.allclose(a, b)  # DropConnect on the gate matrix in training
    a.sum().backward()
    assert stack.layers[0].layer.linear.weight.grad.abs().sum() > 0
    stack.eval()
    whole, _ = stack(x)
    first, state = stack(x[:2])
    assert state[0].prev_x.shape == (1, 2, 6)  # the last input, carried for the window of 2
    second, _ = stack(x[2:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole)


def test_gru_cell_and_config_validation():
    stack = make_stack(cell="gru")
    out, state = stack(torch.randn(4, 2, 6))
    assert isinstance(state[0], models.GRUState) and out.shape == (4, 2, 6)
    with pytest.raises(ValueError, match="AWD cell"):
        make_stack(cell="transformer")
    with pytest.raises(ValueError, match="wdrop"):
        make_stack(wdrop=1.0)


# --------------------------------------------------------------------------- loss terms, BPTT, NT-ASGD


def make_trainer(corpus_dir, tmp_path, *flags):
    args = training.parse_args(awd_main.build_parser(), ["--data", str(corpus_dir), *AWD_FLAGS, *flags]).args
    corpus = Corpus(args.data)
    model = models.LanguageModel(awd_main.awd_config(args, len(corpus.dictionary)))
    return training.LMTrainer(model, corpus, training.LoopOptions.from_args(args), training.LMOptions.from_args(args),
                              torch.device("cpu"), training.Run(tmp_path / "run"), args, "main")


def test_ar_and_tar_are_added_to_the_cross_entropy(corpus_dir, tmp_path):
    trainer = make_trainer(corpus_dir, tmp_path, "--alpha", "2", "--beta", "1")
    inputs, targets = get_batch(trainer.train_data, 0, 8)
    torch.manual_seed(0)
    loss, _, cross_entropy = trainer.compute_loss(inputs, targets)
    torch.manual_seed(0)  # the same dropout masks
    features, _, (raw, dropped) = trainer.model(inputs, trainer.hidden, return_outputs=True)
    assert not torch.equal(raw, dropped)
    expected_ce = trainer.model.loss(features, targets)
    expected = expected_ce + 2 * dropped.pow(2).mean() + (raw[1:] - raw[:-1]).pow(2).mean()
    torch.testing.assert_close(cross_entropy, expected_ce)
    torch.testing.assert_close(loss, expected)


def test_variable_bptt_lengths_follow_the_reference_distribution():
    np.random.seed(0)
    lengths = np.array([variable_bptt_length(70) for _ in range(20000)])
    assert lengths.min() >= 5
    halves = (lengths < 52).mean()  # draws around 35 rather than 70
    assert 0.04 < halves < 0.06
    assert abs(lengths[lengths >= 52].mean() - 69.5) < 0.3  # int() truncates N(70, 5)
    assert abs(lengths[lengths >= 52].std() - 5) < 0.3


def test_variable_bptt_scales_the_steps_learning_rate(corpus_dir, tmp_path, monkeypatch):
    trainer = make_trainer(corpus_dir, tmp_path)
    seen = []
    monkeypatch.setattr(trainer.optimizer, "step", lambda: seen.append(trainer.optimizer.param_groups[0]["lr"]))
    inputs, targets = get_batch(trainer.train_data, 0, 4)  # a window of 4 with --bptt 8
    trainer.train_step((inputs, targets))
    assert seen == [pytest.approx(5 * 4 / 8)]
    assert trainer.optimizer.param_groups[0]["lr"] == 5  # restored after the step


@pytest.mark.parametrize(
    "history,loss,nonmono,expected",
    [
        ([5.0, 4.0, 3.0], 3.5, 5, False),  # not enough evaluations yet
        ([5.0, 4.0, 3.9, 3.8, 3.7, 3.6], 3.5, 5, False),  # still improving on the old best
        ([5.0, 4.0, 3.9, 3.8, 3.7, 3.6], 5.1, 5, True),  # worse than the best of all but the last 5
        ([5.0, 4.0, 3.9, 3.8, 3.7, 3.6], 3.65, 5, False),  # worse than the best of all (3.6), not of [5.0]
        ([5.0, 4.0, 3.9, 3.8, 3.7, 3.6], 4.5, 5, False),  # the last 5 (4.0 among them) are left out
        ([5.0, 4.0, 3.9, 3.8, 3.7, 3.6], 4.5, 4, True),  # ... but not with nonmono 4: best of [5.0, 4.0]
        ([3.0, 4.0, 3.9, 3.8, 3.7, 3.6], 3.5, 5, True),
        ([3.0, 4.0, 3.9, 3.8, 3.7, 3.6], 3.0, 5, False),  # equal is not worse
        ([3.0, 4.0], 3.5, 1, True),
        ([3.0, 4.0], 9.0, 0, False),  # nonmono 0: never
    ],
)
def test_nt_asgd_trigger(history, loss, nonmono, expected):
    assert nt_asgd_triggered(history, loss, nonmono) is expected
    # the reference main.py's condition, written out as it is there
    reference = len(history) > nonmono and loss > min(history[:-nonmono]) if nonmono else False
    assert reference is expected


def scripted_validation(monkeypatch, losses):
    """Make `evaluate` return scripted losses during training (the final test evaluation is real)."""
    script = iter(losses)
    real = training.lm.evaluate

    def evaluate(model, source, bptt, max_batches=None, autocast=None):
        value = next(script, None)
        return real(model, source, bptt, max_batches) if value is None else value

    monkeypatch.setattr(training.lm, "evaluate", evaluate)


def read_events(run_dir, name):
    import json

    return [e for e in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if e["event"] == name]


def test_nt_asgd_switches_and_evaluates_with_averaged_weights(corpus_dir, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [5.0, 4.0, 6.0, 3.0])  # epoch 3 is worse than the best but the last
    run_dir = tmp_path / "run"
    awd_main.main(["--data", str(corpus_dir), "--run-dir", str(run_dir), *AWD_FLAGS, "--epochs", "4",
                   "--nonmono", "1"])
    assert [e["epoch"] for e in read_events(run_dir, "asgd")] == [3]
    assert [e["asgd"] for e in read_events(run_dir, "valid")] == [False, False, False, True]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert checkpoint["train_state"]["asgd"] and best["train_state"]["best_epoch"] == 4
    averages = [state["ax"] for state in checkpoint["optimizer"]["state"].values()]
    assert averages  # the best model holds the averaged weights, not the last iterate
    params = [p for p in best["model"].values()]
    assert any(torch.equal(p, a) for p in params for a in averages if p.shape == a.shape)
    assert not torch.equal(checkpoint["model"]["core.layers.0.weight_hh_l0"], best["model"]["core.layers.0.weight_hh_l0"])


def test_when_divides_the_rate_only_outside_averaging(corpus_dir, tmp_path, monkeypatch):
    """AWD-LSTM's main.py divides by 10 at the end of an epoch in --when only in its non-ASGD branch: after
    epoch 1 (SGD: 5 -> 0.5); after epoch 3, the switch, the new ASGD starts at --lr 5 and is divided in the
    same branch (0.5); after epoch 4, under ASGD, --when does nothing (the rate stays 0.5)."""
    scripted_validation(monkeypatch, [5.0, 4.0, 6.0, 3.0])  # the switch after epoch 3
    run_dir = tmp_path / "run"
    awd_main.main(["--data", str(corpus_dir), "--run-dir", str(run_dir), *AWD_FLAGS, "--epochs", "4",
                   "--nonmono", "1", "--when", "1", "3", "4"])
    assert [e["epoch"] for e in read_events(run_dir, "asgd")] == [3]
    assert [e["lr"] for e in read_events(run_dir, "valid")] == [5.0, 0.5, 0.5, 0.5]  # each epoch's rate
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.5)
    assert "ax" in next(iter(checkpoint["optimizer"]["state"].values()))


def test_plateau_schedule_is_rebuilt_on_the_averaged_optimiser(corpus_dir, tmp_path, monkeypatch):
    """The switch replaces the optimiser; the plateau schedule is rebuilt on the new one (a schedule left on
    the old SGD would change a rate nothing uses). --lr-decay 0.5 --patience 0 halves on every evaluation
    that does not improve: epoch 2 halves SGD's rate, epochs 4 and 5 the ASGD's, which starts from --lr."""
    scripted_validation(monkeypatch, [5.0, 6.0, 7.0, 8.0, 9.0])
    run_dir = tmp_path / "run"
    awd_main.main(["--data", str(corpus_dir), "--run-dir", str(run_dir), *AWD_FLAGS, "--epochs", "5",
                   "--nonmono", "1", "--lr-decay", "0.5", "--patience", "0"])
    assert [e["epoch"] for e in read_events(run_dir, "asgd")] == [3]
    assert [e["lr"] for e in read_events(run_dir, "valid")] == [5.0, 5.0, 2.5, 5.0, 2.5]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1.25)


def test_finetune_caps_variable_bptt_at_bptt_plus_10(corpus_dir, tmp_path):
    """AWD-LSTM's finetune.py caps the drawn window at bptt + 10; its main.py does not."""
    trainer = make_trainer(corpus_dir, tmp_path)
    trainer.bptt_rng = np.random.RandomState(0)
    uncapped = [trainer.sequence_length() for _ in range(3000)]
    trainer.state.finetune, trainer.bptt_rng = True, np.random.RandomState(0)
    capped = [trainer.sequence_length() for _ in range(3000)]
    assert max(uncapped) > 8 + 10  # N(8, 5) draws above 18 now and then
    assert capped == [min(length, 18) for length in uncapped]


def test_resume_after_the_asgd_switch_is_bitwise(corpus_dir, tmp_path, monkeypatch):
    flags = [*AWD_FLAGS, "--epochs", "4", "--nonmono", "1", "--data", str(corpus_dir)]
    losses = [5.0, 4.0, 6.0, 3.5]  # the switch comes after epoch 3
    scripted_validation(monkeypatch, losses)
    awd_main.main([*flags, "--run-dir", str(tmp_path / "whole")])
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    steps_epoch_3 = read_events(tmp_path / "whole", "valid")[2]["step"]  # window lengths vary: read them
    scripted_validation(monkeypatch, losses)
    stopped = awd_main.main([*flags, "--run-dir", str(tmp_path / "parts"), "--max-steps", str(steps_epoch_3 + 3)])
    assert stopped["stopped"] == "max-steps"
    assert torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)["train_state"]["asgd"]
    scripted_validation(monkeypatch, losses[3:])
    awd_main.main(["--resume", str(tmp_path / "parts")])
    parts = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    for key in whole["model"]:
        assert torch.equal(whole["model"][key], parts["model"][key]), key


def test_finetune_continues_main_with_asgd_and_stops_by_the_same_rule(corpus_dir, tmp_path, monkeypatch):
    awd_main.main(["--data", str(corpus_dir), "--run-dir", str(tmp_path / "main"), *AWD_FLAGS, "--epochs", "1",
                   "--save", str(tmp_path / "PTB.pt")])
    saved_before = (tmp_path / "PTB.pt").read_bytes()
    # the loaded model scores 3.0; no epoch beats it; epoch 4 is worse than the best but the last
    scripted_validation(monkeypatch, [3.0, 5.0, 4.0, 4.5, 4.6])
    result = finetune.main(["--data", str(corpus_dir), "--run-dir", str(tmp_path / "ft"), *AWD_FLAGS,
                            "--checkpoint", str(tmp_path / "main"), "--epochs", "10", "--nonmono", "1",
                            "--save", str(tmp_path / "PTB.pt")])
    assert result["stopped"] == "converged"
    valid = read_events(tmp_path / "ft", "valid")
    assert [e["epoch"] for e in valid] == [0, 1, 2, 3, 4] and all(e["asgd"] for e in valid[1:])
    checkpoint = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)
    assert "ax" in next(iter(checkpoint["optimizer"]["state"].values()))
    # nothing beat the starting model: --save keeps it, and best.pt is the starting model
    assert (tmp_path / "PTB.pt").read_bytes() == saved_before
    start = torch.load(tmp_path / "main" / "best.pt", weights_only=True)["model"]
    best = torch.load(tmp_path / "ft" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(start[key], best[key]) for key in start)
    model, _ = training.load_checkpoint(tmp_path / "main" / "best.pt")  # so the final test is the start's
    test = batchify(Corpus(corpus_dir).test, 1)
    assert result["test_loss"] == pytest.approx(training.evaluate(model, test, 8), rel=1e-6)


def test_resumed_finetune_keeps_its_stopping_rule(corpus_dir, tmp_path, monkeypatch):
    awd_main.main(["--data", str(corpus_dir), "--run-dir", str(tmp_path / "main"), *AWD_FLAGS, "--epochs", "1"])
    scripted_validation(monkeypatch, [3.0, 5.0, 4.0])  # the start, epochs 1 and 2: no trigger yet
    first = finetune.main(["--data", str(corpus_dir), "--run-dir", str(tmp_path / "ft"), *AWD_FLAGS,
                           "--checkpoint", str(tmp_path / "main"), "--epochs", "2", "--nonmono", "1"])
    assert first["stopped"] is None
    assert torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)["train_state"]["finetune"] is True
    scripted_validation(monkeypatch, [4.5, 4.6])  # epoch 4 is worse than the best but the last
    resumed = finetune.main(["--resume", str(tmp_path / "ft"), "--epochs", "10"])
    assert resumed["stopped"] == "converged"
    assert [e["epoch"] for e in read_events(tmp_path / "ft", "valid")] == [0, 1, 2, 3, 4]


def test_finetune_needs_a_checkpoint(corpus_dir):
    with pytest.raises(training.UserInputError, match="--checkpoint"):
        finetune.main(["--data", str(corpus_dir)])


@pytest.mark.parametrize("cell", ["GRU", "QRNN"])
def test_main_runs_other_cells(corpus_dir, tmp_path, cell):
    result = awd_main.main(["--data", str(corpus_dir), "--run-dir", str(tmp_path / cell), *AWD_FLAGS,
                            "--model", cell, "--dry-run"])
    model, _ = training.load_checkpoint(tmp_path / cell / "best.pt")
    assert model.config.core == "AWD" and model.config.core_config["cell"] == cell
    assert model.config.core_config["wdrop"] == 0.5  # main.py's DropConnect default, on every cell
    valid = batchify(Corpus(corpus_dir).valid, 2)
    assert result["valid_loss"] == pytest.approx(training.evaluate(model, valid, 8, max_batches=2), rel=1e-6)


def test_awd_model_learns(tmp_path):
    corpus_dir = write_corpus(tmp_path / "c", {"train": 600, "valid": 40, "test": 40})
    result = awd_main.main(["--data", str(corpus_dir), "--run-dir", str(tmp_path / "run"), *AWD_FLAGS,
                            "--epochs", "3", "--lr", "10", "--wdrop", "0.2", "--dropouti", "0.2", "--dropouth",
                            "0.1", "--dropout", "0.1", "--emsize", "24", "--nhid", "32"])
    assert result["valid_ppl"] < 30  # uniform over 41 words is 41


def test_pointer_script_matches_the_reference_and_plain_evaluation(corpus_dir, tmp_path):
    import pointer
    from models.cache_pointer import cache_pointer_ref

    awd_main.main(["--data", str(corpus_dir), "--run-dir", str(tmp_path / "main"), *AWD_FLAGS, "--epochs", "2"])
    results = pointer.main(["--checkpoint", str(tmp_path / "main"), "--data", str(corpus_dir), "--window", "30",
                            "--bptt", "40", "--lambdasm", "0.3", "--theta", "0.5", "--threads", "1",
                            "--json", str(tmp_path / "pointer.json")])
    model, _ = training.load_checkpoint(tmp_path / "main" / "best.pt")
    corpus = Corpus(corpus_dir)
    for split in ("valid", "test"):
        plain = training.evaluate(model, batchify(getattr(corpus, split), 1), bptt=40)
        assert results[split]["ppl"] == pytest.approx(training.perplexity(plain), rel=1e-5)
        hidden, targets, log_probs = pointer.forward_split(model, getattr(corpus, split), 40, torch.device("cpu"))
        reference = cache_pointer_ref(hidden, targets, log_probs, 30, 0.5, 0.3)
        assert results[split]["cache_ppl"] == pytest.approx(training.perplexity(-reference.mean().item()), rel=1e-4)
        assert results[split]["cache_ppl"] != results[split]["ppl"]
    assert (tmp_path / "pointer.json").is_file()


def test_pointer_defaults_are_the_references():
    """The reference pointer.py's own defaults (its tuned WikiText-2 values), to the digit."""
    import pointer

    args = pointer.build_parser().parse_args(["--checkpoint", "x"])
    assert (args.window, args.theta, args.lambdasm, args.bptt) == (3785, 0.6625523432485668, 0.12785920428335693, 5000)
    assert args.data == "data/penn"


def test_pointer_rejects_a_checkpoint_of_another_vocabulary(corpus_dir, tmp_path):
    import pointer

    awd_main.main(["--data", str(corpus_dir), "--run-dir", str(tmp_path / "main"), *AWD_FLAGS, "--dry-run"])
    other = write_corpus(tmp_path / "other", seed=9)
    (other / "test.txt").write_text("entirely new words here\n")
    with pytest.raises(training.UserInputError, match="another vocabulary"):
        pointer.main(["--checkpoint", str(tmp_path / "main"), "--data", str(other)])


def test_adaptive_softmax_parameters_stay_in_the_optimiser_after_the_switch(corpus_dir, tmp_path):
    trainer = make_trainer(corpus_dir, tmp_path, "--adaptivesoftmax", "--cutoffs", "10", "25", "--div-value", "2")
    assert trainer.model.adaptive is not None and not trainer.model.config.tie_weights
    trainer.switch_to_asgd()
    assert isinstance(trainer.optimizer, torch.optim.ASGD)
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in trainer.model.parameters()} == in_optimizer
    assert all(id(p) in in_optimizer for p in trainer.model.adaptive.parameters())
