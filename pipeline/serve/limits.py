"""Per-key limits that hold across ingress replicas: one ``RateLimits`` replica keeps every key's counts
(a Serve deployment of one replica: started, restarted and deleted with the application), and each
ingress asks it before a request runs (``Gate``).

Fail open on restart: the counts live in that replica's memory, so when it restarts every key starts
a fresh minute (a key can get up to one extra minute's allowance right after). Fail closed while it
cannot answer: a request it does not admit within ``api.limits_timeout_s`` gets 503 + Retry-After,
so nobody passes unmetered.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from .config import LimitsSection
from .errors import APIError

logger = logging.getLogger(__name__)

WINDOW_S = 60.0
#: a limit's name in the headers (x-ratelimit-*-<name>) and metrics -> its LimitsSection field
PER_MINUTE = {"requests": "requests_per_minute", "images": "images_per_minute", "tokens": "tokens_per_minute"}


class Window:
    """What a key used in the last minute: a log of (time, amount), so that a minute is any 60 s."""

    def __init__(self) -> None:
        self.log: deque[tuple[float, int]] = deque()
        self.used = 0

    def expire(self, now: float) -> None:
        while self.log and self.log[0][0] <= now - WINDOW_S:
            self.used -= self.log.popleft()[1]

    def add(self, now: float, amount: int) -> None:
        if amount:
            self.log.append((now, amount))
            self.used += amount

    def wait(self, now: float, amount: int, limit: int) -> float:
        """Seconds until ``amount`` more fits under ``limit`` (the oldest entries leave first)."""
        over = self.used + amount - limit
        if over <= 0:
            return 0.0
        for t, a in self.log:
            over -= a
            if over <= 0:
                return max(t + WINDOW_S - now, 0.0)
        return WINDOW_S

    def reset(self, now: float) -> float:
        """Seconds until the window is empty again (OpenAI's x-ratelimit-reset-*)."""
        return max(self.log[-1][0] + WINDOW_S - now, 0.0) if self.log else 0.0


@dataclass
class KeyCounts:
    windows: dict[str, Window] = field(default_factory=lambda: {k: Window() for k in PER_MINUTE})
    leases: dict[int, float] = field(default_factory=dict)  # running requests: lease -> expiry


class Counts:
    """Every key's counts (plain Python: the ``RateLimits`` replica holds one)."""

    def __init__(self, clock=time.monotonic):
        self.keys: dict[str, KeyCounts] = {}
        self.clock = clock
        self._leases = itertools.count(1)

    def admit(self, name: str, limits: dict[str, Any], images: int, lease_s: float) -> dict[str, Any]:
        """Admit one request of ``images`` images, or say which limit refuses it and for how long.
        Returns ``{"lease", "refused", "retry_after_s", "state"}``; ``state``: per limit, (limit,
        remaining, reset seconds), for the response's headers."""
        now, counts = self.clock(), self.keys.setdefault(name, KeyCounts())
        for window in counts.windows.values():
            window.expire(now)
        counts.leases = {k: t for k, t in counts.leases.items() if t > now}
        cost = {"requests": 1, "images": images, "tokens": 1}  # tokens: the window must have room left
        refused, retry = None, 0.0
        for kind, key in PER_MINUTE.items():
            limit = limits.get(key)
            if limit is not None and counts.windows[kind].used + cost[kind] > limit:
                refused, retry = kind, counts.windows[kind].wait(now, cost[kind], limit)
                break
        parallel = limits.get("max_parallel_requests")
        if refused is None and parallel is not None and len(counts.leases) >= parallel:
            refused, retry = "parallel", 1.0
        lease = None
        if refused is None:
            counts.windows["requests"].add(now, 1)
            counts.windows["images"].add(now, images)
            lease = next(self._leases)
            counts.leases[lease] = now + lease_s
        return {
            "lease": lease,
            "refused": refused,
            "retry_after_s": retry,
            "state": self._state(counts, limits, now),
        }

    def release(self, name: str, lease: int | None, tokens: int) -> None:
        """A request ended: its lease ends, its tokens count. Idempotent (an ingress retries a release
        whose answer it did not see): only the call that ends a running lease counts the tokens."""
        counts = self.keys.setdefault(name, KeyCounts())
        if counts.leases.pop(lease, None) is not None:
            counts.windows["tokens"].add(self.clock(), tokens)

    @staticmethod
    def _state(counts: KeyCounts, limits: dict[str, Any], now: float) -> dict[str, tuple[int, int, float]]:
        state = {}
        for kind, key in PER_MINUTE.items():
            if limits.get(key) is not None:
                window = counts.windows[kind]
                state[kind] = (limits[key], max(limits[key] - window.used, 0), window.reset(now))
        return state


@serve.deployment(
    name="RateLimits", num_replicas=1, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0}
)
class RateLimits:
    """The one holder of every key's counts (methods are async and never wait: each runs whole)."""

    def __init__(self) -> None:
        self.counts = Counts()

    async def admit(self, name: str, limits: dict[str, Any], images: int, lease_s: float) -> dict[str, Any]:
        return self.counts.admit(name, limits, images, lease_s)

    async def release(self, name: str, lease: int | None, tokens: int) -> None:
        self.counts.release(name, lease, tokens)


