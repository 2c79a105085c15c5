"""Interpretable CNN vs the matched ordinary CNN on PartShapes, trained in one run with the same budget.

Both models are the same network (``icnn`` architecture: resnet18s trunk, one new 3x3 conv after
``layer3``, GAP, linear); the interpretable one masks its filters and adds ``lambda * filter loss``, the
ordinary one has no mask and ``lambda = 0`` (its MI is still measured). The table reports test accuracy,
location instability (lower = filters fire at a more constant place relative to the parts; the paper's
claim is that interpretable filters are far more stable), Network-Dissection part IoU and the filter MI.

    python benchmarks/icnn.py                      # 5 epochs, 3000 training images, ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import pytorch_lightning as pl
import torch

from interpzoo.api import quiet_trainer
from interpzoo.datamodules.partshapes_dm import PartShapesDataModule
from interpzoo.models.lit_icnn import ICNNModule

METRICS = (
    "test/acc",
    "test/location_instability",
    "test/part_iou",
    "test/num_part_detectors",
    "test/filter_mi",
)


def run_one(
    name: str, dm: PartShapesDataModule, args: argparse.Namespace, masked: bool, lam: float
) -> dict[str, Any]:
    pl.seed_everything(args.seed, workers=True, verbose=False)
    module = ICNNModule(
        net={
            "name": "icnn",
            "use_mask": masked,
            "batch_norm": True,
            "backbone": {"name": "resnet18s", "stage": "layer4", "width": args.width},
        },
        data_info=dm.data_info,
        mode=args.mode,
        target_class=args.target_class,
        lambda_filter=lam,
        filter_loss={
            "normalize": args.normalize,
            "tau": args.tau,
            "template_scale": args.template_scale,
            "label_aware": not args.label_free,
        },
        optimizer={"name": "adam", "lr": args.lr, "weight_decay": 1e-4},
        scheduler={"name": "cosine"},
        metrics={"top_m": args.top_m, "part_iou_samples": args.dissect},
    )
    trainer = quiet_trainer(max_epochs=args.epochs, deterministic=False)
    start = time.time()
    trainer.fit(module, datamodule=dm)
    fit_s = time.time() - start
    res = trainer.test(module, datamodule=dm, verbose=False)[0]
    out = {k: float(res.get(k, float("nan"))) for k in METRICS}
    out["fit_s"] = fit_s
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lam", type=float, default=1.0, help="filter-loss weight of the interpretable model")
    p.add_argument(
        "--tau", type=float, default=None, help="template magnitude (default: the paper's 0.5 / n^2)"
    )
    p.add_argument("--template-scale", type=float, default=128.0, help="multiplies the templates (1 = paper)")
    p.add_argument("--normalize", choices=("none", "max"), default="max")
    p.add_argument(
        "--label-free", action="store_true", help="the paper's label-free -MI instead of the label-aware loss"
    )
    p.add_argument("--variants", default="ordinary,icnn", help="comma list of: ordinary, mask_only, icnn")
    p.add_argument("--mode", choices=("single", "multi"), default="multi")
    p.add_argument("--target-class", type=int, default=0)
    p.add_argument("--top-m", type=int, default=100)
    p.add_argument("--dissect", type=int, default=500, help="test images for the part IoU (fixed subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    # One intra-op thread: on a shared 2-core machine, OpenMP threads spin against other processes and
    # a step can be 20x slower with 2 threads than with 1.
    torch.set_num_threads(args.threads)
    dm = PartShapesDataModule(
        image_size=32,
        n_train=args.n_train,
        n_val=100,
        n_test=args.n_test,
        batch_size=args.batch_size,
        cache=True,
        seed=args.seed,
    )
    dm.setup()
    variants = {
        "ordinary": ("ordinary (no mask, lambda=0)", False, 0.0),
        "mask_only": ("mask only (lambda=0)", True, 0.0),
        "icnn": (f"interpretable (mask, lambda={args.lam:g})", True, args.lam),
    }
    rows = {}
    for key in args.variants.split(","):
        label, masked, lam = variants[key]
        rows[label] = run_one(key, dm, args, masked, lam)
    head = (
        "| model | test acc | location instability | part IoU | part detectors | filter MI (nats) | fit s |"
    )
    print(head)
    print("|" + "---|" * 7)
    for name, r in rows.items():
        print(
            f"| {name} | {r['test/acc']:.3f} | {r['test/location_instability']:.4f} | {r['test/part_iou']:.3f} | "
            f"{r['test/num_part_detectors']:.0f} | {r['test/filter_mi']:.3f} | {r['fit_s']:.0f} |"
        )
    first, last = list(rows.values())[0], list(rows.values())[-1]
    print(
        f"\nlocation instability ratio first / last row: "
        f"{first['test/location_instability'] / last['test/location_instability']:.2f}x; accuracy change "
        f"{last['test/acc'] - first['test/acc']:+.3f}"
    )


if __name__ == "__main__":
    main()
