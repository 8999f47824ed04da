"""Checkpoint loading: official ``pytorch_model*.bin`` (pickled, read with weights_only) or safetensors.

The model is built on the meta device and each tensor is read from its (memory-mapped) file, cast
and assigned one at a time, so loading never holds a second full copy of the weights in RAM.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .configuration import MultiModalityConfig
from .hub import resolve_model_path

logger = logging.getLogger(__name__)

_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete, corrupted or does not match the model."""


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {
        "fp32": "float32",
        "fp16": "float16",
        "half": "float16",
        "bf16": "bfloat16",
        "float": "float32",
    }
    name = aliases.get(name, name)
    if name == "auto":
        return None
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    return getattr(torch, name)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> cuda if available else cpu; "cuda" without CUDA falls back to cpu with a warning."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("CUDA was requested but is not available; running on CPU")
        return torch.device("cpu")
    return device


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, sharded (index json) or single."""
    for index_name in _INDEX_FILES:
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a valid weight index ({exc})") from exc
            files = [directory / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
            return files
    for name in _SINGLE_FILES:
        if (directory / name).exists():
            return [directory / name]
    found = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if found:
        return found
    raise CheckpointError(
        f"no weights in {directory}: expected pytorch_model.bin, model.safetensors or a sharded index json"
    )


def iter_checkpoint_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (name, tensor, file) for every tensor; tensors are memory-mapped where the format allows."""
    for path in files:
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name), path
            else:
                # weights_only: never unpickle arbitrary objects from a checkpoint.
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                if not isinstance(state, dict):
                    raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
                for name, tensor in state.items():
                    if not isinstance(tensor, torch.Tensor):
                        raise CheckpointError(f"{path}: entry {name!r} is not a tensor")
                    yield name, tensor, path
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"cannot read weight file {path}: {type(exc).__name__}: {exc}. The file is corrupted or "
                "truncated (an interrupted download?): delete it and download the checkpoint again."
            ) from exc


def load_janus_model(
    name_or_path: str | os.PathLike,
    model_cls: type,
    *,
    config: MultiModalityConfig | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = "cpu",
    storage_options: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> Any:
    """Load a Janus checkpoint into a ``model_cls`` (``MultiModalityCausalLM``, whose ``from_pretrained``
    calls this) with strict key checking; returns the model in eval mode.

    ``dtype`` None keeps the checkpoint's ``torch_dtype`` (bf16 for official weights).
    """
    t0 = time.perf_counter()
    directory = resolve_model_path(
        name_or_path,
        cache_dir=cache_dir,
        storage_options=storage_options,
        revision=revision,
        local_files_only=local_files_only,
    )
    if config is None:
        config = MultiModalityConfig.from_json_file(directory / "config.json")
    target_dtype = parse_dtype(dtype) or config.dtype or torch.float32
    target_device = resolve_device(device)
    files = weight_files(directory)

    with torch.device("meta"):
        model = model_cls(config)
    expected = model.state_dict()
    state = _checked_state(directory, files, expected, target_dtype, target_device)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    _materialise_non_persistent_buffers(model, target_device)
    model.config.dtype = target_dtype
    model.eval()
    logger.info(
        "loaded %s (%d tensors, %s, %s) in %.1fs",
        name_or_path,
        len(expected),
        str(target_dtype).removeprefix("torch."),
        target_device,
        time.perf_counter() - t0,
    )
    return model


def _checked_state(
    directory: Path, files: list[Path], expected: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in ``dtype`` on ``device``, every key and shape equal to the model's
    (``expected``); anything else is one ``CheckpointError`` that lists what is missing, extra or off."""
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for name, tensor, path in iter_checkpoint_tensors(files):
        ref = expected.get(name)
        if ref is None:
            unexpected.append(f"{name} (in {path.name})")
            continue
        if tuple(tensor.shape) != tuple(ref.shape):
            mismatched.append(
                f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(ref.shape)} ({path.name})"
            )
            continue
        if tensor.is_floating_point():
            tensor = tensor.to(dtype=dtype)
        state[name] = tensor.to(device)
    missing = sorted(set(expected) - set(state) - {m.split(":")[0] for m in mismatched})
    if missing or unexpected or mismatched:
        raise CheckpointError(_key_report(directory, missing, unexpected, mismatched))
    return state


def _materialise_non_persistent_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Buffers that are not saved (rotary inverse frequencies) are recomputed by rebuilding their module."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)) and not any(
                p.is_meta for p in child.parameters(recurse=False)
            ):
                fresh = _rebuild(child)
                setattr(parent, child_name, fresh.to(device))
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise CheckpointError(f"tensors left uninitialised after loading: {leftovers[:10]}")


def _rebuild(module: torch.nn.Module) -> torch.nn.Module:
    config = getattr(module, "config", None)
    if config is None:
        raise CheckpointError(f"cannot rebuild module {type(module).__name__} holding non-persistent buffers")
    return type(module)(config=config)


def _key_report(directory: Path, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    def block(title: str, items: list[str]) -> str:
        shown = "\n  ".join(items[:20])
        more = f"\n  ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"{title} ({len(items)}):\n  {shown}{more}" if items else ""

    parts = [
        block("missing keys", missing),
        block("unexpected keys", unexpected),
        block("shape mismatches", mismatched),
    ]
    return f"checkpoint {directory} does not match the model built from its config.json:\n" + "\n".join(
        p for p in parts if p
    )
