"""The online API's metrics, through Serve's own metrics (``ray.serve.metrics``: each also carries the
deployment, replica and application), exported by Ray's Prometheus endpoint as ``ray_<name>``
(counters ``ray_<name>_total``, histograms ``ray_<name>_bucket`` / ``_sum`` / ``_count``).
``deploy/grafana/janus.json`` plots exactly these; its test reads ``METRICS``."""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

#: seconds: a chat's first token (tens of ms) to an image on a busy CPU (minutes)
LATENCY_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]

#: name -> (kind, description, tags)
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "janus_requests": (
        "counter",
        "API answers by route, model, key and HTTP status.",
        ("route", "model", "key", "status"),
    ),
    "janus_unauthorized": ("counter", "Requests refused for a missing or wrong API key (401).", ("route",)),
    "janus_rate_limited": (
        "counter",
        "Requests refused by a key's limit (429), by limit.",
        ("route", "model", "key", "limit"),
    ),
    "janus_chat_ttft_seconds": (
        "histogram",
        "Streamed chat: request arrival to its first text.",
        ("model", "key"),
    ),
    "janus_chat_e2e_seconds": ("histogram", "Chat: request arrival to the answer's end.", ("model", "key")),
    "janus_image_seconds": (
        "histogram",
        "Request arrival to each of its images being ready.",
        ("model", "key"),
    ),
    "janus_chat_tokens": (
        "counter",
        "Chat tokens read (prompt) and written (completion).",
        ("model", "key", "kind"),
    ),
    "janus_images_generated": ("counter", "Images generated.", ("model", "key")),
    "janus_scheduler_rows": (
        "gauge",
        "Requests in a model replica's scheduler, running or queued.",
        ("model", "state"),
    ),
}


def _make(name: str):
    kind, description, tags = METRICS[name]
    if kind == "histogram":
        return Histogram(name, description, boundaries=LATENCY_S, tag_keys=tags)
    return {"counter": Counter, "gauge": Gauge}[kind](name, description, tag_keys=tags)


class IngressMetrics:
    """The HTTP ingress's: made once per replica at start (the first request finds them ready)."""

    def __init__(self) -> None:
        self.requests = _make("janus_requests")
        self.unauthorized = _make("janus_unauthorized")
        self.rate_limited = _make("janus_rate_limited")
        self.chat_ttft = _make("janus_chat_ttft_seconds")
        self.chat_e2e = _make("janus_chat_e2e_seconds")
        self.image_seconds = _make("janus_image_seconds")
        self.chat_tokens = _make("janus_chat_tokens")
        self.images = _make("janus_images_generated")

    def answered(self, route: str, model: str, key: str, status: int) -> None:
        self.requests.inc(tags={"route": route, "model": model, "key": key, "status": str(status)})


class ReplicaMetrics:
    """A model replica's scheduler: its running and queued requests."""

    def __init__(self, model: str):
        self.model = model
        self._rows = _make("janus_scheduler_rows")

    def rows(self, running: int, queued: int) -> None:
        self._rows.set(running, tags={"model": self.model, "state": "running"})
        self._rows.set(queued, tags={"model": self.model, "state": "queued"})
