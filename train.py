"""Train an interpzoo model: ``python train.py [model=...] [data=...] [backbone=...] [trainer=...] ...``.

A thin entry point for the checkout; the installed console script ``interpzoo-train`` is the same command.
Composes ``conf/train.yaml`` with Hydra, validates the config, fits, tests the best checkpoint, exports a
bundle and writes ``metrics.json`` into the run directory (see README.md).
"""

from interpzoo.cli import train_main as main

if __name__ == "__main__":
    main()
