"""Logger fixes for runs that fit and test in separate processes (``ddp_spawn``) or resume."""

from __future__ import annotations

import csv
import os

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
