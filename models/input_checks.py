"""Input checks shared by every zoo network: a bad tensor gets a clear error, not NaN or silent logits.

Every network takes float images in ``[0, 1]`` (or float feature tables) and normalises them itself.
The checks refuse what a person easily passes by mistake and the network would otherwise swallow:

* wrong rank or channel count (``(C, H, W)`` without a batch, channels-last ``(B, H, W, C)``);
* integer or bool tensors (``uint8`` images straight from a decoder);
* images smaller than the trunk's minimum size (a 2x2 image into a stride-32 trunk);
* NaN or infinite values (the error counts them);
* values far outside ``[0, 1]``: a maximum above ``max_value`` (0-255 pixels) or a minimum below
  ``-(max_value - 1)`` (an image already normalised with mean/std). Small excursions (noise
  augmentation, Captum interpolation paths, adversarial perturbations) pass.

Cost: the value checks are one ``aminmax`` over the batch and one device-to-host copy of two numbers
(NaN propagates through ``aminmax``, so it also finds non-finite values); the counts are computed
only on the error path. Under ``torch.compile`` / ``torch.export`` the data-dependent checks are
skipped (they would break the graph) and the shape and dtype checks stay (they become guards). Under
``torch.jit.trace`` nothing is checked: a trace records tensor operations only, so no check would be
part of the traced graph, and reading traced sizes would only emit ``TracerWarning`` s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "IMAGE_MAX_VALUE",
    "check_finite_range",
    "check_image_input",
    "check_tabular_input",
    "value_checks_enabled",
]

# Largest value a [0, 1] image may reach before it is taken for 0-255 pixels (noise and Captum paths
# stay well below it; a 0-255 image is far above it).
IMAGE_MAX_VALUE = 2.0


def value_checks_enabled(x: torch.Tensor) -> bool:
    """Whether data-dependent checks may read ``x``'s values (not under compile/export/tracing, not meta)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return x.device.type != "meta" and x.numel() > 0


def _dtype_error(x: torch.Tensor, what: str, fix: str) -> ValueError:
    return ValueError(f"expected a floating-point {what}, got dtype {x.dtype}; convert with {fix}")


def check_finite_range(x: torch.Tensor, max_value: float | None, what: str = "image") -> None:
    """Refuse NaN/Inf values and, with ``max_value``, values far outside ``[0, 1]``.

    Args:
        x: any float tensor.
        max_value: largest value accepted (``None``: no range check, for feature tables); the smallest
            accepted is ``-(max_value - 1)``, the same excursion below 0 as above 1.
        what: what ``x`` is, for the message (``"image"``, ``"feature table"``).
    """
    if not value_checks_enabled(x):
        return
    lo_hi = torch.aminmax(x.detach())  # NaN propagates to both, +-Inf to one of them
    lo, hi = torch.stack([lo_hi.min, lo_hi.max]).tolist()  # the only host sync
    if not (abs(lo) < float("inf") and abs(hi) < float("inf")):  # False for NaN too
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"the input {what} has {n_nan} NaN and {n_inf} infinite values (of {x.numel()}, shape "
            f"{tuple(x.shape)}); the network needs finite inputs: find where they come from (a division "
            f"by zero in preprocessing, a missing value in the data) or replace them, e.g. "
            f"torch.nan_to_num(x)"
        )
    if max_value is None:
        return
    if hi > max_value:
        raise ValueError(
            f"the input {what} has values up to {hi:.4g} (min {lo:.4g}): looks like 0–255; divide by 255. "
            f"The network takes [0, 1] images and normalises them itself (if the images are already "
            f"normalised with a mean/std, pass the [0, 1] images instead)"
        )
    if lo < 1.0 - max_value:
        raise ValueError(
            f"the input {what} has values down to {lo:.4g} (max {hi:.4g}): looks already normalised "
            f"(x - mean) / std; pass [0, 1] images instead, the network normalises them itself"
        )


def check_image_input(
    x: torch.Tensor,
    in_chans: int,
    min_size: Sequence[int] | None = None,
    max_value: float | None = IMAGE_MAX_VALUE,
    trunk: str = "",
) -> None:
    """Raise a ``ValueError`` naming the problem and the fix for anything but a ``[0, 1]`` image batch.

    Args:
        x: the network input, expected ``(B, in_chans, H, W)`` float in ``[0, 1]``.
        in_chans: expected channels.
        min_size: ``(H_min, W_min)``, the smallest image the network can use (``None``: any).
        max_value: see :func:`check_finite_range` (``None``: finite values only).
        trunk: name of the trunk, for the minimum-size message.
    """
    if torch.jit.is_tracing():
        return
    if x.dim() != 4:
        hint = " (add a batch dimension: x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(f"expected an image batch (B, {in_chans}, H, W), got shape {tuple(x.shape)}{hint}")
    if x.shape[1] != in_chans:
        hint = " (channels-last? use x.permute(0, 3, 1, 2))" if x.shape[-1] == in_chans else ""
        raise ValueError(f"expected {in_chans} input channels, got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        fix = "x.float()" if x.dtype == torch.bool else "x.float() / 255 (the network takes [0, 1] images)"
        raise _dtype_error(x, "image batch", fix)
    if min_size is not None:
        mh, mw = int(min_size[0]), int(min_size[1])
        h, w = int(x.shape[2]), int(x.shape[3])
        if h < mh or w < mw:
            of = f" for the {trunk} trunk" if trunk else ""
            raise ValueError(
                f"image of {h}x{w} pixels is smaller than the minimum {mh}x{mw}{of}; resize or pad the "
                f"images to at least {mh}x{mw} (e.g. torch.nn.functional.interpolate(x, size=({mh}, {mw})))"
            )
    check_finite_range(x, max_value, "image")


def check_tabular_input(x: torch.Tensor, num_features: int) -> None:
    """Raise a ``ValueError`` for anything but a finite float ``(B, num_features)`` table."""
    if torch.jit.is_tracing():
        return
    if x.dim() != 2 or x.shape[1] != num_features:
        hint = " (add a batch dimension: x.unsqueeze(0))" if tuple(x.shape) == (num_features,) else ""
        raise ValueError(
            f"expected tabular input (B, {num_features}): {num_features} features per row, got shape "
            f"{tuple(x.shape)}{hint}; pass the same feature columns the network was built with"
        )
    if not x.is_floating_point():
        raise _dtype_error(x, "feature table", "x.float()")
    check_finite_range(x, None, "feature table")
