"""Where a model's weights are on this machine, found without importing torch where possible.

The identity of an exported model is its spec plus the digest of its weights file, so finding that file is the
first step of every run. For ``local-dir:`` folders and ``hf-hub:`` repositories already in the Hugging Face
cache this needs no torch; for a built-in name the pretrained table lives in open_clip, so the first run
imports it and the answer is remembered in the cache (``sources.json``) for every later process.

Weights that are not on this machine are looked for on the network only if the network answers at all, and
then by open_clip itself; with no network the caller gets the one-sentence explanation at once, instead of
huggingface_hub's minute of retries.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipsearch.errors import ModelError
from clipsearch.inference.cache import cache_dir, read_json, write_json
from clipsearch.model import (
    DEFAULT_MODEL_NAME,
    DEFAULT_PRETRAINED,
    HF_HUB,
    LOCAL_DIR,
    ModelSpec,
    check_local_dir,
    missing_weights_message,
)

SOURCES_FILE = "sources.json"
HF_CONFIG_NAME = "open_clip_config.json"
# open_clip's own preference among checkpoint names (``open_clip.factory._find_checkpoint_in_dir``)
CHECKPOINT_NAMES = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
    "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
)  # fmt: skip
NETWORK_TIMEOUT_S = 3.0
DEFAULT_HF_HUB = "laion/CLIP-ViT-B-32-256x256-DataComp-s34B-b86K/"  # open_clip's entry for the default model


@dataclass(frozen=True)
class ModelSource:
    """The files that make a model on this machine: its weights and (for folders and hub repos) its config."""

    spec: ModelSpec
    weights: Path
    config: Path | None = None


def locate(spec: ModelSpec) -> ModelSource | None:
    """The model's files, when they are on this machine and can be found without torch; else None."""
    if spec.name.startswith(LOCAL_DIR):
        return _local_dir(spec)
    if spec.name.startswith(HF_HUB):
        return _hub_repo(spec, spec.name[len(HF_HUB) :])
    if spec.pretrained and Path(spec.pretrained).expanduser().is_file():
        return ModelSource(spec, Path(spec.pretrained).expanduser().resolve())
    remembered = (read_json(cache_dir() / SOURCES_FILE) or {}).get(_key(spec))
    if remembered and Path(remembered).is_file():
        return ModelSource(spec, Path(remembered))
    return None


def locate_or_explain(spec: ModelSpec) -> ModelSource | None:
    """Like `locate`, also looking up a built-in name's pretrained table (this imports open_clip). Raises the
    missing-weights explanation when the weights are not here and the network does not answer; returns None
    when they are not here but may be downloaded."""
    found = locate(spec)
    if found is not None:
        return found
    if spec.name.startswith(LOCAL_DIR):
        check_local_dir(spec)
        raise ModelError(f"{spec.name[len(LOCAL_DIR):]} holds no weights file (open_clip_model.safetensors).")
    found = _builtin(spec) if not spec.name.startswith(HF_HUB) else None
    if found is not None:
        return found
    if os.environ.get("HF_HUB_OFFLINE") or not network_answers():
        raise ModelError(missing_weights_message(spec))
    return None


def remember(source: ModelSource) -> None:
    """Record where a built-in model's weights are, so later processes find them without open_clip."""
    if source.spec.name.startswith((LOCAL_DIR, HF_HUB)):
        return
    path = cache_dir() / SOURCES_FILE
    known = read_json(path) or {}
    if known.get(_key(source.spec)) != str(source.weights):
        known[_key(source.spec)] = str(source.weights)
        write_json(path, known)


def weights_path_after_load(spec: ModelSpec) -> ModelSource | None:
    """After open_clip has loaded (and perhaps downloaded) the model: where its weights now are."""
    return locate(spec) or _builtin(spec)


def _key(spec: ModelSpec) -> str:
    return f"{spec.name}|{spec.pretrained or ''}"


def _local_dir(spec: ModelSpec) -> ModelSource | None:
    folder = Path(spec.name[len(LOCAL_DIR) :])
    config = folder / HF_CONFIG_NAME
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file() and config.is_file():
            return ModelSource(spec, folder / name, config)
    return None


def _hub_repo(spec: ModelSpec, repo: str) -> ModelSource | None:
    config = _hub_cached(repo, HF_CONFIG_NAME)
    if config is None:
        return None
    for name in CHECKPOINT_NAMES[:4]:
        weights = _hub_cached(repo, name)
        if weights is not None:
            return ModelSource(spec, weights, config)
    return None


def _hub_cached(repo: str, filename: str) -> Path | None:
    """The file from the local Hugging Face cache, without any network access."""
    quiet_hub_logging()
    from huggingface_hub import try_to_load_from_cache

    found: Any = try_to_load_from_cache(repo_id=repo, filename=filename)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _pretrained_cfg(spec: ModelSpec) -> dict[str, Any]:
    """open_clip's pretrained table entry; the default model's is known here, so that its first run on a
    machine without weights or network answers without importing torch (a test keeps it equal to open_clip's)."""
    if (spec.name, spec.pretrained) == (DEFAULT_MODEL_NAME, DEFAULT_PRETRAINED):
        return {"hf_hub": DEFAULT_HF_HUB}
    import open_clip

    return open_clip.get_pretrained_cfg(spec.name, spec.pretrained or "") or {}


def _builtin(spec: ModelSpec) -> ModelSource | None:
    """A built-in name's weights from open_clip's pretrained table: in the HF cache or open_clip's URL cache."""
    cfg = _pretrained_cfg(spec)
    found: Path | None = None
    if cfg.get("file"):
        found = Path(cfg["file"])
    elif cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" names the default file, as in open_clip
        found = _hub_weights(repo, filename)
    elif cfg.get("url"):
        candidate = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        found = candidate if candidate.is_file() else None
    if found is None or not found.is_file():
        return None
    source = ModelSource(spec, found.resolve())
    remember(source)
    return source


def _hub_weights(repo: str, filename: str) -> Path | None:
    """open_clip's choice of file in a hub repo: the safetensors alternative first, then the named file."""
    names = [filename] if filename else []
    if not filename or filename == "open_clip_pytorch_model.bin":
        names = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    elif filename.endswith((".bin", ".pth")):
        names = [filename[:-4] + ".safetensors", filename]
    for name in names:
        found = _hub_cached(repo.rstrip("/"), name)
        if found is not None:
            return found
    return None


def network_answers(host: str | None = None) -> bool:
    """Whether the Hugging Face Hub can be reached at all (a name lookup and a TCP connection, 3 s at most).
    Behind a proxy the direct connection may fail although downloads work: then the download is tried."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = host or os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    name = endpoint.split("://", 1)[-1].split("/", 1)[0]
    hostname, _, port = name.partition(":")
    try:
        socket.create_connection((hostname, int(port or 443)), timeout=NETWORK_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def quiet_hub_logging() -> None:
    """huggingface_hub logs every retry as a warning; clipsearch says what went wrong in one sentence."""
    for name in ("huggingface_hub", "huggingface_hub.utils._http", "huggingface_hub.file_download"):
        logging.getLogger(name).setLevel(logging.ERROR)
