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
