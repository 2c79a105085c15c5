"""The run pipeline behind ``train.py`` and ``eval.py``: compose -> validate -> fit -> test -> export.

``train(cfg)`` and ``evaluate(cfg)`` take a composed config and return the final metrics, so tests
and sweeps reach every step through a function (lightning-hydra-template's shape).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from interpzoo.checkpoint_io import AtomicCheckpointIO
from interpzoo.io import to_plain, write_json
from interpzoo.models.checkpoint import (
    RUN_CONFIG_KEY,
    CheckpointError,
    checkpoint_info,
    module_class,
    read_checkpoint,
)
from interpzoo.models.registry import resolve_task, task_name, upgrade_hparams
from interpzoo.preflight import EVAL_NEEDS_CKPT, EVAL_SPLITS, ConfigError, validate_config
from interpzoo.utils import UsageError, atomic_write_text, did_you_mean

log_print = rank_zero_only(print)


def _instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose constructor errors name the config section instead of a traceback.

    Hydra wraps whatever a constructor raises; the project's own errors come back as they were, and a
    ``ValueError``/``TypeError``/``KeyError`` (a bad setting) or Lightning's misconfiguration error becomes a
    :class:`ConfigError` naming ``what`` (``data``, ``model``, ``trainer``, ...).
    """
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UsageError):
            raise cause from None
        if isinstance(cause, ValueError | TypeError | KeyError) or type(cause).__name__ == (
            "MisconfigurationException"
        ):
            text = cause.args[0] if cause.args and isinstance(cause.args[0], str) else str(cause)
            group = what.split(".")[0]
            raise ConfigError(
                f"{what}: {text} (fix the {what}.* settings on the command line, or choose another {group}= "
                f"option from conf/{group}/)"
            ) from None
        raise


