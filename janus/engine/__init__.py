"""Fast batched inference engines (no Ray here): CFG image synthesis and captioning.

The names below load on first use (PEP 562): ``janus.engine.prompts`` (defaults and prompt templates,
read by the job config and the prompt readers) must not pull in torch and transformers, which cost
every Ray task worker and every CLI start ~9 s of CPU on a 2-core machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from janus.utils.lazy import lazy_exports

#: public name -> the submodule that defines it
_EXPORTS = {
    "CaptionEngine": "captioning",
    "CaptionRequest": "captioning",
    "CaptionResult": "captioning",
    "ERROR": "status",
    "INVALID_REQUEST": "status",
    "OK": "status",
    "OUT_OF_MEMORY": "status",
    "RequestError": "common",
    "Result": "common",
    "load_model_and_processor": "common",
    "SynthesisEngine": "synthesis",
    "SynthesisRequest": "synthesis",
    "SynthesisResult": "synthesis",
}

__all__ = [
    "CaptionEngine",
    "CaptionRequest",
    "CaptionResult",
    "ERROR",
    "INVALID_REQUEST",
    "OK",
    "OUT_OF_MEMORY",
    "RequestError",
    "Result",
    "SynthesisEngine",
    "SynthesisRequest",
    "SynthesisResult",
    "load_model_and_processor",
]

if TYPE_CHECKING:
    from .captioning import CaptionEngine, CaptionRequest, CaptionResult
    from .common import RequestError, Result, load_model_and_processor
    from .status import ERROR, INVALID_REQUEST, OK, OUT_OF_MEMORY
    from .synthesis import SynthesisEngine, SynthesisRequest, SynthesisResult


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
