"""Helpers that build tiny Janus checkpoints in the official format (tests, demo, benchmarks).

``janus.testing.reference`` (imported on its own: it pulls in transformers) holds DeepSeek's
reference generation loops, the ground truth of the engine tests and the benchmarks' baseline.
"""

from .checkpoint import official_config, save_state_dict, write_tiny_checkpoint
from .tokenizer import write_processor_configs, write_tiny_tokenizer

__all__ = [
    "official_config",
    "save_state_dict",
    "write_processor_configs",
    "write_tiny_checkpoint",
    "write_tiny_tokenizer",
]
