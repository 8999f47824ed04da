"""Turn chats and images into model inputs, with DeepSeek's ``VLChatProcessor`` API.

Code written against DeepSeek's package (``vl_chat_processor(conversations=..., images=...)``,
``.apply_sft_template_for_multi_turn_prompts``, ``.image_start_tag``, ``.pad_id`` ...) runs unchanged.
Each ``<image_placeholder>`` in the prompt becomes ``<begin_of_image>``, ``num_image_tokens``
placeholders (later overwritten by the aligned SigLIP features) and ``<end_of_image>``; batches are
left-padded so that generation appends on the right.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from janus.models.conversation import render_sft_prompt
from janus.models.hub import resolve_model_path
from janus.models.image_processing_vlm import ImageInput, VLMImageProcessor

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
_CONFIG_NAME = "processor_config.json"
#: processor_config.json entries that are constructor arguments (the file also names processor_class).
_CONFIG_KEYS = frozenset(
    {"image_tag", "num_image_tokens", "add_special_token", "sft_format", "mask_prompt", "ignore_id"}
)


@dataclass
class VLChatProcessorOutput:
    """One prompt, tokenized with its image tokens expanded, and its preprocessed images."""

    sft_format: str
    input_ids: torch.Tensor  # [T] int64
    pixel_values: torch.Tensor  # [n_images, 3, H, W] float32
    num_image_tokens: torch.Tensor  # [n_images] int32

    def __len__(self) -> int:
        return len(self.input_ids)


class BatchedVLChatProcessorOutput(dict):
    """A left-padded batch: a dict (for ``**inputs``) whose entries are also attributes.

    Keys: ``input_ids`` [B, T], ``attention_mask`` [B, T], ``pixel_values`` [B, N, 3, H, W],
    ``images_seq_mask`` [B, T] (where image features go), ``images_emb_mask`` [B, N, num_image_tokens]
    (which image features are real), ``sft_format`` (list of prompt strings).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def to(
        self, device: torch.device | str, dtype: torch.dtype | None = None
    ) -> BatchedVLChatProcessorOutput:
        """Move every tensor to ``device`` in place (and return self, as DeepSeek's does).

        ``dtype`` casts only the floating ``pixel_values``; ids and masks keep their integer/bool types.
        """
        for key, value in list(self.items()):
            if not isinstance(value, torch.Tensor):
                continue
            cast = dtype if key == "pixel_values" and value.is_floating_point() else None
            self[key] = value.to(device=device, dtype=cast)
        return self


