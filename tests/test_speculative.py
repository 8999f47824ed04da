"""Speculative decoding of image codes is lossless: the proof, on CPU.

The oracle: a tiny model with 4 image codes and a 2 x 2 grid, sharpened so that each code depends on
the ones before it. Its exact CFG-mixed distribution of the first three codes (64 outcomes) is
enumerated with transformers' own Llama forward over whole sequences (not our decoder), and thousands
of seeds are decoded speculatively with a window that drafts codes 1 and 2, so every one of them is
settled by the acceptance rule. A chi-square bound passes for the right rule and fails by far for
broken ones (shown in the same tests: accepting a draft whenever it is p's argmax; replacing a
rejected draft from p instead of max(0, p - q)).

Then reproducibility: a request's image does not depend on its batch or when it joined the scheduler.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from janus.engine import SynthesisEngine
from janus.engine.prompts import t2i_prompt_ids, unconditional_ids
from janus.engine.scheduler import Scheduler
from janus.engine.speculative import SpeculativeOptions, Speculator
from tests.support.checkpoints import grid_10_model
from tests.support.shapes import shapes_vq
from tests.test_scheduler import SYNTH

pytestmark = pytest.mark.timeout(300)

V, GRID, CODES = 4, 2, 3  # image codes, grid side, codes whose joint law is checked
PROMPT = "a red apple"
CFG = 3.0
SEEDS = 3000
#: chi-square over at most 63 degrees of freedom: P(chi2 > 130) < 1e-6 for a right sampler
CHI2_BOUND = 130.0


@pytest.fixture(scope="module")
def oracle_model(tmp_path_factory):
    """(model, processor) with 4 image codes on a 2 x 2 grid, weights scaled so that codes depend on
    their context and the distributions are neither flat nor one-hot."""
    from janus.checkpoints import official_config, write_tiny_checkpoint
    from janus.models import MultiModalityCausalLM, VLChatProcessor

    base = official_config(vocab_size=64, hidden=64, llm_layers=2, llm_heads=4, intermediate=128,
                           vq={"image_token_size": V, "ch": 32, "ch_mult": [1, 2], "z_channels": 64,
                               "image_size": 2 * GRID})
    overrides = {k: base[k] for k in ("gen_vision_config", "gen_head_config")}
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("oracle") / "m", seed=11, vq_ch_mult=(1, 2),
                                 config_overrides=overrides)
    model = MultiModalityCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.gen_embed.weight.copy_(torch.randn(model.gen_embed.weight.shape, generator=gen))
        for layer in model.gen_aligner.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.4)
        head = model.gen_head.vision_head
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.6)
    return model, VLChatProcessor.from_pretrained(path)


def exact_joint(model, processor, temperature: float, top_k: int | None) -> np.ndarray:
    """P(code 0, code 1, code 2) [V, V, V], enumerated: transformers' Llama over every whole sequence,
    the full gen head, CFG ``u + cfg (c - u)``, temperature, top-k."""
    ids = t2i_prompt_ids(processor, PROMPT)
    prompts = torch.tensor([ids, unconditional_ids(ids, processor.pad_id)])
    embed = model.language_model.get_input_embeddings()

    def conditional(prefix: tuple[int, ...]) -> np.ndarray:
        x = embed(prompts)
        if prefix:
            codes = model.prepare_gen_img_embeds(torch.tensor([prefix, prefix]))
            x = torch.cat([x, codes], dim=1)
        hidden = model.language_model.model(inputs_embeds=x).last_hidden_state[:, -1]
        logits = model.gen_head(hidden).double()
        mixed = (logits[1] + CFG * (logits[0] - logits[1])) / temperature
        if top_k:
            mixed = mixed.masked_fill(mixed < mixed.topk(top_k).values[-1], -math.inf)
        return torch.softmax(mixed, -1).numpy()

    joint = np.zeros((V,) * CODES)
    with torch.no_grad():
        p0 = conditional(())
        for a in range(V):
            p1 = conditional((a,))
            for b in range(V):
                joint[a, b] = p0[a] * p1[b] * conditional((a, b))
    return joint


def chi_square(samples: np.ndarray, joint: np.ndarray) -> float:
    """Pearson's statistic of the sampled code triples against ``joint``; outcomes expected fewer than
    5 times are pooled into one cell."""
    counts = np.zeros(joint.size)
    np.add.at(counts, np.ravel_multi_index(samples.T, joint.shape), 1)
    expected = joint.ravel() * len(samples)
    assert counts[expected == 0].sum() == 0, "drew codes the distribution gives no mass"
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())


class AcceptsTheArgmax(Speculator):
    """Broken: a draft is accepted whenever it is p's most likely code (and only then)."""

    @staticmethod
    def accepts(u, p, q, drafted):
        return drafted == p.argmax(-1)


