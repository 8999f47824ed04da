"""The batch jobs where clusters break them: many nodes, lost nodes, new nodes, flaky object storage,
slow sinks and inputs too big for one machine's memory. Every test checks each input row exactly once.

Multi-node tests run a real cluster of separate raylets on this machine (``local_cluster``) and reach it
as users do: the CLI with ``RAY_ADDRESS``. Storage faults come from a proxy in front of moto's S3
server (``faulty_s3``). Where the model does not matter, ``compute.actor_class`` swaps in a model-free
stand-in (``scale_actors``) behind the real reader, actor pool and sink.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from janus.testing import write_tiny_checkpoint
from pipeline.actors import Synthesizer
from pipeline.config import ConfigError, load_config
from pipeline.job import model_actor_class, run_job
from pipeline.sources import read_prompts
from pipeline.storage import StorageError
from tests.support.faulty_s3 import FaultPlan, FaultyS3Proxy
from tests.support.local_cluster import REPO, WORKER_RESOURCE, LocalCluster, actor_pids, cli_summary


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("scale") / "tiny", seed=5, vq_ch_mult=(1, 2)))


@pytest.fixture()
def cluster():
    c = LocalCluster()
    try:
        yield c
    finally:
        c.shutdown()


def settings(model_dir: str, input_url: str, output_url: str, *extra: str) -> list[str]:
    """``--set`` values shared by these tests: the tiny model, small batches and shards."""
    return [
        f"model.path={model_dir}",
        "model.dtype=float32",
        f"input.url={input_url}",
        f"output.url={output_url}",
        "output.rows_per_shard=4",
        "output.contact_sheet=0",
        "compute.batch_size=4",
        "engine.max_batch_size=4",
        "caption.max_new_tokens=4",
        *extra,
    ]


def start_cli(job: str, overrides: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """The user's entry point in its own process (a Ray driver). Its stderr, the job log, goes to
    ``log``, its stdout (the summary) next to it: files, so a chatty job never blocks on a pipe."""
    args = [a for value in overrides for a in ("--set", value)]
    with log.open("w") as err, log.with_suffix(".out").open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", job, *args], cwd=REPO, env=env, stdout=out, stderr=err
        )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> dict:
    """Wait for the CLI; its summary (the JSON on stdout, among any lines Ray forwards from the
    cluster), or a failure that shows the job log."""
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, f"job failed (rc {proc.returncode}):\n{log.read_text()[-4000:]}"
    return cli_summary(log.with_suffix(".out").read_text())


def output_rows(url: str, storage_options: dict | None = None) -> list[dict]:
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.invalidate_cache()
    rows = []
    for path in sorted(fs.glob(f"{root}/shard-*.parquet")):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def assert_exactly_once(rows: list[dict], expected_keys: list[str]) -> None:
    counts = Counter(r["key"] for r in rows)
    assert not [k for k, n in counts.items() if n > 1], "duplicated rows"
    assert sorted(counts) == sorted(expected_keys), "lost (or foreign) rows"


def assert_only_committed_shards(directory: Path) -> None:
    """Nothing half-written is visible: every tar and stats file belongs to a committed shard (its
    Parquet file exists), no temporary file is left, and the stats agree with the Parquet rows."""
    names = {p.name for p in directory.iterdir()}
    for name in names:
        assert name.startswith("shard-"), f"leftover {name}"
        shard = name.split(".")[0].removesuffix("_stats")
        assert f"{shard}.parquet" in names, f"{name} without its commit marker"
    for parquet in directory.glob("*.parquet"):
        stats = json.loads((directory / parquet.name.replace(".parquet", "_stats.json")).read_text())
        assert pq.read_metadata(parquet).num_rows == stats["count"]


def write_prompts(path: Path, n: int) -> list[str]:
    path.write_text("".join(f"prompt {i}: a small scene number {i}\n" for i in range(n)))
    return [r["key"] for r in read_prompts(str(path))]


def node_of(row: dict) -> str:
    """The node that made a row (``TracedSynthesizer`` appends it to the model name)."""
    return row["model"].rsplit("@", 1)[1]


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended first:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "timed out waiting for the job to get going"
        time.sleep(0.1)


def wait_for_first_shard(url: str, storage_options: dict, proc: subprocess.Popen, log: Path) -> float:
    """Wait until the job has committed a shard to ``url``; returns when."""
    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    wait_for(lambda: fs.invalidate_cache() or fs.glob(f"{root}/*.parquet"), proc, log, timeout=240)
    return time.time()


def new_bucket(s3_options: dict) -> str:
    bucket = f"scale-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3", **s3_options).mkdir(bucket)
    return bucket


# ---------------------------------------------------------------------------------------------
# the actor-class hook the stand-ins come through


def test_actor_class_hook():
    """``compute.actor_class``: the job's own actor by default; a bad value is a clear config error."""
    assert model_actor_class(load_config(None, []), Synthesizer) is Synthesizer
    stand_in = load_config(None, ["compute.actor_class=tests.support.scale_actors:StandInSynthesizer"])
    assert model_actor_class(stand_in, Synthesizer).__name__ == "StandInSynthesizer"
    with pytest.raises(ConfigError, match="must look like 'package.module:Class'"):
        load_config(None, ["compute.actor_class=tests.support.scale_actors.StandInSynthesizer"])
    for missing in (
        "tests.no_such_module:X",
        "tests.support.scale_actors:NoSuchClass",
        "tests.support.scale_actors:IMAGE_TOKENS",
    ):
        with pytest.raises(ConfigError, match="compute.actor_class"):
            model_actor_class(load_config(None, [f"compute.actor_class={missing}"]), Synthesizer)


