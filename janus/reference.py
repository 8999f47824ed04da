"""DeepSeek's reference generation algorithms: the tests' ground truth and the benchmarks' baselines.

``reference_generate`` is the text-to-image loop of DeepSeek's example: ONE prompt, ``parallel_size``
images, cond/uncond rows interleaved, transformers' dynamic KV cache grown one step at a time,
``u + cfg * (c - u)``, softmax(logits / T) and multinomial, ``decode_code`` and the same uint8
postprocessing. ``reference_caption`` is the example's per-image understanding path
(``language_model.generate(inputs_embeds=..., do_sample=False)``).

They are deliberately unoptimised, and share none of the engines' generation code, so an engine bug
cannot hide by appearing on both sides. Only janus.models, torch and numpy are needed.
"""

from __future__ import annotations

import inspect
import math
import time

import numpy as np
import torch

from janus.engine.common import sync
from janus.models.processing_vlm import VLChatProcessor

__all__ = ["reference_caption", "reference_generate", "t2i_prompt"]


def t2i_prompt(processor: VLChatProcessor, prompt: str) -> str:
    """DeepSeek's text-to-image prompt: chat template with an empty system prompt, then <begin_of_image>."""
    conversation = [{"role": "<|User|>", "content": prompt}, {"role": "<|Assistant|>", "content": ""}]
    text = processor.apply_sft_template_for_multi_turn_prompts(
        conversations=conversation, sft_format=processor.sft_format, system_prompt=""
    )
    return text + processor.image_start_tag


def _cache_kwarg(language_model) -> str:
    """transformers 5.x renames ``past_key_values`` to ``cache`` (the old name warns, then goes away)."""
    params = inspect.signature(language_model.model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(outputs):
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values


@torch.inference_mode()
def reference_generate(
    model,
    processor: VLChatProcessor,
    prompt: str,
    *,
    parallel_size: int = 1,
    cfg_weight: float = 5.0,
    temperature: float = 1.0,
    image_tokens: int = 576,
    generator: torch.Generator | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[torch.Tensor, np.ndarray | None]:
    """``parallel_size`` images for one ``prompt``: (codes LongTensor [N, image_tokens], uint8 [N, H, W, 3]).

    ``prompt`` is the user text; the template is applied here. ``temperature`` 0 means greedy (argmax).
    ``image_tokens`` other than 576 is for quick runs: a square count is decoded on a sqrt x sqrt grid,
    any other count returns no images. ``timings`` (if given) receives llm_s and vq_decode_s.
    """
    device = next(model.parameters()).device
    lm = model.language_model
    cache_kw = _cache_kwarg(lm)
    t0 = time.perf_counter()

    ids = torch.tensor(processor.tokenizer.encode(t2i_prompt(processor, prompt)), dtype=torch.long)
    rows = ids.repeat(2 * parallel_size, 1)
    rows[1::2, 1:-1] = processor.pad_id  # odd rows: unconditional (first and last token kept)
    inputs_embeds = lm.get_input_embeddings()(rows.to(device))

    codes = torch.zeros(parallel_size, image_tokens, dtype=torch.long, device=device)
    cache = None
    for step in range(image_tokens):
        outputs = lm.model(inputs_embeds=inputs_embeds, use_cache=True, **{cache_kw: cache})
        cache = _returned_cache(outputs)
        logits = model.gen_head(outputs.last_hidden_state[:, -1, :])
        cond, uncond = logits[0::2], logits[1::2]
        logits = uncond + cfg_weight * (cond - uncond)
        if temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_token = torch.multinomial(probs, num_samples=1, generator=generator)
        codes[:, step] = next_token.squeeze(-1)
        pair = torch.cat([next_token, next_token], dim=1).view(-1)  # same code for the cond and uncond row
        inputs_embeds = model.prepare_gen_img_embeds(pair).unsqueeze(1)
    sync(device)
    t1 = time.perf_counter()

    images = _decode_images(model, codes)
    sync(device)
    if timings is not None:
        timings["llm_s"] = t1 - t0
        timings["vq_decode_s"] = time.perf_counter() - t1
    return codes, images


def _decode_images(model, codes: torch.Tensor) -> np.ndarray | None:
    """The example's ``decode_code`` and uint8 postprocessing; None unless the code count is square."""
    n, image_tokens = codes.shape
    grid = math.isqrt(image_tokens)
    if grid * grid != image_tokens:
        return None
    vq = model.gen_vision_model
    dec = vq.decode_code(codes.to(torch.int32), shape=[n, vq.config.codebook_embed_dim, grid, grid])
    dec = dec.to(torch.float32).cpu().numpy().transpose(0, 2, 3, 1)
    return np.clip((dec + 1) / 2 * 255, 0, 255).astype(np.uint8)


@torch.inference_mode()
def reference_caption(
    model,
    processor: VLChatProcessor,
    image,
    question: str,
    max_new_tokens: int = 128,
) -> tuple[str, list[int]]:
    """One image and question through DeepSeek's example path; returns (answer, generated token ids)."""
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    conversation = [
        {"role": "<|User|>", "content": f"{processor.image_tag}\n{question}", "images": [image]},
        {"role": "<|Assistant|>", "content": ""},
    ]
    inputs = processor(conversations=conversation, images=[image], force_batchify=True).to(device)
    inputs_embeds = model.prepare_inputs_embeds(**inputs)
    outputs = model.language_model.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=inputs.attention_mask,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
    )
    ids = outputs[0].cpu().tolist()
    return tokenizer.decode(ids, skip_special_tokens=True), ids
