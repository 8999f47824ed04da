"""The demo's output as a trainer loads it: every snippet of docs/datasets.md runs on it (webdataset,
pyarrow and DuckDB, Ray Data's read_webdataset, a sample made again from its recipe alone, dedup), and
the caption job's tars and keys hold what they say. Every test here reads the demo jobs' output
(``demo``, ~1 minute of jobs on a 2-core machine): the slow tier."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.images import decode_image
from pipeline.job import run_job
from pipeline.recipe import RECIPE_FILE
from tests.support import REPO
from tests.support.jobs import output_rows
from tests.support.shapes import shapes_vq

DOC = REPO / "docs" / "datasets.md"
#: the side of the demo's images: the shipped shapes checkpoint's
SIDE = shapes_vq().image_size

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(ray_session, tmp_path_factory) -> Path:
    """``make demo`` into a temporary folder: the shapes model's synthesis, then captions of its tars."""
    root = tmp_path_factory.mktemp("demo")
    synthesis, captions = root / "out" / "synthesis", root / "out" / "captions"
    run_job(load_config(REPO / "configs" / "demo_synthesize.yaml", [f"output.url={synthesis}"], job="synthesize"))
    overrides = [f"input.url={synthesis}", f"output.url={captions}"]
    run_job(load_config(REPO / "configs" / "demo_caption.yaml", overrides, job="caption"))
    return root


def snippet(first_line: str) -> str:
    """The docs' code block that starts with ``first_line``."""
    blocks = re.findall(r"```(?:python|sql)\n(.*?)```", DOC.read_text(), re.S)
    (found,) = [b for b in blocks if b.startswith(first_line)]
    return found


def run_snippet(first_line: str, demo: Path) -> dict:
    code = snippet(first_line).replace("'out/", f"'{demo}/out/").replace('"out/', f'"{demo}/out/')
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102  (our own docs, on our own output)
    return namespace


def test_webdataset_gives_image_text_and_recipe_per_sample(demo):
    ns = run_snippet("# webdataset", demo)
    rows = {r["key"]: r for r in output_rows(str(demo / "out" / "synthesis"))}
    ok = [k for k, r in rows.items() if r["status"] == "ok"]
    assert len(ns["pairs"]) == len(ok) == 16
    for image, prompt, row in ns["pairs"]:
        assert image.size == (rows[row["key"]]["width"], rows[row["key"]]["height"])
        assert prompt == rows[row["key"]]["prompt"] and row["weights"].startswith("sha256:")
        assert (row["model"], row["speculative"], row["dtype"]) == ("shapes", "off", "float32")
    captions = {r["key"]: r for r in output_rows(str(demo / "out" / "captions"))}
    assert len(ns["captioned"]) == len(captions) == 16
    for image, caption, row in ns["captioned"]:
        assert caption == captions[row["key"]]["caption"] and image.size == (SIDE, SIDE)


def test_captions_join_their_source_samples_and_keep_their_bytes(demo):
    ns = run_snippet("# pyarrow and DuckDB", demo)
    assert ns["synthesis"].num_rows == 16 and len(ns["joined"]) == 16
    synthesis = {r["key"]: r for r in output_rows(str(demo / "out" / "synthesis"))}
    captions = output_rows(str(demo / "out" / "captions"))
    assert sorted(c["source_key"] for c in captions) == sorted(synthesis)
    for c in captions:  # the caption tar holds the synthesis PNG byte for byte: PNG is kept as it is
        source = synthesis[c["source_key"]]
        assert c["member"] == f"{c['key']}.png" and c["reencoded_from"] is None
        assert _member(demo / "out" / "captions", c) == _member(demo / "out" / "synthesis", source)
        assert c["caption"] == c["caption"].strip() and c["caption"]
        assert (c["temperature"], c["max_new_tokens"], c["weights"]) == (0.0, 24, source["weights"])


def _member(folder: Path, row: dict) -> bytes:
    with tarfile.open(folder / f"{row['shard']}.tar") as tar:
        return tar.extractfile(row["member"]).read()


def test_the_stored_caption_is_the_model_text_stripped(demo):
    """The shapes model's captions start with a space (the tokenizer's word boundary); stored, not."""
    from janus.engine import CaptionEngine
    from pipeline.model_ref import resolve_model_ref

    row = output_rows(str(demo / "out" / "captions"))[0]
    engine = CaptionEngine.from_pretrained(resolve_model_ref("shapes"), dtype="float32")
    image = decode_image(_member(demo / "out" / "captions", row))
    (raw,) = engine.generate([{"image": image, "question": row["question"], "max_new_tokens": row["max_new_tokens"]}])
    assert raw.text.startswith(" ") and raw.text.strip() == row["caption"]


def test_ray_data_reads_the_tars(demo):
    ns = run_snippet("# Ray Data", demo)
    assert len(ns["samples"]) == len(ns["captioned"]) == 16
    for sample in ns["samples"] + ns["captioned"]:
        assert sample["png"].shape == (SIDE, SIDE, 3) and sample["txt"] and sample["json"]["weights"].startswith("sha256:")
    captions = {r["key"]: r["caption"] for r in output_rows(str(demo / "out" / "captions"))}
    assert {s["json"]["key"]: s["txt"] for s in ns["captioned"]} == captions


def test_the_recipe_alone_makes_the_same_image(demo):
    ns = run_snippet("# regenerate", demo)  # it asserts that the PNG bytes are equal
    assert json.loads((demo / "out" / "synthesis" / RECIPE_FILE).read_text())["model.weights"] == ns["row"]["weights"]


def test_dedup_on_the_demo_and_the_kept_set(demo, capsys):
    from jobs.cli import main as cli_main

    out = demo / "out" / "synthesis"
    assert cli_main(["dedup", "--output", str(out), "--max-distance", "6"]) == 0
    summary = json.loads(capsys.readouterr().out)
    removed = pq.read_table(out / "dedup" / "remove.parquet").to_pylist()
    assert summary["compared"] == 16 and summary["remove"] == len(removed)
    import duckdb

    kept = duckdb.sql(snippet("-- the kept set").replace("'out/", f"'{demo}/out/")).fetchall()
    assert len(kept) == 16 - len(removed)
    readme = re.search(r"(SELECT s\.\* FROM [^;]*ANTI JOIN[^;]*;)", (REPO / "README.md").read_text()).group(1)
    assert sorted(duckdb.sql(readme.replace("'out/", f"'{demo}/out/")).fetchall(), key=str) == sorted(kept, key=str)
