"""Evaluate a checkpoint or a bundle: ``python eval.py ckpt_path=<file.ckpt|bundle folder> [data=...]``.

Rebuilds the model the checkpoint was written by (no ``model=`` needed), tests it on the configured
datamodule and writes ``metrics.json`` into the run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    from interpzoo.run import evaluate, finish_loggers

    try:
        evaluate(cfg)
    finally:
        finish_loggers()


def main() -> None:
    """Console entry point."""
    from interpzoo.preflight import ConfigError, check_override_keys

    try:
        check_override_keys(CONF_DIR, "eval", sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
