"""The OpenAI Images API in full and the faults that must not cost a healthy row, on the real model
server with the shipped shapes model (its pictures can be judged): images by URL (a local store, S3
presigned links on moto, a store that fails), streamed images with partial pictures, clients that
leave a streamed answer or an image request (their rows are freed), and a fresh ingress whose first
streamed answer ends with its last token.

The module's app ``shapes`` holds the two model deployments; further ingress-only apps are bound to
them (``ingress``), so each configuration costs an ingress replica, not a model load.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import PIL.Image
import pytest

from janus.shapes import Scene, caption, draw, judge
from tests.support.shapes import shapes_vq

pytestmark = pytest.mark.timeout(900)

MODEL = "janus-shapes"
SMALL = {"ray_actor_options": {"num_cpus": 0.1}}
ONE = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}, **SMALL}
SCENE = Scene("red", "circle", "left", "blue")
CFG = 5.0  # the shapes model's best guidance (tests/test_shapes_model.py)
VQ = shapes_vq()  # the shipped checkpoint's geometry
SIDE = VQ.image_size


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))


def colours(picture: np.ndarray | Scene) -> tuple[str, str]:
    """The shape's colour and the background's: what an image must have to be its prompt's (the model
    draws the asked colour 87% of the time and background 98%, the shape 59%: docs/shapes_model.md)."""
    got = picture.attributes() if isinstance(picture, Scene) else judge(picture)
    return got["color"], got["background"]


@pytest.fixture(scope="module")
def shapes_app(serve_port, tmp_path_factory):
    from ray import serve

    from pipeline.serve.app import build_app

    model = {"path": "shapes", "name": MODEL, "dtype": "float32"}
    store = tmp_path_factory.mktemp("store")
    args = {
        "api": {"image_store": {"url": f"file://{store}/images/"}, "deployment": SMALL},
        "synthesis": {
            "model": model,
            "engine": {"max_batch_size": 4},
            "batching": {"max_batch_size": 4},
            "deployment": ONE,
        },
        "caption": {
            "model": model,
            "engine": {"max_batch_size": 4},
            "batching": {"max_batch_size": 4},
            "deployment": ONE,
        },
    }
    try:
        serve.run(build_app(args), name="shapes", route_prefix="/shapes")
        yield {"url": f"http://127.0.0.1:{serve_port}/shapes", "store": store / "images", "port": serve_port}
    finally:
        serve.delete("shapes")


def ingress(name: str, settings: dict, **kwargs):
    """An ingress-only app in front of ``shapes``' model deployments, at ``/<name>``; a context manager."""
    import contextlib

    from ray import serve

    from pipeline.serve.app import JanusAPI

    @contextlib.contextmanager
    def running():
        synthesis = serve.get_deployment_handle("Synthesizer", app_name="shapes")
        captioner = serve.get_deployment_handle("Captioner", app_name="shapes")
        names = {"synthesis": MODEL, "caption": MODEL}
        app = JanusAPI.options(**SMALL).bind(
            synthesis, captioner, names, {"deployment": SMALL, **settings}, **kwargs
        )
        serve.run(app, name=name, route_prefix=f"/{name}")
        try:
            yield
        finally:
            serve.delete(name)

    return running()


def model_stats(name: str = "Synthesizer") -> dict:
    from ray import serve

    return serve.get_deployment_handle(name, app_name="shapes").stats.remote().result()


