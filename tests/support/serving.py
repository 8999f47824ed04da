"""Starting Ray Serve in tests on a loaded machine: Serve gives its HTTP proxy a fixed 60 s to start
and kills it otherwise, which a busy 2-core machine can miss; a second try then finds it warm."""

from __future__ import annotations

import logging
import socket

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(attempts: int = 3) -> int:
    """``serve.start`` on a free 127.0.0.1 port, retried when the proxy missed its start deadline."""
    from ray import serve
    from ray.exceptions import ActorDiedError, GetTimeoutError

    for attempt in range(1, attempts + 1):
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            return port
        except (ActorDiedError, GetTimeoutError) as exc:
            logger.warning("Serve's proxy did not start (attempt %d): %s", attempt, type(exc).__name__)
            serve.shutdown()
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")
