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


# -- one builder: network configs, LightningModule settings, old shapes ----------------------------------------

_INFO = {
    "num_classes": 4,
    "in_chans": 1,
    "mean": [0.5],
    "std": [0.2],
    "num_features": 99,
    "image_size": [32, 32],
}


def test_build_model_precedence_defaults_data_info_config() -> None:
    """registry defaults < data_info (only what the architecture takes) < the network config."""
    from interpzoo.models.registry import build_model, resolve_net

    net = build_model({"name": "baseline_resnet18s", "backbone": {"width": 8}}, _INFO)
    args = net.interpzoo_config["model_args"]
    assert net.interpzoo_config["architecture"] == "baseline"
    assert args["num_classes"] == 4 and args["in_chans"] == 1 and args["mean"] == [0.5]
    assert "num_features" not in args and "image_size" not in args  # baseline takes neither
    assert args["backbone"] == {"name": "resnet18s", "width": 8}  # the model name's default merged with ours
    assert net.data_config == _INFO
    assert resolve_net({"name": "baseline_resnet18s", "num_classes": 2}, _INFO)[1]["num_classes"] == 2
    # create_model is the same builder
    same = create_model(
        "baseline_resnet18s", num_classes=4, in_chans=1, mean=[0.5], std=[0.2], backbone={"width": 8}
    )
    assert same.interpzoo_config == net.interpzoo_config
    with pytest.raises(ValueError, match="no 'name'.*model.net.name=protopnet"):
        build_model({"prototypes_per_class": 3})
    # a trunk-less architecture: the backbone= group is dropped only when asked (the LightningModules do)
    soft = {"name": "softae", "backbone": {"name": "resnet18s"}}
    assert "backbone" not in resolve_net(soft, drop_unused_backbone=True)[1]
    with pytest.raises(TypeError, match="unknown argument 'backbone'"):
        build_model(soft)


def test_upgrade_hparams_maps_the_old_keywords() -> None:
    from interpzoo.models.registry import upgrade_hparams

    old = {
        "arch": "protopnet",
        "model_args": {"prototype_dim": 8, "backbone": {"width": 4}},
        "backbone": {"name": "resnet18s", "width": 16, "stage": "layer4"},
        "monitor": "val/acc_pushed",
    }
    new = upgrade_hparams(old)
    assert new == {
        "net": {
            "name": "protopnet",
            "prototype_dim": 8,
            "backbone": {"name": "resnet18s", "width": 4, "stage": "layer4"},  # model_args won, as before
        },
        "monitor": "val/acc_pushed",
    }
    assert "arch" in old  # the input is not changed
    assert upgrade_hparams(new) == new
    assert upgrade_hparams({"arch": "softae", "backbone": None, "model_args": None}) == {
        "net": {"name": "softae"}
    }
    with pytest.raises(ValueError, match="both 'net' and the old"):
        upgrade_hparams({"net": {"name": "senn"}, "arch": "senn"})


def test_lightning_module_takes_one_net_argument_and_rebuilds_from_its_hparams(tmp_path) -> None:
    """hparams hold plain data only (weights_only load) and cls(**hparams) rebuilds the same module."""
    from interpzoo.models.lit_base import ClassificationModule
    from interpzoo.models.lit_protopnet import ProtoPNetModule

    info = {"num_classes": 3, "in_chans": 3, "image_size": [32, 32], "mean": [0.5] * 3, "std": [0.2] * 3}
    net = {"prototypes_per_class": 1, "prototype_dim": 8, "backbone": {"name": "resnet18s", "width": 4}}
    module = ProtoPNetModule(net=net, data_info=info, schedule={"push_start": None})
    assert module.hparams.monitor == "val/acc_pushed" and module.net_arguments()[0] == "protopnet"
    assert module.hparams.net == net and module.hparams.schedule == {"push_start": None}
    torch.save({"hyper_parameters": dict(module.hparams)}, tmp_path / "h.pt")
    hparams = torch.load(tmp_path / "h.pt", weights_only=True)["hyper_parameters"]
    again = ProtoPNetModule(**hparams)
    assert again.net_arguments() == module.net_arguments()
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in module.state_dict().items()
    }
    plain = ClassificationModule(
        net={"name": "baseline_mlp", "hidden": [8]}, data_info={"num_classes": 2, "num_features": 5}
    )
    assert plain.net_arguments() == ("baseline_mlp", {**plain.net.interpzoo_config["model_args"]})
    assert plain.net_arguments()[1]["hidden"] == [8] and plain.net_arguments()[1]["num_features"] == 5


def test_load_checkpoint_builds_the_network_without_lightning(tmp_path) -> None:
    """load_checkpoint builds the net from the recorded architecture/model_args and its ``net.`` weights."""
    import subprocess
    import sys

    from interpzoo.models.lit_base import ClassificationModule

    torch.manual_seed(0)
    module = ClassificationModule(
        net={"name": "baseline_mlp"}, data_info={"num_classes": 3, "num_features": 5}
    )
    ckpt: dict = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    path = tmp_path / "m.ckpt"
    torch.save(ckpt, path)
    code = (
        "import sys, torch, interpzoo\n"
        f"net = interpzoo.load_checkpoint({str(path)!r})\n"
        "assert 'pytorch_lightning' not in sys.modules and 'lightning' not in sys.modules, 'Lightning imported'\n"
        "torch.manual_seed(1); x = torch.randn(4, 5)\n"
        "print(type(net).__name__, net.data_config['num_features'], net(x).logits.sum().item())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    torch.manual_seed(1)
    x = torch.randn(4, 5)
    module.eval()
    name, features, total = out.stdout.split()
    assert (name, features) == (type(module.net).__name__, "5")
    assert float(total) == pytest.approx(module.net(x).logits.sum().item(), abs=1e-5)


def test_bundle_with_old_hparams_shape_still_evaluates(tmp_path) -> None:
    """Bundles and checkpoints written before ``net`` record arch/model_args/backbone: they still load."""
    import shutil

    from interpzoo.models.registry import PRETRAINED_DIR
    from interpzoo.run import module_from_source

    name = "senn_mlp.breast_cancer_s0"
    shipped = PRETRAINED_DIR / name
    cfg = json.loads((shipped / "config.json").read_text())
    hp = dict(cfg["lightning"]["hparams"])
    assert "net" in hp and not {"arch", "model_args", "backbone"} & set(hp), "shipped bundles record net="
    net = dict(hp.pop("net"))
    hp.update(arch=net.pop("name"), backbone=net.pop("backbone", None), model_args=net)
    cfg["lightning"]["hparams"] = hp
    old = tmp_path / name
    shutil.copytree(shipped, old)
    (old / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    a, b = module_from_source(str(old)), module_from_source(str(shipped))
    assert a.net_arguments() == b.net_arguments()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
