"""Console entry points ``interpzoo-train`` and ``interpzoo-eval`` (``train.py`` / ``eval.py`` call them).

The configs ship inside the package (``interpzoo.conf``, the checkout's ``conf/`` folder), so both commands
compose from any directory after a non-editable install. A user adds their own config folder with Hydra's
``--config-dir <dir>`` (searched before the shipped one) or a ``hydra.searchpath`` entry.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import interpzoo.conf

CONF_DIR = str(Path(interpzoo.conf.__file__).resolve().parent)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _train(cfg: DictConfig) -> float | None:
    from interpzoo.run import finish_loggers, train

    try:
        metrics = train(cfg)
    finally:
        finish_loggers()
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _eval(cfg: DictConfig) -> None:
    from interpzoo.run import evaluate, finish_loggers

    try:
        evaluate(cfg)
    finally:
        finish_loggers()


def _preflight(config_name: str) -> None:
    from interpzoo.preflight import ConfigError, check_override_keys

    try:
        check_override_keys(CONF_DIR, config_name, sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def train_main() -> None:
    """``interpzoo-train [overrides]``: did-you-mean for mistyped keys, then Hydra (``conf/train.yaml``)."""
    _preflight("train")
    _train()


def eval_main() -> None:
    """``interpzoo-eval ckpt_path=<file.ckpt|bundle folder> [overrides]`` (``conf/eval.yaml``)."""
    _preflight("eval")
    _eval()
