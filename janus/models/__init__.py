"""DeepSeek-compatible public names: ``from janus.models import MultiModalityCausalLM, VLChatProcessor``.

Importing this package registers the ``multi_modality`` model type with transformers' Auto classes,
so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads Janus checkpoints
through our loader (no remote code is run).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import MultiModalityConfig
from .image_processing_vlm import VLMImageProcessor
from .modeling_vlm import MultiModalityCausalLM, MultiModalityPreTrainedModel
from .processing_vlm import VLChatProcessor

AutoConfig.register("multi_modality", MultiModalityConfig, exist_ok=True)
AutoModelForCausalLM.register(MultiModalityConfig, MultiModalityCausalLM, exist_ok=True)

__all__ = [
    "MultiModalityCausalLM",
    "MultiModalityConfig",
    "MultiModalityPreTrainedModel",
    "VLChatProcessor",
    "VLMImageProcessor",
]
