"""Concept whitening: a drop-in replacement for ``nn.BatchNorm2d`` whose axes align with concepts.

Chen, Bei & Rudin, "Concept whitening for interpretable image recognition", *Nature Machine
Intelligence* 2, 772-782 (2020), arXiv:2002.01650; the reference implementation is
``IterNormRotation`` in zhiCHEN96/ConceptWhitening. Written from the paper and from
``shared/specs/concept_whitening.md``; no code is reproduced.

The layer maps a feature map ``x`` ``(B, C, H, W)`` to ``z = R W (x - mu)``:

* ``W`` approximates the ZCA whitening matrix ``Sigma^{-1/2}`` by ``T`` trace-normalised
  Newton-Schulz iterations (IterNorm, Huang et al. CVPR 2019): ``P_{k+1} = 1.5 P_k - 0.5 P_k^3 Sigma_N``
  with ``Sigma_N = Sigma / tr(Sigma)``, ``W = P_T / sqrt(tr Sigma)`` (spec §1.2 steps 1-5);
* ``R`` (``running_rot``) is an orthogonal matrix whose row ``j`` is the direction of axis ``j``
  (the paper writes ``z = Q^T x_hat``, so ``Q = R^T``). Axes ``0..K-1`` are tied to the ``K`` concepts;
* training mode whitens with the batch statistics and keeps exponential moving averages of the mean
  and of ``W`` (not of the covariance: spec §1.2 step 6); evaluation uses the running statistics.

Concept alignment (paper Eq. 3, spec §1.4) maximises ``sum_j mean_{x in X_j} phi(z_j(x))`` over
orthogonal ``R``. With ``mode = j`` a forward pass of concept-``j`` images writes an exponential
moving average of ``-d phi(z_j) / d R[j, :]`` into row ``j`` of ``sum_G``; then
:meth:`ConceptWhitening2d.update_rotation_matrix` takes Cayley-transform steps with a curvilinear
(Wen & Yin) line search that keep ``R`` exactly orthogonal.

:class:`SyncConceptWhitening2d` is the DDP variant: batch statistics and concept gradients are
all-reduced like ``nn.SyncBatchNorm``, so whitening and rotation are identical on every rank.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATION_MODES = ("mean", "max", "pos_mean", "pool_max")
GRAD_MODES = ("exact", "reference")
GUARDS = ("fallback", "raise")
# The reference code's initial counter value: G = sum_G / counter never divides by zero.
_COUNTER_INIT = 1e-3
# A converged Newton-Schulz iterate has max|P Sigma_N P - I| far below 1; an under-whitened one (too
# few iterations, rank-deficient Sigma) stays <= 1 because every eigenvalue lies in (0, 1]; only
# divergence (the "T trap", spec §1.3) takes it above 1.
_DIVERGENCE_RESIDUAL = 1.0


class WhiteningDivergedError(FloatingPointError):
    """The Newton-Schulz whitening iteration diverged (spec §1.3, the T trap)."""


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    name = str(value).replace("torch.", "")
    if name not in ("float32", "float64"):
        raise ValueError(f"rot_dtype must be 'float32' or 'float64', got {value!r}")
    return getattr(torch, name)


# ---------------------------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------------------------
def newton_schulz_iterates(sigma: Tensor, T: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(P_k, Sigma_N)`` for ``k = 1..T`` of the trace-normalised Newton-Schulz iteration.

    Spec §1.2 steps 3-4: ``Sigma_N = Sigma / tr(Sigma)``, ``P_0 = I``,
    ``P_{k+1} = 1.5 P_k - 0.5 P_k^3 Sigma_N``. ``P_k / sqrt(tr Sigma)`` approximates ``Sigma^{-1/2}``.
    Differentiable (plain autograd through the unrolled loop; the reference code's hand-written
    backward agrees with it to 1e-14 in float64, spec §1.2).

    Args:
        sigma: ``(C, C)`` symmetric positive-definite covariance (``eps * I`` already added).
        T: number of iterations.
    """
    sigma_n = sigma / sigma.diagonal().sum()
    p = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    for _ in range(T):
        p = 1.5 * p - 0.5 * (p @ p @ p @ sigma_n)
        yield p, sigma_n


