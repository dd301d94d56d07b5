"""Relational Memory Core (Santoro et al. 2018, "Relational recurrent neural networks").

Behaves like DeepMind Sonnet v1's `sonnet/python/modules/relational_memory.py` (the upstream
of the L0SG port). At every step the memory attends over itself and the projected input:

    u_t   = W_x x_t + b_x                                   input projection (R rows of size d)
    Z     = [M_{t-1}; u_t]                                  (N + R) x d
    per block b = 1..nb (qkv linear and both LayerNorms per block, the MLP shared by all):
      P   = LN_qkv(Z W_qkv + b_qkv)                         row-wise LN, head-major [q_j | k_j | v_j]
      A_j = softmax(Q_j K_j^T / sqrt(k)) V_j                no output projection
      Z   = LN_1(Z + [A_1 ... A_H])
      Z   = LN_2(Z + MLP(Z))                                L layers d -> d, ReLU between layers
    M~    = Z[:N]                                           drop the input rows
    [i; f] = W_gx vec(u_t) + b_gx + W_gm tanh(M_{t-1}) + b_gm
    M_t   = sigmoid(i + input_bias) * tanh(M~) + sigmoid(f + forget_bias) * M_{t-1}
    y_t   = vec(M_t)

(`gate_style=None` skips the gates: M_t = M~.) The initial memory is the identity, padded
with zeros or truncated to d columns, and is not trainable.

Two implementations read the same parameters:

- 'reference' (`RMCCore._forward_ref`): a per-step loop written straight from the equations,
  kept as the specification.
- 'fast' (`RMCCore._forward_fast`, the default): the same maths with the per-step work cut down.
  Everything that depends on the input only is computed for all T steps in one matmul each (the
  input projection, the first block's LN(qkv) of the input rows, and the input-side gate term
  with both gate biases and the constant input/forget biases folded in). In the last block only
  the N memory rows are updated: the input rows serve as keys and values, but their query,
  attention output, LayerNorms and MLP would be dropped, so they are never computed. With one
  block (the language-model setting) the per-step work is thus one qkv matmul, one attention,
  the MLP and one gate matmul on N rows instead of N + 1.

Shapes: `T` time steps, `B` batch, `D` input size per row, `R` input rows per step, `N` memory
slots, `H` heads, `h` head size, `k` key size, `d = H * h` memory width, `P = H * (2k + h)`
the qkv width, `G` gate size (d for 'unit', 1 for 'memory').
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.core import Core, add_argument_once, compiled, register_core

GATE_STYLES = ("unit", "memory", None)
IMPLEMENTATIONS = ("fast", "reference")
LAYER_NORM_EPS = 1e-5


class RMCState(NamedTuple):
    """State of a relational memory core. `memory`: [B, N, d]."""

    memory: torch.Tensor


@dataclasses.dataclass
class RMCConfig:
    """Configuration of a relational memory core (Sonnet's arguments, plus this repository's).

    `input_size` is the width of one input row. Without `treat_input_as_matrix` the input is
    [T, B, input_size] (one row per step, R = 1). With it, a step holds `input_rows` rows of
    `input_size` features each, given as [T, B, input_rows * input_size] (split into rows) or as
    [T, B, input_rows, input_size]; every row is projected by the same linear map and attended
    over, and the input gate term reads all projected rows flattened (Sonnet's `BatchFlatten`).
    """

    input_size: int
    mem_slots: int
    head_size: int
    num_heads: int = 1
    num_blocks: int = 1
    forget_bias: float = 1.0
    input_bias: float = 0.0
    gate_style: str | None = "unit"  # 'unit' | 'memory' | None
    attention_mlp_layers: int = 2
    key_size: int | None = None  # None: head_size
    treat_input_as_matrix: bool = False
    input_rows: int = 1  # R, only with treat_input_as_matrix
    batch_first: bool = False
    trainable_biases: bool = False  # learn forget_bias / input_bias (the L0SG port does; Sonnet does not)
    implementation: str = "fast"  # 'fast' | 'reference'

    def __post_init__(self) -> None:
        for name in ("input_size", "mem_slots", "head_size", "num_heads", "num_blocks",
                     "attention_mlp_layers", "input_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.key_size is not None and (isinstance(self.key_size, bool) or not isinstance(self.key_size, int)
                                          or self.key_size < 1):
            raise ValueError(f"key_size must be a positive integer or None, got {self.key_size!r}")
        if self.gate_style not in GATE_STYLES:
            raise ValueError(f"gate_style must be one of 'unit', 'memory', None, got {self.gate_style!r}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be 'fast' or 'reference', got {self.implementation!r}")
        for name in ("forget_bias", "input_bias"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.input_rows != 1 and not self.treat_input_as_matrix:
            raise ValueError(f"input_rows={self.input_rows} needs treat_input_as_matrix=True")

    @property
    def mem_size(self) -> int:
        """d = num_heads * head_size, the width of a memory row."""
        return self.num_heads * self.head_size

    @property
    def resolved_key_size(self) -> int:
        return self.head_size if self.key_size is None else self.key_size

    @property
    def gate_size(self) -> int:
        """G: d per unit, 1 per memory row, 0 without gates."""
        return {"unit": self.mem_size, "memory": 1, None: 0}[self.gate_style]


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """Sonnet's Linear initialisation: truncated normal with std 1/sqrt(fan_in) (cut at 2 std), zero bias."""
    layer = nn.Linear(in_features, out_features)
    std = 1.0 / math.sqrt(in_features)
    nn.init.trunc_normal_(layer.weight, std=std, a=-2.0 * std, b=2.0 * std)
    nn.init.zeros_(layer.bias)
    return layer


class RMCBlock(nn.Module):
    """The per-block parameters: the qkv projection, its LayerNorm and the two residual LayerNorms."""

    def __init__(self, mem_size: int, qkv_size: int):
        super().__init__()
        self.qkv = _linear(mem_size, qkv_size)
        self.qkv_norm = nn.LayerNorm(qkv_size, eps=LAYER_NORM_EPS)
        self.attention_norm = nn.LayerNorm(mem_size, eps=LAYER_NORM_EPS)
        self.mlp_norm = nn.LayerNorm(mem_size, eps=LAYER_NORM_EPS)


@register_core("RMC")
class RMCCore(Core):
    """Relational memory core behind the core contract: `y, RMCState(memory) = core(x, state)`.

    x [T, B, R * D] ([B, T, ...] with batch_first) -> y [T, B, N * d]; `state.memory` [B, N, d].

    Parameters: `input_projector`, `blocks.{b}.qkv` / `.qkv_norm` / `.attention_norm` / `.mlp_norm`
    (one set per block), `mlp.{l}` (L distinct layers shared by all blocks, as in Sonnet), and
    with gates `input_gate_projector` (R * d -> 2G) and `memory_gate_projector` (d -> 2G); with
    `trainable_biases` also the scalars `forget_bias` and `input_bias`.
    """

    Config = RMCConfig

    def __init__(self, config: RMCConfig):
        super().__init__(config)
        d = config.mem_size
        self.mem_slots = config.mem_slots
        self.num_heads = config.num_heads
        self.head_size = config.head_size
        self.key_size = config.resolved_key_size
        self.mem_size = d
        self.input_rows = config.input_rows if config.treat_input_as_matrix else 1
        head_qkv_size = 2 * self.key_size + self.head_size
        self.input_projector = _linear(config.input_size, d)
        self.blocks = nn.ModuleList(RMCBlock(d, config.num_heads * head_qkv_size) for _ in range(config.num_blocks))
        # Sonnet builds the MLP once, outside the block loop: all blocks share it. Its layers are distinct.
        self.mlp = nn.ModuleList(_linear(d, d) for _ in range(config.attention_mlp_layers))
        gate_size = config.gate_size
        if gate_size:
            self.input_gate_projector = _linear(self.input_rows * d, 2 * gate_size)
            self.memory_gate_projector = _linear(d, 2 * gate_size)
        else:
            self.input_gate_projector = None
            self.memory_gate_projector = None
        if config.trainable_biases:
            self.forget_bias = nn.Parameter(torch.tensor(float(config.forget_bias)))
            self.input_bias = nn.Parameter(torch.tensor(float(config.input_bias)))
        else:  # constants, as in Sonnet
            self.forget_bias = float(config.forget_bias)
            self.input_bias = float(config.input_bias)
        self.compile_step = False  # the fast path's step through torch.compile (`compile_steps`)

    def compile_steps(self) -> bool:
        """The fast path's per-step function through `torch.compile` (the reference stays eager)."""
        self.compile_step = self.config.implementation == "fast"
        return self.compile_step

    @classmethod
    def from_config(cls, config: RMCConfig) -> "RMCCore":
        return RMCCore(config)

    @property
    def output_size(self) -> int:
        return self.mem_slots * self.mem_size

    def extra_repr(self) -> str:
        config = self.config
        return (f"mem_slots={config.mem_slots}, heads={config.num_heads}x{config.head_size}, key_size={self.key_size}, "
                f"blocks={config.num_blocks}, gate_style={config.gate_style!r}, "
                f"implementation={config.implementation!r}")

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> RMCState:
        """The identity memory, padded with zero columns or truncated to d columns: [B, N, d].

        Each slot starts as a distinct one-hot row. Not trainable (Sonnet ignores its `trainable`).
        """
        weight = self.input_projector.weight
        device = weight.device if device is None else device
        eye = torch.eye(self.mem_slots, self.mem_size, device=device, dtype=weight.dtype)  # [N, d], padded/truncated
        return RMCState(eye.unsqueeze(0).expand(batch_size, -1, -1).clone())  # [N, d] -> [B, N, d]

    def _input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The input as rows: [T, B, R * D] or [T, B, R, D] -> [T, B, R, D]."""
        rows, width = self.input_rows, self.config.input_size
        if x.dim() == 4 and x.shape[2:] == (rows, width):
            return x
        if x.dim() != 3 or x.size(2) != rows * width:
            raise ValueError(f"RMC input must be [T, B, {rows * width}]"
                             + (f" or [T, B, {rows}, {width}]" if self.config.treat_input_as_matrix else "")
                             + f", got {list(x.shape)}")
        return x.reshape(x.size(0), x.size(1), rows, width)  # [T, B, R * D] -> [T, B, R, D]

    def forward(self, x: torch.Tensor, state: RMCState | None = None) -> tuple[torch.Tensor, RMCState]:
        """Run the core over a sequence.

        Args:
            x: [T, B, R * D] (or [T, B, R, D]); [B, T, ...] with batch_first.
            state: `RMCState(memory [B, N, d])`; None means `initial_state`.

        Returns:
            y [T, B, N * d] ([B, T, N * d] with batch_first), the flattened memory after each step,
            and the final `RMCState`.
        """
        if self.config.batch_first:
            x = x.transpose(0, 1)  # [B, T, ...] -> [T, B, ...]
        x = self._input_rows(x)
        memory = self.initial_state(x.size(1), x.device).memory if state is None else state.memory
        expected = (x.size(1), self.mem_slots, self.mem_size)
        if memory.shape != expected:
            raise ValueError(f"RMC memory must be {list(expected)} (B, mem_slots, mem_size), got {list(memory.shape)}")
        if self.config.implementation == "reference":
            output, memory = self._forward_ref(x, memory)
        else:
            output, memory = self._forward_fast(x, memory)
        if self.config.batch_first:
            output = output.transpose(0, 1)  # [T, B, N * d] -> [B, T, N * d]
        return output, RMCState(memory)

    # ----------------------------------------------------------------------------------------------
    # Reference: the equations, one step at a time.

    def _attention_ref(self, z: torch.Tensor, block: RMCBlock) -> torch.Tensor:
        """Multi-head dot-product attention over the rows of z [B, S, d] -> [B, S, d]."""
        batch, rows, _ = z.shape
        qkv = F.layer_norm(block.qkv(z), (block.qkv_norm.normalized_shape[0],),
                           block.qkv_norm.weight, block.qkv_norm.bias, block.qkv_norm.eps)  # [B, S, P]
        qkv = qkv.reshape(batch, rows, self.num_heads, -1)  # [B, S, P] -> [B, S, H, 2k + h]
        qkv = qkv.transpose(1, 2)  # [B, S, H, 2k + h] -> [B, H, S, 2k + h]
        query, key, value = torch.split(qkv, [self.key_size, self.key_size, self.head_size], dim=-1)
        scores = query @ key.transpose(-1, -2) * self.key_size ** -0.5  # [B, H, S, k] @ [B, H, k, S] -> [B, H, S, S]
        heads = torch.softmax(scores, dim=-1) @ value  # [B, H, S, h]
        return heads.transpose(1, 2).reshape(batch, rows, self.mem_size)  # [B, H, S, h] -> [B, S, H, h] -> [B, S, d]

    def _mlp(self, z: torch.Tensor) -> torch.Tensor:
        """The shared MLP, row-wise: ReLU between layers, none after the last."""
        for index, layer in enumerate(self.mlp):
            if index:
                z = torch.relu(z)
            z = layer(z)
        return z

    def _step_ref(self, x_t: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """One step: x_t [B, R, D], M_{t-1} [B, N, d] -> M_t [B, N, d]."""
        u = self.input_projector(x_t)  # [B, R, d]
        z = torch.cat([memory, u], dim=1)  # [B, N + R, d]
        for block in self.blocks:
            z = block.attention_norm(z + self._attention_ref(z, block))
            z = block.mlp_norm(z + self._mlp(z))
        proposal = z[:, :self.mem_slots]  # M~: drop the input rows, [B, N, d]
        if self.config.gate_style is None:
            return proposal
        gate_input = self.input_gate_projector(u.flatten(1)).unsqueeze(1)  # [B, R, d] -> [B, R * d] -> [B, 1, 2G]
        gates = gate_input + self.memory_gate_projector(torch.tanh(memory))  # [B, N, 2G]
        input_gate, forget_gate = gates.chunk(2, dim=-1)  # 2 x [B, N, G]
        input_gate = torch.sigmoid(input_gate + self.input_bias)
        forget_gate = torch.sigmoid(forget_gate + self.forget_bias)
        return input_gate * torch.tanh(proposal) + forget_gate * memory

    def _forward_ref(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, B, R, D], memory [B, N, d] -> y [T, B, N * d], final memory [B, N, d]."""
        outputs = []
        for x_t in x:
            memory = self._step_ref(x_t, memory)
            outputs.append(memory.flatten(1))  # [B, N, d] -> [B, N * d]
        return torch.stack(outputs), memory

    # ----------------------------------------------------------------------------------------------
    # Fast path: the same maths, input-only work hoisted out of the loop, dead rows skipped.

    def _qkv_fast(self, z: torch.Tensor, block: RMCBlock) -> torch.Tensor:
        """LN_qkv(z W_qkv + b_qkv), row-wise: [..., d] -> [..., P]."""
        norm = block.qkv_norm
        return F.layer_norm(F.linear(z, block.qkv.weight, block.qkv.bias), norm.normalized_shape,
                            norm.weight, norm.bias, norm.eps)

    def _attend_fast(self, qkv: torch.Tensor, query_rows: int) -> torch.Tensor:
        """Attention of the first `query_rows` rows over all S rows: qkv [B, S, P] -> [B, query_rows, d]."""
        batch, rows, _ = qkv.shape
        qkv = qkv.view(batch, rows, self.num_heads, -1).transpose(1, 2)  # [B, S, P] -> [B, S, H, 2k+h] -> [B, H, S, 2k+h]
        query, key, value = torch.split(qkv, [self.key_size, self.key_size, self.head_size], dim=-1)
        query = query[:, :, :query_rows]  # [B, H, Q, k]
        # scores = Q K^T / sqrt(k), scaled inside the matmul kernel (no separate multiply).
        scores = torch.matmul(query * self.key_size ** -0.5, key.transpose(-1, -2))  # [B, H, Q, S]
        heads = torch.matmul(torch.softmax(scores, dim=-1), value)  # [B, H, Q, h]
        return heads.transpose(1, 2).reshape(batch, query_rows, self.mem_size)  # [B, H, Q, h] -> [B, Q, H, h] -> [B, Q, d]

    def _residual_fast(self, z: torch.Tensor, attended: torch.Tensor, block: RMCBlock) -> torch.Tensor:
        """Z = LN_1(Z + Att); Z = LN_2(Z + MLP(Z)), row-wise on [B, Q, d]."""
        norm = block.attention_norm
        z = F.layer_norm(z + attended, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        norm = block.mlp_norm
        return F.layer_norm(z + self._mlp(z), norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def _step_fast(self, memory: torch.Tensor, input_qkv: torch.Tensor, u: torch.Tensor,
                   gate_input: torch.Tensor | None) -> torch.Tensor:
        """One step of the fast path: M_{t-1} [B, N, d] and the step's hoisted input terms (the first block's
        LN(qkv) of the input rows [B, R, P], the input rows u_t [B, R, d], the gates' input term
        [B, 1, 2G] or None) -> M_t [B, N, d]. A function of its own, so that `compile_steps` can compile it."""
        slots, blocks = self.mem_slots, self.blocks
        last = len(blocks) - 1
        # Block 1: only the memory rows need a qkv projection; the input rows' is precomputed.
        qkv = torch.cat([self._qkv_fast(memory, blocks[0]), input_qkv], dim=1)  # [B, N + R, P]
        if last == 0:
            # The only block is the last: update the memory rows only (the input rows are dropped).
            z = self._residual_fast(memory, self._attend_fast(qkv, slots), blocks[0])  # [B, N, d]
        else:
            z = torch.cat([memory, u], dim=1)  # Z^0 = [M; u_t], [B, N + R, d]
            z = self._residual_fast(z, self._attend_fast(qkv, z.size(1)), blocks[0])
            for index in range(1, last + 1):
                qkv = self._qkv_fast(z, blocks[index])  # [B, N + R, P]
                rows = slots if index == last else z.size(1)
                z = self._residual_fast(z[:, :rows], self._attend_fast(qkv, rows), blocks[index])
        # z is now M~ [B, N, d] (the input rows were never computed in the last block).
        if gate_input is None:
            return z
        gates = torch.sigmoid(gate_input + F.linear(torch.tanh(memory), self.memory_gate_projector.weight))  # [B, N, 2G]
        input_gate, forget_gate = gates.chunk(2, dim=-1)  # 2 x [B, N, G]
        return torch.addcmul(forget_gate * memory, input_gate, torch.tanh(z))  # I * tanh(M~) + F * M

    def _forward_fast(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, B, R, D], memory [B, N, d] -> y [T, B, N * d], final memory [B, N, d]."""
        steps, batch = x.size(0), x.size(1)
        slots, blocks = self.mem_slots, list(self.blocks)
        # Input-only terms for all T steps at once (one large matmul each instead of T small ones).
        u = self.input_projector(x)  # [T, B, R, d]
        input_qkv = self._qkv_fast(u, blocks[0])  # the first block's LN(qkv) of the input rows, [T, B, R, P]
        gated = self.config.gate_style is not None
        if gated:
            bias = self.memory_gate_projector.bias + self.input_gate_projector.bias  # b_gm + b_gx, [2G]
            input_gate_bias, forget_gate_bias = bias.chunk(2)
            # Fold the constant (or learnt) input / forget biases into the hoisted term: [2G].
            bias = torch.cat([input_gate_bias + self.input_bias, forget_gate_bias + self.forget_bias])
            gate_inputs = F.linear(u.flatten(2), self.input_gate_projector.weight, bias)  # [T, B, R * d] -> [T, B, 2G]
            gate_inputs = gate_inputs.unsqueeze(2)  # [T, B, 1, 2G], broadcast over the slots
        # unbind, not indexing per step: the backward of `tensor[step]` fills a zero [T, ...] gradient
        # at every step (half the time of a naive loop); unbind's backward stacks the T pieces once.
        input_qkv_steps = input_qkv.unbind(0)  # T x [B, R, P]
        u_steps = u.unbind(0)  # T x [B, R, d]
        gate_input_steps = gate_inputs.unbind(0) if gated else None  # T x [B, 1, 2G]
        step_fn = compiled(self, "step", self._step_fast)
        outputs = []
        for step in range(steps):
            memory = step_fn(memory, input_qkv_steps[step], u_steps[step],
                             gate_input_steps[step] if gated else None)
            outputs.append(memory)
        output = torch.stack(outputs)  # T x [B, N, d] -> [T, B, N, d]
        return output.view(steps, batch, slots * self.mem_size), memory  # [T, B, N, d] -> [T, B, N * d]

    # ----------------------------------------------------------------------------------------------
    # Command line.

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """Flags spelled as in the seed project's train_rmc.py (defaults too), with dashed aliases."""
        group = parser.add_argument_group("RMC core")
        add_argument_once(group, "--memslots", "--mem-slots", "--mem_slots", dest="mem_slots", type=int, default=1,
                          help="RMC: number of memory slots (rows; the DNC's cells are -mem_slot)")
        add_argument_once(group, "--headsize", "--head-size", "--head_size", dest="head_size", type=int,
                          default=192, help="RMC: size of each attention head (memory width = heads x head size)")
        add_argument_once(group, "--numheads", "--num-heads", "--num_heads", dest="num_heads", type=int, default=4,
                          help="RMC: number of attention heads")
        add_argument_once(group, "--numblocks", "--num-blocks", "--num_blocks", dest="num_blocks", type=int,
                          default=1, help="RMC: attention + MLP blocks per time step")
        add_argument_once(group, "--forgetbias", "--forget-bias", "--forget_bias", dest="forget_bias", type=float,
                          default=1.0, help="RMC: bias added to the forget gate")
        add_argument_once(group, "--inputbias", "--input-bias", "--input_bias", dest="input_bias", type=float,
                          default=0.0, help="RMC: bias added to the input gate")
        add_argument_once(group, "--gatestyle", "--gate-style", "--gate_style", dest="gate_style", type=str,
                          default="unit", choices=["unit", "memory", "none"],
                          help="RMC: gate per unit, per memory slot, or no gates")
        add_argument_once(group, "--attmlplayers", "--attention-mlp-layers", "--attention_mlp_layers",
                          dest="attention_mlp_layers", type=int, default=3,
                          help="RMC: layers of the MLP after attention")
        add_argument_once(group, "--keysize", "--key-size", "--key_size", dest="key_size", type=int, default=64,
                          help="RMC: size of keys and queries (0: the head size)")
        add_argument_once(group, "--rmc-implementation", "--rmc_implementation", dest="rmc_implementation",
                          choices=list(IMPLEMENTATIONS), default="fast",
                          help="RMC: the fast path or the per-step reference loop (same parameters)")
        add_argument_once(group, "--trainable-biases", "--trainable_biases", dest="trainable_biases",
                          action=argparse.BooleanOptionalAction, default=False,
                          help="RMC: learn the forget and input gate biases (the L0SG port does)")

    @classmethod
    def config_from_args(cls, args: argparse.Namespace, input_size: int) -> RMCConfig:
        gate_style = None if args.gate_style in (None, "none", "None") else args.gate_style
        return RMCConfig(
            input_size=input_size,
            mem_slots=args.mem_slots,
            head_size=args.head_size,
            num_heads=args.num_heads,
            num_blocks=args.num_blocks,
            forget_bias=args.forget_bias,
            input_bias=args.input_bias,
            gate_style=gate_style,
            attention_mlp_layers=args.attention_mlp_layers,
            key_size=args.key_size or None,
            trainable_biases=args.trainable_biases,
            implementation=args.rmc_implementation,
        )


class RelationalMemory(nn.Module):
    """The L0SG port's `RelationalMemory` (relational_rnn_general.py): its constructor, attributes and call,
    over an `RMCCore` (`self.core`, the module every script uses) whose parameters it shares.

        rmc = RelationalMemory(mem_slots, head_size, input_size, num_heads=1, num_blocks=1, forget_bias=1.,
                               input_bias=0., gate_style='unit', attention_mlp_layers=2, key_size=None,
                               return_all_outputs=False)
        memory = rmc.initial_state(batch_size)          # [B, N, d], the identity padded or truncated
        output, memory = rmc(inputs, memory)            # inputs [B, T, ...] batch first, each step flattened

    `output` is the last step's flattened memory [B, N * d], or with `return_all_outputs` every step's,
    concatenated along the first axis as the port does: [T * B, N * d], step-major (`.view(T, B, -1)`
    gives the steps). Like the port, `forward` detaches the memory it is given (truncated BPTT at each
    call). The maths is Sonnet's, as in `RMCCore`, where the port differs: one LayerNorm per row (the
    port normalises over all rows and features at once), distinct MLP layers with no ReLU after the
    last (the port repeats one layer and ends with a ReLU), qkv and LayerNorm parameters per block
    (the port shares them across blocks), and constant gate biases unless `trainable_biases=True` (the
    port learns them). `options` are the other `RMCConfig` fields (implementation, trainable_biases, ...).
    """

    def __init__(self, mem_slots: int, head_size: int, input_size: int, num_heads: int = 1, num_blocks: int = 1,
                 forget_bias: float = 1.0, input_bias: float = 0.0, gate_style: str | None = "unit",
                 attention_mlp_layers: int = 2, key_size: int | None = None, return_all_outputs: bool = False,
                 **options):
        super().__init__()
        if options.get("batch_first") or options.get("treat_input_as_matrix"):
            raise ValueError("RelationalMemory takes the port's batch-first call; for batch_first or "
                             "treat_input_as_matrix build RMCCore(RMCConfig(...)) instead")
        self.core = RMCCore(RMCConfig(
            input_size=input_size, mem_slots=mem_slots, head_size=head_size, num_heads=num_heads,
            num_blocks=num_blocks, forget_bias=forget_bias, input_bias=input_bias, gate_style=gate_style,
            attention_mlp_layers=attention_mlp_layers, key_size=key_size, **options,
        ))
        config = self.core.config
        # The port's attribute names for the sizes.
        self.mem_slots, self.head_size, self.num_heads = mem_slots, head_size, num_heads
        self.mem_size = config.mem_size
        self.mem_slots_plus_input = mem_slots + 1
        self.num_blocks, self.gate_style, self.attention_mlp_layers = num_blocks, gate_style, attention_mlp_layers
        self.key_size = config.resolved_key_size
        self.value_size = head_size
        self.qkv_size = 2 * self.key_size + self.value_size
        self.total_qkv_size = self.qkv_size * num_heads
        self.input_size = input_size
        self.num_gates = 2 * config.gate_size
        self.return_all_outputs = return_all_outputs

    # The port's parameter names, as views of the core's modules (the first block's where the port has one set).
    @property
    def input_projector(self) -> nn.Linear:
        return self.core.input_projector

    @property
    def input_gate_projector(self) -> nn.Linear | None:
        return self.core.input_gate_projector

    @property
    def memory_gate_projector(self) -> nn.Linear | None:
        return self.core.memory_gate_projector

    @property
    def attention_mlp(self) -> nn.ModuleList:
        return self.core.mlp

    @property
    def qkv_projector(self) -> nn.Linear:
        return self.core.blocks[0].qkv

    @property
    def qkv_layernorm(self) -> nn.LayerNorm:
        return self.core.blocks[0].qkv_norm

    @property
    def attended_memory_layernorm(self) -> nn.LayerNorm:
        return self.core.blocks[0].attention_norm

    @property
    def attended_memory_layernorm2(self) -> nn.LayerNorm:
        return self.core.blocks[0].mlp_norm

    @property
    def forget_bias(self) -> torch.Tensor | float:
        return self.core.forget_bias

    @property
    def input_bias(self) -> torch.Tensor | float:
        return self.core.input_bias

    @property
    def state_size(self) -> list[int]:
        return [self.mem_slots, self.mem_size]

    @property
    def output_size(self) -> int:
        return self.mem_slots * self.mem_size

    def calculate_gate_size(self) -> int:
        """G: d per unit, 1 per memory row, 0 without gates."""
        return self.core.config.gate_size

    def repackage_hidden(self, h: torch.Tensor | tuple) -> torch.Tensor | tuple:
        """The port's detach helper: a tensor, or nested tuples of tensors, cut from their history."""
        if isinstance(h, torch.Tensor):
            return h.detach()
        return tuple(self.repackage_hidden(v) for v in h)

    def initial_state(self, batch_size: int, trainable: bool = False) -> torch.Tensor:
        """The identity memory [B, N, d] on the module's device (`trainable` is ignored, as in the port)."""
        return self.core.initial_state(batch_size).memory

    def _check_memory(self, inputs: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        if memory is None:
            return self.initial_state(inputs.size(0)).to(inputs.device)
        expected = (inputs.size(0), self.mem_slots, self.mem_size)
        if not isinstance(memory, torch.Tensor) or tuple(memory.shape) != expected:
            shape = list(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
            raise ValueError(f"memory must be a tensor {list(expected)} (batch, mem_slots, mem_size), got {shape}; "
                             f"make it with rmc.initial_state(batch_size)")
        return memory

    def forward_step(self, inputs: torch.Tensor, memory: torch.Tensor,
                     treat_input_as_matrix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: inputs [B, ...] (flattened to [B, input_size]), memory [B, N, d] ->
        (output [B, N * d], next memory [B, N, d]). Matrix inputs need RMCCore's treat_input_as_matrix."""
        if treat_input_as_matrix:
            raise ValueError("treat_input_as_matrix: build RMCCore(RMCConfig(treat_input_as_matrix=True, "
                             "input_rows=R, ...)), whose gates read all R rows")
        memory = self._check_memory(inputs, memory)
        output, state = self.core(inputs.reshape(1, inputs.size(0), -1), RMCState(memory))  # [B, ...] -> [1, B, D]
        return output[0], state.memory

    def forward(self, inputs: torch.Tensor, memory: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The port's call: inputs [B, T, ...] (each step flattened to input_size), memory [B, N, d] (None: the
        initial memory) -> (output, memory [B, N, d]); output [B, N * d] for the last step, or [T * B, N * d]
        for all steps with `return_all_outputs` (see the class docstring)."""
        if inputs.dim() < 3:
            raise ValueError(f"inputs must be [B, T, input_size] (batch first, as in the port), "
                             f"got {list(inputs.shape)}")
        memory = self.repackage_hidden(self._check_memory(inputs, memory))  # the port detaches here
        steps = inputs.reshape(inputs.size(0), inputs.size(1), -1).transpose(0, 1)  # [B, T, ...] -> [T, B, D]
        output, state = self.core(steps, RMCState(memory))  # [T, B, N * d]
        if self.return_all_outputs:
            return output.reshape(-1, output.size(-1)), state.memory  # [T, B, N * d] -> [T * B, N * d]
        return output[-1], state.memory
