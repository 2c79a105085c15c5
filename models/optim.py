"""Optimisers and schedulers from plain config dicts (checkpoint-safe: no partials in hparams).

``optimizer``: ``{"name": "adam"|"adamw"|"sgd", "lr": ..., "weight_decay": ..., "momentum": ...,
"betas": [...], "param_groups": [{"params": "<glob on parameter names>", "lr": ..., ...}, ...]}``.
A parameter joins the first group whose glob matches its name; the rest form the default group.

``scheduler``: ``None`` or ``{"name": "cosine"|"step"|"multistep"|"exponential"|"constant",
"interval": "epoch"|"step", ...}`` plus the torch scheduler's own arguments
(``step_size``/``gamma``; ``milestones``; ``T_max`` defaults to ``max_epochs``; ``warmup_epochs``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from interpzoo.utils import did_you_mean

_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
_SCHEDULERS = ("cosine", "step", "multistep", "exponential", "constant")


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]], cfg: dict[str, Any]
) -> torch.optim.Optimizer:
    """Build an optimiser over the trainable parameters in ``named_params`` from ``cfg``."""
    cfg = dict(cfg)
    name = cfg.pop("name", "adam").lower()
    if name not in _OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {name!r}{did_you_mean(name, _OPTIMIZERS)}; choose one of {list(_OPTIMIZERS)}"
        )
    group_cfgs = cfg.pop("param_groups", None) or []
    params = [(n, p) for n, p in named_params if p.requires_grad]
    groups: list[dict[str, Any]] = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in group_cfgs
    ]
    default: list[nn.Parameter] = []
    for n, p in params:
        for gc, g in zip(group_cfgs, groups):
            if fnmatch.fnmatchcase(n, gc["params"]):
                g["params"].append(p)
                break
        else:
            default.append(p)
    for gc, g in zip(group_cfgs, groups):
        if not g["params"]:
            raise ValueError(
                f"optimizer.param_groups pattern {gc['params']!r} matches no trainable parameter"
            )
    all_groups = [g for g in groups if g["params"]]
    if default:
        all_groups.append({"params": default})
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    return _OPTIMIZERS[name](all_groups, **cfg)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: dict[str, Any] | None, max_epochs: int, steps_per_epoch: int = 1
) -> dict[str, Any] | None:
    """Lightning ``lr_scheduler`` dict for ``cfg`` or ``None``."""
    if not cfg:
        return None
    cfg = dict(cfg)
    name = cfg.pop("name", "constant").lower()
    interval = cfg.pop("interval", "epoch")
    warmup = int(cfg.pop("warmup_epochs", 0))
    horizon = max(1, max_epochs if interval == "epoch" else max_epochs * steps_per_epoch)
    if name not in _SCHEDULERS:
        raise ValueError(
            f"unknown scheduler {name!r}{did_you_mean(name, _SCHEDULERS)}; choose one of {list(_SCHEDULERS)}"
        )
    if name == "cosine":
        cfg.setdefault("T_max", max(1, horizon - warmup))
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, **cfg
        )
    elif name == "step":
        sched = torch.optim.lr_scheduler.StepLR(optimizer, **cfg)
    elif name == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, **cfg)
    elif name == "exponential":
        sched = torch.optim.lr_scheduler.ExponentialLR(optimizer, **cfg)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup > 0:
        warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
        sched = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, sched], milestones=[warmup])
    return {"scheduler": sched, "interval": interval, "frequency": 1}
