"""The Ray Data jobs end to end: local and S3, bad inputs, fake GPUs, driver and actor death.

The kill tests kill while a batch is held in flight (``tests.support.gate``), so the kill always
lands mid-job and the retry or resume path always runs, on any machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import fsspec
import numpy as np
import PIL.Image
import pytest

from pipeline.config import load_config
from pipeline.graphs import actor_options
from pipeline.job import run_job
from pipeline.output import COMPLETE_FILE, OutputDir
from pipeline.recipe import RECIPE_FILE
from pipeline.sources.image_files import read_images
from pipeline.sources.prompt_files import PromptDefaults, read_prompts
from tests.support import REPO
from tests.support.checkpoints import JOB_IMAGE_PX
from tests.support.inputs import encode
from tests.support.jobs import (
    committed_shards,
    job_config,
    kill_driver_mid_job,
    output_rows,
    session_env,
    start_cli,
    wait_until,
    write_prompts,
)
from tests.support.stores import new_bucket

GATED = "compute.actor_class=tests.support.scale_actors:GatedStandIn"  # model-free: see its docstring


def job(model_dir: str, job: str, input_url: str | Path, output_url: str | Path, *extra: str):
    short = ["caption.max_new_tokens=4"] if job == "caption" else []
    return job_config(model_dir, job, input_url, output_url, *short, *extra)


def stats(url: str) -> dict[str, int]:
    totals = {"count": 0, "ok": 0, "failed": 0}
    for path in Path(url).glob("*_stats.json"):
        data = json.loads(path.read_text())
        for k in totals:
            totals[k] += data[k]
    return totals


PROMPT_LINES = [
    b"a red apple on a wooden table",
    b"",
    b"   ",
    b"two people walking along the beach at sunset",
    b"caf\xe9 au lait, not utf-8",
    b"word " * 3000,
    b"a lighthouse in a storm",
]


@pytest.mark.timeout(1200)
def test_synthesis_job_on_fake_gpus_with_bad_prompts(ray_session, model_dir, tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"\n".join(PROMPT_LINES) + b"\n")
    out = tmp_path / "out"
    settings = ("synthesis.n_samples=2", "engine.max_prompt_tokens=256", "output.contact_sheet=4")
    cfg = job(model_dir, "synthesize", tmp_path / "prompts.txt", out, *settings)
    assert actor_options(cfg)["num_gpus"] == 1  # the cluster has (fake) GPUs: one per actor
    summary = run_job(cfg)

    expected = [
        r["key"] for r in read_prompts(str(tmp_path / "prompts.txt"), defaults=PromptDefaults(n_samples=2))
    ]
    rows = output_rows(str(out))
    assert sorted(r["key"] for r in rows) == sorted(expected)
    by_status = {s: [r for r in rows if r["status"] == s] for s in ("ok", "error")}
    assert len(by_status["ok"]) == 6  # 3 good prompts x 2 samples
    errors = " | ".join(sorted({r["error"] for r in by_status["error"]}))
    assert "empty prompt" in errors and "UTF-8" in errors and "at most" in errors
    assert summary["complete"] and summary["this_run"]["count"] == len(expected)
    assert stats(str(out)) == {"count": len(expected), "ok": 6, "failed": len(expected) - 6}
    assert Path(summary["contact_sheet"]).exists()
    # the images really are in the tars, readable by the webdataset package
    import webdataset as wds

    tars = sorted(str(p) for p in out.glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("rgb8"))
    assert sorted(s["__key__"] for s in samples) == sorted(r["key"] for r in by_status["ok"])
    assert samples[0]["png"].shape == (JOB_IMAGE_PX, JOB_IMAGE_PX, 3)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_rerun_makes_no_duplicates_and_same_seed_same_image(ray_session, model_dir, tmp_path):
    (tmp_path / "p.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"prompt number {i}", "seed": 100 + i}) for i in range(3)) + "\n"
    )
    out = tmp_path / "out"
    cfg = job(model_dir, "synthesize", tmp_path / "p.jsonl", out, "compute.gpus_per_actor=0")
    run_job(cfg)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    sheet = (out / "contact_sheet.png").stat()
    again = run_job(cfg)
    assert again["this_run"]["count"] == 0 and again["total"]["count"] == 3
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    kept = (out / "contact_sheet.png").stat()  # not drawn again: it shows what it showed
    assert (kept.st_ino, kept.st_mtime_ns) == (sheet.st_ino, sheet.st_mtime_ns)
    assert again["contact_sheet"] == str(out / "contact_sheet.png")
    # a second output with the same rows gives the same shards and byte-identical images
    other = tmp_path / "other"
    run_job(job(model_dir, "synthesize", tmp_path / "p.jsonl", other, "compute.gpus_per_actor=0"))
    assert pngs(other) == pngs(out) and len(pngs(out)) == 3


@pytest.mark.timeout(1200)
def test_the_model_pool_gets_full_batches_and_a_resume_too(ray_session, model_dir, tmp_path):
    """Read blocks of any size (three files, Ray's own block splitting, the resume filter) reach the
    model actors as whole batches: one short batch per run at most, where a ragged block would end
    in a short batch each (a short batch costs a GPU nearly what a full one does)."""
    (tmp_path / "in").mkdir()
    for name, n in (("a.txt", 13), ("b.txt", 29), ("c.txt", 7)):
        (tmp_path / "in" / name).write_text("\n".join(f"{name} prompt {i}" for i in range(n)) + "\n")
    out = tmp_path / "out"
    settings = ["compute.actor_class=tests.support.scale_actors:BatchSizeStandIn", "compute.batch_size=8"]
    cfg = job(model_dir, "synthesize", tmp_path / "in", out, *settings)

    def batch_sizes(rows: list[dict]) -> list[int]:
        sizes = [int(r["seconds"]) for r in rows]
        return sorted(size for size in set(sizes) for _ in range(sizes.count(size) // size))

    run_job(cfg)
    first = output_rows(str(out))
    assert len(first) == 49 and batch_sizes(first) == [1] + [8] * 6
    # drop some committed shards: the rerun's input is the 49 rows minus those still committed
    for shard in sorted(out.glob("shard-*.parquet"))[::3]:
        shard.unlink()
    kept = {r["key"] for r in output_rows(str(out))}
    summary = run_job(cfg)
    redone = [r for r in output_rows(str(out)) if r["key"] not in kept]
    assert summary["this_run"]["count"] == len(redone) == 49 - len(kept) > 8
    sizes = batch_sizes(redone)
    assert sizes.count(8) == len(redone) // 8 and sum(sizes) == len(redone)


def pngs(directory: Path) -> dict[str, bytes]:
    found = {}
    for path in sorted(directory.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            found.update({m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".png")})
    return found


def make_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90: the decoded image must come out 60 x 90 -> 90 x 60 transposed
    good = encode(rgb, "JPEG")
    return {
        "good.jpg": good,
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "rotated.jpg": encode(rgb, "JPEG", exif=exif),
        "palette.png": encode(rgb.convert("P"), "PNG", transparency=0),
        "sixteen.png": encode(
            PIL.Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16)), "PNG"
        ),
        "truncated.jpg": good[: len(good) // 3],
        "empty.png": b"",
        "notes.webp": b"this is not an image",
    }


@pytest.mark.timeout(1200)
def test_caption_job_from_s3_to_s3(ray_session, model_dir, s3_options):
    bucket = new_bucket(s3_options, "cap")
    fs = fsspec.filesystem("s3", **s3_options)
    for name, data in make_images().items():
        fs.pipe(f"{bucket}/images/{name}", data)
    so = json.dumps(s3_options)
    cfg = job(
        model_dir,
        "caption",
        f"s3://{bucket}/images",
        f"s3://{bucket}/captions",
        f"input.storage_options={so}",
        f"output.storage_options={so}",
        "input.format=images",
    )
    summary = run_job(cfg)
    rows = output_rows(f"s3://{bucket}/captions", s3_options)
    inputs = list(read_images(f"s3://{bucket}/images", s3_options, "images"))
    assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in inputs)
    by_source = {r["source"]: r for r in rows}
    for name in ("good.jpg", "cmyk.jpg", "rotated.jpg", "palette.png", "sixteen.png"):
        assert by_source[name]["status"] == "ok", by_source[name]
        assert by_source[name]["caption"] is not None and by_source[name]["num_tokens"] >= 0
    assert (by_source["rotated.jpg"]["width"], by_source["rotated.jpg"]["height"]) == (60, 90)
    for name in ("truncated.jpg", "empty.png", "notes.webp"):
        assert by_source[name]["status"] == "error" and by_source[name]["error"]
    assert summary["total"] == {"shards": summary["total"]["shards"], "count": 8, "ok": 5, "failed": 3, "filtered": 0}
    assert not OutputDir(f"s3://{bucket}/captions", s3_options).duplicates()


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_resume_after_the_driver_is_killed(ray_session, model_dir, gate, tmp_path):
    keys = write_prompts(tmp_path / "p.txt", 40)
    out = tmp_path / "out"
    overrides = [
        f"model.path={model_dir}",
        "model.dtype=float32",
        f"input.url={tmp_path / 'p.txt'}",
        f"output.url={out}",
        "output.rows_per_shard=4",
        "compute.batch_size=4",
        "compute.gpus_per_actor=0",
        "output.contact_sheet=0",
        GATED,
    ]
    env = session_env(ray_session)
    kill_driver_mid_job("synthesize", overrides, ray_session, tmp_path / "first.log", gate, str(out))
    committed_before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    assert 0 < len(committed_before) and len(OutputDir(str(out)).key_set()) < len(keys)

    start_cli("synthesize", overrides, env, tmp_path / "rerun.log").finish(lambda: committed_shards(str(out)))
    rows = output_rows(str(out))
    assert sorted(r["key"] for r in rows) == sorted(keys)  # every key exactly once
    assert {
        p.name: p.read_bytes() for p in out.glob("*.parquet") if p.name in committed_before
    } == committed_before
    leftovers = [
        p.name
        for p in out.iterdir()
        if not p.name.startswith("shard-") and p.name not in ("contact_sheet.png", RECIPE_FILE, COMPLETE_FILE)
    ]
    assert not leftovers
    for tar in out.glob("*.tar"):
        assert (out / tar.name.replace(".tar", ".parquet")).exists()


@pytest.mark.timeout(2400)
def test_killed_actor_is_replaced_and_every_row_lands_once(ray_session, model_dir, gate, tmp_path):
    keys = write_prompts(tmp_path / "p.txt", 32)
    out = tmp_path / "out"
    settings = ("compute.gpus_per_actor=0", "output.contact_sheet=0", GATED)
    cfg = job(model_dir, "synthesize", tmp_path / "p.txt", out, *settings)
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = run_job(cfg)
        except BaseException as exc:  # shown by the test, not lost in the thread
            result["error"] = exc

    gate.hold(from_call=1)  # the first batch gets through (a committed shard), the second is held
    runner = threading.Thread(target=run, daemon=True)
    runner.start()

    def ended() -> str | None:
        return None if runner.is_alive() else f"the job ended first: {result}"

    held = gate.wait_for_entry(lambda e: e.held, ended)
    wait_until(lambda: committed_shards(str(out)) >= 1, "a committed shard", ended)
    killed = held.pid
    os.kill(killed, signal.SIGKILL)  # the actor dies with a batch in flight
    gate.open()
    runner.join()
    assert "error" not in result, result
    assert result["summary"]["complete"]
    rows = output_rows(str(out))
    assert sorted(r["key"] for r in rows) == sorted(keys)
    assert all(r["status"] == "ok" for r in rows)
    # the held batch ran again in the replacement actor: one call more than the 8 batches
    entries = gate.entries()
    assert len(entries) > len(keys) // 4 and any(e.pid != killed for e in entries[held.index + 1 :])


def test_bad_config_is_a_clear_error(tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["engine.max_batchsize=3"])
    with pytest.raises(ConfigError, match="job: Input should be 'synthesize' or 'caption' \\(got 'train'\\)"):
        load_config(None, ["job=train"])
    cli = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "synthesize", "--set", "compute.min_actors=0"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 2 and "bad configuration" in cli.stderr


@pytest.mark.timeout(600)
def test_an_actor_that_fails_to_start_is_replaced_up_to_start_failures(ray_session, gate, tmp_path):
    """A model actor whose start fails (loading the model ran out of memory; Ray does not restart an
    actor whose constructor raised) is replaced and the job completes; with
    ``compute.start_failures=0`` (Ray Data's own default) the same failure ends the job."""
    keys = write_prompts(tmp_path / "p.txt", 8)
    fails = ("compute.actor_class=tests.support.scale_actors:FailsOnceAtStart", "compute.gpus_per_actor=0")
    cfg = job("stand-in", "synthesize", tmp_path / "p.txt", tmp_path / "a", "output.contact_sheet=0", *fails)
    assert cfg.compute.start_failures == 2
    summary = run_job(cfg)
    assert (gate.folder / "failed-at-start").exists()  # the first actor did fail
    assert summary["complete"] and sorted(r["key"] for r in output_rows(str(tmp_path / "a"))) == sorted(keys)

    gate.reset()
    strict = job(
        "stand-in", "synthesize", tmp_path / "p.txt", tmp_path / "b", "output.contact_sheet=0", "compute.start_failures=0", *fails
    )  # fmt: skip
    with pytest.raises(Exception, match="out of memory while loading the model"):
        run_job(strict)


@pytest.mark.timeout(600)
def test_an_actor_with_the_wrong_columns_fails_the_job_naming_them(ray_session, tmp_path):
    """A ``compute.actor_class`` that returns other columns than the job's output declares fails the
    job with a message that names them, and commits nothing (never a shard with nulls in a missing
    column or without an undeclared one)."""
    write_prompts(tmp_path / "p.txt", 4)
    wrong = "compute.actor_class=tests.support.scale_actors:WrongColumnsStandIn"
    out = tmp_path / "out"
    cfg = job("stand-in", "synthesize", tmp_path / "p.txt", out, "output.contact_sheet=0", wrong)
    with pytest.raises(Exception, match="returned no column 'phash'; returned a column 'tokens' that is not declared"):
        run_job(cfg)
    assert committed_shards(str(out)) == 0
