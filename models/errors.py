"""Error-message helpers of the models package; the implementation lives in :mod:`interpzoo.utils`."""

from __future__ import annotations

from interpzoo.utils import did_you_mean

__all__ = ["did_you_mean"]
