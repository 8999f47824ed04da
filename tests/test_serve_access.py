"""Who may use the API and how much: API keys (401 in OpenAI's shape), per-key limits (429 with
Retry-After and x-ratelimit-* headers) that hold across two ingress replicas, and what happens when
the replica that keeps the counts restarts (fail open) or cannot answer (fail closed).

The counting and the keys are checked in-process; over HTTP the real ingress runs in front of the
stand-in models (tests/support/fake_model.py): the model does not matter here.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import gc
import hashlib
import io
import pickle
import time
from pathlib import Path

import httpx
import openai
import PIL.Image
import pytest
import yaml

from pipeline.serve.access import ANONYMOUS, Call, Door, KeyRing
from pipeline.serve.config import APISection, Key, LimitsSection, ServeConfigError, load_keys
from pipeline.serve.errors import APIError
from pipeline.serve.limits import Admission, Counts, Gate, duration, rate_headers

pytestmark = pytest.mark.timeout(600)

KEYS = {  # name -> (key, limits)
    "alice": ("sk-alice-0123456789abcdef", {}),
    "limited": ("sk-limited-0123456789abcdef", {"requests_per_minute": 4}),
    "images": ("sk-images-0123456789abcdef", {"images_per_minute": 3}),
    "tokens": ("sk-tokens-0123456789abcdef", {"tokens_per_minute": 5}),
    "single": ("sk-single-0123456789abcdef", {"max_parallel_requests": 1}),
    "restart": ("sk-restart-0123456789abcdef", {"requests_per_minute": 2}),
}
ENV_KEY = "sk-from-the-environment-0123"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the counts, in-process --------------------------------------------------------------------------


def test_a_minute_is_any_60_seconds():
    clock, counts = Clock(), Counts()
    counts.clock = clock
    limits = LimitsSection(requests_per_minute=3).model_dump()
    for t in (0, 10, 20):
        clock.now = 1000 + t
        assert counts.admit("k", limits, 0, 300)["refused"] is None
    clock.now = 1030
    out = counts.admit("k", limits, 0, 300)
    assert out["refused"] == "requests" and out["retry_after_s"] == pytest.approx(
        30
    )  # the oldest leaves at 60
    assert out["state"]["requests"] == (3, 0, pytest.approx(50))  # empty again 60 s after the newest
    clock.now = 1060.5  # the first has left the window, the others have not
    assert counts.admit("k", limits, 0, 300)["refused"] is None
    assert counts.admit("k", limits, 0, 300)["refused"] == "requests"


def test_images_tokens_and_parallel_requests_count_separately():
    clock, counts = Clock(), Counts()
    counts.clock = clock
    limits = LimitsSection(images_per_minute=8, tokens_per_minute=100, max_parallel_requests=2).model_dump()
    first = counts.admit("k", limits, 8, 300)  # n=4, best_of=2
    assert first["refused"] is None and first["state"]["images"][1] == 0
    assert counts.admit("k", limits, 1, 300)["refused"] == "images"
    second = counts.admit("k", limits, 0, 300)
    assert counts.admit("k", limits, 0, 300)["refused"] == "parallel"  # two are running
    counts.release("k", first["lease"], tokens=60)
    counts.release("k", second["lease"], tokens=50)
    assert counts.admit("k", limits, 0, 300)["refused"] == "tokens"  # 110 of 100 used
    assert counts.admit("other", limits, 8, 300)["refused"] is None  # keys do not share counts
    clock.now += 61
    assert counts.admit("k", limits, 8, 300)["refused"] is None


def test_a_lease_that_is_never_released_expires():
    clock, counts = Clock(), Counts()
    counts.clock = clock
    limits = LimitsSection(max_parallel_requests=1).model_dump()
    assert counts.admit("k", limits, 0, lease_s=30)["refused"] is None  # its ingress died: no release
    assert counts.admit("k", limits, 0, lease_s=30)["refused"] == "parallel"
    clock.now += 31
    assert counts.admit("k", limits, 0, lease_s=30)["refused"] is None


def test_a_release_counts_its_tokens_once():
    """An ingress retries a release whose answer it did not see: the second call changes nothing."""
    counts = Counts()
    limits = LimitsSection(tokens_per_minute=100, max_parallel_requests=1).model_dump()
    lease = counts.admit("k", limits, 0, 300)["lease"]
    counts.release("k", lease, tokens=60)
    counts.release("k", lease, tokens=60)
    out = counts.admit("k", limits, 0, 300)
    assert out["refused"] is None and out["state"]["tokens"][1] == 40


def test_a_release_the_holder_does_not_answer_is_retried_until_it_lands():
    """A loaded cluster: the first two releases time out (and are cancelled). The answer is not held
    up beyond ``timeout_s``, and the lease still ends within seconds, not after ``lease_s``."""
    counts = Counts()
    limits = LimitsSection(max_parallel_requests=1)

    class Slow:
        calls = 0

        class admit:  # noqa: N801 (a handle's method)
            @staticmethod
            async def remote(name, limits, images, lease_s):
                return counts.admit(name, limits, images, lease_s)

        class release:  # noqa: N801
            @staticmethod
            async def remote(name, lease, tokens):
                Slow.calls += 1
                if Slow.calls <= 2:
                    await asyncio.sleep(3600)
                counts.release(name, lease, tokens)

    async def scenario():
        gate = Gate(Slow, timeout_s=0.2, lease_s=60, retry_after_s=1)
        admission = await gate.admit("k", limits)
        started = time.monotonic()
        await gate.release("k", admission, tokens=5)
        answered = time.monotonic() - started
        with pytest.raises(APIError):  # still running as far as the holder knows
            await gate.admit("k", limits)
        while True:
            await asyncio.sleep(0.1)
            try:
                return answered, await gate.admit("k", limits), time.monotonic() - started
            except APIError:
                pass

    answered, again, freed = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert answered < 1.0 and again.lease is not None and Slow.calls == 3 and freed < 5


#: stands for Serve's request context, which a task created in the request inherits
REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("request", default=None)


def test_a_stream_the_client_leaves_ends_its_call_at_once():
    """The client leaves while the server waits on a send (ASGI < 2.4: Starlette cancels the sending
    task): the model's stream is closed and the key's lease released within a moment, not when the
    garbage collector reaches the abandoned generator."""
    released, closed = [], []

    class Recorder:
        async def release(self, name, admission, tokens=0):
            released.append((name, admission.lease, REQUEST.get()))

    async def events():
        try:
            while True:
                await asyncio.sleep(0.01)
                yield "data: a\n\n"
        finally:
            closed.append(True)

    async def scenario():
        REQUEST.set("a request that Serve cancels with every call made in its context")
        door = Door(KeyRing([], LimitsSection()), Recorder(), max_body_bytes=1024)
        call = Call("/v1/chat/completions", key=Key("k", b"", LimitsSection()), admission=Admission(lease=7))
        response = door.streamed(call, events())
        sent = []

        async def send(message):
            sent.append(message)
            await asyncio.sleep(0.05)  # a slow client: the disconnect lands here, outside the generator

        async def receive():
            await asyncio.sleep(0.12)
            return {"type": "http.disconnect"}

        gc.disable()  # the generator may not be rescued by a collection
        try:
            await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
            for _ in range(50):
                if released:
                    break
                await asyncio.sleep(0.01)
            seen = list(released), list(closed)  # before asyncio.run's exit closes what is left
        finally:
            gc.enable()
        return response, sent, seen

    response, sent, (released_then, closed_then) = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert len(sent) >= 2 and released_then == [("k", 7, None)] and closed_then == [True]


def test_a_request_the_client_leaves_before_its_answer_ends_its_call():
    """Serve cancels the request of a client that left (here: mid-route); its lease is handed back
    anyway, from outside the request's context."""
    released = []

    class Recorder:
        async def admit(self, name, limits, images=0):
            return Admission(lease=9)

        async def release(self, name, admission, tokens=0):
            released.append((name, admission.lease, REQUEST.get()))

    class Request:
        headers = {}

    async def route(req, call):
        await asyncio.sleep(3600)

    async def scenario():
        REQUEST.set("a request that Serve cancels with every call made in its context")
        door = Door(KeyRing([], LimitsSection()), Recorder(), max_body_bytes=1024)
        task = asyncio.create_task(door.handle(Request(), Call("/v1/images/generations"), None, route))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(50):
            if released:
                break
            await asyncio.sleep(0.01)
        return list(released)

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == [(ANONYMOUS, 9, None)]


