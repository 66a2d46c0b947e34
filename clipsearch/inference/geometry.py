"""The geometric half of open_clip's eval preprocessing (resize + centre crop or pad), in Pillow alone.

open_clip builds its eval transform from torchvision ops (``open_clip.transform.image_transform``); they run
Pillow underneath, so the same Pillow calls with the same size arithmetic give the same pixels without
importing torch. The other half of preprocessing (to float, subtract the mean, divide by the std) is inside the
exported graphs and the torch backend, so every backend does the same maths on the same uint8 pixels.

``tests/test_inference.py`` checks pixel equality with open_clip's own transform over many sizes and aspect
ratios, for every resize mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class Geometry:
    """How open_clip sizes an image for the model: ``size`` (height, width), ``resize_mode`` (shortest,
    longest or squash), ``interpolation`` (bicubic or bilinear), and the ``fill_color`` of padding."""

    size: tuple[int, int]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill_color: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        size = data["size"]
        pair = (int(size), int(size)) if isinstance(size, int | float) else (int(size[0]), int(size[-1]))
        return cls(pair, data.get("resize_mode") or "shortest", data.get("interpolation") or "bicubic",
                   int(data.get("fill_color") or 0))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size": list(self.size)}


class PixelTransform:
    """PIL image (any mode, any size) → (H, W, 3) uint8 pixels, exactly as open_clip's eval transform sizes
    them. Picklable and torch-free, so decode workers (threads or processes) can run it."""

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry
        self.size = max(geometry.size)  # the side the decoder must at least keep (its reduced-scale decode)

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        mode = self.geometry.resize_mode
        if mode == "squash":
            image = _resize_to(image, self.geometry.size, self._resample)
        elif mode == "longest":
            image = _center_crop(_keep_ratio(image, self.geometry.size, 1.0, self._resample), self.geometry.size,
                                 self.geometry.fill_color)
        else:
            image = _center_crop(self._shortest(image), self.geometry.size, 0)
        return np.asarray(image, dtype=np.uint8)

    @property
    def _resample(self) -> int:
        from PIL import Image

        return Image.Resampling.BILINEAR if self.geometry.interpolation == "bilinear" else Image.Resampling.BICUBIC

    def _shortest(self, image: Image.Image) -> Image.Image:
        height, width = self.geometry.size
        if height == width:  # torchvision's Resize(int): the short side to `size`, the long one truncated
            return _resize_to(image, _short_side_size(image.size, height), self._resample)
        # open_clip's ResizeKeepRatio for a non-square target, which it builds with its default, bicubic
        from PIL import Image

        return _keep_ratio(image, self.geometry.size, 0.0, Image.Resampling.BICUBIC)


def _short_side_size(image_size: tuple[int, int], side: int) -> tuple[int, int]:
    """(height, width) as torchvision's ``_compute_resized_output_size`` gives it for an int size."""
    width, height = image_size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(side * long / short)
    return (new_long, side) if width <= height else (side, new_long)


def _keep_ratio(image: Image.Image, target: tuple[int, int], longest: float, resample: int) -> Image.Image:
    """open_clip's ``ResizeKeepRatio`` without its random parts: scale by the shortest (0) or longest (1) side."""
    width, height = image.size
    ratio_h, ratio_w = height / target[0], width / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return _resize_to(image, (round(height / ratio), round(width / ratio)), resample)


def _resize_to(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """Resize to (height, width); torchvision returns the image untouched when it already has that size."""
    if (image.size[1], image.size[0]) == tuple(size):
        return image
    return image.resize((size[1], size[0]), resample)


def _center_crop(image: Image.Image, size: tuple[int, int], fill: int) -> Image.Image:
    """torchvision's ``center_crop`` (open_clip's ``center_crop_or_pad``): pad a short side, then crop."""
    from PIL import ImageOps

    crop_h, crop_w = size
    width, height = image.size
    if crop_w > width or crop_h > height:
        left = (crop_w - width) // 2 if crop_w > width else 0
        top = (crop_h - height) // 2 if crop_h > height else 0
        right = (crop_w - width + 1) // 2 if crop_w > width else 0
        bottom = (crop_h - height + 1) // 2 if crop_h > height else 0
        image = ImageOps.expand(image, border=(left, top, right, bottom), fill=(fill,) * 3)
        width, height = image.size
        if (crop_w, crop_h) == (width, height):
            return image
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))
