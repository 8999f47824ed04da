"""Input rows for the two jobs: prompts for synthesis, image bytes for captioning.

Every input record becomes a row with a deterministic ``key``: a rerun over the same input makes the
same keys (and seeds), which is what resume and idempotent shard names rely on. A bad record never
raises: it becomes a row with ``status="error"`` and an ``error`` message, written later as a failed
output row. Only transient I/O errors (network, throttling) raise, so that Ray retries the read.

Prompt keys and seeds (``KEY_VERSION`` names this scheme; change it only with a new name):
    material = json.dumps([KEY_VERSION, job_seed, source, index, prompt, sample])
    digest   = sha256(material)
    key      = digest.hex()[:20]                        # 80 bits: collision-free at 100M+ rows
    seed     = row seed + sample  if the row sets one, else int(digest[16:24]) >> 1   (63 bits)
``source`` is the file's path relative to the input root (so copying the data to another bucket
keeps the keys), ``index`` the 0-based line (txt, jsonl) or data row (csv, parquet) in that file,
``sample`` the 0-based sample of that prompt. A row's ``id`` is carried through, never hashed: user
ids may repeat. Bad records get one row (sample 0) whatever ``n_samples`` says.

Image keys: the parquet ``key_column`` value when given, else sha256 of (file, tar member key or
parquet row) in the same way; ``source`` locates the image: ``dir/a.jpg``, ``x.parquet#17``,
``shard-0.tar#000017``.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import json
import lzma
import math
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.spec import AbstractBufferedFile
from ray.data import Dataset, Datasource, ReadTask, read_datasource
from ray.data.block import BlockMetadata

from .storage import Listing, list_files, storage_step

KEY_VERSION = "janus-pipeline/1"
KEY_CHARS = 20
MAX_SAMPLES_PER_PROMPT = 10_000
MAX_ERROR_TEXT = 2000  # a failed row keeps at most this much of the offending line
SEED_LIMIT = 2**63

PROMPT_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
IMAGE_FORMATS = ("images", "parquet", "webdataset")  # "images": image files
DEFAULT_MAX_IMAGE_BYTES = 128 * 2**20

# Errors that say the file itself is bad (a failed row), as opposed to transient I/O (re-raised).
# ValueError covers pyarrow's ArrowInvalid (corrupt parquet) and decoding errors.
_BAD_FILE_ERRORS = (
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

PROMPT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("cfg_weight", pa.float64()),
        ("temperature", pa.float64()),
        ("source", pa.string()),
        ("index", pa.int64()),
        ("sample", pa.int32()),
        ("id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)

IMAGE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("image_bytes", pa.binary()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class PromptDefaults:
    """Job-level generation settings; jsonl/csv/parquet rows may set their own seed, cfg_weight,
    temperature and n_samples."""

    seed: int = 0  # the job seed: part of every key and derived seed
    cfg_weight: float = 5.0
    temperature: float = 1.0
    n_samples: int = 1


# ---------------------------------------------------------------------------------------------
# prompt records: one per input line / row, parsed without raising


@dataclass
class _Record:
    index: int
    prompt: str | None
    error: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def _split_format(path: str) -> tuple[str | None, str | None]:
    """(format, compression) from the file name, e.g. ``a.jsonl.gz`` -> ("jsonl", "gzip")."""
    name = path.lower()
    compression = None
    for suffix, codec in COMPRESSIONS.items():
        if name.endswith(suffix):
            name, compression = name[: -len(suffix)], codec
            break
    return PROMPT_FORMATS.get(posixpath.splitext(name)[1]), compression


def _decode(raw: bytes) -> tuple[str, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        error = f"not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start})"
        return raw.decode("utf-8", "replace"), error


def _clip(text: str | None) -> str | None:
    return None if text is None else text[:MAX_ERROR_TEXT]


def _as_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _as_float(name: str, value: Any, low: float) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return float(value)


_OVERRIDES: dict[str, Callable[[str, Any], Any]] = {
    "seed": lambda n, v: _as_int(n, v, 0, SEED_LIMIT - 1),
    "cfg_weight": lambda n, v: _as_float(n, v, 0.0),
    "temperature": lambda n, v: _as_float(n, v, 0.0),
    "n_samples": lambda n, v: _as_int(n, v, 1, MAX_SAMPLES_PER_PROMPT),
    "id": lambda n, v: v if isinstance(v, str) else str(_as_int(n, v, -(2**63), 2**63 - 1)),
}


def _record(index: int, values: Mapping[str, Any], raw: str | None = None) -> _Record:
    """A record from a mapping (json object, csv row, parquet row); ``raw`` is shown on failure."""
    prompt = values.get("prompt")
    if isinstance(prompt, bytes):
        prompt, error = _decode(prompt)
        if error:
            return _Record(index, _clip(prompt), f"prompt is {error}")
    if prompt is None:
        return _Record(index, _clip(raw), "no 'prompt' value")
    if not isinstance(prompt, str):
        return _Record(index, _clip(raw), f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        return _Record(index, prompt, "empty prompt")
    overrides = {}
    for name, parse in _OVERRIDES.items():
        value = values.get(name)
        if value is None or value == "":
            continue
        try:
            overrides[name] = parse(name, value)
        except ValueError as exc:
            return _Record(index, _clip(prompt), str(exc))
    return _Record(index, prompt, None, overrides)


def _lines(f: io.IOBase) -> Iterator[tuple[int, str | None, str | None]]:
    """(index, text, error) per line; line endings and a leading UTF-8 BOM removed."""
    for index, raw in enumerate(f):
        raw = raw.rstrip(b"\n").rstrip(b"\r")
        if index == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        text, error = _decode(raw)
        yield index, text, (f"line is {error}" if error else None)


def _txt_records(f: io.IOBase) -> Iterator[_Record]:
    for index, text, error in _lines(f):
        if error:
            yield _Record(index, _clip(text), error)
        elif not text.strip():
            yield _Record(index, text, "empty prompt")
        else:
            yield _Record(index, text)


def _jsonl_records(f: io.IOBase) -> Iterator[_Record]:
    for index, text, error in _lines(f):
        if error:
            yield _Record(index, _clip(text), error)
            continue
        if not text.strip():
            yield _Record(index, text, "empty line")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield _Record(index, _clip(text), f"malformed JSON: {exc}")
            continue
        if not isinstance(obj, dict):
            yield _Record(index, _clip(text), "a JSON line must be an object with a 'prompt' field")
            continue
        yield _record(index, obj, text)


def _csv_records(f: io.IOBase) -> Iterator[_Record]:
    # surrogateescape keeps going past bad bytes; they are found per row below.
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    header = [name.strip() for name in next(reader, [])]
    if "prompt" not in header:
        yield _Record(0, None, f"CSV header has no 'prompt' column (columns: {header})")
        return
    index = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield _Record(index, None, f"malformed CSV row: {exc}")
            index += 1
            continue
        raw = ",".join(fields).encode("utf-8", "surrogateescape")
        decoded, error = _decode(raw)
        if error:
            yield _Record(index, _clip(decoded), f"row is {error}")
        elif not fields:
            yield _Record(index, "", "empty line")
        elif len(fields) != len(header):
            yield _Record(index, _clip(decoded), f"row has {len(fields)} fields, the header {len(header)}")
        else:
            yield _record(index, dict(zip(header, fields, strict=True)), decoded)
        index += 1


def _parquet_records(f: io.IOBase) -> Iterator[_Record]:
    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    if "prompt" not in names:
        yield _Record(0, None, f"Parquet file has no 'prompt' column (columns: {names})")
        return
    columns = ["prompt", *(c for c in _OVERRIDES if c in names)]
    index = 0
    for batch in pf.iter_batches(batch_size=8192, columns=columns):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            yield _record(index, {c: data[c][i] for c in columns})
            index += 1


_PROMPT_READERS: dict[str, Callable[[io.IOBase], Iterator[_Record]]] = {
    "txt": _txt_records,
    "jsonl": _jsonl_records,
    "csv": _csv_records,
    "parquet": _parquet_records,
}


def _prompt_records(fs: AbstractFileSystem, path: str, fmt: str | None) -> Iterator[_Record]:
    inferred, compression = _split_format(path)
    fmt = inferred if fmt in (None, "auto") else fmt
    if fmt not in _PROMPT_READERS:
        raise ValueError(f"unknown prompt format for {path!r}: use one of {sorted(_PROMPT_READERS)}")
    index = 0
    try:
        with fs.open(path, "rb", compression=compression) as f:
            if fmt != "parquet" and isinstance(f, AbstractBufferedFile):
                # fsspec's own readline re-reads a whole block per line; BufferedReader reads it once.
                f = io.BufferedReader(f, 2**20)
            for record in _PROMPT_READERS[fmt](f):
                index = record.index + 1
                yield record
    except _BAD_FILE_ERRORS as exc:
        yield _Record(index, None, f"cannot read {fmt} file at record {index}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# prompt rows: records expanded to samples, with keys and seeds


def _digest(*parts: Any) -> bytes:
    material = json.dumps([KEY_VERSION, *parts], ensure_ascii=False)
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).digest()


def _prompt_rows(record: _Record, source: str, defaults: PromptDefaults) -> Iterator[dict[str, Any]]:
    o = record.overrides
    n_samples = 1 if record.error else o.get("n_samples", defaults.n_samples)
    row_seed = o.get("seed")
    for sample in range(n_samples):
        digest = _digest(defaults.seed, source, record.index, record.prompt or "", sample)
        derived = int.from_bytes(digest[16:24], "big") >> 1
        yield {
            "key": digest.hex()[:KEY_CHARS],
            "prompt": record.prompt,
            "seed": derived if row_seed is None else (row_seed + sample) % SEED_LIMIT,
            "cfg_weight": o.get("cfg_weight", defaults.cfg_weight),
            "temperature": o.get("temperature", defaults.temperature),
            "source": source,
            "index": record.index,
            "sample": sample,
            "id": o.get("id"),
            "status": "error" if record.error else None,
            "error": record.error,
        }


def read_prompt_file(
    fs: AbstractFileSystem, path: str, source: str, defaults: PromptDefaults, fmt: str | None = None
) -> Iterator[dict[str, Any]]:
    """Rows of one prompt file, streamed line by line (never the whole file in memory)."""
    for record in _prompt_records(fs, path, fmt):
        yield from _prompt_rows(record, source, defaults)


def _prompt_file_rows(
    fs: AbstractFileSystem, path: str, source: str, size: int, *, defaults: PromptDefaults, fmt: str | None
) -> Iterator[dict[str, Any]]:
    return read_prompt_file(fs, path, source, defaults, fmt)


def list_prompt_files(url: str, storage_options: dict | None = None, fmt: str | None = None) -> Listing:
    """Prompt files under ``url``; without ``fmt`` only known extensions (.txt, .jsonl, ...) count."""
    fmt = None if fmt == "auto" else fmt
    if fmt is not None and fmt not in _PROMPT_READERS:
        raise ValueError(f"unknown prompt format {fmt!r}: use 'auto' or one of {sorted(_PROMPT_READERS)}")
    suffixes = None if fmt else [e + c for e in PROMPT_FORMATS for c in ("", *COMPRESSIONS)]
    return list_files(url, storage_options, suffixes)


def read_prompts(
    url: str,
    storage_options: dict | None = None,
    defaults: PromptDefaults = PromptDefaults(),
    fmt: str | None = None,
) -> Iterator[dict[str, Any]]:
    """All prompt rows under ``url`` in file order, in this process (small inputs, tests, tools)."""
    listing = list_prompt_files(url, storage_options, fmt)
    for path in listing.paths:
        yield from read_prompt_file(listing.fs, path, listing.relative(path), defaults, fmt)


# ---------------------------------------------------------------------------------------------
# image rows for captioning


def _image_key(*parts: Any) -> str:
    return _digest(*parts).hex()[:KEY_CHARS]


def _image_row(key: str, source: str, data: bytes | None, error: str | None = None) -> dict[str, Any]:
    return {
        "key": key,
        "source": source,
        "image_bytes": None if error else data,
        "status": "error" if error else None,
        "error": error,
    }


def _too_big(size: int, max_bytes: int) -> str | None:
    return f"image is {size} bytes, over the limit of {max_bytes}" if size > max_bytes else None


def _image_file_rows(
    fs: AbstractFileSystem, path: str, source: str, size: int, *, max_bytes: int
) -> Iterator[dict[str, Any]]:
    key = _image_key("file", source)
    error = _too_big(size, max_bytes)
    if error:
        yield _image_row(key, source, None, error)
        return
    try:
        data = fs.cat_file(path)
    except _BAD_FILE_ERRORS as exc:
        yield _image_row(key, source, None, f"cannot read image file: {type(exc).__name__}: {exc}")
        return
    yield _image_row(key, source, data, None if data else "empty image file (0 bytes)")


def _parquet_image_rows(
    fs: AbstractFileSystem,
    path: str,
    source: str,
    size: int,
    *,
    max_bytes: int,
    image_column: str,
    key_column: str | None,
) -> Iterator[dict[str, Any]]:
    index = 0
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            missing = [c for c in (image_column, key_column) if c and c not in pf.schema_arrow.names]
            if missing:
                yield _image_row(
                    _image_key("parquet", source, "columns"),
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
                    key = str(user_key) if user_key is not None else _image_key("parquet", source, index)
                    where = f"{source}#{index}"
                    if not value:
                        yield _image_row(key, where, None, f"no image bytes in column {image_column!r}")
                    else:
                        yield _image_row(key, where, value, _too_big(len(value), max_bytes))
                    index += 1
    except _BAD_FILE_ERRORS as exc:
        key = _image_key("parquet", source, "error", index)
        yield _image_row(
            key, f"{source}#{index}", None, f"cannot read Parquet file: {type(exc).__name__}: {exc}"
        )


def _tar_image_rows(
    fs: AbstractFileSystem, path: str, source: str, size: int, *, max_bytes: int
) -> Iterator[dict[str, Any]]:
    """WebDataset samples: consecutive members sharing the name before the first dot of the basename."""
    sample_key: str | None = None
    image: bytes | None = None
    error: str | None = None
    seen: list[str] = []

    def flush() -> dict[str, Any]:
        where = f"{source}#{sample_key}"
        problem = error or (None if image is not None else f"sample has no image member (found: {seen})")
        return _image_row(_image_key("tar", source, sample_key), where, image, problem)

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
                    error = _too_big(member.size, max_bytes)
                    if error is None:
                        image = tar.extractfile(member).read()
            if sample_key is not None:
                yield flush()
    except _BAD_FILE_ERRORS as exc:
        key = _image_key("tar", source, "error", count)
        yield _image_row(
            key, f"{source}#{sample_key}", None, f"cannot read tar file: {type(exc).__name__}: {exc}"
        )


def list_image_inputs(
    url: str, storage_options: dict | None = None, fmt: str | None = None
) -> tuple[str, Listing]:
    """(format, files) for captioning input; the format is inferred when exactly one kind is present."""
    fmt = None if fmt == "auto" else fmt
    if fmt is not None and fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image input format {fmt!r}: use 'auto' or one of {IMAGE_FORMATS}")
    suffixes = {
        "images": tuple("." + e for e in IMAGE_EXTENSIONS),
        "parquet": (".parquet",),
        "webdataset": (".tar", ".tar.gz", ".tgz"),
    }
    if fmt is not None:
        return fmt, list_files(url, storage_options, suffixes[fmt])
    listing = list_files(url, storage_options, [s for group in suffixes.values() for s in group])
    kinds = {k for p in listing.paths for k, group in suffixes.items() if p.lower().endswith(group)}
    if len(kinds) > 1:
        raise ValueError(
            f"{url!r} holds several input kinds {sorted(kinds)}: set the input format explicitly"
        )
    return kinds.pop(), listing


def _image_file_reader(
    fmt: str, image_column: str, key_column: str | None, max_bytes: int
) -> Callable[[AbstractFileSystem, str, str, int], Iterator[dict[str, Any]]]:
    if fmt == "parquet":
        return functools.partial(
            _parquet_image_rows, max_bytes=max_bytes, image_column=image_column, key_column=key_column
        )
    return functools.partial(_image_file_rows if fmt == "images" else _tar_image_rows, max_bytes=max_bytes)


def read_images(
    url: str,
    storage_options: dict | None = None,
    fmt: str | None = None,
    image_column: str = "image",
    key_column: str | None = None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Iterator[dict[str, Any]]:
    """All image rows under ``url`` in file order, in this process (small inputs, tests, tools)."""
    fmt, listing = list_image_inputs(url, storage_options, fmt)
    reader = _image_file_reader(fmt, image_column, key_column, max_image_bytes)
    for path, size in zip(listing.paths, listing.sizes, strict=True):
        yield from reader(listing.fs, path, listing.relative(path), size)


# ---------------------------------------------------------------------------------------------
# Ray Data: the same readers as read tasks
#
# Ray's own read_text/read_json/read_csv cannot serve here: they give no line or row numbers (the
# key's identity) and fail the whole file on one bad UTF-8 byte or malformed line; likewise
# read_webdataset/read_binary_files fail on a truncated tar and give no per-sample error rows. So
# each read task streams its files through the readers above and yields Arrow blocks of bounded size.


class _FileRowsDatasource(Datasource):
    def __init__(
        self,
        name: str,
        listing: Listing,
        file_rows: Callable[[AbstractFileSystem, str, str, int], Iterator[dict[str, Any]]],
        schema: pa.Schema,
        rows_per_block: int,
        bytes_per_block: int,
    ):
        super().__init__()
        self._name = name
        self._listing = listing
        self._file_rows = file_rows
        self._schema = schema
        self._rows_per_block = rows_per_block
        self._bytes_per_block = bytes_per_block

    def get_name(self) -> str:
        return self._name

    def estimate_inmemory_data_size(self) -> int:
        return sum(self._listing.sizes)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        listing = self._listing
        groups = np.array_split(np.arange(len(listing.paths)), max(1, min(parallelism, len(listing.paths))))
        tasks = []
        for group in groups:
            files = [(listing.paths[i], listing.relative(listing.paths[i]), listing.sizes[i]) for i in group]
            meta = BlockMetadata(
                num_rows=None,
                size_bytes=sum(size for _, _, size in files),
                exec_stats=None,
                input_files=[path for path, _, _ in files],
            )
            # Each task carries only its own files, not the whole listing.
            read = functools.partial(
                _read_files,
                listing.fs,
                files,
                self._file_rows,
                self._schema,
                self._rows_per_block,
                self._bytes_per_block,
            )
            tasks.append(ReadTask(read, meta, schema=self._schema, per_task_row_limit=per_task_row_limit))
        return tasks


def _read_files(
    fs: AbstractFileSystem,
    files: list[tuple[str, str, int]],
    file_rows: Callable[[AbstractFileSystem, str, str, int], Iterator[dict[str, Any]]],
    schema: pa.Schema,
    rows_per_block: int,
    bytes_per_block: int,
) -> Iterator[pa.Table]:
    """One read task: stream its files' rows out as Arrow blocks of bounded rows and bytes."""
    rows: list[dict[str, Any]] = []
    nbytes = 0
    for path, source, size in files:
        with storage_step("read", fs.unstrip_protocol(path)):
            for row in file_rows(fs, path, source, size):
                rows.append(row)
                nbytes += len(row.get("image_bytes") or b"")
                if len(rows) >= rows_per_block or nbytes >= bytes_per_block:
                    yield pa.Table.from_pylist(rows, schema=schema)
                    rows, nbytes = [], 0
    if rows:
        yield pa.Table.from_pylist(rows, schema=schema)


