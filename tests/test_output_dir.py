"""The output directory object and the packed keys that resume holds (12 bytes a key)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.columns import OutputColumns
from pipeline.output import OutputDir, filter_committed
from pipeline.sources.keys import PACKED_BYTES, packed_keys
from tests.support.rows import model_row, write_rows


def _hex_keys(n: int, start: int = 0) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest()[:20] for i in range(start, start + n)]


def test_our_keys_pack_losslessly_and_others_hash():
    ours = _hex_keys(1000)
    packed = packed_keys(pa.array(ours))
    assert packed.dtype == np.dtype(f"S{PACKED_BYTES}") and packed.shape == (1000,)
    # lossless: tag byte 0, then the 10 bytes the hex spells
    raw = np.frombuffer(packed.tobytes(), dtype=np.uint8).reshape(1000, PACKED_BYTES)
    assert (raw[:, 0] == 0).all()
    assert [bytes(r[1:11]).hex() for r in raw] == ours
    # anything else (a user's key column): tag 1 and a digest; never equal to one of ours
    other = ["user-key-1", "ABCDEF0123456789ABCD", "", "0123456789abcdef012", "é" * 20]
    packed_other = packed_keys(pa.array(other))
    raw_other = np.frombuffer(packed_other.tobytes(), dtype=np.uint8).reshape(len(other), PACKED_BYTES)
    assert (raw_other[:, 0] == 1).all()
    assert len(set(packed_other.tolist())) == len(other)
    assert not set(packed_other.tolist()) & set(packed.tolist())
    # chunked arrays and slices give the same bytes as one array
    mixed = ours[:3] + other
    whole = packed_keys(pa.array(mixed))
    assert (packed_keys(pa.chunked_array([pa.array(mixed[:4]), pa.array(mixed[4:])])) == whole).all()
    assert (packed_keys(pa.array(mixed).slice(2)) == whole[2:]).all()


def _write(url: str, keys: list[str], status: str = "ok") -> dict:
    error = None if status == "ok" else "x"
    rows = [model_row("caption", key=k, status=status, error=error, caption="c") for k in keys]
    return write_rows(rows, url, columns=OutputColumns("caption"))


def test_output_dir_lists_once_and_answers_everything(tmp_path):
    url = str(tmp_path / "out")
    out = OutputDir(url)
    assert out.names == [] and out.committed_shards == [] and out.committed_keys().size == 0
    first = _write(url, _hex_keys(5))
    second = _write(url, _hex_keys(3, start=100), status="error")
    # a crash's leftovers: a stats file without its Parquet commit, and a writer's temporary
    (tmp_path / "out" / "shard-deadbeef_stats.json").write_text("{}")
    (tmp_path / "out" / ".shard-x.parquet.0123.tmp").write_text("")
    (tmp_path / "out" / "notes.txt").write_text("a user's own file")
    out.refresh()
    assert out.committed_shards == sorted([first["shard"], second["shard"]])
    assert sorted(p.rsplit("/", 1)[-1] for p in out.cleanup()) == [".shard-x.parquet.0123.tmp", "shard-deadbeef_stats.json"]
    assert "notes.txt" in out.refresh().names
    assert out.totals() == {"shards": 2, "count": 8, "ok": 5, "failed": 3, "filtered": 0}
    assert out.key_set() == set(_hex_keys(5)) | set(_hex_keys(3, start=100))
    committed = out.committed_keys()
    assert committed.size == 8 and (np.sort(committed) == committed).all()
    assert out.duplicates() == {}
    # a key written twice is found, with both shards named
    third = _write(url, [_hex_keys(1)[0], *_hex_keys(2, start=200)])
    assert out.refresh().duplicates() == {_hex_keys(1)[0]: sorted([first["shard"], third["shard"]])}
    assert out.committed_keys().size == 10  # unique


def test_filter_committed_drops_exactly_the_committed_rows():
    committed = np.sort(packed_keys(pa.array(_hex_keys(50) + ["user-key"])))
    keys = _hex_keys(80) + ["user-key", "other"]
    kept = filter_committed(pa.table({"key": keys, "i": list(range(len(keys)))}), committed)
    assert kept.column("key").to_pylist() == _hex_keys(80)[50:] + ["other"]


def test_an_unreadable_committed_shard_says_what_to_do(tmp_path):
    url = str(tmp_path / "out")
    _write(url, _hex_keys(2))
    name = next(p.name for p in (tmp_path / "out").glob("*.parquet"))
    pq.write_table(pa.table({"not_key": [1]}), tmp_path / "out" / name)
    with pytest.raises(ValueError, match="move it away and rerun"):
        OutputDir(url).committed_keys()


def test_stats_files_count_what_the_summary_reports(tmp_path):
    url = str(tmp_path / "out")
    stats = _write(url, _hex_keys(4))
    on_disk = json.loads((tmp_path / "out" / f"{stats['shard']}_stats.json").read_text())
    assert {k: on_disk[k] for k in ("count", "ok", "failed")} == {"count": 4, "ok": 4, "failed": 0}
