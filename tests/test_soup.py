"""Weight soups from the command line: uniform, weighted and greedy averages of weights files."""

from __future__ import annotations

import pytest
import torch

import rfdetr_fn as rf
from rfdetr_fn import cli, presets, tree
from rfdetr_fn.io import weights
from rfdetr_fn.model import detector


def _files(tmp_path, n=3):
    cfg = presets.tiny(num_classes=2)
    paths = []
    for seed in range(n):
        path = tmp_path / f"run{seed}.pth"
        rf.save_weights(path, detector.init(cfg, seed), cfg, class_names=["a", "b"])
        paths.append(str(path))
    return cfg, paths


def test_average_command_writes_the_mean(tmp_path):
    cfg, paths = _files(tmp_path)
    out = tmp_path / "soup.pth"
    assert cli.main(["average", *paths, "--out", str(out)]) == [0, 1, 2]
    _, soup = rf.load_weights(out, cfg)
    runs = [tree.flatten(rf.load_weights(p, cfg)[1]) for p in paths]
    for k, v in tree.flatten(soup).items():
        torch.testing.assert_close(v, (runs[0][k] + runs[1][k] + runs[2][k]) / 3, rtol=1e-6, atol=1e-7)
    assert weights.class_names(out) == ["a", "b"]

    cli.main(["average", *paths[:2], "--out", str(out), "--weights", "3", "1"])
    key = "class_embed.weight"
    torch.testing.assert_close(
        tree.flatten(rf.load_weights(out, cfg)[1])[key], 0.75 * runs[0][key] + 0.25 * runs[1][key]
    )
    with pytest.raises(ValueError, match="at least two"):
        cli.main(["average", paths[0], "--out", str(out)])


def test_greedy_soup_command_scores_on_the_validation_split(tmp_path, monkeypatch):
    cfg, paths = _files(tmp_path)
    from rfdetr_fn.eval import loop

    seen = []

    def fake_split(params, *args, **kwargs):  # prefers weights close to run 1
        seen.append(1)
        ref = tree.flatten(rf.load_weights(paths[1], cfg)[1])
        return {"val/mAP_50_95": -sum(float((v - ref[k]).abs().sum()) for k, v in tree.flatten(params).items())}

    monkeypatch.setattr(loop, "run_split", fake_split)
    used = cli.main(["average", *paths, "--out", str(tmp_path / "g.pth"), "--greedy"])
    assert used == [1] and len(seen) == 3 + 2
