"""A model deployment: the batch jobs' own actor class (``Synthesizer`` or ``Captioner``) behind a
continuous-batching scheduler (``janus.engine.scheduler``) stepped by a thread inside the replica, so
requests join the running batch at the next decode step and tokens stream as they are made.
``mode: batch`` keeps the older ``@serve.batch`` path (requests that arrive together share one
``actor.generate`` call), for comparison."""

from __future__ import annotations

import asyncio
import math
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
    the middle of one), and the deltas concatenate to exactly the final decoded text."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


async def text_deltas(queue: asyncio.Queue, text: IncrementalText, interval_s: float) -> AsyncIterator[str]:
    """The text of the tokens put on ``queue`` (``None`` ends it): the first text the moment it is
    decoded, then what was decoded meanwhile at most every ``interval_s``, the rest at the end. Tokens
    that queued up while the consumer was busy go out together, so a slow reader never falls further
    behind one message per token. ``interval_s`` 0: each token's text its own delta, as it was made."""
    pending, sent_at, ended = "", -math.inf, False  # the first text goes out at once
    while not ended:
        tokens = [await queue.get()]
        while interval_s > 0 and not queue.empty():
            tokens.append(queue.get_nowait())
        ended = tokens[-1] is None
        pending += "".join(text.add(t) for t in tokens if t is not None)
        now = time.perf_counter()
        if pending and (ended or now - sent_at >= interval_s):
            yield pending
            pending, sent_at = "", now


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

        The first text is sent the moment it is decoded; after it, the text decoded meanwhile goes out at
        most every ``stream_interval_s`` (``text_deltas``): each item is a message through Ray to the
        ingress, and one per token (a CPU decode step is ~2 ms) cost the chat route its tail latency
        under load."""
        if self.loop is None:
            raise RuntimeError("streaming needs batching.mode: scheduler")
        self.requests += 1
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        ticket = self.loop.submit(
            self.actor.expand([request])[0][0],
            on_token=lambda t: loop.call_soon_threadsafe(queue.put_nowait, t),
        )
        ticket.add_done_callback(lambda t: loop.call_soon_threadsafe(queue.put_nowait, None))
        text = IncrementalText(self.actor.engine.tokenizer)
        try:
            async for delta in text_deltas(queue, text, self.stream_interval_s):
                if t0:  # the first text of this request
                    self.first_token_s.append(time.perf_counter() - t0)
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
        }
