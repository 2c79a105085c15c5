"""Concept whitening: a drop-in replacement for ``nn.BatchNorm2d`` whose axes align with concepts.

Chen, Bei & Rudin, "Concept whitening for interpretable image recognition", *Nature Machine
Intelligence* 2, 772-782 (2020), arXiv:2002.01650; the reference implementation is
``IterNormRotation`` in zhiCHEN96/ConceptWhitening. Written from the paper and from a reading of
that code; no code is reproduced.

The layer maps a feature map ``x`` ``(B, C, H, W)`` to ``z = R W (x - mu)``:

* ``W`` approximates the ZCA whitening matrix ``Sigma^{-1/2}`` by ``T`` trace-normalised
  Newton-Schulz iterations (IterNorm, Huang et al. CVPR 2019): ``P_{k+1} = 1.5 P_k - 0.5 P_k^3 Sigma_N``
  with ``Sigma_N = Sigma / tr(Sigma)``, ``W = P_T / sqrt(tr Sigma)`` (as in ``IterNormRotation``);
* ``R`` (``running_rot``) is an orthogonal matrix whose row ``j`` is the direction of axis ``j``
  (the paper writes ``z = Q^T x_hat``, so ``Q = R^T``). Axes ``0..K-1`` are tied to the ``K`` concepts;
* training mode whitens with the batch statistics and keeps exponential moving averages of the mean
  and of ``W`` (not of the covariance, as in the reference code); evaluation uses the running statistics.

Cost (same results as the plain formulation, checked in ``tests/test_speed_guards.py``):

* the data products are batched over the images in NCHW order (no transposed copies), with one fused
  backward for the centring and the covariance;
* when a batch has fewer samples than channels (``m = B*H*W < C``) the iteration runs on the ``m x m`` Gram
  matrix instead (:func:`gram_whitening`, ``P_T X = X Q_T``);
* on the CPU (``solver="auto"`` or ``"eigh"``) the iteration's polynomial ``p_T`` is evaluated exactly on the
  eigenvalues of one float64 eigendecomposition, and its backward reuses the eigenvectors (Daleckii-Krein,
  :class:`_EighNewtonSchulz`): cheaper than the ``3 (T - 1)`` products at every size, free of rounding, and
  unable to diverge. On a GPU (``"iteration"``) the unrolled products run as in the reference, and the backward
  is either autograd through them or the closed form of :class:`_NewtonSchulz`;
* on the iteration route the divergence guard (:func:`whitening_in_bounds`) is two Cholesky factorisations, and a
  rank-deficient batch passes it; when it fires, the layer warns once, with its name;
* evaluation caches ``R W``; the rotation update uses the rank ``<= 2K`` of the skew matrix
  (:func:`cayley_transform_lowrank`, Wen & Yin 2013).

Concept alignment (Chen, Bei & Rudin 2020, Eq. 3) maximises ``sum_j mean_{x in X_j} phi(z_j(x))`` over
orthogonal ``R``. With ``mode = j`` a forward pass of concept-``j`` images writes an exponential
moving average of ``-d phi(z_j) / d R[j, :]`` into row ``j`` of ``sum_G``; then
:meth:`ConceptWhitening2d.update_rotation_matrix` takes Cayley-transform steps with a curvilinear
(Wen & Yin) line search that keep ``R`` exactly orthogonal.

Contrastive alignment (``alignment="contrastive"``, our addition; not in the paper): Eq. 3 only maximises
the mean activation of each concept's images, so axis ``j`` also learns whatever those images share with
images *without* the concept (a common component). The contrastive objective maximises
``sum_j [mean_{x in X_j^+} phi(z_j(x)) - mean_{x in X_j^-} phi(z_j(x))]`` over orthogonal ``R``: concept
passes with ``negative=True`` write the same per-image gradient into ``sum_G_neg`` / ``counter_neg``, and the
update follows ``G = sum_G / counter - sum_G_neg / counter_neg`` by the same Cayley steps (for
``activation_mode="mean"`` row ``j`` is ``-(mu_j^+ - mu_j^-)``, the difference of the whitened means).

:class:`SyncConceptWhitening2d` is the DDP variant: batch statistics and concept gradients are
all-reduced like ``nn.SyncBatchNorm``, so whitening and rotation are identical on every rank.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATION_MODES = ("mean", "max", "pos_mean", "pool_max")
GRAD_MODES = ("exact", "reference")
ALIGNMENTS = ("paper", "contrastive")
GUARDS = ("fallback", "raise")
# The reference code's initial counter value: G = sum_G / counter never divides by zero.
_COUNTER_INIT = 1e-3
# Divergence test of the Newton-Schulz iteration (the T trap). In exact arithmetic every eigenvalue of the
# whitened covariance Y_k = P_k Sigma_N P_k lies in [0, 1]: per eigen-direction y_{k+1} = y_k (1.5 - 0.5 y_k)^2
# rises monotonically from y_0 = lambda in (0, 1] towards 1, whatever the rank of Sigma (the null directions of
# a rank-deficient covariance, m = B*H*W < C, just stay near 0). Rounding moves them by ~1e-4 in float32; an
# eigenvalue outside [-tol, 1 + tol] means rounding error is being amplified (the "T trap"), and then it
# grows by orders of magnitude per iteration, so the tolerance separates the two cases by a wide margin.
DIVERGENCE_TOL = 0.05


class WhiteningDivergedError(FloatingPointError):
    """The Newton-Schulz whitening iteration diverged (the "T trap": :func:`iternorm_whitening_matrix`).

    ``interpzoo-train`` prints it as one paragraph and exits with :attr:`exit_code` 1 (the run failed on its
    own, as a non-finite loss does); ``layers/`` imports nothing of the project, hence no common base class.
    """

    exit_code: int = 1


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
def _eye_like(a: Tensor) -> Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


def _ns_iterates(s_n: Tensor, T: int) -> Iterator[Tensor]:
    """``P_1 .. P_T`` of ``P_{k+1} = 1.5 P_k - 0.5 P_k^3 S_N`` from ``P_0 = I`` (``P_1 = 1.5 I - 0.5 S_N``)."""
    p = 1.5 * _eye_like(s_n) - 0.5 * s_n  # P_0^3 S_N = S_N exactly: no products for the first step
    yield p
    for _ in range(T - 1):
        p = torch.addmm(p, p @ p @ p, s_n, beta=1.5, alpha=-0.5)  # 1.5 P - 0.5 P^3 S_N in one product
        yield p


def _ns(s_n: Tensor, T: int) -> Tensor:
    *_, last = _ns_iterates(s_n, T)
    return last


def _ns_derivatives(lam: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    """``(p_T(lam), p_T'(lam))`` of the scalar iteration, elementwise (NumPy float64: ``C`` numbers, where
    a torch call per operation would cost more than the arithmetic)."""
    p, dp = np.ones_like(lam), np.zeros_like(lam)
    for _ in range(T):
        p2 = p * p
        dp = dp * (1.5 - 1.5 * p2 * lam) - 0.5 * p2 * p
        p = p * (1.5 - 0.5 * p2 * lam)
    return p, dp


def ns_divided_differences(
    lam: Tensor, T: int, rel_gap: float = 1e-6, values: tuple[np.ndarray, np.ndarray] | None = None
) -> Tensor:
    """``F_ij = (p_T(lam_i) - p_T(lam_j)) / (lam_i - lam_j)`` (the mean of ``p_T'`` when they nearly meet).

    The first divided differences of the Newton-Schulz polynomial ``p_T`` at the eigenvalues, in float64:
    the kernel of its Frechet derivative (Daleckii-Krein; Higham, *Functions of Matrices*, 2008, Thm 3.11).
    A direct difference has relative error ``eps_64 / gap``; below ``rel_gap`` the mean of the two derivatives
    (error ``O(gap^2)``) is used. Returned on ``lam``'s device, in float64. ``values``: ``(p_T(lam), p_T'(lam))``
    when the caller already has them.
    """
    v = lam.detach().double().cpu().numpy()
    p, dp = values if values is not None else _ns_derivatives(v, T)
    diff = v[:, None] - v[None, :]
    close = np.abs(diff) <= rel_gap * np.maximum(np.abs(v)[:, None], np.abs(v)[None, :])
    direct = (p[:, None] - p[None, :]) / np.where(close, 1.0, diff)
    f = np.where(close, 0.5 * (dp[:, None] + dp[None, :]), direct)
    return torch.from_numpy(f).to(lam.device)


class _NewtonSchulz(torch.autograd.Function):
    """``P_T`` of the normalised matrix by the unrolled iteration; backward by one eigendecomposition.

    The forward is :func:`_ns` (the same products as the reference iteration, so the same result and the same
    divergence behaviour), run without recording a graph. ``P_T = p_T(S_N)`` is a polynomial of the symmetric
    ``S_N = V diag(lambda) V^T``, so its derivative is exact in closed form:
    ``dL/dS_N = V (F o (V^T sym(G) V)) V^T`` with ``F`` = :func:`ns_divided_differences` (symmetric
    perturbations only, which is all that reaches the symmetric covariance). One ``eigh`` and four products
    replace the ``6 (T - 1)`` products of back-propagating through the unrolled loop; in exact arithmetic
    both give the same gradient (``tests/test_speed_guards.py`` checks it against autograd in float64).
    First derivatives only.
    """

    @staticmethod
    def forward(ctx: Any, s_n: Tensor, T: int) -> Tensor:
        ctx.T = T
        ctx.save_for_backward(s_n)
        return _ns(s_n, T)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (s_n,) = ctx.saved_tensors
        lam, vec = torch.linalg.eigh(s_n)
        f = ns_divided_differences(lam, ctx.T).to(s_n.dtype)
        inner = vec.mT @ (0.5 * (g + g.mT)) @ vec
        return vec @ (f * inner) @ vec.mT, None


class _EighNewtonSchulz(torch.autograd.Function):
    """``P_T = p_T(S_N)`` of the normalised matrix evaluated exactly through one eigendecomposition.

    ``P_T`` of the IterNorm iteration (Huang et al. CVPR 2019, Algorithm 1) is the polynomial ``p_T`` of the
    symmetric ``S_N = V diag(lambda) V^T``, so ``P_T = V diag(p_T(lambda)) V^T`` with the scalar iteration
    ``p_{k+1} = 1.5 p_k - 0.5 p_k^3 lambda`` run on the eigenvalues: the same function as the unrolled
    products, without their rounding (``eigh`` and the scalar iteration in float64). It cannot diverge, so the
    T trap of :func:`iternorm_whitening_matrix` does not exist on this route. The backward is the exact
    Daleckii-Krein derivative of :class:`_NewtonSchulz`, reusing the forward's eigenvectors (no second
    ``eigh``). On the CPU one float64 ``eigh`` costs less than the ``3 (T - 1)`` float32 products of the
    forward iteration at every size (C = 64: 0.6 against 0.5 + 0.4 ms for the products and the backward's
    ``eigh``; C = 512: 52 against 97 + 26 ms), so this is the CPU route (``solver="auto"``).
    ``tests/test_speed_guards.py`` checks it against the float64 unrolled iteration (to 1e-5) and its gradient
    against autograd through the loop. First derivatives only.
    """

    @staticmethod
    def forward(ctx: Any, s_n: Tensor, T: int) -> Tensor:
        lam, vec = torch.linalg.eigh(s_n.detach().double())
        p, dp = _ns_derivatives(lam.cpu().numpy(), T)
        out = (vec * torch.from_numpy(p).to(vec.device)) @ vec.mT
        ctx.T, ctx.values = T, (p, dp)
        ctx.save_for_backward(lam, vec)
        return out.to(s_n.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        lam, vec = ctx.saved_tensors
        f = ns_divided_differences(lam, ctx.T, values=ctx.values).to(g.dtype)
        v = vec.to(g.dtype)
        inner = v.mT @ (0.5 * (g + g.mT)) @ v
        return v @ (f * inner) @ v.mT, None


SOLVERS = ("auto", "eigh", "iteration")


def _use_eigh(s_n: Tensor, solver: str) -> bool:
    """Whether ``solver`` evaluates ``p_T`` through ``eigh`` here (``auto``: on the CPU)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    return solver == "eigh" or (solver == "auto" and s_n.device.type == "cpu")


