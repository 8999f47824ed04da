"""fsspec helpers: one way to open any URL, write a file atomically, and list input files.

Every byte the pipeline reads or writes goes through fsspec (``s3://``, ``file://``, plain paths,
``memory://``), configured only by the job's ``storage_options``.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import logging
import lzma
import os
import posixpath
import tarfile
import uuid
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

# Stores where one PUT replaces the whole object: readers see the old object or the new one, never a
# part (S3 multipart uploads, used by s3fs above 100 MiB, also stay invisible until completed).
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "memory"})
TEMP_SUFFIX = ".tmp"
_GLOB_CHARS = "*?["
S3_PROTOCOLS = frozenset({"s3", "s3a"})
#: botocore retries for S3 URLs whose storage_options set none (``config_kwargs.retries``): standard
#: mode retries throttling (503 SlowDown), 5xx errors and dropped connections with jittered exponential
#: backoff, at most ``max_attempts`` times per request; s3fs repeats a request that still ends in
#: SlowDown or a dropped connection up to 5 times. A bucket that keeps failing therefore fails the job
#: within one to two minutes (30 requests, 92 s measured), with the store's last error.
S3_RETRIES = {"max_attempts": 5, "mode": "standard"}

#: Errors that say an input file itself is bad (it becomes a failed row), as opposed to transient I/O
#: (re-raised, so Ray retries the read). ValueError covers pyarrow's ArrowInvalid (corrupt Parquet)
#: and decoding errors.
BAD_FILE_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    gzip.BadGzipFile,
    tarfile.TarError,
    ValueError,
)


def _log_failed_s3_attempt(
    attempts: int,
    operation: Any,
    request_dict: dict,
    response: Any = None,
    caught_exception: Any = None,
    **_: Any,
) -> None:
    """botocore ``needs-retry`` hook: a WARNING per failed S3 request, so throttling and flaky storage
    show in the job's log. It decides nothing: botocore's retry handler does, within ``max_attempts``."""
    if caught_exception is not None:
        reason = f"{type(caught_exception).__name__}: {caught_exception}"
    else:
        http, parsed = response
        if http.status_code < 500 and http.status_code != 429:
            return
        reason = f"HTTP {http.status_code} {parsed.get('Error', {}).get('Code', '')}".rstrip()
    logger.warning(
        "S3 %s %s: attempt %d failed (%s)", operation.name, request_dict.get("url"), attempts, reason
    )


def _log_s3_retries() -> None:
    """Hook ``_log_failed_s3_attempt`` into every botocore session this process creates from now on
    (at import: Ray workers may get a ready-made S3 filesystem, pickled, without calling ``open_fs``)."""
    try:
        from botocore import handlers
    except ImportError:  # no S3 support installed: nothing to hook (local and memory URLs still work)
        return
    spec = ("needs-retry.s3", _log_failed_s3_attempt)
    if spec not in handlers.BUILTIN_HANDLERS:
        handlers.BUILTIN_HANDLERS.append(spec)


_log_s3_retries()


def with_s3_retries(url: str, storage_options: dict | None) -> dict:
    """``storage_options`` plus ``S3_RETRIES`` for S3 URLs that configure no retries of their own."""
    options = dict(storage_options or {})
    if fsspec.utils.get_protocol(url) in S3_PROTOCOLS:
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", dict(S3_RETRIES))
        options["config_kwargs"] = config
    return options


class StorageError(OSError):
    """Storage that failed for good (after the retries): the message says which URL and what to check."""


@contextmanager
def storage_step(action: str, url: str) -> Iterator[None]:
    """Re-raise an I/O error as a ``StorageError`` naming ``action`` and ``url``; a missing file stays a
    ``FileNotFoundError``, which callers handle themselves."""
    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except OSError as exc:
        raise StorageError(
            f"cannot {action} {url}: {str(exc).rstrip('.')}; check that it is reachable and that "
            "storage_options (endpoint, credentials, retries) are right"
        ) from exc


def open_fs(url: str, storage_options: dict | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and the protocol-less path for ``url``; relative local paths become absolute."""
    fs, path = fsspec.core.url_to_fs(url, **with_s3_retries(url, storage_options))
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
    with storage_step("write", fs.unstrip_protocol(path)):
        _atomic_write(fs, path, data)


def _atomic_write(fs: AbstractFileSystem, path: str, data: bytes) -> None:
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
    #: files under the root that are not inputs of the wanted kinds (e.g. a .svg among images)
    skipped: tuple[str, ...] = ()
    #: per file, what changes when its content does (an object store's ETag, a file's mtime)
    stamps: tuple[str, ...] = ()

    def relative(self, path: str) -> str:
        """The file's name relative to the input root: stable when the data moves to another bucket."""
        if self.root and path.startswith(self.root.rstrip("/") + "/"):
            return path[len(self.root.rstrip("/")) + 1 :]
        return posixpath.basename(path)

    def fingerprint(self) -> str:
        """A digest of every input file's relative name, size and change stamp: equal digests, the same
        input as far as a listing can tell."""
        digest = hashlib.sha256()
        for path, size, stamp in itertools.zip_longest(self.paths, self.sizes, self.stamps, fillvalue=""):
            digest.update(f"{self.relative(path)}\0{size}\0{stamp}\n".encode())
        return digest.hexdigest()


#: fsspec ``info`` fields that change with a file's content, most telling first
_STAMP_FIELDS = ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created")


def change_stamp(info: dict[str, Any]) -> str:
    """What an fsspec listing says changes when the file does ("" when it says nothing)."""
    return next((str(info[f]) for f in _STAMP_FIELDS if info.get(f) is not None), "")


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
        sizes, stamps = (int(info.get("size") or 0),), (change_stamp(info),)
        return Listing(fs, posixpath.dirname(path), (path,), sizes, stamps=stamps)
    else:
        raise FileNotFoundError(
            f"no such file, directory or prefix: {url!r} (check the URL and storage_options)"
        )
    found = {fs._strip_protocol(p): info for p, info in found.items()}
    visible = sorted(
        p
        for p in found
        if not _is_hidden(p) and not any(_is_hidden(part) for part in p[len(root) :].split("/")[:-1])
    )
    paths = [p for p in visible if wanted is None or p.lower().endswith(wanted)]
    if not paths:
        kinds = f" ending in {', '.join(wanted)}" if wanted else ""
        raise FileNotFoundError(f"no input files{kinds} found under {url!r}")
    skipped = tuple(p for p in visible if wanted is not None and not p.lower().endswith(wanted))
    sizes = tuple(int(found[p].get("size") or 0) for p in paths)
    return Listing(fs, root, tuple(paths), sizes, skipped, tuple(change_stamp(found[p]) for p in paths))
