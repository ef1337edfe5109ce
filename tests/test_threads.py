"""fit and predict size torch's intra-op pool from the cores this process may use; loader workers yield."""

from __future__ import annotations

import torch

from rfdetr_fn.data import loader
from rfdetr_fn.io import distributed
from rfdetr_fn.io.distributed import World


def test_threads_follow_affinity_unless_omp_num_threads_is_set(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
        assert distributed.available_cores() == 3
        assert distributed.set_threads(World(0, 1, torch.device("cpu"))) == 3
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine share the cores
        torch.set_num_threads(7)
        assert distributed.set_threads(World(0, 2, torch.device("cpu"))) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's (or torchrun's) choice wins
        torch.set_num_threads(5)
        assert distributed.set_threads(World(0, 1, torch.device("cpu"))) == 5
    finally:
        torch.set_num_threads(before)


def test_loader_workers_run_at_lower_priority(monkeypatch):
    calls = []
    monkeypatch.setattr(loader.os, "nice", calls.append)
    kwargs = loader._loader_kwargs([], 2)
    kwargs["worker_init_fn"](0)
    assert calls == [loader.WORKER_NICE] and loader.WORKER_NICE > 0
    assert loader._loader_kwargs([], 0)["worker_init_fn"] is None
