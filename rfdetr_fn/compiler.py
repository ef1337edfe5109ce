"""Everything torch.compile: region markers, the compiled-function factory and the on-disk compile cache.

Regional compilation: `region` marks a repeated block (a ViT block, a decoder layer) with
`torch.compiler.nested_compile_region`, so Dynamo traces and AOTAutograd compile one copy per distinct
block kind and stamp it out for every layer, when the compile call asked for regions
(`compile_fn(..., regions=)`: an argument, never a process-wide switch). Outside torch.compile, under a
plain `torch.compile` and on vmapped inputs the marker is a plain call. The markers do not compose with
`torch.func.grad_and_value` under compile (torch 2.13 fails with "Expected FakeTensor"), which is why
the compiled train step differentiates with autograd around a compiled loss (see
`rfdetr_fn.step.compile_step`) instead of tracing torch.func inside one graph.

Two torch 2.13 workarounds live in the marked blocks: linears use `w.t()` (Dynamo lifts a region input's
`.T` out of the region and fails to map it back), and attention heads are made contiguous before SDPA
(inside a region's backward, inductor's SDPA gradient comes back in another layout than traced and the
head-merging `view` fails: "Cannot view a tensor with shape [B, T, heads, hd]").

The cache: inductor's FX-graph cache and AOTAutograd's cache are switched on, inductor's cache folder (with
the compiled C++/Triton kernels) moves to `<cache dir>/inductor` unless TORCHINDUCTOR_CACHE_DIR is set, and
`torch.compiler.save_cache_artifacts` bundles what a run compiled into a file under
`<cache dir>/<key>/`, where the key hashes everything that shapes the graph (model config, the train
fields that enter the step, precision, torch/triton versions, device). A later run with the same key
loads those files before its first call and skips AOTAutograd and inductor; a changed config gets
another key and never sees them (the caches inside are content-addressed too).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import torch

F = TypeVar("F", bound=Callable)

# Whether the user chose inductor's cache folder; else `CompileCache.load` puts it inside the compile cache, so
# the compiled kernels (.so files, which the artifact files do not carry on CPU) persist beside the artifacts.
_USER_INDUCTOR_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


@attrs.frozen
class Measured:
    """What `benchmarks/compile.py` measured for Nano 384, batch 2 on one kind of compute (RESULTS.md):
    first compiled call with empty caches and in a second run, and compiled/eager speed of the train step
    (as `fit` compiles it there) and of batch-1 inference."""

    cold_s: float
    warm_s: float
    step_speedup: float
    infer_speedup: float
    infer_cold_s: float
    infer_warm_s: float


# Kinds of compute measured so far (`rfdetr_fn.model.precision.compute_kind`: device type, precision and,
# for bf16 on CPU, the unit running its GEMMs; benchmarks/RESULTS.md). `auto` compiles what reached the bar
# there (train step >= 1.25x, inference >= 1.5x eager: worth minutes of first compile) and stays eager
# elsewhere, including kinds never measured. All below are 2-core CPUs, torch 2.13, loss piece compiled and
# the update eager (as `fit` runs a CPU). fp32 (EPYC): 4.1 min cold, 23 s warm, step 1.14x, inference 1.41x.
# bf16 on AVX512-BF16 (Zen 4 EPYC, 2026-12-08): 2.9 min cold, 30 s warm, step 0.84x, inference 0.97x --
# compiled is slower there. Below both bars everywhere measured, so auto stays eager on CPU.
MEASURED: dict[str, Measured] = {
    "cpu fp32": Measured(
        cold_s=246.0, warm_s=22.7, step_speedup=1.14, infer_speedup=1.41, infer_cold_s=78.8, infer_warm_s=5.8
    ),
    "cpu bf16 avx512_bf16": Measured(
        cold_s=176.3, warm_s=30.0, step_speedup=0.84, infer_speedup=0.97, infer_cold_s=48.2, infer_warm_s=7.6
    ),
}
STEP_WIN, INFER_WIN = 1.25, 1.5


class _Regions:
    """Whether the compiled call now running asked for nested regions. Only `compile_fn`'s wrapper sets it,
    around its own compiled call, and puts the old value back after; Dynamo reads it at trace time and
    guards on it (it cannot read a contextvars value), so each compiled function sees its own setting."""

    on: bool = False


_REGIONS = _Regions()


def regions_default(backend: str) -> bool:
    """Nested regions unless inductor: its torch 2.13 backward of repeated regions returned wrong LayerNorm
    weight gradients (RESULTS.md)."""
    return backend != "inductor"


def region(fn: F) -> F:
    """Mark `fn` as a nested compile region when the compile call running it asked for regions (see
    `compile_fn`); a plain call otherwise: eagerly, under a plain `torch.compile`, and whenever an input is
    vmapped (regions do not compose with vmap: "Cannot access storage of BatchedTensorImpl")."""
    marked = torch.compiler.nested_compile_region(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        use = _REGIONS.on and torch.compiler.is_compiling() and not _vmapped(args)
        return (marked if use else fn)(*args, **kwargs)

    return call  # type: ignore[return-value]


def _vmapped(args: tuple) -> bool:
    leaves = torch.utils._pytree.tree_leaves(args)
    return any(isinstance(t, torch.Tensor) and torch._C._functorch.is_batchedtensor(t) for t in leaves)


def _transformed() -> bool:
    """Eagerly under any torch.func transform (the same test as `rfdetr_fn.kernels.transforms`)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def compile_fn(fn: F, *, backend: str = "inductor", mode: str | None = None, regions: bool | None = None) -> F:
    """torch.compile one pure function: fullgraph (a graph break is a bug), static shapes.

    `regions`: trace each repeated block (ViT block, decoder layer) once as a nested compile region; None =
    `regions_default(backend)`. The choice belongs to this compiled function only (see `_Regions`).
    Called under a torch.func transform (vmap, grad, jvp over the compiled function, which Dynamo refuses:
    "Unsupported functorch tracing attempt"), it runs `fn` eagerly: the same function. To compile the
    transformed function, compile the transform instead: `compile_fn(torch.func.vmap(fn))`."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, mode=mode)
    want = regions_default(backend) if regions is None else regions

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if _transformed():  # torch.func over a compiled function is unsupported: run it eagerly
            return fn(*args, **kwargs)
        before, _REGIONS.on = _REGIONS.on, want
        try:
            return compiled(*args, **kwargs)
        finally:
            _REGIONS.on = before

    return call  # type: ignore[return-value]


def raise_recompile_limit(max_shapes: int) -> None:
    """Make room for `max_shapes` graphs per function (never lowers it): past Dynamo's limit (8) a
    fullgraph function fails outright, and Nano's multi-scale menu alone has 11 sizes."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), max_shapes))


