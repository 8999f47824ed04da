"""Continuous batching: requests join and leave a running batch at every decode step.

A fixed pool of KV-cache rows (slots) is allocated once. Each ``step``: finished and cancelled requests
leave and free their slots; waiting requests are prefilled into free slots (a synthesis request takes
two, conditional and unconditional; a caption one); then one decode step runs for every row. Rows start
at different times, so each keeps its own length and positions and attends only to its own filled
prefix (``KVCacheDecoder.decode_slots``). The static engines stay the simple path and the oracle: for
the same request and seed the tokens are the same whoever shares the batch and whenever it joined,
because each request samples from its own random stream (``sampling.py``) at its own step.

Plain Python, no Ray: ``Scheduler.step`` is driven by a loop (``BackgroundScheduler`` runs one in a
thread); ``Ticket`` is a request's handle: its tokens as they come, its result, and cancellation.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .captioning import CaptionEngine, CaptionResult
from .common import (
    CANCELLED,
    INTERNAL,
    INVALID_REQUEST,
    OUT_OF_MEMORY,
    Prepared,
    RequestError,
    Result,
    available_memory,
)
from .prompts import unconditional_ids
from .sampling import SamplingParams, row_uniforms, sample
from .synthesis import SynthesisEngine, SynthesisResult

logger = logging.getLogger(__name__)

TokenCallback = Callable[[int], None]


class Ticket:
    """One submitted request: its tokens as they are made, its result when done, and cancellation."""

    _ids = itertools.count()

    def __init__(self, request: Any, on_token: TokenCallback | None = None):
        self.id = next(self._ids)
        self.request = request
        self.on_token = on_token
        self.tokens: list[int] = []
        self.result: Result | None = None
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None  # taken from the queue to be prepared and prefilled
        self.first_token_at: float | None = None
        self._done = threading.Event()
        self._callbacks: list[Callable[[Ticket], None]] = []
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """The client went away: the scheduler frees the request's slots at its next step."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} is not done after {timeout} s")
        return self.result  # type: ignore[return-value]

    def add_done_callback(self, fn: Callable[[Ticket], None]) -> None:
        with self._lock:
            if not self.done:
                self._callbacks.append(fn)
                return
        fn(self)

    def _token(self, token: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.append(token)
        if self.on_token is not None:
            self.on_token(token)

    def _finish(self, result: Result) -> None:
        with self._lock:
            self.result = result
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)


@dataclass
class _Running:
    ticket: Ticket
    prepared: Prepared
    rows: list[int]  # cache rows: [cond, uncond] for synthesis, [row] for captions
    length: int  # filled cache positions of each row
    position: int  # the next token's rotary position
    uniforms: list[float]  # [max_new] this request's random stream (float64 values, on the host)
    max_new: int
    last: int = 0  # the last token made (the next step's input)
    eos: int | None = None  # the token that ends it (None: only max_new does; images, ignore_eos)
    tokens: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


