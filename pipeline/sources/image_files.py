"""Image inputs for captioning -> image rows: image files, Parquet with an image-bytes column, WebDataset tars.

Rows carry the raw bytes (decoded later on CPU workers), a deterministic key (``keys.py``), a
``source`` that locates the image (``dir/a.jpg``, ``x.parquet#17``, ``shard-0.tar#000017``) and the
source's own key where it has one (``source_key``: a WebDataset sample's key, or ``key_column``'s). A bad
file or sample becomes one row with ``status="error"``; only transient I/O errors raise.
"""

from __future__ import annotations

import functools
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from ..storage import BAD_FILE_ERRORS, Listing, list_files
from .keys import image_key, keyed_schema

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
DEFAULT_MAX_IMAGE_BYTES = 128 * 2**20

IMAGE_SCHEMA = keyed_schema(("source", pa.string()), ("source_key", pa.string()), ("image_bytes", pa.binary()))


def _image_row(
    key: str, source: str, data: bytes | None, error: str | None = None, source_key: str | None = None
) -> dict[str, Any]:
    return {
        "key": key,
        "source": source,
        "source_key": source_key,
        "image_bytes": None if error else data,
        "status": "error" if error else "ok",
        "error": error,
    }


def _too_big(size: int, max_bytes: int) -> str | None:
    return f"image is {size} bytes, over the limit of {max_bytes}" if size > max_bytes else None


