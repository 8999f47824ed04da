"""The batch jobs as Ray Data graphs: read -> drop committed keys -> model actors -> shard sink.

synthesize: prompt files -> rows (n_samples each) -> Synthesizer actors -> tar + Parquet shards.
caption:    image files / Parquet / tars -> CPU decode + resize tasks -> Captioner actors -> Parquet.
Every input row becomes exactly one committed output row; a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np
import ray

from .config import ConfigError, JobConfig
from .connect import check_where_it_runs, connect
from .console import quiet_ray_data
from .crash_guard import CrashGuard, start_journal
from .images import ImageDecodeError, model_pixels, phash
from .model_ref import CAPTIONER, SYNTHESIZER, load_class, resolve_model_ref
from .output import OutputDir, drop_committed
from .sinks import STAT_COUNTS, ShardDatasink, output_schema
from .sources.datasource import image_dataset, prompt_dataset
from .sources.image_files import list_image_inputs
from .sources.prompt_files import PromptDefaults, list_prompt_files
from .storage import Listing, StorageError

logger = logging.getLogger(__name__)
SKIPPED_EXAMPLES = 5


class InputError(ConfigError):
    """The input URL names nothing the job can read (missing, empty, or of mixed kinds)."""


#: Ray Data reserves a running dataset's CPUs and GPUs through one coordinator actor per cluster, and
#: the driver renews that reservation every ~10 s. A driver that dies (killed, OOM, lost node) cannot
#: cancel it, so it lives on until it expires: 180 s by Ray's default. On a busy cluster the next job
#: then gets "0 CPU" for those minutes (the leftover is split with the dead request, rounded down).
#: 30 s keeps three renewals of slack for a live driver; a value set in the environment wins.
REQUEST_EXPIRE_ENV = "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S"
REQUEST_EXPIRE_S = 30


def bound_stale_resource_requests() -> int:
    """Make this driver's Ray Data resource requests expire ``REQUEST_EXPIRE_S`` after its last renewal
    (before its first dataset runs: Ray reads the setting when it first executes one); the value in
    effect."""
    os.environ.setdefault(REQUEST_EXPIRE_ENV, str(REQUEST_EXPIRE_S))
    wanted = int(os.environ[REQUEST_EXPIRE_ENV])
    module = sys.modules.get("ray.data._internal.cluster_autoscaler.rate_based_cluster_autoscaler")
    if module is None:
        return wanted
    in_effect = (module.RateBasedClusterAutoscaler.__init__.__kwdefaults__ or {}).get(
        "autoscaling_request_expire_time_s", wanted
    )
    if in_effect != wanted:
        logger.warning(
            "this process ran a Ray Data dataset before the job started, so its resource requests "
            "outlive a crash by %s s, not %s s (set %s before Python starts)",
            in_effect,
            wanted,
            REQUEST_EXPIRE_ENV,
        )
    return in_effect


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


def list_inputs(cfg: JobConfig) -> tuple[str, Listing]:
    """(format, files) of the job's input; a URL that names nothing readable is an ``InputError``."""
    i = cfg.input
    try:
        if cfg.job == "synthesize":
            listing = list_prompt_files(i.url, i.storage_options, i.format)
            if not any(listing.sizes):
                raise InputError(f"input.url: {i.url!r} holds no prompts: its {len(listing.paths)} file(s) are empty")
            return i.format, listing
        return list_image_inputs(i.url, i.storage_options, i.format)
    except (FileNotFoundError, ValueError, StorageError) as exc:
        raise InputError(f"input.url: {exc}") from None


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


def output_schema_for(cfg: JobConfig):
    """The Parquet schema of every shard of this job (quality columns included)."""
    from janus.models.siglip_vit import tower_width

    kind = "synthesis" if cfg.job == "synthesize" else "caption"
    q = cfg.quality
    ratings = list(q.ratings) if kind == "synthesis" else []
    width = tower_width(checkpoint_json(cfg, "config.json")["vision_config"]["params"]) if q.embeddings else None
    return output_schema(kind, ratings, width)


def preprocess_images(batch: dict[str, np.ndarray], processor: dict, max_pixels: int) -> dict[str, np.ndarray]:
    """CPU stage: bytes -> decoded, resized and padded uint8 [S, S, 3], so GPUs never wait on JPEG."""
    from janus.models.image_processing_vlm import VLMImageProcessor

    resizer = VLMImageProcessor.from_dict(processor)
    size = resizer.image_size
    n = len(batch["key"])
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    hashes = np.zeros(n, dtype=np.int64)
    status = list(batch["status"])
    error = list(batch["error"])
    for i in range(n):
        if status[i] == "error":
            continue
        try:
            pixels[i], image = model_pixels(batch["image_bytes"][i], resizer, max_pixels)
            width[i], height[i], hashes[i] = image.width, image.height, phash(image)
        except ImageDecodeError as exc:
            status[i], error[i] = "error", str(exc)
    return {
        "key": batch["key"],
        "source": batch["source"],
        "pixels": pixels,
        "width": width,
        "height": height,
        "phash": hashes,
        "status": np.array(status, dtype=object),
        "error": np.array(error, dtype=object),
    }


