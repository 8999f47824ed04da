"""The online application's arguments: the ``args`` of an application in a Serve YAML, and its API keys
(an environment variable or a YAML file with names and per-key limits: only SHA-256 digests of the
keys leave the builder, as the ingress replicas' arguments; logs and metrics name a key by its name,
from the file or ``key-`` + the first 8 hex digits of its digest, never the key).

Validated once, at build time (``serve run``/``serve deploy``/``janus-pipeline serve``), with unknown
keys rejected: a typo in a limit must not silently fall back to a default on a public endpoint.
Deployment options (replicas, autoscaling, queues, resources) are Ray Serve's own and are checked
against its schema here too, so a bad config fails before any replica starts.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from janus.engine.checks import MAX_BEST_OF
from pipeline.config import QualitySection
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.sections import (
    CaptionEngineOptions,
    ModelSection,
    SamplingSection,
    Section,
    SynthesisEngineOptions,
    one_line,
)

IMPORT_PATH = "pipeline.serve.app:build_app"


class ServeConfigError(ValueError):
    """The serve configuration cannot be used; the message says which key and why."""


class ServeModelSection(ModelSection):
    """The batch jobs' model section plus the name clients send."""

    name: str | None = None  # the ``model`` clients send; default: path

    @property
    def served_name(self) -> str:
        return self.name or self.path


class BatchingSection(Section):
    """How requests share the model: ``scheduler`` (continuous batching: requests join and leave the
    running batch at every decode step, tokens stream) or ``batch`` (``@serve.batch``: requests that
    arrive within the wait share one model call)."""

    mode: Literal["scheduler", "batch"] = "scheduler"
    max_batch_size: int = Field(8, ge=1)  # requests decoded together
    batch_wait_timeout_s: float = Field(0.05, ge=0)  # batch mode: how long a batch waits to fill
    max_len: int | None = Field(None, ge=64)  # scheduler: tokens a cache slot holds (prompt + answer)
    #: scheduler: a streamed answer's first text goes out at once, the rest at most this often (the text
    #: decoded meanwhile in one piece: each piece is a message from the replica, which costs CPU); 0:
    #: every token as it is decoded
    stream_interval_s: float = Field(0.02, ge=0, le=1)


class BackendSection(Section):
    """One model deployment: an actor class from ``pipeline.actors`` with its batching and scaling."""

    model: ServeModelSection = Field(default_factory=ServeModelSection)
    engine: dict[str, Any] = Field(default_factory=dict)  # the engine's constructor options (checked)
    batching: BatchingSection = Field(default_factory=BatchingSection)
    deployment: dict[str, Any] = Field(default_factory=dict)  # Ray Serve deployment options

    def deployment_options(self, name: str) -> dict[str, Any]:
        """Serve options with defaults that keep the queue bounded and a batch always forming."""
        size = self.batching.max_batch_size
        options = {"max_ongoing_requests": 2 * size, "max_queued_requests": 8 * size, **self.deployment}
        check_deployment_options(name, options)
        ongoing = options["max_ongoing_requests"]
        if ongoing < size:
            raise ServeConfigError(
                f"{name}: max_ongoing_requests ({ongoing}) must be >= batching.max_batch_size ({size}), "
                "or batches can never fill"
            )
        return options


class SynthesisSection(BackendSection):
    sampling: SamplingSection = Field(default_factory=SamplingSection)  # top_k / top_p, as the batch job's
    #: what the model reads back from each image (score by default); requests choose best_of themselves
    quality: QualitySection = Field(default_factory=QualitySection)

    @field_validator("quality")
    @classmethod
    def _online_quality(cls, quality: QualitySection) -> QualitySection:
        if quality.min_score is not None or quality.best_of > 1:
            raise ValueError("min_score and best_of are per request online (best_of) or batch-job settings")
        return quality

    @field_validator("engine")
    @classmethod
    def _engine_options(cls, engine: dict[str, Any]) -> dict[str, Any]:
        return _engine(SynthesisEngineOptions, engine)


class CaptionSection(BackendSection):
    @field_validator("engine")
    @classmethod
    def _engine_options(cls, engine: dict[str, Any]) -> dict[str, Any]:
        return _engine(CaptionEngineOptions, engine)


