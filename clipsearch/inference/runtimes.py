"""The runtimes that run an exported graph: ONNX Runtime and OpenVINO, each behind ``run(array) -> array``.

Both are imported only here, inside functions. A runtime whose package is missing raises `BackendError` with the
one sentence that says how to install it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.errors import BackendError
from clipsearch.inference.cache import cache_dir

INSTALL_HINTS = {
    "onnxruntime": "The onnxruntime backend needs ONNX Runtime: pip install onnxruntime.",
    "openvino": "The openvino backend needs OpenVINO: pip install 'clipsearch[openvino]'.",
}


def import_runtime(name: str) -> Any:
    """The runtime's module, or BackendError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise BackendError(INSTALL_HINTS[name]) from error


def is_installed(name: str) -> bool:
    """Whether the runtime imports (a package that is present but broken counts as missing)."""
    try:
        import_runtime(name)
    except BackendError:
        return False
    return True


class OnnxRuntimeSession:
    """One ONNX graph in an ONNX Runtime CPU session."""

    def __init__(self, path: Path, threads: int | None) -> None:
        ort = import_runtime("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are not ours to fix
        if threads:
            options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def run(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(self._session.run(None, {self._input: array})[0], dtype=np.float32)


class OpenVinoSession:
    """One ONNX graph compiled by OpenVINO for the CPU, at f32 or bf16 inference precision. Compiled blobs are
    cached in ``<cache>/openvino`` so a later process compiles in a fraction of the time."""

    def __init__(self, path: Path, threads: int | None, precision: str) -> None:
        ov = import_runtime("openvino")
        core = ov.Core()
        core.set_property({"CACHE_DIR": str(cache_dir() / "openvino")})
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                                  "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = core.compile_model(str(path), "CPU", config)
        self._request = self._compiled.create_infer_request()

    def run(self, array: np.ndarray) -> np.ndarray:
        result = self._request.infer({0: array})
        return np.array(next(iter(result.values())), dtype=np.float32)


def openvino_precisions() -> list[str]:
    """What OpenVINO can run on this CPU: f32 always, bf16 where the CPU has bf16 instructions."""
    if not is_installed("openvino"):
        return []
    ov = import_runtime("openvino")
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ["fp32", "bf16"] if "BF16" in capabilities else ["fp32"]


def cpu_threads() -> int:
    """The cores this process may use (a container's CPU set, where the platform tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
