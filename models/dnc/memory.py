"""The DNC's dense memory (Graves et al. 2016, Nature, "Hybrid computing using a neural network with
dynamic external memory", Methods), behind the memory contract of the DNC/SAM/SDNC wrapper.

One step reads the interface vector from the controller output xi through the memory's own Linear
layer(s) and then, with `t-1` marking the state the step starts from:

    interface   k^r_i, beta^r_i = oneplus(.), k^w, beta^w = oneplus(.), e = sigmoid(.), v,
                f_i = sigmoid(.), g^a = sigmoid(.), g^w = sigmoid(.), pi_i = softmax(.) over 3 modes
    content     C(M, k, beta)[n] = softmax_n(beta * cos(k, M[n]))                    "content-based addressing"
    usage       psi = prod_i (1 - f_i w^r_{t-1,i});  u = (u_{t-1} + w^w_{t-1} - u_{t-1} w^w_{t-1}) psi
    allocation  phi = the cells in ascending order of usage;
                a[phi_j] = (1 - u[phi_j]) prod_{i<j} u[phi_i]                         "dynamic memory allocation"
    write       c^w = C(M_{t-1}, k^w, beta^w);  w^w = g^w (g^a a + (1 - g^a) c^w)
                M = M_{t-1} (1 - w^w e^T) + w^w v^T                                  "writing"
    links       L[i, j] = (1 - w^w_i - w^w_j) L_{t-1}[i, j] + w^w_i p_{t-1}[j],  L[i, i] = 0
                p = (1 - sum_i w^w_i) p_{t-1} + w^w                                  "temporal memory linkage"
    reads       f_i = L w^r_{t-1,i} (forward),  b_i = L^T w^r_{t-1,i} (backward),  c^r_i = C(M, k^r_i, beta^r_i)
                w^r_i = pi_i[0] b_i + pi_i[1] c^r_i + pi_i[2] f_i;  r_i = M^T w^r_i    "reading"

The read modes are ordered as in the paper: backward, content, forward. Two small constants keep the
maths finite, as in google-deepmind/dnc `addressing.py`: cosine similarity normalises each vector by
sqrt(|x|^2 + 1e-6), so an all-zero memory gives similarity 0 and uniform content weights; allocation
first maps usage to 1e-6 + (1 - 1e-6) u, so no factor of the cumulative product is exactly zero (the
order of cells, and the allocation up to ~1e-6, are unchanged). Ties in usage are broken by the lower
cell index first (a stable sort), so a fresh memory allocates cell 0 first.

Speed. Everything but the link matrix is O(B N (W + R)); the link update and the two temporal reads are
O(B N^2) and dominate at large N. They run in one `torch.autograd.Function`
(`link_update_and_temporal_reads`) whose forward and backward walk the [B, N, N] matrices once each, a
block of rows at a time so that the half-dozen elementwise operations and the skinny products of a block
run on data in the CPU cache (on other devices the block is the whole matrix), and allocate one
[B, N, N] tensor each (the new link matrix; the gradient of the old one). Autograd on the plain formula
(`link_update_and_temporal_reads_ref`, the specification it is tested against) saves an extra
[B, N, N] factor per step, makes about ten passes over such tensors in its backward, and made a whole
step about five times slower at N = 1,024 on one CPU thread. Fresh large tensors are slow to fault in
on Linux (about 20 ms for the 32 MiB link matrix of B = 8, N = 1,024): THP_MEM_ALLOC_ENABLE=1 in the
environment (PyTorch >= 2.2) lets PyTorch back them with huge pages, about five times faster.

Padding. With a mask, rows that are False get zero write weights for the memory, the link matrix and
the precedence (which leaves all three exactly unchanged) and keep their usage, write weights and read
weights; their read vectors are computed as usual and are to be ignored.

Shapes: `B` batch, `N` cells (nr_cells), `W` cell size, `R` read heads, `H` heads of a content lookup,
`X` the controller output size (input_size), `c` rows of a block of the link matrix.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from models.core import compiled

SIMILARITY_EPSILON = 1e-6  # added to squared norms in the cosine similarity (google-deepmind/dnc)
USAGE_EPSILON = 1e-6  # allocation sees eps + (1 - eps) u (google-deepmind/dnc)
LINK_BLOCK_BYTES = 1 << 19  # on CPU, the link matrix is processed in blocks of rows of about this size
STATE_KEYS = ("memory", "link_matrix", "precedence", "read_weights", "write_weights", "usage_vector")
READ_MODES = 3  # backward, content, forward


class Interface(NamedTuple):
    """The interface vector split into its parts, after their activations."""

    read_keys: Tensor  # [B, R, W]
    read_strengths: Tensor  # [B, R], >= 1
    write_key: Tensor  # [B, W]
    write_strength: Tensor  # [B], >= 1
    erase_vector: Tensor  # [B, W], in (0, 1)
    write_vector: Tensor  # [B, W]
    free_gates: Tensor  # [B, R], in (0, 1)
    allocation_gate: Tensor  # [B], in (0, 1)
    write_gate: Tensor  # [B], in (0, 1)
    read_modes: Tensor  # [B, R, 3], rows sum to 1: backward, content, forward


def oneplus(x: Tensor) -> Tensor:
    """1 + softplus(x): the strengths' activation, in [1, inf)."""
    return 1 + F.softplus(x)


