"""The shared trunk base (models/trunk.py) and the networks' input checks (models/input_checks.py)."""

from __future__ import annotations

import warnings
from functools import cache

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import interpzoo
from interpzoo.models import create_model, list_pretrained, load_pretrained
from interpzoo.models.captum_adapter import as_logits_module, default_gradcam_layer
from interpzoo.models.registry import PRETRAINED_DIR, resolve_model_name
from interpzoo.models.trunk import FeatureInfo, TrunkNet

TRUNK_ARCHITECTURES = ("baseline", "protopnet", "cw", "icnn", "pipnet", "cbm")
SMALL_BACKBONE = {"name": "resnet18s", "width": 8}  # stride 8: minimum image 8x8
TABULAR_ONLY = ("baseline_mlp",)  # needs num_features; senn_mlp without it is an image SENN
IMAGE_MODELS = [n for n in interpzoo.list_models() if n not in TABULAR_ONLY]


@cache
def _small(name: str) -> nn.Module:
    """``create_model(name)`` on the small resnet18s trunk (where it has one), 3 classes, eval mode."""
    arch, defaults = resolve_model_name(name)
    kwargs: dict = {} if arch == "soft_autoencoder" else {"num_classes": 3}
    if "backbone" in defaults:
        kwargs["backbone"] = SMALL_BACKBONE
    if arch == "cw":  # the registered paper layer indices belong to the named backbone
        kwargs.update(whitened_layers=["layer3.0.bn1"], concepts=["red", "round", "striped"])
    if arch == "cbm":  # a bottleneck is built for its concepts
        kwargs.update(concepts=["red", "round", "striped"])
    torch.manual_seed(0)
    return create_model(name, **kwargs).eval()


