"""The one training loop (training/loop.py) on a fake model: logging, stops and resume, non-finite steps
decided on the host and on the device, no host reads in the device-side hot loop, mixed precision."""

import argparse
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import training.loop as loop
from errors import TrainingError
from training.checkpoint import read_checkpoint
from training.loop import LoopOptions, Trainer
from training.run import Run, StopSignals

WEIGHTS = torch.tensor([1.0, -2.0, 0.5])


@dataclasses.dataclass
class FakeConfig:
    inputs: int = 3


class Linear(nn.Linear):
    def __init__(self):
        super().__init__(3, 1)
        self.config = FakeConfig()


class FakeTrainer(Trainer):
    """Fresh regression batches from a generator kept in checkpoints; NaN losses at `nan_at`."""

    def __init__(self, run_dir, steps=12, nan_at=(), **options):
        torch.manual_seed(0)
        options = LoopOptions(**{"optimizer": "sgd", "lr": 0.1, "log_interval": 4, **options})
        super().__init__(Linear(), options, torch.device("cpu"), Run(run_dir), argparse.Namespace(**vars(options)),
                         "fake")
        self.steps, self.nan_at = steps, set(nan_at)
        self.generator = torch.Generator().manual_seed(0)

    def finished(self):
        return self.state.step >= self.steps

    def progress(self):
        return self.steps, self.state.step, "fake"

    def next_batch(self):
        x = torch.randn(8, 3, generator=self.generator)
        return x, x @ WEIGHTS

    def forward_loss(self, batch):
        x, y = batch
        loss = F.mse_loss(self.model(x).squeeze(-1), y)
        if self.state.step + 1 in self.nan_at:
            loss = loss * float("nan")
        return loss, loss, len(x)

    def train_line(self, loss, ms_per_batch, tokens_per_s):
        return f"| step {self.state.step} | loss {loss:.4f}", {"step": self.state.step, "loss": loss}

    def checkpoint_contents(self):
        return {**super().checkpoint_contents(), "generator": self.generator.get_state()}

    def restore_streams(self, checkpoint, same_processes):
        self.generator.set_state(checkpoint["generator"])


def events(run_dir, name):
    return [e for e in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if e["event"] == name]


def resumed(run_dir, **kwargs):
    trainer = FakeTrainer(run_dir, **kwargs)
    checkpoint = read_checkpoint(run_dir)
    trainer.model.load_state_dict(checkpoint["model"])
    trainer.restore(checkpoint)
    return trainer


def test_loss_falls_and_each_interval_is_logged_once(tmp_path):
    trainer = FakeTrainer(tmp_path / "run", steps=40, lr=0.05)
    result = trainer.fit()
    assert result == {"stopped": None, "step": 40}
    train = events(tmp_path / "run", "train")
    assert [e["step"] for e in train] == [4 * k for k in range(1, 11)]
    assert train[-1]["loss"] < 0.1 * train[0]["loss"]
    assert trainer.state.interval_batches == 0 and trainer.pending == []


def test_max_steps_stop_saves_and_resume_is_bitwise(tmp_path):
    whole = FakeTrainer(tmp_path / "whole")
    whole.fit()
    part = FakeTrainer(tmp_path / "parts", max_steps=6)  # mid-interval: the log's sums must survive
    assert part.fit()["stopped"] == "max-steps"
    assert read_checkpoint(tmp_path / "parts")["train_state"]["interval_batches"] == 2
    rest = resumed(tmp_path / "parts")
    assert rest.state.step == 6 and rest.fit()["stopped"] is None
    assert torch.equal(rest.model.weight, whole.model.weight) and torch.equal(rest.model.bias, whole.model.bias)
    strip = lambda run_dir: [(e["step"], e["loss"]) for e in events(run_dir, "train")]  # noqa: E731
    assert strip(tmp_path / "parts") == strip(tmp_path / "whole")


