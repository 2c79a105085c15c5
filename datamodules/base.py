"""Base LightningDataModule shared by every dataset in interpzoo.

Contract: every dataset item is a ``dict`` with

* ``"image"``: ``(C, H, W)`` float tensor in ``[0, 1]`` (not normalised: every interpzoo network
  normalises its own input with the ``mean``/``std`` of :attr:`BaseDataModule.data_info`, so
  explanations, push crops and bundles all work on plain images), or ``"features"``: ``(F,)`` float
  for tabular data;
* ``"label"``: long scalar;
* ``"index"``: long scalar, the sample's global index in its split (push, reports, DDP merges);
* optional ``"concepts"`` ``(K,)`` multi-hot float, ``"part_masks"`` ``(P, H, W)`` bool,
  ``"landmarks"`` ``(P, 2)`` float ``(x, y)`` pixel coordinates and ``"landmark_visible"`` ``(P,)`` bool.

The default collate turns these into the batch dict the LightningModules read.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from interpzoo.utils import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(UsageError, RuntimeError):
    """A dataset is missing or malformed; the message says what to put where."""


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/val split of ``range(n)``: the same on every rank and every run."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class IndexedSubset(Subset):
    """A ``Subset`` whose items keep ``"index"`` equal to the position inside the subset.

    Push, reports and DDP merges address samples by this index, so it must be the index of the
    dataset the loader iterates, not of the parent dataset.
    """

    def __getitem__(self, idx: int) -> dict[str, Any]:
        item = dict(self.dataset[self.indices[idx]])
        item["index"] = torch.tensor(idx, dtype=torch.long)
        return item

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        # torch >= 2.14 requires subclasses overriding __getitem__ to define the batched form too.
        return [self[i] for i in indices]


class BaseDataModule(pl.LightningDataModule):
    """Shared loader logic; subclasses implement :meth:`_build` and :attr:`data_info`.

    Args:
        batch_size: global batch size; divided by the world size under DDP (LHT convention).
        num_workers: DataLoader workers.
        pin_memory: DataLoader ``pin_memory``.
        val_fraction: fraction of the training split held out for validation when the dataset
            has no validation split (no model selection on the test set).
        seed: seed of the train/val split.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.val_fraction = val_fraction
        self.seed = seed
        # seed of the training order (None: see train_seed); train.py sets it to the run's seed
        self.shuffle_seed: int | None = None
        self.train_set: Dataset | None = None
        self.push_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # -- to implement -------------------------------------------------------------------------
    def _build(self) -> None:
        """Create ``train_set``, ``val_set``, ``test_set`` and optionally ``push_set``."""
        raise NotImplementedError

    @property
    def data_info(self) -> dict[str, Any]:
        """Plain-data description of the inputs and labels.

        Keys: ``task`` ("classification" or "reconstruction"), ``input_kind`` ("image" or
        "tabular"), ``num_classes``, ``in_chans``, ``image_size`` ``[H, W]`` (images),
        ``num_features`` (tabular), ``mean``, ``std``, ``class_names``, ``concept_names``,
        ``part_names``, ``feature_names``.
        """
        raise NotImplementedError

    # -- lightning hooks ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._build()
            if self.push_set is None:
                self.push_set = self.train_set

    @property
    def per_device_batch_size(self) -> int:
        world = 1
        if self.trainer is not None:
            world = max(1, self.trainer.world_size)
        if self.batch_size % world != 0:
            raise ValueError(
                f"data.batch_size={self.batch_size} is not divisible by the world size {world}; "
                f"set data.batch_size to a multiple of {world}."
            )
        return self.batch_size // world

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return int(self.trainer.global_rank), max(1, int(self.trainer.world_size))

    @property
    def train_seed(self) -> int:
        """Seed of the training order: :attr:`shuffle_seed` (``train.py`` sets the run's ``seed``), else the
        seed given to ``pl.seed_everything`` (``PL_GLOBAL_SEED``), else :attr:`seed`."""
        if self.shuffle_seed is not None:
            return int(self.shuffle_seed)
        return int(os.environ.get("PL_GLOBAL_SEED", self.seed))

    def _loader(
        self,
        dataset: Dataset | None,
        shuffle: bool,
        drop_last: bool = False,
        train: bool = False,
        shard: bool = True,
    ) -> DataLoader:
        if dataset is None:
            self.setup()
            raise RuntimeError("setup() did not create the requested split")
        rank, world = self._rank_world()
        sampler: Sampler[int] | None
        if train:
            # the single-process order on every world size (GlobalBatchSampler); new workers each epoch, so
            # their random state derives from the epoch's seed (interpzoo.resume) and a resume replays it
            sampler = GlobalBatchSampler(
                len(dataset), self.batch_size, world, rank, seed=self.train_seed, shuffle=shuffle
            )
            persistent = False
        else:
            # shard=False: the caller gives this rank's shard already (push_dataloader); sharding it again
            # would leave each rank 1/world of its shard
            sampler = EvalShardSampler(len(dataset), world, rank) if world > 1 and shard else None
            persistent = self.num_workers > 0
        return DataLoader(
            dataset,
            batch_size=self.per_device_batch_size,
            shuffle=False if sampler is not None else shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=persistent,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def push_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Un-augmented training images in a fixed order, each with its ``"index"``.

        Used by procedures that scan the training set (ProtoPNet push, prototype metrics,
        top-activating image reports). Lightning does not shard it: under DDP pass this process's
        ``rank`` and the ``world_size`` to get the ``rank``-th of ``world_size`` interleaved shards
        (:func:`shard_indices`); items keep their ``"index"`` in the whole push set, so shards can be
        merged by sample id. The defaults give the whole set.
        """
        self.setup()
        if self.push_set is None:
            raise RuntimeError("setup() did not create the push split")
        return self._loader(_shard(self.push_set, rank, world_size), shuffle=False, shard=False)

    def concept_datasets(self, split: str = "train") -> dict[str, Dataset]:
        """One dataset of images per concept (concept whitening probe sets).

        ``split`` is "train" (used to align axes) or "test" (held out for concept AUC).
        """
        raise DataError(
            f"{type(self).__name__} has no concept probe sets; use data=partshapes, or an image "
            "folder datamodule with concepts.train_dir / concepts.test_dir set."
        )

    def concept_negative_datasets(self, split: str = "train") -> dict[str, Dataset]:
        """One dataset of images *without* each concept (contrastive concept whitening), keyed like
        :meth:`concept_datasets`."""
        raise DataError(
            f"{type(self).__name__} has no negative concept sets, which net.alignment=contrastive needs; use "
            "data=partshapes (negatives re-rendered without the concept) or net.alignment=paper."
        )

    def concept_dataloaders(
        self,
        split: str = "train",
        batch_size: int | None = None,
        concepts: Sequence[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool | None = None,
        seed: int = 1234,
        num_samples: int | None = None,
        sample_seed: int | None = None,
        negatives: bool = False,
    ) -> dict[str, DataLoader]:
        """One DataLoader per concept probe set (:meth:`concept_datasets`), sharded across ranks.

        Concept whitening (Chen, Bei & Rudin 2020, Eq. 3) aligns axis ``j`` with batches of
        concept ``j``; :class:`~interpzoo.models.lit_concept_whitening.ConceptWhiteningModule` takes its
        probe and held-out concept batches from here.

        Args:
            split: ``"train"`` (probe sets that align the axes) or ``"test"`` (held out for the metrics).
            batch_size: images per batch and rank (``None``: :attr:`per_device_batch_size`).
            concepts: concept names in axis order (``None``: every concept of the split, in its order);
                the position ``j`` of a concept in this list seeds its loader.
            rank, world_size: this process's shard under DDP (defaults: one process, the whole set).
            shuffle: ``True``: a ``DistributedSampler`` (shuffled with seed ``seed + j``, one shard per rank,
                also on one rank; call ``loader.sampler.set_epoch(e)`` for a new order) and the last
                incomplete batch dropped when the set holds one batch per rank. ``False``: fixed order,
                the ``rank``-th of ``world_size`` interleaved shards. ``None``: ``split == "train"``.
            seed: base seed of the shuffled samplers.
            num_samples: keep at most this many images per concept, chosen before sharding: the first
                ones, or with ``sample_seed`` a fixed random subset (seed ``sample_seed + j``, sorted).
            sample_seed: see ``num_samples``.
            negatives: the sets of images without each concept (:meth:`concept_negative_datasets`).

        Returns:
            ``{concept name: DataLoader}`` in the order of ``concepts``.
        """
        self.setup()
        sets = self.concept_negative_datasets(split) if negatives else self.concept_datasets(split)
        names = list(sets) if concepts is None else [str(c) for c in concepts]
        missing = [c for c in names if c not in sets]
        if missing:
            raise DataError(
                f"concept(s) {missing} have no {split} probe set in {type(self).__name__} (available: "
                f"{list(sets)}); choose among them or add the concepts to the data config"
            )
        bs = batch_size or self.per_device_batch_size
        shuffle = split == "train" if shuffle is None else shuffle
        loaders: dict[str, DataLoader] = {}
        for j, name in enumerate(names):
            ds: Dataset = sets[name]
            if num_samples is not None:
                n = min(len(ds), int(num_samples))
                if sample_seed is None:
                    idx = list(range(n))
                else:
                    g = torch.Generator().manual_seed(int(sample_seed) + j)
                    idx = torch.randperm(len(ds), generator=g)[:n].sort().values.tolist()
                ds = Subset(ds, idx)
            if shuffle:
                sampler = DistributedSampler(
                    ds, num_replicas=world_size, rank=rank, shuffle=True, seed=int(seed) + j
                )
                loaders[name] = DataLoader(
                    ds,
                    batch_size=bs,
                    sampler=sampler,
                    num_workers=0,
                    drop_last=len(ds) >= bs * world_size,
                )
            else:
                loaders[name] = DataLoader(
                    _shard(ds, rank, world_size), batch_size=bs, shuffle=False, num_workers=0
                )
        return loaders

    def subset_dataloader(self, split: str, indices: Sequence[int], batch_size: int = 64) -> DataLoader:
        """The items ``indices`` of ``split`` (train, val, test or push) in that order, unshuffled.

        For metrics and report figures computed on a fixed subset (e.g. :func:`fixed_subset_indices`),
        identical on every rank.
        """
        self.setup()
        dataset = getattr(self, f"{split}_set", None)
        if dataset is None:
            raise DataError(
                f"{type(self).__name__} has no {split!r} split; choose one of train, val, test, push"
            )
        return DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False, num_workers=0)


class GlobalBatchSampler(DistributedSampler):
    """Training order that is the same on 1 or N processes: one global permutation per epoch, split per batch.

    Each epoch draws one permutation of ``range(n)`` from a generator seeded ``seed + epoch`` (the same on
    every rank and on a resume: the epoch comes from Lightning's loop through :meth:`set_epoch`) and cuts it
    into global batches of ``batch_size``; rank ``r`` of ``world_size`` takes the ``r``-th contiguous slice of
    ``batch_size // world_size`` of each, so the union over ranks of each step's batches is the
    single-process batch (one process uses this sampler too, with ``world_size=1``). A last global batch of
    ``m`` samples gives each rank ``m // world_size`` of them (the ``m % world_size`` left over are skipped
    under DDP, with a warning; a batch with fewer samples than ranks is skipped), so every rank makes the
    same number of steps with equal batch sizes and DDP's gradient mean is the single-process gradient.

    A ``DistributedSampler`` subclass, so Lightning's ``use_distributed_sampler`` does not re-wrap it.
    """

    def __init__(
        self, n: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not a rank of world_size {world_size}")
        if batch_size % world_size != 0:
            raise ValueError(
                f"data.batch_size={batch_size} is not divisible by the world size {world_size}; "
                f"set data.batch_size to a multiple of {world_size}."
            )
        # DistributedSampler.__init__ would query torch.distributed; set its attributes directly
        self.n, self.batch_size, self.num_replicas, self.rank = int(n), int(batch_size), world_size, rank
        self.seed, self.shuffle, self.epoch, self.drop_last = int(seed), bool(shuffle), 0, False
        per, last = self.batch_size // world_size, self.n % self.batch_size
        self.num_samples = (self.n // self.batch_size) * per + last // world_size
        self.total_size = self.num_samples * world_size
        if world_size > 1 and last % world_size and rank == 0:
            warnings.warn(
                f"the last training batch of each epoch has {last} samples, not a multiple of the "
                f"{world_size} processes: {last % world_size} of them are skipped each epoch (choose "
                "data.n_train or data.batch_size so that the remainder divides evenly to train on every sample)",
                stacklevel=2,
            )

    def global_order(self) -> list[int]:
        """This epoch's order of the whole split (what one process iterates)."""
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order, b, w = self.global_order(), self.batch_size, self.num_replicas
        for start in range(0, self.n, b):
            batch = order[start : start + b]
            per = len(batch) // w
            yield from batch[self.rank * per : (self.rank + 1) * per]

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])


