"""Multi-scale segmentation models: ``image -> [P_0, ..., P_{L-1}]``, coarsest first.

Importing this package registers the built-in models (``pvt_emcad``, ``timm_unet``,
``small_unet``, ``dynunet``, ``adapter``) in :data:`fusionsearch.registry.MODELS`; timm and MONAI
are imported only when a model that needs them is built.
"""

from __future__ import annotations

from fusionsearch.models import dynunet, pvt_emcad, small_unet, timm_unet  # noqa: F401  (registration)
from fusionsearch.models.adapter import MultiScaleAdapter
from fusionsearch.models.base import MultiScaleModel, parameter_counts, resize_logits
from fusionsearch.models.build import build_model, model_options

__all__ = [
    "MultiScaleAdapter",
    "MultiScaleModel",
    "build_model",
    "model_options",
    "parameter_counts",
    "resize_logits",
]
