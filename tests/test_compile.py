"""Compilation: the regional step equals the eager one, the cache key tracks the graph, artifacts survive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch

import rfdetr_fn as rf
from rfdetr_fn import compiler, tree
from rfdetr_fn.config import TrainConfig
from rfdetr_fn.eval.inference import forward_fn
from rfdetr_fn.model.precision import compute_kind
from rfdetr_fn.step import compile_step, grad_and_value, make_train_step
from tests.test_train import _run, _tiny_setup

ROOT = Path(__file__).resolve().parents[1]


def _key(cfg, tcfg, device="cpu", precision="fp32") -> str:
    step = make_train_step(cfg, tcfg, steps_per_epoch=10, precision=precision)
    return compiler.cache_key(cfg, step.settings, device=device, inputs={"batch_size": tcfg.batch_size})


def test_cache_key_follows_what_the_step_reads_only():
    """The key hashes the records the compiled pieces read (LossConfig, UpdateConfig, drop path, precision):
    a field that shapes the step changes it, one it never reads does not, with no list of fields kept."""
    cfg, tcfg = rf.presets.tiny(), TrainConfig()
    key = _key(cfg, tcfg)
    assert key == _key(cfg, tcfg)
    changed = [
        _key(attrs.evolve(cfg, resolution=256), tcfg),
        _key(cfg, attrs.evolve(tcfg, batch_size=8)),  # an input shape (the call site adds it)
        _key(cfg, attrs.evolve(tcfg, lr=2e-4)),  # a graph constant of the update
        _key(cfg, attrs.evolve(tcfg, epochs=3)),  # the schedule
        _key(cfg, attrs.evolve(tcfg, giou_loss_coef=1.0)),  # the loss record
        _key(cfg, attrs.evolve(tcfg, ema_decay=0.9)),  # the update record
        _key(cfg, attrs.evolve(tcfg, drop_path=0.1)),
        _key(cfg, tcfg, precision="fp16"),
        _key(cfg, tcfg, device="meta"),
    ]
    assert len({key, *changed}) == len(changed) + 1
    loop_only = attrs.evolve(tcfg, output_dir="elsewhere", seed=7, compile="on", compile_cache="/x", eval_interval=3)
    assert _key(cfg, loop_only) == key


def test_cache_reads_only_its_own_key(tmp_path, capsys):
    """Artifacts of another config are never loaded; a corrupt file costs a recompile, not the run."""
    mine = compiler.CompileCache(tmp_path, "key_a")
    other = tmp_path / "key_b"
    other.mkdir()
    (other / "0.bin").write_bytes(b"not an artifact")
    assert mine.load() == 0
    (tmp_path / "key_a").mkdir()
    (tmp_path / "key_a" / "1.bin").write_bytes(b"corrupt")
    assert mine.load() == 0
    assert f"ignoring {tmp_path / 'key_a' / '1.bin'}" in capsys.readouterr().out
    assert mine.save_if_new() is None  # nothing compiled since the load


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RFDETR_FN_CACHE", str(tmp_path / "c"))
    assert compiler.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RFDETR_FN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compiler.default_cache_dir() == tmp_path / "rfdetr_fn" / "compile"


def test_use_compile_auto_follows_measurements(monkeypatch):
    cpu = "cpu fp32"
    monkeypatch.delitem(compiler.MEASURED, cpu, raising=False)
    assert not compiler.use_compile("auto", cpu) and not compiler.use_compile("auto", cpu, "inference")
    monkeypatch.setitem(compiler.MEASURED, cpu, compiler.Measured(300.0, 20.0, 1.14, 1.6, 60.0, 5.0))
    assert not compiler.use_compile("auto", cpu), "a step win below 1.25x does not pay minutes of compile"
    assert compiler.use_compile("auto", cpu, "inference")
    monkeypatch.setitem(compiler.MEASURED, cpu, compiler.Measured(300.0, 20.0, 1.3, 1.41, 60.0, 5.0))
    assert compiler.use_compile("auto", cpu) and not compiler.use_compile("auto", cpu, "inference")
    assert compiler.use_compile("on", cpu) and not compiler.use_compile("off", cpu)
    with pytest.raises(ValueError, match="compile='yes'"):
        compiler.use_compile("yes", cpu)


def test_auto_compile_is_decided_per_kind_of_compute(monkeypatch):
    """The same device type can be measured twice: fp32, and bf16 on a CPU whose bf16 GEMMs run on matrix
    units (the small ops inductor fuses are then most of the time); an unmeasured kind stays eager."""
    cpu, amx, skylake = torch.device("cpu"), ["avx512f", "avx512_bf16", "amx_bf16"], ["avx2", "avx512f"]
    assert compute_kind(cpu, "fp32", amx) == "cpu fp32"
    assert compute_kind(cpu, "bf16", amx) == "cpu bf16 amx_bf16"
    assert compute_kind(cpu, "bf16", ["avx512_bf16"]) == "cpu bf16 avx512_bf16"
    assert compute_kind(cpu, "bf16", skylake) == "cpu bf16 emulated"
    assert compute_kind(torch.device("meta"), "bf16") == "meta bf16"
    monkeypatch.setitem(compiler.MEASURED, "cpu fp32", compiler.Measured(300.0, 20.0, 1.1, 1.2, 60.0, 5.0))
    monkeypatch.setitem(compiler.MEASURED, "cpu bf16 amx_bf16", compiler.Measured(300.0, 20.0, 1.1, 1.6, 60.0, 5.0))
    assert compiler.use_compile("auto", compute_kind(cpu, "bf16", amx), "inference")
    assert not compiler.use_compile("auto", compute_kind(cpu, "fp32", amx), "inference")
    assert not compiler.use_compile("auto", compute_kind(cpu, "bf16", skylake), "inference")


@pytest.mark.slow
def test_regional_step_matches_eager_without_recompiles():
    """aot_eager traces the graphs inductor compiles: the loss (with its nested regions) and the update."""
    cfg, tcfg, batch = _tiny_setup()
    step = make_train_step(cfg, tcfg, steps_per_epoch=10)
    assert_compiled_step_equals_eager(step, lambda: step.init(rf.init(cfg, 0)), batch, steps=3)


def assert_compiled_step_equals_eager(step, fresh_state, batch, steps: int) -> None:
    """compile_step(step, backend="aot_eager") from `fresh_state()`: no graph break, no recompile after the
    first step, and the losses and final state of `steps` steps equal eager's."""
    import torch._dynamo.utils as dutils

    eager_state, eager = _run(step, fresh_state(), batch, steps)
    torch._dynamo.reset()
    dutils.counters.clear()
    compiled = compile_step(step, backend="aot_eager")
    state, first = _run(compiled, fresh_state(), batch, 1)
    graphs = dutils.counters["stats"]["unique_graphs"]
    state, rest = _run(compiled, state, batch, steps - 1)
    assert dutils.counters["stats"]["unique_graphs"] == graphs, "the step recompiled after warm-up"
    assert dict(dutils.counters["graph_break"]) == {}
    assert first + rest == pytest.approx(eager, rel=1e-5)
    for key, want in tree.flatten(eager_state).items():
        got = tree.flatten(state)[key]
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), key


