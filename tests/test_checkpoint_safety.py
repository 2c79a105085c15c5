"""Crafted checkpoints and bundles naming a callable are refused, and nothing they name runs (issue 11).

A checkpoint or bundle may only name a registered task and architecture. The crafted files below name
callables of a module written to a temporary folder on ``sys.path``: importing it, calling any of its
functions or reading an attribute it lacks writes a marker file. Each loader (``interpzoo.load_checkpoint``,
``interpzoo.load_pretrained``, ``interpzoo.run.module_from_source``, ``python eval.py ckpt_path=...``) runs in
a subprocess, so the test sees exactly which modules it imported; none of them may import or call anything a
file names, and each refusal must say which file and which name it refused. The shipped bundles and
checkpoints written by interpzoo 0.1 (a class path under ``models.``) keep loading.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
EVIL = "izoo_evil"

EVIL_MODULE = '''
"""Every way in writes a marker file next to the folder this module lives in."""
from pathlib import Path

MARKS = Path(__file__).resolve().parents[{up}] / "marks"


def _mark(what):
    MARKS.mkdir(exist_ok=True)
    (MARKS / what).write_text(what)


_mark("imported-" + __name__)


def write_file(*args, **kwargs):
    _mark("called-" + __name__ + ".write_file")


class Evil:
    def __init__(self, *args, **kwargs):
        _mark("called-" + __name__ + ".Evil")


def __getattr__(name):
    _mark("getattr-" + __name__ + "." + name)
    raise AttributeError(name)
'''

# ``python -c`` driver: runs each loader on each file, recording per step the error and whatever of the
# crafted modules got imported or wrote a marker.
DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
marks = Path(sys.argv[2])
cases = json.loads(sys.argv[3])
evil = sys.argv[4]

def loader(name):
    import interpzoo
    if name == "load_checkpoint":
        return interpzoo.load_checkpoint
    if name == "load_checkpoint_lightning":
        return lambda p: interpzoo.load_checkpoint(p, lightning_module=True)
    if name == "load_pretrained":
        return interpzoo.load_pretrained
    if name == "module_from_source":
        from interpzoo.run import module_from_source
        return module_from_source
    raise ValueError(name)

def ours():
    return {m for m in sys.modules if m.split(".")[0] in (evil, "models")}

results = {}
for key, (name, path) in cases.items():
    fn = loader(name)
    seen, marked = ours(), {p.name for p in marks.glob("*")}
    try:
        obj = fn(path)
        out = {"error": None, "loaded": type(obj).__name__}
    except Exception as e:
        out = {"error": type(e).__name__, "message": str(e)}
    out["imported"] = sorted(ours() - seen)
    out["marks"] = sorted({p.name for p in marks.glob("*")} - marked)
    results[key] = out
print("RESULTS " + json.dumps(results))
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _ckpt(path: Path, info: dict, hparams: dict) -> Path:
    torch.save({"interpzoo": info, "hyper_parameters": hparams, "state_dict": {}}, path)
    return path


def _bundle(path: Path, config: dict, weights_from: Path | None = None) -> Path:
    path.mkdir(parents=True)
    if weights_from is not None:
        shutil.copy2(weights_from / "model.safetensors", path / "model.safetensors")
    else:
        save_file({"w": torch.zeros(1)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


class Crafted:
    """The crafted files of one test session, written once into a temporary folder."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.evil_dir = base / "evil"
        self.marks = base / "marks"
        self.marks.mkdir()
        _write(self.evil_dir / f"{EVIL}.py", EVIL_MODULE.format(up=1))
        # a generic ``models`` package of another distribution: interpzoo 0.1 trusted any ``models.*`` path
        _write(self.evil_dir / "models" / "__init__.py", EVIL_MODULE.format(up=2))
        _write(self.evil_dir / "models" / "evil.py", EVIL_MODULE.format(up=2))
        marker = str(self.marks / "called-by-a-standard-callable")
        c = base / "files"
        c.mkdir()
        shipped = ROOT / "models" / "pretrained" / "senn_mlp.breast_cancer_s0"
        shipped_cfg = json.loads((shipped / "config.json").read_text())
        # name -> (path, the name the file gives, kind)
        self.files: dict[str, tuple[Path, str, str]] = {
            "ckpt_module_class_evil_function": (
                _ckpt(c / "a.ckpt", {"module_class": f"{EVIL}.write_file", "architecture": "senn"}, {"x": 1}),
                f"{EVIL}.write_file",
                "ckpt",
            ),
            "ckpt_task_evil_class": (
                _ckpt(c / "b.ckpt", {"task": f"{EVIL}.Evil", "architecture": f"{EVIL}.Evil"}, {"x": 1}),
                f"{EVIL}.Evil",
                "ckpt",
            ),
            "ckpt_legacy_prefix_models_dot": (
                _ckpt(c / "c.ckpt", {"module_class": "models.evil.Evil", "architecture": "senn"}, {"x": 1}),
                "models.evil.Evil",
                "ckpt",
            ),
            "ckpt_task_os_system": (
                _ckpt(c / "d.ckpt", {"task": "os.system"}, {"command": f"touch {marker}"}),
                "os.system",
                "ckpt",
            ),
            "ckpt_module_class_project_file_writer": (
                _ckpt(
                    c / "e.ckpt",
                    {"module_class": "interpzoo.io.write_json"},
                    {"path": marker, "data": {"owned": True}},
                ),
                "interpzoo.io.write_json",
                "ckpt",
            ),
            "bundle_unregistered_arch_subprocess_call": (
                _bundle(
                    c / "bundle_a",
                    {
                        "format_version": 1,
                        "architecture": f"{EVIL}.Evil",
                        "model_args": {"x": 1},
                        "lightning": {
                            "module_class": "subprocess.call",
                            "hparams": {"args": ["touch", marker]},
                        },
                    },
                ),
                "subprocess.call",
                "bundle",
            ),
            "bundle_unregistered_arch_builtins_exec": (
                _bundle(
                    c / "bundle_b",
                    {
                        "format_version": 1,
                        "architecture": "models.evil.Evil",
                        "model_args": {},
                        "lightning": {
                            "task": "builtins.exec",
                            "hparams": {"source": f"open({marker!r}, 'w')"},
                        },
                    },
                ),
                "builtins.exec",
                "bundle",
            ),
            # a real network and weights, with a crafted Lightning entry
            "bundle_registered_arch_evil_task": (
                _bundle(
                    c / "bundle_c",
                    {**shipped_cfg, "lightning": {"task": f"{EVIL}.Evil", "hparams": {"x": 1}}},
                    weights_from=shipped,
                ),
                f"{EVIL}.Evil",
                "bundle_ok_net",
            ),
            "bundle_registered_arch_project_file_writer": (
                _bundle(
                    c / "bundle_d",
                    {
                        **shipped_cfg,
                        "lightning": {
                            "module_class": "interpzoo.io.write_json",
                            "hparams": {"path": marker, "data": {}},
                        },
                    },
                    weights_from=shipped,
                ),
                "interpzoo.io.write_json",
                "bundle_ok_net",
            ),
        }

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(WANDB_MODE="offline", WANDB_SILENT="true", **extra)
        return env


