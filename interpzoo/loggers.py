"""Loggers: a CSV logger that survives process boundaries, and what every logger of a run is given.

Every logger gets the metrics (Lightning), the resolved config, the report figures where it takes images
(wandb, TensorBoard) and the exported bundle where it keeps artifacts (wandb, offline too).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger as _CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    """Keeps ``metrics.csv`` rows written by an earlier process and merges headers.

    Lightning's writer deletes an existing ``metrics.csv`` when it is created and assumes it knows
    every column written so far. Under ``ddp_spawn`` the test stage runs in new processes, so it would
    either erase the fit stage's rows or fail to rewrite them with a header that lacks their columns.
    """

    def _check_log_dir_exists(self) -> None:
        # Deliberately keep earlier rows: a run directory is ours alone (Hydra makes a new one per run).
        return

    def save(self) -> None:
        if self.metrics and not self.metrics_keys and os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])
        super().save()


class CSVLogger(_CSVLogger):
    """``pytorch_lightning.loggers.CSVLogger`` whose ``metrics.csv`` survives process boundaries."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


# ---------------------------------------------------------------------------------------------------------
# What every logger of a run gets besides the metrics Lightning logs: the report figures, the resolved
# config and (where the logger keeps artifacts) the exported bundle. Called by interpzoo.run on rank 0.


def _kind(logger: Any) -> str:
    """``"wandb"``, ``"tensorboard"``, ``"csv"``, ... from the Lightning logger class name."""
    name = type(logger).__name__.lower()
    for kind in ("wandb", "tensorboard", "csv", "mlflow"):
        if kind in name:
            return kind
    return name.removesuffix("logger")


def log_figures(loggers: Sequence[Any], figures: Sequence[Path]) -> None:
    """Log every report PNG to each logger that takes images (wandb ``log_image``, TensorBoard ``add_image``)."""
    for logger in loggers:
        for fig in figures:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"report/{Path(fig).stem}", images=[str(fig)])
            elif hasattr(getattr(logger, "experiment", None), "add_image"):
                import numpy as np
                from PIL import Image

                with Image.open(fig) as im:
                    img = np.asarray(im.convert("RGB"))
                logger.experiment.add_image(f"report/{Path(fig).stem}", img, dataformats="HWC")


def log_config(loggers: Sequence[Any], config_file: Path) -> None:
    """The resolved ``config.yaml`` as a file: a wandb run file, TensorBoard text (hyper-parameters go to
    every logger through ``log_hyperparams`` already; the CSV logger writes them to ``hparams.yaml``)."""
    text = Path(config_file).read_text()
    for logger in loggers:
        kind = _kind(logger)
        if kind == "wandb":
            logger.experiment.save(str(config_file), base_path=str(Path(config_file).parent), policy="now")
        elif kind == "tensorboard":
            logger.experiment.add_text("config", "    " + text.replace("\n", "\n    "))


def log_bundle(loggers: Sequence[Any], bundle_dir: Path, metadata: dict[str, Any]) -> list[str]:
    """Log the exported bundle folder as a ``model`` artifact to each logger that keeps artifacts (wandb).

    The artifact references the files in place (``policy="immutable"``): an offline run's record points at
    ``<run>/bundle`` and ``wandb sync`` uploads it from there. Returns the artifact names.
    """
    names = []
    for logger in loggers:
        if _kind(logger) != "wandb":
            continue
        import wandb

        run = logger.experiment
        artifact = wandb.Artifact(name=f"bundle-{run.id}", type="model", metadata=metadata)
        try:
            artifact.add_dir(str(bundle_dir), policy="immutable")
        except TypeError:  # wandb without artifact policies: copies into its staging folder
            artifact.add_dir(str(bundle_dir))
        run.log_artifact(artifact, aliases=["latest"])
        names.append(artifact.name)
    return names


def logger_locations(loggers: Sequence[Any]) -> list[tuple[str, str]]:
    """``(logger kind, folder)`` of each logger, for the run summary."""
    out = []
    for logger in loggers:
        kind = _kind(logger)
        try:
            if kind == "wandb":
                folder = str(Path(logger.experiment.dir).parent)  # <save_dir>/wandb/offline-run-*/
            else:
                folder = str(getattr(logger, "log_dir", None) or getattr(logger, "save_dir", "") or "")
        except Exception:  # noqa: BLE001 - a summary line is not worth failing a finished run
            folder = ""
        out.append((kind, folder))
    return out
