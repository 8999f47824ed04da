"""Near-duplicate images of an output as an id list, the shards untouched (NeMo Curator's way):

    janus-pipeline dedup --output out/synthesis --max-distance 6 [--by phash|embedding]

writes ``{output}/dedup/remove.parquet``: the key of every row to drop and the key it duplicates (the
best-scored row of its group, the smallest key on ties), with the distance between the two. Rows are
near-duplicates when their 64-bit hashes differ in at most ``--max-distance`` bits: the perceptual hash
``phash`` of the image, or a SimHash of the ``embedding`` column (64 fixed random hyperplanes; d bits
apart is an angle of about d / 64 x 180 degrees). Groups are the connected pairs.

The shards are read one at a time, and of each only the status and the hash, which go to a local
spill file (16 bytes a row, in ``tmp_dir``); the pair search reads it back a partition at a time
(``pipeline.near_duplicates``), so the driver's memory does not grow with the row count. Keys, scores
and hashes are read again only for the rows that have a duplicate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .near_duplicates import HashSpill, groups
from .output import OutputDir
from .sinks import shard_files
from .storage import atomic_write, storage_step

REMOVE_FILE = "dedup/remove.parquet"
METHODS = ("phash", "embedding")
MAX_DISTANCE = 12  # bits of 64; beyond, pHash neighbours are mostly other images and probing grows fast
SIMHASH_SEED = 0  # the hyperplanes of --by embedding: fixed, so a rerun finds the same pairs
REMOVE_SCHEMA = pa.schema(
    [("key", pa.string()), ("duplicate_of", pa.string()), ("distance", pa.int32()), ("by", pa.string())]
)


class DedupError(ValueError):
    """The output cannot be deduplicated as asked (no such column, a distance out of range)."""


def simhash(embeddings: np.ndarray) -> np.ndarray:
    """uint64 [n]: one bit per random hyperplane, set where the embedding is on its positive side."""
    planes = np.random.default_rng(SIMHASH_SEED).standard_normal((embeddings.shape[1], 64), dtype=np.float32)
    bits = embeddings.astype(np.float32) @ planes > 0
    return np.packbits(bits, axis=1, bitorder="little").view("<u8").ravel()


def _ok_rows(out: OutputDir, shard: str, columns: list[str]) -> pa.Table:
    path = out.path(shard_files(shard)["parquet"])
    with storage_step("read", out.fs.unstrip_protocol(path)), out.fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        table = parquet.read(columns=[c for c in ["status", *columns] if c in names], use_threads=False)
    missing = [c for c in columns if c not in names and c != "score"]
    if missing:
        raise DedupError(f"{path} has no column {missing[0]!r}: was it written with quality.embeddings on?")
    table = table.filter(pc.equal(table["status"], "ok"))
    return table.filter(pc.is_valid(table[columns[0]]))


def _hashes(table: pa.Table, by: str) -> np.ndarray:
    if by == "phash":
        return table["phash"].to_numpy().astype(np.int64).view(np.uint64)
    width = table.schema.field("embedding").type.list_size
    flat = pc.list_flatten(table["embedding"]).to_numpy(zero_copy_only=False)
    return simhash(flat.reshape(-1, width))


def spill_hashes(out: OutputDir, by: str, spill: HashSpill) -> np.ndarray:
    """Add the ok rows' hashes to ``spill``, shard by shard; the shard offsets [shards + 1]."""
    offsets = [0]
    for shard in tqdm(out.committed_shards, desc=f"dedup: reading {by}", unit="shard", disable=None):
        hashes = _hashes(_ok_rows(out, shard, [by]), by)
        spill.add(hashes)
        offsets.append(offsets[-1] + len(hashes))
    return np.array(offsets)


