"""ProtoPNet (Chen et al. 2019): layer, losses, push, pruning, phases, metrics and runs.

Every test compares with an independent computation: ``torch.cdist`` / ``unfold`` brute force,
Python loops, hand-computed values, or the single-process result (DDP).
"""

from __future__ import annotations

import math
import os

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from interpzoo.datamodules.base import shard_indices
from interpzoo.layers.protopnet import (
    PrototypeLayer,
    avg_separation_cost,
    cluster_cost,
    l1_off_class,
    log_similarity,
    prototype_class_identity,
    separation_cost,
    squared_l2_distances,
)
from interpzoo.metrics.protopnet import (
    ExplanationSize,
    PrototypeClassPurity,
    PrototypeConsistency,
    PrototypePartPurity,
    PrototypeStability,
    explanation_size,
    global_size,
    landmark_hits,
    prototype_unique,
    stability_noise,
)
from interpzoo.models.lit_protopnet import ProtoPNetModule, phase_plan
from interpzoo.models.protopnet import ProtoPNet, high_activation_boxes
from interpzoo.models.protopnet_push import (
    merge_candidates,
    nearest_patches,
    prune_keep_mask,
    push_prototypes,
    scan_push_candidates,
)
from tests.conftest import TINY_DATA

K, M, D = 3, 2, 8


def _net(seed: int = 0, **kw) -> ProtoPNet:
    torch.manual_seed(seed)
    args = {
        "num_classes": K,
        "backbone": {"name": "resnet18s", "width": 4},
        "prototypes_per_class": M,
        "prototype_dim": D,
    }
    args.update(kw)
    return ProtoPNet(**args).eval()


