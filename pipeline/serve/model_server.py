"""A model deployment: the batch jobs' own actor class (``Synthesizer`` or ``Captioner``) behind a
continuous-batching scheduler (``janus.engine.scheduler``) stepped by a thread inside the replica, so
requests join the running batch at the next decode step and tokens stream as they are made.
``mode: batch`` keeps the ``@serve.batch`` path (requests that arrive together share one
``actor.generate`` call), for comparison. Answers leave as ``backend.Answer`` (plain data)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from janus.engine.detokenize import IncrementalText
from janus.engine.health import fatal_device_error
from janus.engine.stats import ServingStats
from janus.engine.status import DEVICE_LOST, ERROR
from pipeline.model_ref import load_class

from .backend import Answer
from .metrics import ReplicaMetrics
from .relay import TokenRelay, first_token_parts, text_deltas, ticket_result

if TYPE_CHECKING:  # the engine and scheduler load in the replica: the ingress imports this module too
    from janus.engine.scheduler import BackgroundScheduler
    from janus.engine.ticket import Ticket

#: a partial image's rows not drawn yet (mid-grey): the rows drawn so far are decoded, the rest left blank
BLANK = 128


def partial_thresholds(image_tokens: int, partial_images: int) -> list[int]:
    """After how many codes each of ``partial_images`` pictures is drawn: evenly spread, none at the end."""
    return [image_tokens * (i + 1) // (partial_images + 1) for i in range(partial_images)]


def partial_image(engine: Any, codes: list[int]) -> np.ndarray:
    """The picture so far: the grid's whole rows among ``codes`` (raster order) decoded, the rest
    blank (the VQ decoder is convolutional: a grid of k rows decodes to the image's top k rows)."""
    import torch

    side, grid = engine.image_size, engine.grid
    image = np.full((side, side, 3), BLANK, dtype=np.uint8)
    rows = len(codes) // grid
    if rows:
        top = torch.tensor([codes[: rows * grid]], dtype=torch.long, device=engine.device)
        image[: rows * side // grid] = engine.decode_images(top)[0]
    return image


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
        self.serving_stats = ServingStats()
        if self.mode == "scheduler":
            rows = 2 if self.synthesis else 1
            scheduler = Scheduler(
                self.actor.engine, slots=batching["max_batch_size"] * rows, max_len=batching.get("max_len")
            )
            self.serving_stats = scheduler.stats
            self.loop = BackgroundScheduler(scheduler)
        else:
            self.run_batch.set_max_batch_size(batching["max_batch_size"])
            self.run_batch.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])
        self.stream_interval_s = batching["stream_interval_s"]
        self.largest_batch = 0
        # Serve runs the constructor on the replica's event loop, which runs the requests too
        event_loop = asyncio.get_running_loop()
        self.relay = TokenRelay(event_loop, self.stream_interval_s)
        if self.loop is not None:
            self.loop.scheduler.on_tokens = self.relay.flush
        if self.loop is not None:
            self._sampler = event_loop.create_task(self._sample_rows(ReplicaMetrics(self.actor.model_name)))
        #: finished requests waiting to be read back (scored): those that finish while a read runs
        #: are read together in the next one, as one model batch
        self._to_read: list[tuple[tuple[list[Any], Any, list[Any]], asyncio.Future]] = []
        self._reader: asyncio.Task | None = None
        self.device_error: str | None = None  # batch mode's; the scheduler keeps its own

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose device broke (``janus.engine.health``) is unhealthy,
        so Serve replaces it; meanwhile its requests fail at once with ``DEVICE_LOST`` (503)."""
        broken = self.device_error or (self.loop.scheduler.device_error if self.loop is not None else None)
        if broken:
            raise RuntimeError(broken)

    async def generate(self, request: dict[str, Any]) -> Answer:
        """One request -> its answer (sharing the device with its neighbours)."""
        if self.loop is None:
            return await self.run_batch(request)
        self.serving_stats.requests += 1
        return await self._run(request)

    async def _run(self, request: dict[str, Any], on_token: Any = None) -> Answer:
        """Submit a request's engine requests (best-of-k: its candidates; ``on_token`` streams the first
        one's tokens), wait for them, read them back (score) if the actor does, and answer."""
        engine_requests, plan = self.actor.expand([request])
        tickets = [
            self.loop.submit(r, on_token=on_token if i == 0 else None) for i, r in enumerate(engine_requests)
        ]
        if on_token is not None:
            tickets[0].add_done_callback(lambda t: on_token(None))
        try:
            results = await asyncio.gather(*(ticket_result(t) for t in tickets))
        finally:
            self._cancel([t for t in tickets if not t.done])
        if plan is not None:
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            self._to_read.append(((engine_requests, plan, results), done))
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read_finished())
            results = await done
        return self._answer(results[0], tickets[0].prompt_tokens or 0, len(engine_requests))

    def _answer(self, result: Any, prompt_tokens: int, candidates: int) -> Answer:
        if not self.synthesis:
            return Answer.of(result)
        return Answer.of(
            result, prompt_tokens=prompt_tokens, num_tokens=self.actor.engine.image_tokens * candidates
        )

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
        ``{"result": Answer}``. Cancelled (the client left) -> its rows are freed next step.

        The first tokens are handed on the moment they are decoded; after them, the tokens decoded
        meanwhile at most every ``stream_interval_s``, as one delta (``TokenRelay``): each item is a
        message through Ray to the ingress, and one per token (a CPU decode step is ~2 ms) cost the
        chat route its tail latency under load."""
        self._check_streaming()
        self.serving_stats.requests += 1
        t0 = time.perf_counter()
        relay, tokens = self.relay, self.relay.stream()
        request = self.actor.expand([request])[0][0]
        ticket = self.loop.submit(request, on_token=lambda t: relay.push(tokens, t))
        ticket.add_done_callback(lambda t: relay.push(tokens, None))
        text = IncrementalText(self.actor.engine.tokenizer)
        try:
            async for delta in text_deltas(tokens, text, per_token=self.stream_interval_s <= 0):
                if t0:  # the first text of this request
                    self.serving_stats.first_text(first_token_parts(t0, ticket, tokens, time.perf_counter()))
                    t0 = 0.0
                yield {"delta": delta}
            yield {"result": self._answer(ticket.result, 0, 1)}
        finally:
            self._cancel([ticket] if not ticket.done else [])

    async def stream_image(
        self, request: dict[str, Any], partial_images: int
    ) -> AsyncIterator[dict[str, Any]]:
        """One image request: ``{"partial": uint8 [H, W, 3], "index": i}`` for each of ``partial_images``
        pictures of the grid so far (the first candidate's, evenly spread over its codes), then
        ``{"result": Answer}``. Cancelled (the client left) -> its rows are freed next step."""
        self._check_streaming()
        self.serving_stats.requests += 1
        relay, tokens = self.relay, self.relay.stream()
        tokens.eager = False  # codes are handed on at the stream interval, not every step
        on_token = (lambda t: relay.push(tokens, t)) if partial_images else None
        answer = asyncio.ensure_future(self._run(request, on_token=on_token))
        engine = self.actor.engine
        try:
            codes: list[int] = []
            due = partial_thresholds(engine.image_tokens, partial_images)
            while due:
                taken = await tokens.take()
                codes += [t for t in taken if t is not None]
                if taken[-1] is None:
                    break
                if len(codes) >= due[0]:
                    index = partial_images - len(due)
                    while due and len(codes) >= due[0]:
                        due.pop(0)
                    picture = await asyncio.to_thread(partial_image, engine, codes)
                    yield {"partial": picture, "index": index}
            yield {"result": await answer}
        finally:
            answer.cancel()

    def _cancel(self, tickets: list[Ticket]) -> None:
        """The caller went away: the scheduler frees these requests' rows at its next step."""
        for ticket in tickets:
            ticket.cancel()
        self.serving_stats.cancelled += len(tickets)

    def _check_streaming(self) -> None:
        if self.loop is None:
            raise RuntimeError("streaming needs batching.mode: scheduler")

    async def _sample_rows(self, metrics: ReplicaMetrics) -> None:
        """The scheduler's running and queued requests, as gauges, every second."""
        scheduler = self.loop.scheduler
        while True:
            metrics.rows(len(scheduler.running), len(scheduler.waiting))
            await asyncio.sleep(1.0)

    @serve.batch
    async def run_batch(self, requests: list[dict[str, Any]]) -> list[Answer]:
        self.serving_stats.requests += len(requests)
        self.largest_batch = max(self.largest_batch, len(requests))
        # in a thread: the replica keeps accepting requests (the next batch forms meanwhile)
        return await asyncio.to_thread(self._generate_batch, requests)

    def _generate_batch(self, requests: list[dict[str, Any]]) -> list[Answer]:
        if self.device_error is None:
            try:
                results = self.actor.generate(requests)
            except Exception as exc:
                if not (broken := fatal_device_error(exc)):
                    raise
                self.device_error = f"the device of this replica broke ({broken}); retry"
        if self.device_error is not None:
            return [Answer(status=ERROR, code=DEVICE_LOST, error=self.device_error) for _ in requests]
        if not self.synthesis:
            return [Answer.of(r) for r in results]
        engine = self.actor.engine
        return [
            self._answer(r, len(engine.prompt_ids(q["prompt"])), q.get("best_of", 1))
            for q, r in zip(requests, results, strict=True)
        ]

    def info(self) -> dict[str, Any]:
        """What the ingress needs to validate requests for this model; answers once it is loaded."""
        engine = self.actor.engine
        if self.synthesis:
            return {
                "model": self.actor.model_name,
                "image_size": engine.image_size,
                "scores": self.actor.quality.score,
                "streaming": self.loop is not None,
            }
        return {
            "model": self.actor.model_name,
            "max_images": engine.max_images_per_request,
            "image_processor": engine.processor.image_processor.to_dict(),
            "image_tag": engine.image_tag,
            "streaming": self.loop is not None,
        }

    def stats(self) -> dict[str, Any]:
        """This replica's id and counters (``ServingStats``), model calls or steps made, and the
        requests running and queued now."""
        scheduler = self.loop.scheduler if self.loop is not None else None
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            **self.serving_stats.snapshot(),
            "model_calls": self.actor.calls if scheduler is None else scheduler.steps,
            "largest_batch": self.largest_batch if scheduler is None else scheduler.peak_running,
            "running": len(scheduler.running) if scheduler else 0,
            "queued": len(scheduler.waiting) if scheduler else 0,
        }
