"""Batched image understanding (captioning / VQA) with a static KV cache and per-row stop.

All rows' image embeddings (576 per image) and prompts are prefilled in one left-padded batch,
then decoded together; each row stops at EOS or its own ``max_new_tokens``. Greedy decoding gives
the same text as DeepSeek's ``language_model.generate(inputs_embeds=..., do_sample=False)``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch

from .common import RequestError, timed
from .decoder import KVCacheDecoder
from .sampling import SamplingParams, row_uniforms, sample

logger = logging.getLogger(__name__)

DEFAULT_QUESTION = "Describe this image in detail."


@dataclass
class CaptionRequest:
    image: Any = None  # PIL image, uint8 HxWx3 array, or a preprocessed float tensor [3, S, S]
    images: list[Any] | None = None  # several images; the question then needs one placeholder each
    question: str = DEFAULT_QUESTION
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy, as DeepSeek's example
    top_p: float | None = None
    seed: int = 0
    # Multi-turn chat instead of ``question``: [{"role": "<|User|>" | "<|Assistant|>", "content": str}],
    # alternating from the user's and ending with it; one image tag per image, wherever it belongs.
    conversation: list[dict[str, str]] | None = None
    system_prompt: str | None = None  # None = the processor's (DeepSeek's) system prompt

    @classmethod
    def coerce(cls, req: Any) -> CaptionRequest:
        if isinstance(req, cls):
            return req
        if isinstance(req, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            return cls(image=req)
        if not isinstance(req, dict):
            raise RequestError(f"a request must be a dict or an image, got {type(req).__name__}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in req.items() if k in known and v is not None})


@dataclass
class CaptionResult:
    status: str  # "ok" or "error"
    text: str | None = None
    num_tokens: int = 0
    prompt_tokens: int = 0  # template + text + image tokens the model read (usage accounting)
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Prepared:
    index: int
    request: CaptionRequest
    processed: Any  # VLChatProcessorOutput


class CaptionEngine:
    """Images (+ question) -> text. Plain Python in and out; one engine per actor."""

    def __init__(self, model, processor, *, max_batch_size: int = 16, max_images_per_request: int = 4):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.language_model.parameters()).dtype
        self.decoder = KVCacheDecoder(model.language_model)
        self.max_batch_size = max_batch_size
        self.max_images_per_request = max_images_per_request
        self.image_tag = processor.image_tag

    @classmethod
    def from_pretrained(
        cls, path: str, *, dtype=None, device=None, storage_options=None, **options
    ) -> CaptionEngine:
        from janus.models import VLChatProcessor
        from janus.models.loading import load_janus_model

        model = load_janus_model(path, dtype=dtype, device=device, storage_options=storage_options)
        processor = VLChatProcessor.from_pretrained(path, storage_options=storage_options)
        return cls(model, processor, **options)

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

    def _prepare(self, index: int, raw: Any) -> _Prepared:
        from janus.models.processing_vlm import VLChatProcessorOutput

        req = CaptionRequest.coerce(raw)
        images = list(req.images or []) + ([req.image] if req.image is not None else [])
        if not images:
            raise RequestError("request has no image")
        if len(images) > self.max_images_per_request:
            raise RequestError(f"{len(images)} images; at most {self.max_images_per_request} per request")
        try:
            req.max_new_tokens = int(req.max_new_tokens)
            req.temperature = float(req.temperature)
            req.seed = int(req.seed)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"bad numeric field: {exc}") from None
        if req.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        if not math.isfinite(req.temperature) or req.temperature < 0:
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {req.temperature}")
        if req.top_p is not None and not (0.0 < float(req.top_p) <= 1.0):
            raise RequestError(f"top_p must be in (0, 1], got {req.top_p}")

        if req.conversation is not None:
            conversation = self._conversation(req.conversation, len(images))
        else:
            if not isinstance(req.question, str) or not req.question.strip():
                raise RequestError("question must be a non-empty string")
            content = req.question
            n_tags = content.count(self.image_tag)
            if n_tags == 0:
                content = f"{self.image_tag}\n" * len(images) + content
            elif n_tags != len(images):
                raise RequestError(
                    f"question has {n_tags} {self.image_tag} tags but {len(images)} images were given"
                )
            conversation = [{"role": "<|User|>", "content": content}]
        if req.system_prompt is not None and not isinstance(req.system_prompt, str):
            raise RequestError("system_prompt must be a string")
        prompt = self.processor.apply_sft_template_for_multi_turn_prompts(
            conversations=[*conversation, {"role": "<|Assistant|>", "content": ""}],
            sft_format=self.processor.sft_format,
            system_prompt=self.processor.system_prompt if req.system_prompt is None else req.system_prompt,
        )
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
        return _Prepared(index, req, processed)

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
    def generate(self, requests: list[Any]) -> list[CaptionResult]:
        """One result per request, in order; a bad request yields an error result, never an exception."""
        results: list[CaptionResult | None] = [None] * len(requests)
        prepared: list[_Prepared] = []
        for i, raw in enumerate(requests):
            try:
                prepared.append(self._prepare(i, raw))
            except RequestError as exc:
                results[i] = CaptionResult(status="error", error=str(exc))
        prepared.sort(key=lambda p: len(p.processed))
        for start in range(0, len(prepared), self.max_batch_size):
            batch = prepared[start : start + self.max_batch_size]
            for p, res in zip(batch, self._run_splitting(batch), strict=True):
                results[p.index] = res
        return results  # type: ignore[return-value]

    def _run_splitting(self, batch: list[_Prepared]) -> list[CaptionResult]:
        try:
            return self._generate_batch(batch)
        except torch.OutOfMemoryError as exc:
            self.decoder.release()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                return [CaptionResult(status="error", error=f"out of memory on {self.device}: {exc}")]
            half = len(batch) // 2
            return self._run_splitting(batch[:half]) + self._run_splitting(batch[half:])

    @torch.inference_mode()
    def _generate_batch(self, batch: list[_Prepared]) -> list[CaptionResult]:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        dev, b = self.device, len(batch)
        reqs = [p.request for p in batch]
        inputs = self.processor.batchify([p.processed for p in batch]).to(dev)
        eos = self.tokenizer.eos_token_id
        limits = torch.tensor([r.max_new_tokens for r in reqs], device=dev)
        max_new = max(r.max_new_tokens for r in reqs)
        length = inputs.input_ids.shape[1]
        params = SamplingParams.build([r.temperature for r in reqs], [None] * b, [r.top_p for r in reqs], dev)
        uniforms = row_uniforms([r.seed for r in reqs], max_new, dev)
        out = torch.full((b, max_new), eos, dtype=torch.long, device=dev)
        finished = torch.zeros(b, dtype=torch.bool, device=dev)

        with timed(timings, "prefill_s", dev):
            embeds = self.model.prepare_inputs_embeds(**inputs)
            self.decoder.setup_caches(b, length + max_new, dtype=self.dtype, device=dev)
            hidden, positions = self.decoder.prefill(embeds.to(self.dtype), inputs.attention_mask)
        embed_tokens = self.model.language_model.get_input_embeddings()
        steps = 0
        with timed(timings, "decode_s", dev):
            for step in range(max_new):
                tok = sample(self.decoder.logits(hidden), params, uniforms[:, step])
                tok = torch.where(finished, torch.full_like(tok, eos), tok)
                out[:, step] = tok
                finished |= (tok == eos) | (limits <= step + 1)
                steps = step + 1
                if step + 1 == max_new or (step % 8 == 7 and bool(finished.all())):
                    break
                slot = torch.tensor([length + step], device=dev)
                hidden = self.decoder.decode_step(
                    embed_tokens(tok)[:, None], positions, slot, kv_len=length + step + 1
                )
                positions = positions + 1
        self.decoder.release()
        timings["total_s"] = time.perf_counter() - t0
        timings["batch_size"] = b
        timings["decode_steps"] = steps
        rows = out[:, :steps].cpu().tolist()
        results = []
        for p, row in zip(batch, rows, strict=True):
            req = p.request
            row = row[: req.max_new_tokens]
            stop = eos in row
            toks = row[: row.index(eos)] if stop else row
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            results.append(
                CaptionResult(
                    status="ok",
                    text=text,
                    num_tokens=len(toks),
                    prompt_tokens=len(p.processed.input_ids),
                    finish_reason="stop" if stop else "length",
                    timings=dict(timings),
                )
            )
        return results
