"""The probe: which backend and precision encode this model fastest on this machine, faithfully.

At first use on a machine and model it times every candidate on a calibration batch of real decoded photos
from the run and compares its vectors with torch fp32's (the reference): the fastest whose minimum cosine is at
least `MIN_COSINE` wins. A candidate that is missing, fails, or is unfaithful is skipped with its reason. The
record is kept in ``<cache>/probes/<machine>/<model key>.json``; a later run (or a forced ``--backend`` and
``--precision`` that the record already covers) needs neither torch nor another measurement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.errors import BackendError
from clipsearch.inference.cache import cache_dir, machine_id, read_json, write_json

MIN_COSINE = 0.999
CALIBRATION_IMAGES = 16
BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = {"torch": ("fp32", "fp16"), "onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16")}
CPU_CANDIDATES = (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"),
                  ("openvino", "bf16"))

Log = Callable[[str], None]


def label(backend: str, precision: str) -> str:
    return f"{backend} {precision}"


@dataclass
class ProbeRecord:
    """What the probe measured for one model on this machine: per candidate, images/s and minimum cosine to
    torch fp32, or why it was skipped; and the choice."""

    key: str
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)
    chosen: str | None = None

    def faithful(self, name: str) -> bool:
        result = self.candidates.get(name) or {}
        return result.get("error") is None and float(result.get("min_cosine", 0.0)) >= MIN_COSINE

    def fastest(self, allowed: list[str]) -> str | None:
        faithful = [n for n in allowed if self.faithful(n)]
        return max(faithful, key=lambda n: self.candidates[n]["images_per_second"], default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "candidates": self.candidates, "chosen": self.chosen, "machine": machine_id(),
                "min_cosine_required": MIN_COSINE}


def record_path(key: str) -> Path:
    return cache_dir() / "probes" / machine_id() / f"{key}.json"


def load_record(key: str) -> ProbeRecord:
    data = read_json(record_path(key)) or {}
    return ProbeRecord(key, dict(data.get("candidates") or {}), data.get("chosen"))


def save_record(record: ProbeRecord) -> None:
    try:
        write_json(record_path(record.key), record.to_dict())
    except OSError:  # a read-only cache: the probe runs again next time, nothing is wrong
        pass


def candidates_for(backend: str | None, precision: str | None) -> list[tuple[str, str]]:
    """The CPU candidates a request allows: all, one backend's, one precision's, or exactly one."""
    for name, value, known in (("backend", backend, BACKENDS),
                               ("precision", precision, sorted({p for ps in PRECISIONS.values() for p in ps}))):
        if value is not None and value not in known:
            raise BackendError(f"Unknown {name} {value!r}; choose one of {', '.join(known)}.")
    chosen = [(b, p) for b, p in CPU_CANDIDATES if backend in (None, b) and precision in (None, p)]
    if chosen:
        return chosen
    if backend is None:
        raise BackendError(f"No backend runs {precision} on a CPU; {precision} is for torch on a CUDA GPU.")
    on_cpu = [p for b, p in CPU_CANDIDATES if b == backend]
    raise BackendError(f"The {backend} backend has no {precision} precision on a CPU; it has {', '.join(on_cpu)}.")


def run_probe(record: ProbeRecord, candidates: list[tuple[str, str]], pixels: np.ndarray,
              build: Callable[[str, str], Any], reference: Any, log: Log) -> None:
    """Measure each candidate not yet in ``record`` on ``pixels``; ``build(backend, precision)`` makes an
    encoder (raising when it cannot), ``reference`` is the torch fp32 encoder."""
    expected = reference.encode_pixels(pixels)  # also the reference's warm-up
    record.candidates[label("torch", "fp32")] = _timed(reference, pixels, expected, vectors=expected)
    for backend, precision in candidates:
        name = label(backend, precision)
        if name in record.candidates:
            continue
        record.candidates[name] = _measure(build, backend, precision, pixels, expected)
        _report(name, record.candidates[name], log)


def _measure(build: Callable[[str, str], Any], backend: str, precision: str, pixels: np.ndarray,
             expected: np.ndarray) -> dict[str, Any]:
    try:
        encoder = build(backend, precision)
        return _timed(encoder, pixels, expected)
    except Exception as error:  # any failure of a runtime on this machine only rules it out
        return {"error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}


def _timed(encoder: Any, pixels: np.ndarray, expected: np.ndarray,
           vectors: np.ndarray | None = None) -> dict[str, Any]:
    """The first pass warms the runtime up and gives the vectors (unless given); the second is timed."""
    vectors = encoder.encode_pixels(pixels) if vectors is None else vectors
    cosine = float(np.min(np.sum(vectors * expected, axis=1)))
    started = time.perf_counter()
    encoder.encode_pixels(pixels)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {"images_per_second": round(len(pixels) / seconds, 2), "min_cosine": round(cosine, 6),
                              "error": None}
    if cosine < MIN_COSINE:
        result["error"] = f"not faithful: minimum cosine {cosine:.4f} to torch fp32 (at least {MIN_COSINE} needed)"
    return result


def _report(name: str, result: dict[str, Any], log: Log) -> None:
    if result.get("error"):
        log(f"probe: {name} skipped ({result['error']})")
    else:
        log(f"probe: {name} {result['images_per_second']:.1f} images/s, min cosine {result['min_cosine']:.5f}")


