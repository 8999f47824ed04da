"""Speculative Jacobi decoding of image codes: several codes per forward pass, the same distribution.

Each pass feeds a request its last chosen code plus W - 1 drafted codes for the positions after it
(``KVCacheDecoder.decode_window``), so one pass yields the distribution p_i of every window position,
each conditioned on the drafts before it. Drafts are verified left to right with speculative sampling's
rule: draft d_i, drawn from q_i, is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the
first rejection a replacement is drawn from ``norm(max(0, p_i - q_i))`` and the rest of the window is
dropped (``KVCacheDecoder.rollback``); when every draft is accepted, the code after them is drawn from
the last position's p. Every pass commits at least one code, and each committed code is distributed
exactly as plain sampling's (Leviathan et al. 2023; for images: SJD, Teng et al. 2025). p is what the
plain engine samples: the CFG-mixed logits with temperature, top-k and top-p (``Runner.probabilities``).

Drafts for the positions a pass did not settle come from that pass's distributions there (q = p of the
position, conditioned on the old drafts):
- ``jacobi`` (SJD): a fresh draw from q at every pass;
- ``coupled`` (MC-SJD, So et al. 2025): the position's previous draft, maximally coupled to the new
  distribution (kept with probability ``min(1, q(d) / q'(d))``, else redrawn from what q gained), so
  a draft survives from pass to pass while its distribution barely moves.
Positions no pass has reached yet start from ``draft_init``: ``left``, the code to the left in the same
image row (the one above for the first column; q is then that one code) or ``random``, a uniform code.

Every random number a request uses is addressed by (seed, purpose, position[, pass or code])
(``sampling.counter_uniforms``), and each request advances by its own accepted length, so its image does
not depend on the batch it shares or when it joined; it differs from plain sampling's image for the same
seed, while its distribution does not. The acceptance test's uniforms are independent of how the draft
was drawn, which is what keeps the rule exact with coupled drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .sampling import counter_uniforms, inverse_cdf

METHODS = ("off", "jacobi", "coupled")
DRAFT_INITS = ("left", "random")
# what each uniform is for: distinct streams of the counter-based generator
_ACCEPT, _SAMPLE, _DRAFT, _KEEP = 1, 2, 3, 4


@dataclass(frozen=True)
class SpeculativeOptions:
    """``method``: off | jacobi | coupled; ``window``: codes fed per pass (the last chosen code and
    window - 1 drafts); ``max_rows``: speculative only for batches of at most this many images (None: any;
    above it a batch decodes plainly, which is cheaper once the device is busy); ``draft_init``: how a
    position no pass reached yet is drafted."""

    method: str = "off"
    window: int = 16
    max_rows: int | None = None
    draft_init: str = "left"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative.method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"speculative.window must be an integer >= 2, got {self.window!r}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"speculative.max_rows must be >= 1 or null, got {self.max_rows}")
        if self.draft_init not in DRAFT_INITS:
            raise ValueError(f"speculative.draft_init must be one of {DRAFT_INITS}, got {self.draft_init!r}")

    @classmethod
    def of(cls, value: SpeculativeOptions | dict | str | None) -> SpeculativeOptions:
        if isinstance(value, SpeculativeOptions):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls(method=value)
        return cls(**value)

    def applies(self, images: int) -> bool:
        """Whether a batch of ``images`` requests decodes speculatively."""
        return self.method != "off" and (self.max_rows is None or images <= self.max_rows)


@dataclass
class Drafts:
    """One request's speculative state: the drafts for the positions after its last chosen code and
    the distributions they were drawn from."""

    seed: int
    method: str
    start: int = 0  # the output position of the first draft
    tokens: list[int] = field(default_factory=list)  # [W - 1] drafted codes (host copy, for the inputs)
    q: torch.Tensor | None = None  # [W - 1, V] what each draft was drawn from


class Speculator:
    """Drafts and verifies for one engine's image codes (``grid`` codes per image row)."""

    def __init__(self, options: SpeculativeOptions, vocab: int, grid: int, device: torch.device):
        self.options = options
        self.method = options.method
        self.window = options.window
        self.vocab = vocab
        self.grid = grid
        self.device = device

    def start(self, seed: int) -> Drafts:
        return Drafts(seed=int(seed), method=self.method)

    def window_for(self, done: int, max_new: int) -> int:
        """Codes a request that has ``done`` of ``max_new`` feeds in its next pass: no more than it needs."""
        return min(self.window, max_new - done)

    # -- the first code (from the prefill) -------------------------------------------------------------
    def first(self, states: list[Drafts], probs: torch.Tensor) -> list[int]:
        """Each request's first code from its prompt's distribution ``probs`` [n, V], then drafts for
        the window after it."""
        u = self._uniforms(states, _SAMPLE, np.zeros((len(states), 1), dtype=np.int64))[:, 0]
        first = inverse_cdf(probs, u).tolist()
        for state, code in zip(states, first, strict=True):
            self._redraft(state, [code], None, passes=0)
        return first

    # -- one pass's verification ------------------------------------------------------------------------
    def verify(
        self,
        states: list[Drafts],
        probs: torch.Tensor,
        chosen: list[list[int]],
        windows: list[int],
        passes: list[int],
    ) -> list[list[int]]:
        """Settle each request's window. ``probs`` [n, W, V]: the pass's distributions; ``chosen[i]``:
        the codes request i had before the pass (its window starts at output position
        ``len(chosen[i])``); ``windows[i]``: codes it fed (the rest of W is padding). Returns each
        request's new codes (its accepted drafts, then the replacement or the code after them) and
        redrafts the rest of its window."""
        n, w, _ = probs.shape
        dev, d = self.device, max(w - 1, 1)
        index = np.array([len(c) for c in chosen])[:, None] + np.arange(w)[None, :]  # [n, W] output positions
        drafted = torch.tensor([(s.tokens + [0] * d)[:d] for s in states], device=dev)
        q = torch.stack([self._padded_q(s, d) for s in states])  # [n, d, V]
        fed = torch.tensor(windows, device=dev)
        real = torch.arange(d, device=dev)[None, :] < (fed - 1)[:, None]
        p = probs[:, :d] if w > 1 else torch.zeros_like(q)
        u = self._uniforms(states, _ACCEPT, index[:, :d])
        accepted = (self.accepts(u, p, q, drafted) & real).long().cumprod(-1).sum(-1)  # [n] leading accepted
        rows = torch.arange(n, device=dev)
        p_k = probs[rows, accepted]
        residual = self.residual(p_k, q[rows, accepted.clamp(max=d - 1)])
        # the replacement after a rejection; p itself after a fully accepted window (or if rounding
        # left the residual no mass)
        use_residual = (accepted < fed - 1) & (residual.sum(-1) > 0)
        target = torch.where(use_residual[:, None], residual, p_k)
        u = self._uniforms(states, _SAMPLE, index).gather(1, accepted[:, None])[:, 0]
        new = inverse_cdf(target, u)
        accepted_l, new_l, drafted_l = accepted.tolist(), new.tolist(), drafted.tolist()
        out = []
        for i, state in enumerate(states):
            k = accepted_l[i]
            codes = drafted_l[i][:k] + [new_l[i]]
            out.append(codes)
            # this pass's distributions after the new code (conditioned on the old drafts) seed the drafts
            self._redraft(state, chosen[i] + codes, probs[i, k + 1 : windows[i]], passes[i])
        return out

    @staticmethod
    def accepts(u: torch.Tensor, p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
        """Speculative sampling's test for each draft [n, d]: ``u < p(d) / q(d)`` (q(d) > 0: d was
        drawn from q). ``p``, ``q`` [n, d, V]; ``u`` [n, d] uniforms."""
        p_d = p.gather(-1, drafted[..., None])[..., 0]
        q_d = q.gather(-1, drafted[..., None])[..., 0]
        return u * q_d < p_d

    @staticmethod
    def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """What a rejected draft is replaced from: ``max(0, p - q)`` (normalised by the sampler)."""
        return (p - q).clamp(min=0)

    # -- drafting -------------------------------------------------------------------------------------
    def _redraft(self, state: Drafts, codes: list[int], known: torch.Tensor | None, passes: int) -> None:
        """Drafts for the W - 1 output positions after ``codes`` (every code chosen so far): from
        ``known`` [m, V] (what this pass computed there) for the first m, from ``draft_init`` after."""
        need, start = self.window - 1, len(codes)
        m = 0 if known is None else min(len(known), need)
        qs: list[torch.Tensor] = []
        drafts: list[int] = []
        if m:
            qs.append(known[:m])
            drafts = self._draw(state, known[:m], start, passes).tolist()
        if m < need:
            init_q, init_codes = self._initial(state, codes + drafts, need - m)
            qs.append(init_q)
            drafts += init_codes
        state.start, state.tokens = start, drafts
        state.q = torch.cat(qs) if len(qs) > 1 else qs[0]

    def _draw(self, state: Drafts, q: torch.Tensor, start: int, passes: int) -> torch.Tensor:
        """One draft per row of ``q`` [m, V] for output positions ``start ..``: a fresh draw (jacobi),
        or (coupled) the position's previous draft d, drawn from q', kept with probability
        ``min(1, q(d) / q'(d))`` and otherwise replaced from ``norm(max(0, q - q'))``: the maximal
        coupling of q' and q, so each draft is still exactly a draw from q and changes only as much as
        its distribution did."""
        pos = np.arange(start, start + len(q))
        draw_u = self._uniforms([state], _DRAFT, (pos * 4096 + passes)[None])[0]
        fresh = inverse_cdf(q, draw_u)
        old = torch.as_tensor(pos - state.start, device=self.device)  # where each was in the last window
        have = (old >= 0) & (old < len(state.tokens))
        if self.method != "coupled" or not bool(have.any()):
            return fresh
        at = old.clamp(0, max(len(state.tokens) - 1, 0))
        prev = torch.tensor(state.tokens, device=self.device)[at]  # [m]
        prev_q = state.q[at]  # [m, V]
        ratio = q.gather(-1, prev[:, None])[:, 0] / prev_q.gather(-1, prev[:, None])[:, 0]
        keep = self._uniforms([state], _KEEP, (pos * 4096 + passes)[None])[0] < ratio
        residual = (q - prev_q).clamp(min=0)
        moved = inverse_cdf(torch.where(residual.sum(-1, keepdim=True) > 0, residual, q), draw_u)
        return torch.where(have, torch.where(keep, prev, moved), fresh)

    def _initial(self, state: Drafts, codes: list[int], count: int) -> tuple[torch.Tensor, list[int]]:
        """Drafts for the ``count`` positions after ``codes`` (chosen and drafted so far) that no pass has
        computed: (q [count, V], drafts)."""
        start = len(codes)
        if self.options.draft_init == "random":
            q = torch.full((count, self.vocab), 1.0 / self.vocab, device=self.device)
            return q, self._draw(state, q, start, 0).tolist()
        # left: the code to the left in the image row (above it in the first column); q is that code
        codes = list(codes)
        for position in range(start, start + count):
            codes.append(codes[position - 1 if position % self.grid else position - self.grid])
        drafts = codes[start:]
        return torch.nn.functional.one_hot(torch.tensor(drafts, device=self.device), self.vocab).float(), drafts

    def _padded_q(self, state: Drafts, w: int) -> torch.Tensor:
        q = state.q
        if len(q) < w:  # a short window near the end of the image: never read past ``windows``
            q = torch.cat([q, torch.full((w - len(q), self.vocab), 1.0, device=self.device)])
        return q[:w]

    def _uniforms(self, states: list[Drafts], stream: int, positions: np.ndarray) -> torch.Tensor:
        """Each request's uniforms of ``stream`` at ``positions`` [n, ...], on the device."""
        u = counter_uniforms([s.seed for s in states], stream, positions)
        return torch.from_numpy(u).to(self.device)
