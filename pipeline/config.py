"""Configuration, validated in one place: the batch jobs' YAML (with the sections Serve shares with it,
``pipeline.sections``).

Defaults <- YAML file <- ``--set a.b=value`` overrides, then pydantic checks every value: types,
ranges and unknown keys (a typo must not silently fall back to a default on a thousand-GPU job).
Whatever is wrong comes back as one ``ConfigError`` line naming the key. Generation defaults live in
``janus.engine.prompts`` and engine defaults in the engines' constructors; nothing here repeats them.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from janus.engine.checks import RULES
from janus.engine.prompts import (
    DEFAULT_CFG_WEIGHT,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_QUESTION,
    DEFAULT_TEMPERATURE,
)

from .images import DEFAULT_MAX_PIXELS
from .sections import (
    CaptionEngineOptions,
    EngineOptions,
    ModelSection,
    SamplingSection,
    Section,
    SynthesisEngineOptions,
    one_line,
)
from .sources.image_files import IMAGE_READERS
from .sources.keys import N_SAMPLES
from .sources.prompt_files import PROMPT_READERS

JOBS = ("synthesize", "caption")
#: what ``input.format`` takes per job: ``auto`` or one of the job's readers
INPUT_FORMATS = {"synthesize": ("auto", *PROMPT_READERS), "caption": ("auto", *IMAGE_READERS)}
_CLASS_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_COLUMN = re.compile(r"^[a-z_][a-z0-9_]*$")


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line that names the key and the problem."""


# -- the batch jobs -------------------------------------------------------------------------------


class InputSection(Section):
    url: str = Field("configs/demo_prompts.txt", min_length=1)  # file, directory/prefix or glob, any fsspec URL
    format: str = "auto"  # synthesis: txt|jsonl|csv|parquet; caption: images|parquet|webdataset
    storage_options: dict[str, Any] = Field(default_factory=dict)
    image_column: str = "image"  # caption from parquet: the bytes column
    key_column: str | None = None
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # decompression-bomb guard for caption inputs


class OutputSection(Section):
    url: str = Field("out/synthesis", min_length=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    rows_per_shard: int = Field(256, ge=1)
    contact_sheet: int = Field(16, ge=0)  # synthesis: a PNG of the first N images (0 = none)
    #: caption: tar shards beside the Parquet ones, in img2dataset's layout: ``{key}.jpg|png`` (the source
    #: image: its own bytes when JPEG or PNG, else re-encoded as PNG), ``{key}.txt`` (the caption),
    #: ``{key}.json`` (the row). Off by default: it copies the corpus. Synthesis always writes its tars.
    write_images: bool = False


class SynthesisSection(SamplingSection):
    n_samples: int = Field(1, **N_SAMPLES.bounds())
    seed: int = Field(0, **RULES["seed"].bounds())  # the job seed: part of every key and derived seed
    cfg_weight: float = Field(DEFAULT_CFG_WEIGHT, **RULES["cfg_weight"].bounds())
    temperature: float = Field(DEFAULT_TEMPERATURE, **RULES["temperature"].bounds())


class CaptionSection(Section):
    question: str = Field(DEFAULT_QUESTION, min_length=1)
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, **RULES["max_new_tokens"].bounds())
    temperature: float = Field(0.0, **RULES["temperature"].bounds())  # 0 = greedy, as DeepSeek's example
    top_p: float | None = Field(None, **RULES["top_p"].bounds())
    seed: int = Field(0, **RULES["seed"].bounds())
    #: each actor's batch through the continuous-batching scheduler: a finished answer frees its row
    #: for the next image at once instead of waiting for the batch's longest (1.21x images/s measured
    #: with answers of 8-94 tokens, benchmarks/README.md). Same captions in fp32; in bf16 a caption
    #: can differ in rounding from a static batch's, as static batches of other sizes also do
    continuous_batching: bool = False


class ComputeSection(Section):
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    gpus_per_actor: float | None = Field(None, ge=0)  # None = 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=1)  # rows per model call
    preprocess_cpus: float = Field(0.5, gt=0)  # caption: CPU decode/preprocess tasks
    resources: dict[str, float] = Field(default_factory=dict)  # custom resources, e.g. {"worker": 1}
    #: model actors that may die while starting (their node lost mid-load, out of memory at load)
    #: before the job fails; each one that starts resets the count, so a model that can never load
    #: still fails the job after this many + 1 tries. (Ray Data's own default, 0, fails at the first.)
    start_failures: int = Field(2, ge=0)
    #: "package.module:Class" to run instead of the job's model actor (same constructor arguments and
    #: columns as Synthesizer / Captioner): a custom model, or a test's model-free stand-in
    actor_class: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_restarts" in data:
            raise ValueError(
                "max_restarts is no longer a setting: Ray Data restarts a crashed actor without limit and "
                "retries its batch, and a row that crashes the actor again ends as an error row; remove it"
            )
        return data

    @field_validator("actor_class")
    @classmethod
    def _class_path(cls, value: str | None) -> str | None:
        if value is not None and not _CLASS_PATH.match(value):
            raise ValueError(f"must look like 'package.module:Class', got {value!r}")
        return value

    @model_validator(mode="after")
    def _pool(self) -> ComputeSection:
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        return self


