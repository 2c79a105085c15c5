"""The bad-input corpus: every row is one mistake a user can make, and the message it must get.

Each row names the case, what the user runs (a command line, typed as in a shell, or a call of the Python
API), a fragment of the expected message (a regular expression) and the exit code (command lines) or the
error class (API calls). Command lines run as subprocesses, ``python train.py ...`` / ``python eval.py ...``
from a scratch folder on tiny data, and must end with one paragraph (``error: ...``), exit code 2 for a
usage error (1 for a run that failed on its own) and no traceback; rows marked ``pre`` are refused before
Hydra starts, so nothing at all is created. Most command lines fail in the pre-flight in about a second;
they run a few at a time. A row whose check has not landed yet can be marked ``xfail=True`` (an expected
failure, not strict) until it does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from interpzoo.utils import UsageError
from tests.conftest import ROOT, compose_config

# tiny PartShapes data and a fast_dev_run: a command line that gets past every check trains one batch
TINY = "debug=fdr model=baseline data.n_train=64 data.n_val=32 data.n_test=32"
# the same model and data as the checkpoint trained by the `trained` fixture
RESUME = "model=baseline data.n_train=64 data.n_val=32 data.n_test=32 data.batch_size=32 trainer.max_epochs=1"
NETWORK_XFAIL = "network input checks land with the trunk base"  # the reason of xfail=True rows
# where the LightningModules take their network settings (model.net.name, model.net.backbone.width, ...)
NET = "model.net"


@dataclass(frozen=True)
class Cli:
    """A command line: ``python <script> <args>`` (``{name}`` fields are files made by the ``corpus`` fixture)."""

    id: str
    script: str
    args: str
    expect: str
    code: int = 2
    pre: bool = False  # refused before Hydra starts: the scratch folder stays empty
    absent: str | None = None  # a fragment that must not appear (e.g. the overwrite refusal)
    env: dict[str, str] = field(default_factory=dict)
    traceback: bool = False  # asked for with HYDRA_FULL_ERROR=1 / INTERPZOO_VERBOSE=1


@dataclass(frozen=True)
class Api:
    """A call of the Python API that must raise ``error`` with a message matching ``expect``."""

    id: str
    call: Callable[[SimpleNamespace], Any]
    expect: str
    error: type[BaseException] | tuple[type[BaseException], ...] = UsageError
    xfail: bool = False
    needs_ckpt: bool = False  # uses the checkpoint of the `trained` fixture


# --- command lines --------------------------------------------------------------------------------------

CLI = [
    # config keys and values
    Cli("key-typo", "train.py", f"{TINY} trainer.max_epoch=3", r"did you mean 'max_epochs'", pre=True),
    # a run that fails on its own: exit code 1, one paragraph
    Cli(
        "cw-whitening-diverges",
        "train.py",
        f"{TINY.replace('model=baseline', 'model=concept_whitening')} {NET}.T=40 {NET}.guard=raise "
        f"{NET}.solver=iteration",
        r"the Newton-Schulz iteration diverged at T=40.*keep T=10 or lower it",
        code=1,
    ),
    Cli(
        "pretrained-file-missing",
        "train.py",
        f"{TINY} {NET}.backbone.pretrained=/no/such/weights.pth",
        r"backbone weights file not found: /no/such/weights\.pth\. Pass the path of an existing",
    ),
    Cli(
        "pretrained-not-cached",
        "train.py",
        f"{TINY} {NET}.backbone.name=resnet18 {NET}.backbone.pretrained=true",
        r"ImageNet weights for 'resnet18' are not in the local cache .*backbone\.pretrained=/path/to/weights\.pth",
        env={"TORCH_HOME": "/nonexistent/torch_home"},  # no cached weights on any machine
    ),
    Cli(
        "lr-inf",
        "train.py",
        f"{TINY} model.optimizer.lr=inf",
        r"model\.optimizer\.lr=inf: the learning rate must be a finite number > 0",
        pre=True,
    ),
    Cli(
        "lr-nan",
        "train.py",
        f"{TINY} model.optimizer.lr=nan",
        r"model\.optimizer\.lr=nan: the learning rate",
        pre=True,
    ),
    Cli(
        "lr-negative",
        "train.py",
        f"{TINY} model.optimizer.lr=-0.1",
        r"lr=-0\.1: the learning rate must be a finite number > 0",
        pre=True,
    ),
    Cli("lr-zero", "train.py", f"{TINY} model.optimizer.lr=0", r"lr=0: the learning rate", pre=True),
    Cli("lr-text", "train.py", f"{TINY} model.optimizer.lr=fast", r"lr='fast': the learning rate", pre=True),
    Cli(
        "weight-decay-negative",
        "train.py",
        f"{TINY} model.optimizer.weight_decay=-1",
        r"weight_decay=-1: the weight decay must be",
        pre=True,
    ),
    Cli(
        "n-train-zero",
        "train.py",
        f"{TINY} data.n_train=0",
        r"data\.n_train=0: must be a whole number >= 1",
        pre=True,
    ),
    Cli(
        "n-val-zero",
        "train.py",
        f"{TINY} data.n_val=0",
        r"data\.n_val=0: must be a whole number >= 1 \(the validation split selects the checkpoint\)",
        pre=True,
    ),
    Cli(
        "n-test-negative",
        "train.py",
        f"{TINY} data.n_test=-3",
        r"data\.n_test=-3: must be a whole number >= 1",
        pre=True,
    ),
    Cli(
        "n-train-fraction",
        "train.py",
        f"{TINY} data.n_train=1.5",
        r"data\.n_train=1\.5: must be a whole number",
        pre=True,
    ),
    Cli(
        "batch-size-zero",
        "train.py",
        f"{TINY} data.batch_size=0",
        r"data\.batch_size=0: must be a whole number >= 1",
        pre=True,
    ),
    Cli(
        "num-workers-negative",
        "train.py",
        f"{TINY} data.num_workers=-1",
        r"data\.num_workers=-1: must be a whole number >= 0",
        pre=True,
    ),
    Cli(
        "image-size-zero",
        "train.py",
        f"{TINY} data.image_size=0",
        r"data\.image_size=0: must be a side in pixels",
        pre=True,
    ),
    Cli(
        "val-fraction-above-one",
        "train.py",
        "debug=fdr model=baseline data=digits data.val_fraction=1.5",
        r"data\.val_fraction=1\.5: a fraction of a split, must be in \[0, 1\)",
        pre=True,
    ),
    Cli(
        "test-fraction-zero",
        "train.py",
        "debug=fdr model=baseline data=digits data.test_fraction=0",
        r"data\.test_fraction=0: .* must be in \(0, 1\)",
        pre=True,
    ),
    Cli(
        "max-epochs-zero",
        "train.py",
        f"{TINY} trainer.max_epochs=0",
        r"trainer\.max_epochs=0: must be a whole number >= 1, or -1",
        pre=True,
    ),
    Cli(
        "seed-text",
        "train.py",
        f"{TINY} seed=abc",
        r"invalid override: seed=abc: Value 'abc' of type 'str' could not be converted to Integer",
        pre=True,
    ),
    Cli(
        "overwrite-not-bool",
        "train.py",
        f"{TINY} overwrite=maybe",
        r"invalid override: overwrite=maybe: Value 'maybe' is not a valid bool",
        pre=True,
    ),
    Cli(
        "model-option-typo",
        "train.py",
        "debug=fdr model=protopnett",
        r"model=protopnett: there is no such option; did you mean 'protopnet'",
        pre=True,
    ),
    Cli(
        "backbone-option-typo",
        "train.py",
        "debug=fdr backbone=resnet19",
        r"backbone=resnet19: there is no such option; did you mean",
        pre=True,
    ),
    Cli(
        "data-option-typo",
        "train.py",
        "debug=fdr data=partshape",
        r"data=partshape: .*did you mean 'partshapes'",
        pre=True,
    ),
    # data folders and files
    Cli(
        "imagefolder-root-missing",
        "train.py",
        "debug=fdr model=baseline data=imagefolder data.root={nowhere}",
        r"data\.root=.*nowhere.*no such file or folder",
        pre=True,
    ),
    Cli(
        "imagefolder-root-unset",
        "train.py",
        "debug=fdr model=baseline data=imagefolder",
        r"data\.root is required \(\?\?\?\)",
        pre=True,
    ),
    Cli(
        "csv-file-missing",
        "train.py",
        "debug=fdr model=baseline_mlp data=csv path={nowhere}.csv target=label",
        r"data\.path=.*nowhere\.csv.*no such file or folder",
        pre=True,
    ),
    Cli(
        "csv-bad-cell",
        "train.py",
        "debug=fdr model=baseline_mlp data=csv path={csv_bad_cell} target=label",
        r"line 5, column 'b': 'abc' is not a number in a numeric column",
    ),
    # checkpoints and bundles
    Cli(
        "resume-missing-file",
        "train.py",
        f"{TINY} ckpt_path={{nowhere}}.ckpt",
        r"ckpt_path=.*nowhere\.ckpt: no such file or folder",
        pre=True,
    ),
    Cli(
        "resume-from-bundle",
        "train.py",
        f"{TINY} ckpt_path={{bundle}}",
        r"is a folder \(it is a bundle: evaluate it with `python eval\.py",
        pre=True,
    ),
    Cli(
        "eval-no-ckpt",
        "eval.py",
        "",
        r"eval needs ckpt_path=<a \.ckpt file or a bundle folder>",
        pre=True,
    ),
    Cli(
        "eval-missing-file",
        "eval.py",
        "ckpt_path={nowhere}",
        r"ckpt_path=.*nowhere: no such file or folder",
        pre=True,
    ),
    Cli(
        "eval-not-a-bundle",
        "eval.py",
        "ckpt_path={empty_dir}",
        r"is a folder but not a model bundle \(it has no config\.json and no model\.safetensors\)",
        pre=True,
    ),
    Cli(
        "eval-split-typo",
        "eval.py",
        "ckpt_path={bundle} split=vall",
        r"split='vall': .*did you mean 'val'\?",
        pre=True,
    ),
    Cli(
        "eval-split-train",
        "eval.py",
        "ckpt_path={bundle} split=train",
        r"split='train': eval evaluates the val or the test split",
        pre=True,
    ),
    Cli(
        "eval-truncated-ckpt",
        "eval.py",
        "ckpt_path={trunc_ckpt} data.n_train=64 data.n_val=32 data.n_test=32",
        r"trunc\.ckpt cannot be read: it is truncated or damaged",
        pre=True,
    ),
    Cli(
        "eval-broken-bundle-json",
        "eval.py",
        "ckpt_path={bundle_bad_json} data.n_train=64 data.n_val=32 data.n_test=32",
        r"config\.json is not valid JSON .*line 1.*export the bundle again",
        pre=True,
    ),
    # resumes
    Cli(
        "resume-changed-lr",
        "train.py",
        f"{RESUME} ckpt_path={{ckpt}} model.optimizer.lr=0.01",
        r"model\.optimizer\.lr: the checkpoint was trained with lr 0\.002, the config asks for 0\.01",
    ),
    # output folders
    Cli(
        "run-folder-has-metrics",
        "train.py",
        f"{TINY} hydra.run.dir={{run_metrics}}",
        r"refusing to overwrite: the run folder .* already holds another run's results \(metrics\.json\).*overwrite=true",
        pre=True,
    ),
    Cli(
        "run-folder-has-checkpoints",
        "train.py",
        f"{TINY} hydra.run.dir={{run_ckpts}}",
        r"\(checkpoints\).*resume it with ckpt_path=.*last\.ckpt.*overwrite=true",
        pre=True,
    ),
    Cli(
        "run-folder-has-bundle",
        "train.py",
        f"{TINY} hydra.run.dir={{run_bundle}}",
        r"already holds another run's results \(bundle\)",
        pre=True,
    ),
    Cli(
        "run-folder-has-config",
        "train.py",
        f"{TINY} hydra.run.dir={{run_config}}",
        r"already holds another run's results \(config\.yaml\)",
        pre=True,
    ),
    Cli(
        "run-folder-is-a-file",
        "train.py",
        f"{TINY} hydra.run.dir={{a_file}}",
        r"the run folder .* is a file",
        pre=True,
    ),
    Cli(
        "eval-into-a-run-folder",
        "eval.py",
        "ckpt_path={bundle} hydra.run.dir={run_metrics}",
        r"refusing to overwrite: .*\(metrics\.json\)",
        pre=True,
    ),
    # overwrite=true and resuming into its own folder pass the folder check (the next problem shows)
    Cli(
        "overwrite-true-allowed",
        "train.py",
        f"{TINY} hydra.run.dir={{run_metrics}} overwrite=true model.optimizer.lr=inf",
        r"the learning rate must be",
        pre=True,
        absent="refusing to overwrite",
    ),
    Cli(
        "resume-into-own-folder-allowed",
        "train.py",
        f"{TINY} hydra.run.dir={{run_ckpts}} ckpt_path={{run_ckpts}}/checkpoints/last.ckpt model.optimizer.lr=inf",
        r"the learning rate must be",
        pre=True,
        absent="refusing to overwrite",
    ),
    # multirun jobs are checked inside each job, before the training stack loads
    Cli(
        "multirun-job-lr-inf",
        "train.py",
        f"-m seed=0,1 {TINY} model.optimizer.lr=inf",
        r"model\.optimizer\.lr=inf: the learning rate",
    ),
    # a run that fails on its own: exit code 1, still one paragraph
    Cli(
        "non-finite-loss",
        "train.py",
        f"{TINY} trainer.fast_dev_run=4 data.batch_size=16 model.optimizer.name=sgd model.optimizer.lr=1e30",
        r"the training loss became (nan|inf) at step \d+ .*loss terms: ce=.*lower model\.optimizer\.lr",
        code=1,
    ),
    # tracebacks on request, same exit code
    Cli(
        "verbose-hydra-full-error-in-a-job",
        "train.py",
        f"-m seed=0 {TINY} model.optimizer.lr=inf",
        r"the learning rate",
        env={"HYDRA_FULL_ERROR": "1"},
        traceback=True,
    ),
    Cli(
        "verbose-hydra-full-error",
        "train.py",
        f"{TINY} model.optimizer.lr=inf",
        r"the learning rate",
        pre=True,
        env={"HYDRA_FULL_ERROR": "1"},
        traceback=True,
    ),
    Cli(
        "verbose-interpzoo",
        "train.py",
        f"{TINY} data.n_train=0",
        r"data\.n_train=0",
        pre=True,
        env={"INTERPZOO_VERBOSE": "1"},
        traceback=True,
    ),
]


# --- Python API -----------------------------------------------------------------------------------------


def _csv(ctx: SimpleNamespace, name: str, **kwargs: Any) -> Any:
    from interpzoo.datamodules.tabular import CSVDataModule

    dm = CSVDataModule(path=str(ctx.csv[name]), **{"target": "label", **kwargs})
    dm.setup()
    return dm


def _folder(ctx: SimpleNamespace, name: str) -> Any:
    from interpzoo.datamodules.image_folder import ImageFolderDataModule

    dm = ImageFolderDataModule(root=str(ctx.folders[name]), image_size=16, batch_size=2, augment=False)
    dm.setup()
    return dm


def _corrupt_image_item(ctx: SimpleNamespace) -> Any:
    dm = _folder(ctx, "corrupt_image")
    return [dm.train_set[i] for i in range(len(dm.train_set))]


def _validate(*overrides: str) -> Callable[[SimpleNamespace], None]:
    def call(ctx: SimpleNamespace) -> None:
        from interpzoo.preflight import validate_config

        validate_config(compose_config("train", ["debug=fdr", "model=baseline", *overrides], ctx.base / "v"))

    return call


def _load_ckpt(name: str) -> Callable[[SimpleNamespace], Any]:
    def call(ctx: SimpleNamespace) -> Any:
        from interpzoo.models.checkpoint import load_checkpoint

        return load_checkpoint(getattr(ctx, name))

    return call


def _load_bundle(name: str) -> Callable[[SimpleNamespace], Any]:
    def call(ctx: SimpleNamespace) -> Any:
        from interpzoo.models.bundle import load_pretrained

        return load_pretrained(ctx.bundles.get(name, name))

    return call


def _resume(*overrides: str, ckpt: str = "ckpt") -> Callable[[SimpleNamespace], Any]:
    def call(ctx: SimpleNamespace) -> Any:
        from interpzoo.run import train

        args = [*RESUME.split(), "export=false", "report=false", "test=false", "logger=none"]
        out = ctx.base / "resumes" / "_".join([ckpt, *overrides]).replace("/", "_")
        return train(compose_config("train", [*args, f"ckpt_path={getattr(ctx, ckpt)}", *overrides], out))

    return call


def _evaluate(source: str, *overrides: str) -> Callable[[SimpleNamespace], Any]:
    def call(ctx: SimpleNamespace) -> Any:
        from interpzoo.run import evaluate

        path = ROOT / "models" / "pretrained" / source
        return evaluate(
            compose_config("eval", [f"ckpt_path={path}", "logger=none", *overrides], ctx.base / "e")
        )

    return call


def _fit_nan(task: str) -> Callable[[SimpleNamespace], Any]:
    """One training step of a module whose weights diverged to NaN (the loss is NaN at step 0).

    The inputs are finite: the networks refuse NaN inputs themselves.
    """

    def call(ctx: SimpleNamespace) -> Any:
        import pytorch_lightning as pl
        from torch.utils.data import DataLoader

        from interpzoo.models.lit_base import ClassificationModule, ReconstructionModule

        torch.manual_seed(0)
        if task == "classification":
            module: pl.LightningModule = ClassificationModule(
                net={"name": "baseline_mlp"}, data_info={"num_classes": 2, "num_features": 4}
            )
            x = torch.randn(8, 4)
            items = [
                {"features": x[i], "label": torch.tensor(i % 2), "index": torch.tensor(i)} for i in range(8)
            ]
        else:
            module = ReconstructionModule(
                net={"name": "linear_ae"}, data_info={"in_chans": 1, "image_size": [8, 8]}
            )
            x = torch.rand(8, 1, 8, 8)
            items = [{"image": x[i], "label": torch.tensor(0), "index": torch.tensor(i)} for i in range(8)]
        with torch.no_grad():
            next(module.net.parameters()).fill_(float("nan"))  # as after a step with a far too high rate
        trainer = pl.Trainer(
            fast_dev_run=1,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, train_dataloaders=DataLoader(items, batch_size=8))

    return call


def _net(name: str, x: Callable[[], torch.Tensor], **kwargs: Any) -> Callable[[SimpleNamespace], Any]:
    def call(ctx: SimpleNamespace) -> Any:
        import interpzoo

        net = interpzoo.create_model(name, **kwargs).eval()
        with torch.no_grad():
            return net(x())

    return call


def _explain_nan(ctx: SimpleNamespace) -> Any:
    import interpzoo

    net = interpzoo.create_model("baseline_resnet18s", num_classes=3).eval()
    return net.explain(torch.full((1, 3, 32, 32), float("nan")))


API = [
    # CSV tables
    Api(
        "csv-bad-cell",
        lambda c: _csv(c, "bad_cell"),
        r"bad_cell\.csv, line 5, column 'b': 'abc' is not a number in a numeric column.*data\.drop=\[b\]",
    ),
    Api("csv-inf-cell", lambda c: _csv(c, "inf_cell"), r"line 7, column 'c': 'inf' is an infinite number"),
    Api(
        "csv-semicolons",
        lambda c: _csv(c, "semicolon"),
        r"""looks separated by ';', not by ','.*set 'data\.delimiter=";"'""",
    ),
    Api("csv-tabs", lambda c: _csv(c, "tabs"), r"looks separated by '\\t'.*set data\.delimiter=tab"),
    Api(
        "csv-target-typo",
        lambda c: _csv(c, "good", target="lable"),
        r"has no column 'lable'; did you mean 'label'\?",
    ),
    Api("csv-header-only", lambda c: _csv(c, "header_only"), r"has no data rows"),
    Api("csv-empty-file", lambda c: _csv(c, "empty"), r"has no data rows"),
    Api(
        "csv-ragged-row",
        lambda c: _csv(c, "ragged"),
        r"rows \[4\] have a different number of fields than the header",
    ),
    Api("csv-one-class", lambda c: _csv(c, "one_class"), r"target column 'label' has a single value"),
    Api("csv-continuous-target", lambda c: _csv(c, "continuous"), r"looks continuous"),
    Api(
        "csv-missing-error",
        lambda c: _csv(c, "missing", missing="error"),
        r"rows have missing values \(first: line 4, column 'b'\); set data\.missing=drop",
    ),
    Api("csv-path-is-folder", lambda c: _csv(c, "folder"), r"is a folder; give the CSV file"),
    Api("csv-not-utf8", lambda c: _csv(c, "latin1"), r"is not UTF-8 text.*save the table as UTF-8"),
    Api(
        "csv-no-path",
        lambda c: __import__("interpzoo.datamodules.tabular", fromlist=["x"]).CSVDataModule(),
        r"data=csv needs a file and its label column",
    ),
    Api(
        "csv-log-of-negative",
        lambda c: _csv(c, "good", feature_transforms={"a": "log"}),
        r"feature_transforms\['a'\]='log' needs positive values",
    ),
    # image folders and PartShapes
    Api(
        "folder-root-missing",
        lambda c: _folder(c, "nowhere"),
        r"dataset root '.*' does not exist; set data\.root",
    ),
    Api("folder-no-train", lambda c: _folder(c, "no_train"), r"training folder '.*train' does not exist"),
    Api("folder-no-classes", lambda c: _folder(c, "no_classes"), r"has no class sub-folders"),
    Api("folder-class-mismatch", lambda c: _folder(c, "mismatch"), r"class folders differ between"),
    Api(
        "folder-corrupt-image",
        _corrupt_image_item,
        r"cannot read image '.*broken\.png'.*Delete or replace the file",
    ),
    Api(
        "partshapes-n-train-zero",
        lambda c: __import__("interpzoo.datamodules.partshapes_dm", fromlist=["x"]).PartShapesDataModule(
            n_train=0
        ),
        r"data\.n_train=0: every split needs at least one sample",
    ),
    # configs past the command line (the Python API's pre-flight)
    Api(
        "optimizer-name-typo",
        _validate("model.optimizer.name=adamm"),
        r"model\.optimizer\.name='adamm' is unknown; did you mean 'adam'",
    ),
    Api(
        "scheduler-name-typo",
        _validate("model.scheduler.name=cosin"),
        r"model\.scheduler\.name='cosin' is unknown; did you mean 'cosine'",
    ),
    Api(
        "backbone-name-typo",
        _validate(f"{NET}.backbone.name=resnet19"),
        rf"{NET}\.backbone\.name='resnet19' is unknown; did you mean",
    ),
    Api(
        "constructor-key-typo",
        _validate("+model.monitr=x"),
        r"has no argument 'monitr'; did you mean 'monitor'",
    ),
    Api("lr-inf-api", _validate("model.optimizer.lr=inf"), r"model\.optimizer\.lr=inf: the learning rate"),
    # checkpoints
    Api("ckpt-missing", _load_ckpt("nowhere"), r"checkpoint not found: .*nowhere"),
    Api(
        "ckpt-truncated", _load_ckpt("trunc_ckpt"), r"trunc\.ckpt cannot be read: it is truncated or damaged"
    ),
    Api(
        "ckpt-text-file",
        _load_ckpt("text_ckpt"),
        r"text\.ckpt cannot be read: it is not a PyTorch checkpoint",
    ),
    Api(
        "ckpt-is-a-folder",
        _load_ckpt("bundle"),
        r"is a folder, not a checkpoint file \(\.ckpt\)\. It is a bundle",
    ),
    Api(
        "ckpt-plain-state-dict",
        _load_ckpt("state_dict_ckpt"),
        r"is not an interpzoo checkpoint .*plain state dict",
    ),
    Api(
        "ckpt-pickled-code",
        _load_ckpt("pickled_ckpt"),
        r"cannot be loaded with weights_only=True .*Unsupported global: GLOBAL pathlib\.PosixPath",
    ),
    Api(
        "ckpt-edited-width",
        _load_ckpt("wide_ckpt"),
        r"wide\.ckpt does not fit a 'baseline' network: .*shape mismatches",
        needs_ckpt=True,
    ),
    Api(
        "ckpt-no-state-dict",
        _load_ckpt("no_state_ckpt"),
        r"lacks '(hyper_parameters' or ')?state_dict'.*not a complete",
    ),
    Api(
        "ckpt-bad-hparams",
        _load_ckpt("bad_hparams_ckpt"),
        r"its model settings do not build a ClassificationModule",
    ),
    # bundles
    Api(
        "bundle-broken-json",
        _load_bundle("bad_json"),
        r"config\.json is not valid JSON \(.* line 1, column \d+\).*export the bundle again",
    ),
    Api("bundle-json-list", _load_bundle("json_list"), r"config\.json holds a JSON list, not an object"),
    Api(
        "bundle-truncated-weights",
        _load_bundle("truncated"),
        r"model\.safetensors cannot be read as safetensors: it is truncated or damaged",
    ),
    Api(
        "bundle-pickled-weights",
        _load_bundle("pickled"),
        r"model\.safetensors is a pickled PyTorch file \(torch\.save\), not safetensors",
    ),
    Api(
        "bundle-empty-weights",
        _load_bundle("empty_weights"),
        r"model\.safetensors cannot be read as safetensors: it is empty",
    ),
    Api(
        "bundle-no-weights", _load_bundle("no_weights"), r"is not a model bundle: .*has no model\.safetensors"
    ),
    Api("bundle-no-architecture", _load_bundle("no_arch"), r"config\.json has no 'architecture' entry"),
    Api("bundle-wrong-width", _load_bundle("wrong_width"), r"does not fit a 'baseline' network"),
    Api(
        "bundle-name-typo",
        _load_bundle("senn_mpl.breast_cancer_s0"),
        r"no bundle at 'senn_mpl\.breast_cancer_s0'; did you mean 'senn_mlp\.breast_cancer_s0'",
    ),
    Api(
        "bundle-given-a-ckpt",
        lambda c: _load_bundle("x")(SimpleNamespace(bundles={"x": c.ckpt})),
        r"is a file, not a bundle folder; for a Lightning checkpoint use interpzoo\.load_checkpoint",
        needs_ckpt=True,
    ),
    Api(
        "eval-on-other-data",
        _evaluate("senn_mlp.breast_cancer_s0", "data=wine"),
        r"does not fit the configured data: .*classes: the model was trained with 2, WineDataModule has 3",
    ),
    Api(
        "eval-split-typo-api",
        _evaluate("senn_mlp.breast_cancer_s0", "data=breast_cancer", "split=vall"),
        r"did you mean 'val'",
    ),
    # resumes
    Api(
        "resume-changed-lr",
        _resume("model.optimizer.lr=0.01"),
        r"model\.optimizer\.lr: the checkpoint was trained with lr 0\.002, the config asks for 0\.01 \(the optimizer state",
        needs_ckpt=True,
    ),
    Api(
        "resume-changed-width",
        _resume(f"{NET}.backbone.width=8"),
        r"the checkpoint was trained with width 16, the config asks for 8 \(the checkpoint's weights",
        needs_ckpt=True,
    ),
    Api(
        "resume-changed-classes",
        _resume("data.num_classes=5"),
        r"data\.num_classes: the checkpoint was trained with num_classes 10, the config asks for 5",
        needs_ckpt=True,
    ),
    Api(
        "resume-changed-n-train",
        _resume("data.n_train=100"),
        r"data\.n_train: the checkpoint was trained with n_train 64, the config asks for 100",
        needs_ckpt=True,
    ),
    Api(
        "resume-changed-seed",
        _resume("seed=3"),
        r"seed: the checkpoint was trained with seed 0, the config asks for 3",
        needs_ckpt=True,
    ),
    Api(
        "resume-other-model",
        _resume("model=protopnet"),
        r"cannot resume from .*last\.ckpt: the config differs",
        needs_ckpt=True,
    ),
    Api(
        "resume-truncated",
        _resume(ckpt="trunc_ckpt"),
        r"trunc\.ckpt cannot be read: it is truncated or damaged",
    ),
    Api(
        "resume-old-ckpt-changed-lr",
        _resume("model.optimizer.lr=0.01", ckpt="old_ckpt"),
        r"model\.optimizer\.lr: the checkpoint was trained with lr 0\.002, the config asks for 0\.01",
        needs_ckpt=True,
    ),
    # a non-finite loss stops training at once
    Api(
        "nan-loss-classification",
        _fit_nan("classification"),
        r"the training loss became nan at step 0 .*loss terms: ce=nan.*lower model\.optimizer\.lr",
    ),
    Api(
        "nan-loss-reconstruction",
        _fit_nan("reconstruction"),
        r"the training loss became nan at step 0 .*loss terms: mse=nan",
    ),
    # tensors given to the networks (inputs are float images in [0, 1], at least the trunk's minimum size)
    Api(
        "net-nan-image",
        _net("baseline_resnet18s", lambda: torch.full((1, 3, 32, 32), float("nan")), num_classes=3),
        r"NaN|finite",
        ValueError,
    ),
    Api(
        "net-inf-image",
        _net("baseline_resnet18s", lambda: torch.full((1, 3, 32, 32), float("inf")), num_classes=3),
        r"infinite|finite",
        ValueError,
    ),
    Api(
        "net-uint8-image",
        _net("baseline_resnet18s", lambda: torch.zeros(1, 3, 32, 32, dtype=torch.uint8), num_classes=3),
        r"dtype|floating",
        (ValueError, TypeError),
    ),
    Api(
        "net-0-255-image",
        _net("baseline_resnet18s", lambda: torch.full((1, 3, 32, 32), 200.0), num_classes=3),
        r"255|\[0, 1\]",
        ValueError,
    ),
    Api(
        "net-2x2-image",
        _net("baseline_resnet18s", lambda: torch.rand(1, 3, 2, 2), num_classes=3),
        r"smaller|minimum",
        ValueError,
    ),
    Api(
        "net-wrong-channels",
        _net("baseline_resnet18s", lambda: torch.rand(1, 1, 32, 32), num_classes=3),
        r"channel",
        ValueError,
    ),
    Api(
        "net-no-batch-dim",
        _net("baseline_resnet18s", lambda: torch.rand(3, 32, 32), num_classes=3),
        r"batch",
        ValueError,
    ),
    Api("net-explain-nan", _explain_nan, r"NaN|finite", ValueError),
    Api(
        "net-protopnet-nan",
        _net("protopnet_resnet18s", lambda: torch.full((1, 3, 32, 32), float("nan")), num_classes=3),
        r"NaN|finite",
        ValueError,
    ),
    Api(
        "net-senn-wrong-features",
        _net("senn_mlp", lambda: torch.rand(2, 7), num_features=5, num_classes=2),
        r"feature",
        ValueError,
    ),
]


def test_the_corpus_is_big_and_unique() -> None:
    ids = [c.id for c in CLI] + [f"api-{c.id}" for c in API]
    assert len(ids) >= 60 and len(ids) == len(set(ids))


# --- files the rows refer to ------------------------------------------------------------------------------

_GOOD_ROWS = [f"{i % 5},{i * 0.5},{(i * 7) % 3},{'yes' if i % 2 else 'no'}" for i in range(20)]


def _write_csvs(folder: Path) -> dict[str, Path]:
    header = "a,b,c,label"
    tables = {
        "good": [header, *_GOOD_ROWS],
        "bad_cell": [header, *_GOOD_ROWS[:3], "1,abc,2,yes", *_GOOD_ROWS[3:]],
        "inf_cell": [header, *_GOOD_ROWS[:5], "1,2,inf,no", *_GOOD_ROWS[5:]],
        "semicolon": [r.replace(",", ";") for r in [header, *_GOOD_ROWS]],
        "tabs": [r.replace(",", "\t") for r in [header, *_GOOD_ROWS]],
        "header_only": [header],
        "ragged": [header, *_GOOD_ROWS[:2], "1,2,3", *_GOOD_ROWS[2:]],
        "one_class": [header, *[r.rsplit(",", 1)[0] + ",yes" for r in _GOOD_ROWS]],
        "continuous": [header, *[r.rsplit(",", 1)[0] + f",{i * 0.37}" for i, r in enumerate(_GOOD_ROWS)]],
        "missing": [header, *_GOOD_ROWS[:2], "1,,2,yes", *_GOOD_ROWS[2:]],
    }
    out = {name: folder / f"{name}.csv" for name in tables}
    for name, rows in tables.items():
        out[name].write_text("\n".join(rows) + "\n")
    out["empty"] = folder / "empty.csv"
    out["empty"].write_text("")
    out["latin1"] = folder / "latin1.csv"
    out["latin1"].write_bytes(
        ("a,b,c,label\n" + "\n".join(_GOOD_ROWS) + "\n1,2,3,caf\xe9\n").encode("latin-1")
    )
    out["folder"] = folder / "a_folder.csv"
    out["folder"].mkdir()
    return out


def _write_folders(folder: Path) -> dict[str, Path]:
    from interpzoo.datamodules.testing import make_fake_image_folder

    out = {"nowhere": folder / "nowhere"}
    out["no_train"] = folder / "no_train"
    (out["no_train"] / "test" / "cat").mkdir(parents=True)
    out["no_classes"] = folder / "no_classes"
    (out["no_classes"] / "train").mkdir(parents=True)
    out["mismatch"] = make_fake_image_folder(
        folder / "mismatch", classes=("cat", "dog"), n_per_class=1, size=16
    )
    (out["mismatch"] / "test" / "dog").rename(out["mismatch"] / "test" / "dogs")
    out["corrupt_image"] = make_fake_image_folder(
        folder / "corrupt", classes=("cat", "dog"), n_per_class=1, size=16
    )
    (out["corrupt_image"] / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return out


def _write_bundles(folder: Path, net_state: dict[str, torch.Tensor]) -> dict[str, Path]:
    import interpzoo

    good = interpzoo.save_pretrained(
        interpzoo.create_model("baseline_resnet18s", num_classes=3), folder / "good"
    )
    out: dict[str, Path] = {}

    def copy(name: str) -> Path:
        target = folder / name
        target.mkdir()
        for f in good.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        out[name] = target
        return target

    copy("bad_json").joinpath("config.json").write_text('{"architecture": "baseline", "model_args": ')
    copy("json_list").joinpath("config.json").write_text("[1, 2, 3]")
    weights = (good / "model.safetensors").read_bytes()
    copy("truncated").joinpath("model.safetensors").write_bytes(weights[: len(weights) // 3])
    torch.save(net_state, copy("pickled") / "model.safetensors")
    copy("empty_weights").joinpath("model.safetensors").write_bytes(b"")
    copy("no_weights").joinpath("model.safetensors").unlink()
    config = json.loads((good / "config.json").read_text())
    copy("no_arch").joinpath("config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "architecture"})
    )
    wide = {
        **config,
        "model_args": {**config["model_args"], "backbone": {**config["model_args"]["backbone"], "width": 8}},
    }
    copy("wrong_width").joinpath("config.json").write_text(json.dumps(wide))
    out["good"] = good
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Every file a row names: run folders, damaged checkpoints and bundles, CSV tables, image folders."""
    import interpzoo

    base = tmp_path_factory.mktemp("corpus")
    ctx = SimpleNamespace(
        base=base, nowhere=base / "nowhere", empty_dir=base / "empty_dir", a_file=base / "a_file"
    )
    ctx.empty_dir.mkdir()
    ctx.a_file.write_text("not a folder\n")
    for name, files in {
        "run_metrics": {"metrics.json": "{}\n"},
        "run_ckpts": {"checkpoints/last.ckpt": "x"},
        "run_bundle": {"bundle/config.json": "{}\n"},
        "run_config": {"config.yaml": "seed: 0\n"},
    }.items():
        folder = base / name
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
        setattr(ctx, name, folder)
    (base / "csv_files").mkdir()
    ctx.csv = _write_csvs(base / "csv_files")
    ctx.folders = _write_folders(base / "folders")
    ctx.csv_bad_cell = ctx.csv["bad_cell"]

    net = interpzoo.create_model("baseline_resnet18s", num_classes=3)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    (base / "bundles").mkdir()
    ctx.bundles = _write_bundles(base / "bundles", state)
    ctx.bundle = ctx.bundles["good"]
    ctx.bundle_bad_json = ctx.bundles["bad_json"]

    ckpt = base / "ckpts"
    ckpt.mkdir()
    ctx.text_ckpt = ckpt / "text.ckpt"
    ctx.text_ckpt.write_text("hello, I am not a checkpoint\n")
    ctx.state_dict_ckpt = ckpt / "state.ckpt"
    torch.save(state, ctx.state_dict_ckpt)
    ctx.pickled_ckpt = ckpt / "pickled.ckpt"
    torch.save({"interpzoo": {"task": "classification"}, "where": Path("x")}, ctx.pickled_ckpt)
    ctx.trunc_ckpt = ckpt / "trunc.ckpt"
    torch.save({"state_dict": state}, ckpt / "full.ckpt")
    ctx.trunc_ckpt.write_bytes((ckpt / "full.ckpt").read_bytes()[:4096])
    hparams = {
        "arch": "baseline",
        "backbone": {"name": "resnet18s", "width": 16},
        "data_info": {"num_classes": 3},
    }
    real = {"interpzoo": {"task": "classification", "architecture": "baseline"}, "hyper_parameters": hparams}
    ctx.no_state_ckpt = ckpt / "no_state.ckpt"
    torch.save(real, ctx.no_state_ckpt)
    ctx.bad_hparams_ckpt = ckpt / "bad_hparams.ckpt"
    torch.save({**real, "state_dict": {}, "hyper_parameters": {**hparams, "widht": 3}}, ctx.bad_hparams_ckpt)
    return ctx


