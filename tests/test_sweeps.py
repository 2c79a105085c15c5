"""Sweeps, launchers and loggers the way users run them (README "Tune and scale").

Every command runs as a subprocess from a scratch folder, as typed in a shell, on tiny data: the pre-flight
lets Hydra's own options through, ``-m`` works without ``hydra.sweep.dir=``, an Optuna study is kept in
SQLite and continued by the same command, ``hydra/launcher=submitit_local`` runs a job through submitit,
the SLURM launcher asks for one task per GPU, and a wandb offline run holds the figures and the bundle.
"""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, ROOT, TINY_DATA

FDR = ["debug=fdr", "model=baseline", *TINY_DATA]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        # wandb's caches and staging stay in the test folder
        WANDB_DIR=str(tmp_path),
        WANDB_CACHE_DIR=str(tmp_path / ".wandb_cache"),
        WANDB_DATA_DIR=str(tmp_path / ".wandb_data"),
        WANDB_CONFIG_DIR=str(tmp_path / ".wandb_config"),
        HYDRA_FULL_ERROR="1",
    )
    return env


def _run(
    args: list[str], cwd: Path, timeout: int = 300, script: str = "train.py"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(cwd),
        timeout=timeout,
    )


def _ok(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    return out.stdout + out.stderr


# --- the pre-flight never blocks Hydra's own options -------------------------------------------------------


def _user_config_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "my_conf" / "model"
    folder.mkdir(parents=True)
    (folder / "mymodel.yaml").write_text("defaults:\n  - baseline\n  - _self_\nnewkey: 1\n")
    return tmp_path / "my_conf"


ACCEPTED = {
    "sweeper_group": (["hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "--cfg", "hydra"], "n_trials: 3"),
    "launcher_group": (
        ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "--cfg", "hydra"],
        "timeout_min: 5",
    ),
    "hparams_search": (
        ["hparams_search=senn_optuna", "model.robustness_lambda=0.5", "--cfg", "job"],
        "robustness_lambda: 0.5",
    ),
    "plus_key": (["+my_note=hello", "--cfg", "job"], "my_note: hello"),
    "config_dir": (
        ["--config-dir", "{conf}", "model=mymodel", "model.newkey=3", "--cfg", "job"],
        "newkey: 3",
    ),
    "required_value": (["ckpt_path=/some/bundle", "--cfg", "job"], "ckpt_path: /some/bundle"),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_preflight_lets_hydra_options_through(tmp_path: Path, case: str) -> None:
    args, expected = ACCEPTED[case]
    if "{conf}" in args:
        args = [str(_user_config_dir(tmp_path)) if a == "{conf}" else a for a in args]
    out = _run(args, tmp_path, script="eval.py" if case == "required_value" else "train.py")
    text = _ok(out)
    assert expected in text
    assert "error:" not in out.stderr and "is validated against ConfigStore schema" not in out.stderr


def test_preflight_still_catches_typos_in_a_multirun(tmp_path: Path) -> None:
    out = _run(["-m", "seed=0,1", "trainer.max_epoch=1"], tmp_path)
    assert out.returncode == 2
    assert "trainer has no key 'max_epoch'; did you mean 'max_epochs'" in out.stderr
    assert not (tmp_path / "logs").exists()  # nothing started


_BLOCK_PLUGINS = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("hydra_plugins.hydra_optuna_sweeper", "hydra_plugins.hydra_submitit_launcher")):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize(
    "override, dist",
    [
        ("hparams_search=baseline_optuna", "hydra-optuna-sweeper"),
        ("hydra/launcher=submitit_slurm", "hydra-submitit-launcher"),
    ],
)
def test_missing_plugin_names_the_extra(tmp_path: Path, override: str, dist: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _BLOCK_PLUGINS, str(ROOT / "train.py"), "-m", override],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={k: v for k, v in _env(tmp_path).items() if k != "HYDRA_FULL_ERROR"},  # as a user runs it
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert dist in out.stderr and 'pip install -e ".[sweeps]"' in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_eval_of_a_bundle_as_typed(tmp_path: Path) -> None:
    bundle = ROOT / "models" / "pretrained" / "senn_mlp.breast_cancer_s0"
    text = _ok(_run([f"ckpt_path={bundle}", "data=breast_cancer"], tmp_path, script="eval.py"))
    (metrics_file,) = (tmp_path / "logs" / "eval" / "runs").glob("*/metrics.json")
    recorded = json.loads((bundle / "config.json").read_text())["metrics"]["test/acc"]
    assert json.loads(metrics_file.read_text())["test/acc"] == pytest.approx(recorded, abs=1e-6)
    assert "test/acc" in text and "run folder" in text  # the summary table


@pytest.mark.slow
def test_multirun_without_sweep_dir(tmp_path: Path) -> None:
    # no hydra.sweep.dir= and no paths.*: the sweep folder resolves from the launch directory
    _ok(_run(["-m", "seed=0,1", *FDR], tmp_path))
    results = sorted((tmp_path / "logs" / "debug" / "multiruns").glob("*/*/metrics.json"))
    assert [r.parent.name for r in results] == ["0", "1"]
    assert all("test/acc" in json.loads(r.read_text()) for r in results)


# --- Optuna --------------------------------------------------------------------------------------------


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    return cfg


SEARCHES = sorted(p.stem for p in (ROOT / "conf" / "hparams_search").glob("*_optuna.yaml"))


def test_every_method_has_a_study() -> None:
    assert SEARCHES == [
        "baseline_optuna",
        "concept_whitening_optuna",
        "icnn_optuna",
        "protopnet_optuna",
        "senn_optuna",
        "soft_autoencoder_optuna",
    ]


@pytest.mark.parametrize("search", SEARCHES)
def test_study_searches_real_keys_and_persists(search: str) -> None:
    cfg = _compose([f"hparams_search={search}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.study_name == search
    # one folder per study (no timestamp), its SQLite file inside: the same command continues it
    assert cfg.hydra.sweep.dir.endswith(f"/sweeps/{search}")
    assert sweeper.storage == f"sqlite:///{cfg.hydra.sweep.dir}/optuna.db"
    assert len(sweeper.params) >= 2
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", f"{search}: no key {key}"
    method = search.removesuffix("_optuna")
    assert cfg.model.net.name == {"concept_whitening": "cw", "soft_autoencoder": "softae"}.get(method, method)
    assert cfg.optimized_metric in ("val/acc", "val/psnr")


def _study_trials(db: Path) -> list[tuple[int, str, float, dict[str, float]]]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT t.trial_id, t.state, v.value FROM trials t JOIN trial_values v ON v.trial_id = t.trial_id"
        ).fetchall()
        params = con.execute("SELECT trial_id, param_name, param_value FROM trial_params").fetchall()
    finally:
        con.close()
    by_trial: dict[int, dict[str, float]] = {}
    for trial_id, name, value in params:
        by_trial.setdefault(trial_id, {})[name] = value
    return [(t, state, value, by_trial.get(t, {})) for t, state, value in rows]


@pytest.mark.slow
def test_optuna_study_two_trials_and_resume(tmp_path: Path) -> None:
    command = ["-m", "hparams_search=baseline_optuna", "hydra.sweeper.n_trials=1", *FDR]
    _ok(_run(command, tmp_path))
    sweep = tmp_path / "logs" / "debug" / "sweeps" / "baseline_optuna"
    assert len(_study_trials(sweep / "optuna.db")) == 1
    text = _ok(_run(command, tmp_path))  # an interrupted study: the same command goes on
    assert "Study name: baseline_optuna" in text

    trials = _study_trials(sweep / "optuna.db")
    assert len(trials) == 2 and all(state == "COMPLETE" for _, state, _, _ in trials)
    keys = {"model.optimizer.lr", "model.optimizer.weight_decay", "model.net.dropout"}
    assert all(set(p) == keys for *_, p in trials) and trials[0][3] != trials[1][3]

    runs = sorted(sweep.glob("*/metrics.json"))
    assert len(runs) == 2  # one folder per trial, none overwritten by the rerun
    accs = sorted(json.loads(r.read_text())["val/acc"] for r in runs)
    assert sorted(v for _, _, v, _ in trials) == pytest.approx(accs)

    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(accs))
    assert set(best.best_params) == keys
    overrides = [OmegaConf.load(r.parent / ".hydra" / "overrides.yaml") for r in runs]
    assert any(f"model.optimizer.lr={best.best_params['model.optimizer.lr']}" in o for o in overrides)


# --- submitit ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_submitit_local_fast_dev_run(tmp_path: Path) -> None:
    _ok(_run(["-m", "hydra/launcher=submitit_local", *FDR], tmp_path, timeout=400))
    (sweep,) = (tmp_path / "logs" / "debug" / "multiruns").iterdir()
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert "test/acc" in metrics and (sweep / "0" / "config.yaml").is_file()
    (result,) = (sweep / ".submitit").glob("*/*_0_result.pkl")
    status, job_return = pickle.loads(result.read_bytes())
    assert status == "success"
    assert job_return.return_value == pytest.approx(metrics["val/acc"])  # optimized_metric came back
    assert "run finished" in next(result.parent.glob("*_0_log.out")).read_text()


@pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema")
def test_slurm_launcher_one_task_per_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = _compose(
        [
            "hydra/launcher=submitit_slurm",
            "trainer=ddp",
            "trainer.num_nodes=2",
            "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.partition=gpu",
            f"paths.log_dir={tmp_path}",
        ]
    )
    launcher = instantiate(cfg.hydra.launcher)
    assert launcher.params["tasks_per_node"] == 4 and launcher.params["nodes"] == 2
    # the sbatch script submitit would submit, built as the launcher builds it (a stand-in srun on PATH)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{
            (k if k in base else f"slurm_{k}"): v
            for k, v in launcher.params.items()
            if k not in ("submitit_folder", "max_num_timeout")
        }
    )
    script = executor._executor._make_submission_file_text("python train.py", "42")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu"):
        assert f"#SBATCH {line}" in script, script
    # Lightning's own SLURMEnvironment picks the ranks up: no hand-made cluster environment in the trainer
    plugins = OmegaConf.to_container(cfg.trainer, resolve=False).get("plugins") or []
    assert not any("Environment" in str(p.get("_target_", "")) for p in plugins)


