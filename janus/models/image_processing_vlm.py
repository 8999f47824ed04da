"""Image preprocessing for Janus understanding, reproducing DeepSeek's ``VLMImageProcessor``.

The SigLIP tower was trained on exactly this pipeline, so each step follows DeepSeek's code,
rounding included: the short side is truncated with ``int()`` (Hugging Face's ``JanusImageProcessor``
rounds instead), PIL's bicubic filter does the resize, the pad is centred with the mean colour, and
scaling happens in float64 before the float32 normalisation, as ``transformers.image_transforms``
did for DeepSeek. The result is bit-identical pixel values for the same input image.

``resize`` (what the caption job's CPU tasks run) needs only PIL: DeepSeek's torchvision ``resize`` of
a PIL image is PIL's own bicubic ``Image.resize``, so it is called directly, and torch and
transformers load only when pixels become tensors (in the model's process).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import numpy as np
import PIL.Image

from janus.models.hub import resolve_model_path

if TYPE_CHECKING:
    import torch
    from transformers import BatchFeature

ImageInput = Union[PIL.Image.Image, np.ndarray]

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
_CONFIG_NAME = "preprocessor_config.json"
_INIT_KEYS = (
    "image_size",
    "min_size",
    "image_mean",
    "image_std",
    "rescale_factor",
    "do_normalize",
    "background_color",
)


class VLMImageProcessor:
    """Resize the long side to ``image_size``, pad to a square, scale and normalise."""

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 384,
        min_size: int = 14,
        image_mean: Sequence[float] | None = IMAGE_MEAN,
        image_std: Sequence[float] | None = IMAGE_STD,
        rescale_factor: float = 1.0 / 255.0,
        do_normalize: bool = True,
        background_color: Sequence[int] | None = None,
    ) -> None:
        self.image_size = int(image_size)
        self.min_size = int(min_size)
        self.image_mean = tuple(image_mean) if image_mean is not None else None
        self.image_std = tuple(image_std) if image_std is not None else None
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        if do_normalize and (self.image_mean is None or self.image_std is None):
            raise ValueError("do_normalize=True needs image_mean and image_std")
        if background_color is None:
            # DeepSeek derives the pad colour from the mean: int(0.5 * 255) = 127.
            background_color = (
                (127, 127, 127) if self.image_mean is None else tuple(int(m * 255) for m in self.image_mean)
            )
        self.background_color = tuple(int(c) for c in background_color)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> VLMImageProcessor:
        """Read ``preprocessor_config.json`` from a checkpoint (directory, hub id or URL); kwargs override it."""
        path = resolve_model_path(name_or_path) / _CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the checkpoint has no image preprocessor config")
        return cls.from_dict({**json.loads(path.read_text(encoding="utf-8")), **kwargs})

    @classmethod
    def from_dict(cls, config: dict) -> VLMImageProcessor:
        """From ``preprocessor_config.json``'s content (keys we do not use are ignored)."""
        return cls(**{k: config[k] for k in _INIT_KEYS if k in config})

    def to_dict(self) -> dict:
        """The official ``preprocessor_config.json`` content for these settings."""
        return {
            "background_color": list(self.background_color),
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean) if self.image_mean is not None else None,
            "image_processor_type": "VLMImageProcessor",
            "image_size": self.image_size,
            "image_std": list(self.image_std) if self.image_std is not None else None,
            "min_size": self.min_size,
            "processor_class": "VLChatProcessor",
            "rescale_factor": self.rescale_factor,
        }

    @property
    def default_shape(self) -> list[int]:
        return [3, self.image_size, self.image_size]

    def resize(self, image: ImageInput) -> PIL.Image.Image:
        """Resize (long side -> image_size) and pad to a square RGB image, all in uint8 like DeepSeek."""
        image = _to_rgb_pil(image)
        width, height = image.size
        longest = max(width, height)
        # Same expression and truncation as DeepSeek (``int``, not ``round``): see the module docstring.
        size = [
            max(int(height / longest * self.image_size), self.min_size),
            max(int(width / longest * self.image_size), self.min_size),
        ]
        # torchvision's resize of a PIL image, as DeepSeek calls it, is exactly this (antialias is PIL's own)
        image = image.resize((size[1], size[0]), PIL.Image.Resampling.BICUBIC)
        return _pad_to_square(image, self.background_color)

    def preprocess_one(self, image: ImageInput) -> torch.Tensor:
        """One image -> float32 tensor [3, image_size, image_size]."""
        import torch

        pixels = torch.from_numpy(np.array(self.resize(image))).permute(2, 0, 1)
        x = (pixels.double() * self.rescale_factor).float()
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32).view(-1, 1, 1)
            x = (x - mean) / std
        return x

    def preprocess(
        self, images: ImageInput | Sequence[ImageInput] | None, return_tensors: str | None = "pt"
    ) -> BatchFeature:
        """Images -> ``BatchFeature`` whose ``pixel_values`` is a float32 tensor [n, 3, S, S]."""
        import torch
        from transformers import BatchFeature

        if return_tensors not in ("pt", None):
            raise ValueError(f"only PyTorch tensors are supported, got return_tensors={return_tensors!r}")
        if images is None:
            images = []
        elif isinstance(images, (PIL.Image.Image, np.ndarray)):
            images = [images]
        tensors = [self.preprocess_one(image) for image in images]
        pixel_values = torch.stack(tensors) if tensors else torch.zeros((0, *self.default_shape))
        return BatchFeature(data={"pixel_values": pixel_values})

    __call__ = preprocess

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict())})"


def _to_rgb_pil(image: ImageInput) -> PIL.Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"numpy images must be uint8 arrays of shape (H, W, 3); got {image.dtype} {image.shape}"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"cannot preprocess an empty image of shape {image.shape}")
        return PIL.Image.fromarray(np.ascontiguousarray(image))
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"cannot preprocess an empty image of size {image.width}x{image.height}")
    # Plain convert (alpha is dropped, not composited), as DeepSeek's load_pil_images does.
    return image if image.mode == "RGB" else image.convert("RGB")


def _pad_to_square(image: PIL.Image.Image, color: tuple[int, ...]) -> PIL.Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = PIL.Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
