"""Safe decoding of untrusted image bytes: modes, EXIF, animation, truncation, decompression bombs."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import PIL.Image
import pytest

from pipeline import images, sinks
from pipeline.images import ImageDecodeError, decode_image
from tests.support.inputs import encode, image


def test_decode_cmyk_jpeg():
    img = decode_image(encode(image("CMYK", color=(0, 255, 255, 0)), "JPEG"))
    assert img.mode == "RGB" and img.size == (24, 16)
    r, g, b = img.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # cyan-free, magenta+yellow = red


def test_decode_16bit_png_is_scaled_not_clipped():
    arr = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    data = encode(PIL.Image.fromarray(arr), "PNG")
    assert PIL.Image.open(io.BytesIO(data)).mode.startswith("I;16")
    img = np.asarray(decode_image(data))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert img[0, 0, 0] == 0 and img[-1, -1, 0] == 255 and 120 < img[32, 0, 0] < 135


def test_decode_palette_with_transparency_and_alpha_modes():
    pal = image("P", color=3)
    pal.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 250, 100, 0] + [0] * 756)
    data = encode(pal, "PNG", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = decode_image(data)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (250, 100, 0)
    for mode, color in [("LA", (90, 10)), ("RGBA", (1, 2, 3, 0))]:
        img = decode_image(encode(image(mode, color=color), "PNG"))
        expected = image(mode, color=color).convert("RGB").getpixel((0, 0))
        assert img.mode == "RGB" and img.getpixel((0, 0)) == expected


def test_decode_animated_gif_first_frame():
    frames = [image(color=(255, 0, 0)), image(color=(0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    assert PIL.Image.open(io.BytesIO(buf.getvalue())).n_frames == 2
    r, g, b = decode_image(buf.getvalue()).getpixel((0, 0))
    assert r > 200 and b < 50


def test_decode_applies_exif_orientation():
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    data = encode(image(size=(40, 20)), "JPEG", exif=exif.tobytes())
    assert PIL.Image.open(io.BytesIO(data)).size == (40, 20)
    assert decode_image(data).size == (20, 40)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        sinks.PNG_MAGIC
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("zero bytes", b"", "empty image data"),
        ("text", b"hello, I am a text file\n", "not a readable JPEG/PNG"),
        ("not a raster format we open", encode(image(), "PPM"), "not a readable"),
        ("jpeg cut in its header", encode(image(size=(256, 256)), "JPEG")[:300], "(?i)truncated"),
        (
            "jpeg cut in its pixels",
            encode(PIL.Image.effect_noise((256, 256), 60), "JPEG")[:3000],
            "truncated",
        ),
        ("bomb", _png_header_only(10_000, 10_000), "100000000 pixels, over the limit of 40000000"),
        ("huge bomb", _png_header_only(2**31 - 1, 2**31 - 1), "decompression bomb"),
    ],
)
def test_decode_rejects_bad_data(name, data, message):
    limit = PIL.Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)
    assert PIL.Image.MAX_IMAGE_PIXELS == limit  # the global stays untouched


def test_decode_max_pixels_is_our_own_limit():
    data = encode(image(size=(64, 64)), "PNG")
    with pytest.raises(ImageDecodeError, match="4096 pixels, over the limit of 1000"):
        decode_image(data, max_pixels=1000)
    assert images.image_size(data) == (64, 64)
