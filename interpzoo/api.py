"""Use the Hydra configs from Python (notebooks, scripts, tests) without the command line.

>>> from interpzoo.api import compose_config, run_training
>>> metrics, run_dir = run_training(["model=baseline", "trainer.max_epochs=1"], "runs/quick")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from interpzoo.cli import CONF_DIR


def compose_config(
    overrides: list[str] | None = None,
    output_dir: str | Path = "outputs/api",
    config_name: str = "train",
    root_dir: str | Path | None = None,
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style ``overrides``.

    Every path (``paths.*``) points inside ``output_dir`` except ``paths.root_dir`` (``root_dir`` or the
    current directory), so the config resolves outside a Hydra application.
    """
    output_dir = Path(output_dir).resolve()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.root_dir = str(Path(root_dir or Path.cwd()).resolve())
            cfg.paths.data_dir = str(Path(cfg.paths.root_dir) / "data")
            cfg.paths.log_dir = str(output_dir / "logs")
            cfg.paths.output_dir = str(output_dir)
            del cfg.hydra
    finally:
        GlobalHydra.instance().clear()
    return cfg


def quiet_trainer(**overrides: Any) -> Any:
    """A one-process CPU ``pl.Trainer`` with no logger, checkpoints, progress bar, summary or validation.

    For benchmarks and notebooks that time or drive a LightningModule themselves; ``overrides`` set the
    budget (``max_epochs``, ``max_steps``, ...) or turn anything back on.
    """
    import pytorch_lightning as pl

    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def run_training(
    overrides: list[str] | None = None, output_dir: str | Path = "outputs/api"
) -> tuple[dict[str, float], Path]:
    """``train.py`` from Python: returns ``(metrics, run_dir)``."""
    from interpzoo.run import finish_loggers, train

    cfg = compose_config(overrides, output_dir)
    try:
        metrics = train(cfg)
    finally:
        finish_loggers()
    return metrics, Path(cfg.paths.output_dir)


def run_evaluation(
    ckpt_path: str | Path, overrides: list[str] | None = None, output_dir: str | Path = "outputs/eval"
) -> dict[str, Any]:
    """``eval.py`` from Python: returns the test metrics."""
    from interpzoo.run import evaluate, finish_loggers

    cfg = compose_config([f"ckpt_path={ckpt_path}", *(overrides or [])], output_dir, config_name="eval")
    try:
        return evaluate(cfg)
    finally:
        finish_loggers()