def _ns_with_grad(s_n: Tensor, T: int, closed_form: bool | None = None) -> Tensor:
    """``P_T`` of the normalised matrix, differentiable, by the cheaper backward for the device.

    On the CPU the closed-form backward of :class:`_NewtonSchulz` (one ``eigh`` instead of ``6 (T - 1)``
    products). On a GPU plain autograd through the unrolled products: there ``eigh`` is a latency-bound
    cuSOLVER call that costs more than the tensor-core products it saves, and the divided differences
    would bring the eigenvalues to the host. Both are the exact gradient of the same iteration
    (``tests/test_concept_whitening.py`` checks them against each other). ``closed_form`` forces a route.
    """
    if closed_form is None:
        closed_form = s_n.device.type == "cpu"
    return _NewtonSchulz.apply(s_n, T) if closed_form else _ns(s_n, T)


def newton_schulz_iterates(sigma: Tensor, T: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(P_k, Sigma_N)`` for ``k = 1..T`` of the trace-normalised Newton-Schulz iteration.

    IterNorm (Huang et al. CVPR 2019, Algorithm 1), as in the reference code: ``Sigma_N = Sigma / tr(Sigma)``,
    ``P_0 = I``, ``P_{k+1} = 1.5 P_k - 0.5 P_k^3 Sigma_N``. ``P_k / sqrt(tr Sigma)`` approximates
    ``Sigma^{-1/2}``. Differentiable (plain autograd through the unrolled loop; the reference code's
    hand-written backward agrees with it to ~1e-14 in float64; ``tests/test_concept_whitening.py``
    gradchecks it).

    Args:
        sigma: ``(C, C)`` symmetric positive-definite covariance (``eps * I`` already added).
        T: number of iterations.
    """
    sigma_n = sigma / sigma.diagonal().sum()
    for p in _ns_iterates(sigma_n, T):
        yield p, sigma_n


def newton_schulz(sigma: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """``(P_T, Sigma_N)``: the last iterate of :func:`newton_schulz_iterates`."""
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    sigma_n = sigma / sigma.diagonal().sum()
    return _ns(sigma_n, T), sigma_n


def whitening_residual(p: Tensor, sigma_n: Tensor) -> Tensor:
    """``||P Sigma_N P - I||_2``: the whitening error of the output covariance.

    The spectral norm (largest absolute eigenvalue of the symmetric error); the largest single entry is
    not enough: a diverged covariance can have every entry below 1 and eigenvalues far outside ``[0, 2]``.
    A rank-deficient covariance (``m < C`` samples) leaves it at ``1`` up to rounding however good the
    iteration, so the divergence test is :func:`whitening_in_bounds`, not this number.
    """
    eye = _eye_like(p)
    err = p @ sigma_n @ p - eye
    if not bool(torch.isfinite(err).all()):
        return torch.tensor(math.inf, dtype=p.dtype, device=p.device)
    return torch.linalg.eigvalsh(0.5 * (err + err.T)).abs().amax()


@torch.no_grad()
def whitening_in_bounds(p: Tensor, s_n: Tensor, tol: float = DIVERGENCE_TOL) -> Tensor:
    """Whether every eigenvalue of ``Y = P S_N P`` lies in ``[-tol, 1 + tol]``, as a 0-dim bool tensor.

    Exact Newton-Schulz iterates keep them in ``[0, 1]`` (see :data:`DIVERGENCE_TOL`), so ``False`` means the
    iteration diverged. Costs two products and two Cholesky factorisations (``(1 + tol) I - Y`` and
    ``Y + tol I`` are positive definite exactly when the eigenvalues are inside), about 3 ``C^3`` against the
    ~90 ``C^3`` of the iteration's forward and backward; no eigendecomposition, and no host synchronisation
    until the caller reads the result.
    """
    y = p @ (s_n @ p)
    y = 0.5 * (y + y.mT)
    finite = torch.isfinite(y).all()
    y = torch.where(finite, y, torch.zeros_like(y))  # keep NaN away from LAPACK
    eye = _eye_like(y)
    _, info_upper = torch.linalg.cholesky_ex((1.0 + tol) * eye - y)
    _, info_lower = torch.linalg.cholesky_ex(y + tol * eye)
    return finite & (info_upper == 0) & (info_lower == 0)


_FIX = (
    "The uncoupled iteration amplifies rounding error once converged directions meet an eigenvalue ratio "
    "above ~2.4: use solver=eigh (the same polynomial evaluated exactly; it cannot diverge), keep T=10 or "
    "lower it, raise eps, or whiten a layer with more samples per channel (batch * H * W >> C)."
)


def _guarded_ns(
    s_n: Tensor, T: int, guard: str | None, solver: str = "iteration"
) -> tuple[Tensor, int, str | None]:
    """``(P, iterations used, message)``: ``P_T`` of the normalised matrix, checked by the guard.

    ``message`` is ``None`` unless the guard fired; then ``P`` is the fallback iterate and the message says
    why (``guard="raise"`` raises :class:`WhiteningDivergedError` instead). On the ``eigh`` route
    (:class:`_EighNewtonSchulz`) ``p_T`` is evaluated exactly and cannot diverge: no check is needed.
    """
    if _use_eigh(s_n, solver):
        if not bool(torch.isfinite(s_n).all()):
            raise WhiteningDivergedError(
                "concept whitening: the input covariance is not finite (NaN or inf activations reach the "
                "layer); check the learning rate and the layers before it."
            )
        return _EighNewtonSchulz.apply(s_n, T), T, None
    p = _ns_with_grad(s_n, T)
    if guard is None or bool(whitening_in_bounds(p.detach(), s_n.detach())):
        return p, T, None
    return _fallback(s_n, T, guard)


def _fallback(s_n: Tensor, T: int, guard: str) -> tuple[Tensor, int, str]:
    with torch.no_grad():
        s = s_n.detach()
        if not bool(torch.isfinite(s).all()):
            raise WhiteningDivergedError(
                "concept whitening: the input covariance is not finite (NaN or inf activations reach the "
                "layer); check the learning rate and the layers before it."
            )
        eye = _eye_like(s)
        residuals, passed, last = [], [], None
        for p in _ns_iterates(s, T):
            e = p @ (s @ p) - eye
            ok = bool(torch.isfinite(e).all())
            residuals.append(float(torch.linalg.vector_norm(e)) if ok else math.inf)
            passed.append(ok and bool(whitening_in_bounds(p, s)))
            last = e if ok else None
        if last is None:
            condition = f"P_{T} is not finite"
        else:
            ev = torch.linalg.eigvalsh(0.5 * (last + last.mT)) + 1.0
            condition = (
                f"the whitened covariance P Sigma_N P has eigenvalues in [{float(ev[0]):.3g}, {float(ev[-1]):.3g}], "
                f"outside [-{DIVERGENCE_TOL}, 1 + {DIVERGENCE_TOL}] (exact iterations keep them in [0, 1])"
            )
    msg = f"the Newton-Schulz iteration diverged at T={T}: {condition}. {_FIX}"
    if guard == "raise":
        raise WhiteningDivergedError(msg)
    # The best iterate that has not started to diverge (P_1 never has, in exact arithmetic), by the
    # whitening error: under-whitened directions count in it as well as diverging ones.
    candidates = [k for k in range(T) if passed[k]] or list(range(T))
    best = min(candidates, key=lambda k: residuals[k]) + 1
    if not math.isfinite(residuals[best - 1]):
        raise WhiteningDivergedError(msg)
    msg += f" Falling back to iteration {best} (||P Sigma_N P - I||_F = {residuals[best - 1]:.3g})."
    return _ns_with_grad(s_n, best), best, msg  # again, differentiable


def iternorm_whitening_matrix(
    sigma: Tensor, T: int = 10, guard: str | None = "fallback", solver: str = "auto"
) -> Tensor:
    """Whitening matrix ``W ~ Sigma^{-1/2}`` by ``T`` Newton-Schulz iterations (IterNorm).

    The uncoupled iteration is only conditionally stable: once converged, rounding error between
    eigen-directions with eigenvalue ratio ``r > ~2.4`` grows each step, so a larger ``T`` can
    *diverge* (``test_t_trap_diverges_and_guard_catches_it`` in ``tests/test_concept_whitening.py``:
    ``T=20`` on a float32 covariance of condition number 10). ``guard`` (our addition; the reference code
    has none) checks the result with :func:`whitening_in_bounds` (a rank-deficient covariance passes it):

    * ``"fallback"``: if it fails, use the iterate ``P_k`` with the smallest ``||P_k Sigma_N P_k - I||_F``
      and warn, naming ``T`` and the eigenvalue range found;
    * ``"raise"``: raise :class:`WhiteningDivergedError` with the fix;
    * ``None``: no check (the reference behaviour; for documenting tests only).

    ``solver`` picks how ``p_T(Sigma_N)`` is evaluated: ``iteration`` (the unrolled products, as the
    reference; the T trap and the guard apply), ``eigh`` (:class:`_EighNewtonSchulz`: the same polynomial on
    the eigenvalues, exact, cannot diverge) or ``auto`` (``eigh`` on the CPU, where it is faster, the
    iteration on a GPU, where ``eigh`` is a slow latency-bound call).

    A converged or merely under-whitened result is returned untouched, so the default is the official
    form whenever the official form is usable.

    Args:
        sigma: ``(C, C)`` covariance including ``eps * I``.
        T: iterations (the paper's 10: do not raise it to "whiten better", a larger ``T`` can diverge).

    Returns:
        ``(C, C)`` whitening matrix ``W = P / sqrt(tr Sigma)``.
    """
    if guard not in (*GUARDS, None):
        raise ValueError(f"guard must be one of {GUARDS} or None, got {guard!r}")
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    trace = sigma.diagonal().sum()
    p, _, msg = _guarded_ns(sigma / trace, T, guard, solver)
    if msg is not None:
        warnings.warn(f"concept whitening: {msg}", stacklevel=2)
    return p / trace.sqrt()


def _gram_matrix_by_eigh(xc: Tensor, gram: Tensor, tr: Tensor, eps: float, iters: int) -> Tensor:
    """``W = p_T(Sigma_N) / sqrt(tr)`` ``(C, C)`` from ``eigh(X^T X)`` (the CPU route of :func:`gram_whitening`)."""
    m = xc.shape[1]
    lam, u = torch.linalg.eigh(gram)
    # Directions with a numerically zero eigenvalue (centring leaves one) belong to delta.
    inv = torch.where(lam > lam[-1] * torch.finfo(lam.dtype).eps * m, lam.clamp_min(0).rsqrt(), 0.0)
    mu, delta = (lam / m + eps) / tr, eps / tr
    p_mu, p_delta = torch.ones_like(mu), torch.ones_like(delta)
    for _ in range(iters):
        p_mu = 1.5 * p_mu - 0.5 * p_mu**3 * mu
        p_delta = 1.5 * p_delta - 0.5 * p_delta**3 * delta
    v = (xc @ u) * inv
    wm = (v * (p_mu - p_delta)) @ v.mT
    wm.diagonal().add_(p_delta)
    return wm / tr.sqrt()


def _gram_matrix_by_recurrence(xc: Tensor, gram: Tensor, tr: Tensor, eps: float, iters: int) -> Tensor:
    """The same ``W`` by the divided-difference recurrence of :func:`gram_whitening`, products only (the GPU
    route: ``eigh`` there is a slow latency-bound call). In float64: in float32 the recurrence loses ~1e-2 of
    ``W`` on an ill-conditioned batch (``eigh``: ~1e-6)."""
    c, m = xc.shape
    x, tr = xc.double(), tr.double()
    eye = torch.eye(m, dtype=torch.float64, device=xc.device)
    s = (gram.double() / m + eps * eye) / tr
    delta = eps / tr
    p, d, q = eye, torch.zeros_like(eye), torch.ones_like(delta)  # P_0 = I, d_0 = 0, p_0(delta) = 1
    for _ in range(iters):
        p2 = p @ p
        d = 1.5 * d - 0.5 * ((p2 + q * p + q * q * eye) @ d @ s + q**3 * eye)
        p = 1.5 * p - 0.5 * (p2 @ p @ s)
        q = 1.5 * q - 0.5 * q**3 * delta
    wm = (x @ d) @ x.mT / (m * tr)
    wm.diagonal().add_(q)
    return (wm / tr.sqrt()).to(xc.dtype)


def gram_whitening(
    xc: Tensor,
    eps: float,
    T: int = 10,
    guard: str | None = "fallback",
    matrix: bool = True,
    solver: str = "auto",
) -> tuple[Tensor, Tensor | None, str | None]:
    """IterNorm whitening of ``m < C`` centred samples through their ``m x m`` Gram matrix.

    With ``X = xc`` ``(C, m)``, ``Sigma = X X^T / m + eps I`` and ``Sigma_N = Sigma / tr(Sigma)``, the
    ``m x m`` matrix ``S' = (X^T X / m + eps I) / tr(Sigma)`` satisfies ``Sigma_N X = X S'``, so every
    polynomial of the iteration does too: ``P_T X = X Q_T`` with ``Q_T`` the same ``T`` Newton-Schulz
    steps run on ``S'`` (same non-zero spectrum). The whitened data ``W X = X Q_T / sqrt(tr Sigma)`` then
    costs ``O(T m^3 + C m^2)`` instead of ``O(T C^3)``: the same iteration as
    :func:`iternorm_whitening_matrix` in exact arithmetic, 8x fewer operations at ``m = C / 2``, with the
    same guard (on ``Q_T`` and ``S'``).

    With ``matrix=True`` the ``C x C`` matrix ``W`` (for the running average) is also returned, without
    gradient: on the CPU from the eigendecomposition ``X^T X = U diag(lambda) U^T`` (the columns of
    ``X U diag(lambda)^{-1/2}`` are eigenvectors of ``Sigma_N``), on a GPU without one. With
    ``delta = eps / tr`` the eigenvalue of ``Sigma_N`` off the data's span, ``Sigma_N = delta I + X X^T / (m tr)``, so for the iteration's polynomial ``p_T``,
    ``p_T(Sigma_N) = p_T(delta) I + X d_T(S') X^T / (m tr)`` with ``d_T(x) = (p_T(x) - p_T(delta)) / (x - delta)``
    its divided difference at ``delta`` (``Sigma_N X = X S'`` carries any polynomial across). ``d_T`` follows
    the iteration: ``d_0 = 0`` and, from ``p_{k+1} = 1.5 p_k - 0.5 p_k^3 x``,
    ``d_{k+1} = 1.5 d_k - 0.5 ((P_k^2 + q_k P_k + q_k^2) d_k S' + q_k^3)`` with ``q_k = p_k(delta)``: ``m x m``
    products only.

    Returns:
        ``(W X (C, m), W (C, C) or None, guard message or None)``.
    """
    c, m = xc.shape
    gram = xc.mT @ xc
    trace = gram.diagonal().sum() / m + c * eps
    eye = _eye_like(gram)
    s_n = (gram / m + eps * eye) / trace
    q, iters, msg = _guarded_ns(s_n, T, guard, solver)
    xw = (xc @ q) / trace.sqrt()
    if not matrix:
        return xw, None, msg
    with torch.no_grad():
        running = _gram_matrix_by_eigh if xc.device.type == "cpu" else _gram_matrix_by_recurrence
        wm = running(xc.detach(), gram.detach(), trace.detach(), eps, iters)
    return xw, wm, msg


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
    * ``pool_max``: 3x3 / stride-3 block max, then the mean over the blocks (Chen, Bei & Rudin 2020,
      Sec. 3 "Concept whitening module": the activation of a concept is a max-pooled feature map,
      averaged). The blocks tile the *whole* map: when ``H`` or ``W`` is not a multiple of 3 the last
      block row / column is narrower (``ceil_mode``: the max over the cells that exist, i.e. ``-inf``
      padding). The reference code's ``F.max_pool2d(z, 3, 3)`` drops those cells instead: on an 8x8 map
      it reads rows and columns 0-5 only, which on PartShapes are where body and wing centres lie.

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
        return F.max_pool2d(z, kernel_size=3, stride=3, ceil_mode=True).mean((2, 3))
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
    # the same blocks as pool_axes (ceil_mode: the last, narrower ones included); indices address (h, w)
    _, idx = F.max_pool2d(z, kernel_size=3, stride=3, ceil_mode=True, return_indices=True)
    flat = idx.flatten(2)
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
    not the gradient of axis ``axis`` (only its component ``c = axis`` agrees;
    ``test_exact_gradient_matches_autograd`` in ``tests/test_concept_whitening.py``).

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
# Cayley transform with curvilinear search (Wen & Yin 2013), as in the reference code
# ---------------------------------------------------------------------------------------------
def cayley_transform(A: Tensor, R: Tensor, tau: float) -> Tensor:
    """``Y(tau) = (I + tau/2 A)^{-1} (I - tau/2 A) R``: orthogonal for every ``tau`` when ``A`` is skew."""
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return torch.linalg.solve(eye + 0.5 * tau * A, R - 0.5 * tau * (A @ R))


def skew_factors(G: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """``(U, V)``, ``(C, 2K)`` each, with ``A = G R^T - R G^T = U V^T``; ``K`` = non-zero rows of ``G``.

    Only the ``K`` concept rows of ``G`` are non-zero, so with ``E = [e_j]`` (those rows) and
    ``B = R G_K^T``: ``G R^T = E B^T`` and ``R G^T = B E^T``, i.e. ``U = [E, B]``, ``V = [B, -E]``
    (Wen & Yin 2013, Section 4.1: ``A = U V^T`` of rank at most ``2K``).
    """
    rows = (G != 0).any(1).nonzero().flatten()
    k = rows.numel()
    e = torch.zeros(G.shape[0], k, dtype=G.dtype, device=G.device)
    e[rows, torch.arange(k, device=G.device)] = 1.0
    b = R @ G[rows].mT
    return torch.cat([e, b], 1), torch.cat([b, -e], 1)


def cayley_transform_lowrank(U: Tensor, V: Tensor, R: Tensor, tau: float) -> Tensor:
    """:func:`cayley_transform` for ``A = U V^T`` of rank ``r``: ``O(r C^2)`` instead of a ``C x C`` solve.

    Wen & Yin 2013, Lemma 4 (Sherman-Morrison-Woodbury):
    ``Y(tau) = R - tau U (I_r + tau/2 V^T U)^{-1} V^T R``.
    """
    eye = torch.eye(U.shape[1], dtype=R.dtype, device=R.device)
    return R - tau * (U @ torch.linalg.solve(eye + 0.5 * tau * (V.mT @ U), V.mT @ R))


def cayley_curvilinear_step(
    G: Tensor,
    R: Tensor,
    tau0: float = 1000.0,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_tries: int = 500,
    lowrank: bool | None = None,
) -> tuple[Tensor, float, bool]:
    """One feasible descent step on ``F(R) = <G, R>`` over orthogonal matrices.

    ``A = G R^T - R G^T`` (skew-symmetric), ``Y(tau) = (I + tau/2 A)^{-1} (I - tau/2 A) R`` is
    orthogonal for every ``tau``; ``tau`` is found by bisection from ``tau0`` on ``[0, 1e8]`` until the
    Armijo (``c1``) and curvature (``c2``) conditions hold, with ``F'(0) = -||A||_F^2 / 2`` and
    ``F'(tau) = -tr(G^T (I + tau/2 A)^{-1} A (R + Y) / 2)`` (Wen & Yin 2013, Eq. 2.7 and Algorithm 1).

    ``lowrank`` (default: when the rank bound ``2K`` of ``A``, ``K`` = non-zero rows of ``G``, is below ``C``)
    uses ``A = U V^T`` (:func:`skew_factors`) and the small-matrix form of the transform: with
    ``S = I + tau/2 V^T U`` (``2K x 2K``) and ``M = S^{-1} V^T R``, ``Y = R - tau U M``,
    ``F(Y) = F(R) - tau <U^T G, M>`` and ``F'(tau) = -<U^T G, S^{-1} V^T (R + Y)> / 2`` with
    ``V^T Y = V^T R - tau V^T U M`` (push-through identity ``(I + tau/2 U V^T)^{-1} U = U S^{-1}``), so a
    line-search try costs ``O(K^2 C)`` and ``Y`` is formed once, for the accepted ``tau``. Otherwise every
    try solves the ``C x C`` system (with ``A R`` computed once).

    Returns:
        ``(Y, tau, converged)``; after ``max_tries`` failed tries the current ``tau`` is used (as the
        reference code does) and ``converged`` is ``False``.
    """
    c = R.shape[0]
    if lowrank is None:
        lowrank = 2 * int((G != 0).any(1).sum()) < c
    f0 = float((G * R).sum())
    if lowrank:
        U, V = skew_factors(G, R)
        df0 = -0.5 * float(((U.mT @ U) * (V.mT @ V)).sum())  # ||U V^T||_F^2 = <U^T U, V^T V>
    else:
        A = G @ R.T - R @ G.T
        df0 = -0.5 * float((A * A).sum())
    if df0 == 0.0:  # stationary point (e.g. no concept gradient yet): nothing to do
        return R.clone(), 0.0, True

    if lowrank:
        eye_r = torch.eye(U.shape[1], dtype=R.dtype, device=R.device)
        vr, vu, ug = V.mT @ R, V.mT @ U, U.mT @ G  # hoisted: (2K, C), (2K, 2K), (2K, C)

        def trial(tau: float) -> tuple[float, float, Any]:
            lu = torch.linalg.lu_factor(eye_r + 0.5 * tau * vu)
            m = torch.linalg.lu_solve(*lu, vr)
            fy = f0 - tau * float((ug * m).sum())
            dfy = -0.5 * float((ug * torch.linalg.lu_solve(*lu, 2.0 * vr - tau * (vu @ m))).sum())
            return fy, dfy, m

        def accept(tau: float, m: Any) -> Tensor:
            return R - tau * (U @ m)

    else:
        eye = torch.eye(c, dtype=R.dtype, device=R.device)
        ar = A @ R  # hoisted out of the line search

        def trial(tau: float) -> tuple[float, float, Any]:
            lu = torch.linalg.lu_factor(eye + 0.5 * tau * A)
            y = torch.linalg.lu_solve(*lu, R - 0.5 * tau * ar)
            fy = float((G * y).sum())
            dfy = -float((G * torch.linalg.lu_solve(*lu, 0.5 * (ar + A @ y))).sum())
            return fy, dfy, y

        def accept(tau: float, y: Any) -> Tensor:
            return y

    alpha, beta, tau = 0.0, 1e8, float(tau0)
    for _ in range(max_tries):
        fy, dfy, state = trial(tau)
        if fy > f0 + c1 * tau * df0:  # Armijo fails: step too long
            beta = tau
        elif dfy < c2 * df0:  # curvature fails: step too short
            alpha = tau
        else:
            return accept(tau, state), tau, True
        tau = 0.5 * (alpha + beta)
    return accept(tau, trial(tau)[2]), tau, False


# ---------------------------------------------------------------------------------------------
# Batched data products (NCHW order, no transposed copies)
# ---------------------------------------------------------------------------------------------
def _apply(mat: Tensor, x3: Tensor) -> Tensor:
    """``mat @ x_b`` for every image: ``(C, C)`` times ``(B, C, N)``, one batched product."""
    return torch.bmm(mat.expand(x3.shape[0], *mat.shape), x3)


def _scatter(xc: Tensor) -> Tensor:
    """``sum_b xc_b xc_b^T`` ``(C, C)`` of ``(B, C, N)``: per image when the ``(B, C, C)`` partial products are
    smaller than the data, else one product over a ``(C, B*N)`` copy."""
    b, c, n = xc.shape
    if b * c <= 2 * n:
        return torch.bmm(xc, xc.mT).sum(0)
    x2d = xc.transpose(0, 1).reshape(c, b * n)
    return x2d @ x2d.mT


class _CentredMoments(torch.autograd.Function):
    """``(mean (C,), xc = x - mean (B, C, N), xc xc^T / m (C, C))`` of ``x`` ``(B, C, N)``, ``m = B N``.

    One fused backward instead of autograd's chain (mean, subtraction, two products of the covariance):
    ``dL/dx = (g_xc - mean(g_xc)) + (G + G^T) xc / m`` with ``G = dL/dcov`` (the second term has zero mean
    over the samples because ``xc`` has), written in place into one new tensor. ``mean`` carries no
    gradient (it only feeds the running statistics). First derivatives only.
    """

    @staticmethod
    def forward(ctx: Any, x3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, c, n = x3.shape
        mean = x3.mean((0, 2))
        xc = x3 - mean[None, :, None]
        cov = _scatter(xc) / (b * n)
        ctx.save_for_backward(xc)
        ctx.mark_non_differentiable(mean)
        return mean, xc, cov

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_mean: Tensor | None, g_xc: Tensor | None, g_cov: Tensor | None) -> Tensor:
        (xc,) = ctx.saved_tensors
        b, c, n = xc.shape
        out = g_xc - g_xc.mean((0, 2), keepdim=True) if g_xc is not None else torch.zeros_like(xc)
        if g_cov is not None:
            out.baddbmm_(((g_cov + g_cov.mT) / (b * n)).expand(b, c, c), xc)
        return out


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
        T: Newton-Schulz iterations (10; with ``solver="iteration"`` a larger one can diverge, see
            :func:`iternorm_whitening_matrix`).
        activation_mode: ``phi`` of an axis: ``mean``, ``max``, ``pos_mean`` or ``pool_max`` (paper).
        grad_mode: ``exact`` (gradient of ``phi(z_j)``) or ``reference`` (the reference code's
            per-axis mask mixing, see :func:`concept_gradient_samples`).
        concept_names: names of the concepts of axes ``0..K-1`` (metadata; ``K <= C``).
        rot_dtype: dtype of ``running_rot``: ``float32`` (orthogonal to ~1e-5 after 1000 updates) or
            ``float64`` (~1e-13).
        guard: what to do if the whitening iteration diverges: ``fallback`` (best iterate, warning) or
            ``raise`` (see :func:`iternorm_whitening_matrix`).
        alignment: ``paper`` (Eq. 3: each axis maximises its concept's mean activation) or ``contrastive``
            (each axis maximises the difference between images with and without its concept; needs
            negative concept passes, see :meth:`concept_mode` and :meth:`alignment_gradient`).
        solver: how ``p_T`` of the covariance is evaluated: ``auto`` (``eigh`` on the CPU, the unrolled
            iteration on a GPU), ``eigh`` (exact, one float64 eigendecomposition, cannot diverge) or
            ``iteration`` (the reference's products; the guard watches it). Same function either way.

    Buffers (all in ``state_dict``): ``running_mean`` ``(C,)``, ``running_wm`` ``(C, C)``,
    ``running_rot`` ``(C, C)``, ``sum_G`` ``(C, C)``, ``counter`` ``(C,)``, ``num_batches_tracked``;
    contrastive only: ``sum_G_neg`` ``(C, C)`` and ``counter_neg`` ``(C,)``.

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
        alignment: str = "paper",
        solver: str = "auto",
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
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
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
        self.alignment = alignment
        self.solver = solver
        self._mode = -1
        self._negative = False  # concept passes with mode >= 0: images with (False) or without (True) it
        self.last_tau: float | None = None  # diagnostics of the last rotation update (not state)
        self.layer_name: str | None = None  # dotted name in the network, for warnings
        self.fallback_count = 0  # training batches whose whitening fell back (guard), not state
        self._divergence_warned = False
        self._eval_cache: tuple[Any, Tensor, Tensor] | None = None
        self._population: list[Tensor] | None = None  # open population_statistics block: moments so far
        kw: dict[str, Any] = {"device": device, "dtype": dtype or torch.float32}
        c = num_features
        if affine:
            self.weight = nn.Parameter(torch.ones(c, **kw))
            self.bias = nn.Parameter(torch.zeros(c, **kw))
        else:  # no unused parameters: DDP's unused-parameter check would fail on them
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
        # Contrastive alignment only: the same statistics of the negatives (images without the concept). Not
        # registered for "paper", so that layer's state_dict is exactly the one it always had.
        contrastive = alignment == "contrastive"
        self.register_buffer("sum_G_neg", torch.zeros(c, c, **kw) if contrastive else None)
        self.register_buffer("counter_neg", torch.full((c,), _COUNTER_INIT, **kw) if contrastive else None)

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

    @property
    def negative(self) -> bool:
        """Whether concept passes (``mode >= 0``) see negatives (images without the concept)."""
        return self._negative

    @contextlib.contextmanager
    def concept_mode(self, axis: int, negative: bool = False) -> Iterator[ConceptWhitening2d]:
        """Within the block, forward passes accumulate the alignment gradient of ``axis``.

        ``negative=True`` (``alignment="contrastive"`` only): the images do *not* show the concept; their
        gradient goes to ``sum_G_neg`` and is subtracted at the rotation update.
        """
        if negative and self.alignment != "contrastive":
            raise ValueError(
                f"negative concept batches need alignment='contrastive'; this layer uses {self.alignment!r} "
                f"(set net.alignment=contrastive, or pass only positive concept batches)"
            )
        previous, previous_neg = self._mode, self._negative
        self.mode = axis
        self._negative = bool(negative)
        try:
            yield self
        finally:
            self._mode, self._negative = previous, previous_neg

    @contextlib.contextmanager
    def population_statistics(self) -> Iterator[ConceptWhitening2d]:
        """Within the block, forward passes accumulate the layer's input moments; on leaving it, the running
        mean and whitening matrix become those of the whole population seen, ``W = p_T(Sigma)`` evaluated
        exactly (float64, :class:`_EighNewtonSchulz`).

        Our addition, the whitening analogue of "precise BatchNorm" (Wu & Johnson, "Rethinking 'Batch' in
        BatchNorm", 2021, Sec. 3): the running ``W`` of training is an exponential average of per-batch
        whitening matrices taken while the network was still moving, and an average of ``Sigma_b^{-1/2}`` is
        not ``Sigma^{-1/2}``; after this block the eval-mode output of the data seen has covariance
        ``p_T(Sigma_N)^2 Sigma_N`` (``I`` up to the iteration's under-whitening of tiny eigenvalues; exactly
        ``I`` as ``T`` grows). Inside the block the output uses the current running statistics and updates
        nothing, whatever ``training`` says; moments are shifted by the old running mean and summed in
        float64, and :class:`SyncConceptWhitening2d` sums them over ranks on leaving (every rank must
        enter and leave the block). Leaving by an exception changes nothing.
        """
        if not self.track_running_stats:
            raise ValueError(
                "population_statistics needs track_running_stats=True (there are no running statistics)"
            )
        c = self.num_features
        dev = self.running_mean.device
        shift = self.running_mean.detach().double().clone()
        self._population = [
            torch.zeros(c, dtype=torch.float64, device=dev),
            torch.zeros(c, c, dtype=torch.float64, device=dev),
            torch.zeros(1, dtype=torch.float64, device=dev),
            shift,
        ]
        try:
            yield self
            s1, s2, n, shift = self._population
            packed = self._reduce_population(torch.cat([s1, s2.reshape(-1), n]))
            n = float(packed[-1])
            if n < 2:
                raise ValueError(
                    f"population_statistics saw {n:.0f} values per channel; run forward passes inside the block"
                )
            mean_d = packed[:c] / n
            cov = packed[c : c + c * c].view(c, c) / n - torch.outer(mean_d, mean_d)
            sigma = 0.5 * (cov + cov.mT) + self.eps * torch.eye(c, dtype=torch.float64, device=dev)
            wm = iternorm_whitening_matrix(sigma, self.T, guard=None, solver="eigh")
            with torch.no_grad():
                self.running_mean.copy_(shift + mean_d)
                self.running_wm.copy_(wm)
        finally:
            self._population = None

    @torch.no_grad()
    def _accumulate_population(self, x3: Tensor) -> None:
        """Add the moments of ``x3`` ``(B, C, N)`` to the open :meth:`population_statistics` block."""
        s1, s2, n, shift = self._population
        d = x3.detach().double() - shift[None, :, None]
        s1 += d.sum((0, 2))
        s2 += _scatter(d)
        n += d.shape[0] * d.shape[2]

    def _reduce_population(self, t: Tensor) -> Tensor:
        """Sum of the packed population moments over ranks (identity here)."""
        return t

    # -- distributed hooks (identity here; SyncConceptWhitening2d all-reduces) --------------------
    def _check_samples(self, m: int) -> None:
        if m < 2:
            raise ValueError(
                f"concept whitening in training mode needs more than 1 value per channel, got input with "
                f"{m} (batch * H * W); use a larger batch or eval mode"
            )

    def _global_moments(self, x2d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean (C,), centred x (C, m), covariance (C, C))`` of ``x2d`` ``(C, m)``."""
        self._check_samples(x2d.shape[1])
        mean = x2d.mean(1)
        xc = x2d - mean[:, None]
        return mean, xc, (xc @ xc.T) / x2d.shape[1]

    def _local_statistics(self) -> bool:
        """Whether the batch statistics are this process's alone (the Gram route needs the samples)."""
        return True

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

    def use_gram(self, m: int) -> bool:
        """Whether a training batch of ``m = B * H * W`` samples is whitened through its Gram matrix.

        :func:`gram_whitening` (``m x m`` iteration, same result) when its operation count is below that of
        the ``C x C`` iteration: roughly ``(9 T + 10) m^3 + 7 C m^2 + 3 C^2 m`` against ``9 T C^3 + 5 C^2 m``.
        """
        c, t = self.num_features, self.T
        if m >= c or not self._local_statistics():
            return False
        return (9 * t + 10) * m**3 + 7 * c * m * m + 3 * c * c * m < 9 * t * c**3 + 5 * c * c * m

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        b, c, h, w = x.shape
        # The whitening maths is ill-conditioned: always float32 or better, autocast off.
        with torch.autocast(device_type=x.device.type, enabled=False):
            cdt = torch.promote_types(x.dtype, torch.float32)
            # (B, C, H*W): a view of a contiguous input. Every product below is a batched product over the
            # images, so the output is written in NCHW order with no transposed copies in or out.
            x3 = x.to(cdt).reshape(b, c, h * w)
            rot = self.running_rot.to(cdt)
            if self._population is not None:
                self._accumulate_population(x3)
            if self._mode >= 0:  # concept pass: running statistics (batch ones without them), no update
                if self.track_running_stats:
                    mean, wm = self.running_mean.to(cdt), self.running_wm.to(cdt)
                    xc = x3 - mean[None, :, None]
                else:
                    _, xc, cov = self._batch_moments(x3)
                    wm = self._whitening_matrix(cov)
                x_hat = _apply(wm, xc)
                z3 = _apply(rot, x_hat)
                with torch.no_grad():
                    self._accumulate_concept_gradient(
                        x_hat.detach().view(b, c, h, w), z3.detach().view(b, c, h, w)
                    )
            elif (self.training and self._population is None) or not self.track_running_stats:
                z3 = self._whiten_batch(x3, rot, update=self.training and self.track_running_stats)
            else:  # statistics fixed: z = (R W) x - (R W) mu with R W cached between forwards
                op, shift = self._eval_operator(cdt)
                z3 = torch.baddbmm(shift.neg()[None, :, None], op.expand(b, c, c), x3)
            z = z3.reshape(b, c, h, w)
            if self.affine:
                z = z * self.weight.to(cdt)[None, :, None, None] + self.bias.to(cdt)[None, :, None, None]
        fmt = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            else torch.contiguous_format
        )
        return z.to(x.dtype).contiguous(memory_format=fmt)

    def _batch_moments(self, x3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean (C,), centred x (B, C, N), covariance (C, C))`` of ``x3`` ``(B, C, N)``."""
        b, c, n = x3.shape
        if self._local_statistics():
            self._check_samples(b * n)
            return _CentredMoments.apply(x3)
        mean, xc, cov = self._global_moments(x3.transpose(0, 1).reshape(c, b * n))
        return mean, xc.view(c, b, n).transpose(0, 1), cov

    def _whiten_batch(self, x3: Tensor, rot: Tensor, update: bool) -> Tensor:
        """``R W (x - mu)`` ``(B, C, N)`` with the batch statistics; updates the running ones if ``update``."""
        b, c, n = x3.shape
        m = b * n
        if self.use_gram(m):
            self._check_samples(m)
            x2d = x3.transpose(0, 1).reshape(c, m)
            mean = x2d.mean(1)
            xw, wm, msg = gram_whitening(
                x2d - mean[:, None], self.eps, self.T, self.guard, matrix=update, solver=self.solver
            )
            if msg is not None:
                self._diverged(msg)
            z3 = (rot @ xw).view(c, b, n).transpose(0, 1)
        else:
            mean, xc, cov = self._batch_moments(x3)
            wm = self._whitening_matrix(cov)
            # (R W) x costs C^3 + C^2 m, R (W x) 2 C^2 m: the cheaper order.
            z3 = _apply(rot @ wm, xc) if m >= c else _apply(rot, _apply(wm, xc))
        if update:
            self._update_running(mean, wm)
        return z3

    def _whitening_matrix(self, cov: Tensor) -> Tensor:
        """``W = P_T / sqrt(tr Sigma)`` of ``Sigma = cov + eps I``, guarded (:func:`iternorm_whitening_matrix`)."""
        sigma = cov + self.eps * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        trace = sigma.diagonal().sum()
        p, _, msg = _guarded_ns(sigma / trace, self.T, self.guard, self.solver)
        if msg is not None:
            self._diverged(msg)
        return p / trace.sqrt()

    def _eval_operator(self, cdt: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(R W, R W mu)`` of the running statistics, recomputed only when a buffer changed."""
        bufs = (self.running_rot, self.running_wm, self.running_mean)
        try:
            key: tuple[Any, ...] | None = (cdt, torch.is_inference_mode_enabled()) + tuple(
                (t.data_ptr(), t._version) for t in bufs
            )
        except RuntimeError:  # inference tensors keep no version counter: do not cache
            key = None
        if key is not None and self._eval_cache is not None and self._eval_cache[0] == key:
            return self._eval_cache[1], self._eval_cache[2]
        with torch.no_grad():
            op = self.running_rot.to(cdt) @ self.running_wm.to(cdt)
            shift = op @ self.running_mean.to(cdt)
        self._eval_cache = None if key is None else (key, op, shift)
        return op, shift

    def _diverged(self, msg: str) -> None:
        """Count a guard fallback and warn, once per layer, with the layer's name."""
        self.fallback_count += 1
        if self._divergence_warned:
            return
        self._divergence_warned = True
        warnings.warn(
            f"concept whitening layer {self._name()!r} (C={self.num_features}): {msg} This warning is shown "
            f"once per layer; `.fallback_count` counts the batches that fell back.",
            stacklevel=3,
        )

    def _name(self) -> str:
        """The layer's dotted name in the enclosing network (set by :func:`concept_whitening_layers`, else
        looked up from the calling modules' frames), or a description."""
        if self.layer_name:
            return self.layer_name
        frame = inspect.currentframe()
        found = None
        for _ in range(200):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and owner is not self:
                for name, mod in owner.named_modules():
                    if mod is self and name:
                        found = name  # keep going: the outermost network gives the full path
                        break
            frame = frame.f_back
        del frame
        if found is not None:
            self.layer_name = found
        return found or f"ConceptWhitening2d({self.num_features})"

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
        if self._negative:  # the same average of the images without the concept (contrastive alignment)
            if self.sum_G_neg is None or self.counter_neg is None:
                raise ValueError("negative concept batches need alignment='contrastive'")
            self.sum_G_neg[j].mul_(1.0 - f).add_(grad.to(self.sum_G_neg), alpha=f)
            self.counter_neg[j] += 1.0
            return
        self.sum_G[j].mul_(1.0 - f).add_(grad.to(self.sum_G), alpha=f)
        self.counter[j] += 1.0

    def concept_statistics(self) -> list[Tensor]:
        """The accumulated alignment statistics (``sum_G``, ``counter`` and, contrastive, their negatives):
        what a distributed run must average over ranks before :meth:`update_rotation_matrix`."""
        stats = [self.sum_G, self.counter]
        if self.sum_G_neg is not None and self.counter_neg is not None:
            stats += [self.sum_G_neg, self.counter_neg]
        return stats

    @torch.no_grad()
    def alignment_gradient(self) -> Tensor:
        """``G`` ``(C, C)`` of the rotation update (float64): the objective is ``F(R) = <G, R>``.

        * ``paper`` (Chen, Bei & Rudin 2020, Eq. 3): ``G = sum_G / counter``, row ``j`` minus the mean
          ``d phi(z_j) / d R[j]`` over concept ``j``'s images;
        * ``contrastive``: ``G = sum_G / counter - sum_G_neg / counter_neg``, the same with the mean over the
          images without the concept subtracted (``mean`` mode: ``-(mu_j^+ - mu_j^-)`` of the whitened
          means). A concept axis with positive batches but no negative one since the last update raises.
        """
        G = (self.sum_G / self.counter[:, None]).double()
        if self.alignment != "contrastive":
            return G
        assert self.sum_G_neg is not None and self.counter_neg is not None
        has_pos = self.counter > _COUNTER_INIT * 1.5
        has_neg = self.counter_neg > _COUNTER_INIT * 1.5
        lonely = (has_pos & ~has_neg).nonzero().flatten().tolist()
        if lonely:
            names = [self.concept_names[j] if j < len(self.concept_names) else str(j) for j in lonely]
            raise ValueError(
                f"contrastive concept whitening: axis/axes {lonely} ({names}) got concept batches but no negative "
                f"batch since the last rotation update; run a pass of images without the concept in "
                f"concept_mode(axis, negative=True) (datamodule.concept_negative_datasets), or use "
                f"alignment='paper'"
            )
        return G - (self.sum_G_neg / self.counter_neg[:, None]).double()

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
        """Rotate the axes towards the accumulated concept gradients (Cayley + line search, Wen & Yin 2013).

        ``G = sum_G / counter`` (rows of axes without concepts are 0), then ``outer_steps`` calls of
        :func:`cayley_curvilinear_step` on ``F(R) = <G, R>``, computed in float64. Afterwards ``counter``
        is reset and ``sum_G`` is kept (it is an exponential moving average, as in the reference code).

        Returns:
            the last accepted step size ``tau`` (also in :attr:`last_tau`).
        """
        G = self.alignment_gradient()
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
        if self.counter_neg is not None:
            self.counter_neg.fill_(_COUNTER_INIT)
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
        # A paper-aligned state (no negative statistics) loads into a contrastive layer: they start empty.
        if self.sum_G_neg is not None and self.counter_neg is not None and prefix + "sum_G" in state_dict:
            state_dict.setdefault(prefix + "sum_G_neg", torch.zeros_like(self.sum_G_neg))
            state_dict.setdefault(prefix + "counter_neg", torch.full_like(self.counter_neg, _COUNTER_INIT))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, T={self.T}, activation_mode={self.activation_mode!r}, "
            f"grad_mode={self.grad_mode!r}"
        )
        if self.alignment != "paper":
            s += f", alignment={self.alignment!r}"
        if self.solver != "auto":
            s += f", solver={self.solver!r}"
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
            "alignment": self.alignment,
            "solver": self.solver,
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

    def _local_statistics(self) -> bool:
        return self._world() == 1

    def _reduce_population(self, t: Tensor) -> Tensor:
        return self._all_reduce(t) if self._world() > 1 else t

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
    new._negative = old._negative
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
