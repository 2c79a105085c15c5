"""Captum interop: post-hoc attributions on every zoo model, next to its built-in explanation.

Zoo networks return typed dataclasses (:mod:`models.outputs`); Captum wants a module whose forward
returns a tensor. :func:`as_logits_module` wraps a network so it does (logits for classifiers, one score
per image for autoencoders), and :func:`default_gradcam_layer` names the layer LayerGradCam should read
(Selvaraju et al. 2017: the last convolutional feature map) for each architecture.

>>> from captum.attr import IntegratedGradients, LayerGradCam  # doctest: +SKIP
>>> f = as_logits_module(net).eval()  # doctest: +SKIP
>>> IntegratedGradients(f).attribute(x, target=0)  # doctest: +SKIP
>>> LayerGradCam(f, gradcam_layer(f)).attribute(x, target=0)  # doctest: +SKIP

Captum itself is optional (``pip install interpzoo[xai]``); this module does not import it.
"""

from __future__ import annotations

import torch
from torch import nn

from interpzoo.models.outputs import ClassifierOutput, ReconstructionOutput
from interpzoo.models.trunk import TrunkNet

__all__ = ["AE_SCORES", "LogitsModule", "as_logits_module", "default_gradcam_layer", "gradcam_layer"]

AE_SCORES = ("error", "mean")


class LogitsModule(nn.Module):
    """``net`` with a plain-tensor forward.

    Args:
        net: any zoo network (or a module already returning tensors).
        probabilities: return the softmax of the logits instead of the logits.
        ae_score: for autoencoders, the per-image score attributed: ``"error"`` (mean squared
            reconstruction error) or ``"mean"`` (mean reconstructed intensity).

    Shape:
        ``(B, ...)`` to ``(B, K)`` for classifiers, ``(B,)`` for autoencoders.
    """

    def __init__(self, net: nn.Module, probabilities: bool = False, ae_score: str = "error") -> None:
        super().__init__()
        if ae_score not in AE_SCORES:
            raise ValueError(f"ae_score must be one of {AE_SCORES}, got {ae_score!r}")
        self.net = net
        self.probabilities = bool(probabilities)
        self.ae_score = ae_score

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, ClassifierOutput):
            return out.logits.softmax(1) if self.probabilities else out.logits
        if isinstance(out, ReconstructionOutput):
            r = out.reconstruction
            if self.ae_score == "mean":
                return r.flatten(1).mean(1)
            return (r - x).pow(2).flatten(1).mean(1)
        if torch.is_tensor(out):
            return out
        raise TypeError(
            f"{type(self.net).__name__} returned {type(out).__name__}; as_logits_module supports networks "
            "returning ClassifierOutput, ReconstructionOutput or a tensor"
        )


def as_logits_module(net: nn.Module, probabilities: bool = False, ae_score: str = "error") -> LogitsModule:
    """Wrap ``net`` so its forward returns a tensor (see :class:`LogitsModule`); shares ``net``'s parameters.

    The wrapper holds ``net`` itself, so layers taken from ``net`` (e.g. :func:`gradcam_layer`) are
    layers of the wrapper too. Put it in eval mode before attributing: attribution methods run the
    network on many interpolated inputs and should not update BatchNorm/whitening statistics.
    """
    if isinstance(net, LogitsModule):
        return net
    return LogitsModule(net, probabilities, ae_score)


def _last_conv(module: nn.Module, prefix: str) -> str:
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise ValueError(f"{type(module).__name__} has no Conv2d layer to attribute with LayerGradCam")
    return f"{prefix}.{names[-1]}" if prefix else names[-1]


def default_gradcam_layer(net: nn.Module) -> str:
    """Dotted name (inside ``net``) of the layer LayerGradCam should read for this architecture.

    * every trunk classifier (:class:`~interpzoo.models.trunk.TrunkNet`: baseline, ProtoPNet, concept
      whitening, ICNN): its ``gradcam_layer``, the trunk's last stage (``backbone.body.layer4`` for
      ResNets) or, for ICNN, the last interpretable layer (its masked output is the part-filter map);
    * SENN: the last convolution of the relevance network ``theta`` (the logits are linear in ``h``,
      so ``theta`` carries the image-dependent evidence); tabular SENN has none (error);
    * soft autoencoder: the last encoder stage (its code);
    * any other module: its last ``Conv2d``.
    """
    if isinstance(net, LogitsModule):
        return "net." + default_gradcam_layer(net.net)
    if isinstance(net, TrunkNet):
        return net.gradcam_layer
    kind = type(net).__name__
    if kind == "SENN":
        return _last_conv(net.parametrizer, "parametrizer")
    if kind == "SoftAutoencoder":
        return f"backbone.stages.{len(net.backbone.stages) - 1}"
    return _last_conv(net, "")


def gradcam_layer(net: nn.Module) -> nn.Module:
    """The module named by :func:`default_gradcam_layer`."""
    return net.get_submodule(default_gradcam_layer(net))