class ReplacesFromP(Speculator):
    """Broken: a rejected draft is replaced from p instead of max(0, p - q)."""

    @staticmethod
    def residual(p, q):
        return p


def sampled(model, processor, method: str, draft_init: str, top_k: int | None, broken=None):
    # the codes are what is checked: images decode 500 at a time (one at a time is ~80% of the test)
    engine = SynthesisEngine(model, processor, max_batch_size=500, vq_decode_batch_size=500,
                             speculative={"method": method, "window": 3, "draft_init": draft_init})
    if broken is not None:
        engine.speculator = broken(engine.speculative, V, GRID, engine.device)
    requests = [{"prompt": PROMPT, "seed": s, "cfg_weight": CFG, "top_k": top_k} for s in range(SEEDS)]
    results = engine.generate(requests)
    assert all(r.ok and r.decode_method == method for r in results)
    passes = np.mean([r.decode_passes for r in results])
    return np.stack([r.tokens[:CODES] for r in results]), passes


@pytest.mark.parametrize(
    ("method", "draft_init", "top_k", "broken_rules"),
    [
        ("jacobi", "random", None, (AcceptsTheArgmax, ReplacesFromP)),
        pytest.param("coupled", "left", None, (AcceptsTheArgmax, ReplacesFromP), marks=pytest.mark.slow),
        # with top-k 2 of 4 codes p and max(0, p - q) differ too little for ReplacesFromP to show
        pytest.param("coupled", "random", 2, (AcceptsTheArgmax,), marks=pytest.mark.slow),
    ],
)
def test_speculative_codes_follow_the_exact_distribution(oracle_model, method, draft_init, top_k, broken_rules):
    """Measured: the right rule gives chi-square 6-57; accepting the argmax 490-7500, replacing from p
    200-720 (the bound is 130)."""
    model, processor = oracle_model
    joint = exact_joint(model, processor, 1.0, top_k)
    samples, passes = sampled(model, processor, method, draft_init, top_k)
    assert chi_square(samples, joint) < CHI2_BOUND
    assert passes < GRID * GRID  # fewer passes than plain decoding's 4: drafts were accepted
    for broken in broken_rules:  # the bound has the power to see a wrong rule
        wrong, _ = sampled(model, processor, method, draft_init, top_k, broken)
        assert chi_square(wrong, joint) > CHI2_BOUND * 1.5, broken.__name__


def test_plain_codes_follow_the_exact_distribution(oracle_model):
    """The same bound holds for plain decoding (the oracle is the plain sampler's law too)."""
    model, processor = oracle_model
    engine = SynthesisEngine(model, processor, max_batch_size=500, vq_decode_batch_size=500)
    results = engine.generate([{"prompt": PROMPT, "seed": s, "cfg_weight": CFG} for s in range(SEEDS)])
    samples = np.stack([r.tokens[:CODES] for r in results])
    assert chi_square(samples, exact_joint(model, processor, 1.0, None)) < CHI2_BOUND


# -- reproducibility ---------------------------------------------------------------------------------------

REQUESTS = SYNTH  # the scheduler tests' requests: each its own seed and settings


