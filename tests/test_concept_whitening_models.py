"""Concept whitening in networks and training runs: surgery, the cw architecture, the Lightning procedure,
metrics against independent computations, the Places365 recipe on fake folders, and 2-process DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import open_dict
from pytorch_lightning import Callback
from torch import nn

from interpzoo.ddp import SyncBatchNormAndConceptWhitening
from interpzoo.layers.concept_whitening import ConceptWhitening2d, SyncConceptWhitening2d, pool_axes
from interpzoo.metrics.concept_whitening import (
    ConceptAUC,
    ConceptSimilarity,
    PermutationImportance,
    WhiteningCorrelation,
    best_filter_auc,
    binary_auc,
    linear_probe_auc,
)
from interpzoo.models import create_model, load_checkpoint, load_pretrained, save_pretrained
from interpzoo.models.concept_whitening import concept_forward, paper_layer_names, replace_batchnorm
from interpzoo.models.lit_concept_whitening import ConceptWhiteningModule
from interpzoo.run import train
from tests.conftest import TINY_DATA

CONCEPTS = ["has_red", "has_striped", "has_circle"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices on a shared 2-core machine: one BLAS thread is much faster
    yield
    torch.set_num_threads(n)


# -- surgery ---------------------------------------------------------------------------------------
def test_paper_layer_indices_of_torchvision_models() -> None:
    r18 = torchvision.models.resnet18()
    assert paper_layer_names(r18)[7] == "layer4.1.bn1" and len(paper_layer_names(r18)) == 8
    assert len(paper_layer_names(torchvision.models.resnet50())) == 16
    vgg = torchvision.models.vgg16_bn()
    assert paper_layer_names(vgg) == [
        f"features.{i}" for i in (1, 4, 8, 11, 15, 18, 21, 25, 28, 31, 35, 38, 41)
    ]
    dense = paper_layer_names(torchvision.models.densenet121())
    assert dense == [
        "features.norm0",
        "features.transition1.norm",
        "features.transition2.norm",
        "features.transition3.norm",
        "features.norm5",
    ]


def test_replace_batchnorm_in_torchvision_resnet() -> None:
    net = torchvision.models.resnet18(num_classes=5)
    net.train()
    x = torch.rand(4, 3, 64, 64)
    for _ in range(3):  # "train" the BatchNorms so their statistics are not the initial 0 / 1
        net(x)
    bn = net.layer3[0].bn1
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    replace_batchnorm(net, ["layer3.0.bn1", 8], concepts=["a", "b"], activation_mode="mean")
    cw = net.layer3[0].bn1
    assert isinstance(cw, ConceptWhitening2d) and isinstance(net.layer4[1].bn1, ConceptWhitening2d)
    assert cw.concept_names == ["a", "b"] and cw.activation_mode == "mean"
    assert torch.equal(cw.running_mean, mean)
    assert torch.allclose(cw.running_wm.diagonal(), (var + bn.eps).rsqrt())
    assert "layer3.0.bn1.running_rot" in net.state_dict()
    assert net.train()(x).shape == (4, 5) and net.eval()(x).shape == (4, 5)
    with pytest.raises(ValueError, match="already"):
        replace_batchnorm(net, ["layer3.0.bn1"])
    with pytest.raises(TypeError, match="not a BatchNorm2d"):
        replace_batchnorm(net, ["layer3.0.conv1"])
    with pytest.raises(KeyError, match="did you mean"):
        replace_batchnorm(net, ["layer3.0.bn"])
    with pytest.raises(ValueError, match=r"out of range.*1\.\.8"):
        replace_batchnorm(torchvision.models.resnet18(), [9])


def test_concept_forward_stops_after_the_layer_and_touches_only_its_row() -> None:
    net = create_model("cw_resnet18s", num_classes=3, concepts=CONCEPTS).eval()
    calls = []
    net.classifier.register_forward_hook(lambda *a: calls.append(1))
    layer = net.cw_layer
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    concept_forward(net, torch.rand(4, 3, 32, 32), axis=1)
    assert calls == []  # the pass stopped after the whitening layer
    changed = {k for k, v in layer.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"sum_G", "counter"} and layer.mode == -1
    assert torch.count_nonzero(layer.sum_G[[0, 2]]) == 0 and torch.count_nonzero(layer.sum_G[1]) > 0
    out = net(torch.rand(2, 3, 32, 32))
    assert out.concept_activations.shape == (2, 3) and out.whitened.shape == (2, 64, 8, 8)
    assert torch.allclose(out.concept_activations, pool_axes(out.whitened[:, :3], "pool_max"))


def test_layer_sync_plugin_converts_and_reverts() -> None:
    net = create_model("cw_resnet18s", num_classes=3, concepts=CONCEPTS)
    rot = net.cw_layer.running_rot
    plugin = SyncBatchNormAndConceptWhitening(batchnorm=True)
    net = plugin.apply(net)
    assert isinstance(net.cw_layer, SyncConceptWhitening2d) and net.cw_layer.running_rot is rot
    assert isinstance(net.backbone.body.bn1, nn.SyncBatchNorm)
    net = plugin.revert(net)
    assert type(net.cw_layer) is ConceptWhitening2d and not isinstance(
        net.backbone.body.bn1, nn.SyncBatchNorm
    )
    off = SyncBatchNormAndConceptWhitening(enabled=False)
    assert type(off.apply(net).cw_layer) is ConceptWhitening2d


def test_warm_start_from_a_baseline_bundle(tmp_path: Path) -> None:
    data_info = {"num_classes": 4, "in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    base = create_model("baseline_resnet18s", num_classes=4).train()
    for _ in range(3):
        base(torch.rand(8, 3, 32, 32))
    bundle = save_pretrained(base.eval(), tmp_path / "bn", data_config=data_info)
    module = ConceptWhiteningModule(
        net={"name": "cw_resnet18s"}, concepts=CONCEPTS, data_info=data_info, init_from=str(bundle)
    )
    module.warm_start(str(bundle))
    bn = base.backbone.body.layer3[0].bn1
    cw = module.net.cw_layer
    assert torch.equal(cw.running_mean, bn.running_mean)
    assert torch.allclose(cw.running_wm, torch.diag((bn.running_var + bn.eps).rsqrt()))
    assert torch.equal(module.net.classifier.weight, base.classifier.weight)
    assert torch.equal(
        module.net.backbone.body.layer1[0].conv1.weight, base.backbone.body.layer1[0].conv1.weight
    )
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(module.reference(x).logits, base(x).logits)


# -- metrics against independent computations -------------------------------------------------------
def test_concept_metrics_match_brute_force() -> None:
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(30)
    scores = torch.randn(90, 3, generator=g) + 1.5 * nn.functional.one_hot(labels, 3)
    scores[:10, 0] = scores[40:50, 0] = 0.5  # ties
    auc = ConceptAUC(3)
    for i in range(0, 90, 32):
        auc.update(scores[i : i + 32], labels[i : i + 32])
    res = auc.compute()
    for j in range(3):
        assert res["auc"][j] == pytest.approx(roc_auc_score((labels == j).numpy(), scores[:, j].numpy()))
        pos, neg = scores[labels == j, j], scores[labels != j, j]
        pairwise = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
        assert binary_auc(scores[:, j], labels == j) == pytest.approx(float(pairwise))
    assert torch.isfinite(res["fold_std"]).all()

    # with ids, the folds do not depend on the order the images arrive in (rank-major under DDP)
    ids = torch.arange(90)
    shuffled = ConceptAUC(3)
    order = torch.randperm(90, generator=g)
    for i in range(0, 90, 32):
        o = order[i : i + 32]
        shuffled.update(scores[o], labels[o], ids[o])
    in_order = ConceptAUC(3)
    in_order.update(scores, labels, ids)
    assert torch.equal(shuffled.compute()["fold_std"], in_order.compute()["fold_std"])
    assert torch.equal(
        in_order.compute()["fold_std"], res["fold_std"]
    )  # ids sorted = the arrival order above
    no_ids = ConceptAUC(3)
    no_ids.update(scores[order], labels[order])
    assert not torch.equal(no_ids.compute()["fold_std"], res["fold_std"])  # the folds did depend on order

    latents = torch.randn(90, 5, generator=g)
    sim = ConceptSimilarity(3, 5)
    sim.update(latents, labels)
    u = nn.functional.normalize(latents, dim=1).double()
    s = torch.tensor(
        [[float((u[labels == i] @ u[labels == j].T).mean()) for j in range(3)] for i in range(3)],
        dtype=torch.float64,
    )
    r = s.abs() / (s.diagonal().abs()[:, None] * s.diagonal().abs()[None]).sqrt()
    assert torch.allclose(sim.compute()["matrix"], r)

    z = torch.randn(6, 4, 5, 5, generator=g)
    z[:, 1] += 0.7 * z[:, 0]
    corr = WhiteningCorrelation(4)
    corr.update(z[:3])
    corr.update(z[3:])
    ref = torch.corrcoef(z.transpose(0, 1).reshape(4, -1).double())
    off = ~torch.eye(4, dtype=torch.bool)
    assert corr.compute()["offdiag_mean"] == pytest.approx(float(ref[off].abs().mean()))

    perm = PermutationImportance(2)
    perm.update(
        torch.tensor([1.0, 2.0]),
        torch.tensor([0.0, 1.0]),
        torch.tensor([[2.0, 1.0], [2.0, 4.0]]),
        torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
    )
    res = perm.compute()
    assert res["loss_increase"].tolist() == [0.5, 1.0] and res["error_increase"].tolist() == [0.5, 0.0]


def test_baselines_find_the_planted_filter_and_direction() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(2).repeat_interleave(50)
    feats = torch.randn(100, 6, generator=g)
    feats[:, 4] += 3.0 * (labels == 1)  # channel 4 detects concept 1
    auc, best = best_filter_auc(feats, labels, 2)
    assert int(best[1]) == 4 and auc[1] > 0.95
    direction = torch.randn(6, generator=g)
    train_x = torch.randn(100, 6, generator=g) + 2.0 * (labels == 0)[:, None] * direction
    test_x = torch.randn(100, 6, generator=g) + 2.0 * (labels == 0)[:, None] * direction
    assert linear_probe_auc(train_x, labels, test_x, labels, 2)[0] > 0.95


# -- training runs -----------------------------------------------------------------------------------
def test_fast_dev_run(make_cfg) -> None:
    metrics = train(make_cfg(["model=cw", "debug=fdr", "model.align_every=1", *TINY_DATA]))
    for stage in ("val", "test"):
        assert f"{stage}/concept_auc_mean" in metrics and f"{stage}/whitening_offdiag_corr" in metrics
        assert {f"{stage}/concept_auc/{c}" for c in CONCEPTS} <= set(metrics)
        assert metrics[f"{stage}/rotation_orthogonality_error"] < 1e-4
        # the AUC's reference points: the ground-truth indicator (labels from the concept vectors) is a
        # perfect detector; the normalised score is (raw - random) / (ceiling - random)
        for name in [f"concept_auc/{c}" for c in CONCEPTS] + ["concept_auc_mean"]:
            key = f"{stage}/{name}"
            raw, top, rnd = metrics[key], metrics[f"{key}_ceiling"], metrics[f"{key}_random"]
            assert top == pytest.approx(1.0) and 0.0 < rnd < 1.0
            assert metrics[f"{key}_norm"] == pytest.approx((raw - rnd) / (top - rnd), rel=1e-5)
    assert {f"test/concept_importance/{c}" for c in CONCEPTS} <= set(metrics)


@pytest.mark.slow
def test_short_training_learns_and_resume_keeps_the_rotation(make_cfg, tmp_path: Path) -> None:
    data = [
        "data.n_train=480",
        "data.n_val=96",
        "data.n_test=96",
        "data.batch_size=32",
        "data.n_concept_test=60",
    ]
    # no LR schedule: a cosine schedule fitted to 2 epochs has LR 0 in a resumed third epoch
    common = [
        "model=cw",
        "logger=none",
        "model.scheduler=null",
        "model.concept_eval_samples=60",
        "model.report_samples=96",
        *data,
    ]
    metrics = train(make_cfg([*common, "trainer.max_epochs=2", "model.align_every=2"]))
    assert metrics["test/acc"] > 0.3  # 10 classes: chance is 0.1
    assert metrics["test/whitening_offdiag_corr"] < 0.2
    assert metrics["test/rotation_orthogonality_error"] < 1e-4
    assert {"figures/cw_top_images.png", "figures/cw_correlation.png"} <= {
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png")
    }

    last = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    rot = state["net.backbone.body.layer3.0.bn1.running_rot"]
    assert (rot - torch.eye(64)).abs().max() > 1e-3  # the axes were rotated
    net = load_checkpoint(last)
    assert torch.equal(net.cw_layer.running_rot, rot)
    best = json.loads((tmp_path / "bundle" / "config.json").read_text())["checkpoint"]
    best_rot = torch.load(best, weights_only=True)["state_dict"]["net.backbone.body.layer3.0.bn1.running_rot"]
    assert torch.equal(load_pretrained(tmp_path / "bundle").cw_layer.running_rot, best_rot)  # bundles keep it

    # resume without further alignment: the rotation of the checkpoint survives and training continues
    train(
        make_cfg(
            [
                *common,
                "trainer.max_epochs=3",
                "model.align_every=0",
                f"ckpt_path={last}",
                "test=false",
                "report=false",
                "export=false",
            ]
        )
    )
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 3 * 15  # 480 / 32 = 15 steps per epoch
    assert torch.equal(resumed["state_dict"]["net.backbone.body.layer3.0.bn1.running_rot"], rot)
    assert not torch.equal(resumed["state_dict"]["net.classifier.weight"], state["net.classifier.weight"])


def test_places365_recipe_on_fake_folders(make_cfg, tmp_path: Path) -> None:
    from interpzoo.datamodules.testing import make_fake_image_folder

    root = make_fake_image_folder(
        tmp_path / "places",
        classes=("beach", "kitchen"),
        n_per_class=4,
        size=40,
        splits=("train", "val"),
        with_concepts=("airplane", "bed", "person"),
    )
    cfg = make_cfg(
        [
            "experiment=cw_places365_resnet18",
            "debug=fdr",
            f"data.root={root}",
            f"concepts.train_dir={root}/concepts_train",
            f"concepts.test_dir={root}/concepts_test",
            "data.image_size=112",
            "data.batch_size=4",
            "data.num_workers=0",
            "model.align_every=1",
        ]
    )
    assert cfg.model.net.whitened_layers == [8] and cfg.model.optimizer.name == "sgd"
    assert cfg.data.concepts_train_dir == f"{root}/concepts_train"
    metrics = train(cfg)
    assert {f"test/concept_auc/{c}" for c in ("airplane", "bed", "person")} <= set(metrics)
    assert metrics["test/rotation_orthogonality_error"] < 1e-4


# -- DDP ---------------------------------------------------------------------------------------------
class RankAgreement(Callback):
    """Records, on rank 0, how far every rank's whitening state is from rank 0's after training."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        layer = pl_module.net.cw_layer
        out = {"class": type(layer).__name__, "tau": layer.last_tau}
        for key in ("running_rot", "running_wm", "running_mean", "sum_G"):
            gathered = pl_module.all_gather(getattr(layer, key))
            out[key] = float((gathered - gathered[0]).abs().max())
        out["rotated"] = float((layer.running_rot - torch.eye(layer.num_features)).abs().max())
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(out))


