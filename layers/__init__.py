"""Reusable interpretable building blocks: pure PyTorch, no Lightning, no Hydra."""

from interpzoo.layers.cbm import ConceptHead, LabelPredictor, concept_loss, intervene, joint_loss
from interpzoo.layers.concept_whitening import ConceptWhitening2d, SyncConceptWhitening2d, pool_axes
from interpzoo.layers.icnn import (
    FilterAssignment,
    FilterLossOutput,
    InterpretableConv2d,
    PartFilterLoss,
    PartFilterMask,
    filter_loss,
    part_templates,
)
from interpzoo.layers.normalize import InputNormalize
from interpzoo.layers.pipnet import (
    NonNegLinear,
    PatchPrototypes,
    alignment_loss,
    pipnet_class_logits,
    pipnet_class_loss,
    presence_scores,
    tanh_loss,
)
from interpzoo.layers.protopnet import (
    PrototypeLayer,
    avg_separation_cost,
    cluster_cost,
    l1_off_class,
    linear_similarity,
    log_similarity,
    prototype_class_identity,
    separation_cost,
    squared_l2_distances,
)
from interpzoo.layers.senn import (
    BackboneConceptizer,
    BackboneParametrizer,
    BatchCouplingError,
    ConvAutoencoderConceptizer,
    ConvParametrizer,
    InputConceptizer,
    MLPAutoencoderConceptizer,
    MLPParametrizer,
    SumAggregator,
    concept_sparsity_loss,
    reconstruction_loss,
    robustness_loss,
    robustness_residual,
)
from interpzoo.layers.soft_autoencoder import SoftThreshold, haar_filters, soft_threshold

__all__ = ["InputNormalize"]
__all__ += ["ConceptHead", "LabelPredictor", "concept_loss", "intervene", "joint_loss"]
__all__ += ["SoftThreshold", "haar_filters", "soft_threshold"]
__all__ += ["ConceptWhitening2d", "SyncConceptWhitening2d", "pool_axes"]
__all__ += [
    "BackboneConceptizer",
    "BackboneParametrizer",
    "BatchCouplingError",
    "ConvAutoencoderConceptizer",
    "ConvParametrizer",
    "InputConceptizer",
    "MLPAutoencoderConceptizer",
    "MLPParametrizer",
    "SumAggregator",
    "concept_sparsity_loss",
    "reconstruction_loss",
    "robustness_loss",
    "robustness_residual",
]
__all__ += [
    "FilterAssignment",
    "FilterLossOutput",
    "InterpretableConv2d",
    "PartFilterLoss",
    "PartFilterMask",
    "filter_loss",
    "part_templates",
]
__all__ += [
    "PrototypeLayer",
    "avg_separation_cost",
    "cluster_cost",
    "l1_off_class",
    "linear_similarity",
    "log_similarity",
    "prototype_class_identity",
    "separation_cost",
    "squared_l2_distances",
]
__all__ += [
    "NonNegLinear",
    "PatchPrototypes",
    "alignment_loss",
    "pipnet_class_logits",
    "pipnet_class_loss",
    "presence_scores",
    "tanh_loss",
]
