"""LoRA fine-tune from a saved checkpoint (about a minute on CPU with the tiny preset).

    python examples/lora_finetune.py [--rank 4 --alpha 8] [--plain] [OUT_DIR]

1. a short full training run writes `checkpoint_best_total.pth` (the "pretrained" weights);
2. a DoRA (or, with --plain, LoRA) fine-tune from it (`backbone_lora`: adapters on the ViT's
   query/key/value, the ViT frozen) at any rank and alpha: both live in the model config
   (`lora_rank`, `lora_alpha`, `lora_dora`; flags --model.lora-rank/--model.lora-alpha), so training,
   `rf.apply`, merging and the weights file all use the same scaling alpha / rank;
   its weights files use upstream's PEFT layout (`backbone.0.encoder.base_model.model.…`);
3. the adapters are merged into dense weights and exported as a plain upstream `.pth`; the merged model
   must equal the adapted one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import attrs
import torch

import rfdetr_fn as rf
from rfdetr_fn import tree
from rfdetr_fn.config import DataConfig, TrainConfig
from rfdetr_fn.fit import FitArgs, fit
from rfdetr_fn.model import lora

QUICK = dict(batch_size=4, lr=1e-3, lr_encoder=1e-3, multi_scale="off", compile="off", progress_bar=False,
             tensorboard=False)  # fmt: skip
DATA = DataConfig(synthetic_images=16, num_workers=0)


def main(out: Path, rank: int = 16, alpha: float = 16.0, dora: bool = True) -> None:
    base = fit(FitArgs(preset="tiny", model=rf.presets.tiny(), train=TrainConfig(epochs=2, output_dir=str(out / "base"),
               **QUICK), data=DATA))  # fmt: skip
    pretrained = out / "base" / "checkpoint_best_total.pth"
    print(f"base run: {base.get('val/mAP_50_95', 0.0):.4f} mAP, weights in {pretrained}")

    cfg = attrs.evolve(rf.presets.tiny(), backbone_lora=True, lora_rank=rank, lora_alpha=alpha, lora_dora=dora)
    tcfg = TrainConfig(epochs=2, output_dir=str(out / "lora"), pretrain_weights=str(pretrained), **QUICK)
    fit(FitArgs(preset="tiny", model=cfg, train=tcfg, data=DATA))
    tuned = out / "lora" / "checkpoint_best_total.pth"
    keys = torch.load(tuned, weights_only=True)["model"]
    peft = [k for k in keys if k.startswith(lora.PEFT_PREFIX)]
    print(f"LoRA run wrote {len(peft)} encoder tensors in upstream's PEFT layout, e.g. {peft[-1]}")

    cfg, params = rf.load_weights(tuned)  # keeps the adapters: the file says backbone_lora, rank and alpha
    scaling = lora.scaling(cfg)
    print(f"adapters: rank {cfg.lora_rank}, alpha {cfg.lora_alpha} (scaling {scaling:g}), DoRA {cfg.lora_dora}")
    adapters, _ = tree.partition(params, lambda key, leaf: lora.is_adapter(key))
    share = rf.tree.num_params(adapters) / rf.tree.num_params(params)
    print(f"adapters: {rf.tree.num_params(adapters)} parameters, {share:.1%} of the model")

    dense_cfg = attrs.evolve(cfg, backbone_lora=False)
    merged = lora.merge_for(params, cfg)  # at the config's alpha / rank
    rf.save_weights(out / "merged.pth", merged, dense_cfg)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a = rf.apply(params, images, None, cfg, train=False)["pred_logits"]
    b = rf.apply(rf.load_weights(out / "merged.pth")[1], images, None, dense_cfg, train=False)["pred_logits"]
    gap = float((a - b).abs().max())
    print(f"merged dense weights in {out / 'merged.pth'}: max |logit difference| {gap:.2e}")
    if gap > 1e-4:
        sys.exit("merged weights do not reproduce the adapted model")
    print(f"merged == adapted (rank {cfg.lora_rank}, alpha {cfg.lora_alpha}): max |logit difference| {gap:.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="output folder (default: a temporary one)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (upstream 16)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (upstream 16)")
    parser.add_argument("--plain", action="store_true", help="plain LoRA instead of DoRA")
    cli = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(cli.out) if cli.out else Path(tmp), cli.rank, cli.alpha, not cli.plain)
