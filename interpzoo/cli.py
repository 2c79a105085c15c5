"""Console entry points ``interpzoo-train`` and ``interpzoo-eval`` (``train.py`` / ``eval.py`` call them).

The configs ship inside the package (``interpzoo.conf``, the checkout's ``conf/`` folder), so both commands
compose from any directory after a non-editable install. A user adds their own config folder with Hydra's
``--config-dir <dir>`` (searched before the shipped one) or a ``hydra.searchpath`` entry.

Errors: the project's own errors (:class:`interpzoo.utils.UsageError` and its subclasses: ``ConfigError``,
``DataError``, ``CheckpointError``, ``BundleError``, ...) reach the user as one paragraph naming the problem
and the fix, without a traceback, and the command exits with the error's ``exit_code`` (2 for a usage
error). ``HYDRA_FULL_ERROR=1`` (Hydra's own switch) or ``INTERPZOO_VERBOSE=1`` prints the traceback too,
with the same exit code. Checks run in three
places, cheapest first: before Hydra starts (mistyped keys, config values, the run folder: nothing is
created), inside the job before the training stack is imported (the same checks for every ``-m`` job),
then in :mod:`interpzoo.run` (constructor arguments, data, checkpoints).
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import hydra
from omegaconf import DictConfig

import interpzoo.conf
from interpzoo.utils import UsageError

CONF_DIR = str(Path(interpzoo.conf.__file__).resolve().parent)
VERBOSE_VARIABLES = ("HYDRA_FULL_ERROR", "INTERPZOO_VERBOSE")

_T = TypeVar("_T")


def verbose() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1`` or ``INTERPZOO_VERBOSE=1``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes") for v in VERBOSE_VARIABLES)


def error_message(e: BaseException) -> str:
    """The error's own message; a DataLoader worker's copy loses the worker traceback it carries."""
    text = str(e)
    if "Original Traceback" in text:
        # torch re-raises a worker's exception as type(e)("Caught ... Original Traceback ...\nmodule.Error: msg")
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
        text = last.split(prefix, 1)[1] if prefix in last else last
    return text


def exit_with(e: BaseException) -> NoReturn:
    """Print ``error: <message>`` (and the traceback when :func:`verbose`) and exit with ``e.exit_code``."""
    if verbose():
        traceback.print_exc()
    print(f"error: {error_message(e)}", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(int(getattr(e, "exit_code", 2)))


def _reporting(entry: str) -> Callable[[Callable[[DictConfig], _T]], Callable[[DictConfig], _T]]:
    """Wrap a Hydra task function: light checks first, then :func:`exit_with` for the project's errors.

    Hydra prints a traceback for whatever escapes a task function, so the errors are caught in here.
    """

    def wrap(fn: Callable[[DictConfig], _T]) -> Callable[[DictConfig], _T]:
        @functools.wraps(fn)
        def task(cfg: DictConfig) -> _T:
            from hydra.core.hydra_config import HydraConfig

            from interpzoo.preflight import check_run_folder, check_values

            try:
                # -m jobs were not composed before Hydra started: check them before the heavy imports
                check_values(cfg, entry)
                check_run_folder(HydraConfig.get().runtime.output_dir, cfg, entry)
                return fn(cfg)
            except UsageError as e:
                exit_with(e)
            except FloatingPointError as e:
                from interpzoo.layers.concept_whitening import WhiteningDivergedError

                if isinstance(e, WhiteningDivergedError):
                    exit_with(e)
                raise

        return task

    return wrap


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@_reporting("train")
def _train(cfg: DictConfig) -> float | list[float] | None:
    from interpzoo.run import finish_loggers, train
    from interpzoo.sweeps import objective

    try:
        metrics = train(cfg)
    finally:
        finish_loggers()
    return objective(cfg, metrics)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
@_reporting("eval")
def _eval(cfg: DictConfig) -> None:
    from interpzoo.run import evaluate, finish_loggers

    try:
        evaluate(cfg)
    finally:
        finish_loggers()


def _preflight(config_name: str) -> None:
    from interpzoo.preflight import check_run

    # conf/hydra/launcher/submitit_*.yaml extend the submitit plugin's schema of the same name on purpose
    warnings.filterwarnings("ignore", message=r"(?s).*'hydra/launcher/submitit_\w+' is validated against")
    try:
        check_run(CONF_DIR, config_name, sys.argv[1:], entry=config_name)
    except UsageError as e:
        exit_with(e)


def _main(config_name: str, task: Callable[[], Any]) -> None:
    _preflight(config_name)
    task()


def train_main() -> None:
    """``interpzoo-train [overrides]``: did-you-mean for mistyped keys, then Hydra (``conf/train.yaml``)."""
    _main("train", _train)


def eval_main() -> None:
    """``interpzoo-eval ckpt_path=<file.ckpt|bundle folder> [overrides]`` (``conf/eval.yaml``)."""
    _main("eval", _eval)
