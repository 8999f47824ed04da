"""Pipeline I/O: prompt and image sources, safe decoding, shard sinks, resume; local files and S3 (moto).

Outputs are read back with other people's tools (webdataset, pyarrow, duckdb), never only our own.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import random
import struct
import tarfile
import uuid
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import images, resume, sinks, sources, storage
from pipeline.images import ImageDecodeError, decode_image
from pipeline.sources import PromptDefaults, read_images, read_prompts

# ---------------------------------------------------------------------------------------------
# stores: the same tests on a local directory and on a real S3 endpoint


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


def _s3_store(s3_options: dict) -> Store:
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", **s3_options).mkdir(bucket)
    return Store(f"s3://{bucket}/data", s3_options)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(f"file://{tmp_path}/data", None)
    return _s3_store(request.getfixturevalue("s3_options"))


@pytest.fixture()
def s3_store(s3_options) -> Store:
    return _s3_store(s3_options)


PROMPTS = ["a red apple on a table", "Ünïcödé: 一只猫", "two people, walking; at sunset"]


def _prompt_file(fmt: str) -> bytes:
    if fmt == "txt":
        return "".join(p + "\n" for p in PROMPTS).encode()
    if fmt == "jsonl":
        return "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS).encode()
    if fmt == "csv":
        quoted = ['"' + p.replace('"', '""') + '"' for p in PROMPTS]
        return ("other,prompt\n" + "".join(f"x,{q}\n" for q in quoted)).encode()
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": PROMPTS, "other": [1, 2, 3]}), buf)
    return buf.getvalue()


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _image(mode: str = "RGB", size=(24, 16), color=(200, 30, 60)) -> PIL.Image.Image:
    return PIL.Image.new(mode, size, color)


def _encode(img: PIL.Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# storage


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
        s = _s3_store(request.getfixturevalue("s3_options"))
        url, options = s.url("deep/x.bin"), s.options
    else:
        url, options = f"memory://atomic-{uuid.uuid4().hex}/x.bin", None
    fs, path = storage.open_fs(url, options)
    storage.atomic_write(fs, path, b"one")
    storage.atomic_write(fs, path, b"two")
    assert fs.cat_file(path) == b"two"
    assert fs.ls(posixpath.dirname(path), detail=False) == [path]


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


# ---------------------------------------------------------------------------------------------
# prompt sources


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_prompt_formats(store, fmt):
    store.put(f"prompts/part.{fmt}", _prompt_file(fmt))
    rows = list(read_prompts(store.url("prompts"), store.options, PromptDefaults(seed=3)))
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [(r["source"], r["index"], r["sample"], r["status"]) for r in rows] == [
        (f"part.{fmt}", i, 0, None) for i in range(3)
    ]
    assert all(0 <= r["seed"] < 2**63 and r["cfg_weight"] == 5.0 and r["temperature"] == 1.0 for r in rows)
    assert len({r["key"] for r in rows}) == 3
    # a rerun reads the same rows, with a glob or the single file as well
    assert list(read_prompts(store.url("prompts", "*"), store.options, PromptDefaults(seed=3))) == rows
    assert list(read_prompts(store.url("prompts"), store.options, PromptDefaults(seed=3), fmt="auto")) == rows
    assert list(read_prompts(store.url("prompts"), store.options, PromptDefaults(seed=3), fmt=fmt)) == rows
    assert (
        list(read_prompts(store.url("prompts", f"part.{fmt}"), store.options, PromptDefaults(seed=3))) == rows
    )


def test_key_and_seed_scheme_is_the_documented_one(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    (row,) = read_prompts(str(tmp_path), defaults=PromptDefaults(seed=11))
    material = json.dumps([sources.KEY_VERSION, 11, "p.txt", 0, "a cat", 0], ensure_ascii=False)
    digest = hashlib.sha256(material.encode()).digest()
    assert row["key"] == digest.hex()[:20]
    assert row["seed"] == int.from_bytes(digest[16:24], "big") >> 1


def test_samples_overrides_and_job_seed(tmp_path):
    lines = [
        {"prompt": "default"},
        {"prompt": "custom", "n_samples": 3, "seed": 7, "cfg_weight": 2.5, "temperature": 0.5, "id": 42},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = list(read_prompts(str(tmp_path), defaults=PromptDefaults(seed=1, n_samples=2, cfg_weight=4.0)))
    assert [(r["prompt"], r["sample"]) for r in rows] == [("default", 0), ("default", 1)] + [
        ("custom", i) for i in range(3)
    ]
    assert rows[0]["seed"] != rows[1]["seed"] and rows[0]["cfg_weight"] == 4.0
    assert [r["seed"] for r in rows[2:]] == [7, 8, 9]
    assert {(r["cfg_weight"], r["temperature"], r["id"]) for r in rows[2:]} == {(2.5, 0.5, "42")}
    assert len({r["key"] for r in rows}) == 5
    other = list(read_prompts(str(tmp_path), defaults=PromptDefaults(seed=2, n_samples=2, cfg_weight=4.0)))
    assert not {r["key"] for r in rows} & {r["key"] for r in other}
    assert rows[0]["seed"] != other[0]["seed"]


def test_bad_prompt_records_become_error_rows(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good one\r\n\xff\xfe broken\n\n   \nlast\n")
    (tmp_path / "b.jsonl").write_bytes(
        b'{"prompt": "fine", "n_samples": 4}\n{not json\n[1, 2]\n{"text": "no prompt"}\n'
        b'{"prompt": "x", "seed": "abc", "n_samples": 4}\n{"prompt": "y", "n_samples": 0}\n'
        b'{"prompt": 5}\n\n{"prompt": "  "}\n{"prompt": "t", "temperature": -1}\n'
    )
    (tmp_path / "c.csv").write_text("prompt,seed\nok,1\ntoo,many,fields\nbad,seed\n")
    (tmp_path / "d.csv").write_text("text\nno prompt column\n")
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["p", None]}), buf)
    (tmp_path / "e.parquet").write_bytes(buf.getvalue())
    zipped = gzip.compress(b"".join(b"zipped %d\n" % i for i in range(200_000)))
    (tmp_path / "f.txt.gz").write_bytes(zipped[: len(zipped) // 2])  # a truncated upload
    (tmp_path / "g.parquet").write_bytes(b"PAR1 this is not parquet")

    rows = list(read_prompts(str(tmp_path)))
    errors = {(r["source"], r["index"]): r["error"] for r in rows if r["status"] == "error"}
    ok = [(r["source"], r["index"]) for r in rows if r["status"] is None]
    assert errors[("a.txt", 1)].startswith("line is not valid UTF-8 (byte 0xff")
    assert errors[("a.txt", 2)] == errors[("a.txt", 3)] == "empty prompt"
    assert [r["prompt"] for r in rows if r["source"] == "a.txt" and not r["error"]] == ["good one", "last"]
    assert errors[("b.jsonl", 1)].startswith("malformed JSON")
    assert "object" in errors[("b.jsonl", 2)]
    assert errors[("b.jsonl", 3)] == "no 'prompt' value"
    assert errors[("b.jsonl", 4)] == "seed must be an integer, got 'abc'"
    assert errors[("b.jsonl", 5)] == "n_samples must be in [1, 10000], got 0"
    assert "must be a string" in errors[("b.jsonl", 6)]
    assert errors[("b.jsonl", 7)] == "empty line"
    assert errors[("b.jsonl", 8)] == "empty prompt"
    assert errors[("b.jsonl", 9)] == "temperature must be >= 0.0, got -1"
    assert sum(1 for r in rows if r["source"] == "b.jsonl" and r["index"] == 4) == 1  # one row, not 4
    assert errors[("c.csv", 1)] == "row has 3 fields, the header 2"
    assert errors[("c.csv", 2)] == "seed must be an integer, got 'seed'"
    assert "no 'prompt' column" in errors[("d.csv", 0)]
    assert errors[("e.parquet", 1)] == "no 'prompt' value"
    assert "cannot read txt file" in errors[("f.txt.gz", errors_index(errors, "f.txt.gz"))]
    assert "cannot read parquet file at record 0" in errors[("g.parquet", 0)]
    assert ("f.txt.gz", 0) in ok  # the lines before the truncation are kept
    assert ok[:2] == [("a.txt", 0), ("a.txt", 4)] and ("b.jsonl", 0) in ok and ("c.csv", 0) in ok
    assert len({r["key"] for r in rows}) == len(rows)  # failures have keys too
    assert list(read_prompts(str(tmp_path))) == rows


def errors_index(errors: dict, source: str) -> int:
    (index,) = [i for s, i in errors if s == source]
    return index


def test_prompt_lines_stream_from_s3(s3_store):
    """1e5 lines through s3fs: streamed via a buffered reader (fsspec's readline alone re-reads blocks)."""
    s3_store.put("big.txt", b"".join(b"prompt %d\n" % i for i in range(100_000)))
    n = sum(1 for _ in read_prompts(s3_store.url("big.txt"), s3_store.options))
    assert n == 100_000


# ---------------------------------------------------------------------------------------------
# image decoding


def test_decode_cmyk_jpeg():
    img = decode_image(_encode(_image("CMYK", color=(0, 255, 255, 0)), "JPEG"))
    assert img.mode == "RGB" and img.size == (24, 16)
    r, g, b = img.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # cyan-free, magenta+yellow = red


def test_decode_16bit_png_is_scaled_not_clipped():
    arr = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    data = _encode(PIL.Image.fromarray(arr), "PNG")
    assert PIL.Image.open(io.BytesIO(data)).mode.startswith("I;16")
    img = np.asarray(decode_image(data))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert img[0, 0, 0] == 0 and img[-1, -1, 0] == 255 and 120 < img[32, 0, 0] < 135


def test_decode_palette_with_transparency_and_alpha_modes():
    pal = _image("P", color=3)
    pal.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 250, 100, 0] + [0] * 756)
    data = _encode(pal, "PNG", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = decode_image(data)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (250, 100, 0)
    for mode, color in [("LA", (90, 10)), ("RGBA", (1, 2, 3, 0))]:
        img = decode_image(_encode(_image(mode, color=color), "PNG"))
        expected = _image(mode, color=color).convert("RGB").getpixel((0, 0))
        assert img.mode == "RGB" and img.getpixel((0, 0)) == expected


def test_decode_animated_gif_first_frame():
    frames = [_image(color=(255, 0, 0)), _image(color=(0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    assert PIL.Image.open(io.BytesIO(buf.getvalue())).n_frames == 2
    r, g, b = decode_image(buf.getvalue()).getpixel((0, 0))
    assert r > 200 and b < 50


def test_decode_applies_exif_orientation():
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    data = _encode(_image(size=(40, 20)), "JPEG", exif=exif.tobytes())
    assert PIL.Image.open(io.BytesIO(data)).size == (40, 20)
    assert decode_image(data).size == (20, 40)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        sinks.PNG_MAGIC
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("zero bytes", b"", "empty image data"),
        ("text", b"hello, I am a text file\n", "not a readable JPEG/PNG"),
        ("not a raster format we open", _encode(_image(), "PPM"), "not a readable"),
        ("jpeg cut in its header", _encode(_image(size=(256, 256)), "JPEG")[:300], "(?i)truncated"),
        (
            "jpeg cut in its pixels",
            _encode(PIL.Image.effect_noise((256, 256), 60), "JPEG")[:3000],
            "truncated",
        ),
        ("bomb", _png_header_only(10_000, 10_000), "100000000 pixels, over the limit of 40000000"),
        ("huge bomb", _png_header_only(2**31 - 1, 2**31 - 1), "decompression bomb"),
    ],
)
def test_decode_rejects_bad_data(name, data, message):
    limit = PIL.Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)
    assert PIL.Image.MAX_IMAGE_PIXELS == limit  # the global stays untouched


def test_decode_max_pixels_is_our_own_limit():
    data = _encode(_image(size=(64, 64)), "PNG")
    with pytest.raises(ImageDecodeError, match="4096 pixels, over the limit of 1000"):
        decode_image(data, max_pixels=1000)
    assert images.image_size(data) == (64, 64)


# ---------------------------------------------------------------------------------------------
# image sources


def test_image_files_source(store):
    png, jpg = _encode(_image(), "PNG"), _encode(_image(), "JPEG")
    store.put("imgs/a.png", png)
    store.put("imgs/sub/b.jpg", jpg)
    store.put("imgs/empty.webp", b"")
    store.put("imgs/notes.txt", b"ignored")
    rows = list(read_images(store.url("imgs"), store.options))
    assert [(r["source"], r["status"]) for r in rows] == [
        ("a.png", None),
        ("empty.webp", "error"),
        ("sub/b.jpg", None),
    ]
    assert rows[0]["image_bytes"] == png and rows[2]["image_bytes"] == jpg
    assert rows[1]["image_bytes"] is None and "0 bytes" in rows[1]["error"]
    assert rows == list(read_images(store.url("imgs"), store.options))
    big = list(read_images(store.url("imgs"), store.options, max_image_bytes=min(len(png), len(jpg)) - 1))
    assert [r["status"] == "error" and "over the limit" in r["error"] for r in big] == [True, False, True]


def test_parquet_image_source(store):
    png = _encode(_image(), "PNG")
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
        ("u1", "images.parquet#0", None),
        ("u2", "images.parquet#1", "error"),
    ]
    assert rows[2]["key"] not in ("u1", "u2") and rows[2]["image_bytes"] == png  # null key: derived
    hf = list(read_images(store.url("in"), store.options, fmt="parquet", image_column="hf"))
    assert [r["status"] for r in hf] == [None, None, "error"] and hf[0]["image_bytes"] == png
    assert len({r["key"] for r in hf}) == 3
    missing = list(read_images(store.url("in"), store.options, image_column="nope"))
    assert len(missing) == 1 and "no column ['nope']" in missing[0]["error"]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_webdataset_source(store):
    jpg = _encode(_image(), "JPEG")
    members = [("s/000.jpg", jpg), ("s/000.json", b"{}"), ("s/001.png", jpg), ("s/002.txt", b"no image")]
    store.put("wds/shard-0.tar", _tar(members))
    store.put("wds/shard-1.tar", _tar(members[:2]))
    store.put("wds/shard-2.tar", _tar(members)[:1000])  # truncated inside the first image
    rows = list(read_images(store.url("wds"), store.options))
    summary = [(r["source"], r["status"]) for r in rows]
    assert summary[:4] == [
        ("shard-0.tar#s/000", None),
        ("shard-0.tar#s/001", None),
        ("shard-0.tar#s/002", "error"),
        ("shard-1.tar#s/000", None),
    ]
    assert "no image member" in rows[2]["error"] and rows[0]["image_bytes"] == jpg
    assert rows[0]["key"] != rows[3]["key"]  # same member key in two tars: different keys
    assert [r["status"] for r in rows[4:]] == ["error"] and "cannot read tar" in rows[4]["error"]
    assert rows == list(read_images(store.url("wds"), store.options))