def newton_schulz(sigma: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """``(P_T, Sigma_N)``: the last iterate of :func:`newton_schulz_iterates`."""
    sigma_n = sigma / sigma.diagonal().sum()
    p = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    for _ in range(T):
        p = 1.5 * p - 0.5 * (p @ p @ p @ sigma_n)
    return p, sigma_n


def whitening_residual(p: Tensor, sigma_n: Tensor) -> Tensor:
    """``||P Sigma_N P - I||_2``: the whitening error of the output covariance.

    The spectral norm (largest absolute eigenvalue of the symmetric error) is 0 when exact, below 1 when
    merely under-whitened and above 1 only when the iteration diverged. The largest single entry is not
    enough: a diverged covariance can have every entry below 1 and eigenvalues far outside ``[0, 2]``.
    """
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    err = p @ sigma_n @ p - eye
    if not bool(torch.isfinite(err).all()):
        return torch.tensor(math.inf, dtype=p.dtype, device=p.device)
    return torch.linalg.eigvalsh(0.5 * (err + err.T)).abs().amax()


def iternorm_whitening_matrix(sigma: Tensor, T: int = 10, guard: str | None = "fallback") -> Tensor:
    """Whitening matrix ``W ~ Sigma^{-1/2}`` by ``T`` Newton-Schulz iterations (spec §1.2 step 5).

    The uncoupled iteration is only conditionally stable: once converged, rounding error between
    eigen-directions with eigenvalue ratio ``r > ~2.6`` grows each step, so a larger ``T`` can
    *diverge* (spec §1.3). ``guard`` (our addition; the reference code has none) checks the result:

    * ``"fallback"``: if ``P_T`` is not finite or ``||P_T Sigma_N P_T - I||_2 > 1`` (only divergence
      exceeds 1), use the iterate ``P_k`` with the smallest whitening residual and warn;
    * ``"raise"``: raise :class:`WhiteningDivergedError` with the fix;
    * ``None``: no check (the reference behaviour; for documenting tests only).

    A converged or merely under-whitened result is returned untouched, so the default is the official
    form whenever the official form is usable.

    Args:
        sigma: ``(C, C)`` covariance including ``eps * I``.
        T: iterations (the paper's 10: do not raise it to "whiten better", spec §1.3).

    Returns:
        ``(C, C)`` whitening matrix ``W = P / sqrt(tr Sigma)``.
    """
    if guard not in (*GUARDS, None):
        raise ValueError(f"guard must be one of {GUARDS} or None, got {guard!r}")
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    trace = sigma.diagonal().sum()
    p, sigma_n = newton_schulz(sigma, T)
    if guard is not None:
        with torch.no_grad():
            res = whitening_residual(p, sigma_n)
            ok = (
                bool(torch.isfinite(p).all())
                and bool(torch.isfinite(res))
                and float(res) <= _DIVERGENCE_RESIDUAL
            )
        if not ok:
            p = _guarded_iterate(sigma, T, guard, float(res))
    return p / trace.sqrt()


def _guarded_iterate(sigma: Tensor, T: int, guard: str, final_residual: float) -> Tensor:
    msg = (
        f"concept whitening: the Newton-Schulz iteration diverged (T={T}, final residual "
        f"||P Sigma_N P - I||_2={final_residual:.3g}). The uncoupled iteration is unstable for "
        f"ill-conditioned covariances and large T (spec §1.3): keep T=10 or lower it, whiten a layer "
        f"with more samples per channel (batch * H * W >> C), or raise eps."
    )
    if guard == "raise":
        raise WhiteningDivergedError(msg)
    if not torch.isfinite(sigma).all():
        raise WhiteningDivergedError(f"concept whitening: the input covariance is not finite. {msg}")
    with torch.no_grad():
        residuals = []
        for pk, sigma_n in newton_schulz_iterates(sigma.detach(), T):
            r = whitening_residual(pk, sigma_n)
            residuals.append(float(r) if torch.isfinite(r) and torch.isfinite(pk).all() else math.inf)
    best = min(range(T), key=lambda k: residuals[k])
    if not math.isfinite(residuals[best]):
        raise WhiteningDivergedError(msg)
    warnings.warn(
        f"{msg} Falling back to iteration {best + 1} (residual {residuals[best]:.3g}).", stacklevel=3
    )
    return newton_schulz(sigma, best + 1)[0]  # again, with autograd


# ---------------------------------------------------------------------------------------------
# Axis activations and their gradients with respect to the rotation
# ---------------------------------------------------------------------------------------------
def _check_pool_max(h: int, w: int) -> None:
    if h < 3 or w < 3:
        raise ValueError(
            f"activation_mode='pool_max' pools 3x3 windows but this concept-whitening layer sees "
            f"{h}x{w} feature maps. Whiten an earlier layer (larger maps), use larger input images, or "
            f"set activation_mode='mean' (or 'max' / 'pos_mean')."
        )


def pool_axes(z: Tensor, mode: str = "pool_max") -> Tensor:
    """Per-image score of every axis, ``phi(z_c)``, ``(B, C, H, W)`` to ``(B, C)`` (metrics A.1).

    * ``mean``: spatial mean; ``max``: spatial max;
    * ``pos_mean``: sum of the positive entries over (their count + 1e-4);
    * ``pool_max``: 3x3 / stride-3 max-pooling (trailing rows and columns that do not fill a window
      are ignored, as in the reference code), then the mean over windows.

    Differentiable: its gradient with respect to ``R`` is what ``grad_mode="exact"`` accumulates.
    """
    if z.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(z.shape)}")
    if mode == "mean":
        return z.mean((2, 3))
    if mode == "max":
        return z.amax((2, 3))
    if mode == "pos_mean":
        return F.relu(z).sum((2, 3)) / ((z > 0).sum((2, 3)) + 1e-4)
    if mode == "pool_max":
        _check_pool_max(z.shape[2], z.shape[3])
        return F.max_pool2d(z, kernel_size=3, stride=3).mean((2, 3))
    raise ValueError(f"activation_mode must be one of {ACTIVATION_MODES}, got {mode!r}")


