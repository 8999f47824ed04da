"""Fast batched inference engines (no Ray here): CFG image synthesis and captioning."""

from .captioning import CaptionEngine, CaptionRequest, CaptionResult
from .common import ERROR, INVALID_REQUEST, OK, OUT_OF_MEMORY, RequestError, Result, load_model_and_processor
from .synthesis import SynthesisEngine, SynthesisRequest, SynthesisResult

__all__ = [
    "ERROR",
    "INVALID_REQUEST",
    "OK",
    "OUT_OF_MEMORY",
    "CaptionEngine",
    "CaptionRequest",
    "CaptionResult",
    "RequestError",
    "Result",
    "SynthesisEngine",
    "SynthesisRequest",
    "SynthesisResult",
    "load_model_and_processor",
]
