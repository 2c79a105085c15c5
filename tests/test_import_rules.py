"""The rooms' import contracts (issue 11), checked by parsing every file's imports with ``ast``.

Every ``import``/``from ... import`` counts, at module level or inside a function, and so does
``importlib.import_module("...")``/``__import__("...")`` with a literal name; relative imports are resolved
against the file's place in the ``interpzoo`` namespace (pyproject's package-dir mapping). Imports under
``if TYPE_CHECKING:`` count as dependencies but are not executed, so they do not break "not at module level"
rules. Each contract is one test; a failure lists ``file:line`` and the rule for every violation.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
OLD_NAMES = ("models", "layers", "metrics", "datamodules", "benchmarks", "conf")
FRAMEWORK = ("interpzoo.run", "interpzoo.cli", "interpzoo.api", "interpzoo.preflight", "interpzoo.reports")
LIGHTNING = ("pytorch_lightning", "lightning")


@cache
def package_dirs() -> dict[str, Path]:
    """``{package: folder}`` from pyproject's ``[tool.setuptools.package-dir]``."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {pkg: ROOT / folder for pkg, folder in mapping.items()}


@cache
def package_modules() -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of the package, longest mapping wins."""
    dirs = sorted(package_dirs().items(), key=lambda kv: len(kv[1].parts), reverse=True)
    out: dict[str, Path] = {}
    for pkg, folder in package_dirs().items():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            owner, base = next((p, d) for p, d in dirs if path.is_relative_to(d))
            if owner != pkg:
                continue
            parts = [*owner.split("."), *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def is_under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def is_project(module: str) -> bool:
    return is_under(module, "interpzoo", *OLD_NAMES)


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str  # what the statement names: ``a.b`` of ``import a.b`` / ``from a.b import c``
    targets: tuple[str, ...]  # the modules it loads: ``a.b``, plus ``a.b.c`` when ``c`` is a module of ours
    module_level: bool  # executed at import time (not inside a function)
    type_only: bool  # under ``if TYPE_CHECKING:``

    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}"


class _Collector(ast.NodeVisitor):
    def __init__(self, path: Path, package: str) -> None:
        self.path, self.package = path, package
        self.imports: list[Import] = []
        self.backend_calls: list[tuple[int, str]] = []
        self.aliases: dict[str, str] = {}  # local name -> module or module attribute it is bound to
        self._depth = 0
        self._type_only = 0

    # -- scopes --
    def _scoped(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scoped

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            self._type_only += 1
            for child in node.body:
                self.visit(child)
            self._type_only -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    # -- imports --
    def _add(self, line: int, module: str, names: tuple[str, ...] = ()) -> None:
        targets = [module]
        for name in names:
            sub = f"{module}.{name}"
            if sub in package_modules() or not is_project(module):
                targets.append(sub)
        self.imports.append(
            Import(self.path, line, module, tuple(targets), self._depth == 0, self._type_only > 0)
        )

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node.lineno, alias.name)
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                head = alias.name.split(".")[0]
                self.aliases[head] = head

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            module = ".".join([*base, *([module] if module else [])])
        names = tuple(a.name for a in node.names if a.name != "*")
        self._add(node.lineno, module, names)
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = f"{module}.{alias.name}"

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = self._dotted(func)
        if name in ("importlib.import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
                self._add(node.lineno, arg.value)
        if name in (
            "matplotlib.use",
            "matplotlib.pyplot.switch_backend",
            "matplotlib.rcsetup.validate_backend",
        ):
            self.backend_calls.append((node.lineno, name))
        self.generic_visit(node)

    def _dotted(self, node: ast.AST) -> str:
        """The full dotted name of a called expression, with import aliases expanded."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return ""
        head = self.aliases.get(node.id, node.id)
        return ".".join([head, *reversed(parts)])


@cache
def _parse(path: Path, package: str) -> _Collector:
    collector = _Collector(path, package)
    collector.visit(ast.parse(path.read_text(), filename=str(path)))
    return collector


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def parsed(path: Path) -> _Collector:
    """Imports of a package file (relative imports resolved) or of a checkout script/test."""
    by_path = {p: m for m, p in package_modules().items()}
    module = by_path.get(path)
    return _parse(path, _package_of(module, path) if module else "")


