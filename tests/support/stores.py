"""One storage API for tests that run the same checks on a local directory and on S3 (moto)."""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass

import fsspec

from pipeline import storage


def new_bucket(s3_options: dict, prefix: str = "test") -> str:
    """A fresh bucket on the moto server, so that no test sees another's objects."""
    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", **s3_options).mkdir(bucket)
    return bucket


@dataclass
class Store:
    root: str  # URL of this test's private directory / bucket prefix
    options: dict | None

    def url(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def put(self, name: str, data: bytes) -> str:
        fs, path = storage.open_fs(self.url(name), self.options)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.pipe_file(path, data)
        return self.url(name)

    def get(self, name: str) -> bytes:
        fs, path = storage.open_fs(self.url(name), self.options)
        fs.invalidate_cache()
        return fs.cat_file(path)

    def names(self) -> list[str]:
        fs, path = storage.open_fs(self.root, self.options)
        fs.invalidate_cache()
        return sorted(posixpath.basename(p) for p in fs.find(path))


def s3_store(s3_options: dict) -> Store:
    """A Store under a new bucket."""
    return Store(f"s3://{new_bucket(s3_options)}/data", s3_options)
