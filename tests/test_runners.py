"""The task runners: the one place each task's model side is written, for every driver."""

from __future__ import annotations

import pytest
import torch

from janus.engine import CaptionEngine, SynthesisEngine
from janus.engine.common import Prepared
from janus.engine.prompts import unconditional_ids
from janus.engine.sampling import SamplingParams, probabilities

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def synth(tiny_model, tiny_processor):
    return SynthesisEngine(tiny_model, tiny_processor)


@pytest.fixture(scope="module")
def captioner(tiny_model, tiny_processor):
    return CaptionEngine(tiny_model, tiny_processor)


def test_image_prompts_are_conditional_rows_then_deepseeks_unconditional_rows(synth, tiny_processor):
    batch = [synth.prepare(i, p) for i, p in enumerate(["a cat", "a red apple on a wooden table"])]
    embeds, mask = synth.runner.prompt_embeds(batch, length=40)
    assert embeds.shape[:2] == mask.shape == (4, 40)
    table = synth.model.language_model.get_input_embeddings()
    pad = tiny_processor.pad_id
    expected = [p.data for p in batch] + [unconditional_ids(p.data, pad) for p in batch]
    for row, ids in enumerate(expected):
        n = len(ids)
        assert mask[row].tolist() == [0] * (40 - n) + [1] * n  # left padding
        assert torch.equal(embeds[row, 40 - n :], table(torch.tensor(ids)))


def test_the_cfg_mix_before_the_heads_last_layer_equals_the_mix_of_logits(synth):
    runner = synth.runner
    hidden = torch.randn(6, 3, synth.model.language_model.config.hidden_size)
    settings = runner.settings([synth.prepare(0, {"prompt": "x", "cfg_weight": w}).request for w in (1.0, 3.0, 5.0)])
    fused = runner.logits(hidden, settings)
    runner.cfg_before_head = False
    try:
        mixed = runner.logits(hidden, settings)
    finally:
        runner.cfg_before_head = True
    assert fused.shape == (3, 3, synth.model.config.image_token_size)
    torch.testing.assert_close(fused, mixed, rtol=1e-4, atol=1e-4)


def test_window_probabilities_are_what_the_sampler_draws_from(synth):
    runner = synth.runner
    reqs = [synth.prepare(i, r).request for i, r in enumerate(
        [{"prompt": "a", "temperature": 0.7, "top_k": 5}, {"prompt": "b", "temperature": 0}, {"prompt": "c", "top_p": 0.5}]
    )]
    settings = runner.settings(reqs)
    hidden = torch.randn(6, 2, synth.model.language_model.config.hidden_size)
    probs = runner.probabilities(hidden, settings)
    logits = runner.logits(hidden, settings)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2))
    assert torch.equal(probs[1], torch.nn.functional.one_hot(logits[1].argmax(-1), probs.shape[-1]).float())
    for i, req in enumerate(reqs):
        if req.temperature > 0:
            params = SamplingParams.build([req.temperature] * 2, [req.top_k] * 2, [req.top_p] * 2, torch.device("cpu"))
            ref = probabilities(logits[i], params)
            torch.testing.assert_close(probs[i], ref / ref.sum(-1, keepdim=True))


def test_a_caption_ends_at_its_eos_unless_asked_to_go_on(captioner, tiny_processor):
    tok = tiny_processor.tokenizer
    eos = tok.eos_token_id
    words = tok.encode(" a white circle", add_special_tokens=False)
    stop = Prepared(0, captioner.prepare(0, {"image": torch.zeros(3, 384, 384), "max_new_tokens": 8}).request, 5)
    on = Prepared(1, captioner.prepare(1, {"image": torch.zeros(3, 384, 384), "max_new_tokens": 8,
                                           "ignore_eos": True}).request, 5)
    tokens = words + [eos] + words
    first, second = captioner.runner.finish([stop, on], [tokens, tokens], [{}, {}])
    assert (first.finish_reason, first.num_tokens) == ("stop", len(words))
    assert first.text == tok.decode(words, skip_special_tokens=True)
    assert (second.finish_reason, second.num_tokens) == ("length", 8)  # cut at max_new_tokens
    assert captioner.runner.eos(stop) == eos and captioner.runner.eos(on) is None
