"""What the understanding rows ask and answer, in the grammar's words: the questions, one-attribute
answers, shorter prompts and one-change negatives (never a held-out combination)."""

from __future__ import annotations

import random

from janus.engine.prompts import DEFAULT_QUESTION, SCORE_QUESTION
from janus.shapes.data import ATTRIBUTES, Scene, caption, one_changed, place

CAPTION_QUESTIONS = (DEFAULT_QUESTION, "Describe this image.", "What is in this image?")
#: one attribute asked alone (``--attribute-questions``): its answer is read out at the answer position,
#: the position the yes/no score is read from
ATTRIBUTE_QUESTIONS = {
    "color": "What colour is the shape?",
    "shape": "What shape is it?",
    "position": "Where is the shape?",
    "background": "What colour is the background?",
}
#: the score question's own words with another ending: name what the quoted prompt asks for
#: (``--prompt-readout``); the answer is in the prompt's words, whatever the image shows
READOUT_QUESTIONS = {
    field: SCORE_QUESTION.split("?")[0] + f"? Please name the {what} it asks for."
    for field, what in (
        ("color", "colour"),
        ("shape", "shape"),
        ("position", "place"),
        ("background", "background"),
    )
}


def attribute_answer(scene: Scene, field: str) -> str:
    """The answer to ``ATTRIBUTE_QUESTIONS[field]``, in the caption's words."""
    return place(scene) if field == "position" else getattr(scene, field)


def partial_caption(scene: Scene, keep: set[str]) -> str:
    """The caption with only the attributes in ``keep`` (the shape always: it is the noun), in the
    caption's order and words: e.g. "a triangle on the left" or "a red triangle, blue background"."""
    if keep >= set(ATTRIBUTES):
        return caption(scene)
    text = "a" + (f" {scene.color}" if "color" in keep else "") + f" {scene.shape}"
    text += f" {place(scene)}" if "position" in keep else ""
    return text + (f", {scene.background} background" if "background" in keep else "")


def perturbed(scene: Scene, rng: random.Random, fields: tuple[str, ...] = ATTRIBUTES) -> Scene:
    """The scene with exactly one of ``fields`` changed (never into a held-out combination)."""
    return one_changed(scene, rng, fields=fields, held_out_ok=False)
