"""GPU paths (bf16 autocast, channels_last, torch.compile): skipped without a CUDA device."""

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

IMAGE_MODELS = sorted(
    p.stem
    for p in (ROOT / "conf" / "model").glob("*.yaml")
    if p.stem not in ("senn_backbone", "baseline_mlp")
)


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_bf16_channels_last_fit(make_cfg, model: str) -> None:
    overrides = [f"model={model}", "trainer=gpu", "trainer.max_epochs=1", "report=false", *TINY_DATA]
    if Path(ROOT / "conf" / "model" / f"{model}.yaml").read_text().find("channels_last") >= 0:
        overrides.append("model.channels_last=true")
    cfg = make_cfg(overrides)
    cfg.trainer.accelerator = "gpu"
    metrics = train(cfg)
    assert all(v == v for v in metrics.values()), metrics  # no NaN anywhere


def test_compiled_baseline(make_cfg) -> None:
    cfg = make_cfg(["trainer=gpu", "model.compile=true", "trainer.max_epochs=1", "report=false", *TINY_DATA])
    cfg.trainer.accelerator = "gpu"
    assert train(cfg)["test/acc"] >= 0.0