def _instantiate_group(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [
        _instantiate(v, str(v._get_full_key(None)) or "config", _convert_="all")
        for v in node.values()
        if isinstance(v, DictConfig) and "_target_" in v
    ]


def _final_metrics(trainer: pl.Trainer, prefixes: tuple[str, ...] = ("val/", "test/")) -> dict[str, float]:
    out = {}
    for k, v in trainer.callback_metrics.items():
        if k.startswith(prefixes):
            out[k] = float(v.detach().cpu()) if isinstance(v, torch.Tensor) else float(v)
    return dict(sorted(out.items()))


def command_line() -> str:
    """The command that started this process, re-runnable from a shell."""
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


def check_checkpoint_matches(ckpt_path: str, model: pl.LightningModule) -> None:
    """Refuse to resume or evaluate a checkpoint written for another model (clear error, no traceback soup)."""
    info = checkpoint_info(read_checkpoint(ckpt_path), ckpt_path)
    arch, _ = model.net_arguments()
    own_task = task_name(model)
    try:
        ckpt_task = resolve_task(info)
    except KeyError as e:
        raise CheckpointError(f"{ckpt_path}: {e.args[0]}") from None
    if info.get("architecture") != arch or ckpt_task != own_task:
        raise CheckpointError(
            f"{ckpt_path} was written by a {info.get('architecture')!r} model (task {ckpt_task!r}), but the "
            f"config builds a {arch!r} model (task {own_task!r}). Choose the matching model= option, or evaluate the "
            f"checkpoint with `python eval.py ckpt_path={ckpt_path}`, which rebuilds its own model."
        )


# -- resuming: the config must match the checkpoint's --------------------------------------------------------

# Settings a resumed run takes from the config without harm (loading, file locations, compilation); any
# other model.* setting the LightningModule reads while training is applied too, and said.
_RESUME_FREE = {
    "num_workers",
    "pin_memory",
    "cache",
    "download",
    "root",
    "path",
    "data_dir",
    "compile",
    "channels_last",
    "pretrained",
}
# first key under model.* -> why a resumed run cannot change it
_RESUME_FIXED = {
    "_target_": "the checkpoint belongs to another LightningModule",
    "arch": "the checkpoint's weights have the shapes of its network",
    "net": "the checkpoint's weights have the shapes of its network",
    "model_args": "the checkpoint's weights have the shapes of its network",
    "backbone": "the checkpoint's weights have the shapes of its network",
    "optimizer": "the optimizer state restored from the checkpoint would silently keep the checkpoint's value",
    "optim": "the optimizer state restored from the checkpoint would silently keep the checkpoint's value",
    "scheduler": "the scheduler state restored from the checkpoint would silently keep the checkpoint's value",
    "monitor": "the checkpoint callback keeps the best score of the checkpoint's metric",
    "monitor_mode": "the checkpoint callback keeps the best score of the checkpoint's metric",
}
_DATA_FIXED = "the model and its saved state refer to the checkpoint's data: its sizes, classes and split"


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved, current)`` for every leaf that differs (a missing side is ``"<unset>"``)."""
    a, b = _flatten(to_plain(saved), ""), _flatten(to_plain(current), "")
    return [
        (k, a.get(k, "<unset>"), b.get(k, "<unset>"))
        for k in sorted(set(a) | set(b))
        if a.get(k, "<unset>") != b.get(k, "<unset>")
    ]


def _resume_verdict(key: str) -> str | None:
    """Why ``key`` (a dotted config key) cannot change on resume, or ``None`` when the change applies."""
    parts = key.split(".")
    if parts[-1] in _RESUME_FREE:
        return None
    if parts[0] == "model":
        return _RESUME_FIXED.get(parts[1]) if len(parts) > 1 else None
    if parts[0] in ("data", "data_info"):
        return _DATA_FIXED
    if parts[0] == "seed":
        return "the random state restored from the checkpoint continues the checkpoint's seed"
    return None


def _resume_report(ckpt_path: str, changes: list[tuple[str, Any, Any]]) -> None:
    """Raise :class:`ConfigError` for changes a resumed run cannot make; print the ones it applies."""
    refused, applied = [], []
    for key, old, new in changes:
        why = _resume_verdict(key)
        leaf = key.rsplit(".", 1)[-1]
        line = f"{key}: the checkpoint was trained with {leaf} {old!r}, the config asks for {new!r}"
        (refused if why else applied).append(f"{line} ({why})" if why else line)
    if refused:
        shown = refused[:12] + ([f"... and {len(refused) - 12} more"] if len(refused) > 12 else [])
        raise ConfigError(
            f"cannot resume from {ckpt_path}: the config differs from the checkpoint's in settings a resumed run "
            "cannot change:\n  - " + "\n  - ".join(shown) + "\nResume with the checkpoint's settings (leave "
            "these overrides out), or start a new run without ckpt_path."
        )
    if applied:
        log_print(
            f"resuming from {ckpt_path} with changed settings (applied from the config):\n  - "
            + "\n  - ".join(applied)
        )


def check_resume_config(ckpt_path: str, cfg: DictConfig) -> dict[str, Any] | None:
    """Compare the config of a resumed run with the config saved in its checkpoint, key by key.

    Checkpoints written by :func:`train` hold the run's ``model``, ``data`` and ``seed`` settings (see
    :class:`RunConfigInCheckpoint`). A change a resumed run cannot honour (network shape, optimizer and
    scheduler settings, which Lightning restores from the checkpoint, the monitored metric, the data, the
    seed) raises :class:`ConfigError` naming each key with both values; any other change is applied and printed.
    Returns the saved config, or ``None`` for a checkpoint without one (see :func:`check_resume_hparams`).
    Also raises :class:`CheckpointError` for a missing, damaged or foreign checkpoint file.
    """
    ckpt = read_checkpoint(ckpt_path)
    checkpoint_info(ckpt, ckpt_path)
    saved = ckpt.get(RUN_CONFIG_KEY)
    if not isinstance(saved, dict):
        return None
    current = _run_config(cfg)
    saved = dict(saved)
    if isinstance(saved.get("model"), dict):  # written before model.net: arch/model_args/backbone
        saved["model"] = upgrade_hparams(saved["model"])
    _resume_report(ckpt_path, _differences({k: saved.get(k) for k in current}, current))
    return saved


def check_resume_hparams(ckpt_path: str, module: pl.LightningModule) -> None:
    """:func:`check_resume_config` for a checkpoint without the run's config: its module settings."""
    saved = upgrade_hparams(read_checkpoint(ckpt_path).get("hyper_parameters") or {})
    own = dict(module.hparams)
    changes = []
    for key, old, new in _differences(dict(saved), own):
        first = key.split(".")[0]
        changes.append((key if first == "data_info" else f"model.{key}", old, new))
    _resume_report(ckpt_path, changes)


