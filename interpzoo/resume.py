"""Exact resume: a run killed at any moment and resumed from ``last.ckpt`` ends as the uninterrupted run.

What a resumed run needs besides the weights, and where it comes from:

* optimizer, learning-rate scheduler, loop counters, ``ModelCheckpoint``'s best score: Lightning's own
  checkpoint state;
* the data order: :class:`~interpzoo.datamodules.base.GlobalBatchSampler` draws epoch ``e``'s order from
  ``seed + e``, and Lightning gives it ``e`` through ``set_epoch`` (a function of the epoch, nothing to store);
* random numbers (dropout, augmentation, DataLoader worker seeds, the random choices of each method):
  :class:`EpochSeeding` re-seeds ``torch``, ``numpy`` and ``random`` at the start of every training epoch
  from ``(seed, epoch, rank)``; the DataLoader workers of the training loader are started anew each epoch
  (no ``persistent_workers``) and draw their seeds from that state. The random state during epoch ``e`` is
  so a function of the seed and ``e`` only, and an epoch replayed after a resume draws the same numbers;
* each method's own state (ProtoPNet's push record and pruning mask are buffers; concept whitening's
  position in its concept streams is saved by its ``on_save_checkpoint``).

``last.ckpt`` is written at the end of every epoch (``callbacks.last_checkpoint``, a monitor-less
``ModelCheckpoint``: ``save_last=True`` next to a monitor writes it only in epochs that improve it); a run killed
mid-epoch resumes from the last completed epoch and replays the interrupted one.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

__all__ = ["EpochSeeding", "epoch_seed", "seed_epoch"]


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed derived from ``(seed, epoch, rank)`` (numpy ``SeedSequence``: well mixed, stable)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(rank)]).generate_state(
        2, np.uint32
    )
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed ``torch`` (CPU and CUDA), ``numpy`` and ``random`` with :func:`epoch_seed`; returns the seed."""
    s = epoch_seed(seed, epoch, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also seeds every CUDA device
    return s


class EpochSeeding(pl.Callback):
    """Re-seeds every random number generator at the start of each training epoch (see the module doc).

    Args:
        seed: the run's seed (``seed=``); stored in checkpoints, and a resume with another seed is refused
            (by :func:`interpzoo.run.check_resume_config`; this callback checks it too).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self.last_epoch_seeded: int | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed_epoch(self.seed, trainer.current_epoch, trainer.global_rank)
        self.last_epoch_seeded = int(trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("seed")
        if saved is not None and int(saved) != self.seed:
            from interpzoo.preflight import ConfigError

            raise ConfigError(
                f"the checkpoint was trained with seed {saved}, the config asks for seed {self.seed}; resume with "
                f"seed={saved} (or start a new run without ckpt_path)"
            )
