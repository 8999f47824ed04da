"""Job configuration: YAML with defaults that work, plus ``--set a.b=value`` overrides.

One dataclass per section; unknown keys are an error (a typo must not silently fall back to a
default on a thousand-GPU job).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class ModelConfig:
    #: checkpoint: local dir, hub id (deepseek-ai/Janus-Pro-7B), fsspec URL, or "tiny" (embedded demo model)
    path: str = "tiny"
    dtype: str = "auto"  # auto = checkpoint dtype (bf16 for official weights) | float32 | bfloat16 | float16
    device: str = "auto"  # auto = cuda when the actor has a GPU, else cpu
    storage_options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None


@dataclass
class InputConfig:
    url: str = "configs/demo_prompts.txt"  # file, directory/prefix or glob on any fsspec URL
    format: str = "auto"  # synthesis: txt|jsonl|csv|parquet; caption: images|parquet|webdataset
    storage_options: dict[str, Any] = field(default_factory=dict)
    image_column: str = "image"  # caption from parquet: the bytes column
    key_column: str | None = None
    max_pixels: int = 64_000_000  # decompression-bomb guard for caption inputs


@dataclass
class OutputConfig:
    url: str = "out/synthesis"
    storage_options: dict[str, Any] = field(default_factory=dict)
    rows_per_shard: int = 256
    contact_sheet: int = 16  # synthesis: a PNG of the first N images (0 = none)


@dataclass
class SynthesisConfig:
    n_samples: int = 1
    seed: int = 0
    cfg_weight: float = 5.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


@dataclass
class CaptionConfig:
    question: str = "Describe this image in detail."
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float | None = None
    seed: int = 0


@dataclass
class EngineConfig:
    max_batch_size: int = 16
    compile: bool = False
    vq_decode_batch_size: int = 8
    vq_channels_last: bool = True  # NHWC VQ decode: same result to ~1e-4, much faster convolutions
    cfg_before_head: bool = True  # CFG mix before gen_head's last Linear: B rows through it, not 2B
    max_prompt_tokens: int | None = None
    truncate_prompts: bool = False


@dataclass
class ComputeConfig:
    min_actors: int = 1
    max_actors: int = 1
    gpus_per_actor: float | None = None  # None = 1 when the cluster has GPUs, else 0 (CPU actors)
    cpus_per_actor: float = 1.0
    batch_size: int = 16  # rows per model call (map_batches batch_size)
    preprocess_cpus: float = 0.5  # caption: CPU decode/preprocess tasks
    max_restarts: int = 3  # actor restarts after a crash; its batch is retried elsewhere
    resources: dict[str, float] = field(default_factory=dict)  # custom resources, e.g. {"worker": 1}
    #: "package.module:Class" to run instead of the job's model actor (Synthesizer / Captioner): same
    #: constructor arguments and batch columns. For custom models and for tests that need a model-free
    #: stand-in behind the real reader, actor pool and sink. None = the job's own actor.
    actor_class: str | None = None


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS if set, else start a local Ray
    num_cpus: int | None = None  # local Ray only
    num_gpus: int | None = None  # local Ray only


@dataclass
class JobConfig:
    job: str = "synthesize"  # synthesize | caption
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or 'config'}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            value = _build(type(sub), value or {}, f"{where}.{name}".lstrip("."))
        kwargs[name] = value
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Defaults <- YAML file <- ``a.b=value`` overrides (values parsed as YAML scalars)."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {k} is not a section")
        node[keys[-1]] = value
    cfg = _build(JobConfig, data, "")
    if cfg.job not in ("synthesize", "caption"):
        raise ConfigError(f"job must be 'synthesize' or 'caption', got {cfg.job!r}")
    if cfg.compute.min_actors < 1 or cfg.compute.max_actors < cfg.compute.min_actors:
        raise ConfigError("compute: need 1 <= min_actors <= max_actors")
    if cfg.compute.actor_class is not None:
        module, _, name = cfg.compute.actor_class.partition(":")
        if not module or not name.isidentifier():
            raise ConfigError(
                f"compute.actor_class must look like 'package.module:Class', got {cfg.compute.actor_class!r}"
            )
    return cfg
