"""Report figures and metric callbacks: where the framework meets models, metrics and data.

``interpzoo.metrics`` stays tensors-in, numbers-out; everything that needs a network, a datamodule or
matplotlib to draw lives here and is imported only when a run writes its report. One module per method
(:mod:`~interpzoo.reports.protopnet`, :mod:`~interpzoo.reports.concept_whitening`,
:mod:`~interpzoo.reports.icnn`, :mod:`~interpzoo.reports.senn`, :mod:`~interpzoo.reports.soft_autoencoder`),
:mod:`~interpzoo.reports.common` for the confusion matrix every classifier gets, and
:mod:`~interpzoo.reports.callbacks` for metric callbacks. Figures are drawn with matplotlib's
object-oriented API: nothing here selects a backend.

>>> from interpzoo.reports import write_report
>>> paths = write_report(module, datamodule, out_dir / "figures")
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

__all__ = ["REPORTS", "write_report"]

# registered task name (interpzoo.models.registry._TASKS) -> (module, function(module, datamodule, out_dir))
REPORTS: dict[str, tuple[str, str] | None] = {
    "classification": ("interpzoo.reports.common", "classification_report"),
    "reconstruction": None,
    "protopnet": ("interpzoo.reports.protopnet", "protopnet_report"),
    "pipnet": ("interpzoo.reports.pipnet", "pipnet_report"),
    "concept_whitening": ("interpzoo.reports.concept_whitening", "concept_whitening_report"),
    "icnn": ("interpzoo.reports.icnn", "icnn_report"),
    "senn": ("interpzoo.reports.senn", "senn_report"),
    "cbm": ("interpzoo.reports.cbm", "cbm_report"),
    "soft_autoencoder": ("interpzoo.reports.soft_autoencoder", "soft_autoencoder_report"),
}


def _task(module: Any) -> str | None:
    """The registered task of ``module``, or of its nearest registered base class (a user's subclass)."""
    from interpzoo.models.registry import task_name

    for cls in type(module).__mro__:
        try:
            return task_name(cls)
        except KeyError:
            continue
    return None


def write_report(module: Any, datamodule: Any, out_dir: Path) -> list[Path]:
    """Write the report figures (PNG) of a trained LightningModule into ``out_dir``; returns their paths.

    Dispatches on the module's registered task name (:func:`interpzoo.models.registry.task_name`); a
    subclass of a registered LightningModule gets its base's report, a task without figures none. Call it
    on rank 0 only (the runner does).

    Args:
        module: a LightningModule of the zoo (``module.net`` the network, ``module.data_info`` the data).
        datamodule: the datamodule it was trained on (test split, push/probe sets).
        out_dir: folder of the figures (created).
    """
    task = _task(module)
    entry = REPORTS.get(task) if task is not None else None
    if entry is None:
        return []
    mod, fn = entry
    report = getattr(importlib.import_module(mod), fn)
    kwargs = {}
    scores = getattr(module, "scorecard_unit_scores", None)  # set by the GroundTruthScorecard callback
    if scores is not None and "part_scores" in inspect.signature(report).parameters:
        kwargs["part_scores"] = list(scores)
    return list(report(module, datamodule, Path(out_dir), **kwargs))
