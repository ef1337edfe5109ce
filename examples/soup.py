"""A soup of three short runs (about a minute on CPU with the tiny preset).

Three runs from the same start weights with different data orders (seeds) are averaged uniformly and
greedily (a run joins the soup only if validation mAP does not drop), with the library calls the
`rfdetr_fn average` command makes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import rfdetr_fn as rf
from rfdetr_fn import transforms
from rfdetr_fn.config import DataConfig, EvalConfig, TrainConfig
from rfdetr_fn.fit import FitArgs, fit
from rfdetr_fn.validate import run_split

DATA = DataConfig(synthetic_images=16, num_workers=0)


def main(out: Path) -> None:
    cfg = rf.presets.tiny(num_classes=DATA.synthetic_classes)
    start = out / "start.pth"
    rf.save_weights(start, rf.init(cfg, seed=0), cfg)  # a shared start, as soups assume
    paths = []
    for seed in range(3):
        tcfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, lr_encoder=1e-3, multi_scale="off", compile="off",
                           seed=seed, pretrain_weights=str(start), output_dir=str(out / f"run{seed}"),
                           progress_bar=False, tensorboard=False)  # fmt: skip
        fit(FitArgs(preset="tiny", model=cfg, train=tcfg, data=DATA))
        paths.append(out / f"run{seed}" / "last_ema.pth")

    runs = [rf.load_weights(p, cfg)[1] for p in paths]

    def score(params) -> float:
        return run_split(params, cfg, DATA, EvalConfig(), None, "valid", batch_size=4)["val/mAP_50_95"]

    alone = [score(params) for params in runs]
    uniform = transforms.average(runs)
    greedy, used = transforms.greedy_soup(runs, score, scores=alone)
    print("\n   weights        mAP 50:95")
    for i, value in enumerate(alone):
        print(f"   run {i}          {value:.4f}")
    print(f"   uniform soup   {score(uniform):.4f}")
    print(f"   greedy soup    {score(greedy):.4f}   (runs {used})")
    rf.save_weights(out / "soup.pth", greedy, cfg)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp))
