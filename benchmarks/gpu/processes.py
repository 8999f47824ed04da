"""The product's own processes as the suite starts them (the job CLI, the server, a section in
isolation): this checkout's code, a whole process group to stop, logs to read, a slow Ray start retried."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def product_env() -> dict[str, str]:
    """The environment of the product's own processes: this checkout first on the path (Ray's
    workers inherit it), so the code measured is this tree's whether or not a copy is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def start_process(cmd: list[str], log: Path) -> subprocess.Popen:
    """``cmd`` in its own session (so it can be stopped with all its children), output to ``log``."""
    with open(log, "ab") as f:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=product_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_process(proc: subprocess.Popen, grace_s: float = 20.0) -> int | None:
    """Ctrl-C first (Serve and Ray shut down cleanly), then SIGTERM, then SIGKILL, to the whole group."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
    with contextlib.suppress(ProcessLookupError):  # whatever of the group outlived its leader
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.poll()


def log_tail(log: Path, chars: int = 6000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


#: Ray's own message when its local node did not register within its fixed 30 s (ray/_private/node.py):
#: seen when another process held both cores of a 2-core machine (the test suite's other worker)
RAY_START_TIMEOUT = "The current node timed out during startup"
RAY_START_TRIES = 2


def ray_start_timed_out(*logs: Path) -> bool:
    return any(RAY_START_TIMEOUT in log_tail(log, 20000) for log in logs)


def last_json_object(text: str) -> dict[str, Any]:
    """The JSON summary the CLI prints last (an indented object starting on a line of its own)."""
    start = text.rfind("\n{\n")
    return json.loads(text[start + 1 if start >= 0 else 0 :])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
