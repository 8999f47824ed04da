"""Reading images with the model that drew them: a self-verification score, rated questions, embeddings,
and best-of-n synthesis. Janus is a unified model, so no second model (CLIP, an aesthetic head) is
needed to curate what it makes; the images go in as the model's own pixels, not through a PNG.

- score: VQAScore (Lin et al. 2024): ``P(yes) / (P(yes) + P(no))`` of the first answer token to
  ``Does this image show "{prompt}"? Please answer yes or no.``
- ratings: Q-Align (Wu et al. 2023): the expected level over ``excellent, good, fair, poor, bad``
  (5 .. 1) from the first answer token's probabilities, renormalised over the level words.
- embedding: the understanding tower's features, mean-pooled and L2-normalised (for semantic dedup).
Answer words are looked up by string (" yes", "yes", " Yes", "Yes": every spelling's first token), since
token ids differ between tokenizers (Janus-Pro 1B and 7B).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .captioning import CaptionEngine
from .checks import check
from .common import chunks
from .prompts import RATING_LEVELS, SCORE_ANSWERS, SCORE_QUESTION
from .synthesis import SynthesisEngine, SynthesisRequest, SynthesisResult

RATING_VALUES = (5.0, 4.0, 3.0, 2.0, 1.0)  # excellent .. bad
BEST_OF_VERSION = "janus-pipeline/best-of/1"  # names how candidate seeds are derived


class Reader:
    """The understanding path of a loaded model, batched: plain Python / numpy images in, numpy out."""

    def __init__(self, engine: CaptionEngine):
        self.engine = engine
        self.model = engine.model
        self.tokenizer = engine.tokenizer
        self._groups: dict[tuple[str, ...], list[list[int]]] = {}

    def word_groups(self, words: Sequence[str]) -> list[list[int]]:
        """Per answer word, the token ids its answer can start with: the first token of each spelling
        (" yes", "yes", " Yes", "Yes"), less any that another word can start with too. Real Janus
        tokenizers spell these words as one token each; a small tokenizer may need several."""
        key = tuple(words)
        if key not in self._groups:
            firsts = []
            for word in words:
                spellings = (f" {word}", word, f" {word.capitalize()}", word.capitalize())
                ids = {self.tokenizer.encode(s, add_special_tokens=False)[0] for s in spellings}
                firsts.append(ids)
            groups = []
            for i, ids in enumerate(firsts):
                own = ids - set().union(*(other for j, other in enumerate(firsts) if j != i))
                if not own:
                    raise ValueError(
                        f"the tokenizer cannot tell the answer {words[i]!r} from {list(words)} by its first token"
                    )
                groups.append(sorted(own))
            self._groups[key] = groups
        return self._groups[key]

    @torch.inference_mode()
    def features(self, images: Sequence[Any]) -> torch.Tensor:
        """The understanding tower's output for each image (uint8 [H, W, 3] arrays, PIL images or
        preprocessed tensors): [n, tokens, width]."""
        pixels = torch.stack([self.engine.pixel_values(im) for im in images])
        return self.model.vision_model(pixels.to(self.engine.device, self.model.aligner_dtype))

    @staticmethod
    def embeddings(features: torch.Tensor) -> np.ndarray:
        """Mean-pooled, L2-normalised features as float16 [n, width]."""
        return F.normalize(features.float().mean(dim=1), dim=-1).half().cpu().numpy()

    @torch.inference_mode()
    def answer_probabilities(
        self, features: torch.Tensor, questions: Sequence[str], words: Sequence[str]
    ) -> np.ndarray:
        """For image i and ``questions[i]``: the probability that the answer starts with each of ``words``,
        renormalised over them; float32 [n, len(words)]. One prefill per image, no decoding."""
        engine = self.engine
        groups = self.word_groups(words)
        image_embeds = self.model.aligner(features)
        placeholder = torch.zeros(engine.processor.image_processor.default_shape)
        out = np.zeros((len(questions), len(words)), dtype=np.float32)
        embed_tokens = self.model.language_model.get_input_embeddings()
        for rows in chunks(list(range(len(questions))), engine.max_batch_size):
            prepared = [
                engine.prepare(i, {"image": placeholder, "question": questions[i], "max_new_tokens": 1})
                for i in rows
            ]
            inputs = engine.processor.batchify([p.data for p in prepared]).to(engine.device)
            embeds = embed_tokens(inputs.input_ids)
            embeds[inputs.images_seq_mask] = image_embeds[rows].reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            try:
                hidden, _ = engine.prefill(inputs, embeds, extra=0)
                probs = torch.softmax(engine.decoder.logits(hidden).float(), dim=-1)
            finally:
                engine.decoder.release()
            mass = torch.stack([probs[:, g].sum(dim=-1) for g in groups], dim=-1)
            out[rows] = (mass / mass.sum(dim=-1, keepdim=True).clamp_min(1e-30)).cpu().numpy()
        return out

    def scores(self, features: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
        """Self-verification: does each image show its prompt? float32 [n] in [0, 1]."""
        questions = [SCORE_QUESTION.format(prompt=p) for p in prompts]
        return self.answer_probabilities(features, questions, SCORE_ANSWERS)[:, 0]

    def ratings(self, features: torch.Tensor, question: str) -> np.ndarray:
        """Expected level (5 excellent .. 1 bad) of the answer to ``question`` for each image: float32 [n]."""
        probs = self.answer_probabilities(features, [question] * features.shape[0], RATING_LEVELS)
        return (probs @ np.array(RATING_VALUES, dtype=np.float32)).astype(np.float32)


@dataclass
class QualityOptions:
    """What to read from every generated image (``score`` is the default: it is what filtering needs)."""

    score: bool = True
    best_of: int = 1  # candidates per requested image; the best by score is kept
    ratings: dict[str, str] = field(default_factory=dict)  # column name -> question
    embeddings: bool = False

    def __post_init__(self) -> None:
        self.best_of = check("best_of", self.best_of)
        if self.best_of > 1 and not self.score:
            raise ValueError("best_of > 1 picks by score: it needs score on")

    @property
    def reads(self) -> bool:
        return self.score or bool(self.ratings) or self.embeddings


def candidate_seed(seed: int, candidate: int) -> int:
    """Candidate 0 is the request's own seed (best_of 1 changes nothing); the others derive from it."""
    if candidate == 0:
        return seed
    digest = hashlib.sha256(f"{BEST_OF_VERSION}:{seed}:{candidate}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class CuratedSynthesis:
    """Synthesis whose results carry what the model reads back from them: ``score``, ``ratings``,
    ``embedding``; with best-of-k, the k candidates' scores and which one won. Same request format as
    ``SynthesisEngine.generate``, plus an optional per-request ``best_of``."""

    def __init__(self, synth: SynthesisEngine, options: QualityOptions):
        self.synth = synth
        self.options = options
        reader_engine = CaptionEngine(synth.model, synth.processor, max_batch_size=synth.max_batch_size)
        self.reader = Reader(reader_engine) if options.reads else None

    @property
    def device(self) -> torch.device:
        return self.synth.device

    def generate(self, requests: list[Any]) -> list[SynthesisResult]:
        candidates, owners = self.expand(requests)
        return self.complete(candidates, owners, self.synth.generate(candidates))

    def expand(self, requests: list[Any]) -> tuple[list[Any], list[tuple[int, int]]]:
        """Each request -> its best-of-k candidate requests (candidate 0 keeps the request's seed), and
        who owns each candidate: (request index, candidate index). Any engine may then run them."""
        expanded: list[Any] = []
        owners: list[tuple[int, int]] = []
        for i, raw in enumerate(requests):
            req = {"prompt": raw} if isinstance(raw, str) else raw
            k = self.options.best_of
            if isinstance(req, dict) and req.get("best_of") is not None:
                k = check("best_of", req["best_of"])
            seed = req.get("seed", 0) if isinstance(req, dict) else 0
            for j in range(max(k, 1)):
                expanded.append({**req, "seed": candidate_seed(int(seed), j)} if isinstance(req, dict) else req)
                owners.append((i, j))
        return expanded, owners

    def complete(
        self, candidates: list[Any], owners: list[tuple[int, int]], results: list[SynthesisResult]
    ) -> list[SynthesisResult]:
        """Read every successful candidate back (score, ratings, embedding) and keep each request's best."""
        if self.reader is not None:
            self._read(candidates, results)
        return self._pick(owners, results)

    def _read(self, requests: list[Any], results: list[SynthesisResult]) -> None:
        """Score, rate and embed every successful candidate, a model batch at a time."""
        o = self.options
        done = [i for i, r in enumerate(results) if r.ok]
        for rows in chunks(done, self.synth.max_batch_size):
            t0 = time.perf_counter()
            features = self.reader.features([results[i].image for i in rows])
            prompts = [SynthesisRequest(**_fields(requests[i])).prompt for i in rows]
            scores = self.reader.scores(features, prompts) if o.score else None
            ratings = {name: self.reader.ratings(features, q) for name, q in o.ratings.items()}
            embeddings = self.reader.embeddings(features) if o.embeddings else None
            seconds = (time.perf_counter() - t0) / len(rows)
            for n, i in enumerate(rows):
                res = results[i]
                res.score = float(scores[n]) if scores is not None else None
                res.ratings = {name: float(v[n]) for name, v in ratings.items()}
                res.embedding = embeddings[n] if embeddings is not None else None
                res.timings = {**res.timings, "read_s": seconds}

    @staticmethod
    def _pick(owners: list[tuple[int, int]], results: list[SynthesisResult]) -> list[SynthesisResult]:
        """Per request: the candidate with the best score (the first on ties); all k scores recorded."""
        grouped: dict[int, list[tuple[int, SynthesisResult]]] = {}
        for (i, j), res in zip(owners, results, strict=True):
            grouped.setdefault(i, []).append((j, res))
        picked = []
        for i in sorted(grouped):
            candidates = grouped[i]
            ok = [(j, r) for j, r in candidates if r.ok]
            if not ok:
                picked.append(candidates[0][1])
                continue
            j, best = max(ok, key=lambda c: (-math.inf if c[1].score is None else c[1].score, -c[0]))
            best.candidate = j
            best.scores = [r.score if r.ok and r.score is not None else math.nan for _, r in candidates]
            picked.append(best)
        return picked


def _fields(req: Any) -> dict[str, Any]:
    known = SynthesisRequest.__dataclass_fields__
    return (
        {k: v for k, v in req.items() if k in known and v is not None}
        if isinstance(req, dict)
        else {"prompt": req}
    )
