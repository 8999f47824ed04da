"""Stage 2's data: the drawn training pool and its VQ codes, and batches in exactly the token layout
the engines use at run time (text -> image codes, and image -> text)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from janus.engine.prompts import (
    SCORE_ANSWERS,
    SCORE_QUESTION,
    chat_prompt,
    question_turns,
    t2i_prompt_ids,
    unconditional_ids,
)
from janus.shapes.data import ATTRIBUTES, IMAGE_SIZE, SHAPES, Scene, caption, draw, random_scene

from .examples import (
    ATTRIBUTE_QUESTIONS,
    CAPTION_QUESTIONS,
    READOUT_QUESTIONS,
    attribute_answer,
    partial_caption,
    perturbed,
)
from .vq import image_size, vq_codes, vq_pixels

CFG_DROPOUT = 0.1


class Pool:
    """Drawn training scenes, their pixels and their VQ codes, made once (codes and decoded pixels cached
    in ``work``: encoding and decoding 32k images take many minutes, drawing them again does not). Each
    scene is drawn with its own variations (position, size, shade, rotation), at 96 px for understanding
    and at the VQ's size for the codes (generation's targets), or with ``exact`` the codes come from the
    scenes drawn exactly: one image per prompt, nothing else to model (a lookup table, not a sampler).
    With ``decoded``, also the pixels the VQ makes of those codes: what generated images look like."""

    def __init__(
        self, vq, n: int, seed: int, work: Path | None = None, exact: bool = False, decoded: bool = False
    ):
        rng = np.random.default_rng([seed, 3])
        self.scenes = [random_scene(rng) for _ in range(n)]
        self.seed, self.exact, self.grid, self.size = seed, exact, vq.config.grid, image_size(vq)
        self._telling: torch.Tensor | None = None  # shape_telling(), drawn on first use
        self.images = self._drawn(IMAGE_SIZE, exact=False)
        name = f"{seed}_{n}_{self.size}px{'_exact' if exact else ''}"
        cache = work / f"pool_codes_{name}.pt" if work is not None else None
        if cache is not None and cache.exists():
            self.codes = torch.load(cache, weights_only=True)
        else:
            same = self.size == IMAGE_SIZE and not exact
            self.codes = vq_codes(vq, self.images if same else self._drawn(self.size, exact))
            if cache is not None:
                torch.save(self.codes, cache)
        self.decoded = (
            self._decoded(vq, work / f"pool_pixels_{name}.npy" if work is not None else None)
            if decoded
            else None
        )

    def _decoded(self, vq, cache: Path | None) -> np.ndarray:
        """The VQ's decoding of every code grid, cached beside the codes."""
        if cache is not None and cache.exists():
            return np.load(cache, allow_pickle=False)
        pixels = vq_pixels(vq, self.codes)
        if cache is not None:
            np.save(cache, pixels, allow_pickle=False)
        return pixels

    def shape_telling(self) -> torch.Tensor:
        """bool [N, codes]: each scene's shape-telling code cells, those whose pixels would change were
        the shape another (each other shape drawn with the scene's own variation draws: centre, extent,
        rotation). Drawn once, on first use, from geometry alone (a pixel is the shape's if it is not the
        corner's colour), so no VQ pass: ~1 ms a scene."""
        if self._telling is None:
            grid, cell = self.grid, self.size // self.grid
            masks = []
            for i, scene in enumerate(self.scenes):
                inside = [
                    self._inside(Scene(scene.color, shape, scene.position, scene.background), i)
                    for shape in SHAPES
                ]
                own = inside[SHAPES.index(scene.shape)]
                changed = np.any([own != other for other in inside], axis=0)
                masks.append(changed.reshape(grid, cell, grid, cell).any(axis=(1, 3)).reshape(-1))
            self._telling = torch.from_numpy(np.stack(masks))
        return self._telling

    def _inside(self, scene: Scene, i: int) -> np.ndarray:
        """bool [size, size]: the shape's pixels of scene ``i``'s drawing at the VQ's size (``scene`` may
        swap its shape: the variation draws are the scene's own)."""
        image = draw(scene, self.size, self._variation(i, self.exact))
        return (image != image[0, 0]).any(axis=-1)

    def _drawn(self, size: int, exact: bool) -> np.ndarray:
        """Every scene at ``size`` px: each with its own variations (the same at every size), or exactly."""
        return np.stack([draw(s, size, self._variation(i, exact)) for i, s in enumerate(self.scenes)])

    def _variation(self, i: int, exact: bool) -> np.random.Generator | None:
        """The generator of scene ``i``'s variation draws (the same at every size and for any shape it is
        drawn in), or None for the scene drawn exactly."""
        return None if exact else np.random.default_rng([self.seed, 3, i])


