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
# the row of --concept-loss-weight > 0 (model.concept_loss_weight), after contrastive CW when present
FEATURE = "contrastive CW + feature loss"


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
    want = list(METHODS)
    if FEATURE in rows:
        want.insert(want.index("contrastive CW") + 1, FEATURE)
        assert "model.concept_loss_weight=" in text
    assert list(rows) == want
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
    for name in ("contrastive CW", FEATURE):
        if name not in rows:
            continue
        c = rows[name]
        met = (
            min(c[f"AUC {x}"] for x in CONCEPTS) >= 0.85
            and min(c[f"right way {x}"] for x in CONCEPTS) >= 0.90
            and c["test acc"] >= rows["BN"]["test acc"] - 0.01 - 1e-3
        )
        verdict = next(ln for ln in text.splitlines() if ln.startswith(f"Issue targets for {name} ("))
        assert verdict.endswith("**met**." if met else "**not met**."), verdict
    assert "Command: `python benchmarks/concepts.py" in text and "Seed " in text and "Machine: " in text


@pytest.mark.parametrize("name", ["concepts_results.md", "concepts_results_minimal_pairs.md"])
def test_committed_results_consistent(name: str) -> None:
    path = ROOT / "benchmarks" / name
    check_results(path.read_text())
    command = path.read_text().split("Command:")[1].splitlines()[0]
    assert "--quick" not in command and "--skip" not in command, "commit a full real run"
    # the class table the file is about is the one its command used
    assert ("--minimal-pairs" in command) == ("minimal_pairs" in name)


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


def _benchmark_module():
    """``benchmarks/concepts.py`` as a module (``benchmarks/`` is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("concepts_benchmark", ROOT / "benchmarks" / "concepts.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_results(rng, contrastive_auc: float) -> dict:
    """Per-method results as ``main`` returns them, random shares (CW rows with whitening checks)."""
    res: dict = {"BN": {"acc": 0.99, "seconds": 1.0}}
    for name in METHODS[1:]:
        res[name] = {"auc": list(rng.uniform(0.5, 1.0, 3)), "intervention": list(rng.uniform(0.5, 1.0, 3))}
        res[name]["acc"] = 0.99 if name.startswith("BN") else 0.985
    for name in ("paper CW", "contrastive CW"):
        res[name].update(orth=1e-7, cov_diag=0.9, cov_offdiag=0.01, cov_err=0.1, cov_near_one=0.95)
        res[name].update(cov_eig_min=0.01, cov_eig_max=1.2, seconds=3.0)
    res["contrastive CW"]["auc"] = [contrastive_auc] * 3
    res["contrastive CW"]["intervention"] = [0.95] * 3
    res["CBM"].update(auc_all=0.97, curve=[("test/intervention/random_n000", 0.9)], true_concept_acc=1.0)
    res["CBM"].update(n_concepts=66, seconds=2.0)
    return res


@pytest.mark.parametrize("auc", [0.9, 0.8])
def test_report_verdict_and_skipped_rows(auc: float) -> None:
    """The report's "met" verdict follows the thresholds (re-derived by :func:`check_results`), the T / solver
    setting is printed, and ``--skip`` leaves exactly the skipped rows (and the CBM line) out."""
    import numpy as np

    mod = _benchmark_module()
    args = mod._args(["--T", "40", "--solver", "eigh"])
    results = _fake_results(np.random.default_rng(0), auc)
    text = mod.report(args, results, 1.0, ["--T", "40", "--solver", "eigh"])
    check_results(text)
    assert ("**met**" in text) == (auc >= 0.85) and "T=40 (solver `eigh`)" in text
    del results["CBM"], results["paper CW"]
    text = mod.report(args, results, 1.0, [])
    assert set(_table(text)) == {"BN", "contrastive CW", "BN best filter", "BN linear probe (CAV)"}
    assert "CBM:" not in text and "| paper CW |" not in text
    # the feature-loss row: its own verdict line, and the header names the weight
    results = _fake_results(np.random.default_rng(1), auc)
    results[FEATURE] = {**results["contrastive CW"], "auc": [0.95] * 3, "intervention": [0.8] * 3}
    text = mod.report(mod._args(["--concept-loss-weight", "5"]), results, 1.0, ["--concept-loss-weight", "5"])
    check_results(text)
    assert f"Issue targets for {FEATURE} (" in text and "model.concept_loss_weight=5" in text
    with pytest.raises(SystemExit):
        mod._args(["--T", "0"])
    with pytest.raises(SystemExit):
        mod._args(["--skip", "everything"])
