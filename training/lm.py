"""The language-model trainer: truncated BPTT over a corpus, validation each epoch, NT-ASGD, fine-tuning.

`run_language_model` is what the LM scripts call. Under torchrun (see `distributed.py`) the same
loop runs on every process: the batchified corpus is split by columns, so N processes with
`--batch_size` B see exactly the columns one process with B sees, DDP averages their gradients to
the same update, and evaluation sums over the processes. Window lengths, stops, skips and
optimiser switches are decided alike on every process; only rank 0 prints, logs and writes
checkpoints, which hold the whole batch's hidden state and every process's random state.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

import distributed
import models
from data import Corpus, batchify, get_batch
from errors import UserInputError
from models.core import detach_state, state_from_tensors, state_tensors
from training.checkpoint import load_checkpoint, numpy_state, set_numpy_state
from training.flags import Flags, FromArgs, check_lm_args, check_softmax_args
from training.loop import LoopOptions, LoopState, Trainer, announce, open_views, prepare
from training.run import Run, seed_everything, seed_rank


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


@torch.no_grad()
def evaluate(model: models.LanguageModel, source: torch.Tensor, bptt: int, max_batches: int | None = None,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """Mean loss per token over `source` [S, B]: summed token losses divided by the token count.

    The sum stays on the device (float64) and is read once at the end.
    """
    model.eval()
    state = model.initial_state(source.size(1), source.device)
    total = torch.zeros((), dtype=torch.float64, device=source.device)
    count = 0
    for batch, start in enumerate(range(0, source.size(0) - 1, bptt)):
        if max_batches is not None and batch >= max_batches:
            break
        inputs, targets = get_batch(source, start, bptt)
        with autocast():
            features, state = model(inputs, state)
            total += model.loss(features, targets, reduction="sum").double()
        count += targets.numel()
    return total.item() / count


def state_batch_dims(model: models.LanguageModel, device: torch.device) -> list[int | None]:
    """For each tensor of the model's recurrent state, the dimension that indexes the batch (None: none)."""
    one, two = (state_tensors(model.initial_state(size, device)) for size in (1, 2))
    return [next((dim for dim, (a, b) in enumerate(zip(x.shape, y.shape)) if a != b), None) for x, y in zip(one, two)]


def variable_bptt_length(bptt: int, rng: Any = np.random) -> int:
    """AWD-LSTM's window length: around bptt (p=0.95) or bptt/2, plus N(0, 5) noise, at least 5.

    `rng` is a NumPy `RandomState` (NumPy's global generator by default); `LMTrainer` passes its
    own, seeded from --seed and kept in checkpoints, so every rank draws the same lengths.
    """
    base = bptt if rng.random() < 0.95 else bptt / 2.0
    return max(5, int(rng.normal(base, 5)))


def nt_asgd_triggered(history: list[float], valid_loss: float, nonmono: int) -> bool:
    """NT-ASGD's non-monotone trigger: `valid_loss` is worse than the best of all but the last `nonmono`.

    Args:
        history: earlier validation losses, oldest first (without `valid_loss`).
        valid_loss: the newest validation loss.
        nonmono: how many of the latest evaluations the comparison leaves out; 0 never triggers.
    """
    return nonmono > 0 and len(history) > nonmono and valid_loss > min(history[:-nonmono])


@dataclasses.dataclass
class LMOptions(FromArgs):
    """The language-model loop's own flags (`from_args`)."""

    epochs: int
    batch_size: int
    bptt: int
    eval_batch_size: int = 10
    test_batch_size: int | None = None
    variable_bptt: bool = False
    alpha: float = 0.0
    beta: float = 0.0
    nonmono: int = 0
    when: list[int] = dataclasses.field(default_factory=list)
    save: str | None = None



@dataclasses.dataclass
class LMState(LoopState):
    """`LoopState` plus the epoch, the position in the corpus and the validation record."""

    epoch: int = 1
    position: int = 0  # row of the batchified training data where the next batch starts
    best_valid_loss: float = math.inf
    best_epoch: int = 0
    valid_history: list[float] = dataclasses.field(default_factory=list)  # every validation loss, in order
    asgd: bool = False  # averaged SGD is on (after the NT-ASGD switch, or from the start when fine-tuning)
    finetune: bool = False  # stop when validation stops improving under averaged SGD (finetune.py)


