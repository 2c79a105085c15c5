"""ProtoPNet training procedure under Lightning (Chen et al. NeurIPS 2019, Sec. 2.2; reference ``main.py``).

Manual optimisation with three Adam optimisers and a phase machine indexed by the Lightning epoch:

* **warm** (reference epochs ``< warm_epochs``): add-on layers + prototypes; backbone frozen.
* **joint**: backbone + add-on + prototypes with per-group learning rates; the joint ``StepLR`` is
  stepped at the *start* of every joint epoch, before training (as the reference does; warm epochs
  never step it).
* **push**, at reference epochs ``e = push_start + n * push_every``: the epoch trains as
  warm/joint, then the push runs at the start of its validation, so that validation metrics,
  checkpoint selection and the saved weights all see the projected prototypes. The reference order is
  the same: train, push, test.
* **last**: each push is followed by ``last_iters`` Lightning epochs that train only the last layer
  (one reference "last-layer iteration" = one pass over the training set, each followed by a test).
* **prune** (optional, reference ``run_pruning.py``: ``k = 6``, ``threshold = 3``): at the final push,
  prototypes with fewer than ``threshold`` own-class images among their ``k`` nearest training
  images are masked out; the following last-layer epochs re-fit ``W`` without them.

With ``final_push`` the last epoch of a run that would otherwise end on an un-projected model pushes
too, so the exported network is always interpretable. ``val/acc_pushed`` (the default ``monitor``)
equals ``val/acc`` on epochs whose prototypes are projected and 0 otherwise, so the selected
checkpoint is always a pushed one.

Deviations from the reference, each for a reason:

* frozen parts run in eval mode (BatchNorm statistics frozen): the warm phase leaves the backbone
  bit-for-bit unchanged and, after push, the prototypes stay exact latent patches during the
  last-layer epochs (the reference keeps train mode, so BN statistics drift after push);
* model selection on a validation split, never on the test set (the reference saves on test accuracy);
* pruning masks prototypes (state shapes unchanged, so DDP buckets, checkpoints and bundles stay
  valid); :meth:`models.protopnet.ProtoPNet.prune_prototypes` removes them physically.

DDP: every parameter takes part in every backward (frozen parts through a zero-weighted sum), so
no ``find_unused_parameters`` is needed; push gathers candidates across ranks
(:mod:`models.protopnet_push`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from interpzoo.layers.protopnet import (
    avg_separation_cost,
    cluster_separation_costs,
    l1_off_class,
    squared_l2_distances,
)
from interpzoo.metrics.calibration import normalised_score
from interpzoo.metrics.protopnet import (
    HUANG_HALF_FRACTION,
    ExplanationSize,
    PrototypeClassPurity,
    PrototypeConsistency,
    PrototypePartPurity,
    PrototypeStability,
    global_size,
    prototype_unique,
    stability_noise,
)
from interpzoo.models.lit_base import ClassificationModule
from interpzoo.models.protopnet import ProtoPNet, ProtoPNetOutput
from interpzoo.models.protopnet_push import dist_info, nearest_patches, prune_keep_mask, push_prototypes

__all__ = ["ProtoPNetModule", "phase_plan"]

DEFAULT_LOSS = {"ce": 1.0, "clst": 0.8, "sep": -0.08, "l1": 1e-4}
DEFAULT_OPTIM = {
    "warm": {"add_on": 3e-3, "prototypes": 3e-3, "weight_decay": 1e-3},
    "joint": {
        "backbone": 1e-4,
        "add_on": 3e-3,
        "prototypes": 3e-3,
        "weight_decay": 1e-3,
        "step_size": 5,
        "gamma": 0.1,
    },
    "last": {"lr": 1e-4},
}
DEFAULT_SCHEDULE = {
    "warm_epochs": 5,
    "push_start": 10,
    "push_every": 10,
    "last_iters": 20,
    "final_push": True,
}
DEFAULT_PUSH = {"class_specific": True, "percentile": 95.0, "measure_gap": True}
DEFAULT_PRUNE = {"enabled": False, "k": 6, "threshold": 3}
DEFAULT_METRICS = {
    "enabled": True,
    "stages": ["val", "test"],
    "stability": True,
    "stability_stages": ["val", "test"],
    "noise_seed": 0,
    "half_fraction": HUANG_HALF_FRACTION,
    "consistency_threshold": 0.8,
    "part_purity_k": 10,
    "class_purity_k": 6,
    "explanation_fraction": 0.8,
}
_OPT_INDEX = {"warm": 0, "joint": 1, "last": 2}


def _merge(defaults: dict[str, Any], given: dict[str, Any] | None, what: str) -> dict[str, Any]:
    from interpzoo.utils import did_you_mean

    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in defaults.items()}
    for k, v in (given or {}).items():
        if k not in defaults:
            raise ValueError(
                f"unknown key {what}.{k}{did_you_mean(k, defaults)}; accepted: {sorted(defaults)}"
            )
        if isinstance(defaults[k], dict):
            out[k] = _merge(defaults[k], v, f"{what}.{k}")
        else:
            out[k] = v
    return out


def phase_plan(
    max_epochs: int,
    warm_epochs: int = 5,
    push_start: int | None = 10,
    push_every: int = 10,
    last_iters: int = 20,
    final_push: bool = True,
    prune: bool = False,
) -> list[dict[str, Any]]:
    """The phase of every Lightning epoch.

    Reference epoch ``e`` is warm if ``e < warm_epochs`` else joint, and pushes when
    ``e >= push_start`` and ``(e - push_start) % push_every == 0`` (the reference's ``e % push_every == 0``
    whenever ``push_start`` is a multiple of ``push_every``, as in its 10/10 setting); every push epoch is
    followed by ``last_iters``
    last-layer epochs. The plan is truncated to ``max_epochs``; ``final_push`` makes the final epoch
    push when the plan would end on an un-projected model; ``prune`` attaches pruning to the final push.

    Returns:
        ``max_epochs`` dicts ``{"phase": "warm"|"joint"|"last", "push": bool, "prune": bool,
        "ref_epoch": int, "pushed": bool}`` (``pushed``: the epoch's validation sees projected prototypes).
    """
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    if push_start is not None and push_every < 1:
        raise ValueError(f"schedule.push_every must be >= 1, got {push_every}")
    plan: list[dict[str, Any]] = []
    ref = 0
    while len(plan) < max_epochs:
        push = push_start is not None and ref >= push_start and (ref - push_start) % push_every == 0
        plan.append(
            {
                "phase": "warm" if ref < warm_epochs else "joint",
                "push": push,
                "prune": False,
                "ref_epoch": ref,
            }
        )
        if push:
            plan += [
                {"phase": "last", "push": False, "prune": False, "ref_epoch": ref} for _ in range(last_iters)
            ]
        ref += 1
    plan = plan[:max_epochs]
    if final_push and plan[-1]["phase"] != "last" and not plan[-1]["push"]:
        plan[-1]["push"] = True
    pushed = False
    for entry in plan:
        pushed = entry["push"] or (pushed and entry["phase"] == "last")
        entry["pushed"] = pushed
    if prune:
        pushes = [e for e in plan if e["push"]]
        if pushes:
            pushes[-1]["prune"] = True
    return plan


# the part metrics, each read three times: the model, the oracle (ceiling) and random prototypes (baseline)
_PART_METRICS = ("consistency", "stability", "part_purity")
_READERS = ("", "_oracle", "_random")


class _MetricSet(nn.Module):
    def __init__(self, classes: torch.Tensor, num_classes: int, num_parts: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        # the class-purity references: a label oracle (similarity 1 on own-class images, 0 elsewhere) and the
        # random prototypes in the trained latent space
        for r in _READERS:
            setattr(self, f"class_purity{r}", PrototypeClassPurity(classes, k=cfg["class_purity_k"]))
        self.register_buffer("prototype_classes", classes.clone(), persistent=False)
        self.explanation_size = ExplanationSize(cfg["explanation_fraction"])
        self.has_parts = num_parts > 0
        if self.has_parts:
            hf = cfg["half_fraction"]
            for r in _READERS:
                setattr(
                    self,
                    f"consistency{r}",
                    PrototypeConsistency(classes, num_classes, num_parts, cfg["consistency_threshold"], hf),
                )
                setattr(self, f"stability{r}", PrototypeStability(classes, hf))
                setattr(
                    self, f"part_purity{r}", PrototypePartPurity(classes, num_parts, cfg["part_purity_k"], hf)
                )
            # the oracle of prototype j reports part (rank of j within its class) mod K
            rank = torch.zeros_like(classes)
            for c in classes.unique():
                members = (classes == c).nonzero().flatten()
                rank[members] = torch.arange(members.numel())
            self.register_buffer("oracle_parts", rank % num_parts, persistent=False)

    def reset(self) -> None:
        for m in self.children():
            m.reset()


class ProtoPNetModule(ClassificationModule):
    """ProtoPNet LightningModule (see the module docstring for the procedure).

    Args:
        loss: coefficients ``{ce, clst, sep, l1}`` (reference ``1, 0.8, -0.08, 1e-4``).
        optim: ``{warm: {add_on, prototypes, weight_decay}, joint: {backbone, add_on, prototypes,
            weight_decay, step_size, gamma}, last: {lr}}`` (Adam learning rates; reference values default).
        schedule: ``{warm_epochs, push_start, push_every, last_iters, final_push}`` (see :func:`phase_plan`);
            ``push_start: null`` never pushes except through ``final_push``.
        push: ``{class_specific, percentile, measure_gap}``; ``measure_gap`` runs an extra validation pass
            before each push to log ``val/push_gap`` (accuracy before minus after push).
        prune: ``{enabled, k, threshold}``.
        metrics: prototype metrics (:mod:`metrics.protopnet`): ``{enabled, stages, stability, stability_stages,
            noise_seed, half_fraction, consistency_threshold, part_purity_k, class_purity_k,
            explanation_fraction}``; stability costs a second forward pass, ``stability_stages`` limits it.
        **kwargs: the network config ``net`` (must build a :class:`ProtoPNet`; default ``protopnet``),
            ``data_info``, ``monitor`` (default ``val/acc_pushed``) and the other arguments of
            :class:`~interpzoo.models.lit_base.InterpModule`. Its ``optimizer`` and ``scheduler`` are unused
            (ProtoPNet builds its own three optimisers); they are accepted so that the shared config keys
            compose.
    """

    default_net = "protopnet"

    def __init__(
        self,
        *,
        loss: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        push: dict[str, Any] | None = None,
        prune: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.loss_cfg = _merge(DEFAULT_LOSS, loss, "loss")
        self.optim_cfg = _merge(DEFAULT_OPTIM, optim, "optim")
        self.schedule_cfg = _merge(DEFAULT_SCHEDULE, schedule, "schedule")
        self.push_cfg = _merge(DEFAULT_PUSH, push, "push")
        self.prune_cfg = _merge(DEFAULT_PRUNE, prune, "prune")
        self.metrics_cfg = _merge(DEFAULT_METRICS, metrics, "metrics")
        kwargs.setdefault("monitor", "val/acc_pushed")
        super().__init__(**kwargs)
        if not isinstance(self.net, ProtoPNet):
            raise TypeError(
                f"ProtoPNetModule needs a ProtoPNet network, but net.name={self.net_config()['name']!r} builds "
                f"{type(self.net).__name__}; use net.name=protopnet or a protopnet_<backbone> name"
            )
        self.automatic_optimization = False
        self._plan: list[dict[str, Any]] | None = None
        self._pushed_epoch = -1
        self._push_stats: dict[str, float] = {}
        # last push's accuracy before/after and mean projection distance, kept in checkpoints
        self.register_buffer("push_record", torch.full((3,), float("nan")))
        classes = self.net.prototype_classes
        k = self.net.num_classes
        parts = len(self.data_info.get("part_names") or [])
        stages = self.metrics_cfg["stages"] if self.metrics_cfg["enabled"] else []
        self.proto_metrics = nn.ModuleDict(
            {s: _MetricSet(classes, k, parts, self.metrics_cfg) for s in stages}
        )

    # -- phase machine ----------------------------------------------------------------------------
    @property
    def plan(self) -> list[dict[str, Any]]:
        """The phase plan of this run (:func:`phase_plan` over ``trainer.max_epochs``)."""
        if self._plan is None:
            max_epochs = 1
            if self._trainer is not None and self.trainer.max_epochs not in (None, -1):
                max_epochs = int(self.trainer.max_epochs)
            elif self._trainer is not None:
                max_epochs = 1000
            s = self.schedule_cfg
            self._plan = phase_plan(
                max_epochs,
                s["warm_epochs"],
                s["push_start"],
                s["push_every"],
                s["last_iters"],
                s["final_push"],
                bool(self.prune_cfg["enabled"]),
            )
        return self._plan

    def phase_entry(self, epoch: int | None = None) -> dict[str, Any]:
        e = self.current_epoch if epoch is None else epoch
        plan = self.plan
        return plan[min(e, len(plan) - 1)]

    def on_fit_start(self) -> None:
        self._plan = None  # rebuilt for this trainer's max_epochs
        phases = [
            (e["phase"] + ("+push" if e["push"] else "") + ("+prune" if e["prune"] else ""))
            for e in self.plan
        ]
        if self.trainer.is_global_zero:
            print(f"ProtoPNet phase plan ({len(phases)} epochs): {', '.join(phases)}")

    def _frozen_modules(self, phase: str) -> list[nn.Module]:
        net = self.net
        if phase == "warm":
            return [net.backbone]
        if phase == "last":
            return [net.backbone, net.add_on, net.prototype_layer]
        return []

    def _set_modes(self, phase: str) -> None:
        # frozen parts in eval mode: BatchNorm statistics must not move while their weights are frozen
        for m in self._frozen_modules(phase):
            m.eval()

    def on_train_epoch_start(self) -> None:
        entry = self.phase_entry()
        if entry["phase"] == "joint":
            sched = self.lr_schedulers()
            with warnings.catch_warnings():
                # the reference steps StepLR at the start of the joint epoch, before the first optimizer step
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
                sched.step()
        for name, opt in zip(("warm", "joint", "last"), self.optimizers()):
            for i, g in enumerate(
                opt.optimizer.param_groups if hasattr(opt, "optimizer") else opt.param_groups
            ):
                self.log(
                    f"lr/{name}_{i}",
                    g["lr"],
                    on_step=False,
                    on_epoch=True,
                    sync_dist=False,
                    rank_zero_only=True,
                )

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        net, o = self.net, self.optim_cfg
        add_on = list(net.add_on.parameters())
        protos = [net.prototype_layer.prototype_vectors]
        warm = torch.optim.Adam(
            [
                {"params": add_on, "lr": o["warm"]["add_on"], "weight_decay": o["warm"]["weight_decay"]},
                {"params": protos, "lr": o["warm"]["prototypes"], "weight_decay": 0.0},
            ]
        )
        joint = torch.optim.Adam(
            [
                {
                    "params": list(net.backbone.parameters()),
                    "lr": o["joint"]["backbone"],
                    "weight_decay": o["joint"]["weight_decay"],
                },
                {"params": add_on, "lr": o["joint"]["add_on"], "weight_decay": o["joint"]["weight_decay"]},
                {"params": protos, "lr": o["joint"]["prototypes"], "weight_decay": 0.0},
            ]
        )
        last = torch.optim.Adam(
            [{"params": [net.last_layer.weight], "lr": o["last"]["lr"], "weight_decay": 0.0}]
        )
        sched = torch.optim.lr_scheduler.StepLR(
            joint, step_size=int(o["joint"]["step_size"]), gamma=float(o["joint"]["gamma"])
        )
        return [warm, joint, last], [sched]

    def compute_losses(
        self, out: ProtoPNetOutput, batch: dict[str, Any], stage: str
    ) -> dict[str, torch.Tensor]:
        """Paper Eq. (1) + the last-layer L1 (reference coefficients), each term weighted."""
        c, net, y = self.loss_cfg, self.net, batch["label"]
        ident, active = net.prototype_class_identity, net.prototype_mask
        # Clst and Sep (Chen et al. 2019, Eq. (1)) share one own-class mask and make no host sync
        clst, sep = cluster_separation_costs(out.min_distances, y, ident, active)
        return {
            "ce": c["ce"] * F.cross_entropy(out.logits, y),
            "cluster": c["clst"] * clst,
            "separation": c["sep"] * sep,
            "l1": c["l1"] * l1_off_class(net.last_layer.weight * active, ident),
        }

    def _forward_phase(self, x: torch.Tensor, phase: str) -> ProtoPNetOutput:
        net = self.net
        if phase == "joint":
            return self(x)
        if phase == "warm":
            with torch.no_grad():
                f = net.features(x)
            return net.head(net.latent(f))
        with torch.no_grad():
            out = net.head(net.latent(net.features(x)))
        out.logits = net.classify(out.similarities)
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        entry = self.phase_entry()
        phase = entry["phase"]
        self._set_modes(phase)
        x, y = batch["image"], batch["label"]
        out = self._forward_phase(x, phase)
        losses = self.compute_losses(out, batch, "train")
        loss = torch.stack(list(losses.values())).sum()
        # before the backward and the step: a NaN loss must not reach the weights
        self.check_finite_loss(loss, losses, batch)
        if self.trainer.world_size > 1 and phase != "joint":
            # DDP expects a gradient for every parameter in every backward; frozen ones get an exact zero
            frozen = [p for m in self._frozen_modules(phase) for p in m.parameters()]
            loss = loss + 0.0 * sum(p.sum() for p in frozen)
        opt = self.optimizers()[_OPT_INDEX[phase]]
        # zero every gradient, not only this optimiser's: the reference lets W's gradient pile up in
        # warm/joint epochs; harmless there, but pointless work and memory
        self.net.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()

        self.train_acc(out.logits.detach(), y)
        self.train_loss(loss.detach())
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        for name, value in losses.items():
            self.log(f"train/loss_{name}", value.detach(), on_step=True, on_epoch=True)
        avg_sep = avg_separation_cost(
            out.min_distances.detach(), y, self.net.prototype_class_identity, self.net.prototype_mask
        )
        self.log("train/avg_separation", avg_sep, on_step=False, on_epoch=True)
        return loss.detach()

    # -- push -------------------------------------------------------------------------------------
    def _limit(self, value: int | float | None, total: int) -> int | None:
        if self.trainer.fast_dev_run:
            return int(self.trainer.fast_dev_run)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value < 1.0:
            return max(1, int(math.ceil(value * total)))
        return None

    @torch.no_grad()
    def _accuracy_on_val(self) -> float:
        """Accuracy of the current weights on the validation loader (all ranks; counts all-reduced)."""
        loaders = self.trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        if loader is None:
            return float("nan")
        limit = self.trainer.num_val_batches[0] if self.trainer.num_val_batches else None
        was = self.net.training
        self.net.eval()
        correct = torch.zeros(2, device=self.device)
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                break
            logits = self.net(batch["image"].to(self.device, self.dtype)).logits
            correct[0] += (logits.argmax(1) == batch["label"].to(self.device)).sum()
            correct[1] += logits.shape[0]
        self.net.train(was)
        if self.trainer.world_size > 1 and dist.is_initialized():
            dist.all_reduce(correct)
        return float(correct[0] / correct[1].clamp(min=1))

    def run_push(self, entry: dict[str, Any]) -> dict[str, float]:
        """Push (and prune when the plan says so) on every rank; returns the statistics."""
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "push_dataloader"):
            raise RuntimeError(
                "ProtoPNet push needs a datamodule with push_dataloader(rank, world_size): use a subclass of "
                "interpzoo.datamodules.base.BaseDataModule"
            )
        rank, world = dist_info()
        # this rank's interleaved shard; the batch limit counts batches of the whole push set, as before
        loader = dm.push_dataloader(rank, world)
        total = len(dm.push_dataloader()) if world > 1 else len(loader)
        if world > 1:
            # BatchNorm statistics drift per rank during a joint epoch; every rank must push with the
            # weights DDP will use (rank 0's, broadcast at the next forward)
            for b in self.net.buffers():
                dist.broadcast(b, 0)
        limit = self._limit(self.trainer.limit_train_batches, total)
        before = self._accuracy_on_val() if self.push_cfg["measure_gap"] else float("nan")
        stats = push_prototypes(
            self.net,
            loader,
            bool(self.push_cfg["class_specific"]),
            float(self.push_cfg["percentile"]),
            max_batches=limit,
        )
        stats["acc_before"] = before
        if entry.get("prune"):
            nn_ = nearest_patches(self.net, loader, int(self.prune_cfg["k"]), max_batches=limit)
            keep = prune_keep_mask(
                nn_["label"],
                self.net.prototype_classes.to(nn_["label"].device),
                int(self.prune_cfg["threshold"]),
            )
            if not bool(keep.any()):
                warnings.warn("pruning would remove every prototype; keeping all", stacklevel=2)
            else:
                with torch.no_grad():
                    self.net.prototype_mask.mul_(keep.to(self.net.prototype_mask))
                    self.net.last_layer.weight[:, ~keep.to(self.net.last_layer.weight.device)] = 0.0
                stats["n_pruned"] = int((~keep).sum())
        self.push_record[0] = before
        self.push_record[2] = stats["mean_distance"]
        self._pushed_epoch = self.current_epoch
        self._push_stats = stats
        return stats

    def _fitting(self) -> bool:
        from pytorch_lightning.trainer.states import TrainerFn

        return self.trainer.state.fn == TrainerFn.FITTING

    def on_validation_epoch_start(self) -> None:
        if self.trainer.sanity_checking or not self._fitting():
            return
        entry = self.phase_entry()
        if entry["push"] and self._pushed_epoch != self.current_epoch:
            self.run_push(entry)

    def on_train_epoch_end(self) -> None:
        # validation did not run this epoch (check_val_every_n_epoch, limit_val_batches=0): push anyway
        entry = self.phase_entry()
        if entry["push"] and self._pushed_epoch != self.current_epoch:
            self.run_push(entry)

    # -- metrics ----------------------------------------------------------------------------------
    def _stability_on(self, stage: str) -> bool:
        return bool(self.metrics_cfg["stability"]) and stage in self.metrics_cfg["stability_stages"]

    def _random_maps(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, P, h, w)`` similarity maps of random prototypes (uniform in the sigmoid latent's ``[0, 1]``,
        seeded, the same on every rank) against the trained latent ``z``: the part metrics' random baseline."""
        layer = self.net.prototype_layer
        shape = tuple(layer.prototype_vectors.shape)
        cached = getattr(self, "_random_prototypes", None)
        if cached is None or tuple(cached.shape) != shape:
            g = torch.Generator().manual_seed(int(self.metrics_cfg["noise_seed"]) + 7919)
            cached = torch.rand(shape, generator=g, dtype=torch.float64)
            self._random_prototypes = cached
        return layer.similarity(squared_l2_distances(z, cached.to(z.device, z.dtype)))

    def update_eval_metrics(self, out: ProtoPNetOutput, batch: dict[str, Any], stage: str) -> None:
        """Update the stage's prototype metrics; part metrics also for the oracle and random prototypes.

        The oracle (ceiling) of prototype ``j`` reports its part's mask average-pooled onto the latent grid
        (:func:`interpzoo.scorecard.parts.pooled_part_maps`), the random baseline is random prototypes in
        the trained latent space. Without ``part_masks`` (keypoints only, e.g. CUB) there is no oracle map.
        """
        if stage not in self.proto_metrics:
            return
        m = self.proto_metrics[stage]
        y, x = batch["label"], batch["image"]
        size = tuple(x.shape[2:])
        m.class_purity.update(out.min_distances, y)
        random_maps = self._random_maps(out.features)
        # class purity ranks images by -min_distance; any score ordered the same way gives the same top-k
        m.class_purity_random.update(-random_maps.flatten(2).amax(2), y)
        m.class_purity_oracle.update(-(y.view(-1, 1) == m.prototype_classes.view(1, -1)).float(), y)
        m.explanation_size.update(out.similarities, self.net.last_layer.weight, out.logits.argmax(1))
        if not m.has_parts:
            return
        masks = batch.get("part_masks")
        maps = {"": out.similarity_maps, "_random": random_maps}
        if masks is not None:
            maps["_oracle"] = F.adaptive_avg_pool2d(
                masks.to(out.features.dtype), out.similarity_maps.shape[2:]
            )[:, m.oracle_parts]
        if "landmarks" in batch and "landmark_visible" in batch:
            lm, vis = batch["landmarks"], batch["landmark_visible"]
            for r, mp in maps.items():
                getattr(m, f"consistency{r}").update(mp, y, lm, vis, size)
            if self._stability_on(stage) and "index" in batch:
                std = self.net.normalize.std.tolist()
                noisy_x = stability_noise(x, batch["index"], std, self.metrics_cfg["noise_seed"])
                noisy = self(noisy_x)
                noisy_maps = {"": noisy.similarity_maps, "_random": self._random_maps(noisy.features)}
                if "_oracle" in maps:
                    noisy_maps["_oracle"] = maps["_oracle"]  # the ground truth does not move with pixel noise
                for r, mp in maps.items():
                    getattr(m, f"stability{r}").update(mp, noisy_maps[r], y, lm, vis, size)
        for r, mp in maps.items():
            sims = mp.flatten(2).amax(2)
            if masks is not None:
                getattr(m, f"part_purity{r}").update(sims, mp, size, part_masks=masks)
            elif "landmarks" in batch and "landmark_visible" in batch:
                getattr(m, f"part_purity{r}").update(
                    sims, mp, size, landmarks=batch["landmarks"], visible=batch["landmark_visible"]
                )

    def _log_prototype_metrics(self, stage: str) -> None:
        net = self.net
        values: dict[str, float] = {
            "global_size": float(global_size(net.last_layer.weight, net.prototype_mask)),
            "prototype_unique": prototype_unique(
                net.prototype_mask,
                net.push_source_index,
                net.push_source_location,
                net.prototype_layer.prototype_vectors,
            ),
        }
        if net.pushed:
            values["push_distance"] = float(
                torch.nan_to_num(net.push_distance[net.prototype_mask > 0]).mean()
            )
        if stage in self.proto_metrics:
            m = self.proto_metrics[stage]
            for metric in m.children():
                if hasattr(metric, "set_active"):
                    metric.set_active(net.prototype_mask)
            if int(m.explanation_size.n) > 0 or self.trainer.world_size > 1:
                for key, name in (
                    ("mean", "prototype_class_purity"),
                    ("prune_fraction", "prototype_prune_fraction"),
                ):
                    self._calibrated(values, m, "class_purity", name, lambda v, key=key: float(v[key]))
                values["explanation_size"] = float(m.explanation_size.compute())
                if m.has_parts and m.consistency.update_count > 0:
                    self._calibrated(values, m, "consistency", "prototype_consistency", float)
                    if self._stability_on(stage):
                        self._calibrated(values, m, "stability", "prototype_stability", float)
                if m.has_parts and m.part_purity.update_count > 0:
                    pp = m.part_purity.compute()
                    self._calibrated(
                        values, m, "part_purity", "prototype_part_purity", lambda v: float(v["mean"])
                    )
                    values["prototype_part_purity_std"] = float(pp["std"])
                    values["prototype_part_related"] = float(pp["part_related"])
            m.reset()
        for k, v in values.items():
            self.log(f"{stage}/{k}", v, sync_dist=True)

    @staticmethod
    def _calibrated(values: dict[str, float], m: _MetricSet, attr: str, name: str, read: Any) -> None:
        """``name`` and, where the oracle was read (part masks), ``name_ceiling``, ``_random`` and ``_norm``.

        On the training layout these reward position as much as parts: the random prototypes and the oracle
        are read on the same images, so ``_norm`` says how far the model is from chance towards the oracle.
        """
        raw = read(getattr(m, attr).compute())
        values[name] = raw
        oracle, rnd = getattr(m, f"{attr}_oracle"), getattr(m, f"{attr}_random")
        values[f"{name}_random"] = read(rnd.compute())
        if oracle.update_count > 0:
            values[f"{name}_ceiling"] = read(oracle.compute())
            norm = normalised_score(raw, values[f"{name}_random"], values[f"{name}_ceiling"])
            if math.isfinite(norm):  # no room between chance and the oracle: nothing to normalise
                values[f"{name}_norm"] = norm

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking:
            if "val" in self.proto_metrics:
                self.proto_metrics["val"].reset()
            return
        acc = float(self.val_acc.compute())
        if self._fitting():
            entry = self.phase_entry()
            self.log("val/acc_pushed", acc if entry["pushed"] else 0.0, sync_dist=True)
            if self._pushed_epoch == self.current_epoch and self._push_stats:
                st = self._push_stats
                self.push_record[1] = acc
                self.log("val/push_gap", st["acc_before"] - acc, sync_dist=True)
                self.log("push/mean_distance", st["mean_distance"], sync_dist=True)
                self.log("push/n_unique", float(st["n_unique"]), sync_dist=True)
                self.log("push/n_missing", float(st["n_missing"]), sync_dist=True)
                if "n_pruned" in st:
                    self.log("push/n_pruned", float(st["n_pruned"]), sync_dist=True)
            elif not math.isnan(float(self.push_record[1])):
                # the last push's gap (a checkpointed buffer), every epoch after it: the final metrics of a
                # resumed run hold it as those of an uninterrupted run do
                self.log("val/push_gap", float(self.push_record[0] - self.push_record[1]), sync_dist=True)
        self._log_prototype_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_prototype_metrics("test")
        if not math.isnan(float(self.push_record[1])):
            # recorded at the last push, on the validation split
            self.log("test/push_gap", float(self.push_record[0] - self.push_record[1]), sync_dist=True)
