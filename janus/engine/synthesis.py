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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .common import (
    BatchEngine,
    Prepared,
    RequestError,
    Result,
    check_sampling,
    coerce_request,
    timed,
)
from .prompts import DEFAULT_CFG_WEIGHT, DEFAULT_TEMPERATURE, t2i_prompt_ids, unconditional_ids
from .sampling import SamplingParams, row_uniforms, sample

logger = logging.getLogger(__name__)

PROMPT_BUCKET = 64  # with compile=True, prompt lengths are padded up to a multiple of this


@dataclass
class SynthesisRequest:
    prompt: str
    seed: int = 0
    cfg_weight: float = DEFAULT_CFG_WEIGHT
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int | None = None
    top_p: float | None = None


@dataclass
class SynthesisResult(Result):
    image: np.ndarray | None = None  # uint8 [H, W, 3]
    tokens: np.ndarray | None = None  # int32 [image_tokens] (576 for Janus)
    # what the model reads back from the image (``quality.CuratedSynthesis``); None when not asked
    score: float | None = None  # self-verification: P(yes) / (P(yes) + P(no))
    ratings: dict[str, float] | None = None  # rated questions, expected level 1..5
    embedding: np.ndarray | None = None  # float16 [width], L2-normalised
    candidate: int | None = None  # best-of-k: which candidate won (0 = the request's own seed)
    scores: list[float] | None = None  # best-of-k: every candidate's score (NaN: it failed)


