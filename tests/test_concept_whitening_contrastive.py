"""Contrastive concept-whitening alignment (issue 15, item 1).

The paper's objective (Chen, Bei & Rudin 2020, Eq. 3) maximises each concept's mean activation, so when
every concept's images share a common direction the axes tilt towards it. The contrastive objective aligns
axis ``j`` with ``mu_j^+ - mu_j^-`` (images with minus images without the concept). Checked here against
known ground truth: planted orthonormal concept directions, brute-force re-implementations of the paper
update, single-process statistics for the distributed reductions, and the renderer's concept vectors.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from interpzoo.datamodules.base import DataError
from interpzoo.layers.concept_whitening import (
    ConceptWhitening2d,
    SyncConceptWhitening2d,
    cayley_curvilinear_step,
)

C, K = 16, 3


def _planted(seed: int, common: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v (K, C), c (C,))``: orthonormal concept directions and a common direction of norm ``common``
    orthogonal to them (the share of all concept images that the paper objective picks up)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(C, C, generator=g, dtype=torch.float64))
    return basis[:, :K].T.float(), common * basis[:, K].float()


def _images(
    g: torch.Generator, v: torch.Tensor, c: torch.Tensor, j: int, present: bool, n: int = 64
) -> torch.Tensor:
    """``(n, C, 3, 3)`` features: ``c + sum_k y_k v_k + noise``, other concepts present with p = 0.5,
    concept ``j`` on (``present``) or off. Negatives are drawn independently of the positives (not paired)."""
    y = (torch.rand(n, K, generator=g) < 0.5).float()
    y[:, j] = 1.0 if present else 0.0
    return (c + y @ v)[:, :, None, None] + 0.3 * torch.randn(n, C, 3, 3, generator=g)


def _identity_whitening(layer: ConceptWhitening2d) -> ConceptWhitening2d:
    """Eval mode with ``mu = 0`` and ``W = I``: ``x_hat = x``, so the planted directions are the whitened ones
    (concept passes use the running statistics, as the reference procedure does)."""
    return layer.eval()


def _align(alignment: str, mode: str, common: float, rounds: int = 30, seed: int = 0) -> list[float]:
    """Cosine between axis ``j`` (row ``j`` of ``R``) and the planted ``v_j`` after ``rounds`` updates."""
    v, c = _planted(seed, common)
    g = torch.Generator().manual_seed(seed + 1)
    cw = _identity_whitening(ConceptWhitening2d(C, activation_mode=mode, alignment=alignment))
    for _ in range(rounds):
        for j in range(K):
            with cw.concept_mode(j):
                cw(_images(g, v, c, j, True))
            if alignment == "contrastive":
                with cw.concept_mode(j, negative=True):
                    cw(_images(g, v, c, j, False))
        cw.update_rotation_matrix()
    r = cw.running_rot.double()
    return [float(F.cosine_similarity(r[j], v[j].double(), dim=0)) for j in range(K)]


@pytest.mark.parametrize("mode", ["mean", "pool_max"])
def test_contrastive_recovers_concept_directions_where_paper_does_not(mode: str) -> None:
    contrastive = _align("contrastive", mode, common=2.0)
    paper = _align("paper", mode, common=2.0)
    assert min(contrastive) > 0.95, contrastive  # measured > 0.99
    # the paper's axes lean towards the common direction: cos(c + v_j + ..., v_j) ~ 0.83 (measured)
    assert max(paper) < 0.9, paper
    # control: without a common direction the paper objective recovers them too, so the difference above
    # is the common component, not the test's set-up
    assert min(_align("paper", mode, common=0.0)) > 0.95


def test_rotation_stays_orthogonal_over_many_contrastive_updates() -> None:
    v, c = _planted(3, 2.0)
    g = torch.Generator().manual_seed(4)
    cw = _identity_whitening(ConceptWhitening2d(C, activation_mode="mean", alignment="contrastive"))
    for _ in range(100):
        for j in range(K):
            with cw.concept_mode(j):
                cw(_images(g, v, c, j, True, n=16))
            with cw.concept_mode(j, negative=True):
                cw(_images(g, v, c, j, False, n=16))
        cw.update_rotation_matrix()
    r = cw.running_rot.double()
    assert not torch.allclose(r, torch.eye(C, dtype=torch.float64), atol=1e-2)  # it did rotate
    assert float(torch.linalg.matrix_norm(r.T @ r - torch.eye(C, dtype=torch.float64))) < 1e-5


def test_whitened_covariance_stays_identity_after_contrastive_rotation() -> None:
    torch.manual_seed(0)
    cw = ConceptWhitening2d(C, activation_mode="mean", alignment="contrastive")
    # rotate first (identity statistics), then whiten a correlated batch in training mode
    v, c = _planted(5, 1.0)
    g = torch.Generator().manual_seed(6)
    cw.eval()
    for _ in range(10):
        for j in range(K):
            with cw.concept_mode(j):
                cw(_images(g, v, c, j, True))
            with cw.concept_mode(j, negative=True):
                cw(_images(g, v, c, j, False))
        cw.update_rotation_matrix()
    q, _ = torch.linalg.qr(torch.randn(C, C))
    mix = q @ torch.diag(torch.linspace(1.0, 10.0**0.5, C)) @ q.T  # covariance condition number 10
    x = torch.einsum("dc,bchw->bdhw", mix, torch.randn(64, C, 4, 4)) + 3.0
    z = cw.train()(x)
    flat = z.permute(1, 0, 2, 3).reshape(C, -1).double()
    cov = torch.cov(flat, correction=0)
    assert float((cov - torch.eye(C, dtype=torch.float64)).abs().amax()) < 1e-3  # measured ~1e-4


def test_paper_alignment_is_the_unchanged_update() -> None:
    """``alignment="paper"`` (the layer default) is the former update, bit for bit: the EMA of minus the
    per-image gradient into ``sum_G``, then two curvilinear Cayley steps on ``G = sum_G / counter``; and
    its state_dict has exactly the former keys (bundles load unchanged)."""
    torch.manual_seed(0)
    x = torch.randn(8, C, 6, 6)
    layer = ConceptWhitening2d(C, activation_mode="pool_max").train()
    assert layer.alignment == "paper" and layer.sum_G_neg is None and layer.counter_neg is None
    layer(x)  # running statistics move away from (0, I)
    layer.eval()
    concepts = [torch.randn(5, C, 6, 6) + 2 * torch.eye(C)[j][:, None, None] for j in range(K)]
    sum_g = layer.sum_G.clone()
    counter = layer.counter.clone()
    rot = layer.running_rot.clone()
    for j, cx in enumerate(concepts):
        with layer.concept_mode(j):
            layer(cx)
        # brute force: exact pool_max gradient of axis j by autograd, averaged over the images
        r = rot.clone().requires_grad_()
        xc = cx - layer.running_mean[None, :, None, None]
        x_hat = torch.einsum("dc,bchw->bdhw", layer.running_wm, xc)
        z = torch.einsum("dc,bchw->bdhw", r, x_hat)
        F.max_pool2d(z[:, j : j + 1], 3, 3, ceil_mode=True).mean((2, 3)).sum().backward()
        sum_g[j] = 0.95 * sum_g[j] + 0.05 * (-r.grad[j] / cx.shape[0])
        counter[j] += 1.0
    assert torch.allclose(layer.sum_G, sum_g, atol=1e-6)
    assert torch.allclose(layer.counter, counter)
    G = (layer.sum_G / layer.counter[:, None]).double()
    expected = layer.running_rot.double()
    for _ in range(2):
        expected, _, _ = cayley_curvilinear_step(G, expected)
    layer.update_rotation_matrix()
    assert torch.equal(layer.running_rot, expected.float())
    assert set(layer.state_dict()) == {
        "running_mean",
        "running_wm",
        "num_batches_tracked",
        "running_rot",
        "sum_G",
        "counter",
    }


def test_contrastive_gradient_is_the_difference_of_whitened_means() -> None:
    g = torch.Generator().manual_seed(0)
    cw = ConceptWhitening2d(C, activation_mode="mean", alignment="contrastive", momentum=1.0).eval()
    with torch.no_grad():
        cw.running_mean.copy_(torch.randn(C, generator=g))
        w = torch.randn(C, C, generator=g)
        cw.running_wm.copy_(w @ w.T / C + torch.eye(C))
    pos, neg = torch.randn(7, C, 3, 3, generator=g), torch.randn(5, C, 3, 3, generator=g) - 1
    with cw.concept_mode(1):
        cw(pos)
    with cw.concept_mode(1, negative=True):
        cw(neg)

    def whitened_mean(x: torch.Tensor) -> torch.Tensor:
        xc = x.double() - cw.running_mean.double()[None, :, None, None]
        return torch.einsum("dc,bchw->d", cw.running_wm.double(), xc) / (x.shape[0] * x.shape[2] * x.shape[3])

    G = cw.alignment_gradient()
    expected = -(whitened_mean(pos) - whitened_mean(neg)) / 1.001  # counters: 1e-3 + one pass each
    assert torch.allclose(G[1], expected, atol=1e-5)
    assert torch.count_nonzero(G[[0, 2]]) == 0
    assert set(cw.state_dict()) >= {"sum_G_neg", "counter_neg"}


def test_contrastive_without_negatives_and_negatives_without_contrastive_raise() -> None:
    cw = ConceptWhitening2d(
        C, activation_mode="mean", alignment="contrastive", concept_names=["a", "b"]
    ).eval()
    with cw.concept_mode(1):
        cw(torch.randn(4, C, 3, 3))
    with pytest.raises(ValueError, match=r"\['b'\]\) got concept batches but no negative"):
        cw.update_rotation_matrix()
    paper = ConceptWhitening2d(C).eval()
    with pytest.raises(ValueError, match="alignment='contrastive'"), paper.concept_mode(0, negative=True):
        pass
    with pytest.raises(ValueError, match="alignment must be one of"):
        ConceptWhitening2d(C, alignment="contrast")


def test_contrastive_layer_is_a_batchnorm_drop_in_and_loads_paper_states() -> None:
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(C)
    bn.train()(torch.randn(16, C, 4, 4) * 2 + 1)
    cw = ConceptWhitening2d.from_batchnorm(bn, alignment="contrastive")
    x = torch.randn(4, C, 4, 4)
    assert cw.eval()(x).shape == x.shape and cw.train()(x).shape == x.shape
    # state_dict round trip, and a paper state loads (negative statistics start empty)
    other = ConceptWhitening2d(**cw.config())
    other.load_state_dict(cw.state_dict())
    assert torch.equal(other.running_wm, cw.running_wm) and other.alignment == "contrastive"
    paper_state = ConceptWhitening2d.from_batchnorm(bn).state_dict()
    fresh = ConceptWhitening2d(C, alignment="contrastive")
    fresh.load_state_dict(paper_state)
    assert torch.count_nonzero(fresh.sum_G_neg) == 0 and torch.all(fresh.counter_neg == 1e-3)
    # the synced variant keeps the option and shares the negative buffers
    net = torch.nn.Sequential(cw)
    SyncConceptWhitening2d.convert_sync(net)
    assert net[0].alignment == "contrastive" and net[0].sum_G_neg is cw.sum_G_neg


def test_two_simulated_ranks_average_to_the_single_process_statistics() -> None:
    """What ``ConceptWhiteningModule._reduce_concept_gradients`` does for plain layers under DDP: every rank
    accumulates its equal share of the positive and negative batches, then each of
    :meth:`concept_statistics` is all-reduced (summed) and divided by the world size. The result equals one
    process seeing the whole batches, and so does the rotation."""
    v, c = _planted(7, 2.0)
    g = torch.Generator().manual_seed(8)
    single = ConceptWhitening2d(C, activation_mode="pool_max", alignment="contrastive").eval()
    ranks = [copy.deepcopy(single) for _ in range(2)]
    for _ in range(3):
        for j in range(K):
            pos, neg = _images(g, v, c, j, True, n=8), _images(g, v, c, j, False, n=8)
            for layer, p, n in [(single, pos, neg)] + list(zip(ranks, pos.chunk(2), neg.chunk(2))):
                with layer.concept_mode(j):
                    layer(p)
                with layer.concept_mode(j, negative=True):
                    layer(n)
        stats = [r.concept_statistics() for r in ranks]
        assert len(stats[0]) == 4  # sum_G, counter, sum_G_neg, counter_neg
        for tensors in zip(*stats):
            mean = sum(tensors) / len(tensors)  # all_reduce(SUM) / world
            for t in tensors:
                t.copy_(mean)
        for a, b in zip(single.concept_statistics(), ranks[0].concept_statistics()):
            assert torch.allclose(a, b, atol=1e-6)
        single.update_rotation_matrix()
        for r in ranks:
            r.update_rotation_matrix()
        assert torch.allclose(single.running_rot, ranks[0].running_rot, atol=1e-5)
    assert not torch.allclose(single.running_rot, torch.eye(C), atol=1e-2)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pos, neg = _ddp_concepts()
        cw = SyncConceptWhitening2d(
            C, activation_mode="pool_max", alignment="contrastive", dtype=torch.float64, rot_dtype="float64"
        ).eval()
        for j in range(K):
            with cw.concept_mode(j):
                cw(pos[j].chunk(world)[rank])
            with cw.concept_mode(j, negative=True):
                cw(neg[j].chunk(world)[rank])
        cw.update_rotation_matrix()
        torch.save(
            {k: v.clone() for k, v in cw.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt")
        )
    finally:
        dist.destroy_process_group()


def _ddp_concepts() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    v, c = _planted(9, 2.0)
    g = torch.Generator().manual_seed(10)
    pos = [_images(g, v, c, j, True, n=6).double() for j in range(K)]
    neg = [_images(g, v, c, j, False, n=10).double() for j in range(K)]  # unequal counts on purpose
    return pos, neg


@pytest.mark.ddp
@pytest.mark.slow
def test_sync_layer_reduces_negative_statistics_across_two_processes(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    pos, neg = _ddp_concepts()
    single = ConceptWhitening2d(
        C, activation_mode="pool_max", alignment="contrastive", dtype=torch.float64, rot_dtype="float64"
    ).eval()
    for j in range(K):
        with single.concept_mode(j):
            single(pos[j])
        with single.concept_mode(j, negative=True):
            single(neg[j])
    single.update_rotation_matrix()
    for key in ("sum_G", "sum_G_neg", "counter_neg", "running_rot"):
        for s in states:
            assert torch.allclose(s[key], single.state_dict()[key], atol=1e-10), key


# -- PartShapes negatives --------------------------------------------------------------------------
@pytest.mark.parametrize("concept", ["has_red", "has_striped", "has_circle", "head_colour_red"])
def test_partshapes_negatives_are_the_probes_without_the_concept(concept: str) -> None:
    from interpzoo.datamodules.partshapes_dm import PartShapesDataModule

    dm = PartShapesDataModule(concepts=[concept], n_concept_train=12, n_concept_test=12)
    col = dm.renderer.concept_index(concept)
    pos, neg = dm.concept_datasets("train")[concept], dm.concept_negative_datasets("train")[concept]
    assert len(pos) == len(neg) == 12
    for i in range(len(pos)):
        p, n = pos[i], neg[i]
        assert p["concepts"][col] == 1 and n["concepts"][col] == 0
        # paired: the same probe with one part's attribute changed; the background and layout are shared
        changed = (p["image"] != n["image"]).any(0)
        assert changed.any() and not (changed & ~p["concept_mask"] & ~n["concept_mask"]).any()
    loaders = dm.concept_dataloaders("train", batch_size=4, concepts=[concept], negatives=True)
    assert next(iter(loaders[concept]))["concepts"][:, col].sum() == 0


@pytest.mark.parametrize("concept", ["has_red", "has_striped", "has_circle", "head_shape_circle"])
@pytest.mark.parametrize("pose", ["fixed", "varied"])
def test_scene_probes_are_in_distribution_scenes_with_the_concept_edited_in_and_out(
    concept: str, pose: str
) -> None:
    from interpzoo.datamodules.partshapes_dm import PartShapesDataModule

    dm = PartShapesDataModule(
        concepts=[concept], n_concept_train=16, n_concept_test=16, concept_probes="scene", pose=pose
    )
    r = dm.renderer
    col = r.concept_index(concept)
    pos, neg = dm.concept_datasets("train")[concept], dm.concept_negative_datasets("train")[concept]
    n_parts, edited_in = [], 0
    for i in range(len(pos)):
        p, n = pos[i], neg[i]
        assert p["concepts"][col] == 1 and n["concepts"][col] == 0
        # one scene: only the pixels of the parts whose attribute the edit changed differ
        sp, sn = (
            r.draw_scene_probe(concept, "train", i),
            r.draw_scene_probe(concept, "train", i, negative=True),
        )
        assert np.array_equal(sp.xy0, sn.xy0) and np.array_equal(sp.present, sn.present)
        assert np.array_equal(sp.d_attrs, sn.d_attrs) and sp.noise == sn.noise
        changed_parts = np.flatnonzero((sp.attrs != sn.attrs).any(1))
        assert len(changed_parts) >= 1 and (sp.attrs != sn.attrs).sum(1).max() == 1  # one attribute per part
        changed = (p["image"] != n["image"]).any(0).numpy()
        # a shape edit also changes pixels that are background on one side: the union of both part maps
        in_part = np.isin(r.sample_from_spec(sp).part_map, changed_parts + 1)
        in_part |= np.isin(r.sample_from_spec(sn).part_map, changed_parts + 1)
        assert changed.any() and in_part[changed].all()
        # a whole creature of the class table (not one part on an empty background), with distractors drawn
        n_parts.append(int(sp.present.sum()))
        edited_in += int(len(changed_parts) == 1 and r.concepts_of(sp.attrs, sp.present)[col] == 1)
    assert min(n_parts) == r.num_slots
    assert edited_in > 0  # scenes that lacked the concept had it added
    # train and test probes are different scenes
    test_pos = dm.concept_datasets("test")[concept]
    assert not any(torch.equal(pos[i]["image"], test_pos[i]["image"]) for i in range(4))
    # the renderer's pose: with it varied the head moves around the image between scenes
    spread = np.ptp(
        np.stack([r.draw_scene_probe(concept, "train", i).xy0[0] for i in range(16)]), axis=0
    ).max()
    assert spread > 15 if pose == "varied" else spread <= 10


def test_concept_probes_must_be_part_or_scene() -> None:
    from interpzoo.datamodules.partshapes_dm import PartShapesDataModule

    with pytest.raises(DataError, match="data.concept_probes='scenes'.*'part'.*'scene'"):
        PartShapesDataModule(concept_probes="scenes")


def test_datamodule_without_negatives_says_how_to_fix() -> None:
    from interpzoo.datamodules.base import BaseDataModule

    with pytest.raises(DataError, match="alignment=paper"):
        BaseDataModule().concept_negative_datasets("train")


def test_image_folder_negatives_come_from_the_parallel_neg_tree(tmp_path) -> None:
    import shutil

    from interpzoo.datamodules.image_folder import ImageFolderDataModule
    from interpzoo.datamodules.testing import make_fake_image_folder

    root = make_fake_image_folder(tmp_path / "d", n_per_class=2, with_concepts=("bed", "person"))
    dm = ImageFolderDataModule(
        root=str(root), concepts_train_dir="concepts_train", concepts_test_dir="concepts_test", image_size=32
    )
    with pytest.raises(DataError, match=r"without concept 'bed' in .*concepts_train_neg[/\\]bed"):
        dm.concept_negative_datasets("train")
    for name in ("bed", "person"):  # negatives of each concept: here the other concept's images
        other = "person" if name == "bed" else "bed"
        shutil.copytree(root / "concepts_train" / other, root / "concepts_train_neg" / name)
    neg = dm.concept_negative_datasets("train")
    assert list(neg) == ["bed", "person"] and len(neg["bed"]) == 2
    assert neg["bed"][0]["image"].shape == (3, 32, 32) and int(neg["bed"][0]["label"]) == 0
    assert list(dm.concept_datasets("train")) == ["bed", "person"]  # the _neg tree is not a concept


def test_train_with_contrastive_alignment_end_to_end(make_cfg, tmp_path) -> None:
    """``model=cw model.net.alignment=contrastive``: the module feeds paired negatives, the layer counts
    them, the rotation moves and stays orthogonal, and the run exports a bundle that loads."""
    from interpzoo.models import load_pretrained
    from interpzoo.run import train
    from tests.conftest import TINY_DATA

    cfg = make_cfg(
        [
            *TINY_DATA,
            "model=cw",
            "model.net.alignment=contrastive",
            "model.align_every=2",
            "model.concept_eval_samples=16",
            "model.baselines=false",
            "model.permutation_importance=false",
            "data.n_concept_train=32",
            "data.n_concept_test=16",
            "data.concept_probes=scene",  # the experiment's setting: whole scenes edited, and the feature loss
            "model.concept_loss_weight=1",
            "trainer.max_epochs=1",
            "report=false",
            "~callbacks.scorecard",
        ]
    )
    metrics = train(cfg)
    net = load_pretrained(tmp_path / "bundle")
    layer = next(iter(net.cw_layers().values()))
    assert layer.alignment == "contrastive"
    rot = layer.running_rot.double()
    assert float((rot.T @ rot - torch.eye(rot.shape[0], dtype=torch.float64)).norm()) < 1e-5
    assert float((rot - torch.eye(rot.shape[0], dtype=torch.float64)).abs().max()) > 1e-4  # it was updated
    assert metrics["test/rotation_orthogonality_error"] < 1e-5


# -- exact whitening makes the contrastive axis Fisher's discriminant ---------------------------------------
def _fisher_setting(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mix (C, C), d (C,), eigenvalues (C,))``: features ``x = mix @ e`` (``e`` standard normal) have
    covariance ``mix mix^T`` with eigenvalues spread over 6 decades (as on a trained layer, where IterNorm's
    ``T=10`` under-whitens the small ones); the concept adds ``d``, which has equal weight on every eigenvector,
    so Fisher's direction ``Sigma^{-1} d`` is dominated by the small-eigenvalue directions."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(C, C, generator=g, dtype=torch.float64))
    lam = torch.logspace(2, -4, C, dtype=torch.float64)
    return q * lam.sqrt(), q.sum(1) * 0.05, lam


def _contrastive_axis(T: int, solver: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w (C,), pos (N, C), neg (N, C))``: the input-space direction ``W^T R[0]`` of a single contrastive
    ``mean`` axis (its score is ``w . (x - mu)``), and the paired held-out features with / without the concept."""
    mix, d, _ = _fisher_setting(seed)
    g = torch.Generator().manual_seed(seed + 1)

    def feats(n: int) -> torch.Tensor:
        """``(n, C, 2, 2)``: pixels drawn independently, so the pixel covariance is ``Sigma``."""
        e = torch.randn(n, C, 2, 2, generator=g, dtype=torch.float64)
        return torch.einsum("dc,nchw->ndhw", mix, e)

    cw = ConceptWhitening2d(
        C, eps=1e-12, T=T, solver=solver, momentum=1.0, activation_mode="mean", alignment="contrastive"
    )
    cw = cw.double().train()
    cw(feats(4096))  # momentum 1: the running mean / W are this large batch's
    cw.eval()
    for _ in range(40):
        x = feats(256)
        with cw.concept_mode(0):
            cw(x + d[None, :, None, None])
        with cw.concept_mode(0, negative=True):  # paired negatives: the same images without the concept
            cw(x)
        cw.update_rotation_matrix()
    w = cw.running_wm.T @ cw.running_rot.double()[0]
    x = feats(2000).mean((2, 3))
    return w, x + d, x


