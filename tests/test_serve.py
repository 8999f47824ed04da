"""The online API over real HTTP on 127.0.0.1: Ray Serve, the tiny model on CPU, httpx and openai.

The session's Serve instance (``serve_port``) with two applications for this module: ``janus`` (both
models, the normal limits) and ``overload`` (a synthesis model with a one-slot queue, to show 503 +
Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import PIL.Image
import pytest
import yaml

from jobs.cli import main as cli_main
from pipeline.actors import Captioner, Synthesizer
from pipeline.serve.app import build_app
from pipeline.serve.backend import Backend, readiness
from pipeline.serve.config import APISection, ServeConfigError, check_serve_config, parse_args
from tests.support import REPO
from tests.support.checkpoints import JOB_IMAGE_PX

# the server fixture starts two apps and four model replicas: minutes on a busy 2-core machine
pytestmark = pytest.mark.timeout(1200)

MODEL = "janus-test"
SIZE = JOB_IMAGE_PX  # model_dir's images
SMALL = {"ray_actor_options": {"num_cpus": 0.1}}
ONE_REPLICA = {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}  # per-replica stats


def png(seed: int, w: int = 40, h: int = 30) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(*parts: str | dict) -> dict:
    """A user message; str parts are text, dict parts are image_url parts."""
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """An allow-listed image folder, a file outside it and a symlink from inside to outside."""
    root = tmp_path_factory.mktemp("images")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "ok.png").write_bytes(png(1))
    (outside / "secret.png").write_bytes(png(2))
    os.symlink(outside / "secret.png", allowed / "link.png")
    return {"allowed": allowed, "outside": outside}


@pytest.fixture(scope="module")
def s3_images(s3_endpoint) -> dict:
    """A bucket on the moto S3 server with one image under the allowed prefix and one outside it."""
    import fsspec

    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = fsspec.filesystem("s3", **options)
    fs.mkdir("serve-images")
    fs.pipe({"serve-images/uploads/ok.png": png(11), "serve-images/private/secret.png": png(12)})
    return options


@pytest.fixture(scope="module")
def server(serve_port, model_dir, files, s3_images):
    from ray import serve

    model = {"path": model_dir, "name": MODEL, "dtype": "float32"}
    queue = {
        "max_ongoing_requests": 16,
        "max_queued_requests": 64,
        "autoscaling_config": ONE_REPLICA,
        **SMALL,
    }
    args = {
        "api": {
            "max_body_bytes": 1_000_000,
            "max_pixels": 4_000_000,
            "max_n": 4,
            "max_tokens": 64,
            "default_max_tokens": 6,
            "image_url_prefixes": [f"file://{files['allowed']}/", "s3://serve-images/uploads/"],
            "image_storage_options": s3_images,
            "deployment": SMALL,
        },
        "synthesis": {"model": model, "engine": {"max_batch_size": 8}, "deployment": queue},
        "caption": {
            "model": model,
            "engine": {"max_batch_size": 8, "max_images_per_request": 4},
            # every token its own delta (the default groups what is decoded within 20 ms)
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05, "stream_interval_s": 0},
            "deployment": queue,
        },
    }
    overload = {
        "api": {"retry_after_s": 3, "deployment": SMALL},
        "synthesis": {
            "model": model,
            # the static batch mode (serve.batch), so that it is served over HTTP too
            "batching": {"mode": "batch", "max_batch_size": 1, "batch_wait_timeout_s": 0},
            "deployment": {"max_ongoing_requests": 1, "max_queued_requests": 1, **SMALL},
        },
        "caption": None,
    }
    try:
        serve.run_many(
            [
                serve.RunTarget(build_app(args), name="janus", route_prefix="/"),
                serve.RunTarget(build_app(overload), name="overload", route_prefix="/overload"),
            ]
        )
        yield f"http://127.0.0.1:{serve_port}"
    finally:
        for name in ("janus", "overload"):
            serve.delete(name)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def captioner(model_dir):
    """The batch job's actor class, in this process: what the server must agree with."""
    return Captioner({"path": model_dir, "dtype": "float32"}, {"max_batch_size": 8})


