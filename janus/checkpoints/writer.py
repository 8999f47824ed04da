"""Write complete tiny Janus checkpoints in the official on-disk layout.

Real Janus-Pro weights cannot be downloaded in tests or the demo, so this writes a directory that
looks exactly like ``deepseek-ai/Janus-Pro-*`` (config.json, pytorch_model.bin or safetensors,
tokenizer and processor files) with small random weights. It is loaded through the very same
code path as the real checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import official_config
from .tokenizer import write_processor_configs, write_tiny_tokenizer


def write_tiny_checkpoint(
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: str = "float32",
    weights_format: str = "bin",
    shards: int = 1,
    hidden: int = 64,
    llm_layers: int = 2,
    llm_heads: int = 4,
    intermediate: int = 128,
    vocab_size: int | None = None,
    vision_width: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    vq_ch: int = 32,
    vq_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
    vq_z_channels: int = 64,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a complete random checkpoint; returns its directory.

    ``weights_format`` is "bin" (official: pickled ``pytorch_model*.bin``) or "safetensors";
    ``shards`` > 1 writes several files plus the index json, as the 7B checkpoint has.
    The understanding side keeps the official 384 px / 576 tokens; only widths and depths shrink.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    n_tokens = write_tiny_tokenizer(out)
    write_processor_configs(out)
    vocab = vocab_size or -(-n_tokens // 64) * 64
    if vocab < n_tokens:
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({n_tokens} tokens)")
    cfg = official_config(
        vocab_size=vocab,
        hidden=hidden,
        llm_layers=llm_layers,
        llm_heads=llm_heads,
        intermediate=intermediate,
        vision={"width": vision_width, "layers": vision_layers, "heads": vision_heads},
        vq={"ch": vq_ch, "ch_mult": list(vq_ch_mult), "z_channels": vq_z_channels},
        dtype=dtype,
    )
    for key, value in (config_overrides or {}).items():
        cfg[key] = value
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    _write_random_weights(cfg, out, seed=seed, dtype=dtype, weights_format=weights_format, shards=shards)
    return out


def write_random_like(source: str | os.PathLike, directory: str | os.PathLike, *, seed: int = 0) -> Path:
    """A copy of the checkpoint at ``source`` (config, tokenizer and processor files) with fresh random
    weights in place of its own: the same architecture and the same costs per token, but a model that
    never learnt to stop, so its answers run to ``max_new_tokens`` (a load test's fixed lengths)."""
    src, out = Path(source), Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".model", ".txt"):
            shutil.copy2(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    _write_random_weights(cfg, out, seed=seed, dtype=cfg.get("torch_dtype", "float32"))
    return out


def _write_random_weights(
    cfg: dict[str, Any],
    out: Path,
    *,
    seed: int,
    dtype: str,
    weights_format: str = "safetensors",
    shards: int = 1,
) -> None:
    """The model of config ``cfg`` with seeded small random weights, saved in ``out``."""
    from janus.models.configuration import MultiModalityConfig
    from janus.models.modeling_vlm import MultiModalityCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MultiModalityCausalLM(MultiModalityConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
        init_tiny_weights(model)
    state = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
    if "gen_vision_model.quantize.codebook_used" in state:
        state["gen_vision_model.quantize.codebook_used"] = state["gen_vision_model.quantize.codebook_used"].float()
    save_state_dict(state, out, weights_format=weights_format, shards=shards)


def init_tiny_weights(model: torch.nn.Module) -> None:
    """Small-std normal init: keeps the tiny model's activations and logits in a sane range."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.01)
        elif p.dim() == 1:  # norm scales
            torch.nn.init.normal_(p, mean=1.0, std=0.05)
        else:
            torch.nn.init.normal_(p, std=0.02 if p.dim() == 2 else 0.05)


def save_state_dict(
    state: dict[str, torch.Tensor], directory: Path, *, weights_format: str = "bin", shards: int = 1
) -> list[Path]:
    """Save in the official naming: ``pytorch_model.bin`` or ``pytorch_model-0000k-of-0000n.bin`` + index."""
    if weights_format not in ("bin", "safetensors"):
        raise ValueError(f"weights_format must be 'bin' or 'safetensors', not {weights_format!r}")
    names = list(state)
    shards = max(1, min(shards, len(names)))
    stem, ext = ("pytorch_model", "bin") if weights_format == "bin" else ("model", "safetensors")
    groups = [names[i::shards] for i in range(shards)]
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k] for k in group}
        if weights_format == "bin":
            torch.save(part, directory / fname)
        else:
            from safetensors.torch import save_file

            save_file(part, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
        files.append(directory / fname)
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return files
