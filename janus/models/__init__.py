"""DeepSeek-compatible public names: ``from janus.models import MultiModalityCausalLM, VLChatProcessor``.

Taking any of these names registers the ``multi_modality`` model type with transformers' Auto classes,
so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads Janus checkpoints
through our loader (no remote code is run).

The names load on first use (PEP 562): the light submodules (``hub``: checkpoint files and the hub
cache; ``siglip_vit.tower_width``) are what a job's driver and its CPU tasks read, and importing the
package must not cost them torch, timm and transformers' models (~9 s of CPU per process on 2 cores).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from janus.utils.lazy import lazy_exports

#: public name -> the submodule that defines it
_EXPORTS = {
    "MultiModalityCausalLM": "modeling_vlm",
    "MultiModalityConfig": "configuration",
    "MultiModalityPreTrainedModel": "modeling_vlm",
    "VLChatProcessor": "processing_vlm",
    "VLMImageProcessor": "image_processing_vlm",
}

__all__ = [
    "MultiModalityCausalLM",
    "MultiModalityConfig",
    "MultiModalityPreTrainedModel",
    "VLChatProcessor",
    "VLMImageProcessor",
]

if TYPE_CHECKING:
    from .configuration import MultiModalityConfig
    from .image_processing_vlm import VLMImageProcessor
    from .modeling_vlm import MultiModalityCausalLM, MultiModalityPreTrainedModel
    from .processing_vlm import VLChatProcessor


# the model module first: it registers the Auto classes
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, first="modeling_vlm")
