"""The two jobs' Ray Data graphs: read -> drop committed keys -> (caption: CPU decode) -> model actors.

synthesize: prompt files -> rows (n_samples each) -> Synthesizer actors.
caption:    image files / Parquet / tars -> CPU decode + resize tasks -> Captioner actors.
The shard sink that ends both is ``pipeline.sinks.ShardDatasink``; ``pipeline.job`` runs the graphs.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import ray

from .columns import INPUT, OutputColumns
from .config import ConfigError, JobConfig
from .crash_guard import CrashGuard
from .images import ImageDecodeError, model_pixels, phash, stored_image
from .model_ref import CAPTIONER, SYNTHESIZER, load_class, resolve_model_ref
from .output import drop_committed
from .sources.datasource import image_dataset, prompt_dataset
from .sources.prompt_files import PromptDefaults
from .storage import Listing

#: the image reader's columns that the caption job's rows carry on (its bytes are decoded here)
READ = OutputColumns("caption").carried(INPUT)


def actor_options(cfg: JobConfig) -> dict[str, Any]:
    """map_batches arguments for the model actor pool (GPU per actor when the cluster has GPUs)."""
    c = cfg.compute
    gpus = c.gpus_per_actor
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    from ray.data import ActorPoolStrategy

    # Only named map_batches arguments: **ray_remote_args is deprecated (gone in Ray 2.64). A crashed
    # actor is still restarted and its batch retried: Ray Data's actor pools default to
    # max_restarts=-1, max_task_retries=-1, and the sink's writes are idempotent.
    return {
        "compute": ActorPoolStrategy(min_size=c.min_actors, max_size=c.max_actors),
        "batch_size": c.batch_size,
        "num_gpus": gpus,
        "num_cpus": c.cpus_per_actor,
        "resources": c.resources or None,
    }


def model_actor_class(cfg: JobConfig, default: type | str) -> type | str:
    """The class the actor pool runs: the job's own (``default``, passed on as given), or
    ``compute.actor_class`` when set (a custom model, or a test's model-free stand-in that keeps the
    real reader, pool and sink around it), imported here so that a bad name is a config error."""
    path = cfg.compute.actor_class
    if not path:
        return default
    try:
        cls = load_class(path)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"compute.actor_class {path!r} cannot be imported: {exc}") from exc
    if not isinstance(cls, type):
        raise ConfigError(f"compute.actor_class {path!r} is not a class")
    return cls


def model_stage(ds, cfg: JobConfig, default: type | str, journal: Any, **kwargs: Any):
    """The GPU actor pool: ``default`` (or ``compute.actor_class``) constructed with ``kwargs``, each
    actor inside a ``CrashGuard`` that reports to the job's ``journal``, so a row that crashes its
    actor every time becomes an error row instead of an endless retry."""
    return ds.map_batches(
        CrashGuard,
        fn_constructor_kwargs={"actor_class": model_actor_class(cfg, default), "journal": journal, **kwargs},
        **actor_options(cfg),
    )


def full_batches(ds, batch_size: int):
    """Re-cut ``ds`` into blocks of exactly one model batch before the actor pool.

    Ray Data forms a task's batches within its input bundle, so a block of 21 rows runs as batches
    of 8, 8 and 5: every read block (Ray splits reads to reach its parallelism target, and the resume
    filter drops rows) would end in a short batch that costs a GPU nearly a full one. Ray's streaming
    repartition (strict: every block but the last has exactly this many rows) fixes that without a
    shuffle. One batch per block also keeps the output streaming: an actor task's outputs form one
    block, and a block is what the sink commits, so bigger blocks would delay every commit.
    """
    return ds.repartition(target_num_rows_per_block=batch_size, strict=True)


def model_kwargs(cfg: JobConfig) -> dict[str, Any]:
    """The actors' ``model`` argument: the model section; ``name`` is what output rows record."""
    return {**cfg.model.model_dump(), "name": cfg.model.path}


def build_synthesis(cfg: JobConfig, listing: Listing, committed: np.ndarray, journal: Any):
    s = cfg.synthesis
    defaults = PromptDefaults(
        seed=s.seed, cfg_weight=s.cfg_weight, temperature=s.temperature, n_samples=s.n_samples
    )
    ds = prompt_dataset(cfg.input.url, defaults=defaults, fmt=cfg.input.format, listing=listing)
    ds = full_batches(drop_committed(ds, committed), cfg.compute.batch_size)
    return model_stage(
        ds,
        cfg,
        SYNTHESIZER,
        journal,
        model=model_kwargs(cfg),
        engine=cfg.engine,
        sampling={"top_k": s.top_k, "top_p": s.top_p},
        quality=cfg.quality.options(),
    )


def checkpoint_json(cfg: JobConfig, name: str) -> dict[str, Any]:
    """One of the checkpoint's config files, read alone: the driver needs sizes, not the weights."""
    from janus.models.hub import read_checkpoint_file

    m = cfg.model
    try:
        ref = resolve_model_ref(m.path, m.cache_dir)
        return json.loads(read_checkpoint_file(ref, name, cache_dir=m.cache_dir, storage_options=m.storage_options))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.path: {exc}") from None


def preprocess_images(
    batch: dict[str, np.ndarray], processor: dict, max_pixels: int, write_images: bool = False
) -> dict[str, np.ndarray]:
    """CPU stage: bytes -> decoded, resized and padded uint8 [S, S, 3], so GPUs never wait on JPEG; with
    ``write_images``, also the bytes the output's tar keeps of each image (``images.stored_image``)."""
    from janus.models.image_processing_vlm import VLMImageProcessor

    resizer = VLMImageProcessor.from_dict(processor)
    size = resizer.image_size
    n = len(batch["key"])
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    hashes = np.zeros(n, dtype=np.int64)
    stored = np.full(n, None, dtype=object)
    reencoded = np.full(n, None, dtype=object)
    status = list(batch["status"])
    error = list(batch["error"])
    for i in range(n):
        if status[i] == "error":
            continue
        try:
            pixels[i], image = model_pixels(batch["image_bytes"][i], resizer, max_pixels)
            width[i], height[i], hashes[i] = image.width, image.height, phash(image)
            if write_images:
                stored[i], reencoded[i] = stored_image(batch["image_bytes"][i], image)
        except ImageDecodeError as exc:
            status[i], error[i] = "error", str(exc)
    return {
        **{name: batch[name] for name in READ},
        "pixels": pixels,
        "width": width,
        "height": height,
        "phash": hashes,
        "image": stored,
        "reencoded_from": reencoded,
        "status": np.array(status, dtype=object),
        "error": np.array(error, dtype=object),
    }


def build_caption(cfg: JobConfig, listing: Listing, committed: np.ndarray, journal: Any):
    i = cfg.input
    ds = image_dataset(i.url, fmt=i.format, image_column=i.image_column, key_column=i.key_column, listing=listing)
    ds = drop_committed(ds, committed)
    ds = ds.map_batches(
        preprocess_images,
        fn_kwargs={
            "processor": checkpoint_json(cfg, "preprocessor_config.json"),
            "max_pixels": i.max_pixels,
            "write_images": cfg.output.write_images,
        },
        batch_size=cfg.compute.batch_size,
        num_cpus=cfg.compute.preprocess_cpus,
    )
    return model_stage(
        full_batches(ds, cfg.compute.batch_size),
        cfg,
        CAPTIONER,
        journal,
        model=model_kwargs(cfg),
        engine=cfg.engine,
        caption=cfg.caption.model_dump(),
        quality={"embeddings": cfg.quality.embeddings},
    )
