"""HF Janus state dicts -> DeepSeek's official tensor names, and official checkpoints written from HF models.

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
from transformers import JanusForConditionalGeneration

from .official_layout import official_config_from_hf, official_tensor_shapes

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
