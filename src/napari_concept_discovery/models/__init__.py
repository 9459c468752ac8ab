"""Foundation-model backends: a channel-agnostic ViT on timm, OpenPhenom, any timm ViT, and the
bundled default model (docs/architecture.md, "Models").

``load_model(source)`` is the one entry point and ``list_models()`` what a menu offers; sources
are explicit (``registry``). Every backend offers ``tokens(batch, block)``, carries its own input
normalisation, and resolves blocks by one rule (``resolve_block``: None is its default block).
"""

from ._triton import triton_hidden_if_unsafe

# the first import of timm (vit, timm_vit): see _triton for why triton may be hidden
with triton_hidden_if_unsafe():
    from .backend import (
        Backend,
        ChannelAgnosticBackend,
        hash_state_dict,
        pick_device,
        scale_to_unit,
    )
    from .hub import cached_snapshot, hub_snapshot
    from .loading import (
        OPENPHENOM_PREFIX,
        OPENPHENOM_REPO,
        WEIGHTS_DIR,
        build_channel_agnostic,
        check_state_dict,
        infer_ca_architecture,
        intermediate_block,
        load_card_model,
        load_default,
        load_file,
        load_folder,
        load_openphenom,
        load_timm_checkpoint,
        read_state_dict,
        sniff_format,
    )
    from .registry import (
        SOURCE_FORMS,
        ModelInfo,
        ModelSource,
        list_models,
        load_model,
        parse_source,
        source_forms_text,
    )
    from .timm_vit import CHANNEL_RULES, TimmViTBackend
    from .vit import ChannelAgnosticViT, resolve_block, run_blocks, sincos_2d, standardize

__all__ = [
    "CHANNEL_RULES",
    "OPENPHENOM_PREFIX",
    "OPENPHENOM_REPO",
    "SOURCE_FORMS",
    "WEIGHTS_DIR",
    "Backend",
    "ChannelAgnosticBackend",
    "ChannelAgnosticViT",
    "ModelInfo",
    "ModelSource",
    "TimmViTBackend",
    "build_channel_agnostic",
    "cached_snapshot",
    "check_state_dict",
    "hash_state_dict",
    "hub_snapshot",
    "infer_ca_architecture",
    "intermediate_block",
    "list_models",
    "load_card_model",
    "load_default",
    "load_file",
    "load_folder",
    "load_model",
    "load_openphenom",
    "load_timm_checkpoint",
    "parse_source",
    "pick_device",
    "read_state_dict",
    "resolve_block",
    "run_blocks",
    "scale_to_unit",
    "sincos_2d",
    "sniff_format",
    "source_forms_text",
    "standardize",
]