@pytest.fixture(scope="module")
def trained(corpus: SimpleNamespace) -> SimpleNamespace:
    """A real checkpoint of a tiny run (1 epoch on 64 PartShapes images), and a copy without the run config."""
    from interpzoo.models.checkpoint import RUN_CONFIG_KEY
    from interpzoo.run import train

    out = corpus.base / "trained"
    args = [*RESUME.split(), "export=false", "report=false", "test=false", "logger=none"]
    train(compose_config("train", args, out))
    corpus.ckpt = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(corpus.ckpt, weights_only=True)
    assert RUN_CONFIG_KEY in ckpt
    del ckpt[RUN_CONFIG_KEY]
    corpus.old_ckpt = corpus.base / "old.ckpt"
    torch.save(ckpt, corpus.old_ckpt)
    # the same file with every recorded backbone width edited from 16 to 8 (the weights stay 16 wide)
    corpus.wide_ckpt = corpus.base / "wide.ckpt"
    torch.save({k: v if k == "state_dict" else _set_width(v, 8) for k, v in ckpt.items()}, corpus.wide_ckpt)
    return corpus


def _set_width(value: Any, width: int) -> Any:
    if isinstance(value, dict):
        return {k: width if k == "width" else _set_width(v, width) for k, v in value.items()}
    return value


