"""Structured schemas (Hydra ConfigStore) of the entry configs ``conf/train.yaml`` and ``conf/eval.yaml``.

Hydra merges each entry config onto its schema, so a wrong type (``seed=abc``, ``train=maybe``) or an unknown
top-level key is refused by Hydra itself, before the pre-flight (:mod:`interpzoo.preflight`) runs its own checks
(did-you-mean, paths, registry names, constructor signatures of ``_target_`` nodes). The config groups
(``data``, ``model``, ``trainer``, ...) are typed ``Any``: their keys are checked against the signature of the
class they instantiate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class PathsConfig:
    """``conf/paths/default.yaml``: where data is read and runs are written."""

    root_dir: str = MISSING
    data_dir: str = MISSING
    log_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class RunConfig:
    """Keys shared by ``train.yaml`` and ``eval.yaml``."""

    task_name: str = MISSING
    tags: list[str] = field(default_factory=list)
    seed: int | None = 0
    ckpt_path: str | None = None
    float32_matmul_precision: str | None = None
    # refuse (false) or allow (true) writing into a run folder that already holds results
    overwrite: bool = False
    data: Any = MISSING
    callbacks: Any = None
    logger: Any = None
    trainer: Any = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    # shorthands some data/experiment configs define (conf/data/csv.yaml: path, target; concept folders)
    path: Any = None
    target: Any = None
    concepts: Any = None


@dataclass
class TrainConfig(RunConfig):
    """``conf/train.yaml``: fit, test the best checkpoint, export a bundle and write the report."""

    model: Any = MISSING
    train: bool = True
    test: bool = True
    export: bool = True
    report: bool = True
    # the metric a sweeper optimises: one name, or a list for a multi-objective study
    optimized_metric: Any = None


@dataclass
class EvalConfig(RunConfig):
    """``conf/eval.yaml``: evaluate a checkpoint or a bundle folder on one split."""

    split: str = "test"
    # eval exports and reports nothing; the debug presets set these for train.py
    export: bool = False
    report: bool = False


def register_configs() -> None:
    """Store the schemas under the names the entry configs' defaults lists use (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