class Scheduler:
    """Iteration-level scheduling over one engine's model (``SynthesisEngine`` or ``CaptionEngine``).

    ``slots``: cache rows (a synthesis request uses two); ``max_len``: tokens a row can hold (prompt
    plus everything generated). Both are capped by device memory when the cache is allocated; a
    request that could never fit is failed at once (``OUT_OF_MEMORY``), a bad one too
    (``INVALID_REQUEST``), without touching the others.

    ``keep_cache``: the KV cache, allocated at the first request, stays allocated while the scheduler
    is idle (``release()`` frees it), as a serving engine keeps its preallocated cache. Zeroing the
    cache of 8 caption slots costs ~86 ms on a CPU core, 4x a request's prefill: freeing it whenever the
    pool empties makes every request that arrives at a quiet server pay it before its first token.
    ``keep_cache=False`` frees it each time the last request leaves (a process that shares the device).
    """

    def __init__(
        self,
        engine: SynthesisEngine | CaptionEngine,
        *,
        slots: int = 16,
        max_len: int | None = None,
        keep_cache: bool = True,
    ):
        self.engine = engine
        self.synthesis = isinstance(engine, SynthesisEngine)
        self.rows_per_request = 2 if self.synthesis else 1
        decoder = engine.decoder
        if max_len is None:
            max_len = 1024 if self.synthesis else 2048
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
        #: the latest rounds' durations (seconds), to set a request's time to first token against what
        #: the same batch costs: admissions (prepare + prefill + first token) as (requests, seconds),
        #: decode steps (one token for every running request) as (requests, seconds)
        self.prefill_rounds: deque[tuple[int, float]] = deque(maxlen=10_000)
        self.decode_rounds: deque[tuple[int, float]] = deque(maxlen=10_000)
        self._settings_key: tuple[int, ...] | None = None
        #: called after each round of tokens went to the tickets' callbacks (the first tokens of a
        #: prefill, each decode step's), before finished requests are built: e.g. to hand them on in one go
        self.on_tokens: Callable[[], None] | None = None
        self._settings_value: tuple[SamplingParams, torch.Tensor | None]

    # -- requests --------------------------------------------------------------------------------
    def submit(self, request: Any, on_token: TokenCallback | None = None) -> Ticket:
        """Queue a request (thread-safe); it joins the running batch at the next step with free slots."""
        ticket = Ticket(request, on_token)
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
        self._retire_cancelled()
        self._admit()
        if self.running:
            self.peak_running = max(self.peak_running, len(self.running))
            t0, n = time.perf_counter(), len(self.running)
            self._decode()
            self.decode_rounds.append((n, time.perf_counter() - t0))
        if self.idle and not self.keep_cache:
            self.release()

    def release(self) -> None:
        """Free the KV cache (the next request allocates it again)."""
        if self._cache is not None and self.engine.decoder.k_cache is self._cache:
            self.engine.decoder.release()
        self._cache = None

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

    def _admit(self) -> None:
        """Prepare and prefill waiting requests into free slots, in arrival order."""
        admitted: list[_Running] = []
        t0 = time.perf_counter()
        while len(self.free) >= self.rows_per_request:
            with self._lock:
                if not self.waiting:
                    break
                ticket = self.waiting.popleft()
            ticket.admitted_at = time.perf_counter()
            try:
                prepared = self.engine.prepare(ticket.id, ticket.request)
            except RequestError as exc:
                ticket._finish(self.engine.result_type.failed(INVALID_REQUEST, str(exc)))
                continue
            max_new = self.engine.image_tokens if self.synthesis else prepared.request.max_new_tokens
            if prepared.length + max_new > self.max_len:
                ticket._finish(
                    self.engine.result_type.failed(
                        OUT_OF_MEMORY,
                        f"request needs {prepared.length + max_new} cache positions; this server's slots "
                        f"hold {self.max_len}",
                    )
                )
                continue
            rows = [self.free.pop(0) for _ in range(self.rows_per_request)]
            uniforms = row_uniforms([prepared.request.seed], max_new, torch.device("cpu"))[0].tolist()
            run = _Running(ticket, prepared, rows, prepared.length, prepared.length, uniforms, max_new)
            if not self.synthesis and not prepared.request.ignore_eos:
                run.eos = self.engine.tokenizer.eos_token_id
            admitted.append(run)
        if not admitted:
            return
        self._allocate()
        try:
            first = self._prefill(admitted)
        except torch.OutOfMemoryError as exc:
            for run in admitted:
                self.free.extend(run.rows)
                run.ticket._finish(self.engine.result_type.failed(OUT_OF_MEMORY, f"out of memory: {exc}"))
            self.free.sort()
            return
        self.running.extend(admitted)
        # [rows per request, requests, D] -> every request's first row, then every unconditional one
        self._advance(admitted, torch.stack([first[r.ticket.id] for r in admitted], dim=1).flatten(0, 1))
        self.prefill_rounds.append((len(admitted), time.perf_counter() - t0))
        self.prefills += 1

    def _prefill(self, admitted: list[_Running]) -> dict[int, torch.Tensor]:
        """Prefill each group of equal length together; returns each request's last hidden state(s)."""
        e, dev = self.engine, self.engine.device
        first: dict[int, torch.Tensor] = {}
        by_length: dict[int, list[_Running]] = {}
        for run in admitted:
            by_length.setdefault(run.length, []).append(run)
        for group in by_length.values():
            if self.synthesis:
                ids = [p.prepared.data for p in group] + [
                    unconditional_ids(p.prepared.data, e.processor.pad_id) for p in group
                ]
                embeds = e.model.language_model.get_input_embeddings()(torch.tensor(ids, device=dev))
                rows = [p.rows[0] for p in group] + [p.rows[1] for p in group]
            else:
                inputs = e.processor.batchify([p.prepared.data for p in group]).to(dev)
                embeds = e.model.prepare_inputs_embeds(**inputs)
                rows = [p.rows[0] for p in group]
            hidden = e.decoder.prefill_slots(embeds.to(e.dtype), torch.tensor(rows, device=dev))
            for i, run in enumerate(group):
                picks = [i, len(group) + i] if self.synthesis else [i]
                first[run.ticket.id] = hidden[picks]
        return first

    def _decode(self) -> None:
        e, dev = self.engine, self.engine.device
        # only rows up to the highest one in use (admission fills the lowest free rows): with one
        # image request in a 16-row pool a step computes 2 rows, not 16 (it made a lone request at a
        # quiet CPU server take 15 s instead of ~5 s)
        top = max(max(run.rows) for run in self.running) + 1
        last, position, length = [0] * top, [0] * top, [0] * top  # built on the host
        for run in self.running:
            for row in run.rows:
                last[row], position[row], length[row] = run.last, run.position, run.length
        rows = torch.tensor([last, position, length], dtype=torch.long)
        tokens, positions, slots = rows.to(dev, non_blocking=True)  # one copy to the device a step
        if self.synthesis:
            embeds = e.model.prepare_gen_img_embeds(tokens)[:, None]
        else:
            embeds = e.model.language_model.get_input_embeddings()(tokens)[:, None]
        kv_len = max(run.length for run in self.running) + 1
        hidden = e.decoder.decode_slots(embeds.to(e.dtype), positions, slots, kv_len)
        for run in self.running:
            run.length += 1
            run.position += 1
        self.steps += 1
        runs = list(self.running)
        index = [run.rows[k] for k in range(self.rows_per_request) for run in runs]
        self._advance(runs, hidden[torch.tensor(index, device=dev)])

    def _settings(self, runs: list[_Running]) -> tuple[SamplingParams, torch.Tensor | None]:
        """The batch's sampling settings (and CFG weights) as device tensors, built again only when
        the batch's membership changed: not every step."""
        key = tuple(r.ticket.id for r in runs)
        if key != self._settings_key:
            e, reqs = self.engine, [r.prepared.request for r in runs]
            top_k = [q.top_k for q in reqs] if self.synthesis else [None] * len(reqs)
            params = SamplingParams.build(
                [q.temperature for q in reqs], top_k, [q.top_p for q in reqs], e.device
            )
            cfg = None
            if self.synthesis:
                cfg = torch.tensor([q.cfg_weight for q in reqs], dtype=torch.float32, device=e.device)[:, None]
            self._settings_key, self._settings_value = key, (params, cfg)
        return self._settings_value

    def _advance(self, runs: list[_Running], h: torch.Tensor) -> None:
        """Choose each request's next token from its rows' hidden states ``h`` (every request's first
        row in ``runs`` order, then, for synthesis, every request's unconditional row); finish those
        that are done."""
        e = self.engine
        step_u = torch.tensor([r.uniforms[len(r.tokens)] for r in runs], dtype=torch.float64, device=e.device)
        params, cfg = self._settings(runs)
        if self.synthesis:
            chosen = e._choose(h, params, step_u, cfg)
        else:
            chosen = sample(e.decoder.logits(h), params, step_u)
        finished: list[_Running] = []
        for run, token in zip(runs, chosen.tolist(), strict=True):
            run.tokens.append(token)
            run.last = token
            stop = token == run.eos
            if not stop:
                run.ticket._token(token)
            if stop or len(run.tokens) >= run.max_new:
                finished.append(run)
        if self.on_tokens is not None:
            try:
                self.on_tokens()
            except Exception:  # e.g. the event loop it hands tokens to is closed: the requests go on
                logger.exception("on_tokens hook failed")
        if finished:
            results = self._results(finished)
            for run, result in zip(finished, results, strict=True):
                self._leave(run, result)

    def _results(self, finished: list[_Running]) -> list[Result]:
        e = self.engine
        if self.synthesis:
            codes = torch.tensor([r.tokens for r in finished], device=e.device)
            images = e.decode_images(codes)
            return [
                SynthesisResult(
                    image=image,
                    tokens=codes[i].to(torch.int32).cpu().numpy(),
                    timings={"total_s": time.perf_counter() - r.started, "batch_size": 1},
                )
                for i, (r, image) in enumerate(zip(finished, images, strict=True))
            ]
        out = []
        for r in finished:
            stop = r.tokens[-1] == r.eos
            toks = r.tokens[:-1] if stop else r.tokens
            out.append(
                CaptionResult(
                    text=e.tokenizer.decode(toks, skip_special_tokens=True),
                    num_tokens=len(toks),
                    prompt_tokens=r.prepared.length,
                    finish_reason="stop" if stop else "length",
                    timings={"total_s": time.perf_counter() - r.started, "batch_size": 1},
                )
            )
        return out


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
            except BaseException as exc:  # a bug must fail the requests, not hang them forever
                logger.exception("scheduler step failed")
                self.error = exc
                for run in list(s.running):
                    s._leave(run, s.engine.result_type.failed(INTERNAL, f"{type(exc).__name__}: {exc}"))
                while s.waiting:
                    s.waiting.popleft()._finish(s.engine.result_type.failed(INTERNAL, repr(exc)))
                s.free = list(range(s.slots))
                s.release()
                self.error = None
