"""Batched image understanding (captioning / VQA) with a static KV cache and per-row stop.

All rows' image embeddings (576 per image) and prompts are prefilled in one left-padded batch,
then decoded together; each row stops at EOS or its own ``max_new_tokens``. Greedy decoding gives
the same text as DeepSeek's ``language_model.generate(inputs_embeds=..., do_sample=False)``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch

from .common import BatchEngine, Prepared, RequestError, Result, check_sampling, coerce_request, timed
from .prompts import DEFAULT_MAX_NEW_TOKENS, DEFAULT_QUESTION, chat_prompt, question_turns
from .runner import Runner, Settings
from .sampling import row_uniforms, sample

logger = logging.getLogger(__name__)


@dataclass
class CaptionRequest:
    image: Any = None  # PIL image, uint8 HxWx3 array, or a preprocessed float tensor [3, S, S]
    images: list[Any] | None = None  # several images; the question then needs one placeholder each
    question: str = DEFAULT_QUESTION
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0 = greedy, as DeepSeek's example
    top_p: float | None = None
    seed: int = 0
    # Multi-turn chat instead of ``question``: [{"role": "<|User|>" | "<|Assistant|>", "content": str}],
    # alternating from the user's and ending with it; one image tag per image, wherever it belongs.
    conversation: list[dict[str, str]] | None = None
    system_prompt: str | None = None  # None = the processor's (DeepSeek's) system prompt
    # keep going past EOS to ``max_new_tokens`` (vLLM's ``ignore_eos``): load tests with answers of a
    # set length; the text skips the EOS tokens, ``num_tokens`` counts them
    ignore_eos: bool = False


@dataclass
class CaptionResult(Result):
    text: str | None = None
    num_tokens: int = 0
    prompt_tokens: int = 0  # template + text + image tokens the model read (usage accounting)
    finish_reason: str | None = None  # "stop" (EOS) or "length"


class CaptionRunner(Runner):
    """Text: one row per request, stops at EOS (unless ``ignore_eos``) or ``max_new_tokens``."""

    result_type = CaptionResult

    def max_new(self, prepared: Prepared) -> int:
        return prepared.request.max_new_tokens

    def eos(self, prepared: Prepared) -> int | None:
        return None if prepared.request.ignore_eos else self.processor.tokenizer.eos_token_id

    def prompt_embeds(self, batch: list[Prepared], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.processor.batchify([p.data for p in batch]).to(self.device)
        return self.model.prepare_inputs_embeds(**inputs).to(self.dtype), inputs.attention_mask

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.get_input_embeddings()(tokens).to(self.dtype)

    def finish(self, batch: list[Prepared], tokens: list[list[int]], timings: list[dict]) -> list[Result]:
        results: list[Result] = []
        for p, toks, timing in zip(batch, tokens, timings, strict=True):
            toks = list(toks[: self.max_new(p)])
            eos = self.eos(p)
            stop = eos is not None and eos in toks
            if stop:
                toks = toks[: toks.index(eos)]
            results.append(
                CaptionResult(
                    text=self.processor.tokenizer.decode(toks, skip_special_tokens=True),
                    num_tokens=len(toks),
                    prompt_tokens=p.length,
                    finish_reason="stop" if stop else "length",
                    timings=timing,
                )
            )
        return results


class CaptionEngine(BatchEngine):
    """Images (+ question) -> text. Plain Python in and out; one engine per actor."""

    result_type = CaptionResult

    def __init__(
        self,
        model,
        processor,
        *,
        max_batch_size: int = 16,
        max_images_per_request: int = 4,
        compile: bool = False,
        memory_fraction: float = 0.9,
    ):
        super().__init__(model, processor, max_batch_size=max_batch_size, memory_fraction=memory_fraction)
        self.max_images_per_request = max_images_per_request
        self.image_tag = processor.image_tag
        self.runner = CaptionRunner(self)
        self.compile = compile
        # static shapes (the whole cache is attended, masked): one compiled graph per batch shape
        self._step = torch.compile(self._decode_one, mode="reduce-overhead", fullgraph=True) if compile else None

    # -- requests ----------------------------------------------------------------------------
    def pixel_values(self, image: Any) -> torch.Tensor:
        """One image -> [3, S, S] float32; decoding or preprocessing errors become RequestErrors."""
        shape = tuple(self.processor.image_processor.default_shape)
        if isinstance(image, torch.Tensor) and image.is_floating_point():
            if tuple(image.shape) != shape:
                raise RequestError(
                    f"a preprocessed image must have shape {list(shape)}, got {list(image.shape)}"
                )
            return image.float()
        try:
            return self.processor.image_processor.preprocess_one(image)
        except Exception as exc:  # PIL raises many types for undecodable data
            raise RequestError(f"cannot use image: {type(exc).__name__}: {exc}") from None

    def prepare(self, index: int, raw: Any) -> Prepared:
        from janus.models.processing_vlm import VLChatProcessorOutput

        if isinstance(raw, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            req = CaptionRequest(image=raw)
        else:
            req = coerce_request(CaptionRequest, raw, what="a dict or an image")
        images = list(req.images or []) + ([req.image] if req.image is not None else [])
        if not images:
            raise RequestError("request has no image")
        if len(images) > self.max_images_per_request:
            raise RequestError(f"{len(images)} images; at most {self.max_images_per_request} per request")
        check_sampling(req, "max_new_tokens")
        if not isinstance(req.ignore_eos, (bool, np.bool_)):
            raise RequestError(f"ignore_eos must be true or false, got {req.ignore_eos!r}")
        req.ignore_eos = bool(req.ignore_eos)

        if req.conversation is not None:
            conversation = self._conversation(req.conversation, len(images))
        else:
            if not isinstance(req.question, str) or not req.question.strip():
                raise RequestError("question must be a non-empty string")
            n_tags = req.question.count(self.image_tag)
            if n_tags not in (0, len(images)):
                raise RequestError(
                    f"question has {n_tags} {self.image_tag} tags but {len(images)} images were given"
                )
            conversation = question_turns(req.question, len(images), self.image_tag)
        if req.system_prompt is not None and not isinstance(req.system_prompt, str):
            raise RequestError("system_prompt must be a string")
        prompt = chat_prompt(self.processor, conversation, req.system_prompt)
        pixels = torch.stack([self.pixel_values(im) for im in images])
        ids = torch.tensor(self.tokenizer.encode(prompt), dtype=torch.long)
        positions = (ids == self.processor.image_id).nonzero().flatten()
        if len(positions) != len(images):
            raise RequestError("the question must not contain the image tag except as image placeholders")
        ids, n_tokens = self.processor.add_image_token(positions, ids)
        max_len = self.decoder.max_position_embeddings
        if len(ids) + req.max_new_tokens > max_len:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_new_tokens exceeds the context of {max_len}"
            )
        processed = VLChatProcessorOutput(
            sft_format=prompt, input_ids=ids, pixel_values=pixels, num_image_tokens=n_tokens
        )
        return Prepared(index, req, len(ids), processed)

    def _conversation(self, turns: Any, n_images: int) -> list[dict[str, str]]:
        """Check a multi-turn chat: the template only renders strictly alternating turns."""
        roles = ("<|User|>", "<|Assistant|>")
        if not isinstance(turns, list) or len(turns) % 2 == 0:
            raise RequestError("conversation must be a list of turns that ends with the user's")
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("role") != roles[i % 2]:
                raise RequestError(f"conversation turn {i} must have role {roles[i % 2]} (turns alternate)")
            if not isinstance(turn.get("content"), str) or not turn["content"].strip():
                raise RequestError(f"conversation turn {i} must have non-empty text content")
        n_tags = sum(t["content"].count(self.image_tag) for t in turns)
        if n_tags != n_images:
            raise RequestError(f"conversation has {n_tags} {self.image_tag} tags but {n_images} images")
        return [{"role": t["role"], "content": t["content"]} for t in turns]

    # -- generation --------------------------------------------------------------------------
    def bytes_per_request(self, prepared: Prepared) -> int:
        """One cache row for the prompt and the answer, plus the fp32 logits and sampling work space."""
        kv = self.decoder.cache_bytes(1, prepared.length + prepared.request.max_new_tokens, self.dtype)
        return kv + self.model.language_model.config.vocab_size * 4 * 6

    def prefill(self, inputs, embeds: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill a left-padded batch (``inputs`` from ``processor.batchify``, ``embeds`` its embeddings)
        into a fresh cache with room for ``extra`` more tokens; returns (last hidden states, positions).
        Captions and the quality reader (``quality.py``) both start here."""
        b, length = inputs.input_ids.shape
        self.decoder.setup_caches(b, length + extra, dtype=self.dtype, device=self.device)
        return self.decoder.prefill(embeds.to(self.dtype), inputs.attention_mask)

    @torch.inference_mode()
    def run_batch(self, batch: list[Prepared]) -> list[CaptionResult]:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        dev, b, runner = self.device, len(batch), self.runner
        limits = torch.tensor([runner.max_new(p) for p in batch], device=dev)
        # rows that end at their EOS; -1 (no token) for those that only stop at their limit
        eos = torch.tensor([-1 if runner.eos(p) is None else runner.eos(p) for p in batch], device=dev)
        max_new = int(limits.max())
        settings = runner.settings([p.request for p in batch])
        uniforms = row_uniforms([p.request.seed for p in batch], max_new, dev)
        out = torch.zeros((b, max_new), dtype=torch.long, device=dev)
        finished = torch.zeros(b, dtype=torch.bool, device=dev)

        with timed(timings, "prefill_s", dev):
            embeds, mask = runner.prompt_embeds(batch)
            length = embeds.shape[1]
            self.decoder.setup_caches(b, length + max_new, dtype=self.dtype, device=dev)
            hidden, positions = self.decoder.prefill(embeds, mask)
        logits = runner.logits(hidden, settings)
        step_slots = torch.arange(length, length + max_new, device=dev)  # made once, not per step
        steps = 0
        with timed(timings, "decode_s", dev):
            for step in range(max_new):
                tok = sample(logits, settings.params, uniforms[:, step])
                out[:, step] = torch.where(finished, out[:, step], tok)
                finished |= (tok == eos) | (limits <= step + 1)
                steps = step + 1
                if step + 1 == max_new or (step % 8 == 7 and bool(finished.all())):
                    break
                slot = step_slots[step : step + 1]
                if self._step is not None:
                    logits = self._step(tok, positions, slot, settings)
                else:
                    logits = self._decode_one(tok, positions, slot, settings, kv_len=length + step + 1)
                positions = positions + 1
        if not self.compile:  # compiled steps (CUDA graphs) keep the cache's addresses across batches
            self.decoder.release()
        timings["total_s"] = time.perf_counter() - t0
        timings["batch_size"] = b
        timings["decode_steps"] = steps
        return runner.finish(batch, out[:, :steps].tolist(), [dict(timings) for _ in batch])

    def _decode_one(self, tok, positions, slot, settings: Settings, kv_len: int | None = None) -> torch.Tensor:
        """One token per row -> the next logits (``kv_len`` None: the static, compilable shape)."""
        embeds = self.runner.embed(tok)[:, None]
        return self.runner.logits(self.decoder.decode_step(embeds, positions, slot, kv_len=kv_len), settings)