def content_weighting(keys: Tensor, strengths: Tensor, memory: Tensor) -> Tensor:
    """Content-based addressing: softmax over cells of strength * cosine(key, cell).

    Args:
        keys: [B, H, W] lookup keys.
        strengths: [B, H] sharpening strengths (>= 1 from `oneplus`).
        memory: [B, N, W].

    Returns:
        [B, H, N] weights, each row sums to 1 (uniform where the memory or the key is all zeros).
    """
    dot = torch.bmm(keys, memory.transpose(1, 2))  # [B, H, W] x [B, W, N] -> [B, H, N]
    key_norms = torch.sqrt(keys.square().sum(-1) + SIMILARITY_EPSILON)  # [B, H]
    memory_norms = torch.sqrt(memory.square().sum(-1) + SIMILARITY_EPSILON)  # [B, N]
    similarity = dot / (key_norms.unsqueeze(-1) * memory_norms.unsqueeze(1))
    return torch.softmax(similarity * strengths.unsqueeze(-1), dim=-1)


def update_usage(usage: Tensor, write_weights: Tensor, read_weights: Tensor, free_gates: Tensor) -> Tensor:
    """u_t = (u_{t-1} + w^w_{t-1} - u_{t-1} w^w_{t-1}) psi, psi = prod_i (1 - f_i w^r_{t-1,i}).

    Args:
        usage: [B, N] u_{t-1}.
        write_weights: [B, N] w^w_{t-1}.
        read_weights: [B, R, N] w^r_{t-1}.
        free_gates: [B, R] f.

    Returns:
        [B, N] u_t.
    """
    retention = torch.prod(1 - free_gates.unsqueeze(-1) * read_weights, dim=1)  # psi: [B, N]
    return (usage + write_weights - usage * write_weights) * retention


def allocation_weighting(usage: Tensor) -> Tensor:
    """a[phi_j] = (1 - u[phi_j]) prod_{i<j} u[phi_i], phi = cells sorted by ascending (stabilised) usage.

    Args:
        usage: [B, N] u_t in [0, 1]; ties are taken lower cell index first.

    Returns:
        [B, N] allocation weights, summing to at most 1.
    """
    usage = USAGE_EPSILON + (1 - USAGE_EPSILON) * usage
    sorted_usage, order = torch.sort(usage, dim=-1, stable=True)  # [B, N] each
    # exclusive cumulative product: prod_{i<j} u[phi_i], 1 for j = 0
    exclusive_product = torch.cumprod(
        torch.cat([torch.ones_like(sorted_usage[:, :1]), sorted_usage[:, :-1]], dim=-1), dim=-1)
    sorted_allocation = (1 - sorted_usage) * exclusive_product  # [B, N] in sorted order
    return torch.zeros_like(sorted_allocation).scatter(-1, order, sorted_allocation)  # back to cell order


def write_weighting(allocation: Tensor, write_content: Tensor, allocation_gate: Tensor,
                    write_gate: Tensor) -> Tensor:
    """w^w = g^w (g^a a + (1 - g^a) c^w).

    Args:
        allocation: [B, N] a.
        write_content: [B, N] c^w.
        allocation_gate: [B] g^a.
        write_gate: [B] g^w.

    Returns:
        [B, N] w^w.
    """
    allocation_gate = allocation_gate.unsqueeze(-1)  # [B] -> [B, 1]
    return write_gate.unsqueeze(-1) * (allocation_gate * allocation + (1 - allocation_gate) * write_content)


def write_memory(memory: Tensor, write_weights: Tensor, erase_vector: Tensor, write_vector: Tensor) -> Tensor:
    """Erase then add: M_t = M_{t-1} (1 - w^w e^T) + w^w v^T.

    Args:
        memory: [B, N, W] M_{t-1}.
        write_weights: [B, N] w^w.
        erase_vector: [B, W] e.
        write_vector: [B, W] v.

    Returns:
        [B, N, W] M_t.
    """
    return WriteMemory.apply(memory, write_weights, erase_vector, write_vector)


