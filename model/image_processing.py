"""Image preprocessing identical to the reference's ``Blip2ImageEvalProcessor``.

Reference: ``minigpt4/processors/blip_processors.py``: ``Resize((S, S), BICUBIC)`` (PIL's
resampler, aspect ratio *not* kept) → ``ToTensor`` (÷255) → ``Normalize`` with the
OpenAI-CLIP mean/std.  Implemented with PIL and torch only (no torchvision), in the
same float32 operation order, so pixel values match the reference bit for bit.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageDecodeError", "ImageProcessor", "builtin_test_image", "load_image"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can decode (or the file is truncated)."""


def load_image(source: str | bytes | Image.Image) -> Image.Image:
    """Open a path, raw bytes or a PIL image as RGB, with a readable error for bad input.

    Formats are whatever Pillow decodes (JPEG, PNG, GIF — first frame —, WebP, BMP, TIFF…);
    Pillow's decompression-bomb guard rejects absurd pixel counts.
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, bytes) and not source:
        raise ImageDecodeError("the file is empty")
    try:
        image = Image.open(io.BytesIO(source)) if isinstance(source, bytes) else Image.open(source)
        image.load()
    except UnidentifiedImageError:
        raise ImageDecodeError("the data is not in an image format Pillow decodes (JPEG, PNG, GIF, WebP…)") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"the image is too large to process safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"the image file is truncated or corrupt ({exc})") from None
    return image.convert("RGB")


class ImageProcessor:
    """Resize to ``size``×``size`` with bicubic PIL resampling, scale to [0, 1], CLIP-normalise."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Return ``Tensor[3, S, S]`` float32."""
        resized = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        array = np.asarray(resized, dtype=np.uint8)  # [S, S, 3]
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)  # [3, S, S]
        return (pixels - self._mean) / self._std


def builtin_test_image(size: int = 224) -> Image.Image:
    """A procedurally drawn test picture (red circle, green square, blue stripe) for self-checks."""
    from PIL import ImageDraw

    image = Image.new("RGB", (size, size), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    s = size / 224
    draw.ellipse([20 * s, 30 * s, 100 * s, 110 * s], fill=(220, 30, 30))
    draw.rectangle([120 * s, 40 * s, 200 * s, 120 * s], fill=(30, 170, 60))
    draw.rectangle([0, 160 * s, size, 190 * s], fill=(40, 70, 200))
    return image
