"""Pairs of 64-bit hashes within a few bits of each other, over more rows than memory should hold.

In memory (``near_pairs``): multi-index hashing. Split the hashes into m bands; two hashes within d bits
agree to within d // m bits in some band (pigeonhole), so each band is probed for its own values and
their few-bit neighbours instead of comparing all pairs.

Out of memory (``HashSpill``): the hashes are spilled to a local file (16 bytes a row: hash, row), then
split d + 1 ways into exact bands: two hashes within d bits agree exactly in at least one of them. For
each band in turn, the spill is partitioned by that band's value into files of about ``PART_ROWS`` rows,
and each partition is searched in memory on its own. Every near pair shares a partition in some band, so
all are found; what the process holds is one partition, not the row count (for hashes spread over their
bands; rows that all share one band value share a partition).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import tempfile
from collections.abc import Iterator

import numpy as np

ROW_CHUNK = 1 << 18  # rows probed at once
PAIR_CHUNK = 1 << 20  # candidate pairs checked at once (~70 MB of temporaries)
PART_ROWS = 1 << 14  # rows a partition of the spill aims at: small partitions probe few bands, cheaply
READ_ROWS = 1 << 16  # spilled rows read at once (1 MB)
MAX_PARTS = 256  # partition files open at once
SPILLED = np.dtype([("hash", "<u8"), ("row", "<i8")])
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
    return split_bits(m), max_distance // m


def split_bits(m: int) -> list[tuple[int, int]]:
    """(bit offset, width) of ``m`` bands over 64 bits, the first ``64 % m`` one bit wider."""
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    return list(zip(np.cumsum([0, *widths[:-1]]).tolist(), widths, strict=True))


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
        found += [
            pairs for flip in _flips(width, radius) for pairs in _probe(hashes, band, flip, max_distance)
        ]
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


def pairs_among(hashes: np.ndarray, rows: np.ndarray, max_distance: int) -> np.ndarray:
    """int64 [p, 2]: pairs of ``rows`` whose ``hashes`` are within ``max_distance`` bits, enough to
    connect every group: rows with the same hash are each paired with the first of them (not with each
    other), and distinct hashes are searched once."""
    distinct, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    leader = rows[first[inverse]]
    same = np.stack([leader, rows], axis=1)[leader != rows]
    near = rows[first[near_pairs(distinct, max_distance)]]
    return np.concatenate([same, near]).astype(np.int64)


def exact_bands(max_distance: int) -> list[tuple[int, int]]:
    """(bit offset, width) of ``max_distance + 1`` bands: hashes within the distance agree in one."""
    return split_bits(max_distance + 1)


def spread_bits(hashes: np.ndarray, start: int, width: int) -> np.ndarray:
    """``hashes`` with their bits reordered so that bits ``[start, start + width)`` land evenly apart
    (the rest keep their order): Hamming distances stay the same. A partition's rows share most of
    those bits; left together they would fill one of ``near_pairs``'s bands with equal values."""
    spread = np.linspace(0, 64, width, endpoint=False).astype(int)
    rest = iter(b for b in range(64) if not start <= b < start + width)
    band = iter(range(start, start + width))
    source = [next(band) if slot in spread else next(rest) for slot in range(64)]
    bits = np.unpackbits(hashes.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    return np.ascontiguousarray(np.packbits(bits[:, source], axis=1, bitorder="little")).view("<u8").ravel()


class HashSpill:
    """Hashes added shard by shard, numbered in the order added, kept in a local file; ``pairs``
    finds the near pairs one partition at a time. A context manager: the files go at exit."""

    def __init__(self, tmp_dir: str | None = None, part_rows: int = PART_ROWS):
        if tmp_dir:
            os.makedirs(tmp_dir, exist_ok=True)
        self._dir = tempfile.TemporaryDirectory(prefix="janus-dedup-", dir=tmp_dir)
        self.part_rows = part_rows
        self.rows = 0
        self._file = open(os.path.join(self._dir.name, "hashes"), "wb")

    def __enter__(self) -> HashSpill:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        self._dir.cleanup()

    def add(self, hashes: np.ndarray) -> None:
        block = np.empty(len(hashes), SPILLED)
        block["hash"], block["row"] = hashes, np.arange(self.rows, self.rows + len(hashes))
        self._file.write(block.tobytes())
        self.rows += len(hashes)

    @staticmethod
    def _blocks(path: str) -> Iterator[np.ndarray]:
        with open(path, "rb") as f:
            while len(block := np.fromfile(f, SPILLED, count=READ_ROWS)):
                yield block

    def pairs(self, max_distance: int) -> np.ndarray:
        """int64 [p, 2] (unique, sorted): pairs of rows within the distance, enough to connect every
        group (``pairs_among``)."""
        self._file.flush()
        spill = self._file.name
        found = os.path.join(self._dir.name, "pairs")
        with open(found, "wb") as f:  # to a file: small arrays kept between partitions would pin the heap
            if self.rows <= self.part_rows:  # one partition: the whole spill
                whole = np.fromfile(spill, SPILLED)
                f.write(pairs_among(whole["hash"], whole["row"], max_distance).tobytes())
            else:
                for start, width in exact_bands(max_distance):
                    for pairs in self._band_pairs(spill, start, width, max_distance):
                        f.write(pairs.tobytes())
        pairs = np.sort(np.fromfile(found, np.int64).reshape(-1, 2), axis=1)
        return np.unique(pairs, axis=0) if len(pairs) else pairs

    def _band_pairs(self, spill: str, start: int, width: int, max_distance: int) -> Iterator[np.ndarray]:
        parts = min(1 << width, MAX_PARTS, -(-self.rows // self.part_rows))
        paths = [os.path.join(self._dir.name, f"part-{p}") for p in range(parts)]
        with contextlib.ExitStack() as files:
            out = [files.enter_context(open(path, "wb")) for path in paths]
            for block in self._blocks(spill):
                value = (block["hash"] >> np.uint64(start)) & np.uint64((1 << width) - 1)
                part = (value % np.uint64(parts)).astype(np.int64)
                order = np.argsort(part, kind="stable")
                bounds = np.searchsorted(part[order], np.arange(parts + 1))
                block = block[order]
                for p in np.flatnonzero(np.diff(bounds)):
                    out[p].write(block[bounds[p] : bounds[p + 1]].tobytes())
        for path in paths:
            rows = np.fromfile(path, SPILLED)
            os.remove(path)
            yield pairs_among(spread_bits(rows["hash"], start, width), rows["row"], max_distance)


def groups(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows that have a near-duplicate, sorted; their group labels) from the pairs that join them:
    memory in the grouped rows, not in all rows."""
    nodes, inverse = np.unique(pairs, return_inverse=True)
    return nodes, components(len(nodes), inverse.reshape(-1, 2))
