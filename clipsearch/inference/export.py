"""Exporting a model's two towers from open_clip to ONNX, once, into the cache; and finding that export again.

An export is a folder in ``<cache>/exports/`` named by the model's identity: its spec, the SHA-256 of its weights
file (memoised, `cache.file_digest`), its config, the export settings and this module's version. Changed
weights or settings give another name, so a stale export is never used (and old ones can simply be deleted).
The folder holds:

    image.onnx        uint8 (B, H, W, 3) pixels → (B, dim) unit vectors; dynamic batch
    image-int8.onnx   the same with int8 weights (ONNX Runtime's dynamic quantisation)
    text.onnx         int64 (B, context) token ids → (B, dim) unit vectors
    tokenizer.json    for `tokenizer.TextTokenizer`
    meta.json         what a torch-free process needs: geometry, mean/std, dim, logit_scale, context length,
                      tokenizer settings, which files exist and the checks they passed; written last

The normalisation (uint8 → float, mean, std) and the final L2 normalisation are inside the graphs, so every
runtime does the same maths. The folder is built under a temporary name and renamed into place, so a process
that finds ``meta.json`` finds a complete export.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.inference.cache import cache_dir, file_digest, read_json, write_json
from clipsearch.inference.geometry import Geometry, PixelTransform
from clipsearch.inference.source import ModelSource, locate
from clipsearch.model import ModelSpec

if TYPE_CHECKING:
    from clipsearch.model import ClipModel

EXPORT_VERSION = 1
OPSET = 17
META_FILE = "meta.json"
IMAGE_FP32, IMAGE_INT8, TEXT_FP32 = "image.onnx", "image-int8.onnx", "text.onnx"
# Texts whose tokens and vectors must match open_clip's before the torch-free text path is trusted.
TEXT_CHECKS = (
    "a red car in the rain", "A Red CAR!!", "", "   ", "it's we're I'll they'd", "naïve café Ünïcödé",
    "日本語のテキスト 東京タワー", "emoji 🎉🐶", "&amp;lt;b&amp;gt; html", "numbers 1234567 3.14",
    "tab\tnew\nline", "ﬁ ligature ＡＢＣ", "İstanbul straße ΣΊΣΥΦΟΣ", "a-b_c.d/e\\f", " ".join(["word"] * 120),
)  # fmt: skip
TEXT_TOLERANCE = 1e-4  # largest L2 distance of a text vector from torch's: keeps every score within 1e-3


@dataclass(frozen=True)
class Export:
    """A complete export folder and its metadata (torch-free)."""

    folder: Path
    meta: dict[str, Any]

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_dict(self.meta["geometry"])

    @property
    def pixel_transform(self) -> PixelTransform:
        return PixelTransform(self.geometry)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def key(self) -> str:
        return str(self.meta["key"])

    def image_file(self, precision: str) -> Path | None:
        name = (self.meta.get("image") or {}).get(precision)
        return self.folder / name if name else None

    @property
    def text_file(self) -> Path | None:
        """The text tower, when it and the tokenizer passed the export's checks against open_clip."""
        text = self.meta.get("text") or {}
        return self.folder / text["file"] if text.get("faithful") and self.meta.get("tokenizer") else None


def exports_dir() -> Path:
    return cache_dir() / "exports"


def model_key(source: ModelSource) -> str:
    """The identity of an export: spec, weights digest, config, export settings and versions."""
    import hashlib

    config = file_digest(source.config) if source.config else None
    identity = {
        "spec": source.spec.to_dict(), "weights": file_digest(source.weights), "config": config,
        "export_version": EXPORT_VERSION, "opset": OPSET, "open_clip": _version("open_clip_torch"),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def find_export(spec: ModelSpec) -> Export | None:
    """The cached export of ``spec``'s current weights, found without importing torch; None when there is none
    (or the weights are not found without open_clip)."""
    source = locate(spec)
    if source is None:
        return None
    return load_export(exports_dir() / model_key(source))


def load_export(folder: Path) -> Export | None:
    meta = read_json(folder / META_FILE)
    if not meta or meta.get("export_version") != EXPORT_VERSION:
        return None
    return Export(folder, meta)


def export_model(clip: ClipModel, source: ModelSource, log: Any = None) -> Export:
    """Export ``clip`` (an open_clip model loaded by the torch backend) into the cache; returns the export. An
    export that is already there (another process made it meanwhile) is used as it is."""
    key = model_key(source)
    target = exports_dir() / key
    existing = load_export(target)
    if existing is not None:
        return existing
    exports_dir().mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=exports_dir(), prefix=f".{key}."))
    try:
        started = time.perf_counter()
        meta = _write_export(clip, source, key, building)
        meta["export_seconds"] = round(time.perf_counter() - started, 2)
        write_json(building / META_FILE, meta)
        _move_into_place(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    if log:
        log(f"exported {source.spec} in {meta['export_seconds']:.1f}s")
    return load_export(target) or Export(target, meta)


def _move_into_place(building: Path, target: Path) -> None:
    try:
        os.rename(building, target)
    except OSError:
        if not (target / META_FILE).is_file():  # not a concurrent export that won: a real failure
            raise


def _write_export(clip: ClipModel, source: ModelSource, key: str, folder: Path) -> dict[str, Any]:
    from clipsearch.inference.tokenizer import write_tokenizer

    _export_image(clip, folder / IMAGE_FP32)
    image = {"fp32": IMAGE_FP32}
    if _quantize(folder / IMAGE_FP32, folder / IMAGE_INT8):
        image["int8"] = IMAGE_INT8
    tokenizer = write_tokenizer(clip.tokenizer, folder)
    text = _export_text(clip, folder / TEXT_FP32)
    if text is not None:
        text["faithful"] = tokenizer is not None and _text_is_faithful(clip, folder, tokenizer, text)
    return {
        "export_version": EXPORT_VERSION, "key": key, "spec": source.spec.to_dict(), "weights": str(source.weights),
        "geometry": clip.geometry.to_dict(), "mean": clip.mean, "std": clip.std, "dim": clip.dim,
        "logit_scale": clip.logit_scale, "context_length": _context_length(clip), "tokenizer": tokenizer,
        "image": image, "text": text, "opset": OPSET, "made_with": {"torch": _version("torch"),
                                                                   "open_clip": _version("open_clip_torch")},
    }  # fmt: skip


def _context_length(clip: ClipModel) -> int:
    length: Any = getattr(clip.tokenizer, "context_length", None)
    return int(length or getattr(clip.open_clip_model, "context_length", 77))


def _export_image(clip: ClipModel, path: Path) -> None:
    import torch

    graph = _ImageGraph(clip)
    height, width = clip.geometry.size
    example = torch.zeros((2, height, width, 3), dtype=torch.uint8)
    _onnx_export(graph, example, path, "pixels")


def _export_text(clip: ClipModel, path: Path) -> dict[str, Any] | None:
    """The text tower; None when it cannot be exported (queries then run it in torch)."""
    import torch

    example = torch.zeros((2, _context_length(clip)), dtype=torch.int64)
    try:
        _onnx_export(_TextGraph(clip), example, path, "tokens")
    except Exception as error:  # an exotic text tower: the torch path still works
        return {"file": None, "error": f"{type(error).__name__}: {error}"[:300]}
    return {"file": TEXT_FP32}


def _onnx_export(graph: Any, example: Any, path: Path, input_name: str) -> None:
    import torch

    with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
        # The TorchScript-based exporter handles open_clip's towers in seconds with a dynamic batch axis; torch
        # calls it legacy and says so on every call. With gradients on, nn.MultiheadAttention takes its plain
        # path: its inference fast path is one fused operator that ONNX has no counterpart for.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph.eval(), (example,), str(path), input_names=[input_name], output_names=["vectors"],
            dynamic_axes={input_name: {0: "batch"}, "vectors": {0: "batch"}}, opset_version=OPSET, dynamo=False,
        )