def test_exact_whitening_makes_the_contrastive_mean_axis_fishers_direction() -> None:
    """With ``W = Sigma^{-1/2}`` the contrastive ``mean`` axis ``R[0] ∝ W (mu^+ - mu^-)`` reads the input along
    ``W^T R[0] ∝ Sigma^{-1} (mu^+ - mu^-)``: Fisher's linear discriminant (LDA). Checked against an independent
    LDA fit (scikit-learn, on the held-out features) and the closed form; IterNorm's ``T=10`` polynomial
    under-whitens the small-eigenvalue directions (``p_10(lambda) <= 1.5^10 / sqrt(tr)`` while
    ``lambda^{-1/2}`` is up to ~1e4 here), so its axis is not Fisher's and separates the classes worse."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    mix, d, _ = _fisher_setting(0)
    fisher = torch.linalg.solve(mix @ mix.T, d)  # closed form Sigma^{-1} d
    w40, pos, neg = _contrastive_axis(40, "eigh")
    w10, _, _ = _contrastive_axis(10, "eigh")
    lda = LinearDiscriminantAnalysis(solver="lsqr").fit(
        torch.cat([pos, neg]).numpy(), [1] * len(pos) + [0] * len(neg)
    )
    w_lda = torch.from_numpy(lda.coef_[0])

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(F.cosine_similarity(a, b, dim=0))

    def separation(w: torch.Tensor) -> float:  # Fisher's criterion (mean gap / pooled sd) of the projection
        a, b = pos @ w, neg @ w
        return float((a.mean() - b.mean()) / (0.5 * (a.var() + b.var())).sqrt())

    assert cos(w40, fisher) > 0.999, cos(w40, fisher)  # measured 1.000
    assert cos(w40, w_lda) > 0.99, cos(w40, w_lda)  # sample LDA: estimation noise only
    assert cos(w10, fisher) < 0.8, cos(w10, fisher)  # measured 0.59: the under-whitened axis is another one
    # measured 12.5 against 2.8: Fisher's direction maximises this criterion, the T=10 axis is far from it
    assert separation(w40) > 2.0 * separation(w10), (separation(w40), separation(w10))


def test_iternorm_polynomial_reaches_the_inverse_square_root_only_with_more_iterations() -> None:
    """The reason for the test above, on the layer's own ``running_wm``: ``W Sigma W = I`` with ``T=40`` (eigh),
    not with ``T=10`` (eigenvalues of ``W Sigma W`` as low as ``(1.5^10)^2 lambda_min / tr``)."""
    mix, _, _ = _fisher_setting(0)
    sigma = mix @ mix.T
    for T, lo, hi in ((40, 0.999, 1.001), (10, 0.0, 0.5)):
        cw = ConceptWhitening2d(C, eps=1e-12, T=T, solver="eigh", momentum=1.0).double().train()
        g = torch.Generator().manual_seed(1)
        e = torch.randn(4096, C, 2, 2, generator=g, dtype=torch.float64)
        x = torch.einsum("dc,nchw->ndhw", mix, e)
        cw(x)
        flat = (x - x.mean((0, 2, 3), keepdim=True)).permute(1, 0, 2, 3).reshape(C, -1)
        batch_sigma = flat @ flat.T / flat.shape[1]
        ev = torch.linalg.eigvalsh(cw.running_wm @ batch_sigma @ cw.running_wm)
        assert lo <= float(ev.min()) <= hi, (T, ev.min())
        assert float(ev.max()) < 1.0 + 1e-6, (T, ev.max())
    assert float(torch.linalg.cond(sigma)) > 1e5  # the spread that makes T=10 fall short


# -- the feature loss (model.concept_loss_weight) --------------------------------------------------------
def _feature_loss_module(weight: float = 1.0, alignment: str = "contrastive"):
    from interpzoo.models.lit_concept_whitening import ConceptWhiteningModule

    data_info = {"num_classes": 4, "in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    return ConceptWhiteningModule(
        net={"name": "cw_resnet18s", "backbone": {"name": "resnet18s", "width": 8}, "alignment": alignment},
        concepts=["a", "b", "c"],
        data_info=data_info,
        baselines=False,
        concept_loss_weight=weight,
    )


def test_feature_loss_is_the_paired_logistic_loss_and_moves_only_the_layers_before_the_whitening() -> None:
    torch.manual_seed(0)
    module = _feature_loss_module()
    net = module.net
    net.train()
    for _ in range(3):  # running statistics away from their initial values
        net(torch.rand(16, 3, 32, 32))
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.rand(6, 3, 32, 32, generator=g), torch.rand(6, 3, 32, 32, generator=g)
    module._next_concept_batch = lambda j, negative=False: neg if negative else pos
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    axis = 1
    loss = module.concept_feature_loss(axis)
    assert net.training  # restored
    # brute force: the network's own concept activations (eval mode, running statistics); the matched pairs
    # and every (with, without) pair across images, averaged
    net.eval()
    with torch.no_grad():
        a_pos, a_neg = net(pos).concept_activations[:, axis], net(neg).concept_activations[:, axis]
    net.train()
    # in units of the axis' spread over the 12 images (sample std): whitening removes any other scale
    sd = float(torch.cat([a_pos, a_neg]).std())
    a_pos, a_neg = a_pos / sd, a_neg / sd
    paired = sum(float(F.softplus(-(a_pos[i] - a_neg[i]))) for i in range(6)) / 6
    ranked = sum(float(F.softplus(-(a_pos[i] - a_neg[k]))) for i in range(6) for k in range(6)) / 36
    want = torch.tensor(0.5 * (paired + ranked))
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    loss.backward()
    grads = {k: p.grad for k, p in net.named_parameters()}
    assert (
        grads["backbone.body.conv1.weight"] is not None
        and grads["backbone.body.conv1.weight"].abs().sum() > 0
    )
    assert grads["backbone.body.layer2.0.conv1.weight"].abs().sum() > 0
    # nothing after the whitened layer (layer3.0.bn1) takes part; no statistic moved
    assert grads["classifier.weight"] is None
    assert all(grads[k] is None for k in grads if k.startswith("backbone.body.layer4."))
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k]), k


def test_feature_loss_is_blind_to_the_scale_that_whitening_removes() -> None:
    """Scaling the axis (what the next whitening update undoes) cannot lower the loss: it is computed in units of
    the axis' spread, so the trunk must separate the pairs better, not just amplify them."""
    torch.manual_seed(0)
    module = _feature_loss_module()
    net = module.net
    net.train()
    for _ in range(3):
        net(torch.rand(16, 3, 32, 32))
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.rand(6, 3, 32, 32, generator=g), torch.rand(6, 3, 32, 32, generator=g)
    module._next_concept_batch = lambda j, negative=False: neg if negative else pos
    layer = net.cw_layer
    before = module.concept_feature_loss(0).detach()
    with torch.no_grad():  # the same features, three times larger, along every whitened direction
        layer.running_wm.mul_(3.0)
    after = module.concept_feature_loss(0).detach()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_feature_loss_needs_paired_negatives_and_a_non_negative_weight() -> None:
    with pytest.raises(ValueError, match="model.net.alignment=contrastive"):
        _feature_loss_module(1.0, alignment="paper")
    with pytest.raises(ValueError, match="concept_loss_weight must be >= 0"):
        _feature_loss_module(-1.0)
    assert _feature_loss_module(0.0, alignment="paper").hparams.concept_loss_weight == 0.0


