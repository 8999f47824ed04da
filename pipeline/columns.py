"""Every output column, declared once: its name, Arrow type, where its value comes from and its value on
an error row.

The Parquet schemas, the columns the model stage must return, the shard writer's checks, the column
table of docs/datasets.md and Serve's quality fields all come from these declarations (or are tested
against them), so a column is added in one place and a mistake is loud: the writer refuses a batch
that lacks a declared column or carries an undeclared one, naming it (``ColumnError``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pyarrow as pa

#: where a column's value comes from
INPUT = "input"  # the reader's row (prompt files, image inputs), carried through the model stage
PREPROCESS = "preprocess"  # the caption job's CPU stage (decode, resize, hash)
MODEL = "model"  # the model actor (status and error start as the reader's verdict)
SINK = "sink"  # the shard writer
RECIPE = "recipe"  # the job's recipe: the same value on every row of a job (``pipeline.recipe``)
SOURCES = (INPUT, PREPROCESS, MODEL, SINK, RECIPE)
#: what the model stage returns: everything the writer does not add itself
FROM_MODEL_STAGE = (INPUT, PREPROCESS, MODEL)

#: a column's value on a row with status ``error``: as the row has it, or null
KEEP, NULL = "keep", "null"


class ColumnError(ValueError):
    """Rows that do not have exactly the declared columns: a model actor (``compute.actor_class``) that
    returns the wrong columns, or a column added in one place but not declared here."""


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType | None  # None: carried to the writer but not a Parquet column (the tar's image)
    source: str
    on_error: str
    doc: str
    missing: Any = None  # the model stage's "no value" marker, stored as null (NaN always is)
    serve: str | None = None  # the field of Serve's image response that carries it
    recipe: str | None = None  # source ``recipe``: the entry of the job's recipe it records

    def __post_init__(self) -> None:
        if self.source not in SOURCES or self.on_error not in (KEEP, NULL):
            raise ValueError(f"column {self.name!r}: source {self.source!r}, on_error {self.on_error!r}")


def _c(name: str, type_: pa.DataType | None, source: str, on_error: str, doc: str, **more: Any) -> Column:
    return Column(name, type_, source, on_error, doc, **more)


KEY = _c("key", pa.string(), INPUT, KEEP, "the row's key: a hash of the job seed and the input row (keys.py)")
STATUS = _c("status", pa.string(), MODEL, KEEP, "`ok`, `error` or (synthesis) `filtered`")
ERROR = _c("error", pa.string(), MODEL, KEEP, "why the row failed or was filtered; null when ok")
SHARD = _c("shard", pa.string(), SINK, KEEP, "the shard holding the row")
#: the job's recipe on every row: with the row's own settings, what regenerates it byte for byte
WEIGHTS = _c("weights", pa.string(), RECIPE, KEEP, "content hash of the model's weights", recipe="model.weights")
VERSION = _c("version", pa.string(), RECIPE, KEEP, "the janus-pipeline version that wrote the row", recipe="version")
DTYPE = _c("dtype", pa.string(), RECIPE, KEEP, "`model.dtype` (`auto`: the checkpoint's)", recipe="model.dtype")
SPECULATIVE = (
    _c("speculative", pa.string(), RECIPE, KEEP, "decoding method: `off` (one token a step) or the "
       "speculative method", recipe="engine.speculative.method"),
    _c("speculative_window", pa.int32(), RECIPE, KEEP, "the speculative method's window; null when off",
       recipe="engine.speculative.window"),
)  # fmt: skip
MODEL_NAME = _c("model", pa.string(), MODEL, KEEP, "the model (`model.path`) that made the row")
SECONDS = _c("seconds", pa.float64(), MODEL, KEEP, "the row's share of its batch's model time")

SYNTHESIS: tuple[Column, ...] = (
    KEY,
    STATUS,
    ERROR,
    _c("prompt", pa.string(), INPUT, KEEP, "the prompt"),
    _c("id", pa.string(), INPUT, KEEP, "the input row's own `id`, if it has one"),
    _c("source", pa.string(), INPUT, KEEP, "the prompt file, relative to the input root"),
    _c("index", pa.int64(), INPUT, KEEP, "the line (txt, jsonl) or data row (csv, parquet) in that file"),
    _c("sample", pa.int32(), INPUT, KEEP, "which of the prompt's `n_samples`"),
    _c("seed", pa.int64(), INPUT, KEEP, "the sampling seed (derived from the key unless the row sets one)"),
    _c("cfg_weight", pa.float64(), INPUT, KEEP, "classifier-free guidance weight"),
    _c("temperature", pa.float64(), INPUT, KEEP, "sampling temperature"),
    _c("width", pa.int32(), SINK, NULL, "image width in pixels"),
    _c("height", pa.int32(), SINK, NULL, "image height in pixels"),
    SHARD,
    _c("member", pa.string(), SINK, NULL, "the image's tar member `{key}.png`; null when not in the tar"),
    MODEL_NAME,
    SECONDS,
    _c("score", pa.float32(), MODEL, NULL, "self-verification: P(yes) that the image shows its prompt", serve="score"),
    _c(
        "candidate", pa.int32(), MODEL, NULL, "best-of-k: the candidate kept (0 = the row's own seed)",
        missing=-1, serve="candidate",
    ),  # fmt: skip
    _c("scores", pa.list_(pa.float32()), MODEL, NULL, "best-of-k: every candidate's score", serve="candidate_scores"),
    _c("phash", pa.int64(), MODEL, NULL, "64-bit perceptual hash of the image, for near-duplicate search"),
    _c("decode_method", pa.string(), MODEL, NULL, "how the image's codes were chosen: `off` (one a pass), "
       "`jacobi` or `coupled` (a batch above `speculative.max_rows` decodes plainly)", serve="decode_method"),
    _c("decode_passes", pa.int32(), MODEL, NULL, "forward passes that chose the image's codes", serve="decode_passes"),
    WEIGHTS,
    VERSION,
    DTYPE,
    _c("top_k", pa.int32(), RECIPE, KEEP, "`synthesis.top_k` (null: off)", recipe="synthesis.top_k"),
    _c("top_p", pa.float64(), RECIPE, KEEP, "`synthesis.top_p` (null: off)", recipe="synthesis.top_p"),
    *SPECULATIVE,
    _c("image", None, MODEL, NULL, "the image (uint8 [H, W, 3] or PNG bytes), written to the tar"),
)

CAPTION: tuple[Column, ...] = (
    KEY,
    STATUS,
    ERROR,
    _c("source", pa.string(), INPUT, KEEP, "the image: `file`, `file.parquet#row` or `file.tar#member key`"),
    _c("caption", pa.string(), MODEL, NULL, "the caption, without leading or trailing whitespace"),
    _c("question", pa.string(), MODEL, KEEP, "the question the caption answers"),
    _c("num_tokens", pa.int32(), MODEL, KEEP, "tokens in the caption"),
    _c("finish_reason", pa.string(), MODEL, NULL, "`stop` (the model ended it) or `length`"),
    _c("width", pa.int32(), PREPROCESS, NULL, "the source image's width in pixels"),
    _c("height", pa.int32(), PREPROCESS, NULL, "the source image's height in pixels"),
    SHARD,
    MODEL_NAME,
    SECONDS,
    _c("phash", pa.int64(), PREPROCESS, NULL, "64-bit perceptual hash of the image as read"),
    _c("source_key", pa.string(), INPUT, KEEP, "the source sample's own key: a WebDataset sample's "
       "(so captions of a synthesis output join it on `key`), or `input.key_column`'s value"),
    _c("member", pa.string(), SINK, NULL, "with `output.write_images`: the image's tar member, `{key}.jpg` or `{key}.png`"),
    _c("reencoded_from", pa.string(), PREPROCESS, NULL, "with `output.write_images`: the source format "
       "when the tar holds the image re-encoded as PNG (not JPEG or PNG); null when its own bytes"),
    WEIGHTS,
    VERSION,
    DTYPE,
    _c("temperature", pa.float64(), RECIPE, KEEP, "`caption.temperature` (0: greedy)", recipe="caption.temperature"),
    _c("top_p", pa.float64(), RECIPE, KEEP, "`caption.top_p` (null: off)", recipe="caption.top_p"),
    _c("seed", pa.int64(), RECIPE, KEEP, "`caption.seed`", recipe="caption.seed"),
    _c("max_new_tokens", pa.int32(), RECIPE, KEEP, "`caption.max_new_tokens`", recipe="caption.max_new_tokens"),
    *SPECULATIVE,
    _c("image", None, PREPROCESS, NULL, "with `output.write_images`: the image bytes for the tar"),
)  # fmt: skip

KINDS: dict[str, tuple[Column, ...]] = {"synthesis": SYNTHESIS, "caption": CAPTION}


def rating_column(name: str) -> Column:
    """``quality.ratings``: one column per rated question (synthesis)."""
    return _c(f"rating_{name}", pa.float32(), MODEL, NULL, f"expected level (5 excellent .. 1 bad) for `{name}`")


def embedding_column(dim: int) -> Column:
    """``quality.embeddings``: the image's L2-normalised embedding from the understanding tower."""
    return _c("embedding", pa.list_(pa.float16(), dim), MODEL, NULL, "L2-normalised float16 image embedding")


