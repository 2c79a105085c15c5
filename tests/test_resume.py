"""Exact resume (issue 12, point 4): ``kill -9`` mid-epoch, resume from ``last.ckpt``, same end as one run.

``python train.py`` runs as a subprocess, as a user types it. The run is SIGKILLed once ``last.ckpt`` of
epoch 1 is on disk (so during epoch 2, the last one), resumed into the same run folder with
``ckpt_path=<run>/checkpoints/last.ckpt``, and compared with an uninterrupted run of the same seed:
``metrics.json`` and every weight must be bitwise equal (CPU, same machine, same thread count: the resumed
run replays epoch 2 with the same data order, the same random numbers and the same optimizer state).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from interpzoo.datamodules.base import EvalShardSampler, GlobalBatchSampler
from interpzoo.resume import epoch_seed

ROOT = Path(__file__).resolve().parents[1]

# tiny and quick: 4 steps per epoch, an odd validation split, no figures or bundle
BASE = [
    "data.n_train=128",
    "data.n_val=63",
    "data.n_test=63",
    "data.batch_size=32",
    "trainer.max_epochs=3",
    "trainer.accelerator=cpu",
    "trainer.enable_model_summary=false",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
    "~callbacks.intrinsic_dim",
    "report=false",
    "export=false",
    "logger=csv",
    "seed=7",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"})
    env.update({"WANDB_MODE": "offline", "PYTHONHASHSEED": "0"})
    return env


def _cmd(run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "train.py", *extra, f"hydra.run.dir={run_dir}", f"paths.log_dir={run_dir.parent}"]


def _run(run_dir: Path, extra: list[str]) -> None:
    proc = subprocess.run(
        _cmd(run_dir, extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _last_epoch(path: Path) -> int | None:
    try:
        return int(torch.load(path, weights_only=True, map_location="cpu")["epoch"])
    except Exception:  # not written yet (the writes are atomic: a file that exists is complete)
        return None


def _run_and_kill(run_dir: Path, extra: list[str], kill_after_epoch: int) -> None:
    """Start ``train.py``; SIGKILL it as soon as ``last.ckpt`` holds ``kill_after_epoch`` (mid next epoch)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        _cmd(run_dir, extra), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if last.is_file() and _last_epoch(last) == kill_after_epoch:
                break
            time.sleep(0.02)
        assert proc.poll() is None, (
            "the run ended before it could be killed: " + proc.stderr.read().decode()[-3000:]
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # killed during the next epoch: it left neither a newer last.ckpt nor metrics.json
    assert _last_epoch(last) == kill_after_epoch
    assert not (run_dir / "metrics.json").exists()


def _weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for ckpt in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        state = torch.load(ckpt, weights_only=True, map_location="cpu")
        out[ckpt.name] = {k: v for k, v in state["state_dict"].items() if isinstance(v, torch.Tensor)}
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    assert ma.keys() == mb.keys()
    assert ma == mb, {k: (ma[k], mb[k]) for k in ma if ma[k] != mb[k]}
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and "last.ckpt" in wa
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        for key, t in wa[name].items():
            assert torch.equal(t, wb[name][key]), f"{name}:{key} max |dw| = {(t - wb[name][key]).abs().max()}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["model=baseline"], id="baseline"),
        # warm, joint+push, last layer: the kill lands in the epoch after the push
        pytest.param(
            [
                "model=protopnet",
                "model.schedule.warm_epochs=1",
                "model.schedule.push_start=1",
                "model.schedule.push_every=10",
                "model.schedule.last_iters=1",
            ],
            id="protopnet_across_push",
        ),
        # an alignment step every 2 batches: the kill lands between alignments, whose counter must resume
        pytest.param(
            ["model=concept_whitening", "model.align_every=2", "model.concept_eval_samples=16"],
            id="concept_whitening_across_alignment",
        ),
    ],
)
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, extra) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _run(whole, [*BASE, *extra])
    _run_and_kill(killed, [*BASE, *extra], kill_after_epoch=1)
    _run(killed, [*BASE, *extra, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"])
    _assert_same_run(whole, killed)


# -- the samplers behind it -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [128, 131, 100])
def test_global_batch_sampler_union_over_ranks_is_the_single_process_batch(n: int) -> None:
    batch = 32
    single = GlobalBatchSampler(n, batch, 1, 0, seed=3)
    ranks = [GlobalBatchSampler(n, batch, 2, r, seed=3) for r in range(2)]
    for epoch in (0, 1):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        one = list(single)
        assert sorted(one) == list(range(n))  # one process sees every sample once per epoch
        streams = [list(s) for s in ranks]
        assert len(streams[0]) == len(streams[1]) == len(ranks[0])
        for step in range(-(-n // batch)):
            want = one[step * batch : (step + 1) * batch]
            per = len(want) // 2
            got = [x for st in streams for x in st[step * batch // 2 : step * batch // 2 + per]]
            assert (
                got == want[: 2 * per]
            )  # the slices of a step are the single-process batch (remainder skipped)
    single.set_epoch(0)
    first = list(single)
    single.set_epoch(1)
    assert list(single) != first  # a new order per epoch, a function of (seed, epoch) only
    single.set_epoch(0)
    assert list(single) == first


def test_eval_shard_sampler_sees_every_sample_once() -> None:
    shards = [list(EvalShardSampler(63, 2, r)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(63))
    assert (len(shards[0]), len(shards[1])) == (32, 31)


def test_epoch_seed_depends_on_seed_epoch_and_rank() -> None:
    seeds = {epoch_seed(s, e, r) for s in (0, 1) for e in (0, 1, 2) for r in (0, 1)}
    assert len(seeds) == 12
    assert epoch_seed(5, 2, 1) == epoch_seed(5, 2, 1)
