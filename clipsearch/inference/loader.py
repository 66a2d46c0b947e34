"""Getting the encoders a process needs: the text encoder for queries, the image encoder for an index run.

A cached export and a remembered probe make both torch-free: finding the weights (a stat and the memoised
digest), reading ``meta.json`` and opening a runtime session. Otherwise torch loads the model once, exports it,
and (for an index run) the probe measures the candidates on the run's first photos.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipsearch.errors import BackendError, ModelError
from clipsearch.inference import probe
from clipsearch.inference.encoders import ExportedImageEncoder, ExportedTextEncoder, ImageEncoder, TextEncoder
from clipsearch.inference.export import Export, export_model, find_export
from clipsearch.inference.geometry import PixelTransform
from clipsearch.inference.runtimes import (
    INSTALL_HINTS,
    OnnxRuntimeSession,
    OpenVinoSession,
    cpu_threads,
    is_installed,
    openvino_precisions,
)
from clipsearch.inference.source import weights_path_after_load
from clipsearch.model import ClipModel, ModelSpec, choose_device

Log = Callable[[str], None]


@dataclass(frozen=True)
class Request:
    """What the user asked for: a backend, a precision, a device; None leaves the choice to the probe."""

    backend: str | None = None
    precision: str | None = None
    device: str | None = None
    threads: int | None = None  # the runtime's threads (None: every core this process may use)


def resolve_device(requested: str | None) -> str:
    """``cpu`` unless a GPU is asked for or present. Without an NVIDIA driver on the machine there can be no
    CUDA, which is known without importing torch."""
    if requested in (None, "", "auto"):
        return choose_device(None) if _nvidia_driver_present() else "cpu"
    return "cpu" if requested == "cpu" else choose_device(requested)


def _nvidia_driver_present() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def ensure_export(spec: ModelSpec, clip: ClipModel | None = None, log: Log | None = None) -> tuple[Export,
                                                                                                    ClipModel | None]:
    """The model's export, made now (with torch) when the cache has none; and the torch model if one was loaded."""
    export = find_export(spec)
    if export is not None:
        return export, clip
    clip = clip if clip is not None and clip.device == "cpu" else ClipModel.load(spec, "cpu")
    source = weights_path_after_load(spec)
    if source is None:
        raise ModelError(f"The weights of model {spec} were loaded but their file could not be found to export it.")
    return export_model(clip, source, log), clip


# --- text -----------------------------------------------------------------------------------------------------


def load_text_encoder(spec: ModelSpec, *, backend: str | None = None, device: str | None = None,
                      export_if_missing: bool = False, log: Log | None = None) -> TextEncoder:
    """The text encoder for queries: the exported text tower in ONNX Runtime with the torch-free tokenizer when
    the model's export is cached and passed its checks against open_clip (then neither torch nor open_clip is
    imported), else torch. An index run on a CPU makes the export; ``export_if_missing`` makes it here instead
    (once: seconds for small models, a minute for large ones). ``backend="torch"`` or a GPU device asks for
    torch."""
    if backend not in (None, "torch", "onnxruntime", "openvino"):
        probe.candidates_for(backend, None)  # raises the unknown-backend sentence
    if backend == "torch" or (device not in (None, "", "auto", "cpu")):
        return ClipModel.load(spec, device)
    if not is_installed("onnxruntime"):
        if backend is not None:
            raise BackendError(INSTALL_HINTS["onnxruntime"])
        return ClipModel.load(spec, "cpu")
    export, clip = find_export(spec), None
    if export is None:
        if not export_if_missing and backend is None:
            return ClipModel.load(spec, "cpu")
        export, clip = ensure_export(spec, log=log)
    if export.text_file is None:
        return clip or ClipModel.load(spec, "cpu")
    return exported_text_encoder(export)


def exported_text_encoder(export: Export) -> ExportedTextEncoder:
    from clipsearch.inference.tokenizer import TextTokenizer

    assert export.text_file is not None
    tokenizer = TextTokenizer(export.folder, export.meta["tokenizer"])
    return ExportedTextEncoder(export, OnnxRuntimeSession(export.text_file, threads=None), tokenizer)


# --- images ---------------------------------------------------------------------------------------------------


