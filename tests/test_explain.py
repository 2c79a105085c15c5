"""One explain API for every zoo model (issue 8) and Captum interop (models.explain, models.captum_adapter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.figure import Figure

from interpzoo.models import create_model, list_models, registry
from interpzoo.models.captum_adapter import as_logits_module, default_gradcam_layer, gradcam_layer
from interpzoo.models.explain import (
    ClassifierExplanation,
    ConceptWhiteningExplanation,
    Explanation,
    ICNNExplanation,
    SENNExplanation,
    SoftAEExplanation,
    explain,
)
from interpzoo.models.protopnet import ProtoPNetExplanation, PrototypeExplanation

BB = {"name": "resnet18s", "width": 8}
K = 4
CONCEPTS = ["red", "round", "striped"]
IMAGE_MODELS = ("baseline", "protopnet", "cw", "icnn", "senn", "softae")


def _build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "baseline":
        net = create_model("baseline_resnet18s", num_classes=K, backbone=BB)
    elif kind == "protopnet":
        net = create_model(
            "protopnet_resnet18s", num_classes=K, backbone=BB, prototypes_per_class=2, prototype_dim=8
        )
    elif kind == "cw":
        net = create_model("cw_resnet18s", num_classes=K, backbone=BB, concepts=CONCEPTS)
    elif kind == "icnn":
        net = create_model("icnn_resnet18s", num_classes=K, backbone=BB)
    elif kind == "senn":
        net = create_model("senn", num_classes=K)
    else:
        net = create_model("softae", widths=(4, 8))
        with torch.no_grad():  # thresholds large enough that the codes have exact zeros
            for stage in net.backbone.stages:
                stage.act.threshold.fill_(0.3)
    return net.eval()


@pytest.fixture(scope="module")
def nets() -> dict[str, torch.nn.Module]:
    return {k: _build(k) for k in IMAGE_MODELS}


def _input(kind: str, b: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, 1 if kind == "softae" else 3, 32, 32, generator=g)


def _hooked(module: torch.nn.Module, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    # a copy: an in-place ReLU may follow the module (torchvision BasicBlock after bn1)
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            net(x)
    finally:
        handle.remove()
    return seen[-1]


def _check_plot(ex: Explanation, tmp_path: Path, name: str, **kw: Any) -> None:
    fig = ex.plot(**kw)
    assert isinstance(fig, Figure) and fig.axes
    path = tmp_path / f"{name}.png"
    ex.plot(path=path, **kw)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- typed explanations ------------------------------------------------------------------------
def test_baseline_explanation(nets: dict, tmp_path: Path) -> None:
    net, x = nets["baseline"], _input("baseline")
    ex = net.explain(x)
    assert isinstance(ex, ClassifierExplanation) and isinstance(ex, Explanation)
    logits = net(x).logits
    torch.testing.assert_close(ex.logits, logits)
    torch.testing.assert_close(ex.probabilities.sum(1), torch.ones(3))
    torch.testing.assert_close(ex.probabilities, torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True))
    assert torch.equal(ex.prediction, logits.argmax(1))
    assert set(ex.as_dict()) == {"logits", "probabilities", "prediction", "class_names"}
    _check_plot(ex, tmp_path, "baseline", index=2)
    with pytest.raises(IndexError, match="out of range"):
        ex.plot(index=3)


def test_protopnet_explanation_is_typed(nets: dict, tmp_path: Path) -> None:
    net, x = nets["protopnet"], _input("protopnet")
    exs = net.explain(x, top_k=3)
    assert isinstance(exs, ProtoPNetExplanation) and isinstance(exs, Explanation)
    assert len(exs) == 3 and all(
        isinstance(e, PrototypeExplanation) and isinstance(e, Explanation) for e in exs
    )
    assert exs[-1] is exs[2] and [e.target for e in exs] == exs.prediction.tolist()
    torch.testing.assert_close(exs.images, x)
    torch.testing.assert_close(exs.logits, net(x).logits)
    tail = exs[1:]
    assert isinstance(tail, ProtoPNetExplanation) and len(tail) == 2 and tail[0] is exs[1]
    torch.testing.assert_close(tail.images, x[1:])
    with pytest.raises(IndexError, match="out of range"):
        exs[3]
    sims = net(x).similarities
    for i, e in enumerate(exs):
        torch.testing.assert_close(
            e.contributions, net.last_layer.weight[e.target, e.prototypes] * sims[i, e.prototypes]
        )
        assert e.boxes.shape == (3, 4) and "contributions" in e.as_dict()
    _check_plot(exs[0], tmp_path, "protopnet_bars")
    _check_plot(exs[1], tmp_path, "protopnet_boxes", image=x[1])
    # the batch draws image `index` with the boxes of its top prototypes, or their contributions
    _check_plot(exs, tmp_path, "protopnet_batch", index=2)
    fig = exs.plot(index=1)
    assert len(fig.axes[0].images) == 1 and len(fig.axes[0].patches) == 3
    assert fig.axes[0].get_title() == f"class {exs[1].target}: logit {exs[1].logit:.3g}"
    fig = exs.plot(index=1, image=False)
    assert not fig.axes[0].images and len(fig.axes[0].patches) == 3  # three bars
    with pytest.raises(IndexError, match="out of range"):
        exs.plot(index=3)


def test_senn_explanation_typed_and_dict_compatible(nets: dict, tmp_path: Path) -> None:
    net, x = nets["senn"], _input("senn")
    ex = explain(net, x)
    assert isinstance(ex, SENNExplanation)
    out = net(x)
    assert ex["relevances"] is ex.relevances and ex.relevances.shape == (3, 5, K)
    assert ex.concepts.shape == (3, 5) and len(ex.concept_names) == 5
    # contributions sum to the predicted logit (Eq. 3 with the sum aggregator)
    torch.testing.assert_close(ex.contributions.sum(1), out.logits.gather(1, ex.prediction[:, None])[:, 0])
    with pytest.raises(KeyError, match="SENN explanations have"):
        ex["logits"]
    _check_plot(ex, tmp_path, "senn")


def test_cw_explanation_matches_hooked_whitened_layer(nets: dict, tmp_path: Path) -> None:
    net, x = nets["cw"], _input("cw")
    ex = net.explain(x)
    assert isinstance(ex, ConceptWhiteningExplanation)
    z = _hooked(net.cw_layer, net, x)  # (B, C, 8, 8) at 32 px
    assert ex.axis_maps.shape == (3, len(CONCEPTS), *z.shape[2:])
    torch.testing.assert_close(ex.axis_maps, z[:, : len(CONCEPTS)])
    # pool_max by brute force: max over each 3x3 / stride-3 block (the last ones narrower: the whole map
    # counts), then the mean over blocks
    h, w = z.shape[2:]
    expect = torch.zeros(3, len(CONCEPTS))
    for b in range(3):
        for c in range(len(CONCEPTS)):
            windows = [z[b, c, r : r + 3, s : s + 3].max() for r in range(0, h, 3) for s in range(0, w, 3)]
            expect[b, c] = torch.stack(windows).mean()
    assert ex.activation_mode == "pool_max"
    torch.testing.assert_close(ex.concept_activations, expect)
    assert list(ex.by_concept(1)) == CONCEPTS and ex.by_concept(1)["round"] == pytest.approx(
        float(expect[1, 1])
    )
    assert net.training is False
    _check_plot(ex, tmp_path, "cw", index=1)


def test_cw_explain_keeps_training_mode_and_statistics() -> None:
    net = _build("cw").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.explain(_input("cw", b=1))  # one image: only possible in eval mode
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_icnn_positions_are_argmax_times_stride(nets: dict, tmp_path: Path) -> None:
    net, x = nets["icnn"], _input("icnn")
    ex = net.explain(x)
    assert isinstance(ex, ICNNExplanation) and ex.layer == "icnn1"
    with torch.no_grad():
        maps = net(x).part_features["icnn1"]
    torch.testing.assert_close(ex.activation_maps, maps)
    b, c, h, w = maps.shape
    assert ex.stride == (32 / h, 32 / w) and ex.positions.shape == (b, c, 2)
    for i in range(b):
        for f in range(c):
            r, s = divmod(int(maps[i, f].argmax()), w)
            assert ex.positions[i, f].tolist() == [(s + 0.5) * 32 / w, (r + 0.5) * 32 / h]
            assert float(ex.scores[i, f]) == float(maps[i, f].max())
    assert torch.equal(ex.filter_classes, net.assignments["icnn1"].filter_class)
    with pytest.raises(ValueError, match="unknown interpretable layer"):
        net.explain(x, layer="icnn9")
    _check_plot(ex, tmp_path, "icnn", top_k=3)


def test_softae_sparsity_is_fraction_of_exact_zeros(nets: dict, tmp_path: Path) -> None:
    net, x = nets["softae"], _input("softae")
    ex = net.explain(x)
    assert isinstance(ex, SoftAEExplanation)
    assert list(ex.codes) == ["stage1", "stage2"] and set(ex.thresholds) == {"stage1", "stage2"}
    for k, stage in enumerate(net.backbone.stages):
        code = _hooked(stage, net, x)
        torch.testing.assert_close(ex.codes[f"stage{k + 1}"], code)
        zeros = torch.tensor([float((code[i] == 0).sum()) / code[i].numel() for i in range(3)])
        torch.testing.assert_close(ex.sparsity[f"stage{k + 1}"], zeros)
    assert 0 < float(ex.sparsity["stage1"].mean()) < 1  # the check above is not vacuous
    err = ((net(x).reconstruction - x) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(ex.reconstruction_error, err)
    _check_plot(ex, tmp_path, "softae")


def test_explain_helper_rejects_networks_without_explain() -> None:
    with pytest.raises(TypeError, match="has no explain"):
        explain(torch.nn.Linear(2, 2), torch.zeros(1, 2))


# -- net.explain(x).plot() on every network ---------------------------------------------------------
SMALL = {"name": "resnet18s", "width": 8}


def _small_build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A small instance of registered model ``name`` and an input batch of 2 for it."""
    arch, defaults = registry._MODELS[name]
    kwargs: dict[str, Any] = {} if arch == "soft_autoencoder" else {"num_classes": K}
    if "backbone" in defaults:
        kwargs["backbone"] = SMALL
    if arch in ("cw", "cbm"):
        kwargs["concepts"] = CONCEPTS
    if arch == "protopnet":
        kwargs.update(prototypes_per_class=2, prototype_dim=8)
    if name in ("baseline_mlp", "senn_mlp"):
        kwargs["num_features"] = 6
        x = torch.rand(2, 6)
    else:
        x = torch.rand(2, 1 if arch == "soft_autoencoder" else 3, 32, 32)
    torch.manual_seed(0)
    return create_model(name, **kwargs).eval(), x


