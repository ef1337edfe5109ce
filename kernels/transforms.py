"""Which torch.func transforms are active around a call, so each kernel can pick an implementation that
supports them (no process-wide switch: the choice is made per call from what is running).

Eagerly the functorch interpreter stack says it exactly. While Dynamo traces, that stack cannot be read,
but a vmapped tensor still says it is batched (`is_batchedtensor` traces), which is the case compile(vmap)
needs; forward mode and double backward under torch.compile are not detected.
"""

from __future__ import annotations

import torch
from torch import Tensor

_C = torch._C._functorch


def _kinds() -> list[str]:
    if torch.compiler.is_compiling():
        return []
    stack = _C.get_interpreter_stack()
    return [] if stack is None else [interpreter.key().name for interpreter in stack]


def batched(*tensors: Tensor) -> bool:
    """True under torch.func.vmap (eagerly from the interpreter stack, compiled from the tensors)."""
    if torch.compiler.is_compiling():
        return any(_C.is_batchedtensor(t) for t in tensors)
    return "Vmap" in _kinds()


def higher_order() -> bool:
    """True where a kernel needs forward-mode or second-order rules: under torch.func.jvp (jvp, hvp
    forward-over-reverse) or two nested grad/vjp levels (reverse-over-reverse)."""
    kinds = _kinds()
    return "Jvp" in kinds or kinds.count("Grad") >= 2


def any_transform(*tensors: Tensor) -> bool:
    """True under any torch.func transform (vmap, grad, vjp, jvp, jacrev, ...)."""
    return bool(_kinds()) or batched(*tensors)
