"""Weight import/export (upstream .pth/.ckpt, safetensors) and atomic DCP train-state checkpoints."""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import attrs
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rfdetr_fn import presets, tree
from rfdetr_fn.config import ModelConfig
from rfdetr_fn.io import adapt, checkpoint, formats, weights
from rfdetr_fn.model.backbone import resize_pos_embed
from tests.golden import reference_shapes

PE_KEY = "backbone.0.encoder.encoder.embeddings.position_embeddings"


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict:
    """The tiny_det files plus the ModelConfig that config.json describes."""
    d = golden_dir / "tiny_det"
    info = json.loads((d / "config.json").read_text())
    mc = info["model_config"]
    shared = {k: mc[k] for k in formats._UPSTREAM_FIELDS}
    shared = {k: tuple(v) if isinstance(v, list) else v for k, v in shared.items()}
    enc = info["encoder_overrides"]
    cfg = ModelConfig(
        name="nano", **shared, vit_hidden_size=enc["hidden_size"], vit_num_layers=enc["num_hidden_layers"],
        vit_num_heads=enc["num_attention_heads"], vit_mlp_ratio=enc["mlp_ratio"],
        dim_feedforward=info["model_defaults"]["dim_feedforward"],
    )  # fmt: skip
    flat = load_file(str(d / "weights.safetensors"))
    flat.pop(formats.KP_MASK)
    return {"dir": d, "cfg": cfg, "weights": flat, "names": info["class_names"], "info": info}


def assert_same(a: dict, b: dict) -> None:
    """Bit-identical flat dicts (same keys, dtypes, shapes and bytes)."""
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def upstream_file(path: Path, sd: dict, **payload) -> Path:
    torch.save({"model": {formats.KP_MASK: torch.zeros(0, 0, dtype=torch.bool), **sd}, **payload}, path)
    return path


# ---------------------------------------------------------------- loading upstream files


def test_golden_checkpoint_equals_weights_and_config(golden):
    with pytest.warns(UserWarning, match="vit_num_heads=1 is assumed"):
        cfg, params = weights.load_weights(golden["dir"] / "checkpoint.pth")
    # Head count is the one thing the file cannot tell (2 in the golden model; DINOv2 convention gives 1).
    assert attrs.evolve(cfg, vit_num_heads=2) == golden["cfg"]
    assert_same(tree.flatten(params), golden["weights"])
    assert weights.class_names(golden["dir"] / "checkpoint.pth") == golden["names"]
    cfg2, params2 = weights.load_weights(golden["dir"] / "checkpoint.pth", golden["cfg"])
    assert cfg2 is golden["cfg"]
    assert_same(tree.flatten(params2), golden["weights"])
    assert len(tree.flatten(params2)) == 321  # 322 upstream entries minus _kp_active_mask


def test_lightning_ckpt_prefixes_and_repr_args(golden, tmp_path):
    sd = {f"model._orig_mod.{k}": v for k, v in golden["weights"].items()}
    args = golden["info"]["checkpoint_args"]
    text = "Namespace(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ", output_dir=PosixPath('x'))"
    torch.save({"state_dict": sd, "args": text, "epoch": 3}, tmp_path / "last.ckpt")
    with pytest.warns(UserWarning, match="vit_num_heads"):
        cfg, params = weights.load_weights(tmp_path / "last.ckpt")
    assert attrs.evolve(cfg, vit_num_heads=2) == golden["cfg"]
    assert_same(tree.flatten(params), golden["weights"])
    assert weights.class_names(tmp_path / "last.ckpt") == golden["names"]


def test_namespace_args_load_weights_only(golden, tmp_path):
    args = argparse.Namespace(**golden["info"]["checkpoint_args"])
    path = upstream_file(tmp_path / "legacy.pth", golden["weights"], args=args, optimizer={}, epoch=9)
    cfg, params = weights.load_weights(path, golden["cfg"])
    assert_same(tree.flatten(params), golden["weights"])
    assert weights.class_names(path) == golden["names"]