def _engine(options: type, engine: dict[str, Any]) -> dict[str, Any]:
    try:
        return options.parse(engine)
    except ValidationError as exc:
        raise ValueError(one_line(exc, f"{options.engine} options")) from None


class LimitsSection(Section):
    """What one API key may use (unset: no limit). Minutes are sliding windows (the last 60 s)."""

    requests_per_minute: int | None = Field(None, ge=1)
    #: images made: a request with n=4, best_of=2 counts 8
    images_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)  # chat: prompt + completion tokens
    max_parallel_requests: int | None = Field(None, ge=1)

    @property
    def any(self) -> bool:
        return any(v is not None for v in self.model_dump().values())


class KeysSection(Section):
    """Where the API keys come from. Any key configured: every ``/v1/*`` route needs one."""

    env: str = Field("JANUS_API_KEYS", min_length=1)  # comma-separated keys in this variable
    #: a YAML list, one entry per key: ``- sk-...`` or ``- {key: sk-..., name: alice, <limits>}``
    file: str | None = None


class ImageStoreSection(Section):
    """Where ``response_format: url`` images are written (any fsspec URL) and for how long links last."""

    url: str = Field(min_length=1)  # e.g. s3://bucket/janus-images/ or file:///srv/janus-images/
    storage_options: dict[str, Any] = Field(default_factory=dict)
    url_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600)  # presigned s3:// links (S3's maximum: 7 days)

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if "://" not in url:
            raise ValueError(f"{url!r} is not a URL: use s3://bucket/prefix/ or file:///absolute/dir/")
        return url


class APISection(Section):
    """The HTTP ingress: request limits, where images may come from, keys and their limits, its own
    deployment options."""

    keys: KeysSection = Field(default_factory=KeysSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)  # every key's (a key file's entry overrides)
    #: the shared counts must answer within this, or the request is refused with 503 (fail closed)
    limits_timeout_s: float = Field(2.0, gt=0)
    image_store: ImageStoreSection | None = None  # response_format: url needs one

    max_body_bytes: int = Field(16 * 2**20, ge=1024)  # checked before any JSON is parsed
    max_image_bytes: int = Field(16 * 2**20, ge=1)  # per image read from file:// or s3://
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # decompression-bomb guard for uploaded images
    max_n: int = Field(4, ge=1)  # images per /v1/images/generations request
    max_best_of: int = Field(4, ge=1, le=MAX_BEST_OF)  # candidates per image a request may ask for
    max_tokens: int = Field(1024, ge=1)  # upper bound for a chat request's max_tokens
    default_max_tokens: int = Field(256, ge=1)
    retry_after_s: int = Field(1, ge=0)  # Retry-After of 503 answers when a model queue is full
    request_timeout_s: float = Field(300.0, gt=0)  # a model answer slower than this: 504, request cancelled
    load_wait_s: float = Field(5.0, ge=0)  # a model still loading after this long: 503 + Retry-After
    #: file:// and s3:// URL prefixes images may be read from (e.g. s3://bucket/uploads/); none by default
    image_url_prefixes: list[str] = Field(default_factory=list)
    image_storage_options: dict[str, Any] = Field(default_factory=dict)  # fsspec options for s3://
    deployment: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> APISection:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must be <= max_tokens")
        for prefix in self.image_url_prefixes:
            scheme, _, rest = prefix.partition("://")
            if scheme not in ("s3", "file") or (scheme == "file" and not rest.startswith("/")):
                raise ValueError(f"image_url_prefixes: {prefix!r} is not an s3:// or file:/// prefix")
            if not rest.strip("/") or ".." in rest.split("/"):  # not a whole filesystem, no traversal
                raise ValueError(f"image_url_prefixes: {prefix!r} is not a usable prefix")
        return self

    def deployment_options(self) -> dict[str, Any]:
        options = {
            "max_ongoing_requests": 256,  # async and mostly waiting on the models: many at once
            "max_queued_requests": 1024,
            "backpressure_config": {"retry_after_s": self.retry_after_s},
            **self.deployment,
        }
        check_deployment_options("api", options)
        return options


# -- API keys: read where the application is built; only their digests reach the ingress ------------

MIN_KEY_LENGTH = 16


class KeyEntry(LimitsSection):
    """One entry of a key file: the key, its name, and limits over ``api.limits``."""

    key: str = Field(min_length=MIN_KEY_LENGTH)
    name: str | None = Field(None, min_length=1)


