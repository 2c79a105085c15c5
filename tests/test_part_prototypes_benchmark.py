"""The part-prototype benchmark (``benchmarks/part_prototypes.py``) and its recipe (``experiment=protopnet_partscale``).

The fast tests check the recipe as composed (layer3, varied pose, warm epochs, a warm start that cannot be
skipped silently). The slow test runs ``benchmarks/part_prototypes.py --quick`` as a subprocess (every model
through ``train.py``'s pipeline, ~2 min on one core) and checks its results file against its own JSON rows and
the formula ``normalised = (raw - random) / (ceiling - random)`` recomputed here, and the latent grids
(4x4 scratch, 8x8 warm-started) against the exported bundles.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from interpzoo.api import compose_config
from interpzoo.models import create_model, load_pretrained
from interpzoo.models.backbones import PretrainedWeightsError
from interpzoo.models.lit_protopnet import phase_plan

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("blackbox", "protopnet_scratch", "protopnet_warm", "pipnet")


def test_recipe_composes_to_a_warm_started_layer3_protopnet_on_varied_pose(tmp_path: Path) -> None:
    cfg = compose_config(
        ["experiment=protopnet_partscale", "model.net.backbone.pretrained=/some/bundle"], tmp_path
    )
    assert cfg.model.net.name == "protopnet"
    assert (cfg.data.pose, cfg.data.image_size) == ("varied", 64)
    backbone = cfg.model.net.backbone
    assert (backbone.name, backbone.stage, backbone.pretrained) == ("resnet18s", "layer3", "/some/bundle")
    # the black box it warm-starts from has the same trunk and data (experiment=baseline_partscale)
    bb = compose_config(["experiment=baseline_partscale"], tmp_path)
    assert bb.model.net.backbone.width == backbone.width and bb.model.net.backbone.name == backbone.name
    assert bb.model.net.name == "baseline" and (bb.data.pose, bb.data.image_size) == ("varied", 64)
    # warm epochs on the frozen trunk first, then joint at a trunk rate below the add-on's, push, last layer
    s, o = cfg.model.schedule, cfg.model.optim
    plan = phase_plan(
        cfg.trainer.max_epochs, s.warm_epochs, s.push_start, s.push_every, s.last_iters, s.final_push
    )
    assert [e["phase"] + ("+push" if e["push"] else "") for e in plan] == [
        "warm",
        "warm",
        "joint",
        "joint+push",
        "last",
        "last",
    ]
    assert o.joint.backbone < o.joint.add_on


def test_recipe_without_a_black_box_stops_with_the_fix(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=protopnet_partscale"], tmp_path)
    backbone = OmegaConf.to_container(cfg.model.net.backbone)
    assert backbone["pretrained"] not in (False, None, "")  # never a silent start from scratch
    with pytest.raises(
        PretrainedWeightsError,
        match=r"none was given.*experiment=baseline_partscale.*backbone\.pretrained=runs/blackbox/bundle",
    ):
        create_model("protopnet", num_classes=10, backbone=backbone)


def test_recipe_trunk_gives_a_16x16_grid_at_64_px_and_8x8_at_32_px() -> None:
    net = create_model(
        "protopnet", num_classes=10, backbone={"name": "resnet18s", "stage": "layer3", "width": 16}
    ).eval()
    assert net(torch.rand(2, 3, 64, 64)).similarity_maps.shape[-2:] == (16, 16)
    assert net(torch.rand(2, 3, 32, 32)).similarity_maps.shape[-2:] == (8, 8)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("part_prototypes")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "part_prototypes.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _table(text: str, header: str) -> list[list[str]]:
    """The body rows of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header))
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip().strip("*") for c in ln.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_quick_benchmark_rows_are_consistent(quick_run: Path) -> None:
    text = (quick_run / "part_prototypes_results.md").read_text()
    rows = json.loads((quick_run / "results.json").read_text())["rows"]

    # every model trained and has a test accuracy in [0, 1]
    acc = _table(text, "| model | test accuracy")
    assert len(acc) == len(MODELS)
    for row in acc:
        assert 0.0 <= float(row[1]) <= 1.0

    # every scored row: normalised recomputed independently; the table prints the same numbers
    assert {r["model"] for r in rows} >= {"blackbox", "protopnet_scratch", "protopnet_warm"}
    for r in rows:
        span = r["ceiling"] - r["random"]
        want = (r["raw"] - r["random"]) / span if abs(span) > 1e-9 else float("nan")
        assert (math.isnan(want) and math.isnan(r["normalised"])) or math.isclose(
            r["normalised"], want, rel_tol=1e-9, abs_tol=1e-12
        ), r
    table = _table(text, "| model | explained by | metric")
    assert len(table) == len(rows)
    for printed, r in zip(table, rows):
        assert printed[:3] == [r["model"], r["method"], r["metric"]]
        raw, ceiling, random, norm = (float(v) if v != "–" else float("nan") for v in printed[3:7])
        assert math.isclose(raw, r["raw"], rel_tol=5e-3, abs_tol=1e-3)
        assert (math.isnan(norm) and math.isnan(r["normalised"])) or math.isclose(
            norm, r["normalised"], rel_tol=5e-3, abs_tol=1e-3
        )
        assert math.isfinite(ceiling) and math.isfinite(random)

    # both ProtoPNets are scored on the part metrics the targets are about, with room between the baselines
    for model in ("protopnet_scratch", "protopnet_warm"):
        for metric in ("part_purity", "part_consistency"):
            (r,) = [r for r in rows if r["model"] == model and r["metric"] == metric]
            assert r["ceiling"] > r["random"]

    # the verdict's difference is warm - scratch of the normalised rows
    for metric in ("part_purity", "part_consistency"):
        m = re.search(rf"normalised {metric}: \S+ vs \S+ \(difference ([-+]\d+\.\d+)", text)
        assert m, metric
        warm, scratch = (
            next(r["normalised"] for r in rows if r["model"] == k and r["metric"] == metric)
            for k in ("protopnet_warm", "protopnet_scratch")
        )
        assert math.isclose(float(m.group(1)), warm - scratch, abs_tol=1.5e-3)


