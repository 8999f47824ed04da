"""Near-duplicate images of an output as an id list, the shards untouched (NeMo Curator's way):

    janus-pipeline dedup --output out/synthesis --max-distance 6 [--by phash|embedding]

writes ``{output}/dedup/remove.parquet``: the key of every row to drop and the key it duplicates (the
best-scored row of its group, the smallest key on ties), with the distance between the two. Rows are
near-duplicates when their 64-bit hashes differ in at most ``--max-distance`` bits: the perceptual hash
``phash`` of the image, or a SimHash of the ``embedding`` column (64 fixed random hyperplanes; d bits
apart is an angle of about d / 64 x 180 degrees). Groups are the connected pairs.

The shards are read one at a time, and of each only the status and the hash; the driver holds 8 bytes
a row (the hash) and finds pairs by multi-index hashing: split into m bands, two hashes
within d bits agree in some band to within d // m bits, so each band is probed for its own values and
their few-bit neighbours instead of comparing all pairs. Keys are read again only for the shards
holding duplicates, with their scores.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .output import OutputDir
from .sinks import shard_files
from .storage import atomic_write, storage_step

REMOVE_FILE = "dedup/remove.parquet"
METHODS = ("phash", "embedding")
MAX_DISTANCE = 12  # bits of 64; beyond, pHash neighbours are mostly other images and probing grows fast
SIMHASH_SEED = 0  # the hyperplanes of --by embedding: fixed, so a rerun finds the same pairs
ROW_CHUNK = 1 << 18  # rows probed at once
PAIR_CHUNK = 1 << 20  # candidate pairs checked at once (~70 MB of temporaries)
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


def read_hashes(out: OutputDir, by: str) -> tuple[np.ndarray, np.ndarray]:
    """(hashes uint64 [n], shard offsets [shards + 1]) of the ok rows, read shard by shard."""
    hashes, offsets = [], [0]
    for shard in out.committed_shards:
        table = _ok_rows(out, shard, [by])
        hashes.append(_hashes(table, by))
        offsets.append(offsets[-1] + table.num_rows)
    return (np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)), np.array(offsets)


TABLE_BITS = 24  # bands up to this wide look their buckets up in a table (2^bits entries), wider ones search


def plan_bands(n: int, max_distance: int) -> tuple[list[tuple[int, int]], int]:
    """(bit offset, width) of each band, and the radius: two hashes within ``max_distance`` bits agree
    to within ``max_distance // bands`` bits in some band (pigeonhole). The number of bands is the one
    that probes least for ``n`` hashes: more bands mean fewer neighbours to probe, wider buckets more
    candidates per probe."""

    def cost(m: int) -> float:
        width, radius = -(-64 // m), max_distance // m
        probes = sum(math.comb(width, k) for k in range(radius + 1))
        return m * probes * (1 + 4 * n / 2**width)

    m = min(range(1, min(max_distance + 1, 16) + 1), key=cost)
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    starts = np.cumsum([0, *widths[:-1]]).tolist()
    return list(zip(starts, widths, strict=True)), max_distance // m


def _flips(width: int, radius: int) -> Iterator[int]:
    for k in range(radius + 1):
        for bits in itertools.combinations(range(width), k):
            yield sum(1 << b for b in bits)


class _Band:
    """One band's values, sorted, with where each value's rows start and how many there are."""

    def __init__(self, hashes: np.ndarray, start: int, width: int):
        index = np.int32 if len(hashes) < 2**31 else np.int64  # row positions: 4 bytes where they fit
        value = np.int32 if width < 32 else np.int64
        self.vals = ((hashes >> np.uint64(start)) & np.uint64((1 << width) - 1)).astype(value)
        self.order = np.argsort(self.vals, kind="stable").astype(index)
        if width <= TABLE_BITS:
            self.counts = np.zeros(1 << width, dtype=index)  # not bincount: its int64 table is twice the size
            np.add.at(self.counts, self.vals, 1)
            self.starts = np.cumsum(self.counts, dtype=index)
            self.starts -= self.counts
        else:
            self.sorted = self.vals[self.order]

    def lookup(self, probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first sorted position, count) of the rows whose value is ``probe``, per probe."""
        if hasattr(self, "counts"):
            return self.starts[probe], self.counts[probe]
        lo = np.searchsorted(self.sorted, probe, "left")
        return lo, np.searchsorted(self.sorted, probe, "right") - lo