@pytest.fixture(scope="module")
def synthesizer(model_dir):
    return Synthesizer({"path": model_dir, "dtype": "float32"}, {"max_batch_size": 8})


def stats(name: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(name, app_name="janus").stats.remote().result()


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


# -- discovery and health -------------------------------------------------------------------------


def test_health_and_models(client):
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ready", "models": {"synthesis": True, "caption": True}}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_readiness_is_false_until_a_replica_answers():
    class Pending:
        def __await__(self):
            return asyncio.sleep(3600).__await__()

        def cancel(self):
            pass

    class Method:
        def __init__(self, answer):
            self.answer = answer

        def remote(self):
            return self.answer

    class Handle:
        def __init__(self, answer):
            self.info = Method(answer)

    async def loaded():
        return {"model": "m"}

    async def check():
        return await readiness(
            {
                "synthesis": Backend(Handle(Pending()), "m", APISection()),
                "caption": Backend(Handle(loaded()), "m", APISection()),
            },
            timeout_s=0.1,
        )

    assert asyncio.run(check()) == {"synthesis": False, "caption": True}


# -- chat -----------------------------------------------------------------------------------------


def test_chat_with_an_image_answers_as_the_batch_captioner(client, captioner):
    image = png(3)
    body = {
        "model": MODEL,
        "messages": [user(image_part(data_url(image)), "What is in the picture?")],
        "max_tokens": 7,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == MODEL
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["completion_tokens"] <= 7 and usage["prompt_tokens"] > 576  # the image's 576 tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # greedy by default: the batch job's captioner gives the same text for the same image and question
    expected = captioner.generate(
        [
            {
                "image": PIL.Image.open(io.BytesIO(image)),
                "question": "What is in the picture?",
                "max_new_tokens": 7,
            }
        ]
    )[0]
    assert choice["message"]["content"] == expected.text
    assert usage["completion_tokens"] == expected.num_tokens


def test_multi_turn_chat_with_several_images(client, captioner):
    first, second = png(4), png(5, 64, 20)
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            user(image_part(data_url(first)), "What is this?"),
            {"role": "assistant", "content": "A pattern."},
            user("And this one?", image_part(data_url(second))),
        ],
        "max_tokens": 5,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    expected = captioner.generate(
        [
            {
                "images": [PIL.Image.open(io.BytesIO(first)), PIL.Image.open(io.BytesIO(second))],
                "conversation": [
                    {"role": "<|User|>", "content": "<image_placeholder>\nWhat is this?"},
                    {"role": "<|Assistant|>", "content": "A pattern."},
                    {"role": "<|User|>", "content": "And this one?\n<image_placeholder>"},
                ],
                "system_prompt": "Answer briefly.",
                "max_new_tokens": 5,
            }
        ]
    )[0]
    assert expected.ok, expected.error
    assert r.json()["choices"][0]["message"]["content"] == expected.text


def test_engine_conversation_requests(captioner):
    """The engine's multi-turn form (used by chat): one user turn equals the question form."""
    image = PIL.Image.open(io.BytesIO(png(10)))
    tag = "<image_placeholder>"
    one_turn = {"image": image, "conversation": [{"role": "<|User|>", "content": f"{tag}\nWhat?"}]}
    question, turn, *bad = captioner.generate(
        [
            {"image": image, "question": "What?", "max_new_tokens": 5},
            {**one_turn, "max_new_tokens": 5},
            {
                **one_turn,
                "conversation": [*one_turn["conversation"], {"role": "<|Assistant|>", "content": "x"}],
            },
            {**one_turn, "conversation": [{"role": "<|Assistant|>", "content": f"{tag} x"}]},
            {**one_turn, "conversation": [{"role": "<|User|>", "content": "no tag"}]},
            {**one_turn, "system_prompt": 5},
        ]
    )
    assert question.ok and turn.ok and turn.text == question.text
    assert turn.prompt_tokens == question.prompt_tokens > 576
    assert [r.status for r in bad] == ["error"] * 4
    assert "ends with the user's" in bad[0].error and "<|User|>" in bad[1].error and "tags" in bad[2].error


def test_streaming_sends_the_same_text_as_chunks_then_done(client):
    body = {"model": MODEL, "messages": [user(image_part(data_url(png(6))), "Describe it.")], "max_tokens": 8}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    events = []
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=stream_body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    with_choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert with_choices[0]["delta"]["role"] == "assistant"
    assert "".join(c["delta"].get("content", "") for c in with_choices) == whole["message"]["content"]
    assert with_choices[-1]["finish_reason"] == whole["finish_reason"]
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_streaming_sends_tokens_as_they_are_decoded(client):
    """The scheduler streams: with ``stream_interval_s: 0`` a delta per decoded token (whole characters),
    not the finished answer cut into words; the deltas add up to the answer."""
    body = {"model": MODEL, "messages": [user(image_part(data_url(png(16))), "Describe it.")], "max_tokens": 12}
    whole = client.post("/v1/chat/completions", json=body).json()
    measured = len(stats("Captioner")["first_token_s"])
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        deltas = [
            json.loads(line[len("data: ") :])["choices"][0]["delta"].get("content")
            for line in r.iter_lines()
            if line.startswith("data: {")
        ]
    content = [d for d in deltas if d]
    assert "".join(content) == whole["choices"][0]["message"]["content"]
    tokens = whole["usage"]["completion_tokens"]
    assert len(content) > tokens // 2, (len(content), tokens)  # about one per token (a few join up)
    # the replica timed the stream's first text (arrival there -> first delta): what load_serve reports
    # as the scheduler's share of time to first token
    after = stats("Captioner")
    first = after["first_token_s"][measured:]
    assert len(first) == 1 and 0 < first[0] < 30
    # ... in parts (arrival -> queued -> taken for prefill -> first token -> with the loop -> its text
    # sent), which add up
    [parts] = after["first_token_parts"][measured:]
    assert all(p >= 0 for p in parts) and sum(parts) == pytest.approx(first[0], abs=1e-6)
    # and what the batch cost, for the same-run yardstick: its admission round prefilled one request
    assert after["prefills"] >= 1 and after["prefill_rounds"][-1][0] >= 1
    assert after["steps"] == len(after["decode_rounds"]) and after["decode_rounds"][-1][1] > 0


def test_load_serve_reads_one_runs_first_tokens_and_yardstick_from_two_stats():
    """``load_serve`` sets each open-loop run's replica time to first token against the same run's
    prefill (rounds of one request only) + 2 decode steps, from the stats before and after the run, also
    when the replica's lists (the latest 10,000) dropped older rounds."""
    from benchmarks.load_serve import _replica_first_token

    before = {"first_token_s": [9.0], "first_token_parts": [(0, 0, 9.0, 0, 0)], "prefills": 50_000,
              "prefill_rounds": [(1, 9.0)] * 3, "steps": 70_000, "decode_rounds": [(8, 9.0)] * 3}
    after = {
        "first_token_s": [9.0, 0.015, 0.017],
        "first_token_parts": [(0, 0, 9.0, 0, 0), (0.0, 0.001, 0.012, 0.001, 0.001), (0.0, 0.003, 0.012, 0.001, 0.001)],
        "prefills": 50_003,  # this run: two rounds of one request, one of two (not a prefill of one)
        "prefill_rounds": [(1, 9.0)] * 3 + [(1, 0.010), (2, 0.030), (1, 0.012)],
        "steps": 70_004,  # this run: 4 steps; the list holds only its latest 5
        "decode_rounds": [(8, 9.0), (1, 0.002), (2, 0.003), (2, 0.003), (3, 0.004)],
    }
    out = _replica_first_token(before, after)
    assert out["server_ttft_s"]["p50"] == pytest.approx(0.016)
    assert out["server_first_token_s"]["p50"] == pytest.approx(0.015)  # without the wait for text
    assert out["server_ttft_parts_p50_s"] == {"to_queue": 0.0, "queued": 0.002, "prefill": 0.012,
                                              "hand_over": 0.001, "to_text": 0.001}
    assert out["same_run_yardstick"] == {"prefill_one_s": 0.011, "decode_step_s": 0.003,
                                         "decode_rows_p50": 2.0, "yardstick_s": 0.017}


def test_stream_deltas_group_the_tokens_decoded_within_the_interval():
    """The first text goes out at once, later text at most every interval (what queued up meanwhile in
    one piece), the rest with the end; interval 0 keeps one delta per token; the text is always whole."""
    from janus.engine.detokenize import IncrementalText
    from pipeline.serve.relay import TokenRelay, text_deltas

    class Bytes:
        @staticmethod
        def decode(tokens, skip_special_tokens=True):
            return bytes(tokens).decode("utf-8", errors="replace")

    answer = "a red circle on the left"

    sent: dict[float, list[float]] = {}  # interval -> when each delta went out

    async def stream(interval: float) -> list[str]:
        relay = TokenRelay(asyncio.get_running_loop(), interval)
        tokens = relay.stream()
        times = sent.setdefault(interval, [])

        async def decode() -> None:  # a token every 2 ms (a step each), then the end
            for b in answer.encode():
                relay.push(tokens, b)
                relay.flush()
                await asyncio.sleep(0.002)
            relay.push(tokens, None)

        producer = asyncio.ensure_future(decode())
        deltas = []
        async for d in text_deltas(tokens, IncrementalText(Bytes()), per_token=interval == 0):
            deltas.append(d)
            times.append(time.perf_counter())
        await producer
        return deltas

    async def all_runs():
        return await asyncio.wait_for(asyncio.gather(stream(0.0), stream(10.0), stream(0.02)), 10)

    every, ends, grouped = asyncio.run(all_runs())
    assert all("".join(d) == answer for d in (every, ends, grouped))
    assert every == list(answer)  # the consumer keeps up: one delta per token
    assert ends == ["a", answer[1:]]  # the first at once, the rest with the end
    assert grouped[0] == "a", grouped
    gaps = np.diff(sent[0.02][:-1])  # every delta but the last waited out the interval
    assert (gaps >= 0.019).all(), gaps


def test_token_relay_wakes_the_loop_once_per_step_for_all_streams():
    """The scheduler's thread pushes each token; the event loop learns of them at the step's flush, in
    one wake-up for every stream, and a stream's end needs no flush."""
    import threading

    from pipeline.serve.relay import TokenRelay

    async def run() -> tuple[list[list[int | None]], int]:
        loop = asyncio.get_running_loop()
        relay = TokenRelay(loop)
        streams = [relay.stream() for _ in range(3)]
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counted(*args):
            nonlocal wakeups
            wakeups += 1
            return real(*args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        pushed = threading.Event()

        def scheduler_thread() -> None:  # 2 steps of 3 rows, without a flush after the last one
            for step in range(2):
                for i, s in enumerate(streams):
                    relay.push(s, 10 * step + i)
                if step == 0:
                    relay.flush()
                    pushed.wait(5)
            for s in streams:
                relay.push(s, None)  # the end: no flush needed

        thread = threading.Thread(target=scheduler_thread)
        thread.start()
        first = [await asyncio.wait_for(s.take(), 5) for s in streams]
        assert wakeups == 1, wakeups  # one wake-up for the three streams' tokens
        pushed.set()
        rest = [await asyncio.wait_for(s.take(), 5) for s in streams]
        thread.join(5)
        for r, s in zip(rest, streams, strict=True):
            if r[-1] is not None:  # the end came after the thread's last tokens were taken
                r += await asyncio.wait_for(s.take(), 5)
        return [f + r for f, r in zip(first, rest, strict=True)], wakeups

    got, wakeups = asyncio.run(run())
    assert got == [[0, 10, None], [1, 11, None], [2, 12, None]]
    assert wakeups <= 4  # the step's flush and one per end, never one per token


def test_the_official_openai_client(oai, client):
    chat = oai.chat.completions.create(
        model=MODEL,
        messages=[user(image_part(data_url(png(7))), "What is it?")],
        max_tokens=4,
    )
    assert isinstance(chat.choices[0].message.content, str)
    assert chat.usage.completion_tokens <= 4
    streamed = oai.chat.completions.create(
        model=MODEL, messages=[user(image_part(data_url(png(7))), "What is it?")], max_tokens=4, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content

    images = oai.images.generate(
        model=MODEL,
        prompt="a red apple",
        size=f"{SIZE}x{SIZE}",
        response_format="b64_json",
        extra_body={"seed": 3},
    )
    assert decode_png(images.data[0].b64_json).shape == (SIZE, SIZE, 3)

    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(model=MODEL, prompt="x", size="384x384")
    assert err.value.code == "unsupported_size" and f"{SIZE}x{SIZE}" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="gpt-4o", messages=[user("hi")])
    assert err.value.code == "model_not_found"


# -- images ---------------------------------------------------------------------------------------


def test_same_seed_gives_the_batch_jobs_image(client, synthesizer):
    body = {"prompt": "a lighthouse at dusk", "n": 2, "seed": 11, "cfg_weight": 3.0, "temperature": 0.9}
    r = client.post(
        "/v1/images/generations", json={**body, "size": f"{SIZE}x{SIZE}", "response_format": "b64_json"}
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [11, 12]  # n samples: seed, seed + 1, as the batch job
    served = [decode_png(d["b64_json"]) for d in data]
    # the batch job's path: Synthesizer.__call__ on prompt rows (Ray Data's map_batches)
    rows = synthesizer(
        {
            "key": np.array(["a", "b"], dtype=object),
            "prompt": np.array([body["prompt"]] * 2, dtype=object),
            "seed": np.array([11, 12]),
            "cfg_weight": np.array([3.0, 3.0]),
            "temperature": np.array([0.9, 0.9]),
        }
    )
    engine = synthesizer.engine.generate(
        [{"prompt": body["prompt"], "seed": s, "cfg_weight": 3.0, "temperature": 0.9} for s in (11, 12)]
    )
    for i in range(2):
        assert served[i].tobytes() == rows["image"][i].tobytes() == engine[i].image.tobytes()
    assert served[0].tobytes() != served[1].tobytes()
    again = client.post("/v1/images/generations", json={**body, "n": 1, "seed": 12}).json()["data"][0]
    assert decode_png(again["b64_json"]).tobytes() == served[1].tobytes()


# -- concurrency and batching ---------------------------------------------------------------------


def test_requests_that_finish_together_are_read_back_in_one_batch(synthesizer):
    """Serve reads back (scores) the requests that finished meanwhile in one ``complete_many`` call:
    one model batch for all their candidates, and each request gets what it gets read alone."""
    calls = []
    for reqs in (
        [{"prompt": "a red circle on the left, blue background", "seed": 1, "best_of": 2}],
        [{"prompt": "a cat", "seed": 2}],
        [{"prompt": "a dog", "seed": 3}, {"prompt": "a fox", "seed": 4, "best_of": 2}],
    ):
        engine_requests, plan = synthesizer.expand(reqs)
        calls.append((engine_requests, plan, synthesizer.engine.generate(engine_requests)))

    def read(result):
        return result.score, result.candidate, list(result.scores), result.tokens.tolist()

    alone = [[read(r) for r in synthesizer.complete(*call)] for call in calls]
    reader, batches = synthesizer.runner.reader, []
    features = reader.features
    reader.features = lambda images: batches.append(len(images)) or features(images)
    try:
        together = [[read(r) for r in out] for out in synthesizer.complete_many(calls)]
    finally:
        del reader.features
    assert batches == [6]  # 2 + 1 + 1 + 2 candidates, one model batch
    assert [len(out) for out in together] == [1, 1, 2]
    for a, t in zip(sum(alone, []), sum(together, []), strict=True):
        assert t[1] == a[1] and t[3] == a[3]  # the same candidate kept, the same image
        assert t[0] == pytest.approx(a[0], rel=1e-4, abs=1e-6)  # scores: a batch's rounding only
        assert t[2] == pytest.approx(a[2], rel=1e-4, abs=1e-6)


def test_64_concurrent_requests_are_all_answered_in_shared_batches(server):
    before = stats("Captioner")
    body = {"model": MODEL, "messages": [user(image_part(data_url(png(8))), "Describe.")], "max_tokens": 3}

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(64)))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 64
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) == 1
    after = stats("Captioner")
    requests = after["requests"] - before["requests"]
    steps = after["model_calls"] - before["model_calls"]
    assert requests == 64
    # one at a time, 64 requests of 3 tokens take 64 x 2 decode steps (the first token comes from the
    # prefill); how many share a step depends on how fast the proxy hands them on (on a busy CI box
    # 2 per step on average), so the bound is "fewer steps than one at a time", plus the peak batch
    assert steps < 64 * 2 and after["largest_batch"] > 1, (steps, after["largest_batch"])