def _members(out: OutputDir, rows: np.ndarray, labels: np.ndarray, offsets: np.ndarray, by: str) -> pa.Table:
    """label, key, score (no score: -inf) and hash of the ok rows ``rows`` (sorted, numbered as
    ``spill_hashes`` numbered them), read again from the shards that hold them."""
    parts = []
    shards = np.searchsorted(offsets, rows, "right") - 1
    for s in np.unique(shards):
        here = shards == s
        table = _ok_rows(out, out.committed_shards[s], [by, "key", "score"]).take(pa.array(rows[here] - offsets[s]))
        score = table["score"].to_numpy(zero_copy_only=False) if "score" in table.column_names else None
        score = np.full(table.num_rows, np.nan) if score is None else score.astype(np.float64)
        parts.append(pa.table({
            "label": labels[here], "key": table["key"], "score": np.nan_to_num(score, nan=-np.inf),
            "hash": _hashes(table, by),
        }))  # fmt: skip
    empty = pa.schema([("label", pa.int64()), ("key", pa.string()), ("score", pa.float64()), ("hash", pa.uint64())])
    return pa.concat_tables(parts) if parts else empty.empty_table()


def removals(members: pa.Table, by: str) -> pa.Table:
    """``REMOVE_SCHEMA`` rows, sorted by key: every member but the best-scored of its group (the
    smallest key on ties), each with that kept key and the bits between their hashes. Columnar, so
    the memory is a few dozen bytes a listed row."""
    ranked = members.sort_by([("label", "ascending"), ("score", "descending"), ("key", "ascending")])
    labels = ranked["label"].to_numpy()
    first = np.ones(len(labels), bool)
    first[1:] = labels[1:] != labels[:-1]
    keeper = np.maximum.accumulate(np.where(first, np.arange(len(labels)), 0))[~first]
    hashes = ranked["hash"].to_numpy()
    removed = pa.table(
        {
            "key": ranked["key"].filter(pa.array(~first)),
            "duplicate_of": ranked["key"].take(pa.array(keeper)),
            "distance": np.bitwise_count(hashes[~first] ^ hashes[keeper]).astype(np.int32),
            "by": pa.array([by] * len(keeper), pa.string()),
        },
        schema=REMOVE_SCHEMA,
    )
    return removed.sort_by("key")


def find_duplicates(
    out: OutputDir, max_distance: int = 6, by: str = "phash", tmp_dir: str | None = None
) -> tuple[pa.Table, int]:
    """The rows to remove (``REMOVE_SCHEMA``, sorted by key), and how many ok rows were compared."""
    if by not in METHODS:
        raise DedupError(f"--by must be one of {', '.join(METHODS)}, got {by!r}")
    if not 0 <= max_distance <= MAX_DISTANCE:
        raise DedupError(f"--max-distance must be in [0, {MAX_DISTANCE}] bits of 64, got {max_distance}")
    try:
        spill = HashSpill(tmp_dir)
    except OSError as exc:
        raise DedupError(f"--tmp-dir {tmp_dir}: cannot hold the hash spill ({exc.strerror or exc})") from exc
    with spill:
        offsets = spill_hashes(out, by, spill)
        pairs = spill.pairs(max_distance)
    rows, labels = groups(pairs)
    return removals(_members(out, rows, labels, offsets, by), by), int(offsets[-1])


def dedup(
    url: str,
    storage_options: dict | None = None,
    max_distance: int = 6,
    by: str = "phash",
    tmp_dir: str | None = None,
) -> dict[str, Any]:
    """Write ``{url}/dedup/remove.parquet``; what the command prints. The spill goes to ``tmp_dir``
    (default: the system's temporary directory), 16 bytes a row."""
    out = OutputDir(url, storage_options)
    if not out.committed_shards:
        raise DedupError(f"{url} holds no committed shards")
    removed, compared = find_duplicates(out, max_distance, by, tmp_dir)
    buf = pa.BufferOutputStream()
    pq.write_table(removed, buf, compression="zstd")
    with storage_step("write", url):
        atomic_write(out.fs, out.path(REMOVE_FILE), buf.getvalue().to_pybytes())
    return {
        "output": url,
        "by": by,
        "max_distance": max_distance,
        "compared": compared,
        "remove": removed.num_rows,
        "groups": len(set(removed["duplicate_of"].to_pylist())),
        "file": out.fs.unstrip_protocol(out.path(REMOVE_FILE)),
    }
