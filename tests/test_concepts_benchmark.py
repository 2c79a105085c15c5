"""The concept benchmark's results file (benchmarks/concepts.py, issue 15): its rows are consistent.

Checked on the committed ``benchmarks/concepts_results.md`` (fast) and on a fresh ``--quick`` run in a
subprocess (slow): every method has a row, every value is a share in [0, 1], each mean column is the mean
of its per-concept columns, and the "targets met" line agrees with the contrastive-CW and BN rows.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

CONCEPTS = ["has_red", "has_striped", "has_circle"]
METHODS = ["BN", "paper CW", "contrastive CW", "CBM", "BN best filter", "BN linear probe (CAV)"]


def _value(cell: str) -> float:
    cell = cell.strip()
    return float("nan") if cell in ("–", "nan") else float(cell)


def _table(text: str) -> dict[str, dict[str, float]]:
    """``{method: {column: value}}`` of the method table (the one whose header starts ``| method |``)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows: dict[str, dict[str, float]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows[cells[0]] = {h: _value(c) for h, c in zip(header[1:], cells[1:])}
    return rows


def check_results(text: str) -> None:
    rows = _table(text)
    assert list(rows) == METHODS
    for method, row in rows.items():
        for column, v in row.items():
            assert math.isnan(v) or 0.0 <= v <= 1.0, (method, column, v)
        if method == "BN":
            continue
        for kind in ("AUC", "right way"):
            per = [row[f"{kind} {c}"] for c in CONCEPTS]
            finite = [v for v in per if not math.isnan(v)]
            assert finite, (method, kind)
            # each cell is rounded to 3 decimals, so the mean of the rounded cells is within 0.0005 + rounding
            assert row[f"{kind} mean"] == pytest.approx(sum(finite) / len(finite), abs=1.1e-3), (method, kind)
    # the BN post-hoc baselines read the BN model: same accuracy
    assert (
        rows["BN best filter"]["test acc"]
        == rows["BN linear probe (CAV)"]["test acc"]
        == rows["BN"]["test acc"]
    )
    c = rows["contrastive CW"]
    met = (
        min(c[f"AUC {x}"] for x in CONCEPTS) >= 0.85
        and min(c[f"right way {x}"] for x in CONCEPTS) >= 0.90
        and c["test acc"] >= rows["BN"]["test acc"] - 0.01 - 1e-3
    )
    assert ("**met**" if met else "**not met**") in text
    assert "Command: `python benchmarks/concepts.py" in text and "Seed " in text and "Machine: " in text


def test_committed_results_consistent() -> None:
    path = ROOT / "benchmarks" / "concepts_results.md"
    check_results(path.read_text())
    assert "--quick" not in path.read_text().split("Command:")[1].splitlines()[0], (
        "commit a real run, not --quick"
    )


@pytest.mark.slow
def test_quick_run_writes_consistent_rows(tmp_path: Path) -> None:
    out = tmp_path / "concepts.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "concepts.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    check_results(text)
    assert "--quick" in text and "Seed 0" in text