@dataclass(frozen=True)
class Key:
    name: str
    digest: bytes
    limits: LimitsSection


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def load_keys(api: APISection, environ: Mapping[str, str] = os.environ) -> list[Key]:
    """Every configured key, with its name and limits; a bad entry is a ``ServeConfigError``."""
    entries: list[Any] = [k.strip() for k in environ.get(api.keys.env, "").split(",") if k.strip()]
    if api.keys.file:
        entries += _file_entries(api.keys.file)
    keys = [_key(entry, i, api) for i, entry in enumerate(entries)]
    for what, values in (("key", [k.digest for k in keys]), ("name", [k.name for k in keys])):
        if len(set(values)) < len(values):
            raise ServeConfigError(f"api.keys: the same {what} is configured twice")
    return keys


def _file_entries(path: str) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ServeConfigError(f"api.keys.file: cannot read {path}: {type(exc).__name__}") from None
    if not isinstance(data, list):
        raise ServeConfigError(
            f"api.keys.file: {path} must be a YAML list (- <key> or - {{key: ..., name: ...}})"
        )
    return data


def _key(entry: Any, index: int, api: APISection) -> Key:
    fields = {"key": entry} if isinstance(entry, str) else entry
    where = f"api.keys entry {index}"
    if not isinstance(fields, dict):
        raise ServeConfigError(f"{where}: a key string or a mapping with a 'key'")
    try:
        checked = KeyEntry.model_validate({**api.limits.model_dump(exclude_none=True), **fields})
    except ValidationError as exc:  # the message names the field; the key itself is never shown
        first = exc.errors(include_url=False)[0]
        if first["loc"] and first["loc"][0] == "key":
            raise ServeConfigError(
                f"{where}: key must be a string of at least {MIN_KEY_LENGTH} characters"
            ) from None
        raise ServeConfigError(f"{where}: {one_line(exc).split(' (got')[0]}") from None
    d = digest(checked.key)
    limits = LimitsSection.model_validate(checked.model_dump(exclude={"key", "name"}))
    return Key(checked.name or f"key-{d.hex()[:8]}", d, limits)


class ServeArgs(Section):
    """Everything the application builder takes; ``null`` for a section leaves that model out."""

    api: APISection = Field(default_factory=APISection)
    synthesis: SynthesisSection | None = Field(default_factory=SynthesisSection)
    caption: CaptionSection | None = Field(default_factory=CaptionSection)

    @model_validator(mode="after")
    def _some_model(self) -> ServeArgs:
        if self.synthesis is None and self.caption is None:
            raise ValueError("at least one of synthesis and caption must be configured")
        return self


def check_deployment_options(name: str, options: dict[str, Any]) -> None:
    """Ray's own schema, plus the unknown-key check it does not do."""
    from ray.serve.schema import DeploymentSchema

    known = set(DeploymentSchema.model_fields) - {"name"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ServeConfigError(f"{name}.deployment: unknown option(s) {unknown}; known: {sorted(known)}")
    try:
        DeploymentSchema.model_validate({"name": name, **options})
    except ValidationError as exc:
        raise ServeConfigError(f"{name}.deployment.{one_line(exc)}") from None


def parse_args(args: Any) -> ServeArgs:
    try:
        return ServeArgs.model_validate(args or {})
    except ValidationError as exc:
        raise ServeConfigError(one_line(exc)) from None


def check_serve_config(path: str | Path) -> list[tuple[str, ServeArgs]]:
    """Validate a Serve YAML (Ray's schema) and the args of each of our applications in it."""
    from ray.serve.schema import ServeDeploySchema

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        config = ServeDeploySchema.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        problem = one_line(exc) if isinstance(exc, ValidationError) else " ".join(str(exc).split())
        raise ServeConfigError(f"{path}: {problem}") from None
    apps = [(app.name, parse_args(app.args)) for app in config.applications if app.import_path == IMPORT_PATH]
    if not apps:
        raise ServeConfigError(f"{path}: no application with import_path {IMPORT_PATH}")
    for _, args in apps:
        args.api.deployment_options()
        load_keys(args.api)  # a missing or bad key file fails here, before Ray starts
        for name, section in (("synthesis", args.synthesis), ("caption", args.caption)):
            if section is not None:
                section.deployment_options(name)
    return apps
