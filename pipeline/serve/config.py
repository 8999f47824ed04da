"""The online application's arguments: the ``args`` of an application in a Serve YAML.

Validated once, at build time (``serve run``/``serve deploy``/``janus-pipeline serve``), with unknown
keys rejected: a typo in a limit must not silently fall back to a default on a public endpoint.
Deployment options (replicas, autoscaling, queues, resources) are Ray Serve's own and are checked
against its schema here too, so a bad config fails before any replica starts.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

IMPORT_PATH = "pipeline.serve.app:build_app"


class ServeConfigError(ValueError):
    """The serve configuration cannot be used; the message says which key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    """Where the checkpoint comes from: the batch jobs' ``model`` section plus the served name."""

    path: str = "tiny"
    name: str | None = None  # the ``model`` clients send; default: path
    dtype: str = "auto"
    device: str = "auto"
    storage_options: dict[str, Any] = Field(default_factory=dict)
    cache_dir: str | None = None

    @property
    def served_name(self) -> str:
        return self.name or self.path


class BatchingSection(_Section):
    """``@serve.batch``: requests that arrive within the wait share one model call."""

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)


class BackendSection(_Section):
    """One model deployment: an actor class from ``pipeline.actors`` with its batching and scaling."""

    model: ModelSection = Field(default_factory=ModelSection)
    engine: dict[str, Any] = Field(default_factory=dict)  # the engine's constructor options
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
    sampling: dict[str, Any] = Field(default_factory=dict)  # top_k / top_p, as the batch job's

    @model_validator(mode="after")
    def _engine_options(self) -> SynthesisSection:
        from janus.engine import SynthesisEngine

        check_engine_options("synthesis", SynthesisEngine, self.engine)
        unknown = sorted(set(self.sampling) - {"top_k", "top_p"})
        if unknown:
            raise ValueError(f"unknown sampling option(s) {unknown}; known: ['top_k', 'top_p']")
        return self


class CaptionSection(BackendSection):
    @model_validator(mode="after")
    def _engine_options(self) -> CaptionSection:
        from janus.engine import CaptionEngine

        check_engine_options("caption", CaptionEngine, self.engine)
        return self


class APISection(_Section):
    """The HTTP ingress: request limits, where images may come from, its own deployment options."""

    max_body_bytes: int = Field(16 * 2**20, ge=1024)  # checked before any JSON is parsed
    max_image_bytes: int = Field(16 * 2**20, ge=1)  # per image read from file:// or s3://
    max_pixels: int = Field(40_000_000, ge=1)  # decompression-bomb guard for uploaded images
    max_n: int = Field(4, ge=1)  # images per /v1/images/generations request
    max_tokens: int = Field(1024, ge=1)  # upper bound for a chat request's max_tokens
    default_max_tokens: int = Field(256, ge=1)
    retry_after_s: int = Field(1, ge=0)  # Retry-After of 503 answers when a model queue is full
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


class ServeArgs(_Section):
    """Everything the application builder takes; ``null`` for a section leaves that model out."""

    api: APISection = Field(default_factory=APISection)
    synthesis: SynthesisSection | None = Field(default_factory=SynthesisSection)
    caption: CaptionSection | None = Field(default_factory=CaptionSection)

    @model_validator(mode="after")
    def _some_model(self) -> ServeArgs:
        if self.synthesis is None and self.caption is None:
            raise ValueError("at least one of synthesis and caption must be configured")
        return self


def check_engine_options(section: str, engine_cls: type, options: dict[str, Any]) -> None:
    known = [
        p
        for p in inspect.signature(engine_cls.__init__).parameters
        if p not in ("self", "model", "processor")
    ]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{section}.engine: unknown option(s) {unknown}; known: {known}")


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
        raise ServeConfigError(f"{name}.deployment: {exc}") from None


def parse_args(args: Any) -> ServeArgs:
    try:
        return ServeArgs.model_validate(args or {})
    except ValidationError as exc:
        raise ServeConfigError(str(exc)) from None


def check_serve_config(path: str | Path) -> list[tuple[str, ServeArgs]]:
    """Validate a Serve YAML (Ray's schema) and the args of each of our applications in it."""
    from ray.serve.schema import ServeDeploySchema

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        config = ServeDeploySchema.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ServeConfigError(f"{path}: {exc}") from None
    apps = [(app.name, parse_args(app.args)) for app in config.applications if app.import_path == IMPORT_PATH]
    if not apps:
        raise ServeConfigError(f"{path}: no application with import_path {IMPORT_PATH}")
    for _, args in apps:
        args.api.deployment_options()
        for name, section in (("synthesis", args.synthesis), ("caption", args.caption)):
            if section is not None:
                section.deployment_options(name)
    return apps
