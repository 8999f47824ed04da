"""Running README.md's code blocks as written: found by their fences, run in order in one folder.

Shell blocks run in bash (``-e``: a failing command fails the block) with the project's environment
activated, as the quick start says (``source .venv/bin/activate``). A line that starts the online
server (``janus-pipeline serve``, not ``--dry-run``) starts it in the background and waits until its
``/health`` answers 200; the server then stays up for the blocks after it (the same command again
finds it running) until ``stop_servers`` sends it Ctrl-C. Python blocks run in a fresh interpreter;
SQL blocks through DuckDB's Python API (the command-line tool is not installed), a statement at a time;
YAML blocks as a job's or Serve's config. ``text`` blocks are listings, not code.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import REPO

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
SHELL, PYTHON, SQL, YAML, TEXT = ("bash", "sh", "shell"), ("python",), ("sql",), ("yaml", "yml"), ("text",)
#: what the folder the blocks run in holds from the repository (links): what a clone has
CLONE = ("configs", "Makefile", ".venv", "janus", "pipeline", "jobs")
#: copied, dated before ``.venv/.installed``: a clone whose environment is installed (make's view)
INSTALLED_FROM = ("pyproject.toml", "constraints.txt")
STARTUP_S = 600.0


@dataclass
class Block:
    lang: str
    code: str
    line: int  # where it starts in the file (1-based), for messages

    def where(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def readme_blocks(path: Path = REPO / "README.md") -> list[Block]:
    text = path.read_text()
    return [Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def logical_lines(code: str) -> list[str]:
    """Shell lines with their backslash continuations joined."""
    return code.replace("\\\n", " ").splitlines()


def starts_server(line: str) -> bool:
    words = shlex.split(line, comments=True)
    return words[:2] == ["janus-pipeline", "serve"] and "--dry-run" not in words


@dataclass
class Server:
    command: str
    process: subprocess.Popen
    log: Path


@dataclass
class Runner:
    folder: Path
    servers: list[Server] = field(default_factory=list)

    @classmethod
    def in_clone(cls, folder: Path) -> Runner:
        folder.mkdir(parents=True, exist_ok=True)
        for name in CLONE:
            (folder / name).symlink_to(REPO / name)
        for name in INSTALLED_FROM:
            (folder / name).write_bytes((REPO / name).read_bytes())
            os.utime(folder / name, (0, 0))
        return cls(folder)

    @property
    def env(self) -> dict[str, str]:
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
        env.pop("RAY_ADDRESS", None)  # as on a user's machine: the commands start their own Ray
        env["REGISTRY"] = "registry.example.com"  # the user's container registry, which blocks take from here
        return env

    def shell(self, code: str, log: Path, timeout: float = 1200) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["bash", "-e", "-c", code], cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        log.write_text(f"$ {code}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        assert proc.returncode == 0, f"failed (rc {proc.returncode}):\n{log.read_text()[-6000:]}"
        return proc

    def run_shell_block(self, block: Block, log: Path) -> None:
        lines = logical_lines(block.code)
        for i, line in enumerate(lines):
            if line.strip() and starts_server(line):
                self.shell("\n".join(lines[:i]), log.with_suffix(".before.log"))
                self.serve(line, log.with_suffix(".server.log"))
                return self.shell("\n".join(lines[i + 1 :]), log)
        self.shell(block.code, log)

    def run_python(self, block: Block, log: Path) -> None:
        script = log.with_suffix(".py")
        script.write_text(block.code)
        self.shell(f"python {shlex.quote(str(script))}", log)

    def serve(self, line: str, log: Path) -> None:
        command = " ".join(shlex.split(line, comments=True))
        if any(s.command == command and s.process.poll() is None for s in self.servers):
            return
        self.stop_servers()
        with log.open("w") as out:
            process = subprocess.Popen(
                shlex.split(command), cwd=self.folder, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        self.servers.append(Server(command, process, log))
        health = f"http://127.0.0.1:{self.port(command)}/health"
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert process.poll() is None, f"{command} exited ({process.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"{health} not 200 after {STARTUP_S:.0f} s"
            try:
                if urllib.request.urlopen(health, timeout=5).status == 200:
                    return
            except OSError:
                pass
            time.sleep(1)

    def port(self, command: str) -> int:
        import yaml

        words = command.split()
        config = yaml.safe_load((self.folder / words[words.index("--config") + 1]).read_text())
        return int(config["http_options"]["port"])

    def stop_servers(self) -> list[Server]:
        """Ctrl-C to every running server, as its README line says; the servers stopped."""
        stopped = [s for s in self.servers if s.process.poll() is None]
        for server in stopped:
            server.process.send_signal(signal.SIGINT)
            try:
                server.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()
        self.servers = []
        return stopped
