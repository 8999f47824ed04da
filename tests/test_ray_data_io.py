"""Ray Data: the streaming sources and the Datasink, end to end with resume on S3 (moto)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import sinks
from pipeline.columns import OutputColumns
from pipeline.output import OutputDir, drop_committed
from pipeline.sources import datasource
from pipeline.sources.image_files import read_images
from pipeline.sources.prompt_files import PROMPT_SCHEMA, PromptDefaults, read_prompts
from tests.support.inputs import PROMPTS, encode, image, tar_bytes
from tests.support.rows import recipe_values

RECIPE = recipe_values(OutputColumns("synthesis"))


def test_prompt_dataset_matches_local_reader(ray_session, tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"prompt {i}\n" for i in range(20)) + "\n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "x", "n_samples": 3}\n{broken\n')
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": PROMPTS}), buf)
    (tmp_path / "c.parquet").write_bytes(buf.getvalue())
    defaults = PromptDefaults(seed=5, n_samples=2)
    expected = sorted(read_prompts(str(tmp_path), defaults=defaults), key=lambda r: r["key"])
    ds = datasource.prompt_dataset(str(tmp_path), defaults=defaults, rows_per_block=7, override_num_blocks=2)
    assert ds.schema().names == PROMPT_SCHEMA.names
    assert sorted(ds.take_all(), key=lambda r: r["key"]) == expected
    assert len(expected) == 2 * 20 + 1 + 3 + 1 + 2 * 3  # the empty line and the broken json: one row each


def test_image_dataset_matches_local_reader(ray_session, tmp_path):
    jpg = encode(image(), "JPEG")
    (tmp_path / "s.tar").write_bytes(tar_bytes([(f"{i:03d}.jpg", jpg) for i in range(10)] + [("z.txt", b"")]))
    expected = sorted(read_images(str(tmp_path)), key=lambda r: r["key"])
    got = sorted(datasource.image_dataset(str(tmp_path), rows_per_block=3).take_all(), key=lambda r: r["key"])
    assert got == expected and len(got) == 11


def test_datasink_on_s3_with_resume(ray_session, s3_store):
    def _fake_generate(batch: dict) -> dict:
        """Stands in for the GPU actor (defined here so Ray pickles it by value, not by module)."""
        from tests.support.scale_actors import unread

        n = len(batch["key"])
        batch["image"] = np.stack([np.full((8, 8, 3), i % 256, np.uint8) for i in range(n)])
        batch.update(model=np.full(n, "fake", dtype=object), seconds=np.zeros(n), **unread(n))
        return batch

    s3_store.put("in/a.txt", "".join(f"prompt {i}\n" for i in range(30)).encode() + b"\xff\n")
    out = s3_store.url("out")
    ds = datasource.prompt_dataset(s3_store.url("in"), s3_store.options)
    sink = sinks.ShardDatasink(out, s3_store.options, rows_per_shard=8, recipe=RECIPE)
    ds.map_batches(_fake_generate, batch_format="numpy").write_datasink(sink)
    assert sum(s["count"] for s in sink.shards) == 31 and all(s["count"] <= 8 for s in sink.shards)
    assert sum(s["failed"] for s in sink.shards) == 1
    keys = {r["key"] for r in read_prompts(s3_store.url("in"), s3_store.options)}
    assert OutputDir(out, s3_store.options).key_set() == keys
    assert OutputDir(out, s3_store.options).duplicates() == {}

    # resume after more input arrived: only the new rows run
    s3_store.put("in/b.txt", b"new one\nnew two\n")
    committed = OutputDir(out, s3_store.options).committed_keys()
    todo = drop_committed(datasource.prompt_dataset(s3_store.url("in"), s3_store.options), committed)
    assert sorted(r["prompt"] for r in todo.take_all()) == ["new one", "new two"]
    sink = sinks.ShardDatasink(out, s3_store.options, rows_per_shard=8, recipe=RECIPE)
    todo.map_batches(_fake_generate, batch_format="numpy").write_datasink(sink)
    assert OutputDir(out, s3_store.options).totals()["count"] == 33
    assert OutputDir(out, s3_store.options).duplicates() == {}