class RateLimited(APIError):
    """429: ``limit`` (requests, images, tokens or parallel) refused the request."""

    def __init__(self, limit: str, why: str, headers: dict[str, str]):
        super().__init__(
            429, f"rate limit reached for {limit}: {why}", code="rate_limit_exceeded", headers=headers
        )
        self.limit = limit


@dataclass
class Admission:
    lease: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


class Background:
    """Tasks started to run on after their caller returns, each held until done: the event loop keeps
    only a weak reference to a task, so one nobody holds can be collected mid-run."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def start(self, coro: Coroutine[Any, Any, Any], context: contextvars.Context | None = None) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


class Gate:
    """An ingress replica's client of ``RateLimits``; keys without limits never ask it."""

    def __init__(self, handle: Any, timeout_s: float, lease_s: float, retry_after_s: int):
        self.handle = handle
        self.timeout_s = timeout_s
        self.lease_s = lease_s
        self.retry_after_s = retry_after_s
        self._retrying = Background()  # releases still being retried

    async def admit(self, name: str, limits: LimitsSection, images: int = 0) -> Admission:
        """A lease for one request, or 429 (a limit) / 503 (the counts did not answer: fail closed)."""
        if self.handle is None or not limits.any:
            return Admission()
        if limits.images_per_minute is not None and images > limits.images_per_minute:
            raise APIError(
                400,
                f"this request makes {images} images (n x best_of); this key may make at most "
                f"{limits.images_per_minute} a minute",
                code="rate_limit_exceeds_request",
            )
        try:
            decision = await asyncio.wait_for(
                _awaited(self.handle.admit.remote(name, limits.model_dump(), images, self.lease_s)),
                self.timeout_s,
            )
        except Exception as exc:  # timeout, replica down or restarting
            raise APIError(
                503,
                f"the rate limiter is unavailable right now ({type(exc).__name__}); retry later",
                code="rate_limiter_unavailable",
                headers={"Retry-After": str(self.retry_after_s)},
            ) from None
        headers = rate_headers(decision["state"])
        if decision["refused"] is not None:
            kind = decision["refused"]
            retry = max(1, math.ceil(decision["retry_after_s"]))
            raise RateLimited(
                kind, f"{_what(kind, limits)}; retry in {retry} s", {**headers, "Retry-After": str(retry)}
            )
        return Admission(decision["lease"], headers)

    async def release(self, name: str, admission: Admission, tokens: int = 0) -> None:
        """The request ended: its lease ends and its tokens count before the next request of this
        client is admitted. A limiter that does not answer within ``timeout_s`` (a loaded cluster, a
        restarting holder) delays the answer by no more than that: the release is then retried in
        the background until it lands or the lease would have expired anyway, so a key limited to
        one request at a time is not locked out for the lease's whole length."""
        if self.handle is None or admission.lease is None:
            return
        if await self._release_once(name, admission.lease, tokens):
            return
        self._retrying.start(self._retry_release(name, admission.lease, tokens))

    async def _release_once(self, name: str, lease: int, tokens: int) -> bool:
        try:
            await asyncio.wait_for(_awaited(self.handle.release.remote(name, lease, tokens)), self.timeout_s)
            return True
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # this task is being cancelled: let it end
                raise
            failure = "CancelledError"  # Serve cancelled the call itself
        except Exception as exc:
            failure = type(exc).__name__
        logger.warning("rate limiter release for key %s failed (%s); retrying", name, failure)
        return False

    async def _retry_release(self, name: str, lease: int, tokens: int) -> None:
        deadline, delay = time.monotonic() + self.lease_s, 0.5
        while time.monotonic() + delay < deadline:
            await asyncio.sleep(delay)
            if await self._release_once(name, lease, tokens):
                return
            delay = min(delay * 2, 10.0)
        logger.warning("rate limiter release for key %s never landed: the lease expires on its own", name)


async def _awaited(response: Any) -> Any:
    return await response


def _what(kind: str, limits: LimitsSection) -> str:
    if kind == "parallel":
        return f"{limits.max_parallel_requests} requests at a time"
    return f"{getattr(limits, PER_MINUTE[kind])} {kind} per minute"


def rate_headers(state: dict[str, Any]) -> dict[str, str]:
    """OpenAI's x-ratelimit-limit-*, -remaining-*, -reset-* (reset as a duration, e.g. ``6m0s``)."""
    headers = {}
    for kind, (limit, remaining, reset) in state.items():
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
        headers[f"x-ratelimit-reset-{kind}"] = duration(reset)
    return headers


def duration(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s" if minutes else f"{rest:.3g}s"