def build_caption(cfg: JobConfig, listing: Listing, committed: np.ndarray, journal: Any):
    i = cfg.input
    ds = image_dataset(i.url, fmt=i.format, image_column=i.image_column, key_column=i.key_column, listing=listing)
    ds = drop_committed(ds, committed)
    ds = ds.map_batches(
        preprocess_images,
        fn_kwargs={"processor": checkpoint_json(cfg, "preprocessor_config.json"), "max_pixels": i.max_pixels},
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


def prepare(cfg: JobConfig) -> tuple[str, Listing, Any, OutputDir]:
    """Everything a run checks before Ray starts (``--dry-run`` stops here): where it runs, that the
    input lists files of the job's kind with something in them, that the actor class imports and the
    model reference resolves (ours; a custom ``compute.actor_class`` owns ``model.path``), and that the
    output is reachable. Returns (input format, listing, output schema, output)."""
    check_where_it_runs(cfg)
    fmt, listing = list_inputs(cfg)
    model_actor_class(cfg, object)
    if cfg.compute.actor_class is None:
        checkpoint_json(cfg, "config.json")
    schema = output_schema_for(cfg)
    try:
        out = OutputDir(cfg.output.url, cfg.output.storage_options)
    except StorageError as exc:
        raise ConfigError(f"output.url: {exc}") from None
    return fmt, listing, schema, out


def own_sections(cfg: JobConfig) -> dict[str, Any]:
    """The config as the job reads it (what ``--dry-run`` prints): without the other job's keys."""
    data = cfg.model_dump()
    for key in cfg.other_jobs_keys():
        section, _, name = key.partition(".")
        (data[section] if name else data).pop(name or section, None)
    return data


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run (or resume) a job to completion; returns the summary that the CLI prints.

    What can be wrong with the command (input, output, actor class) is found before Ray starts.
    """
    t0 = time.perf_counter()
    fmt, listing, schema, out = prepare(cfg)
    bound_stale_resource_requests()
    connect(cfg)
    quiet_ray_data()
    removed = out.cleanup()
    if removed:
        logger.info("removed %d uncommitted leftovers of an earlier run", len(removed))
    committed = out.committed_keys()
    logger.info("%s: %d rows already committed in %s", cfg.job, committed.size, out.url)
    if listing.skipped:
        logger.warning(
            "skipping %d input file(s) that are not %s inputs, e.g. %s",
            len(listing.skipped),
            cfg.job,
            ", ".join(listing.relative(p) for p in listing.skipped[:SKIPPED_EXAMPLES]),
        )
    build = build_synthesis if cfg.job == "synthesize" else build_caption
    ray.data.DataContext.get_current().max_consecutive_actor_init_deaths = cfg.compute.start_failures
    cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"format": fmt})})  # auto resolved
    journal = start_journal()
    ds = build(cfg, listing, committed, journal)
    del committed  # the filter tasks read it from the object store
    kind = "synthesis" if cfg.job == "synthesize" else "caption"
    sink = ShardDatasink(
        out.url, out.storage_options, kind, cfg.output.rows_per_shard, schema=schema
    )
    try:
        ds.write_datasink(sink)
    finally:
        ray.kill(journal)
    elapsed = time.perf_counter() - t0

    written = {f: sum(s.get(f, 0) for s in sink.shards) for f in STAT_COUNTS}
    # writers killed mid-file (a lost node) may leave temporaries; their shards were rewritten whole
    leftovers = out.refresh().cleanup()
    if leftovers:
        logger.info("removed %d leftovers of writers that died mid-file", len(leftovers))
    duplicates = out.duplicates()
    summary: dict[str, Any] = {
        "job": cfg.job,
        "output": out.url,
        "this_run": {
            **written,
            "shards": len(sink.shards),
            "seconds": round(elapsed, 2),
            "rows_per_s": round(written["count"] / elapsed, 3) if elapsed > 0 else None,
        },
        "total": out.totals(),
        "skipped_inputs": {
            "count": len(listing.skipped),
            "examples": [listing.relative(p) for p in listing.skipped[:SKIPPED_EXAMPLES]],
        },
        "duplicate_keys": len(duplicates),
        "complete": not duplicates,
    }
    if cfg.job == "synthesize" and cfg.output.contact_sheet:
        from .contact_sheet import write_contact_sheet

        summary["contact_sheet"] = write_contact_sheet(out, cfg.output.contact_sheet)
    logger.info(
        "%s done: %d rows (%d ok, %d failed, %d filtered) in %.1fs -> %s",
        cfg.job,
        written["count"],
        written["ok"],
        written["failed"],
        written["filtered"],
        elapsed,
        out.url,
    )
    return summary
