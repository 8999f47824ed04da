"""SigLIP ViT built on timm's VisionTransformer, named as DeepSeek's checkpoints name it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # timm (and torch) load when a tower is built: ``tower_width`` is read by job drivers
    from timm.models.vision_transformer import VisionTransformer


@dataclass(frozen=True)
class SigLIPVisionCfg:
    width: int = 1024
    layers: int = 24
    heads: int = 16
    patch_size: int = 16
    image_size: int = 384
    mlp_ratio: float = 4.0
    global_pool: str = "map"


SIGLIP_MODEL_CONFIG: dict[str, SigLIPVisionCfg] = {
    "siglip_large_patch16_384": SigLIPVisionCfg(),
    "siglip_so400m_patch14_384": SigLIPVisionCfg(
        width=1152, layers=27, heads=16, patch_size=14, image_size=336, mlp_ratio=3.7362
    ),
}


def create_siglip_vit(
    model_name: str = "siglip_large_patch16_384",
    image_size: int = 384,
    select_layer: int = -1,
    **overrides,
) -> VisionTransformer:
    """Build the tower. ``overrides`` (width, layers, heads, patch_size, mlp_ratio) shrink it for tests.

    ``select_layer`` <= 0 counts from the end: the blocks after the selected one are never built,
    exactly as DeepSeek does, so official checkpoints keep their key set.
    """
    if model_name not in SIGLIP_MODEL_CONFIG:
        raise ValueError(f"unknown SigLIP model {model_name!r}; known: {sorted(SIGLIP_MODEL_CONFIG)}")
    known = {f.name for f in fields(SigLIPVisionCfg)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown vision_config params {sorted(unknown)}; known extensions: {sorted(known)}")
    from timm.models.vision_transformer import VisionTransformer

    base = SIGLIP_MODEL_CONFIG[model_name]
    cfg = SigLIPVisionCfg(**{**base.__dict__, **overrides})
    layers = (
        min(cfg.layers, cfg.layers + select_layer + 1) if select_layer <= 0 else min(cfg.layers, select_layer)
    )
    return VisionTransformer(
        img_size=image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=layers,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        class_token=False,
        global_pool=cfg.global_pool,
        num_classes=0,
        weight_init="skip",
    )


def tower_width(params: dict) -> int:
    """Feature width of the tower a ``vision_config.params`` builds (1024 for Janus-Pro's SigLIP-L)."""
    base = SIGLIP_MODEL_CONFIG.get(params.get("model_name", "siglip_large_patch16_384"), SigLIPVisionCfg())
    return int(params.get("width", base.width))