def wait_until_freed(name: str, cancelled_before: int, timeout_s: float = 60) -> dict:
    """The replica's stats once it counted a cancellation and its scheduler holds no request."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = model_stats(name)
        if stats["cancelled"] > cancelled_before and stats["running"] == stats["queued"] == 0:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)


def events(response: httpx.Response) -> list[tuple[str | None, dict]]:
    """Server-sent events as (event name, data)."""
    out, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: ") and line != "data: [DONE]":
            out.append((name, json.loads(line[len("data: ") :])))
            name = None
    return out


# -- response_format: url --------------------------------------------------------------------------


def test_url_images_from_a_local_store_with_the_official_client(shapes_app):
    oai = openai.OpenAI(base_url=f"{shapes_app['url']}/v1", api_key="unused", max_retries=0, timeout=300)
    out = oai.images.generate(
        model=MODEL,
        prompt=caption(SCENE),
        n=2,
        response_format="url",
        extra_body={"seed": 1, "cfg_weight": CFG},
    )
    urls = [d.url for d in out.data]
    assert all(u.startswith("file://") for u in urls) and len(set(urls)) == 2
    paths = [Path(u[len("file://") :]) for u in urls]
    assert all(p.parent == shapes_app["store"] for p in paths)
    assert all(len(p.stem) >= 43 for p in paths)  # 256 random bits each: not guessable from another
    images = [png_array(p.read_bytes()) for p in paths]
    assert all(im.shape == (SIDE, SIDE, 3) for im in images)
    assert all(colours(im) == colours(SCENE) for im in images), [judge(im) for im in images]
    assert out.usage.output_tokens == 2 * VQ.image_tokens and out.usage.input_tokens > 0
    assert out.usage.total_tokens == out.usage.input_tokens + out.usage.output_tokens


def test_url_images_on_s3_are_presigned_links(shapes_app, s3_endpoint):
    import fsspec

    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    fsspec.filesystem("s3", **options).mkdir("served-images")
    store = {"url": "s3://served-images/out/", "storage_options": options, "url_expiry_s": 600}
    with ingress("s3store", {"image_store": store}):
        oai = openai.OpenAI(
            base_url=f"http://127.0.0.1:{shapes_app['port']}/s3store/v1", api_key="x", max_retries=0
        )
        out = oai.images.generate(
            model=MODEL, prompt=caption(SCENE), response_format="url", extra_body={"seed": 2}
        )
    url = out.data[0].url
    assert (
        url.startswith(f"{s3_endpoint}/served-images/out/")
        and "X-Amz-Signature=" in url
        and "X-Amz-Expires=600" in url
    )
    got = httpx.get(url, timeout=30)
    assert got.status_code == 200 and png_array(got.content).shape == (SIDE, SIDE, 3)


def test_a_store_that_fails_is_a_5xx_with_the_error_body(shapes_app):
    from tests.support.serving import free_port

    dead = {  # an S3 endpoint where nothing listens: the store's fault, not the client's
        "url": "s3://nowhere/out/",
        "storage_options": {
            "key": "k",
            "secret": "s",
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
        },
    }
    with ingress("deadstore", {"image_store": dead}):
        r = httpx.post(
            f"http://127.0.0.1:{shapes_app['port']}/deadstore/v1/images/generations",
            json={"prompt": caption(SCENE), "response_format": "url", "seed": 3},
            timeout=300,
        )
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "image_store_error" and error["type"] == "server_error"


# -- stream: true -----------------------------------------------------------------------------------


def test_streamed_image_with_partial_pictures_of_the_prompt(shapes_app):
    """The official client's stream: two partial pictures (the rows drawn so far, the rest blank), then
    the image; the last partial already shows the prompt's background, the image its colours."""
    oai = openai.OpenAI(base_url=f"{shapes_app['url']}/v1", api_key="unused", max_retries=0, timeout=300)
    stream = oai.images.generate(
        model=MODEL,
        prompt=caption(SCENE),
        stream=True,
        partial_images=2,
        extra_body={"seed": 4, "cfg_weight": CFG},
    )
    got = list(stream)
    assert [e.type for e in got] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in got[:2]] == [0, 1]
    assert all(e.size == f"{SIDE}x{SIDE}" and e.output_format == "png" for e in got)
    partials = [png_array(base64.b64decode(e.b64_json)) for e in got[:2]]
    final = png_array(base64.b64decode(got[-1].b64_json))
    assert colours(final) == colours(SCENE), judge(final)
    assert judge(partials[-1])["background"] == SCENE.background
    # a third of the rows, two thirds: drawn as the image's own top rows, blank below
    for picture, rows in zip(partials, (VQ.grid // 3, 2 * VQ.grid // 3), strict=True):
        cut = rows * SIDE // VQ.grid
        assert (picture[cut:] == 128).all() and not (picture[:cut] == 128).all()
    assert got[-1].usage.output_tokens == VQ.image_tokens and got[-1].model_extra["seed"] == 4


def test_a_stream_without_partials_is_one_completed_event(shapes_app):
    with httpx.stream(
        "POST",
        f"{shapes_app['url']}/v1/images/generations",
        json={"prompt": caption(SCENE), "stream": True, "seed": 5},
        timeout=300,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r)
    assert [(name, data["type"]) for name, data in got] == [("image_generation.completed",) * 2]


# -- clients that leave free their rows -------------------------------------------------------------


def test_a_client_leaving_a_streamed_image_frees_its_rows(shapes_app):
    before = model_stats()["cancelled"]
    body = {"prompt": caption(SCENE), "stream": True, "partial_images": 3, "seed": 6}
    with httpx.stream("POST", f"{shapes_app['url']}/v1/images/generations", json=body, timeout=300) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[len("data: ") :])["type"] == "image_generation.partial_image"
    stats = wait_until_freed("Synthesizer", before)
    assert stats["cancelled"] == before + 1


def test_a_client_leaving_an_image_request_frees_its_rows(shapes_app):
    before = model_stats()["cancelled"]
    body = {"prompt": caption(SCENE), "n": 2, "seed": 7}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while both images are drawn
        httpx.post(
            f"{shapes_app['url']}/v1/images/generations", json=body, timeout=httpx.Timeout(300, read=0.5)
        )
    stats = wait_until_freed("Synthesizer", before)
    assert stats["cancelled"] == before + 2  # both images' requests


def chat_body(**extra) -> dict:
    buf = io.BytesIO()
    PIL.Image.fromarray(draw(SCENE)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "Describe this image."},
    ]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def test_a_client_leaving_a_streamed_answer_frees_its_rows(shapes_app):
    before = model_stats("Captioner")["cancelled"]
    body = chat_body(stream=True, max_tokens=400, ignore_eos=True)  # long enough to be left
    with httpx.stream("POST", f"{shapes_app['url']}/v1/chat/completions", json=body, timeout=300) as r:
        next(line for line in r.iter_lines() if '"content": "' in line and '"content": ""' not in line)
    stats = wait_until_freed("Captioner", before)
    assert stats["cancelled"] == before + 1


