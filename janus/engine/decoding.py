"""Decoding requests whose cache rows each have their own length: one forward pass at a time.

A ``Sequence`` is one request in the KV cache: its rows (two for an image: conditional and
unconditional), how many slots they fill, and the tokens chosen so far (the last one is the next
input). ``decode_pass`` runs one forward pass over any mix of them: a plain sequence feeds its last
token and samples one more from its own random stream (``sampling.row_uniforms``); a speculative one
(``speculative.py``) feeds its last token and its drafts, keeps what verification accepts and rolls
the rest of its window back. The scheduler drives it for requests that join and leave at every step,
and the synthesis engine for a speculative batch, so both decode a request the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .common import Prepared
from .runner import Runner, Settings
from .speculative import Drafts, Speculator


@dataclass
class Sequence:
    prepared: Prepared
    rows: list[int]  # cache rows, in the runner's block order: [cond, uncond] for images, [row] for text
    length: int  # filled cache slots of each row
    position: int  # the next input's rotary position
    max_new: int
    eos: int | None  # the token that ends it (None: only max_new does)
    uniforms: list[float]  # plain sampling's stream: one value per output position
    tokens: list[int] = field(default_factory=list)
    passes: int = 0  # forward passes that chose its tokens (prefill included)
    drafts: Drafts | None = None  # speculative sequences only

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.max_new or (bool(self.tokens) and self.tokens[-1] == self.eos)


def block_index(seqs: list[Sequence], rows_per_request: int) -> list[int]:
    """Cache rows of ``seqs`` in block order: every first row, then every second one."""
    return [s.rows[k] for k in range(rows_per_request) for s in seqs]


def choose_first(
    runner: Runner, speculator: Speculator | None, seqs: list[Sequence], hidden: torch.Tensor, settings: Settings
) -> None:
    """Each sequence's first token from its prompt's last hidden states [R * n, D] (block order)."""
    for s in seqs:
        s.passes += 1
    if speculator is not None and seqs[0].drafts is not None:
        probs = runner.probabilities(hidden[:, None], settings)[:, 0]
        first = speculator.first([s.drafts for s in seqs], probs)
    else:
        u = torch.tensor([s.uniforms[len(s.tokens)] for s in seqs], dtype=torch.float64, device=runner.device)
        first = runner.choose(hidden, settings, u).tolist()
    for s, token in zip(seqs, first, strict=True):
        s.tokens.append(token)


def decode_pass(
    runner: Runner,
    speculator: Speculator | None,
    seqs: list[Sequence],
    settings_of: Any,
    n_rows: int,
) -> list[list[int]]:
    """One forward pass over the first ``n_rows`` cache rows for every sequence in ``seqs`` (rows
    below ``n_rows`` that no sequence holds are computed and ignored). ``settings_of(seqs)`` gives the
    sampling settings of a subset. Returns each sequence's new tokens (already appended to it)."""
    decoder, dev = runner.engine.decoder, runner.device
    spec = [s for s in seqs if s.drafts is not None]
    windows = {id(s): speculator.window_for(len(s.tokens), s.max_new) if s.drafts else 1 for s in seqs}
    w = max(windows.values())
    inputs = [[0] * w for _ in range(n_rows)]
    position, length = [0] * n_rows, [0] * n_rows  # built on the host: one copy to the device a pass
    for s in seqs:
        window = [s.tokens[-1]] + (s.drafts.tokens[: windows[id(s)] - 1] if s.drafts else [])
        for row in s.rows:
            inputs[row][: len(window)] = window
            position[row], length[row] = s.position, s.length
    host = torch.tensor([position, length], dtype=torch.long)
    positions, slots = host.to(dev, non_blocking=True)
    embeds = runner.embed(torch.tensor(inputs, device=dev))
    kv_len = max(s.length for s in seqs) + w
    hidden = decoder.decode_window(embeds, positions, slots, kv_len)
    new: dict[int, list[int]] = {}
    plain = [s for s in seqs if s.drafts is None]
    if plain:
        h = hidden[torch.tensor(block_index(plain, runner.rows_per_request), device=dev), 0]
        u = torch.tensor([s.uniforms[len(s.tokens)] for s in plain], dtype=torch.float64, device=dev)
        for s, token in zip(plain, runner.choose(h, settings_of(plain), u).tolist(), strict=True):
            new[id(s)] = [token]
    if spec:
        h = hidden[torch.tensor(block_index(spec, runner.rows_per_request), device=dev)]
        probs = runner.probabilities(h, settings_of(spec))
        codes = speculator.verify(
            [s.drafts for s in spec], probs, [s.tokens for s in spec], [windows[id(s)] for s in spec],
            [s.passes for s in spec],
        )
        new.update({id(s): c for s, c in zip(spec, codes, strict=True)})
    out = []
    for s in seqs:
        tokens = new[id(s)]
        s.length += len(tokens)  # the fed token and the accepted drafts are now in the cache
        s.position += len(tokens)
        s.tokens.extend(tokens)
        s.passes += 1
        out.append(tokens)
    if w > 1:  # forget what each row fed past what it kept
        rows = torch.tensor([r for s in seqs for r in s.rows], device=dev)
        keep = torch.tensor([s.length for s in seqs for _ in s.rows], device=dev)
        decoder.rollback(rows, keep)
    return out
