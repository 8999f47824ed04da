"""The official ``config.json`` of a Janus-Pro checkpoint, at any size.

Janus-Pro 1B and 7B share the fixed parts (SigLIP-L at 384 px, the VQ-16 codebook, two-layer GELU
aligners); ``vision`` and ``vq`` hold our extensions that shrink the towers for tiny checkpoints.
"""

from __future__ import annotations

from typing import Any

#: The fixed params of the official sub-configs; a tiny checkpoint's ``vision``/``vq`` are added to them.
VISION_PARAMS = {
    "image_size": 384,
    "model_name": "siglip_large_patch16_384",
    "select_feature": "same",
    "select_layer": -1,
}
VQ_PARAMS = {"image_token_size": 16384, "n_embed": 8}


def _part(cls: str, model_type: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"cls": cls, "model_type": model_type, "params": params}


def _aligner(model_type: str, input_dim: int, hidden: int) -> dict[str, Any]:
    params = {"depth": 2, "input_dim": input_dim, "n_embed": hidden, "projector_type": "mlp_gelu"}
    return _part("MlpProjector", model_type, params)


def official_config(
    *,
    vocab_size: int,
    hidden: int,
    llm_layers: int,
    llm_heads: int,
    intermediate: int,
    vision: dict[str, Any] | None = None,
    vq: dict[str, Any] | None = None,
    dtype: str = "float32",
    max_position_embeddings: int = 16384,
) -> dict[str, Any]:
    """A ``config.json`` dict of the official schema; ``vision``/``vq`` hold our shrinking extensions."""
    vision_params = {**VISION_PARAMS, **(vision or {})}
    vq_params = {**VQ_PARAMS, **(vq or {})}
    head = {"image_token_embed": hidden, "image_token_size": vq_params["image_token_size"], "n_embed": hidden}
    return {
        "model_type": "multi_modality",
        "torch_dtype": dtype,
        "vision_config": _part("CLIPVisionTower", "vision", vision_params),
        "aligner_config": _aligner("aligner", vision_params.get("width", 1024), hidden),
        "gen_vision_config": _part("VQ-16", "gen_vision", vq_params),
        "gen_aligner_config": _aligner("gen_aligner", vq_params["n_embed"], hidden),
        "gen_head_config": _part("vision_head", "gen_head", head),
        "language_config": {
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "max_position_embeddings": max_position_embeddings,
            "num_attention_heads": llm_heads,
            "num_hidden_layers": llm_layers,
            "num_key_value_heads": llm_heads,
            "torch_dtype": dtype,
            "vocab_size": vocab_size,
        },
    }
