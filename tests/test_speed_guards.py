"""The fast paths of issue 16 give the same results as the slow ones, and the guards fire when they should.

* concept whitening: the Gram-matrix route (``m = B*H*W < C``), the ordered / cached products and the
  low-rank Cayley update against independent computations (eigendecomposition of the covariance, the
  ``C x C`` solve); the divergence guard stays quiet on rank-deficient batches and fires, naming the layer,
  on a diverging iteration;
* the benchmark's re-implementation of the reference ``IterNormRotation`` computes the same layer.

No timing is asserted here (shared CPUs); ``benchmarks/throughput.py`` measures the speed.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from interpzoo.layers.concept_whitening import (
    DIVERGENCE_TOL,
    ConceptWhitening2d,
    cayley_curvilinear_step,
    cayley_transform,
    cayley_transform_lowrank,
    gram_whitening,
    iternorm_whitening_matrix,
    newton_schulz,
    skew_factors,
    whitening_in_bounds,
    whitening_residual,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _exact_whitening(sigma: torch.Tensor, T: int) -> torch.Tensor:
    """``p_T(Sigma_N) / sqrt(tr Sigma)`` through the eigendecomposition: the iteration's polynomial applied
    to exact eigenvalues (no rounding-error amplification between directions)."""
    trace = sigma.diagonal().sum()
    lam, vec = torch.linalg.eigh(sigma / trace)
    p = torch.ones_like(lam)
    for _ in range(T):
        p = 1.5 * p - 0.5 * p**3 * lam
    return vec @ torch.diag(p) @ vec.T / trace.sqrt()


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _rank_deficient_batch(c: int = 64, b: int = 4, hw: int = 3, seed: int = 0, dtype=torch.float32):
    """``(b, c, hw, hw)`` with ``m = b * hw^2 < c`` samples and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 3.0, c, dtype=torch.float64)[None, :, None, None]
    return (torch.randn(b, c, hw, hw, generator=g, dtype=torch.float64) * scale + 1.0).to(dtype)


def _random_rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q