def _needs_training(row: Cli | Api) -> bool:
    return "{ckpt}" in row.args if isinstance(row, Cli) else row.needs_ckpt


# --- running the command lines, a few at a time -------------------------------------------------------------


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "INTERPZOO_VERBOSE")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore", **extra)
    return env


def _launch(row: Cli, ctx: SimpleNamespace, cwd: Path) -> subprocess.CompletedProcess:
    args = [a.format_map(vars(ctx)) for a in row.args.split()]
    return subprocess.run(
        [sys.executable, str(ROOT / row.script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(row.env),
        timeout=600,
    )


@pytest.fixture(scope="module")
def cli_results(
    request: pytest.FixtureRequest, corpus: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Future, Path]]:
    """Start every selected command line at once (3 at a time): most spend their second starting Python."""
    selected = {
        item.callspec.params["row"].id
        for item in request.session.items
        if hasattr(item, "callspec") and isinstance(item.callspec.params.get("row"), Cli)
    }
    rows = [r for r in CLI if r.id in selected]
    if any(_needs_training(r) for r in rows):
        request.getfixturevalue("trained")
    pool = ThreadPoolExecutor(max_workers=3)
    request.addfinalizer(lambda: pool.shutdown(wait=True, cancel_futures=True))
    # the slow ones (past the pre-flight) first, so they overlap with the many quick ones
    results = {}
    for row in sorted(rows, key=lambda r: r.pre):
        cwd = tmp_path_factory.mktemp(f"cli_{row.id}")
        results[row.id] = (pool.submit(_launch, row, corpus, cwd), cwd)
    return results


@pytest.mark.parametrize("row", CLI, ids=[c.id for c in CLI])
def test_command_line(row: Cli, cli_results: dict[str, tuple[Future, Path]]) -> None:
    future, cwd = cli_results[row.id]
    proc = future.result()
    out = proc.stdout + proc.stderr
    context = f"{row.script} {row.args}\nexit {proc.returncode}\n--- stderr (tail)\n{proc.stderr[-3000:]}"
    assert proc.returncode == row.code, context
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, context  # one paragraph, said once
    paragraph = proc.stderr[proc.stderr.index(errors[0]) :]
    assert re.search(row.expect, paragraph, re.S), context
    if row.absent:
        assert row.absent not in out, context
    assert ("Traceback (most recent call last)" in out) is row.traceback, context
    if row.pre:
        assert not any(cwd.iterdir()), f"created {sorted(cwd.iterdir())} before refusing\n{context}"


# --- the Python API ---------------------------------------------------------------------------------------


def _api_params() -> list[Any]:
    marks = [pytest.mark.xfail(strict=False, reason=NETWORK_XFAIL)]
    return [pytest.param(r, id=f"api-{r.id}", marks=marks if r.xfail else ()) for r in API]


@pytest.mark.parametrize("row", _api_params())
def test_python_api(row: Api, corpus: SimpleNamespace, request: pytest.FixtureRequest) -> None:
    if _needs_training(row):
        request.getfixturevalue("trained")
    with pytest.raises(row.error) as info:
        row.call(corpus)
    message = str(info.value)
    assert re.search(row.expect, message, re.S), message


def test_resume_applies_and_says_a_loader_change(
    trained: SimpleNamespace, capsys: pytest.CaptureFixture
) -> None:
    from interpzoo.run import check_resume_config

    cfg = compose_config(
        "train", [*RESUME.split(), "data.num_workers=1", f"ckpt_path={trained.ckpt}"], trained.base / "a"
    )
    assert check_resume_config(str(trained.ckpt), cfg) is not None
    said = capsys.readouterr().out
    assert "changed settings (applied from the config)" in said
    assert "data.num_workers: the checkpoint was trained with num_workers 0, the config asks for 1" in said


def test_a_dataloader_worker_error_loses_the_worker_traceback() -> None:
    from interpzoo.cli import error_message
    from interpzoo.datamodules.base import DataError

    # what torch re-raises in the main process for an error in a DataLoader worker (num_workers > 0)
    worker = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\ninterpzoo.datamodules.base.DataError: cannot read image '
        "'a.png': truncated. Delete or replace the file.\n"
    )
    assert error_message(worker) == "cannot read image 'a.png': truncated. Delete or replace the file."
    assert error_message(DataError("plain")) == "plain"


def test_ddp_child_ranks_skip_the_run_folder_check(
    corpus: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omegaconf import OmegaConf

    from interpzoo.preflight import ConfigError, check_run_folder

    cfg = OmegaConf.create({"overwrite": False, "ckpt_path": None})
    with pytest.raises(ConfigError, match="already holds another run's results"):
        check_run_folder(corpus.run_metrics, cfg, "train")
    # rank 0 checked before it wrote anything; the others start in the folder rank 0 is writing to
    monkeypatch.setenv("LOCAL_RANK", "1")
    check_run_folder(corpus.run_metrics, cfg, "train")
