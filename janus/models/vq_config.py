"""The VQ-16 tokenizer's configuration and the geometry it decides (pixels per code, codes per image),
without torch: a job's driver reads how many codes an image takes from ``config.json`` alone."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    ch: int = 128
    ch_mult: tuple[int, ...] = field(default=(1, 1, 2, 2, 4))
    z_channels: int = 256
    num_res_blocks: int = 2
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    # side of a generated image in pixels; None: Janus' 24 x 24 code grid (384 px at the official 16x)
    image_size: int | None = None

    @property
    def downsample(self) -> int:
        """Pixels per code along each side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        """Codes along each side of a generated image (24 for every official checkpoint)."""
        return 24 if self.image_size is None else self.image_size // self.downsample

    @property
    def image_tokens(self) -> int:
        """Codes per generated image, the autoregressive steps of one synthesis (576 for Janus)."""
        return self.grid**2

    @classmethod
    def from_params(cls, params: dict) -> VQConfig:
        """Official params are ``image_token_size`` and ``n_embed``; the rest are our test extensions."""
        params = dict(params)
        kw: dict = {}
        if "image_token_size" in params:
            kw["codebook_size"] = int(params.pop("image_token_size"))
        if "n_embed" in params:
            kw["codebook_embed_dim"] = int(params.pop("n_embed"))
        known = {f.name for f in fields(cls)}
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"unknown gen_vision_config params {sorted(unknown)}; known: {sorted(known)}")
        kw.update(params)
        if "ch_mult" in kw:
            kw["ch_mult"] = tuple(kw["ch_mult"])
        cfg = cls(**kw)
        if cfg.image_size is not None and (cfg.image_size <= 0 or cfg.image_size % cfg.downsample):
            raise ValueError(
                f"gen_vision_config image_size {cfg.image_size} is not a positive multiple of the VQ's "
                f"downsampling ({cfg.downsample} pixels per code)"
            )
        return cfg
