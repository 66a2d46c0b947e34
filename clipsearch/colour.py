"""Any decoded image as 8-bit RGB: the one colour and bit-depth conversion, shared by the model and thumbnails.

High bit depths (16-bit grey and RGB, 32-bit integer, float) are tone-mapped by one rule, `to_8bit`:

    white point = 2**b - 1, where b (8..16, or 32 for 32-bit data) is the fewest bits that hold the image's
    brightest value; black stays 0; the values in between scale linearly.

Why this rule: most "16-bit" photos hold fewer bits of data. Scanners, raw converters and scientific cameras
write 10-, 12- or 14-bit values into 16-bit containers, and 8-bit values saved as 16-bit are common too. Dividing
by 257 (0..65535 onto 0..255) shows such a file nearly black, so its embedding ties with black images'; a
min-max stretch shows every image at full contrast, turning a black frame's sensor noise into grey static and a
night scene into day. The white point of the container the data evidently uses keeps a dark photo dark but
visible, keeps black black, and shows full-range 16-bit data exactly as a plain /257 would. Float images in
0..1 are scaled by 255 (their nominal range); any other float range is stretched from its minimum to its maximum.

Transparency is flattened on white (logos and scans are drawn to be seen on a light page).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: high bit depths tone-mapped (`to_8bit`), transparency flattened on white."""
    if image.mode in HIGH_BIT_DEPTH_MODES:
        image = Image.fromarray(to_8bit(np.asarray(image), image.mode))
    if image.mode == "RGB":
        return image
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _flatten_on_white(image.convert("RGBA"))
    return image.convert("RGB")


def to_8bit(values: np.ndarray, mode: str = "") -> np.ndarray:
    """High-bit-depth samples (any shape) as uint8, by the module's rule."""
    if values.dtype.kind == "f" or mode == "F":
        return _float_to_8bit(values.astype(np.float32, copy=False))
    brightest = int(values.max()) if values.size else 0
    if brightest <= 0:
        return np.zeros(values.shape, dtype=np.uint8)
    white = float(2 ** max(8, brightest.bit_length()) - 1)
    scaled = np.multiply(np.maximum(values, 0), np.float32(255 / white), dtype=np.float32)
    return np.rint(scaled, out=scaled).astype(np.uint8)


def rgb_from_16bit(samples: np.ndarray, alpha: np.ndarray | None = None) -> Image.Image:
    """A (height, width, 3) array of 16-bit RGB, with optional 16-bit alpha, as 8-bit RGB by the same rule."""
    rgb = Image.fromarray(to_8bit(samples), "RGB")
    if alpha is None:
        return rgb
    rgb.putalpha(Image.fromarray(np.rint(alpha / 257.0).astype(np.uint8), "L"))  # alpha is a fraction, not light
    return _flatten_on_white(rgb)


def _float_to_8bit(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if low >= 0 and high <= 1:
        scaled = values * 255
    elif high > low:
        scaled = (values - low) * (255 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)


def _flatten_on_white(image: Image.Image) -> Image.Image:
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
