"""The one `interpzoo` namespace as a user installs it (issue 11, "Must show").

A wheel built from the checkout holds exactly one top-level import name; installed into a fresh venv that
cannot see the checkout, its console script runs a ``fast_dev_run`` from a temporary directory and a shipped
bundle loads; a second distribution shipping ``models``, ``layers`` and ``train`` installs beside it and
uninstalls without touching our files. Importing ``interpzoo`` stays light, and plain ``pytest`` works
from the checkout root.

The fresh venv gets the dependencies without downloading anything: a ``.pth`` file points it at a folder of
links to the test venv's installed packages, leaving out ``interpzoo`` itself (its editable finder and its
``dist-info``, which pip would otherwise see as an installed ``interpzoo``) and pip. ``.pth`` files inside
that folder are not executed, so the checkout stays invisible; the tests assert it. No step touches the
network (``--no-index``, no build isolation).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = ["data.n_train=64", "data.n_val=32", "data.n_test=32"]
BUNDLE = "senn_mlp.breast_cancer_s0"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        PYTHONNOUSERSITE="1",
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        HYDRA_FULL_ERROR="1",
    )
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout
    )


def _report(proc: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{' '.join(map(str, proc.args))}\nexit {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-4000:]}"
        f"\n--- stderr (tail)\n{proc.stderr[-4000:]}"
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, _report(proc)
    return proc


def _build_wheel(src: Path, dist: Path) -> Path:
    """``pip wheel`` of a source folder, offline, with the running interpreter's setuptools."""
    _ok(
        _run(
            [
                PY,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "-q",
                "-w",
                dist,
                src,
            ],
            cwd=src.parent,
        )
    )
    (whl,) = dist.glob("*.whl")
    return whl