class WriteMemory(torch.autograd.Function):
    """`write_memory` keeping for backward only its inputs (M_{t-1}, which the step's content lookup keeps
    anyway, and three vectors), not the [B, N, W] product (v^T - e^T * M) autograd would: that was a
    fifth of what a DNC step of 1,024 cells saves besides its link matrix. Gradients, with G = dM_t:

        dM_{t-1} = G (1 - w e^T),  dw = sum_W G (v^T - e^T * M),  de = -sum_N G * w * M,  dv = w^T G.
    """

    @staticmethod
    def forward(ctx: Any, memory: Tensor, write_weights: Tensor, erase_vector: Tensor, write_vector: Tensor) -> Tensor:
        ctx.save_for_backward(memory, write_weights, erase_vector, write_vector)
        # M (1 - w e^T) + w v^T rearranged as M + w (v^T - e^T * M): fewer [B, N, W] operations
        additions = write_vector.unsqueeze(1) - erase_vector.unsqueeze(1) * memory  # [B, N, W]
        return torch.addcmul(memory, write_weights.unsqueeze(-1), additions)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        memory, write_weights, erase_vector, write_vector = ctx.saved_tensors
        weights = write_weights.unsqueeze(-1)  # [B, N, 1]
        additions = write_vector.unsqueeze(1) - erase_vector.unsqueeze(1) * memory  # [B, N, W]
        grad_weights = (grad * additions).sum(-1)  # [B, N]
        weighted = grad * weights  # [B, N, W] G w
        grad_memory = grad - weighted * erase_vector.unsqueeze(1)  # G (1 - w e^T)
        grad_erase = -(weighted * memory).sum(1)  # [B, W]
        grad_write = weighted.sum(1)  # [B, W]
        return grad_memory, grad_weights, grad_erase, grad_write


def update_precedence(precedence: Tensor, write_weights: Tensor) -> Tensor:
    """p_t = (1 - sum_i w^w_i) p_{t-1} + w^w.

    Args:
        precedence: [B, N] p_{t-1}.
        write_weights: [B, N] w^w.

    Returns:
        [B, N] p_t.
    """
    return (1 - write_weights.sum(-1, keepdim=True)) * precedence + write_weights


def read_weighting(backward: Tensor, content: Tensor, forward: Tensor, read_modes: Tensor) -> Tensor:
    """w^r_i = pi_i[0] b_i + pi_i[1] c^r_i + pi_i[2] f_i.

    Args:
        backward: [B, R, N] b.
        content: [B, R, N] c^r.
        forward: [B, R, N] f.
        read_modes: [B, R, 3] pi (backward, content, forward).

    Returns:
        [B, R, N] w^r.
    """
    backward_mode, content_mode, forward_mode = read_modes.unsqueeze(-1).unbind(2)  # 3 x [B, R, 1]
    return backward_mode * backward + content_mode * content + forward_mode * forward


