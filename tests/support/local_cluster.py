"""A real multi-node Ray cluster on this machine, for tests: Ray's own ``ray.cluster_utils.Cluster``.

Every node is a separate raylet with its own resources and object store; worker nodes carry a fake
``GPU`` and a ``janus_worker`` resource so that model actors land on them, never on the head. All
nodes listen on 127.0.0.1 only. Jobs reach the cluster as users' jobs do: a driver process (the CLI)
with ``RAY_ADDRESS`` set to ``address``.

The cluster lives in a child process that this module talks to over a pipe. Starting Ray nodes
repoints process-wide Ray state (the internal KV client) at the new cluster, which would break a
local Ray that the test process itself is connected to (the ``ray_session`` fixture).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
WORKER_RESOURCE = "janus_worker"
# On Linux Ray swaps 127.0.0.1 for the machine's routable address when a driver connects; with this
# set (in the cluster's processes and in drivers) nodes and drivers all stay on the loopback address.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass(frozen=True)
class WorkerNode:
    node_id: str
    raylet_pid: int


class LocalCluster:
    """Head (CPUs for read and write tasks, no GPU) plus worker nodes added and removed at will."""

    def __init__(self, head_cpus: int = 2, head_store_mb: int = 150):
        # A private Ray temp dir (short: it holds Unix sockets): the head records its address there, not
        # in /tmp/ray, where a plain ray.init() of another process on this machine would find it and join.
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        self.env = {**LOOPBACK_ENV, "RAY_TMPDIR": self.temp_dir}
        self._lock = threading.Lock()
        spawn = multiprocessing.get_context("spawn")
        self._conn, child = spawn.Pipe()
        self._process = spawn.Process(
            target=_serve, args=(child, self.env, head_cpus, head_store_mb), daemon=True
        )
        self._process.start()
        self.address: str = self._call("address")

    def _call(self, *request: Any) -> Any:
        with self._lock:
            self._conn.send(request)
            ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"local cluster: {request[0]} failed: {value}")
        return value

    def add_worker(self, cpus: int = 2, gpus: int = 1, store_mb: int = 150) -> WorkerNode:
        """A worker node with ``gpus`` fake GPUs (torch sees none: actors run on CPU), one
        ``janus_worker`` per GPU and a ``store_mb`` object store; returns once the node has joined."""
        return WorkerNode(*self._call("add_worker", cpus, gpus, store_mb))

    def remove(self, node: WorkerNode) -> None:
        """Kill the node's raylet and every process on it, as when a machine is lost."""
        self._call("remove", node.node_id)

    def store_stats(self) -> tuple[int, int]:
        """(bytes in use, bytes spilled so far) over all object stores: Ray's own memory stats."""
        return self._call("store_stats")

    def driver_env(self, **extra: str) -> dict[str, str]:
        """Environment for a driver process (the CLI) that runs a job on this cluster."""
        return {**os.environ, **self.env, "RAY_ADDRESS": self.address, "PYTHONPATH": str(REPO), **extra}

    def shutdown(self) -> None:
        try:
            self._call("shutdown")
        finally:
            self._process.join(timeout=60)
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _serve(conn: Connection, env: dict[str, str], head_cpus: int, head_store_mb: int) -> None:
    """The child process: owns the ``Cluster`` and answers the parent's requests until shutdown."""
    os.environ.update(env)
    from ray._private.internal_api import get_memory_info_reply
    from ray.cluster_utils import Cluster

    def node_args(store_mb: int, **args: object) -> dict:
        return {"node_ip_address": "127.0.0.1", "object_store_memory": store_mb * 2**20, **args}

    def remove(node: Any) -> None:
        children = _children(node.all_processes["raylet"][0].process.pid)
        cluster.remove_node(node, allow_graceful=False)
        for pid in children:  # Ray's agents outlive a killed raylet for minutes
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    cluster = Cluster(
        initialize_head=True,
        head_node_args=node_args(head_store_mb, num_cpus=head_cpus, include_dashboard=False),
    )
    workers: dict[str, Any] = {}
    while True:
        command, *args = conn.recv()
        try:
            if command == "address":
                value: Any = cluster.address
            elif command == "add_worker":
                cpus, gpus, store_mb = args
                node = cluster.add_node(
                    **node_args(store_mb, num_cpus=cpus, num_gpus=gpus, resources={WORKER_RESOURCE: gpus})
                )
                cluster.wait_for_nodes()
                workers[node.node_id] = node
                value = (node.node_id, node.all_processes["raylet"][0].process.pid)
            elif command == "remove":
                remove(workers.pop(args[0]))
                value = None
            elif command == "store_stats":
                stats = get_memory_info_reply(cluster.global_state).store_stats
                value = (stats.object_store_bytes_used, stats.spilled_bytes_total)
            elif command == "shutdown":
                for node in workers.values():
                    remove(node)
                remove(cluster.head_node)
                conn.send((True, None))
                return
            else:
                raise ValueError(f"unknown request {command!r}")
        except Exception as exc:  # the parent raises it with the request's name
            conn.send((False, f"{type(exc).__name__}: {exc}"))
        else:
            conn.send((True, value))


def cli_summary(stdout: str) -> dict:
    """The summary JSON a CLI job prints, from its stdout: Ray may forward lines from the cluster
    before it and after it (a lost node's connection errors, say)."""
    return json.JSONDecoder().raw_decode(stdout, stdout.rindex('{\n  "job"'))[0]


def _children(parent: int) -> dict[int, str]:
    """Live child processes of ``parent``: pid -> command line."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            title = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found[int(proc.name)] = title
    return found


def actor_pids(node: WorkerNode, name: str) -> list[int]:
    """Pids of Ray worker processes on ``node`` (children of its raylet) whose title contains ``name``."""
    return sorted(
        pid
        for pid, title in _children(node.raylet_pid).items()
        if title.startswith("ray::") and name in title
    )
