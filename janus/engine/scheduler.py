"""Continuous batching: requests join and leave a running batch at every decode step.

A fixed pool of KV-cache rows (slots) is allocated once. Each ``step``: finished and cancelled requests
leave and free their slots; waiting requests are prefilled into free slots (a synthesis request takes
two, conditional and unconditional; a caption one); then one forward pass runs for every request
(``decoding.decode_pass``). Rows start at different times, so each keeps its own length and positions
and attends only to its own filled prefix (``KVCacheDecoder.decode_window``). The static engines stay
the simple path and the oracle: for the same request and seed the tokens are the same whoever shares
the batch and whenever it joined, because each request samples from its own random stream
(``sampling.py``) at its own step. The task's model side is the engine's runner (``runner.py``), so
the scheduler is the same for images and text.

Speculative decoding (``speculative.py``, the engine's ``speculative`` option): a request admitted
while at most ``max_rows`` requests run (itself included) is decoded speculatively to its end, several
codes per pass; the others plainly. A request's image depends on its method (recorded in its result),
never on who else runs.

Plain Python, no Ray: ``Scheduler.step`` is driven by a loop (``BackgroundScheduler`` runs one in a
thread); ``Ticket`` is a request's handle: its tokens as they come, its result, and cancellation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .common import (
    CANCELLED,
    INTERNAL,
    INVALID_REQUEST,
    OUT_OF_MEMORY,
    RequestError,
    Result,
    available_memory,
)
from .decoding import Sequence, block_index, choose_first, decode_pass
from .health import fatal_device_error
from .runner import Settings
from .sampling import row_uniforms
from .stats import ServingStats
from .status import DEVICE_LOST
from .ticket import Ticket, TokenCallback

logger = logging.getLogger(__name__)

__all__ = ["BackgroundScheduler", "Scheduler", "Ticket", "TokenCallback"]


@dataclass
class _Running(Sequence):
    ticket: Ticket | None = None
    started: float = field(default_factory=time.perf_counter)


class Scheduler:
    """Iteration-level scheduling over one engine's model (``SynthesisEngine`` or ``CaptionEngine``).

    ``slots``: cache rows (a synthesis request uses two); ``max_len``: tokens a row can hold (prompt
    plus everything generated). Both are capped by device memory when the cache is allocated; a
    request that could never fit is failed at once (``OUT_OF_MEMORY``), a bad one too
    (``INVALID_REQUEST``), without touching the others.

    ``keep_cache``: the KV cache, allocated at the first request, stays allocated while the scheduler
    is idle (``release()`` frees it), as a serving engine keeps its preallocated cache: zeroing the
    cache of 8 caption slots costs ~86 ms on a CPU core, 4x a request's prefill, which every request
    arriving at a quiet server would otherwise pay before its first token. ``keep_cache=False`` frees
    it each time the last request leaves (a process that shares the device).
    """

    def __init__(self, engine: Any, *, slots: int = 16, max_len: int | None = None, keep_cache: bool = True):
        self.engine = engine
        self.runner = engine.runner
        self.rows_per_request = self.runner.rows_per_request
        self.speculator = getattr(engine, "speculator", None)
        decoder = engine.decoder
        if max_len is None:
            max_len = 1024 if self.rows_per_request == 2 else 2048
        max_len = min(max_len, decoder.max_position_embeddings)
        per_row = decoder.cache_bytes(1, max_len, engine.dtype)
        budget = int(available_memory(engine.device) * engine.memory_fraction)
        fit = max(self.rows_per_request, budget // max(per_row, 1))
        if fit < slots:
            logger.warning("only %d of %d cache slots fit the memory budget of %s", fit, slots, engine.device)
        self.slots = max(self.rows_per_request, min(slots, fit))
        self.slots -= self.slots % self.rows_per_request
        self.max_len = max_len
        self.waiting: deque[Ticket] = deque()
        self.running: list[_Running] = []
        self.free = list(range(self.slots))
        self._lock = threading.Lock()
        self._cache: torch.Tensor | None = None  # the decoder's cache this scheduler allocated, if any
        self.keep_cache = keep_cache
        self.allocations = 0  # how many times the cache was allocated (1 while it is kept)
        self.steps = 0  # decode steps made
        self.prefills = 0  # admission rounds made (one prefill each, of one or more requests)
        self.peak_running = 0  # the most requests that ever shared one step
        #: every round timed, to set a request's time to first token against what its batch costs
        self.stats = ServingStats()
        self._settings: dict[tuple[int, ...], Settings] = {}
        #: called after each round of tokens went to the tickets' callbacks (the first tokens of a
        #: prefill, each decode step's), before finished requests are built: e.g. to hand them on in one go
        self.on_tokens: Callable[[], None] | None = None
        #: why the device can no longer run a step (``health.fatal_device_error``): set for good, every
        #: request then fails at once with ``DEVICE_LOST`` until the process is replaced
        self.device_error: str | None = None

    # -- requests --------------------------------------------------------------------------------
    def submit(self, request: Any, on_token: TokenCallback | None = None) -> Ticket:
        """Queue a request (thread-safe); it joins the running batch at the next step with free slots."""
        ticket = Ticket(request, on_token)
        if self.device_error is not None:
            ticket._finish(self.engine.result_type.failed(DEVICE_LOST, self.device_error))
            return ticket
        with self._lock:
            self.waiting.append(ticket)
        return ticket

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()

    # -- one iteration ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Retire, admit, and one forward pass for the running requests. A failure in the pass fails
        the requests that were in it (the cache is allocated again for the next ones); requests still
        waiting are untouched."""
        self._retire_cancelled()
        self._admit()
        if self.running:
            self.peak_running = max(self.peak_running, len(self.running))
            t0, n = time.perf_counter(), len(self.running)
            try:
                self._decode()
            except Exception as exc:
                self._fail_running(exc)
                return
            self.stats.decode.add(n, time.perf_counter() - t0)
        if self.idle and not self.keep_cache:
            self.release()

    def release(self) -> None:
        """Free the KV cache (the next request allocates it again)."""
        if self._cache is not None and self.engine.decoder.k_cache is self._cache:
            self.engine.decoder.release()
        self._cache = None

    def _fail_running(self, exc: BaseException) -> None:
        logger.exception("scheduler step failed; failing its %d requests", len(self.running))
        code, message = self._failure(exc)
        for run in list(self.running):
            self._leave(run, self.engine.result_type.failed(code, message))
        self.release()

    def _failure(self, exc: BaseException) -> tuple[str, str]:
        """(code, message) of a request that ``exc`` ended; a broken device is remembered (``device_error``)."""
        if broken := fatal_device_error(exc):
            self.device_error = f"the device of this replica broke ({broken}); retry"
            return DEVICE_LOST, self.device_error
        code = OUT_OF_MEMORY if isinstance(exc, torch.OutOfMemoryError) else INTERNAL
        return code, f"{type(exc).__name__}: {exc}"

    def _allocate(self) -> None:
        e = self.engine
        # the engine's static path shares the decoder: if it replaced or freed the cache while this
        # scheduler was idle, allocate ours again
        if self._cache is None or e.decoder.k_cache is not self._cache:
            e.decoder.setup_caches(self.slots, self.max_len, dtype=e.dtype, device=e.device)
            self._cache = e.decoder.k_cache
            self.allocations += 1

    def _retire_cancelled(self) -> None:
        for run in [r for r in self.running if r.ticket.cancelled]:
            self._leave(run, self.engine.result_type.failed(CANCELLED, "cancelled by the client"))
        with self._lock:
            kept = [t for t in self.waiting if not t.cancelled]
            gone = [t for t in self.waiting if t.cancelled]
            self.waiting = deque(kept)
        for ticket in gone:
            ticket._finish(self.engine.result_type.failed(CANCELLED, "cancelled by the client"))

    def _leave(self, run: _Running, result: Result) -> None:
        self.running.remove(run)
        self.free.extend(run.rows)
        self.free.sort()
        run.ticket._finish(result)

    def _next_ticket(self) -> Ticket | None:
        """The oldest waiting request that was not cancelled (one cancelled meanwhile never runs)."""
        with self._lock:
            while self.waiting:
                ticket = self.waiting.popleft()
                if self.device_error is not None:  # queued before the device broke
                    ticket._finish(self.engine.result_type.failed(DEVICE_LOST, self.device_error))
                elif not ticket.cancelled:
                    return ticket
                else:
                    ticket._finish(self.engine.result_type.failed(CANCELLED, "cancelled by the client"))
        return None

    def _admit(self) -> None:
        """Prepare and prefill waiting requests into free slots, in arrival order."""
        admitted: list[_Running] = []
        t0 = time.perf_counter()
        while len(self.free) >= self.rows_per_request:
            ticket = self._next_ticket()
            if ticket is None:
                break
            run = self._start(ticket, len(self.running) + len(admitted) + 1)
            if run is not None:
                admitted.append(run)
        if not admitted:
            return
        self._allocate()
        try:
            self._prefill(admitted)
        except Exception as exc:  # out of memory, a broken device, or a bug: only these requests fail
            logger.exception("prefill of %d requests failed", len(admitted))
            code, message = self._failure(exc)
            for run in admitted:
                self.free.extend(run.rows)
                run.ticket._finish(self.engine.result_type.failed(code, message))
            self.free.sort()
            return
        self.running.extend(admitted)
        self._emit(admitted, [[r.tokens[-1]] for r in admitted])
        self.stats.prefill.add(len(admitted), time.perf_counter() - t0)
        self.prefills += 1

    def _start(self, ticket: Ticket, running: int) -> _Running | None:
        """A checked request -> its sequence in free rows; a request that cannot run is finished at once."""
        ticket.admitted_at = time.perf_counter()
        try:
            prepared = self.engine.prepare(ticket.id, ticket.request)
        except RequestError as exc:
            ticket._finish(self.engine.result_type.failed(INVALID_REQUEST, str(exc)))
            return None
        except Exception as exc:  # a bug in checking one request fails that request only
            logger.exception("preparing request %d failed", ticket.id)
            ticket._finish(self.engine.result_type.failed(INTERNAL, f"{type(exc).__name__}: {exc}"))
            return None
        ticket.prompt_tokens = prepared.length
        runner, spec = self.runner, self.speculator
        speculative = spec is not None and spec.options.applies(running)
        max_new = runner.max_new(prepared)
        need = prepared.length + max_new + (spec.window if speculative else 0)
        if need > self.max_len:
            message = f"request needs {need} cache positions; this server's slots hold {self.max_len}"
            ticket._finish(self.engine.result_type.failed(OUT_OF_MEMORY, message))
            return None
        rows = [self.free.pop(0) for _ in range(self.rows_per_request)]
        uniforms = row_uniforms([prepared.request.seed], max_new, torch.device("cpu"))[0].tolist()
        run = _Running(prepared, rows, prepared.length, prepared.length, max_new, runner.eos(prepared), uniforms)
        run.ticket = ticket
        if speculative:
            run.drafts = spec.start(prepared.request.seed)
        return run

    def _prefill(self, admitted: list[_Running]) -> None:
        """Prefill each group of equal length together, then choose each request's first token."""
        e, dev = self.engine, self.engine.device
        by_length: dict[tuple[int, bool], list[_Running]] = {}
        for run in admitted:  # plain and speculative requests choose their first token differently
            by_length.setdefault((run.length, run.drafts is not None), []).append(run)
        for group in by_length.values():
            embeds, _ = self.runner.prompt_embeds([r.prepared for r in group])
            rows = torch.tensor(block_index(group, self.rows_per_request), device=dev)
            hidden = e.decoder.prefill_slots(embeds, rows)
            choose_first(self.runner, self.speculator, group, hidden, self._settings_of(group))

    def _decode(self) -> None:
        # only rows up to the highest one in use (admission fills the lowest free rows): with one
        # image request in a 16-row pool a pass computes 2 rows, not 16
        top = max(max(run.rows) for run in self.running) + 1
        runs = list(self.running)
        new = decode_pass(self.runner, self.speculator, runs, self._settings_of, top)
        self.steps += 1
        self._emit(runs, new)

    def _settings_of(self, runs: list[_Running]) -> Settings:
        """The sampling settings of these requests, built again only when membership changed."""
        key = tuple(r.ticket.id for r in runs)
        if key not in self._settings:
            if len(self._settings) > 64:
                self._settings.clear()
            self._settings[key] = self.runner.settings([r.prepared.request for r in runs])
        return self._settings[key]

    def _emit(self, runs: list[_Running], new: list[list[int]]) -> None:
        """Hand each request its new tokens; finish those that are done."""
        finished: list[_Running] = []
        for run, tokens in zip(runs, new, strict=True):
            for token in tokens:
                if token != run.eos:
                    run.ticket._token(token)
            if run.done:
                finished.append(run)
        if self.on_tokens is not None:
            try:
                self.on_tokens()
            except Exception:  # e.g. the event loop it hands tokens to is closed: the requests go on
                logger.exception("on_tokens hook failed")
        if finished:
            timings = [{"total_s": time.perf_counter() - r.started, "batch_size": 1} for r in finished]
            results = self.runner.results(finished, timings)
            for run, result in zip(finished, results, strict=True):
                self._leave(run, result)


class BackgroundScheduler:
    """A ``Scheduler`` stepped by its own thread while there is work (one per model replica)."""

    def __init__(self, scheduler: Scheduler, name: str = "janus-scheduler"):
        self.scheduler = scheduler
        self._wake = threading.Event()
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: Any, on_token: TokenCallback | None = None) -> Ticket:
        if self.error is not None:
            raise RuntimeError(f"the scheduler loop died: {self.error!r}")
        ticket = self.scheduler.submit(request, on_token)
        self._wake.set()
        return ticket

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.scheduler.release()

    def _loop(self) -> None:
        s = self.scheduler
        while not self._stop:
            if s.idle:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                s.step()
            except Exception as exc:  # a bug must fail the requests it hit, not hang them forever
                s._fail_running(exc)
                s.free = list(range(s.slots))