# --- loggers -------------------------------------------------------------------------------------------


def _wandb_records(path: Path):
    """The records of an offline run's ``.wandb`` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # full or last fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


@pytest.mark.slow
def test_wandb_offline_run_holds_figures_config_and_bundle(tmp_path: Path) -> None:
    limits = [
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
    ]
    args = ["model=baseline", "logger=wandb", "trainer.max_epochs=1", *limits, *TINY_DATA]
    text = _ok(_run([*args, "~callbacks.intrinsic_dim", "callbacks.progress_bar.refresh_rate=0"], tmp_path))
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    (wandb_dir,) = (run_dir / "wandb").glob("offline-run-*")

    figures = sorted(p.stem for p in (run_dir / "figures").glob("*.png"))
    assert figures
    logged = {
        p.name.rsplit("_", 2)[0] for p in (wandb_dir / "files" / "media" / "images" / "report").glob("*.png")
    }
    assert logged == set(figures)
    assert (wandb_dir / "files" / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()

    (records_file,) = wandb_dir.glob("run-*.wandb")
    artifacts = [
        r.artifact for r in _wandb_records(records_file) if r.WhichOneof("record_type") == "artifact"
    ]
    assert [a.type for a in artifacts] == ["model"]
    entries = {c.path: c.local_path for c in artifacts[0].manifest.contents}
    assert entries == {p.name: str(p) for p in (run_dir / "bundle").iterdir()}
    assert (
        json.loads(artifacts[0].metadata)["metrics"]["test/acc"]
        == json.loads((run_dir / "metrics.json").read_text())["test/acc"]
    )
    # the summary table names every metric and where everything is
    for line in ("test/acc", "val/acc", "logger: wandb", "wandb artifact", "bundle/"):
        assert line in text


def test_objective_single_and_multi(monkeypatch: pytest.MonkeyPatch) -> None:
    import interpzoo.sweeps as sweeps

    metrics = {"val/acc": 0.5, "val/purity": 0.25}
    assert sweeps.objective(OmegaConf.create({"optimized_metric": "val/acc"}), metrics) == 0.5
    both = OmegaConf.create({"optimized_metric": ["val/acc", "val/purity"]})
    assert sweeps.objective(both, metrics) == [0.5, 0.25]
    typo = OmegaConf.create({"optimized_metric": "val/ac"})
    monkeypatch.setattr(sweeps, "_optimising_sweep", lambda: False)
    with pytest.warns(UserWarning, match=r"'val/ac' is not among .*val/acc"):
        assert sweeps.objective(typo, metrics) is None
    monkeypatch.setattr(
        sweeps, "_optimising_sweep", lambda: True
    )  # an Optuna trial fails, naming the metrics
    with pytest.raises(ValueError, match=r"'val/ac' is not among this run's metrics \(val/acc, val/purity\)"):
        sweeps.objective(typo, metrics)
