"""Shard sinks and resume: tar + Parquet shards readable by other tools (webdataset, pyarrow, duckdb),
idempotent rewrites, invisible uncommitted shards, the resume filter and the duplicate check."""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import random
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import sinks
from pipeline.columns import ColumnError, OutputColumns
from pipeline.output import OutputDir, filter_committed
from pipeline.sources.keys import packed_keys
from tests.support.inputs import png_bytes
from tests.support.rows import model_row, write_rows
from tests.support.stores import Store


def _results(n: int, seed: int = 0, fail: tuple[int, ...] = ()) -> list[dict]:
    """Synthesis results as an actor would return them: prompt rows plus a uint8 image."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = model_row(**{
            "key": hashlib.sha1(f"{seed}-{i}".encode()).hexdigest()[:20],
            "prompt": f"prompt {i}",
            "seed": i,
            "cfg_weight": 5.0,
            "temperature": 1.0,
            "source": "p.txt",
            "index": np.int64(i),
            "sample": 0,
            "status": None,
            "error": None,
            "image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            "model": "tiny",
            "seconds": 0.25,
        })  # fmt: skip
        if i in fail:
            row.update(status="error", error="out of memory", image=None)
        rows.append(row)
    return rows


def _local_copy(store: Store, name: str, tmp_path: Path) -> str:
    path = tmp_path / name
    path.write_bytes(store.get(name))
    return str(path)


def test_write_shard_synthesis_readable_by_other_tools(store, tmp_path):
    import webdataset as wds

    rows = _results(6, fail=(1,))
    rows[2]["image"] = png_bytes(rows[2]["image"])  # PNG bytes are stored as they are
    rows[3]["image"] = np.zeros((4, 4), np.float32)  # unusable: a failed row, not an exception
    rows[5]["image"] = sinks.PNG_MAGIC + b"not really"
    stats = write_rows(rows, store.root, store.options)
    shard = stats["shard"]
    assert shard == sinks.shard_name(r["key"] for r in rows)
    assert store.names() == [f"{shard}.parquet", f"{shard}.tar", f"{shard}_stats.json"]
    assert (stats["count"], stats["ok"], stats["failed"]) == (6, 3, 3)
    assert stats["seconds"] == pytest.approx(1.5)
    assert json.loads(store.get(f"{shard}_stats.json")) == stats

    table = pq.read_table(_local_copy(store, f"{shard}.parquet", tmp_path))
    assert table.schema == sinks.SYNTHESIS_SCHEMA
    got = table.to_pylist()
    assert [r["key"] for r in got] == sorted(r["key"] for r in rows)
    by_key = {r["key"]: r for r in got}
    assert by_key[rows[1]["key"]]["status"] == "error" and by_key[rows[1]["key"]]["error"] == "out of memory"
    assert "cannot store image: image must be" in by_key[rows[3]["key"]]["error"]
    assert "cannot store image: not a readable" in by_key[rows[5]["key"]]["error"]
    assert by_key[rows[0]["key"]]["member"] == f"{rows[0]['key']}.png"
    assert by_key[rows[0]["key"]]["model"] == "tiny" and by_key[rows[0]["key"]]["seconds"] == 0.25

    samples = list(wds.WebDataset(_local_copy(store, f"{shard}.tar", tmp_path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == sorted(rows[i]["key"] for i in (0, 2, 4))
    for s in samples:
        src = next(r for r in _results(6) if r["key"] == s["__key__"])
        assert np.array_equal(np.asarray(PIL.Image.open(io.BytesIO(s["png"]))), src["image"])
        meta = json.loads(s["json"])
        assert meta["prompt"] == src["prompt"] and meta["width"] == meta["height"] == 16

    duckdb = pytest.importorskip("duckdb")
    ((ok, failed),) = duckdb.sql(
        "select count(*) filter (status = 'ok'), count(*) filter (status = 'error') "
        f"from read_parquet('{tmp_path / (shard + '.parquet')}')"
    ).fetchall()
    assert (ok, failed) == (3, 3)


def test_numpy_values_and_nan_are_stored_as_plain_values_and_nulls(tmp_path):
    """The sink's fast path passes str/int/None through untouched; everything else is normalised:
    numpy scalars and arrays become Python values, NaN becomes null, in the Parquet file and the tar."""
    import webdataset as wds

    rows = _results(3, fail=(2,))
    rows[0].update(seconds=float("nan"), score=np.float32(0.5), scores=np.array([0.5, 0.25], np.float32))
    rows[1].update(seed=np.int64(7), cfg_weight=np.float64(4.5), seconds=np.float64("nan"), phash=np.uint64(9))
    rows[2].update(seconds=np.float32(0.5), score=0.9)  # a failed row keeps no result columns
    stats = write_rows(rows, str(tmp_path))
    got = {r["key"]: r for r in pq.read_table(tmp_path / f"{stats['shard']}.parquet").to_pylist()}
    first, second, failed = (got[r["key"]] for r in rows)
    assert first["seconds"] is None and first["score"] == 0.5 and first["scores"] == [0.5, 0.25]
    assert (second["seed"], second["cfg_weight"], second["seconds"], second["phash"]) == (7, 4.5, None, 9)
    assert failed["seconds"] == 0.5 and failed["score"] is None and failed["status"] == "error"
    assert stats["seconds"] == pytest.approx(0.5)
    metas = {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(str(tmp_path / f"{stats['shard']}.tar"), shardshuffle=False)}
    assert metas[rows[0]["key"]]["seconds"] is None and metas[rows[1]["key"]]["seed"] == 7


def test_write_shard_is_idempotent(store):
    rows = _results(6, fail=(2,))
    first = write_rows(rows, store.root, store.options)
    before = {n: store.get(n) for n in store.names()}
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert write_rows(shuffled, store.root, store.options) == first
    assert {n: store.get(n) for n in store.names()} == before


def test_caption_shard(store, tmp_path):
    rows = [
        model_row("caption", key="k1", source="a.jpg", caption="a cat", question="Describe.", num_tokens=3),
        model_row("caption", key="k/2", source="b.jpg", status="error", error="not a readable image"),
        model_row("caption", key="k3", source="c.jpg", caption=None),
    ]
    stats = write_rows(pa.Table.from_pylist(rows), store.root, store.options, OutputColumns("caption"))
    assert "tar" not in stats["files"] and (stats["ok"], stats["failed"]) == (1, 2)
    assert store.names() == [f"{stats['shard']}.parquet", f"{stats['shard']}_stats.json"]
    got = pq.read_table(_local_copy(store, f"{stats['shard']}.parquet", tmp_path)).to_pylist()
    assert [(r["key"], r["status"], r["caption"]) for r in got] == [
        ("k/2", "error", None),
        ("k1", "ok", "a cat"),
        ("k3", "error", None),
    ]
    assert got[2]["error"] == "result has no caption text"


def test_write_shard_rejects_broken_batches(tmp_path):
    rows = _results(2)
    with pytest.raises(ValueError, match="duplicate keys"):
        write_rows([rows[0], rows[0]], str(tmp_path))
    with pytest.raises(ValueError, match="non-empty string 'key'"):
        write_rows([model_row(prompt="x")], str(tmp_path))
    with pytest.raises(ValueError, match="WebDataset member names"):
        write_rows([{**rows[0], "key": "a.b"}], str(tmp_path))
    with pytest.raises(ValueError, match="unknown output kind"):
        write_rows(rows, str(tmp_path), columns=OutputColumns("video"))
    assert write_rows([], str(tmp_path))["count"] == 0
    assert list(tmp_path.iterdir()) == []


def test_crash_before_commit_is_invisible_and_cleaned(store, monkeypatch):
    done = _results(4, seed=1)
    committed = write_rows(done, store.root, store.options)
    batch = _results(3, seed=2)

    def crash(self):
        raise RuntimeError("worker killed")

    monkeypatch.setattr(sinks.ParquetShardWriter, "close", crash)
    with pytest.raises(RuntimeError, match="worker killed"):
        write_rows(batch, store.root, store.options)
    monkeypatch.undo()
    orphan = sinks.shard_name(r["key"] for r in batch)
    leftover = store.put(f".{orphan}.parquet.0123.tmp", b"half a file")  # a killed local write
    assert f"{orphan}.tar" in store.names() and f"{orphan}.parquet" not in store.names()

    assert OutputDir(store.root, store.options).committed_shards == [committed["shard"]]
    assert OutputDir(store.root, store.options).key_set() == {r["key"] for r in done}
    removed = OutputDir(store.root, store.options).cleanup()
    assert sorted(posixpath.basename(p) for p in removed) == sorted(
        [f"{orphan}.tar", f"{orphan}_stats.json", posixpath.basename(leftover)]
    )
    assert store.names() == sorted(sinks.shard_files(committed["shard"]).values())

    write_rows(batch, store.root, store.options)  # the rerun
    assert OutputDir(store.root, store.options).key_set() == {r["key"] for r in done + batch}
    assert OutputDir(store.root, store.options).duplicates() == {}
    assert OutputDir(store.root, store.options).totals() == {
        "shards": 2,
        "count": 7,
        "ok": 7,
        "failed": 0,
        "filtered": 0,
    }


def test_resume_filter_and_duplicate_check(store):
    a, b = _results(5, seed=3), _results(5, seed=4)
    assert OutputDir(store.url("nothing-yet"), store.options).committed_keys().size == 0
    assert OutputDir(store.url("nothing-yet"), store.options).cleanup() == []
    sa = write_rows(a[:3], store.root, store.options)
    committed = OutputDir(store.root, store.options).committed_keys()
    assert committed.tolist() == sorted(packed_keys(pa.array([r["key"] for r in a[:3]])).tolist())
    table = pa.table({"key": [r["key"] for r in a + b], "n": list(range(10))})
    kept = filter_committed(table, committed)
    assert kept.column("n").to_pylist() == [3, 4, 5, 6, 7, 8, 9]

    sb = write_rows(a[2:4], store.root, store.options)  # overlaps a[2]: a duplicate
    assert OutputDir(store.root, store.options).duplicates() == {
        a[2]["key"]: sorted([sa["shard"], sb["shard"]])
    }


def test_a_batch_must_have_exactly_the_declared_columns(tmp_path):
    """A missing declared column or an undeclared one fails the write, naming the column, instead of
    a column of nulls or a silently dropped one; nothing is written."""
    rows = _results(2)
    with pytest.raises(ColumnError, match=r"returned no column 'phash'.*compute\.actor_class"):
        write_rows([{k: v for k, v in r.items() if k != "phash"} for r in rows], str(tmp_path))
    with pytest.raises(ColumnError, match="returned a column 'tokens' that is not declared"):
        write_rows([{**r, "tokens": [1, 2]} for r in rows], str(tmp_path))
    with pytest.raises(ColumnError, match="returned no column 'rating_aesthetic'"):
        write_rows(rows, str(tmp_path), columns=OutputColumns("synthesis", ratings=("aesthetic",)))
    caption = OutputColumns("caption")
    with pytest.raises(ColumnError, match="no column 'caption'.*a column 'prompt' that is not declared"):
        write_rows(rows, str(tmp_path), columns=caption)  # synthesis rows into a caption output
    assert list(tmp_path.iterdir()) == []


def _members(path: Path) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_synthesis_tars_hold_the_prompt_and_rows_the_recipe(tmp_path):
    rows = _results(2)
    stats = write_rows(rows, str(tmp_path))
    members = _members(tmp_path / f"{stats['shard']}.tar")
    key = rows[0]["key"]
    assert {f"{key}.png", f"{key}.txt", f"{key}.json"} <= set(members)
    assert members[f"{key}.txt"].decode() == rows[0]["prompt"]
    meta = json.loads(members[f"{key}.json"])
    parquet = pq.read_table(tmp_path / f"{stats['shard']}.parquet").to_pylist()[0]
    for name in ("weights", "version", "dtype", "top_k", "top_p", "speculative", "speculative_window"):
        assert name in meta and meta[name] == parquet[name], name
    assert (meta["weights"], meta["speculative"], meta["speculative_window"]) == ("sha256:test", "off", None)
    with pytest.raises(ColumnError, match="recipe columns lack"):
        sinks.write_shard(rows, str(tmp_path / "other"))  # no recipe values: refused, not nulls


def test_caption_tars_on_request(tmp_path):
    """``output.write_images``: the source image (JPEG or PNG bytes as they came), the caption as
    ``.txt`` and the row as ``.json``; a row whose image or key cannot go into the tar is an error row."""
    from tests.support.inputs import encode, image

    caption = OutputColumns("caption")
    jpg, png = encode(image(), "JPEG"), encode(image(), "PNG")
    rows = [
        model_row(caption, key="k1", source="a.jpg", caption="a cat", image=jpg, source_key="s/1"),
        model_row(caption, key="k2", source="b.gif", caption="a dog", image=png, reencoded_from="gif"),
        model_row(caption, key="k3", source="c.bmp", caption="odd", image=b"BM not a kept format"),
        model_row(caption, key="k.4", source="d.png", caption="dotted key", image=png),
        model_row(caption, key="k5", source="e.png", status="error", error="cannot decode"),
    ]
    stats = write_rows(rows, str(tmp_path), columns=caption, tar=True)
    members = _members(tmp_path / f"{stats['shard']}.tar")
    assert sorted(members) == ["k1.jpg", "k1.json", "k1.txt", "k2.json", "k2.png", "k2.txt"]
    assert members["k1.jpg"] == jpg and members["k2.png"] == png and members["k1.txt"] == b"a cat"
    assert json.loads(members["k2.json"])["reencoded_from"] == "gif"
    got = {r["key"]: r for r in pq.read_table(tmp_path / f"{stats['shard']}.parquet").to_pylist()}
    assert (got["k1"]["member"], got["k1"]["source_key"], got["k2"]["member"]) == ("k1.jpg", "s/1", "k2.png")
    assert got["k3"]["status"] == "error" and "JPEG or PNG" in got["k3"]["error"] and got["k3"]["caption"] is None
    assert got["k.4"]["status"] == "error" and "cannot name a WebDataset member" in got["k.4"]["error"]
    assert got["k5"]["member"] is None and got["k5"]["error"] == "cannot decode"
    assert (stats["ok"], stats["failed"]) == (2, 3)
    plain = write_rows(rows[:2], str(tmp_path / "parquet-only"), columns=caption)  # the default: no tar
    assert "tar" not in plain["files"] and not list((tmp_path / "parquet-only").glob("*.tar"))
