"""A real multi-node Ray cluster on this machine, for tests: Ray's own ``ray.cluster_utils.Cluster``.

Every node is a separate raylet with its own resources and object store; worker nodes carry a fake
``GPU`` and a ``janus_worker`` resource so that model actors land on them, never on the head. All
nodes listen on 127.0.0.1 only. Jobs reach the cluster as users' jobs do: a driver process (the CLI)
with ``RAY_ADDRESS`` set to ``address``.

The cluster lives in a child process that this module talks to over a pipe. Starting Ray nodes
repoints process-wide Ray state (the internal KV client) at the new cluster, which would break a
local Ray that the test process itself is connected to (the ``ray_session`` fixture). The child's
stdout and stderr go to a log file; every wait on the child is bounded, and a dead or stuck child
fails the test with that log's tail instead of blocking it.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from . import REPO

WORKER_RESOURCE = "janus_worker"
# On Linux Ray swaps 127.0.0.1 for the machine's routable address when a driver connects; with this
# set (in the cluster's processes and in drivers) nodes and drivers all stay on the loopback address.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
#: the longest any request to the child may take (starting a node on a loaded 2-core machine takes
#: tens of seconds); generous, because it only has to tell a stuck child from a slow one
CALL_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class WorkerNode:
    node_id: str
    cpus: int = 2
    gpus: int = 1
    store_mb: int = 150


class LocalCluster:
    """Head (CPUs for read and write tasks, no GPU) plus worker nodes added and removed at will."""

    def __init__(self, head_cpus: int = 2, head_store_mb: int = 150, log: Path | None = None):
        # A private Ray temp dir (short: it holds Unix sockets): the head records its address there, not
        # in /tmp/ray, where a plain ray.init() of another process on this machine would find it and join.
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        self.env = {**LOOPBACK_ENV, "RAY_TMPDIR": self.temp_dir}
        self.log = log or Path(self.temp_dir) / "cluster.log"
        self._lock = threading.Lock()
        self._broken: str | None = None
        self.live: list[WorkerNode] = []  # worker nodes added and not removed, oldest first
        spawn = multiprocessing.get_context("spawn")
        self._conn, child = spawn.Pipe()
        self._process = spawn.Process(
            target=_serve, args=(child, self.env, head_cpus, head_store_mb, str(self.log)), daemon=True
        )
        self._process.start()
        # Only the child holds its end now: if the child dies, our recv() sees EOF instead of waiting
        # for a message that our own copy of that end could still, in principle, send.
        child.close()
        try:
            self.address: str = self._call("address")
        except BaseException:
            self.shutdown()
            raise

    def _call(self, *request: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        """Send one request to the child and return its answer; a child that died, or did not answer
        within ``timeout``, fails with its log."""
        with self._lock:
            if self._broken:
                raise RuntimeError(f"local cluster: unusable since {self._broken}")
            try:
                self._conn.send(request)
                if not self._conn.poll(timeout):
                    self._broken = f"{request[0]!r} got no answer in {timeout:.0f} s"
                else:
                    ok, value = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._broken = f"the child process died during {request[0]!r} ({type(exc).__name__})"
            if self._broken:
                raise RuntimeError(f"local cluster: {self._broken}\n{self.log_tail()}")
        if not ok:
            raise RuntimeError(f"local cluster: {request[0]} failed: {value}\n{self.log_tail()}")
        return value

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the child's stdout and stderr (Ray's own processes log under ``temp_dir``)."""
        try:
            text = self.log.read_text(errors="replace")[-chars:]
        except OSError as exc:
            text = f"(unreadable: {exc})"
        return f"--- cluster process log {self.log} (exit code {self._process.exitcode}):\n{text}"

    def add_worker(self, cpus: int = 2, gpus: int = 1, store_mb: int = 150) -> WorkerNode:
        """A worker node with ``gpus`` fake GPUs (torch sees none: actors run on CPU), one
        ``janus_worker`` per GPU and a ``store_mb`` object store; returns once the node has joined."""
        node = WorkerNode(self._call("add_worker", cpus, gpus, store_mb), cpus, gpus, store_mb)
        self.live.append(node)
        return node

    def remove(self, node: WorkerNode) -> None:
        """Kill the node's raylet and every process on it, as when a machine is lost."""
        self.live.remove(node)
        self._call("remove", node.node_id)

    def workers(self, n: int, cpus: int = 2, gpus: int = 1, store_mb: int = 150) -> list[WorkerNode]:
        """Exactly ``n`` live worker nodes of this shape: the ones already there are kept (starting a
        node costs seconds of CPU), others are removed, missing ones added."""
        for node in [w for w in self.live if (w.cpus, w.gpus, w.store_mb) != (cpus, gpus, store_mb)]:
            self.remove(node)
        while len(self.live) > n:
            self.remove(self.live[-1])
        while len(self.live) < n:
            self.add_worker(cpus, gpus, store_mb)
        return list(self.live)

    def store_stats(self) -> tuple[int, int]:
        """(bytes in use, bytes spilled so far) over all object stores: Ray's own memory stats."""
        return self._call("store_stats")

    def driver_env(self, **extra: str) -> dict[str, str]:
        """Environment for a driver process (the CLI) that runs a job on this cluster."""
        return {**os.environ, **self.env, "RAY_ADDRESS": self.address, "PYTHONPATH": str(REPO), **extra}

    def shutdown(self) -> None:
        """Stop every node; a child that cannot do it is killed with all its processes."""
        try:
            if not self._broken:
                self._call("shutdown")
        finally:
            self._process.join(timeout=60)
            if self._process.is_alive() or self._broken:
                _kill_leftovers(self._process.pid, self.temp_dir)
                self._process.join(timeout=60)
            self._conn.close()
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _serve(conn: Connection, env: dict[str, str], head_cpus: int, head_store_mb: int, log: str) -> None:
    """The child process: owns the ``Cluster`` and answers the parent's requests until shutdown."""
    with open(log, "ab", buffering=0) as out:  # fds 1 and 2: also what Ray's own processes inherit
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    faulthandler.enable(sys.stderr)  # a hard crash still leaves its stacks in the log
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
                value = node.node_id
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


def _children(parent: int) -> list[int]:
    """Pids of the live child processes of ``parent``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(int(proc.name))
    return found


def _kill_leftovers(pid: int, temp_dir: str) -> None:
    """SIGKILL the child ``pid``, its descendants and any process that names the cluster's
    ``temp_dir`` (Ray's GCS and raylets, which a child that died first leaves orphaned)."""
    doomed, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        doomed.add(parent)
        todo.extend(_children(parent))
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp_dir in (proc / "cmdline").read_bytes().decode(errors="replace"):
                doomed.add(int(proc.name))
        except OSError:
            continue
    doomed.discard(os.getpid())
    for p in doomed:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
