"""Rows as the model stage returns them, for tests that call the shard writer directly: every declared
column (``pipeline.columns``) present, null unless the test gives it a value."""

from __future__ import annotations

from typing import Any

from pipeline.columns import OutputColumns


def model_row(columns: OutputColumns | str = "synthesis", **values: Any) -> dict[str, Any]:
    """One row with exactly the columns ``columns`` (or a kind's) says the model stage returns."""
    columns = OutputColumns(columns) if isinstance(columns, str) else columns
    unknown = set(values) - columns.from_model_stage
    assert not unknown, f"not columns of the model stage: {sorted(unknown)}"
    return {**dict.fromkeys(columns.from_model_stage), **values}


def recipe_values(columns: OutputColumns) -> dict[str, Any]:
    """The recipe columns' values of a default job of ``columns``' kind, on weights called ``test``."""
    from pipeline.config import load_config
    from pipeline.recipe import job_recipe

    job = "synthesize" if columns.kind == "synthesis" else "caption"
    return columns.recipe_values(job_recipe(load_config(None, [f"job={job}"]), "sha256:test"))


def write_rows(
    rows: Any, url: str, storage_options: dict | None = None, columns: OutputColumns | None = None, **kw: Any
) -> dict[str, Any]:
    """``sinks.write_shard`` with a default job's recipe values."""
    from pipeline.sinks import write_shard

    columns = columns or OutputColumns("synthesis")
    return write_shard(rows, url, storage_options, columns, recipe_values(columns), **kw)