def test_rate_limit_headers_in_openais_form():
    headers = rate_headers({"requests": (60, 59, 1.0), "tokens": (150000, 149984, 360.0)})
    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149984",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert duration(0.25) == "0.25s"


def test_the_counts_holder_that_does_not_answer_fails_closed():
    """No answer within ``api.limits_timeout_s`` (a hung or restarting holder): 503 + Retry-After, so
    nobody passes unmetered."""

    class Hanging:
        class admit:  # noqa: N801 (a handle's method)
            @staticmethod
            def remote(*args):
                return asyncio.sleep(3600)

    class Dead:
        class admit:  # noqa: N801
            @staticmethod
            def remote(*args):
                raise RuntimeError("the replica is gone")

    limits = LimitsSection(requests_per_minute=5)
    for handle in (Hanging, Dead):
        gate = Gate(handle, timeout_s=0.2, lease_s=60, retry_after_s=3)
        with pytest.raises(APIError) as err:
            asyncio.run(gate.admit("k", limits))
        assert err.value.status == 503 and err.value.code == "rate_limiter_unavailable"
        assert err.value.headers["Retry-After"] == "3"
    assert (
        asyncio.run(Gate(Hanging, 0.2, 60, 3).admit("k", LimitsSection())).lease is None
    )  # no limit: no ask