@pytest.mark.ddp
@pytest.mark.slow
def test_two_process_ddp_sync_keeps_ranks_identical(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        [
            "model=cw",
            "trainer=ddp_sim",
            "trainer.sync_batchnorm=true",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=4",
            "+trainer.limit_val_batches=1",
            "model.align_every=2",
            "model.concept_eval_samples=16",
            "model.precise_statistics_batches=2",  # population moments summed over ranks
            "logger=none",
            "test=false",
            "export=false",
            "report=false",
            *TINY_DATA,
        ]
    )
    with open_dict(cfg):
        cfg.callbacks.rank_check = {
            "_target_": f"{__name__}.RankAgreement",
            "path": str(tmp_path / "ranks.json"),
        }
    metrics = train(cfg)
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert ranks["class"] == "SyncConceptWhitening2d"  # the trainer switch converted the layer
    assert ranks["rotated"] > 1e-4  # two alignment rounds happened
    for key in ("running_rot", "running_wm", "running_mean", "sum_G"):
        assert ranks[key] == 0.0, key
    assert "val/concept_auc_mean" in metrics


def test_output_whitened_is_the_layer_output_not_its_rectified_version() -> None:
    """torchvision's BasicBlock applies an in-place ReLU right after bn1: the network's ``whitened`` output (and
    the metrics and explanations read from it) must be the whitening layer's output, negative values included."""
    from interpzoo.models.concept_whitening import forward_until

    torch.manual_seed(0)
    net = create_model("cw_resnet18s", num_classes=3, concepts=CONCEPTS).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
        direct = forward_until(net, net.cw_layer, x, capture="output")
    assert (direct < 0).any()
    assert torch.equal(out.whitened, direct)
