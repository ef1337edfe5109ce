"""rfdetr_fn against upstream rfdetr 1.11.2 on the same batch from the same weights, interleaved in one process.

    python benchmarks/vs_upstream.py --preset nano --resolution 384 --batch-size 2
    python benchmarks/vs_upstream.py --setup          # create the upstream virtualenv first (PyPI, ~6 GB)

Both libraries must import in ONE process (same torch, same threads, same batch). When this interpreter cannot
import `rfdetr`, the script re-runs itself under the upstream virtualenv's Python (--upstream-venv, default
$RFDETR_UPSTREAM_VENV or .venv-upstream beside this repository); --setup creates that virtualenv:
`rfdetr[train]==1.11.2` (its
training extra: Lightning, for the optimizer groups and EMA callback) with the
torch/torchvision pair the registry offers together (upstream needs torchvision, whose PyPI wheels need their
own torch), plus this repository installed editable. Without either, it says exactly what is missing.

Measured, alternating upstream and rfdetr_fn call by call (medians over --steps after --warmup):
- train step: forward in train mode, the criterion, backward, clip by global norm 0.1, AdamW over upstream's
  parameter groups and the EMA update. Upstream is its bare modules (LWDETR, SetCriterion, torch.optim.AdamW as
  `configure_optimizers` builds it, the EMA callback's foreach average), without Lightning's loop, so the
  comparison favours upstream. rfdetr_fn is `make_train_step(donate=True)` as `fit` runs it on CPU (eager,
  fp32 or bf16 autocast).
- inference, batch 1: eval-mode forward + postprocess under no_grad.
- with --memory, instead of the timings: the peak RSS of each side's train step, each side alone in its own
  process (persistent state plus the step's transient memory; it does not depend on the machine's load).
Upstream "as shipped" on CPU is fp32 (Lightning's "32-true" there); where the CPU has bf16 matrix units (or with
--precision bf16) both also run under bf16 autocast. Weights: rfdetr_fn's params use upstream's state-dict
keys, so upstream's model loads every parameter from them (only its non-parameter buffers, such as
`_kp_active_mask`, stay as built).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_VERSION = "1.11.2"
DEFAULT_VENV = os.environ.get("RFDETR_UPSTREAM_VENV", str(ROOT.parent / ".venv-upstream"))


def _has_upstream() -> bool:
    try:
        import rfdetr  # noqa: F401
    except Exception:  # noqa: BLE001 -- any import failure means this interpreter cannot run upstream
        return False
    return True


def setup_venv(venv: Path) -> None:
    """Create `venv` with upstream rfdetr and this repository (editable), from the package registry."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([*pip, "torch==2.14.1", "torchvision==0.29.1"], check=True)
    deps = ["tyro", "attrs", "safetensors", "pycocotools"]
    subprocess.run([*pip, f"rfdetr[train]=={UPSTREAM_VERSION}", *deps], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)


def reexec_or_explain(args: argparse.Namespace) -> None:
    """Run this script again under the upstream virtualenv, or print why upstream cannot run and exit 2."""
    python = Path(args.upstream_venv) / "bin" / "python"
    if not python.exists():
        print(
            f"UPSTREAM NOT AVAILABLE: `import rfdetr` fails in {sys.executable} and there is no virtualenv at "
            f"{args.upstream_venv}.\nCreate it with: python benchmarks/vs_upstream.py --setup "
            f"[--upstream-venv DIR]  (PyPI: rfdetr=={UPSTREAM_VERSION}, torch 2.14.1 + torchvision 0.29.1, ~6 GB)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    env = {**os.environ, "RFDETR_VS_UPSTREAM_CHILD": "1"}
    code = subprocess.run([str(python), __file__, *sys.argv[1:]], cwd=str(ROOT / "benchmarks"), env=env).returncode
    raise SystemExit(code)


def common(args: argparse.Namespace):
    """(cfg, params, batch): the preset, rfdetr_fn's init weights (upstream loads the same) and the batch."""
    import torch

    import rfdetr_fn as rf

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_step import synthetic_batch

    cfg = rf.presets.get(args.preset, resolution=args.resolution)
    return cfg, rf.init(cfg, seed=0), synthetic_batch(cfg, args.batch_size, cfg.resolution, torch.device("cpu"))


def ours_train_step(cfg, args: argparse.Namespace, precision: str):
    """rfdetr_fn's step as `fit` runs it on CPU: donate=True (clip, AdamW and EMA in place on the state)."""
    from rfdetr_fn.config import TrainConfig
    from rfdetr_fn.step import make_train_step

    tcfg = TrainConfig(batch_size=args.batch_size, multi_scale="off", compile="off", precision=precision)
    return make_train_step(cfg, tcfg, steps_per_epoch=1000, precision=precision, donate=True)


def build(args: argparse.Namespace):
    """(ours, upstream) dicts of callables and state for one preset, from the same weights."""
    from rfdetr_fn import tree

    cfg, params, batch = common(args)
    upstream = upstream_model(cfg, args, tree.flatten(params))
    ours = {"cfg": cfg, "params": params, "batch": batch}
    for precision in args.precisions:
        ours[precision] = ours_train_step(cfg, args, precision)
        ours[f"state_{precision}"] = ours[precision].init(tree.clone(params))
    return ours, upstream


def upstream_model(cfg, args: argparse.Namespace, flat: dict):
    """Upstream's LWDETR, criterion, postprocess, AdamW (its parameter groups) and EMA, loaded with `flat`."""
    import torch
    from rfdetr import config as ucfg
    from rfdetr._namespace import _namespace_from_configs
    from rfdetr.models.lwdetr import build_criterion_from_config, build_model_from_config
    from rfdetr.training.callbacks.ema import RFDETREMACallback
    from rfdetr.training.param_groups import get_param_dict

    kind = {"nano": "RFDETRNanoConfig", "small": "RFDETRSmallConfig", "medium": "RFDETRMediumConfig"}[args.preset]
    mc = getattr(ucfg, kind)(
        num_classes=cfg.num_classes, resolution=cfg.resolution, pretrain_weights=None, device="cpu"
    )
    tc = ucfg.TrainConfig(dataset_dir=".", output_dir=".", batch_size=args.batch_size, multi_scale=False)
    model = build_model_from_config(mc, tc)
    result = model.load_state_dict({k: v.clone() for k, v in flat.items()}, strict=False)
    names = {n for n, _ in model.named_parameters()}
    if result.unexpected_keys or names & set(result.missing_keys):  # only buffers may stay as built
        raise SystemExit(f"weights do not match upstream's keys: {result}")
    criterion, postprocess = build_criterion_from_config(mc, tc)
    optimizer = torch.optim.AdamW(
        get_param_dict(_namespace_from_configs(mc, tc), model), lr=tc.lr, weight_decay=tc.weight_decay
    )
    callback = RFDETREMACallback(decay=tc.ema_decay, tau=tc.ema_tau)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=callback._multi_avg_fn, use_buffers=True)
    return {"model": model, "criterion": criterion, "post": postprocess, "opt": optimizer, "ema": ema}