def test_a_full_queue_answers_503_with_retry_after(server):
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            body = {"prompt": "a boat", "seed": 1}
            return await asyncio.gather(
                *(c.post("/overload/v1/images/generations", json=body) for _ in range(8))
            )

    responses = asyncio.run(run())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "3"
            assert error_of(r)["code"] == "overloaded" and error_of(r)["type"] == "server_error"


# -- client errors: always a 4xx with an OpenAI-style body, never a 500 ----------------------------

GOOD_IMAGE = image_part(data_url(png(9)))


def chat(*messages: dict, **extra) -> dict:
    return {"model": MODEL, "messages": list(messages) or [user(GOOD_IMAGE, "What?")], **extra}


def bomb() -> bytes:
    """A small file that decodes to 9 megapixels (the test server allows 4)."""
    buf = io.BytesIO()
    PIL.Image.new("L", (3000, 3000)).save(buf, format="PNG")
    return buf.getvalue()


CHAT_ERRORS = {
    "malformed JSON": (b'{"model": "x", "messages": [', 400, "invalid_json"),
    "not an object": ([1, 2], 400, "model_type"),
    "missing messages": ({"model": MODEL}, 400, "missing"),
    "missing model": ({"messages": [user(GOOD_IMAGE, "hi")]}, 400, "missing"),
    "wrong type": (chat(max_tokens="5"), 400, "int_type"),
    "wrong content type": (chat({"role": "user", "content": 5}), 400, "list_type"),
    "unknown part type": (chat(user({"type": "input_audio", "input_audio": {}})), 400, "literal_error"),
    "unknown role": (chat({"role": "robot", "content": "hi"}), 400, "literal_error"),
    "negative temperature": (chat(temperature=-1), 400, "greater_than_equal"),
    "top_p zero": (chat(top_p=0), 400, "greater_than"),
    "n > 1": (chat(n=2), 400, "value_error"),
    "max_tokens over the limit": (chat(max_tokens=65), 400, "invalid_request"),
    "unknown model": ({**chat(), "model": "gpt-4o"}, 404, "model_not_found"),
    "bad base64": (chat(user(image_part("data:image/png;base64,@@@not-base64"), "x")), 400, "invalid_base64"),
    "data URL not base64": (chat(user(image_part("data:image/png,rawbytes"), "x")), 400, "invalid_image_url"),
    "undecodable image": (
        chat(user(image_part(data_url(b"not an image at all")), "x")),
        400,
        "invalid_image",
    ),
    "decompression bomb": (chat(user(image_part(data_url(bomb())), "x")), 400, "invalid_image"),
    "too many images": (chat(user(*[GOOD_IMAGE] * 5, "x")), 400, "too_many_images"),
    "no image": (chat(user("hello")), 400, "missing_image"),
    "http URL": (chat(user(image_part("http://127.0.0.1:1/x.png"), "x")), 400, "unsupported_image_url"),
    "https URL": (chat(user(image_part("https://example.com/x.png"), "x")), 400, "unsupported_image_url"),
    "s3 URL not allowed": (chat(user(image_part("s3://bucket/x.png"), "x")), 400, "image_url_not_allowed"),
    "assistant first": (
        chat({"role": "assistant", "content": "hi"}, user(GOOD_IMAGE, "x")),
        400,
        "invalid_request",
    ),
    "assistant last": (
        chat(user(GOOD_IMAGE, "x"), {"role": "assistant", "content": "hi"}),
        400,
        "invalid_request",
    ),
    "image in system message": (
        chat({"role": "system", "content": [GOOD_IMAGE]}, user("x")),
        400,
        "invalid_request",
    ),
    "image tag in text": (chat(user(GOOD_IMAGE, "<image_placeholder> sneaky")), 400, "invalid_request"),
    "empty user text": (
        chat(user(GOOD_IMAGE), {"role": "assistant", "content": "a"}, user("")),
        400,
        "invalid_request",
    ),
}


