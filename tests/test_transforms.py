"""Tree transforms: selection by glob/regex/predicate, partition/combine, replace, labels, averaging."""

from __future__ import annotations

import re

import pytest
import torch

from rfdetr_fn import presets, tree
from rfdetr_fn.model import detector
from rfdetr_fn.research import soup


def _params():
    return tree.unflatten(
        {
            "backbone.0.encoder.encoder.embeddings.cls_token": torch.ones(1, 1, 4),
            "backbone.0.encoder.encoder.encoder.layer.0.attention.attention.query.weight": torch.full((4, 4), 2.0),
            "backbone.0.projector.stages.0.weight": torch.full((3,), 3.0),
            "class_embed.bias": torch.full((2,), 4.0),
        }
    )


def test_partition_by_glob_regex_predicate_and_combine_restores():
    params = _params()
    enc, rest = tree.partition(params, "backbone.0.encoder.*")
    assert list(tree.flatten(enc)) == [
        "backbone.0.encoder.encoder.embeddings.cls_token",
        "backbone.0.encoder.encoder.encoder.layer.0.attention.attention.query.weight",
    ]
    assert list(tree.flatten(rest)) == ["backbone.0.projector.stages.0.weight", "class_embed.bias"]
    back = tree.combine(enc, rest)
    assert all(a is b for a, b in zip(tree.leaves(back), tree.leaves(params)))  # shared, not copied
    by_regex, _ = tree.partition(params, re.compile(r"\.(query|key)\.weight$"))
    assert list(tree.flatten(by_regex)) == [
        "backbone.0.encoder.encoder.encoder.layer.0.attention.attention.query.weight"
    ]
    by_pred, _ = tree.partition(params, lambda k, v: v.numel() == 2)
    assert list(tree.flatten(by_pred)) == ["class_embed.bias"]
    both, _ = tree.partition(params, ["class_embed.*", re.compile("projector")])
    assert len(tree.flatten(both)) == 2
    with pytest.raises(ValueError, match="class_embed.bias"):
        tree.combine(rest, {"class_embed": {"bias": torch.zeros(2)}})
    with pytest.raises(TypeError, match="glob"):
        tree.matcher(3)


def test_replace_map_where_and_labels():
    params = _params()
    new = tree.replace(params, {"class_embed.bias": torch.zeros(2)})
    assert not new["class_embed"]["bias"].any() and params["class_embed"]["bias"].all()
    with pytest.raises(KeyError, match="class_embed.weight"):
        tree.replace(params, {"class_embed.weight": torch.zeros(2)})
    doubled = tree.map_where(lambda t: t * 2, params, "*.bias")
    assert doubled["class_embed"]["bias"].tolist() == [8.0, 8.0]
    assert doubled["backbone"] is not params["backbone"] and torch.equal(
        tree.flatten(doubled)["backbone.0.projector.stages.0.weight"], torch.full((3,), 3.0)
    )
    lab = tree.flatten(tree.labels(params, {"vit": "backbone.0.encoder.*"}, default="rest"))
    assert list(lab.values()) == ["vit", "vit", "rest", "rest"]
    with pytest.raises(ValueError, match="no rule matches 'backbone.0.projector"):
        tree.labels(params, {"vit": "backbone.0.encoder.*", "head": "class_embed.*"})


def test_freeze_encoder_selects_the_whole_vit_of_nano():
    """Upstream's freeze_encoder freezes exactly the `backbone.0.encoder` parameters: 12 blocks x 18 + 7."""
    params = tree.unflatten({k: torch.zeros(()) for k in detector.param_shapes(presets.nano())})
    frozen = tree.select(params, "backbone.0.encoder.*")
    assert len(frozen) == 12 * 18 + 7
    assert all(k.startswith("backbone.0.encoder.") for k in frozen)
    rest = tree.flatten(tree.partition(params, "backbone.0.encoder.*")[1])
    assert len(rest) + len(frozen) == len(tree.flatten(params)) and not any(k in rest for k in frozen)


def test_average_lerp_and_greedy_soup():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(3)}
    c = {"w": torch.tensor([8.0, -10.0]), "n": torch.tensor(3)}
    assert soup.average([a, b])["w"].tolist() == [2.0, 4.0]
    assert soup.average([a, b], [3, 1])["w"].tolist() == [1.0, 3.0]
    assert soup.average([a, b])["n"].item() == 3  # integer leaves are taken, not averaged
    assert soup.lerp(a, b, 0.25)["w"].tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="weights"):
        soup.average([a, b], [1.0])
    with pytest.raises(ValueError, match="shape of 'w'"):
        soup.average([a, {"w": torch.zeros(3), "n": torch.tensor(3)}])

    # score = -|w - target|: b alone is best; adding a helps (soup [2, 4] is closer); c hurts
    target = torch.tensor([2.5, 4.0])
    calls = []

    def score(p):
        calls.append(p["w"].tolist())
        return -float((p["w"] - target).abs().sum())

    mixed, used = soup.greedy_soup([a, b, c], score)
    assert used == [1, 0]
    assert mixed["w"].tolist() == [2.0, 4.0]
    assert len(calls) == 3 + 2  # every candidate alone, then one trial per remaining candidate
