"""A job's output directory: the committed shards' Parquet files are its only checkpoint.

``OutputDir`` lists the directory once per look and answers what a job needs from it: committed
shards, committed keys (resume), cleanup of what a crash left behind, totals and duplicates. A rerun
first removes uncommitted leftovers, then skips every key some committed shard already holds (failed
rows count as done, so a rerun never writes a key twice). Only the ``key`` column of each Parquet
file is read, and keys are held packed (12 bytes each, ``sources.keys.packed_keys``): a resume over
the 72M rows of the Janus-Pro paper's synthetic set needs under 2 GB on the driver. A job that ends
with every row of its input committed says so in ``_complete.json`` (a digest of what decided its rows,
and of its shards): a rerun that finds both unchanged has nothing to run, and starts neither Ray nor
a model nor reads a key or a stats file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Dataset

from .sinks import SHARD_PREFIX, STAT_COUNTS, shard_files
from .sources.keys import PACKED_BYTES, packed_keys
from .storage import atomic_write, is_temp_name, open_fs, storage_step

logger = logging.getLogger(__name__)

READ_THREADS = 4  # overlapping reads hide object-store latency; each thread's buffers cost ~4 MB of driver memory
EMPTY_KEYS = np.array([], dtype=f"S{PACKED_BYTES}")
COMPLETE_FILE = "_complete.json"


class OutputDir:
    """One flat output directory (any fsspec URL); ``refresh`` lists it again."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.storage_options = storage_options
        self.fs, self.root = open_fs(url, storage_options)
        self.names: list[str] = []
        self.refresh()

    def refresh(self) -> OutputDir:
        """List the directory (nothing yet if it does not exist)."""
        with storage_step("read the output", self.url):
            self.fs.invalidate_cache(self.root)  # other processes wrote here since any cached listing
            try:
                paths = self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                paths = []
        self.names = sorted(posixpath.basename(p.rstrip("/")) for p in paths)
        return self

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    @property
    def committed_shards(self) -> list[str]:
        """Shards with a Parquet file, sorted; only our own names (a user's other files are left alone)."""
        return [
            n[: -len(".parquet")] for n in self.names if n.startswith(SHARD_PREFIX) and n.endswith(".parquet")
        ]

    def cleanup(self) -> list[str]:
        """Delete what a crash left behind: tars and stats without a Parquet file, and temporary files.

        Run it before a job starts (never while another job writes here) and after it ends (writers
        killed mid-file leave temporaries). Returns the deleted paths.
        """
        committed = set(self.committed_shards)
        doomed = []
        for name in self.names:
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
                doomed.append(self.path(name))
        if doomed:
            with storage_step("clean up", self.url):
                self.fs.rm(doomed)
            gone = {posixpath.basename(p) for p in doomed}
            self.names = [n for n in self.names if n not in gone]
        return doomed

    # -- completion ----------------------------------------------------------------------------
    def _shards_digest(self) -> str:
        return hashlib.sha256("\n".join(self.committed_shards).encode()).hexdigest()

    def mark_complete(self, rows_from: str, total: dict[str, Any]) -> None:
        """Every row of the input that ``rows_from`` names (a digest) is committed, in these shards,
        whose counts are ``total`` (``totals()``)."""
        data = json.dumps({"rows_from": rows_from, "shards": self._shards_digest(), "total": total}, indent=1)
        with storage_step("write", self.url):
            atomic_write(self.fs, self.path(COMPLETE_FILE), (data + "\n").encode())

    def completed(self, rows_from: str) -> dict[str, Any] | None:
        """The totals of the run that completed this output, if a job whose rows come from
        ``rows_from`` has nothing to run here: the marker names the same input and settings, and the
        committed shards are the ones it was written beside (a shard deleted or added since: None).
        Their stats files are written before their commit and never after, so the totals stand."""
        if COMPLETE_FILE not in self.names:
            return None
        try:
            with storage_step("read the output", self.url):
                marker = json.loads(self.fs.cat_file(self.path(COMPLETE_FILE)))
        except (ValueError, OSError) as exc:  # unreadable: the shards' keys decide, as without it
            logger.warning("ignoring %s in %s: %s", COMPLETE_FILE, self.url, exc)
            return None
        if (
            isinstance(marker, dict)
            and marker.get("rows_from") == rows_from
            and marker.get("shards") == self._shards_digest()
            and isinstance(marker.get("total"), dict)
        ):
            return marker["total"]
        return None

    # -- keys ----------------------------------------------------------------------------------
    def _read_keys(self, shard: str) -> pa.ChunkedArray:
        path = self.path(shard_files(shard)["parquet"])
        try:
            with storage_step("read", self.fs.unstrip_protocol(path)), self.fs.open(path, "rb") as f:
                # one thread per file (files are read in parallel already): fewer buffers alive at once
                return pq.read_table(f, columns=["key"], use_threads=False).column("key")
        except (pa.ArrowInvalid, KeyError) as exc:
            raise ValueError(
                f"committed shard {path} is unreadable ({exc}); it was not written by this pipeline "
                "or was changed afterwards: move it away and rerun"
            ) from exc

    def _packed_columns(self, shards: list[str]) -> Iterator[np.ndarray]:
        """Each shard's keys, packed as soon as read: Arrow's copy is freed shard by shard; reads overlap,
        as object-store latency dominates."""
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            yield from pool.map(lambda shard: packed_keys(self._read_keys(shard)), shards)

    def _stats(self, shard: str) -> dict[str, Any]:
        with storage_step("read the output", self.url):
            return json.loads(self.fs.cat_file(self.path(shard_files(shard)["stats"])))

    def _all_keys(self, shards: list[str]) -> np.ndarray:
        """Every key of ``shards``, packed, unsorted. The stats files' counts size one array up front, so
        the driver holds 12 bytes a key plus the shards in flight, not the columns and their concatenation
        (Arrow's buffers come from the system allocator, which returns them when freed)."""
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            total = sum(pool.map(lambda shard: int(self._stats(shard)["count"]), shards))
        keys = np.empty(total, dtype=EMPTY_KEYS.dtype)
        filled = 0
        previous = pa.default_memory_pool()
        pa.set_memory_pool(pa.system_memory_pool())
        try:
            for shard, column in zip(shards, self._packed_columns(shards), strict=True):
                if filled + column.size > total:
                    raise ValueError(f"committed shard {shard} holds more rows than its stats file says")
                keys[filled : filled + column.size] = column
                filled += column.size
        finally:
            pa.set_memory_pool(previous)
        return keys[:filled]

    def committed_keys(self) -> np.ndarray:
        """Every committed key, packed, sorted and unique (what resume filters against)."""
        keys = self._all_keys(self.committed_shards)
        keys.sort()
        if keys.size > 1:
            repeats = keys[1:] == keys[:-1]
            if repeats.any():
                keys = keys[np.concatenate(([True], ~repeats))]
        return keys

    def key_set(self) -> set[str]:
        """Every committed key as a Python set of strings (for tests and tools: ~100 bytes a key)."""
        return {k for shard in self.committed_shards for k in self._read_keys(shard).to_pylist()}

    def duplicates(self) -> dict[str, list[str]]:
        """Keys found in more than one committed row -> the shards holding them (should be empty).

        Holds the packed keys once (sorted in place); only when repeats exist are the shards read again,
        to name them.
        """
        shards = self.committed_shards
        keys = self._all_keys(shards)
        keys.sort()
        repeated = np.unique(keys[1:][keys[1:] == keys[:-1]])
        del keys
        if repeated.size == 0:
            return {}
        holders: dict[str, list[str]] = {}
        for shard in shards:
            column = self._read_keys(shard)
            for i in np.flatnonzero(np.isin(packed_keys(column), repeated)):
                holders.setdefault(column[int(i)].as_py(), []).append(shard)
        return {key: sorted(found) for key, found in holders.items()}

    def totals(self) -> dict[str, Any]:
        """Counts over the committed shards' stats files: what a job summary reports."""
        totals = dict.fromkeys(("shards", *STAT_COUNTS), 0)
        for shard in self.committed_shards:
            stats = self._stats(shard)
            totals["shards"] += 1
            for name in STAT_COUNTS:
                totals[name] += stats.get(name, 0)
        return totals


# -- resume inside the Ray Data graph ------------------------------------------------------------


def filter_committed(batch: pa.Table, committed: Any) -> pa.Table:
    """The rows of ``batch`` whose ``key`` is not in ``committed`` (packed, sorted; or its ObjectRef)."""
    if not isinstance(committed, np.ndarray):
        import ray

        committed = ray.get(committed)  # zero-copy from the node's object store, shared by its workers
    if committed.size == 0 or batch.num_rows == 0:
        return batch
    keys = packed_keys(batch.column("key"))
    pos = np.searchsorted(committed, keys)
    done = committed[np.minimum(pos, committed.size - 1)] == keys
    return batch.filter(pa.array(~done))


def drop_committed(ds: Dataset, committed: np.ndarray) -> Dataset:
    """``ds`` without the rows already committed to the output. The keys go to the object store once
    and the driver drops its copy: it holds no keys while the job runs."""
    if committed.size == 0:
        return ds
    import ray

    ref = ray.put(committed)
    return ds.map_batches(filter_committed, fn_kwargs={"committed": ref}, batch_format="pyarrow", batch_size=None)
