"""Batched text-to-image synthesis with classifier-free guidance (Janus-Pro's generation path).

Many different prompts share one batch: conditional rows [0, B) and unconditional rows [B, 2B)
(DeepSeek's construction: prompt tokens replaced by pad except the first and the last) run as one
left-padded batch of 2B over a static KV cache; per step ``logits = u + cfg * (c - u)`` and a
per-row reproducible sample (see ``sampling.py``). 576 codes per image -> VQ decoder -> uint8.
"""

from __future__ import annotations

import logging
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
from .decoding import Sequence, choose_first, decode_pass
from .prompts import DEFAULT_CFG_WEIGHT, DEFAULT_TEMPERATURE, t2i_prompt_ids, unconditional_ids
from .runner import Runner, Settings
from .sampling import row_uniforms
from .speculative import SpeculativeOptions, Speculator

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


class SynthesisRunner(Runner):
    """Images: two rows per request, CFG-mixed image-code distributions, VQ-decoded results."""

    rows_per_request = 2
    result_type = SynthesisResult

    def __init__(self, engine: Any, *, cfg_before_head: bool = True):
        super().__init__(engine)
        head = self.model.gen_head
        # the CFG mix moved in front of the head's last (linear) layer needs that layer to exist
        self.cfg_before_head = cfg_before_head and all(
            hasattr(head, m) for m in ("output_mlp_projector", "vision_activation", "vision_head")
        )

    def max_new(self, prepared: Prepared) -> int:
        return self.engine.image_tokens

    def prompt_embeds(self, batch: list[Prepared], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        n, pad = len(batch), self.processor.pad_id
        length = max(length or 0, max(p.length for p in batch))
        tokens = torch.full((2 * n, length), pad, dtype=torch.long)
        mask = torch.zeros((2 * n, length), dtype=torch.long)
        for row, p in enumerate(batch):
            tokens[row, length - p.length :] = torch.tensor(p.data)
            tokens[n + row, length - p.length :] = torch.tensor(unconditional_ids(p.data, pad))
            mask[row, length - p.length :] = 1
            mask[n + row, length - p.length :] = 1
        embeds = self.model.language_model.get_input_embeddings()(tokens.to(self.device))
        return embeds.to(self.dtype), mask.to(self.device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.prepare_gen_img_embeds(tokens).to(self.dtype)

    def settings(self, requests: list[Any]) -> Settings:
        base = super().settings(requests)
        cfg = torch.tensor([r.cfg_weight for r in requests], dtype=torch.float32, device=self.device)
        return Settings(base.params, cfg[:, None])

    def logits(self, hidden: torch.Tensor, settings: Settings) -> torch.Tensor:
        """CFG-mix the conditional (first half) and unconditional rows.

        ``gen_head`` is Linear -> GELU -> Linear(image_token_embed -> 16384), and the mix
        ``uncond + cfg * (cond - uncond)`` is affine with weights summing to one, so it commutes with
        the last Linear (its bias included): with ``cfg_before_head`` the mix is taken on the GELU
        output and only n rows, not 2n, go through the widest matmul of the step. Exact in real
        arithmetic; in floating point the logits move by rounding only (fp32 ~1e-6 relative).
        """
        head = self.model.gen_head
        n = hidden.shape[0] // 2
        cfg = settings.cfg.view(n, *([1] * (hidden.dim() - 1)))
        if self.cfg_before_head:
            z = head.vision_activation(head.output_mlp_projector(hidden)).float()
            mixed = z[n:] + cfg * (z[:n] - z[n:])
            return head.vision_head(mixed.to(hidden.dtype)).float()
        logits = head(hidden).float()
        return logits[n:] + cfg * (logits[:n] - logits[n:])

    def finish(self, batch: list[Prepared], tokens: list[list[int]], timings: list[dict]) -> list[Result]:
        codes = torch.tensor([t[: self.engine.image_tokens] for t in tokens], device=self.device)
        images = self.engine.decode_images(codes)
        codes_np = codes.to(torch.int32).cpu().numpy()
        return [
            SynthesisResult(image=image, tokens=codes_np[i], timings=timing)
            for i, (image, timing) in enumerate(zip(images, timings, strict=True))
        ]


class SynthesisEngine(BatchEngine):
    """Text -> images. Plain Python in, numpy out; thread-unsafe (one engine per actor)."""

    result_type = SynthesisResult

    def __init__(
        self,
        model,
        processor,
        *,
        max_batch_size: int = 16,
        # one image per VQ decode: a convolution's summation order depends on how many images it runs
        # at once, so decoding together can move a pixel a few steps, and an image regenerated alone
        # from its recipe would not be the same bytes; on a CPU it costs nothing (8 real-size decodes,
        # bf16: 14.4 s batched, 14.2 s one by one)
        vq_decode_batch_size: int = 1,
        vq_channels_last: bool = True,
        cfg_before_head: bool = True,
        compile: bool = False,
        max_prompt_tokens: int | None = None,
        truncate_prompts: bool = False,
        memory_fraction: float = 0.9,
        speculative: SpeculativeOptions | dict | str | None = None,
    ):
        super().__init__(model, processor, max_batch_size=max_batch_size, memory_fraction=memory_fraction)
        self.vq_decode_batch_size = vq_decode_batch_size
        self.vq_channels_last = vq_channels_last
        self.truncate_prompts = truncate_prompts
        vq = model.gen_vision_model.config
        # 576 codes (24 x 24) for every official checkpoint; a shrunk VQ may set its own image size
        self.grid, self.image_tokens = vq.grid, vq.image_tokens
        self.image_size = vq.grid * vq.downsample
        limit = self.decoder.max_position_embeddings - self.image_tokens
        self.max_prompt_tokens = min(max_prompt_tokens or limit, limit)
        self.codebook_dim = vq.codebook_embed_dim
        self.runner = SynthesisRunner(self, cfg_before_head=cfg_before_head)
        self.speculative = SpeculativeOptions.of(speculative)
        self.speculator = (
            Speculator(self.speculative, model.config.image_token_size, self.grid, self.device)
            if self.speculative.method != "off"
            else None
        )
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
        check_sampling(req, "cfg_weight")
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
        """Device memory one request needs: 2 cache rows, fp32 logits work space (a window's worth when
        decoding speculatively)."""
        window = self.speculative.window if self.speculator is not None else 1
        kv = self.decoder.cache_bytes(2, prepared.length + self.image_tokens + window, self.dtype)
        logits = 2 * window * self.model.config.image_token_size * 4 * 6
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
        if self.speculator is not None and self.speculative.applies(len(batch)):
            return self._run_speculative(batch)
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        dev, b, runner = self.device, len(batch), self.runner
        length = max(p.length for p in batch)
        if self.compile:  # fewer distinct shapes -> fewer recompiles / CUDA graphs; extra left padding is masked
            length = -(-length // PROMPT_BUCKET) * PROMPT_BUCKET
        settings = runner.settings([p.request for p in batch])
        n_codes = self.image_tokens
        uniforms = row_uniforms([p.request.seed for p in batch], n_codes, dev)
        codes = torch.empty(b, n_codes, dtype=torch.long, device=dev)

        with timed(timings, "prefill_s", dev):
            embeds, mask = runner.prompt_embeds(batch, length)
            self.decoder.setup_caches(2 * b, length + n_codes, dtype=self.dtype, device=dev)
            hidden, positions = self.decoder.prefill(embeds, mask)
            codes[:, 0] = runner.choose(hidden, settings, uniforms[:, 0])
        # every step's cache slot made once on the device: no host-to-device copy inside the loop
        step_slots = torch.arange(length, length + n_codes, device=dev)
        with timed(timings, "decode_s", dev):
            for step in range(1, n_codes):
                slot = step_slots[step - 1 : step]
                kv_len = None if self._step is not None else length + step
                step_fn = self._step or self._decode_one
                codes[:, step] = step_fn(codes[:, step - 1], positions, slot, uniforms[:, step], settings, kv_len)
                positions = positions + 1
        if not self.compile:  # compiled steps (CUDA graphs) keep the cache's addresses across batches
            self.decoder.release()
        with timed(timings, "vq_decode_s", dev):
            results = runner.finish(batch, codes.tolist(), [timings] * b)
        timings["total_s"] = time.perf_counter() - t0
        timings["batch_size"] = b
        for res in results:
            res.timings = dict(timings)
            res.decode_passes, res.decode_method = n_codes, "off"
        return results

    def _run_speculative(self, batch: list[Prepared]) -> list[SynthesisResult]:
        """The batch decoded speculatively (``speculative.py``): each request advances by its own
        accepted length, rows [0, n) conditional and [n, 2n) unconditional, left-padded prompts."""
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        dev, b, runner, spec = self.device, len(batch), self.runner, self.speculator
        settings = runner.settings([p.request for p in batch])
        with timed(timings, "prefill_s", dev):
            embeds, mask = runner.prompt_embeds(batch)
            length = embeds.shape[1]
            self.decoder.setup_caches(2 * b, length + self.image_tokens + spec.window, dtype=self.dtype, device=dev)
            hidden, positions = self.decoder.prefill(embeds, mask)
            seqs = [
                Sequence(p, [i, b + i], length, int(positions[i]), self.image_tokens, None, [])
                for i, p in enumerate(batch)
            ]
            for seq in seqs:
                seq.drafts = spec.start(seq.prepared.request.seed)
            choose_first(runner, spec, seqs, hidden, settings)
        by_members: dict[tuple[int, ...], Settings] = {}

        def settings_of(subset: list[Sequence]) -> Settings:
            key = tuple(s.rows[0] for s in subset)
            if key not in by_members:
                by_members[key] = runner.settings([s.prepared.request for s in subset])
            return by_members[key]

        with timed(timings, "decode_s", dev):
            while active := [s for s in seqs if not s.done]:
                decode_pass(runner, spec, active, settings_of, 2 * b)
        self.decoder.release()
        with timed(timings, "vq_decode_s", dev):
            results = runner.results(seqs, [timings] * b)
        timings["total_s"] = time.perf_counter() - t0
        timings["batch_size"] = b
        for res in results:
            res.timings = dict(timings)
        return results

    def _decode_one(self, prev, positions, slot, u, settings: Settings, kv_len: int | None = None):
        emb = self.runner.embed(prev)
        emb = torch.cat([emb, emb], dim=0)[:, None]
        hidden = self.decoder.decode_step(emb, positions, slot, kv_len=kv_len)
        return self.runner.choose(hidden, settings, u)

    @torch.inference_mode()
    def decode_images(self, codes: torch.Tensor) -> list[np.ndarray]:
        """[N, image_tokens] codes (576 for Janus) -> N uint8 images, postprocessed exactly as DeepSeek's example.
        Codes for whole rows of the grid only ([N, k * grid]) decode to the top k rows (a picture so far).

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
            shape = [part.shape[0], self.codebook_dim, part.shape[1] // self.grid, self.grid]
            quant = vq.quantize.get_codebook_entry(part.to(torch.int32), shape, True).to(dtype)
            if self.vq_channels_last:
                quant = quant.contiguous(memory_format=torch.channels_last)
            pixels = vq.decode(quant)
            arr = pixels.float().cpu().numpy().transpose(0, 2, 3, 1)
            arr = np.clip((arr + 1) / 2 * 255, 0, 255).astype(np.uint8)
            out.extend(arr)
        return out
