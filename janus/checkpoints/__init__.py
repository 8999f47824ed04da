"""Janus checkpoints in the official on-disk layout, written here with small random weights.

The runtime writes the embedded ``tiny`` model with them (``janus/embedded.py``); the tests, the demo and
the benchmarks build theirs the same way, and load them through the same code path as the real
checkpoints. DeepSeek's reference generation loops live apart, in ``janus.reference``.
"""

from .config import official_config
from .tokenizer import write_processor_configs, write_tiny_tokenizer
from .writer import init_tiny_weights, save_state_dict, write_random_like, write_tiny_checkpoint

__all__ = [
    "init_tiny_weights",
    "official_config",
    "save_state_dict",
    "write_processor_configs",
    "write_random_like",
    "write_tiny_checkpoint",
    "write_tiny_tokenizer",
]