# -- divergence guard --------------------------------------------------------------------------------
def test_guard_is_quiet_on_rank_deficient_batches() -> None:
    """m = 36 < C = 64: a singular covariance leaves ||P Sigma_N P - I||_2 at 1 up to rounding (the old
    threshold's false alarm) but every eigenvalue of P Sigma_N P inside [0, 1]: no warning, no fallback."""
    x = _rank_deficient_batch()
    xc = _pixels(x).double()
    xc = xc - xc.mean(1, keepdim=True)
    sigma = xc @ xc.T / xc.shape[1] + 1e-5 * torch.eye(64, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (torch.float32, torch.float64):
            s = sigma.to(dtype)
            w = iternorm_whitening_matrix(s, T=10)  # C x C route, guarded
            p = w * s.diagonal().sum().sqrt()
            assert bool(whitening_in_bounds(p, s / s.diagonal().sum()))
            assert float(whitening_residual(p, s / s.diagonal().sum())) > 1 - 1e-3  # null directions
        cw = ConceptWhitening2d(64).train()
        assert cw.use_gram(36)
        z = cw(x)
        for _ in range(3):
            cw(x)
    assert cw.fallback_count == 0
    # the output is the iteration's (exact-eigenvalue) whitening of the batch
    expected = _exact_whitening(sigma, 10) @ xc
    assert torch.allclose(_pixels(z).double(), expected, atol=1e-3 * float(expected.abs().max()))


def test_guard_fires_once_with_the_layer_name_on_a_diverging_iteration() -> None:
    d = 64
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = (
        q
        @ torch.diag(torch.logspace(0, 1, d, dtype=torch.float64).sqrt())
        @ torch.randn(d, 2560, generator=g, dtype=torch.float64)
    )
    x = x.float().T.reshape(128, 20, d).permute(0, 2, 1).reshape(128, d, 4, 5)  # m = 2560 >> C, cond 10
    xc = _pixels(x).double()
    xc = xc - xc.mean(1, keepdim=True)
    sigma = xc @ xc.T / xc.shape[1] + 1e-5 * torch.eye(d, dtype=torch.float64)
    # T = 20 makes the uncoupled iteration diverge (the "T trap", see iternorm_whitening_matrix):
    # eigenvalues of P Sigma_N P leave [0, 1]
    p20 = (
        iternorm_whitening_matrix(sigma.float(), T=20, guard=None, solver="iteration")
        * sigma.float().diagonal().sum().sqrt()
    )
    sn = (sigma / sigma.diagonal().sum()).float()
    assert not bool(whitening_in_bounds(p20, sn))
    # the guard watches the unrolled iteration (the GPU route; solver="iteration" forces it on the CPU)
    net = nn.Sequential(
        OrderedDict(conv=nn.Identity(), whiten=ConceptWhitening2d(d, T=20, solver="iteration"))
    )
    net.train()
    with pytest.warns(UserWarning) as record:
        z = net(x)
        net(x)
    msgs = [str(r.message) for r in record if "diverged" in str(r.message)]
    assert len(msgs) == 1, msgs  # once per layer
    assert "'whiten'" in msgs[0] and "T=20" in msgs[0] and "eigenvalues in [" in msgs[0]
    assert f"1 + {DIVERGENCE_TOL}" in msgs[0] and "Falling back to iteration" in msgs[0]
    assert net.whiten.fallback_count == 2
    cov = torch.cov(_pixels(z).double(), correction=0)
    assert (cov - torch.eye(d, dtype=torch.float64)).abs().max() < 1e-3  # the fallback whitens


# -- the eigh route: the same polynomial, exact ----------------------------------------------------------
def _iteration_float64(s_n: torch.Tensor, T: int) -> torch.Tensor:
    """``P_T`` by the plain unrolled products in float64 (independent of the layer's code)."""
    eye = torch.eye(s_n.shape[0], dtype=torch.float64)
    p = eye.clone()
    for _ in range(T):
        p = 1.5 * p - 0.5 * p @ p @ p @ s_n
    return p


@pytest.mark.parametrize("cond", [10.0, 1e3, 1e5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_route_matches_the_float64_iteration(cond: float, dtype: torch.dtype) -> None:
    """``solver="eigh"`` (one eigendecomposition) equals the unrolled iteration in float64 to 1e-5 (relative),
    in value and gradient; the float32 unrolled iteration is no closer (its own rounding)."""
    from interpzoo.layers.concept_whitening import _guarded_ns, _ns

    g = torch.Generator().manual_seed(int(cond))
    d = 64
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    sigma = q @ torch.diag(torch.logspace(0, math.log10(cond), d, dtype=torch.float64)) @ q.T
    s_n64 = sigma / sigma.diagonal().sum()
    exact = _iteration_float64(s_n64, 10)
    s = s_n64.to(dtype).clone().requires_grad_()
    p, iters, msg = _guarded_ns(s, 10, "raise", solver="eigh")
    assert iters == 10 and msg is None and p.dtype == dtype
    scale = float(exact.abs().max())
    # float64: both sides round at ~cond * eps (measured 1.1e-10 relative at cond 1e5 on one CPU, less on another)
    tol = 1e-5 if dtype == torch.float32 else max(1e-10, 1e-14 * cond)
    assert float((p.detach().double() - exact).abs().max()) < tol * scale
    unrolled32 = _ns(s_n64.float(), 10).double()
    assert float((p.detach().double() - exact).abs().max()) <= max(
        float((unrolled32 - exact).abs().max()), 1e-12 * scale
    )
    # gradient: autograd through the float64 loop
    upstream = torch.randn(d, d, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((p.double() * upstream).sum(), s)
    s64 = s_n64.clone().requires_grad_()
    (ref,) = torch.autograd.grad((_iteration_float64(s64, 10) * upstream).sum(), s64)
    sym = lambda a: 0.5 * (a + a.T)  # noqa: E731 - only symmetric perturbations reach a covariance
    gtol = 1e-4 if dtype == torch.float32 else 1e-9
    assert torch.allclose(sym(grad.double()), sym(ref), atol=gtol * float(ref.abs().max()))


def test_solver_auto_is_eigh_on_cpu_and_layers_agree() -> None:
    """The layer's three solvers give the same output, input gradient and running W (float64)."""
    torch.manual_seed(3)
    x = (
        torch.randn(8, 12, 5, 5, dtype=torch.float64)
        * torch.linspace(0.5, 3, 12, dtype=torch.float64)[:, None, None]
    )
    outs = []
    for solver in ("auto", "eigh", "iteration"):
        cw = ConceptWhitening2d(12, dtype=torch.float64, rot_dtype="float64", solver=solver).train()
        cw.running_rot.copy_(_random_rotation(12, 1))
        xi = x.clone().requires_grad_()
        z = cw(xi)
        (z * torch.linspace(-1, 1, z.numel(), dtype=torch.float64).view_as(z)).sum().backward()
        outs.append((z.detach(), xi.grad, cw.running_wm.clone()))
        assert cw.config()["solver"] == solver
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert torch.allclose(a, b, atol=1e-9)
    with pytest.raises(ValueError, match="solver must be one of"):
        ConceptWhitening2d(4, solver="exact")


# -- exact backward of the iteration -----------------------------------------------------------------
@pytest.mark.parametrize("rank", [40, 12])  # full rank, and rank-deficient (clustered eigenvalues)
def test_eigendecomposition_backward_equals_autograd_through_the_loop(rank: int) -> None:
    """The CPU route (closed-form backward) and the GPU route (autograd through the products, forced here
    with ``closed_form=False``) give autograd's gradient through the plain loop."""
    from interpzoo.layers.concept_whitening import _guarded_ns, _ns_with_grad

    g = torch.Generator().manual_seed(rank)
    x = (
        torch.randn(40, rank, generator=g, dtype=torch.float64)
        * torch.linspace(0.3, 2, 40, dtype=torch.float64)[:, None]
    )
    sigma = x @ x.T / rank + 1e-5 * torch.eye(40, dtype=torch.float64)
    upstream = torch.randn(40, 40, generator=g, dtype=torch.float64)
    grads = []
    for route in ("closed_form", "gpu_route", "loop"):
        s = sigma.clone().requires_grad_()
        s_n = s / s.diagonal().sum()
        if route == "closed_form":
            p = _guarded_ns(s_n, 10, None)[0]
        elif route == "gpu_route":
            p = _ns_with_grad(s_n, 10, closed_form=False)
        else:
            p = newton_schulz(s, 10)[0]  # autograd through the loop
        (grad,) = torch.autograd.grad((p * upstream).sum(), s)
        grads.append(grad)
    fast, gpu, loop = grads
    sym = lambda a: 0.5 * (a + a.T)  # noqa: E731 - only symmetric perturbations reach a covariance
    assert torch.allclose(sym(fast), sym(loop), atol=1e-9 * float(loop.abs().max()))
    assert torch.allclose(sym(gpu), sym(loop), atol=1e-9 * float(loop.abs().max()))


# -- Gram route (m < C) --------------------------------------------------------------------------------
def test_gram_route_equals_the_covariance_route_float64() -> None:
    x = _rank_deficient_batch(c=48, b=2, hw=4, dtype=torch.float64)  # m = 32 < 48
    xc = _pixels(x)
    xc = xc - xc.mean(1, keepdim=True)
    sigma = xc @ xc.T / xc.shape[1] + 1e-5 * torch.eye(48, dtype=torch.float64)
    exact = _exact_whitening(sigma, 10)
    xw, wm, msg = gram_whitening(xc, 1e-5, T=10)
    assert msg is None
    assert torch.allclose(xw, exact @ xc, atol=1e-9)
    assert torch.allclose(wm, exact, atol=1e-9)
    assert torch.allclose(xw, iternorm_whitening_matrix(sigma, T=10) @ xc, atol=1e-6)
    # through the layer: output, running statistics and the rotation
    cw = ConceptWhitening2d(48, momentum=1.0, dtype=torch.float64, rot_dtype="float64").train()
    rot = _random_rotation(48, 3)
    cw.running_rot.copy_(rot)
    z = cw(x)
    assert torch.allclose(_pixels(z), rot @ exact @ xc, atol=1e-9)
    assert torch.allclose(cw.running_wm, exact, atol=1e-9)
    assert torch.allclose(cw.running_mean, _pixels(x).mean(1), atol=1e-12)


def test_gram_route_gradcheck() -> None:
    torch.manual_seed(0)
    cw = ConceptWhitening2d(6, dtype=torch.float64, rot_dtype="float64", activation_mode="mean").train()
    cw.running_rot.copy_(_random_rotation(6, 5))
    x = torch.randn(1, 6, 2, 2, dtype=torch.float64) + torch.arange(6.0, dtype=torch.float64)[:, None, None]
    x.requires_grad_()
    assert cw.use_gram(4)
    assert torch.autograd.gradcheck(lambda t: cw(t), (x,), eps=1e-6, atol=1e-5)


def test_eval_operator_is_cached_and_follows_buffer_changes() -> None:
    x = _rank_deficient_batch(c=16, b=8, hw=3)
    cw = ConceptWhitening2d(16).train()
    for _ in range(3):
        cw(x)
    cw.eval()

    def expected() -> torch.Tensor:
        op = cw.running_rot.double() @ cw.running_wm.double()
        return op @ (_pixels(x).double() - cw.running_mean.double()[:, None])

    out = cw(x)
    assert torch.allclose(_pixels(out).double(), expected(), atol=1e-4)
    key = cw._eval_cache[0]
    cw(x)
    assert cw._eval_cache[0] == key  # reused
    cw.running_rot.copy_(_random_rotation(16, 7))  # e.g. an alignment round
    out = cw(x)
    assert cw._eval_cache[0] != key
    assert torch.allclose(_pixels(out).double(), expected(), atol=1e-4)
    other = ConceptWhitening2d(16)
    other.load_state_dict(cw.state_dict())
    assert torch.allclose(other.eval()(x), out, atol=1e-6)


# -- Cayley update -------------------------------------------------------------------------------------
def _concept_gradient(c: int, k: int, seed: int) -> torch.Tensor:
    g = torch.zeros(c, c, dtype=torch.float64)
    g[:k] = torch.randn(k, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g


@pytest.mark.parametrize("c,k", [(32, 3), (64, 5)])
def test_lowrank_cayley_equals_the_full_solve(c: int, k: int) -> None:
    G, R = _concept_gradient(c, k, seed=c), _random_rotation(c, c + 1)
    U, V = skew_factors(G, R)
    assert U.shape == (c, 2 * k)
    A = G @ R.T - R @ G.T
    assert torch.allclose(U @ V.T, A, atol=1e-12)
    for tau in (1e-3, 0.5, 30.0, 1e4):
        assert torch.allclose(cayley_transform_lowrank(U, V, R, tau), cayley_transform(A, R, tau), atol=1e-6)
    y_low, tau_low, ok_low = cayley_curvilinear_step(G, R, lowrank=True)
    y_full, tau_full, ok_full = cayley_curvilinear_step(G, R, lowrank=False)
    assert ok_low and ok_full and tau_low == pytest.approx(tau_full, rel=1e-9)
    assert torch.allclose(y_low, y_full, atol=1e-6)
    eye = torch.eye(c, dtype=torch.float64)
    assert (y_low @ y_low.T - eye).abs().max() < 1e-12
    assert float((G * y_low).sum()) < float((G * R).sum())


@pytest.mark.parametrize("rot_dtype,tol", [("float32", 1e-4), ("float64", 1e-10)])
def test_lowrank_rotation_updates_stay_orthogonal(rot_dtype: str, tol: float) -> None:
    c, k = 48, 3
    cw = ConceptWhitening2d(c, rot_dtype=rot_dtype)
    for i in range(100):
        cw.sum_G.copy_(_concept_gradient(c, k, seed=i).float())
        cw.counter.fill_(1.0)
        cw.update_rotation_matrix()
    assert cw.rotation_orthogonality_error() < tol
    assert not torch.allclose(cw.running_rot.double(), torch.eye(c, dtype=torch.float64), atol=1e-2)


# -- the benchmark's reference layer ---------------------------------------------------------------------
def test_benchmark_reference_iternorm_rotation_matches_the_layer() -> None:
    from benchmarks.throughput import ReferenceIterNormRotation

    c = 8
    x = (torch.randn(4, c, 3, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
    rot = _random_rotation(c, 11)
    ours = ConceptWhitening2d(c, dtype=torch.float64, rot_dtype="float64").train()
    ref = ReferenceIterNormRotation(c).double().train()
    ours.running_rot.copy_(rot)
    ref.running_rot.copy_(rot[None])
    weights = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).reshape(x.shape)
    z_ours = ours(x)
    (g_ours,) = torch.autograd.grad((z_ours * weights).sum(), x)
    z_ref = ref(x)
    (g_ref,) = torch.autograd.grad((z_ref * weights).sum(), x)
    assert torch.allclose(z_ref, z_ours, atol=1e-10)
    assert torch.allclose(g_ref, g_ours, atol=1e-9)
    assert torch.allclose(ref.running_wm[0], ours.running_wm, atol=1e-10)
    ours.eval()
    ref.eval()
    assert torch.allclose(ref(x), ours(x), atol=1e-10)
    assert math.isfinite(float(g_ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_running_matrix_recurrence_equals_eigh_and_exact(dtype: torch.dtype) -> None:
    """The GPU route for the running W of a rank-deficient batch (divided-difference recurrence, products
    only, float64 inside) equals the CPU route (eigh) and the exact p_T(Sigma_N) / sqrt(tr)."""
    from interpzoo.layers.concept_whitening import _gram_matrix_by_eigh, _gram_matrix_by_recurrence

    x = _rank_deficient_batch(c=48, b=2, hw=4, dtype=torch.float64)  # m = 32 < 48
    xc = _pixels(x)
    xc = xc - xc.mean(1, keepdim=True)
    sigma = xc @ xc.T / xc.shape[1] + 1e-5 * torch.eye(48, dtype=torch.float64)
    exact = _exact_whitening(sigma, 10)
    xc = xc.to(dtype)
    gram = xc.T @ xc
    tr = gram.diagonal().sum() / xc.shape[1] + 48 * 1e-5
    by_rec = _gram_matrix_by_recurrence(xc, gram, tr, 1e-5, 10)
    by_eigh = _gram_matrix_by_eigh(xc, gram, tr, 1e-5, 10)
    assert by_rec.dtype == dtype
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    scale = float(exact.abs().max())
    assert (by_rec.double() - exact).abs().max() < tol * scale
    assert (by_rec.double() - by_eigh.double()).abs().max() < tol * scale


def test_throughput_benchmark_command_writes_the_chosen_rows(tmp_path) -> None:
    """``python benchmarks/throughput.py --quick --methods ...`` as a user types it: the table holds the
    chosen methods' rows, with positive times and ratios, and the command and clock it was run with."""
    import re
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "tp.md"
    cmd = [sys.executable, "benchmarks/throughput.py", "--quick", "--sections", "methods",
           "--methods", "baseline", "softae", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=600, capture_output=True)
    text = out.read_text()
    rows = [r for r in text.splitlines() if r.startswith("| ") and not r.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["baseline", "soft AE"]
    for r in rows:
        ratio = float(re.search(r"\| (\d+\.\d+) \[", r).group(1))
        assert 0.2 < ratio < 5.0, r
    assert "--methods baseline softae" in text and "process CPU time" in text
