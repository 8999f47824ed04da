"""The batch jobs where clusters break them: many nodes, lost nodes, new nodes, flaky object storage,
slow sinks and inputs too big for one machine's memory. Every test checks each input row exactly once.

Multi-node tests run a real cluster of separate raylets on this machine (``local_cluster``) and reach it
as users do: the CLI with ``RAY_ADDRESS``. Storage faults come from a proxy in front of moto's S3
server (``faulty_s3``). Where the model does not matter, ``compute.actor_class`` swaps in a model-free
stand-in (``scale_actors``) behind the real reader, actor pool and sink.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from jobs.outcome import ROWS_FAILED
from pipeline.actors import Synthesizer
from pipeline.config import ConfigError, load_config
from pipeline.graphs import model_actor_class
from pipeline.job import run_job
from pipeline.output import COMPLETE_FILE
from pipeline.recipe import RECIPE_FILE
from pipeline.sources.prompt_files import read_prompts
from tests.support.faulty_s3 import FaultPlan, FaultyS3Proxy, Trigger
from tests.support.jobs import (
    committed_shards,
    driver_imports,
    job_overrides,
    kill_running,
    million_row_job,
    output_rows,
    session_env,
    start_cli,
    write_prompts,
)
from tests.support.local_cluster import WORKER_RESOURCE, LocalCluster
from tests.support.memory import MemoryWatch
from tests.support.stores import new_bucket

GATED = "compute.actor_class=tests.support.scale_actors:GatedStandIn"  # model-free: see its docstring
#: every worker node of the shared cluster has this shape, so tests reuse the nodes already up (the
#: slow-sink test needs the larger object store; the others do not mind it)
NODE = {"store_mb": 300}


class SharedCluster:
    """One local cluster for the module's multi-node tests: a head and each worker node cost seconds of
    CPU to start, so tests take the nodes they need with ``cluster.workers(n)`` and keep what is there."""

    def __init__(self, log: Path):
        self.log, self.cluster = log, None

    def get(self) -> LocalCluster:
        if self.cluster is None:
            self.cluster = LocalCluster(log=self.log)
        return self.cluster

    def discard(self) -> None:
        if self.cluster is not None:
            self.cluster, c = None, self.cluster
            c.shutdown()


@pytest.fixture(scope="module")
def shared_cluster(gate_folder, tmp_path_factory):
    shared = SharedCluster(tmp_path_factory.mktemp("cluster") / "cluster.log")
    try:
        yield shared
    finally:
        kill_running()
        shared.discard()


@pytest.fixture()
def cluster(shared_cluster):
    c = shared_cluster.get()
    yield c
    # a job that outlived its test (which then failed) would take the next test's nodes: start afresh
    if kill_running() or c._broken:
        shared_cluster.discard()


def settings(model_dir: str, input_url: str, output_url: str, *extra: str, job: str = "synthesize") -> list[str]:
    """``--set`` values shared by these tests: the tiny model, small batches and shards, no contact
    sheet (synthesis), short captions (caption)."""
    own = "output.contact_sheet=0" if job == "synthesize" else "caption.max_new_tokens=4"
    return job_overrides(model_dir, input_url, output_url, own, *extra)


def on_workers(min_actors: int, max_actors: int) -> tuple[str, ...]:
    """``--set`` values for a pool of ``min_actors`` to ``max_actors`` actors on the worker nodes (never the head)."""
    return (
        f"compute.min_actors={min_actors}",
        f"compute.max_actors={max_actors}",
        f"compute.resources={{{WORKER_RESOURCE}: 1}}",
    )


def assert_exactly_once(rows: list[dict], expected_keys: list[str]) -> None:
    counts = Counter(r["key"] for r in rows)
    assert not [k for k, n in counts.items() if n > 1], "duplicated rows"
    assert sorted(counts) == sorted(expected_keys), "lost (or foreign) rows"


def assert_only_committed_shards(directory: Path) -> None:
    """Nothing half-written is visible: every tar and stats file belongs to a committed shard (its
    Parquet file exists), no temporary file is left, and the stats agree with the Parquet rows."""
    names = {p.name for p in directory.iterdir()} - {RECIPE_FILE, COMPLETE_FILE}
    for name in names:
        assert name.startswith("shard-"), f"leftover {name}"
        shard = name.split(".")[0].removesuffix("_stats")
        assert f"{shard}.parquet" in names, f"{name} without its commit marker"
    for parquet in directory.glob("*.parquet"):
        stats = json.loads((directory / parquet.name.replace(".parquet", "_stats.json")).read_text())
        assert pq.read_metadata(parquet).num_rows == stats["count"]


def node_of(row: dict) -> str:
    """The node that made a row (``TracedSynthesizer`` appends it to the model name)."""
    return row["model"].rsplit("@", 1)[1]


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


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_synthesis_and_caption_on_a_three_node_cluster(cluster, model_dir, s3_options, tmp_path):
    """Head + 2 workers, each its own raylet with a fake GPU; S3 in and out; the users' CLI path."""
    workers = cluster.workers(2, **NODE)
    bucket = new_bucket(s3_options, "scale")
    (tmp_path / "p.txt").write_text("".join(f"a lighthouse in a storm, take {i}\n" for i in range(16)))
    fs = fsspec.filesystem("s3", **s3_options)
    fs.put_file(str(tmp_path / "p.txt"), f"{bucket}/prompts/p.txt")
    s3 = json.dumps(s3_options)
    pool = on_workers(2, 2)
    images, captions = f"s3://{bucket}/images", f"s3://{bucket}/captions"

    log = tmp_path / "synthesize.log"

    def on_s3(input_url: str, output_url: str, *extra: str, job: str = "synthesize") -> list[str]:
        both = (f"input.storage_options={s3}", f"output.storage_options={s3}")
        return settings(model_dir, input_url, output_url, *both, *extra, *pool, job=job)

    synth = on_s3(
        f"s3://{bucket}/prompts", images, "compute.actor_class=tests.support.scale_actors:TracedSynthesizer"
    )
    summary = start_cli("synthesize", synth, cluster.driver_env(), log).finish(
        lambda: committed_shards(images, s3_options)
    )
    rows = output_rows(images, s3_options)
    assert_exactly_once(rows, [r["key"] for r in read_prompts(f"s3://{bucket}/prompts", s3_options)])
    assert summary["complete"] and all(r["status"] == "ok" for r in rows)
    # one actor per worker (one fake GPU each), none on the head, and both did work
    assert {node_of(r) for r in rows} == {w.node_id for w in workers}

    log = tmp_path / "caption.log"
    cap = on_s3(images, captions, "input.format=webdataset", job="caption")
    summary = start_cli("caption", cap, cluster.driver_env(), log).finish(
        lambda: committed_shards(captions, s3_options)
    )
    captioned = output_rows(captions, s3_options)
    assert summary["complete"] and len(captioned) == len(rows)
    assert sorted(r["source"].split("#")[1] for r in captioned) == sorted(r["key"] for r in rows)
    assert all(r["status"] == "ok" and isinstance(r["caption"], str) for r in captioned)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_losing_a_worker_node_mid_job(cluster, model_dir, gate, tmp_path):
    """A worker node dies (all its processes killed) while its actor works: the job completes on the
    node that is left, every row once, no half-written shard in sight."""
    kept, doomed = cluster.workers(2, **NODE)
    keys = write_prompts(tmp_path / "p.txt", 24)
    out, log = tmp_path / "out", tmp_path / "job.log"
    overrides = settings(model_dir, str(tmp_path / "p.txt"), str(out), GATED, *on_workers(2, 2))
    gate.hold(from_call=1)  # one batch gets through (a committed shard); every later one waits
    cli = start_cli("synthesize", overrides, cluster.driver_env(), log)
    gate.wait_for_entry(lambda e: e.held and e.node_id == doomed.node_id, cli.ended)
    cli.wait_for(lambda: committed_shards(str(out)) >= 1, "a committed shard")
    cluster.remove(doomed)  # with a batch in flight on it
    gate.open()

    summary = cli.finish(lambda: committed_shards(str(out)))
    rows = output_rows(str(out))
    assert_exactly_once(rows, keys)
    assert summary["complete"] and all(r["status"] == "ok" for r in rows)
    assert {node_of(r) for r in rows} <= {kept.node_id, doomed.node_id}
    assert_only_committed_shards(out)
    # the batch lost with the node ran again: one call more than the 6 batches of 4 rows
    assert len(gate.entries()) > len(keys) // 4, gate.entries()


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_two_node_losses_during_the_same_rows_make_no_error_row(cluster, gate, tmp_path):
    """A batch is lost with its node, and its row-by-row retry is lost with another node while one of
    its rows runs alone. Blaming every row in flight made that healthy row a permanent error row
    ("crashed the model actor repeatedly"); node losses alone must never make one."""
    (first,) = cluster.workers(1, **NODE)
    keys = write_prompts(tmp_path / "p.txt", 4)  # one batch
    out, log = tmp_path / "out", tmp_path / "job.log"
    overrides = settings("stand-in", str(tmp_path / "p.txt"), str(out), GATED, *on_workers(1, 1))
    gate.hold(from_call=0)  # every call waits until the gate opens
    cli = start_cli("synthesize", overrides, cluster.driver_env(), log)
    gate.wait_for_entry(lambda e: e.held and e.node_id == first.node_id, cli.ended)
    second = cluster.add_worker(**NODE)
    cluster.remove(first)  # the whole batch in flight
    # the restarted actor retries the batch row by row: its first row is held at the gate, alone
    gate.wait_for_entry(lambda e: e.held and e.node_id == second.node_id, cli.ended)
    third = cluster.add_worker(**NODE)
    cluster.remove(second)
    gate.open()

    summary = cli.finish(lambda: committed_shards(str(out)))
    rows = output_rows(str(out))
    assert_exactly_once(rows, keys)
    assert [r["error"] for r in rows if r["status"] != "ok"] == [] and summary["total"]["ok"] == len(keys)
    assert {node_of(r) for r in rows} == {third.node_id}
    # the batch ran whole on the first node, then row by row on the second and on the third
    assert [e.node_id for e in gate.entries()][:2] == [first.node_id, second.node_id], gate.entries()


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_node_added_mid_job_gets_actors_and_work(cluster, model_dir, gate, tmp_path):
    """An autoscaling pool (min 1, max 2) on one worker; a second worker joins mid-job; the pool grows
    onto it and it produces part of the output."""
    (first,) = cluster.workers(1, **NODE)
    # The gate holds the first actor at its second batch, so work stays queued until the new node has
    # joined, Ray Data has grown the pool onto it and the new actor has taken a batch.
    keys = write_prompts(tmp_path / "p.txt", 48)
    out, log = tmp_path / "out", tmp_path / "job.log"
    overrides = settings(model_dir, str(tmp_path / "p.txt"), str(out), GATED, *on_workers(1, 2))
    gate.hold(from_call=1)
    cli = start_cli("synthesize", overrides, cluster.driver_env(), log)
    gate.wait_for_entry(lambda e: e.held and e.node_id == first.node_id, cli.ended)
    second = cluster.add_worker(**NODE)
    assert not list(out.glob("*.parquet")) or len(output_rows(str(out))) < len(keys)  # truly mid-job
    gate.wait_for_entry(lambda e: e.node_id == second.node_id, cli.ended)
    gate.open()

    summary = cli.finish(lambda: committed_shards(str(out)))
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
    # the faults that matter most, given for sure whatever the draws say: a shard's commit marker
    # written by the store whose reply is lost (the retry must rewrite it, not duplicate it), and a
    # throttled read of the input
    triggers=(Trigger("reset_after", "PUT .parquet"), Trigger("slowdown", "GET .txt")),
    seed=7,
)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_flaky_object_storage_loses_and_duplicates_nothing(
    ray_session, model_dir, s3_endpoint, s3_options, tmp_path
):
    """Three S3 requests in ten fail (503 SlowDown, 500, reset before or after the store acted, a
    cut-off download) and one in ten is slow, for input reads and output writes alike: the job completes
    with every row once; the default retries absorb it and failed attempts are logged. The model does
    not matter here: a model-free stand-in writes 384 px images (production's size, so the tar PUTs
    weigh what real ones do) and starts in a second instead of ~10 s of CPU."""
    bucket = new_bucket(s3_options, "scale")
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
            "compute.actor_class=tests.support.scale_actors:StandInSynthesizer",
        )
        log = tmp_path / "job.log"
        cli = start_cli("synthesize", overrides, session_env(ray_session), log, python_flags=("-X", "importtime"))
        summary = cli.finish(lambda: committed_shards(f"s3://{bucket}/out", s3_options))
    # a driver never loads torch or transformers (~9 s of CPU each job on a 2-core machine), nor do
    # the read and write tasks (they import the same light modules)
    assert not {"torch", "transformers", "timm"} & driver_imports(log)
    rows = output_rows(f"s3://{bucket}/out", s3_options)
    assert_exactly_once(rows, [r["key"] for r in read_prompts(f"s3://{bucket}/in", s3_options)])
    assert summary["complete"] and all(r["status"] == "ok" for r in rows)
    assert sum(proxy.injected.values()) >= 5 and len(proxy.injected) >= 3, proxy.injected
    # the faults hit what matters: a commit whose reply was lost, then written again; a throttled read
    assert proxy.hits[("reset_after", "PUT .parquet")] >= 1, proxy.hits
    assert proxy.hits[("slowdown", "GET .txt")] >= 1, proxy.hits
    lost_replies = {
        p for m, p, f in proxy.requests if (m, f) == ("PUT", "reset_after") and p.endswith(".parquet")
    }
    assert all(proxy.attempts("PUT", p) >= 2 for p in lost_replies), lost_replies
    retries = [line for line in log.read_text().splitlines() if ": attempt " in line and " failed (" in line]
    assert any("503 SlowDown" in line or "500 InternalError" in line for line in retries)
    # bounded: botocore's max_attempts (5 retries: 6 attempts) is the most any request got
    assert max(int(line.split(": attempt ")[1].split()[0]) for line in retries) <= 6


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_bucket_that_keeps_failing_ends_the_job_with_a_clear_error(
    ray_session, model_dir, s3_endpoint, s3_options, gate, tmp_path
):
    """Permanent failure, before and during the job: a bounded number of requests, then an error that
    names the URL, never a hang."""
    bucket = new_bucket(s3_options, "scale")
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
        # found before Ray starts, like every bad output URL: one line, exit code 2 from the CLI
        with pytest.raises(ConfigError, match=f"output.url: cannot read the output {out}: .*reduce your request rate"):
            run_job(cfg)
        # 2 attempts x s3fs's 5 tries of a throttled request, then it gives up: bounded by requests,
        # whatever the machine's speed
        assert 2 <= len(proxy.requests) <= 10 and set(proxy.injected) == {"slowdown"}

        # the bucket works at first, then fails for good while shards are being written: the gate
        # holds the second batch, so the failure always comes mid-job
        proxy.plan = FaultPlan()
        overrides = settings(
            model_dir,
            str(tmp_path / "p.txt"),
            out,
            f"output.storage_options={json.dumps(failing)}",
            "compute.gpus_per_actor=0",
            GATED,
        )
        log = tmp_path / "job.log"
        gate.hold(from_call=1)
        cli = start_cli("synthesize", overrides, session_env(ray_session), log)
        gate.wait_for_entry(lambda e: e.held, cli.ended)
        cli.wait_for(lambda: committed_shards(out, s3_options) >= 1, "a committed shard")
        proxy.plan = FaultPlan(fail_buckets=frozenset({bucket}))
        gate.open()
        returncode = cli.wait()
    assert returncode != 0
    assert f"cannot write {out}/shard-" in log.read_text()


