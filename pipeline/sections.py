"""The configuration sections the batch jobs and Serve share: the model, sampling filters and engine
options, each checked where it is declared (unknown keys are errors), and a bad value's one-line message.

The engine options are the engines' own constructor arguments (a test holds them equal): only the keys a
user sets are passed on, so the engines keep their defaults.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from janus.engine.checks import RULES

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    """Where the checkpoint comes from and how it is placed."""

    #: local dir, hub id (deepseek-ai/Janus-Pro-7B), fsspec URL (s3://...), or an embedded model:
    #: "shapes" (small, trained on drawn shapes) or "tiny" (random weights)
    path: str = Field("shapes", min_length=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = the checkpoint's dtype
    device: str = "auto"  # auto = cuda when the actor has a GPU, else cpu
    storage_options: dict[str, Any] = Field(default_factory=dict)
    cache_dir: str | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value


class SamplingSection(Section):
    """Optional sampling filters for synthesis (off by default, as in DeepSeek's loop)."""

    top_k: int | None = Field(None, **RULES["top_k"].bounds())
    top_p: float | None = Field(None, **RULES["top_p"].bounds())


class EngineOptions(Section):
    """Engine constructor options; only the keys a user sets are passed on (the engine owns the defaults)."""

    #: the engine whose ``__init__`` keyword arguments these fields must be exactly
    engine: ClassVar[str] = ""

    @classmethod
    def engine_class(cls) -> type:
        import janus.engine

        return getattr(janus.engine, cls.engine)

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> dict[str, Any]:
        return cls.model_validate(options or {}).model_dump(exclude_unset=True)


class SpeculativeSection(Section):
    """Speculative Jacobi decoding of image codes (``janus.engine.speculative``): several codes per
    forward pass from one distribution-preserving rule. ``max_rows``: the most images in a batch that
    decode speculatively (above it, plainly: a busy device gains nothing); null = any."""

    method: Literal["off", "jacobi", "coupled"] = "off"
    window: int = Field(16, ge=2, le=64)
    max_rows: int | None = Field(None, ge=1)
    draft_init: Literal["left", "random"] = "left"


class SynthesisEngineOptions(EngineOptions):
    engine = "SynthesisEngine"
    max_batch_size: int = Field(16, ge=1)
    vq_decode_batch_size: int = Field(1, ge=1)  # > 1: faster on a GPU, pixels depend on the batch
    vq_channels_last: bool = True
    cfg_before_head: bool = True
    compile: bool = False
    max_prompt_tokens: int | None = Field(None, ge=1)
    truncate_prompts: bool = False
    memory_fraction: float = Field(0.9, gt=0, le=1)
    speculative: SpeculativeSection = Field(default_factory=SpeculativeSection)


class CaptionEngineOptions(EngineOptions):
    engine = "CaptionEngine"
    max_batch_size: int = Field(16, ge=1)
    max_images_per_request: int = Field(4, ge=1)
    compile: bool = False
    memory_fraction: float = Field(0.9, gt=0, le=1)


def engine_option_names(options: type[EngineOptions]) -> list[str]:
    """The engine constructor's keyword options (what ``options`` must declare, no more, no less)."""
    params = inspect.signature(options.engine_class().__init__).parameters
    return [p for p in params if p not in ("self", "model", "processor")]


def one_line(exc: ValidationError, what: str = "") -> str:
    """pydantic's first complaint as ``key: message (got value)``, plus how many more there are."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = f"unknown key{f' for {what}' if what else ''}"
    shown = first.get("input")
    got = f" (got {shown!r})" if first["type"] != "extra_forbidden" and not isinstance(shown, dict) else ""
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{loc + ': ' if loc else ''}{msg}{got}{more}"