def _run_config(cfg: DictConfig) -> dict[str, Any]:
    """The settings a checkpoint keeps to check a resume against: ``model``, ``data`` and ``seed``."""
    return {
        key: to_plain(OmegaConf.to_container(cfg[key], resolve=True))
        if isinstance(cfg.get(key), DictConfig)
        else to_plain(cfg.get(key))
        for key in ("model", "data", "seed")
        if key in cfg
    }


class RunConfigInCheckpoint(pl.Callback):
    """Writes the run's ``model``, ``data`` and ``seed`` settings into every checkpoint (plain data).

    :func:`check_resume_config` compares them with the config of a resumed run.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.config = _run_config(cfg)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RUN_CONFIG_KEY] = self.config


def _prepare(
    cfg: DictConfig, required: tuple[str, ...] = ("data", "model", "trainer"), entry: str = "train"
) -> Path:
    """Validate the config (:func:`interpzoo.preflight.validate_config`), create the run folder, seed."""
    validate_config(cfg, required, entry)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    os.environ.setdefault("WANDB_SILENT", "true")
    return out_dir


def _datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    datamodule = _instantiate(cfg.data, "data", _convert_="all")
    if cfg.get("seed") is not None and hasattr(datamodule, "shuffle_seed"):
        datamodule.shuffle_seed = int(cfg.seed)  # the training order follows the run's seed
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def _trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any]) -> pl.Trainer:
    # trainer.plugins (nodes with _target_, e.g. a LayerSync) join the runner's own checkpoint IO plugin
    extra = [_instantiate(p, "trainer.plugins", _convert_="all") for p in (cfg.trainer.get("plugins") or [])]
    return _instantiate(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO(), *extra],
        _convert_="all",
    )


def _write_report(module: pl.LightningModule, datamodule: Any, out_dir: Path) -> list[Path]:
    from interpzoo.reports import write_report

    return write_report(module, datamodule, out_dir / "figures")


def _log_outputs(loggers: list[Any], out_dir: Path, result: dict[str, Any], cfg: DictConfig) -> None:
    """Give every logger the run's figures, resolved config and bundle (metrics reach them through Lightning)."""
    from interpzoo.loggers import log_bundle, log_config, log_figures

    log_figures(loggers, [Path(p) for p in result.get("figures", [])])
    if (out_dir / "config.yaml").is_file():
        log_config(loggers, out_dir / "config.yaml")
    if result.get("bundle"):
        metadata = {"metrics": result["metrics"], "recipe": command_line(), "seed": cfg.get("seed")}
        result["artifacts"] = log_bundle(loggers, Path(result["bundle"]), to_plain(metadata))


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, export the bundle and report; returns ``val/*`` and ``test/*`` metrics."""
    start = time.time()
    out_dir = _prepare(cfg)
    ckpt_path = cfg.get("ckpt_path")
    resumed_config = None
    if ckpt_path:
        # before any data is built: a damaged checkpoint or a changed config fails in seconds
        resumed_config = check_resume_config(str(ckpt_path), cfg)
    datamodule = _datamodule(cfg)
    data_info = datamodule.data_info
    module = _instantiate(cfg.model, "model", data_info=data_info, _convert_="all")
    if ckpt_path:
        check_checkpoint_matches(str(ckpt_path), module)
        if resumed_config is None:  # a checkpoint without the run's config: compare the module's settings
            check_resume_hparams(str(ckpt_path), module)
    callbacks = [*_instantiate_group(cfg.get("callbacks")), RunConfigInCheckpoint(cfg)]
    if cfg.get("seed") is not None:
        from interpzoo.resume import EpochSeeding

        callbacks.append(EpochSeeding(int(cfg.seed)))  # exact resume: random state per (seed, epoch, rank)
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = _trainer(cfg, callbacks, loggers)
    if trainer.is_global_zero:
        atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    n_params = sum(p.numel() for p in module.parameters())
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    for logger in loggers:
        logger.log_hyperparams(
            {
                "cfg": to_plain(OmegaConf.to_container(cfg, resolve=True)),
                "params/total": n_params,
                "params/trainable": n_train,
            }
        )

    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(_final_metrics(trainer, ("val/",)))

    best = _best_checkpoint(trainer)
    if best:
        # Explicit, rank-independent: the exported and tested weights are the selected checkpoint's.
        module.load_state_dict(read_checkpoint(best)["state_dict"])
    elif cfg.get("train", True) and not trainer.fast_dev_run:
        warnings.warn(
            "no best checkpoint was recorded; testing and exporting the final weights", stacklevel=1
        )
    if cfg.get("test", True):
        trainer.test(module, datamodule=datamodule)
        metrics.update(_final_metrics(trainer, ("test/",)))

    result: dict[str, Any] = {"metrics": metrics, "best_checkpoint": best}
    if trainer.is_global_zero:
        _write_metrics(out_dir, metrics)
        if cfg.get("export", True):
            result["bundle"] = str(export_bundle(module, out_dir / "bundle", cfg, metrics, best))
        if cfg.get("report", True):
            result["figures"] = [str(p) for p in _write_report(module, datamodule, out_dir)]
        _log_outputs(loggers, out_dir, result, cfg)
        _print_summary(out_dir, metrics, result, time.time() - start, loggers)
    return metrics


def _write_metrics(out_dir: Path, metrics: dict[str, float]) -> None:
    """``metrics.json`` (name -> number) and ``metrics_kinds.json``: what each number is and how to read it
    (task, scored with or without a ceiling on this data, descriptive; :mod:`interpzoo.metrics.catalog`)."""
    from interpzoo.metrics.catalog import describe

    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "metrics_kinds.json", describe(metrics))


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    for cb in trainer.callbacks:
        # a monitor-less ModelCheckpoint (callbacks.last_checkpoint) keeps the latest epoch, not a selected one
        if (
            isinstance(cb, ModelCheckpoint)
            and cb.monitor is not None
            and cb.best_model_path
            and Path(cb.best_model_path).is_file()
        ):
            return cb.best_model_path
    return None


def export_bundle(
    module: pl.LightningModule,
    directory: Path,
    cfg: DictConfig | None,
    metrics: dict[str, float],
    ckpt: str | None,
) -> Path:
    """Write ``module.net`` as a bundle with its data config, recipe, seed and metrics."""
    from interpzoo.models.bundle import save_pretrained

    extra = {
        "recipe": command_line(),
        "seed": None if cfg is None else cfg.get("seed"),
        "metrics": metrics,
        "checkpoint": ckpt,
        "lightning": {
            "task": task_name(module),
            "hparams": to_plain(dict(module.hparams)),
        },
        "interpzoo_version": __import__("interpzoo").__version__,
    }
    module.net.interpzoo_config = dict(zip(("architecture", "model_args"), module.net_arguments()))
    return save_pretrained(module.net, directory, data_config=to_plain(module.data_info), extra=extra)


def _print_summary(
    out_dir: Path,
    metrics: dict[str, float],
    result: dict[str, Any],
    seconds: float,
    loggers: list[Any] | None = None,
) -> None:
    """The table printed at the end of a run: every metric by name, then where each output is."""
    from interpzoo.loggers import logger_locations

    def rel(path: str | Path) -> str:
        p = Path(path)
        try:
            return str(p.resolve().relative_to(out_dir.resolve()))
        except ValueError:
            return str(p)

    from interpzoo.metrics.catalog import summary_rows

    rows = summary_rows(metrics)
    outputs: list[tuple[str, str]] = [("run folder", str(out_dir))]
    for name, file in (
        ("resolved config", "config.yaml"),
        ("metrics", "metrics.json"),
        ("what each metric is", "metrics_kinds.json"),
    ):
        if (out_dir / file).is_file():
            outputs.append((name, file))
    if result.get("best_checkpoint"):
        outputs.append(("best checkpoint", rel(result["best_checkpoint"])))
    if result.get("bundle"):
        outputs.append(("bundle", rel(result["bundle"]) + "/  (interpzoo.load_pretrained(path))"))
    if result.get("figures"):
        folder = rel(Path(result["figures"][0]).parent)
        outputs.append(("figures", f"{folder}/  ({len(result['figures'])} PNG)"))
    for kind, folder in logger_locations(loggers or []):
        outputs.append((f"logger: {kind}", rel(folder) if folder else "-"))
    for name in result.get("artifacts", []):
        outputs.append(("wandb artifact", f"{name} (type model: the bundle)"))
    width = max(len(r[0]) for r in rows + outputs)
    head = ("value", "ceiling", "random", "norm")
    lines = [
        f"\nrun finished in {seconds:.0f} s (scored metrics: ceiling = ground-truth oracle, random = chance, "
        "norm = (value - random) / (ceiling - random))",
        f"  {'metric':<{width}}  " + "  ".join(f"{h:>10}" for h in head) + "  kind",
        f"  {'-' * width}  " + "  ".join("-" * 10 for _ in head) + "  ----",
    ]
    lines += [f"  {r[0]:<{width}}  " + "  ".join(f"{v:>10}" for v in r[1:5]) + f"  {r[5]}" for r in rows] or [
        f"  {'(none)':<{width}}"
    ]
    lines += [f"  {'output':<{width}}  path (relative to the run folder)", f"  {'-' * width}  ----"]
    lines += [f"  {k:<{width}}  {v}" for k, v in outputs]
    log_print("\n".join(lines))


def module_from_source(source: str) -> pl.LightningModule:
    """Rebuild the LightningModule of a checkpoint (``.ckpt``) or a bundle folder, weights loaded."""
    from interpzoo.models.bundle import BundleError, load_state_strict

    path = Path(source)
    if path.is_dir():
        from interpzoo.models.bundle import load_pretrained, read_bundle_config

        config = read_bundle_config(path)
        lit = config.get("lightning")
        if not lit:
            raise CheckpointError(
                f"bundle {path} has no 'lightning' entry; it cannot be evaluated by eval.py"
            )
        cls = module_class(lit, path / "config.json")
        module = _build_module(cls, lit.get("hparams"), path / "config.json")
        try:
            net = load_pretrained(path, eval_mode=False)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(
                f"bundle {path}: {e.args[0] if e.args else e}; its config.json does not describe a network this "
                "version of interpzoo can build: export it again with this version"
            ) from None
        load_state_strict(module.net, net.state_dict(), what=f"bundle {path}")
        return module
    ckpt = read_checkpoint(path)
    info = checkpoint_info(ckpt, path)
    module = _build_module(module_class(info, path), ckpt.get("hyper_parameters"), path)
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} has no 'state_dict' entry; it is not a complete interpzoo checkpoint")
    try:
        load_state_strict(module, ckpt["state_dict"], what=f"checkpoint {path}")
    except BundleError as e:
        raise CheckpointError(str(e)) from None
    return module


def _build_module(cls: type, hparams: Any, where: str | Path) -> pl.LightningModule:
    """``cls(**hparams)`` with an error naming the file whose settings do not build its model."""
    from interpzoo.models.bundle import BundleError

    error = BundleError if Path(where).name == "config.json" else CheckpointError
    if not isinstance(hparams, dict):
        raise error(f"{where} has no model settings (hyper-parameters); it was not written by interpzoo")
    try:
        return cls(**upgrade_hparams(hparams))
    except (KeyError, TypeError, ValueError) as e:
        raise error(
            f"{where}: its model settings do not build a {cls.__name__} ({type(e).__name__}: "
            f"{e.args[0] if e.args else e}); it was written by another version of interpzoo or edited"
        ) from None


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt_path`` (checkpoint or bundle folder) on the configured datamodule's test split."""
    if "ckpt_path" not in cfg or OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise ConfigError(EVAL_NEEDS_CKPT)
    split = cfg.get("split", "test")
    if split not in EVAL_SPLITS:
        raise ConfigError(
            f"split={split!r}: eval evaluates the val or the test split{did_you_mean(str(split), EVAL_SPLITS) or ';'} "
            "set split=val or split=test"
        )
    start = time.time()
    out_dir = _prepare(cfg, required=("data", "trainer"), entry="eval")
    module = module_from_source(str(cfg.ckpt_path))  # before the data: a bad file fails in seconds
    datamodule = _datamodule(cfg)
    check_data_matches(str(cfg.ckpt_path), module.data_info, datamodule)
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = _trainer(cfg, _instantiate_group(cfg.get("callbacks")), loggers)
    if split == "val":
        trainer.validate(module, datamodule=datamodule)
        metrics = _final_metrics(trainer, ("val/",))
    else:
        trainer.test(module, datamodule=datamodule)
        metrics = _final_metrics(trainer, ("test/",))
    if trainer.is_global_zero:
        atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        _write_metrics(out_dir, metrics)
        _log_outputs(loggers, out_dir, {"metrics": metrics}, cfg)
        _print_summary(out_dir, metrics, {}, time.time() - start, loggers)
    return metrics


def check_data_matches(source: str, own: dict[str, Any], datamodule: Any) -> None:
    """Refuse to evaluate a model on data it cannot read or whose classes are not its classes."""
    new = datamodule.data_info
    data = type(datamodule).__name__
    problems = []
    for key, what in (
        ("input_kind", "input kind"),
        ("in_chans", "image channels"),
        ("num_features", "features"),
        ("num_classes", "classes"),
    ):
        if own.get(key) is not None and new.get(key) is not None and own[key] != new[key]:
            problems.append(f"{what}: the model was trained with {own[key]!r}, {data} has {new[key]!r}")
    if (
        not problems
        and own.get("class_names")
        and new.get("class_names")
        and own["class_names"] != new["class_names"]
    ):
        problems.append(
            f"class names: the model predicts {list(own['class_names'])[:5]}..., {data} has "
            f"{list(new['class_names'])[:5]}..."
        )
    if (
        not problems
        and own.get("class_hash")
        and new.get("class_hash")
        and own["class_hash"] != new["class_hash"]
    ):
        problems.append(
            f"class definitions: the model was trained on PartShapes classes {own['class_hash']!r}, the data "
            f"defines {new['class_hash']!r} (another data.seed, class_seed or vocabulary)"
        )
    if problems:
        raise ConfigError(
            f"{source} does not fit the configured data: "
            + "; ".join(problems)
            + ". Choose the data the model was trained on (data=... with the same settings)."
        )


def finish_loggers() -> None:
    """Close a wandb run so the next multirun job starts a fresh one (LHT's task_wrapper)."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
