"""Prompt files -> prompt rows (txt, jsonl, csv, parquet; optionally compressed), parsed without raising.

Every line or data row becomes a row with a deterministic key and seed (``keys.py``). A bad record
never raises: it becomes one row with ``status="error"`` and an ``error`` message, written later as a
failed output row (whatever ``n_samples`` says). Only transient I/O errors raise, so that Ray retries
the read. A row's ``id`` is carried through, never hashed: user ids may repeat.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.spec import AbstractBufferedFile

from janus.engine.checks import Rule, check
from janus.engine.prompts import DEFAULT_CFG_WEIGHT, DEFAULT_TEMPERATURE

from ..storage import BAD_FILE_ERRORS, Listing, list_files
from .keys import N_SAMPLES, keyed_schema, prompt_key_and_seed

MAX_ERROR_TEXT = 2000  # a failed row keeps at most this much of the offending line
PROMPT_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}

PROMPT_SCHEMA = keyed_schema(
    ("prompt", pa.string()),
    ("seed", pa.int64()),
    ("cfg_weight", pa.float64()),
    ("temperature", pa.float64()),
    ("source", pa.string()),
    ("index", pa.int64()),
    ("sample", pa.int32()),
    ("id", pa.string()),
)


@dataclass(frozen=True)
class PromptDefaults:
    """Job-level generation settings; jsonl/csv/parquet rows may set their own seed, cfg_weight,
    temperature and n_samples."""

    seed: int = 0  # the job seed: part of every key and derived seed
    cfg_weight: float = DEFAULT_CFG_WEIGHT
    temperature: float = DEFAULT_TEMPERATURE
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


_ID = Rule(int, ge=-(2**63), lt=2**63)  # an integer id is kept as its digits (Parquet ids are int64)


#: a row's own settings, each checked by the one rule its field has (``janus.engine.checks``)
_OVERRIDES: dict[str, Callable[[str, Any], Any]] = {
    "seed": check,
    "cfg_weight": check,
    "temperature": check,
    "n_samples": N_SAMPLES.check,
    "id": lambda n, v: v if isinstance(v, str) else str(_ID.check(n, v)),
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
    overrides: dict[str, Any] = {}
    if len(values) == 1:  # only the prompt: nothing to override (the usual jsonl line)
        return _Record(index, prompt, None, overrides)
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


#: format -> its record reader (the formats ``input.format`` takes for synthesis, with ``auto``)
PROMPT_READERS: dict[str, Callable[[io.IOBase], Iterator[_Record]]] = {
    "txt": _txt_records,
    "jsonl": _jsonl_records,
    "csv": _csv_records,
    "parquet": _parquet_records,
}


def _prompt_records(fs: AbstractFileSystem, path: str, fmt: str | None) -> Iterator[_Record]:
    inferred, compression = _split_format(path)
    fmt = inferred if fmt in (None, "auto") else fmt
    if fmt not in PROMPT_READERS:
        raise ValueError(f"unknown prompt format for {path!r}: use one of {sorted(PROMPT_READERS)}")
    index = 0
    try:
        with fs.open(path, "rb", compression=compression) as f:
            if fmt != "parquet" and isinstance(f, AbstractBufferedFile):
                # fsspec's own readline re-reads a whole block per line; BufferedReader reads it once.
                f = io.BufferedReader(f, 2**20)
            for record in PROMPT_READERS[fmt](f):
                index = record.index + 1
                yield record
    except BAD_FILE_ERRORS as exc:
        yield _Record(index, None, f"cannot read {fmt} file at record {index}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# prompt rows: records expanded to samples, with keys and seeds


def _prompt_rows(record: _Record, source: str, defaults: PromptDefaults) -> Iterator[dict[str, Any]]:
    o = record.overrides
    n_samples = 1 if record.error else o.get("n_samples", defaults.n_samples)
    for sample in range(n_samples):
        key, seed = prompt_key_and_seed(
            defaults.seed, source, record.index, record.prompt or "", sample, o.get("seed")
        )
        yield {
            "key": key,
            "prompt": record.prompt,
            "seed": seed,
            "cfg_weight": o.get("cfg_weight", defaults.cfg_weight),
            "temperature": o.get("temperature", defaults.temperature),
            "source": source,
            "index": record.index,
            "sample": sample,
            "id": o.get("id"),
            "status": "error" if record.error else "ok",
            "error": record.error,
        }


def read_prompt_file(
    fs: AbstractFileSystem, path: str, source: str, defaults: PromptDefaults, fmt: str | None = None
) -> Iterator[dict[str, Any]]:
    """Rows of one prompt file, streamed line by line (never the whole file in memory)."""
    for record in _prompt_records(fs, path, fmt):
        yield from _prompt_rows(record, source, defaults)


def prompt_file_rows(
    fs: AbstractFileSystem, path: str, source: str, size: int, *, defaults: PromptDefaults, fmt: str | None
) -> Iterator[dict[str, Any]]:
    return read_prompt_file(fs, path, source, defaults, fmt)


def list_prompt_files(url: str, storage_options: dict | None = None, fmt: str | None = None) -> Listing:
    """Prompt files under ``url``; without ``fmt`` only known extensions (.txt, .jsonl, ...) count."""
    fmt = None if fmt == "auto" else fmt
    if fmt is not None and fmt not in PROMPT_READERS:
        raise ValueError(f"unknown prompt format {fmt!r}: use 'auto' or one of {sorted(PROMPT_READERS)}")
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




def count_prompt_rows(fs: AbstractFileSystem, path: str, n_samples: int, fmt: str | None = None) -> tuple[int, int]:
    """(rows, bad lines) of one prompt file: what ``read_prompt_file`` yields, counted without making
    keys (a job's plan counts millions of prompts). A bad line is one error row."""
    rows = bad = 0
    for record in _prompt_records(fs, path, fmt):
        bad += record.error is not None
        rows += 1 if record.error else record.overrides.get("n_samples", n_samples)
    return rows, bad