@pytest.mark.slow
def test_quick_benchmark_warm_starts_from_its_own_black_box(quick_run: Path) -> None:
    runs = quick_run / "runs"
    warm_cfg = OmegaConf.load(runs / "protopnet_warm" / "config.yaml")
    assert Path(warm_cfg.model.net.backbone.pretrained) == runs / "blackbox" / "bundle"
    assert warm_cfg.data.pose == "varied"
    # the latent grids the benchmark claims, read from the exported networks
    x = torch.rand(1, 3, 32, 32)
    for name, side in (("protopnet_scratch", 4), ("protopnet_warm", 8)):
        net = load_pretrained(runs / name / "bundle").eval()
        with torch.no_grad():
            assert net(x).similarity_maps.shape[-2:] == (side, side), name


def test_image_size_and_skip_reach_the_training_overrides() -> None:
    """``--image-size`` sets every model's ``data.image_size`` (the scorecard rebuilds its data from the black
    box's config, so it follows); ``--skip`` drops models but never the black box the warm starts need."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import part_prototypes as pp

    ns = argparse.Namespace(
        n_train=10,
        n_val=4,
        n_test=4,
        batch_size=2,
        seed=0,
        image_size=64,
        pipnet="partscale",
        skip=["protopnet_scratch", "pipnet"],
    )
    assert "data.image_size=64" in pp.common_overrides(ns)
    assert list(pp.models(ns)) == ["blackbox", "protopnet_warm"]
    with pytest.raises(SystemExit):  # the black box cannot be skipped
        pp.main(["--image-size", "64", "--skip", "blackbox"])
    # a 64 px image through the recipe's trunk: a 16x16 grid
    net = create_model(
        "protopnet", num_classes=10, backbone={"name": "resnet18s", "stage": "layer3", "width": 16}
    )
    assert net.eval()(torch.rand(1, 3, 64, 64)).similarity_maps.shape[-2:] == (16, 16)
