"""Reading an interpretability number against its ceiling and its chance level.

A raw score (consistency 62 %, concept AUC 0.81, IoU 0.3) means little on its own: what would a *perfect*
explanation score on the same data, grid, threshold and split (the **oracle ceiling**), and what does a
*meaningless* one score (the **random baseline**: random prototypes in the trained net, random directions,
an ordinary network's filters)? :class:`Score` holds the three and the normalised score

    normalised = (raw - random) / (ceiling - random),

which is 1 for an explanation as good as the oracle, about 0 for one no better than chance, and keeps that
meaning for metrics where lower is better (then ``ceiling < random`` and the ratio still reads 1 = oracle).

Tensors in, numbers out: nothing here imports a network or a datamodule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["Score", "normalised_score"]


def normalised_score(raw: float, random: float, ceiling: float, eps: float = 1e-9) -> float:
    """``(raw - random) / (ceiling - random)``; ``nan`` when ceiling and random coincide (no room to measure)."""
    raw, random, ceiling = float(raw), float(random), float(ceiling)
    span = ceiling - random
    if not all(math.isfinite(v) for v in (raw, random, ceiling)) or abs(span) <= eps:
        return float("nan")
    return (raw - random) / span


@dataclass(frozen=True)
class Score:
    """One row of the scorecard: a metric of one model (or post-hoc explainer) on ground-truth data.

    Attributes:
        method: who is scored (``"protopnet"``, ``"concept_whitening"``, ``"gradcam"``, ...).
        metric: the metric's name as logged (``"part_consistency"``); see each method's scorecard module.
        raw: the model's value.
        ceiling: what the oracle (a perfect detector built from the ground truth) scores on the same data.
        random: what the random baseline scores on the same data.
        baseline: a short description of the random baseline (for the table).
        note: anything the reader must know (the ground truth used, a known cap).
    """

    method: str
    metric: str
    raw: float
    ceiling: float
    random: float
    baseline: str = ""
    note: str = ""

    @property
    def normalised(self) -> float:
        return normalised_score(self.raw, self.random, self.ceiling)

    def logged(self, prefix: str = "") -> dict[str, float]:
        """``{prefix+metric: raw, ..._ceiling, ..._random, ..._norm}`` for a logger or ``metrics.json``."""
        name = f"{prefix}{self.metric}"
        return {
            name: float(self.raw),
            f"{name}_ceiling": float(self.ceiling),
            f"{name}_random": float(self.random),
            f"{name}_norm": float(self.normalised),
        }

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "normalised": self.normalised}