class QualitySection(Section):
    """What the model reads back from every image it makes (synthesis) or reads (captioning)."""

    score: bool = True  # synthesis: self-verification score column
    min_score: float | None = Field(None, ge=0, le=1)  # synthesis: rows below get status "filtered"
    best_of: int = Field(1, **RULES["best_of"].bounds())  # synthesis: candidates per row, the best kept
    #: synthesis: a rated question per column (``rating_<name>``), e.g. {aesthetic: "How would you rate
    #: the aesthetics of this image?"}
    ratings: dict[str, str] = Field(default_factory=dict)
    embeddings: bool = False  # an L2-normalised float16 embedding column, for semantic dedup

    @field_validator("ratings")
    @classmethod
    def _ratings(cls, ratings: dict[str, str]) -> dict[str, str]:
        for name, question in ratings.items():
            if not _COLUMN.match(name):
                raise ValueError(f"rating name {name!r} must be a lower-case identifier (it names a column)")
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"rating {name!r} needs a question")
        return ratings

    @model_validator(mode="after")
    def _needs_score(self) -> QualitySection:
        if not self.score and (self.min_score is not None or self.best_of > 1):
            raise ValueError("min_score and best_of choose by score: they need score: true")
        return self

    def options(self) -> dict[str, Any]:
        """What the model actors take (``janus.engine.quality.QualityOptions`` plus min_score)."""
        return self.model_dump()


class RaySection(Section):
    """Which Ray the job runs on (``pipeline/connect.py``): ``address`` ("auto": the one ``ray start``
    began on this machine), else RAY_ADDRESS, else a private local Ray of ``num_cpus`` / ``num_gpus``."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)  # the private local Ray only
    num_gpus: int | None = Field(None, ge=0)  # the private local Ray only

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("ray://"):
            raise ValueError(RAY_CLIENT_REFUSED)
        return value


#: why a ``ray://`` address (Ray Client) is refused, for ``ray.address`` and RAY_ADDRESS alike
RAY_CLIENT_REFUSED = (
    "ray:// (Ray Client) cannot run a job, whose driver must run on the cluster; submit it with the "
    "Jobs API instead: ray job submit --address http://<head>:8265 --working-dir . -- janus-pipeline ..."
)


#: keys only one job reads (section, or section.key), and that job: set in the other job's config they
#: would be accepted and ignored, so they are an error
JOB_ONLY = {
    **dict.fromkeys(("synthesis", "output.contact_sheet", "quality.score", "quality.min_score"), "synthesize"),
    **dict.fromkeys(("quality.best_of", "quality.ratings"), "synthesize"),
    **dict.fromkeys(("caption", "input.image_column", "input.key_column", "input.max_pixels"), "caption"),
    "compute.preprocess_cpus": "caption",
    "output.write_images": "caption",  # synthesis always writes its images
}


ENGINE_OPTIONS: dict[str, type[EngineOptions]] = {
    "synthesize": SynthesisEngineOptions,
    "caption": CaptionEngineOptions,
}


class JobConfig(Section):
    job: Literal["synthesize", "caption"] = "synthesize"
    model: ModelSection = Field(default_factory=ModelSection)
    input: InputSection = Field(default_factory=InputSection)
    output: OutputSection = Field(default_factory=OutputSection)
    synthesis: SynthesisSection = Field(default_factory=SynthesisSection)
    caption: CaptionSection = Field(default_factory=CaptionSection)
    #: the job's engine options (SynthesisEngine or CaptionEngine keyword arguments); after validation,
    #: only the keys that were set, with their checked values
    engine: dict[str, Any] = Field(default_factory=dict)
    compute: ComputeSection = Field(default_factory=ComputeSection)
    quality: QualitySection = Field(default_factory=QualitySection)
    ray: RaySection = Field(default_factory=RaySection)
    #: the share of a job's rows (over its whole output) that may end as error rows before the job
    #: exits with code 3; 1.0: never (a job in which no row succeeded exits with 3 whatever this says)
    max_failed_fraction: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _per_job(self) -> JobConfig:
        formats = INPUT_FORMATS[self.job]
        if self.input.format not in formats:
            raise ValueError(f"input.format: {self.job} reads {', '.join(formats)}; got {self.input.format!r}")
        for key in self.other_jobs_keys():
            if self.is_set(key):
                raise ValueError(
                    f"{key} applies to {JOB_ONLY[key]} jobs only: remove it from this {self.job} job's config"
                )
        options = ENGINE_OPTIONS[self.job]
        try:
            self.engine = options.parse(self.engine)
        except ValidationError as exc:
            raise ValueError(f"engine.{one_line(exc, f'{options.engine} options')}") from None
        return self

    def other_jobs_keys(self) -> list[str]:
        """The keys (``JOB_ONLY``) that this job does not read."""
        return [key for key, job in JOB_ONLY.items() if job != self.job]

    def is_set(self, key: str) -> bool:
        """Whether the user set ``section`` or ``section.key`` (in the YAML or with ``--set``)."""
        section, _, name = key.partition(".")
        if section not in self.model_fields_set:
            return False
        return not name or name in getattr(self, section).model_fields_set


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        return key.strip().split("."), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc.problem})") from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{os.fspath(path)} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{os.fspath(path)} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, job: str | None = None
) -> JobConfig:
    """The job config from defaults, a YAML file and ``a.b=value`` overrides (values parsed as YAML).

    ``job`` is the subcommand: the YAML's ``job:`` may repeat it but never contradict it.
    """
    data = read_yaml(path) if path is not None else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {}) if k != "job" else k  # the job's kind, never a section
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {k} is not a section")
        node[keys[-1]] = value
    if job is not None:
        if job not in JOBS:
            raise ConfigError(f"unknown job {job!r}; use one of {', '.join(JOBS)}")
        stated = data.get("job", job)
        if stated != job:
            raise ConfigError(
                f"the config says job: {stated!r} but the command is {job!r}: "
                f"run `janus-pipeline {stated}` or change `job:`"
            )
        data["job"] = job
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(one_line(exc)) from None
