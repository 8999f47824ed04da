"""Chat templates that turn a list of messages into the prompt string Janus was trained on.

Only DeepSeek's ``"deepseek"`` format exists for Janus-Pro; the prompt must match it byte for byte,
or the model sees text it never saw in training. The registry keeps the name-based lookup that
DeepSeek's ``VLChatProcessor`` uses (``sft_format="deepseek"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

USER_ROLE = "<|User|>"
ASSISTANT_ROLE = "<|Assistant|>"


@dataclass
class Conversation:
    """One chat in progress: a system message plus alternating (role, content) turns.

    ``sep`` ends even-numbered turns (the user's) and ``sep2`` odd-numbered ones (the assistant's),
    as in DeepSeek's template; a turn with empty content is an open slot for the model to fill.
    """

    name: str
    system_message: str = ""
    roles: tuple[str, str] = (USER_ROLE, ASSISTANT_ROLE)
    sep: str = "\n\n"
    sep2: str = "<｜end▁of▁sentence｜>"
    stop_str: tuple[str, ...] = ()
    messages: list[tuple[str, str]] = field(default_factory=list)

    def set_system_message(self, system_message: str | None) -> None:
        self.system_message = system_message or ""

    def append_message(self, role: str, content: str | None) -> None:
        self.messages.append((role, content or ""))

    def get_prompt(self) -> str:
        """Render the prompt; the caller strips it, as DeepSeek's processor does."""
        seps = (self.sep, self.sep2)
        parts = [self.system_message + seps[0]] if self.system_message else []
        for i, (role, content) in enumerate(self.messages):
            parts.append(f"{role}: {content}{seps[i % 2]}" if content else f"{role}:")
        return "".join(parts)

    def copy(self) -> Conversation:
        return dataclasses.replace(self, messages=list(self.messages))


_TEMPLATES: dict[str, Conversation] = {}


def register_conv_template(template: Conversation, override: bool = False) -> None:
    if template.name in _TEMPLATES and not override:
        raise ValueError(f"conversation template {template.name!r} is already registered")
    _TEMPLATES[template.name] = template


def get_conv_template(name: str) -> Conversation:
    """Return a fresh copy of the named template, so callers can append turns freely."""
    try:
        return _TEMPLATES[name].copy()
    except KeyError:
        raise ValueError(
            f"unknown chat template {name!r}; registered templates: {sorted(_TEMPLATES)}"
        ) from None


def render_sft_prompt(
    conversations: Sequence[Mapping[str, Any]], sft_format: str = "deepseek", system_prompt: str | None = ""
) -> str:
    """Format ``[{"role": ..., "content": ...}, ...]`` with the named template (contents are stripped)."""
    conv = get_conv_template(sft_format)
    conv.set_system_message(system_prompt)
    for message in conversations:
        conv.append_message(message["role"], (message.get("content") or "").strip())
    return conv.get_prompt().strip()


register_conv_template(
    Conversation(
        name="deepseek",
        stop_str=("User:", "<｜end▁of▁sentence｜>"),
    )
)
