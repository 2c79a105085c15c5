"""Prototype projection ("push", Chen et al. NeurIPS 2019, Sec. 2.2 step 2) and nearest-patch search.

Push replaces every prototype by its nearest latent patch among training images of its own class::

    p_j <- argmin_{z in patches(f(x_i)), y_i = class(j)} ||z - p_j||^2

Vectorised over prototypes and images (the reference loops over prototypes in Python), and
correct under DDP: each rank scans its shard of the push set (``datamodule.push_dataloader(rank,
world_size)``, :mod:`interpzoo.datamodules.base`) and keeps, per prototype, its best (distance,
sample id, location, latent patch, self-activation map); the candidates are all-gathered and every
rank takes the same global argmin with the deterministic tie-break *(distance, then sample id, then
location)*, so every rank writes the same vectors.

Provenance is written into the network's buffers: source sample index, latent location,
receptive-field box and the 95th-percentile high-activation box of the bicubically upsampled
self-activation map (reference ``find_high_activation_crop``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from interpzoo.models.protopnet import ProtoPNet, high_activation_boxes, upsample_maps

__all__ = [
    "PushCandidates",
    "apply_push",
    "dist_info",
    "gather_candidates",
    "merge_candidates",
    "nearest_patches",
    "prune_keep_mask",
    "push_prototypes",
    "scan_push_candidates",
]

_NO_ID = torch.iinfo(torch.long).max


@dataclass
class PushCandidates:
    """Per-prototype best patch found so far (``P`` prototypes).

    Attributes:
        distance: ``(P,)`` squared distance (``inf``: no own-class image seen).
        sample_id: ``(P,)`` push-set index of the source image (``_NO_ID`` when none).
        location: ``(P,)`` flat latent location ``row * W' + col``.
        vector: ``(P, D, h, w)`` the latent patch.
        self_map: ``(P, H', W')`` distances from that patch to every patch of its source image.
        image_size: ``(2,)`` input size ``(H, W)`` of the scanned images.
    """

    distance: torch.Tensor
    sample_id: torch.Tensor
    location: torch.Tensor
    vector: torch.Tensor
    self_map: torch.Tensor
    image_size: torch.Tensor


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _lexmin(distance: torch.Tensor, ids: torch.Tensor, locs: torch.Tensor) -> torch.Tensor:
    """Index along dim 0 of the lexicographic min of ``(distance, id, loc)``; inputs ``(R, P)``."""
    best = distance.min(0).values
    tie = distance == best.unsqueeze(0)
    id_key = torch.where(tie, ids, torch.full_like(ids, _NO_ID))
    best_id = id_key.min(0).values
    tie = tie & (ids == best_id.unsqueeze(0))
    loc_key = torch.where(tie, locs, torch.full_like(locs, _NO_ID))
    return loc_key.argmin(0)


def _empty_candidates(
    net: ProtoPNet, hw_latent: tuple[int, int], device: torch.device, dtype: torch.dtype = torch.float32
) -> PushCandidates:
    p = net.num_prototypes
    layer = net.prototype_layer
    return PushCandidates(
        distance=torch.full((p,), float("inf"), device=device, dtype=dtype),
        sample_id=torch.full((p,), _NO_ID, dtype=torch.long, device=device),
        location=torch.full((p,), _NO_ID, dtype=torch.long, device=device),
        vector=torch.zeros((p, layer.dim, *layer.hw), device=device, dtype=dtype),
        self_map=torch.zeros((p, *hw_latent), device=device, dtype=dtype),
        image_size=torch.zeros(2, dtype=torch.long, device=device),
    )


def merge_candidates(cands: list[PushCandidates]) -> PushCandidates:
    """Global best per prototype over several candidate sets (ranks or shards), deterministic tie-break."""
    if len(cands) == 1:
        return cands[0]
    d = torch.stack([c.distance for c in cands])
    i = torch.stack([c.sample_id for c in cands])
    loc = torch.stack([c.location for c in cands])
    pick = _lexmin(d, i, loc)
    ar = torch.arange(d.shape[1], device=d.device)
    out = {}
    for f in fields(PushCandidates):
        if f.name == "image_size":
            out[f.name] = torch.stack([c.image_size for c in cands]).max(0).values
            continue
        stacked = torch.stack([getattr(c, f.name) for c in cands])
        out[f.name] = stacked[pick, ar]
    return PushCandidates(**out)


def gather_candidates(cand: PushCandidates) -> PushCandidates:
    """All-gather the candidates of every rank and merge them (identity without a process group)."""
    rank, world = dist_info()
    if world <= 1:
        return cand
    gathered: list[PushCandidates] = [None] * world  # type: ignore[list-item]
    parts: dict[str, list[torch.Tensor]] = {}
    for f in fields(PushCandidates):
        t = getattr(cand, f.name).contiguous()
        bufs = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(bufs, t)
        parts[f.name] = bufs
    gathered = [PushCandidates(**{k: v[r] for k, v in parts.items()}) for r in range(world)]
    return merge_candidates(gathered)


def _progress(batches: Iterable[Any], description: str) -> Iterable[Any]:
    """A progress bar on rank 0 only (push can take minutes on real data)."""
    from rich.progress import track

    total = len(batches) if hasattr(batches, "__len__") else None
    return track(batches, description=description, total=total, disable=dist_info()[0] != 0, transient=True)


@torch.no_grad()
def scan_push_candidates(
    net: ProtoPNet,
    batches: Iterable[dict[str, Any]],
    class_specific: bool = True,
    max_batches: int | None = None,
) -> PushCandidates:
    """One pass over ``batches``: per prototype, the nearest (own-class) latent patch seen.

    Every batch is a dict with ``"image"`` ``(B, C, H, W)`` in ``[0, 1]``, ``"label"`` and ``"index"``.
    """
    param = next(net.parameters())
    device = param.device
    # the images in the network's own floating dtype (float64 runs; mixed precision keeps float32 weights)
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    classes = net.prototype_classes.to(device)
    ph, pw = net.prototype_layer.hw
    cand: PushCandidates | None = None
    for bi, batch in enumerate(_progress(batches, "push: scanning training patches")):
        if max_batches is not None and bi >= max_batches:
            break
        if "index" not in batch:
            raise KeyError("push batches need an 'index' entry (the sample's position in the push set)")
        x = batch["image"].to(device, dtype=dtype)
        y = batch["label"].to(device)
        ids = batch["index"].to(device).long()
        z, d = net.push_forward(x)
        b, p, hp, wp = d.shape
        if cand is None:
            cand = _empty_candidates(net, (hp, wp), device, d.dtype)
            cand.image_size = torch.tensor(x.shape[2:], device=device)
        flat = d.flatten(2)
        loc = flat.argmin(2)  # (B, P): first minimum, i.e. the smallest flat location
        vmin = flat.gather(2, loc.unsqueeze(2)).squeeze(2)
        if class_specific:
            vmin = vmin.masked_fill(y.unsqueeze(1) != classes.unsqueeze(0), float("inf"))
        ids_bp = ids.unsqueeze(1).expand(b, p)
        pick = _lexmin(vmin, ids_bp, loc)  # (P,) image within the batch
        ar = torch.arange(p, device=device)
        bd, bid, bloc = vmin[pick, ar], ids[pick], loc[pick, ar]
        better = torch.isfinite(bd) & (
            (bd < cand.distance)
            | (
                (bd == cand.distance)
                & ((bid < cand.sample_id) | ((bid == cand.sample_id) & (bloc < cand.location)))
            )
        )
        j = better.nonzero().flatten()
        if j.numel() == 0:
            continue
        patches = F.unfold(z.to(d.dtype), (ph, pw))  # (B, D*ph*pw, L), float32 or wider as the distances
        src = patches[pick[j]]  # (n, D*ph*pw, L)
        vec = src.gather(2, bloc[j].view(-1, 1, 1).expand(-1, src.shape[1], 1)).squeeze(2)  # (n, D*ph*pw)
        # self-activation: distance of the chosen patch to every patch of its own image (exact, no
        # expansion round-off, so its minimum is exactly 0 at the source location)
        self_map = ((src - vec.unsqueeze(2)) ** 2).sum(1).view(-1, hp, wp)
        cand.distance[j] = bd[j]
        cand.sample_id[j] = bid[j]
        cand.location[j] = bloc[j]
        cand.vector[j] = vec.view(-1, net.prototype_layer.dim, ph, pw)
        cand.self_map[j] = self_map
    if cand is None:
        raise ValueError("the push loader yielded no batches")
    return cand


@torch.no_grad()
def apply_push(net: ProtoPNet, cand: PushCandidates, percentile: float = 95.0) -> dict[str, float]:
    """Write the candidates into the prototypes and their provenance buffers; returns push statistics.

    Prototypes without a candidate (no own-class image was scanned) keep their vectors and get no
    source (the reference would silently copy a zero vector into them).
    """
    found = torch.isfinite(cand.distance) & (net.prototype_mask > 0)
    j = found.nonzero().flatten()
    missing = int(((~found) & (net.prototype_mask > 0)).sum())
    if missing:
        warnings.warn(
            f"push: {missing} prototypes saw no image of their class and were not projected", stacklevel=2
        )
    layer = net.prototype_layer
    wp = cand.self_map.shape[2]
    if j.numel():
        layer.prototype_vectors.data[j] = cand.vector[j].to(layer.prototype_vectors.dtype)
        loc = torch.stack([cand.location[j] // wp, cand.location[j] % wp], 1)
        size = [int(v) for v in cand.image_size.tolist()]
        net.push_source_index[j] = cand.sample_id[j]
        net.push_source_location[j] = loc
        net.push_distance[j] = cand.distance[j].to(net.push_distance.dtype)
        net.push_rf_box[j] = net.rf_boxes(loc, size).to(net.push_rf_box.device)
        sim = layer.similarity(cand.self_map[j])
        net.push_act_box[j] = high_activation_boxes(upsample_maps(sim, size), percentile).to(
            net.push_act_box.device
        )
    sources = torch.stack([cand.sample_id[j], cand.location[j]], 1) if j.numel() else torch.zeros((0, 2))
    n_unique = int(torch.unique(sources, dim=0).shape[0]) if j.numel() else 0
    return {
        "mean_distance": float(cand.distance[j].mean()) if j.numel() else float("nan"),
        "n_pushed": int(j.numel()),
        "n_missing": missing,
        "n_unique": n_unique,
    }


def push_prototypes(
    net: ProtoPNet,
    loader: DataLoader,
    class_specific: bool = True,
    percentile: float = 95.0,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Project every prototype onto its nearest own-class training patch (eval mode, no grad).

    Under ``torch.distributed`` each rank scans its ``loader``, the candidates are all-gathered and merged,
    and every rank writes the same vectors. Must be called on every rank. Give each rank its own shard
    (``datamodule.push_dataloader(rank, world_size)``); the full set on every rank gives the same result
    with redundant work (the merge keeps one global best per prototype).

    Args:
        net: the network (unwrapped, not the DDP module).
        loader: un-augmented training images with ``"index"`` in the whole push set
            (:meth:`~interpzoo.datamodules.base.BaseDataModule.push_dataloader`).
        class_specific: search only images of the prototype's class (the paper).
        percentile: threshold of the high-activation box.
        max_batches: scan at most this many batches per rank (debug runs).
    """
    was_training = net.training
    net.eval()
    try:
        cand = scan_push_candidates(net, loader, class_specific, max_batches)
    finally:
        net.train(was_training)
    cand = gather_candidates(cand)
    return apply_push(net, cand, percentile)