@pytest.mark.parametrize("case", list(CHAT_ERRORS))
def test_chat_client_errors(client, case):
    body, status, code = CHAT_ERRORS[case]
    if isinstance(body, bytes):
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    assert error_of(r)["code"] == code
    assert error_of(r)["type"] == "invalid_request_error"


IMAGE_ERRORS = {
    "missing prompt": ({"n": 1}, 400, "missing"),
    "empty prompt": ({"prompt": ""}, 400, "string_too_short"),
    "n too large": ({"prompt": "x", "n": 5}, 400, "invalid_request"),
    "n zero": ({"prompt": "x", "n": 0}, 400, "greater_than_equal"),
    "unsupported size": ({"prompt": "x", "size": "384x384"}, 400, "unsupported_size"),
    "url response": ({"prompt": "x", "response_format": "url"}, 400, "invalid_request"),
    "unknown response format": ({"prompt": "x", "response_format": "png"}, 400, "literal_error"),
    "a stream of several images": ({"prompt": "x", "stream": True, "n": 2}, 400, "invalid_request"),
    "a stream of url images": ({"prompt": "x", "stream": True, "response_format": "url"}, 400, "invalid_request"),
    "four partial images": ({"prompt": "x", "stream": True, "partial_images": 4}, 400, "less_than_equal"),
    "cfg below 1": ({"prompt": "x", "cfg_weight": 0.5}, 400, "greater_than_equal"),
    "negative seed": ({"prompt": "x", "seed": -1}, 400, "greater_than_equal"),
    "huge seed": ({"prompt": "x", "seed": 2**64}, 400, "less_than"),
    "seed as string": ({"prompt": "x", "seed": "7"}, 400, "int_type"),
    "unknown model": ({"prompt": "x", "model": "dall-e-3"}, 404, "model_not_found"),
    "prompt too long for the context": ({"prompt": "word " * 20_000}, 400, "invalid_request"),
}


