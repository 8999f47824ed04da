"""HF ``JanusConfig`` objects that describe DeepSeek's architecture, at tiny, full or any size.

transformers' Janus can express more than DeepSeek's layout (tied embeddings, other activations,
qk-norm, ...); these builders pin every setting where the two agree, and
``check_hf_config_supported`` refuses a config that the official checkpoint format cannot hold.
``ARCHITECTURE_NOTES`` records what still differs between the two implementations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import JanusConfig

ARCHITECTURE_NOTES = """\
HF Janus (transformers 5.x) vs DeepSeek Janus / LlamaGen VQ-16, component by component.
Same (given the settings of tiny_hf_janus_config / full_hf_janus_config):
- SigLIP tower: no class token, learned pos-embed added (no interpolation at 384), pre-norm blocks, LayerNorm eps 1e-6
  (HF layer_norm_eps must stay 1e-6), exact-erf GELU in the MLP (HF hidden_act "gelu" -> F.gelu == timm nn.GELU),
  attention scale head_dim**-0.5, q/k/v biases, final norm applied, all layers used (select_layer -1), no pooling head.
- Aligners: Linear -> GELU(exact) -> Linear (HF depth / num_hidden_layers 2; activation = vision / vq hidden_act "gelu").
- Gen head: Linear -> GELU(exact) -> Linear.
- VQ blocks: GroupNorm(32, eps 1e-6, affine), swish x*sigmoid(x), 1x1 nin_shortcut when channels change, single-head
  spatial attention scaled by C**-0.5, downsample = pad (0,1,0,1) + 3x3 stride-2 conv, upsample = nearest x2 + 3x3 conv,
  decoder num_res_blocks + 1 per level, attention only at the lowest resolution, mid = res, attn, res.
- decode: codebook rows l2-normalised, reshaped to [B, 8, 24, 24], post_quant_conv, decoder.
Differences:
1. VQ encode (image -> ids): DeepSeek (codebook_l2_norm=True) l2-normalises the latents AND the codebook before the
   nearest-code search and returns normalised vectors; HF's JanusVQVAEVectorQuantizer.forward uses raw latents and
   the raw codebook. Encoder features (encoder + quant_conv) match; ids / quantised outputs can differ.
2. VQ Upsample: DeepSeek casts non-fp32 input to fp32 for F.interpolate and back to *bfloat16* (hard-coded);
   HF interpolates in the input dtype. Values equal (nearest is a copy); only the dtype differs for fp16 inputs.
