"""GPU actors that heal: a model actor whose device broke (a CUDA error that poisons its context)
exits so that Ray restarts it and retries the batch; out of memory still splits the batch.

Without the exit, the error leaves the actor as an application error: Ray Data ends the job at the
first one, and a pool that retried it would send every later batch to the same broken process.
"""

from __future__ import annotations

import json

import pytest
import torch

from janus.engine.common import BatchEngine, Prepared, Result
from janus.engine.health import fatal_device_error
from pipeline.config import load_config
from pipeline.job import run_job
from pipeline.sources.prompt_files import read_prompts
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
