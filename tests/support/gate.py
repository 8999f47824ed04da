"""A gate that a test holds shut to stop a job's model actors at a batch of its choosing.

A test that kills something mid-job (the driver, an actor, a node) must kill it while a batch is in
flight, or the retry path it exists for may never run: a fast machine can finish the job before the
kill lands. A gated actor (``scale_actors.GatedStandIn``, ``GatedCaptionStandIn``) enters the gate
before each batch: it records the call (its pid and node) and, from call number ``hold_from`` on, waits until the test
opens the gate. The test waits for the record of a held call, kills, and opens the gate.

The gate is a folder because the actors are other processes, on other raylets of this machine. Its
path reaches them in the ``JANUS_TEST_GATE`` environment variable, set before Ray starts, so every
worker inherits it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ENV = "JANUS_TEST_GATE"
#: an actor never waits longer than this for a test that has gone away
MAX_HOLD_S = 2400.0


@dataclass(frozen=True)
class Entry:
    """One call that entered the gate: the ``index``-th over all actors of the job."""

    index: int
    pid: int
    node_id: str
    held: bool


class Gate:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    @classmethod
    def from_env(cls) -> Gate | None:
        folder = os.environ.get(ENV)
        return cls(folder) if folder else None

    # --- the test's side

    def reset(self) -> None:
        """Forget earlier calls; let every call pass."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)

    def hold(self, from_call: int) -> None:
        """Calls from index ``from_call`` on (0-based, over all actors) wait until ``open``."""
        (self.folder / "hold_from").write_text(str(from_call))

    def open(self) -> None:
        (self.folder / "open").touch()

    def entries(self) -> list[Entry]:
        found = []
        for path in sorted(self.folder.glob("entry-*")):
            record = json.loads(path.read_text())
            found.append(
                Entry(int(path.name.split("-")[1]), record["pid"], record["node_id"], record["held"])
            )
        return found

    def wait_for_entry(
        self, accept: Callable[[Entry], bool], ended: Callable[[], str | None], timeout: float = 1200
    ) -> Entry:
        """The first entry that ``accept``s. ``ended`` says why waiting is pointless (the job ended,
        with its log) or None; ``timeout`` is generous (a job's actors may take minutes to start on a
        loaded machine), and a held gate stops the job, so nothing races it."""
        deadline = time.monotonic() + timeout
        while True:
            match = next((e for e in self.entries() if accept(e)), None)
            if match is not None:
                return match
            reason = ended()
            assert reason is None, f"waiting at the gate for a batch, but {reason}"
            assert time.monotonic() < deadline, f"no matching batch reached the gate in {timeout:.0f} s"
            time.sleep(0.1)

    # --- the actor's side

    def enter(self, node_id: str) -> None:
        """Record this call, then wait if the test holds calls of its index."""
        hold_path, open_path = self.folder / "hold_from", self.folder / "open"
        hold_from = int(hold_path.read_text()) if hold_path.exists() else None
        index = 0
        tmp = self.folder / f".{uuid.uuid4().hex}"
        while True:  # claim the next free index: a hard link fails if the name exists (atomic)
            held = hold_from is not None and index >= hold_from and not open_path.exists()
            tmp.write_text(json.dumps({"pid": os.getpid(), "node_id": node_id, "held": held}))
            try:
                os.link(tmp, self.folder / f"entry-{index:05d}")
                break
            except FileExistsError:
                index += 1
        tmp.unlink()
        deadline = time.monotonic() + MAX_HOLD_S
        while held and not open_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
