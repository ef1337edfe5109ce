"""Whole-step graph mode: buffer copy-in/out, per-shape graphs, warm-up and fallbacks, with the capture
stubbed on CPU (`EagerCapture` replays by running the recorded function again on the same buffers)."""

from __future__ import annotations

import pytest
import torch

import rfdetr_fn as rf
from rfdetr_fn import rng, tree
from rfdetr_fn.config import TrainConfig
from rfdetr_fn.step import make_train_step
from rfdetr_fn.train import graphs
from rfdetr_fn.train.graphs import EagerCapture, GraphedStep, graph_mode_problem, graphed_step

CPU = torch.device("cpu")


def toy_step(state, batches):
    """Same contract as the train step: pure, random from a key in the state (like drop path), accumulates
    over micro-batches."""
    grad = sum((b["images"].mean() - state["params"]["w"]) * b["labels"].float().mean() for b in batches)
    noise = rng.uniform(rng.mix(7, state["step"]), tuple(state["params"]["w"].shape)) * 1e-3
    new = {
        "step": state["step"] + 1,
        "params": {"w": state["params"]["w"] + 0.1 * grad + noise},
        "ema_state": state["ema_state"],  # passed through untouched, as with use_ema=False
    }
    return new, {"loss": grad.sum(), "finite": torch.isfinite(grad).all()}


def toy_state():
    return {"step": torch.zeros((), dtype=torch.int64), "params": {"w": torch.zeros(3)}, "ema_state": {}}


def toy_batches(size: int, seed: int, micro: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "images": torch.rand(2, 3, size, size, generator=gen),
            "labels": torch.randint(0, 4, (2, 5), generator=gen),
            "image_id": [seed, seed + 1],  # host-side fields are not step inputs
        }
        for _ in range(micro)
    ]


def run_plain(step, state, plan):
    out = []
    for i, (size, micro) in enumerate(plan):
        state, metrics = step(state, toy_batches(size, i, micro))
        out.append((state["params"]["w"].clone(), {k: v.clone() for k, v in metrics.items()}))
    return out


PLAN = [(4, 1), (6, 1), (4, 1), (6, 2), (4, 1), (6, 2), (6, 1)]  # two sizes and an accumulation count


def test_graph_step_equals_plain_step_over_sizes_and_accumulation():
    graphed = GraphedStep(toy_step, EagerCapture(), device=CPU, warmup=2)
    want = run_plain(toy_step, toy_state(), PLAN)
    got = run_plain(graphed, toy_state(), PLAN)
    for (w_want, m_want), (w_got, m_got) in zip(want, got):
        assert torch.equal(w_got, w_want)
        assert m_got.keys() == m_want.keys() and all(torch.equal(m_got[k], m_want[k]) for k in m_want)
    assert len(graphed.graphs) == 3  # (4, 1), (6, 1), (6, 2): one capture per input signature


def test_graph_step_donates_only_its_own_state():
    """The caller's first state is copied, never written; the returned state is the static one, reused in place."""
    graphed = GraphedStep(toy_step, EagerCapture(), device=CPU, warmup=1)
    first = toy_state()
    torch.manual_seed(0)
    state, metrics = graphed(first, toy_batches(4, 0))
    assert torch.equal(first["params"]["w"], torch.zeros(3)) and int(first["step"]) == 0
    static_w = state["params"]["w"]
    assert static_w is graphed.state["params"]["w"] and int(state["step"]) == 1  # warm-up did not count
    kept = metrics["loss"].clone()
    state, later = graphed(state, toy_batches(4, 1))
    assert state["params"]["w"] is static_w and int(state["step"]) == 2
    assert torch.equal(metrics["loss"], kept) and not torch.equal(later["loss"], kept)  # copies, not buffers
    rebuilt = {**state, "step": torch.tensor(10)}  # a new leaf is copied in, the others are skipped
    state, _ = graphed(rebuilt, toy_batches(4, 2))
    assert int(state["step"]) == 11


