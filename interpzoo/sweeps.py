"""Sweeps and cluster launchers: the optional Hydra plugins, the sweep folder and the value a trial returns.

``python train.py -m hparams_search=<method>_optuna`` runs an Optuna study (``conf/hparams_search/``) and
``hydra/launcher=submitit_slurm`` / ``submitit_local`` sends jobs through submitit (``conf/hydra/launcher/``).
Both plugins are an optional extra (``pip install -e ".[sweeps]"``); :func:`missing_plugins` names it
before Hydra starts when a command line asks for a plugin that is not installed.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

INSTALL_HINT = 'pip install -e ".[sweeps]" in the checkout, or pip install "interpzoo[sweeps]"'

# what a command line asks for -> (plugin module, distribution, what it is)
_OPTUNA = ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "the Optuna sweeper")
_SUBMITIT = ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "the submitit launcher")
_DEPENDENCIES = {_OPTUNA[0]: ("optuna", "sqlalchemy"), _SUBMITIT[0]: ("submitit",)}


def plugin_installed(module: str) -> bool:
    """Whether the Hydra plugin ``module`` and the libraries it runs on can be imported."""
    try:
        names = (module, *_DEPENDENCIES.get(module, ()))
        return all(importlib.util.find_spec(n) is not None for n in names)
    except (ImportError, ValueError):
        return False


def _plugin_for(key: str, value: str) -> tuple[str, str, str] | None:
    key = key.lstrip("+~")
    if key == "hparams_search" or (key == "hydra/sweeper" and value.startswith("optuna")):
        return _OPTUNA
    if key == "hydra/launcher" and value.startswith("submitit"):
        return _SUBMITIT
    return None


def missing_plugins(overrides: Sequence[str], composed: DictConfig | None = None) -> list[str]:
    """One message per override (or composed ``hydra.sweeper`` / ``hydra.launcher``) needing a missing plugin."""
    problems: list[str] = []
    wanted: list[tuple[str, tuple[str, str, str]]] = []
    for o in overrides:
        if "=" in o:
            key, value = o.split("=", 1)
            plugin = _plugin_for(key, value)
            if plugin is not None:
                wanted.append((o, plugin))
    if composed is not None and "hydra" in composed:
        for node, plugin in (("sweeper", _OPTUNA), ("launcher", _SUBMITIT)):
            target = str(composed.hydra.get(node, {}).get("_target_", ""))
            if target.startswith(plugin[0]):
                wanted.append((f"hydra.{node}._target_={target}", plugin))
    seen = set()
    for what, (module, dist, name) in wanted:
        if module in seen or plugin_installed(module):
            continue
        seen.add(module)
        problems.append(
            f"{what!r} needs {name} ({dist}), which is not installed; install the sweeps extra: {INSTALL_HINT}"
        )
    return problems


class PrepareSweep(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): makes a multirun's main process resolve like a job.

    Hydra sets ``HydraConfig`` only inside a job, so ``${hydra:runtime.cwd}`` (``paths.root_dir``, hence
    ``hydra.sweep.dir``) cannot resolve in the process that sweeps. This sets it there, as Hydra does for a
    single run, and creates the sweep folder, where the Optuna study keeps its SQLite database.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)


def _optimising_sweep() -> bool:
    """Whether this job runs under a sweeper that uses the returned value (not Hydra's basic one)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    target = str(hydra_cfg.sweeper.get("_target_", ""))
    return hydra_cfg.mode == RunMode.MULTIRUN and not target.endswith("BasicSweeper")


def objective(cfg: DictConfig, metrics: Mapping[str, float]) -> float | list[float] | None:
    """The value a run returns to the sweeper: ``metrics[cfg.optimized_metric]``.

    ``optimized_metric`` is one metric name (a single-objective study) or a list of names (a multi-objective
    study; give ``hydra.sweeper.direction`` one direction per name). A name missing from the run's metrics
    fails an optimising sweep with the names there are; elsewhere it is a warning and ``None``.
    """
    key = cfg.get("optimized_metric")
    if not key:
        return None
    names = [str(key)] if isinstance(key, str) else [str(k) for k in key]
    missing = [n for n in names if n not in metrics]
    if missing:
        message = (
            f"optimized_metric {missing[0]!r} is not among this run's metrics "
            f"({', '.join(sorted(metrics)) or 'none'}); set optimized_metric=<one of them>"
        )
        if _optimising_sweep():
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
        return None
    values = [float(metrics[n]) for n in names]
    if any(not math.isfinite(v) for v in values):
        warnings.warn(f"optimized_metric {names} is not finite: {values}", stacklevel=2)
    return values[0] if isinstance(key, str) else values