def _quantize(source: Path, target: Path) -> bool:
    """int8 weights for the matrix products (ONNX Runtime's dynamic quantisation): a quarter of the memory,
    and on CPUs with VNNI a good deal faster. Whether it stays faithful is the probe's question."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return False
    root = logging.getLogger()
    quiet = _DropRecordsFrom("quantize")  # its advice to pre-process is logged on the root logger, every time
    root.addFilter(quiet)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.removeFilter(quiet)
    return True


class _DropRecordsFrom(logging.Filter):
    def __init__(self, module: str) -> None:
        super().__init__()
        self.module = module

    def filter(self, record: logging.LogRecord) -> bool:
        return record.module != self.module


def _text_is_faithful(clip: ClipModel, folder: Path, tokenizer: dict[str, Any], text: dict[str, Any]) -> bool:
    """Same token ids as open_clip on varied texts and the captions, and vectors within TEXT_TOLERANCE of torch
    through ONNX Runtime: only then do queries skip torch."""
    from clipsearch.inference.runtimes import OnnxRuntimeSession
    from clipsearch.inference.tokenizer import TextTokenizer

    texts = list(TEXT_CHECKS) + builtin_captions()
    ours = TextTokenizer(folder, tokenizer)(texts)
    theirs = clip.tokenizer(texts).numpy()
    text["tokens_match"] = bool(np.array_equal(ours, theirs))
    if not text["tokens_match"]:
        return False
    sample = list(TEXT_CHECKS) + builtin_captions()[:: max(1, len(texts) // 16)]  # vectors: a sample suffices
    vectors = OnnxRuntimeSession(folder / TEXT_FP32, threads=None).run(TextTokenizer(folder, tokenizer)(sample))
    distance = float(np.max(np.linalg.norm(vectors - clip.encode_texts(sample), axis=1)))
    text["max_distance"] = distance
    return distance <= TEXT_TOLERANCE


def builtin_captions() -> list[str]:
    text = importlib.resources.files("clipsearch").joinpath("captions.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _graph_classes() -> tuple[type, type]:
    import torch

    class ImageGraph(torch.nn.Module):
        """uint8 NHWC pixels → unit vectors: the torch backend's preprocessing and normalisation, in the graph."""

        def __init__(self, clip: ClipModel) -> None:
            super().__init__()
            self.model = clip.open_clip_model
            self.register_buffer("mean", torch.tensor(clip.mean).reshape(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(clip.std).reshape(1, 3, 1, 1))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            floats = pixels.permute(0, 3, 1, 2).float() / 255.0
            mean, std = self.get_buffer("mean"), self.get_buffer("std")
            features = self.model.encode_image((floats - mean) / std).float()
            return torch.nn.functional.normalize(features, dim=1, eps=1e-12)

    class TextGraph(torch.nn.Module):
        def __init__(self, clip: ClipModel) -> None:
            super().__init__()
            self.model = clip.open_clip_model

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            features = self.model.encode_text(tokens).float()
            return torch.nn.functional.normalize(features, dim=1, eps=1e-12)

    return ImageGraph, TextGraph


def _ImageGraph(clip: ClipModel) -> Any:  # noqa: N802  (a class made on demand, so torch loads only here)
    return _graph_classes()[0](clip)


def _TextGraph(clip: ClipModel) -> Any:  # noqa: N802
    return _graph_classes()[1](clip)
