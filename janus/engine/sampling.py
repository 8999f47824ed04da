"""Per-row sampling that does not depend on the batch a row shares.

Each row owns a random stream derived from its seed (one uniform per step, drawn up front), and a
token is chosen by inverse-CDF lookup of that uniform. The same (weights, prompt, seed, settings)
therefore give the same tokens alone or inside any batch, and no step needs a host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def row_uniforms(seeds: list[int], steps: int, device: torch.device) -> torch.Tensor:
    """[rows, steps] float64 uniforms in [0, 1), one independent stream per seed."""
    out = torch.empty(len(seeds), steps, dtype=torch.float64)
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        out[i] = torch.rand(steps, generator=gen, dtype=torch.float64)
    return out.to(device)


@dataclass
class SamplingParams:
    """Per-row settings as tensors on the device; built once per batch."""

    temperature: torch.Tensor  # [B] float32, <= 0 means greedy
    top_k: torch.Tensor  # [B] long, 0 means off
    top_p: torch.Tensor  # [B] float32, 1.0 means off
    #: the largest top-k asked for (0: no row uses one): the only top-k a step computes, so that rows
    #: without one in the same batch do not make it a full sort of the vocabulary
    max_top_k: int
    use_top_p: bool
    any_greedy: bool = False  # Python flags, known when the batch is built: a step skips the work
    all_greedy: bool = False  # that no row needs (argmax when none is greedy, the CDF when all are)

    @property
    def use_top_k(self) -> bool:
        return self.max_top_k > 0

    @classmethod
    def build(cls, temperature, top_k, top_p, device: torch.device) -> SamplingParams:
        k = [int(v or 0) for v in top_k]
        p = [float(1.0 if v is None else v) for v in top_p]
        greedy = [float(t) <= 0 for t in temperature]
        return cls(
            temperature=torch.tensor([float(t) for t in temperature], dtype=torch.float32, device=device),
            top_k=torch.tensor(k, dtype=torch.long, device=device),
            top_p=torch.tensor(p, dtype=torch.float32, device=device),
            max_top_k=max(k, default=0),
            use_top_p=any(v < 1.0 for v in p),
            any_greedy=any(greedy),
            all_greedy=bool(greedy) and all(greedy),
        )


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[B, V] float32: what each sampled row draws from, temperature, top-k and top-p applied.

    Not renormalised after top-p (the inverse CDF scales by the kept mass instead); greedy rows are
    computed at temperature 1 and ignored by ``sample``. Its own function so that tests can compare
    the distribution with an independent implementation (transformers' logits warpers).
    """
    greedy = params.temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(params.temperature), params.temperature)[:, None]
    if params.use_top_k:
        k_max = min(params.max_top_k, logits.shape[-1])
        k = params.top_k.clamp(min=1, max=k_max)
        kth = torch.topk(scaled, k_max, dim=-1).values.gather(1, (k - 1)[:, None])
        kth = kth.masked_fill((params.top_k <= 0)[:, None], float("-inf"))  # top-k off: nothing cut
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.use_top_p:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= params.top_p[:, None], 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor) -> torch.Tensor:
    """Pick one token per row from fp32 ``logits`` [B, V] using ``uniforms`` [B]."""
    logits = logits.float()
    if params.all_greedy:
        return logits.argmax(dim=-1)
    picked = inverse_cdf(probabilities(logits, params), uniforms)
    if not params.any_greedy:
        return picked
    return torch.where(params.temperature <= 0, logits.argmax(dim=-1), picked)


# -- counter-based uniforms: a value per (seed, stream, position), computed where it is needed ----------

_MASK32 = 0xFFFF_FFFF


def _hash32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer mix (Wellons' lowbias32) on uint64 arrays holding values < 2**32."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(_MASK32)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & np.uint64(_MASK32)
    return x ^ (x >> np.uint64(16))


def counter_uniforms(seeds: Sequence[int], stream: int, positions: np.ndarray) -> np.ndarray:
    """float64 uniforms in (0, 1), one per (seed, stream, position): ``seeds`` [n] (any integers, their
    64-bit pattern), ``positions`` [n, ...] non-negative integers -> [n, ...].

    A method that may look at the same position several times (speculative decoding) needs values it
    can address, not a stream it consumes in order: the value for a row's position is the same whatever
    else ran, so a row's result does not depend on its batch. Computed on the host with numpy (a few
    values a pass; no device work or sync)."""
    words = np.array([int(s) % 2**64 for s in seeds], dtype=np.uint64)
    lo, hi = words & np.uint64(_MASK32), words >> np.uint64(32)
    z = _hash32(lo ^ _hash32(hi ^ _hash32(np.full_like(lo, stream))))
    positions = np.asarray(positions, dtype=np.uint64)
    z = _hash32(z.reshape(-1, *([1] * (positions.ndim - 1))) ^ _hash32(positions & np.uint64(_MASK32)))
    return (z.astype(np.float64) + 0.5) / 2.0**32


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` [..., V] (need not sum to one) for ``uniforms`` [...]."""
    cdf = probs.double().cumsum(-1)
    target = (uniforms * cdf[..., -1])[..., None]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
