"""Running a batch job: the two job kinds in one table, checks before Ray starts, the graph
(``pipeline.graphs``) into the shard sink, and the job summary.

synthesize: prompt files -> Synthesizer actors -> tar + Parquet shards.
caption:    image files / Parquet / tars -> CPU decode -> Captioner actors -> Parquet.
Every input row becomes exactly one committed output row; a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from janus.models.vq_config import VQConfig

from .columns import OutputColumns
from .config import ConfigError, InputSection, JobConfig
from .connect import check_where_it_runs, connect
from .console import quiet_ray_data
from .crash_guard import start_journal
from .graphs import build_caption, build_synthesis, checkpoint_json, model_actor_class
from .output import COMPLETE_FILE, OutputDir
from .recipe import check_recipe, job_recipe, model_weights, record_recipe
from .sinks import STAT_COUNTS, ShardDatasink
from .sources.image_files import list_image_inputs
from .sources.prompt_files import list_prompt_files
from .storage import Listing, StorageError

logger = logging.getLogger(__name__)
SKIPPED_EXAMPLES = 5
FILTERED_NOTE = (
    "{n} rows scored below quality.min_score {min_score} and are final: their score is kept in Parquet, "
    "their image is not stored, and a rerun does not make them again (a stricter threshold is a query "
    "over the scores; a looser one needs another output)"
)


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


@dataclass(frozen=True)
class JobKind:
    """What differs between the two jobs; ``run_job`` does the rest the same way for both."""

    output: str  # the output kind: its columns (``pipeline.columns``) and shard files
    #: (input section) -> (format, files); ``auto`` resolved
    list_inputs: Callable[[InputSection], tuple[str, Listing]]
    #: (config, files, committed keys, crash journal) -> the graph up to the model stage's rows
    build: Callable[[JobConfig, Listing, np.ndarray, Any], Any]
    contact_sheet: bool  # a contact sheet of the first images is written at the end (output.contact_sheet)


def _prompt_inputs(i: InputSection) -> tuple[str, Listing]:
    listing = list_prompt_files(i.url, i.storage_options, i.format)
    if not any(listing.sizes):
        raise InputError(f"{i.url!r} holds no prompts: its {len(listing.paths)} file(s) are empty")
    return i.format, listing


def _image_inputs(i: InputSection) -> tuple[str, Listing]:
    return list_image_inputs(i.url, i.storage_options, i.format)


JOB_KINDS: dict[str, JobKind] = {
    "synthesize": JobKind("synthesis", _prompt_inputs, build_synthesis, contact_sheet=True),
    "caption": JobKind("caption", _image_inputs, build_caption, contact_sheet=False),
}


def list_inputs(cfg: JobConfig) -> tuple[str, Listing]:
    """(format, files) of the job's input; a URL that names nothing readable is an ``InputError``."""
    try:
        return JOB_KINDS[cfg.job].list_inputs(cfg.input)
    except (FileNotFoundError, ValueError, StorageError) as exc:
        raise InputError(f"input.url: {exc}") from None


def output_columns(cfg: JobConfig) -> OutputColumns:
    """Every column of this job's shards: its kind's, plus what its quality settings add."""
    from janus.models.siglip_vit import tower_width

    q = cfg.quality
    width = tower_width(checkpoint_json(cfg, "config.json")["vision_config"]["params"]) if q.embeddings else None
    return OutputColumns(JOB_KINDS[cfg.job].output, tuple(q.ratings), width)


@dataclass
class CheckedJob:
    """What a job found before Ray starts: its kind, inputs, columns, recipe and output."""

    cfg: JobConfig  # ``input.format`` resolved
    kind: JobKind
    listing: Listing
    columns: OutputColumns
    recipe: dict[str, Any]
    out: OutputDir
    new_recipe: bool  # the output has no recipe yet: the job records its own


def check_job(cfg: JobConfig) -> CheckedJob:
    """Everything a run checks before Ray starts (``--dry-run`` stops here), nothing written: where it
    runs, that the input lists files of the job's kind with something in them, that the actor class
    imports, that the model reference resolves (its weights' fingerprint), that the output is reachable
    and holds no other recipe."""
    check_where_it_runs(cfg)
    kind = JOB_KINDS[cfg.job]
    fmt, listing = list_inputs(cfg)
    model_actor_class(cfg, object)
    columns = output_columns(cfg)
    recipe = job_recipe(cfg, model_weights(cfg))
    try:
        out = OutputDir(cfg.output.url, cfg.output.storage_options)
    except StorageError as exc:
        raise ConfigError(f"output.url: {exc}") from None
    new_recipe = check_recipe(out, recipe)
    cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"format": fmt})})  # auto resolved
    return CheckedJob(cfg, kind, listing, columns, recipe, out, new_recipe)


def own_sections(cfg: JobConfig) -> dict[str, Any]:
    """The config as the job reads it (what ``--dry-run`` prints): without the other job's keys."""
    data = cfg.model_dump()
    for key in cfg.other_jobs_keys():
        section, _, name = key.partition(".")
        (data[section] if name else data).pop(name or section, None)
    return data


