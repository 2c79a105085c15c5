"""torch.hub can load every registered model from a local checkout, fresh or with its shipped bundle."""

from __future__ import annotations

import importlib

import pytest
import torch

from interpzoo.models import list_models, list_pretrained, load_pretrained
from tests.conftest import ROOT

# model name -> the shipped bundle `torch.hub.load(..., name, pretrained=True)` loads
EXPECTED_DEFAULTS = {
    "baseline_resnet18s": "baseline_resnet18s.partshapes_s0",
    "cbm_resnet18s": "cbm_resnet18s.partshapes_s0",
    "cw_resnet18s": "cw_resnet18s.partshapes_s0",
    "icnn_resnet18s": "icnn_resnet18s.partshapes_s0",
    "pipnet_resnet18s": "pipnet_resnet18s.partshapes_s0",
    "protopnet_resnet18s": "protopnet_resnet18s.partshapes_s0",
    "senn_lenet": "senn_lenet.digits_s0",
    "senn_mlp": "senn_mlp.breast_cancer_s0",
    "softae": "softae.partshapes_grey_s0",
}


def _hub(name: str, **kwargs):
    return torch.hub.load(str(ROOT), name, source="local", **kwargs)


def test_hubconf_exposes_every_registered_model() -> None:
    hubconf = importlib.import_module("hubconf")
    entries = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")}
    assert set(list_models()) <= entries


@pytest.mark.parametrize("name", ["baseline_resnet18s", "protopnet_resnet18s"])
def test_torch_hub_load_local(name: str) -> None:
    net = _hub(name, num_classes=3)
    out = net(torch.rand(1, 3, 32, 32))
    assert out.logits.shape == (1, 3)


def test_every_shipped_bundle_has_a_default_entry() -> None:
    hubconf = importlib.import_module("hubconf")
    assert hubconf.DEFAULT_BUNDLES == EXPECTED_DEFAULTS
    assert set(EXPECTED_DEFAULTS) <= set(list_models())
    # every shipped bundle belongs to a model name with a default
    assert {b.split(".")[0] for b in list_pretrained()} == set(EXPECTED_DEFAULTS)


@pytest.mark.parametrize("name", sorted(EXPECTED_DEFAULTS))
def test_hub_pretrained_true_loads_the_default_bundle(name: str) -> None:
    net = _hub(name, pretrained=True)
    ref = load_pretrained(EXPECTED_DEFAULTS[name])
    assert not net.training
    assert net.bundle_config == ref.bundle_config and net.data_config == ref.data_config
    state, ref_state = net.state_dict(), ref.state_dict()
    assert state.keys() == ref_state.keys()
    for k in state:  # NaN buffers (CBM's unset logit percentiles) equal NaN
        torch.testing.assert_close(state[k], ref_state[k], rtol=0, atol=0, equal_nan=True)


def test_hub_pretrained_senn_mlp_predicts_breast_cancer() -> None:
    """The issue's case: `torch.hub.load(..., "senn_mlp", pretrained=True)` said "no bundle at 'senn_mlp'"."""
    net = _hub("senn_mlp", pretrained=True)
    assert net.data_config["num_classes"] == 2
    x = torch.rand(4, net.data_config["num_features"])
    with torch.no_grad():
        out = net(x)
    assert out.logits.shape == (4, 2) and torch.isfinite(out.logits).all()
    ex = net.explain(x)
    assert ex.prediction.tolist() == out.logits.argmax(1).tolist()
    assert ex.relevance.shape == ex.concepts.shape and ex.concepts.shape[0] == 4


def test_hub_pretrained_true_without_a_shipped_bundle_names_those_with_one() -> None:
    with pytest.raises(ValueError, match="'baseline_resnet34' has no shipped pretrained bundle") as err:
        _hub("baseline_resnet34", pretrained=True)
    for name in EXPECTED_DEFAULTS:
        assert name in str(err.value)
    assert "pretrained='<run>/bundle'" in str(err.value)


def test_hub_pretrained_true_refuses_constructor_arguments() -> None:
    with pytest.raises(ValueError, match=r"cannot change a pretrained bundle"):
        _hub("senn_mlp", pretrained=True, num_classes=5)


def test_create_model_pretrained_true_loads_the_default_bundle() -> None:
    import interpzoo

    net = interpzoo.create_model("senn_mlp", pretrained=True)
    ref = interpzoo.load_pretrained("senn_mlp.breast_cancer_s0")
    assert net.bundle_config["metrics"] == ref.bundle_config["metrics"]
    for (k, a), (_, b) in zip(net.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k


def test_hub_pretrained_path_and_shipped_name() -> None:
    bundle = ROOT / "models" / "pretrained" / "senn_mlp.breast_cancer_s0"
    a = _hub("senn_mlp", pretrained=str(bundle))
    b = _hub("senn_mlp", pretrained="senn_mlp.breast_cancer_s0")
    assert a.bundle_config == b.bundle_config
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
