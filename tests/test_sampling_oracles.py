"""The per-row sampler against independent oracles: the analytic softmax, torch.multinomial and
transformers' logits warpers.

Reproducibility tests cannot see a sampler that is reproducibly wrong (a temperature ignored, a CDF
off by one, a top-p that keeps one token too few). These draw many tokens with fixed seeds, so each
test is deterministic, and bound how far their frequencies may be from the distribution they must
follow: the bounds hold with a wide margin for the right sampler and fail by orders of magnitude for
those bugs (measured: chi-square 5-12 against a bound of 40; ignoring the temperature gives ~3000,
a CDF shifted by one token ~100000).
"""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from janus.engine.sampling import SamplingParams, probabilities, row_uniforms, sample

CPU = torch.device("cpu")
V = 12  # a small vocabulary: every token is drawn often enough for a chi-square test
DRAWS = 20_000
#: chi-square with V - 1 = 11 degrees of freedom: P(chi2 > 40) ~ 3e-5 for a right sampler
CHI2_BOUND = 40.0
#: total variation between two samples of 20 000 draws over 12 tokens: ~0.005-0.01 when equal
TV_BOUND = 0.02


def fixed_logits(vocab: int = V, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=gen) * 2


def draw(logits: torch.Tensor, n: int, temperature: float, top_k=None, top_p=None) -> torch.Tensor:
    """``n`` tokens from ``logits``, one per seed 0..n-1 (each row's first uniform), as the engines do."""
    params = SamplingParams.build([temperature] * n, [top_k] * n, [top_p] * n, CPU)
    uniforms = row_uniforms(list(range(n)), 1, CPU)[:, 0]
    return sample(logits.expand(n, -1).contiguous(), params, uniforms)


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of the draws against ``probs`` over the tokens it gives mass."""
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    expected = len(tokens) * probs.double()
    kept = expected > 0
    assert counts[~kept].sum() == 0, "drew a token the distribution gives no mass"
    return float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())


def total_variation(a: torch.Tensor, b: torch.Tensor, vocab: int) -> float:
    pa = torch.bincount(a, minlength=vocab).double() / len(a)
    pb = torch.bincount(b, minlength=vocab).double() / len(b)
    return float(0.5 * (pa - pb).abs().sum())


def warped(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """transformers' distribution for one row: temperature, then top-k, then top-p (their order in
    ``generate``), then softmax."""
    scores = logits[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.softmax(scores, dim=-1)[0]


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_draws_across_seeds_follow_the_tempered_softmax(temperature):
    logits = fixed_logits()
    tokens = draw(logits, DRAWS, temperature)
    analytic = torch.softmax(logits.double() / temperature, dim=-1)
    assert chi_square(tokens, analytic) < CHI2_BOUND
    # the same distribution as torch's own sampler draws from it
    gen = torch.Generator().manual_seed(1)
    theirs = torch.multinomial(analytic.float().expand(DRAWS, -1), 1, generator=gen)[:, 0]
    assert total_variation(tokens, theirs, V) < TV_BOUND


def test_draws_along_one_rows_steps_follow_the_tempered_softmax():
    """One seed's stream over many steps (a row's 576 image tokens) is as good as many seeds."""
    logits, temperature = fixed_logits(seed=1), 0.8
    params = SamplingParams.build([temperature], [None], [None], CPU)
    uniforms = row_uniforms([12345], DRAWS, CPU)[0]
    tokens = torch.stack([sample(logits[None], params, uniforms[i : i + 1])[0] for i in range(DRAWS)])
    assert chi_square(tokens, torch.softmax(logits.double() / temperature, dim=-1)) < CHI2_BOUND


# one row each: (temperature, top_k, top_p), in one batch, so per-row settings must not leak
ROWS = [
    (1.0, None, None),
    (0.7, 5, None),
    (1.3, None, 0.9),
    (0.9, 10, 0.5),
    (1.0, 1, None),
    (1.0, None, 1e-4),  # only the most likely token survives
    (2.0, 500, 0.95),  # top_k above the vocabulary: off
    (0.5, 3, 0.999),
]


def test_kept_set_and_renormalised_probabilities_equal_transformers_warpers():
    vocab = 64
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(len(ROWS), vocab, generator=gen) * 3
    params = SamplingParams.build([r[0] for r in ROWS], [r[1] for r in ROWS], [r[2] for r in ROWS], CPU)
    ours = probabilities(logits, params)
    ours = ours / ours.sum(-1, keepdim=True)
    for i, (temperature, top_k, top_p) in enumerate(ROWS):
        theirs = warped(logits[i], temperature, top_k, top_p)
        assert torch.equal(ours[i] > 0, theirs > 0), f"row {i}: another set of tokens is kept"
        torch.testing.assert_close(ours[i], theirs, rtol=1e-5, atol=1e-7, msg=f"row {i}")
    kept = (ours > 0).sum(-1).tolist()
    assert kept[4] == kept[5] == 1 and kept[1] == 5 and kept[0] == vocab > kept[6]  # rows really differ


def test_rows_without_top_k_do_not_make_a_batch_sort_the_vocabulary(monkeypatch):
    """A batch that mixes rows with and without top-k takes the top-k of the largest k asked for, not
    of the whole vocabulary (16384 image codes for Janus: a full sort at every step)."""
    asked = []
    topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda x, k, *a, **kw: asked.append(k) or topk(x, k, *a, **kw))
    vocab = 64
    logits = torch.randn(len(ROWS), vocab, generator=torch.Generator().manual_seed(4))
    params = SamplingParams.build([r[0] for r in ROWS[:4]], [r[1] for r in ROWS[:4]], [None] * 4, CPU)
    probabilities(logits[:4], params)
    assert asked == [10]
    params = SamplingParams.build([1.0] * 3, [None, 500, 3], [None] * 3, CPU)  # above the vocabulary
    probabilities(logits[:3], params)
    assert asked[-1] == vocab


def test_filtered_draws_follow_transformers_distribution():
    logits, temperature, top_k, top_p = fixed_logits(vocab=40, seed=2), 0.9, 8, 0.85
    tokens = draw(logits, DRAWS, temperature, top_k, top_p)
    theirs = warped(logits, temperature, top_k, top_p)
    assert 2 < int((theirs > 0).sum()) < top_k  # top-p really cut inside the top-k
    # degrees of freedom = kept tokens - 1 <= 6 here: the bound for 11 is looser still
    assert chi_square(tokens, theirs.double()) < CHI2_BOUND
