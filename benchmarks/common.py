"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl


def quiet_trainer(**overrides: Any) -> pl.Trainer:
    """A one-process CPU trainer with no logger, checkpoints, progress bar, summary or validation.

    Benchmarks time and compare models themselves, so everything Lightning would add around the
    training loop is off; ``overrides`` set the budget (``max_epochs``, ``max_steps``, ...).
    """
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
