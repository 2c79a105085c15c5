"""What every logged metric is, so that a number is never read as more comparable than it is.

A run logs three sorts of numbers next to each other:

* **task** numbers (accuracy, losses, PSNR): read as they are;
* **scored** interpretability numbers, which measure an explanation against ground truth. On data with
  ground truth (PartShapes) each comes with ``_ceiling`` (what a perfect explanation built from the ground
  truth scores on the same data), ``_random`` (what a meaningless one scores) and ``_norm`` =
  ``(raw - random) / (ceiling - random)`` (:mod:`interpzoo.metrics.calibration`). Without ground truth
  (real data) the same name is logged alone, and :func:`describe` says it has **no ceiling on this data**;
* **descriptive** numbers (sizes, counts, numerical diagnostics, stability bounds): they describe the
  model, not how right its explanation is, and have no ceiling by nature. :func:`describe` says so and
  names the scored metric to read instead where there is one.

:func:`describe` classifies the metrics of a run (``metrics.json``); the run writes the result next to it
as ``metrics_kinds.json`` and prints the table with the ceiling, random and normalised columns. A metric
name the catalog does not know is reported as ``unclassified``: the tests fail on it, so a new metric
cannot be logged without saying what it is.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

__all__ = ["CATALOG", "REFERENCE_SUFFIXES", "describe", "kind_of", "summary_rows"]

REFERENCE_SUFFIXES = ("_ceiling", "_random", "_norm")
_STAGE = re.compile(r"^(train|val|test|push)/")

# (glob on the name without its stage prefix, kind, what it is). First match wins.
CATALOG: tuple[tuple[str, str, str], ...] = (
    # task
    ("acc", "task", "classification accuracy"),
    ("acc_*", "task", "classification accuracy (best so far / after push)"),
    ("loss", "task", "training objective"),
    ("loss_*", "task", "a term of the training objective"),
    ("robustness", "task", "SENN's robustness penalty (a loss term)"),
    ("filter_loss", "task", "ICNN's filter loss (a loss term)"),
    ("psnr", "task", "denoising PSNR (dB)"),
    ("psnr_noisy", "task", "PSNR of the noisy input (dB): what denoising starts from"),
    ("ssim", "task", "denoising SSIM"),
    ("reconstruction_mse", "task", "reconstruction error of the concept autoencoder"),
    ("cw_tau", "task", "Cayley step size of the last rotation update (optimiser state)"),
    ("params/*", "task", "parameter counts"),
    # scored against ground truth: _ceiling/_random/_norm where the data has it
    ("gt/*", "scored", "ground-truth scorecard on held-out varied-pose PartShapes"),
    ("prototype_consistency", "scored", "% prototypes whose activation lands on one part in most images"),
    ("prototype_stability", "scored", "% images where a prototype stays on its part under noise"),
    ("prototype_part_purity", "scored", "share of a prototype's top patches on its modal part"),
    ("prototype_class_purity", "scored", "share of a prototype's k nearest images of its class"),
    ("prototype_prune_fraction", "scored", "share of prototypes that ProtoPNet's pruning rule would remove"),
    ("concept_auc/*", "scored", "AUC of a concept axis on held-out concept images"),
    ("concept_auc_mean", "scored", "mean AUC of the concept axes"),
    ("part_iou", "scored", "IoU of a filter's thresholded map with its part"),
    ("part_detection_rate", "scored", "share of filters whose part IoU exceeds 0.2"),
    ("faithfulness", "scored", "corr(relevance, probability drop when the concept is removed)"),
    ("faithfulness_median", "scored", "faithfulness with concepts set to their training median"),
    ("faithfulness_input", "scored", "faithfulness over input features (input conceptizer)"),
    # post-hoc baselines logged next to a scored metric
    ("concept_auc_best_filter/*", "baseline", "AUC of the best single filter of the matched BN model"),
    ("concept_auc_cav/*", "baseline", "AUC of a linear probe (CAV) on the matched BN model"),
    # descriptive: no ceiling by nature
    (
        "explanation_size",
        "descriptive",
        "prototypes needed for 80 % of the positive evidence (smaller = terser)",
    ),
    ("global_size", "descriptive", "prototypes with a non-zero class weight"),
    ("prototype_unique", "descriptive", "share of pushed prototypes on distinct training patches"),
    ("prototype_part_purity_std", "descriptive", "spread of part purity over prototypes"),
    ("prototype_part_related", "descriptive", "prototypes with part purity > 0.5 (count)"),
    ("push_distance", "descriptive", "mean latent distance a prototype moved when pushed"),
    ("push_gap", "descriptive", "validation accuracy lost by the last push"),
    ("mean_distance", "descriptive", "mean push distance"),
    ("n_unique", "descriptive", "distinct push sources"),
    ("n_missing", "descriptive", "prototypes without a push candidate"),
    ("n_pruned", "descriptive", "prototypes pruned"),
    ("explanation_size_any_class", "descriptive", "PIP-Net: prototypes with a non-zero score for any class"),
    ("nonzero_weights", "descriptive", "PIP-Net: non-zero weights of the linear layer (count)"),
    ("prototypes_per_class", "descriptive", "PIP-Net: prototypes with a non-zero weight per class"),
    ("sparsity_ratio", "descriptive", "PIP-Net: share of zero weights in the linear layer"),
    ("prototypes_present", "descriptive", "PIP-Net: prototypes present (score > 0.1) in a batch"),
    ("pretrain", "task", "PIP-Net: 1 during the self-supervised pretraining phase"),
    ("concept_auc_min", "scored", "CBM: worst concept's AUC of the predicted concepts"),
    ("concept_acc", "task", "CBM: accuracy of the thresholded concept predictions"),
    ("true_concept_acc", "task", "CBM: accuracy of f on the true concepts (the intervention curve's end)"),
    ("intervention/*", "task", "CBM: accuracy after intervening on a share of the concepts"),
    (
        "leakage_*",
        "descriptive",
        "CBM: information beyond the concepts in the soft bottleneck (metrics/cbm.py)",
    ),
    ("intrinsic_dim/*", "descriptive", "TwoNN intrinsic dimension of a layer's features"),
    ("concept_auc_fold_std", "descriptive", "spread of concept AUC across folds"),
    ("concept_similarity_offdiag", "descriptive", "mean |cosine| between concept axes' activations"),
    ("concept_importance/*", "descriptive", "loss increase when a concept axis is permuted"),
    ("concept_importance_acc/*", "descriptive", "error increase when a concept axis is permuted"),
    (
        "whitening_offdiag_corr",
        "descriptive",
        "numerical check: off-diagonal correlation after whitening (0 ideal)",
    ),
    ("whitening_cov_error", "descriptive", "numerical check: ||cov - I|| after whitening (0 ideal)"),
    ("rotation_orthogonality_error", "descriptive", "numerical check: ||R^T R - I|| (0 ideal)"),
    (
        "location_instability",
        "scored",
        "ICNN's spread of a filter's inferred part position around the landmarks (lower is better)",
    ),
    ("num_part_detectors", "descriptive", "filters that pass the part-detector test (count)"),
    ("num_unique_parts", "descriptive", "distinct parts detected by some filter (count)"),
    ("filter_mi", "descriptive", "mutual information between filters and templates"),
    ("inter_category_entropy", "descriptive", "entropy of a filter's response over categories"),
    ("spatial_entropy", "descriptive", "entropy of a filter's response over positions"),
    ("concept_sparsity", "descriptive", "share of near-zero concept activations"),
    ("dead_concepts", "descriptive", "concepts that never activate (count)"),
    ("concept_l1", "descriptive", "mean L1 norm of the concept vector"),
    ("relevance_abs", "descriptive", "mean |theta|"),
    (
        "lipschitz",
        "descriptive",
        "local Lipschitz estimate of the explanation (lower = steadier; 0 for a constant one)",
    ),
    ("lipschitz_*", "descriptive", "local Lipschitz estimate of the explanation (lower = steadier)"),
    ("code_sparsity/*", "descriptive", "share of zero codes (see gt/threshold_tracking)"),
    ("dead_units/*", "descriptive", "code units that never fire (count)"),
    ("all_zero_codes/*", "descriptive", "images whose whole code is zero"),
    ("hoyer_sparsity/*", "descriptive", "Hoyer sparsity of the code"),
    ("hoyer_population/*", "descriptive", "Hoyer population sparsity of the code"),
    ("threshold_mean/*", "descriptive", "mean learned soft threshold (see gt/threshold_tracking)"),
    ("threshold_pixel/*", "descriptive", "learned threshold in pixel units"),
)


def _bare(name: str) -> str:
    return _STAGE.sub("", name, count=1)


def kind_of(name: str) -> tuple[str, str]:
    """``(kind, what)`` of a metric name (with or without its ``val/``/``test/`` prefix).

    ``kind`` is ``task``, ``scored``, ``baseline``, ``descriptive``, ``reference`` (a ``_ceiling``,
    ``_random`` or ``_norm`` sibling) or ``unclassified``.
    """
    bare = _bare(name)
    for suffix in REFERENCE_SUFFIXES:
        if bare.endswith(suffix):
            return "reference", f"{suffix[1:]} of {name[: -len(suffix)]}"
    for pattern, kind, what in CATALOG:
        if fnmatch.fnmatchcase(bare, pattern):
            return kind, what
    return "unclassified", "not in interpzoo.metrics.catalog.CATALOG"


def describe(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {"kind", "what", "read"}}`` for every metric of a run.

    ``read`` says how to read the number on this run's data: a scored metric logged with its ceiling and
    random baseline reads ``"normalised: <name>_norm"``; one logged without them reads ``"no ceiling on this
    data: not comparable across datasets or models"`` (real data has no ground-truth parts or concepts).
    """
    out: dict[str, dict[str, Any]] = {}
    for name in metrics:
        kind, what = kind_of(name)
        if kind == "scored":
            if f"{name}_ceiling" in metrics and f"{name}_random" in metrics:
                read = f"normalised: {name}_norm (1 = the ground-truth oracle, 0 = random)"
            elif f"{name}_random" in metrics:
                read = f"against chance: {name}_random (no ground-truth ceiling on this data)"
            else:
                read = "no ceiling on this data: not comparable across datasets or models"
        elif kind == "descriptive":
            read = "descriptive: no ground truth, no ceiling"
        elif kind == "baseline":
            read = "a post-hoc baseline on the matched black box, read next to the model's scored metric"
        elif kind == "reference":
            read = "reference of a scored metric"
        elif kind == "task":
            read = "task performance"
        else:
            read = "unclassified"
        out[name] = {"kind": kind, "what": what, "read": read}
    return out


def summary_rows(metrics: dict[str, float]) -> list[tuple[str, str, str, str, str, str]]:
    """Rows ``(name, value, ceiling, random, norm, kind)`` of the end-of-run table: a scored metric's
    references are folded into its row; ``-`` where a metric has none."""

    def fmt(v: Any) -> str:
        return f"{float(v):.4f}" if v is not None else "-"

    info = describe(metrics)
    rows = []
    for name in sorted(metrics):
        kind = info[name]["kind"]
        if kind == "reference" and name[: name.rfind("_")] in metrics:
            continue
        refs = [metrics.get(f"{name}{s}") for s in REFERENCE_SUFFIXES]
        label = kind
        if kind == "scored" and refs[0] is None:
            label = "scored, no ceiling on this data"
        rows.append((name, fmt(metrics[name]), *(fmt(r) for r in refs), label))
    return rows
