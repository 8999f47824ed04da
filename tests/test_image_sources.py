"""Image sources: image files, Parquet with an image column and WebDataset tars -> keyed rows."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.sources.image_files import list_image_inputs, read_images
from tests.support.inputs import encode, image, tar_bytes


def test_image_files_source(store):
    png, jpg = encode(image(), "PNG"), encode(image(), "JPEG")
    store.put("imgs/a.png", png)
    store.put("imgs/sub/b.jpg", jpg)
    store.put("imgs/empty.webp", b"")
    store.put("imgs/notes.txt", b"ignored")
    rows = list(read_images(store.url("imgs"), store.options))
    assert [(r["source"], r["status"]) for r in rows] == [
        ("a.png", "ok"),
        ("empty.webp", "error"),
        ("sub/b.jpg", "ok"),
    ]
    assert rows[0]["image_bytes"] == png and rows[2]["image_bytes"] == jpg
    assert all(r["source_key"] is None for r in rows)  # image files have no key of their own
    assert rows[1]["image_bytes"] is None and "0 bytes" in rows[1]["error"]
    assert rows == list(read_images(store.url("imgs"), store.options))
    _, listing = list_image_inputs(store.url("imgs"), store.options)
    assert [listing.relative(p) for p in listing.skipped] == ["notes.txt"]  # counted in the job summary
    big = list(read_images(store.url("imgs"), store.options, max_image_bytes=min(len(png), len(jpg)) - 1))
    assert [r["status"] == "error" and "over the limit" in r["error"] for r in big] == [True, False, True]


def test_parquet_image_source(store):
    png = encode(image(), "PNG")
    table = pa.table(
        {
            "img": [png, None, png],
            "hf": [
                {"bytes": png, "path": "x.png"},
                {"bytes": png, "path": None},
                {"bytes": None, "path": "y"},
            ],
            "id": ["u1", "u2", None],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.put("in/images.parquet", buf.getvalue())
    rows = list(read_images(store.url("in"), store.options, image_column="img", key_column="id"))
    assert [(r["key"], r["source"], r["status"]) for r in rows][:2] == [
        ("u1", "images.parquet#0", "ok"),
        ("u2", "images.parquet#1", "error"),
    ]
    assert rows[2]["key"] not in ("u1", "u2") and rows[2]["image_bytes"] == png  # null key: derived
    assert [r["source_key"] for r in rows] == ["u1", "u2", None]  # the user's keys, where given
    hf = list(read_images(store.url("in"), store.options, fmt="parquet", image_column="hf"))
    assert [r["status"] for r in hf] == ["ok", "ok", "error"] and hf[0]["image_bytes"] == png
    assert len({r["key"] for r in hf}) == 3
    missing = list(read_images(store.url("in"), store.options, image_column="nope"))
    assert len(missing) == 1 and "no column ['nope']" in missing[0]["error"]


def test_webdataset_source(store):
    jpg = encode(image(), "JPEG")
    members = [("s/000.jpg", jpg), ("s/000.json", b"{}"), ("s/001.png", jpg), ("s/002.txt", b"no image")]
    store.put("wds/shard-0.tar", tar_bytes(members))
    store.put("wds/shard-1.tar", tar_bytes(members[:2]))
    store.put("wds/shard-2.tar", tar_bytes(members)[:1000])  # truncated inside the first image
    rows = list(read_images(store.url("wds"), store.options))
    summary = [(r["source"], r["status"]) for r in rows]
    assert summary[:4] == [
        ("shard-0.tar#s/000", "ok"),
        ("shard-0.tar#s/001", "ok"),
        ("shard-0.tar#s/002", "error"),
        ("shard-1.tar#s/000", "ok"),
    ]
    assert "no image member" in rows[2]["error"] and rows[0]["image_bytes"] == jpg
    assert [r["source_key"] for r in rows[:4]] == ["s/000", "s/001", "s/002", "s/000"]  # the sample's key
    assert rows[0]["key"] != rows[3]["key"]  # same member key in two tars: different keys
    assert [r["status"] for r in rows[4:]] == ["error"] and "cannot read tar" in rows[4]["error"]
    assert rows == list(read_images(store.url("wds"), store.options))


def test_mixed_image_inputs_need_a_format(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(image(), "PNG"))
    (tmp_path / "b.tar").write_bytes(tar_bytes([("x.png", b"")]))
    with pytest.raises(ValueError, match="set the input format"):
        list(read_images(str(tmp_path)))
    assert [r["source"] for r in read_images(str(tmp_path), fmt="images")] == ["a.png"]
    with pytest.raises(ValueError, match="unknown image input format 'files'"):
        list(read_images(str(tmp_path), fmt="files"))


def test_the_tar_keeps_jpeg_and_png_bytes_and_reencodes_the_rest():
    from pipeline.images import decode_image, stored_image

    for fmt, kept in (("JPEG", True), ("PNG", True), ("WEBP", False), ("GIF", False), ("BMP", False)):
        data = encode(image(), fmt)
        stored, reencoded = stored_image(data, decode_image(data))
        if kept:
            assert (stored, reencoded) == (data, None), fmt
        else:
            assert reencoded == fmt.lower() and stored.startswith(b"\x89PNG"), fmt
            assert decode_image(stored).tobytes() == decode_image(data).tobytes()  # what the model saw
