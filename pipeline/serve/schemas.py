"""Request bodies of the OpenAI-compatible routes, validated strictly (no "5" for 5, no NaN).

Unknown fields are ignored, as OpenAI-compatible servers do, so official clients that send fields
we do not use (``user``, ``quality``, ...) keep working; every field we do use is checked here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from janus.engine.checks import RULES, SEED_LIMIT  # noqa: F401  (SEED_LIMIT: the routes draw seeds below it)
from janus.engine.prompts import DEFAULT_CFG_WEIGHT, DEFAULT_TEMPERATURE


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class ImageURL(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; Janus sees every image at 384 px


class ContentPart(_Body):
    """One part of a message: ``{"type": "text", "text": ...}`` or ``{"type": "image_url", ...}``."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _payload(self) -> ContentPart:
        if getattr(self, self.type) is None:
            raise ValueError(f"a {self.type!r} part needs a {self.type!r} field")
        return self


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: list[ContentPart] | None = None  # a plain string becomes one text part
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_as_part(cls, content: object) -> object:
        return [{"type": "text", "text": content}] if isinstance(content, str) else content


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, **RULES["max_new_tokens"].bounds())
    max_completion_tokens: int | None = Field(None, **RULES["max_new_tokens"].bounds())  # max_tokens' newer name
    # the rule, and OpenAI's upper limit of 2; None: greedy, as the batch caption job
    temperature: float | None = Field(None, **RULES["temperature"].bounds(), le=2)
    top_p: float | None = Field(None, **RULES["top_p"].bounds())
    seed: int | None = Field(None, **RULES["seed"].bounds())
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extension: decode to max_tokens past the end-of-answer token (load tests with set lengths)
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported for chat completions")
        return n


class ImageGenerationRequest(_Body):
    prompt: str = Field(min_length=1)
    model: str | None = None  # None: the served synthesis model
    n: int = Field(1, ge=1)
    size: str | None = None  # None / "auto": the model's size (384x384 for Janus-Pro)
    response_format: Literal["b64_json", "url"] | None = None  # url: needs the server's api.image_store
    stream: bool = False  # server-sent image_generation.* events (n=1)
    partial_images: int | None = Field(None, ge=0, le=3)  # streamed pictures of the grid so far, before the image
    # extensions, passed to the engine exactly as the batch job passes them
    seed: int | None = Field(None, **RULES["seed"].bounds())  # None: a random seed (returned per image)
    cfg_weight: float = Field(DEFAULT_CFG_WEIGHT, **RULES["cfg_weight"].bounds())
    temperature: float = Field(DEFAULT_TEMPERATURE, **RULES["temperature"].bounds())
    # candidates per image, the best by self-verification score returned (the server's max_best_of applies)
    best_of: int = Field(1, **RULES["best_of"].bounds())
