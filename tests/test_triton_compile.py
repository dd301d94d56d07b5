"""The Triton kernels compile for an H100/H200 (sm_90) without a GPU, with 128-bit memory accesses.

Triton's interpreter (tests/test_triton_kernels.py) checks what the kernels compute, but not that they
compile: an op the interpreter accepts may not lower to PTX. Triton can compile for a named target on
any machine (its wheel carries ptxas), so every kernel is compiled here for sm_90 in the variants the
layer launches, as a launch would specialise them (pointers 16-byte aligned, sizes divisible by 16).
The PTX then shows whether the loads are vectorised: with `choose_config`'s 128-bit rule a thread
should read its values with `ld.global.v4`; and the cubin's resource usage (cuobjdump, also in the
wheel) that no variant spills registers to local memory. Skipped without Triton or its ptxas.
"""

import importlib.util
import os
import re
import subprocess
import tempfile

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (pip install -r requirements-dev.txt)")

ALIGNED = {"num_columns", "first_offset", "step_stride", "hidden_size", "gates_first", "gates_stride",
           "state_first", "state_stride"}  # divisible by 16 at the benchmark's sizes; a launch specialises on it


def compile_for_sm90(kernel, element: str, constants: dict, num_warps: int) -> str:
    """PTX of `kernel` for sm_90, with pointers to `element` (lengths: int64) and the given constexprs.

    Also checks the cubin: no register spills (a stack frame), where cuobjdump is at hand."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    signature, attributes = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name == "lengths_ptr" else f"*{element}"
            attributes[(index,)] = [["tt.divisibility", 16]]
        elif name == "forget_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in ALIGNED:
                attributes[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attributes)
    try:
        compiled = triton_compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except RuntimeError as error:
        if "ptxas" in str(error).lower() and "not found" in str(error).lower():
            pytest.skip(f"Triton's ptxas is missing: {error}")
        raise
    spill_free(compiled.asm["cubin"], kernel.__name__)
    return compiled.asm["ptx"]


def spill_free(cubin: bytes, name: str) -> None:
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        return
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    frames = [int(size) for size in re.findall(r"STACK:(\d+)", usage)]
    assert frames and max(frames) == 0, f"{name} spills registers: {usage}"


def vector_loads(ptx: str) -> tuple[int, int]:
    """(128-bit global loads, all global loads) in the PTX."""
    loads = re.findall(r"ld\.global\S*", ptx)
    return sum(".v4" in load for load in loads), len(loads)


FORGET_MULT_FLAGS = {"HAS_H0": True}
BACKWARD_FLAGS = {"HAS_H0": True, "HAS_GRAD_H": True, "HAS_GRAD_H_LAST": True}


@pytest.mark.parametrize("element, block, warps", [("bf16", 1024, 4), ("fp32", 512, 4), ("fp16", 256, 1)])
@pytest.mark.parametrize("time_chunk", [1, 4])
def test_forget_mult_kernels_compile_with_vector_loads(element, block, warps, time_chunk):
    from models.ops import forget_mult_triton as module

    chunk = {"TIME_CHUNK": time_chunk} if time_chunk > 1 else {}
    forward = module._forget_mult_forward_chunked_kernel if chunk else module._forget_mult_forward_kernel
    backward = module._forget_mult_backward_chunked_kernel if chunk else module._forget_mult_backward_kernel
    for kernel, flags in ((forward, FORGET_MULT_FLAGS), (backward, BACKWARD_FLAGS)):
        ptx = compile_for_sm90(kernel, element, {**flags, "BLOCK_SIZE": block, **chunk}, warps)
        wide, total = vector_loads(ptx)
        # the [T, B, H] streams (2 forward, 3 or 4 backward) are read 128 bits at a time
        assert wide >= (2 if kernel is forward else 3) * time_chunk, (kernel.__name__, wide, total)


@pytest.mark.parametrize("output_gate", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_qrnn_kernels_compile_with_vector_loads(output_gate, padded):
    from models.ops import qrnn_triton as module

    options = {"HAS_H0": True, "HAS_LENGTHS": padded, "HAS_MASK": padded, "OUTPUT_GATE": output_gate,
               "BLOCK_SIZE": 256}
    ptx = compile_for_sm90(module._qrnn_forward_kernel, "bf16", {**options, "STORE_CELL": True}, 1)
    assert vector_loads(ptx)[0] >= (3 if output_gate else 2)  # Z, F (, O) pre-activations, 8 bf16 a load
    ptx = compile_for_sm90(module._qrnn_forward_chunked_kernel, "bf16",
                           {**options, "STORE_CELL": True, "TIME_CHUNK": 4}, 1)
    assert vector_loads(ptx)[0] >= 4 * (3 if output_gate else 2)  # 4 steps of each gate per tile
    # the default launch of the QRNN paper's grid (B 8, H 320, float32, inference): 128 x 1, 8 steps a tile
    ptx = compile_for_sm90(module._qrnn_forward_chunked_kernel, "fp32",
                           {**options, "BLOCK_SIZE": 128, "STORE_CELL": False, "TIME_CHUNK": 8}, 1)
    assert vector_loads(ptx)[0] >= 8 * (3 if output_gate else 2)
    assert "shfl" not in ptx  # each thread holds all 8 steps of its units: the scan runs in registers
    for element, block in (("fp32", 128), ("bf16", 256)):  # the backward of both default launches
        ptx = compile_for_sm90(module._qrnn_backward_chunked_kernel, element,
                               {**options, "BLOCK_SIZE": block, "HAS_GRAD_OUTPUT": True, "HAS_GRAD_LAST": True,
                                "STORE_GRAD_H0": True, "TIME_CHUNK": module.BACKWARD_MAX_CHUNK}, 1)
        assert vector_loads(ptx)[0] >= module.BACKWARD_MAX_CHUNK * (5 if output_gate else 3) and "shfl" not in ptx
    ptx = compile_for_sm90(module._qrnn_backward_kernel, "bf16",
                           {**options, "HAS_GRAD_OUTPUT": True, "HAS_GRAD_LAST": True, "STORE_GRAD_H0": True}, 1)
    assert vector_loads(ptx)[0] >= (4 if output_gate else 3)  # gates, cell, grad output


def test_chunked_backward_only_where_its_32_bit_offsets_fit():
    """The chunked backward kernels index with 32-bit offsets; past 2**31 elements the row kernel runs."""
    from models.ops import forget_mult_triton as module
    from models.ops.triton_launch import KernelConfig

    config = KernelConfig(256, 1, time_chunk=4)
    assert module._backward_kernel(config, 2048, 2**18)[0] is module._forget_mult_backward_chunked_kernel
    assert module._backward_kernel(config, 2048, 2**20)[0] is module._forget_mult_backward_kernel  # 2**31 elements
    assert module._backward_kernel(KernelConfig(256, 1), 8, 8)[0] is module._forget_mult_backward_kernel