def test_model_name_maps_to_preset(golden, tmp_path):
    path = upstream_file(
        tmp_path / "best.pth", golden["weights"], model_name="RFDETRSmall",
        model_config={**golden["info"]["model_config"], "model_name": "RFDETRSmall"},
    )  # fmt: skip
    with pytest.warns(UserWarning, match="vit_num_heads"):
        cfg, _ = weights.load_weights(path)
    assert cfg.name == "small" and cfg.model_name == "RFDETRSmall"


def test_shape_only_inference_matches_presets(golden_dir):
    """A bare upstream state dict (no args) gives back the preset it was built from."""
    for tsv, name in (("nano", "nano"), ("segnano", "seg_nano")):
        sd = {key: torch.empty(shape) for key, shape in reference_shapes(golden_dir.parent, tsv).items()}
        sd.pop(formats.KP_MASK)
        raw = formats.RawCheckpoint(Path(tsv), sd, {}, None, None, None)
        assert adapt.infer_config(raw) == presets.get(name)


# ---------------------------------------------------------------- adapting to a config


def test_pe_interpolated_to_config(golden, tmp_path):
    path = upstream_file(tmp_path / "w.pth", golden["weights"], args=golden["info"]["checkpoint_args"])
    cfg = attrs.evolve(golden["cfg"], resolution=256, positional_encoding_size=None)  # table 10x10 -> 16x16
    _, params = weights.load_weights(path, cfg)
    table = tree.flatten(params)[PE_KEY]
    assert table.shape == (1, 16 * 16 + 1, 64)
    assert torch.equal(table, resize_pos_embed(golden["weights"][PE_KEY], (16, 16)))
    assert torch.equal(table[:, 0], golden["weights"][PE_KEY][:, 0])  # CLS kept


