"""Tokens from a model replica's scheduler thread to its event loop, and a ticket's result as an
awaitable: the bridge between ``janus.engine.scheduler`` (plain threads) and Serve's asyncio replica.

The scheduler's thread appends each token to its request's ``TokenStream`` (``TokenRelay.push``) and
wakes the loop once per round for all the streams that are due (``flush``); the loop turns a chat
stream's tokens into text (``text_deltas``) and a streamed image's into partial pictures.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from janus.engine.detokenize import IncrementalText
    from janus.engine.ticket import Ticket


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


async def text_deltas(
    stream: TokenStream, text: IncrementalText, per_token: bool = False
) -> AsyncIterator[str]:
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


def first_token_parts(arrived: float, ticket: Ticket, stream: TokenStream, sent: float) -> tuple[float, ...]:
    """A streamed request's time to first text in the replica, in parts (``ServingStats``)."""
    admitted = ticket.admitted_at or ticket.submitted_at
    made = ticket.first_token_at or sent
    taken = stream.first_taken_at or sent
    return (
        ticket.submitted_at - arrived,
        admitted - ticket.submitted_at,
        made - admitted,
        taken - made,
        sent - taken,
    )


async def ticket_result(ticket: Ticket) -> Any:
    """The ticket's result, awaited on the loop; a caller that goes away cancels the ticket."""
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
