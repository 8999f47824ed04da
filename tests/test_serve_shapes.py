"""The shipped Serve config's app (the shapes model) over real HTTP, judged by numpy: it draws what prompts
ask for, different seeds give different right pictures, and captions read the same whichever comes first
in a chat message, the image or the text (the official ``openai`` client, as users call it)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest

from janus.shapes import Scene, caption, draw, judge, parse_caption
from janus.shapes.data import random_scene
from janus.shapes.judge import correct
from pipeline.images import distinct, phash
from tests.support.shapes import CFG, PROMPTS, assert_right

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: captions right (all four attributes) of the CAPTIONED drawn scenes, in each order: measured 0.875
#: image first and 0.875 text first on 128 (benchmarks/results/eval_shapes.json), less a margin
CAPTIONED = 8
MIN_CAPTIONS_RIGHT = 5
#: among N_SEEDS seeds of one prompt: distinct pictures, and right ones (the variation measure of
#: benchmarks/results/eval_shapes.json at cfg 5: 3.9 distinct right pictures of 8 seeds on average)
N_SEEDS = 4
MIN_DISTINCT = 4
MIN_RIGHT = 1


def data_url(image: np.ndarray) -> str:
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def app(serve_port):
    """configs/serve_tiny.yaml's app on the session's Serve: (base URL, its model name)."""
    import yaml
    from ray import serve

    from pipeline.serve.app import build_app
    from tests.support import REPO

    args = yaml.safe_load((REPO / "configs" / "serve_tiny.yaml").read_text())["applications"][0]["args"]
    serve.run(build_app(args), name="shapes", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{serve_port}", args["caption"]["model"]["name"]
    finally:
        serve.delete("shapes")


@pytest.fixture(scope="module")
def oai(app):
    import openai

    return openai.OpenAI(base_url=f"{app[0]}/v1", api_key="unused", max_retries=0, timeout=300)


def test_serve_draws_and_reads_with_the_shapes_model(app):
    """Both routes at once, as users send them: they share the replicas' running batches (and each result
    must still be its own request's); vLLM's ignore_eos runs an answer on to max_tokens."""
    import httpx

    base, model = app
    wanted = PROMPTS[:4]
    scene = Scene("red", "square", "left", "white")
    content = [{"type": "image_url", "image_url": {"url": data_url(draw(scene))}}, {"type": "text", "text": "Describe this image in detail."}]
    chat = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 24}
    with httpx.Client(base_url=base, timeout=300) as client:
        with ThreadPoolExecutor(len(wanted) + 1) as pool:
            body = [{"prompt": caption(s), "seed": i, "cfg_weight": CFG} for i, s in enumerate(wanted)]
            posts = [pool.submit(client.post, "/v1/images/generations", json=b) for b in body]
            read = pool.submit(client.post, "/v1/chat/completions", json=chat)
            responses = [p.result() for p in posts]
            r = read.result()
        long = client.post("/v1/chat/completions", json={**chat, "max_tokens": 40, "ignore_eos": True})
        bad = client.post("/v1/chat/completions", json={**chat, "ignore_eos": "yes"})
    images = []
    for resp in responses:
        assert resp.status_code == 200, resp.text
        item = resp.json()["data"][0]
        assert 0 <= item["score"] <= 1
        images.append(decode(item["b64_json"]))
    assert_right(images, wanted)
    assert r.status_code == 200 and parse_caption(r.json()["choices"][0]["message"]["content"]) == scene
    answer = r.json()["choices"][0]["message"]["content"]
    assert r.json()["usage"]["completion_tokens"] < 24 and r.json()["choices"][0]["finish_reason"] == "stop"
    assert long.status_code == 200, long.text
    assert long.json()["usage"]["completion_tokens"] == 40 and long.json()["choices"][0]["finish_reason"] == "length"
    assert long.json()["choices"][0]["message"]["content"].startswith(answer.rstrip())
    assert bad.status_code == 400 and "ignore_eos" in bad.text


def test_captions_are_as_right_with_the_text_before_the_image(app, oai):
    """OpenAI's own chat examples put the text part first; the model reads both orders (it is trained on
    both: the prompt Serve builds for each is the one it learnt)."""
    rng = np.random.default_rng(11)
    scenes = [random_scene(rng) for _ in range(CAPTIONED)]
    images = [data_url(draw(s, rng=rng)) for s in scenes]
    question = {"type": "text", "text": "Describe this image in detail."}

    def ask(parts: list[dict]) -> Scene | None:
        reply = oai.chat.completions.create(model=app[1], messages=[{"role": "user", "content": parts}], max_tokens=24)
        return parse_caption(reply.choices[0].message.content)

    with ThreadPoolExecutor(2 * CAPTIONED) as pool:
        image_first = [pool.submit(ask, [{"type": "image_url", "image_url": {"url": u}}, question]) for u in images]
        text_first = [pool.submit(ask, [question, {"type": "image_url", "image_url": {"url": u}}]) for u in images]
        right = {
            "image first": sum(f.result() == s for f, s in zip(image_first, scenes, strict=True)),
            "text first": sum(f.result() == s for f, s in zip(text_first, scenes, strict=True)),
        }
    assert min(right.values()) >= MIN_CAPTIONS_RIGHT, right


def test_seeds_of_one_prompt_give_different_right_pictures(app, oai):
    """n images of one prompt (seeds seed, seed + 1, ...): different pictures, each what was asked for."""
    scene = PROMPTS[1]
    reply = oai.images.generate(
        model=app[1],
        prompt=caption(scene),
        n=N_SEEDS,
        response_format="b64_json",
        extra_body={"seed": 7, "cfg_weight": CFG},
    )
    images = [decode(item.b64_json) for item in reply.data]
    right = [im for im in images if correct(judge(im), scene.attributes())["all"]]
    assert len(images) == N_SEEDS and distinct([phash(im) for im in images]) >= MIN_DISTINCT
    assert len(right) >= MIN_RIGHT, [judge(im) for im in images]
