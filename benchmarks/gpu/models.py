"""Models of the real shapes with random weights, built on the device (the loader's own steps without
the files) or written as a checkpoint for the product's loader; and what a call of them costs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu.device import free_memory
from benchmarks.gpu.plan import Plan
from benchmarks.gpu.record import Recorder

IMAGE_TOKENS = 576


def shape_kwargs(name: str) -> dict[str, Any]:
    """write_tiny_checkpoint keywords of a shape: bench_engines' configs (1b, 7b, tiny at 384 px), or
    tiny48: the tiny model with a 2-level VQ (48 px), as the engine tests use, which a CPU decodes fast."""
    from benchmarks.bench_engines import CONFIGS

    if name == "tiny48":
        return dict(CONFIGS["tiny"], vq_ch_mult=(1, 2))
    return dict(CONFIGS[name])


def call_estimate_s(shape: str, contender: str, batch: int) -> float:
    """Rough seconds of one full 576-token call on an H100/H200, so an item starts only if it can end.

    Per step: an eager step is launch-bound (~35 kernels a layer, ~6 ms for 24 layers), the CUDA
    graph replays in ~1.5 ms at batch 16, the KV cache read grows with the batch; VQ ~3 ms an image.
    """
    step_ms = {"engine": 6.0, "engine_compiled": 1.5, "ref_parallel": 8.0, "hf": 10.0}[contender]
    step_ms = step_ms * {"7b": 1.5}.get(shape, 1.0) + batch * {"1b": 0.04, "7b": 0.1}.get(shape, 0.0)
    return IMAGE_TOKENS * step_ms / 1000 + batch * 0.003


def model_config(shape: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The official ``config.json`` dict of a shape (write_tiny_checkpoint's keywords)."""
    from janus.checkpoints import official_config

    return official_config(
        vocab_size=shape["vocab_size"],
        hidden=shape["hidden"],
        llm_layers=shape["llm_layers"],
        llm_heads=shape["llm_heads"],
        intermediate=shape["intermediate"],
        vision={
            "width": shape["vision_width"],
            "layers": shape["vision_layers"],
            "heads": shape["vision_heads"],
        },
        vq={
            "ch": shape["vq_ch"],
            "ch_mult": list(shape.get("vq_ch_mult", (1, 1, 2, 2, 4))),
            "z_channels": shape["vq_z_channels"],
        },
        dtype=dtype,
    )


def _multimodality_config(cfg: dict[str, Any]):
    from janus.models.configuration import MultiModalityConfig

    return MultiModalityConfig(**{k: v for k, v in cfg.items() if k != "model_type"})


def random_state(cfg: dict[str, Any], dtype: str, device, seed: int = 0) -> dict[str, Any]:
    """Random weights of the shape in ``dtype`` on ``device``, drawn as the tiny checkpoints' are.

    Built in fp32 on the device and cast tensor by tensor: a 7B model is never written to disk nor
    initialised on the host (minutes), and the fp32 copy lives only while the state is drawn.
    """
    import torch

    from janus.checkpoints import init_tiny_weights
    from janus.models.modeling_vlm import MultiModalityCausalLM

    with torch.device(device):
        model = MultiModalityCausalLM(_multimodality_config(cfg))
    torch.manual_seed(seed)
    init_tiny_weights(model)
    state = {k: v.detach().to(getattr(torch, dtype)) for k, v in model.state_dict().items()}
    del model
    free_memory()
    return state


def model_from_state(cfg: dict[str, Any], state: dict[str, Any], dtype: str, device):
    """The loader's own steps without the files: meta build, strict assignment of tensors cast to
    ``dtype``, non-persistent buffers (rotary inv_freq) recomputed in fp32 on the device."""
    import torch

    from janus.models.loading import _materialise_non_persistent_buffers
    from janus.models.modeling_vlm import MultiModalityCausalLM

    target = getattr(torch, dtype)
    with torch.device("meta"):
        model = MultiModalityCausalLM(_multimodality_config(cfg))
    cast = {k: v.to(device=device, dtype=target) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    _materialise_non_persistent_buffers(model, torch.device(device))
    model.config.dtype = target
    return model.eval()


def processor_for(work: Path):
    """DeepSeek's processor over the tiny stand-in tokenizer (ids are looked up by string)."""
    from janus.checkpoints import write_processor_configs, write_tiny_tokenizer
    from janus.models import VLChatProcessor

    directory = work / "processor"
    if not (directory / "tokenizer.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        write_tiny_tokenizer(directory)
        write_processor_configs(directory)
    return VLChatProcessor.from_pretrained(directory)


def build_model(shape_name: str, dtype: str, device, work: Path) -> tuple[Any, Any, dict[str, Any]]:
    """(model, processor, facts) for a shape: random weights made on the device, as the loader leaves them."""
    import torch

    from benchmarks.bench_engines import model_shape

    t0 = time.perf_counter()
    cfg = model_config(shape_kwargs(shape_name), dtype)
    model = model_from_state(cfg, random_state(cfg, dtype, device), dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    facts = {
        "shape": shape_name,
        "model_shape": model_shape(model),
        "params": sum(p.numel() for p in model.parameters()),
        "weight_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
        "build_s": time.perf_counter() - t0,
    }
    return model, processor_for(work), facts


def model_item(rec: Recorder, shape: str, plan: Plan, device, work: Path):
    """Build the random-weight model of ``shape`` on the device as one recorded item:
    (model, processor, facts), or None when the build failed (recorded)."""
    held: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        held["model"], held["processor"], facts = build_model(shape, plan.dtype, device, work)
        return facts

    facts = rec.item(f"{shape} model, random weights on the device", build, 15)
    if facts is None:
        return None
    return held["model"], held["processor"], facts


def write_checkpoint(directory: Path, shape_name: str, dtype: str, device) -> dict[str, Any]:
    """A complete checkpoint in the official layout (safetensors), for the jobs' loader path."""
    from janus.checkpoints import save_state_dict, write_processor_configs, write_tiny_tokenizer

    t0 = time.perf_counter()
    if not (directory / "complete").exists():
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        cfg = model_config(shape_kwargs(shape_name), dtype)
        write_tiny_tokenizer(directory)
        write_processor_configs(directory)
        (directory / "config.json").write_text(json.dumps(cfg, indent=2))
        state = {k: v.cpu() for k, v in random_state(cfg, dtype, device).items()}
        save_state_dict(state, directory, weights_format="safetensors")
        (directory / "complete").write_text("")
    weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    return {"path": str(directory), "weight_bytes": weights, "write_s": time.perf_counter() - t0}
