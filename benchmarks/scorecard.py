"""The ground-truth scorecard of every shipped bundle and of the post-hoc explanations a user would use instead.

    python benchmarks/scorecard.py                 # all bundles, 500 held-out images, seed 0 (CPU, ~10 min)
    python benchmarks/scorecard.py --num-samples 100 --only 'protopnet*'

Every PartShapes bundle is scored by :func:`interpzoo.scorecard.evaluate` on the same held-out split: test
images whose pose varies (random rotation and position; same classes and noise as the training data). Each
row gives the raw value, the oracle ceiling, the random baseline and ``normalised = (raw - random) /
(ceiling - random)``. The matched ordinary network (``baseline_resnet18s.partshapes_s0``, same trunk and data)
is explained post hoc with Grad-CAM and Integrated Gradients (part location, Captum) and with a linear concept
probe (CAV, scikit-learn), scored with the same code. Bundles on data without ground truth are listed as such.

Writes ``benchmarks/scorecard_results.md`` (the table, with the command and seed) and
``benchmarks/scorecard.png`` (normalised scores), and with ``--write-readme`` the README's scorecard table.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "models" / "pretrained"
RESULTS = ROOT / "benchmarks" / "scorecard_results.md"
FIGURE = ROOT / "benchmarks" / "scorecard.png"
README = ROOT / "README.md"
TABLE_START = "<!-- scorecard-table-start -->"
TABLE_END = "<!-- scorecard-table-end -->"
BLACK_BOX = "baseline_resnet18s.partshapes_s0"


def _fmt(v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "–"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _datamodule(config: dict, cache: dict):
    """The PartShapes datamodule a bundle was trained on (defaults at its image size, grey if one channel), or
    ``None``."""
    from interpzoo.datamodules.partshapes_dm import PartShapesDataModule

    info = config.get("data_config", {})
    if "class_hash" not in info:
        return None
    grey = int(info.get("in_chans", 3)) == 1
    size = int(info.get("image_size", [32])[0])
    if (grey, size) not in cache:
        cache[grey, size] = PartShapesDataModule(grayscale=grey, image_size=size)
    dm = cache[grey, size]
    if dm.class_hash != info["class_hash"]:
        return None
    return dm


def run(names: list[str], num_samples: int, seed: int) -> tuple[list[dict], list[str]]:
    from interpzoo.models.bundle import load_pretrained
    from interpzoo.scorecard import NoGroundTruth, accuracy_row, evaluate, posthoc
    from interpzoo.scorecard import concept_whitening as cw_scorer
    from interpzoo.scorecard import icnn as icnn_scorer

    rows: list[dict] = []
    skipped: list[str] = []
    cache: dict = {}
    for name in names:
        config = json.loads((PRETRAINED / name / "config.json").read_text())
        dm = _datamodule(config, cache)
        net = load_pretrained(name)
        start = time.process_time()
        if dm is None:
            skipped.append(f"`{name}`: trained on data without ground-truth parts or concepts")
            continue
        try:
            if name == BLACK_BOX:
                scores = [accuracy_row(net, dm, num_samples, "black box")]
                scores += posthoc.score(net, dm, num_samples, seed, ("gradcam", "integrated_gradients"))
                cw_config = json.loads(
                    (PRETRAINED / "cw_resnet18s.partshapes_s0" / "config.json").read_text()
                )
                concepts = cw_config["model_args"]["concepts"]
                scores += cw_scorer.score_linear_probe(net, dm, concepts, num_samples, seed)
            else:
                scores = evaluate(net, dm, num_samples, seed)
                if config["architecture"] == "icnn" and (PRETRAINED / BLACK_BOX).is_dir():
                    # the matched ordinary network's filters (its last stage), read like the part filters
                    plain = icnn_scorer.score(
                        net, dm, num_samples, seed, reference_net=load_pretrained(BLACK_BOX)
                    )
                    scores += [s for s in plain if s.method == "plain_cnn_filters"]
        except NoGroundTruth as e:
            skipped.append(f"`{name}`: {e}")
            continue
        secs = time.process_time() - start
        for s in scores:
            rows.append({"bundle": name, **s.as_dict(), "cpu_s": secs})
        print(f"{name}: {len(scores)} rows, {secs:.0f} s CPU", file=sys.stderr)
    return rows, skipped


def _headline_rows(rows: list[dict]) -> list[dict]:
    """One row per (bundle, method, metric); per-concept CW rows are folded into their mean."""
    return [r for r in rows if "/" not in r["metric"]]


def table(rows: list[dict], skipped: list[str], command: str, seed: int, num_samples: int) -> str:
    lines = [
        f"Command: `{command}` (seed {seed}, {num_samples} held-out PartShapes test images with varied pose, "
        f"torch {torch.__version__}, CPU).",
        "",
        "| bundle | explained by | metric | raw | ceiling (oracle) | random | normalised |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in _headline_rows(rows):
        lines.append(
            f"| `{r['bundle']}` | {r['method']} | {r['metric']} | {_fmt(r['raw'])} | {_fmt(r['ceiling'])} | "
            f"{_fmt(r['random'])} | **{_fmt(r['normalised'])}** |"
        )
    lines.append("")
    lines.append(
        "normalised = (raw − random) / (ceiling − random): 1 = as good as a perfect explanation built from the "
        "ground truth, 0 = no better than the random baseline. Baselines: "
        + "; ".join(
            sorted({f"{r['method']}: {r['baseline']}" for r in _headline_rows(rows) if r["baseline"]})
        )
        + "."
    )
    if skipped:
        lines.append("")
        lines.append("Not scored (no ground truth): " + "; ".join(skipped) + ".")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _headline_rows(rows) if math.isfinite(r["normalised"])]
    labels = [f"{r['bundle'].split('.')[0]} / {r['method']}: {r['metric']}" for r in rows]
    values = [r["normalised"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2))
    y = range(len(rows))
    ax.barh(list(y), values, color=["tab:green" if v >= 0.5 else "tab:grey" for v in values])
    ax.axvline(0.0, color="black", lw=0.8)
    ax.axvline(1.0, color="tab:green", lw=0.8, ls="--")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("normalised score (0 = random baseline, 1 = oracle ceiling)")
    ax.set_title("interpzoo scorecard on held-out PartShapes (varied pose)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=500, help="held-out images (default 500)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random baselines (default 0)")
    ap.add_argument("--only", default="*", help="glob on bundle names (default: every shipped bundle)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="Markdown output (default benchmarks/...)")
    ap.add_argument("--figure", type=Path, default=FIGURE, help="figure output (PNG)")
    ap.add_argument("--write-readme", action="store_true", help="also replace the README's scorecard table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = sorted(
        p.name
        for p in PRETRAINED.iterdir()
        if (p / "config.json").is_file() and fnmatch.fnmatchcase(p.name, args.only)
    )
    if not names:
        raise SystemExit(f"--only {args.only!r} matches no bundle in {PRETRAINED}")
    command = "python benchmarks/scorecard.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows, skipped = run(names, args.num_samples, args.seed)
    text = table(rows, skipped, command.strip(), args.seed, args.num_samples)
    print(text)
    args.out.write_text("# Scorecard results\n\n" + text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    if rows:
        figure(rows, args.figure)
    if args.write_readme:
        doc = README.read_text()
        start, end = doc.index(TABLE_START) + len(TABLE_START), doc.index(TABLE_END)
        README.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


if __name__ == "__main__":
    main()