def build_image_encoder(export: Export, backend: str, precision: str, clip: ClipModel | None = None,
                        threads: int | None = None) -> ImageEncoder:
    """One candidate as a ready encoder; BackendError when its package is missing or this CPU cannot run it."""
    threads = threads or cpu_threads()
    if backend == "torch":
        return clip if clip is not None else ClipModel.load(ModelSpec.from_dict(export.meta["spec"]), "cpu")
    if backend == "onnxruntime":
        path = export.image_file(precision)
        if path is None:
            raise BackendError(f"The export of this model has no {precision} image tower.")
        return ExportedImageEncoder(export, OnnxRuntimeSession(path, threads), backend, precision)
    if precision not in openvino_precisions():
        raise BackendError(INSTALL_HINTS["openvino"] if not is_installed("openvino")
                           else f"OpenVINO cannot run {precision} on this CPU.")
    path = export.image_file("fp32")
    assert path is not None
    return ExportedImageEncoder(export, OpenVinoSession(path, threads, precision), backend, precision)


def available(candidates: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The candidates this machine can run at all (their package installed, their precision supported)."""
    openvino = openvino_precisions()
    onnxruntime = is_installed("onnxruntime")
    return [(b, p) for b, p in candidates
            if b == "torch" or (b == "onnxruntime" and onnxruntime) or (b == "openvino" and p in openvino)]


def check_request(backend: str | None, precision: str | None) -> list[tuple[str, str]]:
    """The CPU candidates a request leaves that this machine can run; BackendError with the reason when none."""
    wanted = probe.candidates_for(backend, precision)
    runnable = available(wanted)
    if not runnable:  # only a forced choice can leave nothing: say why it cannot run
        backend, precision = wanted[0]
        if backend in INSTALL_HINTS and not is_installed(backend):
            raise BackendError(INSTALL_HINTS[backend])
        raise BackendError(f"The {backend} backend cannot run {precision} on this CPU.")
    return runnable


class ImageEncoderLoader:
    """Prepares an index run's image encoder in a background thread while the run crawls, plans and decodes.

    ``pixel_transform()`` is ready as soon as the export's metadata is read (at once when it is cached);
    ``encoder(calibration)`` gives the encoder, running the probe on ``calibration`` (the run's first decoded
    photos) when this machine has no record for the model yet.
    """

    def __init__(self, spec: ModelSpec, request: Request | None = None, log: Log | None = None) -> None:
        self.spec, self.request, self.log = spec, request or Request(), log or (lambda _message: None)
        self.device = "cpu"
        self.export: Export | None = None
        self.record: probe.ProbeRecord | None = None
        self._clip: ClipModel | None = None
        self._encoder: ImageEncoder | None = None
        self._error: BaseException | None = None
        self._transform_ready = threading.Event()
        self._thread = threading.Thread(target=self._prepare, name="clipsearch-model", daemon=True)
        self._thread.start()

    def pixel_transform(self) -> PixelTransform:
        self._transform_ready.wait()
        self._raise_error()
        if self._encoder is not None:
            return self._encoder.pixel_transform
        assert self.export is not None
        return self.export.pixel_transform

    def needs_calibration(self) -> bool:
        self._thread.join()
        self._raise_error()
        return self._encoder is None

    def encoder(self, calibration: np.ndarray | None = None) -> ImageEncoder:
        """The chosen encoder; ``calibration``: uint8 pixels of real photos, used only if the probe must run."""
        if self.needs_calibration():
            self._encoder = self._probe(calibration)
        assert self._encoder is not None
        return self._encoder

    # --- in the background thread -------------------------------------------------------------------------

    def _prepare(self) -> None:
        try:
            self.device = resolve_device(self.request.device)
            if self.device != "cpu":  # a GPU keeps torch (fp16 on CUDA), as measured in benchmarks/README.md
                self._check_gpu_request()
                self._encoder = ClipModel.load(self.spec, self.device)
                return
            self.export, self._clip = ensure_export(self.spec, log=self.log)
            self._transform_ready.set()
            self.record = probe.load_record(self.export.key)
            choice = self._remembered_choice()
            if choice is not None:
                self._encoder = build_image_encoder(self.export, *choice, clip=self._clip,
                                                    threads=self.request.threads)
                self._drop_unused_torch()
        except BaseException as error:  # handed to the caller, in its thread
            self._error = error
        finally:
            self._transform_ready.set()

    def _check_gpu_request(self) -> None:
        if self.request.backend not in (None, "torch") or self.request.precision not in (None, "fp16"):
            raise BackendError(f"On {self.device} clipsearch encodes with torch fp16; leave out --backend and "
                               "--precision, or use --device cpu.")

    def _remembered_choice(self) -> tuple[str, str] | None:
        """The choice the record already answers: None when the probe must run. The usual case (the record's
        choice, allowed by the request) imports no runtime but the chosen one."""
        assert self.record is not None
        wanted = probe.candidates_for(self.request.backend, self.request.precision)
        names = [probe.label(*c) for c in wanted]
        if len(wanted) == 1 and names[0] in self.record.candidates:
            self._require_faithful(names[0])
            return wanted[0]
        if self.record.chosen in names and self.record.faithful(self.record.chosen or ""):
            return wanted[names.index(self.record.chosen or "")]
        allowed = self._allowed()
        names = [probe.label(*c) for c in allowed]
        if all(n in self.record.candidates for n in names):
            best = self.record.fastest(names)
            return allowed[names.index(best)] if best else ("torch", "fp32")
        return None

    def _allowed(self) -> list[tuple[str, str]]:
        return check_request(self.request.backend, self.request.precision)

    def _require_faithful(self, name: str) -> None:
        assert self.record is not None
        if not self.record.faithful(name):
            reason = self.record.candidates[name].get("error")
            raise BackendError(f"{name} cannot be used for this model on this machine ({reason}).")

    def _drop_unused_torch(self) -> None:
        if self._encoder is not self._clip:
            self._clip = None

    # --- in the caller's thread, with the first photos ----------------------------------------------------

    def _probe(self, calibration: np.ndarray | None) -> ImageEncoder:
        assert self.export is not None and self.record is not None
        allowed = self._allowed()
        if calibration is None or len(calibration) == 0:
            return self._choose(allowed, fallback_only=True)
        reference = self._clip or ClipModel.load(self.spec, "cpu")
        self._clip = reference
        pixels = np.ascontiguousarray(calibration[: probe.CALIBRATION_IMAGES])

        def build(backend: str, precision: str) -> ImageEncoder:
            return build_image_encoder(self.export, backend, precision, clip=reference,  # type: ignore[arg-type]
                                       threads=self.request.threads)

        self.log(f"probe: timing {', '.join(probe.label(*c) for c in allowed)} on {len(pixels)} photos")
        probe.run_probe(self.record, [c for c in allowed if c != ("torch", "fp32")], pixels, build, reference,
                        self.log)
        return self._choose(allowed)

    def _choose(self, allowed: list[tuple[str, str]], fallback_only: bool = False) -> ImageEncoder:
        assert self.export is not None and self.record is not None
        names = [probe.label(*c) for c in allowed]
        forced = len(allowed) == 1
        if forced and not fallback_only:
            self._require_faithful(names[0])
        best = None if fallback_only else self.record.fastest(names)
        choice = allowed[names.index(best)] if best else ("torch", "fp32")
        if fallback_only and forced:  # forced, with no photos to check it on here: as asked
            choice = allowed[0]
        if not fallback_only:
            if not forced:  # the machine's own choice; a forced run only adds its measurement
                self.record.chosen = probe.label(*choice)
                self.log(f"probe: chose {self.record.chosen}")
            probe.save_record(self.record)
        encoder = build_image_encoder(self.export, *choice, clip=self._clip, threads=self.request.threads)
        self._drop_unused_torch()
        return encoder

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


def load_image_encoder(spec: ModelSpec, *, backend: str | None = None, precision: str | None = None,
                       device: str | None = None, calibration: np.ndarray | None = None,
                       log: Log | None = None) -> ImageEncoder:
    """The image encoder this machine chose for ``spec`` (or the one forced); without a probe record and
    without ``calibration`` photos to run the probe on, the torch fp32 reference (which is also what a model
    not exported yet gets, unless another backend is asked for: exporting is an index run's job)."""
    if calibration is None and backend in (None, "torch") and precision in (None, "fp32") \
            and resolve_device(device) == "cpu" and find_export(spec) is None:
        return ClipModel.load(spec, "cpu")
    return ImageEncoderLoader(spec, Request(backend, precision, device), log).encoder(calibration)


def remembered_choice(spec: ModelSpec) -> dict[str, Any] | None:
    """What the probe chose for ``spec`` on this machine, with its measurement; None when it has not run (or
    the export is not cached). Torch-free: for `clipsearch stats`."""
    export = find_export(spec)
    if export is None:
        return None
    record = probe.load_record(export.key)
    if not record.chosen:
        return None
    backend, precision = record.chosen.split(" ", 1)
    measured = record.candidates.get(record.chosen) or {}
    return {"backend": backend, "precision": precision, "images_per_second": measured.get("images_per_second"),
            "min_cosine": measured.get("min_cosine"), "candidates": record.candidates}
