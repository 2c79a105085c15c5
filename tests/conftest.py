"""Shared test fixtures: compose the real configs (as lightning-hydra-template's tests do), shrunk for CPU."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import interpzoo.conf  # noqa: F401  (registers the entry configs' structured schemas)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")  # the same folder as interpzoo.cli.CONF_DIR in an editable install

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Small, fast data for every test that trains.
TINY_DATA = ["data.n_train=192", "data.n_val=64", "data.n_test=64", "data.batch_size=32"]


def compose_config(config_name: str, overrides: list[str], out_dir: Path, shrink: bool = True) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` and point every path at ``out_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.data_dir = str(out_dir / "data")
        cfg.paths.log_dir = str(out_dir / "logs")
        cfg.paths.output_dir = str(out_dir)
        if shrink:
            cfg.trainer.accelerator = "cpu"
            cfg.trainer.enable_model_summary = False
            cfg.trainer.enable_progress_bar = False
            if cfg.get("callbacks"):
                for name in ("progress_bar", "rich_progress_bar", "model_summary"):
                    cfg.callbacks.pop(name, None)
                if "intrinsic_dim" in cfg.callbacks:
                    cfg.callbacks.intrinsic_dim.num_samples = 64
                if "scorecard" in cfg.callbacks:
                    cfg.callbacks.scorecard.num_samples = 40
        del cfg.hydra
    GlobalHydra.instance().clear()
    return cfg


def fake_cub_fdr_overrides(experiment: str, tmp_path: Path) -> list[str]:
    """Overrides running a CUB ``experiment`` as a fast_dev_run on a tiny fake CUB tree written offline."""
    from interpzoo.datamodules.testing import make_fake_cub

    root = make_fake_cub(tmp_path / "cub", n_classes=3, n_per_class=4, size=48)
    return [
        f"experiment={experiment}",
        "debug=fdr",
        f"data.root={root}",
        "data.image_size=64",
        "data.batch_size=4",
        "data.num_workers=0",
        "model.net.backbone.pretrained=false",
    ]


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def _make(
        overrides: list[str] | None = None, config_name: str = "train", shrink: bool = True
    ) -> DictConfig:
        return compose_config(config_name, list(overrides or []), tmp_path, shrink=shrink)

    return _make
