"""Fast batched inference engines (no Ray here): CFG image synthesis and captioning."""

from .captioning import CaptionEngine, CaptionRequest, CaptionResult
from .common import InsufficientMemoryError, RequestError
from .synthesis import SynthesisEngine, SynthesisRequest, SynthesisResult

__all__ = [
    "CaptionEngine",
    "CaptionRequest",
    "CaptionResult",
    "InsufficientMemoryError",
    "RequestError",
    "SynthesisEngine",
    "SynthesisRequest",
    "SynthesisResult",
]
