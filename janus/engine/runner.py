"""One runner per task: the model side of generating, shared by every way of driving it.

A runner knows its task's rows and tokens: how a batch of prepared requests becomes prefill
embeddings (a synthesis request is two rows, conditional and DeepSeek's unconditional; a caption is
one), how chosen tokens become the next step's embeddings, the distribution each request samples from
(the CFG mix ``u + cfg * (c - u)`` for images, the LM head for text), when a request is done, and how
its tokens become a ``Result``. The static engines (one batch, one length), the scheduler (rows that
join and leave at every step) and the decoding methods (``speculative.py``) all drive the same
runner, so each of these exists once.

Row layout: a runner's tensors over rows are in block order, every request's first row, then (for
synthesis) every request's unconditional row: hidden states [R * n, ..., D] for n requests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .common import Prepared, Result
from .sampling import SamplingParams, probabilities, sample


@dataclass
class Settings:
    """A batch's per-request sampling settings on the device (and CFG weights [n, 1] for images)."""

    params: SamplingParams
    cfg: torch.Tensor | None = None


class Runner:
    """The task-specific half of generation; the engine it serves holds the model and the decoder."""

    rows_per_request = 1
    result_type: type[Result] = Result

    def __init__(self, engine: Any):
        self.engine = engine
        self.model = engine.model
        self.processor = engine.processor
        self.device = engine.device
        self.dtype = engine.dtype

    # -- what each task defines -------------------------------------------------------------------
    def max_new(self, prepared: Prepared) -> int:
        raise NotImplementedError

    def eos(self, prepared: Prepared) -> int | None:
        """The token that ends this request (None: only ``max_new`` does)."""
        return None

    def prompt_embeds(self, batch: list[Prepared], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prefill input of every row of ``batch`` (to ``length`` tokens if given): embeds
        [R * n, T, D] in the engine's dtype and the attention mask [R * n, T]."""
        raise NotImplementedError

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input embedding of chosen tokens (any shape) -> [..., D]."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor, settings: Settings) -> torch.Tensor:
        """fp32 logits each request samples from, from its rows' hidden states [R * n, ..., D] -> [n, ..., V]."""
        return self.model.language_model.lm_head(hidden).float()

    def settings(self, requests: list[Any]) -> Settings:
        return Settings(
            SamplingParams.build(
                [r.temperature for r in requests],
                [getattr(r, "top_k", None) for r in requests],
                [r.top_p for r in requests],
                self.device,
            )
        )

    def finish(self, batch: list[Prepared], tokens: list[list[int]], timings: list[dict]) -> list[Result]:
        """Each finished request's tokens (at most ``max_new``; generation may run past its stop) -> its
        ``Result``."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    def results(self, seqs: list[Any], timings: list[dict]) -> list[Result]:
        """Finished sequences (``decoding.Sequence``) -> their results, with the forward passes each took
        and how it was decoded."""
        results = self.finish([s.prepared for s in seqs], [s.tokens for s in seqs], timings)
        for seq, res in zip(seqs, results, strict=True):
            res.decode_passes = seq.passes
            res.decode_method = seq.drafts.method if seq.drafts is not None else "off"
        return results

    def choose(self, hidden: torch.Tensor, settings: Settings, uniforms: torch.Tensor) -> torch.Tensor:
        """The next token of each request from its rows' last hidden states [R * n, D] and one uniform
        per request [n] (``sampling.sample``)."""
        return sample(self.logits(hidden, settings), settings.params, uniforms)

    def probabilities(self, hidden: torch.Tensor, settings: Settings) -> torch.Tensor:
        """What each request samples from at every position of a window: [R * n, W, D] -> [n, W, V]
        fp32 (temperature, top-k, top-p applied and renormalised; a greedy row is one-hot)."""
        logits = self.logits(hidden, settings)
        n, w, v = logits.shape
        flat = logits.reshape(n * w, v)
        expand = lambda t: t.repeat_interleave(w, dim=0)  # noqa: E731  (per request -> per position)
        p = settings.params
        per_position = replace(p, temperature=expand(p.temperature), top_k=expand(p.top_k), top_p=expand(p.top_p))
        probs = probabilities(flat, per_position)
        probs = probs / probs.sum(-1, keepdim=True)
        if p.any_greedy:
            greedy = torch.nn.functional.one_hot(flat.argmax(-1), v).to(probs.dtype)
            probs = torch.where((per_position.temperature <= 0)[:, None], greedy, probs)
        return probs.reshape(n, w, v)