def test_mixed_image_inputs_need_a_format(tmp_path):
    (tmp_path / "a.png").write_bytes(_encode(_image(), "PNG"))
    (tmp_path / "b.tar").write_bytes(_tar([("x.png", b"")]))
    with pytest.raises(ValueError, match="set the input format"):
        list(read_images(str(tmp_path)))
    assert [r["source"] for r in read_images(str(tmp_path), fmt="images")] == ["a.png"]
    with pytest.raises(ValueError, match="unknown image input format 'files'"):
        list(read_images(str(tmp_path), fmt="files"))


# ---------------------------------------------------------------------------------------------
# sinks and resume


def _results(n: int, seed: int = 0, fail: tuple[int, ...] = ()) -> list[dict]:
    """Synthesis results as an actor would return them: prompt rows plus a uint8 image."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {
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
        }
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
    rows[2]["image"] = _png_bytes(rows[2]["image"])  # PNG bytes are stored as they are
    rows[3]["image"] = np.zeros((4, 4), np.float32)  # unusable: a failed row, not an exception
    rows[5]["image"] = sinks.PNG_MAGIC + b"not really"
    stats = sinks.write_shard(rows, store.root, store.options)
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


def test_write_shard_is_idempotent(store):
    rows = _results(6, fail=(2,))
    first = sinks.write_shard(rows, store.root, store.options)
    before = {n: store.get(n) for n in store.names()}
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert sinks.write_shard(shuffled, store.root, store.options) == first
    assert {n: store.get(n) for n in store.names()} == before


def test_caption_shard(store, tmp_path):
    rows = [
        {"key": "k1", "source": "a.jpg", "caption": "a cat", "question": "Describe.", "num_tokens": 3},
        {"key": "k/2", "source": "b.jpg", "status": "error", "error": "not a readable image"},
        {"key": "k3", "source": "c.jpg", "caption": None},
    ]
    stats = sinks.write_shard(pa.Table.from_pylist(rows), store.root, store.options, kind="caption")
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
        sinks.write_shard([rows[0], rows[0]], str(tmp_path))
    with pytest.raises(ValueError, match="non-empty string 'key'"):
        sinks.write_shard([{"prompt": "x"}], str(tmp_path))
    with pytest.raises(ValueError, match="WebDataset member names"):
        sinks.write_shard([{**rows[0], "key": "a.b"}], str(tmp_path))
    with pytest.raises(ValueError, match="unknown shard kind"):
        sinks.write_shard(rows, str(tmp_path), kind="video")
    assert sinks.write_shard([], str(tmp_path))["count"] == 0
    assert list(tmp_path.iterdir()) == []


def test_crash_before_commit_is_invisible_and_cleaned(store, monkeypatch):
    done = _results(4, seed=1)
    committed = sinks.write_shard(done, store.root, store.options)
    batch = _results(3, seed=2)

    def crash(self):
        raise RuntimeError("worker killed")

    monkeypatch.setattr(sinks.ParquetShardWriter, "close", crash)
    with pytest.raises(RuntimeError, match="worker killed"):
        sinks.write_shard(batch, store.root, store.options)
    monkeypatch.undo()
    orphan = sinks.shard_name(r["key"] for r in batch)
    leftover = store.put(f".{orphan}.parquet.0123.tmp", b"half a file")  # a killed local write
    assert f"{orphan}.tar" in store.names() and f"{orphan}.parquet" not in store.names()

    assert resume.committed_shards(store.root, store.options) == [committed["shard"]]
    assert resume.committed_keys(store.root, store.options) == {r["key"] for r in done}
    removed = resume.cleanup_uncommitted(store.root, store.options)
    assert sorted(posixpath.basename(p) for p in removed) == sorted(
        [f"{orphan}.tar", f"{orphan}_stats.json", posixpath.basename(leftover)]
    )
    assert store.names() == sorted(sinks.shard_files(committed["shard"]).values())

    sinks.write_shard(batch, store.root, store.options)  # the rerun
    assert resume.committed_keys(store.root, store.options) == {r["key"] for r in done + batch}
    assert resume.duplicate_keys(store.root, store.options) == {}
    assert resume.summarize_output(store.root, store.options) == {
        "shards": 2,
        "count": 7,
        "ok": 7,
        "failed": 0,
    }


def test_resume_filter_and_duplicate_check(store):
    a, b = _results(5, seed=3), _results(5, seed=4)
    assert resume.load_committed(store.url("nothing-yet"), store.options).size == 0
    assert resume.cleanup_uncommitted(store.url("nothing-yet"), store.options) == []
    sa = sinks.write_shard(a[:3], store.root, store.options)
    committed = resume.load_committed(store.root, store.options)
    assert sorted(k.decode() for k in committed) == sorted(r["key"] for r in a[:3])
    table = pa.table({"key": [r["key"] for r in a + b], "n": list(range(10))})
    kept = resume.filter_committed(table, committed)
    assert kept.column("n").to_pylist() == [3, 4, 5, 6, 7, 8, 9]

    sb = sinks.write_shard(a[2:4], store.root, store.options)  # overlaps a[2]: a duplicate
    assert resume.duplicate_keys(store.root, store.options) == {
        a[2]["key"]: sorted([sa["shard"], sb["shard"]])
    }


# ---------------------------------------------------------------------------------------------
# Ray Data: streaming sources and the Datasink, end to end with resume


def test_prompt_dataset_matches_local_reader(ray_session, tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"prompt {i}\n" for i in range(20)) + "\n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "x", "n_samples": 3}\n{broken\n')
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": PROMPTS}), buf)
    (tmp_path / "c.parquet").write_bytes(buf.getvalue())
    defaults = PromptDefaults(seed=5, n_samples=2)
    expected = sorted(read_prompts(str(tmp_path), defaults=defaults), key=lambda r: r["key"])
    ds = sources.prompt_dataset(str(tmp_path), defaults=defaults, rows_per_block=7, override_num_blocks=2)
    assert ds.schema().names == sources.PROMPT_SCHEMA.names
    assert sorted(ds.take_all(), key=lambda r: r["key"]) == expected
    assert len(expected) == 2 * 20 + 1 + 3 + 1 + 2 * 3  # the empty line and the broken json: one row each


def test_image_dataset_matches_local_reader(ray_session, tmp_path):
    jpg = _encode(_image(), "JPEG")
    (tmp_path / "s.tar").write_bytes(_tar([(f"{i:03d}.jpg", jpg) for i in range(10)] + [("z.txt", b"")]))
    expected = sorted(read_images(str(tmp_path)), key=lambda r: r["key"])
    got = sorted(sources.image_dataset(str(tmp_path), rows_per_block=3).take_all(), key=lambda r: r["key"])
    assert got == expected and len(got) == 11


def test_datasink_on_s3_with_resume(ray_session, s3_store):
    def _fake_generate(batch: dict) -> dict:
        """Stands in for the GPU actor (defined here so Ray pickles it by value, not by module)."""
        n = len(batch["key"])
        batch["image"] = np.stack([np.full((8, 8, 3), i % 256, np.uint8) for i in range(n)])
        return batch

    s3_store.put("in/a.txt", "".join(f"prompt {i}\n" for i in range(30)).encode() + b"\xff\n")
    out = s3_store.url("out")
    ds = sources.prompt_dataset(s3_store.url("in"), s3_store.options)
    sink = sinks.ShardDatasink(out, s3_store.options, rows_per_shard=8)
    ds.map_batches(_fake_generate, batch_format="numpy").write_datasink(sink)
    assert sum(s["count"] for s in sink.shards) == 31 and all(s["count"] <= 8 for s in sink.shards)
    assert sum(s["failed"] for s in sink.shards) == 1
    keys = {r["key"] for r in read_prompts(s3_store.url("in"), s3_store.options)}
    assert resume.committed_keys(out, s3_store.options) == keys
    assert resume.duplicate_keys(out, s3_store.options) == {}

    # resume after more input arrived: only the new rows run
    s3_store.put("in/b.txt", b"new one\nnew two\n")
    committed = resume.load_committed(out, s3_store.options)
    todo = resume.drop_committed(sources.prompt_dataset(s3_store.url("in"), s3_store.options), committed)
    assert sorted(r["prompt"] for r in todo.take_all()) == ["new one", "new two"]
    sink = sinks.ShardDatasink(out, s3_store.options, rows_per_shard=8)
    todo.map_batches(_fake_generate, batch_format="numpy").write_datasink(sink)
    assert resume.summarize_output(out, s3_store.options)["count"] == 33
    assert resume.duplicate_keys(out, s3_store.options) == {}
