"""A word-level language model around any recurrent core.

embedding -> dropout -> core -> dropout -> [projection] -> head      (default; AWD-LSTM, the seed's LSTM LM)
embedding -> dropout -> core -> projection -> dropout -> head        (`dropout_after_projection`; the seed's RMC LM)

Dropout is standard by default; with `locked_dropout=True` (AWD-LSTM) it is variational,
one mask per sequence shared over time, and `dropoute` drops whole word types from the
embedding. `dropouti` is the dropout on the embeddings (default: `dropout`).

The head is a full softmax (`nn.Linear` decoder, optionally tied to the embedding) or an
adaptive softmax (`nn.AdaptiveLogSoftmaxWithLoss`, Grave et al. 2016), owned by the model
so it is optimised and saved with it; or AWD-LSTM's split softmax (`models/split_softmax.py`),
a two-level softmax over the full-softmax decoder's own rows, so it keeps the tied embedding.
When weights are tied and the core's output width differs from the embedding width, a linear
projection maps one onto the other; with `projection_size` set, a projection to that width is
always there (the seed project's RMC LM projects its 768-wide output to the embedding size before
any head, its LSTM LM puts a Linear(nhid, nhid) before its adaptive softmax).

Shapes: `T` time steps, `B` batch, `E` embedding size, `D` feature size at the head
(E when tied, else the core's output size), `V` vocabulary size, `N` tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.core import CORES, State, build_core, get_core_class
from models.regularizers import embedding_dropout, locked_dropout
from models.split_softmax import SplitSoftmax, default_splits


@dataclasses.dataclass
class LMConfig:
    vocab_size: int
    core: str = "LSTM"
    core_config: dict = dataclasses.field(default_factory=dict)
    emsize: int = 300
    dropout: float = 0.5  # on the core's output (and on the embeddings unless dropouti is set)
    dropouti: float | None = None  # on the embeddings; None: the same as dropout
    dropoute: float = 0.0  # probability of dropping a whole word type from the embedding
    locked_dropout: bool = False  # variational (one mask per sequence) instead of standard dropout
    tie_weights: bool = True
    adaptive_softmax: bool = False
    cutoffs: list[int] = dataclasses.field(default_factory=list)
    div_value: float = 4.0
    projection_size: int | None = None  # always project the core's output to this width; None: only when tying needs it
    dropout_after_projection: bool = False  # the output dropout after the projection (seed RMC) instead of before
    split_softmax: bool = False  # AWD-LSTM's split softmax over the decoder; no cutoffs: AWD's for the vocabulary

    def __post_init__(self) -> None:
        self.cutoffs = list(self.cutoffs)
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if self.emsize < 1:
            raise ValueError(f"emsize must be positive, got {self.emsize}")
        for name in ("dropout", "dropouti", "dropoute"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.adaptive_softmax:
            check_cutoffs(self.cutoffs, self.vocab_size)
            if self.tie_weights:
                raise ValueError("weight tying needs the full softmax; use --no-tied with --adaptivesoftmax")
        if self.projection_size is not None:
            if self.projection_size < 1:
                raise ValueError(f"projection_size must be positive, got {self.projection_size}")
            if self.tie_weights and self.projection_size != self.emsize:
                raise ValueError(f"a tied decoder needs the projection to the embedding size {self.emsize}, "
                                 f"got projection_size {self.projection_size}")
        if self.split_softmax:
            if self.adaptive_softmax:
                raise ValueError("--adaptivesoftmax and --splitsoftmax are two different heads; choose one")
            if self.cutoffs:
                check_cutoffs(self.cutoffs, self.vocab_size)
            else:
                self.cutoffs = default_splits(self.vocab_size)


def check_cutoffs(cutoffs: list[int], vocab_size: int) -> None:
    """Raise ValueError unless `cutoffs` split a vocabulary of `vocab_size` words into clusters."""
    if not cutoffs:
        raise ValueError("--adaptivesoftmax needs --cutoffs, e.g. --cutoffs 2000 10000")
    increasing = all(low < high for low, high in zip(cutoffs, cutoffs[1:]))
    if not increasing or cutoffs[0] < 1 or cutoffs[-1] > vocab_size - 1:
        raise ValueError(
            f"--cutoffs {' '.join(map(str, cutoffs))} do not fit a vocabulary of {vocab_size} words: they must "
            f"increase strictly and lie between 1 and {vocab_size - 1} (e.g. --cutoffs "
            f"{max(1, vocab_size // 10)} {max(2, vocab_size // 2)})"
        )


class LanguageModel(nn.Module):
    """Embedding, any registered core, and a full, adaptive or split softmax head."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.encoder = nn.Embedding(config.vocab_size, config.emsize)
        self.core = build_core(config.core, config.core_config)
        core_size = self.core.output_size
        if config.projection_size is not None:
            features = config.projection_size
            self.projection = nn.Linear(core_size, features)
        else:
            features = config.emsize if config.tie_weights else core_size
            self.projection = nn.Linear(core_size, features) if core_size != features else None
        if config.adaptive_softmax:
            smallest = int(features // (config.div_value ** len(config.cutoffs)))
            if smallest < 1:
                raise ValueError(
                    f"adaptive softmax: the last cluster's projection of {features} // {config.div_value:g}^"
                    f"{len(config.cutoffs)} units is empty; lower --div-value or use fewer --cutoffs"
                )
            self.decoder = None
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(
                features, config.vocab_size, cutoffs=config.cutoffs, div_value=config.div_value
            )
        else:
            self.adaptive = None
            self.decoder = nn.Linear(features, config.vocab_size)
        # the split softmax computes its logits from the decoder's weight and bias (tied or not)
        self.split_softmax = (SplitSoftmax(features, config.vocab_size, config.cutoffs) if config.split_softmax
                              else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        if self.decoder is not None:
            nn.init.zeros_(self.decoder.bias)
            if self.config.tie_weights:
                self.decoder.weight = self.encoder.weight
            else:
                nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return self.core.initial_state(batch_size, device)

    def _dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        if self.config.locked_dropout:
            return locked_dropout(x, p, self.training)
        return F.dropout(x, p, self.training)

    def forward(
        self, tokens: torch.Tensor, state: State | None = None, return_outputs: bool = False
    ) -> tuple[torch.Tensor, State] | tuple[torch.Tensor, State, tuple[torch.Tensor, torch.Tensor]]:
        """Features for the head.

        Args:
            tokens: LongTensor [T, B].
            state: the core's state, or None for a fresh one.
            return_outputs: also return the core's output before and after dropout (for AR/TAR).

        Returns:
            features [T, B, D] (pass to `loss` or `log_probs`), the core's new state, and with
            `return_outputs` the pair (raw core output [T, B, H], dropped output: [T, B, H], or with
            `dropout_after_projection` the features [T, B, D]).
        """
        config = self.config
        embedded = embedding_dropout(self.encoder.weight, tokens, config.dropoute, self.training)  # [T, B, E]
        embedded = self._dropout(embedded, config.dropout if config.dropouti is None else config.dropouti)
        raw, state = self.core(embedded, state)
        if config.dropout_after_projection:
            projected = self.projection(raw) if self.projection is not None else raw
            features = dropped = self._dropout(projected, config.dropout)
        else:
            dropped = self._dropout(raw, config.dropout)
            features = self.projection(dropped) if self.projection is not None else dropped
        if return_outputs:
            return features, state, (raw, dropped)
        return features, state

    def loss(self, features: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Negative log-likelihood of `targets` [T, B] under `features` [T, B, D] ('mean' or 'sum')."""
        if self.split_softmax is not None:
            flat = features.reshape(-1, features.size(-1))  # [T, B, D] -> [N, D]
            return self.split_softmax.loss(self.decoder.weight, self.decoder.bias, flat, targets.reshape(-1),
                                           reduction)
        if self.adaptive is None:
            flat = features.reshape(-1, features.size(-1))  # [T, B, D] -> [N, D]
            return F.cross_entropy(self.decoder(flat), targets.reshape(-1), reduction=reduction)
        total = -self.target_log_probs(features, targets).sum()
        return total if reduction == "sum" else total / targets.numel()

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Log-probability of each target word: features [..., D], targets [...] -> [...]."""
        flat = features.reshape(-1, features.size(-1))  # [..., D] -> [N, D]
        flat_targets = targets.reshape(-1)  # [...] -> [N]
        if self.split_softmax is not None:
            out = self.split_softmax.target_log_probs(self.decoder.weight, self.decoder.bias, flat, flat_targets)
        elif self.adaptive is None:
            out = -F.cross_entropy(self.decoder(flat), flat_targets, reduction="none")
        else:
            out = self.adaptive(flat, flat_targets).output
        return out.view(targets.shape)

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of every word: [..., D] -> [..., V]."""
        flat = features.reshape(-1, features.size(-1))  # [..., D] -> [N, D]
        if self.split_softmax is not None:
            out = self.split_softmax.log_probs(self.decoder.weight, self.decoder.bias, flat)
        elif self.adaptive is None:
            out = F.log_softmax(self.decoder(flat), dim=-1)
        else:
            out = self.adaptive.log_prob(flat)
        return out.reshape(*features.shape[:-1], -1)


def add_lm_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the language model and of every registered core."""
    group = parser.add_argument_group("language model")
    group.add_argument(
        "--model", default="LSTM", type=str,
        help=f"recurrent core: {', '.join(cls.name for cls in CORES.values())}",
    )
    group.add_argument("--emsize", type=int, default=300, help="word embedding size")
    group.add_argument("--dropout", type=float, default=0.5,
                       help="dropout on the core's output (and on the embeddings unless --dropouti is given)")
    group.add_argument("--dropouti", type=float, default=None, help="dropout on the embeddings (unset: the same as --dropout)")
    group.add_argument("--dropoute", type=float, default=0.0, help="probability of dropping whole word types")
    group.add_argument("--locked-dropout", "--locked_dropout", dest="locked_dropout",
                       action=argparse.BooleanOptionalAction, default=False,
                       help="variational dropout: one mask per sequence, shared over time (AWD-LSTM)")
    group.add_argument(
        "--tied", action=argparse.BooleanOptionalAction, default=True,
        help="tie the decoder to the embedding (full softmax only; a projection is added when sizes differ)",
    )
    group.add_argument(
        "--adaptivesoftmax", "--adaptive-softmax", dest="adaptivesoftmax", action="store_true",
        help="adaptive softmax head for large vocabularies (needs --cutoffs; implies --no-tied and "
             "--no-splitsoftmax)",
    )
    group.add_argument(
        "--splitsoftmax", "--split-softmax", dest="splitsoftmax", action=argparse.BooleanOptionalAction,
        default=False,
        help="AWD-LSTM's split softmax over the decoder's rows (keeps --tied) for large vocabularies; "
             "--cutoffs, or by default AWD's by vocabulary size: none up to 75,000 words (the full softmax), "
             "2800 20000 76000 above, 4200 35000 180000 above 500,000",
    )
    group.add_argument(
        "--cutoffs", type=int, nargs="+", default=[],
        help="adaptive or split softmax cluster boundaries, increasing word ranks, e.g. 2000 10000",
    )
    group.add_argument("--div-value", "--div_value", dest="div_value", type=float, default=4.0,
                       help="adaptive softmax: each cluster's projection shrinks by this factor")
    group.add_argument(
        "--adaptive-projection", dest="adaptive_projection", choices=("none", "emsize", "core"), default="none",
        help="with --adaptivesoftmax, a linear layer before the head: to the embedding size (the seed's RMC LM), "
             "to the core's own width (the seed's LSTM LM), or none",
    )
    group.add_argument(
        "--dropout-after-projection", dest="dropout_after_projection", action=argparse.BooleanOptionalAction,
        default=False, help="drop out the projection's output (the seed's RMC LM) instead of the core's output "
                            "before the projection",
    )
    for cls in CORES.values():
        cls.add_args(parser)


def lm_config_from_args(args: argparse.Namespace, vocab_size: int, core: str | None = None) -> LMConfig:
    """Build the model config from parsed flags; raises ValueError on a bad combination.

    `core` overrides `--model` as the registered core's name (e.g. main.py maps LSTM to AWD).
    """
    core_class = get_core_class(core or args.model)
    core_config: Any = core_class.config_from_args(args, args.emsize)
    projection_size = None
    if args.adaptivesoftmax and args.adaptive_projection == "emsize":
        projection_size = args.emsize
    elif args.adaptivesoftmax and args.adaptive_projection == "core":
        with torch.device("meta"):  # only its width is needed: allocate nothing
            projection_size = core_class(core_config).output_size
    return LMConfig(
        vocab_size=vocab_size,
        core=core_class.name,
        core_config=dataclasses.asdict(core_config),
        emsize=args.emsize,
        dropout=args.dropout,
        dropouti=args.dropouti,
        dropoute=args.dropoute,
        locked_dropout=args.locked_dropout,
        tie_weights=args.tied and not args.adaptivesoftmax,
        adaptive_softmax=args.adaptivesoftmax,
        cutoffs=args.cutoffs,
        div_value=args.div_value,
        projection_size=projection_size,
        dropout_after_projection=args.dropout_after_projection,
        split_softmax=args.splitsoftmax and not args.adaptivesoftmax,
    )