def _paired_right_way(net, pos, neg, concepts: list[str], n: int) -> list[float]:
    """Share of held-out pairs whose concept image scores above its re-render without the concept, per axis."""
    net.eval()
    with torch.no_grad():
        out = []
        for j, c in enumerate(concepts):
            a_pos = net(torch.stack([pos[c][i]["image"] for i in range(n)])).concept_activations[:, j]
            a_neg = net(torch.stack([neg[c][i]["image"] for i in range(n)])).concept_activations[:, j]
            out.append(float((a_pos > a_neg).float().mean()))
    return out


def test_the_feature_loss_teaches_the_trunk_colour_and_texture_edits_on_held_out_pairs() -> None:
    """Minimising ``concept_feature_loss`` on PartShapes' training pairs (one concept per step, as
    ``training_step`` does) makes the red and stripe axes follow their concept's edit on *held-out* pairs:
    the loss trains features that generalise, not the probe images."""
    from interpzoo.datamodules.partshapes_dm import PartShapesDataModule

    concepts = ["has_red", "has_striped", "has_circle"]
    torch.manual_seed(0)
    module = ConceptWhiteningModuleForTest(concepts)
    net = module.net
    dm = PartShapesDataModule(concepts=concepts, n_concept_train=96, n_concept_test=48)
    train_pos, train_neg = dm.concept_datasets("train"), dm.concept_negative_datasets("train")
    test_pos, test_neg = dm.concept_datasets("test"), dm.concept_negative_datasets("test")
    net.train()
    with torch.no_grad():  # running statistics of PartShapes images, not of the initial zeros
        for k in range(4):
            net(torch.stack([train_pos[c][i]["image"] for c in concepts for i in range(8 * k, 8 * k + 8)]))
    before = _paired_right_way(net, test_pos, test_neg, concepts, 48)
    g = torch.Generator().manual_seed(0)
    drawn: dict[int, torch.Tensor] = {}

    def batch(j: int, negative: bool = False) -> torch.Tensor:
        c = concepts[j]
        if not negative:
            drawn[j] = torch.randperm(96, generator=g)[:16]
        ds = train_neg[c] if negative else train_pos[c]
        return torch.stack([ds[int(i)]["image"] for i in drawn[j]])  # the negatives pair with the positives

    module._next_concept_batch = batch
    net.train()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    for step in range(60):
        opt.zero_grad()
        module.concept_feature_loss(step % len(concepts)).backward()
        opt.step()
    after = _paired_right_way(net, test_pos, test_neg, concepts, 48)
    # measured: before 0.79 / 0.48 / 0.69, after 1.00 / 0.90 / 0.50. The circle axis does not learn (as in
    # benchmarks/concepts_results.md): asserted on colour and texture only
    assert after[0] >= 0.95 and after[1] >= 0.8, (before, after)
    assert after[1] > before[1] + 0.25, (before, after)


