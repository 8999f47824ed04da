"""Output shards in img2dataset / WebDataset layout, written so that a crash never shows half a shard.

Per shard, in one flat output directory:
    {shard}.tar          ``{key}.png|jpg`` + ``{key}.txt`` (prompt or caption) + ``{key}.json`` (the
                         row) for every successful sample: synthesis always, captioning on request
    {shard}_stats.json   counts, first/last key, error messages
    {shard}.parquet      one row per sample, failures included: the commit marker, written LAST
Each file is written whole and atomically (``storage.atomic_write``). A shard is committed iff its
Parquet file exists; a crash before that leaves a tar/stats pair that ``resume.cleanup_uncommitted``
removes and whose keys are regenerated on the next run.

The shard name is ``shard-`` + sha256 of the shard's sorted keys, and rows are written sorted by key:
a Ray task retry (or a rerun) that writes the same batch rewrites the same files byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import operator
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from .columns import OutputColumns
from .images import image_extension, image_size
from .storage import atomic_write, open_fs

#: row statuses: a result, a failure, or (synthesis) a result below ``quality.min_score``, kept in the
#: Parquet file with its score but not written to the tar
STATUSES = ("ok", "error", "filtered")
STAT_COUNTS = ("count", "ok", "failed", "filtered")  # per shard and in job totals
SHARD_PREFIX = "shard-"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_ERROR_CHARS = 500  # per-row error messages in stats are grouped by their first characters
_TAR_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")  # WebDataset splits member names at the first dot

#: the kinds' Parquet schemas without quality columns (declared in ``pipeline.columns``)
SYNTHESIS_SCHEMA = OutputColumns("synthesis").schema
CAPTION_SCHEMA = OutputColumns("caption").schema


def shard_name(keys: Iterable[str]) -> str:
    """Deterministic shard name from the shard's keys (order-independent)."""
    joined = "\n".join(sorted(keys))
    return SHARD_PREFIX + hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def shard_files(shard: str) -> dict[str, str]:
    """File names of one shard; ``parquet`` is the commit marker."""
    return {"tar": f"{shard}.tar", "stats": f"{shard}_stats.json", "parquet": f"{shard}.parquet"}


@dataclass
class Sample:
    """One output row: its Parquet record and, when the row goes to the tar, its image and text."""

    record: dict[str, Any]
    image: bytes | None = None  # the tar's image member (``record["member"]``)
    text: str | None = None  # the tar's ``{key}.txt``: the prompt, or the caption

    @property
    def ok(self) -> bool:
        return self.record["status"] == "ok"


def _png(image: Any) -> tuple[bytes, int, int]:
    """PNG bytes and size from PNG bytes or a uint8 [H, W, 3] / [H, W] array."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data.startswith(PNG_MAGIC):
            raise ValueError("image bytes are not a PNG file")
        width, height = image_size(data)
        return data, width, height
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(
            f"image must be PNG bytes or a uint8 [H, W, 3] array, got {arr.dtype} {list(arr.shape)}"
        )
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue(), arr.shape[1], arr.shape[0]


#: values that are already plain (the usual case): ``_plain`` is skipped for them, a large share of the
#: sink's per-row time for rows without images
_PLAIN_TYPES = frozenset({str, int, bool, type(None)})


def _plain(value: Any) -> Any:
    """numpy values (rows cut from numpy batches) as plain Python for Arrow and JSON; NaN as null."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _record(row: dict[str, Any], columns: OutputColumns, shard: str, recipe: dict[str, Any]) -> dict[str, Any]:
    """The row's Parquet record: its status normalised, error-row columns nulled, markers as nulls."""
    status = row.get("status") or "ok"
    error = row.get("error") if status != "ok" else None
    if status not in STATUSES:
        status, error = "error", error or f"status {row.get('status')!r}"
    if status == "error" and not error:
        error = "failed (no reason given)"
    record = dict.fromkeys(columns.parquet_names)
    for name in columns.stored_from_rows:
        value = row[name]
        record[name] = value if type(value) in _PLAIN_TYPES else _plain(value)
    record.update(recipe)
    record.update(status=status, error=error, shard=shard)
    if status == "error":
        record.update(columns.null_on_error)
    for name, marker in columns.markers.items():
        if record[name] == marker:
            record[name] = None
    if record.get("scores") is not None:
        record["scores"] = [_plain(v) for v in record["scores"]]
    return record


