"""What a user reads on the console: our lines and Ray's progress, not Ray's notes to its own developers.

A batch job's driver: Ray Data logs each dataset's execution plan, that progress is logged because
stdout is not a terminal, a 13-line report per operator (tasks, actors, queued blocks, object store
bytes) every 10 s, and what the sink wrote (the job's summary says it). The console keeps the total
progress, every ``PROGRESS_EVERY_S`` when stdout is not a terminal, and Ray Data's warnings; the rest
stays in Ray Data's own log file (``<session>/logs/ray-data``, named on the console when a job
starts). Ray Data also warns "will hang unless more CPUs are freed" whenever a dataset executes with
no CPU free, once per process, and its sink executes one more (``materialize`` re-reads its result)
after the last batch, while the finished actor pool still holds its CPUs: a false alarm at the end of
a job that succeeded. Its once is spent when the job starts with CPUs free, so a start without any
still warns. ``-v`` (DEBUG) keeps everything.

``janus-pipeline serve``: on Ctrl-C Serve asks its controller to shut down and waits for it to die;
the controller's death then fails that call, which Ray reports as "(raylet) Task
ServeController.graceful_shutdown failed ... killed by `ray.kill`": the shutdown worked, so the line
is dropped.
"""

from __future__ import annotations

import io
import logging
import os
from typing import TextIO

PROGRESS_EVERY_S = 30
PROGRESS_ENV = "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL"  # Ray Data's own; a value set by the user wins
#: Ray Data's console lines that say nothing to a user of the job (kept in its log file)
HIDDEN = (
    "Execution plan of Dataset",
    "Progress will be logged because stdout is a non-interactive terminal",
    "Progress bars for operators disabled",
    "Data sink ",
)
#: what ``janus-pipeline serve`` drops from stdout: Serve's own shutdown, reported as a failure
SERVE_SHUTDOWN_NOISE = ("Task ServeController.graceful_shutdown failed",)


class _Hidden(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(HIDDEN)


def quiet_ray_data() -> None:
    """Trim Ray Data's console output in this driver (after Ray starts, before its first dataset)."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        return
    import ray
    from ray._private.log import PlainRayHandler
    from ray.data import DataContext
    from ray.data._internal.progress.logging_progress import LoggingExecutionProgressManager

    DataContext.get_current().enable_operator_progress_bars = False
    if PROGRESS_ENV not in os.environ:  # Ray reads it when its module is imported: set it there
        LoggingExecutionProgressManager.LOG_REPORT_INTERVAL_SEC = PROGRESS_EVERY_S
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, PlainRayHandler) and not any(isinstance(f, _Hidden) for f in handler.filters):
            handler.addFilter(_Hidden())
    if ray.available_resources().get("CPU"):
        from ray.util.debug import log_once

        log_once("cpu_warning")  # Ray Data's key for its "will hang" warning (pinned Ray)


class DropLines(io.TextIOBase):
    """A text stream that passes every line on to ``stream`` except those containing one of ``drop``."""

    def __init__(self, stream: TextIO, drop: tuple[str, ...]):
        self.stream, self.drop, self.pending = stream, drop, ""

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            if not any(d in line for d in self.drop):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not any(d in self.pending for d in self.drop):
            self.stream.write(self.pending)
        self.pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()
