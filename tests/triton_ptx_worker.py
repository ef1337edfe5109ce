"""Compile the Triton kernels for a CUDA target on a machine without a GPU.

    python tests/triton_ptx_worker.py ARCH DTYPE   ->  one JSON line {kernel: {instruction: count}}
    python tests/triton_ptx_worker.py 80,90 assign ->  {arch: {kernel: {instruction: count}}} for the assignment solver

Run as its own process: the kernels must be decorated with the interpreter off (tests turn it on), and
triton is imported first so `msda_triton` leaves TRITON_INTERPRET alone.
"""

from __future__ import annotations

import collections
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rfdetr_fn.kernels import assign_triton, msda_triton  # noqa: E402

RUNTIME_INTS = {"R", "Q", "S"}
# the real launches' shapes: Nano's 16 heads x 16 channels, one level, two points per level
CONSTANTS = {"HEADS": 16, "D": 16, "LEVELS": 1, "POINTS": 2, "BLOCK_D": 16}
BLOCK_ROWS = {"_msda_fwd": 128, "_msda_bwd": 64}


def signature(kernel, dtype: str) -> dict[str, str]:
    """Pointer dtypes as the launchers pass them: int64 shapes, fp32 grad-value accumulator."""
    sig = {}
    for name in kernel.arg_names:
        if name == "shapes_ptr":
            sig[name] = "*i64"
        elif name == "gvalue_ptr":
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "i32" if name in RUNTIME_INTS else "constexpr"
    return sig


def instruction_counts(ptx: str) -> dict[str, int]:
    """PTX opcode -> count; a predicated instruction (`@%p1 op ...`) counts as its opcode."""
    body = (line.strip() for line in ptx.splitlines() if line.startswith("\t"))
    words = (line.split() for line in body if line[:1].isalpha() or line[:1] == "@")
    return dict(collections.Counter(w[1] if w[0].startswith("@") else w[0] for w in words))


def main(arch: int, dtype: str) -> None:
    result = {}
    for kernel in (msda_triton._msda_fwd, msda_triton._msda_bwd):
        name = kernel.fn.__name__
        constants = {**CONSTANTS, "BLOCK_R": BLOCK_ROWS[name]}
        source = ASTSource(fn=kernel, signature=signature(kernel, dtype), constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
        result[name] = instruction_counts(compiled.asm["ptx"])
    print(json.dumps(result))


def assign_main(archs: list[int]) -> None:
    """The solver at Nano's matching shape (300 queries per group, up to 64 target slots), for each arch."""
    kernel = assign_triton._sap_kernel
    sig = {"cost_ptr": "*fp64", "count_ptr": "*i32", "out_ptr": "*i64", "Q": "i32", "T": "i32"}
    sig |= {"BLOCK_Q": "constexpr", "BLOCK_T": "constexpr"}
    block_q, block_t = assign_triton.block_sizes(300, 64)
    result = {}
    for arch in archs:
        source = ASTSource(fn=kernel, signature=sig, constexprs={"BLOCK_Q": block_q, "BLOCK_T": block_t})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
        result[str(arch)] = {kernel.fn.__name__: instruction_counts(compiled.asm["ptx"])}
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[2] == "assign":
        assign_main([int(arch) for arch in sys.argv[1].split(",")])
    else:
        main(int(sys.argv[1]), sys.argv[2])
