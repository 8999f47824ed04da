"""A Ray head as users start one, ``ray start --head``, for tests of what runs beside it or on it.

Token authentication on (``RAY_AUTH_MODE=token``, with the test's own token in ``RAY_AUTH_TOKEN``), the
dashboard (the Jobs API) on 127.0.0.1, every port picked free, a private temp dir (its
``ray_current_cluster`` file is where a plain ``ray.init()`` with ``RAY_TMPDIR`` set to it finds the
head) and a private HOME, so nothing of the user's ``~/.ray`` is read or written. ``ray start --block``
stays in the foreground: stopping it (SIGTERM, and SIGKILL after 10 s) stops its processes, and
whatever still names the temp dir afterwards is killed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import REPO
from .local_cluster import LOOPBACK_ENV
from .serving import free_port

START_S = 300.0


class RayHead:
    def __init__(self, folder: Path, num_cpus: int = 3):
        self.temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: it holds Unix sockets
        self.home = folder / "home"
        self.home.mkdir()
        self.token = secrets.token_hex(16)
        self.log = folder / "head.log"
        self.dashboard_port = free_port()
        self.gcs_port = free_port()
        bin_dir = str(Path(sys.executable).parent)  # `janus-pipeline` for the jobs' entrypoints
        #: what every process of this head's machine has: a user who ran `ray start` here
        self.env = {
            **os.environ,
            **LOOPBACK_ENV,
            "HOME": str(self.home),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(REPO),
            "RAY_TMPDIR": self.temp_dir,
        }
        self.env.pop("RAY_ADDRESS", None)
        ports = {
            "--port": self.gcs_port,
            "--dashboard-port": self.dashboard_port,
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
        }
        args = [
            str(Path(bin_dir) / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={200 * 2**20}",
            "--disable-usage-stats",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]
        head_env = {**self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        with self.log.open("w") as out:
            self.process = subprocess.Popen(args, env=head_env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise

    @property
    def jobs_api(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def with_token(self) -> dict[str, str]:
        """The environment of a machine that submits to this head: its token, as README.md says."""
        return {**self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_S
        # RAY_TMPDIR/ray, as a user's `ray start` keeps /tmp/ray: where a plain ray.init() looks for it
        address_file = Path(self.temp_dir) / "ray" / "ray_current_cluster"
        while not (address_file.exists() and self._listening(self.dashboard_port)):
            assert self.process.poll() is None, f"ray start exited ({self.process.returncode}):\n{self.tail()}"
            assert time.monotonic() < deadline, f"no Ray head after {START_S:.0f} s:\n{self.tail()}"
            time.sleep(0.5)
        while True:  # the Jobs API answers once the dashboard's job module is up
            probe = subprocess.run(
                [self.env["PATH"].split(os.pathsep)[0] + "/ray", "job", "list", "--address", self.jobs_api],
                env=self.with_token(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            if probe.returncode == 0:
                return
            assert time.monotonic() < deadline, f"the Jobs API does not answer:\n{probe.stderr}\n{self.tail()}"
            time.sleep(2)

    @staticmethod
    def _listening(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # it stops its processes, gracefully: ~30 s
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        for proc in Path("/proc").iterdir():  # what outlived it (a worker stuck in a kernel call)
            try:
                if proc.name.isdigit() and self.temp_dir.encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
        shutil.rmtree(self.temp_dir, ignore_errors=True)
