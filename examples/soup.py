"""A soup of three short runs (about a minute on CPU with the tiny preset, on an idle machine).

Soups average fine-tunes of one pre-trained model (Wortsman et al., 2022): weights only average well
when the runs start from the same point and stay in its basin. So a short shared pre-run learns the
built-in shapes first, three short fine-tunes from it differ in their data order (seed), and their
weights are averaged uniformly and greedily (a run joins the soup only if validation mAP does not
drop), with the library calls the `rfdetr_fn average` command makes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import rfdetr_fn as rf
from rfdetr_fn.config import DataConfig, EvalConfig, TrainConfig
from rfdetr_fn.eval.loop import run_split
from rfdetr_fn.fit import FitArgs, fit
from rfdetr_fn.research import soup

DATA = DataConfig(synthetic_images=32, num_workers=0)
QUICK = dict(batch_size=4, lr_encoder=1e-3, multi_scale="off", compile="off", freeze_encoder=True,
             progress_bar=False, tensorboard=False)  # fmt: skip


def main(out: Path) -> None:
    cfg = rf.presets.tiny(num_classes=DATA.synthetic_classes)
    pre = fit(FitArgs(preset="tiny", model=cfg, data=DATA,
                      train=TrainConfig(epochs=9, lr=1e-3, output_dir=str(out / "pre"), **QUICK)))  # fmt: skip
    start = out / "pre" / "checkpoint_best_total.pth"
    print(f"shared pre-run: {pre.get('val/mAP_50_95', 0.0):.4f} mAP 50:95, weights in {start}")
    paths = []
    for seed in range(3):
        tcfg = TrainConfig(epochs=2, lr=5e-4, seed=seed, pretrain_weights=str(start),
                           output_dir=str(out / f"run{seed}"), **QUICK)  # fmt: skip
        fit(FitArgs(preset="tiny", model=cfg, train=tcfg, data=DATA))
        paths.append(out / f"run{seed}" / "last_ema.pth")

    runs = [rf.load_weights(p, cfg)[1] for p in paths]

    def score(params) -> float:
        return run_split(params, cfg, DATA, EvalConfig(), None, "valid", batch_size=4)["val/mAP_50_95"]

    alone = [score(params) for params in runs]
    uniform = soup.average(runs)
    greedy, used = soup.greedy_soup(runs, score, scores=alone)
    print("\n   weights        mAP 50:95")
    for i, value in enumerate(alone):
        print(f"   run {i}          {value:.4f}")
    print(f"   uniform soup   {score(uniform):.4f}")
    print(f"   greedy soup    {score(greedy):.4f}   (runs {used})")
    rf.save_weights(out / "soup.pth", greedy, cfg)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp))
