"""Every notebook in notebooks/ executes top to bottom on CPU, and its figures really render.

A notebook that draws (``.plot(`` or ``display(`` in a code cell) must produce at least one ``image/png``
output and no figure that shows only as text (``<Figure size 500x350 with 1 Axes>``, which is what a
forced ``matplotlib.use("Agg")`` gave); no notebook switches the backend. The notebooks are stored with
their outputs (so they read on GitHub without running); refresh them with
``python tests/test_notebooks.py --write``, which executes them the way this test does.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
BACKEND_SWITCH = re.compile(r"matplotlib\.use\(|switch_backend\(|^\s*%matplotlib\b", re.M)


def _code(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def _draws(nb: nbformat.NotebookNode) -> bool:
    return any(".plot(" in c.source or "display(" in c.source for c in _code(nb))


def _problems(nb: nbformat.NotebookNode) -> list[str]:
    """What is wrong with an executed notebook's outputs (empty when nothing is)."""
    problems = []
    n_png = 0
    for i, cell in enumerate(_code(nb)):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(f"code cell {i}: {out.get('ename')}: {out.get('evalue')}")
            data = out.get("data", {})
            n_png += "image/png" in data
            text = data.get("text/plain", "") + (out.get("text", "") if out.get("name") == "stdout" else "")
            if "image/png" not in data and re.search(r"<Figure size \d+x\d+", text):
                problems.append(f"code cell {i} shows a figure as text only: {text.strip()[:80]}")
    if _draws(nb) and n_png == 0:
        problems.append("the notebook draws but no output holds an image/png")
    return problems


def execute(path: Path, workdir: Path) -> nbformat.NotebookNode:
    """Run the notebook in ``workdir`` with a fresh kernel (the checkout on PYTHONPATH); return it executed."""
    nb = nbformat.read(path, as_version=4)
    env = {
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        client = NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
        )
        client.execute()
    finally:
        os.chdir(cwd)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_notebook_is_executed_and_shows_its_figures(path: Path) -> None:
    """The stored copy (what GitHub shows) holds its outputs, with real images, and forces no backend."""
    nb = nbformat.read(path, as_version=4)
    for cell in _code(nb):
        assert not BACKEND_SWITCH.search(cell.source), cell.source[:200]
        assert cell.get("execution_count") is not None, f"not executed: {cell.source[:80]}"
    assert not _problems(nb)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path) -> None:
    nb = execute(path, tmp_path)
    assert not _problems(nb)
    if path.stem != "concept_whitening_your_resnet":  # the others draw
        assert _draws(nb)


def _clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop stderr streams (progress bars, library warnings) from the stored copy."""
    for cell in _code(nb):
        cell.outputs = [o for o in cell.get("outputs", []) if o.get("name") != "stderr"]
    return nb


if __name__ == "__main__":  # python tests/test_notebooks.py --write [name ...]
    if "--write" not in sys.argv[1:]:
        sys.exit("usage: python tests/test_notebooks.py --write [notebook stem ...]")
    names = [a for a in sys.argv[1:] if a != "--write"]
    for path in NOTEBOOKS:
        if names and path.stem not in names:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            nb = _clean(execute(path, Path(tmp)))
        problems = _problems(nb)
        if problems:
            sys.exit(f"{path.name}: {problems}")
        nbformat.write(nb, path)
        print(f"wrote {path.relative_to(ROOT)}")