@torch.no_grad()
def nearest_patches(
    net: ProtoPNet, loader: DataLoader, k: int = 6, max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """The ``k`` nearest images of every prototype (one patch per image, reference ``run_pruning.py``).

    Returns ``{"distance": (P, k), "sample_id": (P, k), "label": (P, k)}`` sorted by distance (ties by
    sample id). Under DDP each rank scans its ``loader`` (its shard, as for :func:`push_prototypes`) and
    the top-k buffers are merged; a sample seen by two ranks would count twice, so shards must not overlap.
    """
    _, world = dist_info()
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    p = net.num_prototypes
    best_d = torch.full((p, 0), float("inf"), device=device)
    best_i = torch.zeros((p, 0), dtype=torch.long, device=device)
    best_y = torch.zeros((p, 0), dtype=torch.long, device=device)
    try:
        for bi, batch in enumerate(_progress(loader, "prototypes: nearest patches")):
            if max_batches is not None and bi >= max_batches:
                break
            _, d = net.push_forward(batch["image"].to(device))
            dmin = d.flatten(2).min(2).values.t()  # (P, B)
            ids = batch["index"].to(device).long().unsqueeze(0).expand(p, -1)
            ys = batch["label"].to(device).long().unsqueeze(0).expand(p, -1)
            best_d, best_i, best_y = _topk_merge(
                torch.cat([best_d, dmin], 1), torch.cat([best_i, ids], 1), torch.cat([best_y, ys], 1), k
            )
    finally:
        net.train(was_training)
    if world > 1:
        parts = []
        for t in (best_d, best_i, best_y):
            bufs = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(bufs, t.contiguous())
            parts.append(torch.cat(bufs, 1))
        best_d, best_i, best_y = _topk_merge(*parts, k)
    return {"distance": best_d, "sample_id": best_i, "label": best_y}


def _topk_merge(d: torch.Tensor, i: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Keep the ``k`` smallest ``(distance, id)`` per row (two stable sorts give the lexicographic order)."""
    o1 = i.argsort(dim=1, stable=True)
    d, i, y = d.gather(1, o1), i.gather(1, o1), y.gather(1, o1)
    o2 = d.argsort(dim=1, stable=True)[:, :k]
    return d.gather(1, o2), i.gather(1, o2), y.gather(1, o2)


def prune_keep_mask(
    neighbour_labels: torch.Tensor, classes: torch.Tensor, threshold: int = 3
) -> torch.Tensor:
    """``(P,)`` bool: keep prototype ``j`` if at least ``threshold`` of its ``k`` nearest images are of its class.

    Reference ``prune.py``: with ``k = 6`` and ``threshold = 3`` a prototype is removed when fewer than 3 of
    its 6 nearest training patches come from its own class.
    """
    own = (neighbour_labels == classes.view(-1, 1)).sum(1)
    return own >= threshold
