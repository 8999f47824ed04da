"""``janus-pipeline synthesize --plan``: what a synthesis job will make and cost, before it starts.

It reads the input listing and counts the rows (no Ray, no model), looks at what the output already
holds, and works out shards, output bytes, the driver's memory for resume, GPU-hours and wall time.
Each figure says where it comes from: counted, measured (a benchmark of ours, or this output's own
committed shards) or assumed; ``docs/scale.md`` works the Janus-Pro paper's 72M images through it.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .config import JobConfig
from .model_ref import janus_pro_size
from .sinks import SHARD_PREFIX, shard_files
from .sources.prompt_files import count_prompt_rows, list_prompt_files
from .storage import open_fs, storage_step

#: driver memory of a resume per committed key, and the driver's baseline after imports: measured at
#: 10M keys by benchmarks/bench_resume_memory.py (benchmarks/results/resume_memory.json; 31.9 bytes
#: at 1M keys, where a fixed ~19 MB of read buffers dominates)
RESUME_BYTES_PER_KEY = 15.3
DRIVER_BASELINE_BYTES = 226_200_000
#: assumed until a run's shards say otherwise: an RGB PNG of a photo-like image at 60% of its raw
#: bytes (442,368 at Janus-Pro's 384 x 384)
PNG_FRACTION_OF_RAW = 0.6
#: measured (pipeline.sinks.write_shard, 1000 rows with their recipe): a row's tar headers, its `.txt`
#: (the prompt, padded to 512 bytes) and `.json` members and its Parquet row, besides the PNG
ROW_BYTES_BESIDES_PNG = 3_450
JANUS_PRO_IMAGE_PX = 384
#: where benchmarks/gpu_suite.py records its synthesis sections (a checkout of this repository)
GPU_SUITE_RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "gpu_suite"
COUNT_THREADS = 4  # prompt files counted at once: object-store latency dominates


def measured_images_per_s(size: str | None, results: Path = GPU_SUITE_RESULTS) -> tuple[float, str] | None:
    """The GPU suite's best synthesis engine figure for the model size, with its source (None: no run
    of the suite is recorded for that size). The suite's ``summary.json`` holds each section's record;
    a section's own file is read when there is no summary."""
    if size is None:
        return None
    section = f"synthesis_{size}"
    summary, own = results / "summary.json", results / f"{section}.json"
    if summary.is_file():
        record = json.loads(summary.read_text()).get("sections", {}).get(section, {}).get("record") or {}
        where = f"{summary.name} ({section})"
    elif own.is_file():
        record, where = json.loads(own.read_text()), own.name
    else:
        return None
    rows = [t for t in record.get("table") or [] if str(t.get("contender", "")).startswith("engine")]
    if not rows:
        return None
    best = max(rows, key=lambda t: t["images_per_s"])
    return float(best["images_per_s"]), f"measured: {where}, {best['contender']} at batch {best['batch']}"


def count_rows(cfg: JobConfig) -> dict[str, Any]:
    """Prompt files, their bytes, and the rows they yield (samples included; bad lines are rows too)."""
    listing = list_prompt_files(cfg.input.url, cfg.input.storage_options, cfg.input.format)
    fmt = None if cfg.input.format == "auto" else cfg.input.format

    def count(path: str) -> tuple[int, int]:
        return count_prompt_rows(listing.fs, path, cfg.synthesis.n_samples, fmt)

    with ThreadPoolExecutor(max_workers=COUNT_THREADS) as pool:
        counts = list(pool.map(count, listing.paths))
    return {
        "files": len(listing.paths),
        "bytes": sum(listing.sizes),
        "rows": sum(rows for rows, _ in counts),
        "bad_lines": sum(bad for _, bad in counts),
    }


def committed(cfg: JobConfig) -> dict[str, Any]:
    """What the output already holds: committed rows and their bytes (a rerun resumes after them)."""
    fs, root = open_fs(cfg.output.url, cfg.output.storage_options)
    with storage_step("read the output", cfg.output.url):
        try:
            entries = fs.ls(root, detail=True)
        except FileNotFoundError:
            entries = []
    files = {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries}
    shards = [n[: -len(".parquet")] for n in files if n.startswith(SHARD_PREFIX) and n.endswith(".parquet")]
    rows = size = 0
    for shard in shards:
        names = shard_files(shard)
        with storage_step("read the output", cfg.output.url):
            rows += int(json.loads(fs.cat_file(f"{root}/{names['stats']}"))["count"])
        size += sum(files.get(name, 0) for name in names.values())
    return {"shards": len(shards), "rows": rows, "bytes": size}


def image_px(cfg: JobConfig) -> int:
    """The side of the model's images: its config's, where the checkpoint's config.json can be read
    without the weights (an embedded model, a directory, a URL), else Janus-Pro's 384."""
    from janus.models.hub import ModelNotFoundError, read_checkpoint_file

    from .model_ref import SHAPES, resolve_model_ref

    m = cfg.model
    if m.path != SHAPES and "://" not in m.path and not Path(m.path).is_dir():
        return JANUS_PRO_IMAGE_PX  # a hub id, or the tiny model (written on first use)
    try:
        config = json.loads(
            read_checkpoint_file(resolve_model_ref(m.path), "config.json", storage_options=m.storage_options)
        )
    except (ModelNotFoundError, ValueError):
        return JANUS_PRO_IMAGE_PX
    return int(config["gen_vision_config"].get("params", {}).get("image_size") or JANUS_PRO_IMAGE_PX)