# ---------------------------------------------------------------------------------------------
# a real multi-node cluster


def test_synthesis_and_caption_on_a_three_node_cluster(cluster, model_dir, s3_options, tmp_path):
    """Head + 2 workers, each its own raylet with a fake GPU; S3 in and out; the users' CLI path."""
    workers = [cluster.add_worker(), cluster.add_worker()]
    bucket = new_bucket(s3_options)
    (tmp_path / "p.txt").write_text("".join(f"a lighthouse in a storm, take {i}\n" for i in range(16)))
    fs = fsspec.filesystem("s3", **s3_options)
    fs.put_file(str(tmp_path / "p.txt"), f"{bucket}/prompts/p.txt")
    s3 = json.dumps(s3_options)
    pool = ["compute.min_actors=2", "compute.max_actors=2", f"compute.resources={{{WORKER_RESOURCE}: 1}}"]
    images, captions = f"s3://{bucket}/images", f"s3://{bucket}/captions"

    log = tmp_path / "synthesize.log"
    synth = settings(
        model_dir,
        f"s3://{bucket}/prompts",
        images,
        f"input.storage_options={s3}",
        f"output.storage_options={s3}",
        "compute.actor_class=tests.support.scale_actors:TracedSynthesizer",
        *pool,
    )
    summary = finish(start_cli("synthesize", synth, cluster.driver_env(), log), log)
    rows = output_rows(images, s3_options)
    assert_exactly_once(rows, [r["key"] for r in read_prompts(f"s3://{bucket}/prompts", s3_options)])
    assert summary["complete"] and all(r["status"] == "ok" for r in rows)
    # one actor per worker (one fake GPU each), none on the head, and both did work
    assert {node_of(r) for r in rows} == {w.node_id for w in workers}

    log = tmp_path / "caption.log"
    cap = settings(
        model_dir,
        images,
        captions,
        f"input.storage_options={s3}",
        f"output.storage_options={s3}",
        "input.format=webdataset",
        *pool,
    )
    summary = finish(start_cli("caption", cap, cluster.driver_env(), log), log)
    captioned = output_rows(captions, s3_options)
    assert summary["complete"] and len(captioned) == len(rows)
    assert sorted(r["source"].split("#")[1] for r in captioned) == sorted(r["key"] for r in rows)
    assert all(r["status"] == "ok" and isinstance(r["caption"], str) for r in captioned)


def test_losing_a_worker_node_mid_job(cluster, model_dir, tmp_path):
    """A worker node dies (all its processes killed) while its actor works: the job completes on the
    node that is left, every row once, no half-written shard in sight."""
    kept, doomed = cluster.add_worker(), cluster.add_worker()
    keys = write_prompts(tmp_path / "p.txt", 24)
    out, log = tmp_path / "out", tmp_path / "job.log"
    overrides = settings(
        model_dir,
        str(tmp_path / "p.txt"),
        str(out),
        "compute.actor_class=tests.support.scale_actors:TracedSynthesizer",
        "compute.min_actors=2",
        "compute.max_actors=2",
        f"compute.resources={{{WORKER_RESOURCE}: 1}}",
    )
    proc = start_cli("synthesize", overrides, cluster.driver_env(), log)
    actor = "MapBatches(TracedSynthesizer)"
    wait_for(lambda: actor_pids(doomed, actor) and len(list(out.glob("*.parquet"))) >= 1, proc, log)
    cluster.remove(doomed)

    summary = finish(proc, log)
    rows = output_rows(str(out))
    assert_exactly_once(rows, keys)
    assert summary["complete"] and all(r["status"] == "ok" for r in rows)
    assert {node_of(r) for r in rows} <= {kept.node_id, doomed.node_id}
    assert_only_committed_shards(out)