LOADERS = {
    "ckpt": ["load_checkpoint", "load_checkpoint_lightning", "module_from_source", "load_pretrained"],
    "bundle": ["load_pretrained", "module_from_source", "load_checkpoint"],
    "bundle_ok_net": ["module_from_source", "load_checkpoint_lightning"],
}
FILE_KINDS = {
    "ckpt_module_class_evil_function": "ckpt",
    "ckpt_task_evil_class": "ckpt",
    "ckpt_legacy_prefix_models_dot": "ckpt",
    "ckpt_task_os_system": "ckpt",
    "ckpt_module_class_project_file_writer": "ckpt",
    "bundle_unregistered_arch_subprocess_call": "bundle",
    "bundle_unregistered_arch_builtins_exec": "bundle",
    "bundle_registered_arch_evil_task": "bundle_ok_net",
    "bundle_registered_arch_project_file_writer": "bundle_ok_net",
}
CASES = [(f, loader) for f, kind in FILE_KINDS.items() for loader in LOADERS[kind]]


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Crafted:
    made = Crafted(tmp_path_factory.mktemp("crafted"))
    assert {k: v[2] for k, v in made.files.items()} == FILE_KINDS
    return made


@pytest.fixture(scope="module")
def api_results(crafted: Crafted) -> dict[str, dict]:
    """Every (file, loader) case, in one subprocess that never had the crafted modules imported."""
    cases = {f"{f}|{loader}": (loader, str(crafted.files[f][0])) for f, loader in CASES}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(crafted.evil_dir), str(crafted.marks), json.dumps(cases), EVIL],
        cwd=crafted.base,
        env=crafted.env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"driver failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("RESULTS "))