# -- warm from the first request ---------------------------------------------------------------------


def test_a_fresh_ingress_ends_its_first_stream_with_its_last_token(shapes_app):
    """Nothing on a streamed chat's path is set up at its end: the first stream after start sends its
    finish chunk right after its last text, as every later one does."""
    with ingress("fresh", {}):
        url = f"http://127.0.0.1:{shapes_app['port']}/fresh/v1/chat/completions"
        gaps = []
        for _ in range(2):
            stamps = []
            with httpx.stream("POST", url, json=chat_body(stream=True, max_tokens=16), timeout=300) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        choices = json.loads(line[len("data: ") :])["choices"]
                        stamps.append((time.perf_counter(), choices[0]["finish_reason"] if choices else None))
            last_text = max(t for t, finish in stamps if finish is None)
            finish = next(t for t, f in stamps if f is not None)
            gaps.append(finish - last_text)
    assert gaps[0] < 0.5, gaps  # a lazy import or set-up at the end would take seconds here


# -- metrics an operator can graph -------------------------------------------------------------------

METERED_KEYS = {"ops": "sk-ops-0123456789abcdef", "tight": "sk-tight-0123456789abcdef"}


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Ray's Prometheus export: sample name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, []) if all(got.get(k) == w for k, w in labels.items()))