# -- keys, in-process ----------------------------------------------------------------------------------


def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    entries = [{"key": key, "name": name, **limits} for name, (key, limits) in KEYS.items()]
    path.write_text(yaml.safe_dump(entries))
    return path


def test_keys_from_the_environment_and_a_file_with_names_and_limits(tmp_path):
    api = APISection(
        keys={"env": "TEST_KEYS", "file": str(key_file(tmp_path))}, limits={"requests_per_minute": 100}
    )
    keys = load_keys(api, environ={"TEST_KEYS": f" {ENV_KEY} , "})
    by_name = {k.name: k for k in keys}
    env = by_name[f"key-{hashlib.sha256(ENV_KEY.encode()).hexdigest()[:8]}"]  # a name that shows no key
    assert set(by_name) == {*KEYS, env.name}
    assert env.limits.requests_per_minute == 100  # api.limits: every key's
    assert by_name["limited"].limits.requests_per_minute == 4  # a file entry's own
    assert (
        by_name["tokens"].limits.requests_per_minute == 100
        and by_name["tokens"].limits.tokens_per_minute == 5
    )
    blob = pickle.dumps(keys)  # what the ingress replicas are given: digests, never a key
    assert all(key.encode() not in blob for key, _ in KEYS.values()) and ENV_KEY.encode() not in blob
    ring = KeyRing(keys, api.limits)
    assert ring.identify(f"Bearer {KEYS['alice'][0]}").name == "alice"
    assert ring.identify(f"bearer   {ENV_KEY} ") is env
    for header in (
        None,
        "",
        KEYS["alice"][0],
        f"Basic {KEYS['alice'][0]}",
        "Bearer ",
        "Bearer sk-wrong-0123456789abcdef",
    ):
        with pytest.raises(APIError) as err:
            ring.identify(header)
        assert err.value.status == 401 and err.value.code == "invalid_api_key"
    assert KeyRing([], api.limits).identify(None).name == ANONYMOUS  # no keys: open


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"key": "sk-x"}, "a YAML list"),
        (["sk-short"], "at least 16 characters"),
        ([{"key": "sk-0123456789abcdef", "requests_per_minute": 0}], "requests_per_minute"),
        ([{"key": "sk-0123456789abcdef", "rpm": 5}], "rpm"),
        (
            [{"key": "sk-0123456789abcdef", "name": "a"}, {"key": "sk-0123456789abcdeg", "name": "a"}],
            "same name",
        ),
        (["sk-0123456789abcdef", "sk-0123456789abcdef"], "same key"),
    ],
)
def test_a_bad_key_file_is_one_line_that_never_shows_a_key(tmp_path, entries, message):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(entries))
    with pytest.raises(ServeConfigError, match=message) as err:
        load_keys(APISection(keys={"file": str(path)}), environ={})
    assert "sk-" not in str(err.value) and "\n" not in str(err.value)


def test_the_cli_dry_run_reads_the_key_file(tmp_path, capsys):
    from jobs.cli import main as cli_main
    from tests.support import REPO

    data = yaml.safe_load((REPO / "configs" / "serve_tiny.yaml").read_text())
    data["applications"][0]["args"]["api"]["keys"] = {"file": str(tmp_path / "missing.yaml")}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli_main(["serve", "--config", str(path), "--dry-run"]) == 2
    assert "api.keys.file" in capsys.readouterr().err


