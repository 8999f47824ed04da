"""DeepSeek's official ``config.json`` for an HF Janus config, and the tensor names and shapes it implies.

``official_tensor_shapes`` derives the official module tree from the config alone, independently of
transformers, so that a conversion can be checked against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import JanusConfig

from .configs import check_hf_config_supported, rope_theta

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
            "rope_theta": rope_theta(tc),
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
