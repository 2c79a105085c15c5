"""The zoo: backbones, interpretable networks, the registry and bundles.

Importing it loads no training framework: each method's LightningModule lives in ``lit_<method>.py``
(``interpzoo.models.lit_protopnet``, ...) and is imported only by whoever trains.

>>> from interpzoo.models import create_model, list_models, load_pretrained
>>> net = create_model("baseline_resnet18s", num_classes=10)
"""

from interpzoo.models import (
    baseline,  # noqa: F401  (registers architectures)
    cbm,  # noqa: F401
    concept_whitening,  # noqa: F401
    icnn,  # noqa: F401
    pipnet,  # noqa: F401
    protopnet,  # noqa: F401
    senn,  # noqa: F401
    soft_autoencoder,  # noqa: F401
)
from interpzoo.models.backbones import build_backbone, list_backbones
from interpzoo.models.bundle import BundleError, load_pretrained, read_bundle_config, save_pretrained
from interpzoo.models.checkpoint import load_checkpoint
from interpzoo.models.registry import (
    create_model,
    list_architectures,
    list_models,
    list_pretrained,
    register_architecture,
    register_model,
)

__all__ = [
    "BundleError",
    "build_backbone",
    "create_model",
    "list_architectures",
    "list_backbones",
    "list_models",
    "list_pretrained",
    "load_checkpoint",
    "load_pretrained",
    "read_bundle_config",
    "register_architecture",
    "register_model",
    "save_pretrained",
]