@pytest.mark.parametrize("sync_free", [False, True])
def test_non_finite_steps_are_skipped_logged_and_leave_the_weights(tmp_path, sync_free, capsys):
    clean = FakeTrainer(tmp_path / "clean", steps=2)
    clean.fit()
    trainer = FakeTrainer(tmp_path / "run", nan_at={3, 4}, sync_free=sync_free)
    weights_before = []
    original = trainer.train_step

    def train_step(batch):  # the weights before steps 3 and 4 and after them must be the same
        if trainer.state.step in (2, 4):
            weights_before.append(trainer.model.weight.detach().clone())
        original(batch)

    trainer.train_step = train_step
    trainer.fit()
    assert [e["step"] for e in events(tmp_path / "run", "nonfinite")] == [3, 4]
    assert torch.equal(weights_before[0], weights_before[1])
    assert torch.equal(weights_before[0], clean.model.weight)
    assert trainer.state.skipped_steps == 2 and trainer.state.nonfinite_streak == 0
    assert torch.isfinite(trainer.model.weight).all()
    assert capsys.readouterr().out.count("non-finite loss or gradient; step skipped") == 2


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop", "asgd"])
def test_device_side_decisions_train_as_host_ones(tmp_path, optimizer):
    kwargs = dict(steps=12, nan_at={5}, optimizer=optimizer, lr=0.01, clip=1.0)
    host = FakeTrainer(tmp_path / "host", sync_free=False, **kwargs)
    device = FakeTrainer(tmp_path / "device", sync_free=True, **kwargs)
    host.fit()
    device.fit()
    assert device.optimizer.defaults.get("fused", False) == (optimizer in ("sgd", "adam"))
    assert torch.allclose(device.model.weight, host.model.weight, rtol=1e-6, atol=1e-7)
    for param in host.model.parameters():  # the skipped step left no trace in the optimiser's state either
        host_state = host.optimizer.state[param]
        device_param = dict(device.model.named_parameters())[next(n for n, p in host.model.named_parameters()
                                                                   if p is param)]
        for key, value in host_state.items():
            if torch.is_tensor(value):
                assert torch.allclose(device.optimizer.state[device_param][key].float(), value.float(),
                                      rtol=1e-6, atol=1e-7), key


def test_device_side_non_finite_streak_stops_at_the_read_and_keeps_checkpoints(tmp_path, capsys):
    first = FakeTrainer(tmp_path / "run", max_steps=4, sync_free=True)
    first.fit()
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    trainer = resumed(tmp_path / "run", steps=40, nan_at=set(range(6, 40)), sync_free=True, max_nonfinite=3,
                      log_interval=10)
    with pytest.raises(TrainingError, match=r"not finite for 3 consecutive steps \(step 8\)"):
        trainer.fit()
    # decided on the device, read at step 10's log line: every skipped step up to the third is reported
    assert [e["step"] for e in events(tmp_path / "run", "nonfinite")] == [6, 7, 8]
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    assert torch.isfinite(trainer.model.weight).all()


