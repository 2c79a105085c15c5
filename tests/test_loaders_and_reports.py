"""Every DataLoader comes from the datamodule: push and concept loaders sharded by rank (DDP), fixed
subsets; and ``interpzoo.reports.write_report`` dispatches on the registered task without touching the
matplotlib backend."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from interpzoo.datamodules.base import fixed_subset_indices, shard_indices
from interpzoo.datamodules.partshapes_dm import PartShapesDataModule
from interpzoo.models.lit_base import ClassificationModule, ReconstructionModule
from interpzoo.reports import write_report

CONCEPTS = ["has_red", "has_circle"]


@pytest.fixture(scope="module")
def dm() -> PartShapesDataModule:
    d = PartShapesDataModule(
        n_train=22, n_val=8, n_test=10, batch_size=4, n_concept_train=11, n_concept_test=9, concepts=CONCEPTS
    )
    d.setup("fit")
    return d


def _indices(loader) -> list[int]:
    return [int(i) for b in loader for i in b["index"]]


def test_shard_indices_interleave_and_reject_bad_ranks() -> None:
    assert shard_indices(7, 1, 3) == [1, 4]
    assert sorted(shard_indices(7, 0, 2) + shard_indices(7, 1, 2)) == list(range(7))
    with pytest.raises(ValueError, match="rank 2 is not a rank of world_size 2"):
        shard_indices(7, 2, 2)


def test_push_shards_cover_the_push_set_once_and_keep_global_indices(dm: PartShapesDataModule) -> None:
    whole = _indices(dm.push_dataloader())
    assert whole == list(range(len(dm.push_set)))
    shards = [_indices(dm.push_dataloader(r, 3)) for r in range(3)]
    assert shards[1] == list(range(1, len(dm.push_set), 3))
    assert sorted(i for s in shards for i in s) == whole
    batch = next(iter(dm.push_dataloader(2, 3)))
    assert torch.equal(batch["image"][1], dm.push_set[5]["image"])  # shard item 1 is push item 2 + 3


def test_concept_train_loaders_are_seeded_disjoint_shards_per_axis(dm: PartShapesDataModule) -> None:
    sets = dm.concept_datasets("train")
    order = list(reversed(CONCEPTS))  # axis order given by the model, not the dataset's
    per_rank = [
        dm.concept_dataloaders("train", batch_size=2, concepts=order, rank=r, world_size=2) for r in range(2)
    ]
    for j, name in enumerate(order):
        assert list(per_rank[0]) == order
        loaders = [per_rank[r][name] for r in range(2)]
        expected = [list(DistributedSampler(sets[name], 2, r, shuffle=True, seed=1234 + j)) for r in range(2)]
        for r in range(2):
            loaders[r].sampler.set_epoch(0)
            assert list(loaders[r].sampler) == expected[r]
            assert loaders[r].drop_last  # 11 images >= one batch of 2 per rank
            labels = torch.cat([b["label"] for b in loaders[r]])
            assert (labels == labels[0]).all()
        # the two ranks see different images (the sampler pads 11 to 12 by repeating one)
        assert len(set(expected[0]) | set(expected[1])) == len(sets[name])
        loaders[0].sampler.set_epoch(1)
        assert list(loaders[0].sampler) != expected[0]  # a new shuffle per pass


def test_concept_eval_loaders_take_a_seeded_subset_then_shard(dm: PartShapesDataModule) -> None:
    sets = dm.concept_datasets("test")
    for sample_seed in (None, 10_000):
        got = {
            r: dm.concept_dataloaders(
                "test", concepts=CONCEPTS, rank=r, world_size=2, num_samples=5, sample_seed=sample_seed
            )
            for r in range(2)
        }
        for j, name in enumerate(CONCEPTS):
            if sample_seed is None:
                subset = list(range(5))
            else:
                g = torch.Generator().manual_seed(sample_seed + j)
                subset = torch.randperm(len(sets[name]), generator=g)[:5].sort().values.tolist()
            want = [int(sets[name][i]["index"]) for i in subset]
            assert _indices(got[0][name]) == want[0::2] and _indices(got[1][name]) == want[1::2]
    with pytest.raises(Exception, match="has_square"):
        dm.concept_dataloaders("test", concepts=["has_square"])


def test_subset_dataloader_reads_the_fixed_subset_in_order(dm: PartShapesDataModule) -> None:
    idx = fixed_subset_indices(len(dm.test_set), 4, seed=3)
    assert idx == sorted(idx) and len(set(idx)) == 4
    batch = next(iter(dm.subset_dataloader("test", idx, batch_size=8)))
    assert batch["index"].tolist() == idx
    with pytest.raises(Exception, match="no 'predict' split"):
        dm.subset_dataloader("predict", idx)


class MyClassifier(ClassificationModule):
    """A user's subclass: not a registered task itself."""


def test_write_report_dispatches_on_the_task_and_keeps_the_backend(
    dm: PartShapesDataModule, tmp_path: Path
) -> None:
    import matplotlib

    backend = matplotlib.get_backend()
    module = MyClassifier(net={"name": "baseline_resnet18s"}, data_info=dm.data_info)
    paths = write_report(module, dm, tmp_path / "figures")
    assert [p.name for p in paths] == ["confusion_matrix.png"] and paths[0].stat().st_size > 0
    assert matplotlib.get_backend() == backend
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()
    recon = ReconstructionModule(net={"name": "softae"}, data_info={"in_chans": 3})
    assert write_report(recon, dm, tmp_path / "none") == [] and not (tmp_path / "none").exists()