def _masks(z: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """``(mask, denominator)`` per channel, ``(B, C, H, W)`` and ``(B, C, 1, 1)``, of a masked mode."""
    b, c, h, w = z.shape
    if mode == "max":
        mask = (z == z.amax((2, 3), keepdim=True)).to(z.dtype)
        return mask, mask.sum((2, 3), keepdim=True)
    if mode == "pos_mean":
        mask = (z > 0).to(z.dtype)
        return mask, mask.sum((2, 3), keepdim=True) + 1e-4
    _check_pool_max(h, w)
    h3, w3 = h - h % 3, w - w % 3
    _, idx = F.max_pool2d(z[:, :, :h3, :w3], kernel_size=3, stride=3, return_indices=True)
    # Indices address the cropped (h3, w3) plane; scatter the arg-max cells back into (h, w).
    rows, cols = idx // w3, idx % w3
    flat = (rows * w + cols).flatten(2)
    mask = torch.zeros(b, c, h * w, dtype=z.dtype, device=z.device)
    mask.scatter_(2, flat, 1.0)
    return mask.view(b, c, h, w), mask.new_full((b, c, 1, 1), float(flat.shape[2]))


def concept_gradient_samples(
    x_hat: Tensor, z: Tensor, axis: int, mode: str, grad_mode: str = "exact"
) -> Tensor:
    """Per-image ``d phi(z_axis) / d R[axis, :]``, ``(B, C)``; minus their batch mean is ``sum_G``'s row.

    ``z_axis = sum_c R[axis, c] x_hat_c``, so for ``mode="mean"`` the derivative is the spatial mean
    of ``x_hat``; for the masked modes it is the mean of ``x_hat`` over the cells selected by the mask
    of ``z_axis`` (arg-max cell, positive cells, or window arg-max cells).

    ``grad_mode="reference"`` reproduces the reference code, which masks channel ``c`` of ``x_hat``
    with the mask of rotated axis ``c`` instead of axis ``axis``; outside ``mode="mean"`` that row is
    not the gradient of axis ``axis`` (only its component ``c = axis`` agrees; spec §1.4).

    Args:
        x_hat: ``(B, C, H, W)`` whitened, un-rotated features.
        z: ``(B, C, H, W)`` rotated features ``R x_hat``.
        axis: concept axis ``j``.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    if mode == "mean":
        return x_hat.mean((2, 3))
    if mode not in ACTIVATION_MODES:
        raise ValueError(f"activation_mode must be one of {ACTIVATION_MODES}, got {mode!r}")
    if grad_mode == "exact":
        mask, den = _masks(z[:, axis : axis + 1], mode)
    else:
        mask, den = _masks(z, mode)
    return ((x_hat * mask).sum((2, 3), keepdim=True) / den).flatten(1)


# ---------------------------------------------------------------------------------------------
# Cayley transform with curvilinear search (Wen & Yin 2013; spec §1.4)
# ---------------------------------------------------------------------------------------------
def cayley_transform(A: Tensor, R: Tensor, tau: float) -> Tensor:
    """``Y(tau) = (I + tau/2 A)^{-1} (I - tau/2 A) R``: orthogonal for every ``tau`` when ``A`` is skew."""
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return torch.linalg.solve(eye + 0.5 * tau * A, R - 0.5 * tau * (A @ R))


def cayley_curvilinear_step(
    G: Tensor,
    R: Tensor,
    tau0: float = 1000.0,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_tries: int = 500,
) -> tuple[Tensor, float, bool]:
    """One feasible descent step on ``F(R) = <G, R>`` over orthogonal matrices.

    ``A = G R^T - R G^T`` (skew-symmetric), ``Y(tau) = (I + tau/2 A)^{-1} (I - tau/2 A) R`` is
    orthogonal for every ``tau``; ``tau`` is found by bisection from ``tau0`` on ``[0, 1e8]`` until the
    Armijo (``c1``) and curvature (``c2``) conditions hold, with ``F'(0) = -||A||_F^2 / 2`` and
    ``F'(tau) = -tr(G^T (I + tau/2 A)^{-1} A (R + Y) / 2)``.

    Returns:
        ``(Y, tau, converged)``; after ``max_tries`` failed tries the current ``tau`` is used (as the
        reference code does) and ``converged`` is ``False``.
    """
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    A = G @ R.T - R @ G.T
    f0 = float((G * R).sum())
    df0 = -0.5 * float((A * A).sum())
    if df0 == 0.0:  # stationary point (e.g. no concept gradient yet): nothing to do
        return R.clone(), 0.0, True

    def y_of(tau: float) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        lu = torch.linalg.lu_factor(eye + 0.5 * tau * A)
        return torch.linalg.lu_solve(*lu, R - 0.5 * tau * (A @ R)), lu

    alpha, beta, tau = 0.0, 1e8, float(tau0)
    for _ in range(max_tries):
        Y, lu = y_of(tau)
        fy = float((G * Y).sum())
        dfy = -float((G * torch.linalg.lu_solve(*lu, A @ (0.5 * (R + Y)))).sum())
        if fy > f0 + c1 * tau * df0:  # Armijo fails: step too long
            beta = tau
        elif dfy < c2 * df0:  # curvature fails: step too short
            alpha = tau
        else:
            return Y, tau, True
        tau = 0.5 * (alpha + beta)
    return y_of(tau)[0], tau, False


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------
class ConceptWhitening2d(nn.Module):
    """Concept whitening, a drop-in for ``nn.BatchNorm2d`` (Chen, Bei & Rudin 2020, Eq. 1-3).

    ``z = R W (x - mu)`` (times ``weight`` plus ``bias`` when ``affine``), with ``W`` the IterNorm
    whitening matrix of the batch (training) or ``running_wm`` (evaluation) and ``R`` the orthogonal
    ``running_rot``. Same constructor head and train/eval behaviour as ``BatchNorm2d``; the defaults
    are the paper's (``momentum=0.05``, ``affine=False``, ``T=10``). Not a ``_BatchNorm`` subclass on
    purpose: ``SyncBatchNorm.convert_sync_batchnorm`` would otherwise replace it by a BatchNorm.

    Args:
        num_features: channels ``C``.
        eps: added to the covariance diagonal.
        momentum: factor of the running averages of the mean, of ``W`` and of the concept gradients
            (``None``: cumulative average of the statistics, and 0.05 for the concept gradients).
        affine: learn a per-axis scale and shift after the rotation (the paper: ``False``).
        track_running_stats: keep running statistics for evaluation (else batch statistics always).
        device, dtype: of the parameters and statistics buffers.
        T: Newton-Schulz iterations (10; larger can diverge, spec §1.3).
        activation_mode: ``phi`` of an axis: ``mean``, ``max``, ``pos_mean`` or ``pool_max`` (paper).
        grad_mode: ``exact`` (gradient of ``phi(z_j)``) or ``reference`` (the reference code's
            per-axis mask mixing, spec §1.4).
        concept_names: names of the concepts of axes ``0..K-1`` (metadata; ``K <= C``).
        rot_dtype: dtype of ``running_rot``: ``float32`` (orthogonal to ~1e-5 after 1000 updates) or
            ``float64`` (~1e-13).
        guard: what to do if the whitening iteration diverges: ``fallback`` (best iterate, warning) or
            ``raise`` (see :func:`iternorm_whitening_matrix`).

    Buffers (all in ``state_dict``): ``running_mean`` ``(C,)``, ``running_wm`` ``(C, C)``,
    ``running_rot`` ``(C, C)``, ``sum_G`` ``(C, C)``, ``counter`` ``(C,)``, ``num_batches_tracked``.

    Attribute ``mode``: ``-1`` for ordinary passes; ``j >= 0`` makes a forward pass accumulate the
    alignment gradient of concept ``j`` (use :meth:`concept_mode`). In concept mode the running
    statistics are used and never updated, whatever ``training`` says.

    Shape:
        ``(B, C, H, W)`` to ``(B, C, H, W)``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.05,
        affine: bool = False,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        T: int = 10,
        activation_mode: str = "pool_max",
        grad_mode: str = "exact",
        concept_names: Sequence[str] | None = None,
        rot_dtype: torch.dtype | str = torch.float32,
        guard: str = "fallback",
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if activation_mode not in ACTIVATION_MODES:
            raise ValueError(f"activation_mode must be one of {ACTIVATION_MODES}, got {activation_mode!r}")
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        if guard not in GUARDS:
            raise ValueError(f"guard must be one of {GUARDS}, got {guard!r}")
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        names = [str(n) for n in (concept_names or [])]
        if len(names) > num_features:
            raise ValueError(f"{len(names)} concepts but only {num_features} axes; whiten a wider layer")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.T = T
        self.activation_mode = activation_mode
        self.grad_mode = grad_mode
        self.concept_names = names
        self.guard = guard
        self._mode = -1
        self.last_tau: float | None = None  # diagnostics of the last rotation update (not state)
        kw: dict[str, Any] = {"device": device, "dtype": dtype or torch.float32}
        c = num_features
        if affine:
            self.weight = nn.Parameter(torch.ones(c, **kw))
            self.bias = nn.Parameter(torch.zeros(c, **kw))
        else:  # no unused parameters: DDP would refuse them (spec §1.8)
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(c, **kw))
            self.register_buffer("running_wm", torch.eye(c, **kw))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_wm", None)
            self.register_buffer("num_batches_tracked", None)
        self.register_buffer("running_rot", torch.eye(c, device=device, dtype=_dtype(rot_dtype)))
        self.register_buffer("sum_G", torch.zeros(c, c, **kw))
        self.register_buffer("counter", torch.full((c,), _COUNTER_INIT, **kw))

    # -- construction helpers ---------------------------------------------------------------------
    @classmethod
    def from_batchnorm(
        cls, bn: nn.modules.batchnorm._BatchNorm, init_stats: bool | None = None, **kwargs: Any
    ) -> ConceptWhitening2d:
        """A concept-whitening layer in place of ``bn``, started from its running statistics.

        ``init_stats=None`` copies them when ``bn`` has been trained (``num_batches_tracked > 0`` or
        statistics that differ from the initial 0 / 1): ``running_mean`` is copied and ``running_wm``
        starts as ``diag(1 / sqrt(running_var + eps))``, BatchNorm's own (diagonal) whitening, which the
        first training batches replace by the full one. ``eps`` defaults to ``bn.eps``; with
        ``affine=True`` the BatchNorm's scale and shift are copied too. Other ``kwargs`` go to the
        constructor (``momentum`` keeps the paper's 0.05 unless given).
        """
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"expected a BatchNorm layer, got {type(bn).__name__}")
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        kwargs.setdefault("eps", bn.eps)
        kwargs.setdefault("device", ref.device if ref is not None else None)
        cw = cls(bn.num_features, **kwargs)
        if init_stats is None:
            init_stats = bn.running_mean is not None and (
                (bn.num_batches_tracked is not None and int(bn.num_batches_tracked) > 0)
                or bool(bn.running_mean.abs().amax() > 0)
                or bool((bn.running_var - 1).abs().amax() > 0)
            )
        if init_stats and cw.track_running_stats:
            if bn.running_mean is None:
                raise ValueError("init_stats=True but the BatchNorm keeps no running statistics")
            cw.load_batchnorm_statistics(bn.running_mean, bn.running_var, bn.eps)
        if cw.affine and bn.affine:
            with torch.no_grad():
                cw.weight.copy_(bn.weight)
                cw.bias.copy_(bn.bias)
        return cw

    @torch.no_grad()
    def load_batchnorm_statistics(
        self, running_mean: Tensor, running_var: Tensor, eps: float | None = None
    ) -> None:
        """Start from a BatchNorm's statistics: ``mu`` and ``W = diag(1 / sqrt(var + eps))``."""
        if self.running_mean is None:
            raise RuntimeError("track_running_stats=False: there are no running statistics to load")
        eps = self.eps if eps is None else eps
        self.running_mean.copy_(running_mean)
        self.running_wm.copy_(torch.diag((running_var.to(self.running_wm) + eps).rsqrt()))

    # -- concept mode -----------------------------------------------------------------------------
    @property
    def mode(self) -> int:
        """``-1``: ordinary forward; ``j >= 0``: accumulate the alignment gradient of concept ``j``."""
        return self._mode

    @mode.setter
    def mode(self, value: int) -> None:
        value = int(value)
        if not -1 <= value < self.num_features:
            raise ValueError(f"mode must be -1 or a concept axis in [0, {self.num_features}), got {value}")
        self._mode = value

    @contextlib.contextmanager
    def concept_mode(self, axis: int) -> Iterator[ConceptWhitening2d]:
        """Within the block, forward passes accumulate the alignment gradient of ``axis``."""
        previous = self._mode
        self.mode = axis
        try:
            yield self
        finally:
            self._mode = previous

    # -- distributed hooks (identity here; SyncConceptWhitening2d all-reduces) --------------------
    def _global_moments(self, x2d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean (C,), centred x (C, m), covariance (C, C))`` of ``x2d`` ``(C, m)``."""
        m = x2d.shape[1]
        if m < 2:
            raise ValueError(
                f"concept whitening in training mode needs more than 1 value per channel, got input with "
                f"{m} (batch * H * W); use a larger batch or eval mode"
            )
        mean = x2d.mean(1)
        xc = x2d - mean[:, None]
        return mean, xc, (xc @ xc.T) / m

    def _global_gradient(self, per_sample: Tensor) -> Tensor:
        """Batch mean of the per-image alignment gradients ``(B, C)`` to ``(C,)``."""
        return per_sample.mean(0)

    # -- forward ----------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"ConceptWhitening2d expects (B, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"ConceptWhitening2d was built for {self.num_features} channels but got input {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        b, c, h, w = x.shape
        # The whitening maths is ill-conditioned: always float32 or better, autocast off (ecosystem §4.8).
        with torch.autocast(device_type=x.device.type, enabled=False):
            cdt = torch.promote_types(x.dtype, torch.float32)
            x2d = x.to(cdt).transpose(0, 1).reshape(c, -1)
            concept = self._mode >= 0
            use_batch = not self.track_running_stats or (self.training and not concept)
            if use_batch:
                mean, xc, cov = self._global_moments(x2d)
                sigma = cov + self.eps * torch.eye(c, dtype=cdt, device=x.device)
                wm = iternorm_whitening_matrix(sigma, self.T, self.guard)
                if self.training and self.track_running_stats and not concept:
                    self._update_running(mean, wm)
            else:
                mean, wm = self.running_mean.to(cdt), self.running_wm.to(cdt)
                xc = x2d - mean[:, None]
            rot = self.running_rot.to(cdt)
            z2d = (rot @ wm) @ xc  # one (C, C) x (C, m) product instead of two
            z = z2d.reshape(c, b, h, w).transpose(0, 1)
            if concept:
                with torch.no_grad():
                    x_hat = (wm @ xc).reshape(c, b, h, w).transpose(0, 1)
                    self._accumulate_concept_gradient(x_hat.detach(), z.detach())
            if self.affine:
                z = z * self.weight.to(cdt)[None, :, None, None] + self.bias.to(cdt)[None, :, None, None]
        return z.contiguous().to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, wm: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.detach().to(self.running_mean), f)
        self.running_wm.lerp_(wm.detach().to(self.running_wm), f)

    @torch.no_grad()
    def _accumulate_concept_gradient(self, x_hat: Tensor, z: Tensor) -> None:
        j = self._mode
        per_sample = concept_gradient_samples(x_hat, z, j, self.activation_mode, self.grad_mode)
        grad = -self._global_gradient(per_sample)  # minimise F = -phi: the row is -d phi / d R[j]
        f = 0.05 if self.momentum is None else self.momentum
        self.sum_G[j].mul_(1.0 - f).add_(grad.to(self.sum_G), alpha=f)
        self.counter[j] += 1.0

    # -- rotation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def update_rotation_matrix(
        self,
        tau0: float = 1000.0,
        c1: float = 1e-4,
        c2: float = 0.9,
        max_tries: int = 500,
        outer_steps: int = 2,
    ) -> float:
        """Rotate the axes towards the accumulated concept gradients (spec §1.4, Cayley + line search).

        ``G = sum_G / counter`` (rows of axes without concepts are 0), then ``outer_steps`` calls of
        :func:`cayley_curvilinear_step` on ``F(R) = <G, R>``, computed in float64. Afterwards ``counter``
        is reset and ``sum_G`` is kept (it is an exponential moving average, as in the reference code).

        Returns:
            the last accepted step size ``tau`` (also in :attr:`last_tau`).
        """
        G = (self.sum_G / self.counter[:, None]).double()
        R = self.running_rot.double()
        tau = 0.0
        for _ in range(outer_steps):
            R, tau, ok = cayley_curvilinear_step(G, R, tau0, c1, c2, max_tries)
            if not ok:
                warnings.warn(
                    f"concept whitening: the curvilinear search found no step satisfying the Wolfe "
                    f"conditions in {max_tries} tries; using tau={tau:.3g}",
                    stacklevel=2,
                )
        self.running_rot.copy_(R.to(self.running_rot.dtype))
        self.counter.fill_(_COUNTER_INIT)
        self._after_rotation_update()
        self.last_tau = tau
        return tau

    def _after_rotation_update(self) -> None:
        """Hook: the synced variant broadcasts ``running_rot`` from rank 0."""

    @torch.no_grad()
    def rotation_orthogonality_error(self) -> float:
        """``max |R R^T - I|`` of ``running_rot``, computed in float64."""
        r = self.running_rot.double()
        return float((r @ r.T - torch.eye(r.shape[0], dtype=r.dtype, device=r.device)).abs().amax())

    @torch.no_grad()
    def reorthonormalize(self) -> None:
        """Project ``running_rot`` onto the nearest orthogonal matrix (polar factor); optional upkeep."""
        u, _, vh = torch.linalg.svd(self.running_rot.double())
        self.running_rot.copy_((u @ vh).to(self.running_rot.dtype))

    # -- axis scores ------------------------------------------------------------------------------
    def axis_activations(self, z: Tensor, mode: str | None = None) -> Tensor:
        """``phi`` of every axis of this layer's output ``z`` ``(B, C, H, W)``, ``(B, C)``."""
        return pool_axes(z, mode or self.activation_mode)

    # -- state dict -------------------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Accept the reference IterNormRotation layout ([1, C, 1] / [1, C, C] buffers, unused weight/bias).
        c = self.num_features
        for name in ("running_mean", "running_wm", "running_rot", "sum_G"):
            key = prefix + name
            t = state_dict.get(key)
            own = getattr(self, name)
            if t is not None and own is not None and t.shape != own.shape and t.numel() == own.numel():
                state_dict[key] = t.reshape(own.shape)
        if not self.affine:
            for name in ("weight", "bias"):
                t = state_dict.get(prefix + name)
                if t is not None and t.numel() == c and t.dim() == 4:
                    del state_dict[prefix + name]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, T={self.T}, activation_mode={self.activation_mode!r}, "
            f"grad_mode={self.grad_mode!r}"
        )
        if self.concept_names:
            s += f", concepts={self.concept_names}"
        return s

    def config(self) -> dict[str, Any]:
        """Constructor arguments reproducing this layer (plain data, for conversions and bundles)."""
        return {
            "num_features": self.num_features,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "T": self.T,
            "activation_mode": self.activation_mode,
            "grad_mode": self.grad_mode,
            "concept_names": list(self.concept_names),
            "rot_dtype": str(self.running_rot.dtype).replace("torch.", ""),
            "guard": self.guard,
        }


