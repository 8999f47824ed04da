"""The caption job end to end: its Parquet holds what the engine says for each image, and a killed
driver resumes with every image exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from janus.engine import CaptionEngine
from janus.models.image_processing_vlm import VLMImageProcessor
from pipeline.config import load_config
from pipeline.images import decode_image, model_pixels
from pipeline.job import run_job
from pipeline.output import OutputDir
from pipeline.sources.image_files import read_images
from tests.support.inputs import encode
from tests.support.jobs import (
    committed_shards,
    job_overrides,
    kill_driver_mid_job,
    output_rows,
    session_env,
    start_cli,
)

QUESTION = "What is in this picture?"
MAX_NEW_TOKENS = 8


def write_images(folder: Path, n: int) -> dict[str, bytes]:
    """``n`` random images of assorted sizes and formats (JPEG, PNG), as files in ``folder``."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    files = {}
    for i in range(n):
        w, h = int(rng.integers(16, 500)), int(rng.integers(16, 500))
        img = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        name = f"img{i:02d}.{'jpg' if i % 2 else 'png'}"
        files[name] = encode(img, "JPEG" if i % 2 else "PNG")
        (folder / name).write_bytes(files[name])
    return files


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_each_stored_caption_equals_the_engine_on_the_same_image(ray_session, model_dir, tmp_path):
    files = write_images(tmp_path / "images", 5)
    out = tmp_path / "out"
    overrides = job_overrides(model_dir, str(tmp_path / "images"), str(out))
    cfg = load_config(
        None,
        [
            "job=caption",
            *overrides,
            "input.format=images",
            f"caption.question={QUESTION}",
            f"caption.max_new_tokens={MAX_NEW_TOKENS}",
            "compute.gpus_per_actor=0",
        ],
    )
    run_job(cfg)
    rows = {r["source"]: r for r in output_rows(str(out))}
    assert sorted(rows) == sorted(files)

    # the engine, fed the bytes as the job's CPU stage decodes and resizes them
    engine = CaptionEngine.from_pretrained(model_dir, dtype="float32")
    resizer = VLMImageProcessor.from_dict(
        json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
    )
    names = sorted(files)
    pixels = [model_pixels(files[n], resizer)[0] for n in names]
    request = {"question": QUESTION, "max_new_tokens": MAX_NEW_TOKENS}
    expected = engine.generate([{**request, "image": p} for p in pixels])
    # ... which is what a user gets from the decoded image itself (the resize is idempotent)
    direct = engine.generate([{**request, "image": decode_image(files[n])} for n in names])
    for name, want, also in zip(names, expected, direct, strict=True):
        row = rows[name]
        assert row["status"] == "ok" and want.ok, (row, want.error)
        assert (row["caption"], row["num_tokens"], row["finish_reason"]) == (
            want.text,
            want.num_tokens,
            want.finish_reason,
        ), name
        assert row["question"] == QUESTION and also.text == want.text
    assert len({r["caption"] for r in rows.values()}) > 1  # captions depend on the image


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_caption_resume_after_the_driver_is_killed(ray_session, model_dir, gate, tmp_path):
    write_images(tmp_path / "images", 20)
    keys = [r["key"] for r in read_images(str(tmp_path / "images"), None, "images")]
    out = tmp_path / "out"
    overrides = [
        *job_overrides(model_dir, str(tmp_path / "images"), str(out)),
        "input.format=images",
        "compute.gpus_per_actor=0",
        # model-free: what is tested is the kill, the resume filter and the sink, not the captions
        "compute.actor_class=tests.support.scale_actors:GatedCaptionStandIn",
    ]
    env = session_env(ray_session)
    kill_driver_mid_job("caption", overrides, env, tmp_path / "first.log", gate, str(out))
    committed_before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    rows_before = len(OutputDir(str(out)).key_set())
    assert 2 <= len(committed_before) and rows_before < len(keys)

    summary = start_cli("caption", overrides, env, tmp_path / "rerun.log").finish(
        lambda: committed_shards(str(out))
    )
    rows = output_rows(str(out))
    assert sorted(r["key"] for r in rows) == sorted(keys)  # every image exactly once
    assert all(r["status"] == "ok" and r["caption"] is not None for r in rows)
    assert summary["this_run"]["count"] == len(keys) - rows_before  # the rerun redid only the rest
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet") if p.name in committed_before} == (
        committed_before
    )
    assert summary["complete"] and summary["duplicate_keys"] == 0
