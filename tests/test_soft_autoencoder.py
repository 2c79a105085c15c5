"""Soft autoencoder: soft threshold, Haar-shrinkage equivalence, sparsity metrics, training, pipeline, DDP."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from interpzoo.layers.soft_autoencoder import SoftThreshold, haar_filters, soft_threshold
from interpzoo.metrics.soft_autoencoder import (
    CodeStatistics,
    code_sparsity,
    dead_units,
    hoyer_sparsity,
    psnr,
    ssim,
)
from interpzoo.models import create_model, load_pretrained
from interpzoo.models.lit_soft_autoencoder import SoftAutoencoderModule
from interpzoo.models.soft_autoencoder import (
    SoftAutoencoder,
    replace_relu_with_soft_threshold,
    universal_threshold,
    wavelet_shrinkage,
)
from tests.conftest import TINY_DATA

# PartShapes renders its own per-pixel noise; a denoiser needs clean targets.
DENOISE_DATA = [*TINY_DATA, "data.grayscale=true", "data.noise_std=0"]
# A cheap encoder (stride 2 after the first stage) for runs that train several steps on 2 CPU cores.
CHEAP_MODEL = ["model.net.stride=[1,2,2]", "model.net.widths=[8,16,32]"]


@pytest.fixture(autouse=True)
def _one_thread():
    # The 2 cores are shared: with 2 intra-op threads under load small convolutions run ~30x slower
    # (measured), so these tests use one thread and restore the setting afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the soft threshold ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_threshold_equals_relu_difference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, 7, generator=g, dtype=dtype) * 2
    b = torch.rand(1, 5, 1, 1, generator=g, dtype=dtype)
    expected = torch.relu(x - b) - torch.relu(-x - b)
    assert torch.equal(soft_threshold(x, b), expected)
    layer = SoftThreshold(5, param="abs").to(dtype)
    layer.set_threshold(b.flatten())
    assert torch.equal(layer(x), expected)


def test_soft_threshold_zero_band_and_unit_slope() -> None:
    b = 0.3
    x = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    y = soft_threshold(x, b)
    inside = x.abs() <= b
    assert torch.all(y[inside] == 0) and inside.sum() > 500
    assert torch.allclose(y[~inside], x[~inside] - torch.sign(x[~inside]) * b, atol=1e-15)
    slope = (y[1:] - y[:-1]) / (x[1:] - x[:-1])
    outer = (x[1:].abs() > b + 1e-3) & (x[:-1].abs() > b + 1e-3) & (x[1:] * x[:-1] > 0)
    assert torch.allclose(slope[outer], torch.ones_like(slope[outer]), atol=1e-9)


def test_soft_threshold_gradients() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64).requires_grad_()
    layer = SoftThreshold(4, init=0.5, param="abs").double()
    theta = torch.tensor([0.2, -0.5, 0.8, 1.1], dtype=torch.float64)
    with torch.no_grad():
        layer.theta.copy_(theta)  # a negative theta still means b = |theta| = 0.5
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    (layer(x) * w).sum().backward()
    b = theta.abs().view(1, 4, 1, 1)
    on = (x.detach().abs() > b).double()
    # dS/dx = 1[|x| > b]
    assert torch.allclose(x.grad, w * on)
    # dS/db = -sign(x) 1[|x| > b], chained through b = |theta|
    dS_db = (w * -torch.sign(x.detach()) * on).sum(dim=(0, 2, 3))
    assert torch.allclose(layer.theta.grad, dS_db * torch.sign(theta))
    # and against finite differences away from the kinks
    x2 = torch.tensor([-2.0, -0.9, 0.7, 1.5], dtype=torch.float64).view(1, 4).requires_grad_()
    b2 = torch.full((1, 4), 0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(soft_threshold, (x2, b2))


@pytest.mark.parametrize("param", ["abs", "softplus"])
def test_threshold_stays_nonnegative_and_round_trips(param: str) -> None:
    layer = SoftThreshold(6, init=0.2, param=param)
    assert torch.allclose(layer.threshold, torch.full((6,), 0.2), atol=1e-6)
    values = torch.tensor([0.0, 1e-3, 0.1, 1.0, 3.0, 20.0])
    layer.set_threshold(values)
    assert torch.allclose(layer.threshold, values, rtol=1e-5, atol=1e-7) and layer.threshold[0] == 0
    opt = torch.optim.SGD(layer.parameters(), lr=10.0)
    for _ in range(5):  # push every threshold hard towards negative values
        opt.zero_grad()
        layer.threshold.sum().backward()
        opt.step()
        assert torch.all(layer.threshold >= 0) and torch.all(torch.isfinite(layer.threshold))
    with pytest.raises(ValueError, match=">= 0"):
        layer.set_threshold(-0.1)
    with pytest.raises(ValueError, match="num_channels=3"):
        layer(torch.zeros(2, 3, 4, 4))


# -- wavelet equivalence ----------------------------------------------------------------------------------
def _haar_stage(t: float, param: str) -> SoftAutoencoder:
    net = SoftAutoencoder(in_chans=1, widths=[4], kernel_size=2, stride=2, thr_param=param).double()
    with torch.no_grad():
        net.backbone.stages[0].conv.weight.copy_(haar_filters(torch.float64))
        net.decoder[0].weight.copy_(haar_filters(torch.float64))  # D = E^T: the transposed conv, same filters
    net.backbone.stages[0].act.set_threshold(torch.tensor([0.0, t, t, t]))  # LL is not thresholded
    return net


@pytest.mark.parametrize("param", ["abs", "softplus"])
def test_one_stage_with_haar_filters_is_pywavelets_soft_shrinkage(param: str) -> None:
    pywt = pytest.importorskip("pywt")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 16, 12, generator=g, dtype=torch.float64)
    # b = 0: perfect reconstruction (orthonormal analysis, synthesis = adjoint)
    assert torch.allclose(_haar_stage(0.0, param)(x).reconstruction, x, atol=1e-14)
    for t in (0.05, 0.2, 0.7):
        ours = _haar_stage(t, param)(x).reconstruction
        for i in range(x.shape[0]):
            ca, details = pywt.dwt2(x[i, 0].numpy(), "haar", mode="periodization")
            shrunk = tuple(pywt.threshold(d, t, mode="soft") for d in details)
            ref = torch.from_numpy(pywt.idwt2((ca, shrunk), "haar", mode="periodization"))
            assert torch.allclose(ours[i, 0], ref, atol=1e-13), t
    # the multi-level reference denoiser agrees with the one-level stage at level=1
    ref1 = wavelet_shrinkage(x, 0.2, "haar", level=1)
    assert torch.allclose(_haar_stage(0.2, param)(x).reconstruction, ref1, atol=1e-13)


def test_pixel_thresholds_measure_code_noise() -> None:
    net = _haar_stage(0.3, "abs")
    assert torch.allclose(net.pixel_thresholds(), torch.tensor([0.0, 0.3, 0.3, 0.3], dtype=torch.float64))
    # any filters and input std: b_j / ||w_j / s|| is the pixel sigma giving code-noise std b_j
    torch.manual_seed(0)
    net = create_model("softae", in_chans=2, widths=[3], std=[0.5, 0.25], mean=[0.1, 0.2]).double()
    stage = net.backbone.stages[0]
    stage.act.set_threshold(torch.tensor([0.1, 0.2, 0.4]))
    sigma = net.pixel_thresholds()
    noise = torch.randn(64, 2, 40, 40, dtype=torch.float64) * sigma.view(3, 1, 1, 1, 1)
    for j in range(3):
        code_noise = stage.conv(net.normalize(noise[j]) - net.normalize(torch.zeros_like(noise[j])))
        inner = code_noise[:, j, 1:-1, 1:-1].detach()  # the zero-padded border sees fewer noisy pixels
        assert float(inner.std()) == pytest.approx(float(stage.act.threshold[j]), rel=0.02)
    assert create_model("relu_ae").pixel_thresholds() is None


def test_haar_filters_are_orthonormal() -> None:
    w = haar_filters(torch.float64).flatten(1)
    assert torch.allclose(w @ w.T, torch.eye(4, dtype=torch.float64), atol=1e-15)


# -- sparsity and image metrics -----------------------------------------------------------------------------
def test_sparsity_is_non_decreasing_in_threshold() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 6, 6, generator=g)
    values = [code_sparsity(soft_threshold(x, b)) for b in torch.linspace(0, 3, 31).tolist()]
    assert values[0] == 0.0 and values[-1] > 0.99
    assert all(a <= b for a, b in zip(values, values[1:]))
    # through the network: raising every stage's threshold never lowers any stage's sparsity
    net = create_model("softae", in_chans=1, widths=[4, 4])
    img = torch.rand(4, 1, 12, 12, generator=g)
    prev = None
    for b in torch.linspace(0, 1, 6).tolist():
        for stage in net.backbone.stages:
            stage.act.set_threshold(b)
        with torch.no_grad():
            sp = [code_sparsity(z) for z in net(img).codes.values()]
        if prev is not None:
            assert sp[0] >= prev[0]
        prev = sp


def test_code_statistics_match_brute_force_and_merge_like_ddp() -> None:
    g = torch.Generator().manual_seed(4)
    batches = [soft_threshold(torch.randn(5, 3, 4, 4, generator=g), 0.8) for _ in range(4)]
    batches[1][:, 2] = 0.0  # channel 2 silent in one batch only: not dead
    for z in batches:
        z[:, 1] = 0.0  # channel 1 dead everywhere
    batches[2][0] = 0.0  # one all-zero code
    one = CodeStatistics(3)
    for z in batches:
        one.update(z)
    got = one.compute()
    allz = torch.cat(batches)
    assert math.isclose(float(got["code_sparsity"]), code_sparsity(allz), rel_tol=1e-6)
    h = hoyer_sparsity(allz)
    assert math.isclose(float(got["hoyer_sparsity"]), float(h[~h.isnan()].mean()), rel_tol=1e-6)
    assert math.isclose(float(got["all_zero_codes"]), 1 / 20, rel_tol=1e-6)
    assert math.isclose(float(got["dead_units"]), 1 / 3, rel_tol=1e-6)
    assert dead_units(allz) == pytest.approx(1 / 3)
    units = allz.transpose(0, 1).flatten(1)[[0, 2]].double()
    n = units.shape[1]
    h_pop = (math.sqrt(n) - units.abs().sum(1) / units.norm(dim=1)) / (math.sqrt(n) - 1)
    assert math.isclose(float(got["hoyer_population"]), float(h_pop.mean()), rel_tol=1e-5)
    # two "ranks" with half the batches each, states summed as the DDP all-reduce does
    ranks = [CodeStatistics(3), CodeStatistics(3)]
    for i, z in enumerate(batches):
        ranks[i % 2].update(z)
    merged = CodeStatistics(3)
    for name in merged._defaults:
        setattr(merged, name, getattr(ranks[0], name) + getattr(ranks[1], name))
    merged._update_count = 1
    for key, value in merged.compute().items():
        assert torch.allclose(value, got[key]), key


def test_hoyer_extremes() -> None:
    one_hot = torch.zeros(1, 16)
    one_hot[0, 3] = -2.0
    flat = torch.full((1, 16), 0.7)
    h = hoyer_sparsity(torch.cat([one_hot, flat, torch.zeros(1, 16)]))
    assert torch.allclose(h[:2], torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12) and h[2].isnan()


def _ssim_reference(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """SSIM written out (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03.

    torchmetrics reflect-pads the image by 5 pixels and averages the SSIM map over the full image,
    so the reference does the same.
    """
    import torch.nn.functional as F

    c = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(c**2) / (2 * 1.5**2))
    w = torch.outer(g, g)[None, None] / g.sum() ** 2
    x, y = (F.pad(t.double(), (5, 5, 5, 5), mode="reflect") for t in (x, y))
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx, syy, sxy = F.conv2d(x * x, w) - mx**2, F.conv2d(y * y, w) - my**2, F.conv2d(x * y, w) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(ssim_map.mean())


def test_psnr_ssim_sanity() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.rand(4, 1, 32, 32, generator=g)
    assert math.isinf(float(psnr(x, x)))
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    assert abs(float(psnr(noisy, x)) - 20.0) < 0.2  # 10 log10(1 / 0.1^2)
    assert abs(float(ssim(x, x)) - 1.0) < 1e-6
    assert float(ssim(noisy.clamp(0, 1), x)) == pytest.approx(_ssim_reference(noisy.clamp(0, 1), x), abs=1e-5)
    assert float(ssim((x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1), x)) < float(
        ssim(noisy.clamp(0, 1), x)
    )
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


# -- architecture ----------------------------------------------------------------------------------------------
def test_matched_models_and_shapes() -> None:
    soft, relu = create_model("softae", in_chans=3), create_model("relu_ae", in_chans=3)
    assert sum(p.numel() for p in soft.parameters()) == sum(p.numel() for p in relu.parameters())
    assert not any(isinstance(m, nn.ReLU) for m in soft.modules())
    assert not any(isinstance(m, SoftThreshold) for m in relu.modules()) and relu.thresholds() == {}
    wav = create_model("softae_wavelet", in_chans=1, skip=True)
    out = wav(torch.rand(2, 1, 33, 30))  # odd sizes survive the stride-2 pyramid
    assert out.reconstruction.shape == (2, 1, 33, 30)
    assert [tuple(z.shape[-2:]) for z in out.codes.values()] == [
        (20, 16),
        (10, 8),
        (5, 4),
    ]  # padded to 40 x 32
    with pytest.raises(ValueError, match="expected 1 input channels"):
        wav(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="one value per stage"):
        create_model("softae", stride=[1, 2])
    with pytest.raises(ValueError, match="activation must be one of"):
        create_model("softae", activation="tanh")


def test_skip_with_zero_decoder_is_identity() -> None:
    net = create_model("softae", in_chans=1, widths=[4, 4], skip=True, mean=[0.4], std=[0.2])
    for dec in net.decoder:
        nn.init.zeros_(dec.weight)
    x = torch.rand(2, 1, 10, 10)
    assert torch.allclose(net(x).reconstruction, x, atol=1e-6)


def test_drop_in_replacement_for_relu() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU())
    reference = nn.Sequential(net[0], nn.Identity(), net[2], nn.Identity())
    x = torch.randn(2, 1, 8, 8)
    names = replace_relu_with_soft_threshold(net, x[:1], init=0.0)
    assert names == ["1", "3"] and [net[1].num_channels, net[3].num_channels] == [6, 5]
    assert torch.allclose(net(x), reference(x))  # S_0 is the identity
    # a real backbone (torchvision BasicBlocks reuse one ReLU at a single width)
    trunk = create_model("baseline_resnet18s", num_classes=3, in_chans=1).backbone
    replaced = replace_relu_with_soft_threshold(trunk, torch.rand(1, 1, 16, 16))
    assert replaced and not any(isinstance(m, nn.ReLU) for m in trunk.modules())
    assert trunk(torch.rand(2, 1, 16, 16)).shape[1] == trunk.out_channels
    shared = nn.ReLU()
    bad = nn.Sequential(nn.Conv2d(1, 2, 1), shared, nn.Conv2d(2, 3, 1), shared)
    with pytest.raises(ValueError, match="ran on \\[2, 3\\] channels"):
        replace_relu_with_soft_threshold(bad, torch.rand(1, 1, 4, 4))


def test_wavelet_baseline_denoises() -> None:
    pytest.importorskip("pywt")
    x = torch.zeros(4, 1, 32, 32)
    x[:, :, 8:24, 4:20] = 0.8  # piecewise constant: Haar's best case
    sigma = 25 / 255
    noisy = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    den = wavelet_shrinkage(noisy, universal_threshold(sigma, 32 * 32), "haar")
    assert float(psnr(den, x)) > float(psnr(noisy, x)) + 5


# -- training --------------------------------------------------------------------------------------------------
def test_training_reduces_denoising_error() -> None:
    from interpzoo.datamodules.digits import load_digits_images

    torch.manual_seed(0)
    images, _ = load_digits_images((16, 16))
    train, test = images[:128], images[128:192]
    sigma = 50 / 255
    net = create_model("softae", in_chans=1, widths=[8, 16], mean=[0.3], std=[0.35])
    noisy_test = test + sigma * torch.randn(test.shape, generator=torch.Generator().manual_seed(7))

    def test_mse() -> float:
        with torch.no_grad():
            return float(((net(noisy_test).reconstruction.clamp(0, 1) - test) ** 2).mean())

    before = test_mse()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(120):
        x = train[(step * 32) % 128 :][:32]
        loss = ((net(x + sigma * torch.randn_like(x)).reconstruction - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = test_mse()
    noisy_mse = float(((noisy_test - test) ** 2).mean())
    assert after < 0.5 * before and after < 0.5 * noisy_mse, (before, after, noisy_mse)


def test_module_rejects_bad_noise_and_non_autoencoders() -> None:
    with pytest.raises(ValueError, match="0..255 units"):
        SoftAutoencoderModule(noise_std=25, data_info={"in_chans": 1})
    with pytest.raises(TypeError, match="code_channels"):
        SoftAutoencoderModule(net={"name": "baseline_mlp", "num_classes": 2, "num_features": 3})


def test_evaluation_noise_is_seeded_per_sample() -> None:
    module = SoftAutoencoderModule(data_info={"in_chans": 1}, noise_std=0.1, clip_noisy=True)
    x = torch.rand(4, 1, 8, 8)
    a = module.add_noise(x, torch.arange(4), "val")
    b = module.add_noise(x[[2, 3]], torch.tensor([2, 3]), "test")
    assert torch.equal(a[2:], b)  # same sample index, same noise, whatever the batch
    assert a.min() >= 0 and a.max() <= 1


# -- pipeline --------------------------------------------------------------------------------------------------
def test_fast_dev_run_softae(make_cfg) -> None:
    from interpzoo.run import train

    metrics = train(make_cfg(["model=softae", "debug=fdr", *DENOISE_DATA]))
    for key in (
        "test/psnr",
        "test/ssim",
        "test/psnr_noisy",
        "test/code_sparsity/stage1",
        "test/hoyer_sparsity/stage3",
        "test/dead_units/stage2",
        "test/threshold_mean/stage1",
        "test/threshold_pixel/stage1",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key


def test_fast_dev_run_relu_ae_digits(make_cfg) -> None:
    from interpzoo.run import train

    metrics = train(make_cfg(["model=relu_ae", "data=digits", "debug=fdr", "data.batch_size=32"]))
    assert "test/psnr" in metrics and "test/code_sparsity/stage3" in metrics
    assert not any(k.startswith("test/threshold_mean") for k in metrics)


def test_fast_dev_run_rgb_image_folder(make_cfg, tmp_path) -> None:
    from interpzoo.datamodules.testing import make_fake_image_folder
    from interpzoo.run import train

    root = make_fake_image_folder(tmp_path / "images", n_per_class=4)
    metrics = train(
        make_cfg(
            [
                "model=softae",
                "data=imagefolder",
                f"data.root={root}",
                "data.image_size=24",
                "data.num_workers=0",
                "data.batch_size=4",
                "debug=fdr",
            ]
        )
    )
    assert math.isfinite(metrics["test/psnr"]) and "test/threshold_pixel/stage1" in metrics


def test_short_run_learns_and_writes_report(make_cfg, tmp_path) -> None:
    from interpzoo.run import train

    cfg = make_cfg(
        [
            "model=softae",
            "logger=none",
            "callbacks=none",
            "trainer.max_epochs=3",
            *CHEAP_MODEL,
            "model.optimizer.lr=0.003",
            *DENOISE_DATA,
            "data.n_train=256",
            "data.batch_size=16",
        ]
    )
    metrics = train(cfg)
    assert metrics["test/psnr"] > metrics["test/psnr_noisy"] + 3, metrics
    assert 0 < metrics["test/code_sparsity/stage3"] < 1
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures == ["denoising_examples.png", "first_layer_filters.png", "thresholds.png"]
    net = load_pretrained(tmp_path / "bundle")
    assert isinstance(net, SoftAutoencoder) and net.thresholds()


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_sim_matches_single_process_evaluation(make_cfg, tmp_path) -> None:
    from interpzoo.run import evaluate, train

    common = ["model=softae", *CHEAP_MODEL, *DENOISE_DATA]
    ddp = train(
        make_cfg(
            [
                *common,
                "trainer=ddp_sim",
                "trainer.max_epochs=1",
                "test=false",
                "report=false",
                "export=false",
                "logger=none",
                "callbacks=model_checkpoint",
            ]
        )
    )
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["noise_std"] == pytest.approx(25 / 255)
    # validation ran after the last training step, so the checkpoint holds the weights it measured
    single = evaluate(
        make_cfg(["logger=none", f"ckpt_path={ckpt}", "split=val", *DENOISE_DATA], config_name="eval")
    )
    # index-seeded noise + sum-reduced metric states: 2 ranks and 1 process see the same images
    for key in (
        "val/psnr",
        "val/psnr_noisy",
        "val/ssim",
        "val/code_sparsity/stage1",
        "val/hoyer_sparsity/stage2",
        "val/dead_units/stage3",
        "val/threshold_pixel/stage1",
    ):
        assert ddp[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), key