def _spans(counts: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges of ``counts`` whose sum stays within ``budget`` (a range holds one entry at least)."""
    ends = np.cumsum(counts)
    start = 0
    while start < len(counts):
        base = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, base + budget, "right")), start + 1)
        yield start, stop
        start = stop


def _probe(hashes: np.ndarray, band: _Band, flip: int, max_distance: int) -> Iterator[np.ndarray]:
    """Pairs (i < j) whose band values differ by ``flip`` and whose hashes are within the distance,
    ROW_CHUNK rows and PAIR_CHUNK candidates at a time: temporaries do not grow with the row count."""
    for first in range(0, len(band.vals), ROW_CHUNK):
        lo, counts = band.lookup(band.vals[first : first + ROW_CHUNK] ^ flip)
        rows = np.flatnonzero(counts)
        lo, counts = lo[rows], counts[rows]
        rows += first
        for a, b in _spans(counts, PAIR_CHUNK):
            n = counts[a:b]
            i = np.repeat(rows[a:b], n)
            j = band.order[np.repeat(lo[a:b], n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)]
            keep = i < j
            i, j = i[keep], j[keep]
            close = np.bitwise_count(hashes[i] ^ hashes[j]) <= max_distance
            yield np.stack([i[close], j[close]], axis=1)


def near_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """int64 [p, 2]: every pair (i < j) of distinct ``hashes`` within ``max_distance`` bits, once."""
    if max_distance == 0 or len(hashes) < 2:
        return np.zeros((0, 2), np.int64)
    bands, radius = plan_bands(len(hashes), max_distance)
    found = []
    for start, width in bands:
        band = _Band(hashes, start, width)
        found += [pairs for flip in _flips(width, radius) for pairs in _probe(hashes, band, flip, max_distance)]
        del band  # one band's tables at a time
    pairs = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """int64 [n]: a label per node, equal for nodes joined by ``pairs`` (union-find, halving)."""
    parent = np.arange(n)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    while True:  # every node straight to its root
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up


def _members(out: OutputDir, rows: np.ndarray, offsets: np.ndarray, by: str) -> tuple[list[str], np.ndarray]:
    """Keys and scores (NaN: none) of the ok rows ``rows`` (sorted global indices), read again from the
    shards that hold them, in the order ``read_hashes`` saw them."""
    keys: list[str] = []
    scores: list[np.ndarray] = []
    shards = np.searchsorted(offsets, rows, "right") - 1
    for s in np.unique(shards):
        table = _ok_rows(out, out.committed_shards[s], [by, "key", "score"]).take(pa.array(rows[shards == s] - offsets[s]))
        keys += table["key"].to_pylist()
        score = table["score"].to_numpy(zero_copy_only=False) if "score" in table.column_names else None
        scores.append(np.full(table.num_rows, np.nan) if score is None else score.astype(np.float64))
    return keys, np.concatenate(scores) if scores else np.zeros(0)


def grouped_rows(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows that have a near-duplicate, their group labels): only the distinct hashes are compared, and
    no per-row index is built beside the hashes (a sorted copy is the largest temporary)."""
    distinct, counts = np.unique(hashes, return_counts=True)
    labels = components(len(distinct), near_pairs(distinct, max_distance))
    in_group = np.bincount(labels, weights=counts, minlength=len(distinct))[labels] > 1
    del counts
    grouped = distinct[in_group]  # sorted: the hashes whose rows have a duplicate
    grouped_labels = labels[in_group]
    del distinct, labels
    rows, row_labels = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, len(hashes) if len(grouped) else 0, PAIR_CHUNK):  # bounded temporaries
        part = hashes[start : start + PAIR_CHUNK]
        found = np.minimum(np.searchsorted(grouped, part), len(grouped) - 1)
        hit = np.flatnonzero(grouped[found] == part)
        rows.append(start + hit)
        row_labels.append(grouped_labels[found[hit]])
    return np.concatenate(rows), np.concatenate(row_labels)


def find_duplicates(out: OutputDir, max_distance: int = 6, by: str = "phash") -> tuple[pa.Table, int]:
    """The rows to remove (``REMOVE_SCHEMA``, sorted by key), and how many ok rows were compared."""
    if by not in METHODS:
        raise DedupError(f"--by must be one of {', '.join(METHODS)}, got {by!r}")
    if not 0 <= max_distance <= MAX_DISTANCE:
        raise DedupError(f"--max-distance must be in [0, {MAX_DISTANCE}] bits of 64, got {max_distance}")
    hashes, offsets = read_hashes(out, by)
    rows, labels = grouped_rows(hashes, max_distance)
    keys, scores = _members(out, rows, offsets, by)
    groups: dict[int, list[tuple[float, str, int]]] = {}
    for row, label, key, score in zip(rows.tolist(), labels.tolist(), keys, scores.tolist(), strict=True):
        groups.setdefault(label, []).append((-math.inf if math.isnan(score) else score, key, row))
    removed = []
    for members in groups.values():
        _, keep_key, keep_row = min(members, key=lambda m: (-m[0], m[1]))  # best score, then smallest key
        for _, key, row in members:
            if row != keep_row:
                distance = int(np.bitwise_count(hashes[row] ^ hashes[keep_row]))
                removed.append({"key": key, "duplicate_of": keep_key, "distance": distance, "by": by})
    return pa.Table.from_pylist(sorted(removed, key=lambda r: r["key"]), schema=REMOVE_SCHEMA), len(hashes)


def dedup(url: str, storage_options: dict | None = None, max_distance: int = 6, by: str = "phash") -> dict[str, Any]:
    """Write ``{url}/dedup/remove.parquet``; what the command prints."""
    out = OutputDir(url, storage_options)
    if not out.committed_shards:
        raise DedupError(f"{url} holds no committed shards")
    removed, compared = find_duplicates(out, max_distance, by)
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
