"""A fault-injecting HTTP proxy for tests: flaky object storage in front of moto's S3 server.

Clusters see object stores throttle (503 SlowDown), fail (500 InternalError), drop connections
before or after a request took effect, cut downloads short and answer slowly. The proxy does each of
these for a configurable fraction of requests, and for sure on chosen operations (``Trigger``), so
the pipeline's retries and its exactly-once commits are tested against real HTTP, not mocks. It
records which operation every fault hit, so a test can check that the faults that matter happened
(a commit whose reply was lost, a read that was throttled), not only how many there were. It listens
on 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import PurePosixPath

# Each fault by name: what a client sees.
#   slowdown     503 SlowDown, the request never reaches the store (S3's throttling answer)
#   internal     500 InternalError, never reaches the store
#   reset        the connection is reset before the request is forwarded
#   reset_after  the request is applied by the store, then the connection is reset (the reply is lost)
#   truncate     a GET reply is cut off halfway through its body, then the connection is reset
FAULTS = ("slowdown", "internal", "reset", "reset_after", "truncate")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message><RequestId>faulty-s3</RequestId></Error>"
)


def operation(method: str, path: str) -> str:
    """What a request does, as ``METHOD kind``: kind ``bucket`` for bucket-level requests (listings),
    else the object's file type (``.parquet``, ``.tar``, ``.json``, ``.txt``, or ``object``), so that
    a test can name "the PUT of a shard's commit marker" without knowing generated names."""
    _bucket, _, key = path.lstrip("/").partition("/")
    if not key:
        return f"{method} bucket"
    return f"{method} {PurePosixPath(key).suffix or 'object'}"


@dataclass(frozen=True)
class Trigger:
    """A fault given for sure: ``fault`` on the ``nth`` (0-based) request of ``operation``."""

    fault: str
    operation: str  # as ``operation()`` names it, e.g. "PUT .parquet"
    nth: int = 0


@dataclass
class FaultPlan:
    """What to inject: ``rates`` maps a fault in ``FAULTS`` to the fraction of requests that get it;
    ``triggers`` are faults given whatever the draw says."""

    rates: dict[str, float] = field(default_factory=dict)
    slow_rate: float = 0.0  # fraction of requests answered ``slow_seconds`` late
    slow_seconds: float = 0.2
    fail_buckets: frozenset[str] = frozenset()  # every request to these buckets gets 503 SlowDown
    triggers: tuple[Trigger, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = (set(self.rates) | {t.fault for t in self.triggers}) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        if sum(self.rates.values()) > 1:
            raise ValueError("fault rates add up to more than 1")
        if any(t.fault == "truncate" and not t.operation.startswith("GET ") for t in self.triggers):
            raise ValueError("only a GET reply can be truncated")


class FaultyS3Proxy:
    """``with FaultyS3Proxy(upstream, plan) as proxy:`` point S3 clients at ``proxy.url``.

    ``proxy.injected`` counts the faults given, ``proxy.hits`` counts them by ``(fault, operation)``,
    ``proxy.requests`` lists ``(method, path, fault)`` for every request (fault ``None`` when it
    passed through untouched). ``proxy.plan`` may be replaced while clients run, e.g. to make a
    bucket fail for good mid-job.
    """

    def __init__(self, upstream: str, plan: FaultPlan | None = None):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.plan = plan or FaultPlan()
        self.injected: Counter[str] = Counter()
        self.hits: Counter[tuple[str, str]] = Counter()
        self.requests: list[tuple[str, str, str | None]] = []
        self._seen: Counter[str] = Counter()  # requests so far per operation, for triggers
        self._lock = threading.Lock()
        self._rng = random.Random(self.plan.seed)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultyS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def attempts(self, method: str, path: str) -> int:
        """How many times ``method path`` reached the proxy (first try plus retries)."""
        with self._lock:
            return sum(1 for m, p, _ in self.requests if m == method and p == path)

    def _choose(self, method: str, path: str) -> tuple[str | None, bool]:
        """(fault or None, slow?) for one request; the draw is reproducible for a given seed."""
        plan = self.plan
        bucket = path.lstrip("/").split("/", 1)[0]
        op = operation(method, path)
        with self._lock:
            nth = self._seen[op]
            self._seen[op] += 1
            if bucket in plan.fail_buckets:
                fault: str | None = "slowdown"
            else:
                draw = self._rng.random()  # drawn even when a trigger decides: the same seed, the same draws
                fault = next((t.fault for t in plan.triggers if (t.operation, t.nth) == (op, nth)), None)
                for name, rate in plan.rates.items() if fault is None else ():
                    if name == "truncate" and method != "GET":
                        continue
                    if draw < rate:
                        fault = name
                        break
                    draw -= rate
            slow = self._rng.random() < plan.slow_rate
            self.requests.append((method, path, fault))
            if fault:
                self.injected[fault] += 1
                self.hits[(fault, op)] += 1
            if slow:
                self.injected["slow"] += 1
        return fault, slow


def _handler_class(proxy: FaultyS3Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base class name
            pass  # the proxy's request list is the log

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                raw = bytearray()  # forwarded as is, still chunk-encoded
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while True:  # trailers, up to the blank line
                            trailer = self.rfile.readline()
                            raw += trailer
                            if trailer in (b"\r\n", b"\n", b""):
                                return bytes(raw)
                    raw += self.rfile.read(size + 2)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reset(self) -> None:
            """Drop the connection with a TCP RST, as a crashed load balancer does."""
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _error(self, status: int, code: str, message: str) -> None:
            body = _ERROR_BODY.format(code=code, message=message).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                conn.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
                resp = conn.getresponse()
                return resp.status, resp.getheaders(), resp.read()
            finally:
                conn.close()

        def _proxy(self) -> None:
            body = self._body()
            path = urllib.parse.urlsplit(self.path).path
            fault, slow = proxy._choose(self.command, path)
            if slow:
                time.sleep(proxy.plan.slow_seconds)
            if fault == "slowdown":
                return self._error(503, "SlowDown", "Please reduce your request rate.")
            if fault == "internal":
                return self._error(
                    500, "InternalError", "We encountered an internal error. Please try again."
                )
            if fault == "reset":
                return self._reset()
            status, headers, data = self._forward(body)
            if fault == "reset_after":
                return self._reset()
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            length = next((v for n, v in headers if n.lower() == "content-length"), None)
            if self.command == "HEAD":
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                return None
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if fault == "truncate" and len(data) > 1:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                return self._reset()
            self.wfile.write(data)
            return None

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy

    return Handler
