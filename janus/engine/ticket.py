"""A submitted request's handle: its tokens as they are made, its result when done, and cancellation.

Plain Python (no torch): the scheduler's thread fills it, a caller's thread waits on it or cancels it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .common import Result

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
        self.prompt_tokens: int | None = None  # the prompt's length, once prepared (usage accounting)
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
