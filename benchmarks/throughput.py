"""What a training step costs with each interpretable method, against its matched plain network, in one run.

For every method the step is the method's LightningModule step outside the fitting loop (forward, the
module's own ``compute_losses`` with its default weights, backward, one Adam step; logging is a no-op on both
sides) and
its periodic procedure is timed separately and amortised:

* ``baseline``: the plain network against an identical copy of itself (the A/A noise floor);
* ``protopnet``: the joint-phase step (CE + cluster + separation + L1) vs the baseline on the same trunk;
  push (:func:`interpzoo.models.protopnet_push.push_prototypes`) over the push set, amortised per epoch
  (push cost per batch of data) and per the default schedule (every ``push_every`` epochs);
* ``concept whitening``: CE step vs the BatchNorm baseline; one alignment round
  (``ConceptWhiteningModule.align_concepts``: a batch per concept and the Cayley update) every
  ``--align-every`` batches;
* ``icnn``: mask + filter loss vs the same network with the extra conv layer and no mask or filter loss,
  and vs the baseline;
* ``senn`` (digits-sized, 1x32x32, batch 64): robustness penalty ``stopgrad`` (exact, default) and
  ``subbatch`` (the unbiased cheaper estimate) vs the unpenalised step (``robustness_lambda=0``);
* ``soft AE``: the denoising step vs the matched ReLU autoencoder.

Then the concept-whitening layer alone against a re-implementation of the reference ``IterNormRotation``
(written here from the paper and the reference semantics: per-iteration ``P^3`` products, hand-written
IterNorm backward, rotation by ``einsum``), train forward+backward and eval, at four shapes; and the
concept-whitening training step on torchvision ``resnet18`` at 112 px, batch 16 (``layer4.1.bn1``:
``m = 256`` samples for ``C = 512`` channels) vs its BatchNorm step.

Measurement: both sides of a comparison live in one process and alternate (A B B A ...) within every
repetition; a ratio is the median over repetitions of the paired per-repetition ratios, with its
interquartile range. On CPU the clock is process CPU time with one thread (so other load on a shared
machine does not count); on CUDA it is CUDA events, with bf16 autocast + channels_last and, with
``--compile``, ``torch.compile`` where it works (falls back to eager and says so). Timings are printed and
written as a Markdown table (command, machine, versions) to ``--out``.

    python benchmarks/throughput.py                      # CPU defaults, ~5 min on one busy core
    python benchmarks/throughput.py --quick              # smoke run, ~1 min
    python benchmarks/throughput.py --reps 21 --inner 4  # tighter spreads (~15 min)
    python benchmarks/throughput.py --device cuda --backbone resnet18 --image-size 224 --batch-size 64 \
        --compile --out benchmarks/throughput_results_gpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONCEPTS = ["has_red", "has_striped", "has_circle"]
METHODS = ("baseline", "protopnet", "cw", "icnn", "senn", "softae")
LAYER_SHAPES = [(64, 64, 8, 8), (16, 512, 4, 4), (32, 256, 14, 14), (16, 64, 56, 56)]


# ---------------------------------------------------------------------------------------------
# The reference layer (IterNormRotation of Chen, Bei & Rudin 2020, reference semantics)
# ---------------------------------------------------------------------------------------------
class _ReferenceIterNorm(torch.autograd.Function):
    """IterNorm (Huang et al., CVPR 2019, Algorithm 1) as the reference code computes it: ``(C, m)`` layout,
    ``P_{k+1} = 1.5 P_k - 0.5 P_k^3 Sigma_N`` with ``P_k^3`` by ``matrix_power`` from ``P_0 = I``, every
    iterate saved, and the hand-written backward of IterNorm's Section 3 (derivatives through the unrolled
    iterations, the trace normalisation and the centring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, running_mean: torch.Tensor, running_wm: torch.Tensor, T: int,
                eps: float, momentum: float, training: bool) -> torch.Tensor:  # fmt: skip
        b, c = x.shape[:2]
        xg = x.transpose(0, 1).contiguous().view(1, c, -1)
        m = xg.shape[-1]
        if training:
            mean = xg.mean(-1, keepdim=True)
            xc = xg - mean
            eye = torch.eye(c, dtype=x.dtype, device=x.device).expand(1, c, c)
            sigma = torch.baddbmm(eye, xc, xc.transpose(1, 2), beta=eps, alpha=1.0 / m)
            r_tr = (sigma * eye).sum((1, 2), keepdim=True).reciprocal()
            sigma_n = sigma * r_tr
            ps = [eye]
            for _ in range(T):
                ps.append(torch.baddbmm(ps[-1], torch.matrix_power(ps[-1], 3), sigma_n, beta=1.5, alpha=-0.5))
            wm = ps[-1] * r_tr.sqrt()
            running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
            running_wm.mul_(1 - momentum).add_(wm.detach() * momentum)
            ctx.save_for_backward(xc, r_tr, sigma_n, *ps)
        else:
            xc = xg - running_mean
            wm = running_wm
        xn = wm.matmul(xc)
        return xn.view(c, b, *x.shape[2:]).transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        xc, r_tr, sn, *ps = ctx.saved_tensors
        T = len(ps) - 1
        m = xc.shape[-1]
        g = grad.transpose(0, 1).contiguous().view_as(xc)
        wm = ps[T] * r_tr.sqrt()
        g_wm = g.matmul(xc.transpose(-2, -1))
        g_p = g_wm * r_tr.sqrt()
        g_sn = torch.zeros_like(sn)
        for k in range(T, 1, -1):  # d/dP_{k-1} and d/dSigma_N of P_k = 1.5 P - 0.5 P^3 Sigma_N (P symmetric)
            p = ps[k - 1]
            p2 = p.matmul(p)
            g_sn = g_sn + p2.matmul(p).matmul(g_p)
            g_tmp = g_p.matmul(sn)
            g_p = 1.5 * g_p - 0.5 * (g_tmp.matmul(p2) + p2.matmul(g_tmp) + p.matmul(g_tmp).matmul(p))
        g_sn = g_sn + g_p  # P_1 = 1.5 I - 0.5 Sigma_N
        eye = ps[0]
        g_tr = ((-sn.matmul(g_sn) + g_wm.transpose(-2, -1).matmul(wm)) * eye).sum((1, 2), keepdim=True) * eye
        g_sigma = (g_sn + g_sn.transpose(-2, -1) + 2.0 * g_tr) * (-0.5 / m * r_tr)
        g_x = torch.baddbmm(wm.matmul(g - g.mean(-1, keepdim=True)), g_sigma, xc)
        return g_x.view(grad.shape[1], grad.shape[0], *grad.shape[2:]).transpose(0, 1), *([None] * 6)


