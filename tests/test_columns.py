"""The column declarations (``pipeline.columns``) against everything that names columns: the readers'
rows, the real model actors' output, Serve's quality fields, the README's column lists and the tables of
docs/datasets.md."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pipeline.columns import INPUT, KINDS, OutputColumns, markdown_table
from pipeline.sources.image_files import IMAGE_SCHEMA
from pipeline.sources.prompt_files import PROMPT_SCHEMA
from tests.support import REPO

RATE = {"aesthetic": "How would you rate the aesthetics of this image?"}


def test_the_readers_rows_are_the_declared_input_columns():
    synthesis = {c.name: c.type for c in KINDS["synthesis"] if c.source == INPUT}
    assert {f.name: f.type for f in PROMPT_SCHEMA if f.name not in ("status", "error")} == synthesis
    caption = {c.name: c.type for c in KINDS["caption"] if c.source == INPUT}
    read = {f.name: f.type for f in IMAGE_SCHEMA if f.name not in ("status", "error", "image_bytes")}
    assert read == caption  # the bytes are decoded by the CPU stage, not stored


def test_each_name_is_declared_once_per_kind():
    for kind, columns in KINDS.items():
        names = [c.name for c in columns]
        assert len(names) == len(set(names)), kind
        assert all(c.recipe for c in columns if c.source == "recipe"), kind


@pytest.fixture(scope="module")
def width(model_dir) -> int:
    import json
    from pathlib import Path

    from janus.models.siglip_vit import tower_width

    return tower_width(json.loads((Path(model_dir) / "config.json").read_text())["vision_config"]["params"])


def test_the_synthesizer_returns_exactly_the_declared_columns(model_dir, width):
    from pipeline.actors import Synthesizer

    quality = {"score": True, "best_of": 2, "ratings": RATE, "embeddings": True, "min_score": 0.5}
    actor = Synthesizer({"path": model_dir, "dtype": "float32"}, {"max_batch_size": 4}, {}, quality)
    batch = {
        "key": np.array(["k0", "k1"], dtype=object),
        "prompt": np.array(["a red circle", "x"], dtype=object),
        "seed": np.array([1, 2]),
        "cfg_weight": np.array([5.0, 5.0]),
        "temperature": np.array([1.0, 1.0]),
        "source": np.array(["p.txt", "p.txt"], dtype=object),
        "index": np.array([0, 1]),
        "sample": np.array([0, 0]),
        "id": np.array([None, None], dtype=object),
        "status": np.array(["ok", "error"], dtype=object),
        "error": np.array([None, "empty prompt"], dtype=object),
    }
    out = actor(batch)
    assert set(out) == OutputColumns("synthesis", ("aesthetic",), width).from_model_stage


def test_the_captioner_returns_exactly_the_declared_columns(model_dir, width):
    import json
    from pathlib import Path

    from pipeline.actors import Captioner
    from pipeline.graphs import preprocess_images
    from tests.support.inputs import encode, image

    rows = {
        "key": np.array(["k0", "k1"], dtype=object),
        "source": np.array(["a.png", "b.tar#s/1"], dtype=object),
        "source_key": np.array([None, "s/1"], dtype=object),
        "image_bytes": np.array([encode(image(), "PNG"), b"not an image"], dtype=object),
        "status": np.array(["ok", "ok"], dtype=object),
        "error": np.array([None, None], dtype=object),
    }
    processor = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
    batch = preprocess_images(rows, processor, max_pixels=10**6, write_images=True)
    actor = Captioner({"path": model_dir, "dtype": "float32"}, {}, {"max_new_tokens": 3}, {"embeddings": True})
    out = actor(batch)
    assert set(out) == OutputColumns("caption", (), width).from_model_stage
    assert list(out["status"]) == ["ok", "error"] and out["source_key"][1] == "s/1"


def test_serve_returns_the_declared_quality_fields():
    """Serve's image response names its quality fields as the declarations say (``Column.serve``)."""
    from pipeline.serve.backend import Answer
    from pipeline.serve.wire import quality_fields

    declared = {c.serve: c.name for c in KINDS["synthesis"] if c.serve}
    full = Answer(score=0.5, scores=[0.2, 0.5], candidate=1, decode_passes=100, decode_method="jacobi")
    assert set(quality_fields(full)) == set(declared)
    assert set(quality_fields(Answer(score=0.5))) == {"score"}
    assert quality_fields(full)["candidate_scores"] == [0.2, 0.5]


def test_the_readme_lists_the_declared_columns():
    readme = (REPO / "README.md").read_text()
    for kind, extra in (("synthesis", ["rating_<name>", "embedding"]), ("caption", ["embedding"])):
        match = re.search(rf"^- {kind} columns: (.*?)(?=^- |^\n)", readme, re.S | re.M)
        assert match, f"README has no '- {kind} columns:' list"
        listed = re.findall(r"`([a-z_<>]+)`", match.group(1))
        assert listed == OutputColumns(kind).schema.names + extra, kind


def test_the_datasets_doc_tables_are_the_declarations():
    doc = REPO / "docs" / "datasets.md"
    text = doc.read_text()
    for kind, title in (("synthesis", "### Synthesis"), ("caption", "### Caption")):
        table = text.split(title, 1)[1].strip().split("\n\n")[0]
        assert table == markdown_table(kind), f"{doc.name} {title}: run pipeline.columns.markdown_table"