class VLChatProcessor:
    """Tokenizer + image processor + chat template, configured from ``processor_config.json``."""

    def __init__(
        self,
        image_processor: VLMImageProcessor,
        tokenizer: PreTrainedTokenizerFast,
        image_tag: str = "<image_placeholder>",
        image_start_tag: str = "<begin_of_image>",
        image_end_tag: str = "<end_of_image>",
        pad_tag: str = "<｜▁pad▁｜>",
        num_image_tokens: int = 576,
        add_special_token: bool = False,
        sft_format: str = "deepseek",
        mask_prompt: bool = True,
        ignore_id: int = -100,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_tag = image_tag
        self.image_start_tag = image_start_tag
        self.image_end_tag = image_end_tag
        self.pad_tag = pad_tag
        self.num_image_tokens = int(num_image_tokens)
        self.add_special_token = bool(add_special_token)
        self.sft_format = sft_format
        self.mask_prompt = mask_prompt
        self.ignore_id = ignore_id
        self.system_prompt = system_prompt

        # Ids differ between the 1B and 7B tokenizers, so they are always looked up by string.
        vocab = tokenizer.get_vocab()
        missing = [t for t in (image_tag, image_start_tag, image_end_tag, pad_tag) if t not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer has no token(s) {missing}: it is not a Janus tokenizer, or its "
                "tokenizer.json lost the added tokens"
            )
        self.image_id: int = vocab[image_tag]
        self.image_start_id: int = vocab[image_start_tag]
        self.image_end_id: int = vocab[image_end_tag]
        self.pad_id: int = vocab[pad_tag]
        if tokenizer.pad_token is None:
            tokenizer.pad_token = pad_tag

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike | None = None,
        storage_options: Mapping[str, Any] | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> VLChatProcessor:
        """Load from a checkpoint directory, hub id or fsspec URL; ``kwargs`` override processor_config.json."""
        path = resolve_model_path(
            name_or_path,
            cache_dir=cache_dir,
            storage_options=storage_options,
            revision=revision,
            local_files_only=local_files_only,
        )
        config: dict[str, Any] = {}
        if (path / _CONFIG_NAME).is_file():
            config = json.loads((path / _CONFIG_NAME).read_text(encoding="utf-8"))
        init = {k: v for k, v in config.items() if k in _CONFIG_KEYS}
        init.update(kwargs)
        return cls(VLMImageProcessor.from_pretrained(path), load_tokenizer(path), **init)

    @property
    def image_token(self) -> str:
        return self.image_tag

    @property
    def image_start_token(self) -> str:
        return self.image_start_tag

    @property
    def image_end_token(self) -> str:
        return self.image_end_tag

    def apply_sft_template_for_multi_turn_prompts(
        self,
        conversations: Sequence[Mapping[str, Any]],
        sft_format: str = "deepseek",
        system_prompt: str | None = "",
    ) -> str:
        """Render a chat with the named template, e.g. ``<|User|>: hi\\n\\n<|Assistant|>:``."""
        return render_sft_prompt(conversations, sft_format=sft_format, system_prompt=system_prompt)

    def add_image_token(
        self, image_indices: Sequence[int] | torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expand the image tag at each index into begin + ``num_image_tokens`` tags + end.

        With ``add_special_token`` the original tag is kept in front of the expansion, as in DeepSeek's.
        Returns the new ids and an int32 tensor with ``num_image_tokens`` per image.
        """
        indices = [int(i) for i in torch.as_tensor(image_indices).flatten().tolist()]
        expansion = torch.tensor(
            [self.image_start_id] + [self.image_id] * self.num_image_tokens + [self.image_end_id],
            dtype=torch.long,
        )
        pieces, start = [], 0
        for index in indices:
            end = index + 1 if self.add_special_token else index
            pieces += [input_ids[start:end], expansion]
            start = index + 1
        pieces.append(input_ids[start:])
        return torch.cat(pieces), torch.full((len(indices),), self.num_image_tokens, dtype=torch.int32)

    def process_one(
        self,
        prompt: str | None = None,
        conversations: Sequence[Mapping[str, Any]] | None = None,
        images: Sequence[ImageInput] | None = None,
    ) -> VLChatProcessorOutput:
        """One prompt (or chat, formatted with ``self.system_prompt``) and its images, unbatched."""
        if (prompt is None) == (conversations is None):
            raise ValueError("pass exactly one of `prompt` and `conversations`")
        if prompt is None:
            prompt = self.apply_sft_template_for_multi_turn_prompts(
                conversations, sft_format=self.sft_format, system_prompt=self.system_prompt
            )
        images = list(images) if images is not None else []

        input_ids = torch.tensor(self.tokenizer.encode(prompt), dtype=torch.long)
        image_indices = (input_ids == self.image_id).nonzero().flatten()
        if len(image_indices) != len(images):
            raise ValueError(
                f"the prompt has {len(image_indices)} {self.image_tag} tag(s) but {len(images)} image(s) were "
                f"given: put one {self.image_tag} in the text for each image, in order"
            )
        input_ids, num_image_tokens = self.add_image_token(image_indices, input_ids)
        pixel_values = self.image_processor(images, return_tensors="pt").pixel_values
        return VLChatProcessorOutput(
            sft_format=prompt,
            input_ids=input_ids,
            pixel_values=pixel_values,
            num_image_tokens=num_image_tokens,
        )

    def batchify(self, prepare_list: Sequence[VLChatProcessorOutput]) -> BatchedVLChatProcessorOutput:
        """Left-pad a list of single outputs into one batch (image slots padded to the max count, min 1)."""
        if not prepare_list:
            raise ValueError("batchify needs at least one processed prompt")
        batch_size = len(prepare_list)
        seq_len = max(len(p) for p in prepare_list)
        max_images = max(1, max(len(p.num_image_tokens) for p in prepare_list))

        input_ids = torch.full((batch_size, seq_len), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, seq_len), dtype=torch.long)
        pixel_values = torch.zeros((batch_size, max_images, *self.image_processor.default_shape))
        images_seq_mask = torch.zeros((batch_size, seq_len), dtype=torch.bool)
        images_emb_mask = torch.zeros((batch_size, max_images, self.num_image_tokens), dtype=torch.bool)

        for i, prepare in enumerate(prepare_list):
            n = len(prepare)
            input_ids[i, seq_len - n :] = prepare.input_ids
            attention_mask[i, seq_len - n :] = 1
            images_seq_mask[i, seq_len - n :] = prepare.input_ids == self.image_id
            n_images = len(prepare.num_image_tokens)
            if n_images:
                pixel_values[i, :n_images] = prepare.pixel_values
                for j, n_tokens in enumerate(prepare.num_image_tokens.tolist()):
                    images_emb_mask[i, j, :n_tokens] = True

        return BatchedVLChatProcessorOutput(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            images_seq_mask=images_seq_mask,
            images_emb_mask=images_emb_mask,
            sft_format=[p.sft_format for p in prepare_list],
        )

    def __call__(
        self,
        *,
        prompt: str | None = None,
        conversations: Sequence[Mapping[str, Any]] | None = None,
        images: Sequence[ImageInput] | None = None,
        force_batchify: bool = True,
    ) -> BatchedVLChatProcessorOutput | VLChatProcessorOutput:
        prepare = self.process_one(prompt=prompt, conversations=conversations, images=images)
        return self.batchify([prepare]) if force_batchify else prepare


def load_tokenizer(directory: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a Janus tokenizer exactly as DeepSeek's transformers-4 ``LlamaTokenizerFast`` did.

    Janus checkpoints name ``LlamaTokenizerFast`` but ship a byte-level BPE ``tokenizer.json``. In
    transformers 5 ``LlamaTokenizer`` rebuilds a SentencePiece-style (Metaspace) pipeline from the
    vocabulary and so tokenizes such a file wrongly (spaces vanish); ``AutoTokenizer`` only avoids
    that through a heuristic that also consults config.json. The generic ``PreTrainedTokenizerFast``
    (``TokenizersBackend``) uses tokenizer.json as written, which is right for any tokenizer.json.
    One more difference: with a tokenizer.json present, transformers 5 ignores ``add_bos_token`` from
    tokenizer_config.json and trusts the file's post-processor, whereas transformers 4's
    ``LlamaTokenizerFast`` rebuilt the post-processor from ``add_bos_token``/``add_eos_token``. Passing
    those flags explicitly restores the old behaviour (a BOS on every ``encode``), whatever the
    post-processor in tokenizer.json says.
    """
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory} has no tokenizer.json; Janus checkpoints ship one")
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    flags = {key: bool(config[key]) for key in ("add_bos_token", "add_eos_token") if key in config}
    return PreTrainedTokenizerFast.from_pretrained(str(directory), **flags)