class ReferenceIterNormRotation(nn.Module):
    """Reference-style concept-whitening layer (one group): IterNorm whitening, then ``einsum`` rotation by
    ``running_rot`` (``(1, C, C)`` buffers as in the reference checkpoints). Ordinary passes only (the
    concept-gradient accumulation of the reference is not part of the timed step)."""

    def __init__(self, num_features: int, T: int = 10, eps: float = 1e-5, momentum: float = 0.05) -> None:
        super().__init__()
        self.T, self.eps, self.momentum = T, eps, momentum
        c = num_features
        self.register_buffer("running_mean", torch.zeros(1, c, 1))
        self.register_buffer("running_wm", torch.eye(c).expand(1, c, c).clone())
        self.register_buffer("running_rot", torch.eye(c).expand(1, c, c).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = _ReferenceIterNorm.apply(
            x, self.running_mean, self.running_wm, self.T, self.eps, self.momentum, self.training
        )
        b, c = x.shape[:2]
        x_hat = x_hat.view(b, 1, c, *x.shape[2:])
        return torch.einsum("bgchw,gdc->bgdhw", x_hat, self.running_rot).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
class Clock:
    """Seconds per call of ``fn``: process CPU time on CPU, CUDA events on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], Any], inner: int) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0 / inner
        t = time.process_time()
        for _ in range(inner):
            fn()
        return (time.process_time() - t) / inner


def interleaved(
    clock: Clock, sides: dict[str, Callable[[], Any]], reps: int, inner: int, warmup: int
) -> dict[str, list[float]]:
    """Per-repetition seconds per call of every side, the order alternating between repetitions."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    order = list(sides)
    for r in range(reps):
        for k in order if r % 2 == 0 else order[::-1]:
            times[k].append(clock(sides[k], inner))
    return times


def _quartiles(v: list[float]) -> tuple[float, float, float]:
    if len(v) < 2:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


def ratio(num: list[float], den: list[float], extra: float = 0.0) -> tuple[float, float, float]:
    """Quartiles of the paired per-repetition ratios ``(num + extra) / den``."""
    return _quartiles([(a + extra) / b for a, b in zip(num, den, strict=True)])


def fmt_ratio(q: tuple[float, float, float]) -> str:
    return f"{q[1]:.2f} [{q[0]:.2f}-{q[2]:.2f}]"


def fmt_ms(v: list[float]) -> str:
    lo, med, hi = _quartiles(v)
    return f"{med * 1e3:.1f} ±{(hi - lo) / 2 / med * 100:.0f}%"


# ---------------------------------------------------------------------------------------------
# Building modules from the configs (what train.py builds), outside a Trainer
# ---------------------------------------------------------------------------------------------
def _no_log(*args: Any, **kwargs: Any) -> None:
    """Logging outside a fitting loop is a no-op on both sides of every comparison."""


def data_info(task: str, in_chans: int, size: int, num_classes: int = 10) -> dict[str, Any]:
    return {
        "task": task,
        "input_kind": "image",
        "num_classes": num_classes if task == "classification" else None,
        "in_chans": in_chans,
        "image_size": [size, size],
        "mean": [0.5] * in_chans,
        "std": [0.25] * in_chans,
        "class_names": [f"c{i}" for i in range(num_classes)],
        "concept_names": CONCEPTS,
        "part_names": None,
    }


def build_module(model: str, info: dict[str, Any], overrides: list[str], args: argparse.Namespace) -> Any:
    """The LightningModule of ``model=<model>`` with ``overrides``, on the benchmark's device and format."""
    from hydra.utils import instantiate

    from interpzoo.api import compose_config, quiet_trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([f"model={model}", *overrides], output_dir=tmp)
    module = instantiate(cfg.model, data_info=info, _convert_="all")
    module.log = _no_log
    # An idle one-process Trainer (never fitted): what a step reads from it (world size, rank, flags) is
    # what it would read in a single-device run.
    module.trainer = quiet_trainer(max_epochs=1)
    module.to(args.device)
    if args.channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def _compiled(module: Any, args: argparse.Namespace, probe: Callable[[], Any]) -> str:
    """``torch.compile`` the module's network if asked and if a step works; returns a note."""
    if not args.compile:
        return ""
    eager = module.net
    if isinstance(eager, torch._dynamo.eval_frame.OptimizedModule):  # shared by two comparisons
        return "compiled"
    try:
        module.net = torch.compile(eager)
        probe()
        return "compiled"
    except Exception as e:  # noqa: BLE001 - report and time the eager network
        module.net = eager
        return f"eager (compile failed: {type(e).__name__})"


class Stepper:
    """One training step of a module: ``training_step`` (or ``_step`` for ProtoPNet's joint phase, whose
    ``training_step`` needs a Trainer for its manual optimisation), backward, Adam step."""

    def __init__(self, module: Any, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> None:
        self.module, self.batch, self.args = module, batch, args
        module.train()
        if hasattr(module, "_set_modes"):  # ProtoPNet: joint phase, every parameter trained
            module._set_modes("joint")
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=1e-4)
        self.i = 0
        self.joint_phase = type(module).__name__ == "ProtoPNetModule"

    def __call__(self) -> None:
        autocast = (
            torch.autocast(self.args.device.type, dtype=torch.bfloat16)
            if self.args.precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            if self.joint_phase:
                loss = self.module._step(self.batch, "train")
            else:
                loss = self.module.training_step(self.batch, self.i)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.i += 1


def image_batch(args: argparse.Namespace, b: int, c: int, size: int, num_classes: int = 10) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, c, size, size, generator=g).to(args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return {
        "image": x,
        "label": torch.randint(0, num_classes, (b,), generator=g).to(args.device),
        "index": torch.arange(b, device=args.device),
    }


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
Row = dict[str, Any]


def _row(method: str, plain: str, t: dict[str, list[float]], m: str, p: str, batch: int, **extra: Any) -> Row:
    return {
        "method": method,
        "plain": plain,
        "ms_method": fmt_ms(t[m]),
        "ms_plain": fmt_ms(t[p]),
        "img_s_method": batch / statistics.median(t[m]),
        "img_s_plain": batch / statistics.median(t[p]),
        "step": ratio(t[m], t[p]),
        **extra,
    }


def methods_section(args: argparse.Namespace, clock: Clock) -> list[Row]:
    from interpzoo.models.protopnet_push import push_prototypes

    rows: list[Row] = []
    bb = [f"backbone={args.backbone}"]
    s, b = args.image_size, args.batch_size
    info = data_info("classification", 3, s)
    batch = image_batch(args, b, 3, s)
    reps, inner, warm = args.reps, args.inner, args.warmup

    def run(method: str, plain: str, mods: dict[str, Any], bt: dict[str, Any], n: int, **extra: Any) -> Row:
        steppers = {k: Stepper(mod, bt, args) for k, mod in mods.items()}
        notes = {k: _compiled(mods[k], args, steppers[k]) for k in mods}
        t = interleaved(clock, steppers, reps, inner, warm)
        keys = list(mods)
        row = _row(method, plain, t, keys[0], keys[-1], n, **extra)
        row["notes"] = ", ".join(sorted({v for v in notes.values() if v}))
        row["_t"] = t
        print(_line(row), flush=True)
        return row

    base = build_module("baseline", info, bb, args)
    want = set(args.methods)
    if "baseline" in want:  # A/A: the noise floor of the measurement
        rows.append(
            run(
                "baseline",
                "baseline (copy)",
                {"a": base, "b": build_module("baseline", info, bb, args)},
                batch,
                b,
            )
        )

    if "protopnet" in want:  # joint step + push amortised
        proto = build_module("protopnet", info, bb, args)
        row = run("protopnet", "baseline", {"m": proto, "p": base}, batch, b)
        push_batches = [image_batch(args, b, 3, s) for _ in range(args.push_batches)]
        for i, pb in enumerate(push_batches):
            pb["index"] = pb["index"] + i * b
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a class missing from the few push batches
            push_t = [
                clock(lambda: push_prototypes(proto.net, push_batches, True, 95.0), 1)
                for _ in range(args.periodic_reps)
            ]
        per_batch = statistics.median(push_t) / len(push_batches)
        every = int(getattr(proto, "schedule_cfg", {}).get("push_every", 10))
        t = row.pop("_t")
        row["periodic"] = (
            f"push, per epoch: {fmt_ratio(ratio(t['m'], t['p'], per_batch))}; "
            f"every {every} epochs (default schedule): {fmt_ratio(ratio(t['m'], t['p'], per_batch / every))}"
        )
        row["amortised"] = ratio(t["m"], t["p"], per_batch)
        rows.append(row)

    if "cw" in want:  # the model's default CW layer + alignment every N batches
        rows.append(
            cw_row(args, clock, info, batch, bb, base, f"concept whitening ({args.backbone}, {s} px)")
        )

    if "icnn" in want:  # mask + filter loss vs the same network with its extra conv layer
        icnn = build_module("icnn", info, bb, args)
        same = build_module("icnn", info, [*bb, "model.net.use_mask=false", "model.lambda_filter=0"], args)
        row = run("icnn", "same net + extra conv, no mask/loss", {"m": icnn, "p": same}, batch, b)
        row.pop("_t")
        rows.append(row)
        row = run("icnn", "baseline", {"m": icnn, "p": base}, batch, b)
        row.pop("_t")
        rows.append(row)

    if "senn" in want:  # digits-sized input: exact and sub-batch penalty vs unpenalised
        sinfo = data_info("classification", 1, 32)
        sbatch = image_batch(args, 64, 1, 32)
        plain = build_module("senn", sinfo, ["model.robustness_lambda=0"], args)
        for method, frac in (("stopgrad", None), ("subbatch", 0.125), ("subbatch", 0.0625)):
            extra = [f"model.penalty_subbatch={frac}"] if frac else []
            senn = build_module("senn", sinfo, [f"model.penalty_method={method}", *extra], args)
            label = (
                "senn, exact penalty (stopgrad)"
                if frac is None
                else f"senn, sub-batch penalty ({frac:g} of the batch{', default' if frac == 0.0625 else ''})"
            )
            row = run(label, "senn unpenalised", {"m": senn, "p": plain}, sbatch, 64)
            row.pop("_t")
            rows.append(row)

    if "softae" in want:  # the denoising step vs the ReLU autoencoder
        ainfo = data_info("reconstruction", 1, s)
        abatch = image_batch(args, b, 1, s)
        soft = build_module("soft_autoencoder", ainfo, [], args)
        relu = build_module("relu_ae", ainfo, [], args)
        row = run("soft AE", "ReLU AE", {"m": soft, "p": relu}, abatch, b)
        row.pop("_t")
        rows.append(row)
    return rows


def cw_row(
    args: argparse.Namespace,
    clock: Clock,
    info: dict[str, Any],
    batch: dict[str, Any],
    overrides: list[str],
    base: Any,
    label: str,
) -> Row:
    """CW step vs the BN step, plus one alignment round every ``--align-every`` batches, amortised."""
    cw = build_module("concept_whitening", info, [*overrides, f"model.align_every={args.align_every}"], args)
    b = batch["image"].shape[0]
    concept_images = [
        image_batch(args, b, 3, batch["image"].shape[-1])["image"] * 0.5 + 0.25 * j for j in range(3)
    ]
    cw._next_concept_batch = lambda j: concept_images[j]
    sides = {"m": Stepper(cw, batch, args), "p": Stepper(base, batch, args)}
    notes = {k: _compiled(mod, args, sides[k]) for k, mod in (("m", cw), ("p", base))}
    reps = max(3, args.reps // (2 if b * batch["image"].shape[-1] ** 2 > 100_000 else 1))
    t = interleaved(clock, sides, reps, args.inner, args.warmup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a curvilinear-search warning would say nothing about speed
        cw.align_concepts()
        align = [clock(cw.align_concepts, 1) for _ in range(args.periodic_reps)]
    per_step = statistics.median(align) / args.align_every
    layer = cw.net.cw_layer
    row = _row(label, "BatchNorm baseline", t, "m", "p", b)
    row["periodic"] = (
        f"alignment every {args.align_every} batches: {fmt_ratio(ratio(t['m'], t['p'], per_step))} "
        f"(one round {statistics.median(align) * 1e3:.0f} ms); guard fallbacks: {layer.fallback_count}"
    )
    row["amortised"] = ratio(t["m"], t["p"], per_step)
    row["notes"] = ", ".join(sorted({v for v in notes.values() if v}))
    print(_line(row), flush=True)
    return row


def layer_section(args: argparse.Namespace, clock: Clock) -> list[Row]:
    from interpzoo.layers.concept_whitening import ConceptWhitening2d

    rows: list[Row] = []
    for shape in LAYER_SHAPES:
        b, c, h, w = shape
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(*shape, generator=g) * torch.linspace(0.5, 2, c)[None, :, None, None] + 0.3).to(
            args.device
        )
        x.requires_grad_()
        ours = ConceptWhitening2d(c).to(args.device)
        ref = ReferenceIterNormRotation(c).to(args.device)
        rot = torch.linalg.qr(torch.randn(c, c, generator=g))[0].to(args.device)
        ours.running_rot.copy_(rot)
        ref.running_rot.copy_(rot[None])
        weight = torch.randn(*shape, generator=g).to(args.device)

        def train_step(
            layer: nn.Module, x: torch.Tensor = x, weight: torch.Tensor = weight
        ) -> Callable[[], None]:
            def fn() -> None:
                layer.train()
                (layer(x) * weight).sum().backward()
                x.grad = None

            return fn

        def eval_step(layer: nn.Module, x: torch.Tensor = x) -> Callable[[], None]:
            def fn() -> None:
                layer.eval()
                with torch.no_grad():
                    layer(x)

            return fn

        t = interleaved(
            clock, {"ref": train_step(ref), "ours": train_step(ours)}, args.reps, args.inner, args.warmup
        )
        te = interleaved(
            clock, {"ref": eval_step(ref), "ours": eval_step(ours)}, args.reps, args.inner, args.warmup
        )
        row = {
            "shape": shape,
            "m": b * h * w,
            "route": "Gram (m < C)" if ours.use_gram(b * h * w) else "covariance",
            "train_ref": fmt_ms(t["ref"]),
            "train_ours": fmt_ms(t["ours"]),
            "train_speedup": ratio(t["ref"], t["ours"]),
            "eval_ref": fmt_ms(te["ref"]),
            "eval_ours": fmt_ms(te["ours"]),
            "eval_speedup": ratio(te["ref"], te["ours"]),
            "fallbacks": ours.fallback_count,
        }
        print(
            f"CW layer {shape} m={row['m']} [{row['route']}]: reference/ours train fwd+bwd "
            f"{fmt_ratio(row['train_speedup'])}, eval {fmt_ratio(row['eval_speedup'])}",
            flush=True,
        )
        rows.append(row)
    return rows


def resnet_section(args: argparse.Namespace, clock: Clock) -> list[Row]:
    s, b = args.resnet_size, args.resnet_batch
    info = data_info("classification", 3, s)
    batch = image_batch(args, b, 3, s)
    bb = ["backbone=resnet18"]
    base = build_module("baseline", info, bb, args)
    return [cw_row(args, clock, info, batch, bb, base, f"concept whitening (resnet18, {s} px, batch {b})")]


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def _line(r: Row) -> str:
    s = f"{r['method']:<44} vs {r['plain']:<36} step {fmt_ratio(r['step'])}"
    if r.get("periodic"):
        s += f" | {r['periodic']}"
    return s


def machine(args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dev = (
        torch.cuda.get_device_name(args.device)
        if args.device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} thread(s)"
    )
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{dev}; {cpu}; {os.cpu_count()} logical cores; load average at start {load}"


def markdown(args: argparse.Namespace, sections: dict[str, list[Row]], mach: str, elapsed: float) -> str:
    import numpy
    import pytorch_lightning

    clock = "CUDA events" if args.device.type == "cuda" else "process CPU time, one thread"
    out = [
        "# Training-step throughput: each method against its matched plain network",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Date: {datetime.datetime.now().isoformat(timespec='minutes')}; run time {elapsed / 60:.1f} min  ",
        f"Machine: {mach}  ",
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"pytorch-lightning {pytorch_lightning.__version__}, numpy {numpy.__version__}  ",
        f"Clock: {clock}; precision {args.precision}, channels_last {args.channels_last}, "
        f"compile {args.compile}; {args.reps} interleaved repetitions of {args.inner} step(s) after "
        f"{args.warmup} warm-up step(s).",
        "",
        "Ratios are medians of the paired per-repetition ratios (method / plain, or reference / ours for the "
        "layer), with the interquartile range in brackets; times are medians ± half the interquartile range.",
        "",
    ]
    if "methods" in sections:
        out += [
            f"## Methods ({args.backbone}, {args.image_size} px, batch {args.batch_size}; SENN 1x32x32, batch 64)",
            "",
            "| method | plain network | ms/step method | ms/step plain | img/s method | img/s plain | step ratio | periodic procedure, amortised | notes |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sections["methods"]:
            out.append(
                f"| {r['method']} | {r['plain']} | {r['ms_method']} | {r['ms_plain']} | {r['img_s_method']:.0f} | "
                f"{r['img_s_plain']:.0f} | {fmt_ratio(r['step'])} | {r.get('periodic', '')} | {r.get('notes', '')} |"
            )
        out.append("")
    if "resnet" in sections:
        out += [
            "## Concept whitening on torchvision resnet18 (layer4.1.bn1: m = B*H*W = 256 < C = 512 at 112 px, batch 16)",
            "",
            "| method | plain network | ms/step method | ms/step plain | step ratio | periodic procedure, amortised |",
            "|---|---|---|---|---|---|",
        ]
        for r in sections["resnet"]:
            out.append(
                f"| {r['method']} | {r['plain']} | {r['ms_method']} | {r['ms_plain']} | {fmt_ratio(r['step'])} | "
                f"{r.get('periodic', '')} |"
            )
        out.append("")
    if "layer" in sections:
        out += [
            "## Concept-whitening layer vs the reference IterNormRotation (re-implemented in this file), T = 10",
            "",
            "| shape (B, C, H, W) | m | our route | train fwd+bwd ms: reference | ours | speed-up | eval ms: reference | ours | speed-up |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sections["layer"]:
            out.append(
                f"| {r['shape']} | {r['m']} | {r['route']} | {r['train_ref']} | {r['train_ours']} | "
                f"{fmt_ratio(r['train_speedup'])} | {r['eval_ref']} | {r['eval_ours']} | {fmt_ratio(r['eval_speedup'])} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sections",
        nargs="+",
        default=["methods", "layer", "resnet"],
        choices=["methods", "layer", "resnet"],
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        help="rows of the methods section (default: all)",
    )
    p.add_argument("--backbone", default="resnet18s")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resnet-size", type=int, default=112, help="image size of the resnet18 CW comparison")
    p.add_argument("--resnet-batch", type=int, default=16)
    p.add_argument("--align-every", type=int, default=20, help="CW alignment period in batches")
    p.add_argument("--push-batches", type=int, default=4, help="batches of push data timed (cost per batch)")
    p.add_argument("--reps", type=int, default=11, help="interleaved repetitions per comparison")
    p.add_argument("--inner", type=int, default=2, help="steps per timed repetition")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--periodic-reps", type=int, default=3, help="timings of each periodic procedure")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: CPU time is comparable)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU")
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on GPU"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each network where it works (GPU)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions, small shapes")
    p.add_argument("--out", default=str(Path(__file__).with_name("throughput_results.md")))
    args = p.parse_args()
    args.device = torch.device(args.device)
    gpu = args.device.type == "cuda"
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.channels_last = gpu if args.channels_last is None else args.channels_last
    if args.quick:
        args.reps, args.inner, args.warmup, args.periodic_reps, args.push_batches = 2, 1, 1, 1, 2
        args.resnet_size = 96  # layer4 maps of 3x3: the smallest that pool_max accepts
    torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True
    else:
        if args.compile:
            print("--compile is for GPU runs; timing eager networks on CPU")
            args.compile = False
    import pytorch_lightning  # noqa: F401 - sets its loggers' levels on import; then quiet them

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):  # idle Trainers: no banners
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.manual_seed(0)
    mach = machine(args)
    print(mach, flush=True)
    clock = Clock(args.device)
    start = time.time()
    sections: dict[str, list[Row]] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        for name in args.sections:
            sections[name] = {"methods": methods_section, "layer": layer_section, "resnet": resnet_section}[
                name
            ](args, clock)
    text = markdown(args, sections, mach, time.time() - start)
    Path(args.out).write_text(text + "\n")
    print(f"\nwrote {args.out} ({(time.time() - start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
