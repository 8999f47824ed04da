"""The model-holding classes: the only place where a Janus model meets Ray (Data and Serve)."""

from .captioner import Captioner
from .synthesizer import Synthesizer

__all__ = ["Captioner", "Synthesizer"]