@pytest.fixture(scope="module")
def grid_model(tmp_path_factory):
    """A tiny model with a 10 x 10 code grid: 100 codes per image keep these tests quick."""
    return grid_10_model(tmp_path_factory.mktemp("grid") / "m")


@pytest.mark.parametrize("method", ["jacobi", "coupled"])
def test_an_image_does_not_depend_on_its_batch_or_when_it_joined(grid_model, method):
    model, processor = grid_model
    engine = SynthesisEngine(model, processor, max_batch_size=4, speculative={"method": method, "window": 6})
    alone = [engine.generate([r])[0] for r in REQUESTS]
    assert all(r.decode_method == method and r.decode_passes < 100 for r in alone)
    together = engine.generate(REQUESTS)
    for a, b in zip(alone, together, strict=True):
        assert np.array_equal(a.tokens, b.tokens) and a.decode_passes == b.decode_passes
    scheduler = Scheduler(engine, slots=8)
    tickets = {}
    for i, request in enumerate(REQUESTS):  # joining at steps 0, 0, 5 and 11 of the first
        while scheduler.steps < [0, 0, 5, 11][i]:
            scheduler.step()
        tickets[i] = scheduler.submit(request)
    scheduler.run_until_idle()
    for i, a in enumerate(alone):
        res = tickets[i].result
        assert res.ok and np.array_equal(res.tokens, a.tokens) and np.array_equal(res.image, a.image)
        assert tickets[i].tokens == a.tokens.tolist()  # streamed as committed, in order


def test_speculative_and_plain_requests_share_passes(grid_model):
    """With ``max_rows: 1`` the first request decodes speculatively and later ones plainly, in the same
    passes: each gives its own image as it would alone."""
    model, processor = grid_model
    options = {"method": "coupled", "window": 6, "max_rows": 1}
    engine = SynthesisEngine(model, processor, max_batch_size=4, speculative=options)
    plain = SynthesisEngine(model, processor, max_batch_size=4)
    spec_alone = engine.generate([REQUESTS[0]])[0]
    plain_alone = [plain.generate([r])[0] for r in REQUESTS[1:]]
    scheduler = Scheduler(engine, slots=8)
    first = scheduler.submit(REQUESTS[0])
    scheduler.step()
    others = [scheduler.submit(r) for r in REQUESTS[1:]]
    scheduler.run_until_idle()
    assert first.result.decode_method == "coupled"
    assert np.array_equal(first.result.tokens, spec_alone.tokens)
    for ticket, ref in zip(others, plain_alone, strict=True):
        assert ticket.result.decode_method == "off" and ticket.result.decode_passes == 100
        assert np.array_equal(ticket.result.tokens, ref.tokens)
    # a batch above max_rows decodes plainly in the static engine too
    assert all(r.decode_method == "off" for r in engine.generate(REQUESTS[:2]))


def test_options_are_checked():
    assert SpeculativeOptions.of(None).method == "off"
    assert SpeculativeOptions.of("coupled").applies(64)
    assert not SpeculativeOptions(method="jacobi", max_rows=2).applies(3)
    for bad in ({"method": "medusa"}, {"method": "jacobi", "window": 1}, {"method": "jacobi", "max_rows": 0},
                {"method": "jacobi", "draft_init": "zeros"}):
        with pytest.raises(ValueError):
            SpeculativeOptions.of(bad)


def test_counter_uniforms_are_addressed_not_consumed():
    from janus.engine.sampling import counter_uniforms

    seeds = [0, 1, -5, 2**62]
    positions = np.arange(12).reshape(4, 3)
    a = counter_uniforms(seeds, 1, positions)
    b = counter_uniforms(seeds[2:3], 1, positions[2:3])  # one row alone: the same values
    assert np.array_equal(a[2:3], b) and ((a > 0) & (a < 1)).all()
    many = counter_uniforms([7], 2, np.arange(20_000)[None])[0]
    assert abs(float(many.mean()) - 0.5) < 0.01 and len(set(many.tolist())) > 19_900
    assert not np.array_equal(counter_uniforms(seeds, 2, positions), a)  # streams differ
    assert not np.array_equal(counter_uniforms([2**32 + 1], 1, positions[:1]), counter_uniforms([1], 1, positions[:1]))


