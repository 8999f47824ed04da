"""MlpProjector (aligner / gen_aligner) and the generation head (``vision_head``)."""

from __future__ import annotations

import torch
from torch import nn


class MlpProjector(nn.Module):
    """``mlp_gelu`` of depth d: Linear, (GELU, Linear) x (d-1); keys ``layers.0``, ``layers.2``, ..."""

    def __init__(self, params: dict):
        super().__init__()
        kind = params.get("projector_type", "mlp_gelu")
        if kind == "identity":
            self.layers = nn.Identity()
            return
        if kind == "linear":
            self.layers = nn.Linear(params["input_dim"], params["n_embed"])
            return
        if kind != "mlp_gelu":
            raise ValueError(f"unsupported projector_type {kind!r} (Janus uses 'mlp_gelu')")
        depth = int(params.get("depth", 1))
        mods: list[nn.Module] = [nn.Linear(params["input_dim"], params["n_embed"])]
        for _ in range(1, depth):
            mods += [nn.GELU(), nn.Linear(params["n_embed"], params["n_embed"])]
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class vision_head(nn.Module):  # noqa: N801 - the official ``cls`` name, kept for config compatibility
    """Maps LLM hidden states to logits over the 16384 VQ codes."""

    def __init__(self, params: dict):
        super().__init__()
        self.output_mlp_projector = nn.Linear(params["n_embed"], params["image_token_embed"])
        self.vision_activation = nn.GELU()
        self.vision_head = nn.Linear(params["image_token_embed"], params["image_token_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision_head(self.vision_activation(self.output_mlp_projector(x)))
