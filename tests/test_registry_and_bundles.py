"""Registry (timm-style), backbones, module surgery and pickle-free bundles."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from interpzoo.models import create_model, list_backbones, list_models, load_pretrained, save_pretrained
from interpzoo.models.backbones import PretrainedWeightsError, build_backbone
from interpzoo.models.bundle import BundleError
from interpzoo.models.surgery import find_modules, replace_modules


@pytest.mark.parametrize("name", list_backbones())
def test_backbone_reports_channels_and_stride(name: str) -> None:
    trunk = build_backbone(name)
    size = 64
    out = trunk(torch.rand(1, 3, size, size))
    assert out.shape[1] == trunk.out_channels
    assert out.shape[-1] == -(-size // trunk.stride)


def test_backbone_stage_and_grey_input() -> None:
    trunk = build_backbone("resnet18s", stage="layer3", in_chans=1)
    out = trunk(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, trunk.out_channels, 8, 8) and trunk.stride == 4
    with pytest.raises(ValueError, match="did you mean 'layer3'"):
        build_backbone("resnet18s", stage="layr3")


def test_pretrained_offline_error_names_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsError, match="backbone.pretrained=/path/to/weights.pth"):
        build_backbone("resnet18", pretrained=True)


def test_pretrained_from_file(tmp_path) -> None:
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    trunk = build_backbone("resnet18", pretrained=str(path))
    assert torch.equal(trunk.body.conv1.weight, ref.conv1.weight)


def test_registry_names_and_did_you_mean() -> None:
    names = list_models()
    assert "baseline_resnet18" in names and "baseline_resnet18s" in names
    assert list_models("baseline_vgg*") == ["baseline_vgg11_bn", "baseline_vgg16_bn"]
    with pytest.raises(KeyError, match="did you mean 'baseline_resnet18'"):
        create_model("baseline_resnet81")
    with pytest.raises(TypeError, match="unknown argument 'dropuot'.*did you mean 'dropout'"):
        create_model("baseline_resnet18s", num_classes=3, dropuot=0.1)


def test_bundle_round_trip_identical_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    net = create_model("baseline_resnet18s", num_classes=4, backbone={"width": 8})
    # make BN statistics non-trivial so buffers matter
    net.train()
    net(torch.rand(8, 3, 32, 32))
    net.eval()
    save_pretrained(net, tmp_path / "b", data_config={"num_classes": 4, "class_names": list("abcd")})
    loaded = load_pretrained(tmp_path / "b")
    x = torch.rand(3, 3, 32, 32)
    assert not loaded.training
    assert torch.equal(loaded(x).logits, net(x).logits)
    assert loaded.data_config["class_names"] == list("abcd")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["architecture"] == "baseline" and cfg["model_args"]["backbone"]["width"] == 8


def test_bundle_loading_never_unpickles(tmp_path, monkeypatch) -> None:
    net = create_model("baseline_resnet18s", num_classes=2, backbone={"width": 8})
    save_pretrained(net, tmp_path / "b")

    def boom(*a, **k):
        raise AssertionError("pickle used while loading a bundle")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    load_pretrained(tmp_path / "b")


def test_bundle_of_another_model_is_refused(tmp_path) -> None:
    net = create_model("baseline_resnet18s", num_classes=2, backbone={"width": 8})
    save_pretrained(net, tmp_path / "b")
    cfg_path = tmp_path / "b" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_args"]["num_classes"] = 7
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="does not fit a 'baseline' network"):
        load_pretrained(tmp_path / "b")
    with pytest.raises(BundleError, match="no bundle at"):
        load_pretrained(tmp_path / "nope")


def test_surgery_replaces_by_name_glob_and_type() -> None:
    net = create_model("baseline_resnet18s", num_classes=2)
    bns = find_modules(net, nn.BatchNorm2d)
    assert "backbone.body.layer3.0.bn1" in bns
    replaced = replace_modules(net, "backbone.body.layer3.*.bn1", lambda n, m: nn.Identity())
    assert replaced == ["backbone.body.layer3.0.bn1", "backbone.body.layer3.1.bn1"]
    assert isinstance(net.get_submodule("backbone.body.layer3.0.bn1"), nn.Identity)
    with pytest.raises(KeyError, match="did you mean"):
        replace_modules(net, ["backbone.body.layer3.0.bn9"], lambda n, m: m)
    with pytest.raises(KeyError, match="no submodule"):
        replace_modules(net, "nothing.*", lambda n, m: m)


@pytest.mark.parametrize(
    "x, msg",
    [
        (torch.rand(3, 32, 32), "add a batch dimension"),
        (torch.rand(2, 32, 32, 3), "channels-last"),
        (torch.rand(2, 1, 32, 32), "expected 3 input channels"),
    ],
)
def test_wrong_image_shape_errors(x: torch.Tensor, msg: str) -> None:
    net = create_model("baseline_resnet18s", num_classes=2, backbone={"width": 8})
    with pytest.raises(ValueError, match=msg):
        net(x)
