"""Soft autoencoder vs the matched ReLU autoencoder as AWGN denoisers, with wavelet shrinkage as reference.

One run trains, for every noise level σ, the soft AE and the ReLU AE with the same architecture,
data, seed and step budget, tests both on the same index-seeded noisy test images, and prints:

* PSNR / SSIM of the noisy input, of both networks, and of classical PyWavelets soft shrinkage
  (Haar and db2, universal threshold σ√(2 log N), and the best threshold multiple chosen on the
  validation split);
* code sparsity (exact zeros) and Hoyer sparsity per stage of both networks;
* the learned thresholds against σ: mean ``b`` per stage (code units) and the stage-1 thresholds in
  pixel-noise units (``SoftAutoencoder.pixel_thresholds``), which the shrinkage reading predicts to
  grow with σ.

    python benchmarks/soft_autoencoder.py                      # PartShapes grey 32x32, 300 steps
    python benchmarks/soft_autoencoder.py --data digits --steps 600 --sigmas 15,25,50

Only the paper's abstract is verified; its datasets and numbers
are not, so nothing here is compared with a published figure.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from interpzoo.api import quiet_trainer
from interpzoo.metrics.soft_autoencoder import psnr, ssim
from interpzoo.models.lit_base import batch_input
from interpzoo.models.lit_soft_autoencoder import SoftAutoencoderModule
from interpzoo.models.soft_autoencoder import universal_threshold, wavelet_shrinkage

MODELS = ("softae", "relu_ae")


def make_datamodule(args: argparse.Namespace) -> pl.LightningDataModule:
    if args.data == "partshapes":
        from interpzoo.datamodules.partshapes_dm import PartShapesDataModule

        # grayscale, and the renderer's own pixel noise off: the targets must be clean
        return PartShapesDataModule(
            n_train=args.n_train,
            n_val=args.n_val,
            n_test=args.n_test,
            grayscale=True,
            noise_std=0.0,
            cache=True,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    from interpzoo.datamodules.digits import DigitsDataModule

    return DigitsDataModule(image_size=32, batch_size=args.batch_size, seed=args.seed)


def stack_split(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    batch = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    return batch_input(batch), batch["index"]


def train_and_test(
    arch: str, sigma: float, dm: pl.LightningDataModule, args: argparse.Namespace
) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    module = SoftAutoencoderModule(
        net={"name": arch, "widths": args.widths, "stride": args.stride, "kernel_size": 3},
        data_info=dm.data_info,
        optimizer={"name": "adam", "lr": args.lr},
        scheduler=None,
        noise_std=sigma,
    )
    trainer = quiet_trainer(max_steps=args.steps, max_epochs=-1)
    start = time.time()
    trainer.fit(module, datamodule=dm)
    seconds = time.time() - start
    metrics = {k: float(v) for k, v in trainer.test(module, datamodule=dm, verbose=False)[0].items()}
    net = module.net
    pixel = net.pixel_thresholds()
    return {
        "metrics": metrics,
        "seconds": seconds,
        "params": sum(p.numel() for p in net.parameters()),
        "thresholds": {k: float(v.mean()) for k, v in net.thresholds().items()},
        "pixel_threshold": None if pixel is None else float(pixel.mean()),
        "module": module,
    }


def wavelet_rows(
    sigma: float, module: SoftAutoencoderModule, dm: pl.LightningDataModule
) -> list[dict[str, Any]]:
    """Classical soft shrinkage on the same noisy test images (the module's seeded noise)."""
    rows = []
    val_x, val_i = stack_split(dm.val_set)
    test_x, test_i = stack_split(dm.test_set)
    val_noisy = module.add_noise(val_x, val_i, "val")
    test_noisy = module.add_noise(test_x, test_i, "test")
    n_pix = test_x.shape[-1] * test_x.shape[-2]
    for wavelet in ("haar", "db2"):
        universal = universal_threshold(sigma, n_pix)
        # the best multiple of sigma on the validation split: an oracle-ish but honest classical line
        grid = [m * sigma for m in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)]
        best = max(
            grid, key=lambda t: float(psnr(wavelet_shrinkage(val_noisy, t, wavelet).clamp(0, 1), val_x))
        )
        for label, t in (("universal", universal), ("val-tuned", best)):
            den = wavelet_shrinkage(test_noisy, t, wavelet).clamp(0, 1)
            rows.append(
                {
                    "name": f"{wavelet} soft shrinkage, {label} (t = {t / sigma:.2f} sigma)",
                    "psnr": float(psnr(den, test_x)),
                    "ssim": float(ssim(den, test_x)),
                }
            )
    return rows


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("partshapes", "digits"), default="partshapes")
    p.add_argument("--sigmas", default="15,25,50", help="noise sigmas in 0..255 units")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--widths", default="16,32,64")
    p.add_argument("--stride", default="1,2,2")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (1: on a shared 2-core machine 2 threads ran ~30x slower)",
    )
    args = p.parse_args()
    args.widths = [int(w) for w in args.widths.split(",")]
    args.stride = [int(s) for s in args.stride.split(",")]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")

    dm = make_datamodule(args)
    dm.setup("fit")
    sigmas = [int(s) for s in args.sigmas.split(",")]
    stages = [f"stage{i + 1}" for i in range(len(args.widths))]
    start = time.time()
    print(
        f"data={args.data} train={len(dm.train_set)} test={len(dm.test_set)} steps={args.steps} "
        f"batch={args.batch_size} widths={args.widths} stride={args.stride} threads={args.threads}"
    )

    table = [
        "| sigma | denoiser | PSNR (dB) | SSIM | sparsity "
        + "/".join(s[-1] for s in stages)
        + " | Hoyer "
        + "/".join(s[-1] for s in stages)
        + " | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    thr_table = [
        "| sigma | mean b " + " / ".join(stages) + " (code units) | stage-1 b in pixel units (x255) "
        "| stage-1 b / sigma |",
        "|---|---|---|---|",
    ]
    for s in sigmas:
        sigma = s / 255
        results = {arch: train_and_test(arch, sigma, dm, args) for arch in MODELS}
        soft = results["softae"]
        m0 = soft["metrics"]
        table.append(f"| {s} | noisy input | {fmt(m0['test/psnr_noisy'])} | - | - | - | - |")
        for arch in MODELS:
            r = results[arch]
            m = r["metrics"]
            sp = "/".join(fmt(m.get(f"test/code_sparsity/{st}")) for st in stages)
            ho = "/".join(fmt(m.get(f"test/hoyer_sparsity/{st}")) for st in stages)
            name = {"softae": "soft AE", "relu_ae": "ReLU AE"}[arch]
            table.append(
                f"| {s} | {name} ({r['params']} params) | {fmt(m['test/psnr'])} | {fmt(m['test/ssim'], 3)} "
                f"| {sp} | {ho} | {r['seconds']:.0f} |"
            )
        for row in wavelet_rows(sigma, soft["module"], dm):
            table.append(f"| {s} | {row['name']} | {fmt(row['psnr'])} | {fmt(row['ssim'], 3)} | - | - | - |")
        gap = results["softae"]["metrics"]["test/psnr"] - results["relu_ae"]["metrics"]["test/psnr"]
        table.append(
            f"| {s} | **soft - ReLU** | **{gap:+.2f}** | "
            f"{results['softae']['metrics']['test/ssim'] - results['relu_ae']['metrics']['test/ssim']:+.3f} "
            "| | | |"
        )
        pix = soft["pixel_threshold"]
        thr_table.append(
            f"| {s} | "
            + " / ".join(fmt(soft["thresholds"][st], 3) for st in stages)
            + f" | {fmt(pix * 255 if pix is not None else None, 1)} "
            f"| {fmt(pix / sigma if pix is not None else None, 2)} |"
        )
        print(f"sigma {s}/255 done ({time.time() - start:.0f} s)", flush=True)

    print()
    print("\n".join(table))
    print()
    print("\n".join(thr_table))
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
