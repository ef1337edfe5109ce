"""Does bf16 autocast cost accuracy? The same fit run in fp32 and in bf16 over several seeds, as one table.

    python benchmarks/bf16_accuracy.py --config configs/quickstart.yaml --seeds 0 1 2
    python benchmarks/bf16_accuracy.py --config configs/coco_mini_nano.yaml --seeds 0 1 2 --set train.epochs=4

Each (seed, precision) is one `python -m rfdetr_fn.fit` process with `--train.precision` and `--train.seed`
set and its output in a temporary folder. The table gives per run the last and the best validation mAP
50:95 (what `fit` evaluates: the EMA weights where EMA is on) and the last logged train loss, then per
precision the mean and the seed spread (max - min), and whether the bf16 - fp32 difference of the means
lies within the larger of the two spreads.
`--set a.b=v` passes `--a.b v` to every run (shorter schedules for the big configs).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rfdetr_fn.model.precision import describe_cpu

METRIC = "val/mAP_50_95"


def run_fit(config: str, precision: str, seed: int, extra: list[str], out: Path) -> dict:
    """One fit run; its last and best validation mAP and its wall time."""
    cmd = [sys.executable, "-m", "rfdetr_fn.fit", "--config", config, "--train.precision", precision]
    cmd += ["--train.seed", str(seed), "--train.output-dir", str(out), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    values = [float(r[METRIC]) for r in rows if r.get(METRIC)]
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    return {"last": values[-1], "best": max(values), "loss": losses[-1], "seconds": seconds}


def summary(runs: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs]
    return statistics.mean(values), max(values) - min(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], help="a.b=v, passed as --a.b v to every run")
    args = parser.parse_args()
    extra = [part for item in args.set for part in (f"--{item.split('=', 1)[0]}", item.split("=", 1)[1])]
    runs: dict[str, list[dict]] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory(prefix="rfdetr_fn_bf16_") as tmp:
        for seed in args.seeds:
            for precision in runs:  # alternated, so a drifting machine load hits both alike
                runs[precision].append(run_fit(args.config, precision, seed, extra, Path(tmp) / f"{precision}_{seed}"))
    print(f"\n{args.config} {' '.join(args.set)}; CPU: {describe_cpu()}; torch {torch.__version__}\n")
    print("| seed | fp32 last | fp32 best | bf16 last | bf16 best | last train loss fp32 / bf16 | wall s fp32 / bf16 |")
    print("|---|---|---|---|---|---|---|")
    for seed, a, b in zip(args.seeds, runs["fp32"], runs["bf16"]):
        print(
            f"| {seed} | {a['last']:.4f} | {a['best']:.4f} | {b['last']:.4f} | {b['best']:.4f} | "
            f"{a['loss']:.4f} / {b['loss']:.4f} | {a['seconds']:.0f} / {b['seconds']:.0f} |"
        )
    print("\n| mAP 50:95 | fp32 mean (spread) | bf16 mean (spread) | bf16 - fp32 | within seed spread |")
    print("|---|---|---|---|---|")
    for key in ("last", "best"):
        (ma, sa), (mb, sb) = summary(runs["fp32"], key), summary(runs["bf16"], key)
        within = "yes" if abs(mb - ma) <= max(sa, sb) else "NO"
        print(f"| {key} | {ma:.4f} ({sa:.4f}) | {mb:.4f} ({sb:.4f}) | {mb - ma:+.4f} | {within} |")


if __name__ == "__main__":
    main()
