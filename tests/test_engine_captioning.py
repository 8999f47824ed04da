"""Captioning engine: the same text as DeepSeek's generate path and transformers' Janus, batched."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from janus.engine import CaptionEngine
from janus.reference import reference_caption


def image(w: int, h: int, seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


IMAGES = [image(320, 240, 0), image(64, 300, 1), image(384, 384, 2), image(50, 20, 3)]
QUESTIONS = ["Describe this image in detail.", "What is it?", "Convert the formula into latex code.", "Why?"]


def test_batched_greedy_text_equals_the_seed_path(tiny_model, tiny_processor):
    engine = CaptionEngine(tiny_model, tiny_processor, max_batch_size=4)
    limits = [12, 5, 9, 1]
    requests = [
        {"image": im, "question": q, "max_new_tokens": n}
        for im, q, n in zip(IMAGES, QUESTIONS, limits, strict=True)
    ]
    results = engine.generate(requests)
    for req, res in zip(requests, results, strict=True):
        assert res.ok, res.error
        expected, _ = reference_caption(
            tiny_model, tiny_processor, req["image"], req["question"], req["max_new_tokens"]
        )
        assert res.text == expected
        assert res.finish_reason in ("stop", "length")
        assert res.num_tokens <= req["max_new_tokens"]
    assert results[3].num_tokens <= 1


def test_token_ids_equal_transformers_janus_text_generate(hf_pair):
    hf, ours, processor = hf_pair
    engine = CaptionEngine(ours, processor)
    results = engine.generate(
        [
            {"image": im, "question": q, "max_new_tokens": 10}
            for im, q in zip(IMAGES[:2], QUESTIONS[:2], strict=True)
        ]
    )
    for img, q, res in zip(IMAGES[:2], QUESTIONS[:2], results, strict=True):
        conversation = [
            {"role": "<|User|>", "content": f"<image_placeholder>\n{q}"},
            {"role": "<|Assistant|>", "content": ""},
        ]
        inputs = processor(conversations=conversation, images=[img])
        out = hf.generate(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            pixel_values=inputs.pixel_values[:, 0],
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=processor.tokenizer.eos_token_id,
            pad_token_id=processor.tokenizer.eos_token_id,
        )
        theirs = out[0, inputs.input_ids.shape[1] :].tolist()
        eos = processor.tokenizer.eos_token_id
        theirs = theirs[: theirs.index(eos)] if eos in theirs else theirs
        assert res.num_tokens == len(theirs)
        assert res.text == processor.tokenizer.decode(theirs, skip_special_tokens=True)


def test_finish_reasons_stop_and_length(tiny_model, tiny_processor):
    engine = CaptionEngine(tiny_model, tiny_processor)
    lm_head = tiny_model.language_model.lm_head
    bias = torch.zeros(lm_head.out_features)
    bias[tiny_processor.tokenizer.eos_token_id] = 1e4  # EOS always wins: every row stops at once
    lm_head.bias = torch.nn.Parameter(bias)
    try:
        stopped = engine.generate(
            [{"image": IMAGES[0], "max_new_tokens": 6}, {"image": IMAGES[1], "max_new_tokens": 3}]
        )
    finally:
        lm_head.bias = None
    assert [(r.finish_reason, r.num_tokens, r.text) for r in stopped] == [("stop", 0, ""), ("stop", 0, "")]
    rows = engine.generate(
        [{"image": IMAGES[1], "max_new_tokens": 3}, {"image": IMAGES[2], "max_new_tokens": 7}]
    )
    assert [(r.finish_reason, r.num_tokens) for r in rows] == [("length", 3), ("length", 7)]


def test_several_images_per_request(tiny_model, tiny_processor):
    engine = CaptionEngine(tiny_model, tiny_processor)
    two = {"images": IMAGES[:2], "question": "Compare the two images.", "max_new_tokens": 6}
    tagged = {
        "images": IMAGES[1:3],
        "question": "First <image_placeholder> then <image_placeholder>: which is brighter?",
        "max_new_tokens": 6,
    }
    single = {"image": IMAGES[3], "max_new_tokens": 6}
    results = engine.generate([two, tagged, single])
    assert all(r.ok for r in results), [r.error for r in results]
    # batching several multi-image rows gives the same text as running each alone
    for req, res in zip([two, tagged, single], results, strict=True):
        assert engine.generate([req])[0].text == res.text


def test_preprocessed_tensors_and_arrays_are_accepted(tiny_model, tiny_processor):
    engine = CaptionEngine(tiny_model, tiny_processor)
    pixels = tiny_processor.image_processor([IMAGES[0]]).pixel_values[0]
    as_pil, as_tensor, as_array = engine.generate(
        [
            {"image": IMAGES[0], "max_new_tokens": 5},
            {"image": pixels, "max_new_tokens": 5},
            {"image": np.asarray(IMAGES[0]), "max_new_tokens": 5},
        ]
    )
    assert as_pil.text == as_tensor.text == as_array.text


def test_sampling_is_reproducible_per_row(tiny_model, tiny_processor):
    engine = CaptionEngine(tiny_model, tiny_processor)
    target = {"image": IMAGES[2], "max_new_tokens": 8, "temperature": 1.0, "seed": 11}
    alone = engine.generate([target])[0].text
    others = [
        {"image": im, "max_new_tokens": 8, "temperature": 0.8, "seed": i} for i, im in enumerate(IMAGES)
    ]
    batch = engine.generate([others[0], target, *others[1:]])
    assert batch[1].text == alone


def test_bad_requests_fail_alone(tiny_model, tiny_processor):
    engine = CaptionEngine(tiny_model, tiny_processor, max_images_per_request=2)
    results = engine.generate(
        [
            {"image": IMAGES[0], "max_new_tokens": 3},
            {"question": "no image"},
            {"image": b"\x89PNG broken"},
            {"image": torch.zeros(3, 10, 10)},
            {"image": IMAGES[0], "question": ""},
            {"image": IMAGES[0], "max_new_tokens": 0},
            {"image": IMAGES[0], "temperature": -0.5},
            {"images": IMAGES[:3]},
            {"images": IMAGES[:2], "question": "only one <image_placeholder> tag"},
            {"image": IMAGES[0], "max_new_tokens": 100_000},
            "not a request",
            {"image": IMAGES[1], "max_new_tokens": 3},
        ]
    )
    assert [r.status for r in results] == ["ok"] + ["error"] * 10 + ["ok"]
    msgs = [r.error for r in results[1:-1]]
    for msg, needle in zip(
        msgs,
        [
            "no image",
            "cannot use image",
            "shape",
            "question",
            "max_new_tokens",
            "temperature",
            "at most 2",
            "tags but 2 images",
            "exceeds the context",
            "dict or an image",
        ],
        strict=True,
    ):
        assert needle in msg, (needle, msg)


def test_top_p_sampling_runs_is_reproducible_and_is_really_applied(tiny_model, tiny_processor):
    """Captioning's top_p: a seed gives its text alone or in a batch; sampling differs from greedy;
    and a top_p so small that only the most likely token survives gives exactly the greedy text
    (so top_p reaches the sampler: ignored, that row would sample the whole vocabulary)."""
    engine = CaptionEngine(tiny_model, tiny_processor)
    base = {"image": IMAGES[0], "question": QUESTIONS[0], "max_new_tokens": 8}
    greedy = engine.generate([base])[0]
    nucleus = [{**base, "temperature": 1.0, "top_p": 0.9, "seed": s} for s in range(4)]
    alone = [engine.generate([r])[0] for r in nucleus]
    assert all(r.ok for r in alone), [r.error for r in alone]
    mixed = engine.generate([nucleus[2], {**base, "image": IMAGES[1]}, nucleus[0]])
    assert (mixed[0].text, mixed[2].text) == (alone[2].text, alone[0].text)
    assert len({r.text for r in alone}) > 1 and any(r.text != greedy.text for r in alone)
    narrow = engine.generate([{**base, "temperature": 1.0, "top_p": 1e-6, "seed": s} for s in range(3)])
    assert [r.text for r in narrow] == [greedy.text] * 3
