"""Foundation-model backends: a channel-agnostic ViT on timm, OpenPhenom, any timm ViT, and the
bundled default model. ``load_model`` is the one entry point; every backend offers
``tokens(batch, block)`` and carries its own input normalisation.
"""

from .backend import (
    Backend,
    ChannelAgnosticBackend,
    hash_file,
    hash_state_dict,
    pick_device,
    scale_to_unit,
)
from .loading import (
    OPENPHENOM_PREFIX,
    OPENPHENOM_REPO,
    WEIGHTS_DIR,
    check_state_dict,
    infer_ca_architecture,
    load_card_model,
    load_default,
    load_model,
    load_openphenom,
    load_timm_checkpoint,
    read_state_dict,
    sniff_format,
)
from .timm_vit import CHANNEL_RULES, TimmViTBackend
from .vit import ChannelAgnosticViT, sincos_2d, standardize

__all__ = [
    "CHANNEL_RULES",
    "OPENPHENOM_PREFIX",
    "OPENPHENOM_REPO",
    "WEIGHTS_DIR",
    "Backend",
    "ChannelAgnosticBackend",
    "ChannelAgnosticViT",
    "TimmViTBackend",
    "check_state_dict",
    "hash_file",
    "hash_state_dict",
    "infer_ca_architecture",
    "load_card_model",
    "load_default",
    "load_model",
    "load_openphenom",
    "load_timm_checkpoint",
    "pick_device",
    "read_state_dict",
    "scale_to_unit",
    "sincos_2d",
    "sniff_format",
    "standardize",
]
