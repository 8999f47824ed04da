"""A content hash of a checkpoint, cheap enough to compute at every job start, without torch.

Reading 15 GB of 7B weights to hash them would cost minutes; the fingerprint reads a few MiB instead:
every small file whole (configs, tokenizer), and of each large file (the weights) its size, its first
and last MiB (a safetensors header with every tensor's name, dtype, shape and offset; a pickled
checkpoint's zip directory with every tensor's CRC-32) and 16 blocks of 64 KiB spread over it. A
re-export, another dtype or shape, or retrained weights change it. A checkpoint from the Hugging Face
hub is named by its commit instead (``hub:owner/name@sha``), which the hub already made content-addressed.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Mapping
from typing import Any

from .hub import (
    CHECKPOINT_PATTERNS,
    COMPLETE_MARKER,
    ModelNotFoundError,
    is_checkpoint_file,
    is_hub_id,
    not_a_model,
    url_cache_dir,
)

WHOLE_BYTES = 16 * 2**20  # files up to this size are hashed whole
EDGE_BYTES = 2**20  # of larger files: the first and the last MiB ...
BLOCKS, BLOCK_BYTES = 16, 64 * 2**10  # ... and blocks spread over the rest


def weights_fingerprint(
    name_or_path: str | os.PathLike,
    *,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """``sha256:<32 hex>`` of the checkpoint at a local directory or fsspec URL, or ``hub:<id>@<commit>``."""
    ref = os.fspath(name_or_path)
    local = ref[len("file://") :] if ref.startswith("file://") else ref
    if os.path.isdir(local):
        return _fingerprint(_local_fs(), os.path.abspath(local))
    if "://" in ref:
        cached = url_cache_dir(ref, cache_dir)
        if (cached / COMPLETE_MARKER).exists():
            return _fingerprint(_local_fs(), str(cached))
        import fsspec

        fs, prefix = fsspec.core.url_to_fs(ref, **dict(storage_options or {}))
        return _fingerprint(fs, prefix.rstrip("/"))
    if not is_hub_id(ref):
        raise not_a_model(ref)
    return _hub_revision(ref, cache_dir)


def _local_fs():
    import fsspec

    return fsspec.filesystem("file")


def _fingerprint(fs: Any, root: str) -> str:
    try:
        entries = [e for e in fs.ls(root, detail=True) if e["type"] == "file" and is_checkpoint_file(e["name"])]
    except (FileNotFoundError, NotADirectoryError):
        entries = []
    if not entries:
        raise ModelNotFoundError(f"no checkpoint files ({', '.join(CHECKPOINT_PATTERNS)}) under {root!r}")
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: posixpath.basename(e["name"])):
        path, size = entry["name"], int(entry["size"])
        digest.update(f"{posixpath.basename(path)}\0{size}\0".encode())
        for start, end in _spans(size):
            digest.update(fs.cat_file(path, start=start, end=end))
    return "sha256:" + digest.hexdigest()[:32]


def _spans(size: int) -> list[tuple[int, int]]:
    """The byte ranges of a file of ``size`` bytes that go into its fingerprint."""
    if size <= WHOLE_BYTES:
        return [(0, size)]
    inner = size - 2 * EDGE_BYTES - BLOCK_BYTES
    starts = [EDGE_BYTES + inner * (i + 1) // (BLOCKS + 1) for i in range(BLOCKS)]
    return [(0, EDGE_BYTES), *((s, s + BLOCK_BYTES) for s in starts), (size - EDGE_BYTES, size)]


def _hub_revision(repo_id: str, cache_dir: str | os.PathLike | None) -> str:
    """The commit of the hub snapshot the model's files come from (the hub's cache is keyed by it)."""
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(repo_id, "config.json", cache_dir=cache_dir)
    except Exception as exc:  # the hub client raises many types for "unreachable" / "not cached"
        raise ModelNotFoundError(f"cannot resolve the hub revision of {repo_id!r}: {exc}") from exc
    return f"hub:{repo_id}@{os.path.basename(os.path.dirname(config))}"
