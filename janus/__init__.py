"""Janus / Janus-Pro: a faithful, inference-optimised reimplementation of DeepSeek's model."""

__version__ = "0.1.0"
