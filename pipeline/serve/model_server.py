"""A model deployment: the batch jobs' own actor class (``Synthesizer`` or ``Captioner``) behind a
continuous-batching scheduler (``janus.engine.scheduler``) stepped by a thread inside the replica, so
requests join the running batch at the next decode step and tokens stream as they are made.
``mode: batch`` keeps the older ``@serve.batch`` path (requests that arrive together share one
``actor.generate`` call), for comparison."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ray import serve

from pipeline.model_ref import load_class

if TYPE_CHECKING:  # the engine and scheduler load in the replica: the ingress imports this module too
    from janus.engine.scheduler import BackgroundScheduler, Ticket


class IncrementalText:
    """Text deltas from tokens as they come: whole characters only (a byte-level BPE token may end in
    the middle of one), and the deltas (with ``finish()``) concatenate to exactly the whole decode.

    A call decodes a short window, not the whole answer: the new tokens plus those of the text sent
    before them (the context that decides a leading space), so the 1000th token costs what the
    first did."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0  # windows start here: the tokens of the text sent before the last one
        self.read = 0  # the tokens before this are sent

    def add(self, *tokens: int) -> str:
        """The text that ``tokens`` complete ('' while a character is still cut)."""
        self.tokens.extend(tokens)
        before, after = self._window()
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return after[len(before) :]

    def finish(self) -> str:
        """The text not sent yet, once no token follows: an answer that stops inside a character ends
        in what its whole decode ends in (replacement characters)."""
        before, after = self._window()
        self.prefix = self.read = len(self.tokens)
        return after[len(before) :] if after.startswith(before) else ""

    def _window(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return (
            decode(self.tokens[self.prefix : self.read], skip_special_tokens=True),
            decode(self.tokens[self.prefix :], skip_special_tokens=True),
        )


class TokenStream:
    """One request's tokens on their way from the scheduler's thread to the replica's event loop
    (``TokenRelay``); ``None`` ends them."""

    def __init__(self, relay: TokenRelay):
        self._relay = relay
        self._items: deque[int | None] = deque()
        self._event = asyncio.Event()
        self._listed = False  # in the relay's list of streams with tokens the loop was not woken for
        self._woken_at = -math.inf  # when the loop was last woken for this stream
        self._ended = False
        #: handed on every step until the first text is out (a first token can be half a character)
        self.eager = True
        self.first_taken_at: float | None = None  # when the loop first took tokens of this stream

    async def take(self) -> list[int | None]:
        """Every token handed on since the last call (waits for at least one)."""
        while True:
            with self._relay.lock:
                items = list(self._items)
                self._items.clear()
            if items:
                if self.first_taken_at is None:
                    self.first_taken_at = time.perf_counter()
                return items
            self._event.clear()
            await self._event.wait()

    def _due(self, now: float, interval_s: float) -> bool:
        return self._ended or self.eager or now - self._woken_at >= interval_s


class TokenRelay:
    """Tokens from the scheduler's thread to the replica's event loop. The thread appends each token
    (``push``); after each round of tokens (``Scheduler.on_tokens``: a prefill's first tokens, a decode
    step's) it calls ``flush``, which wakes the loop once for all the streams that
    are due: a stream's tokens at once until its first text is out, later ones at most every
    ``interval_s`` (together), its end at once (a request can end outside a step). Waking the loop
    per token per request had the loop's Python (resuming each stream, decoding its text) take the
    GIL from the decoding thread ~1000 times a second: ~20% off a CPU replica's decoding with 8 rows
    of 1 ms steps (~5% left)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float = 0.0):
        self.loop = loop
        self.interval_s = interval_s
        self.lock = threading.Lock()
        self._listed: list[TokenStream] = []

    def stream(self) -> TokenStream:
        return TokenStream(self)

    def push(self, stream: TokenStream, token: int | None) -> None:
        """Any thread; ``None`` ends the stream (and is handed on at once)."""
        with self.lock:
            stream._items.append(token)
            stream._ended = stream._ended or token is None
            if not stream._listed:
                stream._listed = True
                self._listed.append(stream)
        if token is None:
            self.flush()

    def flush(self) -> None:
        """Any thread: wake the loop for the streams that are due (no wake-up when none is)."""
        now = time.perf_counter()
        ready: list[TokenStream] = []
        with self.lock:
            waiting = []
            for s in self._listed:
                (ready if s._due(now, self.interval_s) else waiting).append(s)
            if not ready:
                return
            self._listed = waiting
            for s in ready:
                s._listed, s._woken_at = False, now
        self.loop.call_soon_threadsafe(_wake, ready)


def _wake(streams: list[TokenStream]) -> None:
    for stream in streams:
        stream._event.set()


async def text_deltas(stream: TokenStream, text: IncrementalText, per_token: bool = False) -> AsyncIterator[str]:
    """The text of ``stream``'s tokens, as the relay hands them on (``None`` ends them): one delta for
    the tokens of each hand-over, or with ``per_token`` one for each token's text."""
    ended = False
    while not ended:
        tokens = await stream.take()
        ended = tokens[-1] is None
        tokens = [t for t in tokens if t is not None]
        deltas = [text.add(t) for t in tokens] if per_token else [text.add(*tokens)]
        if ended:
            deltas.append(text.finish())
        for delta in deltas if per_token else ["".join(deltas)]:
            if delta:
                stream.eager = False
                yield delta


def _first_token_parts(arrived: float, ticket: Ticket, stream: TokenStream, sent: float) -> tuple[float, ...]:
    """A streamed request's time to first text in the replica, in parts (see ``first_token_parts``)."""
    admitted = ticket.admitted_at or ticket.submitted_at
    made = ticket.first_token_at or sent
    taken = stream.first_taken_at or sent
    return (ticket.submitted_at - arrived, admitted - ticket.submitted_at, made - admitted, taken - made, sent - taken)


async def _result(ticket: Ticket) -> Any:
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    ticket.add_done_callback(lambda t: loop.call_soon_threadsafe(_settle, done, t.result))
    try:
        return await done
    except asyncio.CancelledError:  # the caller went away: free the request's slots
        ticket.cancel()
        raise


def _settle(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


@serve.deployment
class ModelServer:
    """One replica holds one model; the engines are not thread-safe, so one thread drives them."""

    def __init__(
        self,
        actor_cls: type | str,
        model: dict[str, Any],
        engine: dict[str, Any],
        params: dict[str, Any],
        batching: dict[str, Any],
        quality: dict[str, Any] | None = None,
    ):
        from janus.engine import SynthesisEngine
        from janus.engine.scheduler import BackgroundScheduler, Scheduler

        # exactly as Ray Data constructs it; a ``module:Class`` name is imported here, in the replica
        self.actor = load_class(actor_cls)(model, engine, params, quality)
        self.synthesis = isinstance(self.actor.engine, SynthesisEngine)
        self.mode = batching.get("mode", "scheduler")
        self.loop: BackgroundScheduler | None = None
        self.relay: TokenRelay | None = None  # streamed tokens -> the event loop, made at the first stream
        if self.mode == "scheduler":
            rows = 2 if self.synthesis else 1
            scheduler = Scheduler(
                self.actor.engine, slots=batching["max_batch_size"] * rows, max_len=batching.get("max_len")
            )
            self.loop = BackgroundScheduler(scheduler)
        else:
            self.run_batch.set_max_batch_size(batching["max_batch_size"])
            self.run_batch.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])
        self.stream_interval_s = batching["stream_interval_s"]
        self.requests = 0
        self.largest_batch = 0
        #: seconds from a streamed request's arrival at this replica to its first text, the latest
        #: 10,000: the scheduler's share of time to first token, without HTTP and the ingress
        self.first_token_s: deque[float] = deque(maxlen=10_000)
        #: the same, in parts (seconds): arrival -> queued, queued -> taken for prefill, taken -> first
        #: token made (prepare + prefill), made -> with the event loop (hand-over), with the loop -> its
        #: first text sent (a token that ends inside a character, or a special one, has no text yet).
        #: The first four add up to the time to first token
        self.first_token_parts: deque[tuple[float, ...]] = deque(maxlen=10_000)
        #: finished requests waiting to be read back (scored): those that finish while a read runs
        #: are read together in the next one, as one model batch
        self._to_read: list[tuple[tuple[list[Any], Any, list[Any]], asyncio.Future]] = []
        self._reader: asyncio.Task | None = None

    async def generate(self, request: dict[str, Any]) -> Any:
        """One request -> its SynthesisResult / CaptionResult (sharing the device with its neighbours)."""
        if self.loop is None:
            return await self.run_batch(request)
        self.requests += 1
        engine_requests, plan = self.actor.expand([request])
        tickets = [self.loop.submit(r) for r in engine_requests]
        try:
            results = await asyncio.gather(*(_result(t) for t in tickets))
        finally:
            for t in tickets:
                if not t.done:
                    t.cancel()
        if plan is None:
            return results[0]
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._to_read.append(((engine_requests, plan, results), done))
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_finished())
        return (await done)[0]

    async def _read_finished(self) -> None:
        """One reader per replica (the engines are not thread-safe): it takes every finished request
        queued so far and reads them in one ``complete_many`` call in a worker thread, until none wait.
        Requests that finish at the same step (a cohort of images) are scored in one batch, not one
        small model call each."""
        while self._to_read:
            batch, self._to_read = self._to_read, []
            try:
                outs = await asyncio.to_thread(self.actor.complete_many, [call for call, _ in batch])
            except Exception as exc:  # the requests fail, the replica lives on
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, done), out in zip(batch, outs, strict=True):
                if not done.done():
                    done.set_result(out)

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """A caption / chat request's text as it is decoded: ``{"delta": str}`` items, then
        ``{"result": CaptionResult}``. Cancelled (the client left) -> its slot is freed next step.

        The first tokens are handed on the moment they are decoded; after them, the tokens decoded
        meanwhile at most every ``stream_interval_s``, as one delta (``TokenRelay``): each item is a
        message through Ray to the ingress, and one per token (a CPU decode step is ~2 ms) cost the
        chat route its tail latency under load."""
        if self.loop is None:
            raise RuntimeError("streaming needs batching.mode: scheduler")
        self.requests += 1
        t0 = time.perf_counter()
        if self.relay is None:  # made here: the replica's event loop runs the requests
            self.relay = TokenRelay(asyncio.get_running_loop(), self.stream_interval_s)
            self.loop.scheduler.on_tokens = self.relay.flush
        relay = self.relay
        tokens = relay.stream()
        request = self.actor.expand([request])[0][0]
        ticket = self.loop.submit(request, on_token=lambda t: relay.push(tokens, t))
        ticket.add_done_callback(lambda t: relay.push(tokens, None))
        text = IncrementalText(self.actor.engine.tokenizer)
        try:
            async for delta in text_deltas(tokens, text, per_token=self.stream_interval_s <= 0):
                if t0:  # the first text of this request
                    now = time.perf_counter()
                    self.first_token_s.append(now - t0)
                    self.first_token_parts.append(_first_token_parts(t0, ticket, tokens, now))
                    t0 = 0.0
                yield {"delta": delta}
            yield {"result": ticket.result}
        finally:
            if not ticket.done:
                ticket.cancel()

    @serve.batch
    async def run_batch(self, requests: list[dict[str, Any]]) -> list[Any]:
        self.requests += len(requests)
        self.largest_batch = max(self.largest_batch, len(requests))
        # in a thread: the replica keeps accepting requests (the next batch forms meanwhile)
        return await asyncio.to_thread(self.actor.generate, requests)

    def info(self) -> dict[str, Any]:
        """What the ingress needs to validate requests for this model; answers once it is loaded."""
        engine = self.actor.engine
        if self.synthesis:
            return {
                "model": self.actor.model_name,
                "image_size": engine.image_size,
                "scores": self.actor.quality.score,
            }
        return {
            "model": self.actor.model_name,
            "max_images": engine.max_images_per_request,
            "image_processor": engine.processor.image_processor.to_dict(),
            "image_tag": engine.image_tag,
            "streaming": self.loop is not None,
        }

    def stats(self) -> dict[str, Any]:
        """This replica's id and counters: requests served, model calls or steps made."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "requests": self.requests,
            "model_calls": self.actor.calls if self.loop is None else self.loop.scheduler.steps,
            "largest_batch": self.largest_batch if self.loop is None else self.loop.scheduler.peak_running,
            "first_token_s": list(self.first_token_s),
            "first_token_parts": list(self.first_token_parts),
            **(
                {  # the latest rounds (up to 10,000 each) and how many were made in all
                    "prefill_rounds": list(self.loop.scheduler.stats.prefill.latest),
                    "prefills": self.loop.scheduler.prefills,
                    "decode_rounds": list(self.loop.scheduler.stats.decode.latest),
                    "steps": self.loop.scheduler.steps,
                }
                if self.loop is not None
                else {}
            ),
        }
