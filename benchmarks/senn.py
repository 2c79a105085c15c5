"""SENN robustness sweep: accuracy, faithfulness and stability per lambda, in one run.

Alvarez-Melis & Jaakkola (NeurIPS 2018, Section 5 / Fig. 4) claim that the robustness loss makes
explanations markedly more stable (lower local Lipschitz estimate) at a small accuracy cost. This
script trains SENN on scikit-learn digits (5 conv-autoencoder concepts, LeNet theta: the paper's
MNIST model) and on breast cancer (input features as concepts, MLP theta: the paper's UCI model)
for each lambda with the same budget and seed, plus the matched black box of each dataset, and
prints test accuracy, concept faithfulness and the local Lipschitz estimate (sampling and gradient
ascent, fixed seeded test subset) next to the lambda = 0 model of the same run.

    python benchmarks/senn.py                       # lambdas 0, 1e-4, 1e-2, 1
    python benchmarks/senn.py --lambdas 0 1 --digits-epochs 4 --tabular-epochs 20
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from interpzoo.run import train  # noqa: E402

METRICS = [
    ("test/acc", "acc"),
    ("test/faithfulness", "faith"),
    ("test/faithfulness_input", "faith_in"),
    ("test/lipschitz_sample", "L_sample"),
    ("test/lipschitz_gradient", "L_grad"),
    ("val/robustness", "L_theta(val)"),
]


def _cfg(overrides: list[str], out: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.data_dir = str(out / "data")
        cfg.paths.log_dir = str(out / "logs")
        cfg.paths.output_dir = str(out)
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.enable_model_summary = False
        cfg.trainer.enable_progress_bar = False
        for name in ("progress_bar", "rich_progress_bar", "model_summary"):
            cfg.callbacks.pop(name, None)
        del cfg.hydra
    GlobalHydra.instance().clear()
    return cfg


def run(name: str, overrides: list[str], workdir: Path) -> tuple[dict[str, float], float]:
    out = workdir / name
    common = ["logger=none", "export=false", "report=false", "callbacks.intrinsic_dim.stages=[]", "seed=0"]
    start = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = train(_cfg([*overrides, *common], out))
    return metrics, time.time() - start


def fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1e-4, 1e-2, 1.0])
    ap.add_argument("--datasets", nargs="+", default=["digits", "breast_cancer"])
    ap.add_argument("--digits-epochs", type=int, default=6)
    ap.add_argument("--tabular-epochs", type=int, default=30)
    ap.add_argument("--lip-points", type=int, default=128)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on shared CPUs)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lip = [
        f"model.lipschitz.points={args.lip_points}",
        "model.lipschitz.methods=[sample,gradient]",
        "model.lipschitz.stages=[test]",
    ]
    recipes = {
        "digits": (
            ["data=digits", "data.image_size=32", f"trainer.max_epochs={args.digits_epochs}"],
            ["model=baseline", "backbone=resnet18s", "model.net.backbone.width=8", "model.scheduler=null"],
        ),
        "breast_cancer": (
            ["data=breast_cancer", f"trainer.max_epochs={args.tabular_epochs}"],
            ["model=baseline", "model.net.name=baseline_mlp", "model.scheduler=null"],
        ),
    }
    rows: list[tuple[str, str, dict[str, float], float]] = []
    total = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for ds in args.datasets:
            data, blackbox = recipes[ds]
            m, t = run(f"{ds}_blackbox", [*blackbox, *data], work)
            rows.append((ds, "black box", m, t))
            print(
                f"{ds:14s} black box          acc {m.get('test/acc', float('nan')):.3f}  ({t:.0f} s)",
                flush=True,
            )
            for lam in args.lambdas:
                m, t = run(
                    f"{ds}_senn_{lam:g}", ["model=senn", *data, f"model.robustness_lambda={lam}", *lip], work
                )
                rows.append((ds, f"SENN lambda={lam:g}", m, t))
                print(
                    f"{ds:14s} SENN lambda={lam:<7g} "
                    + "  ".join(f"{s} {fmt(m.get(k))}" for k, s in METRICS)
                    + f"  ({t:.0f} s)",
                    flush=True,
                )

    print(f"\ntotal {time.time() - total:.0f} s, torch threads {args.threads}\n")
    head = ["data", "model", *[s for _, s in METRICS], "L_sample / L_sample(lambda=0)", "s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for ds in args.datasets:
        ref = next((m for d, n, m, _ in rows if d == ds and n == "SENN lambda=0"), None)
        for d, name, m, t in rows:
            if d != ds:
                continue
            ratio = None
            if ref and "test/lipschitz_sample" in m and ref.get("test/lipschitz_sample"):
                ratio = m["test/lipschitz_sample"] / ref["test/lipschitz_sample"]
            cells = [d, name, *[fmt(m.get(k)) for k, _ in METRICS], fmt(ratio), f"{t:.0f}"]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