def room(package: str) -> list[Path]:
    return [p for m, p in package_modules().items() if is_under(m, package)]


def package_files() -> list[Path]:
    return list(package_modules().values())


def network_files() -> list[Path]:
    return [
        p
        for p in room("interpzoo.models")
        if p.parent == package_dirs()["interpzoo.models"] and not p.name.startswith("lit_")
    ]


def lit_files() -> list[Path]:
    return [p for p in room("interpzoo.models") if p.name.startswith("lit_")]


def checkout_scripts() -> list[Path]:
    """Files of the checkout that are not installed but must use the new names too."""
    files = [ROOT / n for n in ("train.py", "eval.py", "hubconf.py") if (ROOT / n).is_file()]
    for folder in ("tests", "benchmarks"):
        files += sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def notebook_imports() -> Iterator[tuple[str, int, str]]:
    """``(notebook:cell, line, module)`` for the imports of every notebook code cell (magics skipped)."""
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        for i, cell in enumerate(cells):
            if cell.get("cell_type") != "code":
                continue
            src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            src = "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in src.splitlines())
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, ast.Import):
                    yield from ((f"{rel(nb)}[cell {i}]", node.lineno, a.name) for a in node.names)
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    yield f"{rel(nb)}[cell {i}]", node.lineno, node.module or ""


# -- the contracts -------------------------------------------------------------------------------------


def _forbidden(files: Callable[[], list[Path]], rule: str, bad: Callable[[Import, str], bool]) -> list[str]:
    out = []
    for path in files():
        for imp in parsed(path).imports:
            hits = sorted({t for t in imp.targets if bad(imp, t)})
            if hits:
                out.append(f"{imp.where()}: {rule}: imports {', '.join(hits)}")
    return out


def rule_layers_are_pure_torch() -> list[str]:
    return _forbidden(
        lambda: room("interpzoo.layers"),
        "layers/ imports nothing of the project but interpzoo.layers",
        lambda imp, t: is_project(t) and not is_under(t, "interpzoo.layers"),
    )


def rule_metrics_import_no_models_data_or_framework() -> list[str]:
    banned = ("interpzoo.models", "interpzoo.datamodules", *FRAMEWORK, *LIGHTNING)
    return _forbidden(
        lambda: room("interpzoo.metrics"),
        "metrics/ imports no models, data, reports, framework modules or Lightning",
        lambda imp, t: is_under(t, *banned),
    )


def rule_datamodules_import_no_models_metrics_or_reports() -> list[str]:
    return _forbidden(
        lambda: room("interpzoo.datamodules"),
        "datamodules/ imports no models, metrics or reports",
        lambda imp, t: is_under(t, "interpzoo.models", "interpzoo.metrics", "interpzoo.reports"),
    )


def rule_networks_import_no_training_stack() -> list[str]:
    out = _forbidden(
        network_files,
        "network files (models/*.py but lit_*) import no Lightning, torchmetrics or interpzoo.metrics",
        lambda imp, t: is_under(t, *LIGHTNING, "torchmetrics", "interpzoo.metrics"),
    )
    return out + _forbidden(
        network_files,
        "network files import matplotlib only inside functions (e.g. plot())",
        lambda imp, t: is_under(t, "matplotlib") and imp.module_level and not imp.type_only,
    )


def rule_networks_import_no_framework() -> list[str]:
    return _forbidden(
        network_files,
        "network files (models/*.py but lit_*) import no framework module (run, cli, api, preflight, reports)",
        lambda imp, t: is_under(t, *FRAMEWORK),
    )


def rule_lightning_modules_import_no_framework() -> list[str]:
    return _forbidden(
        lit_files,
        "models/lit_*.py import no framework module (run, cli, api, preflight, reports)",
        lambda imp, t: is_under(t, *FRAMEWORK),
    )


def rule_models_init_loads_no_lightning_module() -> list[str]:
    """``import interpzoo.models`` reaches no ``lit_*`` module, directly or through the files it imports."""
    modules = package_modules()
    start = "interpzoo.models"
    chains: dict[str, list[str]] = {start: []}
    queue = [start]
    out = []
    while queue:
        current = queue.pop(0)
        for imp in parsed(modules[current]).imports:
            if not imp.module_level or imp.type_only:
                continue
            for t in imp.targets:
                # importing a.b.c runs a/__init__ and a/b/__init__ first
                parts = t.split(".")
                for k in range(1, len(parts) + 1):
                    m = ".".join(parts[:k])
                    if m not in modules or m in chains:
                        continue
                    chains[m] = [*chains[current], imp.where()]
                    if m.rpartition(".")[2].startswith("lit_"):
                        out.append(
                            f"{' -> '.join(chains[m])}: models/__init__.py loads no lit_* module "
                            f"(directly or through a network file): loads {m}"
                        )
                    else:
                        queue.append(m)
    return out