@dataclass(frozen=True)
class ReadOptions:
    """What a reader needs besides the file: the size limit, and for Parquet which columns to read."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    image_column: str = "image"  # Parquet: the image bytes (or a Hugging Face ``Image`` struct)
    key_column: str | None = None  # Parquet: the user's own keys, if any


def _image_file_rows(
    fs: AbstractFileSystem, path: str, source: str, size: int, *, opts: ReadOptions
) -> Iterator[dict[str, Any]]:
    key = image_key("file", source)
    error = _too_big(size, opts.max_bytes)
    if error:
        yield _image_row(key, source, None, error)
        return
    try:
        data = fs.cat_file(path)
    except BAD_FILE_ERRORS as exc:
        yield _image_row(key, source, None, f"cannot read image file: {type(exc).__name__}: {exc}")
        return
    yield _image_row(key, source, data, None if data else "empty image file (0 bytes)")


def _parquet_image_rows(
    fs: AbstractFileSystem, path: str, source: str, size: int, *, opts: ReadOptions
) -> Iterator[dict[str, Any]]:
    image_column, key_column, max_bytes = opts.image_column, opts.key_column, opts.max_bytes
    index = 0
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            missing = [c for c in (image_column, key_column) if c and c not in pf.schema_arrow.names]
            if missing:
                yield _image_row(
                    image_key("parquet", source, "columns"),
                    source,
                    None,
                    f"Parquet file has no column {missing} (columns: {pf.schema_arrow.names})",
                )
                return
            columns = [image_column] + ([key_column] if key_column else [])
            for batch in pf.iter_batches(batch_size=64, columns=columns):
                data = batch.to_pydict()
                for i in range(batch.num_rows):
                    value = data[image_column][i]
                    if isinstance(value, dict):  # Hugging Face `Image` feature: {"bytes", "path"}
                        value = value.get("bytes")
                    user_key = data[key_column][i] if key_column else None
                    user_key = None if user_key is None else str(user_key)
                    key = user_key if user_key is not None else image_key("parquet", source, index)
                    where = f"{source}#{index}"
                    if not value:
                        problem = f"no image bytes in column {image_column!r}"
                    else:
                        problem = _too_big(len(value), max_bytes)
                    yield _image_row(key, where, value, problem, user_key)
                    index += 1
    except BAD_FILE_ERRORS as exc:
        key = image_key("parquet", source, "error", index)
        yield _image_row(
            key, f"{source}#{index}", None, f"cannot read Parquet file: {type(exc).__name__}: {exc}"
        )


def _tar_image_rows(
    fs: AbstractFileSystem, path: str, source: str, size: int, *, opts: ReadOptions
) -> Iterator[dict[str, Any]]:
    """WebDataset samples: consecutive members sharing the name before the first dot of the basename."""
    sample_key: str | None = None
    image: bytes | None = None
    error: str | None = None
    seen: list[str] = []

    def flush() -> dict[str, Any]:
        where = f"{source}#{sample_key}"
        problem = error or (None if image is not None else f"sample has no image member (found: {seen})")
        return _image_row(image_key("tar", source, sample_key), where, image, problem, sample_key)

    count = 0
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = posixpath.split(member.name)
                if base.startswith(".") or "." not in base:
                    continue  # not a sample member (WebDataset skips these too)
                stem, ext = base.split(".", 1)
                key = posixpath.join(folder, stem)
                if key != sample_key:
                    if sample_key is not None:
                        yield flush()
                        count += 1
                    sample_key, image, error, seen = key, None, None, []
                seen.append(ext)
                if ext.lower() in IMAGE_EXTENSIONS and image is None and error is None:
                    error = _too_big(member.size, opts.max_bytes)
                    if error is None:
                        image = tar.extractfile(member).read()
            if sample_key is not None:
                yield flush()
    except BAD_FILE_ERRORS as exc:
        key = image_key("tar", source, "error", count)
        yield _image_row(
            key, f"{source}#{sample_key}", None, f"cannot read tar file: {type(exc).__name__}: {exc}"
        )


#: format -> (the file name endings it reads, its row reader)
IMAGE_READERS: dict[str, tuple[tuple[str, ...], Callable[..., Iterator[dict[str, Any]]]]] = {
    "images": (tuple("." + e for e in IMAGE_EXTENSIONS), _image_file_rows),  # image files
    "parquet": ((".parquet",), _parquet_image_rows),
    "webdataset": ((".tar", ".tar.gz", ".tgz"), _tar_image_rows),
}


def list_image_inputs(
    url: str, storage_options: dict | None = None, fmt: str | None = None
) -> tuple[str, Listing]:
    """(format, files) for captioning input; the format is inferred when exactly one kind is present."""
    fmt = None if fmt == "auto" else fmt
    if fmt is not None and fmt not in IMAGE_READERS:
        raise ValueError(f"unknown image input format {fmt!r}: use 'auto' or one of {tuple(IMAGE_READERS)}")
    if fmt is not None:
        return fmt, list_files(url, storage_options, IMAGE_READERS[fmt][0])
    listing = list_files(url, storage_options, [s for suffixes, _ in IMAGE_READERS.values() for s in suffixes])
    kinds = {k for p in listing.paths for k, (suffixes, _) in IMAGE_READERS.items() if p.lower().endswith(suffixes)}
    if len(kinds) > 1:
        raise ValueError(
            f"{url!r} holds several input kinds {sorted(kinds)}: set the input format explicitly"
        )
    return kinds.pop(), listing


def image_file_reader(
    fmt: str,
    image_column: str = "image",
    key_column: str | None = None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Callable[[AbstractFileSystem, str, str, int], Iterator[dict[str, Any]]]:
    """The row reader for one input format: ``(fs, path, source, size) -> rows``."""
    opts = ReadOptions(max_image_bytes, image_column, key_column)
    return functools.partial(IMAGE_READERS[fmt][1], opts=opts)


def read_images(
    url: str, storage_options: dict | None = None, fmt: str | None = None, **columns: Any
) -> Iterator[dict[str, Any]]:
    """All image rows under ``url`` in file order, in this process (small inputs, tests, tools).
    ``columns``: ``image_column``, ``key_column``, ``max_image_bytes`` (see ``image_file_reader``)."""
    fmt, listing = list_image_inputs(url, storage_options, fmt)
    reader = image_file_reader(fmt, **columns)
    for path, size in zip(listing.paths, listing.sizes, strict=True):
        yield from reader(listing.fs, path, listing.relative(path), size)


