"""The contract every recurrent core follows, state helpers, and the core registry.

A core maps `x: [T, B, D_in]` and a state to `y: [T, B, D_out]` and a new state of the
same structure (`batch_first=True` cores take and give `[B, T, ...]`). `state=None`
means a fresh state from `initial_state`. States are tensors inside tuples, named tuples,
lists and dicts; `detach_state` cuts any of them from the graph for truncated BPTT.

`--model NAME` in the scripts looks cores up in `CORES`; a core registers itself with
`@register_core("NAME")` and supplies a config dataclass, its command-line flags and a
way to build its config from parsed flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
import weakref
from typing import Any, Callable, ClassVar

import torch
from torch import nn

State = Any  # a tensor, or a (named) tuple / list / dict of states


class Core(nn.Module):
    """Base class of recurrent cores.

    Subclasses set `Config` (a dataclass, the only constructor input) and implement
    `initial_state`, `forward` and the two class methods used by the scripts.
    """

    Config: ClassVar[type]
    name: ClassVar[str] = ""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    @property
    def output_size(self) -> int:
        raise NotImplementedError

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    # `--compile`'s default for this core with CUDA and on the CPU (`compile_steps` must have a path for it
    # to matter): measured per core in bench/bench_compiled_steps.py and bench/bench_dnc.py.
    compiles_on_cuda = True
    compiles_on_cpu = False

    def compile_steps(self) -> bool:
        """From now on run the per-step work through `torch.compile` (`compiled`); returns whether this core
        has such a path. Cores that run whole sequences through fused kernels (cuDNN, QRNN) have none."""
        return False

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add this core's flags (flags shared with other cores are added once)."""

    @classmethod
    def config_from_args(cls, args: argparse.Namespace, input_size: int) -> Any:
        raise NotImplementedError


CORES: dict[str, type[Core]] = {}


def register_core(name: str) -> Callable[[type[Core]], type[Core]]:
    """Class decorator: make a core available as `--model NAME` (case-insensitive)."""

    def register(cls: type[Core]) -> type[Core]:
        key = name.lower()
        if key in CORES and CORES[key] is not cls:
            raise ValueError(f"core name {name!r} is registered twice")
        cls.name = name
        CORES[key] = cls
        return cls

    return register


def get_core_class(name: str) -> type[Core]:
    try:
        return CORES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown core {name!r}; choose one of {', '.join(sorted(CORES))}") from None


def build_core(name: str, config: dict | Any) -> Core:
    """Build core `name` from its config dataclass or a dict of its fields (as stored in checkpoints)."""
    cls = get_core_class(name)
    if isinstance(config, dict):
        config = cls.Config(**config)
    return cls(config)


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def add_argument_once(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    """`parser.add_argument` unless a core that shares the flag has added it already."""
    if any(flag in parser._option_string_actions for flag in flags):
        return
    parser.add_argument(*flags, **kwargs)


def add_stack_args(group: argparse._ActionsContainer) -> None:
    """The flags every stacked core shares: width, depth and dropout between layers."""
    add_argument_once(group, "--nhid", type=int, default=300, help="hidden units per layer")
    add_argument_once(group, "--nlayers", type=int, default=1,
                      help="number of layers (the DNC, SAM and SDNC count theirs with -nlayer and -nhlayer)")
    add_argument_once(group, "--dropouth", type=float, default=None,
                      help="dropout between recurrent layers (unset: the language models' --dropout; 0 in the "
                           "task scripts)")


def stack_dropout(args: argparse.Namespace) -> float:
    """Dropout between layers from --dropouth (or --dropout); 0 for a single layer."""
    dropout = args.dropouth if args.dropouth is not None else getattr(args, "dropout", 0.0)
    return dropout if args.nlayers > 1 else 0.0


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: State) -> State:
    """Apply `fn` to every tensor of a state, keeping its structure."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # NamedTuple
        return type(state)(*(map_state(fn, part) for part in state))
    if isinstance(state, (tuple, list)):
        return type(state)(map_state(fn, part) for part in state)
    if isinstance(state, dict):
        return {key: map_state(fn, part) for key, part in state.items()}
    raise TypeError(f"a recurrent state holds tensors, tuples, lists and dicts, not {type(state).__name__}")


def detach_state(state: State) -> State:
    """Cut a state of any structure from the autograd graph (between truncated-BPTT windows)."""
    return map_state(torch.Tensor.detach, state)


def state_tensors(state: State) -> list[torch.Tensor]:
    """The tensors of a state in a fixed order (to store a state in a checkpoint)."""
    tensors: list[torch.Tensor] = []
    map_state(lambda tensor: tensors.append(tensor) or tensor, state)
    return tensors


def state_from_tensors(template: State, tensors: list[torch.Tensor]) -> State:
    """Inverse of `state_tensors`: fill `template`'s structure with `tensors`, on its devices."""
    if len(tensors) != len(state_tensors(template)):
        raise ValueError(f"state has {len(state_tensors(template))} tensors, got {len(tensors)}")
    iterator = iter(tensors)

    def fill(like: torch.Tensor) -> torch.Tensor:
        tensor = next(iterator)
        if tensor.shape != like.shape:
            raise ValueError(f"state tensor of shape {tuple(tensor.shape)} where {tuple(like.shape)} is expected")
        return tensor.to(like.device, like.dtype)

    return map_state(fill, template)


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype of CPU autocast when it is on, else None (torch 2.4+ and older spellings)."""
    try:
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    except TypeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def lstm_off_cpu_fp16(run: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """`run(x)` for a fused LSTM call; under CPU autocast in fp16 it runs in fp32 with autocast off, since
    oneDNN (PyTorch's CPU LSTM kernel) has no fp16 LSTM. bf16, and every GPU precision, pass through."""
    if x.device.type == "cpu" and _cpu_autocast_dtype() == torch.float16:
        with torch.autocast("cpu", enabled=False):
            return run(x.float())
    return run(x)


_COMPILED: "weakref.WeakKeyDictionary[nn.Module, dict[str, Callable]]" = weakref.WeakKeyDictionary()


def compiled(module: nn.Module, name: str, function: Callable) -> Callable:
    """`function` itself, or, once `module.compile_step` is set (`Core.compile_steps`), `torch.compile(function)`
    for `module`, made once per module and `name` and kept beside it.

    `function` is a per-step function (one of `module`'s bound methods, or a plain one). The compiled function is
    kept in a weak table rather than on the module, so a copy of the module (`copy.deepcopy`)
    compiles its own instead of calling the original's weights. Shapes are static: each new shape
    (e.g. the last, shorter window's batch) compiles once more.
    """
    if not getattr(module, "compile_step", False):
        return function
    functions = _COMPILED.setdefault(module, {})
    if name not in functions:
        functions[name] = _eager_if_compiling_fails(torch.compile(function, dynamic=False), function, name)
    return functions[name]


def _eager_if_compiling_fails(fast: Callable, eager: Callable, name: str) -> Callable:
    """`fast`, unless its first call fails (a compiler missing or broken on this machine): then, with one
    warning, `eager` from then on. Errors of the step itself come back from `eager` as they are."""
    chosen: list[Callable] = []

    def call(*args: Any) -> Any:
        if chosen:
            return chosen[0](*args)
        try:
            result = fast(*args)
        except Exception as error:  # torch._dynamo / inductor errors differ across versions
            warnings.warn(f"torch.compile of the {name} failed ({type(error).__name__}: "
                          f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}); "
                          f"running it eagerly", stacklevel=2)
            chosen.append(eager)
            return eager(*args)
        chosen.append(fast)
        return result

    return call
