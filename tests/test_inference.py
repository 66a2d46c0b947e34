"""The inference layer: exported backends against torch fp32, the probe, the export cache, the torch-free
tokenizer and pixel geometry, and the CLI's --backend / --precision."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from clipsearch.errors import BackendError
from clipsearch.inference import probe
from clipsearch.inference.export import IMAGE_FP32, IMAGE_INT8, find_export
from clipsearch.inference.geometry import Geometry, PixelTransform
from clipsearch.inference.loader import ImageEncoderLoader, Request, available, build_image_encoder, ensure_export
from clipsearch.model import ClipModel, ModelSpec
from clipsearch.tinyclip import COMBOS, all_captions, draw_shape, random_init_dir

TOP_K = 5


def photos(count: int, size: tuple[int, int] = (150, 110), seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [draw_shape(*COMBOS[i % len(COMBOS)], size=size if i % 2 else size[::-1], rng=rng) for i in range(count)]


@pytest.fixture(scope="session")
def b32_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """ViT-B-32-256's real graph (768-wide vision tower, 32 px patches, 256 px input, 512-d text) with random
    weights, cut down to one layer per tower so that exporting and probing it take seconds."""
    from clipsearch.tinyclip import random_builtin_dir

    folder = random_builtin_dir(tmp_path_factory.mktemp("b32"), vision={"layers": 1}, text={"layers": 1})
    return f"local-dir:{folder}"


# --- pixels and tokens, without torch ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [64, 224, (224, 192)])
def test_pixel_transform_gives_open_clip_pixels(mode, size):
    from open_clip.transform import image_transform
    from PIL import Image
    from torchvision.transforms import Compose

    rng = np.random.default_rng(0)
    for interpolation in ("bicubic", "bilinear"):
        theirs = Compose(image_transform(size, False, resize_mode=mode, interpolation=interpolation,
                                         fill_color=0).transforms[:-2])
        ours = PixelTransform(Geometry.from_dict({"size": size, "resize_mode": mode,
                                                  "interpolation": interpolation}))
        for width, height in [(1, 1), (7, 300), (300, 7), (63, 64), (64, 64), (65, 64), (255, 257), (640, 480),
                              (480, 640), (1000, 333), (333, 1001), (129, 97), (2000, 1500)]:
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            expected = np.asarray(theirs(image))
            got = ours(image)
            assert got.shape == expected.shape and np.array_equal(got, expected), (mode, size, width, height)


TOKEN_CORPUS = [
    "a red car in the rain", "A Red CAR!!", "", "   ", "\t\n", "it's we're I'll they'd", "naïve café Ünïcödé",
    "日本語のテキスト 東京タワー", "한국어 문장", "emoji 🎉🐶 fun", "&amp;lt;b&amp;gt; html", "numbers 1234567 3.14",
    "tab\tnew\nline", "ﬁ ligature ＡＢＣ fullwidth", "mojibake cafÃ©", "İstanbul straße ΣΊΣΥΦΟΣ",
    "a-b_c.d/e\\f", "'''quotes'''", "hello<end_of_text>world", "x" * 500, " ".join(["word"] * 200),
    "Ein Hund spielt im Schnee", "¿Dónde está la playa?", "مرحبا بالعالم",
]  # fmt: skip


@pytest.mark.parametrize("context_length", [77, 16])
def test_tokenizer_gives_open_clip_ids_without_torch(tmp_path, context_length):
    import open_clip

    from clipsearch.inference.tokenizer import TextTokenizer, write_tokenizer

    theirs = open_clip.get_tokenizer("ViT-B-32", context_length=context_length)
    settings = write_tokenizer(theirs, tmp_path)
    assert settings is not None and settings["kind"] == "clip-bpe"
    corpus = TOKEN_CORPUS + all_captions()
    ours = TextTokenizer(tmp_path, settings)(corpus)
    assert ours.shape == (len(corpus), context_length)
    assert np.array_equal(ours, theirs(corpus).numpy())


# --- each backend against torch fp32 -----------------------------------------------------------------------


def _encoders(model: str) -> tuple[ClipModel, list]:
    spec = ModelSpec.parse(model)
    export, clip = ensure_export(spec)
    clip = clip or ClipModel.load(spec, "cpu")
    return clip, [build_image_encoder(export, b, p, clip=clip) for b, p in available(list(probe.CPU_CANDIDATES))]


@pytest.mark.parametrize("model_fixture", ["trained_model", "b32_model"])
def test_every_backend_gives_torch_fp32_results(model_fixture, request):
    clip, encoders = _encoders(request.getfixturevalue(model_fixture))
    pixels = np.stack([clip.pixel_transform(p) for p in photos(16)])
    expected = clip.encode_pixels(pixels)
    queries = clip.encode_texts(all_captions()[:8])
    top = np.argsort(-(queries @ expected.T), axis=1)[:, :TOP_K]
    assert {(e.backend, e.precision) for e in encoders} >= {("onnxruntime", "fp32"), ("onnxruntime", "int8")}
    for encoder in encoders:
        vectors = encoder.encode_pixels(pixels)
        cosine = np.sum(vectors * expected, axis=1)
        assert cosine.min() >= probe.MIN_COSINE, (encoder.backend, encoder.precision, cosine.min())
        found = np.argsort(-(queries @ vectors.T), axis=1)[:, :TOP_K]
        if model_fixture == "trained_model":  # random weights leave near-ties that any rounding may swap
            # the same best photo and the same top-k; the order of two photos within 1e-3 of each other may swap
            assert np.array_equal(found[:, 0], top[:, 0]), (encoder.backend, encoder.precision)
            assert [set(row) for row in found] == [set(row) for row in top], (encoder.backend, encoder.precision)


def test_exported_text_tower_gives_torch_scores(trained_model):
    from clipsearch.inference import load_text_encoder

    spec = ModelSpec.parse(trained_model)
    clip = ClipModel.load(spec, "cpu")
    assert load_text_encoder(spec, backend="torch").backend == "torch"
    exported = load_text_encoder(spec, export_if_missing=True)
    assert exported.backend == "onnxruntime"
    images = clip.encode_pixels(np.stack([clip.pixel_transform(p) for p in photos(35)]))
    texts = all_captions() + TOKEN_CORPUS
    ours, theirs = exported.encode_texts(texts) @ images.T, clip.encode_texts(texts) @ images.T
    assert np.abs(ours - theirs).max() <= 1e-3
    assert np.array_equal(np.argsort(-ours, axis=1)[:, :10], np.argsort(-theirs, axis=1)[:, :10])
    assert exported.logit_scale == pytest.approx(clip.logit_scale) and exported.dim == clip.dim


# --- the probe ---------------------------------------------------------------------------------------------


def _model_copy(tmp_path: Path, seed: int = 0) -> ModelSpec:
    return ModelSpec.parse(f"local-dir:{random_init_dir(tmp_path / f'model-{seed}', seed=seed)}")


def test_probe_skips_a_broken_backend_and_picks_a_faithful_one(tmp_path):
    spec = _model_copy(tmp_path)
    export, _clip = ensure_export(spec)
    other, _ = ensure_export(_model_copy(tmp_path, seed=1))
    # Deliberately broken: the int8 file now holds another model's tower (same shapes, other weights).
    shutil.copy(other.folder / IMAGE_FP32, export.folder / IMAGE_INT8)
    said: list[str] = []
    loader = ImageEncoderLoader(spec, Request(), log=said.append)
    calibration = np.stack([loader.pixel_transform()(p) for p in photos(16)])
    encoder = loader.encoder(calibration)
    record = probe.load_record(export.key)
    assert "not faithful" in record.candidates["onnxruntime int8"]["error"]
    assert any("onnxruntime int8 skipped (not faithful" in line for line in said)
    assert record.chosen == f"{encoder.backend} {encoder.precision}" != "onnxruntime int8"
    assert record.faithful(record.chosen)
    with pytest.raises(BackendError, match="onnxruntime int8 cannot be used.*not faithful"):
        ImageEncoderLoader(spec, Request("onnxruntime", "int8")).encoder(calibration)
    # remembered: the next loader needs no calibration and picks the same
    again = ImageEncoderLoader(spec, Request())
    assert not again.needs_calibration() and again.encoder().backend == encoder.backend


def test_export_is_rebuilt_when_the_weights_change(tmp_path):
    spec = _model_copy(tmp_path)
    first, _ = ensure_export(spec)
    assert find_export(spec) == first
    folder = Path(spec.name.split(":", 1)[1])
    random_init_dir(tmp_path / "new-weights", seed=5)
    shutil.copy(tmp_path / "new-weights" / "open_clip_model.safetensors", folder / "open_clip_model.safetensors")
    assert find_export(spec) is None  # the old export no longer matches these weights
    second, clip = ensure_export(spec)
    assert clip is not None and second.folder != first.folder and first.folder.is_dir()
    pixels = np.stack([clip.pixel_transform(p) for p in photos(4)])
    fresh = build_image_encoder(second, "onnxruntime", "fp32").encode_pixels(pixels)
    assert np.sum(fresh * clip.encode_pixels(pixels), axis=1).min() > 0.9999


def test_unknown_and_impossible_choices_are_one_sentence():
    with pytest.raises(BackendError, match="Unknown backend 'tensorrt'"):
        probe.candidates_for("tensorrt", None)
    with pytest.raises(BackendError, match="openvino backend has no int8 precision"):
        probe.candidates_for("openvino", "int8")


# --- whole runs ----------------------------------------------------------------------------------------------


def test_forced_backend_and_precision_from_the_cli(run_cli, shapes_folder, trained_model):
    result = run_cli("index", str(shapes_folder), "--backend", "onnxruntime", "--precision", "fp32",
                     model=trained_model)
    assert "(onnxruntime fp32)" in result.stdout
    found = json.loads(run_cli("search", "a red circle", "-k", "3", "--json", "--backend", "torch").stdout)
    assert Path(found[0]["path"]).name.startswith("red-circle")
    wrong = run_cli("index", str(shapes_folder), "--backend", "openvino", "--precision", "int8", check=False)
    assert wrong.returncode == 1 and wrong.stderr.strip().splitlines() == [
        "Error: The openvino backend has no int8 precision on a CPU; it has fp32, bf16."]


def test_a_missing_backend_package_is_one_sentence(run_cli, shapes_folder, random_model, tmp_path):
    fake = tmp_path / "site" / "openvino"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'openvino'\")\n")
    env = {"PYTHONPATH": str(fake.parent)}
    result = run_cli("index", str(shapes_folder), "--backend", "openvino", model=random_model, check=False, env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        "Error: The openvino backend needs OpenVINO: pip install 'clipsearch[openvino]'."
    assert "Traceback" not in result.stderr


def test_runs_with_a_cached_export_never_import_torch(run_cli, shapes_folder, trained_model, tmp_path,
                                                      library_dir):
    run_cli("index", str(shapes_folder), model=trained_model)  # exports and probes (or reuses the session's)
    (shapes_folder / "more").mkdir()
    draw_shape("circle", "red", 120, rng=np.random.default_rng(7)).save(shapes_folder / "more" / "new.jpg")
    script = textwrap.dedent(f"""
        import sys
        from clipsearch import Library, Searcher, index_folders
        report = index_folders(Library.create({str(library_dir)!r}), [{str(shapes_folder)!r}])
        results = Searcher({str(library_dir)!r}).query("a red circle", k=3)
        print(report.encoded, report.backend, results[0].name, "torch" in sys.modules, "open_clip" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "CLIPSEARCH_LIBRARY": str(library_dir)})
    encoded, backend, best, torch_loaded, open_clip_loaded = done.stdout.split()
    assert (encoded, torch_loaded, open_clip_loaded) == ("1", "False", "False"), done.stderr
    assert backend in ("onnxruntime", "openvino") and best.startswith("red-circle")
    stats = json.loads(run_cli("stats", "--json").stdout)
    assert stats["encoder"]["backend"] == backend and stats["encoder"]["min_cosine"] >= probe.MIN_COSINE


def test_no_weights_and_no_network_is_one_paragraph_at_once(run_cli, shapes_folder, tmp_path):
    # Not offline by setting, but with nothing answering where the Hub should be (a closed port on this machine).
    env = {"HF_HUB_OFFLINE": "", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = run_cli("index", str(shapes_folder), check=False, env=env)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: The weights of model ViT-B-32-256")
    assert "local-dir:" in lines[0]


def test_the_default_models_hub_repo_is_open_clips():
    import open_clip

    from clipsearch.inference.source import DEFAULT_HF_HUB
    from clipsearch.model import DEFAULT_MODEL_NAME, DEFAULT_PRETRAINED

    assert open_clip.get_pretrained_cfg(DEFAULT_MODEL_NAME, DEFAULT_PRETRAINED)["hf_hub"] == DEFAULT_HF_HUB
