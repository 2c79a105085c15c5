"""Concept whitening vs the matched BatchNorm model on PartShapes, fine-tuned in one run with the same budget.

The paper's recipe (Chen, Bei & Rudin 2020): train a BN model, replace one BatchNorm by a
concept-whitening layer and fine-tune. Here:

1. warm-up: ``baseline_resnet18s`` (BatchNorm) trained ``--warm-epochs`` epochs;
2. two fine-tunings from that checkpoint with the same optimiser, epochs and seed:
   * **BN**: the BN model itself (the matched model);
   * **CW**: ``cw_resnet18s`` with ``layer3.0.bn1`` whitened, initialised from the BN statistics, axes
     aligned with ``--concepts`` every ``--align-every`` batches.

Printed: test accuracy of both, concept AUC per concept (one-vs-all on held-out probe images) for the
CW axes and for the two baselines on the fine-tuned BN model at the same layer (best single filter,
linear probe / CAV), decorrelation of the layer, and wall time.

    python benchmarks/concept_whitening.py --warm-epochs 3 --ft-epochs 3 --n-train 2000 --hard
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from interpzoo.api import quiet_trainer
from interpzoo.datamodules.partshapes_dm import PartShapesDataModule
from interpzoo.layers.concept_whitening import pool_axes
from interpzoo.metrics.concept_whitening import (
    WhiteningCorrelation,
    best_filter_auc,
    concept_aucs,
    linear_probe_auc,
)
from interpzoo.models.bundle import save_pretrained
from interpzoo.models.concept_whitening import forward_until
from interpzoo.models.lit_base import ClassificationModule
from interpzoo.models.lit_concept_whitening import ConceptWhiteningModule


def _trainer(epochs: int) -> pl.Trainer:
    return quiet_trainer(max_epochs=epochs)


def _backbone(args: argparse.Namespace) -> dict[str, Any]:
    return {"name": "resnet18s", "width": args.width}


def _common(args: argparse.Namespace, dm: PartShapesDataModule) -> dict[str, Any]:
    return {
        "data_info": dm.data_info,
        "optimizer": {"name": "adam", "lr": args.lr, "weight_decay": 1e-4},
        "scheduler": {"name": "cosine"},
    }


@torch.no_grad()
def _concept_features(
    net: torch.nn.Module, layer: str, dm: PartShapesDataModule, split: str, concepts: list[str], n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    sets = dm.concept_datasets(split)
    maps, labels = [], []
    for j, c in enumerate(concepts):
        x = torch.stack([sets[c][i]["image"] for i in range(min(n, len(sets[c])))])
        for chunk in x.split(128):
            maps.append(forward_until(net, layer, chunk))
        labels.append(torch.full((x.shape[0],), j))
    return torch.cat(maps), torch.cat(labels)


@torch.no_grad()
def _decorrelation(net: torch.nn.Module, layer: str, dm: PartShapesDataModule, n_batches: int = 8) -> float:
    metric = None
    for i, batch in enumerate(dm.test_dataloader()):
        if i >= n_batches:
            break
        z = forward_until(net, layer, batch["image"])
        metric = metric or WhiteningCorrelation(z.shape[1])
        metric.update(z)
    return float(metric.compute()["offdiag_mean"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warm-epochs", type=int, default=3)
    p.add_argument("--ft-epochs", type=int, default=2)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--align-every", type=int, default=5)
    p.add_argument("--concepts", nargs="+", default=["has_red", "has_striped", "has_circle"])
    p.add_argument("--activation-mode", default="pool_max")
    p.add_argument("--grad-mode", default="exact")
    p.add_argument("--concept-samples", type=int, default=200)
    p.add_argument(
        "--hard",
        action="store_true",
        help="PartShapes-hard: random layout, 3 distractors, part dropout 0.35, noise 16",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()

    hard = (
        {"num_distractors": 3, "part_dropout": 0.35, "random_rotation": True, "noise_std": 16.0}
        if args.hard
        else {}
    )
    dm = PartShapesDataModule(
        n_train=args.n_train,
        n_val=64,
        n_test=args.n_test,
        batch_size=args.batch_size,
        cache=True,
        n_concept_train=args.concept_samples,
        n_concept_test=args.concept_samples,
        **hard,
    )
    dm.setup("fit")
    common = _common(args, dm)
    layer = "backbone.body.layer3.0.bn1"

    # 1. warm-up of the BN model
    pl.seed_everything(args.seed, workers=True, verbose=False)
    warm = ClassificationModule(net={"name": "baseline_resnet18s", "backbone": _backbone(args)}, **common)
    _trainer(args.warm_epochs).fit(warm, datamodule=dm)
    tmp = Path(tempfile.mkdtemp(prefix="cw_bench_"))
    bundle = save_pretrained(warm.net, tmp / "bn_warm", data_config=dm.data_info)
    warm_s = time.time() - start

    # 2a. BN fine-tuning (the matched model)
    pl.seed_everything(args.seed + 1, workers=True, verbose=False)
    bn = ClassificationModule(net={"name": "baseline_resnet18s", "backbone": _backbone(args)}, **common)
    bn.net.load_state_dict(warm.net.state_dict())
    t = time.time()
    tr = _trainer(args.ft_epochs)
    tr.fit(bn, datamodule=dm)
    bn_s = time.time() - t
    bn_acc = float(tr.test(bn, datamodule=dm, verbose=False)[0]["test/acc"])

    # 2b. CW fine-tuning from the same warm-up
    pl.seed_everything(args.seed + 1, workers=True, verbose=False)
    cw = ConceptWhiteningModule(
        net={
            "name": "cw_resnet18s",
            "backbone": _backbone(args),
            "activation_mode": args.activation_mode,
            "grad_mode": args.grad_mode,
        },
        concepts=list(args.concepts),
        align_every=args.align_every,
        init_from=str(bundle),
        concept_eval_samples=args.concept_samples,
        **common,
    )
    t = time.time()
    tr = _trainer(args.ft_epochs)
    tr.fit(cw, datamodule=dm)
    cw_s = time.time() - t
    res = tr.test(cw, datamodule=dm, verbose=False)[0]

    # baselines on the fine-tuned BN model at the same layer (the module logs them for the warm-up model)
    bn.net.eval()
    k = len(args.concepts)
    te_maps, te_y = _concept_features(bn.net, layer, dm, "test", args.concepts, args.concept_samples)
    tr_maps, tr_y = _concept_features(bn.net, layer, dm, "train", args.concepts, args.concept_samples)
    filt, _ = best_filter_auc(pool_axes(te_maps, args.activation_mode), te_y, k)
    cav = linear_probe_auc(tr_maps.mean((2, 3)), tr_y, te_maps.mean((2, 3)), te_y, k)
    # CW axes, recomputed here from the same images (equals test/concept_auc/<c> of the module)
    cw.net.eval()
    with torch.no_grad():
        x = torch.stack(
            [
                dm.concept_datasets("test")[c][i]["image"]
                for c in args.concepts
                for i in range(args.concept_samples)
            ]
        )
        scores = torch.cat([cw.net(chunk).concept_activations for chunk in x.split(128)])
    cw_auc, _ = concept_aucs(scores, te_y, k)

    print(
        f"\nConcept whitening benchmark: PartShapes{'-hard' if args.hard else ''} {args.n_train} train / {args.n_test} test, resnet18s width "
        f"{args.width}, warm-up {args.warm_epochs} ep + fine-tune {args.ft_epochs} ep, layer3.0.bn1, "
        f"{args.activation_mode}/{args.grad_mode}, align every {args.align_every} batches\n"
    )
    print("| model | test acc | fine-tune s | mean abs off-diag corr at layer |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| BN (matched) | {bn_acc:.3f} | {bn_s:.0f} | {_decorrelation(bn.net, layer, dm):.3f} |")
    print(f"| CW | {float(res['test/acc']):.3f} | {cw_s:.0f} | {_decorrelation(cw.net, layer, dm):.3f} |")
    print("\n| concept | CW axis AUC | BN best filter AUC | BN linear probe (CAV) AUC |")
    print("| --- | ---: | ---: | ---: |")
    for j, c in enumerate(args.concepts):
        print(f"| {c} | {float(cw_auc[j]):.3f} | {float(filt[j]):.3f} | {float(cav[j]):.3f} |")
    print(
        f"| **mean** | **{float(cw_auc.mean()):.3f}** | **{float(filt.mean()):.3f}** | **{float(cav.mean()):.3f}** |"
    )
    print(
        f"\nCW module metrics: concept_auc_mean {res['test/concept_auc_mean']:.3f}, baselines on the warm-up BN "
        f"model: best filter {res.get('test/concept_auc_mean_best_filter', float('nan')):.3f}, CAV "
        f"{res.get('test/concept_auc_mean_cav', float('nan')):.3f}; rotation orthogonality error "
        f"{res['test/rotation_orthogonality_error']:.1e}; concept similarity off-diag "
        f"{res['test/concept_similarity_offdiag']:.3f}"
    )
    print(f"wall: warm-up {warm_s:.0f} s, total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
