"""The run pipeline on the real configs: fit -> test best -> export -> metrics.json, eval, resume, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interpzoo.models import load_checkpoint, load_pretrained
from interpzoo.run import evaluate, train
from tests.conftest import TINY_DATA


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_train_writes_everything_and_beats_chance(make_cfg, tmp_path) -> None:
    cfg = make_cfg(
        [
            "trainer.max_epochs=3",
            "data.n_train=600",
            "data.n_val=100",
            "data.n_test=200",
            "data.batch_size=32",
        ]
    )
    metrics = train(cfg)
    files = _files(tmp_path)
    assert {
        "config.yaml",
        "metrics.json",
        "bundle/config.json",
        "bundle/model.safetensors",
        "checkpoints/last.ckpt",
    } <= files
    assert any(f.startswith("figures/") and f.endswith(".png") for f in files)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    assert {"val/acc", "test/acc", "test/loss"} <= set(on_disk)
    assert any(k.startswith("test/intrinsic_dim/") for k in on_disk)
    assert on_disk["test/acc"] > 0.2  # 10 classes: chance is 0.1
    # the ground-truth scorecard: every part metric with its oracle ceiling, random baseline and normalised score
    for m in ("gt_accuracy", "part_consistency", "part_purity", "part_deletion"):
        assert {f"test/gt/{m}{s}" for s in ("", "_ceiling", "_random", "_norm")} <= set(on_disk), m
        assert on_disk[f"test/gt/{m}_ceiling"] > on_disk[f"test/gt/{m}_random"], m
        span = on_disk[f"test/gt/{m}_ceiling"] - on_disk[f"test/gt/{m}_random"]
        want = (on_disk[f"test/gt/{m}"] - on_disk[f"test/gt/{m}_random"]) / span
        assert on_disk[f"test/gt/{m}_norm"] == pytest.approx(want, abs=1e-5), m

    # the bundle is the tested model: re-evaluating it gives the same test accuracy
    net = load_pretrained(tmp_path / "bundle")
    bundle_cfg = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert bundle_cfg["metrics"]["test/acc"] == pytest.approx(on_disk["test/acc"])
    assert bundle_cfg["data_config"]["num_classes"] == 10
    x = torch.rand(2, 3, 32, 32)
    assert net(x).logits.shape == (2, 10)


def test_every_checkpoint_loads_weights_only(make_cfg, tmp_path) -> None:
    train(make_cfg(["model=baseline", "trainer.max_epochs=1", "export=false", "report=false", *TINY_DATA]))
    ckpts = list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts
    for c in ckpts:
        ckpt = torch.load(c, weights_only=True)
        assert ckpt["interpzoo"]["architecture"] == "baseline"
        net = load_checkpoint(c)
        assert net(torch.rand(1, 3, 32, 32)).logits.shape == (1, 10)


def test_eval_checkpoint_and_bundle_match_training(make_cfg, tmp_path) -> None:
    metrics = train(make_cfg(["trainer.max_epochs=1", "report=false", *TINY_DATA]))
    best = json.loads((tmp_path / "bundle" / "config.json").read_text())["checkpoint"]
    for source in (best, str(tmp_path / "bundle")):
        out = tmp_path / ("eval_ckpt" if source.endswith(".ckpt") else "eval_bundle")
        cfg = make_cfg(["ckpt_path=" + source, *TINY_DATA], config_name="eval")
        cfg.paths.output_dir = str(out)
        got = evaluate(cfg)
        assert got["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
        assert json.loads((out / "metrics.json").read_text())["test/acc"] == pytest.approx(got["test/acc"])


def test_resume_from_last_checkpoint(make_cfg, tmp_path) -> None:
    train(
        make_cfg(
            [
                "model=baseline",
                "trainer.max_epochs=1",
                "export=false",
                "report=false",
                "test=false",
                *TINY_DATA,
            ]
        )
    )
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    cfg = make_cfg(
        [
            "model=baseline",
            "trainer.max_epochs=2",
            "export=false",
            "report=false",
            "test=false",
            f"ckpt_path={last}",
            *TINY_DATA,
        ]
    )
    train(cfg)
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 2 * 6  # 192 / 32 = 6 steps per epoch


def test_resume_refuses_checkpoint_of_another_model(make_cfg, tmp_path) -> None:
    from interpzoo.models.checkpoint import CheckpointError

    train(
        make_cfg(
            [
                "model=baseline",
                "trainer.max_epochs=1",
                "export=false",
                "report=false",
                "test=false",
                *TINY_DATA,
            ]
        )
    )
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["interpzoo"]["architecture"] = "protopnet"
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="was written by a 'protopnet' model"):
        train(make_cfg(["model=baseline", f"ckpt_path={tmp_path / 'other.ckpt'}", *TINY_DATA]))


@pytest.mark.parametrize("preset", ["fdr", "limit", "overfit"])
def test_debug_presets(make_cfg, preset: str) -> None:
    overrides = [f"debug={preset}", *TINY_DATA]
    if preset == "overfit":
        overrides.append("trainer.max_epochs=2")
    metrics = train(make_cfg(overrides))
    assert "test/acc" in metrics


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_sim_two_processes(make_cfg, tmp_path) -> None:
    metrics = train(make_cfg(["trainer=ddp_sim", "trainer.max_epochs=1", "report=false", *TINY_DATA]))
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert (tmp_path / "bundle" / "model.safetensors").is_file()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    # data.batch_size is global: each of the 2 ranks gets 16, so the step count equals single-process training


@pytest.mark.slow
def test_all_loggers_offline(make_cfg, tmp_path) -> None:
    cfg = make_cfg(
        [
            "logger=many_loggers",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=2",
            "export=false",
            *TINY_DATA,
        ]
    )
    train(cfg)
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    assert any((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert any((tmp_path / "wandb").glob("offline-run-*"))
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/acc" in header and "test/acc" in header


@pytest.mark.slow
def test_multirun_from_command_line(tmp_path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "seed=0,1",
            "debug=fdr",
            *TINY_DATA,
            f"paths.log_dir={tmp_path}",
            "hydra.sweep.dir=" + str(tmp_path / "sweep"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(results) == 2
    for r in results:
        assert "test/acc" in json.loads(r.read_text())