def _sample(row: dict[str, Any], columns: OutputColumns, shard: str, recipe: dict[str, Any], tar: bool) -> Sample:
    """Normalise one result row; anything unusable turns the row into a failure, never an exception."""
    sample = Sample(_record(row, columns, shard, recipe))
    record, key = sample.record, row["key"]
    text = record["prompt"] if columns.kind == "synthesis" else record["caption"]
    if not sample.ok:
        return sample
    if not isinstance(text, str):
        record.update(status="error", error=f"result has no {columns.kind} text")
        return sample
    if not tar:
        return sample
    try:
        if row.get("image") is None:
            raise ValueError("result has no image")
        if columns.kind == "synthesis":
            data, record["width"], record["height"] = _png(row["image"])
            ext = "png"
        else:
            data, ext = bytes(row["image"]), image_extension(row["image"])
            if ext is None:
                raise ValueError("the tar takes JPEG or PNG images")
            if not _TAR_SAFE_KEY.match(key):
                raise ValueError(f"key {key!r} cannot name a WebDataset member: use [A-Za-z0-9_-]+ keys")
    except ValueError as exc:
        record.update(columns.null_on_error, status="error", error=f"cannot store image: {exc}")
        return sample
    record["member"] = f"{key}.{ext}"
    sample.image, sample.text = data, text
    return sample


class TarShardWriter:
    """WebDataset tar of successful samples; fixed member metadata so equal input gives equal bytes."""

    def __init__(self, fs: AbstractFileSystem, path: str):
        self._fs, self._path = fs, path
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, sample: Sample) -> None:
        if not sample.ok or sample.image is None:
            return
        key = sample.record["key"]
        meta = {k: v for k, v in sample.record.items() if k not in ("status", "error")}
        self._add(sample.record["member"], sample.image)
        self._add(f"{key}.txt", sample.text.encode("utf-8"))
        self._add(f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))

    def close(self) -> None:
        self._tar.close()
        atomic_write(self._fs, self._path, self._buf.getvalue())


class StatsWriter:
    """Per-shard counts, like img2dataset's ``{shard}_stats.json``."""

    def __init__(self, fs: AbstractFileSystem, path: str, shard: str, kind: str, files: dict[str, str]):
        self._fs, self._path = fs, path
        self.stats: dict[str, Any] = {"shard": shard, "kind": kind, "files": files}
        self._keys: list[str] = []
        self._statuses: Counter[str] = Counter()
        self._seconds = 0.0
        self._errors: Counter[str] = Counter()
        self._passes = self._decoded = 0  # synthesis: forward passes of the images made, and how many

    def write(self, sample: Sample) -> None:
        self._keys.append(sample.record["key"])
        self._seconds += sample.record.get("seconds") or 0.0
        if sample.record["status"] != "error" and sample.record.get("decode_passes"):
            self._passes += int(sample.record["decode_passes"])
            self._decoded += 1
        self._statuses[sample.record["status"]] += 1
        if sample.record["status"] == "error":
            self._errors[str(sample.record["error"])[:MAX_ERROR_CHARS]] += 1

    def close(self) -> None:
        self.stats.update(
            count=len(self._keys),
            ok=self._statuses["ok"],
            failed=self._statuses["error"],
            filtered=self._statuses["filtered"],
            first_key=min(self._keys, default=None),
            last_key=max(self._keys, default=None),
            seconds=self._seconds,
            errors=dict(sorted(self._errors.items())),
        )
        if self._decoded:
            self.stats.update(decode_passes=self._passes, decoded=self._decoded)
        atomic_write(self._fs, self._path, json.dumps(self.stats, indent=1, sort_keys=True).encode("utf-8"))


