"""The CLIP model: which one, loading it through open_clip, and the torch backend that turns pixels and text into
unit vectors (the reference every other backend in `clipsearch.inference` is measured against).

A model is named by a *spec*, exactly as open_clip's factory names it:

- a built-in architecture with a pretrained tag: ``ViT-B-32-256`` + ``datacomp_s34b_b86k``;
- ``hf-hub:org/repo``: config and weights from the Hugging Face Hub (or its local cache);
- ``local-dir:/path``: a folder holding ``open_clip_config.json`` and ``open_clip_model.safetensors``.

Preprocessing is split in two so that the expensive half runs in decode workers: ``PixelTransform`` (resize +
centre crop, Pillow only, picklable, in `clipsearch.inference.geometry`) gives uint8 pixels; the encoder converts
them to floats and normalises on the model's device, which keeps host-to-device copies four times smaller than
float tensors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.errors import ModelError
from clipsearch.inference.geometry import Geometry, PixelTransform

if TYPE_CHECKING:
    import torch
    from PIL import Image

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"

# ViT-B-32 at 256 px trained on DataComp-1B: about the zero-shot quality of ViT-B-16 at ViT-B-32's speed, which is
# what a CPU-only laptop indexing tens of thousands of photos needs.
DEFAULT_MODEL_NAME = "ViT-B-32-256"
DEFAULT_PRETRAINED = "datacomp_s34b_b86k"


@dataclass(frozen=True)
class ModelSpec:
    """Which model: an open_clip name (possibly with a schema) and, for built-ins, a pretrained tag."""

    name: str
    pretrained: str | None = None

    @classmethod
    def parse(cls, name: str | None, pretrained: str | None = None) -> ModelSpec:
        """Normalise user input: local folders become absolute, built-ins get the default tag."""
        if not name:
            return cls(DEFAULT_MODEL_NAME, pretrained or DEFAULT_PRETRAINED)
        if name.startswith(LOCAL_DIR):
            folder = Path(name[len(LOCAL_DIR) :]).expanduser().resolve()
            return cls(f"{LOCAL_DIR}{folder}", None)
        if name.startswith(HF_HUB):
            return cls(name, None)
        if pretrained is None and name == DEFAULT_MODEL_NAME:
            pretrained = DEFAULT_PRETRAINED
        return cls(name, pretrained)

    def __str__(self) -> str:
        return f"{self.name} ({self.pretrained})" if self.pretrained else self.name

    def to_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "pretrained": self.pretrained}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(str(data["name"]), data.get("pretrained"))


def choose_device(requested: str | None = None) -> str:
    """``cuda`` when available (or asked for), else ``cpu``; a clear error for a device that is not there."""
    import torch

    if requested in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    assert requested is not None
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"Device {requested!r} was requested but no CUDA GPU is available; use --device cpu.")
    if requested.startswith("mps") and not torch.backends.mps.is_available():
        raise ModelError(f"Device {requested!r} was requested but Apple's MPS is not available; use --device cpu.")
    if not requested.startswith(("cpu", "cuda", "mps")):
        raise ModelError(f"Unknown device {requested!r}; use cpu, cuda, cuda:N or mps.")
    return requested


class ClipModel:
    """A loaded open_clip model on one device, encoding images and texts into L2-normalised float32 vectors: the
    torch backend (fp32 on a CPU, fp16 on CUDA)."""

    backend = "torch"

    def __init__(self, spec: ModelSpec, model: Any, preprocess: Any, tokenizer: Any, device: str) -> None:
        import torch

        self.spec = spec
        self.device = device
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.precision = "fp16" if device.startswith("cuda") else "fp32"
        self._model = model
        self.tokenizer = tokenizer
        self.geometry, self.mean, self.std = _preprocess_settings(model, preprocess)
        self.pixel_transform = PixelTransform(self.geometry)
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(self.mean, device=device).reshape(shape)
        self._std = torch.tensor(self.std, device=device).reshape(shape)
        self.image_size = self.pixel_transform.size
        self.logit_scale = float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else 100.0
        self.dim = int(self.encode_texts(["a photo"]).shape[1])

    @classmethod
    def load(cls, spec: ModelSpec, device: str | None = None) -> ClipModel:
        device = choose_device(device)
        model, preprocess, tokenizer = _load_open_clip(spec, device)
        return cls(spec, model, preprocess, tokenizer, device)

    @property
    def open_clip_model(self) -> Any:
        """The open_clip module itself (for exporting its towers)."""
        return self._model

    def encode_pixels(self, pixels: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """(B, H, W, 3) uint8 pixels from ``pixel_transform`` → (B, dim) unit vectors."""
        return self.start_encoding(pixels).result()

    def start_encoding(self, pixels: np.ndarray | Sequence[np.ndarray]) -> PendingVectors:
        """Start encoding a batch of (H, W, 3) uint8 pixel arrays; ``result()`` gives the unit vectors.

        On CUDA the batch is stacked straight into pinned host memory, copied to the GPU without blocking, and
        the forward pass is queued: this returns while the GPU works, so the caller can write the previous
        batch and gather the next one meanwhile. On a CPU the work is done before this returns.
        """
        import torch

        host = self._host_batch(pixels)
        if not self._on_cuda:  # CPU (or MPS): synchronous
            started = time.perf_counter()
            vectors = self._forward(host.to(self.device)).cpu().numpy()
            return PendingVectors(vectors, seconds=time.perf_counter() - started)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        on_gpu = self._forward(host.to(self.device, non_blocking=True))
        out = torch.empty(tuple(on_gpu.shape), dtype=on_gpu.dtype, pin_memory=True)
        out.copy_(on_gpu, non_blocking=True)
        end.record()
        return PendingVectors(out, begin=begin, end=end, keep=host)

    @property
    def encodes_asynchronously(self) -> bool:
        """True when ``start_encoding`` returns before the work is done (CUDA)."""
        return self._on_cuda

    @property
    def _on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def _host_batch(self, pixels: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """The batch as one uint8 tensor in host memory: pinned on CUDA (one copy, no staging), else as given."""
        import torch

        if not self._on_cuda:
            stacked = pixels if isinstance(pixels, np.ndarray) else np.stack(list(pixels))
            return torch.from_numpy(np.ascontiguousarray(stacked))
        arrays = list(pixels)
        host = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.uint8, pin_memory=True)
        np.stack(arrays, out=host.numpy())
        return host

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on the model's device → float32 unit vectors on that device."""
        import torch

        with torch.inference_mode():
            # Normalised in float32 (mean and std are float32), then cast to the model's dtype: an fp16 model
            # refuses float32 input.
            floats = batch.permute(0, 3, 1, 2).float().div_(255.0)
            floats = ((floats - self._mean) / self._std).to(self.dtype)
            features = self._model.encode_image(floats).float()
            return torch.nn.functional.normalize(features, dim=1, eps=1e-12)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """PIL images (any mode/size) → (B, dim) unit vectors."""
        return self.encode_pixels(np.stack([self.pixel_transform(im) for im in images]))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts → (N, dim) unit vectors."""
        import torch

        tokens = self.tokenizer(texts).to(self.device)
        with torch.inference_mode():
            return _unit_rows(self._model.encode_text(tokens))


class PendingVectors:
    """A batch being encoded: ``result()`` waits for it and returns (B, dim) float32 unit vectors."""

    def __init__(self, vectors: Any, *, seconds: float = 0.0, begin: Any = None, end: Any = None,
                 keep: Any = None) -> None:
        self._vectors = vectors  # a numpy array, or a pinned CPU tensor that the GPU is still filling
        self._seconds = seconds
        self._events = (begin, end)
        self._keep = keep  # the pinned input, alive until the copy from it is done

    def result(self) -> np.ndarray:
        begin, end = self._events
        if end is not None:
            end.synchronize()
            self._seconds = begin.elapsed_time(end) / 1000
            self._vectors, self._keep, self._events = self._vectors.numpy(), None, (None, None)
        return np.asarray(self._vectors, dtype=np.float32)

    @property
    def seconds(self) -> float:
        """How long the encoder worked on this batch (on CUDA: GPU time, known once ``result()`` returned)."""
        return self._seconds


def _unit_rows(features: torch.Tensor) -> np.ndarray:
    vectors = features.float().cpu().numpy()
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _preprocess_settings(model: Any, preprocess: Any) -> tuple[Geometry, list[float], list[float]]:
    """The geometry and normalisation open_clip's eval transform applies, from the model's preprocess config
    (checked against the transform itself: the last two steps must be to-tensor and normalise)."""
    from torchvision.transforms import Normalize, ToTensor

    steps = list(preprocess.transforms)
    normalize = steps[-1]
    if not isinstance(normalize, Normalize) or not isinstance(steps[-2], ToTensor):
        raise ModelError("This model's preprocessing is not resize, crop, to-tensor, normalise; it is not supported.")
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    cfg.setdefault("size", getattr(model.visual, "image_size", 224))
    return Geometry.from_dict(cfg), [float(v) for v in normalize.mean], [float(v) for v in normalize.std]


def _load_open_clip(spec: ModelSpec, device: str) -> tuple[Any, Any, Any]:
    from clipsearch.inference.source import locate_or_explain, quiet_hub_logging

    _check_known(spec)
    quiet_hub_logging()
    locate_or_explain(spec)  # weights not here and no network: say so now, not after a minute of retries
    import open_clip

    precision = "fp16" if device.startswith("cuda") else "fp32"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name, pretrained=spec.pretrained, device=device, precision=precision
        )
        tokenizer = open_clip.get_tokenizer(spec.name)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(missing_weights_message(spec)) from exc
    model.eval()
    return model, preprocess, tokenizer


def _check_known(spec: ModelSpec) -> None:
    import open_clip

    if spec.name.startswith(LOCAL_DIR):
        check_local_dir(spec)
        return
    if spec.name.startswith(HF_HUB):
        return
    if spec.name not in open_clip.list_models():
        raise ModelError(
            f"Unknown model {spec.name!r}: use a name from open_clip.list_models(), hf-hub:org/repo or local-dir:/path."
        )
    tags = open_clip.list_pretrained_tags_by_model(spec.name)
    if not spec.pretrained:
        raise ModelError(f"Model {spec.name} needs --pretrained TAG; known tags: {', '.join(tags) or 'none'}.")
    if spec.pretrained and spec.pretrained not in tags and not Path(spec.pretrained).is_file():
        raise ModelError(
            f"Model {spec.name} has no pretrained weights tagged {spec.pretrained!r}; known tags: {', '.join(tags)}."
        )


def check_local_dir(spec: ModelSpec) -> None:
    """A clear error when a ``local-dir:`` spec does not name a model folder."""
    folder = Path(spec.name[len(LOCAL_DIR) :])
    if not (folder / "open_clip_config.json").is_file():
        raise ModelError(f"{folder} is not a model folder: it has no open_clip_config.json.")


def missing_weights_message(spec: ModelSpec) -> str:
    offline = " (HF_HUB_OFFLINE is set, so nothing was downloaded)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return (
        f"The weights of model {spec} could not be loaded: they are not in the local Hugging Face cache and could "
        f"not be downloaded{offline}. Run clipsearch once with a network connection so open_clip can download them "
        "into the cache (~/.cache/huggingface, or $HF_HOME), or point to weights you already have: "
        "--model local-dir:/path/to/folder (with open_clip_config.json and open_clip_model.safetensors), "
        "--model hf-hub:org/repo (found in the local cache when HF_HUB_OFFLINE=1), or "
        "--model NAME --pretrained /path/to/weights.bin."
    )