def upstream_targets(batch: dict) -> list[dict]:
    return [
        {"labels": labels[labels >= 0], "boxes": boxes[labels >= 0], "orig_size": size, "size": size}
        for labels, boxes, size in zip(batch["labels"], batch["boxes"], batch["size"])
    ]


def upstream_step(up: dict, batch: dict, precision: str):
    """Upstream's train step as a zero-argument callable (see the module docstring)."""
    import torch

    targets = upstream_targets(batch)
    dtype = {"bf16": torch.bfloat16}.get(precision)
    model, crit = up["model"], up["criterion"]

    def step():
        model.train()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = model(batch["images"], targets)
        losses = crit(out, targets)
        total = sum(losses[k] * crit.weight_dict[k] for k in losses if k in crit.weight_dict)
        up["opt"].zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        up["opt"].step()
        up["ema"].update_parameters(model)

    return step


def peak_rss_child(args: argparse.Namespace) -> None:
    """One side's train step alone in this process (--memory-child SIDE:PRECISION): after the warm-up steps
    the peak RSS is reset (clear_refs 5), and the peak over --steps steps is printed, so the figure is the
    persistent state (weights, AdamW moments, EMA) plus the step's transient memory, of that side only."""
    from train_step import peak_rss_gib, reset_peak_rss

    from rfdetr_fn import tree

    side, precision = args.memory_child.split(":")
    cfg, params, batch = common(args)
    if side == "upstream":
        step = upstream_step(upstream_model(cfg, args, tree.flatten(params)), batch, precision)
    else:
        ours = ours_train_step(cfg, args, precision)
        box = {"state": ours.init(params)}

        def step():
            box["state"], _ = ours(box["state"], [batch])

    try:
        step()
    except (RuntimeError, NotImplementedError) as e:
        print(f"PEAK fails: {type(e).__name__}")
        return
    step()
    reset_peak_rss()
    for _ in range(args.steps):
        step()
    print(f"PEAK {peak_rss_gib():.3f}")


