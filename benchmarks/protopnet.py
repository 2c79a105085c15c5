"""ProtoPNet vs the matched black box on PartShapes, and prototype metrics vs random prototypes.

One run, one budget: both models use the same backbone (``resnet18s``), data, epochs and seed, through
the real pipeline (``interpzoo.run.train``). Then the trained ProtoPNet's prototype metrics on the test
split are compared with the same metrics for

* **random prototypes**: the trained network with its prototypes replaced by fresh ``U[0, 1)^D`` vectors
  (the initialisation), no push, so the gap isolates what training + push give the prototypes;
* **untrained network**: the freshly initialised ProtoPNet.

Usage::

    python benchmarks/protopnet.py --n-train 4000 --epochs 4
    python benchmarks/protopnet.py --n-train 4000 --epochs 4 model.net.backbone.stage=layer3   # 8x8 latent grid

Prints a markdown table (paste it into ``benchmarks/protopnet_results.md``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = [
    ("test/acc", "test accuracy", "{:.3f}"),
    ("test/prototype_consistency", "consistency (%)", "{:.1f}"),
    ("test/prototype_stability", "stability (%)", "{:.1f}"),
    ("test/prototype_part_purity", "part purity", "{:.3f}"),
    ("test/prototype_part_related", "part-related prototypes (purity > 0.5)", "{:.0f}"),
    ("test/prototype_class_purity", "k-NN class purity (k=6)", "{:.3f}"),
    ("test/prototype_prune_fraction", "pruning candidates (< 3 of 6 own class)", "{:.3f}"),
    ("test/prototype_unique", "unique prototypes (fraction)", "{:.2f}"),
    ("test/explanation_size", "explanation size (k@80 %)", "{:.1f}"),
    ("test/global_size", "global size", "{:.0f}"),
]


def compose(overrides: list[str], out_dir: Path) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.log_dir = str(out_dir / "logs")
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
        del cfg.hydra
    GlobalHydra.instance().clear()
    return cfg


def test_metrics(module: pl.LightningModule, datamodule: Any) -> dict[str, float]:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.test(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 keeps CPU-time comparisons stable on a shared machine",
    )
    ap.add_argument("--out", type=str, default=None, help="run folder (default: a temporary one)")
    ap.add_argument(
        "overrides",
        nargs="*",
        help="extra Hydra overrides for both models, e.g. model.net.backbone.stage=layer3",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hydra.utils import instantiate

    from interpzoo.models.lit_protopnet import ProtoPNetModule
    from interpzoo.run import train

    out = Path(args.out or tempfile.mkdtemp(prefix="protopnet_bench_"))
    common = [
        f"data.n_train={args.n_train}",
        f"data.n_val={args.n_val}",
        f"data.n_test={args.n_test}",
        f"data.batch_size={args.batch_size}",
        f"trainer.max_epochs={args.epochs}",
        f"seed={args.seed}",
        "backbone=resnet18s",
        "logger=none",
        "callbacks.intrinsic_dim=null",
        "callbacks.progress_bar=null",
        "report=false",
        *args.overrides,
    ]
    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for name in ("baseline", "protopnet"):
        cfg = compose([f"model={name}", *common], out / name)
        t0, c0 = time.time(), time.process_time()
        results[name] = train(cfg)
        seconds[name], cpu[name] = time.time() - t0, time.process_time() - c0

    # prototype metrics of the trained ProtoPNet vs random prototypes / an untrained network
    cfg = compose(["model=protopnet", *common], out / "protopnet_eval")
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    from interpzoo.models.checkpoint import read_checkpoint

    best = json.loads((out / "protopnet" / "bundle" / "config.json").read_text())["checkpoint"]
    trained: ProtoPNetModule = instantiate(cfg.model, data_info=dm.data_info, _convert_="all")
    trained.load_state_dict(read_checkpoint(best)["state_dict"])
    rand_protos = copy.deepcopy(trained)
    torch.manual_seed(args.seed + 1)
    with torch.no_grad():
        layer = rand_protos.net.prototype_layer
        layer.prototype_vectors.copy_(torch.rand_like(layer.prototype_vectors))
        rand_protos.net.push_source_index.fill_(-1)
    torch.manual_seed(args.seed)
    untrained: ProtoPNetModule = instantiate(cfg.model, data_info=dm.data_info, _convert_="all")
    columns = {
        "ProtoPNet (trained, pushed)": test_metrics(trained, dm),
        "random prototypes (trained net)": test_metrics(rand_protos, dm),
        "untrained ProtoPNet": test_metrics(untrained, dm),
    }

    lines = [
        f"PartShapes 32 px, n_train={args.n_train}, n_test={args.n_test}, {args.epochs} epochs, batch "
        f"{args.batch_size}, backbone resnet18s, seed {args.seed}, {args.threads} torch thread(s)"
        + (f", overrides {' '.join(args.overrides)}" if args.overrides else ""),
        "",
        "| model | test accuracy | CPU time (s) | wall time (s) |",
        "|---|---|---|---|",
        f"| black box (`model=baseline`) | {results['baseline']['test/acc']:.3f} | {cpu['baseline']:.0f} "
        f"| {seconds['baseline']:.0f} |",
        f"| ProtoPNet (`model=protopnet`) | {results['protopnet']['test/acc']:.3f} | {cpu['protopnet']:.0f} "
        f"| {seconds['protopnet']:.0f} |",
        f"| ratio ProtoPNet / black box | {results['protopnet']['test/acc'] / max(results['baseline']['test/acc'], 1e-9):.3f} "
        f"| {cpu['protopnet'] / max(cpu['baseline'], 1e-9):.2f} | {seconds['protopnet'] / max(seconds['baseline'], 1e-9):.2f} |",
        "",
        "| prototype metric (test split) | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for key, label, fmt in METRICS:
        row = [fmt.format(c[key]) if key in c else "n/a" for c in columns.values()]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    if "val/push_gap" in results["protopnet"]:
        lines += [
            "",
            f"push gap at the last push (val accuracy before - after push): "
            f"{results['protopnet']['val/push_gap']:+.3f}",
        ]
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print(f"\nrun folder: {out}")


if __name__ == "__main__":
    main()
