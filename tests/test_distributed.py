"""Data parallelism on CPU with gloo: two ranks train like one process on the global batch, and train-state
checkpoints move between world sizes.

One launch of `tests/dist_worker.py` under torch.distributed.run (2 processes, 127.0.0.1, a free port, a
timeout) serves every test here; the single-process reference runs in the test process itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rfdetr_fn.io.checkpoint import load_state, save_state
from rfdetr_fn.step import make_train_step
from tests import dist_worker as w

LAUNCH_TIMEOUT_S = 150  # the eager launch takes ~10-15 s on 2 cores
COMPILE_TIMEOUT_S = 400  # two ranks tracing at once: ~90 s on 2 cores
PARAM_RTOL = 1e-5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, *extra: str, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Start the ranks with the environment torchrun gives its workers (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Not through torchrun itself: its workers run in sessions of their own, so a hung run could not be
    killed from here. Each rank gets its own session; on timeout or failure every one is killed.
    """
    port = _free_port()
    procs = []
    for rank in range(w.WORLD):
        env = {
            **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(w.WORLD),
            "LOCAL_WORLD_SIZE": str(w.WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        cmd = [sys.executable, str(Path(w.__file__)), str(out), *extra]
        with open(out / f"rank{rank}.log", "w") as log:  # the child keeps its own copy of the handle
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    deadline = time.monotonic() + timeout
    codes = [None] * len(procs)
    try:  # until all exit, one fails (its peer would block in a collective) or time runs out
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs]
            if None not in codes or any(codes):
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # this rank's own session: only what we started
                proc.wait()
    if None in codes or any(codes):
        tails = "\n".join(f"--- rank {r}\n" + (out / f"rank{r}.log").read_text()[-3000:] for r in range(w.WORLD))
        why = f"failed (exit codes {codes}, None = killed)" if any(codes) else f"exceeded {timeout}s"
        pytest.fail(f"2-rank run {why}:\n{tails}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Reference: one process on the whole global batch, one thread like each rank; then the 2-rank run."""
    out = tmp_path_factory.mktemp("dist")
    cfg, tcfg = w.configs()
    step = make_train_step(cfg, tcfg, steps_per_epoch=10, world_size=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each rank's summation order, so what differs is the collective's doing
    try:
        state, history = w.train(step, w.fresh_state(), w.global_batch(), w.STEPS)
    finally:
        torch.set_num_threads(threads)
    save_state(out / "state1", state)
    _launch(out)
    ranks = [torch.load(out / f"trained_rank{r}.pt") for r in range(w.WORLD)]
    return {"out": out, "ref": w.flat_state(state), "ref_metrics": history, "ranks": ranks}


def _rel_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> float:
    """||a - b|| / ||b|| over every tensor whose key starts with `prefix`."""
    keys = sorted(k for k in b if k.startswith(prefix))
    x, y = (torch.cat([d[k].reshape(-1) for k in keys]) for d in (a, b))
    return ((x - y).norm() / y.norm()).item()


def test_ranks_hold_identical_params(run):
    a, b = (r["state"] for r in run["ranks"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"ranks diverged at {key}"
    assert int(a["step"]) == w.STEPS


def test_two_ranks_equal_one_process_on_the_global_batch(run):
    """Averaged gradients with the all-reduced box count are the global-batch gradient: same update.

    Per tensor, max|diff| <= 1e-5 * max|param| + 0.1% of one Adam step: tensors initialised at zero hold
    only updates, and Adam divides tiny gradients by their own magnitude, so their rounding shows there.
    """
    got, ref = run["ranks"][0]["state"], run["ref"]
    _, tcfg = w.configs()
    assert got.keys() == ref.keys()
    for key in (k for k in ref if k.startswith("params.")):
        bound = PARAM_RTOL * ref[key].abs().max().item() + 1e-3 * tcfg.lr
        assert (got[key] - ref[key]).abs().max().item() <= bound, key
    assert _rel_l2(got, ref, "params.") <= PARAM_RTOL
    assert _rel_l2(got, ref, "ema_state.") <= PARAM_RTOL
    assert _rel_l2(got, ref, "opt_state.exp_avg.") <= PARAM_RTOL  # the averaged (clipped) gradients
    assert _rel_l2(got, ref, "opt_state.exp_avg_sq.") <= PARAM_RTOL
    for step, (r0, r1, one) in enumerate(zip(*(r["metrics"] for r in run["ranks"]), run["ref_metrics"])):
        # logged losses are averaged over ranks inside the step: every rank reports the global-batch loss
        # (class_error is a per-shard accuracy: its rank mean weights the shards equally, not by box count)
        for key in one.keys() - {"lr_factor", "finite", "class_error"}:
            assert r0[key] == r1[key] == pytest.approx(one[key], rel=1e-5), (step, key)
        assert r0["class_error"] == r1["class_error"]
        assert r0["grad_norm"] == r1["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5), step


def test_ranks_train_on_distinct_shards(run):
    labels = [r["labels"] for r in run["ranks"]]
    assert not torch.equal(labels[0], labels[1])
    assert torch.equal(torch.cat(labels), w.global_batch()["labels"])


def test_state_saved_by_two_ranks_loads_in_one_process(run):
    loaded = w.flat_state(load_state(run["out"] / "state2", w.fresh_state()))
    saved = run["ranks"][0]["state"]
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


def test_state_saved_by_one_process_loads_in_two_ranks(run):
    for rank in range(w.WORLD):
        loaded = torch.load(run["out"] / f"loaded_rank{rank}.pt")["state"]
        assert loaded.keys() == run["ref"].keys()
        for key, value in run["ref"].items():
            assert torch.equal(loaded[key], value), (rank, key)


@pytest.mark.slow
def test_compiled_step_traces_the_collectives(tmp_path):
    """fullgraph aot_eager compile of the 2-rank step (all-reduces inside the graph) matches one process."""
    cfg, tcfg = w.configs()
    step = make_train_step(cfg, tcfg, steps_per_epoch=10, world_size=1)
    state, history = w.train(step, w.fresh_state(), w.global_batch(), 1)
    ref = w.flat_state(state)
    _launch(tmp_path, "compile", timeout=COMPILE_TIMEOUT_S)
    ranks = [torch.load(tmp_path / f"compiled_rank{r}.pt") for r in range(w.WORLD)]
    for key in ref:
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    assert _rel_l2(ranks[0]["state"], ref, "params.") <= PARAM_RTOL
    assert _rel_l2(ranks[0]["state"], ref, "opt_state.exp_avg.") <= PARAM_RTOL
    r0, r1 = (r["metrics"][0] for r in ranks)
    assert r0["loss"] == r1["loss"] == pytest.approx(history[0]["loss"], rel=1e-5)
    assert r0["grad_norm"] == pytest.approx(history[0]["grad_norm"], rel=1e-5)


def test_device_flag_picks_the_gpu_it_names():
    """`--device cuda:N` is GPU N (the help promises it); plain `cuda` is cuda:LOCAL_RANK under torchrun."""
    from rfdetr_fn.io.distributed import pick_device

    pick = pick_device
    assert pick("cuda:1", local_rank=0, world_size=1, cuda_available=True) == torch.device("cuda", 1)
    assert pick("cuda", local_rank=3, world_size=4, cuda_available=True) == torch.device("cuda", 3)
    assert pick(None, local_rank=2, world_size=4, cuda_available=True) == torch.device("cuda", 2)
    assert pick(None, local_rank=0, world_size=1, cuda_available=False) == torch.device("cpu")
    assert pick("cpu", local_rank=1, world_size=2, cuda_available=True) == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda:1: under torchrun"):
        pick("cuda:1", local_rank=0, world_size=2, cuda_available=True)
