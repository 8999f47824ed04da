"""``janus-pipeline dedup``: the ids of near-duplicate rows, the best-scored of each group kept, the
shards untouched; the pair search finds exactly the pairs a full comparison finds."""

from __future__ import annotations

import io
import json

import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest

from jobs.cli import main as cli_main
from pipeline.columns import OutputColumns
from pipeline.dedup import REMOVE_FILE, simhash
from pipeline.images import phash
from pipeline.near_duplicates import HashSpill, groups, near_pairs
from tests.support.rows import model_row, write_rows


@pytest.mark.parametrize("n", [40, 900])
def test_the_pair_search_finds_what_comparing_all_pairs_finds(n):
    rng = np.random.default_rng(n)
    base = rng.integers(0, 2**63, size=n, dtype=np.int64).view(np.uint64) * np.uint64(2)
    near = [h ^ np.uint64(sum(1 << int(b) for b in rng.choice(64, k, replace=False))) for h in base[: n // 3] for k in (1, 4, 7, 11, 14)]
    hashes = np.unique(np.concatenate([base, np.array(near, dtype=np.uint64)]))
    bits = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    for d in range(13):
        want = np.stack(np.nonzero(np.triu(bits <= d, 1)), axis=1)
        assert np.array_equal(near_pairs(hashes, d), want), d


def _same_groups(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """The same rows grouped the same way (labels are names, compared by first appearance)."""

    def named(labels: np.ndarray) -> list[int]:
        seen: dict[int, int] = {}
        return [seen.setdefault(label, len(seen)) for label in labels.tolist()]

    return np.array_equal(a[0], b[0]) and named(a[1]) == named(b[1])


@pytest.mark.parametrize("part_rows", [1 << 18, 900, 64])
def test_the_spilled_search_groups_rows_as_comparing_all_pairs_does(part_rows):
    """Hashes spilled shard by shard and searched a partition at a time (one partition, a few, many)
    give the groups that comparing every pair gives, identical hashes included, at every distance."""
    rng = np.random.default_rng(part_rows)
    base = rng.integers(0, 2**63, size=3000, dtype=np.int64).view(np.uint64)
    flips = [sum(1 << int(b) for b in rng.choice(64, k, replace=False)) for _ in range(200) for k in (0, 1, 4, 7, 11)]
    near = base[np.repeat(np.arange(200), 5)] ^ np.array(flips, dtype=np.uint64)
    hashes = rng.permutation(np.concatenate([base, near]))
    bits = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    for d in (0, 2, 6, 12):
        want = groups(np.stack(np.nonzero(np.triu(bits <= d, 1)), axis=1))
        with HashSpill(part_rows=part_rows) as spill:
            for shard in np.array_split(hashes, 7):
                spill.add(shard)
            assert _same_groups(groups(spill.pairs(d)), want), d
            assert spill.rows == len(hashes)


def _photo(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(small).resize((96, 96), PIL.Image.Resampling.BICUBIC))


def _jpeg(image: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="JPEG", quality=80)
    return np.asarray(PIL.Image.open(buf).convert("RGB"))


def _key(i: int) -> str:
    return f"{i:020x}"


def test_planted_duplicates_are_found_and_the_best_scored_is_kept(tmp_path, capsys):
    """Distinct images yield nothing; a JPEG copy and a group of three are found; the kept row of each
    group is its best-scored; the shards stay as they were; the docs' anti-join reads the kept set."""
    images = {i: _photo(i) for i in range(30)}
    images[30] = _jpeg(images[3])  # a copy of 3, scored lower
    images[31] = _jpeg(images[7])  # a group 7, 31, 32 where 32 scores best
    images[32] = np.asarray(PIL.Image.fromarray(images[7]).resize((90, 90)).resize((96, 96)))
    images[33] = images[10].copy()  # the same image twice, the same score: the smaller key is kept
    scores = {i: 0.5 for i in images} | {30: 0.2, 32: 0.9}
    rows = [
        model_row(key=_key(i), status="ok", prompt=f"p{i}", image=img, phash=phash(img), score=scores[i])
        for i, img in images.items()
    ]
    rows.append(model_row(key=_key(99), status="error", error="no image", prompt="p"))
    out = tmp_path / "out"
    for part in (rows[:17], rows[17:]):
        write_rows(part, str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    spill = tmp_path / "spill"
    assert cli_main(["dedup", "--output", str(out), "--max-distance", "6", "--tmp-dir", str(spill)]) == 0
    assert spill.is_dir() and not any(spill.iterdir())  # the spill is gone
    summary = json.loads(capsys.readouterr().out)
    removed = pq.read_table(out / REMOVE_FILE).to_pylist()
    assert [(r["key"], r["duplicate_of"]) for r in removed] == [
        (_key(7), _key(32)),
        (_key(30), _key(3)),
        (_key(31), _key(32)),
        (_key(33), _key(10)),
    ]
    assert all(r["by"] == "phash" and r["distance"] <= 12 for r in removed) and removed[-1]["distance"] == 0
    assert summary["remove"] == 4 and summary["groups"] == 3 and summary["compared"] == 34
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    import duckdb

    kept = duckdb.sql(
        f"SELECT key FROM '{out}/shard-*.parquet' WHERE status = 'ok' "
        f"AND key NOT IN (SELECT key FROM '{out}/{REMOVE_FILE}') ORDER BY key"
    ).fetchall()
    assert [k for (k,) in kept] == sorted(_key(i) for i in images if i not in (7, 30, 31, 33))


def test_embeddings_dedup_by_simhash(tmp_path, capsys):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((20, 32)).astype(np.float32)
    vectors[20 - 1] = vectors[4] + 0.01 * rng.standard_normal(32)  # a near copy of 4
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    columns = OutputColumns("synthesis", embedding_dim=32)
    rows = [
        model_row(columns, key=_key(i), status="ok", prompt="p", image=_photo(i), embedding=v.astype(np.float16))
        for i, v in enumerate(vectors)
    ]
    write_rows(rows, str(tmp_path / "out"), columns=columns)
    hashes = simhash(vectors)
    assert np.bitwise_count(hashes[4] ^ hashes[19]) <= 3 and len(set(hashes[:19].tolist())) == 19
    assert cli_main(["dedup", "--output", str(tmp_path / "out"), "--by", "embedding", "--max-distance", "4"]) == 0
    removed = pq.read_table(tmp_path / "out" / REMOVE_FILE).to_pylist()
    assert [(r["key"], r["duplicate_of"], r["by"]) for r in removed] == [(_key(19), _key(4), "embedding")]
    capsys.readouterr()
    # an output without embeddings, a distance out of range, no output, a spill folder that is a file: one
    # line, exit code 2
    write_rows([model_row(key=_key(0), status="ok", prompt="p", image=_photo(0))], str(tmp_path / "plain"))
    for args, message in (
        (["--output", str(tmp_path / "plain"), "--by", "embedding"], "no column 'embedding'"),
        (["--output", str(tmp_path / "plain"), "--max-distance", "40"], "--max-distance must be in [0, 12]"),
        (["--output", str(tmp_path / "nothing")], "holds no committed shards"),
        (["--output", str(tmp_path / "plain"), "--tmp-dir", str(next((tmp_path / "plain").glob("*.parquet")))], "--tmp-dir"),
    ):
        assert cli_main(["dedup", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
