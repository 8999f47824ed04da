"""The caption job end to end: its Parquet holds what the engine says for each image, and a killed
driver resumes with every image exactly once."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from janus.engine import CaptionEngine
from janus.models.image_processing_vlm import VLMImageProcessor
from pipeline.images import decode_image, model_pixels
from pipeline.job import run_job
from pipeline.output import OutputDir
from pipeline.sources.image_files import read_images
from tests.support.inputs import encode
from tests.support.jobs import (
    committed_shards,
    job_config,
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
    settings = ("input.format=images", f"caption.question={QUESTION}", f"caption.max_new_tokens={MAX_NEW_TOKENS}")
    cfg = job_config(model_dir, "caption", tmp_path / "images", out, *settings, "compute.gpus_per_actor=0")
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
            want.text.strip(),  # stored without the tokenizer's leading space
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
        "caption.max_new_tokens=4",
        "input.format=images",
        "compute.gpus_per_actor=0",
        "output.write_images=true",  # the tars too: written before the commit, resumed as the Parquet
        # model-free: what is tested is the kill, the resume filter and the sink, not the captions
        "compute.actor_class=tests.support.scale_actors:GatedCaptionStandIn",
    ]
    env = session_env(ray_session)
    kill_driver_mid_job("caption", overrides, ray_session, tmp_path / "first.log", gate, str(out))
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
    # the tars hold each image exactly once, beside its committed Parquet file, with the row's caption
    members = []
    for tar_path in sorted(out.glob("*.tar")):
        assert (out / tar_path.name.replace(".tar", ".parquet")).exists(), f"{tar_path.name} uncommitted"
        with tarfile.open(tar_path) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar]
    names = [name for name, _ in members]
    by_key = {r["key"]: r for r in rows}
    assert sorted(n for n in names if not n.endswith((".txt", ".json"))) == sorted(r["member"] for r in rows)
    assert len(names) == len(set(names)) == 3 * len(keys)
    texts = {name.rsplit(".", 1)[0]: data.decode() for name, data in members if name.endswith(".txt")}
    assert texts == {k: r["caption"] for k, r in by_key.items()}


def test_continuous_batching_in_the_caption_actor_gives_the_same_rows(model_dir):
    """``caption.continuous_batching``: the actor's batch runs through the scheduler (a finished answer
    frees its row at once) and its rows are the static engine's, to the token, in fp32; rows failed
    upstream stay failed; each row's seconds are its share of the batch's time."""
    from pipeline.actors.captioner import Captioner, ScheduledBatches
    from pipeline.config import load_config

    cfg = load_config(None, ["job=caption", "input.url=x", "output.url=y", "caption.continuous_batching=true"])
    caption = {**cfg.caption.model_dump(), "question": QUESTION, "max_new_tokens": 12, "temperature": 0.7}
    model = {"path": model_dir, "dtype": "float32"}
    engine = {"max_batch_size": 3}  # 3 rows for 7 images: rows are reused as answers finish
    scheduled = Captioner(model, engine, caption)
    static = Captioner(model, engine, {**caption, "continuous_batching": False})
    assert isinstance(scheduled.runner, ScheduledBatches) and static.runner is static.engine

    side = scheduled.engine.processor.image_processor.image_size
    rng = np.random.default_rng(3)
    n = 7
    batch = {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "source": np.array([f"img{i}.png" for i in range(n)], dtype=object),
        "pixels": rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),
        "width": np.full(n, side),
        "height": np.full(n, side),
        "phash": np.arange(n),
        "status": np.array(["ok"] * 5 + ["error", "ok"], dtype=object),
        "error": np.array([None] * 5 + ["cannot decode image", None], dtype=object),
        **{name: np.full(n, None, dtype=object) for name in ("source_key", "image", "reencoded_from")},
    }
    got, want = scheduled(batch), static(batch)
    assert scheduled.runner.scheduler.steps > 0 and scheduled.runner.scheduler.peak_running == 3
    for column in ("caption", "num_tokens", "finish_reason", "status", "error"):
        assert list(got[column]) == list(want[column]), column
    assert got["status"][5] == "error" and got["caption"][5] is None
    assert got["seconds"][0] > 0 and len(set(got["seconds"][got["status"] == "ok"])) == 1
