"""Loading models the ways open_clip names them, and encoding exactly as open_clip preprocesses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipsearch.errors import ModelError
from clipsearch.model import ClipModel, ModelSpec, choose_device
from clipsearch.tinyclip import draw_shape


def test_spec_parsing_normalises(tmp_path):
    assert ModelSpec.parse(None) == ModelSpec("ViT-B-32-256", "datacomp_s34b_b86k")
    local = ModelSpec.parse(f"local-dir:{tmp_path}/../{tmp_path.name}")
    assert local == ModelSpec(f"local-dir:{tmp_path.resolve()}", None)
    assert ModelSpec.parse("hf-hub:org/repo", "ignored").pretrained is None
    assert ModelSpec.from_dict(local.to_dict()) == local


def test_encoding_matches_open_clip_preprocessing(random_model):
    import open_clip
    import torch

    clip = ClipModel.load(ModelSpec.parse(random_model), "cpu")
    model, _, preprocess = open_clip.create_model_and_transforms(random_model)
    model.eval()
    pictures = [draw_shape("circle", "red", size=(150, 90), rng=np.random.default_rng(i)) for i in range(3)]
    with torch.inference_mode():
        reference = model.encode_image(torch.stack([preprocess(p) for p in pictures])).numpy()
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(clip.encode_images(pictures), reference, atol=1e-5)
    texts = clip.encode_texts(["a red circle", "a blue square"])
    assert texts.shape == (2, clip.dim) and np.allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)


def test_missing_local_dir_is_explained(tmp_path):
    with pytest.raises(ModelError, match="not a model folder"):
        ClipModel.load(ModelSpec.parse(f"local-dir:{tmp_path}"), "cpu")


def test_unknown_names_and_tags_are_explained():
    with pytest.raises(ModelError, match="Unknown model"):
        ClipModel.load(ModelSpec("NoSuchNet-9000", None), "cpu")
    with pytest.raises(ModelError, match="no pretrained weights tagged"):
        ClipModel.load(ModelSpec("ViT-B-32", "no-such-tag"), "cpu")


def test_uncached_hub_weights_fail_fast_offline():
    with pytest.raises(ModelError, match="could not be loaded"):
        ClipModel.load(ModelSpec("ViT-B-32", "laion2b_s34b_b79k"), "cpu")


def test_device_choice():
    import torch

    assert choose_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert choose_device("cpu") == "cpu"
    with pytest.raises(ModelError, match="Unknown device"):
        choose_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            choose_device("cuda")


def lay_out_hub_cache(cache: Path, repo: str, model_dir: Path) -> None:
    """The folder layout huggingface_hub uses: models--org--name/{refs/main, snapshots/<commit>/files}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy(model_dir / name, snapshot / name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def test_hf_hub_model_loads_from_local_cache_offline(run_cli, shapes_folder, random_model, tmp_path):
    cache = tmp_path / "hf-cache"
    lay_out_hub_cache(cache, "clipsearch/tiny-random", Path(random_model.split(":", 1)[1]))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run_cli("index", str(shapes_folder), "--model", "hf-hub:clipsearch/tiny-random", env=env)
    stats = json.loads(run_cli("stats", "--json", env=env).stdout)
    assert stats["indexed"] == 18 and stats["model"] == "hf-hub:clipsearch/tiny-random"
    assert run_cli("search", "a red circle", "-k", "1", env=env).stdout.strip()