def peak_rss_table(args: argparse.Namespace) -> None:
    """Peak RSS of each side's step, each in its own process (memory does not depend on machine load)."""
    print(
        "\n| precision | peak RSS of the train step | upstream | rfdetr_fn | rfdetr_fn / upstream (fp32 as shipped) |"
    )
    print("|---|---|---|---|---|", flush=True)
    peaks: dict[tuple[str, str], float | str] = {}
    for precision in args.precisions:
        for side in ("upstream", "ours"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--memory-child", f"{side}:{precision}"]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT / "benchmarks"))
            line = [x for x in done.stdout.splitlines() if x.startswith("PEAK ")]
            text = line[-1][5:] if line else "no result"
            peaks[side, precision] = text if text.startswith(("fails", "no")) else float(text)
        up, mine = peaks["upstream", precision], peaks["ours", precision]
        shipped = peaks["upstream", "fp32"]
        ratio = f"{mine / shipped:.2f}x" if isinstance(shipped, float) and isinstance(mine, float) else "-"
        cells = [v if isinstance(v, str) else f"{v:.2f} GiB" for v in (up, mine)]
        row = f"| {precision} | {args.preset} step, {args.steps} steps | {cells[0]} | {cells[1]} | {ratio} |"
        print(row, flush=True)


def timers(ours: dict, up: dict, precision: str) -> dict:
    """Four zero-argument callables: (ours|upstream) x (train step|batch-1 inference) in `precision`."""
    import torch

    from rfdetr_fn.eval.inference import forward_fn
    from rfdetr_fn.model.postprocess import postprocess

    cfg, batch = ours["cfg"], ours["batch"]
    image = batch["images"][:1]
    size = batch["size"][:1]
    dtype = {"bf16": torch.bfloat16}.get(precision)
    forward = forward_fn(cfg, "cpu", precision=precision)
    model = up["model"]

    def ours_step():
        ours[f"state_{precision}"], _ = ours[precision](ours[f"state_{precision}"], [batch])

    up_step = upstream_step(up, batch, precision)

    def ours_infer():
        with torch.no_grad():
            postprocess(forward(ours[f"state_{precision}"]["params"], image, None), size, cfg.num_select)

    def up_infer():
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            up["post"](model(image), size)

    return {"step": (up_step, ours_step), "inference": (up_infer, ours_infer)}


def parity(ours: dict, up: dict) -> float:
    """Largest difference of the batch-1 eval logits, upstream vs rfdetr_fn, before any step."""
    import torch

    from rfdetr_fn.model import detector

    image = ours["batch"]["images"][:1]
    up["model"].eval()
    with torch.no_grad():
        theirs = up["model"](image)["pred_logits"]
        mine = detector.apply(ours["params"], image, None, ours["cfg"], train=False)["pred_logits"]
    return float((theirs - mine).abs().max())


def interleaved(pair, steps: int, warmup: int) -> tuple[float | str, float]:
    """Medians of alternating calls (upstream first, then ours, each round). Where upstream's call raises
    (its bf16 train step on CPU: the matcher's `cdist` has no BFloat16 kernel), ours is timed alone and
    upstream's entry is the error."""
    try:
        pair[0]()
    except (RuntimeError, NotImplementedError) as e:
        failed = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        return failed, interleaved((lambda: None, pair[1]), steps, warmup)[1]
    for _ in range(warmup):
        pair[0](), pair[1]()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(steps):
        for fn, out in zip(pair, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano", choices=["nano", "small", "medium"])
    parser.add_argument("--resolution", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--infer-steps", type=int, default=10)
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: fp32, plus bf16 where the CPU has bf16 matrix units",
    )
    parser.add_argument("--memory", action="store_true", help="instead of timings: each side's peak step RSS")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-venv", default=DEFAULT_VENV)
    parser.add_argument("--setup", action="store_true", help="create --upstream-venv from PyPI and exit")
    args = parser.parse_args()
    if args.setup:
        setup_venv(Path(args.upstream_venv))
        return
    if not _has_upstream():
        if os.environ.get("RFDETR_VS_UPSTREAM_CHILD"):
            print(f"UPSTREAM NOT AVAILABLE: `import rfdetr` fails in {sys.executable}", file=sys.stderr)
            raise SystemExit(2)
        reexec_or_explain(args)
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from rfdetr_fn.model.precision import cpu_bf16_units

    precisions = {"fp32": ["fp32"], "bf16": ["fp32", "bf16"]}.get(args.precision)
    args.precisions = precisions or (["fp32", "bf16"] if cpu_bf16_units() else ["fp32"])
    if args.memory_child:
        peak_rss_child(args)
        return
    import rfdetr

    from rfdetr_fn.model.precision import describe_cpu

    print(f"CPU: {describe_cpu()}")
    print(
        f"torch {torch.__version__}, rfdetr {getattr(rfdetr, '__version__', UPSTREAM_VERSION)}, "
        f"{torch.get_num_threads()} threads, {args.preset} {args.resolution} px, batch {args.batch_size}"
    )
    if args.memory:
        peak_rss_table(args)
        return
    ours, up = build(args)
    print(f"same weights: max |logit difference| of the eval forward {parity(ours, up):.2e} (fp32)")
    print("\n| precision | what | upstream | rfdetr_fn | vs upstream same precision | vs upstream as shipped (fp32) |")
    print("|---|---|---|---|---|---|", flush=True)
    shipped = {}
    for precision in args.precisions:
        pieces = timers(ours, up, precision)
        for what, pair, steps in (
            ("inference, batch 1", pieces["inference"], args.infer_steps),
            ("train step", pieces["step"], args.steps),
        ):
            t_up, t_ours = interleaved(pair, steps, args.warmup)
            shipped.setdefault(what, t_up)  # fp32 comes first: upstream as shipped on CPU
            up_cell = t_up if isinstance(t_up, str) else _fmt(t_up)
            same = "-" if isinstance(t_up, str) else f"{t_up / t_ours:.2f}x"
            row = f"| {precision} | {what} | {up_cell} | {_fmt(t_ours)} | {same} | {shipped[what] / t_ours:.2f}x |"
            print(row, flush=True)


def _fmt(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.0f} ms"


if __name__ == "__main__":
    main()
