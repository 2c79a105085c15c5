"""Train an interpzoo model: ``python train.py [model=...] [data=...] [backbone=...] [trainer=...] ...``.

Composes ``conf/train.yaml`` with Hydra, validates the config, fits, tests the best checkpoint,
exports a bundle and writes ``metrics.json`` into the run directory (see README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    from interpzoo.run import finish_loggers, train

    try:
        metrics = train(cfg)
    finally:
        finish_loggers()
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


def main() -> None:
    """Console entry point: did-you-mean for mistyped keys, then Hydra."""
    from interpzoo.preflight import ConfigError, check_override_keys

    try:
        check_override_keys(CONF_DIR, "train", sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