def _copy_sources(dest: Path) -> Path:
    """The files a wheel is built from, copied out of the checkout.

    Building in the checkout would write ``build/`` there, and a stale ``build/lib`` (a module moved by
    a refactor) would end up in the wheel; a copy of the package-dir folders avoids both.
    """
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", pyproject["project"].get("readme", "README.md"), "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    for folder in set(pyproject["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    return dest


def _site_packages(python: str | Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(_ok(_run([python, "-c", code], cwd=Path(python).parent)).stdout.strip())


def _record(site: Path, dist: str) -> dict[str, tuple[str, str | None]]:
    """``{path in RECORD: (recorded digest, digest of the file now or None if it is gone)}``."""
    (record,) = site.glob(f"{dist}-*.dist-info/RECORD")
    out = {}
    for row in csv.reader(record.read_text().splitlines()):
        rel, digest = row[0], row[1]
        path = Path(os.path.normpath(site / rel))
        now = None
        if path.is_file():
            raw = hashlib.sha256(path.read_bytes()).digest()
            now = "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        out[rel] = (digest, now)
    return out


def _assert_record_intact(state: dict[str, tuple[str, str | None]]) -> None:
    gone = [rel for rel, (_, now) in state.items() if now is None]
    changed = [rel for rel, (want, now) in state.items() if want and now is not None and now != want]
    assert not gone and not changed, f"files of interpzoo removed: {gone[:10]}; changed: {changed[:10]}"


@dataclass
class FreshVenv:
    root: Path
    python: Path
    bin: Path
    site: Path

    def run(self, cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return _run(cmd, cwd=cwd, **env)

    def py(self, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return _run([self.python, "-c", textwrap.dedent(code)], cwd=cwd)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    return _build_wheel(_copy_sources(work / "src"), work / "dist")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> FreshVenv:
    root = tmp_path_factory.mktemp("fresh")
    _ok(_run([PY, "-m", "venv", root / "venv"], cwd=root))
    bindir = root / "venv" / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    site = _site_packages(python)
    # the test venv's packages, less interpzoo (editable finder, .pth files, dist-info) and pip
    deps = root / "deps"
    deps.mkdir()
    ours = {Path(p) for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}}
    for sp in ours:
        for entry in sp.iterdir():
            name = entry.name.lower()
            skip = name.startswith(("interpzoo", "__editable__", "pip-")) or name in ("pip", "__pycache__")
            if skip or name.endswith(".pth") or (deps / entry.name).exists():
                continue
            (deps / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (site / "_interpzoo_test_deps.pth").write_text(f"{deps}\n")
    _ok(_run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=root))
    return FreshVenv(root=root, python=python, bin=bindir, site=site)


@pytest.fixture(scope="module")
def fdr_run(venv: FreshVenv, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """``interpzoo-train debug=fdr`` (fast_dev_run) from an empty temporary directory, bundle exported."""
    base = tmp_path_factory.mktemp("fdr")
    cwd, run_dir = base / "cwd", base / "run"
    cwd.mkdir()
    cmd = [
        venv.bin / "interpzoo-train",
        "debug=fdr",
        *TINY,
        "export=true",  # debug presets turn the export off; the eval test below needs the bundle
        f"paths.data_dir={base / 'data'}",
        f"paths.log_dir={base / 'logs'}",
        f"hydra.run.dir={run_dir}",
    ]
    return venv.run(cmd, cwd=cwd), cwd, run_dir, base


# -- the wheel --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wheel_installs_one_top_level_name_and_ships_configs_and_bundles(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().splitlines() == ["interpzoo"]
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"interpzoo"}, f"top-level entries besides interpzoo: {sorted(tops - {'interpzoo'})}"
    for leak in ("models/", "layers/", "metrics/", "datamodules/", "benchmarks/", "tests/", "conf/"):
        assert not any(n.startswith(leak) for n in names), leak
    assert not {"train.py", "eval.py", "hubconf.py"} & set(names)
    assert "interpzoo/conf/train.yaml" in names and "interpzoo/conf/eval.yaml" in names
    model_cfgs = {
        Path(n).name for n in names if n.startswith("interpzoo/conf/model/") and n.endswith(".yaml")
    }
    assert model_cfgs == {p.name for p in (ROOT / "conf" / "model").glob("*.yaml")}
    # every module and config of the checkout ships (pyproject lists packages and data globs by hand)
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for pkg, folder in package_dir.items():
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".yaml") or "__pycache__" in path.parts:
                continue
            shipped = "/".join([*pkg.split("."), *path.relative_to(ROOT / folder).parts])
            assert shipped in names, f"{path.relative_to(ROOT)} is not in the wheel (as {shipped})"
    bundles = sorted(p.name for p in (ROOT / "models" / "pretrained").iterdir() if p.is_dir())
    assert BUNDLE in bundles
    for b in bundles:
        for f in ("config.json", "model.safetensors"):
            assert f"interpzoo/models/pretrained/{b}/{f}" in names, f"bundle file missing from wheel: {b}/{f}"
    for sub in ("layers", "models", "metrics", "datamodules", "reports", "conf"):
        assert f"interpzoo/{sub}/__init__.py" in names, sub


# -- a fresh venv with the wheel --------------------------------------------------------------------


@pytest.mark.slow
def test_fresh_venv_imports_the_wheel_not_the_checkout(venv: FreshVenv, tmp_path: Path) -> None:
    out = _ok(
        venv.py(
            """
            import importlib.util, json
            import interpzoo, interpzoo.conf, interpzoo.layers, interpzoo.models
            from interpzoo.models.registry import PRETRAINED_DIR
            print(json.dumps({
                "files": [interpzoo.__file__, interpzoo.models.__file__, interpzoo.layers.__file__,
                          interpzoo.conf.__file__, str(PRETRAINED_DIR)],
                "top": {n: importlib.util.find_spec(n) is not None
                        for n in ("models", "layers", "metrics", "datamodules", "train", "eval", "benchmarks")},
                "pretrained": interpzoo.list_pretrained(),
            }))
            """,
            cwd=tmp_path,
        )
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    for f in info["files"]:
        assert Path(f).resolve().is_relative_to(venv.site.resolve()), f"{f} is not from the installed wheel"
        assert not Path(f).resolve().is_relative_to(ROOT), f"{f} comes from the checkout"
    assert not any(info["top"].values()), f"generic top-level names importable: {info['top']}"
    assert BUNDLE in info["pretrained"]


@pytest.mark.slow
def test_console_script_fast_dev_run_from_a_temporary_directory(fdr_run: tuple) -> None:
    from omegaconf import OmegaConf

    proc, cwd, run_dir, _ = fdr_run
    _ok(proc)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "test/acc" in metrics and 0.0 <= metrics["test/acc"] <= 1.0, metrics
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.trainer.fast_dev_run is True and cfg.data.n_train == 64
    assert str(cfg.model._target_).startswith("interpzoo.")
    assert (run_dir / "bundle" / "config.json").is_file() and (
        run_dir / "bundle" / "model.safetensors"
    ).is_file()
    assert json.loads((run_dir / "bundle" / "config.json").read_text())["lightning"]["task"]
    assert list(cwd.iterdir()) == [], "the run wrote into the directory it was started from"


@pytest.mark.slow
def test_load_pretrained_of_a_shipped_bundle_in_the_fresh_venv(venv: FreshVenv, tmp_path: Path) -> None:
    out = _ok(
        venv.py(
            f"""
            import json, torch, interpzoo
            net = interpzoo.load_pretrained({BUNDLE!r})
            x = torch.rand(4, len(net.data_config["feature_names"]))
            with torch.no_grad():
                logits = net(x).logits
            print(json.dumps({{"shape": list(logits.shape), "finite": bool(torch.isfinite(logits).all()),
                               "classes": net.data_config["class_names"], "training": net.training}}))
            """,
            cwd=tmp_path,
        )
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["shape"] == [4, len(info["classes"])] and info["finite"] and not info["training"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_console_eval_on_the_exported_bundle(venv: FreshVenv, fdr_run: tuple) -> None:
    train, cwd, run_dir, base = fdr_run
    _ok(train)
    eval_dir = base / "eval"
    proc = venv.run(
        [
            venv.bin / "interpzoo-eval",
            f"ckpt_path={run_dir / 'bundle'}",
            "debug=fdr",
            *TINY,
            f"paths.data_dir={base / 'data'}",
            f"paths.log_dir={base / 'logs'}",
            f"hydra.run.dir={eval_dir}",
        ],
        cwd=cwd,
    )
    assert "no key 'ckpt_path'" not in proc.stderr, "issue 12 is back: the pre-flight rejects ckpt_path=..."
    _ok(proc)
    # fast_dev_run kept no best checkpoint, so the bundle holds the weights the train run tested
    trained = json.loads((run_dir / "metrics.json").read_text())
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    assert evaluated["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_a_second_distribution_shipping_models_layers_and_train_leaves_ours_untouched(
    venv: FreshVenv, tmp_path: Path
) -> None:
    toy = tmp_path / "toy"
    for rel, text in {
        "pyproject.toml": """
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "toy"
            version = "0.1"
            [project.scripts]
            toy-train = "train:main"
            [tool.setuptools]
            packages = ["models", "layers"]
            py-modules = ["train"]
            """,
        "models/__init__.py": "WHO = 'toy'\ndef list_models():\n    return ['toy']\n",
        "layers/__init__.py": "WHO = 'toy'\n",
        "train.py": "def main():\n    print('toy train')\n",
    }.items():
        (toy / rel).parent.mkdir(parents=True, exist_ok=True)
        (toy / rel).write_text(textwrap.dedent(text))
    toy_wheel = _build_wheel(toy, tmp_path / "dist")
    before = _record(venv.site, "interpzoo")
    _assert_record_intact(before)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    check = """
        import json, interpzoo, interpzoo.layers, interpzoo.models
        out = {"models": interpzoo.models.__file__, "layers": interpzoo.layers.__file__,
               "n_models": len(interpzoo.list_models()), "senn": "senn_mlp" in interpzoo.list_models()}
        try:
            import models, train
            out["toy"] = [models.WHO, train.__file__]
        except ImportError:
            out["toy"] = None
        print(json.dumps(out))
        """
    ours = [str(venv.site / "interpzoo" / sub / "__init__.py") for sub in ("models", "layers")]

    _ok(venv.run([venv.python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", toy_wheel], cwd=cwd))
    info = json.loads(_ok(venv.py(check, cwd=cwd)).stdout.strip().splitlines()[-1])
    assert info["toy"] and info["toy"][0] == "toy", (
        "the toy distribution is not installed: the test proves nothing"
    )
    assert [info["models"], info["layers"]] == ours and info["senn"] and info["n_models"] > 10
    assert _record(venv.site, "interpzoo") == before
    script = _ok(venv.run([venv.bin / "interpzoo-train", "--cfg", "job", "debug=fdr"], cwd=cwd))
    assert "_target_: interpzoo." in script.stdout and "toy train" not in script.stdout
    assert _ok(venv.run([venv.bin / "toy-train"], cwd=cwd)).stdout.strip() == "toy train"

    _ok(venv.run([venv.python, "-m", "pip", "uninstall", "-y", "-q", "toy"], cwd=cwd))
    after = _record(venv.site, "interpzoo")
    assert after == before
    _assert_record_intact(after)
    info = json.loads(_ok(venv.py(check, cwd=cwd)).stdout.strip().splitlines()[-1])
    assert info["toy"] is None and [info["models"], info["layers"]] == ours and info["senn"]
    assert list(cwd.iterdir()) == []


# -- from the checkout ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    ["import interpzoo; interpzoo.list_models(); interpzoo.list_pretrained()", "import interpzoo.layers"],
    ids=["interpzoo", "layers"],
)
def test_import_is_light(code: str, tmp_path: Path) -> None:
    """Issue 11's check: neither Lightning nor matplotlib is imported (so no backend is switched)."""
    # a meta-path hook records which of our files first imported each heavy module, for the failure message
    check = textwrap.dedent(
        f"""
        import sys, traceback
        HEAVY = ("pytorch_lightning", "lightning", "matplotlib")
        who = {{}}
        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name in HEAVY and name not in who:
                    frames = [f for f in traceback.extract_stack()
                              if f.filename.startswith({str(ROOT)!r}) or "interpzoo" in f.filename]
                    who[name] = [f"{{f.filename}}:{{f.lineno}}" for f in frames][-3:]
                return None
        sys.meta_path.insert(0, Spy())
        {code}
        heavy = {{m: who.get(m) for m in HEAVY if m in sys.modules}}
        assert not heavy, f"imported: {{heavy}}"
        print("light")
        """
    )
    proc = _run([PY, "-c", check], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "light", _report(proc)


def test_plain_pytest_works_from_the_checkout_root(tmp_path: Path) -> None:
    exe = Path(PY).with_name("pytest.exe" if os.name == "nt" else "pytest")
    assert exe.is_file(), f"no pytest script next to {PY}"
    proc = _run(
        [
            exe,
            "tests/test_registry_and_bundles.py",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-k",
            "test_registry_names_and_did_you_mean",
        ],
        cwd=ROOT,
    )
    assert proc.returncode == 0 and "1 passed" in proc.stdout, _report(proc)