# -- over HTTP: two ingress replicas, one counts holder ----------------------------------------------


@pytest.fixture(scope="module")
def keyed(serve_port, tmp_path_factory):
    """App ``keyed`` at /keyed: the real ingress (2 replicas) with the keys above, before stand-in models."""
    from ray import serve

    from pipeline.serve.app import JanusAPI
    from pipeline.serve.limits import RateLimits
    from tests.support.fake_model import FakeModel

    small = {"ray_actor_options": {"num_cpus": 0.05}}
    settings = {
        "keys": {"file": str(key_file(tmp_path_factory.mktemp("keys")))},
        "deployment": small,
        # a cold replica's first call to the counts holder can take seconds on a loaded 2-core machine;
        # these tests count requests, and the fail-closed timeout has its own test above
        "limits_timeout_s": 30,
    }
    keys = load_keys(APISection.model_validate(settings), environ={})
    synth = FakeModel.options(name="FakeSynthesis", **small).bind("synthesis")
    caption = FakeModel.options(name="FakeCaption", **small).bind("caption")
    names = {"synthesis": "fake", "caption": "fake"}
    ingress = JanusAPI.options(num_replicas=2, **small).bind(
        synth, caption, names, settings, keys, RateLimits.bind()
    )
    serve.run(ingress, name="keyed", route_prefix="/keyed")
    try:
        yield f"http://127.0.0.1:{serve_port}/keyed"
    finally:
        serve.delete("keyed")


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


def image(n: int = 1) -> dict:
    return {"model": "fake", "prompt": "a cat", "n": n}


def chat(text: str = "hi", **extra) -> dict:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return {"model": "fake", "messages": [{"role": "user", "content": parts}], **extra}


ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", chat()),
    ("POST", "/v1/images/generations", image()),
]


