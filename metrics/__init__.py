"""Interpretability metrics: tensors in, numbers out (torchmetrics ``Metric``s with DDP-reducible state).

Nothing here imports a network, a datamodule, Lightning or matplotlib; report figures and metric callbacks
live in :mod:`interpzoo.reports`.
"""

from interpzoo.metrics.cbm import CBMEvalState, intervention_curve, probe_accuracy, soft_hard_accuracy
from interpzoo.metrics.concept_whitening import (
    ConceptAUC,
    ConceptSimilarity,
    PermutationImportance,
    WhiteningCorrelation,
)
from interpzoo.metrics.icnn import LocationInstability, part_dissection
from interpzoo.metrics.intrinsic_dim import twonn_dimension, twonn_ratios
from interpzoo.metrics.pipnet import (
    LocalExplanationSize,
    local_size,
    prototypes_per_class,
    sparsity_ratio,
)
from interpzoo.metrics.protopnet import (
    ExplanationSize,
    PrototypeClassPurity,
    PrototypeConsistency,
    PrototypePartPurity,
    PrototypeStability,
    global_size,
    prototype_unique,
)
from interpzoo.metrics.senn import (
    ConceptSparsity,
    DeadConcepts,
    LocalLipschitz,
    MeanScore,
    concept_faithfulness_scores,
    input_faithfulness_scores,
    local_lipschitz,
)
from interpzoo.metrics.soft_autoencoder import (
    CodeStatistics,
    code_sparsity,
    dead_units,
    hoyer_sparsity,
    psnr,
    ssim,
)

__all__ = ["twonn_dimension", "twonn_ratios"]
__all__ += ["CBMEvalState", "intervention_curve", "probe_accuracy", "soft_hard_accuracy"]
__all__ += ["CodeStatistics", "code_sparsity", "dead_units", "hoyer_sparsity", "psnr", "ssim"]
__all__ += ["ConceptAUC", "ConceptSimilarity", "PermutationImportance", "WhiteningCorrelation"]
__all__ += [
    "ConceptSparsity",
    "DeadConcepts",
    "LocalLipschitz",
    "MeanScore",
    "concept_faithfulness_scores",
    "input_faithfulness_scores",
    "local_lipschitz",
]
__all__ += ["LocationInstability", "part_dissection"]
__all__ += [
    "ExplanationSize",
    "PrototypeClassPurity",
    "PrototypeConsistency",
    "PrototypePartPurity",
    "PrototypeStability",
    "global_size",
    "prototype_unique",
]
__all__ += ["LocalExplanationSize", "local_size", "prototypes_per_class", "sparsity_ratio"]