class ParquetShardWriter:
    """All rows of the shard, failures included; its appearance commits the shard."""

    def __init__(self, fs: AbstractFileSystem, path: str, schema: pa.Schema):
        self._fs, self._path, self._schema = fs, path, schema
        self._records: list[dict[str, Any]] = []

    def write(self, sample: Sample) -> None:
        self._records.append(sample.record)

    def close(self) -> None:
        # column lists, not a list of row dicts: half the time of ``from_pylist`` on wide shards
        names = self._schema.names
        rows = map(operator.itemgetter(*names), self._records)  # every record has every schema column
        columns = zip(*rows, strict=True) if self._records else [()] * len(names)
        table = pa.Table.from_pydict(dict(zip(names, map(list, columns), strict=True)), schema=self._schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        atomic_write(self._fs, self._path, buf.getvalue())


def _rows(rows: Sequence[dict[str, Any]] | pa.Table) -> list[dict[str, Any]]:
    if isinstance(rows, pa.Table):
        # Ray's accessor turns tensor columns (uint8 images) into numpy arrays, not nested lists.
        return [dict(r) for r in BlockAccessor.for_block(rows).iter_rows(public_row_format=True)]
    return list(rows)


def write_shard(
    rows: Sequence[dict[str, Any]] | pa.Table,
    output_url: str,
    storage_options: dict | None = None,
    columns: OutputColumns | None = None,
    recipe: dict[str, Any] | None = None,
    tar: bool | None = None,
) -> dict[str, Any]:
    """Write one batch of results as one committed shard; returns the shard's stats.

    Every row has exactly the columns the model stage returns (``columns.from_model_stage``): the
    ``key``, ``status``/``error``, the reader's columns and the model's (synthesis rows an ``image``:
    PNG bytes or uint8 [H, W, 3]). A missing or undeclared column is a ``ColumnError`` naming it.
    ``recipe``: the recipe columns' values (``columns.recipe_values``), the same on every row. ``tar``:
    whether ok rows also go to a WebDataset tar (synthesis: always; caption: ``output.write_images``).
    """
    columns = columns or OutputColumns("synthesis")
    kind = columns.kind
    recipe = recipe or {}
    columns.check_recipe(recipe)
    tar = kind == "synthesis" if tar is None else tar
    rows = _rows(rows)
    if not rows:
        return {"shard": None, "kind": kind, **dict.fromkeys(STAT_COUNTS, 0)}
    want = columns.from_model_stage
    for row in rows:
        if row.keys() != want:
            columns.check(row.keys())
    keys = [row.get("key") for row in rows]
    if not all(isinstance(k, str) and k for k in keys):
        raise ValueError("every row needs a non-empty string 'key' (made by pipeline.sources)")
    if len(set(keys)) != len(keys):
        dupes = sorted(k for k, n in Counter(keys).items() if n > 1)[:5]
        raise ValueError(f"duplicate keys in one batch ({dupes}): each input row must appear once")
    if kind == "synthesis" and not all(_TAR_SAFE_KEY.match(k) for k in keys):
        raise ValueError("synthesis keys must be [A-Za-z0-9_-]+ to be valid WebDataset member names")

    fs, root = open_fs(output_url, storage_options)
    shard = shard_name(keys)
    names = shard_files(shard)
    if not tar:
        del names["tar"]
    stats = StatsWriter(fs, f"{root}/{names['stats']}", shard, kind, names)
    writers: list[Any] = [TarShardWriter(fs, f"{root}/{names['tar']}")] if "tar" in names else []
    # Commit order: tar, stats, then the Parquet file that makes the shard visible.
    writers += [stats, ParquetShardWriter(fs, f"{root}/{names['parquet']}", columns.schema)]
    samples = (_sample(row, columns, shard, recipe, tar) for row in rows)
    for sample in sorted(samples, key=lambda s: s.record["key"]):
        for writer in writers:
            writer.write(sample)
    for writer in writers:
        writer.close()
    return stats.stats


class ShardDatasink(Datasink[list[dict[str, Any]]]):
    """``ds.write_datasink(ShardDatasink(...))``: each write task writes its rows as committed shards.

    Ray bundles at least ``rows_per_shard`` rows per write task; a task splits what it gets into
    near-equal shards of about that size. After the write, ``self.shards`` holds every shard's stats.
    """

    def __init__(
        self,
        output_url: str,
        storage_options: dict | None = None,
        columns: OutputColumns | None = None,
        rows_per_shard: int = 1000,
        recipe: dict[str, Any] | None = None,
        tar: bool | None = None,
    ):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.output_url = output_url
        self.storage_options = storage_options
        self.columns = columns or OutputColumns("synthesis")
        self.rows_per_shard = rows_per_shard
        self.recipe = recipe
        self.tar = tar
        self.shards: list[dict[str, Any]] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def write(self, blocks: Iterable[Block], ctx: Any) -> list[dict[str, Any]]:
        rows = [dict(r) for b in blocks for r in BlockAccessor.for_block(b).iter_rows(public_row_format=True)]
        parts = np.array_split(np.arange(len(rows)), max(1, math.ceil(len(rows) / self.rows_per_shard)))
        return [
            write_shard(
                [rows[i] for i in part], self.output_url, self.storage_options, self.columns, self.recipe, self.tar
            )
            for part in parts
            if len(part)
        ]

    def on_write_complete(self, write_result: WriteResult[list[dict[str, Any]]]) -> None:
        self.shards = [s for shards in write_result.write_returns for s in shards]
