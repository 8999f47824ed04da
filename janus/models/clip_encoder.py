"""CLIPVisionTower: the understanding encoder (SigLIP-L/16 at 384), output [B, 576, 1024]."""

from __future__ import annotations

import torch
from torch import nn

from .siglip_vit import create_siglip_vit


class CLIPVisionTower(nn.Module):
    def __init__(
        self,
        model_name: str = "siglip_large_patch16_384",
        image_size: int = 384,
        select_feature: str = "same",
        select_layer: int = -1,
        **tower_overrides,
    ):
        super().__init__()
        if select_feature not in ("same", "patch", "cls_patch"):
            raise ValueError(f"unsupported select_feature {select_feature!r}")
        # Official checkpoints carry no class token, so "patch" and "same" select the same tokens.
        self.select_feature = select_feature
        self.select_layer = select_layer
        self.vision_tower = create_siglip_vit(model_name, image_size, select_layer, **tower_overrides)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # forward_features applies the final norm; the unused attention-pool head is skipped.
        return self.vision_tower.forward_features(images)