def test_a_node_added_mid_job_gets_actors_and_work(cluster, model_dir, tmp_path):
    """An autoscaling pool (min 1, max 2) on one worker; a second worker joins mid-job; the pool grows
    onto it and it produces part of the output."""
    first = cluster.add_worker()
    # enough work that some is still queued once the new node has joined and Ray Data has seen it
    # (starting a raylet takes seconds here, and a new actor loads its model before it takes work)
    keys = write_prompts(tmp_path / "p.txt", 192)
    out, log = tmp_path / "out", tmp_path / "job.log"
    overrides = settings(
        model_dir,
        str(tmp_path / "p.txt"),
        str(out),
        "compute.actor_class=tests.support.scale_actors:TracedSynthesizer",
        "compute.min_actors=1",
        "compute.max_actors=2",
        f"compute.resources={{{WORKER_RESOURCE}: 1}}",
    )
    proc = start_cli("synthesize", overrides, cluster.driver_env(), log)
    wait_for(lambda: actor_pids(first, "MapBatches(TracedSynthesizer)"), proc, log)
    second = cluster.add_worker()
    assert not list(out.glob("*.parquet")) or len(output_rows(str(out))) < len(keys)  # truly mid-job

    summary = finish(proc, log)
    rows = output_rows(str(out))
    assert_exactly_once(rows, keys)
    assert summary["complete"]
    made_by = Counter(node_of(r) for r in rows)
    assert set(made_by) == {first.node_id, second.node_id}, made_by


# ---------------------------------------------------------------------------------------------
# flaky object storage


FLAKY = FaultPlan(
    rates={"slowdown": 0.1, "internal": 0.06, "reset": 0.05, "reset_after": 0.05, "truncate": 0.04},
    slow_rate=0.1,
    slow_seconds=0.3,
    seed=7,
)


def session_env(ray_session) -> dict[str, str]:
    """Driver environment for a CLI job on the session's local Ray."""
    address = ray_session.get_runtime_context().gcs_address
    return {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(REPO)}


def test_flaky_object_storage_loses_and_duplicates_nothing(
    ray_session, model_dir, s3_endpoint, s3_options, tmp_path
):
    """Three S3 requests in ten fail (503 SlowDown, 500, reset before or after the store acted, a
    cut-off download) and one in ten is slow, for input reads and output writes alike: the job completes
    with every row once; the default retries absorb it and failed attempts are logged."""
    bucket = new_bucket(s3_options)
    write_prompts(tmp_path / "p.txt", 20)
    fsspec.filesystem("s3", **s3_options).put_file(str(tmp_path / "p.txt"), f"{bucket}/in/p.txt")
    with FaultyS3Proxy(s3_endpoint, FLAKY) as proxy:
        flaky = json.dumps({**s3_options, "client_kwargs": {"endpoint_url": proxy.url}})
        overrides = settings(
            model_dir,
            f"s3://{bucket}/in",
            f"s3://{bucket}/out",
            f"input.storage_options={flaky}",
            f"output.storage_options={flaky}",
            "compute.gpus_per_actor=0",
        )
        log = tmp_path / "job.log"
        summary = finish(start_cli("synthesize", overrides, session_env(ray_session), log), log)
    rows = output_rows(f"s3://{bucket}/out", s3_options)
    assert_exactly_once(rows, [r["key"] for r in read_prompts(f"s3://{bucket}/in", s3_options)])
    assert summary["complete"] and all(r["status"] == "ok" for r in rows)
    assert sum(proxy.injected.values()) >= 5 and len(proxy.injected) >= 3, proxy.injected
    retries = [line for line in log.read_text().splitlines() if ": attempt " in line and " failed (" in line]
    assert any("503 SlowDown" in line or "500 InternalError" in line for line in retries)
    # bounded: botocore's max_attempts (5 retries: 6 attempts) is the most any request got
    assert max(int(line.split(": attempt ")[1].split()[0]) for line in retries) <= 6


