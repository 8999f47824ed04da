"""fsspec helpers: one way to open any URL, write a file atomically, and list input files.

Every byte the pipeline reads or writes goes through fsspec (``s3://``, ``file://``, plain paths,
``memory://``), configured only by the job's ``storage_options``.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

# Stores where one PUT replaces the whole object: readers see the old object or the new one, never a
# part (S3 multipart uploads, used by s3fs above 100 MiB, also stay invisible until completed).
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "memory"})
TEMP_SUFFIX = ".tmp"
_GLOB_CHARS = "*?["


def open_fs(url: str, storage_options: dict | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and the protocol-less path for ``url``; relative local paths become absolute."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/") or path


def is_object_store(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return any(p in OBJECT_STORE_PROTOCOLS for p in protocols)


def is_temp_name(name: str) -> bool:
    """Names ``atomic_write`` uses while a file is being written (hidden, ``.tmp`` suffix)."""
    base = posixpath.basename(name)
    return base.startswith(".") and base.endswith(TEMP_SUFFIX)


def atomic_write(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file.

    Object stores get one whole-object upload. Filesystems get a hidden temporary file in the same
    directory that is renamed over ``path`` (``os.replace`` locally, after fsync, so a power cut
    leaves the old file or the new one).
    """
    if is_object_store(fs):
        fs.pipe_file(path, data)
        return
    parent = posixpath.dirname(path)
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
    if isinstance(fs, LocalFileSystem):
        os.makedirs(parent, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


@dataclass(frozen=True)
class Listing:
    """Input files under one URL, in sorted order, with the root their ``source`` names are relative to."""

    fs: AbstractFileSystem
    root: str
    paths: tuple[str, ...]
    sizes: tuple[int, ...]

    def relative(self, path: str) -> str:
        """The file's name relative to the input root: stable when the data moves to another bucket."""
        if self.root and path.startswith(self.root.rstrip("/") + "/"):
            return path[len(self.root.rstrip("/")) + 1 :]
        return posixpath.basename(path)


def _is_hidden(path: str) -> bool:
    # Spark/Hadoop convention: `_SUCCESS`, `.DS_Store` and our own temporaries are not data.
    return posixpath.basename(path).startswith((".", "_"))


def _glob_root(path: str) -> str:
    parts = path.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in _GLOB_CHARS):
            return "/".join(parts[:i])
    return posixpath.dirname(path)


def list_files(
    url: str, storage_options: dict | None = None, suffixes: Iterable[str] | None = None
) -> Listing:
    """Files for a glob, a directory or prefix (recursive), or a single file, sorted by path.

    ``suffixes`` keeps only names ending in one of them (case-insensitive), e.g. ``(".txt", ".jsonl")``;
    a single file named explicitly is kept whatever its name. Hidden names (``.x``, ``_x``) are skipped.
    """
    fs, path = open_fs(url, storage_options)
    wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    is_glob = any(c in path for c in _GLOB_CHARS)
    fs.invalidate_cache(_glob_root(path) if is_glob else path)  # files may have arrived since a listing
    if is_glob:
        root = _glob_root(path)
        found = {p: info for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file"}
    elif fs.isdir(path):
        root = path
        found = fs.find(path, detail=True, withdirs=False)
    elif fs.isfile(path):
        info = fs.info(path)
        return Listing(fs, posixpath.dirname(path), (path,), (int(info.get("size") or 0),))
    else:
        raise FileNotFoundError(
            f"no such file, directory or prefix: {url!r} (check the URL and storage_options)"
        )
    found = {fs._strip_protocol(p): info for p, info in found.items()}
    paths = sorted(
        p
        for p in found
        if not _is_hidden(p)
        and not any(_is_hidden(part) for part in p[len(root) :].split("/")[:-1])
        and (wanted is None or p.lower().endswith(wanted))
    )
    if not paths:
        kinds = f" ending in {', '.join(wanted)}" if wanted else ""
        raise FileNotFoundError(f"no input files{kinds} found under {url!r}")
    return Listing(fs, root, tuple(paths), tuple(int(found[p].get("size") or 0) for p in paths))