@pytest.mark.slow
@pytest.mark.inductor
def test_inductor_step_equals_eager_losses_grads_and_state():
    """One inductor-compiled step (regional): loss terms, every gradient and the new state equal eager."""
    cfg, tcfg, batch = _tiny_setup()
    step = make_train_step(cfg, tcfg, steps_per_epoch=10)
    compiled = compile_step(step)
    state = step.init(rf.init(cfg, 0))
    scale, key = torch.ones(()), state["seed"]
    trainable, frozen = step.pieces.split(state["params"])
    got_g, (_, (_, got_l)) = grad_and_value(compiled.pieces.loss)(trainable, frozen, batch, scale, key)
    want_g, (_, (_, want_l)) = grad_and_value(step.pieces.loss)(trainable, frozen, batch, scale, key)
    for key in want_l:
        assert got_l[key].item() == pytest.approx(want_l[key].item(), rel=1e-5, abs=1e-7), key
    for key, want in tree.flatten(want_g).items():
        bound = 1e-4 * want.abs().max().item() + 1e-9
        assert (tree.flatten(got_g)[key] - want).abs().max().item() <= bound, key
    new_c, _ = compiled(state, [batch])
    new_e, _ = step(step.init(rf.init(cfg, 0)), [batch])
    for key, want in tree.flatten(new_e).items():
        assert torch.allclose(tree.flatten(new_c)[key], want, rtol=1e-4, atol=1e-6), key


def test_compiled_bf16_forward_runs_autocast_inside_the_graph(tmp_path):
    """The compiled forward keeps the precision: bf16 autocast traced into the graph (aot_eager: the graph
    inductor would compile), float32 outputs, close to the eager bf16 forward, not to the fp32 one."""
    cfg = rf.presets.tiny(num_classes=3, resolution=64)
    params = rf.init(cfg, 0)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = forward_fn(cfg, "cpu", precision="bf16")(params, x, None)
        fp32 = forward_fn(cfg, "cpu")(params, x, None)
        compiled = forward_fn(cfg, "cpu", compile=True, cache_dir=tmp_path, backend="aot_eager", precision="bf16")
        got = compiled(params, x, None)
    assert got["pred_boxes"].dtype == got["pred_logits"].dtype == torch.float32
    # measured (EPYC, AVX512-BF16): logits' median difference 0 to eager bf16, 0.019 to fp32; a few of the
    # tiny model's 20 queries flip their two-stage proposal between any two of the three, so no max bound
    to_bf16 = (got["pred_logits"] - eager["pred_logits"]).abs().median()
    to_fp32 = (got["pred_logits"] - fp32["pred_logits"]).abs().median()
    assert to_bf16 < 0.25 * to_fp32


