"""Helpers shared by DeepSeek-style example code (``from janus.utils.io import load_pil_images``)."""