def bytes_per_row(cfg: JobConfig, done: dict[str, Any]) -> tuple[float, str]:
    """Output bytes a row costs: this output's own when it holds shards, else the assumption."""
    if done["rows"]:
        return done["bytes"] / done["rows"], f"measured: {done['shards']} committed shards of this output"
    px = image_px(cfg)
    png = PNG_FRACTION_OF_RAW * px**2 * 3
    embedding = 1024 * 2 if cfg.quality.embeddings else 0  # float16 x SigLIP-L's width
    return png + ROW_BYTES_BESIDES_PNG + embedding, (
        f"assumed: a {px} px PNG at {PNG_FRACTION_OF_RAW:.0%} of raw + {ROW_BYTES_BESIDES_PNG} "
        "bytes of tar and Parquet (measured)"
    )


def plan_synthesis(
    cfg: JobConfig,
    images_per_s: float | None = None,
    gpus: int | None = None,
    results: Path = GPU_SUITE_RESULTS,
) -> dict[str, Any]:
    """The plan as a dict (``format_plan`` prints it). ``images_per_s`` per GPU: the user's, else the
    GPU suite's recorded figure for the model's size; ``gpus`` default: the pool's largest size."""
    inputs = count_rows(cfg)
    done = committed(cfg)
    rows, todo = inputs["rows"], max(inputs["rows"] - done["rows"], 0)
    per_row, per_row_source = bytes_per_row(cfg, done)
    shards = math.ceil(rows / cfg.output.rows_per_shard)
    c = cfg.compute
    gpus = gpus or c.max_actors * max(1, math.ceil(c.gpus_per_actor or 1))
    rate: tuple[float, str] | None = (
        (images_per_s, "given")
        if images_per_s
        else measured_images_per_s(janus_pro_size(cfg.model.path), results)
    )
    plan: dict[str, Any] = {
        "input": {**inputs, "url": cfg.input.url},
        "rows": {
            "total": rows,
            "committed": done["rows"],
            "to_make": todo,
            "samples_per_prompt": cfg.synthesis.n_samples,
        },
        "shards": {
            "count": shards,
            "rows_each": cfg.output.rows_per_shard,
            "bytes_each": per_row * cfg.output.rows_per_shard,
        },
        "output": {
            "url": cfg.output.url,
            "bytes": per_row * rows,
            "bytes_per_row": per_row,
            "source": per_row_source,
        },
        "driver": {
            "resume_bytes": DRIVER_BASELINE_BYTES + RESUME_BYTES_PER_KEY * rows,
            "source": f"measured: {RESUME_BYTES_PER_KEY} bytes per committed key + {DRIVER_BASELINE_BYTES / 1e6:.0f} MB",
        },
        "gpu": None,
    }
    if rate is not None:
        images = todo * cfg.quality.best_of  # best_of draws that many candidates per row
        gpu_hours = images / rate[0] / 3600
        plan["gpu"] = {
            "images": images,
            "images_per_s_per_gpu": rate[0],
            "source": rate[1],
            "gpu_hours": gpu_hours,
            "gpus": gpus,
            "wall_hours": gpu_hours / gpus,
        }
    return plan


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    raise AssertionError("unreachable")


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 10 else f"{h:.2g}"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the lines the CLI prints."""
    i, r, s, o, d, g = (plan[k] for k in ("input", "rows", "shards", "output", "driver", "gpu"))
    lines = [
        f"input    {i['url']}: {i['files']} files, {_size(i['bytes'])}, {i['bad_lines']:,} bad lines",
        f"rows     {r['total']:,} ({r['samples_per_prompt']} per prompt); {r['committed']:,} already committed, "
        f"{r['to_make']:,} to make",
        f"shards   ~{s['count']:,} of ~{s['rows_each']:,} rows, ~{_size(s['bytes_each'])} each",
        f"output   {o['url']}: ~{_size(o['bytes'])} ({_size(o['bytes_per_row'])} a row, {o['source']})",
        f"driver   ~{_size(d['resume_bytes'])} of memory to resume ({d['source']})",
    ]
    if g is None:
        lines.append(
            "GPU      no measured images/s for this model: pass --images-per-s (per GPU) for GPU-hours"
        )
    else:
        lines.append(
            f"GPU      {g['images']:,} images at {g['images_per_s_per_gpu']:g} images/s per GPU ({g['source']}): "
            f"{_hours(g['gpu_hours'])} GPU-hours; on {g['gpus']} GPUs {_hours(g['wall_hours'])} h "
            f"({_hours(g['wall_hours'] / 24)} days)"
        )
    return "\n".join(lines)
