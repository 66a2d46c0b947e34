"""Image and text encoders running an exported model: the same calls as the torch backend (`ClipModel`).

Every encoder, torch or exported, has ``backend``, ``precision``, ``device``, ``dim``, ``logit_scale`` and either
the image calls (``pixel_transform``, ``image_size``, ``start_encoding``, ``encode_pixels``, ``encode_images``,
``encodes_asynchronously``) or the text call (``encode_texts``), so the pipeline and the searcher never ask which
backend they hold.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from clipsearch.inference.export import Export
from clipsearch.inference.geometry import PixelTransform
from clipsearch.model import PendingVectors

if TYPE_CHECKING:
    from PIL import Image

TEXT_BATCH = 64


class Runner(Protocol):
    def run(self, array: np.ndarray) -> np.ndarray: ...


class ImageEncoder(Protocol):
    """What the pipeline and the searcher use of an image encoder (``ClipModel`` is one too)."""

    backend: str
    precision: str
    device: str
    dim: int
    logit_scale: float
    image_size: int
    pixel_transform: PixelTransform

    @property
    def encodes_asynchronously(self) -> bool: ...
    def start_encoding(self, pixels: np.ndarray | Sequence[np.ndarray]) -> PendingVectors: ...
    def encode_pixels(self, pixels: np.ndarray | Sequence[np.ndarray]) -> np.ndarray: ...
    def encode_images(self, images: list[Image.Image]) -> np.ndarray: ...


class TextEncoder(Protocol):
    backend: str
    precision: str
    device: str
    dim: int
    logit_scale: float

    def encode_texts(self, texts: list[str]) -> np.ndarray: ...


class ExportedImageEncoder:
    """The exported image tower in a runtime: (B, H, W, 3) uint8 pixels → (B, dim) unit vectors, on the CPU."""

    device = "cpu"
    encodes_asynchronously = False

    def __init__(self, export: Export, runner: Runner, backend: str, precision: str) -> None:
        self.export = export
        self.backend, self.precision = backend, precision
        self.dim = export.dim
        self.logit_scale = float(export.meta["logit_scale"])
        self.pixel_transform = export.pixel_transform
        self.image_size = self.pixel_transform.size
        self._runner = runner

    def start_encoding(self, pixels: np.ndarray | Sequence[np.ndarray]) -> PendingVectors:
        """Encode now (the runtime uses every core it was given) and hand back the finished batch."""
        batch = pixels if isinstance(pixels, np.ndarray) else np.stack(list(pixels))
        started = time.perf_counter()
        vectors = self._runner.run(np.ascontiguousarray(batch, dtype=np.uint8))
        return PendingVectors(vectors, seconds=time.perf_counter() - started)

    def encode_pixels(self, pixels: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        return self.start_encoding(pixels).result()

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return self.encode_pixels(np.stack([self.pixel_transform(image) for image in images]))


class ExportedTextEncoder:
    """The exported text tower in ONNX Runtime, fed by the torch-free tokenizer: texts → (N, dim) unit vectors."""

    backend, precision, device = "onnxruntime", "fp32", "cpu"

    def __init__(self, export: Export, runner: Runner, tokenizer: Any) -> None:
        self.export = export
        self.dim = export.dim
        self.logit_scale = float(export.meta["logit_scale"])
        self.context_length = int(export.meta["context_length"])
        self._runner = runner
        self._tokenizer = tokenizer

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [self._runner.run(self._tokenizer(texts[i : i + TEXT_BATCH])) for i in range(0, len(texts), TEXT_BATCH)]
        return np.concatenate(parts).astype(np.float32, copy=False)
