"""API keys: where they come from (an environment variable, or a YAML file with names and per-key
limits), read when the application is built, and which key a request presents.

Only SHA-256 digests of the keys leave the builder (they are the ingress replicas' arguments); a
presented key is hashed and compared with every digest in constant time. Logs and metrics name a key
by its name (from the file, or ``key-`` + the first 8 hex digits of its digest), never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import Field, ValidationError

from pipeline.config import one_line

from .config import APISection, LimitsSection, ServeConfigError
from .errors import APIError

ANONYMOUS = "anonymous"  # no keys configured: everyone, under api.limits
MIN_KEY_LENGTH = 16


class KeyEntry(LimitsSection):
    """One entry of a key file: the key, its name, and limits over ``api.limits``."""

    key: str = Field(min_length=MIN_KEY_LENGTH)
    name: str | None = Field(None, min_length=1)


@dataclass(frozen=True)
class Key:
    name: str
    digest: bytes
    limits: LimitsSection


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def load_keys(api: APISection, environ: Mapping[str, str] = os.environ) -> list[Key]:
    """Every configured key, with its name and limits; a bad entry is a ``ServeConfigError``."""
    entries: list[Any] = [k.strip() for k in environ.get(api.keys.env, "").split(",") if k.strip()]
    if api.keys.file:
        entries += _file_entries(api.keys.file)
    keys = [_key(entry, i, api) for i, entry in enumerate(entries)]
    for what, values in (("key", [k.digest for k in keys]), ("name", [k.name for k in keys])):
        if len(set(values)) < len(values):
            raise ServeConfigError(f"api.keys: the same {what} is configured twice")
    return keys


def _file_entries(path: str) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ServeConfigError(f"api.keys.file: cannot read {path}: {type(exc).__name__}") from None
    if not isinstance(data, list):
        raise ServeConfigError(
            f"api.keys.file: {path} must be a YAML list (- <key> or - {{key: ..., name: ...}})"
        )
    return data


def _key(entry: Any, index: int, api: APISection) -> Key:
    fields = {"key": entry} if isinstance(entry, str) else entry
    where = f"api.keys entry {index}"
    if not isinstance(fields, dict):
        raise ServeConfigError(f"{where}: a key string or a mapping with a 'key'")
    try:
        checked = KeyEntry.model_validate({**api.limits.model_dump(exclude_none=True), **fields})
    except ValidationError as exc:  # the message names the field; the key itself is never shown
        first = exc.errors(include_url=False)[0]
        if first["loc"] and first["loc"][0] == "key":
            raise ServeConfigError(
                f"{where}: key must be a string of at least {MIN_KEY_LENGTH} characters"
            ) from None
        raise ServeConfigError(f"{where}: {one_line(exc).split(' (got')[0]}") from None
    d = digest(checked.key)
    limits = LimitsSection.model_validate(checked.model_dump(exclude={"key", "name"}))
    return Key(checked.name or f"key-{d.hex()[:8]}", d, limits)


class KeyRing:
    """Who is asking: the key a request's ``Authorization: Bearer <key>`` header presents."""

    def __init__(self, keys: list[Key], default_limits: LimitsSection):
        self.keys = keys
        self.anonymous = Key(ANONYMOUS, b"", default_limits)

    @property
    def open(self) -> bool:
        return not self.keys

    def identify(self, authorization: str | None) -> Key:
        """The presented key, or a 401 (OpenAI's ``invalid_api_key``); open: everyone is anonymous."""
        if self.open:
            return self.anonymous
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("no API key: send it as 'Authorization: Bearer <key>'")
        presented = digest(token)
        found = None
        for key in self.keys:  # every digest compared, in constant time: no early exit
            if hmac.compare_digest(presented, key.digest):
                found = key
        if found is None:
            raise unauthorized("incorrect API key provided")
        return found


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
