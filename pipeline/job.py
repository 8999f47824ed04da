"""The batch jobs as Ray Data graphs: read -> drop committed keys -> model actors -> shard sink.

synthesize: prompt files -> rows (n_samples each) -> Synthesizer actors -> tar + Parquet shards.
caption:    image files / Parquet / tars -> CPU decode + resize tasks -> Captioner actors -> Parquet.
Every input row becomes exactly one committed output row; a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any

import numpy as np
import ray

from .config import ConfigError, JobConfig
from .resume import cleanup_uncommitted, drop_committed, duplicate_keys, load_committed, summarize_output
from .sinks import ShardDatasink
from .sources import PromptDefaults, image_dataset, prompt_dataset
from .storage import storage_step

logger = logging.getLogger(__name__)


def connect(cfg: JobConfig) -> None:
    """Join the cluster named by config or RAY_ADDRESS; otherwise start a local Ray."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        logger.info("starting a local Ray (num_cpus=%s, num_gpus=%s)", cfg.ray.num_cpus, cfg.ray.num_gpus)
        ray.init(
            num_cpus=cfg.ray.num_cpus,
            num_gpus=cfg.ray.num_gpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )


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


def model_actor_class(cfg: JobConfig, default: type) -> type:
    """The class the actor pool runs: the job's own, or ``compute.actor_class`` when set (a custom
    model, or a test's model-free stand-in that keeps the real reader, pool and sink around it)."""
    path = cfg.compute.actor_class
    if not path:
        return default
    module, _, name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"compute.actor_class {path!r} cannot be imported: {exc}") from exc
    if not isinstance(cls, type):
        raise ConfigError(f"compute.actor_class {path!r} is not a class")
    return cls


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


def _model_kwargs(cfg: JobConfig) -> dict[str, Any]:
    from .actors.common import resolve_model_ref

    model = cfg.model
    return {
        "name": model.path,  # what output rows record (not a machine-local cache path)
        "path": resolve_model_ref(model.path, model.cache_dir),
        "dtype": model.dtype,
        "device": model.device,
        "storage_options": model.storage_options,
        "cache_dir": model.cache_dir,
    }


def build_synthesis(cfg: JobConfig, committed: np.ndarray):
    from .actors import Synthesizer

    s = cfg.synthesis
    defaults = PromptDefaults(
        seed=s.seed, cfg_weight=s.cfg_weight, temperature=s.temperature, n_samples=s.n_samples
    )
    ds = prompt_dataset(cfg.input.url, cfg.input.storage_options, defaults, cfg.input.format)
    ds = full_batches(drop_committed(ds, committed), cfg.compute.batch_size)
    return ds.map_batches(
        model_actor_class(cfg, Synthesizer),
        fn_constructor_kwargs={
            "model": _model_kwargs(cfg),
            "engine": vars(cfg.engine),
            "sampling": {"top_k": s.top_k, "top_p": s.top_p},
        },
        **actor_options(cfg),
    )


def preprocess_images(
    batch: dict[str, np.ndarray], image_size: int, max_pixels: int
) -> dict[str, np.ndarray]:
    """CPU stage: bytes -> decoded, resized and padded uint8 [S, S, 3], so GPUs never wait on JPEG."""
    from janus.models.image_processing_vlm import VLMImageProcessor

    from .images import decode_image

    processor = VLMImageProcessor(image_size=image_size)
    n = len(batch["key"])
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    status = list(batch["status"])
    error = list(batch["error"])
    for i in range(n):
        if status[i] == "error":
            continue
        try:
            image = decode_image(batch["image_bytes"][i], max_pixels=max_pixels)
            width[i], height[i] = image.size
            pixels[i] = np.asarray(processor.resize(image))
        except Exception as exc:  # any undecodable input becomes that row's error
            status[i], error[i] = "error", f"{type(exc).__name__}: {exc}"
    return {
        "key": batch["key"],
        "source": batch["source"],
        "pixels": pixels,
        "width": width,
        "height": height,
        "status": np.array(status, dtype=object),
        "error": np.array(error, dtype=object),
    }


def build_caption(cfg: JobConfig, committed: np.ndarray):
    from .actors import Captioner

    i = cfg.input
    ds = image_dataset(i.url, i.storage_options, i.format, i.image_column, i.key_column)
    ds = drop_committed(ds, committed)
    ds = ds.map_batches(
        preprocess_images,
        fn_kwargs={"image_size": 384, "max_pixels": i.max_pixels},
        batch_size=cfg.compute.batch_size,
        num_cpus=cfg.compute.preprocess_cpus,
    )
    return full_batches(ds, cfg.compute.batch_size).map_batches(
        model_actor_class(cfg, Captioner),
        fn_constructor_kwargs={
            "model": _model_kwargs(cfg),
            "engine": vars(cfg.engine),
            "caption": vars(cfg.caption),
        },
        **actor_options(cfg),
    )


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run (or resume) a job to completion; returns the summary that the CLI prints."""
    connect(cfg)
    out = cfg.output
    t0 = time.perf_counter()
    with storage_step("read the output", out.url):
        removed = cleanup_uncommitted(out.url, out.storage_options)
        if removed:
            logger.info("removed %d uncommitted leftovers of an earlier run", len(removed))
        committed = load_committed(out.url, out.storage_options)
    logger.info("%s: %d rows already committed in %s", cfg.job, committed.size, out.url)

    with storage_step("list the input", cfg.input.url):
        ds = build_synthesis(cfg, committed) if cfg.job == "synthesize" else build_caption(cfg, committed)
    kind = "synthesis" if cfg.job == "synthesize" else "caption"
    sink = ShardDatasink(out.url, out.storage_options, kind=kind, rows_per_shard=out.rows_per_shard)
    ds.write_datasink(sink)
    elapsed = time.perf_counter() - t0

    written = {f: sum(s.get(f, 0) for s in sink.shards) for f in ("count", "ok", "failed")}
    with storage_step("read the output", out.url):
        # writers killed mid-file (a lost node) may leave temporaries; their shards were rewritten whole
        leftovers = cleanup_uncommitted(out.url, out.storage_options)
        if leftovers:
            logger.info("removed %d leftovers of writers that died mid-file", len(leftovers))
        totals = summarize_output(out.url, out.storage_options)
        duplicates = duplicate_keys(out.url, out.storage_options)
    summary: dict[str, Any] = {
        "job": cfg.job,
        "output": out.url,
        "this_run": {
            **written,
            "shards": len(sink.shards),
            "seconds": round(elapsed, 2),
            "rows_per_s": round(written["count"] / elapsed, 3) if elapsed > 0 else None,
        },
        "total": totals,
        "duplicate_keys": len(duplicates),
        "complete": not duplicates,
    }
    if cfg.job == "synthesize" and out.contact_sheet:
        from .contact_sheet import write_contact_sheet

        summary["contact_sheet"] = write_contact_sheet(out.url, out.storage_options, out.contact_sheet)
    logger.info(
        "%s done: %d rows (%d ok, %d failed) in %.1fs -> %s",
        cfg.job,
        written["count"],
        written["ok"],
        written["failed"],
        elapsed,
        out.url,
    )
    return summary