@pytest.mark.slow
def test_metrics_with_the_right_counts_and_the_dashboard_plots_only_them(shapes_app, ray_session, tmp_path):
    """Real requests through a keyed, limited ingress and a batch actor's rows, then Ray's export: each
    of our metrics with the counts those requests make, labelled by route, model and key; and every
    metric the Grafana dashboard plots is among them."""
    import ray
    import yaml

    from pipeline.actors import Synthesizer
    from pipeline.serve.config import APISection, load_keys
    from pipeline.serve.limits import RateLimits
    from tests.test_dashboard import dashboard_metrics

    entries = [
        {"key": METERED_KEYS["ops"], "name": "ops"},
        {"key": METERED_KEYS["tight"], "name": "tight", "requests_per_minute": 1},
    ]
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump(entries))
    settings = {"keys": {"file": str(tmp_path / "keys.yaml")}}
    keys = load_keys(APISection.model_validate(settings), environ={})
    base = f"http://127.0.0.1:{shapes_app['port']}/metered"
    ops = {"Authorization": f"Bearer {METERED_KEYS['ops']}"}
    tight = {"Authorization": f"Bearer {METERED_KEYS['tight']}"}
    with (
        ingress("metered", settings, keys=keys, limits=RateLimits.bind()),
        httpx.Client(base_url=base, timeout=300) as c,
    ):
        plain = c.post("/v1/chat/completions", json=chat_body(max_tokens=8), headers=ops).json()
        with c.stream(
            "POST",
            "/v1/chat/completions",
            json=chat_body(max_tokens=8, stream=True, stream_options={"include_usage": True}),
            headers=ops,
        ) as r:
            streamed = events(r)
        assert (
            c.post(
                "/v1/images/generations", json={"prompt": caption(SCENE), "n": 2, "seed": 8}, headers=ops
            ).status_code
            == 200
        )
        assert c.get("/v1/models").status_code == 401
        assert [c.get("/v1/models", headers=tight).status_code for _ in range(2)] == [200, 429]
    usage = [plain["usage"], next(d for _, d in streamed if d.get("usage"))["usage"]]

    rows = {
        "key": np.array(["a", "b", "c", "d"], dtype=object),
        "prompt": np.array(
            [caption(SCENE), caption(Scene("green", "square", "top", "white")), "a cat on a bike", ""],
            dtype=object,
        ),
        "seed": np.arange(4),
        "cfg_weight": np.full(4, CFG),
        "temperature": np.ones(4),
    }
    actor = (
        ray.remote(Synthesizer)
        .options(num_cpus=0.1)
        .remote(
            {"path": "shapes", "name": "metrics-batch", "dtype": "float32"},
            {"max_batch_size": 4},
            None,
            {"min_score": 0.05},  # the cat's score is ~1e-6, the two scenes' 0.14 and 0.70
        )
    )
    statuses = list(ray.get(actor.__call__.remote(rows), timeout=300)["status"])
    assert statuses == ["ok", "ok", "filtered", "error"]

    app = {"application": "metered"}
    chat_route, images_route = {"route": "/v1/chat/completions"}, {"route": "/v1/images/generations"}
    expected = {
        (
            "ray_janus_requests_total",
            (("model", MODEL), ("key", "ops"), ("status", "200"), *chat_route.items()),
        ): 2,
        ("ray_janus_requests_total", (("key", "ops"), ("status", "200"), *images_route.items())): 1,
        ("ray_janus_requests_total", (("route", "/v1/models"), ("key", ""), ("status", "401"))): 1,
        ("ray_janus_requests_total", (("route", "/v1/models"), ("key", "tight"), ("status", "429"))): 1,
        ("ray_janus_unauthorized_total", (("route", "/v1/models"),)): 1,
        ("ray_janus_rate_limited_total", (("key", "tight"), ("limit", "requests"))): 1,
        ("ray_janus_chat_ttft_seconds_count", (("key", "ops"),)): 1,
        ("ray_janus_chat_e2e_seconds_count", (("key", "ops"),)): 2,
        ("ray_janus_image_seconds_count", (("key", "ops"),)): 2,
        ("ray_janus_images_generated_total", (("key", "ops"), ("model", MODEL))): 2,
        ("ray_janus_chat_tokens_total", (("kind", "prompt"),)): sum(u["prompt_tokens"] for u in usage),
        ("ray_janus_chat_tokens_total", (("kind", "completion"),)): sum(
            u["completion_tokens"] for u in usage
        ),
    }
    batch = {"model": "metrics-batch", "actor": "Synthesizer"}
    for status in ("ok", "filtered", "error"):
        expected[("ray_janus_batch_rows_total", (*batch.items(), ("status", status)))] = statuses.count(
            status
        )

    def shortfalls(samples: dict) -> list:
        out = []
        for (name, labels), want in expected.items():
            scope = {} if name.startswith("ray_janus_batch") else app
            got = total(samples, name, **scope, **dict(labels))
            if got != want:
                out.append((name, labels, want, got))
        if not total(samples, "ray_janus_batch_rows_per_second", **batch) > 0:
            out.append("ray_janus_batch_rows_per_second")
        states = {labels.get("state") for labels, _ in samples.get("ray_janus_scheduler_rows", [])}
        if not {"running", "queued"} <= states:  # the model replicas' gauges
            out.append(("ray_janus_scheduler_rows", states))
        return out

    port = ray_session._private.worker.global_worker.node.metrics_export_port
    deadline, missing = time.monotonic() + 300, ["not scraped yet"]
    while missing and time.monotonic() < deadline:  # the export runs every few seconds
        time.sleep(1)
        samples = scrape(port)
        missing = shortfalls(samples)
    assert not missing, missing
    plotted = dashboard_metrics()
    assert plotted and not [m for m in plotted if m not in samples], sorted(
        m for m in plotted if m not in samples
    )


def test_best_of_says_which_score_is_which_candidates(shapes_app):
    """best_of over HTTP: the image is the winning candidate's, and ``candidate_scores[k]`` is candidate
    k's own score: the candidate asked for alone by its seed scores the same and, for the winner, is
    the same picture (not only that the best is the maximum)."""
    from janus.engine.quality import candidate_seed

    body = {"model": MODEL, "prompt": caption(SCENE), "seed": 5, "cfg_weight": 1.5, "best_of": 3}
    with httpx.Client(base_url=shapes_app["url"], timeout=300) as client:
        best = client.post("/v1/images/generations", json=body).json()["data"][0]
        alone = [
            client.post(
                "/v1/images/generations", json={**body, "best_of": 1, "seed": candidate_seed(5, k)}
            ).json()["data"][0]
            for k in range(3)
        ]
    scores, winner = best["candidate_scores"], best["candidate"]
    assert len(scores) == 3 and winner == scores.index(max(scores)) and best["score"] == scores[winner]
    for k, item in enumerate(alone):
        assert item["score"] == pytest.approx(scores[k], abs=1e-4)
    picture = png_array(base64.b64decode(best["b64_json"]))
    assert picture.tobytes() == png_array(base64.b64decode(alone[winner]["b64_json"])).tobytes()