def test_the_bait_works(tmp_path: Path) -> None:
    """Importing or calling the crafted targets does write markers: their absence below means something."""
    crafted = Crafted(tmp_path)
    code = f"import {EVIL}, models.evil; {EVIL}.write_file(); models.evil.Evil(); {EVIL}.missing_attr"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=crafted.env(PYTHONPATH=str(crafted.evil_dir)),
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "AttributeError" in proc.stderr
    made = {p.name for p in crafted.marks.iterdir()}
    assert {f"imported-{EVIL}", "imported-models.evil", f"called-{EVIL}.write_file"} <= made
    assert {"called-models.evil.Evil", f"getattr-{EVIL}.missing_attr"} <= made


@pytest.mark.parametrize(("name", "loader"), CASES, ids=[f"{f}-{loader}" for f, loader in CASES])
def test_crafted_file_is_refused_and_runs_nothing(
    crafted: Crafted, api_results: dict[str, dict], name: str, loader: str
) -> None:
    path, named, kind = crafted.files[name]
    res = api_results[f"{name}|{loader}"]
    assert res["imported"] == [], f"{loader} imported {res['imported']} named by {path}"
    assert res["marks"] == [], f"{loader} ran code named by {path}: {res['marks']}"
    assert res["error"] is not None, f"{loader} accepted {path} and built a {res.get('loaded')}"
    msg = res["message"]
    if kind == "ckpt" and loader == "load_pretrained":
        assert res["error"] == "BundleError" and "load_checkpoint" in msg and str(path) in msg, res
    elif kind != "ckpt" and loader == "load_pretrained":
        # the architecture is checked against the registry before anything else
        assert res["error"] == "KeyError" and "unknown architecture" in msg, res
        assert json.loads((path / "config.json").read_text())["architecture"] in msg, res
    elif kind != "ckpt" and loader.startswith("load_checkpoint"):
        assert res["error"] == "CheckpointError" and str(path) in msg, res
    else:
        assert res["error"] == "CheckpointError", res
        assert repr(named) in msg and "registered task" in msg, res
        assert str(path) in msg, f"the error does not name the refused file: {msg}"
    assert not crafted.marks.exists() or not any(crafted.marks.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ckpt_module_class_evil_function", "bundle_registered_arch_evil_task"])
def test_eval_cli_refuses_crafted_file(crafted: Crafted, name: str, tmp_path: Path) -> None:
    path, named, _ = crafted.files[name]
    data = (
        ["data=breast_cancer"] if "bundle" in name else ["data.n_train=64", "data.n_val=32", "data.n_test=32"]
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            f"ckpt_path={path}",
            "debug=fdr",
            *data,
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        # the crafted modules are importable by the CLI: if anything imported them, a marker would say so
        env=crafted.env(PYTHONPATH=str(crafted.evil_dir)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert "no key 'ckpt_path'" not in out, "issue 12 is back: the pre-flight rejects ckpt_path=..."
    assert proc.returncode != 0, out[-4000:]
    assert repr(named) in out and "registered task" in out, out[-4000:]
    assert not crafted.marks.exists() or not any(crafted.marks.iterdir()), sorted(crafted.marks.iterdir())
    assert not (tmp_path / "run" / "metrics.json").exists()


# -- what must keep loading ---------------------------------------------------------------------------------


def test_shipped_bundles_record_task_names_and_load() -> None:
    import interpzoo
    from interpzoo.models.registry import list_tasks, task_class
    from interpzoo.run import module_from_source

    names = interpzoo.list_pretrained()
    assert len(names) >= 10
    for name in names:
        folder = ROOT / "models" / "pretrained" / name
        config = json.loads((folder / "config.json").read_text())
        lit = config["lightning"]
        assert "module_class" not in lit and lit["task"] in list_tasks(), (name, lit)
        net = interpzoo.load_pretrained(name)
        assert not net.training and net.bundle_config["architecture"] == config["architecture"]
        module = module_from_source(str(folder))
        assert type(module) is task_class(lit["task"])
        own = module.net.state_dict()
        for k, v in net.state_dict().items():  # NaN buffers (CBM's unset logit percentiles) equal NaN
            torch.testing.assert_close(own[k], v, rtol=0, atol=0, equal_nan=True, msg=f"{name}: {k}")


def test_legacy_class_path_checkpoint_maps_to_its_task(tmp_path: Path) -> None:
    import interpzoo
    from interpzoo.models.lit_base import ClassificationModule
    from interpzoo.models.registry import _LEGACY_TASKS, _TASKS, resolve_task
    from interpzoo.run import module_from_source

    assert set(_LEGACY_TASKS.values()) <= set(_TASKS)
    assert resolve_task({"module_class": "models.lit_base.ClassificationModule"}) == "classification"
    with pytest.raises(KeyError, match="registered task"):
        resolve_task({"module_class": "models.lit_base.Anything"})

    torch.manual_seed(0)
    module = ClassificationModule(
        net={"name": "baseline_mlp"}, data_info={"num_classes": 3, "num_features": 5}
    )
    # interpzoo 0.1 recorded the network as arch/model_args/backbone keywords (upgraded to net= on load)
    old_hparams = {k: v for k, v in module.hparams.items() if k != "net"}
    old_hparams.update(arch="baseline_mlp", model_args={}, backbone={"name": "resnet18s", "width": 16})
    path = tmp_path / "legacy.ckpt"
    torch.save(
        {
            "interpzoo": {
                "module_class": "models.lit_base.ClassificationModule",
                "architecture": "baseline_mlp",
            },
            "hyper_parameters": old_hparams,
            "state_dict": module.state_dict(),
        },
        path,
    )
    net = interpzoo.load_checkpoint(path)
    x = torch.randn(4, 5)
    module.eval()
    with torch.no_grad():
        assert torch.equal(net(x).logits, module.net(x).logits)
    assert type(interpzoo.load_checkpoint(path, lightning_module=True)) is ClassificationModule
    assert type(module_from_source(str(path))) is ClassificationModule


def test_driver_sees_an_import(tmp_path: Path) -> None:
    """The subprocess driver reports imports and markers (so an empty report is evidence)."""
    crafted = Crafted(tmp_path)
    bait = tmp_path / "bait.ckpt"
    _ckpt(bait, {"task": "classification"}, {"net": {"name": "baseline_mlp"}})
    driver = DRIVER.replace("obj = fn(path)", f"__import__({EVIL!r}); obj = fn(path)")
    assert driver != DRIVER
    cases = {"bait": ("load_checkpoint", str(bait))}
    proc = subprocess.run(
        [sys.executable, "-c", driver, str(crafted.evil_dir), str(crafted.marks), json.dumps(cases), EVIL],
        cwd=tmp_path,
        env=crafted.env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.splitlines()[-1].removeprefix("RESULTS "))["bait"]
    assert res["imported"] == [EVIL] and res["marks"] == [f"imported-{EVIL}"], res