_SECOND_PROCESS = """
import json, sys, time
import torch
import rfdetr_fn as rf
from rfdetr_fn import compiler
from rfdetr_fn.eval.inference import forward_fn
cfg = rf.presets.tiny(num_classes=3, resolution=64)
cache_dir = sys.argv[1]
params = rf.init(cfg, 0)
x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
out = forward_fn(cfg, "cpu", compile=True, cache_dir=cache_dir)(params, x, None)
seconds = time.perf_counter() - start
want = rf.apply(params, x, None, cfg, train=False)
from torch._dynamo.utils import counters
print(json.dumps({
    "seconds": seconds,
    "diff": (out["pred_boxes"] - want["pred_boxes"]).abs().max().item(),
    "fx_hits": counters["inductor"]["fxgraph_cache_hit"],
    "aot_hits": counters["aot_autograd"]["autograd_cache_hit"],
    "files": len(list(__import__("pathlib").Path(cache_dir).rglob("*.bin"))),
}))
"""


@pytest.mark.slow
@pytest.mark.inductor
def test_second_process_loads_the_compiled_artifacts(tmp_path):
    """Process 1 compiles the forward and saves artifacts; process 2, with empty inductor caches of its
    own, loads them and hits the caches instead of compiling."""

    def run(name: str) -> dict:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / name), "TRITON_CACHE_DIR": str(tmp_path / name)}
        done = subprocess.run(
            [sys.executable, "-c", _SECOND_PROCESS, str(tmp_path / "artifacts")],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    cold, warm = run("first"), run("second")
    assert cold["files"] >= 1 and cold["diff"] < 1e-4 and warm["diff"] < 1e-4
    assert cold["fx_hits"] == 0 and warm["fx_hits"] >= 1
    assert warm["seconds"] < cold["seconds"]


def test_regions_are_an_argument_of_each_compile_call_never_a_global():
    """Nested regions are on for the compiled function that asked for them, only while it runs: another
    compiled function (or a plain torch.compile, or eager code) never sees the setting. inductor's default
    is off (torch 2.13 gave wrong LayerNorm weight gradients for repeated regions, RESULTS.md)."""
    from torch._dynamo.testing import CompileCounter

    @compiler.region
    def block(x):
        return x * 2

    def f(x):
        return block(x) + (100 if compiler._REGIONS.on else 1)  # what the trace saw, baked into the graph

    counter = CompileCounter()
    with_regions = compiler.compile_fn(f, backend=counter, regions=True)
    without = compiler.compile_fn(lambda x: f(x), backend=counter, regions=False)
    x = torch.ones(3)
    for _ in range(2):  # alternating calls: each keeps its own setting, traced once each
        assert torch.equal(with_regions(x), x * 2 + 100) and torch.equal(without(x), x * 2 + 1)
    assert counter.frame_count == 2 and compiler._REGIONS.on is False
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))
    assert compiler.regions_default("inductor") is False and compiler.regions_default("aot_eager") is True


def test_compile_cache_keeps_inductor_kernels_beside_the_artifacts(monkeypatch, tmp_path):
    """The compiled CPU kernels (.so) are not inside the artifact files: inductor's folder moves into the
    compile cache so a second run finds them, unless the user chose TORCHINDUCTOR_CACHE_DIR."""
    monkeypatch.setattr(compiler, "_USER_INDUCTOR_DIR", None)
    # torch writes its default into the variable at its first look (importing inductor's config does that)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch_default"))
    compiler.CompileCache(tmp_path / "cache", "k").load()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "cache" / "inductor").resolve())
    mine = str(tmp_path / "mine")
    monkeypatch.setattr(compiler, "_USER_INDUCTOR_DIR", mine)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", mine)
    compiler.CompileCache(tmp_path / "other", "k").load()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == mine


def test_announce_quotes_the_measured_piece(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(compiler.MEASURED, "cpu fp32", compiler.Measured(246.0, 22.7, 1.14, 1.41, 78.8, 5.8))
    cache = compiler.CompileCache(tmp_path, "k")
    compiler.announce("the train step", "cpu fp32", cache, 0)
    compiler.announce("the forward pass", "cpu fp32", cache, 0, piece="inference")
    compiler.announce("the forward pass", "cpu fp32", cache, 2, piece="inference")
    compiler.announce("the train step", "meta bf16", None, 0)
    step, forward, warm, unmeasured = capsys.readouterr().out.splitlines()
    assert "about 246 s" in step and "about 79 s" in forward and "6 s for Nano" in warm
    assert "not measured on meta bf16" in unmeasured