@pytest.mark.parametrize("case", list(IMAGE_ERRORS))
def test_image_client_errors(client, case):
    body, status, code = IMAGE_ERRORS[case]
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == status, r.text
    assert error_of(r)["code"] == code


def test_url_images_without_an_image_store_say_how_to_configure_one(client):
    r = client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
    assert r.status_code == 400 and error_of(r)["param"] == "response_format"
    assert "api.image_store" in error_of(r)["message"]


def test_oversized_bodies_are_refused_before_parsing(client):
    big = b'{"prompt": "' + b"x" * 1_100_000 + b'"}'
    r = client.post("/v1/images/generations", content=big)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    # no Content-Length (chunked upload): the streamed size is counted
    r = client.post("/v1/images/generations", content=iter([big[:600_000], big[600_000:]]))
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"


def test_file_urls_only_from_the_allowed_prefix(client, files):
    def ask(url: str) -> httpx.Response:
        return client.post("/v1/chat/completions", json=chat(user(image_part(url), "What?")))

    assert ask(f"file://{files['allowed']}/ok.png").status_code == 200
    for url in (
        f"file://{files['outside']}/secret.png",  # outside the prefix
        f"file://{files['allowed']}/../outside/secret.png",  # traversal
        f"file://{files['allowed']}/link.png",  # a symlink leading out
        f"file://{files['allowed']}",  # the prefix itself, without a file
        f"file://{files['allowed']}/ok.png\x00.txt",  # a NUL byte
    ):
        r = ask(url)
        assert r.status_code == 400 and error_of(r)["code"] == "image_url_not_allowed", url
    r = ask(f"file://{files['allowed']}/missing.png")
    assert r.status_code == 400 and error_of(r)["code"] == "image_not_found"