def link_update_and_temporal_reads_ref(
    link: Tensor, write_weights: Tensor, precedence: Tensor, read_weights: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The link matrix update and the temporal reads, written as the formulas (the specification).

    Args:
        link: [B, N, N] L_{t-1} (zero diagonal).
        write_weights: [B, N] w^w_t.
        precedence: [B, N] p_{t-1}.
        read_weights: [B, R, N] w^r_{t-1}.

    Returns:
        link: [B, N, N] L_t[i, j] = (1 - w^w_i - w^w_j) L_{t-1}[i, j] + w^w_i p_{t-1}[j], zero diagonal.
        forward: [B, R, N] f_i = L_t w^r_{t-1,i}.
        backward: [B, R, N] b_i = L_t^T w^r_{t-1,i}.
    """
    scale = 1 - write_weights.unsqueeze(2) - write_weights.unsqueeze(1)  # [B, N, N]
    new_link = scale * link + write_weights.unsqueeze(2) * precedence.unsqueeze(1)
    off_diagonal = 1 - torch.eye(link.size(-1), dtype=link.dtype, device=link.device)  # [N, N]
    new_link = new_link * off_diagonal
    forward = torch.bmm(read_weights, new_link.transpose(1, 2))  # [B, R, N] x [B, N, N]^T -> [B, R, N]
    backward = torch.bmm(read_weights, new_link)  # [B, R, N] x [B, N, N] -> [B, R, N]
    return new_link, forward, backward


def _row_blocks(link: Tensor) -> list[slice]:
    """Blocks of rows of [B, N, N] to process at once: cache-sized on CPU, the whole matrix elsewhere."""
    batch, cells = link.shape[0], link.shape[1]
    if link.device.type == "cpu":
        rows = max(1, LINK_BLOCK_BYTES // (batch * cells * link.element_size()))
    else:
        rows = cells
    return [slice(start, min(start + rows, cells)) for start in range(0, cells, rows)]


def _link_rows(out: Tensor, link_rows: Tensor, keep_rows: Tensor, columns_weights: Tensor, write_rows: Tensor,
               precedence_row: Tensor, start: int) -> Tensor:
    """Rows of L_t from the same rows of L_{t-1}, into `out` [B, c, N]: (1 - w_i - w_j) L[i, j] + w_i p_j, zero
    diagonal. The forward pass, the backward pass and `LinkTape`'s replay all make L_t here, with the same
    operations in the same order, so a replayed matrix equals the forward's bit for bit.

    Args:
        link_rows: [B, c, N] rows start .. start + c - 1 of L_{t-1}; keep_rows: [B, c] their 1 - w;
        columns_weights: [B, 1, N] w; write_rows: [B, c] their w; precedence_row: [B, 1, N] p_{t-1}.
    """
    torch.mul(link_rows, keep_rows.unsqueeze(-1), out=out)  # (1 - w_i) L[i, j]
    out.addcmul_(link_rows, columns_weights, value=-1)  # - w_j L[i, j]
    out.addcmul_(write_rows.unsqueeze(-1), precedence_row)  # + w_i p_j
    out.diagonal(offset=start, dim1=1, dim2=2).zero_()  # L[i, i] = 0
    return out


class LinkTape:
    """The link matrices of one run of steps, for their backward: one kept every `every` steps, the rest replayed.

    The backward of step t needs L_{t-1}. Saving it keeps one [B, N, N] matrix per step alive until
    backward (32 MiB per step for B = 8, N = 1,024). The update L_{t-1} -> L_t needs only that step's write
    weights and precedence ([B, N] each), so the tape keeps those for every step, the matrices of steps
    0, every, 2 every, ... (the first is the state's own), and replays the others when backward asks for
    them, in place in one working matrix: step t's matrix costs t mod `every` updates (elementwise, no
    temporal reads). Backward walks the steps in reverse, so each replay starts from a kept matrix.

    The tape also lets the backward write dL_{t-1} over dL_t (`reusable`): the gradient reaching L_t is,
    inside a run, the one the step after handed back, which nothing else holds.

    Used by `DenseMemory` when a run passes `link_snapshots_every` to `begin` (the DNC's automatic
    setting from 256 cells, see `models.dnc.dnc`); not inside `torch.utils.checkpoint` segments, which
    would keep the tape's matrices alive with the graph they discard.
    """

    def __init__(self, every: int):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"LinkTape: every must be a positive number of steps, got {every!r}")
        self.every = every
        self.kept: dict[int, Tensor] = {}  # step -> L_{step-1}, the link matrix that step starts from
        self.updates: list[tuple[Tensor, Tensor]] = []  # per step: (w^w_t, p_{t-1}) as the update used them
        self.working: Tensor | None = None  # [B, N, N] the replayed matrix
        self.working_step = -1  # the step whose starting matrix `working` holds
        self.handed_back: weakref.ref | None = None  # the gradient of L_{t-1} the latest backward returned

    def record(self, link: Tensor, write_weights: Tensor, precedence: Tensor) -> int:
        """Note a step starting from `link` with these weights; returns the step's number."""
        step = len(self.updates)
        if step % self.every == 0:
            self.kept[step] = link.detach()
        self.updates.append((write_weights.detach(), precedence.detach()))
        return step

    def link(self, step: int) -> Tensor:
        """L_{step-1}, the matrix `step` started from: kept, or replayed from the last kept one. The
        replayed matrix is overwritten by the next call."""
        if step in self.kept:
            return self.kept[step]
        start = step - step % self.every
        if not start < self.working_step <= step:
            source = self.kept[start]
            if self.working is None:
                self.working = torch.empty_like(source, memory_format=torch.contiguous_format)
            self.working.copy_(source)
            self.working_step = start
        while self.working_step < step:
            _update_link_in_place(self.working, *self.updates[self.working_step])
            self.working_step += 1
        return self.working

    def reusable(self, gradient: Tensor | None) -> bool:
        """Whether `gradient` is the very tensor the latest backward handed back (so it may be written over).
        By identity, through a weak reference: an address could be a new tensor's in a later backward pass."""
        return (gradient is not None and self.handed_back is not None and gradient is self.handed_back()
                and gradient.is_contiguous())


def _update_link_in_place(link: Tensor, write_weights: Tensor, precedence: Tensor) -> None:
    """L_{t-1} -> L_t in place ([B, N, N] contiguous), a block of rows at a time through a block-sized buffer."""
    keep = 1 - write_weights  # [B, N]
    columns_weights = write_weights.unsqueeze(1)  # [B, 1, N]
    precedence_row = precedence.unsqueeze(1)  # [B, 1, N]
    blocks = _row_blocks(link)
    scratch = link.new_empty(link.size(0), blocks[0].stop - blocks[0].start, link.size(2))
    for rows in blocks:
        out = scratch[:, :rows.stop - rows.start]
        _link_rows(out, link[:, rows], keep[:, rows], columns_weights, write_weights[:, rows], precedence_row,
                   rows.start)
        link[:, rows] = out


class LinkUpdateAndTemporalReads(torch.autograd.Function):
    """`link_update_and_temporal_reads_ref` with a hand-written backward, one block of rows at a time.

    Gradients, with G the gradient reaching L_t (from the later steps, plus dF^T w^r + (w^r)^T dB from
    the reads, and zero on the diagonal, which is a constant):

        dL_{t-1} = G (1 - w_i - w_j),   dp_j = sum_i G[i, j] w_i,
        dw_m = sum_j G[m, j] (p_j - L_{t-1}[m, j]) - sum_i G[i, m] L_{t-1}[i, m],
        dw^r_k = dF_k L_t + dB_k L_t^T.

    Only L_{t-1} is kept for backward (or, with a `LinkTape`, not even that): the backward remakes each
    block of L_t from it, which costs less than keeping L_t, the last matrix of a run or of a
    checkpointed segment, alive until then.
    """

    @staticmethod
    def forward(ctx: Any, link: Tensor, write_weights: Tensor, precedence: Tensor,
                read_weights: Tensor, tape: LinkTape | None = None) -> tuple[Tensor, Tensor, Tensor]:
        # In the link's dtype whatever autocast is on: the in-place products below take no autocast, and a
        # compiled step traces the backward under the forward's autocast (bf16 products met fp32 buffers).
        with torch.autocast(link.device.type, enabled=False):
            return LinkUpdateAndTemporalReads._forward(ctx, link, write_weights.to(link.dtype),
                                                       precedence.to(link.dtype), read_weights.to(link.dtype), tape)

    @staticmethod
    def _forward(ctx: Any, link: Tensor, write_weights: Tensor, precedence: Tensor,
                 read_weights: Tensor, tape: LinkTape | None) -> tuple[Tensor, Tensor, Tensor]:
        new_link = torch.empty_like(link, memory_format=torch.contiguous_format)  # [B, N, N]
        forward = torch.empty_like(read_weights, memory_format=torch.contiguous_format)  # [B, R, N]
        backward = torch.zeros_like(forward)  # [B, R, N], accumulated over blocks
        keep = 1 - write_weights  # [B, N]
        columns_weights = write_weights.unsqueeze(1)  # [B, 1, N]
        precedence_row = precedence.unsqueeze(1)  # [B, 1, N]
        for rows in _row_blocks(link):
            block = _link_rows(new_link[:, rows], link[:, rows], keep[:, rows], columns_weights,
                               write_weights[:, rows], precedence_row, rows.start)  # [B, c, N] view
            # forward[k, i] = sum_j L[i, j] r[k, j]: [B, c, N] x [B, N, R] -> [B, c, R] -> [B, R, c]
            forward[:, :, rows] = torch.bmm(block, read_weights.transpose(1, 2)).transpose(1, 2)
            # backward[k, j] += sum_{i in block} r[k, i] L[i, j]: [B, R, c] x [B, c, N] -> [B, R, N]
            backward.baddbmm_(read_weights[:, :, rows], block)
        ctx.set_materialize_grads(False)
        ctx.tape = tape
        if tape is None:
            ctx.save_for_backward(write_weights, precedence, read_weights, link)
        else:
            ctx.step = tape.record(link, write_weights, precedence)
            ctx.save_for_backward(write_weights, precedence, read_weights)
        return new_link, forward, backward

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_link: Tensor | None, grad_forward: Tensor | None,
                 grad_backward: Tensor | None) -> tuple[Tensor | None, Tensor, Tensor, Tensor, None]:
        saved = ctx.saved_tensors  # once: checkpointing allows one unpacking
        write_weights, precedence, read_weights = saved[:3]
        link = saved[3] if ctx.tape is None else ctx.tape.link(ctx.step)
        with torch.autocast(link.device.type, enabled=False):
            grads = [None if grad is None else grad.to(link.dtype) for grad in (grad_link, grad_forward,
                                                                                grad_backward)]
            overwrite = ctx.tape is not None and ctx.tape.reusable(grads[0])
            result = LinkUpdateAndTemporalReads._backward(link, write_weights, precedence, read_weights, *grads,
                                                          need_link_grad=ctx.needs_input_grad[0],
                                                          overwrite=overwrite)
        if ctx.tape is not None:
            ctx.tape.handed_back = None if result[0] is None else weakref.ref(result[0])
        return (*result, None)

    @staticmethod
    def _backward(link: Tensor, write_weights: Tensor, precedence: Tensor, read_weights: Tensor,
                  grad_link: Tensor | None, grad_forward: Tensor | None, grad_backward: Tensor | None,
                  need_link_grad: bool = True, overwrite: bool = False) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
        """The gradients (see the class docstring); dL_{t-1} is None unless `need_link_grad`, and written over
        `grad_link` when `overwrite` (each block of G is made before its rows of dL_{t-1} are written)."""
        if grad_forward is None:
            grad_forward = torch.zeros_like(read_weights)
        if grad_backward is None:
            grad_backward = torch.zeros_like(read_weights)
        # Both reads' contributions to G in one product: dF^T r + r^T dB = [dF; r]^T [r; dB].
        left = torch.cat([grad_forward, read_weights], dim=1).transpose(1, 2).contiguous()  # [B, N, 2R]
        right = torch.cat([read_weights, grad_backward], dim=1)  # [B, 2R, N]
        grad_previous_link = None
        if need_link_grad:  # [B, N, N]
            grad_previous_link = (grad_link if overwrite else
                                  torch.empty_like(link, memory_format=torch.contiguous_format))
        grad_write = torch.zeros_like(write_weights)  # [B, N]
        grad_precedence = torch.zeros_like(precedence).unsqueeze(1)  # [B, 1, N]
        grad_read = torch.zeros_like(read_weights)  # [B, R, N]
        keep = 1 - write_weights  # [B, N]
        columns_weights = write_weights.unsqueeze(1)  # [B, 1, N]
        precedence_row = precedence.unsqueeze(1)  # [B, 1, N]
        blocks = _row_blocks(link)
        new_rows = link.new_empty(link.size(0), blocks[0].stop - blocks[0].start, link.size(2))  # a block of L_t
        # Products with one vector are written vector-first ([B, 1, c] x [B, c, N]) or with the block first and
        # the vectors transposed: both take the fast paths of CPU BLAS, unlike [B, c, N] x [B, N, 1].
        for rows in blocks:
            if grad_link is None:
                gradient = torch.bmm(left[:, rows], right)  # G block: [B, c, 2R] x [B, 2R, N] -> [B, c, N]
            else:
                gradient = torch.baddbmm(grad_link[:, rows], left[:, rows], right)
            gradient.diagonal(offset=rows.start, dim1=1, dim2=2).zero_()
            new_block = _link_rows(new_rows[:, :rows.stop - rows.start], link[:, rows], keep[:, rows],
                                   columns_weights, write_weights[:, rows], precedence_row, rows.start)  # [B, c, N]
            grad_read.baddbmm_(grad_forward[:, :, rows], new_block)  # dF_k L_t: [B, R, c] x [B, c, N]
            # dB_k L_t^T: [B, c, N] x [B, N, R] -> [B, c, R] -> [B, R, c]
            grad_read[:, :, rows] += torch.bmm(new_block, grad_backward.transpose(1, 2)).transpose(1, 2)
            grad_precedence.baddbmm_(write_weights[:, rows].unsqueeze(1), gradient)  # [B, 1, c] x [B, c, N]
            weighted = gradient * link[:, rows]  # G[i, j] L_{t-1}[i, j]: [B, c, N]
            grad_write -= weighted.sum(1)  # column part
            # row part: sum_j G[i, j] p_j, [B, 1, N] x [B, N, c] -> [B, 1, c], minus sum_j G[i, j] L[i, j]
            grad_write[:, rows] += torch.bmm(precedence_row, gradient.transpose(1, 2)).squeeze(1) - weighted.sum(-1)
            if grad_previous_link is not None:
                block = grad_previous_link[:, rows]
                torch.mul(gradient, keep[:, rows].unsqueeze(-1), out=block)
                block.addcmul_(gradient, columns_weights, value=-1)
        return grad_previous_link, grad_write, grad_precedence.squeeze(1), grad_read