def _dataset(n: int = 12, seed: int = 1, size: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    return [{"image": x[i], "label": torch.tensor(i % K), "index": torch.tensor(i)} for i in range(n)]


def _patches(z: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``(B, L, D*h*w)`` every latent patch, by unfold (the brute-force reference)."""
    return torch.nn.functional.unfold(z, hw).transpose(1, 2)


# -- 1. distances -------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(1, 1), (2, 2)])
def test_distances_equal_bruteforce_cdist(hw) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.rand(3, 6, 5, 4, generator=g)
    p = torch.rand(7, 6, *hw, generator=g)
    d = squared_l2_distances(z, p)
    ho, wo = 5 - hw[0] + 1, 4 - hw[1] + 1
    brute = torch.cdist(_patches(z.double(), hw), p.double().flatten(1).unsqueeze(0)) ** 2  # (B, L, P)
    brute = brute.transpose(1, 2).reshape(3, 7, ho, wo)
    assert d.shape == (3, 7, ho, wo)
    assert torch.allclose(d.double(), brute, atol=1e-4)
    assert (d >= 0).all()


def test_distances_are_fp32_and_clamped_under_autocast() -> None:
    z = torch.rand(2, 16, 3, 3) * 50
    p = z[0:1, :, 1:2, 1:2].clone()  # one prototype equals a patch: true distance 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = squared_l2_distances(z.bfloat16(), p.bfloat16())
    assert d.dtype == torch.float32
    assert (d >= 0).all()  # round-off of ||z||^2 - 2 z.p + ||p||^2 is clamped
    ref = ((z.bfloat16().float() - p.bfloat16().float()) ** 2).sum(1, keepdim=True)
    assert torch.allclose(d, ref, atol=1e-2, rtol=1e-3)


def test_similarity_and_layer_shapes() -> None:
    assert float(log_similarity(torch.tensor(0.0))) == pytest.approx(math.log(1e4), rel=1e-6)
    assert float(log_similarity(torch.tensor(1e6))) < 1e-5
    layer = PrototypeLayer(K, M, D)
    out = layer(torch.rand(2, D, 4, 4))
    assert out["distances"].shape == (2, K * M, 4, 4) and out["min_distances"].shape == (2, K * M)
    assert torch.allclose(out["min_distances"], out["distances"].flatten(2).min(2).values)
    assert torch.allclose(out["similarities"], out["similarity_maps"].flatten(2).max(2).values)
    with pytest.raises(ValueError, match="prototype_dim"):
        layer(torch.rand(2, D + 1, 4, 4))


# -- 2. last layer ------------------------------------------------------------------------------
def test_last_layer_init_pattern() -> None:
    net = _net()
    w = net.last_layer.weight
    assert net.last_layer.bias is None
    assert set(w.unique().tolist()) == {1.0, -0.5}
    for k in range(K):
        for j in range(K * M):
            assert float(w[k, j].detach()) == (1.0 if j // M == k else -0.5)
    ident = prototype_class_identity(K, M)
    assert torch.equal(net.prototype_class_identity, ident)


# -- 4. masked costs ----------------------------------------------------------------------------
def test_masked_costs_equal_bruteforce_loop() -> None:
    g = torch.Generator().manual_seed(3)
    # distances far beyond max_dist = D: the reference's max_dist trick would be wrong here
    dmin = torch.rand(5, K * M, generator=g) * 100 * D
    y = torch.tensor([0, 2, 1, 1, 0])
    ident = prototype_class_identity(K, M)
    active = torch.ones(K * M)
    active[1] = 0
    clst, sep, avg = [], [], []
    for i in range(5):
        own = [dmin[i, j] for j in range(K * M) if j // M == y[i] and active[j] > 0]
        other = [dmin[i, j] for j in range(K * M) if j // M != y[i] and active[j] > 0]
        clst.append(min(own))
        sep.append(min(other))
        avg.append(sum(dmin[i, j] for j in range(K * M) if j // M != y[i] and active[j] > 0) / len(other))
    assert float(cluster_cost(dmin, y, ident, active)) == pytest.approx(float(sum(clst) / 5), rel=1e-6)
    assert float(separation_cost(dmin, y, ident, active)) == pytest.approx(float(sum(sep) / 5), rel=1e-6)
    assert float(avg_separation_cost(dmin, y, ident, active)) == pytest.approx(float(sum(avg) / 5), rel=1e-6)


def test_l1_off_class_bruteforce() -> None:
    w = torch.randn(K, K * M)
    ident = prototype_class_identity(K, M)
    brute = sum(abs(float(w[k, j])) for k in range(K) for j in range(K * M) if j // M != k)
    assert float(l1_off_class(w, ident)) == pytest.approx(brute, rel=1e-6)


# -- 3. push ------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(1, 1), (2, 2)])
def test_push_projects_onto_nearest_own_class_patch(hw) -> None:
    net = _net(prototype_hw=list(hw))
    data = _dataset()
    x = torch.stack([d["image"] for d in data])
    y = torch.stack([d["label"] for d in data])
    with torch.no_grad():
        z = net.latent(net.features(x))
        before = net.prototype_layer.prototype_vectors.detach().flatten(1).clone()
    pats = _patches(z, hw)  # (N, L, D*h*w)
    stats = push_prototypes(net, DataLoader(data, batch_size=5))
    assert stats["n_pushed"] == K * M and stats["n_missing"] == 0
    after = net.prototype_layer.prototype_vectors.detach().flatten(1)
    wp = z.shape[3] - hw[1] + 1
    for j in range(K * M):
        own = (y == j // M).nonzero().flatten()
        d = ((pats[own] - before[j]) ** 2).sum(-1)  # brute force, pre-push prototype
        best = int(d.flatten().argmin())
        i, loc = int(own[best // d.shape[1]]), best % d.shape[1]
        assert int(net.push_source_index[j]) == i
        assert net.push_source_location[j].tolist() == [loc // wp, loc % wp]
        assert torch.allclose(after[j], pats[i, loc], atol=1e-6)  # an actual latent patch
        assert float(net.push_distance[j]) == pytest.approx(float(d.min()), rel=1e-4, abs=1e-5)
    out = net(x)
    for j in range(K * M):
        i = int(net.push_source_index[j])
        assert int(y[i]) == j // M
        assert float(out.min_distances[i, j].detach()) < 1e-5
        assert float(out.similarities[i, j]) == pytest.approx(math.log(1e4), abs=0.1)
    boxes = net.push_act_box
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    assert (net.push_rf_box >= 0).all() and (net.push_rf_box[:, 2:] <= 32).all()


def test_push_is_independent_of_batching_and_merge_order() -> None:
    data = _dataset(n=15)
    a, b = _net(), _net()
    push_prototypes(a, DataLoader(data, batch_size=4))
    push_prototypes(b, DataLoader(data, batch_size=15))
    assert torch.equal(a.push_source_index, b.push_source_index)
    assert torch.allclose(a.prototype_layer.prototype_vectors, b.prototype_layer.prototype_vectors, atol=1e-6)
    # shards merged in either order give the same winners
    c = _net()
    s0 = scan_push_candidates(c, DataLoader(data[0::2], batch_size=3))
    s1 = scan_push_candidates(c, DataLoader(data[1::2], batch_size=3))
    m1, m2 = merge_candidates([s0, s1]), merge_candidates([s1, s0])
    assert torch.equal(m1.sample_id, m2.sample_id) and torch.equal(m1.sample_id, a.push_source_index)


def test_high_activation_box_by_hand() -> None:
    m = torch.zeros(1, 10, 10)
    m[0, 2:4, 5:8] = 1.0  # 6 of 100 pixels >= the 95th percentile
    assert high_activation_boxes(m).tolist() == [[5, 2, 8, 4]]


def test_receptive_field_of_resnet34_layer4() -> None:
    net = ProtoPNet(num_classes=2, backbone={"name": "resnet34"}, prototypes_per_class=1, prototype_dim=8)
    # torchvision resnet34 up to layer4: jump 32, receptive field 899 (conv1 7/2, maxpool 3/2, 16 blocks)
    assert (net.rf_jump, net.rf_size) == (32.0, 899.0)


# -- 5. pruning ---------------------------------------------------------------------------------
def test_pruning_keeps_shapes_and_kept_logits() -> None:
    net = _net()
    x = torch.stack([d["image"] for d in _dataset(6)])
    keep = torch.tensor([True, False, True, True, False, True])
    with torch.no_grad():
        out = net(x)
        expected = out.similarities[:, keep] @ net.last_layer.weight[:, keep].t()
        # mask-based pruning (what training does): same logits, shapes unchanged
        net.prototype_mask.copy_(keep.float())
        assert torch.allclose(net(x).logits, expected, atol=1e-5)
        net.prototype_mask.fill_(1.0)
        net.prune_prototypes(keep)
    p = int(keep.sum())
    assert net.last_layer.weight.shape == (K, p)
    assert net.prototype_class_identity.shape == (p, K)
    assert net.prototype_layer.prototype_vectors.shape == (p, D, 1, 1)
    assert net.push_source_index.shape == (p,)
    assert torch.allclose(net(x).logits, expected, atol=1e-5)


def test_prune_rule_and_nearest_patches_bruteforce() -> None:
    labels = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 2, 2]])
    assert prune_keep_mask(labels, torch.tensor([0, 0]), threshold=3).tolist() == [True, False]
    net = _net()
    data = _dataset(n=9)
    nn_ = nearest_patches(net, DataLoader(data, batch_size=4), k=4)
    x = torch.stack([d["image"] for d in data])
    with torch.no_grad():
        dmin = net(x).min_distances.t()  # (P, N)
    order = dmin.argsort(1)[:, :4]
    assert torch.equal(nn_["sample_id"], order)
    assert torch.allclose(nn_["distance"], dmin.gather(1, order))
    assert torch.equal(nn_["label"], order % K)


# -- phases ----------------------------------------------------------------------------------------
def test_phase_plan_reference_schedule() -> None:
    plan = phase_plan(91, warm_epochs=5, push_start=10, push_every=10, last_iters=20)
    assert [e["phase"] for e in plan[:5]] == ["warm"] * 5 and plan[5]["phase"] == "joint"
    pushes = [i for i, e in enumerate(plan) if e["push"]]
    assert pushes == [10, 10 + 1 + 20 + 9, 10 + 2 * 21 + 18]  # reference epochs 10, 20, 30
    assert [plan[p]["ref_epoch"] for p in pushes] == [10, 20, 30]
    assert all(plan[p + i]["phase"] == "last" for p in pushes for i in range(1, 21))
    assert plan[-1]["phase"] == "last" and plan[-1]["pushed"] and not plan[9]["pushed"]
    short = phase_plan(3, warm_epochs=1, push_start=None, prune=True)
    assert short[-1]["push"] and short[-1]["prune"]  # final push (and pruning) when the plan ends unpushed


def _tiny_dm(**kw):
    from interpzoo.datamodules.partshapes_dm import PartShapesDataModule

    args = {"num_classes": 3, "n_train": 48, "n_val": 16, "n_test": 16, "batch_size": 24, "cache": True}
    args.update(kw)
    return PartShapesDataModule(**args)


class _Snapshots(pl.Callback):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.lrs.append(pl_module.optimizers()[1].optimizer.param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


def test_phases_warm_joint_push_last(tmp_path) -> None:
    """Warm leaves the backbone unchanged; last changes only W; StepLR steps at joint-epoch starts;
    after push + last-layer epochs every prototype is still an exact own-class patch."""
    dm = _tiny_dm()
    dm.setup()
    torch.manual_seed(0)
    module = ProtoPNetModule(
        net={
            "prototypes_per_class": 2,
            "prototype_dim": 16,
            "backbone": {"name": "resnet18s", "width": 4},
        },
        data_info=dm.data_info,
        optim={"joint": {"step_size": 2, "gamma": 0.5, "backbone": 1e-3}, "last": {"lr": 1e-2}},
        schedule={"warm_epochs": 1, "push_start": 3, "push_every": 3, "last_iters": 1},
        prune={"enabled": True, "k": 6, "threshold": 3},
        metrics={"enabled": False},
    )
    snaps = _Snapshots()
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[snaps],
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert [e["phase"] for e in module.plan] == ["warm", "joint", "joint", "joint", "last"]
    assert module.plan[3]["push"] and module.plan[3]["prune"]
    s = snaps.states  # at the start of epochs 0..4, then the end

    def changed(a, b, prefix):
        return [k for k in a if k.startswith(prefix) and not torch.equal(a[k], b[k])]

    # warm: backbone (weights and BN statistics) unchanged, add-on and prototypes trained, W untouched
    assert changed(s[0], s[1], "backbone.") == []
    assert changed(s[0], s[1], "add_on.") and changed(s[0], s[1], "prototype_layer.prototype_vectors")
    assert changed(s[0], s[1], "last_layer.") == []
    assert changed(s[1], s[2], "backbone.")  # joint trains the backbone
    # last: only the last layer changes
    assert set(changed(s[4], s[5], "")) == {"last_layer.weight"}
    # StepLR(step_size=2, gamma=0.5) stepped at the start of joint epochs 1, 2, 3 -> 1, 2, 3 steps
    assert snaps.lrs[1:4] == pytest.approx([1e-3, 5e-4, 5e-4])
    assert snaps.lrs[4] == pytest.approx(5e-4)  # last-layer epochs do not step it
    net = module.net.eval()
    # pruning (k=6, threshold 3) masked exactly the prototypes the rule names; their W columns stay 0
    nn_ = nearest_patches(net, dm.push_dataloader(), k=6)
    keep = prune_keep_mask(nn_["label"], net.prototype_classes, 3)
    assert torch.equal(net.prototype_mask > 0, keep)
    assert (net.last_layer.weight[:, ~keep] == 0).all()
    push_set = dm.push_set
    for j in range(net.num_prototypes):
        item = push_set[int(net.push_source_index[j])]
        assert int(item["label"]) == int(net.prototype_classes[j])
        out = net(item["image"].unsqueeze(0))
        assert float(out.min_distances[0, j].detach()) < 1e-5


# -- metrics --------------------------------------------------------------------------------------
def _maps_with_peaks(peaks: list[list[tuple[int, int]]], p: int, hw: int = 4) -> torch.Tensor:
    """``(B, P, hw, hw)`` maps with a single peak per (image, prototype) at the given cell."""
    maps = torch.zeros(len(peaks), p, hw, hw)
    for b, row in enumerate(peaks):
        for j, (r, c) in enumerate(row):
            maps[b, j, r, c] = 1.0
    return maps


def test_consistency_and_stability_by_hand() -> None:
    classes = [0, 0, 1]
    # 4 x 4 maps on 32 px: cell (r, c) peaks at pixel ~ (8 r + 3.5, 8 c + 3.5); half box = 5 px
    peaks = [[(0, 0), (3, 3), (0, 0)], [(0, 0), (0, 3), (0, 0)], [(0, 0), (0, 0), (2, 2)]]
    maps = _maps_with_peaks(peaks, 3)
    labels = torch.tensor([0, 0, 1])
    landmarks = torch.tensor(
        [[[4.0, 4.0], [28.0, 28.0]], [[3.0, 3.0], [28.0, 4.0]], [[20.0, 20.0], [1.0, 1.0]]]
    )
    visible = torch.tensor([[True, True], [True, False], [True, True]])
    cons = PrototypeConsistency(classes, num_classes=2, num_parts=2)
    cons.update(maps, labels, landmarks, visible, (32, 32))
    # prototype 0 hits part 0 on both class-0 images (2/2) -> consistent; prototype 1 hits part 1 once of
    # 1 visible (image 1 has it invisible) -> 1.0 -> consistent; prototype 2 hits part 0 once of 1 -> consistent
    f = cons.per_prototype()
    assert f.tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    assert float(cons.compute()) == pytest.approx(100.0)
    cons.set_active(torch.tensor([1.0, 1.0, 0.0]))
    assert float(cons.compute()) == pytest.approx(100.0)

    stab = PrototypeStability(classes)
    moved = maps.clone()
    moved[0, 1] = 0
    moved[0, 1, 0, 0] = 1.0  # prototype 1 on image 0 moves from part 1 to part 0
    stab.update(maps, moved, labels, landmarks, visible, (32, 32))
    # per prototype: p0 2/2, p1 1/2, p2 1/1 -> mean 5/6
    assert float(stab.compute()) == pytest.approx(100 * (1 + 0.5 + 1) / 3)


def test_stability_noise_is_seeded_and_clipped() -> None:
    x = torch.zeros(2, 3, 4, 4)
    a = stability_noise(x, torch.tensor([5, 9]), std=[0.5, 1.0, 2.0])
    b = stability_noise(x[1:], torch.tensor([9]), std=[0.5, 1.0, 2.0])
    assert torch.equal(a[1:], b)  # per-sample seeding: independent of the batch
    assert a[:, 0].abs().max() <= 0.25 * 0.5 + 1e-6 and a[:, 2].abs().max() <= 0.25 * 2.0 + 1e-6


def test_landmark_hits_box() -> None:
    loc = torch.tensor([[10, 10]])
    lm = torch.tensor([[[5.0, 5.0], [14.9, 14.9], [15.0, 10.0], [10.0, 10.0]]])
    vis = torch.tensor([[True, True, True, False]])
    assert landmark_hits(loc, lm, vis, 5, (32, 32)).tolist() == [[True, True, False, False]]


def test_part_purity_topk_matches_bruteforce_and_merges_like_ddp() -> None:
    g = torch.Generator().manual_seed(0)
    b, p, q = 10, 3, 2
    sims = torch.rand(b, p, generator=g)
    maps = torch.rand(b, p, 4, 4, generator=g)
    masks = torch.rand(b, q, 32, 32, generator=g) > 0.5
    metric = PrototypePartPurity([0, 1, 1], num_parts=q, k=4)
    for sl in (slice(0, 3), slice(3, 7), slice(7, 10)):
        metric.update(sims[sl], maps[sl], (32, 32), part_masks=masks[sl])
    import numpy as np

    from interpzoo.layers.protopnet import upsample_maps

    def region_hits(m: torch.Tensor, pm: torch.Tensor) -> torch.Tensor:
        # independent: numpy percentile of each upsampled map, overlap counted pixel by pixel
        up = upsample_maps(m, (32, 32)).numpy()
        out = torch.zeros(m.shape[0], q)
        for i in range(m.shape[0]):
            flat = up[i].ravel()
            region = np.zeros(flat.size, dtype=bool)
            region[np.argsort(-flat, kind="stable")[: round(0.05 * flat.size)]] = True
            region = region.reshape(up[i].shape)
            overlap = [(region & pm[i, k].numpy()).sum() for k in range(q)]
            best = int(np.argmax(overlap))
            out[i, best] = float(overlap[best] >= 0.2 * region.sum())
        return out

    expected = []
    for j in range(p):
        top = sims[:, j].topk(4).indices
        hits = region_hits(maps[top, j], masks[top])
        vis = masks[top].flatten(2).any(2).float()
        expected.append(float((hits.sum(0) / vis.sum(0)).max()))
    assert metric.per_prototype().tolist() == pytest.approx(expected)
    # a DDP sync stacks the ranks' buffers: two ranks with halves must give the single-process answer
    r0, r1 = PrototypePartPurity([0, 1, 1], q, k=4), PrototypePartPurity([0, 1, 1], q, k=4)
    r0.update(sims[:5], maps[:5], (32, 32), part_masks=masks[:5])
    r1.update(sims[5:], maps[5:], (32, 32), part_masks=masks[5:])
    for name in ("top_score", "top_hits", "top_visible"):
        setattr(r0, name, torch.stack([getattr(r0, name), getattr(r1, name)]))
    assert r0.per_prototype().tolist() == pytest.approx(expected)


def test_class_purity_and_explanation_size_by_hand() -> None:
    dmin = torch.tensor([[0.1, 5.0], [0.2, 0.1], [0.3, 0.2], [9.0, 0.3]])
    y = torch.tensor([0, 1, 0, 1])
    cp = PrototypeClassPurity([0, 1], k=2, threshold=2)
    cp.update(dmin[:2], y[:2])
    cp.update(dmin[2:], y[2:])
    # p0 (class 0): nearest images 0 (0.1, y0) and 1 (0.2, y1) -> 1/2; p1 (class 1): 1 (0.1, y1), 2 (0.2, y0) -> 1/2
    res = cp.compute()
    assert float(res["mean"]) == pytest.approx(0.5) and float(res["prune_fraction"]) == pytest.approx(1.0)
    s = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    w = torch.tensor([[1.0, 1.0, 1.0, -1.0]])
    # positive contributions 4, 3, 2 (total 9): 80 % = 7.2 needs 3 prototypes
    assert explanation_size(s, w, torch.tensor([0])).tolist() == [3.0]
    es = ExplanationSize()
    es.update(s, w, torch.tensor([0]))
    es.update(torch.tensor([[10.0, 0.1, 0.1, 0.1]]), w, torch.tensor([0]))
    assert float(es.compute()) == pytest.approx(2.0)
    assert global_size(torch.tensor([[1.0, 0.0, 1e-4], [0.0, 0.0, -0.5]]), torch.tensor([1.0, 1.0, 0.0])) == 1


def test_prototype_unique_counts_duplicates() -> None:
    net = _net()

    def unique() -> float:
        return prototype_unique(
            net.prototype_mask,
            net.push_source_index,
            net.push_source_location,
            net.prototype_layer.prototype_vectors,
        )

    with torch.no_grad():
        net.prototype_layer.prototype_vectors[1] = net.prototype_layer.prototype_vectors[0]
    assert unique() == pytest.approx(5 / 6)
    net.push_source_index.copy_(torch.tensor([0, 0, 1, 2, 3, 4]))
    net.push_source_location.copy_(torch.tensor([[0, 0], [0, 0], [0, 0], [1, 1], [0, 0], [2, 2]]))
    assert unique() == pytest.approx(5 / 6)
    net.prototype_mask[1] = 0  # pruning the duplicate leaves 5 distinct sources among 5 active ones
    assert unique() == pytest.approx(1.0)


# -- runs ----------------------------------------------------------------------------------------
def test_fast_dev_run_pushes_and_logs_prototype_metrics(make_cfg, tmp_path) -> None:
    from interpzoo.run import train

    metrics = train(make_cfg(["model=protopnet", "debug=fdr", *TINY_DATA]))
    for key in (
        "val/acc",
        "val/acc_pushed",
        "val/push_gap",
        "val/prototype_unique",
        "val/prototype_consistency",
        "test/prototype_stability",
        "val/prototype_part_purity",
        "val/prototype_class_purity",
        "val/explanation_size",
        "val/global_size",
        "test/acc",
        "test/prototype_consistency",
    ):
        assert key in metrics, key
    assert 0.0 < metrics["val/prototype_unique"] <= 1.0
    assert metrics["test/global_size"] == 100.0
    # every part metric comes with the oracle's ceiling, random prototypes' baseline and the normalised score
    for name in ("prototype_consistency", "prototype_part_purity", "prototype_stability"):
        raw, top, rnd = (metrics[f"test/{name}{s}"] for s in ("", "_ceiling", "_random"))
        assert min(raw, top, rnd) >= 0.0
        if f"test/{name}_norm" in metrics:
            assert metrics[f"test/{name}_norm"] == pytest.approx((raw - rnd) / (top - rnd), abs=1e-5)
    # the pooled-mask oracle on a 4 x 4 grid: parts are hit (the old argmax-pixel purity capped it near 0.6)
    assert metrics["test/prototype_part_purity_ceiling"] >= 0.9
    assert metrics["test/prototype_stability_ceiling"] == pytest.approx(100.0)  # masks ignore pixel noise


def test_cub_recipe_composes_and_runs_fast_dev_run(make_cfg, tmp_path) -> None:
    from interpzoo.run import train
    from tests.conftest import fake_cub_fdr_overrides

    cfg = make_cfg(fake_cub_fdr_overrides("protopnet_cub_resnet34", tmp_path))
    assert cfg.model.loss.sep == -0.08 and cfg.model.optim.joint.backbone == 1e-4
    assert cfg.model.schedule.push_start == 10 and cfg.model.net.prototype_dim == 128
    assert cfg.trainer.max_epochs == 1  # fast_dev_run
    metrics = train(cfg)
    assert "test/acc" in metrics and "val/prototype_consistency" in metrics  # CUB keypoints reach the metrics
    # keypoints only: random prototypes give a baseline, but there is no mask to build the oracle from
    assert (
        "val/prototype_consistency_random" in metrics and "val/prototype_consistency_ceiling" not in metrics
    )


@pytest.mark.slow
def test_short_training_learns_exports_and_explains(make_cfg, tmp_path) -> None:
    """joint, joint+push, last on 960 images (60 joint steps): learns, exports a pushed bundle, explains."""
    from interpzoo.models import load_checkpoint, load_pretrained
    from interpzoo.run import train

    metrics = train(
        make_cfg(
            [
                "model=protopnet",
                "trainer.max_epochs=3",
                "data.n_train=960",
                "data.n_val=128",
                "data.n_test=128",
                "data.batch_size=32",
            ]
        )
    )
    assert metrics["test/acc"] > 0.5  # 10 classes: chance 0.1 (0.90 measured)
    assert metrics["val/acc_pushed"] == pytest.approx(metrics["val/acc"])  # last epoch is a last-layer epoch
    figs = {p.name for p in (tmp_path / "figures").glob("*.png")}
    assert {"prototype_gallery.png", "this_looks_like_that.png"} <= figs
    net = load_pretrained(tmp_path / "bundle")
    assert net.pushed and (net.push_act_box >= 0).all()  # provenance travels in the bundle
    x = torch.rand(2, 3, 32, 32)
    ex = net.explain(x, top_k=3)
    out = net(x)
    w = net.last_layer.weight
    for i, e in enumerate(ex):
        full = (w[e.target] * out.similarities[i]).sum()
        assert float(full) == pytest.approx(e.logit, rel=1e-4, abs=1e-4)
        assert torch.all(e.contributions[:-1] >= e.contributions[1:])
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):
        torch.load(ckpt, weights_only=True)
        assert load_checkpoint(ckpt).num_prototypes == 100


# -- DDP ----------------------------------------------------------------------------------------
def _ddp_push_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net = _net(seed=0)
        data = _dataset(n=15)
        # duplicate image 3 as sample 14 on the other shard: an exact tie, broken by sample id
        data[14] = {"image": data[3]["image"], "label": data[3]["label"], "index": torch.tensor(14)}
        # each rank scans its interleaved shard, as BaseDataModule.push_dataloader(rank, world) gives it
        shard = [data[i] for i in shard_indices(len(data), rank, world)]
        assert [int(d["index"]) for d in shard] == list(range(rank, 15, world))
        push_prototypes(net, DataLoader(shard, batch_size=4))
        nn_ = nearest_patches(net, DataLoader(shard, batch_size=4), k=3)
        torch.save({"state": net.state_dict(), "nn": nn_}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_push_under_two_process_ddp_equals_single_process(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_push_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    net = _net(seed=0)
    data = _dataset(n=15)
    data[14] = {"image": data[3]["image"], "label": data[3]["label"], "index": torch.tensor(14)}
    push_prototypes(net, DataLoader(data, batch_size=4))
    nn_ = nearest_patches(net, DataLoader(data, batch_size=4), k=3)
    single = net.state_dict()
    for r in ranks:
        for key in (
            "prototype_layer.prototype_vectors",
            "push_source_index",
            "push_source_location",
            "push_act_box",
            "push_rf_box",
        ):
            assert torch.allclose(r["state"][key].float(), single[key].float(), atol=1e-6), key
        assert torch.equal(r["nn"]["sample_id"], nn_["sample_id"])
    assert torch.equal(
        ranks[0]["state"]["prototype_layer.prototype_vectors"],
        ranks[1]["state"]["prototype_layer.prototype_vectors"],
    )


@pytest.mark.ddp
@pytest.mark.slow
def test_lightning_ddp_sim_runs_every_phase_and_pushes_real_patches(make_cfg, tmp_path) -> None:
    """warm -> joint+push -> last under 2-process ddp_spawn: no unused-parameter errors, and the exported
    prototypes are exact latent patches of own-class push images."""
    from hydra.utils import instantiate

    from interpzoo.models import load_pretrained
    from interpzoo.run import train

    cfg = make_cfg(
        [
            "model=protopnet",
            "trainer=ddp_sim",
            "trainer.max_epochs=3",
            "model.schedule.warm_epochs=1",
            "report=false",
            *TINY_DATA,
        ]
    )
    metrics = train(cfg)
    assert "val/push_gap" in metrics and metrics["val/acc_pushed"] == pytest.approx(metrics["val/acc"])
    net = load_pretrained(tmp_path / "bundle")
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    src = net.push_source_index
    assert (src >= 0).all()
    with torch.no_grad():
        for j in range(0, net.num_prototypes, 7):
            item = dm.push_set[int(src[j])]
            assert int(item["label"]) == int(net.prototype_classes[j])
            assert float(net(item["image"].unsqueeze(0)).min_distances[0, j]) < 1e-5


def test_nan_loss_stops_before_the_optimiser_step(tmp_path) -> None:
    """ProtoPNet steps its optimisers by hand: a NaN loss must raise before ``opt.step`` touches a weight."""
    from interpzoo.api import quiet_trainer
    from interpzoo.models.lit_base import NonFiniteLossError

    dm = _tiny_dm()
    dm.setup()
    torch.manual_seed(0)
    module = ProtoPNetModule(
        net={"prototypes_per_class": 2, "prototype_dim": 16, "backbone": {"name": "resnet18s", "width": 4}},
        data_info=dm.data_info,
        schedule={"warm_epochs": 0, "push_start": None},
        metrics={"enabled": False},
    )
    with torch.no_grad():
        module.net.last_layer.weight[0, 0] = float("nan")  # the logits, hence the loss, are NaN
    before = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path)
    with pytest.raises(
        NonFiniteLossError, match=r"the training loss became nan at step 0 .*loss terms: .*ce=nan"
    ):
        trainer.fit(module, datamodule=dm)
    after = module.net.state_dict()
    # BatchNorm running statistics move in the forward pass, as in any framework; the weights must not
    frozen_stats = ("running_mean", "running_var", "num_batches_tracked")
    changed = [
        k
        for k in before
        if not k.endswith(frozen_stats)
        and not torch.allclose(before[k].float(), after[k].float(), rtol=0, atol=0, equal_nan=True)
    ]
    assert changed == [], f"weights changed by a step on a NaN loss: {changed}"


def test_push_loader_of_a_rank_is_its_whole_shard_under_ddp(monkeypatch) -> None:
    """Under DDP ``push_dataloader(rank, world)`` is the rank's interleaved shard, every item once.

    It used to be sharded twice (the shard, then the evaluation sampler of the rank): each rank scanned a
    quarter of the push set with two processes, and push picked other patches than one process did.
    """
    dm = _tiny_dm()
    dm.setup()
    n = len(dm.push_set)
    seen = []
    for rank in range(2):
        monkeypatch.setattr(type(dm), "_rank_world", lambda self, r=rank: (r, 2))
        ids = torch.cat([b["index"] for b in dm.push_dataloader(rank, 2)]).tolist()
        assert ids == list(range(rank, n, 2))
        seen += ids
    assert sorted(seen) == list(range(n))
    # the default arguments give the whole set, also inside a DDP process
    assert torch.cat([b["index"] for b in dm.push_dataloader()]).tolist() == list(range(n))


@pytest.mark.parametrize("size", [1, 2])
def test_matmul_patch_terms_equal_convolutions(size: int) -> None:
    """The CUDA route of the distances (matrix products, no TF32-rounded cuDNN convolution) computes the
    same ``||z_patch||^2`` and ``z_patch . p`` as the convolutions, checked here in float64 on the CPU."""
    from interpzoo.layers.protopnet import _patch_terms_exact

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 16, 6, 5, generator=g, dtype=torch.float64)
    p = torch.randn(7, 16, size, size, generator=g, dtype=torch.float64)
    z2, zp = _patch_terms_exact(z, p)
    ones = torch.ones(1, 16, size, size, dtype=torch.float64)
    torch.testing.assert_close(z2, torch.nn.functional.conv2d(z * z, ones))
    torch.testing.assert_close(zp, torch.nn.functional.conv2d(z, p))
