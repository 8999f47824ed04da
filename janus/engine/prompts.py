"""How requests become token ids, and the generation defaults: written once, used by every caller.

The engines, the batch jobs, Serve and the shapes model's training all build prompts here, so a
prompt the model was trained on is byte for byte the prompt it is asked at run time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_CFG_WEIGHT = 5.0  # DeepSeek's example
DEFAULT_TEMPERATURE = 1.0  # synthesis samples; captioning is greedy (0) unless asked
DEFAULT_QUESTION = "Describe this image in detail."
DEFAULT_MAX_NEW_TOKENS = 128
#: self-verification (VQAScore): P(yes) / (P(yes) + P(no)) of the first answer token
SCORE_QUESTION = 'Does this image show "{prompt}"? Please answer yes or no.'
SCORE_ANSWERS = ("yes", "no")
#: rated questions (Q-Align): expected level over these words, best first
RATING_LEVELS = ("excellent", "good", "fair", "poor", "bad")

USER, ASSISTANT = "<|User|>", "<|Assistant|>"


def t2i_prompt_ids(processor: Any, prompt: str) -> list[int]:
    """DeepSeek's text-to-image prompt: the template with an empty system prompt, then <begin_of_image>."""
    conversation = [{"role": USER, "content": prompt}, {"role": ASSISTANT, "content": ""}]
    text = processor.apply_sft_template_for_multi_turn_prompts(
        conversations=conversation, sft_format=processor.sft_format, system_prompt=""
    )
    return list(processor.tokenizer.encode(text + processor.image_start_tag))


def unconditional_ids(ids: Sequence[int], pad_id: int) -> list[int]:
    """DeepSeek's unconditional CFG prompt: every token replaced by pad except the first and the last."""
    ids = list(ids)
    return ids[:1] + [pad_id] * max(len(ids) - 2, 0) + ids[-1:] if len(ids) > 1 else ids


def question_turns(question: str, n_images: int, image_tag: str) -> list[dict[str, str]]:
    """One user turn: an image tag per image in front of the question, unless the question places them."""
    content = question if image_tag in question else f"{image_tag}\n" * n_images + question
    return [{"role": USER, "content": content}]


def chat_prompt(
    processor: Any, conversation: Sequence[Mapping[str, str]], system_prompt: str | None = None
) -> str:
    """The chat rendered for the model to answer next (the processor's system prompt by default)."""
    return processor.apply_sft_template_for_multi_turn_prompts(
        conversations=[*conversation, {"role": ASSISTANT, "content": ""}],
        sft_format=processor.sft_format,
        system_prompt=processor.system_prompt if system_prompt is None else system_prompt,
    )
