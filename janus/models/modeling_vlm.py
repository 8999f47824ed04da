"""MultiModalityCausalLM: Janus / Janus-Pro, with DeepSeek's public names and checkpoint keys.

Understanding: pixels -> SigLIP tower -> ``aligner`` -> spliced into the LLM's input embeddings.
Generation:    LLM hidden state -> ``gen_head`` -> VQ code; code -> ``gen_embed`` -> ``gen_aligner``
               -> next LLM input; 576 codes -> ``gen_vision_model.decode_code`` -> pixels.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from einops import rearrange
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel

from .clip_encoder import CLIPVisionTower
from .configuration import MultiModalityConfig
from .loading import load_janus_model
from .projector import MlpProjector, vision_head
from .vq_model import VQ_16

logger = logging.getLogger(__name__)

_BUILDERS = {
    "CLIPVisionTower": lambda p: CLIPVisionTower(**p),
    "MlpProjector": MlpProjector,
    "VQ-16": lambda p: VQ_16(**p),
    "vision_head": vision_head,
}


def model_name_to_cls(cls_name: str):
    """DeepSeek's lookup from a config ``cls`` string to a constructor."""
    try:
        return _BUILDERS[cls_name]
    except KeyError:
        raise ValueError(f"class {cls_name!r} is not supported; known: {sorted(_BUILDERS)}") from None


class MultiModalityPreTrainedModel(PreTrainedModel):
    config_class = MultiModalityConfig
    base_model_prefix = "multi_modality"
    _no_split_modules = ["LlamaDecoderLayer", "Block"]
    _skip_keys_device_placement = "past_key_values"


class MultiModalityCausalLM(MultiModalityPreTrainedModel):
    def __init__(self, config: MultiModalityConfig):
        super().__init__(config)
        self.vision_model = model_name_to_cls(config.vision_config.cls)(config.vision_config.params)
        self.aligner = model_name_to_cls(config.aligner_config.cls)(config.aligner_config.params)
        gen_params = config.gen_vision_config.params
        self.gen_vision_model = model_name_to_cls(config.gen_vision_config.cls)(gen_params)
        self.gen_aligner = model_name_to_cls(config.gen_aligner_config.cls)(config.gen_aligner_config.params)
        self.gen_head = model_name_to_cls(config.gen_head_config.cls)(config.gen_head_config.params)
        vq = self.gen_vision_model.config
        self.gen_embed = nn.Embedding(vq.codebook_size, vq.codebook_embed_dim)
        self.language_model = LlamaForCausalLM(config.language_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Weights always come from a checkpoint (or the tiny-checkpoint writer); nothing to do here.
        return

    # -- understanding ---------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> aligned image embeddings [n, 576, D] in the LLM's dtype."""
        dtype = self.aligner_dtype
        return self.aligner(self.vision_model(pixel_values.to(dtype)))

    def prepare_inputs_embeds(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor,
        images_seq_mask: torch.BoolTensor,
        images_emb_mask: torch.BoolTensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Text embeddings with the image-token positions replaced by image embeddings.

        Shapes: input_ids [b, T], pixel_values [b, n, 3, H, W], images_seq_mask [b, T],
        images_emb_mask [b, n, t]. Padding images (all-False rows of images_emb_mask) are not
        run through the vision tower: their embeddings are never used.
        """
        b, n = pixel_values.shape[:2]
        emb_mask = rearrange(images_emb_mask, "b n t -> (b n) t")
        used = emb_mask.any(dim=1)
        flat_pixels = rearrange(pixel_values, "b n c h w -> (b n) c h w")
        inputs_embeds = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))
        n_seq = int(images_seq_mask.sum())
        if n_seq != int(emb_mask[used].sum()):
            raise ValueError(
                f"{n_seq} image-token positions in the prompt but {int(emb_mask.sum())} image embeddings: "
                "the number of <image_placeholder> tags must match the number of images"
            )
        if n_seq == 0:
            return inputs_embeds
        image_embeds = self.encode_images(flat_pixels[used])
        inputs_embeds[images_seq_mask] = image_embeds[emb_mask[used]].to(inputs_embeds.dtype)
        return inputs_embeds

    # -- generation --------------------------------------------------------------------------
    def prepare_gen_img_embeds(self, image_ids: torch.LongTensor) -> torch.Tensor:
        return self.gen_aligner(self.gen_embed(image_ids))

    @property
    def aligner_dtype(self) -> torch.dtype:
        return next(self.aligner.parameters()).dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def forward(self, *args, **kwargs):
        """Run the language model (as DeepSeek's class, the LLM is the only forward)."""
        return self.language_model(*args, **kwargs)

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: MultiModalityConfig | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        device_map: Any = None,
        storage_options: dict | None = None,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> MultiModalityCausalLM:
        """Load a checkpoint from a local dir, a hub id or an fsspec URL (see ``janus.models.loading``).

        Accepts (and ignores) the hub arguments ``AutoModelForCausalLM`` passes through, such as
        ``trust_remote_code``: no remote code is ever run.
        """
        if model_args:
            raise TypeError("MultiModalityCausalLM.from_pretrained takes no positional model arguments")
        ignored = set(kwargs) - _IGNORED_HF_KWARGS
        if ignored:
            logger.warning("ignoring unsupported from_pretrained arguments: %s", sorted(ignored))
        if device is None and isinstance(device_map, (str, torch.device)):
            device = device_map
        return load_janus_model(
            pretrained_model_name_or_path,
            cls,
            config=config,
            dtype=dtype if dtype is not None else torch_dtype,
            device=device,
            storage_options=storage_options,
            cache_dir=cache_dir,
            revision=revision,
            local_files_only=local_files_only,
        )


_IGNORED_HF_KWARGS = {
    "trust_remote_code",
    "token",
    "use_auth_token",
    "force_download",
    "proxies",
    "subfolder",
    "low_cpu_mem_usage",
    "attn_implementation",
    "use_safetensors",
    "_from_auto",
    "_from_pipeline",
    "adapter_kwargs",
    "code_revision",
    "return_unused_kwargs",
    "key_mapping",
}


# Wherever the model class is imported from (``janus.models`` or this module), the Auto classes know it.
AutoConfig.register("multi_modality", MultiModalityConfig, exist_ok=True)
AutoModelForCausalLM.register(MultiModalityConfig, MultiModalityCausalLM, exist_ok=True)