class EvalShardSampler(DistributedSampler):
    """Unpadded evaluation shard: rank ``r`` takes ``r, r + world_size, ...`` (every sample exactly once).

    Lightning's ``DistributedSampler`` pads a split to a multiple of the world size with duplicates, which
    biases every validation and test metric; this subclass (so Lightning does not re-wrap it) does not. Ranks
    may hold one sample (and so one batch) more than others: evaluation steps must not run collectives
    (metrics reduce their states once per epoch, which handles uneven shards).
    """

    def __init__(self, n: int, world_size: int = 1, rank: int = 0) -> None:
        self.indices = shard_indices(int(n), rank, world_size)
        self.num_replicas, self.rank, self.epoch, self.seed = world_size, rank, 0, 0
        self.shuffle, self.drop_last = False, False
        self.num_samples, self.total_size = len(self.indices), int(n)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Indices ``rank, rank + world_size, ...`` of ``range(n)``: the ``rank``-th interleaved shard."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not a rank of world_size {world_size}")
    return list(range(rank, n, world_size))


def _shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    return dataset if world_size <= 1 else Subset(dataset, shard_indices(len(dataset), rank, world_size))


def fixed_subset_indices(n: int, num: int, seed: int) -> list[int]:
    """The same ``min(num, n)`` sorted indices of ``range(n)`` on every rank and every call."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[: min(int(num), n)].sort().values.tolist()


def class_names_or_default(names: Sequence[str] | None, num_classes: int) -> list[str]:
    return list(names) if names is not None else [str(i) for i in range(num_classes)]