@dataclass(frozen=True)
class OutputColumns:
    """One job's columns: its kind's declarations, then what its quality settings add."""

    kind: str = "synthesis"
    ratings: tuple[str, ...] = ()
    embedding_dim: int | None = None
    columns: tuple[Column, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown output kind {self.kind!r}: use one of {tuple(KINDS)}")
        extra = [rating_column(n) for n in self.ratings]
        if self.embedding_dim:
            extra.append(embedding_column(self.embedding_dim))
        object.__setattr__(self, "columns", KINDS[self.kind] + tuple(extra))

    def names(self, *sources: str) -> list[str]:
        """Column names, in order; only those from ``sources`` if given."""
        return [c.name for c in self.columns if not sources or c.source in sources]

    @cached_property
    def schema(self) -> pa.Schema:
        """The Parquet schema of every shard of the job."""
        return pa.schema([(c.name, c.type) for c in self.columns if c.type is not None])

    @cached_property
    def from_model_stage(self) -> frozenset[str]:
        """The columns the model stage returns for every row: no more, no less."""
        return frozenset(self.names(*FROM_MODEL_STAGE))

    @cached_property
    def stored_from_rows(self) -> tuple[str, ...]:
        """Parquet columns whose values the rows bring (the writer adds the others)."""
        return tuple(c.name for c in self.columns if c.type is not None and c.source in FROM_MODEL_STAGE)

    @cached_property
    def parquet_names(self) -> tuple[str, ...]:
        return tuple(self.schema.names)

    @cached_property
    def null_on_error(self) -> dict[str, None]:
        """The Parquet columns that are null on an error row, as a record update."""
        return {c.name: None for c in self.columns if c.on_error == NULL and c.type is not None}

    @cached_property
    def markers(self) -> dict[str, Any]:
        """Column -> the model stage's "no value" marker (stored as null)."""
        return {c.name: c.missing for c in self.columns if c.missing is not None}

    def carried(self, *sources: str) -> list[str]:
        """What a stage passes on from its input, by default what a model actor passes through: the
        reader's and the CPU stage's columns (status and error each stage rewrites)."""
        return [n for n in self.names(*(sources or (INPUT, PREPROCESS))) if n not in ("status", "error")]

    def check(self, names: Any, what: str = "the model stage") -> None:
        """``ColumnError`` naming each column of ``names`` that is missing or not declared."""
        got = set(names)
        want = self.from_model_stage
        if got == want:
            return
        problems = [f"returned no column {n!r}" for n in self.names(*FROM_MODEL_STAGE) if n not in got]
        problems += [f"returned a column {n!r} that is not declared" for n in sorted(got - want)]
        raise ColumnError(
            f"{what} {'; '.join(problems)} (the {self.kind} output's columns are declared in "
            "pipeline/columns.py; is compute.actor_class a model actor for this job?)"
        )

    def recipe_values(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """The recipe columns' values (the same on every row) from the job's recipe (``pipeline.recipe``)."""
        return {c.name: recipe[c.recipe] for c in self.columns if c.source == RECIPE}

    def check_recipe(self, values: dict[str, Any]) -> None:
        """``values`` must be exactly the recipe columns (``recipe_values``)."""
        want = self.names(RECIPE)
        if set(values) != set(want):
            missing, extra = sorted(set(want) - set(values)), sorted(set(values) - set(want))
            raise ColumnError(f"the {self.kind} recipe columns lack {missing} and do not declare {extra}")


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return f"list<{_type_name(t.value_type)}>"
    return {"float": "float32", "double": "float64", "halffloat": "float16"}.get(str(t), str(t))


def markdown_table(kind: str) -> str:
    """The column table of docs/datasets.md for ``kind`` (a test keeps the two equal)."""
    rows = ["| column | type | from | on an error row | meaning |", "| --- | --- | --- | --- | --- |"]
    extra = (rating_column("<name>"),) if kind == "synthesis" else ()
    for c in KINDS[kind] + extra + (embedding_column(1),):
        if c.type is not None:
            type_ = "list<float16>[tower width]" if c.name == "embedding" else _type_name(c.type)
            rows.append(f"| `{c.name}` | {type_} | {c.source} | {c.on_error} | {c.doc} |")
    return "\n".join(rows)
