"""Helpers that build tiny Janus checkpoints in the official format (tests, demo, benchmarks)."""

from .checkpoint import official_config, save_state_dict, write_tiny_checkpoint
from .tokenizer import write_processor_configs, write_tiny_tokenizer

__all__ = [
    "official_config",
    "save_state_dict",
    "write_processor_configs",
    "write_tiny_checkpoint",
    "write_tiny_tokenizer",
]
