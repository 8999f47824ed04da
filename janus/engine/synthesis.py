"""Batched text-to-image synthesis with classifier-free guidance (Janus-Pro's generation path).

Many different prompts share one batch: conditional rows [0, B) and unconditional rows [B, 2B)
(DeepSeek's construction: prompt tokens replaced by pad except the first and the last) run as one
left-padded batch of 2B over a static KV cache; per step ``logits = u + cfg * (c - u)`` and a
per-row reproducible sample (see ``sampling.py``). 576 codes per image -> VQ decoder -> uint8.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .common import InsufficientMemoryError, RequestError, available_memory, chunks, timed
from .decoder import KVCacheDecoder
from .sampling import SamplingParams, row_uniforms, sample

logger = logging.getLogger(__name__)

IMAGE_TOKENS = 576  # Janus generates a 24 x 24 grid of VQ codes
GRID = 24
PROMPT_BUCKET = 64  # with compile=True, prompt lengths are padded up to a multiple of this


@dataclass
class SynthesisRequest:
    prompt: str
    seed: int = 0
    cfg_weight: float = 5.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @classmethod
    def coerce(cls, req: Any) -> SynthesisRequest:
        if isinstance(req, cls):
            return req
        if isinstance(req, str):
            return cls(prompt=req)
        if not isinstance(req, dict):
            raise RequestError(f"a request must be a dict or a prompt string, got {type(req).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in req.items() if k in known and v is not None}
        if "prompt" not in kwargs:
            raise RequestError("request has no 'prompt'")
        return cls(**kwargs)


@dataclass
class SynthesisResult:
    status: str  # "ok" or "error"
    image: np.ndarray | None = None  # uint8 [H, W, 3]
    tokens: np.ndarray | None = None  # int32 [576]
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
    request: SynthesisRequest
    ids: list[int]


class SynthesisEngine:
    """Text -> images. Plain Python in, numpy out; thread-unsafe (one engine per actor)."""

    def __init__(
        self,
        model,
        processor,
        *,
        max_batch_size: int = 16,
        vq_decode_batch_size: int = 8,
        vq_channels_last: bool = True,
        cfg_before_head: bool = True,
        compile: bool = False,
        max_prompt_tokens: int | None = None,
        truncate_prompts: bool = False,
        memory_fraction: float = 0.9,
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.language_model.parameters()).dtype
        self.decoder = KVCacheDecoder(model.language_model)
        self.max_batch_size = max_batch_size
        self.vq_decode_batch_size = vq_decode_batch_size
        self.vq_channels_last = vq_channels_last
        head = model.gen_head
        # the CFG mix moved in front of the head's last (linear) layer needs that layer to exist
        self.cfg_before_head = cfg_before_head and all(
            hasattr(head, m) for m in ("output_mlp_projector", "vision_activation", "vision_head")
        )
        self.truncate_prompts = truncate_prompts
        self.memory_fraction = memory_fraction
        limit = self.decoder.max_position_embeddings - IMAGE_TOKENS
        self.max_prompt_tokens = min(max_prompt_tokens or limit, limit)
        vq = model.gen_vision_model.config
        self.image_size = GRID * 2 ** (len(vq.ch_mult) - 1)
        self.codebook_dim = vq.codebook_embed_dim
        self.compile = compile
        self._step = (
            torch.compile(self._decode_one, mode="reduce-overhead", fullgraph=True) if compile else None
        )

    @classmethod
    def from_pretrained(
        cls, path: str, *, dtype=None, device=None, storage_options=None, **options
    ) -> SynthesisEngine:
        from janus.models import VLChatProcessor
        from janus.models.loading import load_janus_model

        model = load_janus_model(path, dtype=dtype, device=device, storage_options=storage_options)
        processor = VLChatProcessor.from_pretrained(path, storage_options=storage_options)
        return cls(model, processor, **options)

    # -- prompts -------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of DeepSeek's text-to-image prompt: template, empty system prompt, <begin_of_image>."""
        conversation = [{"role": "<|User|>", "content": prompt}, {"role": "<|Assistant|>", "content": ""}]
        text = self.processor.apply_sft_template_for_multi_turn_prompts(
            conversations=conversation, sft_format=self.processor.sft_format, system_prompt=""
        )
        return list(self.tokenizer.encode(text + self.processor.image_start_tag))

    def _prepare(self, index: int, raw: Any) -> _Prepared:
        req = SynthesisRequest.coerce(raw)
        if not isinstance(req.prompt, str):
            raise RequestError(f"prompt must be a string, got {type(req.prompt).__name__}")
        if not req.prompt.strip():
            raise RequestError("empty prompt")
        try:
            req.cfg_weight = float(req.cfg_weight)
            req.temperature = float(req.temperature)
            req.seed = int(req.seed)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"bad numeric field: {exc}") from None
        if not math.isfinite(req.cfg_weight) or req.cfg_weight < 1.0:
            raise RequestError(f"cfg_weight must be >= 1 (DeepSeek uses 5), got {req.cfg_weight}")
        if not math.isfinite(req.temperature) or req.temperature < 0:
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {req.temperature}")
        if req.top_k is not None and (int(req.top_k) != req.top_k or req.top_k < 0):
            raise RequestError(f"top_k must be a non-negative integer, got {req.top_k}")
        if req.top_p is not None and not (0.0 < float(req.top_p) <= 1.0):
            raise RequestError(f"top_p must be in (0, 1], got {req.top_p}")
        ids = self.prompt_ids(req.prompt)
        if len(ids) > self.max_prompt_tokens:
            if not self.truncate_prompts:
                raise RequestError(
                    f"prompt is {len(ids)} tokens; at most {self.max_prompt_tokens} fit "
                    "(enable truncate_prompts to cut it)"
                )
            req.prompt = self._truncate(req.prompt)
            ids = self.prompt_ids(req.prompt)
        return _Prepared(index, req, ids)

    def _truncate(self, prompt: str) -> str:
        overhead = len(self.prompt_ids(""))
        content = self.tokenizer.encode(prompt, add_special_tokens=False)
        budget = self.max_prompt_tokens - overhead
        while budget > 0:
            cut = self.tokenizer.decode(content[:budget], skip_special_tokens=True)
            if len(self.prompt_ids(cut)) <= self.max_prompt_tokens:
                return cut
            budget -= 1
        raise RequestError("prompt cannot be truncated to fit the context")

    # -- planning ------------------------------------------------------------------------------
    def bytes_per_request(self, prompt_len: int) -> int:
        """Device memory one request needs: 2 cache rows, fp32 logits work space, VQ activations."""
        kv = self.decoder.cache_bytes(2, prompt_len + IMAGE_TOKENS, self.dtype)
        logits = 2 * self.model.config.image_token_size * 4 * 6
        return kv + logits

    def vq_decode_bytes(self, n: int) -> int:
        ch = self.model.gen_vision_model.config.ch
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return n * self.image_size**2 * ch * elem * 8

    def _plan(self, prepared: list[_Prepared]) -> tuple[list[list[_Prepared]], list[_Prepared]]:
        budget = int(available_memory(self.device) * self.memory_fraction)
        budget -= self.vq_decode_bytes(min(self.vq_decode_batch_size, max(len(prepared), 1)))
        too_big = [p for p in prepared if self.bytes_per_request(len(p.ids)) > budget]
        fits = [p for p in prepared if p not in too_big]
        fits.sort(key=lambda p: len(p.ids))  # similar lengths together: less padding
        batches: list[list[_Prepared]] = []
        for group in chunks(fits, self.max_batch_size):
            per = self.bytes_per_request(max(len(p.ids) for p in group))
            size = max(1, min(len(group), budget // max(per, 1)))
            batches.extend(chunks(group, size))
        return batches, too_big

    # -- generation ----------------------------------------------------------------------------
    def generate(self, requests: list[Any]) -> list[SynthesisResult]:
        """One result per request, in order; a bad request yields an error result, never an exception."""
        results: list[SynthesisResult | None] = [None] * len(requests)
        prepared: list[_Prepared] = []
        for i, raw in enumerate(requests):
            try:
                prepared.append(self._prepare(i, raw))
            except RequestError as exc:
                results[i] = SynthesisResult(status="error", error=str(exc))
        batches, too_big = self._plan(prepared)
        for p in too_big:
            results[p.index] = SynthesisResult(
                status="error",
                error=str(
                    InsufficientMemoryError(
                        f"request needs ~{self.bytes_per_request(len(p.ids)) / 2**20:.0f} MiB, more than the "
                        f"free memory on {self.device}; lower vq_decode_batch_size or use a larger device"
                    )
                ),
            )
        for batch in batches:
            for p, res in zip(batch, self._run_splitting(batch), strict=True):
                results[p.index] = res
        return results  # type: ignore[return-value]

    def _run_splitting(self, batch: list[_Prepared]) -> list[SynthesisResult]:
        """Run a batch; if the device runs out of memory, halve it instead of failing every row."""
        try:
            return self._generate_batch(batch)
        except torch.OutOfMemoryError as exc:
            self.decoder.release()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                return [SynthesisResult(status="error", error=f"out of memory on {self.device}: {exc}")]
            half = len(batch) // 2
            logger.warning(
                "out of memory with batch %d; retrying as %d + %d", len(batch), half, len(batch) - half
            )
            return self._run_splitting(batch[:half]) + self._run_splitting(batch[half:])

    @torch.inference_mode()
    def _generate_batch(self, batch: list[_Prepared]) -> list[SynthesisResult]:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        model, dev, b = self.model, self.device, len(batch)
        pad = self.processor.pad_id
        length = max(len(p.ids) for p in batch)
        if self.compile:  # fewer distinct shapes -> fewer recompiles / CUDA graphs; extra left padding is masked
            length = -(-length // PROMPT_BUCKET) * PROMPT_BUCKET
        tokens = torch.full((2 * b, length), pad, dtype=torch.long)
        mask = torch.zeros((2 * b, length), dtype=torch.long)
        for row, p in enumerate(batch):
            ids = torch.tensor(p.ids)
            uncond = ids.clone()
            uncond[1:-1] = pad
            tokens[row, length - len(ids) :] = ids
            tokens[b + row, length - len(ids) :] = uncond
            mask[row, length - len(ids) :] = 1
            mask[b + row, length - len(ids) :] = 1
        tokens, mask = tokens.to(dev), mask.to(dev)
        reqs = [p.request for p in batch]
        params = SamplingParams.build(
            [r.temperature for r in reqs], [r.top_k for r in reqs], [r.top_p for r in reqs], dev
        )
        cfg = torch.tensor([r.cfg_weight for r in reqs], dtype=torch.float32, device=dev)[:, None]
        uniforms = row_uniforms([r.seed for r in reqs], IMAGE_TOKENS, dev)
        codes = torch.empty(b, IMAGE_TOKENS, dtype=torch.long, device=dev)

        with timed(timings, "prefill_s", dev):
            self.decoder.setup_caches(2 * b, length + IMAGE_TOKENS, dtype=self.dtype, device=dev)
            embeds = model.language_model.get_input_embeddings()(tokens)
            hidden, positions = self.decoder.prefill(embeds, mask)
            codes[:, 0] = self._choose(hidden, params, uniforms[:, 0], cfg)
        with timed(timings, "decode_s", dev):
            for step in range(1, IMAGE_TOKENS):
                slot = torch.tensor([length + step - 1], device=dev)
                if self._step is not None:
                    codes[:, step] = self._step(
                        codes[:, step - 1], positions, slot, uniforms[:, step], cfg, params
                    )
                else:
                    codes[:, step] = self._decode_one(
                        codes[:, step - 1],
                        positions,
                        slot,
                        uniforms[:, step],
                        cfg,
                        params,
                        kv_len=length + step,
                    )
                positions = positions + 1
        self.decoder.release()
        with timed(timings, "vq_decode_s", dev):
            images = self.decode_images(codes)
        timings["total_s"] = time.perf_counter() - t0
        timings["batch_size"] = b
        codes_np = codes.to(torch.int32).cpu().numpy()
        return [
            SynthesisResult(status="ok", image=images[i], tokens=codes_np[i], timings=dict(timings))
            for i in range(b)
        ]

    def _choose(self, hidden: torch.Tensor, params: SamplingParams, u: torch.Tensor, cfg: torch.Tensor):
        """CFG-mix the conditional (first half) and unconditional rows' logits, then sample.

        ``gen_head`` is Linear -> GELU -> Linear(image_token_embed -> 16384), and the CFG mix
        ``uncond + cfg * (cond - uncond)`` is affine with weights summing to one, so it commutes with
        the last Linear (its bias included): with ``cfg_before_head`` the mix is taken on the GELU
        output and only B rows, not 2B, go through the widest matmul of the step. Exact in real
        arithmetic; in floating point the logits move by rounding only (fp32 ~1e-6 relative).
        """
        head = self.model.gen_head
        b = hidden.shape[0] // 2
        if self.cfg_before_head:
            z = head.vision_activation(head.output_mlp_projector(hidden)).float()
            mixed = z[b:] + cfg * (z[:b] - z[b:])
            return sample(head.vision_head(mixed.to(hidden.dtype)).float(), params, u)
        logits = head(hidden).float()
        cond, uncond = logits[:b], logits[b:]
        return sample(uncond + cfg * (cond - uncond), params, u)

    def _decode_one(self, prev, positions, slot, u, cfg, params, kv_len: int | None = None):
        emb = self.model.prepare_gen_img_embeds(prev)
        emb = torch.cat([emb, emb], dim=0)[:, None]
        hidden = self.decoder.decode_step(emb, positions, slot, kv_len=kv_len)
        return self._choose(hidden, params, u, cfg)

    @torch.inference_mode()
    def decode_images(self, codes: torch.Tensor) -> list[np.ndarray]:
        """[N, 576] codes -> N uint8 images, postprocessed exactly as DeepSeek's example.

        With ``vq_channels_last`` (the default) the decoder's activations are NHWC: the same convolutions,
        which oneDNN (CPU) and cuDNN (GPU) run much faster in that layout (measured on CPU for the real
        VQ-16 decoder, one image: fp32 5.8 s -> 5.1 s, bf16 3.6 s -> 1.5 s). Only the summation order
        changes: fp32 pixels agree with the NCHW decode to ~1e-4 (a uint8 value now and then moves
        by one), and the weights are untouched, so other users of the model see no change.
        """
        vq = self.model.gen_vision_model
        dtype = vq.post_quant_conv.weight.dtype
        out: list[np.ndarray] = []
        for part in torch.split(codes, self.vq_decode_batch_size):
            shape = [part.shape[0], self.codebook_dim, GRID, GRID]
            quant = vq.quantize.get_codebook_entry(part.to(torch.int32), shape, True).to(dtype)
            if self.vq_channels_last:
                quant = quant.contiguous(memory_format=torch.channels_last)
            pixels = vq.decode(quant)
            arr = pixels.float().cpu().numpy().transpose(0, 2, 3, 1)
            arr = np.clip((arr + 1) / 2 * 255, 0, 255).astype(np.uint8)
            out.extend(arr)
        return out
