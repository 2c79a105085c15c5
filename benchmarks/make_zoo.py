"""Re-create the shipped pretrained bundles in ``models/pretrained/`` and print the README zoo table.

Each recipe is a list of ``train.py`` overrides on data that ships offline (PartShapes, scikit-learn
digits / breast_cancer). A recipe is trained with :func:`interpzoo.api.run_training` in a temporary
folder; its exported bundle is copied to ``models/pretrained/<name>/`` and its ``config.json`` gets the
exact ``python train.py ...`` command (``recipe``), the seed and the measured test metrics.

    python benchmarks/make_zoo.py                      # re-create every bundle (a few CPU minutes)
    python benchmarks/make_zoo.py --only 'cw_*'        # a subset (glob on bundle names)
    python benchmarks/make_zoo.py --table              # the markdown zoo table from the shipped bundles
    python benchmarks/make_zoo.py --table --write-readme   # ... and put it into README.md
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRETRAINED = ROOT / "models" / "pretrained"
README = ROOT / "README.md"
TABLE_START = "<!-- zoo-table-start -->"
TABLE_END = "<!-- zoo-table-end -->"

# Shared by every recipe: fast CPU runs that still export a bundle with test metrics.
# (the ground-truth scorecard of every bundle is benchmarks/scorecard.py's job; eval.py does not run it)
COMMON = ["logger=csv", "report=false", "~callbacks.intrinsic_dim", "~callbacks.scorecard"]
# Small PartShapes splits: enough to learn the 10 classes on a narrow resnet18s in a minute.
PS_SMALL = ["data.n_train=2000", "data.n_val=200", "data.n_test=400", "data.batch_size=50"]
NARROW = ["backbone=resnet18s", "model.net.backbone.width=8"]


def _recipes() -> dict[str, list[str]]:
    """Bundle name -> ``train.py`` overrides (``<method>_<backbone>.<data>_s<seed>``)."""
    out: dict[str, list[str]] = {}
    for s in (0, 1, 2):
        # the matched black boxes at part scale (64 px, varied pose): the trunks the ProtoPNet bundles start from
        out[f"baseline_resnet18s.partshapes_partscale_s{s}"] = [
            "experiment=baseline_partscale",
            *NARROW,
            *PS_SMALL,
            "trainer.max_epochs=3",
            f"seed={s}",
        ]
    for s in (0, 1, 2):
        # ProtoPNet at part scale (issue 14): layer3 (16x16 grid at 64 px), varied pose, the trunk warm-started
        # from the black box of the same seed, named as a shipped bundle (built first when missing: plan())
        out[f"protopnet_resnet18s.partshapes_s{s}"] = [
            "experiment=protopnet_partscale",
            *NARROW,
            *PS_SMALL,
            f"model.net.backbone.pretrained=baseline_resnet18s.partshapes_partscale_s{s}",
            "model.metrics.stability=false",
            f"seed={s}",
        ]
    for s in (0, 1, 2):
        # contrastive alignment and the feature loss on scene probes, exact whitening, population statistics
        # (issue 15)
        out[f"cw_resnet18s.partshapes_s{s}"] = [
            "model=cw",
            *NARROW,
            "data=partshapes",
            *PS_SMALL,
            "model.net.alignment=contrastive",
            "model.concept_loss_weight=5",
            "data.concept_probes=scene",
            "data.n_concept_train=2000",
            "model.net.T=40",
            "model.net.solver=eigh",
            "model.precise_statistics_batches=20",
            "model.baselines=false",
            "model.permutation_importance=false",
            "model.concept_eval_samples=100",
            "data.batch_size=32",
            "model.align_every=5",
            "trainer.max_epochs=10",
            # validation accuracy reaches 1 in a few epochs and a tie keeps the earliest checkpoint, which would
            # throw away the epochs that train the concept axes: select on the validation loss instead
            "model.monitor=val/loss",
            "model.monitor_mode=min",
            f"seed={s}",
        ]
    for s in (0, 1, 2):  # joint CBM on all 66 PartShapes concepts (the model config's default)
        out[f"cbm_resnet18s.partshapes_s{s}"] = [
            "model=cbm",
            *NARROW,
            "data=partshapes",
            *PS_SMALL,
            "trainer.max_epochs=4",
            f"seed={s}",
        ]
    for s in (0, 1, 2):
        # PIP-Net at part scale (issue 14): the same 64 px varied-pose data, layer3 grid and warm start as ProtoPNet
        out[f"pipnet_resnet18s.partshapes_s{s}"] = [
            "experiment=pipnet_partscale",
            *NARROW,
            *PS_SMALL,
            f"model.net.backbone.pretrained=baseline_resnet18s.partshapes_partscale_s{s}",
            f"seed={s}",
        ]
    out["icnn_resnet18s.partshapes_s0"] = [
        "model=icnn",
        *NARROW,
        "data=partshapes",
        *PS_SMALL,
        "model.metrics.part_iou_samples=128",
        "trainer.max_epochs=3",
        "seed=0",
    ]
    # the matched ordinary network (same narrow trunk, same data): the black box that post-hoc explainers
    # (Grad-CAM, Integrated Gradients, a linear concept probe) explain in benchmarks/scorecard.py
    out["baseline_resnet18s.partshapes_s0"] = [
        "experiment=baseline_partshapes",
        *NARROW,
        *PS_SMALL,
        "trainer.max_epochs=3",
        "seed=0",
    ]
    out["senn_lenet.digits_s0"] = ["experiment=senn_digits", "trainer.max_epochs=4", "seed=0"]
    out["senn_mlp.breast_cancer_s0"] = ["model=senn", "data=breast_cancer", "trainer.max_epochs=20", "seed=0"]
    out["softae.partshapes_grey_s0"] = [
        "model=softae",
        "data=partshapes",
        "data.grayscale=true",
        "data.noise_std=0",
        *PS_SMALL,
        "model.net.widths=[8,16]",
        "trainer.max_epochs=3",
        "seed=0",
    ]
    return out


RECIPES = _recipes()

# Headline interpretability metric per architecture prefix: (metric key, column label).
HEADLINE = {
    "baseline": ("none", "none"),  # the black box has no interpretability metric of its own: "–"
    # part-scale bundles (issue 14): is a prototype one part? (1 = the oracle, 0 = random own-class patches)
    "protopnet": ("test/prototype_consistency_norm", "part consistency (normalised)"),
    "cw": ("test/concept_auc_mean", "concept AUC (mean)"),
    "cbm": ("test/concept_auc_mean", "concept AUC (mean)"),
    "pipnet": ("test/explanation_size", "explanation size (prototypes per decision)"),
    "icnn": ("test/location_instability", "location instability (lower is better)"),
    "senn": ("test/faithfulness", "faithfulness"),
    "soft": ("test/code_sparsity", "code sparsity"),
}


def dependencies(overrides: list[str]) -> list[str]:
    """The bundles of this zoo a recipe starts from (``...backbone.pretrained=<bundle name>``), in order."""
    return [
        value
        for key, _, value in (o.partition("=") for o in overrides)
        if key.endswith(".pretrained") and value in _recipe_names()
    ]


def _recipe_names() -> set[str]:
    return set(RECIPES) if "RECIPES" in globals() else set()


def plan(names: list[str]) -> list[str]:
    """``names`` in build order, preceded by the bundles they start from that are not shipped yet."""
    out: list[str] = []

    def visit(name: str) -> None:
        for dep in dependencies(RECIPES[name]):
            if dep not in names and (PRETRAINED / dep / "config.json").is_file():
                continue  # shipped already, and not asked to be re-made
            visit(dep)
        if name not in out:
            out.append(name)

    for name in names:
        visit(name)
    return out


def recipe_command(overrides: list[str]) -> str:
    return "python train.py " + " ".join(shlex.quote(o) for o in [*overrides, *COMMON])


def build(name: str, overrides: list[str]) -> Path:
    """Train one recipe and install its bundle as ``models/pretrained/<name>``."""
    import torch

    from interpzoo.api import run_training

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix=f"zoo_{name}_") as tmp:
        metrics, run_dir = run_training([*overrides, *COMMON], tmp)
        bundle = run_dir / "bundle"
        if not (bundle / "config.json").is_file():
            raise RuntimeError(f"{name}: the run exported no bundle (see {run_dir})")
        config = json.loads((bundle / "config.json").read_text())
        config["recipe"] = recipe_command(overrides)
        config["seed"] = int(next(o.split("=", 1)[1] for o in overrides if o.startswith("seed=")))
        config["metrics"] = {k: float(v) for k, v in sorted(metrics.items()) if k.startswith("test/")}
        config["checkpoint"] = None
        dest = PRETRAINED / name
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        shutil.copy2(bundle / "model.safetensors", dest / "model.safetensors")
        (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dest


def _headline(arch: str, metrics: dict[str, float]) -> str:
    for prefix, (key, label) in HEADLINE.items():
        if arch.startswith(prefix):
            hits = sorted(k for k in metrics if k == key or k.startswith(key + "/"))
            if not hits:
                return "–"
            # per-stage metrics (soft AE): the deepest stage's code
            hit = hits[-1]
            suffix = "" if hit == key else f" ({hit[len(key) + 1 :]})"
            return f"{label}{suffix}: {metrics[hit]:.3f}"
    return "–"


def bundle_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def zoo_table() -> str:
    """The markdown model-zoo table generated from ``models/pretrained/*/config.json``."""
    rows = [
        "| bundle | method | backbone | data | seed | test accuracy / PSNR | interpretability (test) | size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    total = 0
    for d in sorted(p for p in PRETRAINED.iterdir() if (p / "config.json").is_file()):
        cfg = json.loads((d / "config.json").read_text())
        m = cfg.get("metrics", {})
        method_backbone, data_seed = d.name.split(".", 1)
        method, _, backbone = method_backbone.partition("_")
        data = data_seed.rsplit("_s", 1)[0]
        side = (cfg.get("data_config", {}).get("image_size") or [None])[0]
        if data.startswith("partshapes") and side not in (None, 32):
            data += f" ({side} px)"
        perf = (
            f"acc {m['test/acc']:.3f}"
            if "test/acc" in m
            else f"PSNR {m.get('test/psnr', float('nan')):.2f} dB"
        )
        size = bundle_size(d)
        total += size
        rows.append(
            f"| `{d.name}` | {method} | {backbone or '–'} | {data} | {cfg.get('seed')} | {perf} | "
            f"{_headline(cfg['architecture'], m)} | {size / 1024:.0f} KB |"
        )
    rows.append("")
    rows.append(
        f"{len(rows) - 3} bundles, {total / 1024 / 1024:.2f} MB in total. Each `config.json` records its "
        "`recipe` (the exact `train.py` command), seed and test metrics; re-create them with "
        "`python benchmarks/make_zoo.py` and refresh this table with "
        "`python benchmarks/make_zoo.py --table --write-readme`."
    )
    return "\n".join(rows)


def write_readme(table: str) -> None:
    text = README.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    README.write_text(text[:start] + "\n" + table + "\n" + text[end:])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="*", help="glob on bundle names to (re-)build")
    ap.add_argument("--table", action="store_true", help="print the zoo table instead of training")
    ap.add_argument("--write-readme", action="store_true", help="with --table: update README.md")
    args = ap.parse_args(argv)
    if args.table:
        table = zoo_table()
        print(table)
        if args.write_readme:
            write_readme(table)
        return
    names = [n for n in RECIPES if fnmatch.fnmatchcase(n, args.only)]
    if not names:
        raise SystemExit(f"--only {args.only!r} matches no recipe; recipes: {list(RECIPES)}")
    for name in plan(names):
        dest = build(name, RECIPES[name])
        print(f"{name}: {bundle_size(dest) / 1024:.0f} KB -> {dest}", flush=True)
    total = sum(bundle_size(d) for d in PRETRAINED.iterdir() if d.is_dir())
    print(f"models/pretrained/: {total / 1024 / 1024:.2f} MB")


if __name__ == "__main__":
    main()
