"""Where a job's or server's model comes from (the embedded models' names -> their directories) and
which class holds it (named, so that only the actors and replicas that run it import it).

No torch here (the tiny checkpoint's writer loads it only when the tiny model is first written): a
job's driver resolves the model to read its config files, and must start without the model's stack.
"""

from __future__ import annotations

import importlib
import re

from janus.embedded import SHAPES, TINY, embedded_path  # noqa: F401  (the names configs use)

#: the model actor classes of the jobs and of Serve's model deployments
SYNTHESIZER = "pipeline.actors.synthesizer:Synthesizer"
CAPTIONER = "pipeline.actors.captioner:Captioner"


def load_class(spec: type | str) -> type:
    """A class, or one named ``package.module:Class`` (such as the two above), imported here."""
    if isinstance(spec, str):
        module, _, name = spec.partition(":")
        spec = getattr(importlib.import_module(module), name)
    return spec


def resolve_model_ref(path: str, cache_dir: str | None = None) -> str:
    """The embedded models' names -> their directories (``janus.embedded``); anything else as is."""
    return embedded_path(path, cache_dir) or path


def janus_pro_size(path: str) -> str | None:
    """``1b`` or ``7b`` when a model reference names one of the official sizes, as in
    deepseek-ai/Janus-Pro-7B or s3://models/janus-pro-1b (None: another model)."""
    found = re.search(r"(?i)(?<![0-9])([17])b\b", path)
    return f"{found.group(1).lower()}b" if found else None
