"""The online API's error paths, against a stand-in model (tests/support/fake_model.py): each answer's
status code and OpenAI-style body, and that the model replica outlives every error."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx
import numpy as np
import PIL.Image
import pytest

pytestmark = pytest.mark.timeout(600)


def _png() -> str:
    buf = io.BytesIO()
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(text: str, **extra) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": _png()}}, {"type": "text", "text": text}]
    return {"model": "fake", "messages": [{"role": "user", "content": parts}], **extra}


def image(prompt: str) -> dict:
    return {"model": "fake", "prompt": prompt}


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.fixture(scope="module")
def api(serve_port):
    """One app: the real ingress in front of two stand-in models that start held in loading (the first
    test releases them); the caption model's queue holds one request (a machine this small cannot run
    a deployment per case)."""
    from ray import serve

    from pipeline.serve.app import JanusAPI
    from tests.support.fake_model import FakeModel

    small = {"ray_actor_options": {"num_cpus": 0.05}}
    settings = {"retry_after_s": 2, "request_timeout_s": 3.0, "load_wait_s": 1.0, "deployment": small}
    synth = FakeModel.options(name="FakeSynthesis", **small).bind("synthesis", True)
    caption = FakeModel.options(name="FakeCaption", max_ongoing_requests=1, max_queued_requests=1, **small).bind(
        "caption", True
    )
    app = JanusAPI.options(**small).bind(synth, caption, {"synthesis": "fake", "caption": "fake"}, settings)
    serve.run(app, name="fake", route_prefix="/")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}", timeout=60) as client:
            yield client
    finally:
        serve.delete("fake")


def handle(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, app_name="fake")


def replica(name: str) -> str:
    return handle(name).stats.remote().result()["replica"]


def test_while_a_model_loads_health_and_routes_answer_503(api):
    r = api.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    for route, body in (("/v1/chat/completions", chat("hi")), ("/v1/images/generations", image("a cat"))):
        r = api.post(route, json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert error_of(r)["code"] == "model_loading"
    for name in ("FakeSynthesis", "FakeCaption"):
        handle(name).load.remote().result()
    assert api.get("/health").status_code == 200
    assert api.post("/v1/images/generations", json=image("a cat")).status_code == 200


def test_out_of_memory_is_503_with_retry_after(api):
    for route, body in (("/v1/chat/completions", chat("oom")), ("/v1/images/generations", image("oom"))):
        r = api.post(route, json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        err = error_of(r)
        assert err["code"] == "overloaded" and err["type"] == "server_error" and "fake oom" in err["message"]


def test_our_bugs_are_500_with_the_same_body_and_the_replica_lives_on(api):
    before = replica("FakeCaption")
    for text in ("crash", "internal"):
        r = api.post("/v1/chat/completions", json=chat(text))
        assert r.status_code == 500
        err = error_of(r)
        assert err["code"] == "internal_error" and err["type"] == "server_error"
    r = api.post("/v1/images/generations", json=image("crash"))
    assert r.status_code == 500 and error_of(r)["code"] == "internal_error"
    assert api.post("/v1/chat/completions", json=chat("fine")).status_code == 200
    assert replica("FakeCaption") == before  # the same replica, not a restarted one


def test_a_model_that_does_not_answer_in_time_is_504(api):
    t0 = time.time()
    r = api.post("/v1/images/generations", json=image("slow"))
    assert r.status_code == 504 and error_of(r)["code"] == "timeout"
    assert time.time() - t0 < 20  # the ingress's limit (3 s), not the model's 30 s


def test_a_full_chat_queue_answers_503(api):
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(api.base_url), timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=chat("slow")) for _ in range(6)))

    codes = [r.status_code for r in asyncio.run(run())]
    assert 503 in codes, codes
    full = [r for r in asyncio.run(run()) if r.status_code == 503]
    assert all(r.headers["retry-after"] == "2" and error_of(r)["code"] == "overloaded" for r in full)


def test_a_client_leaving_mid_stream_cancels_the_model_request(api):
    model = handle("FakeCaption")
    before = model.stats.remote().result()["cancelled"]
    with api.stream("POST", "/v1/chat/completions", json=chat("hello", stream=True)) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if '"content": "a"' in line)  # tokens are flowing
    deadline = time.time() + 30
    while model.stats.remote().result()["cancelled"] == before and time.time() < deadline:
        time.sleep(0.5)
    assert model.stats.remote().result()["cancelled"] == before + 1


def test_a_request_error_before_the_first_token_is_a_plain_4xx(api):
    r = api.post("/v1/chat/completions", json=chat("invalid", stream=True))
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_request"
