"""The concept whitening LightningModule (Chen, Bei & Rudin, "Concept whitening for interpretable image
recognition", *Nature Machine Intelligence* 2020).

:class:`ConceptWhiteningModule` fine-tunes a
:class:`~interpzoo.models.concept_whitening.ConceptWhiteningNet`: every ``align_every`` batches one batch
per concept, reduction across ranks, Cayley rotation update (the paper's Eq. 3, solved by a
Cayley-transform curvilinear search); concept purity metrics against the matched BN model. Its concept
batches come from the datamodule (:meth:`~interpzoo.datamodules.base.BaseDataModule.concept_dataloaders`,
one shard per rank under DDP); its report figures are drawn by :mod:`interpzoo.reports.concept_whitening`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from interpzoo.layers.concept_whitening import ConceptWhitening2d, SyncConceptWhitening2d, pool_axes
from interpzoo.models.concept_whitening import ConceptWhiteningNet, ConceptWhiteningOutput, forward_until
from interpzoo.models.lit_base import ClassificationModule
from interpzoo.models.outputs import NetworkOutput

log = logging.getLogger(__name__)

__all__ = ["ConceptWhiteningModule"]

_CAYLEY_KEYS = ("tau0", "c1", "c2", "max_tries", "outer_steps")
# held-out concept images: a fixed random subset per concept, seeded 10_000 + axis
_EVAL_SUBSET_SEED = 10_000
# chance level of the concept AUC: random unit directions in the whitened space (antithetic pairs), seeded
_RANDOM_DIRECTIONS = 16
_RANDOM_DIRECTION_SEED = 0


class ConceptWhiteningModule(ClassificationModule):
    """Fine-tunes a concept-whitened classifier; aligns the axes with concept batches (paper Eq. 3).

    Every ``align_every`` training batches (before that batch's step, as the reference code): the
    network goes to eval mode, one batch of each concept's probe set runs without gradients (stopping
    after the whitening layer), the accumulated gradients are made equal on every rank, the rotation is
    updated and broadcast, and the network returns to train mode. Concept batches never touch the
    running statistics. With ``net.alignment=contrastive`` each concept batch is followed by a batch of
    its negatives (:meth:`~interpzoo.datamodules.base.BaseDataModule.concept_negative_datasets`; on
    PartShapes the same probes re-rendered without the concept, drawn in the same shuffled order, so the
    two batches are pairs) and the axes follow the difference.

    Metrics, logged as ``val/...`` and ``test/...``:
    ``concept_auc/<concept>`` and ``concept_auc_mean`` (AUC of ``phi(z_j)`` on the held-out concept
    images; positives are the images whose concept vector has concept ``j``, negatives those without it,
    where the data gives concept vectors (PartShapes), else one-vs-all by probe set as the reference code),
    each with ``_ceiling`` (the ground-truth concept indicator as the score, same images and labels),
    ``_random`` (mean AUC of 16 seeded random unit directions of the whitened layer, pooled like the axes)
    and ``_norm`` (:class:`~interpzoo.metrics.calibration.Score`),
    ``concept_auc_fold_std`` (mean over concepts of the std over 5 folds, the
    reference protocol), ``concept_auc_best_filter/<c>`` / ``concept_auc_cav/<c>`` and their means (the
    baselines on the matched BN model at the same layer), ``concept_similarity_offdiag``,
    ``whitening_offdiag_corr``, ``whitening_cov_error``, ``rotation_orthogonality_error``; at test also
    ``concept_importance/<c>`` (increase of the loss when axis ``j`` is permuted across the batch).

    Args:
        concepts: concept names, in axis order; ``None``: ``data_info["concept_names"]`` (the concept
            folders of an image-folder dataset).
        align_every: alignment period in training batches (reference: 30 on Places365, 20 on ISIC).
        concept_batch_size: images per concept batch and rank (``None``: the training batch size).
        cayley: ``tau0``, ``c1``, ``c2``, ``max_tries``, ``outer_steps`` of the rotation update.
        init_from: bundle folder or ``.ckpt`` of a trained BN model of the same backbone (``baseline``) to
            warm-start from (the paper's recipe); it is also the matched BN model of the baselines.
        concept_eval_samples: held-out concept images per concept for the metrics (fixed, seeded subset).
        eval_every_n_epochs: concept metrics every N validation epochs (always at test).
        baselines: compute the best-filter and CAV baselines (needs ``init_from`` or a pretrained backbone).
        permutation_importance: compute ``concept_importance/<c>`` at test.
        precise_statistics_batches: before every validation of the fit (and at the end of training when no
            validation followed the last step), re-estimate the whitening layers' running mean and ``W`` on
            this many training batches (population statistics, like precise BatchNorm;
            :func:`~models.concept_whitening.precise_whitening_statistics`), so checkpoints and eval-mode
            outputs whiten the training distribution as it now is. ``0``: keep the exponential
            running averages of training (the paper's).
        concept_loss_weight: weight of :meth:`concept_feature_loss` in the training loss (``0``, the default:
            the paper's procedure, where only the rotation sees the concepts and the trunk is trained on the
            class labels alone). ``> 0`` needs ``net.alignment=contrastive`` (paired negatives).
        report_top_k, report_samples: report figure of the top-``k`` test images per axis out of the
            first ``report_samples`` test images.
        **kwargs: the network config ``net`` (must build a concept-whitening network; default ``cw``),
            ``data_info`` and the other arguments of :class:`~interpzoo.models.lit_base.InterpModule`.
    """

    default_net = "cw"

    def __init__(
        self,
        *args: Any,
        concepts: list[str] | None = None,
        align_every: int = 30,
        concept_batch_size: int | None = None,
        cayley: dict[str, Any] | None = None,
        init_from: str | None = None,
        concept_eval_samples: int = 200,
        eval_every_n_epochs: int = 1,
        baselines: bool = True,
        permutation_importance: bool = True,
        report_top_k: int = 8,
        report_samples: int = 512,
        precise_statistics_batches: int = 0,
        concept_loss_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        from interpzoo.metrics.concept_whitening import (
            ConceptAUC,
            ConceptSimilarity,
            PermutationImportance,
            WhiteningCorrelation,
        )

        bad = sorted(set(cayley or {}) - set(_CAYLEY_KEYS))
        if bad:
            raise ValueError(f"unknown cayley option(s) {bad}; known: {list(_CAYLEY_KEYS)}")
        if align_every < 0:
            raise ValueError(f"align_every must be >= 0 (0 disables alignment), got {align_every}")
        if concept_loss_weight < 0:
            raise ValueError(
                f"concept_loss_weight must be >= 0 (0: the paper's training), got {concept_loss_weight}"
            )
        if precise_statistics_batches < 0:
            raise ValueError(
                f"precise_statistics_batches must be >= 0 (0 keeps the running averages), got "
                f"{precise_statistics_batches}"
            )
        self.concept_names = self.net.concepts
        if concept_loss_weight > 0 and getattr(self.net, "alignment", "paper") != "contrastive":
            raise ValueError(
                "model.concept_loss_weight > 0 trains the features on pairs of images with and without each "
                "concept, which only the contrastive alignment draws: add model.net.alignment=contrastive"
            )
        k, c = len(self.concept_names), self.net.cw_layer.num_features
        for stage in ("val", "test"):
            setattr(self, f"{stage}_concept_auc", ConceptAUC(k))
            # reference points of the AUC: the oracle (ground-truth indicator) and random directions
            setattr(self, f"{stage}_concept_auc_oracle", ConceptAUC(k, folds=0))
            setattr(self, f"{stage}_concept_auc_random", ConceptAUC(k * _RANDOM_DIRECTIONS, folds=0))
            setattr(self, f"{stage}_concept_similarity", ConceptSimilarity(k, c))
            setattr(self, f"{stage}_whitening_corr", WhiteningCorrelation(c))
        self.test_permutation = PermutationImportance(k)
        self._concept_iters: list[Iterator[dict[str, Any]]] | None = None
        # concept batches drawn so far per axis: saved in checkpoints, so a resumed run continues each
        # concept stream where the checkpoint left it (exact resume)
        self._concept_drawn: list[int] = [0] * len(self.concept_names or [])
        self._negative_iters: list[Iterator[dict[str, Any]]] | None = None
        self._negative_drawn: list[int] = [0] * len(self.concept_names or [])
        self._reference: list[nn.Module] = []  # matched BN model, kept out of the module tree
        self._baseline_cache: dict[str, float] | None = None
        self._statistics_step = -1  # global step of the last population-statistics update

    # -- network ----------------------------------------------------------------------------------
    def net_config(self) -> dict[str, Any]:
        config = super().net_config()
        concepts = self.hparams.get("concepts")
        if concepts is None:
            concepts = self.data_info.get("concept_names")
        if concepts is None:
            raise ValueError(
                "concept whitening needs concept names: set model.concepts=[...] (PartShapes probe concepts such "
                "as has_red) or use a dataset with concept folders (data.concepts_train_dir)"
            )
        config["concepts"] = [str(c) for c in concepts]
        return config

    def build_net(self) -> nn.Module:
        net = super().build_net()
        if not isinstance(net, ConceptWhiteningNet):
            raise TypeError(
                f"ConceptWhiteningModule needs net.name=cw or cw_<backbone>, got {type(net).__name__}"
            )
        if len(net.concepts) > net.cw_layer.num_features:
            raise ValueError(
                f"{len(net.concepts)} concepts but the whitened layer has {net.cw_layer.num_features} axes"
            )
        return net

    # -- setup --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if stage == "fit":
            if dm is not None:
                self._check_concept_sets(dm)
            if self.hparams.init_from and self.trainer.ckpt_path is None:
                self.warm_start(self.hparams.init_from)
        if self.hparams.baselines and not self._reference:
            ref = self._build_reference()
            if ref is not None:
                self._reference.append(ref)

    @property
    def contrastive(self) -> bool:
        """Whether the axes are aligned contrastively (``net.alignment=contrastive``)."""
        return getattr(self.net, "alignment", "paper") == "contrastive"

    def _check_concept_sets(self, dm: Any) -> None:
        if self.contrastive:
            available = list(dm.concept_negative_datasets("train"))  # raises a DataError if there are none
            missing = [c for c in self.concept_names if c not in available]
            if missing:
                raise ValueError(
                    f"net.alignment=contrastive but concept(s) {missing} have no negative set in "
                    f"{type(dm).__name__} (available: {available}); add their negatives or use "
                    f"net.alignment=paper"
                )
        for split in ("train", "test"):
            available = list(dm.concept_datasets(split))
            missing = [c for c in self.concept_names if c not in available]
            if missing:
                raise ValueError(
                    f"concept(s) {missing} have no {split} probe set in {type(dm).__name__} (available: "
                    f"{available}). Choose model.concepts among them, or add the concepts to the data "
                    f"config (data.concepts=[...] for PartShapes, one folder per concept for image folders)."
                )

    def _source_net(self, source: str) -> nn.Module:
        from interpzoo.models.bundle import load_pretrained
        from interpzoo.models.checkpoint import load_checkpoint

        path = Path(source)
        net = load_checkpoint(path) if path.suffix == ".ckpt" else load_pretrained(source)
        return net.eval()

    @torch.no_grad()
    def warm_start(self, source: str) -> None:
        """Copy a trained BN model's weights; each whitening layer starts from its BatchNorm's statistics."""
        src = self._source_net(source)
        src_state = src.state_dict()
        own = self.net.state_dict()
        cw_prefixes = {f"backbone.body.{n}." for n in self.net.whitened_names}
        missing = [
            k
            for k in own
            if not any(k.startswith(p) for p in cw_prefixes)
            and (k not in src_state or src_state[k].shape != own[k].shape)
        ]
        if missing:
            raise ValueError(
                f"init_from={source} does not match this network ({len(missing)} tensors missing or of another "
                f"shape, e.g. {missing[:3]}): warm-start from a BN model of the same backbone and classes"
            )
        self.net.load_state_dict(
            {k: src_state[k] for k in own if k in src_state and src_state[k].shape == own[k].shape},
            strict=False,
        )
        for name, layer in self.net.cw_layers().items():
            bn = src.get_submodule(f"backbone.body.{name}")
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                raise ValueError(
                    f"init_from={source}: backbone.body.{name} is a {type(bn).__name__}, not a BatchNorm"
                )
            layer.load_batchnorm_statistics(bn.running_mean, bn.running_var, bn.eps)
        self._reference = [src]
        log.info("warm-started concept whitening from %s", source)

    def _build_reference(self) -> nn.Module | None:
        """The matched BN model: ``init_from`` or, with a pretrained backbone, the same BN trunk."""
        if self.hparams.init_from:
            try:
                return self._source_net(self.hparams.init_from)
            except Exception as e:  # noqa: BLE001 - baselines are optional; say why they are missing
                warnings.warn(
                    f"no concept baselines: cannot load init_from={self.hparams.init_from} ({e})",
                    stacklevel=2,
                )
                return None
        _, args = self.net_arguments()
        if (args.get("backbone") or {}).get("pretrained"):
            from interpzoo.models.registry import build_model

            keep = ("num_classes", "in_chans", "mean", "std", "backbone")
            return build_model({"name": "baseline", **{k: args[k] for k in keep if k in args}}).eval()
        return None

    @property
    def reference(self) -> nn.Module | None:
        """The matched BN model (``init_from``, or the pretrained BN trunk), or ``None``; kept out of the
        module tree, so it is neither trained nor saved."""
        return self._reference[0] if self._reference else None

    # -- concept batches ----------------------------------------------------------------------------
    def _concept_loaders(self, negatives: bool = False) -> list[Iterator[dict[str, Any]]]:
        """Endless iterators over this rank's shard of every concept's probe set (axis order), or of its
        negatives (same samplers and seeds: with paired negatives, batch ``i`` pairs with batch ``i``)."""
        loaders = self.trainer.datamodule.concept_dataloaders(
            "train",
            batch_size=self.hparams.concept_batch_size,
            concepts=self.concept_names,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            shuffle=True,
            negatives=negatives,
        )
        counts = self._negative_drawn if negatives else self._concept_drawn
        drawn = list(counts) + [0] * (len(loaders) - len(counts))
        return [_cycle(loader, start) for loader, start in zip(loaders.values(), drawn, strict=False)]

    def _next_concept_batch(self, j: int, negative: bool = False) -> torch.Tensor:
        if negative:
            if self._negative_iters is None:
                self._negative_iters = self._concept_loaders(negatives=True)
            iters, counts = self._negative_iters, self._negative_drawn
        else:
            if self._concept_iters is None:
                self._concept_iters = self._concept_loaders()
            iters, counts = self._concept_iters, self._concept_drawn
        batch = next(iters[j])
        while len(counts) <= j:
            counts.append(0)
        counts[j] += 1
        return batch["image"].to(self.device, self.dtype)

    @torch.no_grad()
    def align_concepts(self) -> list[float]:
        """One alignment round: a batch per concept, reduce across ranks, rotate (paper Eq. 3)."""
        layers = self.net.cw_layers()
        was_training = self.net.training
        self.net.eval()
        try:
            for j in range(len(self.concept_names)):
                self.net.concept_forward(self._next_concept_batch(j), j)
                if self.contrastive:
                    self.net.concept_forward(self._next_concept_batch(j, negative=True), j, negative=True)
            self._reduce_concept_gradients(layers)
            taus = self.net.update_rotation(**dict(self.hparams.cayley or {}))
            self._broadcast_rotations(layers)
        finally:
            for layer in layers.values():
                layer.mode = -1
            self.net.train(was_training)
        return taus

    def _distributed(self) -> bool:
        import torch.distributed as dist

        return (
            self.trainer is not None
            and self.trainer.world_size > 1
            and dist.is_available()
            and dist.is_initialized()
        )

    def _reduce_concept_gradients(self, layers: dict[str, ConceptWhitening2d]) -> None:
        # Synced layers already reduced their gradients; plain layers (DDP without the sync plugin) hold
        # per-rank averages of equal-sized batches, whose mean is the global one (sum_G is linear in them).
        if not self._distributed():
            return
        import torch.distributed as dist

        world = self.trainer.world_size
        for layer in layers.values():
            if isinstance(layer, SyncConceptWhitening2d):
                continue
            for t in layer.concept_statistics():
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(world)

    def _broadcast_rotations(self, layers: dict[str, ConceptWhitening2d]) -> None:
        if not self._distributed():
            return
        import torch.distributed as dist

        for layer in layers.values():
            if not isinstance(layer, SyncConceptWhitening2d):  # the synced layer broadcasts itself
                dist.broadcast(layer.running_rot, src=0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        weight = float(self.hparams.get("concept_loss_weight", 0.0))
        if weight > 0 and self.concept_names:
            axis = int(self.global_step) % len(self.concept_names)  # one concept per step, in turn
            concept = self.concept_feature_loss(axis)
            self.log("train/concept_feature_loss", concept.detach(), on_step=True, on_epoch=True)
            loss = loss + weight * concept
        return loss

    def concept_feature_loss(self, axis: int) -> torch.Tensor:
        """Contrastive loss of axis ``axis`` on one concept batch ``x+`` and its paired negatives ``x-``.

        ``0.5 * (mean_i softplus(a_i- - a_i+) + mean_{i,k} softplus(a_k- - a_i+))`` with ``a = phi_j(z(x)) / s``:
        the axis' pooled activation (``net.activation_mode``) of the (first) whitening layer's output ``z``,
        with the running statistics and the current rotation, in units of ``s``, its standard deviation over
        the batch's positives and negatives together. The scale matters: without ``s`` the cheapest way down
        is to amplify the axis, which the next whitening update divides out again; on PartShapes' circle axis
        that left the training pairs themselves unfitted (paired right way 0.90 at best, AUC 0.62-0.73),
        while with ``s`` only a better separation lowers the loss (training pairs fitted, AUC 0.98).

        The first term is logistic regression on the paired difference (on PartShapes ``x_i-`` is ``x_i+``
        re-rendered without the concept: the edit the intervention metric applies); the second ranks every image with the concept above every image
        without it across images, a pairwise surrogate of the concept AUC. The gradient reaches the layers
        *before* the whitening layer only: the rotation keeps following the alignment update (Chen, Bei &
        Rudin 2020, Eq. 3, contrastive here) and the statistics are not moved by concept images.

        Why: the paper trains the trunk on the class labels alone, so a rotation can only align an axis with a
        concept the features already separate. On PartShapes' default classes the part shapes are not needed
        to tell the classes apart, and the circle axis follows circle edits at chance
        (``benchmarks/concepts_results*.md``). This term (an extension, off by default) asks the features to
        encode each concept along its axis.
        """
        layer = self.net.cw_layer
        pos = self._next_concept_batch(axis)
        neg = self._next_concept_batch(axis, negative=True)
        was_training = self.net.training
        self.net.eval()  # running statistics: concept images neither use nor move the batch statistics
        try:
            z = forward_until(self.net, layer, torch.cat([pos, neg]), capture="output")
        finally:
            self.net.train(was_training)
        a = pool_axes(z[:, axis : axis + 1], self.net.activation_mode)[:, 0]
        a = a / a.std().clamp_min(1e-6)
        a_pos, a_neg = a[: len(pos)], a[len(pos) :]
        paired = F.softplus(-(a_pos - a_neg)).mean()
        # every image with the concept above every image without it: a pairwise AUC surrogate across images
        ranked = F.softplus(-(a_pos[:, None] - a_neg[None, :])).mean()
        return 0.5 * (paired + ranked)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        every = int(self.hparams.align_every)
        if every <= 0 or not self.concept_names or (batch_idx + 1) % every != 0:
            return
        taus = self.align_concepts()
        self.log("train/cw_tau", float(taus[0]), on_step=True, on_epoch=False, prog_bar=False)
        self.log(
            "train/rotation_orthogonality_error",
            self.net.cw_layer.rotation_orthogonality_error(),
            on_step=True,
            on_epoch=False,
        )

    # -- checkpoints (exact resume) -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["concept_whitening"] = {
            "concept_batches_drawn": [int(c) for c in self._concept_drawn],
            "negative_batches_drawn": [int(c) for c in self._negative_drawn],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("concept_whitening") or {}
        if "concept_batches_drawn" in state:
            self._concept_drawn = [int(c) for c in state["concept_batches_drawn"]]
            self._concept_iters = None  # rebuilt from the restored positions
        if "negative_batches_drawn" in state:
            self._negative_drawn = [int(c) for c in state["negative_batches_drawn"]]
            self._negative_iters = None

    # -- metrics ------------------------------------------------------------------------------------
    def update_eval_metrics(self, out: NetworkOutput, batch: dict[str, Any], stage: str) -> None:
        getattr(self, f"{stage}_whitening_corr").update(out.whitened.detach())
        if stage == "test" and self.hparams.permutation_importance and self.concept_names:
            self._update_permutation(out, batch)

    @torch.no_grad()
    def _update_permutation(self, out: ConceptWhiteningOutput, batch: dict[str, Any]) -> None:
        x, y = batch["image"], batch["label"]
        base = F.cross_entropy(out.logits, y, reduction="none")
        # Seed the permutation by the batch's sample indices: identical on reruns and independent of rank.
        seed = int(batch["index"].sum()) if "index" in batch else 0
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(x.shape[0], generator=g).to(x.device)
        losses, errors = [], []
        for j in range(len(self.concept_names)):
            handle = self.net.cw_layer.register_forward_hook(_permute_axis_hook(j, perm))
            try:
                logits = self.net(x).logits
            finally:
                handle.remove()
            losses.append(F.cross_entropy(logits, y, reduction="none"))
            errors.append((logits.argmax(1) != y).float())
        self.test_permutation.update(
            base, (out.logits.argmax(1) != y).float(), torch.stack(losses, 1), torch.stack(errors, 1)
        )

    def _concept_columns(self) -> list[int] | None:
        """Column of each aligned concept in the data's concept vectors (PartShapes), or ``None``."""
        renderer = getattr(self.trainer.datamodule, "renderer", None)
        names = getattr(renderer, "concept_names", None)
        if names is None or not all(c in names for c in self.concept_names):
            return None
        return [list(names).index(c) for c in self.concept_names]

    def _concept_targets(
        self, batch: dict[str, Any], j: int, n: int, columns: list[int] | None
    ) -> torch.Tensor:
        """``(B, K)`` 0/1 targets: the images' concept vectors where the data has them, else probe set ``j``.

        Probe images show their concept on one part with the other attributes drawn at random, so by probe
        set a "negative" of ``has_red`` is red 15 % of the time; the concept vector says which images show it.
        """
        if columns is not None and "concepts" in batch:
            return (batch["concepts"][:, columns] > 0.5).long().to(self.device)
        k = len(self.concept_names)
        return F.one_hot(torch.full((n,), j, dtype=torch.long), k).to(self.device)

    def _concept_eval_loader(self, rank_shard: bool) -> Iterator[tuple[torch.Tensor, ...]]:
        """``(images, targets (B, K), probe set index (B,), ids (B,))`` batches of the fixed held-out concept
        subset (a shard per rank).

        ``ids`` are unique over the concepts, ``probe set * 2**32 + index in its concept set``.
        """
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if rank_shard else (1, 0)
        limit = 1 if self.trainer.fast_dev_run else None
        loaders = self.trainer.datamodule.concept_dataloaders(
            "test",
            concepts=self.concept_names,
            rank=rank,
            world_size=world,
            shuffle=False,
            num_samples=int(self.hparams.concept_eval_samples),
            sample_seed=_EVAL_SUBSET_SEED,
        )
        columns = self._concept_columns()
        for j, loader in enumerate(loaders.values()):
            for i, batch in enumerate(loader):
                if limit is not None and i >= limit:
                    break
                x = batch["image"].to(self.device, self.dtype)
                probe = torch.full((x.shape[0],), j, dtype=torch.long, device=self.device)
                if "index" not in batch:
                    raise KeyError("concept datasets must give each image its 'index' in the concept set")
                targets = self._concept_targets(batch, j, x.shape[0], columns)
                yield x, targets, probe, probe * 2**32 + batch["index"].to(self.device).long()

    def _random_directions(self, dim: int) -> torch.Tensor:
        """``(D, C)`` fixed random unit directions (same on every rank and epoch; not saved)."""
        from interpzoo.metrics.concept_whitening import random_directions

        cached = getattr(self, "_directions", None)
        if cached is None or cached.shape[1] != dim:
            cached = random_directions(dim, _RANDOM_DIRECTIONS, _RANDOM_DIRECTION_SEED)
            self._directions = cached
        return cached

    @torch.no_grad()
    def _concept_metrics(self, stage: str) -> None:
        from interpzoo.metrics.calibration import Score
        from interpzoo.metrics.concept_whitening import project_and_pool

        auc, sim = getattr(self, f"{stage}_concept_auc"), getattr(self, f"{stage}_concept_similarity")
        oracle, rand = (
            getattr(self, f"{stage}_concept_auc_oracle"),
            getattr(self, f"{stage}_concept_auc_random"),
        )
        k, d = len(self.concept_names), _RANDOM_DIRECTIONS
        was_training = self.net.training
        self.net.eval()
        try:
            for x, targets, probe, ids in self._concept_eval_loader(rank_shard=True):
                out = self.net(x)
                auc.update(out.concept_activations, targets, ids)
                oracle.update(targets.float(), targets, ids)
                directions = self._random_directions(out.whitened.shape[1])
                scores = project_and_pool(out.whitened.double(), directions, self.net.activation_mode)
                # column j * D + d: direction d scored for concept j
                rand.update(scores.repeat(1, k), targets.repeat_interleave(d, dim=1), ids)
                sim.update(out.whitened.mean((2, 3)), probe)
        finally:
            self.net.train(was_training)
        result = auc.compute()  # all ranks: the states are all-gathered
        ceiling = oracle.compute()["auc"]
        chance = rand.compute()["auc"].view(k, d).nanmean(1)
        for m in (auc, oracle, rand):
            m.reset()
        offdiag = sim.compute()["offdiag_mean"]
        sim.reset()
        values: dict[str, float] = {}
        rows = [
            (f"concept_auc/{c}", result["auc"][j], ceiling[j], chance[j])
            for j, c in enumerate(self.concept_names)
        ]
        rows.append(("concept_auc_mean", result["auc"].nanmean(), ceiling.nanmean(), chance.nanmean()))
        for name, raw, top, rnd in rows:
            row = Score("concept_whitening", name, float(raw), float(top), float(rnd))
            values.update({f"{stage}/{key}": v for key, v in row.logged().items()})
        values[f"{stage}/concept_auc_fold_std"] = float(result["fold_std"].nanmean())
        values[f"{stage}/concept_similarity_offdiag"] = float(offdiag)
        values.update({f"{stage}/{k}": v for k, v in self._baselines().items()})
        for k, v in values.items():
            self.log(k, v, sync_dist=True, rank_zero_only=False)

    @torch.no_grad()
    def _baselines(self) -> dict[str, float]:
        """Best single filter and linear probe (CAV) AUCs on the matched BN model (computed once)."""
        if self._baseline_cache is not None:
            return self._baseline_cache
        if not self._reference or not self.hparams.baselines:
            return {}
        from interpzoo.metrics.concept_whitening import best_filter_auc, linear_probe_auc

        ref = self._reference[0].to(self.device).eval()
        layer_name = f"backbone.body.{self.net.whitened_names[0]}"

        def feats(batches: Iterator[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
            maps, labels = [], []
            for x, y, *_ in batches:
                maps.append(forward_until(ref, layer_name, x).cpu())
                labels.append(y.cpu())
            return torch.cat(maps), torch.cat(labels)

        columns = self._concept_columns()

        def train_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            loaders = self.trainer.datamodule.concept_dataloaders(
                "train",
                batch_size=64,
                concepts=self.concept_names,
                shuffle=False,
                num_samples=int(self.hparams.concept_eval_samples),
            )
            for j, loader in enumerate(loaders.values()):
                for i, batch in enumerate(loader):
                    if self.trainer.fast_dev_run and i >= 1:
                        break
                    x = batch["image"].to(self.device, self.dtype)
                    yield x, self._concept_targets(batch, j, x.shape[0], columns)

        # Every rank computes the same numbers from the full (small) sets: no collectives needed.
        test_maps, test_y = feats(self._concept_eval_loader(rank_shard=False))
        train_maps, train_y = feats(train_batches())
        mode = self.net.activation_mode
        k = len(self.concept_names)
        filt, _ = best_filter_auc(pool_axes(test_maps, mode), test_y, k)
        cav = linear_probe_auc(train_maps.mean((2, 3)), train_y, test_maps.mean((2, 3)), test_y, k)
        out: dict[str, float] = {}
        for j, c in enumerate(self.concept_names):
            out[f"concept_auc_best_filter/{c}"] = float(filt[j])
            out[f"concept_auc_cav/{c}"] = float(cav[j])
        out["concept_auc_mean_best_filter"] = float(filt.nanmean())
        out["concept_auc_mean_cav"] = float(cav.nanmean())
        self._baseline_cache = out
        return out

    def _log_layer_metrics(self, stage: str) -> None:
        corr = getattr(self, f"{stage}_whitening_corr")
        res = corr.compute()  # all ranks: sum-reduced states
        corr.reset()
        if torch.isfinite(res["offdiag_mean"]):
            self.log(f"{stage}/whitening_offdiag_corr", float(res["offdiag_mean"]), sync_dist=True)
            self.log(f"{stage}/whitening_cov_error", float(res["cov_error"]), sync_dist=True)
        self.log(
            f"{stage}/rotation_orthogonality_error",
            self.net.cw_layer.rotation_orthogonality_error(),
            sync_dist=True,
        )

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        n = int(self.hparams.precise_statistics_batches)
        if n <= 0 or self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return  # fit only: a plain validate()/test() evaluates the statistics it was given
        self.update_whitening_statistics(n)

    def on_train_end(self) -> None:
        super().on_train_end()
        n = int(self.hparams.precise_statistics_batches)
        if n > 0 and self._statistics_step != self.global_step:  # no validation after the last step
            self.update_whitening_statistics(n)

    def update_whitening_statistics(self, num_batches: int) -> int:
        """Population statistics of the whitening layers from ``num_batches`` training batches (see
        ``precise_statistics_batches``); returns the images seen per layer (this rank)."""
        from interpzoo.models.concept_whitening import precise_whitening_statistics

        loader = self.trainer.datamodule.train_dataloader()  # this rank's shard of the global batches
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(self.current_epoch)
        count = min(num_batches, len(loader))

        def batches() -> Iterator[torch.Tensor]:
            for i, batch in enumerate(loader):
                if i >= count:
                    break
                yield batch["image"].to(self.device)

        # the data pipeline's random draws (augmentations) must not shift the training run's random stream
        with torch.random.fork_rng(devices=[]):
            seen = precise_whitening_statistics(self.net, batches)
        self._statistics_step = self.global_step
        return seen

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking:
            self.val_whitening_corr.reset()
            return
        self._log_layer_metrics("val")
        every = max(1, int(self.hparams.eval_every_n_epochs))
        if self.concept_names and (self.current_epoch + 1) % every == 0:
            self._concept_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_layer_metrics("test")
        if self.concept_names:
            self._concept_metrics("test")
            if self.hparams.permutation_importance:
                res = self.test_permutation.compute()
                for j, c in enumerate(self.concept_names):
                    self.log(f"test/concept_importance/{c}", float(res["loss_increase"][j]), sync_dist=True)
                    self.log(
                        f"test/concept_importance_acc/{c}", float(res["error_increase"][j]), sync_dist=True
                    )
                self.test_permutation.reset()


def _cycle(loader: Any, start: int = 0) -> Iterator[dict[str, Any]]:
    """Endless iteration over ``loader``, a new shuffle per pass (its ``DistributedSampler``'s epoch).

    ``start``: batches already drawn (a resumed run): the stream continues with batch ``start``, the pass and
    its shuffle being a function of the count only.
    """
    n = len(loader)
    epoch, skip = (start // n, start % n) if n else (0, 0)
    while True:
        loader.sampler.set_epoch(epoch)
        it = iter(loader)
        for _ in range(skip):  # the skipped batches are loaded once (probe sets are small)
            next(it)
        skip = 0
        yield from it
        epoch += 1


def _permute_axis_hook(axis: int, perm: torch.Tensor) -> Any:
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        out[:, axis] = output[perm, axis]
        return out

    return hook