def test_a_bucket_that_keeps_failing_ends_the_job_with_a_clear_error(
    ray_session, model_dir, s3_endpoint, s3_options, tmp_path
):
    """Permanent failure, before and during the job: a bounded number of requests, then an error that
    names the URL, never a hang."""
    bucket = new_bucket(s3_options)
    write_prompts(tmp_path / "p.txt", 24)
    with FaultyS3Proxy(s3_endpoint, FaultPlan(fail_buckets=frozenset({bucket}))) as proxy:
        # two attempts per request (max_attempts counts retries), so the test waits seconds, not minutes
        failing = {
            **s3_options,
            "client_kwargs": {"endpoint_url": proxy.url},
            "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}},
        }
        out = f"s3://{bucket}/out"
        cfg = load_config(
            None,
            settings(
                model_dir, str(tmp_path / "p.txt"), out, f"output.storage_options={json.dumps(failing)}"
            ),
        )
        t0 = time.time()
        with pytest.raises(StorageError, match=f"cannot read the output {out}: .*reduce your request rate"):
            run_job(cfg)
        assert time.time() - t0 < 60
        # 2 attempts x s3fs's 5 tries of a throttled request, then it gives up
        assert 2 <= len(proxy.requests) <= 10 and set(proxy.injected) == {"slowdown"}

        # the bucket works at first, then fails for good while shards are being written
        proxy.plan = FaultPlan()
        overrides = settings(
            model_dir,
            str(tmp_path / "p.txt"),
            out,
            f"output.storage_options={json.dumps(failing)}",
            "compute.gpus_per_actor=0",
        )
        log = tmp_path / "job.log"
        proc = start_cli("synthesize", overrides, session_env(ray_session), log)
        fs = fsspec.filesystem("s3", **s3_options)
        wait_for(lambda: fs.invalidate_cache() or fs.glob(f"{bucket}/out/*.parquet"), proc, log)
        proxy.plan = FaultPlan(fail_buckets=frozenset({bucket}))
        proc.wait(timeout=120)
    assert proc.returncode != 0
    assert f"cannot write {out}/shard-" in log.read_text()


# ---------------------------------------------------------------------------------------------
# backpressure and memory


