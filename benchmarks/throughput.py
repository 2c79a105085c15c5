"""Throughput of every interpretable architecture against its plain backbone, measured in one run.

For each registered architecture that takes a ``backbone``, builds ``<arch>`` and the black-box
``baseline`` on the same trunk and times (a) inference and (b) a training step (forward, a scalar loss
on the network's main output, backward, Adam step) at the same batch size, then prints images/s and the
ratio to the baseline. Method-specific losses and procedures (push, rotation updates, robustness
penalty) are not part of the timed step: they are measured by each method's own benchmark.

    python benchmarks/throughput.py --backbone resnet18 --image-size 224 --batch-size 64 \
        --device cuda --precision bf16 --channels-last

Ratios, not absolute numbers, are what compare across machines.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import time
from typing import Any

import torch

import interpzoo.models  # noqa: F401  (registers every architecture)
from interpzoo.models.registry import _ARCHITECTURES, build_architecture

DEFAULT_ARGS: dict[str, dict[str, Any]] = {
    "cw": {"concepts": ["c0", "c1", "c2"]},
}


def _main_output(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    return out.reconstruction


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_network(
    net: torch.nn.Module, x: torch.Tensor, steps: int, warmup: int, precision: str, train: bool
) -> float:
    """Images per second of inference (``train=False``) or of a full training step."""
    device = x.device
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4) if train else None
    net.train(train)

    def step() -> None:
        if train:
            with autocast:
                loss = _main_output(net(x)).float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad(), autocast:
                net(x)

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet18s")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", default=None, help="also write the table as JSON to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rows = []
    base: dict[str, float] = {}
    archs = ["baseline"] + sorted(a for a in _ARCHITECTURES if a != "baseline")
    for arch in archs:
        params = inspect.signature(_ARCHITECTURES[arch]).parameters
        if "backbone" not in params:
            continue
        kwargs = {
            "num_classes": args.num_classes,
            "backbone": {"name": args.backbone},
            **DEFAULT_ARGS.get(arch, {}),
        }
        if "image_size" in params:
            kwargs["image_size"] = [args.image_size, args.image_size]
        try:
            net = build_architecture(arch, kwargs).to(device)
            if args.channels_last:
                net = net.to(memory_format=torch.channels_last)
            infer = time_network(net, x, args.steps, args.warmup, args.precision, train=False)
            train = time_network(net, x, args.steps, args.warmup, args.precision, train=True)
        except Exception as e:  # noqa: BLE001 - report and go on with the other methods
            rows.append({"arch": arch, "error": f"{type(e).__name__}: {e}"[:120]})
            continue
        if arch == "baseline":
            base = {"infer": infer, "train": train}
        rows.append(
            {
                "arch": arch,
                "infer_img_s": infer,
                "train_img_s": train,
                "infer_ratio": infer / base["infer"],
                "train_ratio": train / base["train"],
            }
        )
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device={dev_name} backbone={args.backbone} image={args.image_size} batch={args.batch_size} "
        f"precision={args.precision} channels_last={args.channels_last}"
    )
    print(f"{'architecture':<16}{'infer img/s':>14}{'train img/s':>14}{'infer ratio':>13}{'train ratio':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['arch']:<16}  skipped: {r['error']}")
        else:
            print(
                f"{r['arch']:<16}{r['infer_img_s']:>14.0f}{r['train_img_s']:>14.0f}"
                f"{r['infer_ratio']:>13.2f}{r['train_ratio']:>13.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": dev_name, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
