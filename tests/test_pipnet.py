"""PIP-Net (Nauta et al., CVPR 2023): losses against brute-force loops, the non-negative scoring sheet, the
sparse explanation (scores sum to the logit), the patch softmax, the metrics, the config errors and a
``train.py`` run as a user types it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interpzoo.layers.pipnet import (
    NonNegLinear,
    PatchPrototypes,
    alignment_loss,
    pipnet_class_loss,
    presence_scores,
    tanh_loss,
)
from interpzoo.metrics.pipnet import (
    LocalExplanationSize,
    global_size,
    local_size,
    prototypes_per_class,
    sparsity_ratio,
)
from interpzoo.models import create_model
from interpzoo.models.lit_pipnet import PIPNetModule, augment_view_pair, augment_views
from interpzoo.models.pipnet import PIPNet

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"name": "resnet18s", "width": 8}


def _softmax_maps(b: int, d: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(b, d, h, w, generator=g, dtype=torch.float64)).softmax(1)


# -- losses ---------------------------------------------------------------------------------------
def test_alignment_loss_matches_a_loop_over_patches() -> None:
    z1, z2 = _softmax_maps(3, 5, 4, 2, 0), _softmax_maps(3, 5, 4, 2, 1)
    eps = 1e-12
    # Eq. 1 patch by patch, each view against the other: -1/(B H W) sum log(sum_d z'_d z''_d + eps)
    total, n = 0.0, 0
    for b in range(3):
        for h in range(4):
            for w in range(2):
                dot = sum(float(z1[b, d, h, w]) * float(z2[b, d, h, w]) for d in range(5))
                total += -math.log(dot + eps)
                n += 1
    expected = total / n  # both directions give the same value; the mean of the two is that value
    assert float(alignment_loss(z1, z2, eps)) == pytest.approx(expected, rel=1e-10)
    # identical one-hot assignments: perfectly aligned, loss 0
    onehot = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 3, 3)), 5).permute(0, 3, 1, 2).double()
    assert float(alignment_loss(onehot, onehot.clone())) == pytest.approx(0.0, abs=1e-9)


def test_alignment_loss_with_offsets_matches_a_loop_over_corresponding_patches() -> None:
    z1, z2 = _softmax_maps(3, 5, 4, 3, 4), _softmax_maps(3, 5, 4, 3, 5)
    offsets = torch.tensor([[0, 0], [1, -2], [-3, 2]])
    eps = 1e-12
    # view 1's patch (h, w) is paired with view 2's (h + dy, w + dx) when that lies inside the 4x3 grid
    total, n = 0.0, 0
    for b in range(3):
        dy, dx = offsets[b].tolist()
        for h in range(4):
            for w in range(3):
                if 0 <= h + dy < 4 and 0 <= w + dx < 3:
                    dot = sum(float(z1[b, d, h, w]) * float(z2[b, d, h + dy, w + dx]) for d in range(5))
                    total += -math.log(dot + eps)
                    n += 1
    assert n == 12 + 3 + 1  # all 12; 3 rows x 1 col; 1 row x 1 col
    assert float(alignment_loss(z1, z2, eps, offsets=offsets)) == pytest.approx(total / n, rel=1e-10)
    # zero offsets are the plain loss
    zero = torch.zeros(3, 2, dtype=torch.long)
    assert float(alignment_loss(z1, z2, offsets=zero)) == pytest.approx(
        float(alignment_loss(z1, z2)), rel=1e-12
    )
    with pytest.raises(ValueError, match="no corresponding patches"):
        alignment_loss(z1, z2, offsets=torch.tensor([[4, 0]] * 3))
    with pytest.raises(ValueError, match="offsets must be"):
        alignment_loss(z1, z2, offsets=torch.zeros(2, 2))


def test_cell_shifted_views_line_up_under_their_offsets() -> None:
    # an image whose every 4x4 cell has its own colour: the cell "prototype" (a one-hot of the cell's colour,
    # read by average pooling) is known exactly, so the content-paired alignment must be 0, while pairing
    # the same grid positions (no offsets) must not be
    torch.manual_seed(0)
    ids = torch.arange(64).view(1, 1, 8, 8).float()
    x = torch.nn.functional.interpolate(ids, scale_factor=4, mode="nearest").expand(6, 3, 32, 32) / 63.0
    v1, v2, offsets = augment_view_pair(x.clone(), [{"name": "shift", "max_cells": 2}], cell=4)
    assert offsets is not None and offsets.shape == (6, 2) and int(offsets.abs().max()) <= 4
    assert bool((offsets != 0).any())

    def cell_onehot(v: torch.Tensor) -> torch.Tensor:
        # (B, 64, 8, 8): each cell's id as a one-hot; shifted-in (reflected) cells repeat some id, but their
        # partners lie outside the grid, so they are never paired
        cell = torch.nn.functional.avg_pool2d(v[:, 0] * 63.0, 4).round().long()  # (B, 8, 8)
        return torch.nn.functional.one_hot(cell, 64).permute(0, 3, 1, 2).double()

    z1, z2 = cell_onehot(v1), cell_onehot(v2)
    assert float(alignment_loss(z1, z2, offsets=offsets)) == pytest.approx(0.0, abs=1e-9)
    assert float(alignment_loss(z1, z2)) > 1.0


def test_alignment_loss_gradient_stops_at_the_other_view() -> None:
    z1 = _softmax_maps(2, 4, 3, 3, 2).requires_grad_(True)
    z2 = _softmax_maps(2, 4, 3, 3, 3).requires_grad_(True)
    alignment_loss(z1, z2).backward()
    # with stop-gradient each view receives only the gradient of its own direction: d/dz1 of
    # -0.5 mean log(z1 . sg(z2)) = -0.5 z2 / (N (z1 . z2))
    dot = (z1 * z2).sum(1, keepdim=True).detach()
    n = 2 * 3 * 3
    torch.testing.assert_close(z1.grad, -0.5 * z2.detach() / (n * (dot + 1e-12)))
    torch.testing.assert_close(z2.grad, -0.5 * z1.detach() / (n * (dot + 1e-12)))


def test_tanh_loss_matches_a_loop_over_prototypes() -> None:
    g = torch.Generator().manual_seed(4)
    p = torch.rand(6, 7, generator=g, dtype=torch.float64) * 0.3
    p[:, 2] = 0.0  # a prototype absent from the whole batch: log(tanh(0) + eps) = log(eps)
    eps = 1e-8
    expected = 0.0
    for d in range(7):
        s = sum(float(p[b, d]) for b in range(6))
        expected += -math.log(math.tanh(s) + eps)
    expected /= 7
    assert float(tanh_loss(p, eps)) == pytest.approx(expected, rel=1e-10)
    assert float(tanh_loss(p, eps)) > float(tanh_loss(p + 0.5, eps))  # more presence, smaller loss


def test_class_loss_is_cross_entropy_of_log_o_squared_plus_one() -> None:
    g = torch.Generator().manual_seed(5)
    o = torch.rand(4, 3, generator=g, dtype=torch.float64) * 5
    y = torch.tensor([0, 2, 1, 2])
    expected = 0.0
    for i in range(4):
        z = [math.log(float(o[i, k]) ** 2 + 1) for k in range(3)]
        expected += -(z[int(y[i])] - math.log(sum(math.exp(v) for v in z)))
    assert float(pipnet_class_loss(o, y)) == pytest.approx(expected / 4, rel=1e-10)


# -- layers ---------------------------------------------------------------------------------------
def test_patch_softmax_sums_to_one_and_presence_is_the_max() -> None:
    torch.manual_seed(0)
    layer = PatchPrototypes(6, 9)
    with torch.no_grad():
        z = layer(torch.randn(2, 6, 5, 4))
    assert z.shape == (2, 9, 5, 4) and bool((z >= 0).all())
    torch.testing.assert_close(z.sum(1), torch.ones(2, 5, 4))
    p = presence_scores(z)
    for b in range(2):
        for d in range(9):
            assert float(p[b, d]) == max(float(v) for v in z[b, d].flatten())


def test_linear_layer_stays_non_negative_under_negative_gradients() -> None:
    torch.manual_seed(0)
    layer = NonNegLinear(5, 3, bias=True)
    opt = torch.optim.Adam(layer.parameters(), lr=0.5)
    x = torch.rand(8, 5)
    for _ in range(20):
        opt.zero_grad()
        # minimising the outputs: every step moves every weight and bias down (towards negative values)
        layer(x).sum().backward()
        opt.step()
        layer.clamp_(1e-3)
        assert bool((layer.weight >= 0).all()) and bool((layer.bias >= 0).all())
    assert float(layer.weight.abs().sum()) == 0.0  # driven to zero, never below
    # without clamping the parameter may go negative, but the forward still uses relu(W) >= 0
    with torch.no_grad():
        layer.weight.fill_(-1.0)
        layer.bias.fill_(-1.0)
    assert float(layer(x).abs().sum()) == 0.0


def test_module_keeps_the_classifier_non_negative_over_real_steps() -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from torch.utils.data import DataLoader, Dataset

    class _Data(Dataset):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(i)
            return {"image": torch.rand(3, 32, 32, generator=g), "label": torch.tensor(i % 3)}

    torch.manual_seed(0)
    module = PIPNetModule(
        net={"name": "pipnet", "backbone": SMALL, "num_prototypes": 6},
        data_info={"num_classes": 3},
        pretrain_epochs=1,
        weight_decrement=0.05,
        optimizer={"name": "sgd", "lr": 5.0, "param_groups": [{"params": "net.classifier.*", "lr": 50.0}]},
        scheduler=None,
    )
    w0 = module.net.classifier.weight.detach().clone()
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(_Data(), batch_size=8))
    w = module.net.classifier.weight.detach()
    assert bool((w >= 0).all())
    assert not torch.equal(w, w0)  # the full phase did train (and decrement) the classifier
    assert int((w == 0).sum()) > 0  # the huge learning rate pushed some weights below zero: clamped


# -- network and explanation ----------------------------------------------------------------------
def _small_net(**kwargs) -> PIPNet:
    torch.manual_seed(0)
    net = create_model("pipnet", num_classes=4, backbone=SMALL, num_prototypes=12, **kwargs)
    assert isinstance(net, PIPNet)
    return net


def test_default_backbone_gives_an_8x8_grid_and_forward_fields() -> None:
    net = _small_net().eval()
    out = net(torch.rand(2, 3, 32, 32))
    assert net.backbone.stage == "layer3"
    assert out.prototype_maps.shape == (2, 12, 8, 8)
    torch.testing.assert_close(out.prototype_maps.sum(1), torch.ones(2, 8, 8))
    torch.testing.assert_close(out.presence_raw, out.prototype_maps.flatten(2).amax(2))
    # eval mode: presence below the threshold is 0, and the logits use that presence
    expect = torch.where(out.presence_raw < 0.1, torch.zeros_like(out.presence_raw), out.presence_raw)
    torch.testing.assert_close(out.presence, expect)
    torch.testing.assert_close(out.logits, out.presence @ net.class_weights.t())


@pytest.mark.parametrize("bias", [False, True])
def test_explanation_scores_sum_to_the_logit(bias: bool) -> None:
    net = _small_net(bias=bias, presence_threshold=0.0)
    with torch.no_grad():
        # a sparse sheet with a negative parameter (which the forward reads as 0)
        net.classifier.weight.copy_(torch.randn(4, 12))
        if bias:
            net.classifier.bias.copy_(torch.tensor([0.3, -0.2, 0.0, 1.0]))
    x = torch.rand(3, 3, 32, 32)
    for target in (None, 2):
        ex = net.explain(x, target=target)
        for i, e in enumerate(ex):
            assert e.size > 0
            assert bool((e.scores > 0).all()) and bool((e.weights > 0).all())
            assert bool((e.scores[:-1] >= e.scores[1:]).all())  # by decreasing score
            torch.testing.assert_close(e.scores, e.presence * e.weights)
            assert float(e.scores.sum()) + e.bias == pytest.approx(e.logit, rel=1e-5, abs=1e-5)
            # the logit read independently: o_c = sum_d max(W, 0)[c, d] * p_d + max(b, 0)
            net.eval()
            p = net(x).presence[i]
            c = e.target
            w = net.classifier.weight[c].clamp(min=0)
            b = float(net.classifier.bias[c].clamp(min=0)) if bias else 0.0
            assert e.logit == pytest.approx(float((w * p).sum()) + b, rel=1e-5)
            # every prototype with a non-zero score is listed, and no other
            assert set(e.prototypes.tolist()) == set(((w * p) > 0).nonzero().flatten().tolist())
    fig = ex.plot(index=1)
    assert fig.axes[0].has_data()
    assert ex.plot(index=0, image=False).axes[0].has_data()


def test_explanation_patch_is_the_argmax_cell() -> None:
    net = _small_net(presence_threshold=0.0).eval()
    x = torch.rand(2, 3, 32, 32)
    ex = net.explain(x)
    maps = net(x).prototype_maps
    s = net.backbone.stride
    for i, e in enumerate(ex):
        for d, (r, c), box in zip(e.prototypes.tolist(), e.locations.tolist(), e.boxes.tolist()):
            assert float(maps[i, d, r, c]) == float(maps[i, d].max())
            assert box == [c * s, r * s, (c + 1) * s, (r + 1) * s]


# -- metrics --------------------------------------------------------------------------------------
def test_sparsity_metrics_against_counting() -> None:
    w = torch.tensor([[0.0, 1.0, 0.0, 0.5], [0.0, 0.0, 0.0, 2.0], [0.0, 0.3, 0.0, 0.0]])
    assert global_size(w) == 2  # prototypes 1 and 3
    assert sparsity_ratio(w) == pytest.approx(8 / 12)
    assert prototypes_per_class(w).tolist() == [2, 1, 1]
    p = torch.tensor([[0.9, 0.0, 0.4, 0.7], [0.5, 0.6, 0.2, 0.0]])
    # image 0 explained as class 0: prototype 3 only (1 is absent); image 1 as class 2: prototype 1
    assert local_size(p, w, torch.tensor([0, 2])).tolist() == [1, 1]
    assert local_size(p, w, any_class=True).tolist() == [1, 1]
    m = LocalExplanationSize()
    m.update(p, w, torch.tensor([0, 2]))
    m.update(p[:1], w, torch.tensor([1]))
    assert float(m.compute()) == pytest.approx(1.0)


# -- augmentation ---------------------------------------------------------------------------------
def test_views_keep_hue_and_shift_by_at_most_max_px() -> None:
    torch.manual_seed(0)
    x = torch.zeros(4, 3, 16, 16)
    x[:, 0, 6:10, 6:10] = 0.8  # a red square on black
    v1, v2 = augment_views(x, [{"name": "translate", "max_px": 2}, {"name": "brightness", "max_delta": 0.1}])
    for v in (v1, v2):
        assert bool((v[:, 1:] == 0).all())  # no green or blue appears: the hue is kept
        for i in range(4):
            ys, xs = (v[i, 0] > 0).nonzero(as_tuple=True)
            assert ys.numel() == 16 and 4 <= int(ys.min()) <= 8 and 4 <= int(xs.min()) <= 8
    assert not torch.equal(v1, v2)


# -- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pretrain_epochs": -1}, "pretrain_epochs must be an integer >= 0"),
        ({"augment": [{"name": "rotate"}]}, "is not an augmentation"),
        ({"augment": [{"name": "translate", "max_pix": 2}]}, "did you mean 'max_px'"),
        ({"loss": {"algin": 1.0}}, "did you mean 'align'"),
        ({"weight_decrement": 2.0}, "weight_decrement must be a number in"),
    ],
)
def test_bad_module_settings_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PIPNetModule(net={"name": "pipnet", "backbone": SMALL}, data_info={"num_classes": 3}, **kwargs)


def test_bad_network_settings_are_named() -> None:
    with pytest.raises(ValueError, match="presence_threshold must be in"):
        create_model("pipnet", num_classes=3, backbone=SMALL, presence_threshold=1.5)
    with pytest.raises(ValueError, match="model.net.feature_stage"):
        create_model("pipnet", num_classes=3, backbone=SMALL, feature_stage="layer9")
    with pytest.raises(ValueError, match="padding_mode='circ' is not a padding"):
        create_model("pipnet", num_classes=3, backbone=SMALL, padding_mode="circ")
    with pytest.raises(ValueError, match="max_cells must be a whole number"):
        PIPNetModule(
            net={"name": "pipnet", "backbone": SMALL},
            data_info={"num_classes": 3},
            augment=[{"name": "shift", "max_cells": 1.5}],
        )


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_border_free_padding_gives_a_constant_image_constant_features(mode: str) -> None:
    # a uniform image carries no position: with reflect/replicate padding every conv sees a uniform input, so
    # every latent cell is the same vector (eval-mode BN and ReLU are per channel); zero padding marks the border
    zeros, other = _small_net(), _small_net(padding_mode=mode)
    other.load_state_dict(zeros.state_dict())  # same weights: only the padding differs
    zeros.eval(), other.eval()
    x = torch.full((2, 3, 32, 32), 0.7)
    with torch.no_grad():
        f_zero, f_other = zeros.features(x), other.features(x)
    spread = lambda f: float((f - f[:, :, :1, :1]).abs().max())  # noqa: E731
    assert spread(f_other) < 1e-5
    assert spread(f_zero) > 1e-3
    convs = [m for m in other.backbone.modules() if isinstance(m, torch.nn.Conv2d) and max(m.padding) > 0]
    assert convs and all(m.padding_mode == mode for m in convs)


def _run_train(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={tmp_path / 'run'}"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # a fresh interpreter, Hydra and Lightning: ~20 s idle, a minute on a busy machine
def test_train_py_fast_dev_run(tmp_path: Path) -> None:
    proc = _run_train(
        ["model=pipnet", "+trainer.fast_dev_run=true", "model.net.backbone.width=8", "logger=none"], tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0
    # width 8: layer3 has 4 * 8 = 32 channels, so D = 32 prototypes, all with weight N(1, 0.1) > 0 after the
    # one (pretraining) epoch of a fast_dev_run
    assert metrics["test/global_size"] == 32


@pytest.mark.slow
def test_train_py_bad_value_is_one_clear_error(tmp_path: Path) -> None:
    proc = _run_train(["model=pipnet", "model.pretrain_epochs=-2", "+trainer.fast_dev_run=true"], tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "error:" in out and "pretrain_epochs must be an integer >= 0" in out
    assert "Traceback" not in out


def test_partscale_recipe_composes_to_a_warm_started_sparse_layer3_pipnet(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from interpzoo.api import compose_config
    from interpzoo.models.backbones import PretrainedWeightsError

    cfg = compose_config(
        ["experiment=pipnet_partscale", "model.net.backbone.pretrained=/some/bundle"], tmp_path
    )
    assert cfg.model.net.name == "pipnet" and (cfg.data.pose, cfg.data.image_size) == ("varied", 64)
    assert (cfg.model.net.feature_stage, cfg.model.net.backbone.pretrained) == ("layer3", "/some/bundle")
    # the black box it warm-starts from has the same trunk (experiment=baseline_partshapes)
    bb = compose_config(["experiment=baseline_partshapes"], tmp_path)
    assert (bb.model.net.backbone.name, bb.model.net.backbone.width) == (
        cfg.model.net.backbone.name,
        cfg.model.net.backbone.width,
    )
    assert cfg.model.weight_decrement > 1e-3 and cfg.trainer.max_epochs > cfg.model.pretrain_epochs
    # without a black box the run stops with the fix instead of silently training from scratch
    bare = compose_config(["experiment=pipnet_partscale"], tmp_path)
    with pytest.raises(PretrainedWeightsError, match=r"none was given.*experiment=baseline_partscale"):
        create_model("pipnet", num_classes=10, backbone=OmegaConf.to_container(bare.model.net.backbone))