def use_compile(setting: str, kind: str, what: str = "step") -> bool:
    """'auto' compiles the train step (what="step") or the forward pass (what="inference") where
    benchmarks/compile.py measured it enough faster than eager on that kind of compute (MEASURED; the kind
    is `rfdetr_fn.model.precision.compute_kind(device, precision)`)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"compile={setting!r}: expected auto, on or off")
    if setting != "auto":
        return setting == "on"
    measured = MEASURED.get(kind)
    speedup = None if measured is None else (measured.step_speedup if what == "step" else measured.infer_speedup)
    return speedup is not None and speedup >= (STEP_WIN if what == "step" else INFER_WIN)


def default_cache_dir() -> Path:
    """$RFDETR_FN_CACHE, else $XDG_CACHE_HOME/rfdetr_fn/compile, else ~/.cache/rfdetr_fn/compile."""
    if os.environ.get("RFDETR_FN_CACHE"):
        return Path(os.environ["RFDETR_FN_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rfdetr_fn" / "compile"


def cache_key(
    model_cfg: Any, settings: dict[str, Any] | None = None, *, device: torch.device | str, **extra: Any
) -> str:
    """A short hash of everything that shapes the compiled graphs: the model config, `settings` (what the
    compiled pieces read besides it: a train step's `TrainStep.settings`, the resolved loss and update
    records), torch/triton versions, the device, and call-site facts in `extra` (input shapes, what is
    compiled)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    record = {
        "model": attrs.asdict(model_cfg),
        "settings": settings,
        "torch": torch.__version__,
        "triton": triton_version,
        "device": _device_name(torch.device(device)),
        **extra,
    }
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{torch.cuda.get_device_name(index)}:{torch.cuda.get_device_capability(index)}"
    return device.type


@attrs.define
class CompileCache:
    """The artifacts of one cache key: `load` before the first compiled call, `save_if_new` after calls."""

    directory: Path
    key: str
    saved_graphs: int = 0

    @property
    def path(self) -> Path:
        return Path(self.directory) / self.key

    def load(self) -> int:
        """Load every artifact file of this key into torch's caches; returns how many loaded."""
        if _USER_INDUCTOR_DIR is None:  # before torch's first look, which fixes its default into the variable
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(self.directory).resolve() / "inductor")
        enable_disk_caches()
        loaded = 0
        for file in sorted(self.path.glob("*.bin")) if self.path.is_dir() else []:
            try:  # torch logs and returns None for a corrupt file; a failed read raises
                info = torch.compiler.load_cache_artifacts(file.read_bytes())
            except Exception as e:
                info, why = None, f"{type(e).__name__}: {e}"
            else:
                why = "not a torch compile-cache artifact (corrupt or from another torch)"
            if info is None:  # a bad file costs a recompile, never the run
                print(f"compile cache: ignoring {file}: {why}")
            loaded += info is not None
        self.saved_graphs = _graph_count()
        return loaded

    def save_if_new(self) -> Path | None:
        """Write what was compiled since the last save (one file per content hash, atomically)."""
        graphs = _graph_count()
        if graphs <= self.saved_graphs:
            return None
        self.saved_graphs = graphs
        result = torch.compiler.save_cache_artifacts()
        if result is None:
            return None
        data = result[0]
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / f"{hashlib.sha256(data).hexdigest()[:16]}.bin"
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        return target


def enable_disk_caches() -> None:
    """Inductor's FX-graph cache and AOTAutograd's cache (both on by default in 2.13; made explicit)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def announce(
    what: str,
    kind: str,
    cache: CompileCache | None,
    loaded: int,
    switch: str = "--train.compile off",
    piece: str = "step",
) -> None:
    """Say once what the first compiled call of the step (or the inference forward) costs, so nobody waits
    minutes silently."""
    m = MEASURED.get(kind)
    if m is None:
        cold = warm = None
    elif piece == "step":
        cold, warm = m.cold_s, m.warm_s
    else:
        cold, warm = m.infer_cold_s, m.infer_warm_s
    if loaded:
        soon = f" (measured: {warm:.0f} s for Nano)" if warm is not None else ""
        print(f"compiling {what}: reusing {loaded} cached artifact file(s) from {cache.path}{soon}")
        return
    guess = f"about {cold:.0f} s for Nano" if cold is not None else f"minutes (not measured on {kind})"
    where = f"; later runs reuse {cache.path}" if cache is not None else ""
    print(f"compiling {what}: the first call at each input size takes {guess}{where} ({switch} skips it)")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds) for benchmarks and the first-compile report."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
