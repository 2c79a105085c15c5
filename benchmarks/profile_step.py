"""Where a method's training step spends its time: ``torch.profiler`` over a few steps of
:mod:`benchmarks.throughput`'s step (the method's LightningModule, its own losses, one Adam step).

    python benchmarks/profile_step.py --model concept_whitening --backbone resnet18 --image-size 224 \
        --batch-size 64 --device cuda

Prints the operators that take the most device time (CPU time on CPU) and how many host synchronisations
(``cudaStreamSynchronize`` / ``aten::item`` / ``aten::_local_scalar_dense``) one step makes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.throughput import Stepper, build_module, data_info, image_batch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="concept_whitening")
    p.add_argument("--backbone", default="resnet18s")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.penalty_method=subbatch")
    args = p.parse_args()
    args.device = torch.device(args.device)
    gpu = args.device.type == "cuda"
    args.precision, args.channels_last = ("bf16", True) if gpu else ("fp32", False)
    if gpu:
        torch.backends.cudnn.benchmark = True
    channels = 1 if args.model in ("senn", "soft_autoencoder", "relu_ae") else 3
    task = "reconstruction" if args.model in ("soft_autoencoder", "relu_ae") else "classification"
    size = 32 if args.model == "senn" else args.image_size
    info = data_info(task, channels, size)
    overrides = [] if args.model in ("senn", "soft_autoencoder", "relu_ae") else [f"backbone={args.backbone}"]
    module = build_module(args.model, info, [*overrides, *args.overrides], args)
    step = Stepper(module, image_batch(args, args.batch_size, channels, size), args)
    for _ in range(3):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if gpu:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    with contextlib.suppress(Exception):
        key = "self_device_time_total" if gpu else key
    print(
        f"{args.model} on {args.backbone}, {size} px, batch {args.batch_size}, {args.device}: {args.steps} steps"
    )
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    syncs = {
        e.key: e.count
        for e in prof.key_averages()
        if e.key
        in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item", "aten::_local_scalar_dense")
    }
    print("host synchronisations per step:", {k: v / args.steps for k, v in syncs.items()})


if __name__ == "__main__":
    main()
