"""Training on several processes with torchrun: DistributedDataParallel set up from the environment.

`torchrun --nproc_per_node N script.py ...` starts N copies of a script and gives each one
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. `session` joins them in one
process group (NCCL on GPUs, each process on cuda:LOCAL_RANK; gloo on CPU) with a bounded
timeout, and tears it down on the way out, error or not. Without torchrun (WORLD_SIZE unset
or 1) every helper here is the identity or does nothing and no process group exists, so a
script runs exactly as before.

The loops built on this keep the processes in lock step: every collective below must be
called by all ranks in the same order, so callers reach them only on paths every rank takes
(stop, skip and switch decisions come from values the ranks agree on). A rank that fails
exits non-zero; torchrun then stops the others and names the failing rank, and a rank that
hangs is bounded by the group timeout.

We use PyTorch's own engine (DDP), not `nn.DataParallel` or a home-made scheme.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from errors import UserInputError


def world_size() -> int:
    """Number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank, 0 ... world_size() - 1 (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process logs, draws progress bars and writes files (rank 0)."""
    return rank() == 0


def rank_seed(seed: int) -> int:
    """A seed of this rank's own: `seed` on rank 0 (and without torchrun), `seed + rank` elsewhere."""
    return seed + rank()


def device(requested: torch.device) -> torch.device:
    """The device this process uses: under torchrun a CUDA request means cuda:LOCAL_RANK."""
    if world_size() == 1 or requested.type != "cuda":
        return requested
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise UserInputError(
            f"process with LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
            f"start at most that many processes per machine (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def session(device: torch.device, timeout: float) -> Iterator[None]:
    """Join torchrun's process group for the body; a no-op without torchrun.

    Args:
        device: this process's device (from `device`): NCCL for CUDA, gloo otherwise.
        timeout: seconds that set-up and any collective may wait for the other ranks before
            failing, so a rank that dies or hangs ends the run in bounded time.

    The group is destroyed on the way out, also when the body raises; on a normal exit the
    ranks first wait for each other.
    """
    if world_size() == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        yield
        barrier()
    finally:
        # Free what the body built (DDP's reducer holds the process group) before the group goes:
        # left to interpreter shutdown, the group's threads were torn down out of order and the
        # process aborted ("terminate called without an active exception") after a finished run.
        # Callers run the body in a function of its own, so its locals are gone by now.
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here."""
    if world_size() > 1:
        dist.barrier()


class _Step(nn.Module):
    """Runs `fn` as the forward of a module that owns `model`, so DDP sees every parameter the step uses."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


def wrap(model: nn.Module, step: Callable[..., Any], find_unused_parameters: bool = False) -> Callable[..., Any]:
    """`step` as DistributedDataParallel runs it when there are several ranks; `step` itself otherwise.

    Args:
        model: the module whose parameters `step` uses (already on this rank's device).
        step: a function of the batch that runs `model` and returns its loss (and anything
            else); it becomes the DDP forward, so parameters used outside `model.forward`
            (e.g. a softmax head in the loss) are synchronised too.
        find_unused_parameters: DDP's flag, for models whose steps leave some parameters
            without a gradient (an adaptive softmax's clusters without targets in a batch).

    `loss.backward()` on the result then averages the gradients over the ranks: with equal
    shares of the batch, the same gradient as one process on the whole batch.
    """
    if world_size() == 1:
        return step
    module = _Step(model, step)
    first = next(model.parameters())
    device_ids = [first.device.index] if first.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


# --------------------------------------------------------------------------- sharing a batch


def share(size: int, flag: str) -> int:
    """This rank's share of a batch of `size` columns; a one-line error naming `flag` if it does not divide."""
    ranks = world_size()
    if size % ranks:
        raise UserInputError(
            f"{flag} {size} does not divide among the {ranks} processes torchrun started; use a multiple "
            f"of {ranks} (it is the batch of all processes together: each gets {flag} / {ranks} columns)"
        )
    return size // ranks


def columns(tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This rank's slice of `tensor` along `dim`: rank r of N gets the r-th of N equal slices."""
    if world_size() == 1:
        return tensor
    width = tensor.size(dim) // world_size()
    return tensor.narrow(dim, rank() * width, width).contiguous()


def gather_columns(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `columns`: every rank's slice, concatenated in rank order along `dim`."""
    if world_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim)


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def map_shared(function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """`[function(item) for item in items]` with the items dealt out over the ranks; every result on every rank.

    Rank r of N computes items r, r + N, r + 2N, ... whole, and the results (picklable) are
    exchanged and put back in the items' order. So each result is exactly what one process
    computes, and a sum over them taken in order is bitwise the one process's sum (e.g. a test
    set of fixed batches evaluated by several processes).
    """
    if world_size() == 1:
        return [function(item) for item in items]
    mine = {index: function(items[index]) for index in range(rank(), len(items), world_size())}
    results: dict[int, Any] = {}
    for part in gather_objects(mine):
        results.update(part)
    return [results[index] for index in range(len(items))]


# --------------------------------------------------------------------------- agreeing


def _reduce(values: list[float], op: dist.ReduceOp) -> list[float]:
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def all_reduce_sum(*values: float) -> list[float]:
    """Sums over the ranks, in float64 (e.g. a loss sum and a token count for a token-weighted mean)."""
    if world_size() == 1:
        return list(values)
    return _reduce(list(values), dist.ReduceOp.SUM)


def max_over_ranks(value: int) -> int:
    """The largest `value` of any rank (e.g. the most urgent stop request)."""
    if world_size() == 1:
        return value
    return int(_reduce([value], dist.ReduceOp.MAX)[0])


def all_ranks(flag: bool) -> bool:
    """Whether `flag` holds on every rank (e.g. the loss is finite everywhere, so all ranks step)."""
    return not max_over_ranks(int(not flag))


def all_true(flag: torch.Tensor) -> torch.Tensor:
    """A bool tensor on this rank's device that holds where `flag` holds on every rank; reads nothing
    back to the host (so it costs no host sync on a GPU). `flag` itself without torchrun."""
    if world_size() == 1:
        return flag
    values = flag.to(torch.uint8)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values.bool()


def all_reduce_sum_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks of `tensor` (on this rank's device), as a new tensor; `tensor` without torchrun."""
    if world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def agree(value: Any) -> Any:
    """Rank 0's `value` (picklable) on every rank, so that all ranks take the same decision."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into `module` on every rank."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)
