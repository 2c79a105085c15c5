"""Every command and code example in README.md works as a user types it.

The ```bash blocks are split into commands (one a line, ``&&`` chains into their parts, ``# comments``
dropped). Each command is either run here as a subprocess in a scratch folder that holds copies of
``train.py`` and ``eval.py`` (``logs/`` is written there, as in a checkout), with tiny-data overrides
appended (:func:`_tiny`), asserting its exit code, what it prints and the files it writes, or it is in
:data:`SKIP` with the reason. A README command that is in neither fails
:func:`test_every_readme_command_is_run_or_skipped`, so a new command gets a test. ``<run>`` is the run
folder of the README's main job (``.venv/bin/python train.py``), trained once for the module.

The ```python blocks run in a subprocess too, as written (``<run>`` substituted), then the checks of
:data:`PYTHON_CHECKS`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TIMEOUT = 900

# What is appended to a training or evaluation command so that it runs in seconds (a key the command
# already sets gets this value instead). PartShapes is generated, so its size is an option.
TINY_TRAIN = ["trainer.max_epochs=1", "callbacks.intrinsic_dim.num_samples=32"]
TINY_PARTSHAPES = ["data.n_train=64", "data.n_val=32", "data.n_test=32"]

COVERED_BY = "tests/{}"  # a skip reason that names the test running the same code path
SKIP: dict[str, str] = {
    # set-up: installs from the network; CI runs exactly these lines (test_ci_runs_the_readme_test_command)
    "python3 -m venv .venv": "creates a virtualenv (the suite already runs in one)",
    ".venv/bin/pip install -c constraints.txt -e .": "installs from the package index (network)",
    ".venv/bin/pip install -q -c constraints.txt -e .[dev]": "installs from the package index (network)",
    ".venv/bin/pip install -c constraints.txt -e .[sweeps]": "installs from the package index (network)",
    ".venv/bin/python -m pytest -q": "the whole suite, this file included; it is .ci/run's command",
    # hardware or data this machine does not have
    "python train.py model=protopnet backbone=resnet34 data=cub200 trainer=gpu": "needs CUB-200 and a GPU",
    "python train.py experiment=protopnet_cub_resnet34": "needs CUB-200-2011 (not shipped, no download)",
    "python train.py trainer=ddp trainer.devices=4": "needs 4 GPUs (trainer=ddp_sim is tests/test_pipeline.py)",
    "python train.py experiment=senn_compas path=propublica_data_for_fairml.csv": (
        "needs ProPublica's COMPAS file (not shipped); its format: test_senn_runs.py::"
        "test_compas_recipe_on_a_file_in_its_format"
    ),
    # SLURM: no cluster; the generated sbatch script is checked in test_sweeps.py
    "python train.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu trainer=gpu seed=0,1,2": (
        "needs a SLURM cluster with GPUs"
    ),
    "python train.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu "
    "hydra.launcher.gpus_per_node=4 trainer=ddp trainer.num_nodes=2 experiment=protopnet_cub_resnet34 "
    "data.root=/data/CUB_200_2011": "needs a SLURM cluster with 8 GPUs and CUB-200-2011",
    "python train.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu hydra.sweeper.n_jobs=8 "
    "hparams_search=protopnet_optuna": "needs a SLURM cluster with GPUs",
    # same code path run as a subprocess elsewhere; running it again costs minutes
    "python train.py -m hydra/launcher=submitit_local debug=fdr seed=0,1": COVERED_BY.format(
        "test_sweeps.py::test_submitit_local_fast_dev_run"
    ),
    "python train.py -m model=senn data=digits model.robustness_lambda=0,1e-4,1e-2,1": COVERED_BY.format(
        "test_senn_runs.py::test_lambda_sweep_multirun"
    ),
    # a training run each (20 s or more); what differs from the commands that run here is tested there
    "python train.py logger=tensorboard": COVERED_BY.format("test_pipeline.py::test_all_loggers_offline"),
    "python train.py model=senn data=breast_cancer": COVERED_BY.format(
        "test_senn_runs.py::test_breast_cancer_learns_explains_and_round_trips"
    ),
    "python train.py model=senn data=wine": "the tabular datamodule and network of data=breast_cancer; "
    + COVERED_BY.format("test_senn_runs.py::test_sklearn_tabular_sets_standardise_on_train_only"),
}
# Optuna studies: 20 trials each (a 1-trial study, resumed, runs in test_sweeps.py)
for _line in re.findall(r"^python train\.py -m .*hparams_search=\S*optuna.*$", README, flags=re.M):
    SKIP.setdefault(
        " ".join(shlex.split(_line, comments=True)),
        "an Optuna study of 20 training runs; "
        + COVERED_BY.format("test_sweeps.py::test_optuna_study_two_trials_and_resume"),
    )


# -- extraction ------------------------------------------------------------------------------------
def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def _commands(text: str = README) -> list[str]:
    """Every command of the ```bash blocks, normalised with shlex (comments dropped, ``&&`` split)."""
    out: list[str] = []
    for block in re.findall(r"^```(?:bash|sh)\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            for part in line.split(" && "):
                out.append(" ".join(shlex.split(part, comments=True)))
    return out


