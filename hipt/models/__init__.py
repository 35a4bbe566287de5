"""The HIPT models: ViT-256, ViT-4K, the region encoder and the slide-level models.

Build them by name with :func:`create_model`; :func:`list_models` lists the names.
"""

import hipt.models.slide  # noqa: E402, F401  (registers hipt_lgp, hipt_gp, abmil)
import hipt.models.vit  # noqa: E402, F401  (registers vit256_s16, vit4k_xs)
from hipt.models.registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