def link_update_and_temporal_reads(
    link: Tensor, write_weights: Tensor, precedence: Tensor, read_weights: Tensor, tape: LinkTape | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The same as `link_update_and_temporal_reads_ref`, fast (see the module docstring); any device. With a
    `tape`, L_{t-1} is not kept for backward but replayed from the tape's kept matrices."""
    return LinkUpdateAndTemporalReads.apply(link, write_weights, precedence, read_weights, tape)


@dataclasses.dataclass
class DenseMemoryContext:
    """The state between `begin` and `end`: fresh tensors replace the entries at every step."""

    state: dict[str, Tensor]
    tape: LinkTape | None = None  # keeps the link matrices for backward when set (`begin`)


def _with_link(state: dict[str, Tensor], link: Tensor) -> dict[str, Tensor]:
    """`state` plus the link matrix, keys in `STATE_KEYS` order."""
    return {key: link if key == "link_matrix" else state[key] for key in STATE_KEYS}


class _Written(NamedTuple):
    """What the write half of a step hands the read half (`DenseMemory._write_step`)."""

    interface: Interface
    memory: Tensor  # [B, N, W] M_t
    usage: Tensor  # [B, N]
    write_weights: Tensor  # [B, N] w^w_t
    applied_write: Tensor  # [B, N] w^w_t, zero on padding rows


class DenseMemory(nn.Module):
    """The DNC memory: N cells of width W, R read heads, one write head (see the module docstring).

    Args:
        input_size: X, the width of the controller output xi the interface is read from.
        nr_cells: N, memory cells.
        cell_size: W, the width of a cell.
        read_heads: R.
        independent_linears: one Linear per interface part (True) or one Linear split into the parts.

    Raises:
        ValueError: if a size is not a positive integer.
    """

    def __init__(self, input_size: int, nr_cells: int, cell_size: int, read_heads: int,
                 independent_linears: bool = False):
        super().__init__()
        for name, value in (("input_size", input_size), ("nr_cells", nr_cells), ("cell_size", cell_size),
                            ("read_heads", read_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DenseMemory: {name} must be a positive integer, got {value!r}")
        self.input_size = input_size
        self.nr_cells = nr_cells
        self.cell_size = cell_size
        self.read_heads = read_heads
        self.independent_linears = bool(independent_linears)
        self.read_size = read_heads * cell_size
        self.compile_step = False  # `step` through torch.compile (`MemoryController.compile_steps`)
        self.interface_sizes = {  # the interface parts, in the order of the split Linear's outputs
            "read_keys": read_heads * cell_size, "read_strengths": read_heads,
            "write_key": cell_size, "write_strength": 1, "erase_vector": cell_size, "write_vector": cell_size,
            "free_gates": read_heads, "allocation_gate": 1, "write_gate": 1, "read_modes": READ_MODES * read_heads,
        }
        self.interface_size = sum(self.interface_sizes.values())  # W R + 3 W + 5 R + 3, as in the paper
        if self.independent_linears:
            self.interface_layers = nn.ModuleDict(
                {name: nn.Linear(input_size, size) for name, size in self.interface_sizes.items()})
        else:
            self.interface_layer = nn.Linear(input_size, self.interface_size)

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, nr_cells={self.nr_cells}, cell_size={self.cell_size}, "
                f"read_heads={self.read_heads}, independent_linears={self.independent_linears}")

    def interface(self, xi: Tensor) -> Interface:
        """xi [B, X] -> the interface parts, activated (shapes in `Interface`)."""
        if self.independent_linears:
            parts = {name: layer(xi) for name, layer in self.interface_layers.items()}
        else:
            parts = dict(zip(self.interface_sizes, torch.split(self.interface_layer(xi),
                                                               list(self.interface_sizes.values()), dim=-1)))
        batch = xi.size(0)
        return Interface(
            read_keys=parts["read_keys"].view(batch, self.read_heads, self.cell_size),  # [B, R W] -> [B, R, W]
            read_strengths=oneplus(parts["read_strengths"]),
            write_key=parts["write_key"],
            write_strength=oneplus(parts["write_strength"]).squeeze(-1),
            erase_vector=torch.sigmoid(parts["erase_vector"]),
            write_vector=parts["write_vector"],
            free_gates=torch.sigmoid(parts["free_gates"]),
            allocation_gate=torch.sigmoid(parts["allocation_gate"]).squeeze(-1),
            write_gate=torch.sigmoid(parts["write_gate"]).squeeze(-1),
            # [B, 3 R] -> [B, R, 3], softmax over the modes of each head
            read_modes=torch.softmax(parts["read_modes"].view(batch, self.read_heads, READ_MODES), dim=-1),
        )

    def initial_state(self, batch_size: int, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """An empty memory: every tensor zero, batch first, keys in `STATE_KEYS` order (shapes below)."""
        cells, width, heads = self.nr_cells, self.cell_size, self.read_heads

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(batch_size, *shape, device=device, dtype=dtype)

        return {
            "memory": zeros(cells, width),  # [B, N, W]
            # [B, N, N], a broadcast view of one zero: a fresh memory's N^2 links cost nothing until its first
            # step makes them (written in place it fails; put a new tensor in the dict instead)
            "link_matrix": torch.zeros((), device=device, dtype=dtype).expand(batch_size, cells, cells),
            "precedence": zeros(cells),  # [B, N]
            "read_weights": zeros(heads, cells),  # [B, R, N]
            "write_weights": zeros(cells),  # [B, N]
            "usage_vector": zeros(cells),  # [B, N]
        }

    def begin(self, state: dict[str, Tensor], link_snapshots_every: int = 0) -> DenseMemoryContext:
        """Start a run of steps from `state` (as made by `initial_state` or `end`); the tensors are not modified.

        Args:
            link_snapshots_every: 0 keeps each step's link matrix for backward (autograd's way); k > 0 keeps
                one every k steps on a `LinkTape` and replays the others in backward (less memory, more time;
                not inside a `torch.utils.checkpoint` segment).

        Raises:
            ValueError: if a state tensor is missing or the memory does not have this module's [N, W].
        """
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"DenseMemory state lacks {missing}; start from memory.initial_state(batch_size)")
        memory = state["memory"]
        if memory.dim() != 3 or memory.shape[1:] != (self.nr_cells, self.cell_size):
            raise ValueError(f"DenseMemory state memory must be [B, {self.nr_cells}, {self.cell_size}] "
                             f"(nr_cells, cell_size), got {tuple(memory.shape)}; was it made by another memory?")
        tape = LinkTape(link_snapshots_every) if link_snapshots_every else None
        return DenseMemoryContext(state={key: state[key] for key in STATE_KEYS}, tape=tape)

    def step(self, ctx: DenseMemoryContext, xi: Tensor, mask: Tensor | None = None) -> Tensor:
        """One write and read: xi [B, X] -> read vectors [B, R * W] (head-major).

        Args:
            ctx: from `begin`; its state is replaced by the new one.
            xi: [B, X] controller output.
            mask: [B] bool or None; False rows are padding and leave their state unchanged.

        Raises:
            ValueError: if xi or mask has the wrong shape.
        """
        state = ctx.state
        batch = state["memory"].size(0)
        if xi.dim() != 2 or xi.shape != (batch, self.input_size):
            raise ValueError(f"DenseMemory.step: xi must be [B, input_size] = [{batch}, {self.input_size}], "
                             f"got {tuple(xi.shape)}")
        if mask is not None and (mask.shape != (batch,) or mask.dtype != torch.bool):
            raise ValueError(f"DenseMemory.step: mask must be a bool tensor of shape [{batch}], "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if ctx.tape is None:
            ctx.state, reads = compiled(self, "step", self._step)(state, xi, mask)
            return reads
        # The tape is Python state the compiled graphs cannot hold: the link update runs between them.
        written = compiled(self, "write_step", self._write_step)(state, xi, mask)
        link, forward_weights, backward_weights = link_update_and_temporal_reads(
            state["link_matrix"], written.applied_write, state["precedence"], state["read_weights"], ctx.tape)
        new_state, reads = compiled(self, "read_step", self._read_step)(state, written, forward_weights,
                                                                         backward_weights, mask)
        ctx.state = _with_link(new_state, link)
        return reads

    def _step(self, state: dict[str, Tensor], xi: Tensor, mask: Tensor | None) -> tuple[dict[str, Tensor], Tensor]:
        """`step` on the state dict: (new state, read vectors [B, R * W]). A function of its own, so that
        `compile_steps` can compile it (the link update stays the hand-written autograd function: with
        the formulas instead, the compiled step saved [B, N, N] products and ran 3.8x slower at 1,024
        cells on the CPU)."""
        written = self._write_step(state, xi, mask)
        link, forward_weights, backward_weights = link_update_and_temporal_reads(
            state["link_matrix"], written.applied_write, state["precedence"], state["read_weights"])
        new_state, reads = self._read_step(state, written, forward_weights, backward_weights, mask)
        return _with_link(new_state, link), reads

    def _write_step(self, state: dict[str, Tensor], xi: Tensor, mask: Tensor | None) -> _Written:
        """The step up to the link update: interface, usage, write weights, the memory write."""
        interface = self.interface(xi)
        memory = state["memory"]
        usage = update_usage(state["usage_vector"], state["write_weights"], state["read_weights"],
                             interface.free_gates)
        write_content = content_weighting(interface.write_key.unsqueeze(1), interface.write_strength.unsqueeze(1),
                                          memory).squeeze(1)  # [B, 1, N] -> [B, N]
        write_weights = write_weighting(allocation_weighting(usage), write_content, interface.allocation_gate,
                                        interface.write_gate)
        # Padding rows write nothing: memory, links and precedence then stay exactly as they were.
        applied_write = write_weights if mask is None else write_weights * mask.unsqueeze(-1).to(write_weights.dtype)
        memory = write_memory(memory, applied_write, interface.erase_vector, interface.write_vector)
        return _Written(interface, memory, usage, write_weights, applied_write)

    def _read_step(self, state: dict[str, Tensor], written: _Written, forward_weights: Tensor,
                   backward_weights: Tensor, mask: Tensor | None) -> tuple[dict[str, Tensor], Tensor]:
        """The step after the link update: precedence, read weights, reads. The new state lacks the link
        matrix (`_with_link` adds it)."""
        interface, memory = written.interface, written.memory
        usage, write_weights = written.usage, written.write_weights
        batch = memory.size(0)
        precedence = update_precedence(state["precedence"], written.applied_write)
        read_content = content_weighting(interface.read_keys, interface.read_strengths, memory)  # [B, R, N]
        read_weights = read_weighting(backward_weights, read_content, forward_weights, interface.read_modes)
        reads = torch.bmm(read_weights, memory)  # [B, R, N] x [B, N, W] -> [B, R, W]
        if mask is not None:
            keep_rows = mask.view(batch, 1)  # [B] -> [B, 1]
            usage = torch.where(keep_rows, usage, state["usage_vector"])
            write_weights = torch.where(keep_rows, write_weights, state["write_weights"])
            read_weights = torch.where(keep_rows.unsqueeze(-1), read_weights, state["read_weights"])
        new_state = {"memory": memory, "precedence": precedence, "read_weights": read_weights,
                     "write_weights": write_weights, "usage_vector": usage}
        return new_state, reads.reshape(batch, self.read_size)  # [B, R, W] -> [B, R W]

    def end(self, ctx: DenseMemoryContext) -> dict[str, Tensor]:
        """The state after the steps (a new dict; keys and shapes as `initial_state`)."""
        return dict(ctx.state)

    def debug_view(self, ctx: DenseMemoryContext) -> dict[str, Tensor]:
        """Batch element 0 of the state after the latest step, detached: the DNC's debug keys."""
        return {key: tensor[0].detach() for key, tensor in ctx.state.items()}
