"""torch.hub can load every registered model from a local checkout."""

from __future__ import annotations

import importlib

import pytest
import torch

from interpzoo.models import list_models
from tests.conftest import ROOT


def test_hubconf_exposes_every_registered_model() -> None:
    hubconf = importlib.import_module("hubconf")
    entries = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")}
    assert set(list_models()) <= entries


@pytest.mark.parametrize("name", ["baseline_resnet18s", "protopnet_resnet18s"])
def test_torch_hub_load_local(name: str) -> None:
    net = torch.hub.load(str(ROOT), name, source="local", num_classes=3)
    out = net(torch.rand(1, 3, 32, 32))
    assert out.logits.shape == (1, 3)