#: settings that decide where and how a job runs and where it writes, never which rows it makes
HOW_IT_RUNS = ("compute", "ray", "output", "max_failed_fraction")


def rows_from(cfg: JobConfig, listing: Listing) -> str:
    """A digest of what decides a job's rows: its input files (names, sizes, change stamps) and every
    setting but ``HOW_IT_RUNS`` and the input's ``storage_options`` (credentials rotate; the files they
    reach are in the listing)."""
    settings = {k: v for k, v in own_sections(cfg).items() if k not in HOW_IT_RUNS}
    settings["input"] = {k: v for k, v in settings["input"].items() if k != "storage_options"}
    text = json.dumps(settings, sort_keys=True, default=str) + listing.fingerprint()
    return hashlib.sha256(text.encode()).hexdigest()


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run (or resume) a job to completion; returns the summary that the CLI prints. A rerun of a job
    that completed, with the same input and settings, ends at once (no Ray, no model)."""
    t0 = time.perf_counter()
    job = check_job(cfg)
    cfg, out, listing = job.cfg, job.out, job.listing
    identity = rows_from(cfg, listing)
    recorded = None if job.new_recipe else out.completed(identity)
    if recorded is not None:
        logger.info(
            "%s: nothing to run: %s already holds every row of this input (%s)", cfg.job, out.url, COMPLETE_FILE
        )
        return summarize(job, [], time.perf_counter() - t0, recorded=recorded)
    bound_stale_resource_requests()
    connect(cfg)
    quiet_ray_data()
    if job.new_recipe:
        if out.committed_shards:
            logger.warning("%s has shards but no recipe file: recording this job's", out.url)
        record_recipe(out, job.recipe)
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
    ray.data.DataContext.get_current().max_consecutive_actor_init_deaths = cfg.compute.start_failures
    journal = start_journal()
    ds = job.kind.build(cfg, listing, committed, journal)
    del committed  # the filter tasks read it from the object store
    tar = job.kind.output == "synthesis" or cfg.output.write_images
    recipe = job.columns.recipe_values(job.recipe)
    sink = ShardDatasink(out.url, out.storage_options, job.columns, cfg.output.rows_per_shard, recipe, tar)
    try:
        ds.write_datasink(sink)
    finally:
        ray.kill(journal)
    summary = summarize(job, sink.shards, time.perf_counter() - t0)
    if summary["complete"]:  # every input row is a committed row, each once
        try:
            out.mark_complete(identity, summary["total"])
        except (StorageError, FileNotFoundError) as exc:  # the rows are committed: only a shortcut is lost
            logger.warning("not recorded as complete (a rerun will check every key instead): %s", exc)
    return summary


def decoding(cfg: JobConfig, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """How this run's images were decoded: forward passes per image and image codes per pass (1 for
    plain decoding; more with ``engine.speculative``)."""
    decoded = sum(s.get("decoded", 0) for s in shards)
    if not decoded:
        return {}
    passes = sum(s.get("decode_passes", 0) for s in shards) / decoded
    out = {"decode_passes_per_image": round(passes, 2)}
    try:
        params = checkpoint_json(cfg, "config.json")["gen_vision_config"]["params"]
    except (ConfigError, KeyError):  # a custom actor class's model: its codes per image are its own
        return out
    return {**out, "codes_per_pass": round(VQConfig.from_params(params).image_tokens / passes, 2)}


def summarize(
    job: CheckedJob, shards: list[dict[str, Any]], elapsed: float, recorded: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The job summary: this run's and the output's counts, skipped inputs, duplicates, notes.
    ``recorded``: the totals of the completed run whose shards these are (``_complete.json``): it found
    them free of duplicates (a shard's name is a hash of its keys), so no key or stats file is read."""
    cfg, out, listing = job.cfg, job.out, job.listing
    written = {f: sum(s.get(f, 0) for s in shards) for f in STAT_COUNTS}
    # writers killed mid-file (a lost node) may leave temporaries; their shards were rewritten whole
    leftovers = out.refresh().cleanup()
    if leftovers:
        logger.info("removed %d leftovers of writers that died mid-file", len(leftovers))
    duplicates = {} if recorded is not None else out.duplicates()
    total = recorded if recorded is not None else out.totals()
    summary: dict[str, Any] = {
        "job": cfg.job,
        "output": out.url,
        "this_run": {
            **written,
            "shards": len(shards),
            "seconds": round(elapsed, 2),
            "rows_per_s": round(written["count"] / elapsed, 3) if elapsed > 0 else None,
            **decoding(cfg, shards),
        },
        "total": total,
        "skipped_inputs": {
            "count": len(listing.skipped),
            "examples": [listing.relative(p) for p in listing.skipped[:SKIPPED_EXAMPLES]],
        },
        "duplicate_keys": len(duplicates),
        "complete": not duplicates,
    }
    if cfg.quality.min_score is not None:
        summary["filtered_rows"] = FILTERED_NOTE.format(n=total["filtered"], min_score=cfg.quality.min_score)
    if job.kind.contact_sheet and cfg.output.contact_sheet:
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