def test_the_job_and_serve_configs_take_the_engines_options():
    """``engine.speculative`` in a job's YAML is checked in one place and reaches the engine as given."""
    import typing

    from janus.engine.speculative import DRAFT_INITS, METHODS
    from pipeline.config import ConfigError, load_config
    from pipeline.sections import SpeculativeSection, SynthesisEngineOptions

    fields = SpeculativeSection.model_fields
    assert typing.get_args(fields["method"].annotation) == METHODS
    assert typing.get_args(fields["draft_init"].annotation) == DRAFT_INITS
    parsed = SynthesisEngineOptions.parse({"speculative": {"method": "coupled", "max_rows": 4}})
    assert SpeculativeOptions.of(parsed["speculative"]) == SpeculativeOptions("coupled", 16, 4, "left")
    cfg = load_config("configs/demo_synthesize.yaml", ["engine.speculative.method=jacobi"])
    assert cfg.engine["speculative"] == {"method": "jacobi"}
    with pytest.raises(ConfigError, match="speculative"):
        load_config("configs/demo_synthesize.yaml", ["engine.speculative.window=1"])


# -- in the jobs and in Serve -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_job_and_serve_decode_speculatively_and_say_so(ray_session, serve_port, tmp_path):
    """``engine.speculative`` through a Ray Data job (each row's decode_method and decode_passes, the
    summary's codes per pass) and through Serve (the image's decode_passes), on the shapes model; the
    job's image is the engine's for the same request, method and window."""
    import base64
    import io

    import httpx
    import PIL.Image
    import pyarrow.parquet as pq
    from ray import serve

    from janus.shapes import Scene, caption
    from pipeline.config import load_config
    from pipeline.job import run_job
    from pipeline.serve.app import build_app

    spec = {"method": "coupled", "window": 8}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(caption(Scene(c, "circle", "left", "white")) + "\n" for c in ("red", "blue")))
    overrides = [f"input.url={prompts}", f"output.url={tmp_path / 'out'}", "model.dtype=float32",
                 "compute.batch_size=2", "compute.cpus_per_actor=0.5", "engine.speculative.method=coupled",
                 "engine.speculative.window=8"]
    summary = run_job(load_config(overrides=overrides, job="synthesize"))
    assert summary["complete"] and summary["this_run"]["ok"] == 2
    assert summary["this_run"]["codes_per_pass"] > 1.5
    rows = [r for f in sorted((tmp_path / "out").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert {r["decode_method"] for r in rows} == {"coupled"} and all(r["decode_passes"] < shapes_vq().image_tokens for r in rows)
    engine = SynthesisEngine.from_pretrained("shapes", dtype="float32", speculative=spec)
    row = rows[0]
    ref = engine.generate([{k: row[k] for k in ("prompt", "seed", "cfg_weight", "temperature")}])[0]
    assert ref.decode_passes == row["decode_passes"]

    model = {"path": "shapes", "name": "janus-shapes", "dtype": "float32"}
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    args = {"api": {"deployment": small}, "caption": None,
            "synthesis": {"model": model, "engine": {"speculative": spec}, "deployment": small}}
    try:
        serve.run(build_app(args), name="speculative", route_prefix="/speculative")
        body = {"prompt": row["prompt"], "seed": row["seed"], "cfg_weight": row["cfg_weight"]}
        with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}/speculative", timeout=300) as client:
            item = client.post("/v1/images/generations", json=body).json()["data"][0]
    finally:
        serve.delete("speculative")
    assert item["decode_method"] == "coupled" and item["decode_passes"] == row["decode_passes"]
    image = np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))
    assert np.array_equal(image, ref.image)
