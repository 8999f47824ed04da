"""Resume from an output directory: the committed shards' Parquet files are the only checkpoint.

A rerun of a job first removes what a crash left behind (``cleanup_uncommitted``), then skips every
key some committed shard already holds (``load_committed`` + ``drop_committed``); failed rows count
as done, so a rerun never writes a key twice. Only the ``key`` column of each Parquet file is read.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from ray.data import Dataset

from .sinks import SHARD_PREFIX, shard_files
from .storage import is_temp_name, open_fs

READ_THREADS = 16


def _output_names(output_url: str, storage_options: dict | None) -> tuple[AbstractFileSystem, str, list[str]]:
    """Base names in the (flat) output directory; none if it does not exist yet."""
    fs, root = open_fs(output_url, storage_options)
    fs.invalidate_cache(root)  # other processes wrote here since any cached listing
    try:
        paths = fs.ls(root, detail=False)
    except FileNotFoundError:
        return fs, root, []
    return fs, root, sorted(posixpath.basename(p.rstrip("/")) for p in paths)


def _committed_shards(names: list[str]) -> list[str]:
    # Only our own shard names: other files a user keeps in the output directory are left alone.
    return [n[: -len(".parquet")] for n in names if n.startswith(SHARD_PREFIX) and n.endswith(".parquet")]


def committed_shards(output_url: str, storage_options: dict | None = None) -> list[str]:
    """Names of the committed shards (those with a Parquet file), sorted."""
    return _committed_shards(_output_names(output_url, storage_options)[2])


def _read_keys(fs: AbstractFileSystem, path: str) -> np.ndarray:
    """One shard's keys as fixed-width bytes, converted at once: Arrow's copy is freed shard by shard."""
    try:
        with fs.open(path, "rb") as f:
            return _as_bytes(pq.read_table(f, columns=["key"]).column("key"))
    except (pa.ArrowInvalid, KeyError) as exc:
        raise ValueError(
            f"committed shard {path} is unreadable ({exc}); it was not written by this pipeline "
            "or was changed afterwards: move it away and rerun"
        ) from exc


def _key_columns(output_url: str, storage_options: dict | None) -> Iterator[tuple[str, np.ndarray]]:
    """(shard, key column) of every committed shard; reads overlap, as object-store latency dominates."""
    fs, root, names = _output_names(output_url, storage_options)
    shards = _committed_shards(names)
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        columns = pool.map(lambda shard: _read_keys(fs, f"{root}/{shard_files(shard)['parquet']}"), shards)
        yield from zip(shards, columns, strict=True)


def committed_keys(output_url: str, storage_options: dict | None = None) -> set[str]:
    """Every key of every committed shard (a Python set: for tests, tools and job summaries)."""
    keys: set[str] = set()
    for _, column in _key_columns(output_url, storage_options):
        keys.update(key.decode("utf-8") for key in column.tolist())
    return keys


def _as_bytes(keys: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.cast(keys, pa.binary()).to_numpy(zero_copy_only=False).astype(np.bytes_)


def load_committed(output_url: str, storage_options: dict | None = None) -> np.ndarray:
    """Committed keys as one sorted numpy bytes array: ~20 bytes a key (100M keys ~ 2 GB, a Python set
    would take ~10 GB), stored once in Ray's object store for every filter task (as Ray's own
    checkpoint filter does)."""
    parts = [column for _, column in _key_columns(output_url, storage_options)]
    if not parts:
        return np.array([], dtype="S1")
    keys = np.concatenate(parts)
    del parts
    keys.sort()
    return keys[np.concatenate(([True], keys[1:] != keys[:-1]))]


def filter_committed(batch: pa.Table, committed: np.ndarray) -> pa.Table:
    """The rows of ``batch`` whose ``key`` is not in ``committed`` (from ``load_committed``)."""
    if committed.size == 0 or batch.num_rows == 0:
        return batch
    keys = _as_bytes(batch.column("key"))
    pos = np.searchsorted(committed, keys)
    done = committed[np.minimum(pos, committed.size - 1)] == keys
    return batch.filter(pa.array(~done))


def drop_committed(ds: Dataset, committed: np.ndarray) -> Dataset:
    """``ds`` without the rows already committed to the output (resume)."""
    if committed.size == 0:
        return ds
    return ds.map_batches(
        filter_committed, fn_kwargs={"committed": committed}, batch_format="pyarrow", batch_size=None
    )


def duplicate_keys(output_url: str, storage_options: dict | None = None) -> dict[str, list[str]]:
    """Keys found more than once across committed shards -> the shards holding them (should be empty).

    Runs in the driver after every job, so it holds no more than ``load_committed`` does: the keys as
    fixed-width bytes, twice (per shard, and all of them sorted in place to find repeats).
    """
    found = list(_key_columns(output_url, storage_options))
    if not found:
        return {}
    keys = np.concatenate([column for _, column in found])
    keys.sort()
    repeated = np.unique(keys[1:][keys[1:] == keys[:-1]])
    del keys
    holders: dict[str, list[str]] = {}
    for shard, column in found:
        for key in column[np.isin(column, repeated)].tolist():
            holders.setdefault(key.decode("utf-8"), []).append(shard)
    return {key: sorted(shards) for key, shards in holders.items()}


def cleanup_uncommitted(output_url: str, storage_options: dict | None = None) -> list[str]:
    """Delete what a crash left behind: tars and stats without a Parquet file, and temporary files.

    Run it before a job starts, never while another job writes to the same output. Returns the
    deleted paths.
    """
    fs, root, names = _output_names(output_url, storage_options)
    committed = set(_committed_shards(names))
    doomed = []
    for name in names:
        if not name.lstrip(".").startswith(SHARD_PREFIX):
            continue
        if name.endswith(".tar"):
            shard = name[: -len(".tar")]
        elif name.endswith("_stats.json"):
            shard = name[: -len("_stats.json")]
        elif is_temp_name(name):
            shard = None
        else:
            continue
        if shard is None or shard not in committed:
            doomed.append(f"{root}/{name}")
    if doomed:
        fs.rm(doomed)
    return doomed


def summarize_output(output_url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Totals over the committed shards' stats files: what a job summary reports."""
    fs, root, names = _output_names(output_url, storage_options)
    totals: dict[str, Any] = {"shards": 0, "count": 0, "ok": 0, "failed": 0}
    for shard in _committed_shards(names):
        stats = json.loads(fs.cat_file(f"{root}/{shard_files(shard)['stats']}"))
        totals["shards"] += 1
        for field in ("count", "ok", "failed"):
            totals[field] += stats[field]
    return totals
