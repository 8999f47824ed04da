"""A job's recipe: everything that decides its outputs, in one flat dict, defined once.

The recipe goes with every sample (its job-wide values as Parquet columns and in each tar's ``.json``,
``pipeline.columns``: source ``recipe``) and with the output as a whole (``_recipe.json``, written when
the output is first used). Keys and seeds depend on the input rows only (``sources/keys.py``), so a
rerun into the same output with another model or other settings would skip every committed row and
report success: the recipe file makes that rerun fail before Ray starts, naming each difference.

What counts: the weights (their content hash, not where they are), dtype, the key scheme, the job seed
and sampling defaults, the decoding method, prompt truncation and the quality settings that choose,
filter or add columns. What does not: where inputs and outputs live, actors, batch sizes and other
settings that change speed or rounding only; this package's version is recorded, not compared (a
half-written output resumes across an upgrade; every row says which version wrote it).
"""

from __future__ import annotations

import json
from typing import Any

import janus

from .config import ENGINE_OPTIONS, ConfigError, JobConfig
from .model_ref import resolve_model_ref
from .output import OutputDir
from .sources.keys import KEY_VERSION
from .storage import atomic_write, storage_step

RECIPE_FILE = "_recipe.json"
#: recorded with the output and every row, never a reason to refuse a rerun
NOT_COMPARED = ("model.name", "version")


class RecipeMismatch(ConfigError):
    """A rerun whose recipe differs from the output's; the message has one line per difference."""


def speculative(engine: dict[str, Any]) -> dict[str, Any]:
    """``engine.speculative`` as it decides images: its method (``off``: one code a pass) and, when on,
    its window, draft initialisation and ``max_rows`` (above which a batch decodes plainly)."""
    spec = engine.get("speculative") or {}
    method = spec.get("method", "off")
    on = method != "off"
    return {
        "engine.speculative.method": method,
        **{f"engine.speculative.{k}": spec.get(k) if on else None for k in ("window", "draft_init", "max_rows")},
    }


def job_recipe(cfg: JobConfig, weights: str) -> dict[str, Any]:
    """The recipe of ``cfg``'s outputs, given its weights' fingerprint (``weights_fingerprint``)."""
    engine = ENGINE_OPTIONS[cfg.job].model_validate(cfg.engine).model_dump()  # the defaults filled in
    q = cfg.quality
    recipe: dict[str, Any] = {
        "model.name": cfg.model.path,
        "model.weights": weights,
        "model.dtype": cfg.model.dtype,
        "version": janus.__version__,
        "keys": KEY_VERSION,
        **speculative(engine),
        "quality.embeddings": q.embeddings,
    }
    if cfg.job == "synthesize":
        s = cfg.synthesis
        recipe.update(
            {
                "synthesis.seed": s.seed,
                "synthesis.cfg_weight": s.cfg_weight,
                "synthesis.temperature": s.temperature,
                "synthesis.top_k": s.top_k,
                "synthesis.top_p": s.top_p,
                "engine.max_prompt_tokens": engine["max_prompt_tokens"],
                "engine.truncate_prompts": engine["truncate_prompts"],
                "quality.score": q.score,
                "quality.best_of": q.best_of,
                "quality.min_score": q.min_score,
                "quality.ratings": dict(sorted(q.ratings.items())),
            }
        )
    else:
        c = cfg.caption
        recipe.update(
            {
                "caption.question": c.question,
                "caption.max_new_tokens": c.max_new_tokens,
                "caption.temperature": c.temperature,
                "caption.top_p": c.top_p,
                "caption.seed": c.seed,
                "output.write_images": cfg.output.write_images,
            }
        )
    return recipe


def model_weights(cfg: JobConfig) -> str:
    """The fingerprint of the job's checkpoint, computed once per job on the driver (a few MiB read): a
    model that cannot be found fails the job here, before Ray starts."""
    from janus.models.fingerprint import weights_fingerprint

    m = cfg.model
    try:
        ref = resolve_model_ref(m.path, m.cache_dir)
        return weights_fingerprint(ref, storage_options=m.storage_options, cache_dir=m.cache_dir)
    except OSError as exc:
        if cfg.compute.actor_class:  # a custom actor may load a model of its own from model.path
            return f"unknown: {m.path!r} is not a checkpoint ({cfg.compute.actor_class} loads the model)"
        raise ConfigError(f"model.path: {exc}") from None


def differences(recorded: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    """One line per setting that decides outputs and differs; settings only one side has count too."""
    lines = []
    for name in sorted(set(recorded) | set(recipe)):
        if name in NOT_COMPARED:
            continue
        old, new = recorded.get(name, "(not recorded)"), recipe.get(name, "(not recorded)")
        if old != new:
            lines.append(f"{name}: {json.dumps(old)} in the output, {json.dumps(new)} now")
    return lines


def check_recipe(out: OutputDir, recipe: dict[str, Any]) -> bool:
    """Refuse ``recipe`` if ``out`` holds another (``RecipeMismatch``, one line per difference); whether
    ``out`` has no recipe yet (``record_recipe`` then writes it). Reads only."""
    path = out.path(RECIPE_FILE)
    try:
        with storage_step("read the output", out.url):
            recorded = json.loads(out.fs.cat_file(path))
    except FileNotFoundError:
        return True
    except ValueError as exc:
        raise ConfigError(f"output.url: {path} is not a recipe file ({exc}): move it away") from None
    lines = differences(recorded, recipe)
    if lines:
        raise RecipeMismatch(
            f"output.url {out.url} holds outputs of another recipe; write these to another output "
            "(output.url), or rerun with the recorded settings:\n" + "\n".join(lines)
        )
    return False


def record_recipe(out: OutputDir, recipe: dict[str, Any]) -> None:
    with storage_step("write the recipe to", out.url):
        atomic_write(out.fs, out.path(RECIPE_FILE), (json.dumps(recipe, indent=1, sort_keys=True) + "\n").encode())
