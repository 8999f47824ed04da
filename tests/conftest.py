"""Fixtures shared by the test files: tiny checkpoints, stores (local and S3 on moto), Ray, the gate
that holds a job's batches, and the project's shared folder beside the repository."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.support import REPO
from tests.support.gate import ENV as GATE_ENV
from tests.support.gate import Gate
from tests.support.stores import Store, s3_store

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
# Serve gives its HTTP proxy 5 s per readiness check (3 checks) before killing it: a busy 2-core machine
# can take longer to import the proxy; Ray's own processes read these from the environment at start
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
# Each node's dashboard agent runs psutil over every process every 5 s to publish node stats that no
# test reads (object store use comes from the raylets, metrics from the export port): ~20 s of CPU a
# session on a machine where the suite is CPU-bound. Once a minute is enough.
os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", "60000")
# Each node's log monitor globs its log folder for new files every 0.1 s below 1000 files, every 0.5 s
# above: 2.5 s of CPU a minute against 1.4 with 300 worker logs. A new worker's first lines reach the
# driver up to 0.5 s later; no test waits on them.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# One thread: the test models are tiny, and on a shared 2-core machine an OpenMP barrier that waits
# for a core another process holds made tests 2-5x slower with 2 threads (Ray's actors run one too).
torch.set_num_threads(1)

#: another location of the project's shared folder (or one that does not exist, to test without it)
SHARED_ENV = "JANUS_SHARED_DIR"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's ``shared`` folder, beside the repository (``../shared``) unless JANUS_SHARED_DIR
    names another. A user's clone has none: the tests that need it skip, saying so."""
    path = Path(os.environ.get(SHARED_ENV) or REPO.parent / "shared")
    if not path.is_dir():
        pytest.skip(f"needs the project's shared/ folder, not found at {path} (set {SHARED_ENV} to it)")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from janus.checkpoints import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "janus-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from janus.models import MultiModalityCausalLM

    return MultiModalityCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_processor(tiny_dir):
    from janus.models import VLChatProcessor

    return VLChatProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """The jobs' and the server's checkpoint: 144 codes per image (24 px) instead of the official 576
    make each image ~5x cheaper, and neither the pipeline nor the API cares about the image size (the
    engine and scheduler tests decode the official 24 x 24 grid)."""
    from tests.support.checkpoints import JOB_GRID, write_grid_checkpoint

    return str(write_grid_checkpoint(tmp_path_factory.mktemp("jobs") / "tiny", JOB_GRID, seed=5))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's server), stopped at the end of the session."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3_options(s3_endpoint) -> dict:
    """fsspec storage_options for the moto endpoint."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_endpoint},
    }


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    """The same test on a local directory and on a real S3 endpoint."""
    if request.param == "local":
        return Store(f"file://{tmp_path}/data", None)
    return s3_store(request.getfixturevalue("s3_options"))


@pytest.fixture(name="s3_store")
def s3_store_fixture(s3_options) -> Store:
    return s3_store(s3_options)


@pytest.fixture(scope="session")
def hf_pair(tmp_path_factory):
    """(transformers' JanusForConditionalGeneration, our model loaded from its converted weights, processor).

    The HF model is an independent implementation; its random weights are converted into the official
    on-disk layout (tests/support/hf_janus) and loaded by our loader, so any comparison checks our code
    against theirs, not against our own numbers.
    """
    from transformers import JanusForConditionalGeneration

    from janus.checkpoints import write_processor_configs, write_tiny_tokenizer
    from janus.models import MultiModalityCausalLM, VLChatProcessor
    from tests.support.hf_janus import randomize_, tiny_hf_janus_config, write_official_checkpoint_from_hf

    path = tmp_path_factory.mktemp("hf") / "janus-from-hf"
    path.mkdir()
    n_tokens = write_tiny_tokenizer(path)
    write_processor_configs(path)
    processor = VLChatProcessor.from_pretrained(path)
    config = tiny_hf_janus_config(vocab_size=-(-n_tokens // 64) * 64, image_token_id=processor.image_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        hf = JanusForConditionalGeneration(config)
        randomize_(hf, seed=1234)
    hf = hf.eval().float()
    write_official_checkpoint_from_hf(hf, path)
    ours = MultiModalityCausalLM.from_pretrained(path, dtype=torch.float32)
    return hf, ours, processor


@pytest.fixture(scope="session")
def gate_folder(tmp_path_factory) -> Iterator[Path]:
    """The gate's folder, put in the environment before any Ray starts, so every Ray worker (of the
    session's Ray and of local clusters) inherits it."""
    folder = tmp_path_factory.mktemp("gate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(GATE_ENV, str(folder))
        yield folder


@pytest.fixture()
def gate(gate_folder) -> Iterator[Gate]:
    """A fresh gate for one test (``scale_actors.GatedStandIn`` enters it); open at the end, so
    no actor of a failed test waits on."""
    g = Gate(gate_folder)
    g.reset()
    yield g
    g.open()


@pytest.fixture(scope="session")
def serve_port(ray_session) -> Iterator[int]:
    """Ray Serve on the session's Ray, started once (its controller and HTTP proxy cost seconds of CPU
    each start): tests deploy their apps on it and delete them when done. Its HTTP port on 127.0.0.1."""
    from ray import serve

    from tests.support.serving import start_serve

    port = start_serve()
    yield port
    serve.shutdown()


@pytest.fixture(scope="session")
def ray_session(gate_folder, tmp_path_factory):
    """One local Ray for the whole session, with two fake GPUs: torch sees no CUDA, so GPU actors
    must schedule on them and still run on the CPU. Under pytest-xdist only one worker may start it
    (``RAY_GROUP``): a second Ray would fight the first for the machine's cores."""
    import ray

    claim_ray_for_this_worker(tmp_path_factory.getbasetemp())
    if not ray.is_initialized():
        # address="local": never join a cluster that happens to run on this machine
        ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


# -- pytest-xdist: `make test` runs two workers ---------------------------------------------------------
# Every test that uses the session's Ray (directly or through a fixture) goes to one worker, in file
# order, so Ray, Serve and the module-scoped servers start once; likewise the tests on the multi-node
# cluster of test_scale.py. The other worker runs them and the in-process tests (one torch thread
# each) beside the Ray group. Serially (no -n) nothing changes.

RAY_GROUP = "ray"
#: the expensive fixture a test uses -> its xdist group (the first that matches wins)
GROUPS = {"ray_session": RAY_GROUP, "shared_cluster": "cluster"}


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    # a worker's own config says dist "no"; xdist keeps the run's choice in the option "loadgroup"
    grouping = bool(os.environ.get("PYTEST_XDIST_WORKER")) and bool(config.getoption("loadgroup", False))
    if grouping:
        for item in items:
            group = next((g for fixture, g in GROUPS.items() if fixture in item.fixturenames), None)
            if group:
                item.add_marker(pytest.mark.xdist_group(group))
    result = yield
    if grouping:
        for item in items:
            mark = item.get_closest_marker("xdist_group")
            if mark and "@" not in item.nodeid.rpartition("]")[2]:
                group_suffix(item, mark.args[0])
    return result


def group_suffix(item: pytest.Item, group: str) -> None:
    """The worker's half of xdist's loadgroup: ``nodeid@group`` is what its scheduler groups by.
    pytest-xdist 3.8 sets ``item._nodeid``, which pytest 9.2 no longer reads (ids are ``NodeId``
    objects in ``item._id``), so without this every test was its own unit and one module's tests ran
    on both workers, each starting the module's server and Ray."""
    new = f"{item.nodeid}@{group}"
    if hasattr(item, "_id"):
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(new)
    else:
        item._nodeid = new
    assert item.nodeid == new, (item.nodeid, new)


def claim_ray_for_this_worker(basetemp: Path) -> None:
    """Fail at once if a second xdist worker starts the session's Ray (the grouping above broke)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    claim = basetemp.parent / "ray-session-worker"  # the run's root, shared by its workers
    try:
        with open(claim, "x") as f:
            f.write(worker)
    except FileExistsError:
        owner = claim.read_text()
        if owner != worker:
            pytest.fail(
                f"xdist worker {worker} would start a second Ray ({owner} runs one): tests using "
                f"ray_session must carry xdist_group({RAY_GROUP!r}) and run with --dist loadgroup"
            )