# one model name per registered network, each on its smallest backbone (every backbone of every method
# is covered by tests/test_model_data_matrix.py; the big torchvision ones take minutes to build here)
EXPLAIN_NAMES = [
    n
    for n in list_models()
    if "backbone" not in registry._MODELS[n][1] or registry._MODELS[n][1]["backbone"]["name"] == "resnet18s"
]


def test_explain_names_cover_every_architecture() -> None:
    assert {registry._MODELS[n][0] for n in EXPLAIN_NAMES} == set(registry.list_architectures())


@pytest.mark.parametrize("name", EXPLAIN_NAMES)
def test_explain_plot_on_every_network(name: str, tmp_path: Path) -> None:
    """`net.explain(x).plot()` as the README writes it: one explanation for the batch, a Figure back."""
    import matplotlib

    backend = matplotlib.get_backend()
    net, x = _small_build(name)
    ex = net.explain(x)
    assert isinstance(ex, Explanation), type(ex)
    fig = ex.plot()
    assert isinstance(fig, Figure) and fig.axes and fig.axes[0].has_data()
    assert fig._repr_png_()[:4] == b"\x89PNG"  # what Jupyter shows for `ex.plot()` whatever the backend
    fig2 = ex.plot(index=1, path=tmp_path / "ex.png")
    assert fig2 is not fig and (tmp_path / "ex.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(IndexError, match="out of range"):
        ex.plot(index=2)
    assert matplotlib.get_backend() == backend


def test_plot_leaves_pyplot_and_the_backend_alone() -> None:
    """A fresh process: plotting an explanation imports no pyplot and selects no backend."""
    code = (
        "import sys, torch, interpzoo\n"
        "net = interpzoo.create_model('protopnet_resnet18s', num_classes=3,"
        " backbone={'name': 'resnet18s', 'width': 8}, prototypes_per_class=1, prototype_dim=8)\n"
        "fig = net.explain(torch.rand(2, 3, 32, 32)).plot(index=1)\n"
        "import matplotlib\n"
        "from matplotlib.figure import Figure\n"
        "print(isinstance(fig, Figure), fig._repr_png_()[:4] == b'\\x89PNG', 'matplotlib.pyplot' in sys.modules,"
        " matplotlib.rcParams['backend'])\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "False", "svg"]


# -- Captum ------------------------------------------------------------------------------------
def test_adapter_outputs_and_layers(nets: dict) -> None:
    x = _input("baseline", b=2)
    f = as_logits_module(nets["baseline"])
    torch.testing.assert_close(f(x), nets["baseline"](x).logits)
    torch.testing.assert_close(
        as_logits_module(nets["baseline"], probabilities=True)(x).sum(1), torch.ones(2)
    )
    assert as_logits_module(f) is f
    xs = _input("softae", b=2)
    assert as_logits_module(nets["softae"])(xs).shape == (2,)
    mean = as_logits_module(nets["softae"], ae_score="mean")(xs)
    torch.testing.assert_close(mean, nets["softae"](xs).reconstruction.mean((1, 2, 3)))
    with pytest.raises(ValueError, match="ae_score"):
        as_logits_module(nets["softae"], ae_score="psnr")
    assert default_gradcam_layer(nets["baseline"]) == "backbone.body.layer4"
    assert default_gradcam_layer(f) == "net.backbone.body.layer4"
    assert default_gradcam_layer(nets["icnn"]) == "backbone.body.layer3.icnn1"
    assert default_gradcam_layer(nets["softae"]) == "backbone.stages.1"
    assert gradcam_layer(f) is nets["baseline"].backbone.body.layer4


@pytest.mark.parametrize("kind", IMAGE_MODELS)
def test_captum_runs_on_every_image_model(nets: dict, kind: str) -> None:
    captum_attr = pytest.importorskip("captum.attr")
    f = as_logits_module(nets[kind]).eval()
    x = _input(kind, b=2)
    target = None if kind == "softae" else 1
    ig = captum_attr.IntegratedGradients(f).attribute(x, target=target, n_steps=8)
    assert ig.shape == x.shape and torch.isfinite(ig).all()
    layer = gradcam_layer(f)
    cam = captum_attr.LayerGradCam(f, layer).attribute(x, target=target)
    act = _hooked(layer, f, x)
    assert cam.shape == (2, 1, *act.shape[2:])
    up = captum_attr.LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")
    assert up.shape == (2, 1, *x.shape[2:]) and torch.isfinite(up).all()


def test_integrated_gradients_completeness_on_baseline(nets: dict) -> None:
    captum_attr = pytest.importorskip("captum.attr")
    f = as_logits_module(nets["baseline"]).eval()
    x = _input("baseline", b=2)
    base = torch.full_like(x, 0.5)
    attr = captum_attr.IntegratedGradients(f).attribute(x, baselines=base, target=2, n_steps=200)
    with torch.no_grad():
        gap = f(x)[:, 2] - f(base)[:, 2]  # F(x) - F(baseline), computed directly
    assert (gap.abs() > 1e-3).all()
    torch.testing.assert_close(attr.sum((1, 2, 3)), gap, rtol=0.05, atol=0.02)
