"""The key and seed scheme: how every input row gets a deterministic key (and a prompt row its seed).

A rerun over the same input makes the same keys and seeds, which is what resume and idempotent shard
names rely on. ``KEY_VERSION`` names the scheme; change it only with a new name.

Prompt keys and seeds:
    material = json.dumps([KEY_VERSION, job_seed, source, index, prompt, sample])
    digest   = sha256(material)
    key      = digest.hex()[:20]                        # 80 bits: collision-free at 100M+ rows
    seed     = row seed + sample  if the row sets one, else int(digest[16:24]) >> 1   (63 bits)
``source`` is the file's path relative to the input root (so copying the data to another bucket
keeps the keys), ``index`` the 0-based line (txt, jsonl) or data row (csv, parquet) in that file,
``sample`` the 0-based sample of that prompt.

Image keys: the parquet ``key_column`` value when given, else the same digest of (kind, file, tar
member key or parquet row).

Resume holds many keys at once, so they also have a fixed-width binary form (``packed_keys``): 12
bytes a key, whatever the key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from janus.engine.checks import SEED_LIMIT, Rule

KEY_VERSION = "janus-pipeline/1"
KEY_CHARS = 20
MAX_SAMPLES_PER_PROMPT = 10_000
#: samples per prompt: the job's ``synthesis.n_samples`` and a prompt row's own ``n_samples``
N_SAMPLES = Rule(int, ge=1, le=MAX_SAMPLES_PER_PROMPT)
PACKED_BYTES = 12


def keyed_schema(*columns: tuple[str, pa.DataType]) -> pa.Schema:
    """An input row's layout: ``key``, the reader's own columns, then ``status`` and ``error``."""
    return pa.schema([("key", pa.string()), *columns, ("status", pa.string()), ("error", pa.string())])


#: ``json.dumps(..., ensure_ascii=False)`` without its per-call argument handling (same output)
_MATERIAL = json.JSONEncoder(ensure_ascii=False).encode


def digest(*parts: Any) -> bytes:
    material = _MATERIAL([KEY_VERSION, *parts])
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).digest()


def prompt_key_and_seed(
    job_seed: int, source: str, index: int, prompt: str, sample: int, row_seed: int | None
) -> tuple[str, int]:
    d = digest(job_seed, source, index, prompt, sample)
    seed = int.from_bytes(d[16:24], "big") >> 1 if row_seed is None else (row_seed + sample) % SEED_LIMIT
    return d.hex()[:KEY_CHARS], seed


def image_key(*parts: Any) -> str:
    return digest(*parts).hex()[:KEY_CHARS]


# -- the binary form, for holding millions of keys ----------------------------------------------------

_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)


def packed_keys(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Keys as ``PACKED_BYTES``-wide numpy bytes (dtype ``S12``), sortable and comparable.

    Our own keys (20 lowercase hex characters) pack losslessly: a zero tag byte and their 10 bytes.
    Any other key (a user's ``key_column``) becomes a tag byte 1 and 11 bytes of its blake2b digest
    (a collision needs ~2^44 such keys). Vectorised for our keys: 12 bytes a key, no Python objects.
    """
    keys = pc.cast(keys, pa.binary())
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    n = len(keys)
    out = np.zeros((n, PACKED_BYTES), dtype=np.uint8)
    if n == 0:
        return out.view(f"S{PACKED_BYTES}").reshape(n)
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int32, count=n + 1, offset=keys.offset * 4)
    data = np.frombuffer(keys.buffers()[2], dtype=np.uint8) if keys.buffers()[2] is not None else np.zeros(0, np.uint8)
    ours = (np.diff(offsets) == KEY_CHARS) & keys.is_valid().to_numpy(zero_copy_only=False)
    if ours.all():  # the usual case: the data buffer is n keys back to back, viewed without a copy
        chars = data[offsets[0] : offsets[0] + n * KEY_CHARS].reshape(n, KEY_CHARS)
    elif ours.any():
        chars = data[offsets[:-1][ours][:, None] + np.arange(KEY_CHARS)]
    if ours.any():
        nibbles = _HEX[chars]
        good = (nibbles != 255).all(axis=1)
        rows = np.flatnonzero(ours)[good]
        nib = nibbles[good]
        out[rows, 1:11] = (nib[:, 0::2] << 4) | nib[:, 1::2]
        ours[np.flatnonzero(ours)[~good]] = False
    for i in np.flatnonzero(~ours):  # not one of ours: hash it (rare, and one Python call a key)
        raw = keys[int(i)].as_py() or b""
        out[i, 0] = 1
        out[i, 1:] = np.frombuffer(hashlib.blake2b(raw, digest_size=PACKED_BYTES - 1).digest(), dtype=np.uint8)
    return out.view(f"S{PACKED_BYTES}").reshape(n)