def rule_nothing_switches_the_matplotlib_backend() -> list[str]:
    return [
        f"{rel(p)}:{line}: nothing in the package calls matplotlib.use (or switches the backend): {name}()"
        for p in package_files()
        for line, name in parsed(p).backend_calls
    ]


def rule_no_old_top_level_names() -> list[str]:
    out = _forbidden(
        package_files,
        "the package imports only interpzoo.* (no old top-level names)",
        lambda imp, t: is_under(t, *OLD_NAMES, "tests", "train", "eval", "hubconf"),
    )
    old = ("models", "layers", "metrics", "datamodules", "conf")
    out += _forbidden(
        checkout_scripts,
        "scripts, tests and benchmarks import the package as interpzoo.* (no old top-level names)",
        lambda imp, t: is_under(t, *old),
    )
    out += [
        f"{where}:{line}: notebooks import the package as interpzoo.*: imports {m}"
        for where, line, m in notebook_imports()
        if is_under(m, *old)
    ]
    return out


def _top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for tgt in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(tgt) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.If | ast.Try):
            for sub in ast.walk(node):
                if isinstance(sub, ast.FunctionDef | ast.ClassDef):
                    names.add(sub.name)
                elif isinstance(sub, ast.ImportFrom | ast.Import):
                    names |= {(a.asname or a.name).split(".")[0] for a in sub.names}
    return names