class MemoryWatch(threading.Thread):
    """Samples, every 0.2 s, the cluster's object store use and spilling (Ray's memory stats, summed
    over all nodes) and a driver process's resident memory (``rss``: (time, bytes) pairs)."""

    def __init__(self, cluster: LocalCluster | None, driver_pid: int):
        super().__init__(daemon=True)
        self.cluster, self.driver_pid = cluster, driver_pid
        self.store_peak = self.spilled = 0
        self.rss: list[tuple[float, int]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            try:
                status = Path(f"/proc/{self.driver_pid}/status").read_text()
            except OSError:
                return
            if "VmRSS:" not in status:  # the driver has exited
                return
            self.rss.append((time.time(), int(status.split("VmRSS:")[1].split()[0]) * 1024))
            if self.cluster is not None:
                used, spilled = self.cluster.store_stats()
                self.store_peak = max(self.store_peak, used)
                self.spilled = max(self.spilled, spilled)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def rss_between(self, start: float, end: float) -> list[int]:
        return [rss for t, rss in self.rss if start <= t <= end]


def streaming_finished_at(log: Path) -> float:
    """When Ray Data says the job's dataset finished, from the driver's log."""
    line = next(line for line in log.read_text().splitlines() if "execution finished in" in line)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_a_slow_sink_holds_memory_bounded(cluster, s3_endpoint, s3_options, tmp_path):
    """2,000 rows of 384 px images (885 MB, more than the cluster's whole object store) from fast
    stand-in actors into a sink whose every S3 request waits 0.1 s. Ray Data's streaming executor holds
    the actors back to the sink's pace: object store use stays within its budget (set to 20% of the
    store here), nothing spills to disk, the driver does not grow, and every row lands once."""
    cluster.add_worker(store_mb=300)
    cluster.add_worker(store_mb=300)
    n, budget_fraction = 2000, 0.2
    keys = write_prompts(tmp_path / "p.txt", n)
    bucket = new_bucket(s3_options)
    with FaultyS3Proxy(s3_endpoint, FaultPlan(slow_rate=1.0, slow_seconds=0.1)) as proxy:
        slow = json.dumps({**s3_options, "client_kwargs": {"endpoint_url": proxy.url}})
        overrides = settings(
            "stand-in",
            str(tmp_path / "p.txt"),
            f"s3://{bucket}/out",
            f"output.storage_options={slow}",
            "output.rows_per_shard=50",
            "compute.batch_size=10",
            "compute.actor_class=tests.support.scale_actors:StandInSynthesizer",
            "compute.min_actors=2",
            "compute.max_actors=2",
        )
        log = tmp_path / "job.log"
        env = cluster.driver_env(RAY_DATA_OBJECT_STORE_MEMORY_LIMIT_FRACTION=str(budget_fraction))
        proc = start_cli("synthesize", overrides, env, log)
        watch = MemoryWatch(cluster, proc.pid)
        watch.start()
        first_shard = wait_for_first_shard(f"s3://{bucket}/out", s3_options, proc, log)
        summary = finish(proc, log)
        watch.stop()
    assert summary["complete"] and summary["this_run"]["count"] == n
    assert_exactly_once(output_rows(f"s3://{bucket}/out", s3_options), keys)
    produced, store = n * 384 * 384 * 3, (150 + 2 * 300) * 2**20
    assert produced > store
    # Ray Data's budget counts each block once; a block made on one node and written from another
    # exists twice while it crosses (and the sink's task arguments stay pinned while it runs), so the
    # store can hold up to about twice the budget. Without backpressure it would fill and spill.
    print(f"object store peak {watch.store_peak / 2**20:.0f} MiB, budget {budget_fraction * store / 2**20:.0f} MiB")
    assert 0 < watch.store_peak < 2 * budget_fraction * store, watch.store_peak
    assert watch.spilled == 0
    streaming = watch.rss_between(first_shard, streaming_finished_at(log))
    assert max(streaming) - streaming[0] < 30 * 2**20, streaming


def test_a_million_row_input_streams_through_a_bounded_driver(ray_session, s3_options, tmp_path):
    """1,000,000 prompts in one JSONL object on S3 pass the real reader, resume filter, an actor pool
    (a stand-in that fails each row: the cheapest row to write) and the sink. The driver holds block
    references, never rows: its memory stays flat while the rows stream, and its peak (the final
    duplicate check) grows with the number of keys at a fraction of the rows' own size."""
    n = 1_000_000
    bucket = new_bucket(s3_options)
    fs = fsspec.filesystem("s3", **s3_options)
    with fs.open(f"{bucket}/in/prompts.jsonl", "wb") as f:
        for start in range(0, n, 100_000):
            lines = (
                json.dumps({"prompt": f"a small scene, number {i}"}) for i in range(start, start + 100_000)
            )
            f.write(("\n".join(lines) + "\n").encode())
    so = json.dumps(s3_options)
    overrides = settings(
        "stand-in",
        f"s3://{bucket}/in/prompts.jsonl",
        f"s3://{bucket}/out",
        f"input.storage_options={so}",
        f"output.storage_options={so}",
        "output.rows_per_shard=50000",
        "compute.batch_size=10000",
        "compute.actor_class=tests.support.scale_actors:RejectingStandInSynthesizer",
        "compute.gpus_per_actor=0",
        "compute.max_actors=2",
    )
    log = tmp_path / "job.log"
    proc = start_cli("synthesize", overrides, session_env(ray_session), log)
    watch = MemoryWatch(None, proc.pid)
    watch.start()
    first_shard = wait_for_first_shard(f"s3://{bucket}/out", s3_options, proc, log)
    summary = finish(proc, log, timeout=400)
    watch.stop()
    assert summary["complete"] and summary["this_run"]["count"] == n and summary["duplicate_keys"] == 0
    # while the rows stream (from the first committed shard to the last) the driver stays flat
    streaming = watch.rss_between(first_shard, streaming_finished_at(log))
    assert max(streaming) - streaming[0] < 30 * 2**20, streaming
    # its peak comes after the rows, in the exactly-once check over the committed keys: 150-200 bytes a
    # key (fixed-width copies, Parquet reads in 16 threads), where the rows as Python objects take ~1 KB
    peak = max(rss for _, rss in watch.rss)
    assert peak - streaming[0] < 300 * n, (streaming[0], peak)
