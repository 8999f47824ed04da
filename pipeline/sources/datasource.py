"""Ray Data plumbing: the file readers of ``prompt_files`` and ``image_files`` as streaming read tasks.

Ray's own read_text/read_json/read_csv cannot serve here: they give no line or row numbers (the
key's identity) and fail the whole file on one bad UTF-8 byte or malformed line; likewise
read_webdataset/read_binary_files fail on a truncated tar and give no per-sample error rows. So
each read task streams its files through our readers and yields Arrow blocks of bounded size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from fsspec import AbstractFileSystem
from ray.data import Dataset, Datasource, ReadTask, read_datasource
from ray.data.block import BlockMetadata

from ..storage import Listing, storage_step
from .image_files import IMAGE_SCHEMA, image_file_reader, list_image_inputs
from .prompt_files import PROMPT_SCHEMA, PromptDefaults, list_prompt_files, prompt_file_rows


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
    listing: Listing | None = None,
) -> Dataset:
    """Streaming Ray Dataset of prompt rows (``PROMPT_SCHEMA``); files are split across read tasks.
    ``listing``: the files of ``url``, when the caller has listed them already."""
    listing = listing or list_prompt_files(url, storage_options, fmt)
    file_rows = functools.partial(prompt_file_rows, defaults=defaults, fmt=fmt)
    source = _FileRowsDatasource("Prompts", listing, file_rows, PROMPT_SCHEMA, rows_per_block, 2**62)
    return read_datasource(source, override_num_blocks=override_num_blocks)


def image_dataset(
    url: str,
    storage_options: dict | None = None,
    fmt: str | None = None,
    *,
    rows_per_block: int = 256,
    bytes_per_block: int = 64 * 2**20,
    override_num_blocks: int | None = None,
    listing: Listing | None = None,
    **columns: Any,
) -> Dataset:
    """Streaming Ray Dataset of image rows (``IMAGE_SCHEMA``): raw bytes, decoded later on CPU workers.
    ``listing``: the files of ``url`` when the caller has listed them already (``fmt`` then concrete);
    ``columns``: ``image_column``, ``key_column``, ``max_image_bytes`` as ``read_images`` takes them."""
    if listing is None:
        fmt, listing = list_image_inputs(url, storage_options, fmt)
    reader = image_file_reader(fmt, **columns)
    source = _FileRowsDatasource("Images", listing, reader, IMAGE_SCHEMA, rows_per_block, bytes_per_block)
    return read_datasource(source, override_num_blocks=override_num_blocks)
