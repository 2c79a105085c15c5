"""fast_dev_run of the black box on every datamodule that exists, each on data made offline by the tests.

Every method's own test file runs its model on PartShapes and on its paper's dataset; this matrix covers
the remaining datamodules through the shared pipeline (config -> data -> model -> fit -> test).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from interpzoo.datamodules.testing import (
    make_fake_cifar10,
    make_fake_cub,
    make_fake_image_folder,
    make_fake_mnist,
)
from interpzoo.run import train


def _fake(name: str, root: Path) -> list[str]:
    if name == "cifar10":
        make_fake_cifar10(root, n_per_batch=8, n_test=16)
        return [f"data.root={root}", "data.verify_checksums=false", "data.num_workers=0", "data.batch_size=8"]
    if name == "mnist":
        make_fake_mnist(root, n_train=40, n_test=16)
        return [f"data.root={root}", "data.num_workers=0", "data.batch_size=8"]
    if name == "imagefolder":
        make_fake_image_folder(root, classes=["cat", "dog", "owl"], n_per_class=6, size=40)
        return [f"data.root={root}", "data.image_size=32", "data.num_workers=0", "data.batch_size=8"]
    if name == "cub200":
        cub = make_fake_cub(root, n_classes=3, n_per_class=6, size=64)
        return [f"data.root={cub}", "data.image_size=32", "data.num_workers=0", "data.batch_size=8"]
    if name in ("digits", "partshapes_hard"):
        return ["data.batch_size=16"]
    return []


IMAGE_DATA = ["cifar10", "mnist", "imagefolder", "cub200", "digits", "partshapes_hard"]


@pytest.mark.parametrize("data", IMAGE_DATA)
def test_baseline_fast_dev_run_on_every_image_datamodule(make_cfg, tmp_path: Path, data: str) -> None:
    overrides = [f"data={data}", "model=baseline", "debug=fdr", *_fake(data, tmp_path / "data")]
    metrics = train(make_cfg(overrides))
    assert 0.0 <= metrics["test/acc"] <= 1.0


@pytest.mark.parametrize("data", ["breast_cancer", "wine"])
def test_tabular_black_box_fast_dev_run(make_cfg, data: str) -> None:
    metrics = train(make_cfg([f"data={data}", "model=baseline_mlp", "debug=fdr"]))
    assert 0.0 <= metrics["test/acc"] <= 1.0