# -- running -----------------------------------------------------------------------------------------
def _tiny(command: str) -> list[str]:
    """The command's argv with the tiny-data overrides: same command, seconds instead of minutes."""
    argv = shlex.split(command)
    script = next(a for a in argv if a.endswith(("train.py", "eval.py", "interpzoo-train", "interpzoo-eval")))
    extra = list(TINY_TRAIN) if script.endswith(("train.py", "interpzoo-train")) else []
    data = next((a.split("=", 1)[1] for a in argv if a.startswith("data=")), "partshapes")
    if data == "partshapes":
        extra += TINY_PARTSHAPES
    for override in extra:
        key = override.split("=", 1)[0] + "="
        argv = [override if a.startswith(key) else a for a in argv]
        if override not in argv:
            argv.append(override)
    return argv


def _run(command: str, work: Path, tiny: bool = True) -> subprocess.CompletedProcess[str]:
    argv = _tiny(command) if tiny else shlex.split(command)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "WANDB_MODE": "offline",
        "HYDRA_FULL_ERROR": "1",
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert proc.returncode == 0, (
        f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def _run_folder(proc: subprocess.CompletedProcess[str]) -> Path:
    """The run folder the closing summary prints (``run folder  <path>``)."""
    found = re.findall(r"^\s*run folder\s+(\S+)\s*$", proc.stdout, flags=re.M)
    assert found, f"no 'run folder' line in the output:\n{proc.stdout[-3000:]}"
    return Path(found[-1])


def _metrics(run: Path) -> dict[str, float]:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder laid out like a checkout for the commands: train.py, eval.py, .venv, table.csv/.tsv."""
    work = tmp_path_factory.mktemp("readme")
    for script in ("train.py", "eval.py"):
        shutil.copy(ROOT / script, work / script)
    (work / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    rows = ["a,b,c,label"] + [f"{i % 7},{(i * 3) % 5},{i % 2 + 0.5},{int(i % 7 > 3)}" for i in range(120)]
    (work / "table.csv").write_text("\n".join(rows) + "\n")
    (work / "table.tsv").write_text("\n".join(r.replace(",", "\t") for r in rows) + "\n")
    return work


@pytest.fixture(scope="module")
def main_run(work: Path) -> Path:
    """The README's main job, ``.venv/bin/python train.py``: the ``<run>`` of the other commands."""
    proc = _run(".venv/bin/python train.py", work)
    run = _run_folder(proc)
    assert run.parent == work / "logs" / "train" / "runs"
    return run


def _sub(command: str, run: Path) -> str:
    return command.replace("<run>", run.name)


# -- checks of each command that runs -------------------------------------------------------------
def _check_main_job(command: str, work: Path, main_run: Path) -> None:
    for name in (
        "config.yaml",
        "metrics.json",
        "metrics_kinds.json",
        "checkpoints/last.ckpt",
        "bundle/config.json",
        "bundle/model.safetensors",
        "csv/metrics.csv",
    ):
        assert (main_run / name).is_file(), name
    assert list((main_run / "checkpoints").glob("epoch_*.ckpt"))
    assert {p.name for p in (main_run / "figures").glob("*.png")} >= {
        "prototype_gallery.png",
        "this_looks_like_that.png",
    }
    metrics = _metrics(main_run)
    assert 0 <= metrics["test/acc"] <= 1 and "val/acc" in metrics and "test/prototype_class_purity" in metrics
    # the newcomer's first run reads every interpretability number against its ceiling or as descriptive
    kinds = json.loads((main_run / "metrics_kinds.json").read_text())
    assert not [k for k, v in kinds.items() if v["kind"] == "unclassified"]
    assert metrics["test/prototype_class_purity_ceiling"] > metrics["test/prototype_class_purity_random"]
    assert "test/gt/part_consistency_norm" in metrics


def _check_fdr(command: str, work: Path, main_run: Path) -> None:
    proc = _run(command, work)
    assert re.search(r"fast_dev_run|Running in `fast_dev_run` mode", proc.stdout + proc.stderr)
    assert "test/acc" in proc.stdout


def _check_seed3(command: str, work: Path, main_run: Path) -> None:
    run = _run_folder(_run(command, work))
    text = (run / "config.yaml").read_text()
    assert re.search(r"^seed: 3$", text, flags=re.M) and re.search(r"^\s+batch_size: 128$", text, flags=re.M)
    assert "test/acc" in _metrics(run)


def _check_resume(command: str, work: Path, main_run: Path) -> None:
    last = main_run / "checkpoints" / "last.ckpt"
    proc = _run(_sub(command, main_run), work)
    run = _run_folder(proc)
    assert run != main_run and "test/acc" in _metrics(run)
    assert last.is_file()


def _check_multirun(command: str, work: Path, main_run: Path) -> None:
    before = set((work / "logs" / "train" / "multiruns").glob("*"))
    _run(command, work)
    sweeps = set((work / "logs" / "train" / "multiruns").glob("*")) - before
    assert len(sweeps) == 1, sweeps
    sweep = sweeps.pop()
    seeds = []
    for job in ("0", "1", "2"):
        assert "test/acc" in _metrics(sweep / job)
        seeds.append(
            re.search(r"^seed: (\d+)$", (sweep / job / "config.yaml").read_text(), flags=re.M).group(1)
        )
    assert seeds == ["0", "1", "2"]


def _check_eval(command: str, work: Path, main_run: Path) -> None:
    proc = _run(_sub(command, main_run), work)
    run = _run_folder(proc)
    assert run.parent == work / "logs" / "eval" / "runs"
    metrics = _metrics(run)
    assert 0 <= metrics["test/acc"] <= 1
    # the summary row: value, then ceiling / random / norm ("-": accuracy has none), then the kind
    assert re.search(r"^\s*test/acc\s+[0-9.]+\s+-\s+-\s+-\s+task\s*$", proc.stdout, flags=re.M)


def _check_train(command: str, work: Path, main_run: Path) -> None:
    run = _run_folder(_run(command, work))
    metrics = _metrics(run)
    for name in ("test/acc", *(["test/faithfulness"] if "model=senn" in command else [])):
        assert name in metrics, (name, sorted(metrics))
    assert (run / "bundle" / "config.json").is_file()


RUN: dict[str, Callable[[str, Path, Path], None]] = {
    ".venv/bin/python train.py": _check_main_job,
    "python train.py debug=fdr": _check_fdr,
    "python train.py seed=3 trainer.max_epochs=20 data.batch_size=128": _check_seed3,
    "python train.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt": _check_resume,
    "python train.py -m seed=0,1,2": _check_multirun,
    "python eval.py ckpt_path=logs/train/runs/<run>/bundle data=partshapes": _check_eval,
    "interpzoo-eval ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt": _check_eval,
    "python train.py model=senn data=digits": _check_train,
    "python train.py model=senn data=csv path=table.csv target=label": _check_train,
    "python train.py model=senn data=csv path=table.tsv target=label data.delimiter=tab": _check_train,
}


# -- the tests ------------------------------------------------------------------------------------
def test_every_code_block_is_labelled() -> None:
    """A fence without a language would hide its commands from this file (use ```text for output)."""
    fences = re.findall(r"^```(\S*)\n(.*?)^```", README, flags=re.S | re.M)
    assert fences
    assert all(lang for lang, _ in fences), [body[:80] for lang, body in fences if not lang]


def test_every_readme_command_is_run_or_skipped() -> None:
    commands = _commands()
    assert len(commands) >= 20
    missing = [c for c in commands if c not in RUN and c not in SKIP]
    assert not missing, (
        f"README commands neither run by tests/test_readme.py nor in its SKIP table: {missing}"
    )
    stale = [c for c in [*RUN, *SKIP] if c not in commands]
    assert not stale, f"entries for commands no longer in README.md: {stale}"
    assert not set(RUN) & set(SKIP)


def test_skip_reasons_name_existing_tests() -> None:
    for reason in SKIP.values():
        for path, name in re.findall(r"(test_\w+\.py)::(test_\w+)", reason):
            assert f"def {name}(" in (ROOT / "tests" / path).read_text(), (path, name)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = [ln.strip() for ln in ci.splitlines() if "pytest" in ln and not ln.lstrip().startswith("#")]
    assert len(test_cmd) == 1
    assert test_cmd[0] in [ln.strip() for b in _blocks("bash") for ln in b.splitlines()], (
        "the README's test command and .ci/run differ"
    )


def test_readme_main_job_command_installs_and_trains() -> None:
    lines = [ln.strip() for b in _blocks("bash") for ln in b.splitlines()]
    main = [c for c in lines if c.endswith("train.py") and "pip install" in c]
    assert len(main) == 1 and "constraints.txt" in main[0]


@pytest.mark.slow
@pytest.mark.parametrize("command", list(RUN), ids=lambda c: re.sub(r"\W+", "_", c)[:60])
def test_readme_command_runs(command: str, work: Path, main_run: Path) -> None:
    RUN[command](command, work, main_run)


# python blocks: what each must print and what must hold once it has run (appended to the block)
PYTHON_CHECKS = {
    'interpzoo.list_models("protopnet_*")': (
        ["'protopnet_resnet18s'", "torch.Size([4, 10])"],
        "from matplotlib.figure import Figure\n"
        "assert isinstance(fig, Figure) and len(ex) == 4 and ex[0].boxes.shape[1] == 4\n"
        "assert type(net).__name__ == 'ProtoPNet' and not net.training\n"
        "import os; assert os.path.getsize('explanation.png') > 1000\n"
        "print('README-BLOCK-OK')\n",
    ),
    "from interpzoo.scorecard import evaluate": (
        ["protopnet gt_accuracy 0.", "protopnet part_deletion "],
        "assert row.metric == 'part_deletion' and row.ceiling > row.random\nprint('README-BLOCK-OK')\n",
    ),
}


def test_every_python_block_has_checks() -> None:
    blocks = _blocks("python")
    assert blocks
    for block in blocks:
        assert sum(key in block for key in PYTHON_CHECKS) == 1, block[:200]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block_runs(index: int, work: Path, main_run: Path) -> None:
    block = _blocks("python")[index]
    key = next(k for k in PYTHON_CHECKS if k in block)
    prints, checks = PYTHON_CHECKS[key]
    script = work / f"readme_block_{index}.py"
    script.write_text(_sub(block, main_run) + "\n" + checks)
    proc = _run(f"python {script.name}", work, tiny=False)
    for text in prints:
        assert text in proc.stdout, (text, proc.stdout[-2000:])
    assert proc.stdout.rstrip().endswith("README-BLOCK-OK")
