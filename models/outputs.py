"""Typed network outputs.

Every interpzoo network returns a dataclass instead of a bare tensor so that losses, metrics and
explanations read named fields and never re-run the network.
Methods subclass :class:`ClassifierOutput` and add their explanation tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class NetworkOutput:
    """Base of every output; ``as_dict`` gives the non-``None`` tensors by name."""

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class ClassifierOutput(NetworkOutput):
    """Output of a classifier.

    Attributes:
        logits: ``(B, K)`` class scores.
        features: ``(B, C, H, W)`` trunk feature map (or ``(B, D)``), or ``None``.
    """

    logits: torch.Tensor
    features: torch.Tensor | None = None


@dataclass
class ReconstructionOutput(NetworkOutput):
    """Output of an autoencoder.

    Attributes:
        reconstruction: ``(B, C, H, W)`` reconstructed (denoised) image.
        codes: per-stage codes ``(B, C_i, H_i, W_i)`` keyed by stage name, or ``None``.
    """

    reconstruction: torch.Tensor
    codes: dict[str, torch.Tensor] | None = None

    def as_dict(self) -> dict[str, torch.Tensor]:
        out = {"reconstruction": self.reconstruction}
        for k, v in (self.codes or {}).items():
            out[f"codes/{k}"] = v
        return out