class LMTrainer(Trainer):
    """Trains a `LanguageModel` on a corpus with truncated BPTT, validating after each epoch.

    Under torchrun each rank trains on its share of the batch's columns (`batch_size` of them)
    through `loss_fn`, the DDP-wrapped `compute_loss`; evaluation and checkpoints cover all ranks.
    """

    state_class = LMState
    skip_action = "step skipped, state reset"
    task_name = "language model"

    def __init__(self, model: models.LanguageModel, corpus: Corpus, options: LoopOptions, lm: LMOptions,
                 device: torch.device, run: Run, args: argparse.Namespace, script: str):
        super().__init__(model, options, device, run, args, script)
        self.corpus, self.lm = corpus, lm
        self.batch_size = distributed.share(lm.batch_size, "--batch_size")  # this rank's columns
        train = batchify(corpus.train, lm.batch_size, name="the training split (--batch_size)")
        self.train_data = distributed.columns(train).to(device)
        self.valid_data, self.valid_shared = self.evaluation_share(
            batchify(corpus.valid, lm.eval_batch_size, name="the validation split (--eval_batch_size)"))
        self.test_data, self.test_shared = self.evaluation_share(
            batchify(corpus.test, lm.test_batch_size or lm.eval_batch_size, name="the test split (--test_batch_size)"))
        self.loss_fn = distributed.wrap(model, lambda inputs, targets: self.compute_loss(inputs, targets),
                                        find_unused_parameters=model.adaptive is not None)
        self.bptt_rng = np.random.RandomState(options.seed % 2**32)  # window lengths, the same on every rank
        self.state_dims = state_batch_dims(model, device)
        self.hidden = model.initial_state(self.batch_size, device)
        self.initial_hidden = model.initial_state(self.batch_size, device)  # what a skipped step resets to
        self.next_hidden: Any = None
        self.eval_batches = 2 if options.dry_run else None
        self.last_epoch: int | None = None

    def evaluation_share(self, source: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """This rank's columns of a batchified evaluation split on the device, and whether it is a share.

        When the split's batch size does not divide among the ranks (e.g. AWD-LSTM's test batch
        of 1), every rank evaluates all of it and the ranks take rank 0's result.
        """
        if source.size(1) % distributed.world_size():
            return source.to(self.device), False
        return distributed.columns(source).to(self.device), distributed.world_size() > 1

    def evaluate_split(self, model: models.LanguageModel, split: str) -> float:
        """Mean loss per token of `model` on "valid" or "test" over all ranks' columns, the same on every rank."""
        source, shared = (self.valid_data, self.valid_shared) if split == "valid" else (self.test_data, self.test_shared)
        loss = evaluate(model, source, self.lm.bptt, self.eval_batches, self.precision.autocast)
        if shared:
            rows = source.size(0) - 1
            if self.eval_batches is not None:
                rows = min(rows, self.eval_batches * self.lm.bptt)
            tokens = rows * source.size(1)
            total, count = distributed.all_reduce_sum(loss * tokens, tokens)
            loss = total / count
        return distributed.agree(loss)  # one value for the decisions taken on it, whatever the rounding

    # ---- batches and loss

    def sequence_length(self) -> int:
        """--bptt, or with --variable-bptt a drawn length; fine-tuning caps it at bptt + 10 as AWD-LSTM's
        finetune.py does (its main.py has the cap commented out, so training draws uncapped)."""
        if not self.lm.variable_bptt:
            return self.lm.bptt
        length = variable_bptt_length(self.lm.bptt, self.bptt_rng)
        return min(length, self.lm.bptt + 10) if self.state.finetune else length

    def batches_per_epoch(self) -> int:
        return math.ceil((self.train_data.size(0) - 1) / self.lm.bptt)

    def progress(self) -> tuple[int, int, str]:
        total = 2 if self.options.dry_run else self.batches_per_epoch()
        return total, min(self.state.position // self.lm.bptt, total), f"epoch {self.state.epoch}"

    def finished(self) -> bool:
        if self.last_epoch is None:
            self.last_epoch = self.state.epoch if self.options.dry_run else self.lm.epochs
        return self.state.epoch > self.last_epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.state.position >= self.train_data.size(0) - 1:
            return None
        if self.options.dry_run and self.period_batches == 2:
            return None
        inputs, targets = get_batch(self.train_data, self.state.position, self.sequence_length())
        self.state.position += inputs.size(0)
        return inputs, targets

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """With --variable-bptt the step's learning rate is scaled by window length / bptt."""
        scale = batch[0].size(0) / self.lm.bptt if self.lm.variable_bptt else 1.0
        base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] *= scale
        try:
            super().train_step(batch)
        finally:
            for group, lr in zip(self.optimizer.param_groups, base_lrs):
                group["lr"] = lr

    def forward_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        inputs, targets = batch
        self.hidden = detach_state(self.hidden)
        loss, self.next_hidden, cross_entropy = self.loss_fn(inputs, targets)
        return loss, cross_entropy, targets.numel() * distributed.world_size()

    def compute_loss(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, models.State, torch.Tensor]:
        """Loss to minimise for one window, the core's state after it, and the cross-entropy alone.

        With --alpha / --beta the loss adds activation regularisation on the dropped output and
        temporal activation regularisation on the raw output of the core's last layer.
        """
        alpha, beta = self.lm.alpha, self.lm.beta
        features, hidden, (raw, dropped) = self.model(inputs, self.hidden, return_outputs=True)
        cross_entropy = self.model.loss(features, targets)
        loss = cross_entropy
        if alpha:
            loss = loss + alpha * dropped.pow(2).mean()
        if beta and raw.size(0) > 1:
            loss = loss + beta * (raw[1:] - raw[:-1]).pow(2).mean()
        return loss, hidden, cross_entropy

    def after_update(self, bad: bool | torch.Tensor) -> None:
        """Carry the state to the next window, or reset it after a non-finite step."""
        if bad is True:
            self.hidden = self.model.initial_state(self.batch_size, self.device)
        elif bad is False:
            self.hidden = self.next_hidden
        else:
            self.hidden = state_from_tensors(self.next_hidden, [
                torch.where(bad, initial, carried) for initial, carried in
                zip(state_tensors(self.initial_hidden), state_tensors(self.next_hidden))])
        self.next_hidden = None

    def where(self) -> dict:
        return {"epoch": self.state.epoch}

    def train_line(self, loss: float, ms_per_batch: float, tokens_per_s: float) -> tuple[str, dict]:
        state, lr = self.state, self.lr
        line = (f"| epoch {state.epoch:3d} | step {state.step:6d} | lr {lr:.3g} | ms/batch {ms_per_batch:7.1f} | "
                f"tok/s {tokens_per_s:8.0f} | loss {loss:5.2f} | ppl {perplexity(loss):8.2f}")
        return line, dict(epoch=state.epoch, step=state.step, lr=lr, loss=loss, ppl=perplexity(loss),
                          ms_per_batch=ms_per_batch, tokens_per_s=tokens_per_s)

    # ---- the end of an epoch

    def end_period(self) -> str | None:
        """Validate (with averaged weights under ASGD), keep the best model, apply schedules, checkpoint.

        Returns a stop reason (fine-tuning converged) or None.
        """
        state = self.state
        started = time.perf_counter()
        with self.evaluation_weights():
            valid_loss = self.evaluate_split(self.model, "valid")
            improved = valid_loss < state.best_valid_loss and self.unsafe_to_save() is None
            if improved:
                state.best_valid_loss, state.best_epoch = valid_loss, state.epoch
                self.save("best.pt")
        now = time.perf_counter()
        self.run.print(f"| end of epoch {state.epoch:3d} | time {now - self.period_started:7.1f} s | "
                       f"valid loss {valid_loss:5.2f} | valid ppl {perplexity(valid_loss):8.2f}"
                       f"{' | best' if improved else ''}{' | averaged weights' if state.asgd else ''}")
        self.run.log("valid", epoch=state.epoch, step=state.step, loss=valid_loss, ppl=perplexity(valid_loss),
                     lr=self.lr, asgd=state.asgd, seconds=now - started, epoch_seconds=now - self.period_started)
        stop_reason = self.after_validation(valid_loss)
        state.epoch += 1
        state.position = 0
        self.hidden = self.model.initial_state(self.batch_size, self.device)
        self.save()
        return stop_reason

    def after_validation(self, valid_loss: float) -> str | None:
        """NT-ASGD switch, --when decays and the plateau schedule; returns a stop reason or None.

        As AWD-LSTM's main.py, --when divides the rate only after an epoch that trained without averaging
        (its SGD/Adam branch; in the epoch of the switch that is the new ASGD's rate), never under ASGD.
        """
        state, lm = self.state, self.lm
        averaging = state.asgd  # the branch the original's epoch end takes
        triggered = nt_asgd_triggered(state.valid_history, valid_loss, lm.nonmono)
        state.valid_history.append(valid_loss)
        if triggered and state.asgd and state.finetune:
            self.run.print(f"| validation loss stopped improving under averaged SGD: done (epoch {state.epoch})")
            return "converged"
        if triggered and not state.asgd and self.options.optimizer == "sgd":
            self.switch_to_asgd()
            self.run.print(f"| switching to averaged SGD (NT-ASGD) after epoch {state.epoch}")
            self.run.log("asgd", epoch=state.epoch, step=state.step)
        if state.epoch in lm.when and not averaging:
            for group in self.optimizer.param_groups:
                group["lr"] /= 10
            self.run.print(f"| epoch {state.epoch} is in --when: learning rate divided by 10")
        self.step_schedule(valid_loss)
        return None

    def switch_to_asgd(self) -> None:
        self.state.asgd = True
        self.optimizer = self.make_optimizer("asgd")
        self.scheduler = self.make_scheduler()

    def optimizer_for(self, state: LoopState) -> torch.optim.Optimizer:
        return self.make_optimizer("asgd" if getattr(state, "asgd", False) else self.options.optimizer)

    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """Under averaged SGD, swap the averaged weights into the model for evaluation and saving."""
        saved = []
        if self.state.asgd:
            with torch.no_grad():
                for param in self.model.parameters():
                    average = self.optimizer.state.get(param, {}).get("ax")
                    if average is not None:
                        saved.append((param, param.detach().clone()))
                        param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in saved:
                    param.copy_(value)

    # ---- checkpoints

    def checkpoint_contents(self) -> dict:
        """`Trainer`'s, plus the vocabulary, the whole batch's hidden state (every rank's columns) and the
        window-length generator."""
        hidden = [distributed.gather_columns(tensor, dim) if dim is not None else tensor
                  for tensor, dim in zip(state_tensors(self.hidden), self.state_dims)]
        return {**super().checkpoint_contents(), "vocab": self.corpus.dictionary.idx2word,
                "hidden": [tensor.cpu() for tensor in hidden], "bptt_rng": numpy_state(self.bptt_rng)}

    def save(self, name: str = "checkpoint.pt", copy_best: bool = True) -> Path:
        """`Trainer.save`; best.pt is also written to --save unless `copy_best` is False."""
        copy = name == "best.pt" and copy_best and self.lm.save
        return super().save(name, copies=(Path(self.lm.save),) if copy else ())

    def restore_streams(self, checkpoint: dict, same_processes: bool) -> None:
        # format-1 checkpoints written before the trainer had its own generator drew the lengths from NumPy's
        set_numpy_state(checkpoint.get("bptt_rng", checkpoint["rng"]["numpy"]), self.bptt_rng)
        if len(checkpoint["hidden"]) != len(self.state_dims):
            # A state of another layout: a SAM/SDNC model saved before its state kept the latest write (two
            # more tensors per memory). The weights, optimiser and schedule resume; the carried state restarts.
            self.run.print(f"| the checkpoint's hidden state has {len(checkpoint['hidden'])} tensors where this "
                           f"version's {self.model.config.core} has {len(self.state_dims)} (written by an older "
                           f"version): the rest of this epoch starts from a fresh hidden state")
            return
        self.hidden = state_from_tensors(
            self.hidden, [distributed.columns(tensor, dim) if dim is not None else tensor
                          for tensor, dim in zip(checkpoint["hidden"], self.state_dims)])

    # ---- the end

    def results(self) -> dict:
        return self.final_evaluation()

    def final_evaluation(self) -> dict:
        """Valid and test loss of the best model so far (the current one if nothing was validated yet).

        Rank 0 reads best.pt and sends its weights to the other ranks, which need not see the file.
        """
        best = self.run.path / "best.pt"
        model = self.model
        if distributed.agree(self.run.main and best.exists()):
            model = load_checkpoint(best, self.device)[0] if self.run.main else copy.deepcopy(self.model)
            distributed.broadcast_module(model)
        valid_loss = self.evaluate_split(model, "valid")
        test_loss = self.evaluate_split(model, "test")
        self.run.print(f"| end of training | valid ppl {perplexity(valid_loss):8.2f} | "
                       f"test ppl {perplexity(test_loss):8.2f}")
        self.run.log("test", step=self.state.step, valid_loss=valid_loss, valid_ppl=perplexity(valid_loss),
                     test_loss=test_loss, test_ppl=perplexity(test_loss))
        return {"valid_loss": valid_loss, "valid_ppl": perplexity(valid_loss),
                "test_loss": test_loss, "test_ppl": perplexity(test_loss)}


# --------------------------------------------------------------------------- entry point for LM scripts


def check_vocabulary(checkpoint: dict, corpus: Corpus, data: str) -> None:
    if checkpoint["vocab"] != corpus.dictionary.idx2word:
        raise UserInputError(
            f"{checkpoint['path']} was trained on another vocabulary ({len(checkpoint['vocab'])} words) than "
            f"{data} ({len(corpus.dictionary)} words); pass the --data it was trained on"
        )


ConfigFn = Callable[[argparse.Namespace, int], models.LMConfig]


def run_language_model(flags: Flags, script: str, config_fn: ConfigFn = models.lm_config_from_args,
                       finetune_from: str | None = None) -> dict:
    """Build corpus, model and trainer from flags, train, and test the best model.

    Args:
        flags: parsed flags (`training.parse_args`).
        script: the script's name, for the run folder, logs and checkpoints.
        config_fn: builds the model config from the flags and the vocabulary size.
        finetune_from: a checkpoint whose weights start a new run under averaged SGD that stops
            when validation stops improving (AWD-LSTM's finetune.py).

    With --resume the run continues from its checkpoint instead. Under torchrun every process
    runs this; --resume and `finetune_from` then need the checkpoint readable on every machine.
    """
    args, checkpoint, device = prepare(flags, "LanguageModel", check_lm_args, script)
    with distributed.session(device, args.dist_timeout):
        return _train_language_model(args, script, config_fn, finetune_from, checkpoint, device)


def _train_language_model(args: argparse.Namespace, script: str, config_fn: ConfigFn, finetune_from: str | None,
                          checkpoint: dict | None, device: torch.device) -> dict:
    """`run_language_model` inside the process group (a function of its own, so the trainer is freed first)."""
    seed_everything(args.seed)
    corpus = Corpus(args.data)
    views = open_views(args)
    if checkpoint is not None:
        check_vocabulary(checkpoint, corpus, args.data)
        model, _ = load_checkpoint(checkpoint["path"], device, kind="LanguageModel")
        run = Run(Path(checkpoint["path"]).parent)
    elif finetune_from is not None:
        model, start = load_checkpoint(finetune_from, device, kind="LanguageModel")
        check_vocabulary(start, corpus, args.data)
        run = Run.create(args, script)
    else:
        check_softmax_args(args)
        try:
            model = models.LanguageModel(config_fn(args, len(corpus.dictionary))).to(device)
        except ValueError as error:
            raise UserInputError(str(error)) from None
        run = Run.create(args, script)
    with run.setting_up():
        if checkpoint is None and finetune_from is not None:
            run.log("finetune", start=start["path"])
        seed_rank(args.seed)
        trainer = LMTrainer(model, corpus, LoopOptions.from_args(args), LMOptions.from_args(args), device, run, args,
                            script)
        if checkpoint is None and finetune_from is not None:
            trainer.state.finetune = True
            trainer.switch_to_asgd()
            start_loss = trainer.evaluate_split(model, "valid")
            trainer.state.best_valid_loss = start_loss  # fine-tuning must beat the model it starts from
            trainer.save("best.pt", copy_best=False)
            run.print(f"| fine-tuning {finetune_from} with averaged SGD from valid ppl {perplexity(start_loss):.2f}")
            run.log("valid", epoch=0, step=0, loss=start_loss, ppl=perplexity(start_loss), asgd=False)
        what = f"{model.config.core} language model, vocabulary {len(corpus.dictionary):,}"
        if model.split_softmax is not None:
            what += f", {model.split_softmax.description()}"
        announce(trainer, checkpoint, what)
        views.start(run)
    results = {"run_dir": str(run.path), **trainer.fit()}
    if getattr(args, "onnx_export", "") and run.main:
        best = run.path / "best.pt"
        exported = load_checkpoint(best, device)[0] if best.exists() else model
        export_onnx(exported, args.onnx_export, args.bptt, device)
        run.print(f"| exported the best model to {args.onnx_export} (ONNX)")
    return results


class LogProbabilities(torch.nn.Module):
    """A language model as one function of the tokens, for export: tokens [T, B] -> log-probabilities
    [T, B, V] from a fresh state."""

    def __init__(self, model: models.LanguageModel):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        features, _ = self.model(tokens)
        return self.model.log_probs(features)


def export_onnx(model: models.LanguageModel, path: str, steps: int, device: torch.device) -> None:
    """`--onnx-export` (the seed project's train_rmc.py / train_rnn.py): the model in ONNX, traced on
    tokens [steps, 1]. The seed exported (tokens, state) -> (logits, state); here the state starts fresh
    inside, which every core supports."""
    model.eval()
    tokens = torch.zeros(steps, 1, dtype=torch.long, device=device)
    try:
        torch.onnx.export(LogProbabilities(model), (tokens,), path, input_names=["tokens"],
                          output_names=["log_probs"])
    except Exception as error:  # the exporter's own errors name the operation it could not convert
        raise UserInputError(f"--onnx-export {path}: the {model.config.core} model could not be exported "
                             f"({type(error).__name__}: {error})") from None
