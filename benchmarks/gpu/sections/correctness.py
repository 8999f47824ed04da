"""correctness: the 1B shape with random bf16 weights, run in bf16 and in fp32 on the same weights.

"C4": DeepSeek's greedy answer (32 tokens) and its first 64 image tokens in bf16 against fp32 (greedy
agreement, logit max-diff along the fp32 sequence); then the engines' equality tests on the device
(a request alone == inside a mixed batch, the greedy engine == DeepSeek's loop, batched captions ==
per-image captions), in fp32 and bf16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.gpu.models import model_config, model_from_state, processor_for, random_state, shape_kwargs
from benchmarks.gpu.plan import Plan
from benchmarks.gpu.record import Recorder
from benchmarks.gpu.section import Section


def agreement(a: list[int], b: list[int]) -> dict[str, Any]:
    """How far two token sequences agree: equal, fraction of equal positions, first divergence."""
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    same = sum(x == y for x, y in zip(a[:n], b[:n], strict=True))
    return {"equal": a == b, "n": n, "agreement": same / max(n, 1), "first_divergence": first}


def logit_diff(ref, other) -> dict[str, Any]:
    """bf16 logits against the fp32 ones on the same inputs: the max-diff, and how close the top-2
    of fp32 were where the argmax differs (ties that rounding may break)."""
    diff = (other - ref).abs()
    top2 = ref.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    same = ref.argmax(-1) == other.argmax(-1)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_logit_fp32": float(ref.abs().max()),
        "rel_max_diff": float(diff.max() / ref.abs().max()),
        "teacher_forced_argmax_agreement": float(same.float().mean()),
        "fp32_top1_top2_gap_median": float(gap.median()),
        "fp32_top1_top2_gap_where_argmax_differs": gap[~same].tolist()[:16],
    }


def answer_logits(model, processor, image, question: str, answer: list[int]):
    """Logits that predict each ``answer`` token, the prompt and the answer fed whole (no cache)."""
    import torch

    device = next(model.parameters()).device
    conversation = [
        {"role": "<|User|>", "content": f"{processor.image_tag}\n{question}", "images": [image]},
        {"role": "<|Assistant|>", "content": ""},
    ]
    with torch.inference_mode():
        inputs = processor(conversations=conversation, images=[image], force_batchify=True).to(device)
        embeds = model.prepare_inputs_embeds(**inputs)
        lm = model.language_model
        given = lm.get_input_embeddings()(torch.tensor([answer[:-1]], device=device)).to(embeds.dtype)
        hidden = lm.model(inputs_embeds=torch.cat([embeds, given], dim=1)).last_hidden_state
        return lm.lm_head(hidden[0, -len(answer) :]).float()


def image_logits(model, processor, prompt: str, codes: list[int], cfg_weight: float = 5.0):
    """CFG logits that predict each image code, the prompt and the codes fed whole (no cache)."""
    import torch

    from janus.reference import t2i_prompt

    device = next(model.parameters()).device
    lm = model.language_model
    ids = torch.tensor(processor.tokenizer.encode(t2i_prompt(processor, prompt)), dtype=torch.long)
    rows = ids.repeat(2, 1)
    rows[1, 1:-1] = processor.pad_id  # DeepSeek's unconditional row
    with torch.inference_mode():
        embeds = lm.get_input_embeddings()(rows.to(device))
        given = model.prepare_gen_img_embeds(torch.tensor(codes[:-1], device=device))
        embeds = torch.cat([embeds, given[None].expand(2, -1, -1).to(embeds.dtype)], dim=1)
        hidden = lm.model(inputs_embeds=embeds).last_hidden_state[:, -len(codes) :]
        logits = model.gen_head(hidden).float()
        return logits[1] + cfg_weight * (logits[0] - logits[1])


def c4_understanding(models: dict[str, Any], processor, max_new_tokens: int = 32) -> dict[str, Any]:
    """Greedy answers of the bf16 and fp32 models (DeepSeek's path) and their logits along the fp32 one."""
    from benchmarks.bench_engines import QUESTIONS, caption_images
    from janus.reference import reference_caption

    image, question = caption_images(1)[0], QUESTIONS[0]
    tokens = {
        d: reference_caption(m, processor, image, question, max_new_tokens)[1] for d, m in models.items()
    }
    ref = tokens["float32"]
    logits = {d: answer_logits(m, processor, image, question, ref) for d, m in models.items()}
    return {
        "greedy_tokens": agreement(ref, tokens["bfloat16"]),
        "logits": logit_diff(logits["float32"], logits["bfloat16"]),
    }


def c4_image_tokens(models: dict[str, Any], processor, n: int = 64) -> dict[str, Any]:
    """The same for the first ``n`` image tokens of DeepSeek's text-to-image loop (greedy, CFG 5)."""
    from benchmarks.bench_engines import PROMPTS
    from janus.reference import reference_generate

    prompt = PROMPTS[0]
    codes = {
        d: reference_generate(m, processor, prompt, temperature=0.0, image_tokens=n)[0][0].tolist()
        for d, m in models.items()
    }
    ref = codes["float32"]
    logits = {d: image_logits(m, processor, prompt, ref) for d, m in models.items()}
    return {
        "greedy_tokens": agreement(ref, codes["bfloat16"]),
        "logits": logit_diff(logits["float32"], logits["bfloat16"]),
    }


def twin_synthesis(model, processor) -> dict[str, Any]:
    """tests/test_engine_synthesis.py on the device: a request alone == inside a mixed batch (sampled
    and greedy), and the greedy engine == DeepSeek's loop."""
    from benchmarks.bench_engines import PROMPTS
    from janus.engine import SynthesisEngine
    from janus.reference import reference_generate

    engine = SynthesisEngine(model, processor, max_batch_size=8)
    sampled = {"prompt": PROMPTS[1], "seed": 42, "cfg_weight": 4.0, "temperature": 1.0}
    greedy = {"prompt": PROMPTS[0], "temperature": 0.0}
    batch = [
        {"prompt": PROMPTS[2], "seed": 1, "temperature": 0.8, "top_k": 50},
        sampled,
        {"prompt": PROMPTS[3]},
        greedy,
    ]

    def tokens(requests):
        results = engine.generate(requests)
        bad = [r.error for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"engine failed: {bad[0]}")
        return [r.tokens.tolist() for r in results]

    together = tokens(batch)
    alone_sampled, alone_greedy = tokens([sampled])[0], tokens([greedy])[0]
    reference = reference_generate(model, processor, greedy["prompt"], temperature=0.0)[0][0].tolist()
    return {
        "sampled_alone_vs_in_batch": agreement(alone_sampled, together[1]),
        "greedy_alone_vs_in_batch": agreement(alone_greedy, together[3]),
        "greedy_engine_vs_reference_loop": agreement(alone_greedy, reference),
    }


def twin_caption(model, processor, max_new_tokens: int = 32) -> dict[str, Any]:
    """tests/test_engine_captioning.py on the device: batched greedy text == DeepSeek's per-image path,
    and a request alone == inside the batch."""
    from benchmarks.bench_engines import QUESTIONS, caption_images
    from janus.engine import CaptionEngine
    from janus.reference import reference_caption

    images = caption_images(4)
    requests = [
        {"image": im, "question": QUESTIONS[i], "max_new_tokens": max_new_tokens, "temperature": 0}
        for i, im in enumerate(images)
    ]
    engine = CaptionEngine(model, processor, max_batch_size=4)
    batch = [r.text for r in engine.generate(requests)]
    alone = engine.generate(requests[:1])[0].text
    reference = [
        reference_caption(model, processor, r["image"], r["question"], max_new_tokens)[0] for r in requests
    ]
    same = sum(a == b for a, b in zip(batch, reference, strict=True))
    return {
        "batch_equals_reference": f"{same}/{len(requests)}",
        "alone_equals_in_batch": alone == batch[0],
        "first_text": batch[0][:120],
    }


def section_correctness(rec: Recorder, plan: Plan, work: Path) -> None:
    import torch

    from benchmarks.bench_engines import model_shape

    device = torch.device(plan.device)
    shape = plan.pick(gpu="1b", dry="tiny48")
    cfg = model_config(shape_kwargs(shape), "bfloat16")
    processor = processor_for(work)
    models: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        state = random_state(cfg, "bfloat16", device)  # bf16, as the official weights; fp32 runs them upcast
        for d in ("float32", "bfloat16"):
            models[d] = model_from_state(cfg, state, d, device)
        return {"shape": shape, "model_shape": model_shape(models["float32"])}

    def answers_decode_to_text() -> dict[str, Any]:
        """lm_head rows past the stand-in tokenizer's ~650 tokens are zeroed: every greedy answer token
        then decodes to text, so equal texts mean equal tokens (C4 above ran the untouched heads)."""
        n = len(processor.tokenizer)
        with torch.no_grad():
            for m in models.values():
                m.language_model.lm_head.weight[n:] = 0
        return {"zeroed_rows_from": n}

    rec.item("fp32 and bf16 models on the same bf16 weights", build)
    if len(models) < 2:
        return
    c4 = {
        "understanding": rec.item(
            "C4 understanding: bf16 vs fp32", lambda: c4_understanding(models, processor), 5
        ),
        "image_tokens_64": rec.item(
            "C4 64 image tokens: bf16 vs fp32", lambda: c4_image_tokens(models, processor), 5
        ),
    }
    rec.set("C4", c4)
    twin_dtypes = plan.pick(gpu=("float32", "bfloat16"), dry=("float32",))
    for d in twin_dtypes:
        rec.item(f"equality twin, synthesis, {d}", lambda d=d: twin_synthesis(models[d], processor), 15)
    rec.item("lm_head rows past the tokenizer zeroed", answers_decode_to_text)
    for d in twin_dtypes:
        rec.item(f"equality twin, captioning, {d}", lambda d=d: twin_caption(models[d], processor), 8)


SECTIONS = (
    Section(
        "correctness",
        order=20,
        budget_s=45,
        about="1B shape, random weights: bf16 vs fp32 on the same weights (greedy agreement, logit "
        "max-diff; understanding and 64 image tokens); the engines' equality tests on the device",
        run=section_correctness,
    ),
)
