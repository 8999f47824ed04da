"""A tiny, offline stand-in for DeepSeek's Janus tokenizer and processor configs.

Tests cannot reach the model hub, yet they must exercise the same loading path as the official
checkpoints. The official tokenizer is a byte-level BPE saved as ``tokenizer.json`` with DeepSeek's
special tokens added after the BPE vocabulary and ``tokenizer_config.json`` naming
``LlamaTokenizerFast`` with ``add_bos_token: true``. :func:`write_tiny_tokenizer` writes files of
that same shape, trained in-process on a few English sentences, so ids differ from the official ones
(the processor looks them up by string, as it must for 1B vs 7B anyway).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
#: Added after the BPE vocabulary, in this order (DeepSeek's tokenizer also appends them).
SPECIAL_TOKENS = (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    "<image_placeholder>",
    "<begin_of_image>",
    "<end_of_image>",
    "<|User|>",
    "<|Assistant|>",
)

_BPE_VOCAB_SIZE = 640
_CORPUS = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.",
    "Describe this image in detail. What is shown in the picture? Convert the formula into latex code.",
    "A stunning princess from kabul in red, white traditional clothing, blue eyes, brown hair.",
    "The quick brown fox jumps over the lazy dog while a cat sleeps on the warm windowsill.",
    "A photo of a red apple on a wooden table, soft light, high detail, 4k, trending on artstation.",
    "There are two people walking along the beach at sunset, with waves rolling onto the sand.",
    "Question: how many birds are sitting on the wire? Answer: there are three birds on the wire.",
    "The chart shows the revenue of the company over the last ten years, rising from 12 to 98 million.",
)


def _train_bpe(corpus: tuple[str, ...] = _CORPUS, vocab_size: int = _BPE_VOCAB_SIZE) -> Tokenizer:
    # DeepSeek's pre-tokenizer splits digits one by one before the byte-level step; do the same so
    # number handling takes the same shape.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte -> any UTF-8 text encodes
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus) * 4, trainer=trainer)
    return tokenizer


def build_tiny_tokenizer(
    corpus: tuple[str, ...] = _CORPUS, vocab_size: int = _BPE_VOCAB_SIZE
) -> Tokenizer:
    """Return the raw ``tokenizers.Tokenizer``: byte-level BPE + DeepSeek's special tokens + BOS.

    ``corpus`` is what the BPE merges are learnt from (a model trained on a narrow language, like the
    shapes model, passes its own so that each of its words is one token)."""
    tokenizer = _train_bpe(corpus, vocab_size)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in SPECIAL_TOKENS]
    )
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def write_tiny_tokenizer(
    directory: str | os.PathLike, corpus: tuple[str, ...] = _CORPUS, vocab_size: int = _BPE_VOCAB_SIZE
) -> int:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``directory``.

    Returns the number of token ids (BPE vocabulary plus special tokens): a tiny language model for
    these files needs at least that many embedding rows.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(corpus, vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))

    def added(content: str) -> dict:
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    extra = [t for t in SPECIAL_TOKENS if t not in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)]
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added(BOS_TOKEN),
        "eos_token": added(EOS_TOKEN),
        "pad_token": added(PAD_TOKEN),
        "unk_token": None,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizerFast",
        "use_default_system_prompt": False,
    }
    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": extra,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)
    return tokenizer.get_vocab_size(with_added_tokens=True)


def write_processor_configs(
    directory: str | os.PathLike, image_size: int = 384, num_image_tokens: int = 576
) -> None:
    """Write preprocessor_config.json and processor_config.json as the official checkpoints ship them."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(
        out / "preprocessor_config.json",
        {
            "background_color": [127, 127, 127],
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "VLMImageProcessor",
            "image_size": image_size,
            "image_std": [0.5, 0.5, 0.5],
            "min_size": 14,
            "processor_class": "VLChatProcessor",
            "rescale_factor": 0.00392156862745098,
        },
    )
    _write_json(
        out / "processor_config.json",
        {
            "add_special_token": False,
            "ignore_id": -100,
            "image_tag": "<image_placeholder>",
            "mask_prompt": True,
            "num_image_tokens": num_image_tokens,
            "processor_class": "VLChatProcessor",
            "sft_format": "deepseek",
        },
    )


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
