"""Every method benchmark runs the way a user types it, on a tiny budget (``python benchmarks/<method>.py``).

The benchmarks print their tables (the committed ``*_results.md`` files are written by hand from a full run),
so a tiny run changes nothing in the tree. A benchmark that no longer matches the library's API fails here
rather than in a user's hands.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "concept_whitening": "--warm-epochs 1 --ft-epochs 1 --n-train 200 --n-test 100 --concept-samples 20",
    "protopnet": "--epochs 1 --n-train 200 --n-val 64 --n-test 64 --batch-size 32",
    "icnn": "--epochs 1 --n-train 200 --n-test 64 --batch-size 32",
    "senn": "--datasets breast_cancer --tabular-epochs 1 --lambdas 0 --lip-points 8",
    "soft_autoencoder": "--n-train 200 --n-val 64 --n-test 64 --steps 20 --sigmas 20",
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(TINY))
def test_method_benchmark_runs(method: str, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in (ROOT / "benchmarks").glob("*_results.md")}
    cmd = [sys.executable, f"benchmarks/{method}.py", *TINY[method].split(), "--threads", "1"]
    if method == "protopnet":
        cmd += ["--out", str(tmp_path / "run")]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, (" ".join(cmd), proc.stderr[-3000:])
    assert "|" in proc.stdout, "the benchmark prints a Markdown table"
    after = {p: p.read_bytes() for p in (ROOT / "benchmarks").glob("*_results.md")}
    assert after == before, "a tiny run must not overwrite the committed results"
