"""fsspec storage: atomic writes and input listing, on local files, S3 (moto) and memory."""

from __future__ import annotations

import os
import posixpath
import uuid

import pytest

from pipeline import storage


def test_atomic_write_local_replaces_and_leaves_no_temp(tmp_path):
    fs, path = storage.open_fs(f"file://{tmp_path}/out/x.bin")
    storage.atomic_write(fs, path, b"first")
    storage.atomic_write(fs, path, b"second")
    assert (tmp_path / "out" / "x.bin").read_bytes() == b"second"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.bin"]


def test_atomic_write_local_failure_leaves_nothing(tmp_path):
    fs, path = storage.open_fs(str(tmp_path / "y.bin"))
    with pytest.raises(TypeError):
        storage.atomic_write(fs, path, "not bytes")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["s3", "memory"])
def test_atomic_write_object_stores(kind, request):
    if kind == "s3":
        s = request.getfixturevalue("s3_store")
        url, options = s.url("deep/x.bin"), s.options
    else:
        url, options = f"memory://atomic-{uuid.uuid4().hex}/x.bin", None
    fs, path = storage.open_fs(url, options)
    storage.atomic_write(fs, path, b"one")
    storage.atomic_write(fs, path, b"two")
    assert fs.cat_file(path) == b"two"
    assert fs.ls(posixpath.dirname(path), detail=False) == [path]


def test_a_listings_fingerprint_changes_with_any_files_content(store):
    """What a finished job's rerun compares (``_complete.json``): a file rewritten to the same size
    (a new ETag on S3, a new mtime here), a file added or one renamed each change it."""
    store.put("a.txt", b"one\n")
    store.put("b.txt", b"two\n")
    first = storage.list_files(store.root, store.options)
    assert all(first.stamps) and first.fingerprint() == storage.list_files(store.root, store.options).fingerprint()
    seen = {first.fingerprint()}
    fs, path = storage.open_fs(store.url("b.txt"), store.options)
    written = fs.info(path).get("mtime")
    store.put("b.txt", b"TWO\n")
    if written is not None:  # a local clock may not tick between two writes: a later mtime, as a clock gives
        os.utime(path, (written + 5, written + 5))
    for change in (lambda: None, lambda: store.put("c.txt", b"3\n"), lambda: fs.mv(path, path + ".old.txt")):
        change()
        seen.add(storage.list_files(store.root, store.options).fingerprint())
    assert len(seen) == 4


def test_list_files_glob_directory_single(store):
    for name in ["a.txt", "sub/b.TXT", "c.csv", ".hidden.txt", "_SUCCESS", ".cache/d.txt"]:
        store.put(name, b"x\n")
    listing = storage.list_files(store.root, store.options, suffixes=[".txt"])
    assert [listing.relative(p) for p in listing.paths] == ["a.txt", "sub/b.TXT"]
    assert listing.sizes == (2, 2)
    listing = storage.list_files(store.url("*.txt"), store.options)
    assert [listing.relative(p) for p in listing.paths] == ["a.txt"]
    listing = storage.list_files(store.url("sub", "b.TXT"), store.options)
    assert [listing.relative(p) for p in listing.paths] == ["b.TXT"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.list_files(store.url("missing"), store.options)
    with pytest.raises(FileNotFoundError, match="no input files ending in .parquet"):
        storage.list_files(store.root, store.options, suffixes=[".parquet"])