@pytest.mark.parametrize("method, route, body", ROUTES)
def test_every_v1_route_needs_a_key_and_health_does_not(keyed, method, route, body):
    key = KEYS["alice"][0]
    wrong = [
        {},
        {"Authorization": "Bearer sk-wrong-0123456789abcdef"},
        {"Authorization": key},  # no scheme
        {"Authorization": f"Basic {key}"},
        {"api-key": key},  # Azure's header, not ours
        {"x-api-key": key},
    ]
    with httpx.Client(base_url=keyed, timeout=60) as client:
        for headers in wrong:
            r = client.request(method, route, json=body, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json() == {
                "error": {
                    "message": r.json()["error"]["message"],
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
            assert key not in r.text and r.headers["www-authenticate"] == "Bearer"
        assert client.request(method, route, json=body, headers=bearer("alice")).status_code == 200
        assert client.get("/health").status_code == 200


def test_the_official_client_with_an_api_key(keyed):
    oai = openai.OpenAI(base_url=f"{keyed}/v1", api_key=KEYS["alice"][0], max_retries=0, timeout=60)
    assert [m.id for m in oai.models.list()] == ["fake"]
    assert oai.images.generate(model="fake", prompt="a cat").data[0].b64_json
    wrong = openai.OpenAI(
        base_url=f"{keyed}/v1", api_key="sk-wrong-0123456789abcdef", max_retries=0, timeout=60
    )
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.code == "invalid_api_key"


async def _many(url: str, name: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.get("/v1/models", headers=bearer(name)) for _ in range(n)))


def test_a_limit_holds_across_two_ingress_replicas(keyed):
    """Four requests a minute means four, not four per replica."""
    from ray import serve

    status = serve.status().applications["keyed"].deployments["JanusAPI"]
    assert status.replica_states.get("RUNNING") == 2, status
    responses = asyncio.run(_many(keyed, "limited", 12))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) == 4 and len(refused) == 8, [r.status_code for r in responses]
    assert sorted(r.headers["x-ratelimit-remaining-requests"] for r in ok) == ["0", "1", "2", "3"]
    for r in refused:
        assert (
            r.json()["error"]["code"] == "rate_limit_exceeded"
            and r.json()["error"]["type"] == "invalid_request_error"
        )
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert (
            r.headers["x-ratelimit-limit-requests"] == "4"
            and r.headers["x-ratelimit-remaining-requests"] == "0"
        )


def test_images_count_n_times_best_of(keyed):
    with httpx.Client(base_url=keyed, timeout=60, headers=bearer("images")) as client:
        first = client.post("/v1/images/generations", json=image(2))
        assert first.status_code == 200 and first.headers["x-ratelimit-remaining-images"] == "1"
        second = client.post("/v1/images/generations", json=image(2))
        assert second.status_code == 429 and "images" in second.json()["error"]["message"]
        never = client.post("/v1/images/generations", json=image(4))  # more than a minute's allowance
        assert never.status_code == 400 and never.json()["error"]["code"] == "rate_limit_exceeds_request"


def test_chat_tokens_count_once_the_answer_is_known(keyed):
    """The stand-in answers 3 prompt + 1 completion tokens: 4, 8, then the window (5) is spent."""
    with httpx.Client(base_url=keyed, timeout=60, headers=bearer("tokens")) as client:
        codes = [client.post("/v1/chat/completions", json=chat()).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = client.get("/v1/models")
        assert r.status_code == 429 and r.headers["x-ratelimit-remaining-tokens"] == "0"


def test_parallel_requests_and_a_stream_left_early(keyed):
    with httpx.Client(base_url=keyed, timeout=60, headers=bearer("single")) as client:
        with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()  # kept: a dropped line iterator closes the response
            next(line for line in lines if '"content": "a"' in line)
            busy = client.get("/v1/models")
            assert busy.status_code == 429 and "at a time" in busy.json()["error"]["message"]
        deadline = time.monotonic() + 90  # the client left: the stream's lease ends (slow on a loaded box)
        while (r := client.get("/v1/models")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 200


def test_rate_limit_headers_on_every_answer(keyed):
    with httpx.Client(base_url=keyed, timeout=60, headers=bearer("images")) as client:
        for route, body, status in (
            ("/v1/images/generations", {"prompt": ""}, 400),
            ("/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}, 404),
            ("/v1/images/generations", b"{not json", 400),
        ):
            r = client.post(route, **({"content": body} if isinstance(body, bytes) else {"json": body}))
            assert r.status_code in (status, 429), r.text
            assert r.headers["x-ratelimit-limit-images"] == "3" and "x-ratelimit-reset-images" in r.headers


def test_a_restarted_counts_holder_fails_open(keyed):
    """The counts live in the RateLimits replica: killed, it is restarted empty, so a key whose minute
    was spent gets a fresh one; while it is down, requests get 503 (fail closed), never a pass."""
    import ray

    with httpx.Client(base_url=keyed, timeout=60, headers=bearer("restart")) as client:
        assert [client.get("/v1/models").status_code for _ in range(3)] == [200, 200, 429]
        named = ray.util.list_named_actors(all_namespaces=True)
        [replica] = [
            a["name"] for a in named if a["namespace"] == "serve" and "keyed#RateLimits#" in a["name"]
        ]
        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
        seen, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            r = client.get("/v1/models")
            seen.append((r.status_code, r.json().get("error", {}).get("code")))
            if r.status_code == 200:
                break
            time.sleep(0.5)
        assert seen[-1][0] == 200, seen
        assert all(
            s in ((429, "rate_limit_exceeded"), (503, "rate_limiter_unavailable")) for s in seen[:-1]
        ), seen
        assert [client.get("/v1/models").status_code for _ in range(2)] == [200, 429]  # a fresh minute of 2


def test_keys_are_never_logged(keyed):
    """Run last: nothing Ray or Serve logged in this session holds a key."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    keys = [key.encode() for key, _ in KEYS.values()]
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and any(k in p.read_bytes() for k in keys)]
    assert not leaked


def test_the_readmes_keyed_and_limited_example_is_valid(tmp_path):
    from tests.support import REPO

    text = (REPO / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    [api_block] = [b for b in blocks if "keys: {env:" in b]
    [file_block] = [b for b in blocks if "keys.yaml: one entry per key" in b]
    (tmp_path / "keys.yaml").write_text(file_block)
    api = APISection.model_validate(yaml.safe_load(api_block)["api"] | {"keys": {"file": str(tmp_path / "keys.yaml")}})
    keys = {k.name: k for k in load_keys(api, environ={})}
    assert api.limits.requests_per_minute == 60 and api.image_store.url.startswith("s3://")
    assert keys["batch-team"].limits.images_per_minute == 200 and keys["alice"].limits.images_per_minute == 20
    assert len(keys) == 3