class SynthesisEngine(BatchEngine):
    """Text -> images. Plain Python in, numpy out; thread-unsafe (one engine per actor)."""

    result_type = SynthesisResult

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
        super().__init__(model, processor, max_batch_size=max_batch_size, memory_fraction=memory_fraction)
        self.vq_decode_batch_size = vq_decode_batch_size
        self.vq_channels_last = vq_channels_last
        head = model.gen_head
        # the CFG mix moved in front of the head's last (linear) layer needs that layer to exist
        self.cfg_before_head = cfg_before_head and all(
            hasattr(head, m) for m in ("output_mlp_projector", "vision_activation", "vision_head")
        )
        self.truncate_prompts = truncate_prompts
        vq = model.gen_vision_model.config
        # 576 codes (24 x 24) for every official checkpoint; a shrunk VQ may set its own image size
        self.grid, self.image_tokens = vq.grid, vq.image_tokens
        self.image_size = vq.grid * vq.downsample
        limit = self.decoder.max_position_embeddings - self.image_tokens
        self.max_prompt_tokens = min(max_prompt_tokens or limit, limit)
        self.codebook_dim = vq.codebook_embed_dim
        self.compile = compile
        self._step = (
            torch.compile(self._decode_one, mode="reduce-overhead", fullgraph=True) if compile else None
        )

    # -- prompts -------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of DeepSeek's text-to-image prompt: template, empty system prompt, <begin_of_image>."""
        return t2i_prompt_ids(self.processor, prompt)

    def prepare(self, index: int, raw: Any) -> Prepared:
        if isinstance(raw, str):
            req = SynthesisRequest(prompt=raw)
        else:
            req = coerce_request(SynthesisRequest, raw, what="a dict or a prompt string")
        if not isinstance(req.prompt, str):
            raise RequestError(f"prompt must be a string, got {type(req.prompt).__name__}")
        if not req.prompt.strip():
            raise RequestError("empty prompt")
        check_sampling(req)
        try:
            req.cfg_weight = float(req.cfg_weight)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"bad numeric field: {exc}") from None
        if not math.isfinite(req.cfg_weight) or req.cfg_weight < 1.0:
            raise RequestError(f"cfg_weight must be >= 1 (DeepSeek uses 5), got {req.cfg_weight}")
        ids = self.prompt_ids(req.prompt)
        if len(ids) > self.max_prompt_tokens:
            if not self.truncate_prompts:
                raise RequestError(
                    f"prompt is {len(ids)} tokens; at most {self.max_prompt_tokens} fit "
                    "(enable truncate_prompts to cut it)"
                )
            req.prompt = self._truncate(req.prompt)
            ids = self.prompt_ids(req.prompt)
        return Prepared(index, req, len(ids), ids)

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
    def bytes_per_request(self, prepared: Prepared) -> int:
        """Device memory one request needs: 2 cache rows, fp32 logits work space."""
        kv = self.decoder.cache_bytes(2, prepared.length + self.image_tokens, self.dtype)
        logits = 2 * self.model.config.image_token_size * 4 * 6
        return kv + logits

    def batch_overhead(self, n: int) -> int:
        """The VQ decoder's activations for one decode chunk."""
        n = min(self.vq_decode_batch_size, n)
        ch = self.model.gen_vision_model.config.ch
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return n * self.image_size**2 * ch * elem * 8

    # -- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run_batch(self, batch: list[Prepared]) -> list[SynthesisResult]:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        model, dev, b = self.model, self.device, len(batch)
        pad = self.processor.pad_id
        length = max(p.length for p in batch)
        if self.compile:  # fewer distinct shapes -> fewer recompiles / CUDA graphs; extra left padding is masked
            length = -(-length // PROMPT_BUCKET) * PROMPT_BUCKET
        tokens = torch.full((2 * b, length), pad, dtype=torch.long)
        mask = torch.zeros((2 * b, length), dtype=torch.long)
        for row, p in enumerate(batch):
            tokens[row, length - p.length :] = torch.tensor(p.data)
            tokens[b + row, length - p.length :] = torch.tensor(unconditional_ids(p.data, pad))
            mask[row, length - p.length :] = 1
            mask[b + row, length - p.length :] = 1
        tokens, mask = tokens.to(dev), mask.to(dev)
        reqs = [p.request for p in batch]
        params = SamplingParams.build(
            [r.temperature for r in reqs], [r.top_k for r in reqs], [r.top_p for r in reqs], dev
        )
        cfg = torch.tensor([r.cfg_weight for r in reqs], dtype=torch.float32, device=dev)[:, None]
        n_codes = self.image_tokens
        uniforms = row_uniforms([r.seed for r in reqs], n_codes, dev)
        codes = torch.empty(b, n_codes, dtype=torch.long, device=dev)

        with timed(timings, "prefill_s", dev):
            self.decoder.setup_caches(2 * b, length + n_codes, dtype=self.dtype, device=dev)
            embeds = model.language_model.get_input_embeddings()(tokens)
            hidden, positions = self.decoder.prefill(embeds, mask)
            codes[:, 0] = self._choose(hidden, params, uniforms[:, 0], cfg)
        # every step's cache slot made once on the device: no host-to-device copy inside the loop
        step_slots = torch.arange(length, length + n_codes, device=dev)
        with timed(timings, "decode_s", dev):
            for step in range(1, n_codes):
                slot = step_slots[step - 1 : step]
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
        if not self.compile:  # compiled steps (CUDA graphs) keep the cache's addresses across batches
            self.decoder.release()
        with timed(timings, "vq_decode_s", dev):
            images = self.decode_images(codes)
        timings["total_s"] = time.perf_counter() - t0
        timings["batch_size"] = b
        codes_np = codes.to(torch.int32).cpu().numpy()
        return [
            SynthesisResult(image=images[i], tokens=codes_np[i], timings=dict(timings))
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
        """[N, image_tokens] codes (576 for Janus) -> N uint8 images, postprocessed exactly as DeepSeek's example.

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
            shape = [part.shape[0], self.codebook_dim, self.grid, self.grid]
            quant = vq.quantize.get_codebook_entry(part.to(torch.int32), shape, True).to(dtype)
            if self.vq_channels_last:
                quant = quant.contiguous(memory_format=torch.channels_last)
            pixels = vq.decode(quant)
            arr = pixels.float().cpu().numpy().transpose(0, 2, 3, 1)
            arr = np.clip((arr + 1) / 2 * 255, 0, 255).astype(np.uint8)
            out.extend(arr)
        return out
