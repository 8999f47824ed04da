"""Poison rows: a row that kills its model actor every time ends as one error row, not an endless retry.

The model pool runs with ``max_task_retries=-1``: Ray restarts a crashed actor and retries its batch,
which is right for a lost node or a stray OOM kill, and wrong for a row that itself crashes the
process (a kernel fault, a segfault in a decoder): that batch would be retried forever. So the pool
runs every actor class inside ``CrashGuard``, which tells a job-scoped ``CrashJournal`` what it starts,
and on which node, before running it. An attempt that never reported its end died with its actor.

A death is blamed on a row only when the row was alone in flight and its node is still up: the
actor's process died while running that row and nothing else, on a machine that did not go away. A
death with a whole batch in flight blames no row; the batch is retried row by row, each row announced
first, so that the next death names its row. A lost node blames nothing, however often it happens:
node losses alone never make an error row. A row blamed for ``CRASH_LIMIT`` deaths is not run again
but handed to the actor as already failed, so it becomes one error row through the actor's own
columns. Every other row completes.

An actor whose device broke (``janus.engine.health``: a CUDA error that poisons the process's context,
such as an illegal memory access or an ECC error) would fail every later batch it is given, and Ray
retries a failed batch on the same actor. So the guard ends that process instead (``os._exit``, an
unexpected exit: Ray restarts the actor on a fresh context and retries the batch; ``exit_actor`` would
be an intentional exit, never restarted). To the journal this is a death like any crash: a row that
breaks the device every time still ends as one error row.

Cost: one small call to the journal per batch, and row-by-row runs only for a batch whose actor died.
The Serve path constructs the actor classes directly and never sees this. This module stays cheap to
import (no torch), so that model-free stand-in actors start fast.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from janus.engine.health import fatal_device_error

from .model_ref import load_class

logger = logging.getLogger(__name__)

#: deaths blamed on a row (it ran alone, on a node still up) before it is given up: one more than one,
#: so that a single stray kill (the OOM killer, an operator) never costs a healthy row
CRASH_LIMIT = 2


def node_alive(node_id: str) -> bool:
    """Whether Ray's GCS holds ``node_id`` as alive (a lost node is marked dead before its actors are
    restarted elsewhere, so before their batches' retries ask)."""
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


class CrashJournal:
    """Which rows were in flight, and where, when a model actor died; one per job, as a Ray actor."""

    def __init__(self, is_alive: Callable[[str], bool] = node_alive) -> None:
        #: batch id -> (node id, keys) of its latest attempt's rows in flight
        self.in_flight: dict[str, tuple[str, list[str]]] = {}
        self.deaths: Counter[str] = Counter()  # key -> actor deaths blamed on the row
        self.is_alive = is_alive

    def begin(self, batch: str, keys: list[str], node: str) -> bool:
        """An attempt of ``batch`` starts on ``node`` with all ``keys`` in flight; True when an
        earlier one died."""
        died = self.in_flight.pop(batch, None)
        if died is not None:
            self._blame(*died)
        self.in_flight[batch] = (node, list(keys))
        return died is not None

    def _blame(self, node: str, keys: list[str]) -> None:
        """An attempt died: the row it ran alone is to blame, unless its node died with it."""
        if len(keys) == 1 and self.is_alive(node):
            self.deaths[keys[0]] += 1

    def start_row(self, batch: str, key: str) -> bool:
        """Only ``key`` of ``batch`` is in flight from now: True to run it, False when it was blamed
        for ``CRASH_LIMIT`` deaths already."""
        node = self.in_flight[batch][0]
        if self.deaths[key] >= CRASH_LIMIT:
            self.in_flight[batch] = (node, [])
            return False
        self.in_flight[batch] = (node, [key])
        return True

    def end(self, batch: str) -> None:
        self.in_flight.pop(batch, None)


def start_journal() -> Any:
    """The job's journal on the driver's node (a lost worker node must not take it along); the
    driver kills it at the end (``ray.kill``), and Ray does when the driver dies."""
    return (
        ray.remote(CrashJournal)
        .options(
            name=f"janus-crash-journal-{uuid.uuid4().hex[:12]}",
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            ),
        )
        .remote()
    )


def batch_id(keys: list[str]) -> str:
    """A batch's identity across retries: Ray retries the very same rows."""
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()


class CrashGuard:
    """The model pool's callable class: ``actor_class(**kwargs)`` (any model actor: ours, a custom
    one, a test's stand-in) with poison rows kept from retrying forever. ``actor_class`` may be a
    ``package.module:Class`` name, imported in the actor's own process: the job's driver then never
    loads the model's stack (torch, transformers: ~9 s of CPU per process on a small machine)."""

    def __init__(self, actor_class: type | str, journal: Any, **kwargs: Any):
        self.actor = load_class(actor_class)(**kwargs)
        self.journal = journal
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        bid = batch_id(keys)
        try:
            if not ray.get(self.journal.begin.remote(bid, keys, self.node)):
                return self.actor(batch)
            logger.warning(
                "the actor running %d rows (first key %s) died; running them one at a time",
                len(keys),
                keys[0],
            )
            return self._row_by_row(bid, batch, keys)
        except Exception as exc:
            exit_if_device_broke(exc, f"{len(keys)} rows, first key {keys[0]}")
            raise
        finally:  # an attempt that raised did not die; in order after begin (one caller, one actor)
            self.journal.end.remote(bid)

    def _row_by_row(self, bid: str, batch: dict[str, np.ndarray], keys: list[str]) -> dict[str, np.ndarray]:
        parts = []
        for i, key in enumerate(keys):
            row = {name: column[i : i + 1] for name, column in batch.items()}
            if not ray.get(self.journal.start_row.remote(bid, key)):
                message = (
                    f"this row crashed the model actor repeatedly ({CRASH_LIMIT} times the process died "
                    "while running it alone, on a node that stayed up); it is not run again so that the "
                    "job can finish"
                )
                logger.error("row %s: %s", key, message)
                row["status"] = np.array(["error"], dtype=object)
                row["error"] = np.array([message], dtype=object)
            parts.append(self.actor(row))
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def exit_if_device_broke(exc: BaseException, running: str) -> None:
    """End this process at once when ``exc`` left its device unusable (the batch in flight stays
    unfinished in the journal, as with any crash); otherwise return and let ``exc`` propagate."""
    reason = fatal_device_error(exc)
    if reason is None:
        return
    logger.error(
        "the device of this model actor (pid %d) is no longer usable (%s) while running %s; exiting so "
        "that Ray restarts the actor on a fresh device context and retries the batch",
        os.getpid(),
        reason,
        running,
    )
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(1)
