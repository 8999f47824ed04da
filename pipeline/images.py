"""Safe decoding of untrusted image bytes into the RGB PIL image the Janus processor expects.

Captioning reads images from the wild: a single corrupt file, a decompression bomb or an odd mode
must become one failed row with a readable message, never a crashed worker or an exhausted node.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

# 40 MP: well above any camera photo, far below what would exhaust a worker (RGB = 120 MB decoded).
DEFAULT_MAX_PIXELS = 40_000_000
# Raster formats only: PIL would otherwise also open e.g. EPS, which runs Ghostscript on load.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes multi-picture (MPO) files


class ImageDecodeError(ValueError):
    """The bytes are not an image we can decode safely; the message says why."""


def _open(data: bytes) -> PIL.Image.Image:
    """Open lazily (header only), with our own errors instead of PIL's."""
    try:
        with warnings.catch_warnings():
            # decode_image's own max_pixels check replaces PIL's bomb warning.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            return PIL.Image.open(io.BytesIO(data), formats=FORMATS)
    except PIL.Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            f"image too large to decode safely (a possible decompression bomb): {exc}"
        ) from exc
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(
            f"not a readable {'/'.join(FORMATS)} image ({len(data)} bytes): {exc}"
        ) from exc


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only: no pixel data is decoded."""
    with _open(data) as img:
        return img.size


def _to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    # 16-bit greyscale: PIL's convert("RGB") clips at 255 (a white image); scale to 8 bits instead.
    if img.mode.startswith("I;16") or (img.mode == "I" and np.asarray(img).max(initial=0) > 255):
        arr = np.asarray(img).astype(np.uint32)
        return PIL.Image.fromarray((arr // 257).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        # Same pixels as a direct convert("RGB"), without PIL's warning for every such image.
        img = img.convert("RGBA")
    # Everything else as DeepSeek's load_pil_images: convert("RGB") (alpha is dropped, CMYK and
    # palettes are mapped by PIL).
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> PIL.Image.Image:
    """Decode ``data`` into an RGB image, EXIF orientation applied, first frame of animations.

    The pixel count is checked from the header before any pixel is decoded. PIL's global
    ``MAX_IMAGE_PIXELS`` is left alone: ``max_pixels`` is this function's own limit.
    """
    if not data:
        raise ImageDecodeError("empty image data (0 bytes)")
    img = _open(data)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(a possible decompression bomb; raise max_pixels if such images are expected)"
        )
    try:
        img.load()  # first frame only for animated GIF/WebP/APNG
        try:
            img = PIL.ImageOps.exif_transpose(img)
        except Exception:  # a broken EXIF block must not lose an otherwise good image
            pass
        return _to_rgb(img)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(
            f"corrupt, truncated or unsupported {img.format or 'image'} data: {exc}"
        ) from exc


def model_pixels(
    data: bytes, processor: Any, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, PIL.Image.Image]:
    """Untrusted bytes -> (uint8 [S, S, 3] as the model's image processor resizes and pads it, the
    decoded original). The one way in for images from the wild: the caption job and Serve.

    ``processor`` is the checkpoint's ``VLMImageProcessor`` (its size, pad colour and minimum side).
    Raises ``ImageDecodeError`` with a message for the user.
    """
    image = decode_image(data, max_pixels=max_pixels)
    try:
        return np.asarray(processor.resize(image)), image
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(f"cannot resize the {image.width}x{image.height} image: {exc}") from exc


#: formats every WebDataset reader decodes (``webdataset``, Ray Data's ``read_webdataset``): kept as
#: they are in a caption job's tars; magic bytes -> the tar member's extension
KEPT_FORMATS = {b"\xff\xd8\xff": "jpg", b"\x89PNG\r\n\x1a\n": "png"}


def image_extension(data: bytes) -> str | None:
    """``jpg`` or ``png`` for bytes of those formats, else None."""
    return next((ext for magic, ext in KEPT_FORMATS.items() if data.startswith(magic)), None)


def stored_image(data: bytes, decoded: PIL.Image.Image) -> tuple[bytes, str | None]:
    """What a caption job's tar holds for a source image: its own bytes when JPEG or PNG, else the
    decoded image (as the model saw it) as PNG; and the source format when re-encoded."""
    if image_extension(data):
        return data, None
    with _open(data) as img:
        source_format = (img.format or "unknown").lower()
    buf = io.BytesIO()
    decoded.save(buf, format="PNG")
    return buf.getvalue(), source_format


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_DCT32 = _dct_matrix(32)


def phash(image: np.ndarray | PIL.Image.Image) -> int:
    """64-bit perceptual hash (pHash) as a signed int64: near-duplicates differ in a few bits.

    Greyscale, 32 x 32, 2-D DCT; bit i says whether the i-th of the 8 x 8 lowest frequencies is above
    their median (DC excluded from the median). Survives re-encoding, resizing and small edits:
    ``bit_count(a.phash # b.phash) <= 6`` finds near-duplicates in DuckDB.
    """
    img = image if isinstance(image, PIL.Image.Image) else PIL.Image.fromarray(np.asarray(image))
    grey = np.asarray(img.convert("L").resize((32, 32), PIL.Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    value = int(np.packbits(bits).view(">u8")[0])
    return value - (1 << 64) if value >= 1 << 63 else value


def distinct(hashes: list[int], bits: int = 4) -> int:
    """How many images are distinct by ``phash``: each counted unless its hash is within ``bits`` bits
    of one counted before it (greedy, in order). The shapes model's samples of one prompt are measured so."""
    kept: list[int] = []
    for h in hashes:
        if all(bin((h ^ k) & (2**64 - 1)).count("1") > bits for k in kept):
            kept.append(h)
    return len(kept)
