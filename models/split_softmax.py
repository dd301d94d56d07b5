"""AWD-LSTM's split (two-level) softmax for large vocabularies, on the language model's own decoder.

The reference is `SplitCrossEntropyLoss` of salesforce/awd-lstm-lm (`splitcross.py`). The
frequency-sorted vocabulary is cut at `cutoffs` c_1 < ... < c_K into a head [0, c_1) and tail
clusters [c_k, c_k+1) (the last one ends at V). The first level is one softmax over the head's
words and K "tombstones", one trainable vector and bias per tail cluster; a tail word's
probability is its cluster's tombstone probability times a softmax over its cluster's words:

    log p(w) = log softmax([W_head x + b_head ; U x + u])_w                 w in the head
    log p(w) = log softmax([W_head x + b_head ; U x + u])_{c_1 + k - 1}
               + log softmax(W_k x + b_k)_{w - c_k}                           w in tail cluster k

Every word's logit comes from the decoder's row (`W`, `b`: the decoder's weight and bias, which
is the embedding when weights are tied), unlike the adaptive softmax whose clusters have their
own projections; the only extra parameters are the tombstones `U` [K, D] and `u` [K], zero at
the start as in the reference. Training costs one head product for every token plus, for each
tail cluster, a product over that cluster's words for the tokens whose target is in it. With no
cutoffs there is one cluster and this is exactly the full softmax.

AWD-LSTM chooses the cutoffs from the vocabulary size (`default_splits`): none up to 75,000
words, [2800, 20000, 76000] above (WikiText-103), [4200, 35000, 180000] above 500,000 (One
Billion Words). The reference gives tail cluster k the tombstone in column -k of the head
(the clusters' tombstones in reverse order); here cluster k has tombstone k - 1. The tombstones
start equal, so the two orders train the same model up to a renaming of these parameters.

Shapes: `N` tokens, `D` features, `V` vocabulary, `K` tail clusters, `C` = c_1 head words.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (vocabulary above this size, AWD-LSTM's cutoffs), the largest first.
AWD_SPLITS = ((500_000, (4200, 35000, 180000)), (75_000, (2800, 20000, 76000)))


def default_splits(vocab_size: int) -> list[int]:
    """AWD-LSTM's cutoffs for a vocabulary of `vocab_size` words (main.py of awd-lstm-lm).

    Cutoffs past the vocabulary's end (a vocabulary of 75,001 to 76,000 words) are left out,
    so that no cluster is empty.
    """
    for above, cutoffs in AWD_SPLITS:
        if vocab_size > above:
            return [cutoff for cutoff in cutoffs if cutoff < vocab_size]
    return []


class SplitSoftmax(nn.Module):
    """The tombstones of a split softmax and its log-probabilities over a decoder's weight and bias.

    The decoder is passed to each call (as the reference's criterion takes `model.decoder.weight`),
    so a decoder tied to the embedding stays one parameter, trained by both levels.

    Args:
        features: D, the decoder's input size.
        vocab_size: V, the decoder's output size.
        cutoffs: c_1 < ... < c_K, the first word of each tail cluster (may be empty: one cluster).
    """

    def __init__(self, features: int, vocab_size: int, cutoffs: list[int]):
        super().__init__()
        self.cutoffs = list(cutoffs)
        self.bounds = [0, *self.cutoffs, vocab_size]  # cluster k holds words [bounds[k], bounds[k + 1])
        if self.cutoffs:
            self.tail_vectors = nn.Parameter(torch.zeros(len(self.cutoffs), features))
            self.tail_bias = nn.Parameter(torch.zeros(len(self.cutoffs)))
        else:
            self.register_parameter("tail_vectors", None)
            self.register_parameter("tail_bias", None)
        self.register_buffer("cutoff_tensor", torch.tensor(self.cutoffs, dtype=torch.long), persistent=False)

    @property
    def head_size(self) -> int:
        return self.bounds[1]

    def extra_repr(self) -> str:
        return f"cutoffs={self.cutoffs}, vocab_size={self.bounds[-1]}"

    def description(self) -> str:
        """One line for logs, e.g. 'split softmax: head 2,800 words + 3 tail clusters (17,200, 56,000, 191,735)'."""
        if not self.cutoffs:
            return f"split softmax: one cluster of {self.bounds[-1]:,} words (the full softmax)"
        tails = ", ".join(f"{end - start:,}" for start, end in zip(self.bounds[1:], self.bounds[2:]))
        plural = "s" if len(self.cutoffs) > 1 else ""
        return f"split softmax: head {self.head_size:,} words + {len(self.cutoffs)} tail cluster{plural} ({tails})"

    def clusters(self, weight: torch.Tensor, bias: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The decoder's rows and biases cluster by cluster: [(W_k [c_k+1 - c_k, D], b_k)] for k = 0..K.

        One `split` rather than a slice per cluster: its backward writes the decoder's gradient once
        (a slice's backward builds a zero [V, D] gradient of its own, one per cluster).
        """
        sizes = [end - start for start, end in zip(self.bounds, self.bounds[1:])]
        return list(zip(weight.split(sizes), bias.split(sizes)))

    def head_logits(self, head_weight: torch.Tensor, head_bias: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Logits of the first level: the head's rows [C, D] and biases [C], features [N, D] -> [N, C + K]
        (the head's words, then the tombstones)."""
        if not self.cutoffs:
            return F.linear(features, head_weight, head_bias)
        weight = torch.cat([head_weight, self.tail_vectors])  # [C + K, D]
        bias = torch.cat([head_bias, self.tail_bias])  # [C + K]
        return F.linear(features, weight, bias)

    def target_log_probs(self, weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
        """Log-probability of each target: features [N, D], targets [N] -> [N].

        The head softmax runs over every token, with a tail word's target replaced by its
        cluster's tombstone; each tail cluster's softmax runs only over the tokens whose target
        is in it. Grouping them reads the clusters' token counts on the host, once per call
        (the adaptive softmax reads them once per cluster).
        """
        if not self.cutoffs:
            return -F.cross_entropy(F.linear(features, weight, bias), targets, reduction="none")
        cluster = torch.bucketize(targets, self.cutoff_tensor, right=True)  # [N], 0 = head, k = tail cluster k
        head_targets = torch.where(cluster > 0, self.head_size + cluster - 1, targets)  # tombstone k at C + k - 1
        clusters = self.clusters(weight, bias)
        out = -F.cross_entropy(self.head_logits(*clusters[0], features), head_targets, reduction="none")
        counts = torch.bincount(cluster, minlength=len(self.bounds) - 1).tolist()  # [K + 1] on the host
        groups = torch.argsort(cluster, stable=True).split(counts)  # token indices, cluster by cluster
        for index in range(1, len(self.bounds) - 1):
            rows = groups[index]  # [N_k]
            if rows.numel() == 0:
                continue
            logits = F.linear(features.index_select(0, rows), *clusters[index])  # [N_k, c_k+1 - c_k]
            within = targets.index_select(0, rows) - self.bounds[index]
            tail = -F.cross_entropy(logits, within, reduction="none")
            out = out.index_add(0, rows, tail)
        return out

    def loss(self, weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, targets: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
        """Negative log-likelihood of `targets` [N] under `features` [N, D], 'mean' or 'sum' over the tokens."""
        if not self.cutoffs:  # one cluster: the full softmax, computed as the model's full-softmax head does
            return F.cross_entropy(F.linear(features, weight, bias), targets, reduction=reduction)
        total = -self.target_log_probs(weight, bias, features, targets).sum()
        return total if reduction == "sum" else total / targets.numel()

    def log_probs(self, weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of every word: features [N, D] -> [N, V]."""
        clusters = self.clusters(weight, bias)
        head = F.log_softmax(self.head_logits(*clusters[0], features), dim=-1)  # [N, C + K]
        parts = [head[:, :self.head_size]]
        for index in range(1, len(self.bounds) - 1):
            tombstone = head[:, self.head_size + index - 1].unsqueeze(1)  # [N, 1]
            parts.append(tombstone + F.log_softmax(F.linear(features, *clusters[index]), dim=-1))
        return torch.cat(parts, dim=-1)


def split_target_log_probs_ref(weight: torch.Tensor, bias: torch.Tensor, tail_vectors: torch.Tensor | None,
                               tail_bias: torch.Tensor | None, features: torch.Tensor, targets: torch.Tensor,
                               cutoffs: list[int]) -> torch.Tensor:
    """Plain per-token reference of `SplitSoftmax.target_log_probs` (a Python loop; for tests).

    Args:
        weight, bias: the decoder, [V, D] and [V].
        tail_vectors, tail_bias: the tombstones, [K, D] and [K] (None when `cutoffs` is empty).
        features: [N, D]; targets: [N]; cutoffs: c_1 < ... < c_K.

    Returns:
        [N], each token's log p(target) in the dtype of `features`.
    """
    vocab_size = weight.size(0)
    bounds = [0, *cutoffs, vocab_size]
    out = []
    for x, target in zip(features, targets.tolist()):
        head_scores = [weight[word] @ x + bias[word] for word in range(bounds[1])]
        head_scores += [tail_vectors[k] @ x + tail_bias[k] for k in range(len(cutoffs))]
        head_normaliser = torch.logsumexp(torch.stack(head_scores), dim=0)
        cluster = sum(target >= cutoff for cutoff in cutoffs)
        if cluster == 0:
            out.append(head_scores[target] - head_normaliser)
            continue
        start, end = bounds[cluster], bounds[cluster + 1]
        tail_scores = torch.stack([weight[word] @ x + bias[word] for word in range(start, end)])
        tombstone = head_scores[bounds[1] + cluster - 1] - head_normaliser
        out.append(tombstone + tail_scores[target - start] - torch.logsumexp(tail_scores, dim=0))
    return torch.stack(out) if out else features.new_zeros(0)

