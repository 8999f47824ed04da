"""transformers' native Janus (``JanusForConditionalGeneration``) on the very weights of one of our models.

The benchmark compares our engine with transformers' own ``generate(generation_mode="image")``. To be
fair both must run the same weights, so the loaded official-layout model is converted to HF's layout:
the inverse of ``tests.support.hf_janus.official_state_dict_from_hf`` (whose name mapping
``conversion_plan`` is reused: one official tensor per HF tensor, except SigLIP's fused ``qkv``,
which is split back into q, k, v, and ``pos_embed`` [1, N, W] -> ``position_embedding`` [N, W]).
Official tensors with no HF counterpart (the unused ``attn_pool`` head, ``codebook_used``) are dropped.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import GenerationConfig, JanusForConditionalGeneration

from janus.engine.common import sync

# the (tested) official <-> HF name mapping lives with the tests that check it
from tests.support.hf_janus import conversion_plan, hf_janus_config, rope_theta

#: hf_janus_config's keywords that are the language model config's fields of the same name
_LANGUAGE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
)  # fmt: skip
#: hf_janus_config's VQ keywords -> the fields of our VQ config
_VQ_FIELDS = {
    "vq_ch": "ch", "vq_z_channels": "z_channels", "vq_num_res_blocks": "num_res_blocks",
    "codebook_size": "codebook_size", "codebook_dim": "codebook_embed_dim",
}  # fmt: skip


def hf_config_for(model, processor):
    """The ``JanusConfig`` that describes ``model`` (a loaded ``MultiModalityCausalLM``)."""
    lc = model.config.language_config
    tower = model.vision_model.vision_tower
    block = tower.blocks[0]
    vq = model.gen_vision_model.config
    tok = processor.tokenizer
    return hf_janus_config(
        **{name: getattr(lc, name) for name in _LANGUAGE_FIELDS},
        rope_theta=rope_theta(lc),
        vision_width=tower.embed_dim,
        vision_layers=len(tower.blocks),
        vision_heads=block.attn.num_heads,
        vision_mlp_ratio=block.mlp.fc1.out_features / tower.embed_dim,
        image_size=tower.patch_embed.img_size[0],
        patch_size=tower.patch_embed.patch_size[0],
        vq_ch_mult=tuple(vq.ch_mult),
        **{name: getattr(vq, field) for name, field in _VQ_FIELDS.items()},
        image_token_id=processor.image_id,
        pad_token_id=processor.pad_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def hf_state_dict_from_official(official: dict[str, torch.Tensor], hf_names) -> dict[str, torch.Tensor]:
    """Official tensors -> HF names (``hf_names``: every key of the target HF model's state dict)."""
    plan = conversion_plan(hf_names)
    out: dict[str, torch.Tensor] = {}
    for name, sources in plan.items():
        value = official[name]
        if len(sources) == 3:  # timm's fused qkv rows [q; k; v]
            for src, part in zip(sources, value.chunk(3, dim=0), strict=True):
                out[src] = part
        elif name.endswith("vision_tower.pos_embed"):
            out[sources[0]] = value.squeeze(0)
        else:
            out[sources[0]] = value
    return out


def hf_janus_from_model(model, processor) -> JanusForConditionalGeneration:
    """An HF Janus sharing no memory with ``model`` but holding exactly its weights (same dtype/device)."""
    param = next(model.parameters())
    config = hf_config_for(model, processor)
    # Built for real (not on "meta"): its non-persistent buffers (rotary inv_freq) must be computed.
    # Built on the model's device: a 7B HF Janus initialised on the CPU takes minutes.
    with torch.device(param.device):
        hf = JanusForConditionalGeneration(config)
    state = hf_state_dict_from_official(model.state_dict(), hf.state_dict().keys())
    hf.load_state_dict(state, strict=True)  # copies: shares no memory with ``model``
    hf = hf.to(device=param.device, dtype=param.dtype).eval()
    hf.generation_config = image_generation_config(processor)
    return hf


def image_generation_config(
    processor, *, cfg_weight: float = 5.0, temperature: float = 1.0
) -> GenerationConfig:
    """DeepSeek's sampling in HF terms: CFG 5, plain softmax sampling (HF's default top_k=50 switched off)."""
    tok = processor.tokenizer
    greedy = temperature == 0
    return GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_k=0,
        top_p=1.0,
        guidance_scale=cfg_weight,
        num_return_sequences=1,
        pad_token_id=processor.pad_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        generation_kwargs={"boi_token_id": processor.image_start_id},
    )


@torch.inference_mode()
def hf_generate_images(
    hf: JanusForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    timings: dict[str, float] | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """B left-padded prompts -> (codes [B, 576], uint8 images [B, H, W, 3]) with transformers' own loop.

    ``timings`` (if given) receives llm_s (``generate``) and vq_decode_s (``decode_image_tokens``).
    """
    t0 = time.perf_counter()
    codes = hf.generate(input_ids, attention_mask=attention_mask, generation_mode="image")
    sync(codes.device)
    t1 = time.perf_counter()
    pixels = hf.decode_image_tokens(codes).float().cpu().numpy()  # [B, H, W, 3] in [-1, 1]
    images = np.clip((pixels + 1) / 2 * 255, 0, 255).astype(np.uint8)
    if timings is not None:
        timings["llm_s"] = t1 - t0
        timings["vq_decode_s"] = time.perf_counter() - t1
    return codes, images