# ---------------------------------------------------------------------------------------------
# backpressure and memory


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_slow_sink_holds_memory_bounded(cluster, s3_endpoint, s3_options, tmp_path):
    """2,000 rows of 384 px images (885 MB, more than the cluster's whole object store) from fast
    stand-in actors into a sink whose every S3 request waits 0.1 s. Ray Data's streaming executor holds
    the actors back to the sink's pace: object store use stays within its budget (set to 20% of the
    store here), nothing spills to disk, and every row lands once. (The driver's own memory is a
    measurement, not a property: benchmarks/bench_driver_memory.py.)"""
    cluster.workers(2, **NODE)
    n, budget_fraction = 2000, 0.2
    keys = write_prompts(tmp_path / "p.txt", n)
    bucket = new_bucket(s3_options, "scale")
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
        cli = start_cli("synthesize", overrides, env, log)
        watch = MemoryWatch(cluster, cli.proc.pid)
        watch.start()
        summary = cli.finish(lambda: committed_shards(f"s3://{bucket}/out", s3_options))
        watch.stop()
    assert summary["complete"] and summary["this_run"]["count"] == n
    assert_exactly_once(output_rows(f"s3://{bucket}/out", s3_options), keys)
    produced, store = n * 384 * 384 * 3, (150 + 2 * NODE["store_mb"]) * 2**20
    assert produced > store
    # Ray Data's budget counts each block once; a block made on one node and written from another
    # exists twice while it crosses (and the sink's task arguments stay pinned while it runs), so the
    # store can hold up to about twice the budget. Without backpressure it would fill and spill.
    print(
        f"object store peak {watch.store_peak / 2**20:.0f} MiB, budget {budget_fraction * store / 2**20:.0f} MiB"
    )
    assert 0 < watch.store_peak < 2 * budget_fraction * store, watch.store_peak
    assert watch.spilled == 0


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_million_row_input_streams_through_a_bounded_driver(ray_session, s3_options, tmp_path):
    """1,000,000 prompts in one JSONL object on S3 pass the real reader, resume filter, an actor pool
    (a stand-in that fails each row: the cheapest row to write) and the sink: every row once, none
    duplicated. The driver holds block references, never rows; how its memory behaves meanwhile is
    measured by benchmarks/bench_driver_memory.py (a measurement, not a pass/fail property)."""
    n = 1_000_000
    bucket = new_bucket(s3_options, "scale")
    out = f"s3://{bucket}/out"
    overrides = million_row_job(f"s3://{bucket}/in/prompts.jsonl", out, s3_options, n)
    cli = start_cli("synthesize", overrides, session_env(ray_session), tmp_path / "job.log")
    summary = cli.finish(lambda: committed_shards(out, s3_options), returncode=ROWS_FAILED)  # none succeeds
    assert summary["complete"] and summary["this_run"]["count"] == n and summary["duplicate_keys"] == 0
