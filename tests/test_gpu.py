"""GPU paths (bf16 autocast, channels_last, ``torch.compile``): skipped without a CUDA device.

Each test compares the GPU result with an independent CPU computation: a network trained on the GPU in
bf16 + channels_last must give the CPU's fp32 logits after export; the interpretable layers' sensitive
maths (whitening, prototype distances, the ICNN filter loss) must stay float32 under autocast and agree
with float64 on the CPU; a compiled network must give the eager logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from interpzoo.run import train
from tests.conftest import ROOT, TINY_DATA

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

_SKIP = {"senn_backbone", "baseline_mlp"}  # tabular / backbone-only configs


def _image_models() -> list[str]:
    """Every image model config, aliases (a file that only points at another config) left out."""
    out = []
    for p in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        text = p.read_text()
        if p.stem in _SKIP or "# model=" in text.splitlines()[0]:
            continue
        out.append(p.stem)
    return out


IMAGE_MODELS = _image_models()


def _gpu_cfg(make_cfg, overrides: list[str]):
    cfg = make_cfg(["trainer=gpu", "trainer.max_epochs=1", "report=false", "~callbacks.scorecard", *TINY_DATA,
                    *overrides])  # fmt: skip
    cfg.trainer.accelerator = "gpu"
    return cfg


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_bf16_channels_last_fit_matches_cpu(make_cfg, model: str) -> None:
    """Train on the GPU (bf16-mixed, channels_last), export, and compare GPU and CPU fp32 logits."""
    from interpzoo import load_pretrained

    assert len(IMAGE_MODELS) >= 5, IMAGE_MODELS
    cfg = _gpu_cfg(make_cfg, [f"model={model}", "model.channels_last=true"])
    metrics = train(cfg)
    assert metrics and all(v == v for v in metrics.values()), metrics  # no NaN anywhere
    bundle = Path(cfg.paths.output_dir) / "bundle"
    net_cpu = load_pretrained(bundle).float()
    net_gpu = load_pretrained(bundle, map_location="cuda").float()
    size = net_cpu.data_config["image_size"]
    x = torch.rand(4, net_cpu.data_config["in_chans"], *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_cpu = net_cpu(x)
        out_gpu = net_gpu(x.cuda().contiguous(memory_format=torch.channels_last))
    key = "reconstruction" if hasattr(out_cpu, "reconstruction") else "logits"
    a, b = getattr(out_cpu, key), getattr(out_gpu, key).cpu()
    assert a.shape == b.shape
    torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)


def test_compiled_network_matches_eager(make_cfg) -> None:
    """``model.compile=true`` trains, and the compiled network's logits equal the eager ones."""
    from interpzoo import create_model

    metrics = train(_gpu_cfg(make_cfg, ["model.compile=true"]))
    assert 0.0 <= metrics["test/acc"] <= 1.0
    net = create_model("baseline_resnet18s", num_classes=10).cuda().eval()
    x = torch.rand(8, 3, 32, 32, device="cuda")
    with torch.no_grad():
        eager = net(x).logits
        compiled = torch.compile(net)(x).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


def test_concept_whitening_under_autocast_is_float32_and_white() -> None:
    """Under bf16 autocast the whitening runs in float32: the whitened covariance is I and the output
    equals the float64 CPU layer's (Chen et al. 2020, Eq. 2; Huang et al. 2019, Alg. 1)."""
    from interpzoo.layers.concept_whitening import ConceptWhitening2d

    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    mix = q * torch.linspace(0.7, 1.4, 32)  # condition number 4: T=10 converges
    x = torch.einsum("dc,bchw->bdhw", mix, torch.randn(64, 32, 8, 8, generator=g)) + 0.5
    cpu = ConceptWhitening2d(32, T=10).double().train()
    gpu = ConceptWhitening2d(32, T=10).cuda().train()
    with torch.no_grad():
        ref = cpu(x.double())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu(x.cuda().contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.float32
    z = out.permute(1, 0, 2, 3).reshape(32, -1).double().cpu()
    cov = torch.cov(z)
    assert (cov - torch.eye(32, dtype=torch.float64)).abs().max() < 0.05
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-3, atol=1e-3)
    assert gpu.fallback_count == 0


@pytest.mark.parametrize("shape", [(8, 32, 6, 6), (4, 64, 3, 3)])  # m = 288 >= C; m = 36 < C (Gram route)
def test_concept_whitening_gpu_routes_match_cpu_float64(shape: tuple[int, int, int, int]) -> None:
    """The GPU routes (autograd through the products instead of ``eigh``; the running W of a Gram batch
    by the divided-difference recurrence) give the float64 CPU layer's output, input gradient and running W."""
    from interpzoo.layers.concept_whitening import ConceptWhitening2d

    b, c, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * torch.linspace(0.5, 2, c)[None, :, None, None] + 0.3
    weight = torch.randn(*shape, generator=g)
    cpu = ConceptWhitening2d(c, momentum=1.0).double().train()
    gpu = ConceptWhitening2d(c, momentum=1.0).cuda().train()
    assert gpu.use_gram(b * h * w) == cpu.use_gram(b * h * w) == (b * h * w < c)
    x64 = x.double().requires_grad_()
    (cpu(x64) * weight.double()).sum().backward()
    xg = x.cuda().requires_grad_()
    out = gpu(xg)
    (out * weight.cuda()).sum().backward()
    torch.testing.assert_close(out.double().cpu(), cpu(x.double()).detach(), rtol=1e-3, atol=5e-3)
    torch.testing.assert_close(xg.grad.double().cpu(), x64.grad, rtol=1e-3, atol=5e-3)
    torch.testing.assert_close(gpu.running_wm.double().cpu(), cpu.running_wm, rtol=1e-3, atol=1e-3)


def test_prototype_distances_under_autocast_equal_cdist() -> None:
    """ProtoPNet's patch distances (Chen et al. 2019, Eq. 1 input) stay float32 under autocast and equal a
    float64 brute-force ``cdist`` over every latent cell."""
    from interpzoo.layers.protopnet import squared_l2_distances

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 128, 7, 7, generator=g) * 3 + 5
    p = torch.randn(20, 128, 1, 1, generator=g) * 3 + 5
    with torch.autocast("cuda", dtype=torch.bfloat16):
        d = squared_l2_distances(z.cuda().contiguous(memory_format=torch.channels_last), p.cuda())
    assert d.dtype == torch.float32
    flat = z.double().permute(0, 2, 3, 1).reshape(-1, 128)
    ref = torch.cdist(flat, p.double().flatten(1)) ** 2  # (B*H*W, P)
    ref = ref.reshape(4, 7, 7, 20).permute(0, 3, 1, 2)
    torch.testing.assert_close(d.double().cpu(), ref, rtol=1e-4, atol=1e-2)


def test_benchmark_gpu_path_writes_table(tmp_path: Path) -> None:
    """``benchmarks/throughput.py --device cuda`` (CUDA events, bf16, channels_last) writes its table."""
    import subprocess
    import sys

    out = tmp_path / "gpu.md"
    cmd = [sys.executable, "benchmarks/throughput.py", "--device", "cuda", "--quick", "--sections", "layer",
           "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=600)
    text = out.read_text()
    assert "CUDA events" in text and "precision bf16" in text and "channels_last True" in text
    assert text.count("| (") == 4  # one row per layer shape
