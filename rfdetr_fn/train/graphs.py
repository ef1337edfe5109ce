"""Whole-step CUDA graphs: capture the train step once per input shape, then replay it.

The step is a pure function of `(state, batches)` with static shapes and, with the device matcher, no
host round trip, so everything it launches (forward, matching, loss, backward, all-reduce, clipping,
AdamW, EMA) can be recorded once and replayed as one graph: one launch instead of thousands.

`GraphedStep` keeps that signature. It owns one static copy of the train state that every captured
graph reads and, at the end of the graph, overwrites in place with the new state; each input signature
(a multi-scale size, a micro-batch count) gets its own graph with its own batch buffers, all in one
shared memory pool. A call copies the batches into the buffers, copies the state in only where its
tensors are not already the static ones, replays, and returns the static state with a copy of the
metrics. So `state, metrics = step(state, batches)` runs without a single state copy, like a donated
argument in JAX: the state a call returns is updated by the next call (clone what you want to keep).

Before its capture each graph runs the step `warmup` times on a side stream (CUDA's lazy set-up must
not happen during capture) on the static buffers; the step is pure and the RNG state is restored
afterwards, so warm-up changes nothing. The capture itself is a `Capture` object, so the copy-in and
copy-out logic runs on CPU with `EagerCapture`, whose "replay" just runs the recorded function again.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from rfdetr_fn.config import TrainConfig
from rfdetr_fn.losses.assignment import resolve_backend

Step = Callable[[Any, Sequence[dict]], tuple[Any, dict[str, Tensor]]]


class Capture(Protocol):
    """How a graph is recorded: `warmup()` is the context for the warm-up runs, `capture(fn)` returns
    the function that replays what `fn` launched."""

    def warmup(self) -> contextlib.AbstractContextManager: ...

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]: ...


class CudaCapture:
    """torch.cuda graphs on one device; every graph shares the first one's memory pool.

    Sharing is safe in any replay order: what a graph leaves behind (state, metrics) stays referenced,
    so no other capture reuses that memory, and everything else in the pool is dead between replays.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = None
        self.graphs: list[torch.cuda.CUDAGraph] = []

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            yield
        main.wait_stream(side)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's pin-memory thread may allocate pinned memory during a capture,
        # which the default "global" mode would turn into a capture error
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            fn()
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs.append(graph)
        return graph.replay


class EagerCapture:
    """A stand-in for CPU tests: nothing is recorded, each replay runs the function again."""

    def warmup(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        return fn


def signature(tree: Any) -> tuple:
    """What a graph is specialised to: the tree structure and every tensor's shape, dtype and device."""
    leaves, spec = pytree.tree_flatten(tree)
    return (str(spec), tuple((tuple(t.shape), t.dtype, t.device) for t in leaves))


def tensor_batches(batches: Sequence[dict]) -> list[dict[str, Tensor]]:
    """The tensor entries of each batch (ids and other host-side fields are not inputs of the step)."""
    return [{k: v for k, v in batch.items() if isinstance(v, Tensor)} for batch in batches]


def copy_into(static: Any, values: Any) -> None:
    """`static` leaves take `values`' data; leaves that already are the same memory are skipped."""
    dst, dst_spec = pytree.tree_flatten(static)
    src, src_spec = pytree.tree_flatten(values)
    if dst_spec != src_spec:
        raise ValueError(f"graphed step: the tree changed from {dst_spec} to {src_spec}")
    for d, s in zip(dst, src):
        if d is s or (d.data_ptr() == s.data_ptr() and d.stride() == s.stride() and d.shape == s.shape):
            continue
        if d.shape != s.shape or d.dtype != s.dtype:
            raise ValueError(
                f"graphed step: a tensor changed from {tuple(d.shape)} {d.dtype} to {tuple(s.shape)} {s.dtype}"
            )
        d.copy_(s)


def clone_tree(tree: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach().clone(), tree)


class GraphedStep:
    """`(state, batches) -> (state, metrics)` replayed from one captured graph per input signature."""

    def __init__(
        self,
        step_fn: Step,
        capture: Capture,
        *,
        device: torch.device,
        warmup: int = 2,
        max_graphs: int = 16,
    ) -> None:
        self.step_fn = step_fn
        self.capture = capture
        self.device = device
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.state: Any = None  # the static state every graph reads and updates in place
        self.graphs: dict[tuple, tuple[Callable[[], None], list[dict], dict]] = {}
        self._warned = False

    def __call__(self, state: Any, batches: Sequence[dict]) -> tuple[Any, dict[str, Tensor]]:
        batches = tensor_batches(batches)
        key = signature(batches)
        if key not in self.graphs and len(self.graphs) >= self.max_graphs:
            if not self._warned:
                message = f"cuda_graphs: more than {self.max_graphs} input shapes; new ones run without a graph"
                warnings.warn(message, stacklevel=2)
                self._warned = True
            return self.step_fn(state, batches)
        if self.state is None:
            self.state = clone_tree(state)
        else:
            copy_into(self.state, state)
        if key not in self.graphs:
            self.graphs[key] = self._record(batches)
        replay, static_batches, outputs = self.graphs[key]
        copy_into(static_batches, batches)
        replay()
        return self.state, {k: v.clone() for k, v in outputs["metrics"].items()}

    def _record(self, batches: list[dict]) -> tuple[Callable[[], None], list[dict], dict]:
        static_batches = clone_tree(batches)
        outputs: dict[str, Any] = {}

        def run() -> None:  # outputs land in the same tensors on every replay, as in a CUDA graph
            new_state, metrics = self.step_fn(self.state, static_batches)
            copy_into(self.state, new_state)
            if "metrics" in outputs:
                copy_into(outputs["metrics"], metrics)
            else:
                outputs["metrics"] = metrics

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # warm-up must not move the step's random stream
            with self.capture.warmup():
                for _ in range(self.warmup):
                    self.step_fn(self.state, static_batches)
            replay = self.capture.capture(run)
        return replay, static_batches, outputs


def graph_mode_problem(
    tcfg: TrainConfig, device: torch.device, *, world_size: int = 1, dist_backend: str = ""
) -> str | None:
    """Why the whole step cannot be captured on this run, or None when it can."""
    if device.type != "cuda":
        return f"it needs a CUDA device (this run is on {device.type})"
    if resolve_backend(tcfg.matcher_backend, device) != "device":
        return "the scipy matcher copies costs to the host; use --train.matcher-backend device (or auto)"
    if world_size > 1 and dist_backend != "nccl":
        return f"collectives on the {dist_backend or 'unknown'} backend cannot be captured (NCCL can)"
    return None


def graphed_step(
    step_fn: Step,
    tcfg: TrainConfig,
    device: torch.device,
    *,
    world_size: int = 1,
    max_graphs: int = 16,
    log: Callable[[str], None] | None = print,
) -> Step:
    """`step_fn` replayed from CUDA graphs when `tcfg.cuda_graphs` asks and the run allows, else unchanged."""
    if not tcfg.cuda_graphs:
        return step_fn
    dist_backend = ""
    if world_size > 1 and torch.distributed.is_initialized():
        dist_backend = str(torch.distributed.get_backend())
    problem = graph_mode_problem(tcfg, device, world_size=world_size, dist_backend=dist_backend)
    if problem is not None:
        if log is not None:
            log(f"--train.cuda-graphs: running the step without CUDA graphs: {problem}")
        return step_fn
    return GraphedStep(step_fn, CudaCapture(device), device=device, max_graphs=max_graphs)