def test_91_row_head_truncates_to_4_classes(golden, tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = dict(golden["weights"])
    heads = [k for k in sd if adapt._is_class_head(k)]
    assert len(heads) == 2 * 14  # class_embed + 13 encoder heads, weight and bias
    for k in heads:
        sd[k] = torch.randn(91, *sd[k].shape[1:], generator=gen)
    args = {**golden["info"]["checkpoint_args"], "num_classes": 90}
    path = upstream_file(tmp_path / "coco.pth", sd, args=args)
    cfg = attrs.evolve(golden["cfg"], num_classes=4)
    with pytest.warns(UserWarning, match="from 90 to 4 classes"):
        _, params = weights.load_weights(path, cfg)
    flat = tree.flatten(params)
    for k in heads:
        assert torch.equal(flat[k], sd[k][:5]), k


def test_head_grows_by_tiling():
    rows = torch.arange(6.0).reshape(6, 1).expand(6, 3)
    grown = adapt.resize_rows(rows, 14)
    assert grown[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1]


def test_query_slicing_per_group_and_flat(golden, tmp_path):
    path = upstream_file(tmp_path / "w.pth", golden["weights"], args=golden["info"]["checkpoint_args"])
    cfg = attrs.evolve(golden["cfg"], num_queries=10, num_select=10, group_detr=2)
    _, params = weights.load_weights(path, cfg)
    flat = tree.flatten(params)
    for k in adapt._QUERY_KEYS:
        src = golden["weights"][k]
        assert torch.equal(flat[k], src.reshape(13, 30, -1)[:2, :10].reshape(20, -1)), k
    assert not any(k.startswith("transformer.enc_output.2.") for k in flat)  # groups 2..12 dropped
    t = torch.arange(12.0)[:, None]
    assert adapt.slice_queries(t, (None, None), (2, 2))[:, 0].tolist() == [0, 1, 2, 3]  # layout unknown: flat
    assert adapt.slice_queries(t, (None, 3), (2, 2))[:, 0].tolist() == [0, 1, 4, 5]  # Q inferred from rows


# ---------------------------------------------------------------- saving


def test_pth_round_trip_is_bit_identical_and_upstream_readable(golden, tmp_path):
    params = tree.unflatten(golden["weights"])
    path = tmp_path / "out.pth"
    weights.save_weights(path, params, golden["cfg"], class_names=golden["names"], extra={"epoch": 4})
    raw = torch.load(path, weights_only=True)  # no allow-listed classes needed
    assert raw["model"][formats.KP_MASK].shape == (0, 0) and raw["model"][formats.KP_MASK].dtype == torch.bool
    assert raw["model_name"] == "RFDETRNano" and raw["epoch"] == 4
    for key in ("num_classes", "class_names", "num_queries", "group_detr", "patch_size", "resolution",
                "segmentation_head", "hidden_dim", "dec_layers"):  # fmt: skip
        assert raw["args"][key] == golden["info"]["checkpoint_args"][key], key
    assert set(raw["model_config"]) <= {*formats._UPSTREAM_FIELDS, "model_name"}  # upstream forbids extras
    cfg, back = weights.load_weights(path)
    assert cfg == golden["cfg"]
    assert_same(tree.flatten(back), golden["weights"])
    assert weights.class_names(path) == golden["names"]


def test_safetensors_round_trip(golden, tmp_path):
    path = tmp_path / "out.safetensors"
    weights.save_weights(path, tree.unflatten(golden["weights"]), golden["cfg"], class_names=golden["names"])
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert formats.KP_MASK not in set(f.keys())  # noqa: SIM118
    assert formats.config_from_dict(json.loads(meta["rfdetr_fn_config"])) == golden["cfg"]
    assert json.loads(meta["class_names"]) == golden["names"]
    cfg, back = weights.load_weights(path)
    assert cfg == golden["cfg"]
    assert_same(tree.flatten(back), golden["weights"])


def test_upstream_best_payload(golden, tmp_path):
    path = tmp_path / "checkpoint_best_total.pth"
    train_args = {"lr": 1e-4, "betas": (0.9, 0.999), "output_dir": Path("out"), "resume": None}
    weights.write_upstream_best(
        path, tree.unflatten(golden["weights"]), golden["cfg"], epoch=7, class_names=golden["names"],
        train_args=train_args, source="ema",
    )  # fmt: skip
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 7 and raw["best_total_source"] == "ema" and raw["model_name"] == "RFDETRNano"
    assert raw["rfdetr_version"] == formats.UPSTREAM_FORMAT_VERSION
    assert raw["args"]["class_names"] == golden["names"] and raw["args"]["betas"] == [0.9, 0.999]
    assert raw["args"]["output_dir"] == repr(Path("out"))  # not weights-only readable -> repr, like upstream
    assert raw["model_config"]["num_classes"] == 5 and raw["model_config"]["positional_encoding_size"] == 10
    assert torch.equal(raw["state_dict"]["model.class_embed.weight"], golden["weights"]["class_embed.weight"])
    cfg, back = weights.load_weights(path)
    assert cfg == golden["cfg"]
    assert_same(tree.flatten(back), golden["weights"])
    assert path.stat().st_size < 1.2 * (golden["dir"] / "checkpoint.pth").stat().st_size  # state_dict shares


def test_failed_save_keeps_previous_file(golden, tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    params = tree.unflatten(golden["weights"])
    weights.save_weights(path, params, golden["cfg"])
    before = path.read_bytes()

    def crash(obj, f, *a, **k):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        weights.save_weights(path, params, golden["cfg"])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]  # no temp file left behind


# ---------------------------------------------------------------- bad input


def test_bad_files_give_clear_errors(golden, tmp_path):
    with pytest.raises(formats.CheckpointError, match="nope.pth: no such checkpoint"):
        weights.load_weights(tmp_path / "nope.pth")
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(formats.CheckpointError, match="notes.pth: not a readable torch checkpoint"):
        weights.load_weights(text)
    cut = tmp_path / "cut.pth"
    cut.write_bytes((golden["dir"] / "checkpoint.pth").read_bytes()[:100_000])
    with pytest.raises(formats.CheckpointError, match="cut.pth: not a readable torch checkpoint"):
        weights.load_weights(cut)
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes((golden["dir"] / "weights.safetensors").read_bytes()[:50_000])
    with pytest.raises(formats.CheckpointError, match="cut.safetensors: not a readable safetensors"):
        weights.load_weights(cut_st)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(formats.CheckpointError, match="list.pth: not a checkpoint"):
        weights.load_weights(tmp_path / "list.pth")
    torch.save({"optimizer": {}, "epoch": 1}, tmp_path / "opt.pth")
    with pytest.raises(formats.CheckpointError, match="opt.pth: not a checkpoint: no 'model'"):
        weights.load_weights(tmp_path / "opt.pth")


class Payload:
    """Stands in for an arbitrary pickled object (the thing weights_only protects against)."""


def test_untrusted_pickle_is_refused(golden, tmp_path):
    path = upstream_file(tmp_path / "evil.pth", golden["weights"], args=Payload())
    with pytest.raises(formats.CheckpointError, match=r"evil.pth: refused to load.*weights-only"):
        weights.load_weights(path)


def test_wrong_architecture_is_refused(golden, tmp_path):
    path = upstream_file(tmp_path / "p16.pth", golden["weights"], args=golden["info"]["checkpoint_args"])
    with pytest.raises(formats.CheckpointError, match="p16.pth: patch size 16 .* patch_size=14"):
        weights.load_weights(path, attrs.evolve(golden["cfg"], patch_size=14, resolution=196 + 28))
    with pytest.raises(formats.CheckpointError, match="has no segmentation head"):
        weights.load_weights(path, attrs.evolve(golden["cfg"], segmentation_head=True))
    with pytest.raises(
        formats.CheckpointError,
        match=r"shape mismatch \(6\): transformer.decoder.layers.0.linear1.bias: \(256,\) vs \(64,\)",
    ):
        weights.load_weights(path, attrs.evolve(golden["cfg"], dim_feedforward=64))


def test_strict_key_check_lists_differences(golden):
    expected = {k: tuple(v[0]) for k, v in golden["info"]["state_dict_keys"].items() if k != formats.KP_MASK}
    sd = dict(golden["weights"])
    sd.pop("class_embed.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(formats.CheckpointError, match=r"missing \(1\): class_embed.bias[\s\S]*unexpected \(1\)"):
        adapt.check_keys(sd, expected, where="f.pth")
    with pytest.warns(UserWarning, match="extra.weight"):
        adapt.check_keys(sd, expected, strict=False, where="f.pth")
    adapt.check_keys(golden["weights"], expected)  # the golden file matches exactly


def test_non_strict_fills_missing_from_init(golden, tmp_path):
    sd = {k: v for k, v in golden["weights"].items() if k != "bbox_embed.layers.2.bias"}
    path = upstream_file(tmp_path / "w.pth", sd, args=golden["info"]["checkpoint_args"])
    with pytest.raises(formats.CheckpointError, match="missing"):
        weights.load_weights(path, golden["cfg"])
    with pytest.warns(UserWarning, match="bbox_embed.layers.2.bias"):
        _, params = weights.load_weights(path, golden["cfg"], strict=False)
    assert tree.flatten(params)["bbox_embed.layers.2.bias"].shape == (4,)


# ---------------------------------------------------------------- train state (DCP)


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    params = {"a": {"w": torch.randn(3, 4, generator=g)}, "b": torch.randn(5, generator=g)}
    return {
        "state": {
            "step": torch.tensor(seed, dtype=torch.int64),
            "params": params,
            "opt_state": {
                "m": tree.map_(torch.zeros_like, params),
                "count": torch.tensor([seed], dtype=torch.int32),
            },
            "ema_state": {},
            "loss_scale": torch.tensor(65536.0 / (seed + 1)),
        },
        "rng": torch.randint(0, 256, (16,), dtype=torch.uint8, generator=g),
        "loop": {"epoch": seed, "batch": 7 * seed, "name": f"run{seed}", "best": None, "hist": [0.1, 1 / 3]},
        "tracker": {"val/mAP": math.pi * seed, "key.with/slash": "x"},
        "empty": torch.zeros(0, 2),
    }


def _assert_state_equal(a: dict, b: dict) -> None:
    flat_a, flat_b = checkpoint._flat_state(a), checkpoint._flat_state(b)
    assert list(flat_a) == list(flat_b)
    for k, v in flat_a.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == flat_b[k].dtype and torch.equal(v, flat_b[k]), k
        else:
            assert v == flat_b[k], k


def test_state_round_trip_is_exact(tmp_path):
    saved = _state(3)
    checkpoint.save_state(tmp_path / "last", saved, keep="checkpoint_0003")
    template = _state(0)
    snapshot = tree.clone({k: v for k, v in tree.flatten(template).items() if isinstance(v, torch.Tensor)})
    restored = checkpoint.load_state(tmp_path / "last", template)
    _assert_state_equal(restored, saved)
    assert restored["state"]["ema_state"] == {}
    assert all(torch.equal(v, tree.flatten(template)[k]) for k, v in snapshot.items())  # template untouched
    _assert_state_equal(checkpoint.load_state(tmp_path / "checkpoint_0003", template), saved)
    checkpoint.save_state(tmp_path / "last", _state(5))  # overwrite in place
    _assert_state_equal(checkpoint.load_state(tmp_path / "last", template), _state(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_0003", "last"]  # no temp dirs left


def test_crash_during_state_save_keeps_previous(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    checkpoint.save_state(tmp_path / "last", _state(1))
    real = dcp.save

    def crash(state, *, checkpoint_id, **kw):
        real({k: state[k] for k in list(state)[:2]}, checkpoint_id=checkpoint_id, **kw)  # part written
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_state(tmp_path / "last", _state(2))
    monkeypatch.undo()
    _assert_state_equal(checkpoint.load_state(tmp_path / "last", _state(0)), _state(1))
    checkpoint.save_state(tmp_path / "last", _state(2))  # the next save cleans the debris
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_crash_between_renames_recovers(tmp_path):
    checkpoint.save_state(tmp_path / "last", _state(1))
    (tmp_path / "last").rename(tmp_path / "last.old-999")  # killed after moving the old one aside
    with pytest.warns(UserWarning, match="restoring from last.old-999"):
        restored = checkpoint.load_state(tmp_path / "last", _state(0))
    _assert_state_equal(restored, _state(1))


def test_state_errors(tmp_path):
    with pytest.raises(formats.CheckpointError, match="nowhere: no such train-state"):
        checkpoint.load_state(tmp_path / "nowhere", _state(0))
    (tmp_path / "junk").mkdir()
    with pytest.raises(formats.CheckpointError, match="junk: not a complete train-state"):
        checkpoint.load_state(tmp_path / "junk", _state(0))
    checkpoint.save_state(tmp_path / "s", _state(1))
    bad = _state(0)
    bad["state"]["params"]["b"] = torch.zeros(6)
    bad["new"] = torch.zeros(1)
    with pytest.raises(formats.CheckpointError, match=r"params/b: saved \(5,\).*missing new"):
        checkpoint.load_state(tmp_path / "s", bad)
    with pytest.raises(TypeError, match="leaf 'x' is a object"):
        checkpoint.save_state(tmp_path / "t", {"x": object()})


def test_state_in_gloo_group(tmp_path):
    """One-rank gloo group: the same code path every rank of a torchrun job takes."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "assuming single process" warnings in a real group
            checkpoint.save_state(tmp_path / "last", _state(4))
        _assert_state_equal(checkpoint.load_state(tmp_path / "last", _state(0)), _state(4))
    finally:
        dist.destroy_process_group()


_TWO_RANKS = """
import sys, torch, torch.distributed as dist
from rfdetr_fn.io import checkpoint
dist.init_process_group("gloo")
out = sys.argv[1]
state = {"params": {"w": torch.arange(6.0).reshape(2, 3)}, "step": torch.tensor(11), "epoch": 3}
checkpoint.save_state(out + "/last", state, keep="checkpoint_0003")
template = {"params": {"w": torch.zeros(2, 3)}, "step": torch.tensor(0), "epoch": 0}
back = checkpoint.load_state(out + "/checkpoint_0003", template)
assert torch.equal(back["params"]["w"], state["params"]["w"])
assert int(back["step"]) == 11 and back["epoch"] == 3
open(f"{out}/rank{dist.get_rank()}.ok", "w").close()  # a file per rank: stdout lines interleave
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_state_with_two_gloo_ranks(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*launcher, str(script), str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists(), run.stderr[-3000:]
    # Both ranks passed every check above. On a 2-core AMD EPYC, torch 2.13's gloo then aborted a rank at
    # exit in about half of the runs ("terminate called without an active exception"), after the group was
    # destroyed, with or without a barrier first; that exit crash is torch's, not the checkpoint's.
    exit_abort = "terminate called without an active exception" in run.stderr
    assert run.returncode == 0 or exit_abort, run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint_0003", "last"]
