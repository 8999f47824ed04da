"""Prompt sources: txt, jsonl, csv and parquet prompts -> keyed rows; bad records become error rows."""

from __future__ import annotations

import gzip
import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.sources.keys import KEY_VERSION
from pipeline.sources.prompt_files import PromptDefaults, read_prompts
from tests.support.inputs import PROMPTS


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


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_prompt_formats(store, fmt):
    store.put(f"prompts/part.{fmt}", _prompt_file(fmt))
    rows = list(read_prompts(store.url("prompts"), store.options, PromptDefaults(seed=3)))
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [(r["source"], r["index"], r["sample"], r["status"]) for r in rows] == [
        (f"part.{fmt}", i, 0, "ok") for i in range(3)
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
    material = json.dumps([KEY_VERSION, 11, "p.txt", 0, "a cat", 0], ensure_ascii=False)
    digest = hashlib.sha256(material.encode()).digest()
    assert row["key"] == digest.hex()[:20]
    assert row["seed"] == int.from_bytes(digest[16:24], "big") >> 1
    # the documented bytes also for prompts that JSON escapes or keeps as they are (non-ASCII, controls)
    tricky = ['日本の "猫" \\ é', "tab\tand\nnewline", "emoji 🐱 \u2028 end", "nul\u0000x", "💥" * 3]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in tricky), encoding="utf-8")
    rows = [r for r in read_prompts(str(tmp_path), defaults=PromptDefaults(seed=11)) if r["source"] == "q.jsonl"]
    assert [r["prompt"] for r in rows] == tricky
    for i, r in enumerate(rows):
        material = json.dumps([KEY_VERSION, 11, "q.jsonl", i, tricky[i], 0], ensure_ascii=False)
        assert r["key"] == hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:20]


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
    ok = [(r["source"], r["index"]) for r in rows if r["status"] == "ok"]
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