def test_graph_step_warmup_leaves_the_random_stream_alone():
    graphed = GraphedStep(toy_step, EagerCapture(), device=CPU, warmup=3)
    torch.manual_seed(5)
    state, _ = graphed(toy_state(), toy_batches(4, 0))
    torch.manual_seed(5)
    want, _ = toy_step(toy_state(), toy_batches(4, 0))
    assert torch.equal(state["params"]["w"], want["params"]["w"])


def test_graph_step_rejects_a_changed_state_and_caps_the_graph_count():
    graphed = GraphedStep(toy_step, EagerCapture(), device=CPU, max_graphs=1)
    state, _ = graphed(toy_state(), toy_batches(4, 0))
    with pytest.raises(ValueError, match="tensor changed"):
        graphed({**state, "params": {"w": torch.zeros(4)}}, toy_batches(4, 0))
    with pytest.raises(ValueError, match="tree changed"):
        graphed({**state, "extra": torch.zeros(())}, toy_batches(4, 0))
    with pytest.warns(UserWarning, match="more than 1 input shapes"):
        other, _ = graphed(state, toy_batches(6, 0))
    assert len(graphed.graphs) == 1 and other["params"]["w"] is not graphed.state["params"]["w"]


def test_graph_mode_fallback_reasons():
    tcfg = TrainConfig(cuda_graphs=True)
    cuda = torch.device("cuda")
    assert "CUDA device" in graph_mode_problem(tcfg, CPU)
    assert "scipy matcher" in graph_mode_problem(TrainConfig(cuda_graphs=True, matcher_backend="scipy"), cuda)
    assert graph_mode_problem(tcfg, cuda) is None
    assert "gloo" in graph_mode_problem(tcfg, cuda, world_size=2, dist_backend="gloo")
    assert graph_mode_problem(tcfg, cuda, world_size=2, dist_backend="nccl") is None
    said: list[str] = []
    assert graphed_step(toy_step, tcfg, CPU, log=said.append) is toy_step
    assert said and "without CUDA graphs" in said[0]
    assert graphed_step(toy_step, TrainConfig(), CPU, log=said.append) is toy_step and len(said) == 1


def test_graph_signature_ignores_values_and_host_fields():
    a, b = graphs.tensor_batches(toy_batches(4, 0)), graphs.tensor_batches(toy_batches(4, 1))
    assert "image_id" not in a[0] and graphs.signature(a) == graphs.signature(b)
    assert graphs.signature(a) != graphs.signature(graphs.tensor_batches(toy_batches(6, 0)))


@pytest.mark.slow
def test_graph_mode_train_step_equals_eager_on_cpu():
    """The real step (device matcher, EMA, accumulation) through the stubbed graph equals the plain step."""
    cfg = rf.presets.tiny(num_classes=3, resolution=64)
    tcfg = TrainConfig(batch_size=2, multi_scale="off", matcher_backend="device", drop_path=0.1)
    step = make_train_step(cfg, tcfg, steps_per_epoch=10)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.randn(2, 3, 64, 64, generator=gen),
        "mask": torch.zeros(2, 64, 64, dtype=torch.bool),
        "labels": torch.tensor([[0, 2, -1, -1], [1, -1, -1, -1]]),
        "boxes": torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]] + [[0.5] * 4] * 2, [[0.5] * 4] * 4]),
    }
    graphed = GraphedStep(step, EagerCapture(), device=CPU, warmup=1)
    plain_state, graph_state = step.init(rf.init(cfg, 0)), step.init(rf.init(cfg, 0))
    for micro in [1, 2]:
        plain_state, want = step(plain_state, [batch] * micro)
        graph_state, got = graphed(graph_state, [batch] * micro)
        assert torch.equal(got["loss"], want["loss"])
    flat_want, flat_got = tree.flatten(plain_state), tree.flatten(graph_state)
    assert all(torch.equal(flat_got[k], flat_want[k]) for k in flat_want)
