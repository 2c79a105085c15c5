"""Warm-starting a trunk from a trained model: ``backbone.pretrained=<bundle folder | .ckpt>``.

The trunk's tensors must equal the source model's ``backbone.body.*`` (up to the new trunk's stage, which
may be shallower), a source of another width is refused with the fix, and a model exported after a warm
start loads where the source no longer exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from interpzoo.models import create_model, load_pretrained, save_pretrained
from interpzoo.models.backbones import PretrainedWeightsError
from interpzoo.models.registry import PRETRAINED_DIR

ROOT = Path(__file__).resolve().parents[1]
SOURCE = PRETRAINED_DIR / "baseline_resnet18s.partshapes_s0"  # resnet18s width 8, cut at layer4
SMALL = {"name": "resnet18s", "width": 8}


def _trunk(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if k.startswith("backbone.body.")}


def test_trunk_equals_the_source_bundle_up_to_a_shallower_stage() -> None:
    source = load_file(str(SOURCE / "model.safetensors"))
    net = create_model(
        "protopnet", num_classes=10, backbone={**SMALL, "stage": "layer3", "pretrained": str(SOURCE)}
    )
    trunk = _trunk(net)
    assert trunk and not any(".layer4." in k for k in trunk)
    for k, v in trunk.items():
        assert torch.equal(v, source[k]), k
    # and a fresh trunk differs: the weights really came from the file
    fresh = _trunk(create_model("protopnet", num_classes=10, backbone={**SMALL, "stage": "layer3"}))
    assert not torch.equal(fresh["backbone.body.conv1.weight"], trunk["backbone.body.conv1.weight"])


def test_a_shipped_bundle_is_named_and_the_placeholder_says_how_to_get_one() -> None:
    name = "baseline_resnet18s.partshapes_partscale_s1"  # the part-scale black box the ProtoPNet bundles start from
    source = load_file(str(PRETRAINED_DIR / name / "model.safetensors"))
    trunk = _trunk(
        create_model("protopnet", num_classes=10, backbone={**SMALL, "stage": "layer3", "pretrained": name})
    )
    assert trunk and all(torch.equal(v, source[k]) for k, v in trunk.items())
    # experiment=protopnet_partscale / pipnet_partscale without a black box: the two ways to give one
    with pytest.raises(
        PretrainedWeightsError, match=r"experiment=baseline_partscale.*partshapes_partscale_s0"
    ):
        create_model(
            "protopnet",
            num_classes=10,
            backbone={**SMALL, "pretrained": "SET-model.net.backbone.pretrained-TO-THE-BLACK-BOX-BUNDLE"},
        )
    # a name that is neither a file nor a shipped bundle is still "not found"
    with pytest.raises(PretrainedWeightsError, match="not found"):
        create_model(
            "protopnet", num_classes=10, backbone={**SMALL, "pretrained": "baseline_resnet18s.nope_s0"}
        )


def test_trunk_from_a_lightning_checkpoint(tmp_path: Path) -> None:
    src = create_model("baseline", num_classes=4, backbone=SMALL)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in src.state_dict().items()}}, ckpt)
    net = create_model(
        "protopnet", num_classes=4, backbone={**SMALL, "stage": "layer2", "pretrained": str(ckpt)}
    )
    want = _trunk(src)
    got = _trunk(net)
    assert got and set(got) < set(want)  # the trunk stops at layer2, the source at layer4
    for k in got:
        assert torch.equal(got[k], want[k]), k


def test_a_source_of_another_width_is_refused_with_the_fix() -> None:
    with pytest.raises(PretrainedWeightsError, match=r"another shape.*width"):
        create_model("protopnet", num_classes=10, backbone={"name": "resnet18s", "pretrained": str(SOURCE)})


def test_a_folder_without_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match="without model.safetensors"):
        create_model("protopnet", num_classes=10, backbone={**SMALL, "pretrained": str(tmp_path)})


def test_an_exported_warm_started_model_loads_without_its_source(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(SOURCE, source)
    net = create_model("protopnet", num_classes=10, backbone={**SMALL, "pretrained": str(source)}).eval()
    save_pretrained(net, tmp_path / "bundle")
    shutil.rmtree(source)
    loaded = load_pretrained(tmp_path / "bundle").eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x).logits, net(x).logits)


def test_train_py_warm_starts_from_a_bundle(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "train.py",
        "model=protopnet",
        "model.net.backbone.width=8",
        "model.net.backbone.stage=layer3",
        f"model.net.backbone.pretrained={SOURCE}",
        "debug=fdr",
        f"hydra.run.dir={tmp_path / 'run'}",
        "logger=none",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = subprocess.run(
        [
            *cmd[:5],
            f"model.net.backbone.pretrained={tmp_path / 'missing'}",
            "debug=fdr",
            f"hydra.run.dir={tmp_path}/r2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert bad.returncode != 0
    assert "backbone weights file not found" in bad.stderr + bad.stdout