@dataclass
class Batches:
    """Training batches in exactly the token layout the engines use at run time; the fields after
    ``pool`` are the trainer's mixing flags (``python -m training.shapes --help`` says each)."""

    processor: Any
    pool: Pool
    cfg_dropout: float = CFG_DROPOUT
    yes_no: float | None = None
    easy: float = 0.0
    negative_fields: tuple[str, ...] = ATTRIBUTES
    attribute_questions: float = 0.0
    partial_prompts: float = 0.0
    prompt_readout: float = 0.0
    pairs_from: int = 0
    text_first: float = 0.0
    vq_pixels: float = 0.0

    def __post_init__(self) -> None:
        self.tok = self.processor.tokenizer
        self.pad = self.processor.pad_id
        self.eos = self.tok.eos_token_id

    def generation(self, idx: list[int], rng: random.Random):
        prompts = []
        for i in idx:
            ids = t2i_prompt_ids(self.processor, caption(self.pool.scenes[i]))
            prompts.append(unconditional_ids(ids, self.pad) if rng.random() < self.cfg_dropout else ids)
        return *self._left_padded(prompts), self.pool.codes[idx]

    def generation_pairs(self, idx: list[int]):
        """Each scene twice, with its prompt and with the unconditional (pad) prompt, in that order
        (rows i and len(idx) + i): the two branches CFG combines, for ``guided_generation_loss``."""
        cond = [t2i_prompt_ids(self.processor, caption(self.pool.scenes[i])) for i in idx]
        ids, mask = self._left_padded(cond + [unconditional_ids(c, self.pad) for c in cond])
        return ids, mask, self.pool.codes[idx + idx]

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) with left padding, as the engine batches prompts."""
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, length - len(p) :] = torch.tensor(p)
            mask[row, length - len(p) :] = 1
        return ids, mask

    def understanding_ids(
        self, question: str, answer: str, text_first: bool = False
    ) -> tuple[list[int], list[int]]:
        """(prompt ids with the image tokens expanded, answer ids + EOS) for one image and question; the
        image in front of the question, or with ``text_first`` after it, as Serve renders a chat whose
        text part comes before its image part."""
        tag = self.processor.image_tag
        question = f"{question}\n{tag}" if text_first else question
        prompt = chat_prompt(self.processor, question_turns(question, 1, tag))
        ids = torch.tensor(self.tok.encode(prompt), dtype=torch.long)
        ids, _ = self.processor.add_image_token((ids == self.processor.image_id).nonzero().flatten(), ids)
        return ids.tolist(), self.tok.encode(" " + answer, add_special_tokens=False) + [self.eos]

    def understanding(self, idx: list[int], rng: random.Random, step: int | None = None):
        """Captions, and yes/no questions in pairs: the same image asked about its own scene and about
        another (a random scene with probability ``easy``, else one attribute changed), so the only
        thing that tells the two answers apart is the question (without pairing, a small model settles
        at answering 50/50). ``yes_no=None``, or a training ``step`` before ``pairs_from``: phases 1-2's
        layout, single questions, kept bit for bit."""
        rows, images = [], []
        yes_no = None if step is not None and step < self.pairs_from else self.yes_no
        for i in idx:
            scene = self.pool.scenes[i]
            asked = self._single(scene, rng) if yes_no is None else self._asked(scene, rng, yes_no)
            rows += [(q, a, self._text_first(q, rng)) for q, a in asked]
            pixels = (
                self.pool.images
                if not self.vq_pixels or rng.random() >= self.vq_pixels
                else self.pool.decoded
            )
            images += [pixels[i]] * len(asked)
        return self._right_padded(rows, images)

    def _text_first(self, question: str, rng: random.Random) -> bool:
        """Whether a caption or one-attribute row puts its question before the image (``text_first`` of
        them); the score's questions keep the image first, the layout ``quality.Reader`` asks in."""
        asks_about_image = question in CAPTION_QUESTIONS or question in ATTRIBUTE_QUESTIONS.values()
        return bool(self.text_first) and asks_about_image and rng.random() < self.text_first

    def _single(self, scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
        """Phases 1 and 2 of the shipped model: half captions, half single yes/no questions."""
        if rng.random() < 0.5:
            return [(rng.choice(CAPTION_QUESTIONS), caption(scene))]
        asked = scene if rng.random() < 0.5 else perturbed(scene, rng)
        answer = SCORE_ANSWERS[0] if asked == scene else SCORE_ANSWERS[1]
        return [(SCORE_QUESTION.format(prompt=caption(asked)), answer)]

    def _asked(self, scene: Scene, rng: random.Random, yes_no: float) -> list[tuple[str, str]]:
        """One image's rows once the pairs run: a prompt read back, one attribute, a caption, or a pair."""
        if self.prompt_readout and rng.random() < self.prompt_readout:
            asked = scene if rng.random() < 0.5 else perturbed(scene, rng, self.negative_fields)
            field = rng.choice(self.negative_fields)
            return [(READOUT_QUESTIONS[field].format(prompt=caption(asked)), attribute_answer(asked, field))]
        if self.attribute_questions and rng.random() < self.attribute_questions:
            field = rng.choice(ATTRIBUTES)
            return [(ATTRIBUTE_QUESTIONS[field], attribute_answer(scene, field))]
        if rng.random() >= yes_no:
            return [(rng.choice(CAPTION_QUESTIONS), caption(scene))]
        return self._pair(scene, rng)

    def _pair(self, scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
        """The yes/no question about the image's own scene and about another (``easy``: a random scene,
        else one attribute changed); with ``partial_prompts`` both about a shorter prompt."""
        if rng.random() < self.easy:  # another scene: it differs in most attributes, easy to tell
            other = self.pool.scenes[rng.randrange(len(self.pool.scenes))]
            other = other if other != scene else perturbed(scene, rng)
        else:  # exactly one attribute changed: what the score must rank
            other = perturbed(scene, rng, self.negative_fields)
        keep = set(ATTRIBUTES)
        if self.partial_prompts and rng.random() < self.partial_prompts:
            # a shorter prompt: the shape, the attribute that differs, each other one by a coin toss
            differs = {k for k, v in scene.attributes().items() if other.attributes()[k] != v}
            keep = {"shape"} | differs | {k for k in ATTRIBUTES if rng.random() < 0.5}
        return [
            (SCORE_QUESTION.format(prompt=partial_caption(asked, keep)), answer)
            for asked, answer in ((scene, SCORE_ANSWERS[0]), (other, SCORE_ANSWERS[1]))
        ]

    def _right_padded(self, rows: list[tuple[str, str, bool]], images: list[np.ndarray]):
        """(ids, mask, labels, pixels, image positions) of (question, answer, text first) rows, one image each."""
        tokens = [self.understanding_ids(*row) for row in rows]
        length = max(len(p) + len(a) for p, a in tokens)
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (p, a) in enumerate(tokens):  # right padding: training only
            ids[row, : len(p) + len(a)] = torch.tensor(p + a)
            labels[row, len(p) : len(p) + len(a)] = torch.tensor(a)
            mask[row, : len(p) + len(a)] = 1
        pixels = self.processor.image_processor(images, return_tensors="pt").pixel_values
        return ids, mask, labels, pixels, ids == self.processor.image_id