class _DifferentiableAllReduceSum(torch.autograd.Function):
    """``y = sum over ranks of x``; the backward of a sum is the sum of the ranks' output gradients.

    Every rank's loss depends on the global ``y``, so ``d(sum_r L_r) / d x_r = sum_r' dL_r' / dy``
    (what ``nn.SyncBatchNorm`` does); DDP's later averaging of parameter gradients then divides every
    path by the world size alike.
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: Any) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        import torch.distributed as dist

        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class SyncConceptWhitening2d(ConceptWhitening2d):
    """Concept whitening with global statistics under ``torch.distributed`` (like ``nn.SyncBatchNorm``).

    * training mode: the batch mean and covariance are all-reduced sums over every rank's samples
      (two differentiable collectives: the mean first, then the centred scatter matrix, which is
      better conditioned than ``E[x x^T] - mu mu^T``), so ``W`` and the running statistics are the
      single-process values on the global batch and gradients flow back to every rank's inputs;
    * concept mode: the per-image alignment gradients are summed over ranks with their counts, so
      ``sum_G`` is identical everywhere;
    * :meth:`update_rotation_matrix` is then deterministic and identical on every rank; ``running_rot``
      is broadcast from rank 0 afterwards as a guard against non-deterministic kernels.

    Every rank must run the same number of forward passes in training and concept mode (collectives).
    Without an initialised process group (or with one process) it behaves like the parent class.

    Args:
        process_group: group to reduce over (default: the whole world).
        Other arguments: see :class:`ConceptWhitening2d`.
    """

    def __init__(self, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _world(self) -> int:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group or dist.group.WORLD)

    def _all_reduce(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        group = self.process_group or dist.group.WORLD
        if torch.is_grad_enabled() and t.requires_grad:
            return _DifferentiableAllReduceSum.apply(t, group)
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    def _global_moments(self, x2d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._world() == 1:
            return super()._global_moments(x2d)
        c, m = x2d.shape
        packed = self._all_reduce(torch.cat([x2d.sum(1), x2d.new_tensor([float(m)])]))
        n = packed[c].detach()
        if n < 2:
            raise ValueError(
                "concept whitening in training mode needs more than 1 value per channel over all ranks"
            )
        mean = packed[:c] / n
        xc = x2d - mean[:, None]
        cov = self._all_reduce(xc @ xc.T) / n
        return mean, xc, cov

    def _global_gradient(self, per_sample: Tensor) -> Tensor:
        if self._world() == 1:
            return super()._global_gradient(per_sample)
        packed = self._all_reduce(
            torch.cat([per_sample.sum(0), per_sample.new_tensor([float(per_sample.shape[0])])])
        )
        return packed[:-1] / packed[-1]

    def _after_rotation_update(self) -> None:
        if self._world() > 1:
            import torch.distributed as dist

            group = self.process_group or dist.group.WORLD
            dist.broadcast(self.running_rot, src=dist.get_global_rank(group, 0), group=group)

    @classmethod
    def convert_sync(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every :class:`ConceptWhitening2d` in ``module`` by the synced variant (in place).

        Parameters and buffers are shared with the old layers (like ``convert_sync_batchnorm``), so an
        existing optimiser keeps working. Returns ``module`` (or the new layer if ``module`` is one).
        """
        return _convert(
            module, lambda m: type(m) is ConceptWhitening2d, lambda m: _swap(m, cls, process_group)
        )

    @staticmethod
    def revert(module: nn.Module) -> nn.Module:
        """Undo :meth:`convert_sync`: synced layers become plain :class:`ConceptWhitening2d` again."""
        return _convert(
            module, lambda m: isinstance(m, SyncConceptWhitening2d), lambda m: _swap(m, ConceptWhitening2d)
        )


def _swap(
    old: ConceptWhitening2d, cls: type[ConceptWhitening2d], process_group: Any = None
) -> ConceptWhitening2d:
    cfg = old.config()
    kwargs = {"process_group": process_group} if issubclass(cls, SyncConceptWhitening2d) else {}
    new = cls(**cfg, device=old.running_rot.device, **kwargs)
    # Share tensors (not copies) so optimisers and references stay valid.
    for name, p in old._parameters.items():
        new._parameters[name] = p
    for name, b in old._buffers.items():
        new._buffers[name] = b
    new._mode = old._mode
    new.last_tau = old.last_tau
    new.train(old.training)
    return new


def _convert(module: nn.Module, match: Any, make: Any) -> nn.Module:
    if match(module):
        return make(module)
    for name, child in module.named_children():
        new = _convert(child, match, make)
        if new is not child:
            module.add_module(name, new)
    return module


def concept_whitening_layers(net: nn.Module) -> dict[str, ConceptWhitening2d]:
    """``{dotted name: layer}`` of every concept-whitening layer in ``net``, in module order."""
    return {n: m for n, m in net.named_modules() if isinstance(m, ConceptWhitening2d)}
