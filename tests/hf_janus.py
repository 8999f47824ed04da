"""Test support: turn transformers' own Janus (``JanusForConditionalGeneration``) into a checkpoint
in DeepSeek's official on-disk layout, so that our ``janus`` package can be compared against an
independent implementation numerically.

This is the inverse of transformers' ``convert_janus_weights_to_hf.py``:

==========================================================================  ==============================================================
HF name (``model.`` prefix stripped)                                        official name
==========================================================================  ==============================================================
vision_model.embeddings.patch_embedding.{weight,bias}                       vision_model.vision_tower.patch_embed.proj.{weight,bias}
vision_model.embeddings.position_embedding.weight  [N, W]                   vision_model.vision_tower.pos_embed  [1, N, W]  (unsqueeze(0))
vision_model.encoder.layers.I.layer_norm1.*                                 vision_model.vision_tower.blocks.I.norm1.*
vision_model.encoder.layers.I.self_attn.{q,k,v}_proj.{weight,bias}          vision_model.vision_tower.blocks.I.attn.qkv.*  (cat(q, k, v), dim 0)
vision_model.encoder.layers.I.self_attn.projection_layer.*                  vision_model.vision_tower.blocks.I.attn.proj.*
vision_model.encoder.layers.I.layer_norm2.*                                 vision_model.vision_tower.blocks.I.norm2.*
vision_model.encoder.layers.I.mlp.{fc1,fc2}.*                               vision_model.vision_tower.blocks.I.mlp.{fc1,fc2}.*
vision_model.post_layernorm.*                                               vision_model.vision_tower.norm.*
(none)                                                                      vision_model.vision_tower.attn_pool.*  (unused MAP head: random)
aligner.fc1.* / aligner.hidden_layers.J.*                                   aligner.layers.0.* / aligner.layers.{2J+2}.*
vqmodel.{encoder,decoder}.{conv_in,norm_out,conv_out}.*                     gen_vision_model.{encoder,decoder}.{conv_in,norm_out,conv_out}.*
vqmodel.encoder.down.L.{block.M,attn.M,downsample}.*                        gen_vision_model.encoder.conv_blocks.L.{res.M,attn.M,downsample}.*
vqmodel.decoder.up.L.{block.M,attn.M,upsample}.*                            gen_vision_model.decoder.conv_blocks.L.{res.M,attn.M,upsample}.*
vqmodel.{encoder,decoder}.mid.{block_1,attn_1,block_2}.*                    gen_vision_model.{encoder,decoder}.mid.{0,1,2}.*
vqmodel.{quant_conv,post_quant_conv,quantize.embedding}.*                   gen_vision_model.{quant_conv,post_quant_conv,quantize.embedding}.*
(none)                                                                      gen_vision_model.quantize.codebook_used  [65536] (zeros)
generation_embeddings.weight                                                gen_embed.weight
generation_aligner.fc1.* / generation_aligner.hidden_layers.J.*             gen_aligner.layers.0.* / gen_aligner.layers.{2J+2}.*
generation_head.proj_out.*                                                  gen_head.output_mlp_projector.*
generation_head.vision_head.*                                               gen_head.vision_head.*
language_model.*                                                            language_model.model.*
lm_head.weight (top level of JanusForConditionalGeneration)                 language_model.lm_head.weight
==========================================================================  ==============================================================

Both directions index the VQ levels the same way: HF's ``decoder.up[0]`` is the lowest resolution
(widest) level, exactly as the official ``decoder.conv_blocks.0``.

Architecture notes (HF Janus vs DeepSeek / LlamaGen), see also ``ARCHITECTURE_NOTES``:
the HF vector quantizer's ``forward`` (used by ``encode``) does NOT l2-normalise the latents nor the
codebook before the nearest-code search, DeepSeek's VQ-16 does (``codebook_l2_norm=True``). Only
image -> code ids differs; code ids -> pixels (``decode``) matches.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from transformers import JanusConfig, JanusForConditionalGeneration

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
    "tiny_hf_janus_config",
    "write_official_checkpoint_from_hf",
]

#: Sizes the official checkpoints have; our config extensions default to these when absent.
OFFICIAL_VISION_DEFAULTS: dict[str, Any] = {
    "width": 1024,
    "layers": 24,
    "heads": 16,
    "mlp_ratio": 4,
    "patch_size": 16,
}
OFFICIAL_VQ_DEFAULTS: dict[str, Any] = {
    "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4],
    "z_channels": 256,
    "num_res_blocks": 2,
}
#: LlamaGen's ``codebook_used`` buffer always has 65536 entries, whatever the codebook size.
CODEBOOK_USED_SIZE = 65536

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


# ---------------------------------------------------------------------------------------------
# HF configs
# ---------------------------------------------------------------------------------------------


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


def _rope_theta(text_config) -> float:
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


# ---------------------------------------------------------------------------------------------
# official config.json
# ---------------------------------------------------------------------------------------------


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def official_config_from_hf(hf_config: JanusConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The official ``config.json`` dict for an HF Janus config; extensions only where sizes differ."""
    check_hf_config_supported(hf_config)
    tc, vc, qc = hf_config.text_config, hf_config.vision_config, hf_config.vq_config
    d = tc.hidden_size

    vision_params: dict[str, Any] = {
        "image_size": vc.image_size,
        "model_name": "siglip_large_patch16_384",
        "select_feature": "same",
        "select_layer": -1,
    }
    vision_ext = {
        "width": vc.hidden_size,
        "layers": vc.num_hidden_layers,
        "heads": vc.num_attention_heads,
        "mlp_ratio": _num(vc.mlp_ratio),
        "patch_size": vc.patch_size,
    }
    vision_params.update({k: v for k, v in vision_ext.items() if v != OFFICIAL_VISION_DEFAULTS[k]})

    gen_vision_params: dict[str, Any] = {"image_token_size": qc.num_embeddings, "n_embed": qc.embed_dim}
    vq_ext = {
        "ch": qc.base_channels,
        "ch_mult": list(qc.channel_multiplier),
        "z_channels": qc.latent_channels,
        "num_res_blocks": qc.num_res_blocks,
    }
    gen_vision_params.update({k: v for k, v in vq_ext.items() if v != OFFICIAL_VQ_DEFAULTS[k]})

    def mlp(model_type: str, input_dim: int) -> dict[str, Any]:
        params = {"depth": 2, "input_dim": input_dim, "n_embed": d, "projector_type": "mlp_gelu"}
        return {"cls": "MlpProjector", "model_type": model_type, "params": params}

    return {
        "model_type": "multi_modality",
        "torch_dtype": torch_dtype,
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": vision_params},
        "aligner_config": mlp("aligner", vc.hidden_size),
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": gen_vision_params},
        "gen_aligner_config": mlp("gen_aligner", qc.embed_dim),
        "gen_head_config": {
            "cls": "vision_head",
            "model_type": "gen_head",
            "params": {"image_token_embed": d, "image_token_size": qc.num_embeddings, "n_embed": d},
        },
        "language_config": {
            "model_type": "llama",
            "hidden_size": d,
            "intermediate_size": tc.intermediate_size,
            "num_attention_heads": tc.num_attention_heads,
            "num_hidden_layers": tc.num_hidden_layers,
            "num_key_value_heads": tc.num_key_value_heads,
            "vocab_size": tc.vocab_size,
            "max_position_embeddings": tc.max_position_embeddings,
            "rms_norm_eps": tc.rms_norm_eps,
            "rope_theta": _rope_theta(tc),
            "tie_word_embeddings": False,
        },
    }