class HostReads:
    """Counts reads of tensor values into Python (each one a host sync on a GPU) while `active`."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")

    def __init__(self, monkeypatch):
        self.active, self.count, self.where = False, 0, []
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def method(tensor, *args, **kwargs):
            if self.active:
                self.count += 1
                self.where.append(name)
            return original(tensor, *args, **kwargs)
        return method


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])  # ASGD/RMSprop read their step counter on the CPU only
def test_device_side_hot_loop_reads_nothing_between_log_lines(tmp_path, monkeypatch, optimizer):
    trainer = FakeTrainer(tmp_path / "run", steps=12, log_interval=100, sync_free=True, optimizer=optimizer,
                          clip=0.5, nan_at={7}, lr=0.01)
    reads = HostReads(monkeypatch)
    original = trainer.train_step

    def train_step(batch):
        reads.active = trainer.state.step >= 1  # the optimiser's first step is decided on the host
        original(batch)
        reads.active = False

    trainer.train_step = train_step
    trainer.fit()
    assert reads.count == 0, reads.where
    assert [e["step"] for e in events(tmp_path / "run", "nonfinite")] == [7]  # still found, at the read


def test_on_cuda_the_other_optimisers_keep_their_counters_on_the_device(tmp_path):
    trainer = FakeTrainer(tmp_path / "run", sync_free=True)
    trainer.device = torch.device("cuda")  # only which constructor arguments are chosen is checked here
    assert trainer.make_optimizer("asgd").defaults["capturable"] is True
    assert trainer.make_optimizer("rmsprop").defaults["capturable"] is True
    assert trainer.make_optimizer("sgd").defaults["fused"] is True
    assert trainer.make_optimizer("adam").defaults["fused"] is True


def test_host_side_decisions_read_each_step(tmp_path, monkeypatch):
    """The counter above does see reads: on the CPU each step is decided on the host."""
    trainer = FakeTrainer(tmp_path / "run", steps=4, log_interval=100, sync_free=False)
    reads = HostReads(monkeypatch)
    original = trainer.train_step

    def train_step(batch):
        reads.active = True
        original(batch)
        reads.active = False

    trainer.train_step = train_step
    trainer.fit()
    assert reads.count >= 4


def test_cpu_decides_on_the_host_and_accelerators_on_the_device():
    assert not loop.decide_on_device(torch.device("cpu"))
    assert loop.decide_on_device(torch.device("cuda", 0))


def test_signal_stop_in_fit(tmp_path):
    trainer = FakeTrainer(tmp_path / "run", steps=10)
    signals = StopSignals()
    signals.reason = "interrupt"
    assert trainer.stop_request(signals) == "interrupt"
    trainer.options.max_steps = 0
    signals.reason = None
    assert trainer.stop_request(signals) == "max-steps"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes(tmp_path, precision):
    full = FakeTrainer(tmp_path / "fp32", steps=40, lr=0.05)
    full.fit()
    mixed = FakeTrainer(tmp_path / precision, steps=40, lr=0.05, precision=precision)
    assert mixed.fit()["stopped"] is None
    losses = [e["loss"] for e in events(tmp_path / precision, "train")]
    assert losses[-1] < 0.1 * losses[0]
    assert torch.allclose(mixed.model.weight, full.model.weight, atol=0.05)
    # stopped and resumed (the gradient scaler's state too, for fp16), it ends where the whole run did
    FakeTrainer(tmp_path / "parts", steps=40, lr=0.05, precision=precision, max_steps=20).fit()
    saved = read_checkpoint(tmp_path / "parts")
    assert (saved["scaler"] is not None) == (precision == "fp16")
    rest = resumed(tmp_path / "parts", steps=40, lr=0.05, precision=precision)
    rest.fit()
    assert torch.equal(rest.model.weight, mixed.model.weight)
    if precision == "fp16":
        assert rest.precision.scaler.get_scale() == mixed.precision.scaler.get_scale()


# --------------------------------------------------------------------------- on a GPU (skipped without CUDA)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class CudaFakeTrainer(FakeTrainer):
    def __init__(self, run_dir, **kwargs):
        super().__init__(run_dir, **kwargs)
        self.model.cuda()
        self.device = torch.device("cuda")
        self.sync_free = True
        self.optimizer = self.make_optimizer(self.options.optimizer)
        self.scheduler = self.make_scheduler()

    def next_batch(self):
        x, y = super().next_batch()
        return x.cuda(non_blocking=True), y.cuda(non_blocking=True)


@needs_cuda
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop", "asgd"])
def test_cuda_hot_loop_makes_no_host_sync_between_log_lines(tmp_path, optimizer):
    """torch.cuda's sync debug mode turns any host sync inside the steps (after the first) into an error."""
    trainer = CudaFakeTrainer(tmp_path / "run", steps=12, log_interval=100, optimizer=optimizer, clip=0.5,
                              nan_at={7}, lr=0.01)
    original = trainer.train_step

    def train_step(batch):
        if trainer.state.step >= 1:  # the optimiser's first step is decided on the host
            torch.cuda.set_sync_debug_mode("error")
        try:
            original(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    trainer.train_step = train_step
    trainer.fit()
    assert [e["step"] for e in events(tmp_path / "run", "nonfinite")] == [7]
    assert torch.isfinite(trainer.model.weight).all()


@needs_cuda
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "asgd"])
def test_cuda_device_side_skips_train_as_the_cpu_host_side_does(tmp_path, optimizer):
    kwargs = dict(steps=12, nan_at={5}, optimizer=optimizer, lr=0.01, clip=1.0)
    cpu = FakeTrainer(tmp_path / "cpu", sync_free=False, **kwargs)
    cpu.fit()
    gpu = CudaFakeTrainer(tmp_path / "gpu", **kwargs)
    gpu.fit()
    torch.testing.assert_close(gpu.model.weight.cpu(), cpu.model.weight, rtol=1e-5, atol=1e-6)
