"""GPU actors that heal: a model actor whose device broke (a CUDA error that poisons its context)
exits so that Ray restarts it and retries the batch; out of memory still splits the batch.

Without the exit, the error leaves the actor as an application error: Ray Data ends the job at the
first one, and a pool that retried it would send every later batch to the same broken process.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from janus.engine.common import BatchEngine, Prepared, Result
from janus.engine.health import fatal_device_error
from pipeline.config import load_config
from pipeline.job import run_job
from pipeline.sources.prompt_files import read_prompts
from tests.support.checkpoints import JOB_IMAGE_PX
from tests.support.jobs import job_overrides, output_rows
from tests.support.scale_actors import BREAK, ILLEGAL_ACCESS


@pytest.mark.parametrize(
    "message",
    [
        ILLEGAL_ACCESS,
        "CUDA error: uncorrectable ECC error encountered",
        "CUDA error: device-side assert triggered",
        "CUDA error: unspecified launch failure",
        "CUDA error: misaligned address",
        "CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, m, n, k, ...)`",
    ],
)
def test_errors_that_poison_the_device_are_fatal(message):
    for exc in (RuntimeError(message), torch.AcceleratorError(message)):
        assert fatal_device_error(exc)


def test_a_fatal_error_is_found_under_the_errors_raised_from_it():
    try:
        try:
            raise torch.AcceleratorError(ILLEGAL_ACCESS)
        except RuntimeError as inner:
            raise ValueError("the scheduler step failed") from inner
    except ValueError as outer:
        assert "an illegal memory access" in fatal_device_error(outer)


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        ValueError("prompt is not valid UTF-8"),
        RuntimeError("Expected all tensors to be on the same device"),
        KeyError("image"),
    ],
)
def test_out_of_memory_and_ordinary_errors_are_not(exc):
    assert fatal_device_error(exc) is None


class _Engine(BatchEngine):
    """The engine skeleton alone (no model): its batches fail as ``fail`` says."""

    def __init__(self, fail):
        self.device = torch.device("cpu")
        self.decoder = type("Decoder", (), {"release": lambda self: None})()
        self.fail = fail
        self.calls: list[int] = []

    def run_batch(self, batch):
        self.calls.append(len(batch))
        self.fail(len(batch))
        return [Result() for _ in batch]


def test_out_of_memory_still_splits_the_batch_and_a_broken_device_is_not_split():
    def oom_above_one(n):
        if n > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")

    engine = _Engine(oom_above_one)
    batch = [Prepared(i, None, 1) for i in range(4)]
    assert all(r.ok for r in engine._run_splitting(batch))
    assert engine.calls == [4, 2, 1, 1, 2, 1, 1]

    def broken(n):
        raise torch.AcceleratorError(ILLEGAL_ACCESS)

    engine = _Engine(broken)
    with pytest.raises(torch.AcceleratorError):
        engine._run_splitting(batch)
    assert engine.calls == [4]  # not halved into more launches on a dead context, and no row errors


@pytest.mark.timeout(600)
def test_an_actor_whose_device_broke_is_restarted_and_every_row_ends_ok_once(ray_session, gate, tmp_path):
    prompts = [f"prompt {i}: a small scene" for i in range(16)]
    prompts[5] = f"prompt 5: {BREAK}"  # the second batch of 4 breaks the device
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    overrides = job_overrides(
        "stand-in",
        str(tmp_path / "p.txt"),
        str(out),
        "compute.actor_class=tests.support.scale_actors:DeviceBreakingStandIn",
        "compute.gpus_per_actor=0",
        "compute.max_actors=1",  # one actor: without the exit every later batch would go to the broken one
        "output.contact_sheet=0",
    )
    summary = run_job(load_config(None, ["job=synthesize", *overrides]))

    broke = json.loads((gate.folder / "device-broke").read_text())
    rows = output_rows(str(out))
    keys = [r["key"] for r in read_prompts(str(tmp_path / "p.txt"))]
    assert sorted(r["key"] for r in rows) == sorted(keys)  # every row exactly once
    assert {r["status"] for r in rows} == {"ok"}, [r["error"] for r in rows if r["status"] != "ok"]
    pids = {r["key"]: r["model"].rsplit("@", 1)[1] for r in rows}
    assert all(pids[k] != str(broke["pid"]) for k in broke["keys"])  # retried in a fresh process
    assert summary["complete"] and summary["total"]["ok"] == len(keys)


def test_a_scheduler_whose_device_broke_fails_its_requests_and_every_later_one_as_device_lost(
    tiny_model, tiny_processor
):
    from janus.engine import SynthesisEngine
    from janus.engine.scheduler import BackgroundScheduler, Scheduler
    from janus.engine.status import DEVICE_LOST
    from tests.support.broken_device import break_on_demand

    engine = SynthesisEngine(tiny_model, tiny_processor, max_batch_size=2)
    device = break_on_demand(engine.decoder)
    loop = BackgroundScheduler(Scheduler(engine, slots=4))
    try:
        assert loop.submit({"prompt": "a red circle", "seed": 1}).wait(120).ok
        device["broken"] = True
        first = loop.submit({"prompt": "a blue square", "seed": 2}).wait(120)  # in flight as it breaks
        later = loop.submit({"prompt": "a green circle", "seed": 3}).wait(5)  # refused at once
    finally:
        loop.close()
    for res in (first, later):
        assert res.code == DEVICE_LOST and "illegal memory access" in res.error
    assert loop.scheduler.device_error


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["scheduler", "batch"])
def test_a_serve_replica_whose_device_broke_answers_503_and_is_replaced(serve_port, model_dir, mode):
    import httpx
    from ray import serve

    from pipeline.config import QualitySection
    from pipeline.serve.app import JanusAPI
    from pipeline.serve.config import APISection, BatchingSection
    from pipeline.serve.model_server import ModelServer

    small = {"ray_actor_options": {"num_cpus": 0.1}}
    synth = ModelServer.options(
        name="BreakingSynthesizer",
        health_check_period_s=1,
        max_ongoing_requests=8,
        max_queued_requests=16,
        **small,
    ).bind(
        "tests.support.broken_device:DeviceBreakingSynthesizer",
        {"path": model_dir, "name": "janus-test", "dtype": "float32"},
        {"max_batch_size": 2},
        {},
        BatchingSection(mode=mode, max_batch_size=2).model_dump(),
        QualitySection(score=False).options(),
    )
    settings = APISection(retry_after_s=2, deployment=small).model_dump()
    serve.run(
        JanusAPI.options(**small).bind(synth, None, {"synthesis": "janus-test"}, settings),
        name="broken",
        route_prefix="/broken",
    )
    handle = serve.get_deployment_handle("BreakingSynthesizer", app_name="broken")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}/broken", timeout=300) as client:
            body = {"prompt": "a red circle", "size": f"{JOB_IMAGE_PX}x{JOB_IMAGE_PX}", "seed": 1}
            assert client.post("/v1/images/generations", json=body).status_code == 200
            before = handle.stats.remote().result()["replica"]
            r = client.post("/v1/images/generations", json={**body, "prompt": f"a red circle {BREAK}"})
            assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
            assert r.json()["error"]["code"] == "model_unavailable"
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:  # Serve's health check finds it and starts another
                r = client.post("/v1/images/generations", json=body)
                if r.status_code == 200:
                    break
                assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
                time.sleep(1)
            assert r.status_code == 200 and r.json()["data"][0]["b64_json"]
            assert handle.stats.remote().result()["replica"] != before
    finally:
        serve.delete("broken")
