"""MultiModalityConfig: the official Janus / Janus-Pro ``config.json`` schema.

The official file holds six sub-configs, each ``{"cls": ..., "model_type": ..., "params": {...}}``
except ``language_config``, which holds only the keys that differ from ``LlamaConfig``'s defaults.
Parameters that are not in the official files (``width``, ``layers``, ``ch``, ...) are our
extensions for shrinking the model in tests; when absent the official full size is built.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from transformers import LlamaConfig, PreTrainedConfig

#: sub-config name -> classes (``cls``) we can build for it
KNOWN_CLASSES: dict[str, tuple[str, ...]] = {
    "vision_config": ("CLIPVisionTower",),
    "aligner_config": ("MlpProjector",),
    "gen_vision_config": ("VQ-16",),
    "gen_aligner_config": ("MlpProjector",),
    "gen_head_config": ("vision_head",),
}


class AttrDict(dict):
    """A dict whose keys are also attributes (``params.image_size``), as DeepSeek's configs allow."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __deepcopy__(self, memo):
        return AttrDict(copy.deepcopy(dict(self), memo))


class ModuleConfig:
    """One ``{"cls", "model_type", "params"}`` entry of the official config."""

    def __init__(self, name: str, cls: str, params: dict | None = None, model_type: str | None = None):
        if cls not in KNOWN_CLASSES[name]:
            raise ValueError(
                f"{name}.cls = {cls!r} is not supported; expected one of {list(KNOWN_CLASSES[name])}. "
                "Is this a Janus / Janus-Pro checkpoint?"
            )
        self.name = name
        self.cls = cls
        self.model_type = model_type or name.removesuffix("_config")
        self.params = AttrDict(params or {})

    @classmethod
    def parse(cls, name: str, value: Any) -> ModuleConfig:
        if isinstance(value, ModuleConfig):
            return value
        if not isinstance(value, dict) or "cls" not in value:
            raise ValueError(f"config.json: {name} must be an object with 'cls' and 'params', got {value!r}")
        return cls(name, value["cls"], value.get("params"), value.get("model_type"))

    def to_dict(self) -> dict[str, Any]:
        return {"cls": self.cls, "model_type": self.model_type, "params": dict(self.params)}

    def __repr__(self) -> str:
        return f"ModuleConfig({self.to_dict()!r})"


class MultiModalityConfig(PreTrainedConfig):
    """Config of :class:`MultiModalityCausalLM`, parsed from the official ``config.json``."""

    model_type = "multi_modality"

    vision_config: Any = None
    aligner_config: Any = None
    gen_vision_config: Any = None
    gen_aligner_config: Any = None
    gen_head_config: Any = None
    language_config: Any = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        for name in KNOWN_CLASSES:
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"config.json has no {name!r}: is this a Janus / Janus-Pro checkpoint?")
            setattr(self, name, ModuleConfig.parse(name, value))
        lang = self.language_config
        if lang is None:
            raise ValueError("config.json has no 'language_config': is this a Janus / Janus-Pro checkpoint?")
        if not isinstance(lang, LlamaConfig):
            lang = dict(lang)
            lang.setdefault("tie_word_embeddings", False)  # official checkpoints hold a separate lm_head
            lang = LlamaConfig(**lang)
        self.language_config = lang
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in KNOWN_CLASSES:
            out[name] = getattr(self, name).to_dict()
        out["language_config"] = self.language_config.to_diff_dict()
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> MultiModalityConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read Janus config {os.fspath(path)!r}: {exc}") from exc
        data.pop("model_type", None)
        return cls(**data)

    # -- convenience accessors used across the package -------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.language_config.hidden_size

    @property
    def image_token_size(self) -> int:
        return int(self.gen_vision_config.params.get("image_token_size", 16384))
