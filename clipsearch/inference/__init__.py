"""Inference: the backends that turn pixels and text into unit vectors, chosen by measurement.

    torch (the reference; fp16 on CUDA) ─┐
    ONNX Runtime fp32 / int8 ────────────┼── the same calls (`encoders.py`): encode_pixels, encode_texts, ...
    OpenVINO fp32 / bf16 ────────────────┘

- ``export.py``: each tower exported once from open_clip to ONNX, cached by the model's identity.
- ``probe.py``: the fastest backend whose vectors stay within cosine 0.999 of torch fp32, per machine and model.
- ``tokenizer.py``: open_clip's tokenizers without torch, through the `tokenizers` library.
- ``geometry.py``: open_clip's resize and crop in Pillow alone.
- ``loader.py``: what the rest of clipsearch calls:

    load_text_encoder(spec)          texts → vectors; torch-free once the export is cached
    load_image_encoder(spec, ...)    pixels → vectors, with the probe's (or a forced) backend
    ImageEncoderLoader(spec, ...)    the same in the background, for an index run
    remembered_choice(spec)          the probe's record, for `clipsearch stats`

Nothing here imports torch, open_clip or a runtime at module level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipsearch.inference.loader import (
        ImageEncoderLoader,
        Request,
        load_image_encoder,
        load_text_encoder,
        remembered_choice,
    )

__all__ = ["ImageEncoderLoader", "Request", "load_image_encoder", "load_text_encoder", "remembered_choice"]


def __getattr__(name: str) -> Any:
    # Lazy: clipsearch.model imports the geometry from this package, and the loader imports clipsearch.model.
    if name in __all__:
        from clipsearch.inference import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'clipsearch.inference' has no attribute {name!r}")