def rule_config_targets_name_existing_interpzoo_objects() -> list[str]:
    """``_target_`` values in conf/ use interpzoo.* and name a module and object that exist."""
    modules = package_modules()
    out = []
    for path in sorted(package_dirs()["interpzoo.conf"].rglob("*.yaml")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            m = re.match(r"\s*_target_:\s*['\"]?([\w.]+)", line)
            if not m:
                continue
            target = m.group(1)
            where = f"{rel(path)}:{i}: conf/ _target_ values"
            if is_under(target, *OLD_NAMES):
                out.append(f"{where} use interpzoo.* (no old top-level names): {target}")
            elif is_under(target, "interpzoo"):
                module, _, name = target.rpartition(".")
                if module not in modules:
                    out.append(f"{where} name an existing module: {target} (no module {module})")
                elif name not in _top_level_names(modules[module]):
                    out.append(f"{where} name an existing object: {target} ({module} defines no {name!r})")
    return out


RULES = {
    fn.__name__.removeprefix("rule_"): fn
    for fn in (
        rule_layers_are_pure_torch,
        rule_metrics_import_no_models_data_or_framework,
        rule_datamodules_import_no_models_metrics_or_reports,
        rule_networks_import_no_training_stack,
        rule_networks_import_no_framework,
        rule_lightning_modules_import_no_framework,
        rule_models_init_loads_no_lightning_module,
        rule_nothing_switches_the_matplotlib_backend,
        rule_no_old_top_level_names,
        rule_config_targets_name_existing_interpzoo_objects,
    )
}


@pytest.mark.parametrize("rule", list(RULES))
def test_import_contract(rule: str) -> None:
    violations = RULES[rule]()
    assert not violations, f"{len(violations)} violation(s) of {rule}:\n  " + "\n  ".join(violations)


# -- the checker itself ---------------------------------------------------------------------------------


def test_every_room_is_seen() -> None:
    """The checker parses every package file and finds the rooms' imports (a rule over nothing passes)."""
    modules = package_modules()
    for pkg, folder in package_dirs().items():
        assert pkg in modules, f"{folder} has no __init__.py"
    for pkg in ("interpzoo.layers", "interpzoo.models", "interpzoo.metrics", "interpzoo.datamodules"):
        assert len(room(pkg)) > 2 and any(parsed(p).imports for p in room(pkg)), pkg
    assert network_files() and lit_files()
    assert len(package_files()) == sum(
        1 for d in package_dirs().values() for p in d.rglob("*.py") if "__pycache__" not in p.parts
    )


def test_checker_catches_every_kind_of_import(tmp_path: Path) -> None:
    src = tmp_path / "probe.py"
    src.write_text(
        "from __future__ import annotations\n"
        "import importlib\n"
        "import matplotlib as mpl\n"
        "from typing import TYPE_CHECKING\n"
        "from . import lit_base\n"
        "from ..metrics import protopnet\n"
        "if TYPE_CHECKING:\n"
        "    import pytorch_lightning as pl\n"
        "def f():\n"
        "    from interpzoo.run import train\n"
        "    importlib.import_module('models.senn')\n"
        "    mpl.use('Agg')\n"
    )
    got = _Collector(src, "interpzoo.models")
    got.visit(ast.parse(src.read_text()))
    by_line = {i.line: i for i in got.imports}
    assert "interpzoo.models.lit_base" in by_line[5].targets and by_line[5].module_level
    assert by_line[6].module == "interpzoo.metrics" and "interpzoo.metrics.protopnet" in by_line[6].targets
    assert by_line[8].type_only and by_line[8].module == "pytorch_lightning"
    assert by_line[10].module == "interpzoo.run" and not by_line[10].module_level
    assert by_line[11].module == "models.senn"
    assert got.backend_calls == [(12, "matplotlib.use")]


VIOLATING_TREE = {
    "interpzoo/__init__.py": "",
    "interpzoo/run.py": "",
    "interpzoo/api.py": "from models import registry\n",
    "interpzoo/reports/__init__.py": "",
    "layers/__init__.py": "from interpzoo.models import registry\n",
    "metrics/__init__.py": "def f():\n    import pytorch_lightning\n",
    "metrics/plots.py": "import matplotlib\nmatplotlib.use('Agg')\n",
    "datamodules/__init__.py": "from interpzoo.models.errors import did_you_mean\n",
    "models/__init__.py": "from interpzoo.models import net\n",
    "models/net.py": (
        "import matplotlib.pyplot as plt\nfrom . import lit_net\n"
        "def f():\n    from interpzoo.run import train\n    import torchmetrics\n"
    ),
    "models/lit_net.py": "from interpzoo.reports import figures\n",
    "conf/__init__.py": "",
    "conf/model/x.yaml": "_target_: interpzoo.models.lit_gone.Module\n",
}
# rule -> the places it must report in VIOLATING_TREE
EXPECTED = {
    "layers_are_pure_torch": ["layers/__init__.py:1:"],
    "metrics_import_no_models_data_or_framework": ["metrics/__init__.py:2:"],
    "datamodules_import_no_models_metrics_or_reports": ["datamodules/__init__.py:1:"],
    "networks_import_no_training_stack": ["models/net.py:1:", "models/net.py:5:"],
    "networks_import_no_framework": ["models/net.py:4:"],
    "lightning_modules_import_no_framework": ["models/lit_net.py:1:"],
    "models_init_loads_no_lightning_module": ["models/__init__.py:1 -> models/net.py:2:"],
    "nothing_switches_the_matplotlib_backend": ["metrics/plots.py:2:"],
    "no_old_top_level_names": ["interpzoo/api.py:1:"],
    "config_targets_name_existing_interpzoo_objects": ["conf/model/x.yaml:1:"],
}


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_reports_a_violating_tree(
    rule: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation check: on a small tree breaking every contract once, each rule names file:line."""
    assert set(EXPECTED) == set(RULES), "add the new rule's violation to VIOLATING_TREE and EXPECTED"
    for name, text in VIOLATING_TREE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    folders = {"interpzoo": "interpzoo", "interpzoo.conf": "conf", "interpzoo.layers": "layers"}
    folders |= {f"interpzoo.{r}": r for r in ("models", "metrics", "datamodules")}
    package_modules.cache_clear()
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    monkeypatch.setattr(f"{__name__}.package_dirs", lambda: {p: tmp_path / f for p, f in folders.items()})
    try:
        violations = RULES[rule]()
    finally:
        package_modules.cache_clear()
    for place in EXPECTED[rule]:
        assert any(v.startswith(place) for v in violations), f"{rule} missed {place}: {violations}"
    assert len(violations) == len(EXPECTED[rule]), violations