def prompt_dataset(
    url: str,
    storage_options: dict | None = None,
    defaults: PromptDefaults = PromptDefaults(),
    fmt: str | None = None,
    *,
    rows_per_block: int = 4096,
    override_num_blocks: int | None = None,
) -> Dataset:
    """Streaming Ray Dataset of prompt rows (``PROMPT_SCHEMA``); files are split across read tasks."""
    listing = list_prompt_files(url, storage_options, fmt)
    file_rows = functools.partial(_prompt_file_rows, defaults=defaults, fmt=fmt)
    source = _FileRowsDatasource("Prompts", listing, file_rows, PROMPT_SCHEMA, rows_per_block, 2**62)
    return read_datasource(source, override_num_blocks=override_num_blocks)


def image_dataset(
    url: str,
    storage_options: dict | None = None,
    fmt: str | None = None,
    image_column: str = "image",
    key_column: str | None = None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    *,
    rows_per_block: int = 256,
    bytes_per_block: int = 64 * 2**20,
    override_num_blocks: int | None = None,
) -> Dataset:
    """Streaming Ray Dataset of image rows (``IMAGE_SCHEMA``): raw bytes, decoded later on CPU workers."""
    fmt, listing = list_image_inputs(url, storage_options, fmt)
    reader = _image_file_reader(fmt, image_column, key_column, max_image_bytes)
    source = _FileRowsDatasource("Images", listing, reader, IMAGE_SCHEMA, rows_per_block, bytes_per_block)
    return read_datasource(source, override_num_blocks=override_num_blocks)
