"""SENN through the real configs: debug run, learning runs, tabular data (sklearn + CSV), COMPAS
recipe, checkpoints/bundles, and 2-process CPU DDP with metrics checked against one process."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from interpzoo.datamodules.base import fixed_subset_indices
from interpzoo.datamodules.tabular import (
    BreastCancerDataModule,
    CSVDataModule,
    WineDataModule,
    drop_conflicting_rows,
)
from interpzoo.metrics.senn import (
    ConceptSparsity,
    DeadConcepts,
    LocalLipschitz,
    MeanScore,
    concept_faithfulness_scores,
)
from interpzoo.models import load_checkpoint, load_pretrained
from interpzoo.run import train
from tests.conftest import CONF_DIR, ROOT, TINY_DATA

torch.set_num_threads(1)  # shared CPUs: avoid OpenMP oversubscription

FAST = ["model.lipschitz.points=32", "model.lipschitz.samples=4", "model.median_samples=128"]


# ------------------------------------------------------------------------------------------------
# Tabular data
# ------------------------------------------------------------------------------------------------
def test_sklearn_tabular_sets_standardise_on_train_only() -> None:
    for cls, n, f, c in ((BreastCancerDataModule, 569, 30, 2), (WineDataModule, 178, 13, 3)):
        dm = cls(seed=3)
        dm.setup()
        info = dm.data_info
        assert info["input_kind"] == "tabular" and info["num_features"] == f and info["num_classes"] == c
        assert len(info["feature_names"]) == f and len(info["class_names"]) == c
        splits = dm.split_indices
        assert sorted(splits["train"] + splits["val"] + splits["test"]) == list(range(n))
        assert len(splits["test"]) == pytest.approx(0.2 * n, abs=1)
        x_train = dm.train_set.features.double()
        np.testing.assert_allclose(info["mean"], x_train.mean(0).numpy(), rtol=1e-5)
        np.testing.assert_allclose(info["std"], x_train.std(0, unbiased=False).numpy(), rtol=1e-4)
        all_x = torch.cat([dm.train_set.features, dm.val_set.features, dm.test_set.features]).double()
        assert not np.allclose(info["mean"], all_x.mean(0).numpy(), rtol=1e-6)  # val/test did not leak in
        item = dm.test_set[5]
        assert item["features"].shape == (f,) and item["features"].dtype == torch.float32
        assert item["label"].dtype == torch.long and int(item["index"]) == 5


def _write_csv(path: Path, n: int = 240, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "age", "colour", "score", "label"])
        for i in range(n):
            age, score = rng.normal(40, 10), rng.normal(0, 1)
            colour = ["red", "green", "blue"][i % 3]
            label = "yes" if (age - 40) / 10 + score + (colour == "red") > 0.3 else "no"
            row = [i, f"{age:.2f}", colour, f"{score:.3f}", label]
            if i in (7, 8):
                row[3] = "NA"  # two incomplete rows
            w.writerow(row)


def test_csv_datamodule_columns_missing_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    _write_csv(path)
    with pytest.warns(UserWarning, match="dropped 2 rows"):
        dm = CSVDataModule(path=str(path), target="label", drop=["id"], feature_transforms={"age": "log"})
        dm.setup()
    info = dm.data_info
    assert info["feature_names"] == ["age", "colour=blue", "colour=green", "colour=red", "score"]
    assert info["class_names"] == ["no", "yes"]
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 238
    raw_ages = dm.train_set.features[:, 0]
    assert 3.0 < float(raw_ages.mean()) < 4.5  # log(age) was applied
    with pytest.raises(Exception, match="did you mean 'label'"):
        CSVDataModule(path=str(path), target="lable").setup()
    with pytest.raises(Exception, match="not numeric"):
        CSVDataModule(path=str(path), target="label", categorical="error").setup()
    with pytest.raises(Exception, match="path=/my/table.csv target="):
        CSVDataModule(path=None, target=None)


def test_drop_conflicting_rows_rule() -> None:
    x = np.array([[0, 1], [0, 1], [0, 1], [0, 1], [1, 1], [1, 1], [2, 2]], dtype=float)
    y = np.array([1, 1, 1, 0, 0, 1, 0])
    keep = drop_conflicting_rows(x, y, 0.2)
    # group [0,1]: 3 of 4 say 1 (0.75 >= 0.7) -> drop the 0; group [1,1]: tie -> keep both
    assert keep.tolist() == [True, True, True, False, True, True, True]


def test_csv_short_form_on_the_command_line(make_cfg, tmp_path: Path) -> None:
    from interpzoo.preflight import check_override_keys

    path = tmp_path / "table.csv"
    _write_csv(path, n=150)
    overrides = [
        "model=senn",
        "data=csv",
        f"path={path}",
        "target=label",
        "data.drop=[id]",
        "trainer.max_epochs=2",
        "data.batch_size=32",
        "report=false",
        *FAST,
    ]
    check_override_keys(CONF_DIR, "train", overrides)  # the did-you-mean pre-check accepts path=/target=
    cfg = make_cfg(overrides)
    assert cfg.data.path == str(path) and cfg.data.target == "label"
    metrics = train(cfg)
    assert metrics["test/acc"] > 0.6
    bundle = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert bundle["data_config"]["feature_names"][1] == "colour=blue"


def test_compas_recipe_on_a_file_in_its_format(make_cfg, tmp_path: Path) -> None:
    cols = [
        "Two_yr_Recidivism",
        "Number_of_Priors",
        "score_factor",
        "Age_Above_FourtyFive",
        "Age_Below_TwentyFive",
        "African_American",
        "Asian",
        "Hispanic",
        "Native_American",
        "Other",
        "Female",
        "Misdemeanor",
    ]
    rng = np.random.default_rng(0)
    path = tmp_path / "propublica_data_for_fairml.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for _ in range(300):
            priors = int(rng.poisson(3))
            row = {c: int(rng.random() < 0.3) for c in cols}
            row["Number_of_Priors"] = priors
            row["score_factor"] = int(priors + 2 * row["Age_Below_TwentyFive"] + rng.normal() > 3)
            w.writerow([row[c] for c in cols])
    cfg = make_cfg(
        [
            "experiment=senn_compas",
            f"path={path}",
            "trainer.max_epochs=2",
            "data.batch_size=50",
            "report=false",
            *FAST,
        ]
    )
    assert cfg.data.target == "score_factor" and cfg.model.net.single_logit_binary
    train(cfg)
    net = load_pretrained(tmp_path / "bundle")
    assert net.n_concepts == 12  # 11 features + bias
    out = net(torch.randn(4, 11))
    torch.testing.assert_close(out.relevances[:, :, 0], -out.relevances[:, :, 1])


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------
def test_debug_fdr_partshapes(make_cfg) -> None:
    metrics = train(make_cfg(["model=senn", "debug=fdr", *TINY_DATA, *FAST]))
    assert "test/acc" in metrics and "test/faithfulness" in metrics


def test_breast_cancer_learns_explains_and_round_trips(make_cfg, tmp_path: Path) -> None:
    metrics = train(make_cfg(["model=senn", "data=breast_cancer", "trainer.max_epochs=4", *FAST]))
    assert metrics["test/acc"] > 0.85
    for key in (
        "val/robustness",
        "val/faithfulness",
        "val/faithfulness_median",
        "val/faithfulness_input",
        "test/lipschitz",
        "test/lipschitz_max",
        "test/dead_concepts",
        "test/concept_sparsity",
    ):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert metrics["val/robustness"] > 0
    figures = {p.name for p in (tmp_path / "figures").glob("*.png")}
    assert {"senn_relevances.png", "confusion_matrix.png"} <= figures
    # checkpoint: plain data only, and it rebuilds the same network as the bundle
    ckpt = next((tmp_path / "checkpoints").glob("epoch_*.ckpt"))
    state = torch.load(ckpt, weights_only=True)
    assert state["hyper_parameters"]["robustness_lambda"] == pytest.approx(1e-4)
    net_ckpt, net_bundle = load_checkpoint(ckpt).eval(), load_pretrained(tmp_path / "bundle").eval()
    x = torch.randn(3, 30) * 5 + 10
    a, b = net_ckpt.explain(x), net_bundle.explain(x)
    torch.testing.assert_close(a["relevances"], b["relevances"])
    torch.testing.assert_close(
        a["contributions"].sum(1), net_bundle(x).logits.gather(1, b["prediction"][:, None])[:, 0]
    )


@pytest.mark.slow
def test_partshapes_learned_concepts_learn(make_cfg, tmp_path: Path) -> None:
    metrics = train(
        make_cfg(
            [
                "model=senn",
                "trainer.max_epochs=2",
                "data.n_train=400",
                "data.n_val=64",
                "data.n_test=128",
                "data.batch_size=32",
                "model.robustness_lambda=1e-3",
                *FAST,
            ]
        )
    )
    assert metrics["test/acc"] > 0.4  # 10 classes: chance is 0.1 (about 0.9 after 3 epochs on 600 images)
    assert np.isfinite(metrics["test/reconstruction_mse"]) and np.isfinite(metrics["test/lipschitz"])
    assert (tmp_path / "figures" / "senn_concept_prototypes.png").is_file()


# ------------------------------------------------------------------------------------------------
# DDP
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric_worker(rank: int, world: int, port: int, data: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        faith, lip, dead, sparse = (
            MeanScore(),
            LocalLipschitz(),
            DeadConcepts(data["h"].shape[1]),
            ConceptSparsity(),
        )
        part = slice(rank, None, world)
        faith.update(data["scores"][part])
        lip.update(data["lips"][part])
        dead.update(data["h"][part])
        sparse.update(data["h"][part])
        got = {
            "faith": faith.compute(),
            "lip": lip.compute(),
            "dead": dead.compute(),
            "sparse": sparse.compute(),
        }
        exp = data["expected"]
        assert torch.allclose(got["faith"], exp["faith"]), (got["faith"], exp["faith"])
        for k in ("mean", "max", "undefined"):
            assert torch.allclose(got["lip"][k], exp["lip"][k]), (k, got["lip"][k], exp["lip"][k])
        assert torch.allclose(got["dead"], exp["dead"]) and torch.allclose(got["sparse"], exp["sparse"])
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow  # ~15 s of process start-up on an idle 2-core machine; the DDP training test covers sum/max too
def test_metrics_reduce_exactly_over_two_gloo_processes() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(11, generator=g)
    scores[3] = float("nan")
    lips = torch.rand(11, generator=g) * 5
    lips[[1, 8]] = float("nan")
    h = torch.randn(11, 6, generator=g)
    h[:, 2] = 0.0
    h[::2, 4] = 1e-5
    expected = {}
    for name, metric, arg in (
        ("faith", MeanScore(), scores),
        ("lip", LocalLipschitz(), lips),
        ("dead", DeadConcepts(6), h),
        ("sparse", ConceptSparsity(), h),
    ):
        metric.update(arg)
        expected[name] = metric.compute()
    assert expected["dead"].item() == pytest.approx(1 / 6)
    data = {"scores": scores, "lips": lips, "h": h, "expected": expected}
    torch.multiprocessing.spawn(_metric_worker, args=(2, _free_port(), data), nprocs=2, join=True)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_training_and_metrics_match_one_process(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        [
            "model=senn",
            "data=wine",
            "trainer=ddp_sim",
            "trainer.max_epochs=1",
            "data.batch_size=32",
            "report=false",
            "export=false",
            "callbacks.intrinsic_dim.stages=[]",
            *FAST,
        ]
    )
    metrics = train(cfg)
    assert {"test/acc", "test/lipschitz", "test/faithfulness", "test/dead_concepts", "val/robustness"} <= set(
        metrics
    )
    assert (
        torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    )  # 128 rows / (2 ranks x 16)

    # Recompute the test metrics in this single process from the tested weights.
    from hydra.utils import instantiate

    from interpzoo.run import module_from_source

    module = module_from_source(str(next((tmp_path / "checkpoints").glob("epoch_*.ckpt")))).eval()
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    assert len(dm.test_set) % 2 == 0  # no DistributedSampler padding: sums over ranks are exact
    with torch.no_grad():
        out = module.net(dm.test_set.features)
    faith = concept_faithfulness_scores(out.concepts, out.relevances)
    assert metrics["test/faithfulness"] == pytest.approx(float(faith[~faith.isnan()].mean()), abs=1e-5)
    dead = DeadConcepts(out.concepts.shape[1])
    dead.update(out.concepts)
    assert metrics["test/dead_concepts"] == pytest.approx(dead.compute().item())
    acc = (out.logits.argmax(1) == dm.test_set.labels).float().mean().item()
    assert metrics["test/acc"] == pytest.approx(acc, abs=1e-6)
    idx = fixed_subset_indices(len(dm.test_set), 32, 0)
    lips = module.lipschitz_estimates(dm.test_set, idx)["combined"]
    assert metrics["test/lipschitz"] == pytest.approx(float(lips.mean()), rel=1e-5)
    assert metrics["test/lipschitz_max"] == pytest.approx(
        float(lips.max()), rel=1e-5
    )  # max-reduced over ranks


@pytest.mark.slow
def test_lambda_sweep_multirun(tmp_path: Path) -> None:
    """``-m model.robustness_lambda=...`` runs one job per value (Hydra multirun through train.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "model=senn",
        "data=wine",
        "model.robustness_lambda=0,1",
        "trainer.max_epochs=1",
        "logger=csv",
        "report=false",
        "export=false",
        "model.lipschitz.points=16",
        f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    subprocess.run(cmd, check=True, cwd=tmp_path, env=env, capture_output=True, timeout=400)
    found = sorted((tmp_path / "sweep").rglob("metrics.json"))
    assert len(found) == 2
    lam = [
        json.loads((p.parent / "config.yaml").read_text().split("robustness_lambda:")[1].split("\n")[0])
        for p in found
    ]
    assert sorted(lam) == [0, 1]
