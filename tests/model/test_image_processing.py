"""Blip2ImageEvalProcessor-identical preprocessing and robust image decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.image_processing import CLIP_MEAN, CLIP_STD, ImageDecodeError, ImageProcessor, load_image
from tests.pictures import encode_png

SIZE = 56


def _by_hand(image: Image.Image, size: int = SIZE) -> np.ndarray:
    """Resize((S, S), BICUBIC) → ToTensor → Normalize, written out in float32."""
    arr = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    arr = arr.transpose(2, 0, 1)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]
    return (arr - mean) / std


def _gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def test_constants_are_openai_clip():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_non_square_is_squashed_not_cropped():
    image = _gradient(120, 40)
    pixels = ImageProcessor(SIZE)(image)
    assert pixels.dtype == torch.float32 and tuple(pixels.shape) == (3, SIZE, SIZE)
    np.testing.assert_allclose(pixels.numpy(), _by_hand(image), atol=1e-6, rtol=0)
    # the whole width is kept: the red channel spans the full gradient left to right
    red = pixels[0].numpy() * CLIP_STD[0] + CLIP_MEAN[0]
    assert red[:, 0].max() < 0.05 and red[:, -1].min() > 0.95
    # a centre crop (aspect kept) would give different values
    side = min(image.size)
    left = (image.width - side) // 2
    cropped = image.crop((left, 0, left + side, side))
    assert not np.allclose(pixels.numpy(), _by_hand(cropped), atol=1e-3)


def test_parity_stripes_image_non_square(parity_dir):
    image = Image.open(parity_dir / "images" / "stripes_80x48.png")
    assert image.size == (80, 48)
    pixels = ImageProcessor(SIZE)(image)
    np.testing.assert_allclose(pixels.numpy(), _by_hand(image), atol=1e-6, rtol=0)


def test_bicubic_not_bilinear():
    image = _gradient(97, 31)
    pixels = ImageProcessor(SIZE)(image).numpy()
    bilinear = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]
    assert not np.allclose(pixels, (bilinear.transpose(2, 0, 1) - mean) / std, atol=1e-4)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK", "I;16"])
def test_other_modes_convert_to_rgb(mode):
    base = _gradient(64, 48)
    image = base.convert(mode)
    pixels = ImageProcessor(SIZE)(image)
    assert tuple(pixels.shape) == (3, SIZE, SIZE)
    assert torch.isfinite(pixels).all()
    np.testing.assert_allclose(pixels.numpy(), _by_hand(image.convert("RGB")), atol=1e-6, rtol=0)
    if mode in ("L", "LA"):
        torch.testing.assert_close(pixels[0] * CLIP_STD[0] + CLIP_MEAN[0], pixels[1] * CLIP_STD[1] + CLIP_MEAN[1])


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_load_image_bytes_gives_rgb(mode):
    image = _gradient(30, 20).convert(mode)
    loaded = load_image(encode_png(image))
    assert loaded.mode == "RGB" and loaded.size == (30, 20)
    assert np.array_equal(np.asarray(loaded), np.asarray(image.convert("RGB")))


def test_load_image_path_and_pil(tmp_path):
    image = _gradient(10, 10).convert("RGBA")
    path = tmp_path / "x.png"
    image.save(path)
    assert load_image(str(path)).mode == "RGB"
    assert load_image(image).mode == "RGB"


def test_truncated_png_raises():
    data = encode_png(_gradient(64, 64))
    with pytest.raises(ImageDecodeError) as exc:
        load_image(data[: len(data) // 2])
    assert "truncated" in str(exc.value) or "could not read" in str(exc.value)


@pytest.mark.parametrize(
    "data",
    [b"<!DOCTYPE html><html><body>Not found</body></html>", b"", b"\x89PNG\r\n\x1a\n", b"GIF89a"],
)
def test_non_image_bytes_raise(data):
    with pytest.raises(ImageDecodeError):
        load_image(data)


def test_missing_path_raises(tmp_path):
    with pytest.raises(ImageDecodeError):
        load_image(str(tmp_path / "missing.png"))


def test_image_decode_error_is_a_value_error():
    assert issubclass(ImageDecodeError, ValueError)
