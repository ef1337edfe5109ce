"""The device-resident assignment solver against scipy on thousands of random and adversarial problems."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from rfdetr_fn.losses import assignment
from rfdetr_fn.losses.assignment import assign_device, hungarian, sanitize_cost, shortest_augmenting_paths
from rfdetr_fn.losses.matcher import assign


def scipy_answer(cost: Tensor, n_valid: Tensor) -> tuple[Tensor, Tensor]:
    """(N, T) answer and (N,) optimal total cost, straight from scipy on each problem."""
    out = torch.full((cost.shape[0], cost.shape[2]), -1, dtype=torch.int64)
    best = torch.zeros(cost.shape[0], dtype=torch.float64)
    for i, count in enumerate(n_valid.tolist()):
        if count:
            block = sanitize_cost(cost[i, :, :count].double().numpy())
            rows, cols = linear_sum_assignment(block)
            out[i, cols] = torch.from_numpy(rows)
            best[i] = float(block[rows, cols].sum())
    return out, best


def total_cost(cost: Tensor, answer: Tensor) -> Tensor:
    """Summed cost of an (N, T) answer; checks it is a matching (distinct queries, padding unmatched)."""
    used = answer >= 0
    for row in answer:
        picked = row[row >= 0]
        assert picked.unique().numel() == picked.numel(), f"a query is matched twice: {row.tolist()}"
    gathered = cost.double().gather(1, answer.clamp(min=0)[:, None, :]).squeeze(1)
    return torch.where(used, gathered, 0.0).sum(1)


def problems(n: int, queries: int, targets: int, seed: int, kind: str = "uniform") -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        cost = torch.rand(n, queries, targets, generator=gen)
    elif kind == "ties":  # a handful of integer levels: many optima
        cost = torch.randint(0, 3, (n, queries, targets), generator=gen).float()
    elif kind == "range":  # 1e-6 .. 1e6, both signs
        cost = torch.randn(n, queries, targets, generator=gen).sign() * 10 ** (
            torch.rand(n, queries, targets, generator=gen) * 12 - 6
        )
    elif kind == "constant":  # every assignment optimal
        cost = torch.full((n, queries, targets), 0.5)
    else:
        raise ValueError(kind)
    n_valid = torch.randint(0, targets + 1, (n,), generator=gen)
    n_valid[:3] = torch.tensor([0, targets, min(1, targets)])[:n]
    return cost, n_valid


SHAPES = [(800, 12, 8), (400, 6, 6), (200, 25, 20), (40, 300, 8), (200, 3, 1)]


@pytest.mark.parametrize(("n", "queries", "targets"), SHAPES)
def test_assign_device_equals_scipy_on_random_costs(n, queries, targets):
    """Continuous random costs have a unique optimum (with probability 1): the answers are identical."""
    cost, n_valid = problems(n, queries, targets, seed=queries * 100 + targets)
    expected, _ = scipy_answer(cost, n_valid)
    assert torch.equal(assign_device(cost, n_valid), expected)
    assert torch.equal(hungarian(cost, n_valid), expected)


@pytest.mark.parametrize("kind", ["ties", "range", "constant"])
@pytest.mark.parametrize(("n", "queries", "targets"), [(500, 10, 7), (300, 5, 5), (100, 30, 24)])
def test_assign_device_is_optimal_on_adversarial_costs(kind, n, queries, targets):
    """Ties, constant and wide-range costs: an optimum of scipy's cost (the same answer where unique)."""
    cost, n_valid = problems(n, queries, targets, seed=targets, kind=kind)
    expected, best = scipy_answer(cost, n_valid)
    found = assign_device(cost, n_valid)
    assert torch.equal(found < 0, expected < 0)
    assert torch.allclose(total_cost(cost, found), best, rtol=1e-12, atol=1e-9)
    if kind == "range":  # distinct magnitudes: the optimum is unique
        assert torch.equal(found, expected)


def test_assign_device_breaks_ties_like_scipy():
    """All-equal costs: scipy gives target t query t; so does the device solver (free, lowest index first)."""
    cost = torch.zeros(1, 5, 3)
    assert assign_device(cost, torch.tensor([3])).tolist() == [[0, 1, 2]] == hungarian(cost, torch.tensor([3])).tolist()


def test_assign_device_sanitises_non_finite_costs_like_scipy_path():
    cost = torch.tensor([[[float("nan"), 1.0, 5.0], [2.0, float("inf"), 0.5], [3.0, 4.0, -float("inf")]]])
    assert assign_device(cost, torch.tensor([3])).tolist() == hungarian(cost, torch.tensor([3])).tolist() == [[2, 0, 1]]
    cleaned = assignment.sanitize_cost_batched(cost.double(), torch.tensor([3]))
    assert cleaned.max().item() == pytest.approx(sanitize_cost(cost[0].double().numpy()).max())
    all_bad = torch.full((1, 2, 2), float("nan"))
    assert sorted(assign_device(all_bad, torch.tensor([2]))[0].tolist()) == [0, 1]


def test_assign_device_ignores_padding_columns_and_rejects_more_slots_than_queries():
    padded = torch.tensor([[[0.0, 9.0, 3.0], [9.0, 0.0, 3.0], [5.0, 5.0, 5.0]]])  # column 2 is padding
    assert assign_device(padded, torch.tensor([2])).tolist() == [[0, 1, -1]]
    with pytest.raises(ValueError, match="target slots exceed"):
        assign_device(torch.zeros(1, 2, 3), torch.tensor([2]))