def official_tensor_shapes(official_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of DeepSeek's module tree for an official config (with our extensions).

    Derived from the config alone (independently of HF), so conversions can be checked against it.
    """
    vp = {**OFFICIAL_VISION_DEFAULTS, **official_config["vision_config"]["params"]}
    gp = {**OFFICIAL_VQ_DEFAULTS, **official_config["gen_vision_config"]["params"]}
    lc = official_config["language_config"]
    al = official_config["aligner_config"]["params"]
    gal = official_config["gen_aligner_config"]["params"]
    gh = official_config["gen_head_config"]["params"]
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_f: int, in_f: int, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)
        if bias:
            shapes[f"{name}.bias"] = (out_f,)

    def vec(name: str, n: int) -> None:  # LayerNorm / GroupNorm
        shapes[f"{name}.weight"] = (n,)
        shapes[f"{name}.bias"] = (n,)

    # --- SigLIP tower (timm VisionTransformer, global_pool "map", no class token)
    w, p = vp["width"], vp["patch_size"]
    hid = int(w * vp["mlp_ratio"])
    n_tok = (vp["image_size"] // p) ** 2
    layers = vp["layers"]
    sel = vp.get("select_layer", -1)
    layers = min(layers, layers + sel + 1) if sel <= 0 else min(layers, sel)
    t = "vision_model.vision_tower"
    shapes[f"{t}.patch_embed.proj.weight"] = (w, 3, p, p)
    shapes[f"{t}.patch_embed.proj.bias"] = (w,)
    shapes[f"{t}.pos_embed"] = (1, n_tok, w)
    for i in range(layers):
        b = f"{t}.blocks.{i}"
        vec(f"{b}.norm1", w)
        linear(f"{b}.attn.qkv", 3 * w, w)
        linear(f"{b}.attn.proj", w, w)
        vec(f"{b}.norm2", w)
        linear(f"{b}.mlp.fc1", hid, w)
        linear(f"{b}.mlp.fc2", w, hid)
    vec(f"{t}.norm", w)
    shapes[f"{t}.attn_pool.latent"] = (1, 1, w)
    linear(f"{t}.attn_pool.q", w, w)
    linear(f"{t}.attn_pool.kv", 2 * w, w)
    linear(f"{t}.attn_pool.proj", w, w)
    vec(f"{t}.attn_pool.norm", w)
    linear(f"{t}.attn_pool.mlp.fc1", hid, w)
    linear(f"{t}.attn_pool.mlp.fc2", w, hid)

    # --- MlpProjectors (mlp_gelu: Linear, then (GELU, Linear) * (depth - 1))
    for prefix, params in (("aligner", al), ("gen_aligner", gal)):
        linear(f"{prefix}.layers.0", params["n_embed"], params["input_dim"])
        for j in range(1, params["depth"]):
            linear(f"{prefix}.layers.{2 * j}", params["n_embed"], params["n_embed"])

    # --- VQ-16 (LlamaGen)
    ch, ch_mult, z, nrb = gp["ch"], list(gp["ch_mult"]), gp["z_channels"], gp["num_res_blocks"]
    e_dim, n_codes = gp["n_embed"], gp["image_token_size"]
    g = "gen_vision_model"
    n_lev = len(ch_mult)

    def conv(name: str, out_c: int, in_c: int, k: int) -> None:
        shapes[f"{name}.weight"] = (out_c, in_c, k, k)
        shapes[f"{name}.bias"] = (out_c,)

    def res(name: str, cin: int, cout: int) -> None:
        vec(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        vec(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def attn(name: str, c: int) -> None:
        vec(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def mid(name: str, c: int) -> None:
        res(f"{name}.0", c, c)
        attn(f"{name}.1", c)
        res(f"{name}.2", c, c)

    enc = f"{g}.encoder"
    conv(f"{enc}.conv_in", ch, 3, 3)
    in_mult = [1, *ch_mult]
    for lev in range(n_lev):
        cin, cout = ch * in_mult[lev], ch * ch_mult[lev]
        for m in range(nrb):
            res(f"{enc}.conv_blocks.{lev}.res.{m}", cin, cout)
            cin = cout
            if lev == n_lev - 1:
                attn(f"{enc}.conv_blocks.{lev}.attn.{m}", cout)
        if lev != n_lev - 1:
            conv(f"{enc}.conv_blocks.{lev}.downsample.conv", cout, cout, 3)
    c = ch * ch_mult[-1]
    mid(f"{enc}.mid", c)
    vec(f"{enc}.norm_out", c)
    conv(f"{enc}.conv_out", z, c, 3)

    dec = f"{g}.decoder"
    cin = ch * ch_mult[-1]
    conv(f"{dec}.conv_in", cin, z, 3)
    mid(f"{dec}.mid", cin)
    for k, lev in enumerate(reversed(range(n_lev))):
        cout = ch * ch_mult[lev]
        for m in range(nrb + 1):
            res(f"{dec}.conv_blocks.{k}.res.{m}", cin, cout)
            cin = cout
            if lev == n_lev - 1:
                attn(f"{dec}.conv_blocks.{k}.attn.{m}", cout)
        if lev != 0:
            conv(f"{dec}.conv_blocks.{k}.upsample.conv", cout, cout, 3)
    vec(f"{dec}.norm_out", cin)
    conv(f"{dec}.conv_out", 3, cin, 3)
    conv(f"{g}.quant_conv", e_dim, z, 1)
    conv(f"{g}.post_quant_conv", z, e_dim, 1)
    shapes[f"{g}.quantize.embedding.weight"] = (n_codes, e_dim)
    shapes[f"{g}.quantize.codebook_used"] = (CODEBOOK_USED_SIZE,)

    # --- generation head / embedding
    linear("gen_head.output_mlp_projector", gh["image_token_embed"], gh["n_embed"])
    linear("gen_head.vision_head", gh["image_token_size"], gh["image_token_embed"])
    shapes["gen_embed.weight"] = (gh["image_token_size"], gp["n_embed"])

    # --- LLaMA
    d, inter, vocab = lc["hidden_size"], lc["intermediate_size"], lc["vocab_size"]
    nh = lc["num_attention_heads"]
    nkv = lc.get("num_key_value_heads") or nh
    hd = d // nh
    lm = "language_model.model"
    shapes[f"{lm}.embed_tokens.weight"] = (vocab, d)
    for i in range(lc["num_hidden_layers"]):
        b = f"{lm}.layers.{i}"
        linear(f"{b}.self_attn.q_proj", nh * hd, d, bias=False)
        linear(f"{b}.self_attn.k_proj", nkv * hd, d, bias=False)
        linear(f"{b}.self_attn.v_proj", nkv * hd, d, bias=False)
        linear(f"{b}.self_attn.o_proj", d, nh * hd, bias=False)
        linear(f"{b}.mlp.gate_proj", inter, d, bias=False)
        linear(f"{b}.mlp.up_proj", inter, d, bias=False)
        linear(f"{b}.mlp.down_proj", d, inter, bias=False)
        shapes[f"{b}.input_layernorm.weight"] = (d,)
        shapes[f"{b}.post_attention_layernorm.weight"] = (d,)
    shapes[f"{lm}.norm.weight"] = (d,)
    shapes["language_model.lm_head.weight"] = (vocab, d)
    return shapes


# ---------------------------------------------------------------------------------------------
# state dict conversion
# ---------------------------------------------------------------------------------------------

_VT = "vision_model.vision_tower"
_G = "gen_vision_model"


def _mlp_layer(m: re.Match, dst: str) -> str:
    # HF: fc1, hidden_layers.J  ->  official nn.Sequential index 0, 2J + 2 (the GELUs sit at odd indices)
    idx = 0 if m["layer"] == "fc1" else 2 * int(m["j"]) + 2
    return f"{dst}.layers.{idx}.{m['rest']}"


def _vq(m: re.Match) -> str:
    rest = m["rest"]
    rest = re.sub(r"^(down|up)\.(\d+)\.block\.", r"conv_blocks.\2.res.", rest)
    rest = re.sub(r"^(down|up)\.(\d+)\.", r"conv_blocks.\2.", rest)
    rest = re.sub(r"^mid\.block_1\.", "mid.0.", rest)
    rest = re.sub(r"^mid\.attn_1\.", "mid.1.", rest)
    rest = re.sub(r"^mid\.block_2\.", "mid.2.", rest)
    return f"{_G}.{m['part']}.{rest}"


#: (HF regex on the name without the ``model.`` prefix, official name or function of the match)
_RULES: list[tuple[re.Pattern, Any]] = [
    (
        re.compile(r"vision_model\.embeddings\.patch_embedding\.(?P<p>weight|bias)"),
        rf"{_VT}.patch_embed.proj.\g<p>",
    ),
    (re.compile(r"vision_model\.embeddings\.position_embedding\.weight"), f"{_VT}.pos_embed"),
    (
        re.compile(
            r"vision_model\.encoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<qkv>[qkv])_proj\.(?P<p>weight|bias)"
        ),
        rf"{_VT}.blocks.\g<i>.attn.qkv.\g<p>",
    ),
    (
        re.compile(
            r"vision_model\.encoder\.layers\.(?P<i>\d+)\.self_attn\.projection_layer\.(?P<p>weight|bias)"
        ),
        rf"{_VT}.blocks.\g<i>.attn.proj.\g<p>",
    ),
    (
        re.compile(r"vision_model\.encoder\.layers\.(?P<i>\d+)\.layer_norm(?P<n>[12])\.(?P<p>weight|bias)"),
        rf"{_VT}.blocks.\g<i>.norm\g<n>.\g<p>",
    ),
    (
        re.compile(r"vision_model\.encoder\.layers\.(?P<i>\d+)\.mlp\.(?P<fc>fc[12])\.(?P<p>weight|bias)"),
        rf"{_VT}.blocks.\g<i>.mlp.\g<fc>.\g<p>",
    ),
    (re.compile(r"vision_model\.post_layernorm\.(?P<p>weight|bias)"), rf"{_VT}.norm.\g<p>"),
    (
        re.compile(r"aligner\.(?P<layer>fc1|hidden_layers\.(?P<j>\d+))\.(?P<rest>weight|bias)"),
        lambda m: _mlp_layer(m, "aligner"),
    ),
    (
        re.compile(r"generation_aligner\.(?P<layer>fc1|hidden_layers\.(?P<j>\d+))\.(?P<rest>weight|bias)"),
        lambda m: _mlp_layer(m, "gen_aligner"),
    ),
    (re.compile(r"generation_head\.proj_out\.(?P<p>weight|bias)"), r"gen_head.output_mlp_projector.\g<p>"),
    (re.compile(r"generation_head\.vision_head\.(?P<p>weight|bias)"), r"gen_head.vision_head.\g<p>"),
    (re.compile(r"generation_embeddings\.weight"), "gen_embed.weight"),
    (re.compile(r"vqmodel\.(?P<part>encoder|decoder)\.(?P<rest>.+)"), _vq),
    (
        re.compile(
            r"vqmodel\.(?P<rest>(quant_conv|post_quant_conv)\.(weight|bias)|quantize\.embedding\.weight)"
        ),
        rf"{_G}.\g<rest>",
    ),
    (re.compile(r"language_model\.(?P<rest>.+)"), r"language_model.model.\g<rest>"),
    (re.compile(r"lm_head\.weight"), "language_model.lm_head.weight"),
]


def _strip_hf_prefix(name: str) -> str:
    """JanusForConditionalGeneration names start with ``model.`` (except ``lm_head``); JanusModel's don't."""
    return name[len("model.") :] if name.startswith("model.") else name


def official_key_for_hf(hf_name: str) -> str:
    """The official tensor name an HF Janus tensor goes to (q/k/v projections all go to one ``qkv``)."""
    name = _strip_hf_prefix(hf_name)
    for pattern, repl in _RULES:
        m = pattern.fullmatch(name)
        if m is not None:
            return repl(m) if callable(repl) else m.expand(repl)
    raise KeyError(f"no official counterpart known for HF Janus tensor {hf_name!r}")


_QKV_ORDER = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def conversion_plan(hf_names) -> dict[str, list[str]]:
    """official name -> the HF names it is built from (one, or q, k, v in that order for ``attn.qkv``)."""
    plan: dict[str, list[str]] = {}
    for hf_name in hf_names:
        plan.setdefault(official_key_for_hf(hf_name), []).append(hf_name)
    for official, sources in plan.items():
        if official.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
            kinds = sorted(s.split(".")[-2] for s in sources)
            if kinds != ["k_proj", "q_proj", "v_proj"]:
                raise ValueError(f"{official}: expected HF q_proj, k_proj, v_proj, got {sources}")
            sources.sort(key=lambda s: _QKV_ORDER[s.split(".")[-2]])
        elif len(sources) != 1:
            raise ValueError(f"{official}: several HF tensors map to it: {sources}")
    return plan


#: official tensors with no HF counterpart, filled by the converter
SYNTHETIC_PREFIXES = (f"{_VT}.attn_pool.", f"{_G}.quantize.codebook_used")


def _is_synthetic(name: str) -> bool:
    return name.startswith(SYNTHETIC_PREFIXES)


def official_state_dict_from_hf(
    hf_model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    official_config: Mapping[str, Any],
    *,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Convert an HF Janus model / state dict to exactly the official key set of ``official_config``.

    Works on meta tensors (shapes only). ``attn_pool.*`` (unused SigLIP MAP head) is random (``seed``),
    ``quantize.codebook_used`` is zeros. Raises if any HF tensor is unused, any official tensor missing,
    or any shape differs from :func:`official_tensor_shapes`.
    """
    if isinstance(hf_model_or_state_dict, torch.nn.Module):
        model = hf_model_or_state_dict
        lm_head = getattr(model, "lm_head", None)
        if lm_head is not None and lm_head.weight is model.get_input_embeddings().weight:
            raise ValueError(
                "HF Janus has tied lm_head / embed_tokens; build it with tie_word_embeddings=False"
            )
        sd = model.state_dict()
    else:
        sd = dict(hf_model_or_state_dict)
    expected = official_tensor_shapes(official_config)
    plan = conversion_plan(sd.keys())

    ref = next(iter(sd.values()))
    dtype, device = ref.dtype, ref.device
    out: dict[str, torch.Tensor] = {}
    for official, sources in plan.items():
        tensors = [sd[s].detach() for s in sources]
        if len(tensors) == 3:  # vision q, k, v -> timm's fused qkv, rows [q; k; v]
            value = torch.cat(tensors, dim=0)
        else:
            value = tensors[0]
        if official == f"{_VT}.pos_embed":
            value = value.unsqueeze(0)  # nn.Embedding [N, W] -> timm parameter [1, N, W]
        out[official] = value

    gen = torch.Generator().manual_seed(seed)
    for name, shape in expected.items():
        if not _is_synthetic(name):
            continue
        if device.type == "meta":
            out[name] = torch.empty(shape, dtype=dtype, device="meta")
        elif name.endswith("codebook_used"):
            out[name] = torch.zeros(shape, dtype=dtype, device=device)
        else:
            out[name] = (torch.randn(shape, generator=gen) * 0.02).to(dtype=dtype, device=device)

    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    wrong = {
        k: (tuple(out[k].shape), expected[k])
        for k in out
        if k in expected and tuple(out[k].shape) != expected[k]
    }
    if missing or unexpected or wrong:
        raise ValueError(
            "HF -> official conversion does not match the official layout: "
            f"missing {missing[:10]} ({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)}), "
            f"wrong shapes {dict(list(wrong.items())[:10])} ({len(wrong)})"
        )
    return {k: out[k] for k in sorted(out)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_official_checkpoint_from_hf(
    hf_model: JanusForConditionalGeneration, directory: str | os.PathLike, *, seed: int = 0
) -> dict[str, Any]:
    """Write ``config.json`` and ``pytorch_model.bin`` (official layout) for an HF Janus; returns the config.

    Tokenizer and processor files are not written.
    """
    dtype = next(hf_model.parameters()).dtype
    config = official_config_from_hf(hf_model.config, torch_dtype=_dtype_name(dtype))
    state = official_state_dict_from_hf(hf_model, config, seed=seed)
    # compact, storage-independent copies (a view would pickle its whole base storage)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    return config


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter at a scale-preserving size, in place (returns ``model``).

    HF's init leaves every norm at weight 1 / bias 0 (and some biases 0), so a swapped norm1 / norm2 or
    a dropped bias would go unnoticed in a parity test; after this every tensor is distinct.
    Matrices / convs / embeddings: N(0, 1/fan_in); 1-D ``weight`` (norms): 1 + N(0, 0.1^2); biases: N(0, 0.05^2).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            continue
        shape = param.shape
        if param.ndim >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            value = torch.randn(shape, generator=gen) * fan_in**-0.5
        elif name.endswith("weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            value = 0.05 * torch.randn(shape, generator=gen)
        param.copy_(value.to(param.dtype))
    return model
