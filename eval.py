"""Evaluate a checkpoint or a bundle: ``python eval.py ckpt_path=<file.ckpt|bundle folder> [data=...]``.

A thin entry point for the checkout; the installed console script ``interpzoo-eval`` is the same command.
Rebuilds the model the checkpoint was written by (no ``model=`` needed), tests it on the configured
datamodule and writes ``metrics.json`` into the run directory.
"""

from interpzoo.cli import eval_main as main

if __name__ == "__main__":
    main()