def _image(net: nn.Module, b: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    size = tuple(getattr(net, "input_shape", (net.in_chans, 32, 32))[1:])
    return torch.rand(b, net.in_chans, *size, generator=g)


# -- the base ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in IMAGE_MODELS if resolve_model_name(n)[0] in TRUNK_ARCHITECTURES])
def test_every_trunk_architecture_is_a_trunknet(name: str) -> None:
    net = _small(name)
    assert isinstance(net, TrunkNet)
    assert isinstance(net.normalize, nn.Module) and net.backbone.name == "resnet18s"
    assert net.num_classes == 3 and net.in_chans == 3
    r = 4 if resolve_model_name(name)[0] == "pipnet" else 8  # PIP-Net cuts resnet18s at layer3 (stride 4)
    assert net.feature_info == FeatureInfo(channels=net.backbone.out_channels, reduction=r, module="backbone")
    x = _image(net)
    feats = net.features(x)
    assert feats.shape == (2, net.feature_info.channels, 32 // r, 32 // r)
    assert default_gradcam_layer(net) == net.gradcam_layer
    net.get_submodule(net.gradcam_layer)  # names a real module


def test_only_trunk_architectures_are_trunknets() -> None:
    assert set(TRUNK_ARCHITECTURES) <= set(interpzoo.list_architectures())
    for name in IMAGE_MODELS:
        arch = resolve_model_name(name)[0]
        assert isinstance(_small(name), TrunkNet) == (arch in TRUNK_ARCHITECTURES), name


def test_gradcam_layer_and_feature_info_of_real_backbones() -> None:
    vgg = create_model("baseline_vgg11_bn", num_classes=3)
    assert vgg.gradcam_layer == "backbone.body.28" and isinstance(
        vgg.get_submodule(vgg.gradcam_layer), nn.MaxPool2d
    )
    assert vgg.feature_info == FeatureInfo(512, 32, "backbone") and vgg.min_input_size == (32, 32)
    icnn = _small("icnn_resnet18s")
    assert icnn.gradcam_layer == "backbone.body.layer3.icnn1"
    assert default_gradcam_layer(as_logits_module(icnn)) == "net.backbone.body.layer3.icnn1"
    proto = create_model("protopnet_resnet18s", num_classes=3, backbone=SMALL_BACKBONE, prototype_hw=[2, 2])
    assert proto.min_input_size == (16, 16)  # a 2x2 prototype needs a 2x2 latent grid


@pytest.mark.parametrize("name", list_pretrained())
def test_shipped_bundle_state_dict_keys_unchanged(name: str) -> None:
    stored = load_file(str(PRETRAINED_DIR / name / "model.safetensors"))
    net = load_pretrained(name)  # strict load
    assert set(net.state_dict()) == set(stored)
    net.load_state_dict(stored, strict=True)
    if isinstance(net, TrunkNet):
        assert any(k.startswith("normalize.") for k in stored)
        assert any(k.startswith("backbone.body.") for k in stored)


# -- bad input -------------------------------------------------------------------------------------
def _bad_inputs(net: nn.Module) -> dict[str, tuple[torch.Tensor, str]]:
    x = _image(net)
    c = net.in_chans
    nan, inf = x.clone(), x.clone()
    nan[0, 0, :3, 0] = float("nan")
    inf[1, 0, 0, :2] = float("inf")
    if isinstance(net, TrunkNet):
        s = net.min_input_size[0]  # the trunk's stride: 8 at resnet18s layer4, 4 at layer3 (PIP-Net)
        tiny = f"2x2 pixels is smaller than the minimum {s}x{s} for the resnet18s trunk"
    else:  # SENN is built for one image size
        tiny = r"expected images \(B, 3, 32, 32\)"
    return {
        "uint8": ((x * 255).to(torch.uint8), r"convert with x\.float\(\) / 255"),
        "0-255 floats": (x * 255, "looks like 0–255; divide by 255"),
        "NaN": (nan, "has 3 NaN and 0 infinite values"),
        "Inf": (inf, "has 0 NaN and 2 infinite values"),
        "2x2": (x[:, :, :2, :2], tiny),
        "wrong channels": (torch.rand(2, c + 1, 32, 32), f"expected {c} input channels"),
        "channels-last": (x.permute(0, 2, 3, 1), "channels-last"),
        "3-D": (x[0], "add a batch dimension"),
    }


CASES = ["uint8", "0-255 floats", "NaN", "Inf", "2x2", "wrong channels", "channels-last", "3-D"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_bad_image_input_is_refused(name: str, case: str) -> None:
    net = _small(name)
    if case == "2x2" and resolve_model_name(name)[0] == "soft_autoencoder":
        pytest.skip("the autoencoder takes any image size (it pads to its stride)")
    x, msg = _bad_inputs(net)[case]
    with pytest.raises(ValueError, match=msg):
        net(x)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_explain_of_a_nan_image_raises_the_same_error(name: str) -> None:
    net = _small(name)
    x, msg = _bad_inputs(net)["NaN"]
    with pytest.raises(ValueError, match=msg):
        net.explain(x)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_valid_image_with_small_noise_passes(name: str) -> None:
    net = _small(name)
    x = _image(net)
    g = torch.Generator().manual_seed(1)
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)  # Gaussian noise: values a bit outside [0, 1]
    assert noisy.min() < 0 and noisy.max() > 1
    with torch.no_grad():
        out = net(noisy)
        edge = net(torch.cat([torch.zeros_like(x[:1]), torch.ones_like(x[:1])]))  # exactly 0 and 1
    for o in (out, edge):
        t = o.logits if hasattr(o, "logits") else o.reconstruction
        assert torch.isfinite(t).all()


def test_autoencoder_takes_noisy_inputs_but_not_0_255() -> None:
    net = _small("softae")
    x = _image(net)
    g = torch.Generator().manual_seed(2)
    very_noisy = x + 0.5 * torch.randn(x.shape, generator=g)  # far outside [0, 1], a denoising input
    assert very_noisy.max() > 2
    assert torch.isfinite(net(very_noisy).reconstruction).all()
    with pytest.raises(ValueError, match="divide by 255"):
        net(x * 255)


def test_classifier_refuses_already_normalised_images() -> None:
    net = _small("baseline_resnet18s")
    x = (_image(net) - 0.5) / 0.25  # mean/std applied outside: [-2, 2]
    with pytest.raises(ValueError, match="looks already normalised"):
        net(x.clamp(max=1.9))  # below the 0-255 limit: caught by the minimum


def test_minimum_size_of_a_stride_32_backbone() -> None:
    net = create_model("baseline_vgg11_bn", num_classes=3).eval()
    with pytest.raises(ValueError, match="minimum 32x32 for the vgg11_bn trunk"):
        net(torch.rand(1, 3, 31, 40))
    with torch.no_grad():
        assert net(torch.rand(1, 3, 32, 32)).logits.shape == (1, 3)


@pytest.mark.parametrize("name", ["baseline_mlp", "senn_mlp"])
def test_bad_tabular_input_is_refused(name: str) -> None:
    net = create_model(name, num_classes=3, num_features=5).eval()
    x = torch.randn(4, 5) * 10 + 50  # tables have no value range
    with torch.no_grad():
        assert torch.isfinite(net(x).logits).all()
    nan = x.clone()
    nan[1, 2] = float("nan")
    for bad, msg in [
        (nan, "has 1 NaN and 0 infinite values"),
        (torch.full((4, 5), float("-inf")), "has 0 NaN and 20 infinite values"),
        (x.long(), r"convert with x\.float\(\)"),
        (x[:, :4], r"expected tabular input \(B, 5\)"),
        (x[0], "add a batch dimension"),
    ]:
        with pytest.raises(ValueError, match=msg):
            net(bad)


# -- cost and graph capture ------------------------------------------------------------------------
def test_checks_are_skipped_while_tracing() -> None:
    net = _small("baseline_resnet18s")
    x = _image(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # reading values would warn
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        traced = torch.jit.trace(as_logits_module(net), x)
    torch.testing.assert_close(traced(x), net(x).logits)


def test_value_checks_do_not_break_a_compiled_graph() -> None:
    net = _small("baseline_resnet18s")

    def checked_double(x: torch.Tensor) -> torch.Tensor:
        net.check_input(x)
        return 2 * x

    compiled = torch.compile(checked_double, backend="eager", fullgraph=True)  # a graph break would raise
    x = _image(net)
    x[0, 0, 0, 0] = float("nan")  # not read while compiling
    assert torch.isnan(compiled(x)).sum() == 1
    lenient = torch.compile(checked_double, backend="eager")  # as lit_base compiles: may fall back to eager
    lenient(_image(net))
    for bad, msg in [
        (torch.rand(2, 4, 32, 32), "expected 3 input channels"),  # shape and dtype checks stay
        (torch.rand(2, 3, 2, 2), "smaller than the minimum 8x8"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "x.float"),
    ]:
        with pytest.raises(ValueError, match=msg):
            lenient(bad)