def test_assign_device_has_no_host_round_trips():
    """Inside a CUDA graph nothing may read a device value on the host: no item/nonzero/masked_select."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    cost, n_valid = problems(8, 6, 4, seed=1)
    with Watch():
        shortest_augmenting_paths(assignment.sanitize_cost_batched(cost.double(), n_valid).transpose(1, 2), n_valid)
    assert seen & {"_local_scalar_dense", "item", "nonzero", "masked_select", "lift_fresh", "lift_fresh_copy"} == set()


def test_assign_device_is_an_opaque_op_with_a_fake():
    cost, n_valid = problems(4, 5, 3, seed=2)
    torch.library.opcheck(assign_device, (cost, n_valid), test_utils=("test_schema", "test_faketensor"))


def test_assign_backends_agree_through_the_matcher():
    """`assign` (valid targets anywhere in the slot axis, G groups) gives the same indices on both backends."""
    gen = torch.Generator().manual_seed(3)
    total = torch.rand(3, 4 * 7, 6, generator=gen)
    valid = torch.rand(3, 6, generator=gen) > 0.4
    valid[0] = False
    scipy_idx = assign(total, valid, 4, backend="scipy")
    assert torch.equal(assign(total, valid, 4, backend="device"), scipy_idx)
    assert (scipy_idx[~valid[:, None, :].expand(-1, 4, -1)] == -1).all()


def test_assign_backend_resolution():
    assert assignment.resolve_backend("auto", torch.device("cpu")) == "scipy"
    assert assignment.resolve_backend("auto", torch.device("cuda")) == "device"
    assert assignment.resolve_backend("scipy", torch.device("cuda")) == "scipy"
    with pytest.raises(ValueError, match="matcher backend"):
        assignment.resolve_backend("gpu", torch.device("cpu"))


def test_assign_device_float32_input_is_solved_in_float64():
    """Costs 1e-9 apart are equal in float32 (which would give the tie answer [0, 1]); float64 sees the gap."""
    cost = torch.tensor([[[1.0 + 1e-9, 1.0], [1.0, 1.0 + 1e-9]]], dtype=torch.float64)
    assert assign_device(cost, torch.tensor([2])).tolist() == [[1, 0]] == hungarian(cost, torch.tensor([2])).tolist()
    assert assign_device(cost.float(), torch.tensor([2])).tolist() == [[0, 1]]


def test_assign_triton_kernel_equals_scipy_under_the_interpreter():
    """The CUDA kernel's logic, run by Triton's interpreter on one mixed batch (it is slow: small problems).

    Queries == targets (5 x 5); random, integer-tie, wide-range and constant costs; 0 to 5 targets.
    """
    from rfdetr_fn.kernels import assign_triton

    gen = torch.Generator().manual_seed(11)
    parts = [problems(6, 5, 5, seed=1)[0], problems(4, 5, 5, seed=2, kind="ties")[0]]
    parts += [problems(4, 5, 5, seed=3, kind="range")[0], problems(2, 5, 5, seed=4, kind="constant")[0]]
    cost = torch.cat(parts).double()
    n_valid = torch.randint(1, 6, (16,), generator=gen)
    n_valid[[0, 6, 10, 14, 15]] = torch.tensor([0, 5, 5, 5, 5])
    expected, best = scipy_answer(cost, n_valid)
    found = assign_triton.solve(cost.transpose(1, 2).contiguous(), n_valid)
    assert torch.equal(found < 0, expected < 0)
    assert torch.allclose(total_cost(cost, found), best, rtol=1e-12, atol=1e-9)
    unique = list(range(6)) + list(range(10, 14))  # continuous costs: one optimum
    assert torch.equal(found[unique], expected[unique])
    assert torch.equal(found[14:], torch.tensor([[0, 1, 2, 3, 4]] * 2))  # all-equal costs: scipy's tie answer


def test_assign_triton_kernel_compiles_for_cuda_without_a_gpu():
    """Compiled for sm_80 and sm_90 as a GPU would (CPU CI otherwise only interprets it): float64
    throughout (no demotion to float32), loops on the device, no atomics."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton build has no CUDA backend")
    worker = Path(__file__).with_name("triton_ptx_worker.py")
    done = subprocess.run([sys.executable, str(worker), "80,90", "assign"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for arch, kernels in json.loads(done.stdout.strip().splitlines()[-1]).items():
        ops = kernels["_sap_kernel"]
        assert ops.get("min.f64", 0) > 0 and ops.get("sub.f64", 0) > 0, arch
        assert not any(op.startswith("cvt") and "f32.f64" in op for op in ops), arch
        assert ops.get("bra", 0) >= 3, arch  # the row loop, the Dijkstra loop and the path flip
        assert not any(op.startswith(("atom.", "red.")) for op in ops), arch


def test_assign_device_traces_as_one_graph():
    """Dynamo traces the device solve as one opaque node (fullgraph: no break); its fake is checked by opcheck."""
    gen = torch.Generator().manual_seed(5)
    total = torch.rand(2, 3 * 6, 4, generator=gen)
    valid = torch.tensor([[True, True, False, True], [False, False, False, False]])
    fn = torch.compile(lambda t, v: assign(t, v, 3, backend="device"), fullgraph=True, backend="eager")
    assert torch.equal(fn(total, valid), assign(total, valid, 3, backend="scipy"))
