"""The shapes model's size and files: Janus-Pro's architecture with every width and depth shrunk, its
skeleton (tokenizer, processor configs, config.json) and freshly initialised weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from janus.engine.prompts import RATING_LEVELS, SCORE_ANSWERS, SCORE_QUESTION
from janus.models.processing_vlm import DEFAULT_SYSTEM_PROMPT
from janus.shapes.data import IMAGE_SIZE, Scene, all_scenes, caption, draw

from .examples import CAPTION_QUESTIONS

LLM = {"hidden": 256, "llm_layers": 4, "llm_heads": 4, "intermediate": 768, "max_position_embeddings": 2048}
VISION = {"image_size": IMAGE_SIZE, "width": 128, "layers": 2, "heads": 4, "patch_size": 16}
VQ = {"ch": 32, "z_channels": 32, "num_res_blocks": 1, "image_token_size": 512}
GRID = 24  # codes along a generated image's side, as in Janus (``--grid``: 12 is 8 px per code)
NUM_IMAGE_TOKENS = (IMAGE_SIZE // VISION["patch_size"]) ** 2
BPE_VOCAB = 512


def vq_params(grid: int = GRID, size: int = IMAGE_SIZE) -> dict:
    """The VQ's config params for a ``grid`` x ``grid`` code grid of a ``size`` px image: one 2x
    downsampling level per halving (96 px at 24: 4 px per code, three levels; at 12: 8 px, four levels)."""
    per_code = size // grid if grid > 0 and size % grid == 0 else 0
    if per_code < 2 or per_code & (per_code - 1):
        raise ValueError(f"--grid {grid} must be {size} px divided by a power of two")
    params = dict(VQ, ch_mult=[1] + [2] * (per_code.bit_length() - 1))
    if grid != GRID or size != IMAGE_SIZE:  # Janus' 24 x 24 grid needs no image size in the config
        params["image_size"] = size
    return params


def tokenizer_corpus() -> tuple[str, ...]:
    """What the BPE merges are learnt from: the grammar, the questions, the system prompt."""
    texts = [caption(s) for s in all_scenes(held_out=False)]
    texts += list(CAPTION_QUESTIONS) + [DEFAULT_SYSTEM_PROMPT]
    texts += [SCORE_QUESTION.format(prompt=caption(s)) for s in all_scenes(held_out=False)[::7]]
    texts += [
        " ".join(SCORE_ANSWERS),
        "How would you rate the aesthetics of this image?",
        " ".join(RATING_LEVELS),
    ]
    return tuple(texts)


def official_shapes_config(vocab_size: int, grid: int = GRID, size: int = IMAGE_SIZE) -> dict:
    from janus.checkpoints import official_config

    return official_config(
        vocab_size=vocab_size,
        hidden=LLM["hidden"],
        llm_layers=LLM["llm_layers"],
        llm_heads=LLM["llm_heads"],
        intermediate=LLM["intermediate"],
        vision={k: v for k, v in VISION.items()},
        vq=vq_params(grid, size),
        dtype="bfloat16",
        max_position_embeddings=LLM["max_position_embeddings"],
    )


def write_skeleton(out: Path, grid: int = GRID, size: int = IMAGE_SIZE) -> dict:
    """Tokenizer, processor configs and config.json of the shapes checkpoint (everything but weights);
    it generates ``size`` px images as a ``grid`` x ``grid`` code grid and reads 96 px ones."""
    from janus.checkpoints import write_processor_configs, write_tiny_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    n_tokens = write_tiny_tokenizer(out, corpus=tokenizer_corpus(), vocab_size=BPE_VOCAB)
    write_processor_configs(out, image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS)
    cfg = official_shapes_config(-(-n_tokens // 64) * 64, grid, size)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def build_model(cfg: dict):
    """A freshly initialised fp32 model of ``cfg`` (normal(0.02) weights, zero biases, unit norms)."""
    from janus.models.configuration import MultiModalityConfig
    from janus.models.modeling_vlm import MultiModalityCausalLM

    model = MultiModalityCausalLM(MultiModalityConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif p.dim() == 1:
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.normal_(p, std=0.02)
    return model.float()


def drawn(scenes: list[Scene], rng: np.random.Generator | None, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scenes drawn ``size`` px; ``rng``: each with its variations, None: exactly (one image per scene)."""
    return np.stack([draw(s, size, rng) for s in scenes])


def to_unit(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] (the VQ's pixel range)."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