def test_s3_urls_only_from_the_allowed_prefix(client):
    def ask(url: str) -> httpx.Response:
        return client.post("/v1/chat/completions", json=chat(user(image_part(url), "What?")))

    assert ask("s3://serve-images/uploads/ok.png").status_code == 200
    for url in ("s3://serve-images/private/secret.png", "s3://serve-images/uploads/../private/secret.png"):
        r = ask(url)
        assert r.status_code == 400 and error_of(r)["code"] == "image_url_not_allowed", url
    r = ask("s3://serve-images/uploads/missing.png")
    assert r.status_code == 400 and error_of(r)["code"] == "image_not_found"


def test_unknown_routes_and_methods_keep_the_error_shape(client):
    assert error_of(client.get("/v1/nothing"))["code"] == "not_found"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


def test_replicas_survive_every_error(client):
    """Run last among the HTTP tests: after all the bad input, the same replicas still answer."""
    assert client.get("/health").status_code == 200
    r = client.post("/v1/chat/completions", json=chat(max_tokens=2))
    assert r.status_code == 200


# -- configuration and CLI -------------------------------------------------------------------------


def test_the_shipped_serve_configs_are_valid():
    for name in ("serve_tiny.yaml", "serve_prod.yaml"):
        [(app, args)] = check_serve_config(REPO / "configs" / name)
        assert app == "janus" and args.synthesis is not None and args.caption is not None
        assert build_app(args) is not None
    assert cli_main(["serve", "--config", str(REPO / "configs" / "serve_tiny.yaml"), "--dry-run"]) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        ({"api": {"max_body_byte": 1}}, "max_body_byte"),
        ({"synthesis": {"engine": {"max_batch": 4}}}, "max_batch"),
        ({"synthesis": {"sampling": {"top_q": 1}}}, "top_q"),
        ({"caption": {"deployment": {"max_ongoing_requests": 2}}}, "max_ongoing_requests (2)"),
        ({"caption": {"deployment": {"max_queue": 2}}}, "max_queue"),
        ({"api": {"image_url_prefixes": ["https://example.com/"]}}, "https://example.com/"),
        ({"api": {"image_url_prefixes": ["file:///"]}}, "not a usable prefix"),
        ({"api": {"image_url_prefixes": ["file:///data/../etc"]}}, "not a usable prefix"),
        ({"synthesis": None, "caption": None}, "at least one"),
    ],
)
def test_bad_serve_configs_fail_before_deploying(args, message):
    with pytest.raises(ServeConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg = parse_args(args)
        cfg.api.deployment_options()
        for section in (cfg.synthesis, cfg.caption):
            if section is not None:
                section.deployment_options("x")


def test_cli_rejects_a_bad_config(tmp_path, capsys):
    data = yaml.safe_load((REPO / "configs" / "serve_tiny.yaml").read_text())
    data["applications"][0]["args"]["api"]["max_n"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli_main(["serve", "--config", str(path)]) == 2
    assert "max_n" in capsys.readouterr().err


def test_metrics_reach_rays_prometheus_endpoint(server, client, ray_session):
    """Our counters and Serve's batching metrics (from the batch-mode app) on the node's Prometheus
    export port."""
    r = httpx.post(f"{server}/overload/v1/images/generations", json={"prompt": "a boat", "seed": 2}, timeout=300)
    assert r.status_code == 200, r.text
    port = ray_session._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + 300  # generous: the export runs every few seconds, slower when loaded
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if "janus_chat_tokens" in text and "serve_actual_batch_size" in text:
            break
        time.sleep(1)
    assert "janus_chat_tokens" in text and "janus_images_generated" in text
    assert "serve_actual_batch_size" in text
