"""transformers' own Janus (``JanusForConditionalGeneration``) as a checkpoint in DeepSeek's official
on-disk layout, so that our ``janus`` package is compared numerically against an independent
implementation, never against its own numbers.

``configs``: HF configs that match DeepSeek's architecture; ``official_layout``: the official
``config.json`` and tensor shapes; ``conversion``: HF tensors -> official names, checkpoint writing.
"""

from .configs import (
    ARCHITECTURE_NOTES,
    check_hf_config_supported,
    full_hf_janus_config,
    hf_janus_config,
    rope_theta,
    tiny_hf_janus_config,
)
from .conversion import (
    conversion_plan,
    official_key_for_hf,
    official_state_dict_from_hf,
    randomize_,
    write_official_checkpoint_from_hf,
)
from .official_layout import (
    OFFICIAL_VISION_DEFAULTS,
    OFFICIAL_VQ_DEFAULTS,
    official_config_from_hf,
    official_tensor_shapes,
)

__all__ = [
    "ARCHITECTURE_NOTES",
    "OFFICIAL_VISION_DEFAULTS",
    "OFFICIAL_VQ_DEFAULTS",
    "check_hf_config_supported",
    "conversion_plan",
    "full_hf_janus_config",
    "hf_janus_config",
    "official_config_from_hf",
    "official_key_for_hf",
    "official_state_dict_from_hf",
    "official_tensor_shapes",
    "randomize_",
    "rope_theta",
    "tiny_hf_janus_config",
    "write_official_checkpoint_from_hf",
]