3. HF JanusVQVAE.decode fixes the latent grid to (image_size // patch_size)^2 (24x24) from the vision config;
   DeepSeek's decode_code takes the shape as an argument.
4. HF has no attn_pool (SigLIP MAP head) and no codebook_used buffer; both are unused at inference.
5. HF JanusConfig.tie_word_embeddings defaults to True (lm_head shares embed_tokens); official checkpoints hold a
   separate lm_head: set tie_word_embeddings=False (tiny_hf_janus_config does).
6. HF JanusVisionModel.pooler_output applies post_layernorm twice to token 0: unused (get_image_features
   replaces pooler_output by aligner(last_hidden_state)).
7. HF image generation (generate(generation_mode="image")) puts the conditional rows first and the unconditional
   rows second ([c0..cB, u0..uB]); DeepSeek interleaves (c0, u0, c1, u1, ...). HF's unconditional prompt keeps BOS
   and BOI tokens wherever they appear and pads the rest; DeepSeek keeps the first and last prompt token.
   HF GenerationConfig default top_k=50 is applied when do_sample=True unless top_k=0 is passed.
"""


def hf_janus_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int | None = None,
    max_position_embeddings: int = 16384,
    rms_norm_eps: float = 1e-6,
    rope_theta: float = 10000.0,
    vision_width: int = 1024,
    vision_layers: int = 24,
    vision_heads: int = 16,
    vision_mlp_ratio: float = 4,
    image_size: int = 384,
    patch_size: int = 16,
    vq_ch: int = 128,
    vq_ch_mult: tuple[int, ...] | list[int] = (1, 1, 2, 2, 4),
    vq_z_channels: int = 256,
    vq_num_res_blocks: int = 2,
    codebook_size: int = 16384,
    codebook_dim: int = 8,
    image_token_id: int | None = None,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    text_config: Mapping[str, Any] | None = None,
    vision_config: Mapping[str, Any] | None = None,
    vq_config: Mapping[str, Any] | None = None,
    **janus_kwargs: Any,
) -> JanusConfig:
    """A ``JanusConfig`` that matches DeepSeek's architecture (see ``ARCHITECTURE_NOTES``) at any size.

    ``text_config`` / ``vision_config`` / ``vq_config`` are merged last into the HF sub-configs (raw HF field
    names), ``janus_kwargs`` go to ``JanusConfig`` itself (e.g. ``attn_implementation``).
    ``image_token_id`` must be the tokenizer's ``<image_placeholder>`` id when HF is fed images; when None it is
    HF's default 100581 if that fits the vocabulary, else ``vocab_size - 1``.
    """
    if image_token_id is None:
        image_token_id = 100581 if vocab_size > 100581 else vocab_size - 1
    if vq_ch % 32:
        raise ValueError(
            f"vq_ch={vq_ch}: the VQ's GroupNorm has 32 groups, channel counts must be multiples of 32"
        )
    text = {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads or num_attention_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    text.update(text_config or {})
    vision = {
        "hidden_size": vision_width,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_heads,
        "mlp_ratio": vision_mlp_ratio,
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": 3,
        "hidden_act": "gelu",  # exact erf GELU == timm's nn.GELU (NOT gelu_pytorch_tanh as in google's SigLIP)
        "layer_norm_eps": 1e-6,  # timm VisionTransformer's LayerNorm eps
        "attention_bias": True,
        "use_qk_norm": False,
        "projection_dim": hidden_size,  # aligner output = LLM width
        "depth": 2,  # aligner: Linear, GELU, Linear
        "num_image_tokens": (image_size // patch_size) ** 2,
    }
    vision.update(vision_config or {})
    vq = {
        "embed_dim": codebook_dim,
        "num_embeddings": codebook_size,
        "double_latent": False,
        "latent_channels": vq_z_channels,
        "in_channels": 3,
        "out_channels": 3,
        "base_channels": vq_ch,
        "channel_multiplier": list(vq_ch_mult),
        "num_res_blocks": vq_num_res_blocks,
        "projection_dim": hidden_size,  # gen aligner output and gen head inner width
        "image_token_embed_dim": hidden_size,  # gen head input = LLM width
        "num_hidden_layers": 2,  # gen aligner: Linear, GELU, Linear
        "hidden_act": "gelu",
    }
    vq.update(vq_config or {})
    janus_kwargs.setdefault("tie_word_embeddings", False)
    config = JanusConfig(
        text_config=text, vision_config=vision, vq_config=vq, image_token_id=image_token_id, **janus_kwargs
    )
    check_hf_config_supported(config)
    return config


def tiny_hf_janus_config(**overrides: Any) -> JanusConfig:
    """A small random-init Janus for fast CPU tests (576 image tokens, 16384 codes, all 5 VQ levels).

    LLM: 2 layers, width 64, 4 heads, MLP 128, vocab 1024. Vision: width 64, 2 layers, 4 heads, 384 px, patch 16.
    VQ: base channels 32, ch_mult (1,1,2,2,4), 2 res blocks, z 32, codebook 16384 x 8. Projections = 64.
    Any keyword of :func:`hf_janus_config` overrides these (e.g. ``vocab_size=tokenizer_len``).
    """
    kw: dict[str, Any] = {
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vision_width": 64,
        "vision_layers": 2,
        "vision_heads": 4,
        "vq_ch": 32,
        "vq_z_channels": 32,
    }
    kw.update(overrides)
    return hf_janus_config(**kw)


def full_hf_janus_config(size: str, **overrides: Any) -> JanusConfig:
    """The full-size Janus-Pro-1B / -7B architecture (``size`` "1b" or "7b"); build it on the meta device."""
    presets = {
        "1b": {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
        },
        "7b": {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 30,
            "num_attention_heads": 32,
        },
    }
    kw: dict[str, Any] = {"vocab_size": 102400, "max_position_embeddings": 16384, **presets[size.lower()]}
    kw.update(overrides)
    return hf_janus_config(**kw)


def rope_theta(text_config) -> float:
    """RoPE base of an HF text config (transformers 5 keeps it in ``rope_parameters``)."""
    params = getattr(text_config, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(text_config, "rope_theta", 10000.0))


def check_hf_config_supported(config: JanusConfig) -> None:
    """Raise ValueError if the HF config uses anything DeepSeek's architecture / config schema cannot express."""
    tc, vc, qc = config.text_config, config.vision_config, config.vq_config
    d = tc.hidden_size
    problems = []

    def need(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    # top level / LLM
    need(not config.tie_word_embeddings and not tc.tie_word_embeddings, "tie_word_embeddings must be False")
    need(tc.model_type == "llama", f"text_config must be llama, got {tc.model_type}")
    need(tc.hidden_act == "silu", f"text hidden_act must be silu, got {tc.hidden_act}")
    need(not getattr(tc, "attention_bias", False), "text attention_bias must be False")
    need(not getattr(tc, "mlp_bias", False), "text mlp_bias must be False")
    need(
        tc.head_dim == d // tc.num_attention_heads, "text head_dim must be hidden_size // num_attention_heads"
    )
    rope = getattr(tc, "rope_parameters", None) or {}
    need(rope.get("rope_type", "default") == "default", f"rope must be default (no scaling), got {rope}")
    # vision tower + aligner
    need(
        vc.hidden_act == "gelu", f"vision hidden_act must be exact 'gelu' (timm nn.GELU), got {vc.hidden_act}"
    )
    need(vc.layer_norm_eps == 1e-6, f"vision layer_norm_eps must be 1e-6, got {vc.layer_norm_eps}")
    need(vc.attention_bias, "vision attention_bias must be True (timm qkv_bias)")
    need(not vc.use_qk_norm, "vision use_qk_norm must be False")
    need(vc.num_channels == 3, "vision num_channels must be 3")
    need(vc.image_size % vc.patch_size == 0, "image_size must be a multiple of patch_size")
    need(vc.hidden_size % vc.num_attention_heads == 0, "vision width must divide by heads")
    need(float(vc.hidden_size * vc.mlp_ratio).is_integer(), "vision width * mlp_ratio must be an integer")
    need(vc.projection_dim == d, f"vision projection_dim must be the LLM width {d}, got {vc.projection_dim}")
    need(vc.depth == 2, f"aligner depth must be 2 (official), got {vc.depth}")
    # VQ + gen aligner + gen head
    need(
        qc.hidden_act == "gelu", f"vq hidden_act (gen aligner / gen head) must be 'gelu', got {qc.hidden_act}"
    )
    need(not qc.double_latent, "vq double_latent must be False")
    need(qc.in_channels == 3 and qc.out_channels == 3, "vq in/out channels must be 3")
    need(
        all(qc.base_channels * m % 32 == 0 for m in qc.channel_multiplier),
        "vq channels must be multiples of 32",
    )
    need(qc.projection_dim == d, f"vq projection_dim must be the LLM width {d}, got {qc.projection_dim}")
    need(
        qc.image_token_embed_dim == d, f"vq image_token_embed_dim must be {d}, got {qc.image_token_embed_dim}"
    )
    need(
        qc.num_hidden_layers == 2,
        f"gen aligner depth (vq num_hidden_layers) must be 2, got {qc.num_hidden_layers}",
    )
    if problems:
        raise ValueError("HF Janus config not expressible in DeepSeek's layout: " + "; ".join(problems))
