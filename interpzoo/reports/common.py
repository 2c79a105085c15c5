"""Helpers of every report module and the figure every classifier gets: the test confusion matrix.

Figures are drawn with matplotlib's object-oriented API (``Figure(...)``, ``fig.savefig(path)``), which
needs no backend and leaves a user's pyplot state and backend untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from interpzoo.models.lit_base import batch_input

__all__ = ["classification_report", "confusion_matrix_figure", "predict_split", "save_figure"]


def save_figure(fig: Figure, path: Path, dpi: int = 100, tight: bool = False) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent folders created); ``tight`` runs ``tight_layout`` first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


@torch.no_grad()
def predict_split(
    module: Any, loader: Any, max_batches: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, predictions)``, each ``(N,)``, of ``module`` over ``loader`` (eval mode, no gradients)."""
    was_training = module.training
    module.eval()
    ys, ps = [], []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = batch_input(batch).to(module.device)
        ps.append(module(x).logits.argmax(1).cpu())
        ys.append(batch["label"])
    module.train(was_training)
    return torch.cat(ys), torch.cat(ps)


def confusion_matrix_figure(module: Any, datamodule: Any, path: Path, max_batches: int | None = 50) -> Path:
    """Confusion matrix of the test split, rows = true class, normalised per row."""
    y, p = predict_split(module, datamodule.test_dataloader(), max_batches)
    k = int(module.data_info.get("num_classes") or int(max(y.max(), p.max())) + 1)
    cm = torch.zeros(k, k)
    cm.index_put_((y, p), torch.ones_like(y, dtype=torch.float), accumulate=True)
    cm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    names = module.data_info.get("class_names") or [str(i) for i in range(k)]
    fig = Figure(figsize=(1 + 0.45 * k, 1 + 0.45 * k))
    ax = fig.subplots()
    ax.imshow(cm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test accuracy {float((y == p).float().mean()):.3f}")
    return save_figure(fig, path, tight=True)


def classification_report(module: Any, datamodule: Any, out_dir: Path) -> list[Path]:
    """``confusion_matrix.png`` in ``out_dir``: the report of a plain classifier."""
    return [confusion_matrix_figure(module, datamodule, Path(out_dir) / "confusion_matrix.png")]
