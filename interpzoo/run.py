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
from interpzoo.models.checkpoint import CheckpointError, checkpoint_info, module_class, read_checkpoint
from interpzoo.models.registry import resolve_task, task_name
from interpzoo.preflight import ConfigError, validate_config

log_print = rank_zero_only(print)


def _instantiate_group(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [
        instantiate(v, _convert_="all")
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


def _prepare(
    cfg: DictConfig, required: tuple[str, ...] = ("data", "model", "trainer")
) -> tuple[Path, pl.LightningDataModule]:
    validate_config(cfg, required)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    os.environ.setdefault("WANDB_SILENT", "true")
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    return out_dir, datamodule


def _trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any]) -> pl.Trainer:
    # trainer.plugins (nodes with _target_, e.g. a LayerSync) join the runner's own checkpoint IO plugin
    extra = [instantiate(p, _convert_="all") for p in (cfg.trainer.get("plugins") or [])]
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO(), *extra],
        _convert_="all",
    )


def _write_report(
    module: pl.LightningModule, datamodule: Any, out_dir: Path, loggers: list[Any]
) -> list[Path]:
    figures = module.write_report(out_dir / "figures", datamodule)
    for logger in loggers:
        for fig in figures:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"report/{fig.stem}", images=[str(fig)])
            elif hasattr(logger, "experiment") and hasattr(logger.experiment, "add_image"):
                import numpy as np
                from PIL import Image

                img = np.asarray(Image.open(fig).convert("RGB"))
                logger.experiment.add_image(f"report/{fig.stem}", img, dataformats="HWC")
    return figures


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, export the bundle and report; returns ``val/*`` and ``test/*`` metrics."""
    start = time.time()
    out_dir, datamodule = _prepare(cfg)
    data_info = datamodule.data_info
    module = instantiate(cfg.model, data_info=data_info, _convert_="all")
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = _trainer(cfg, callbacks, loggers)
    if trainer.is_global_zero:
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
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

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        check_checkpoint_matches(str(ckpt_path), module)
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
        write_json(out_dir / "metrics.json", metrics)
        if cfg.get("export", True):
            result["bundle"] = str(export_bundle(module, out_dir / "bundle", cfg, metrics, best))
        if cfg.get("report", True):
            result["figures"] = [str(p) for p in _write_report(module, datamodule, out_dir, loggers)]
        _print_summary(out_dir, metrics, result, time.time() - start)
    return metrics


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.best_model_path and Path(cb.best_model_path).is_file():
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


def _print_summary(out_dir: Path, metrics: dict[str, float], result: dict[str, Any], seconds: float) -> None:
    lines = [f"\nrun finished in {seconds:.0f} s; everything is in {out_dir}"]
    lines.append(f"  resolved config : {out_dir / 'config.yaml'}")
    lines.append(f"  metrics         : {out_dir / 'metrics.json'}")
    if result.get("best_checkpoint"):
        lines.append(f"  best checkpoint : {result['best_checkpoint']}")
    if result.get("bundle"):
        lines.append(f"  model bundle    : {result['bundle']}  (interpzoo.load_pretrained(path))")
    for fig in result.get("figures", []):
        lines.append(f"  figure          : {fig}")
    for k in ("val/acc", "test/acc", "val/psnr", "test/psnr"):
        if k in metrics:
            lines.append(f"  {k:<16}: {metrics[k]:.4f}")
    log_print("\n".join(lines))


def module_from_source(source: str) -> pl.LightningModule:
    """Rebuild the LightningModule of a checkpoint (``.ckpt``) or a bundle folder, weights loaded."""
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
        module = cls(**lit["hparams"])
        net = load_pretrained(path, eval_mode=False)
        module.net.load_state_dict(net.state_dict())
        return module
    ckpt = read_checkpoint(path)
    info = checkpoint_info(ckpt, path)
    module = module_class(info, path)(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt_path`` (checkpoint or bundle folder) on the configured datamodule's test split."""
    if not cfg.get("ckpt_path"):
        raise ConfigError("eval needs ckpt_path=<path to a .ckpt file or a bundle folder>")
    out_dir, datamodule = _prepare(cfg, required=("data", "trainer"))
    module = module_from_source(str(cfg.ckpt_path))
    own = module.data_info
    new = datamodule.data_info
    if own.get("num_classes") is not None and new.get("num_classes") != own.get("num_classes"):
        raise ConfigError(
            f"{cfg.ckpt_path} predicts {own.get('num_classes')} classes but data={type(datamodule).__name__} has "
            f"{new.get('num_classes')}; choose the dataset the model was trained on"
        )
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = _trainer(cfg, _instantiate_group(cfg.get("callbacks")), loggers)
    split = cfg.get("split", "test")
    if split == "val":
        trainer.validate(module, datamodule=datamodule)
        metrics = _final_metrics(trainer, ("val/",))
    else:
        trainer.test(module, datamodule=datamodule)
        metrics = _final_metrics(trainer, ("test/",))
    if trainer.is_global_zero:
        write_json(out_dir / "metrics.json", metrics)
        log_print(f"\nmetrics written to {out_dir / 'metrics.json'}")
        for k, v in metrics.items():
            log_print(f"  {k:<28}: {v:.4f}")
    return metrics


def finish_loggers() -> None:
    """Close a wandb run so the next multirun job starts a fresh one (LHT's task_wrapper)."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