def ConceptWhiteningModuleForTest(concepts: list[str]):  # noqa: N802 (a factory named like the class it builds)
    from interpzoo.models.lit_concept_whitening import ConceptWhiteningModule

    data_info = {"num_classes": 10, "in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    return ConceptWhiteningModule(
        net={
            "name": "cw_resnet18s",
            "backbone": {"name": "resnet18s", "width": 8},
            "alignment": "contrastive",
        },
        concepts=concepts,
        data_info=data_info,
        baselines=False,
        concept_loss_weight=1.0,
    )


def test_training_step_adds_the_weighted_feature_loss_of_one_concept_per_step() -> None:
    """``training_step`` = the class loss + ``concept_loss_weight`` x the feature loss of axis
    ``global_step % K`` (the class loss recomputed here on the same batch: train-mode outputs use batch
    statistics, so a second forward gives the same logits)."""
    from interpzoo.models.lit_base import ClassificationModule

    torch.manual_seed(0)
    module = _feature_loss_module(3.0)
    module.net.train()
    calls: list[int] = []
    module.concept_feature_loss = lambda axis: calls.append(axis) or torch.tensor(0.25)
    module.log = lambda *a, **k: None  # no Trainer here
    module.check_finite_loss = lambda *a, **k: None
    batch = {"image": torch.rand(8, 3, 32, 32), "label": torch.randint(0, 4, (8,))}
    loss = module.training_step(batch, 0)
    base = ClassificationModule.training_step(module, batch, 0)
    torch.testing.assert_close(loss.detach(), base.detach() + 3.0 * 0.25)
    assert calls == [0]  # global_step 0 -> the first concept
    module.hparams.concept_loss_weight = 0.0
    torch.testing.assert_close(module.training_step(batch, 0).detach(), base.detach())
    assert calls == [0]  # weight 0: the paper's training, no concept forward at all
