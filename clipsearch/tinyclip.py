"""A tiny CLIP that the project trains itself, on a synthetic world of coloured shapes.

No pretrained weights can be downloaded where clipsearch is built and tested, yet its tests should exercise a
real open_clip model end to end: real tokenizer, real towers, real `local-dir:` loading, and embeddings that
mean something ("a red circle" really is nearest to pictures of red circles). So this module holds:

- the shapes world: `SHAPES`, `COLOURS`, `caption()`, `draw_shape()`;
- the model: `MODEL_CFG` / `PREPROCESS_CFG`, `train()`, `save_local_dir()`, `random_init_dir()`;
- the sample photo library in `data/photos/`: `make_photos()`.

It is also a script::

    python -m clipsearch.tinyclip train --out data/tiny-clip [--steps N] [--seed S]
    python -m clipsearch.tinyclip photos --out data/photos
    python -m clipsearch.tinyclip random --out DIR [--seed S] [--embed-dim D]

torch and open_clip are imported inside functions so that importing this module stays instant.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

if TYPE_CHECKING:
    import torch

# --------------------------------------------------------------------------------------------------------------
# The shapes world
# --------------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# Saturated (or, for white, very bright) colours, far from the muted mid-tone backgrounds drawn below, and far
# enough from each other that a 64 px downscale with bicubic ringing cannot turn one into another.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 225, 20),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "purple": (135, 40, 175),
    "white": (248, 248, 248),
}

COMBOS: tuple[tuple[str, str], ...] = tuple((shape, colour) for colour in COLOURS for shape in SHAPES)


def caption(shape: str, colour: str) -> str:
    """The one sentence the model is trained on for a picture: `caption("circle", "red") == "a red circle"`."""
    if shape not in SHAPES or colour not in COLOURS:
        raise ValueError(f"unknown shape or colour: {shape!r}, {colour!r}")
    return f"a {colour} {shape}"


def all_captions() -> list[str]:
    """Every caption of the world, in `COMBOS` order."""
    return [caption(shape, colour) for shape, colour in COMBOS]


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A muted, blotchy, grainy background, so that finding the shape is not a matter of any coloured pixel.

    The blotches are made on a coarse grid and upscaled, so their size is relative to the picture: a 64 px and
    a 640 px picture look alike once both are resized to the model's input size.
    """
    base = rng.uniform(60, 165) + rng.uniform(-10, 10, size=3)  # a grey with a faint tint
    cells = int(rng.integers(3, 9))
    # Mostly light and shade, barely any hue: a coloured blotch must not pass for a coloured shape.
    blotches = rng.normal(0, 20, size=(cells, cells, 1)) + rng.normal(0, 4, size=(cells, cells, 3))
    coarse = Image.fromarray(np.clip(base + blotches, 0, 255).astype(np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    grain = rng.standard_normal((height, width, 1), dtype=np.float32) * rng.uniform(3, 14)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def _add_distractor_lines(image: Image.Image, rng: np.random.Generator) -> None:
    """A few faint grey strokes: edges that are not the shape."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(int(rng.integers(0, 4))):
        grey = int(rng.uniform(40, 190))
        points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
        draw.line(points, fill=(grey, grey, grey), width=max(1, round(min(width, height) * 0.015)))


def _regular_polygon(n: int, radius: float, angle: float, inner: float | None = None) -> list[tuple[float, float]]:
    """Vertices of a regular polygon (or, with `inner`, a star) of unit centre, pointing up at angle 0."""
    count = 2 * n if inner else n
    points = []
    for index in range(count):
        r = radius * (inner if inner and index % 2 else 1.0)
        theta = angle - math.pi / 2 + 2 * math.pi * index / count
        points.append((r * math.cos(theta), r * math.sin(theta)))
    return points


def _cross_outline(radius: float, angle: float) -> list[tuple[float, float]]:
    """A plus sign: arms of half-width 0.32 r, rotated by `angle`."""
    a, r = 0.32 * radius, radius
    outline = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a),
               (-a, -a)]
    cos, sin = math.cos(angle), math.sin(angle)
    return [(x * cos - y * sin, x * sin + y * cos) for x, y in outline]


def _outline(shape: str, radius: float, angle: float) -> list[tuple[float, float]]:
    # Radii are tuned so that every shape covers a similar area: size must not give the shape away.
    if shape == "square":
        return _regular_polygon(4, radius * 1.05, angle + math.pi / 4)
    if shape == "triangle":
        return _regular_polygon(3, radius * 1.25, angle)
    if shape == "star":
        return _regular_polygon(5, radius * 1.3, angle, inner=0.45)
    if shape == "cross":
        return _cross_outline(radius * 1.1, angle)
    raise ValueError(f"unknown shape: {shape!r}")


def _shape_mask(shape: str, size: tuple[int, int], centre: tuple[float, float], radius: float,
                angle: float) -> Image.Image:
    # Drawn at twice the size and reduced, for anti-aliased edges like a real photo's.
    scale = 2
    mask = Image.new("L", (size[0] * scale, size[1] * scale), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = centre[0] * scale, centre[1] * scale, radius * scale
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon([(cx + x, cy + y) for x, y in _outline(shape, r, angle)], fill=255)
    return mask.resize(size, Image.Resampling.BOX)


def _shape_fill(colour: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """The colour with a little jitter and shading, so the model learns a hue range, not one RGB triple."""
    rgb = np.array(COLOURS[colour], dtype=np.float32) + rng.uniform(-14, 14, size=3)
    shade = np.linspace(rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0), size[1], dtype=np.float32)[:, None, None]
    if colour == "white":
        shade = 0.5 + 0.5 * shade  # shading would turn white into grey, the background's colour
    column = np.clip(rgb * shade, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(column, (size[1], size[0], 3))))


def _placement(width: int, height: int, rng: np.random.Generator) -> tuple[tuple[float, float], float]:
    """Centre and radius of the shape, inside the central square of the picture.

    Keeping it inside the central square means open_clip's preprocess (resize the shortest side, centre crop)
    never cuts it away, whatever the aspect ratio.
    """
    side = min(width, height)
    radius = side * rng.uniform(0.14, 0.3)
    slack = side / 2 - radius * 1.3
    cx = width / 2 + rng.uniform(-slack, slack) * 0.8
    cy = height / 2 + rng.uniform(-slack, slack) * 0.8
    return (cx, cy), radius


def draw_shape(shape: str, colour: str, size: int | tuple[int, int] = 64,
               rng: np.random.Generator | int | None = None) -> Image.Image:
    """An RGB picture of one `colour` `shape` at a random place, scale and slight rotation on a noisy background.

    `size` is the side of a square picture or a `(width, height)` pair; `rng` a numpy Generator or a seed.
    """
    if shape not in SHAPES or colour not in COLOURS:
        raise ValueError(f"unknown shape or colour: {shape!r}, {colour!r}")
    rng = _as_rng(rng)
    width, height = (size, size) if isinstance(size, int) else size
    image = _background(width, height, rng)
    _add_distractor_lines(image, rng)
    centre, radius = _placement(width, height, rng)
    angle = float(rng.uniform(-0.3, 0.3))  # about ±17°: "slight", so a triangle still points up
    mask = _shape_mask(shape, (width, height), centre, radius, angle)
    image.paste(_shape_fill(colour, (width, height), rng), (0, 0), mask)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius=min(width, height) * rng.uniform(0.002, 0.01)))
    return image


def draw_training_image(shape: str, colour: str, rng: np.random.Generator) -> Image.Image:
    """Like `draw_shape`, at a random size (64..256 px) and aspect ratio, as photos come."""
    side = int(rng.integers(64, 257))
    long_side = int(side * rng.uniform(1.0, 1.6))
    size = (long_side, side) if rng.random() < 0.5 else (side, long_side)
    return draw_shape(shape, colour, size, rng)


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------

# An open_clip "CLIP" (ViT image tower, causal transformer text tower). The text tower keeps open_clip's default
# BPE tokenizer (vocab 49408) so that `open_clip.get_tokenizer("local-dir:...")` works unchanged; that token
# table (49408 x text width) is most of the checkpoint, hence the narrow text tower.
MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 96, "head_width": 24, "layers": 3, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2, "mlp_ratio": 2.0},
}

# Per-channel statistics of the shapes world, measured on pictures from `draw_shape` (see `measure_pixel_stats`)
# and rounded; the project's preprocess reads them from the model folder, like any open_clip model's.
PREPROCESS_CFG: dict[str, Any] = {
    "mean": [0.46, 0.44, 0.43],
    "std": [0.19, 0.17, 0.19],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

CONFIG_FILENAME = "open_clip_config.json"
WEIGHTS_FILENAME = "open_clip_model.safetensors"


def model_config(embed_dim: int | None = None) -> dict[str, Any]:
    """A copy of `MODEL_CFG`, with another joint embedding size if asked (a "different model" for tests)."""
    cfg = copy.deepcopy(MODEL_CFG)
    if embed_dim is not None:
        cfg["embed_dim"] = embed_dim
    return cfg


def write_config(out_dir: Path | str, model_cfg: dict[str, Any] | None = None,
                 preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """Write `open_clip_config.json` in the layout open_clip's `local-dir:` / `hf-hub:` loaders read."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg or model_config(), "preprocess_cfg": preprocess_cfg or PREPROCESS_CFG}
    path = out / CONFIG_FILENAME
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def save_local_dir(model: torch.nn.Module, out_dir: Path | str, model_cfg: dict[str, Any] | None = None,
                   preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """Write `model` as an open_clip `local-dir:` folder: the config and fp16 safetensors weights.

    fp16 halves the checkpoint; open_clip casts the tensors back to the model's dtype when it loads them.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    write_config(out, model_cfg, preprocess_cfg)
    state = {name: tensor.detach().to("cpu").half().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILENAME), metadata={"format": "pt"})
    return out


def _new_model(model_cfg: dict[str, Any]) -> torch.nn.Module:
    from open_clip.model import CLIP

    return CLIP(**copy.deepcopy(model_cfg))


def random_init_dir(out_dir: Path | str, seed: int = 0, embed_dim: int | None = None) -> Path:
    """A loadable model folder of the same architecture with random weights, for tests of mechanics."""
    import torch

    torch.manual_seed(seed)
    cfg = model_config(embed_dim)
    return save_local_dir(_new_model(cfg), out_dir, cfg)


# What open_clip's built-in ViT-B-32 family expects (OpenAI's statistics; DataComp weights use the same).
BUILTIN_PREPROCESS_CFG: dict[str, Any] = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def random_builtin_dir(out_dir: Path | str, name: str = "ViT-B-32-256", seed: int = 0,
                       vision: dict[str, Any] | None = None, text: dict[str, Any] | None = None) -> Path:
    """A `local-dir:` folder holding open_clip's built-in architecture `name` with random weights (nothing is
    downloaded), optionally cut down (`vision={"layers": 2}`): for benchmarks, where speed does not depend on
    the weights, and for tests that need the real architecture's graph."""
    import open_clip
    import torch

    cfg = copy.deepcopy(open_clip.get_model_config(name))
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    torch.manual_seed(seed)
    return save_local_dir(_new_model(cfg), out_dir, cfg, BUILTIN_PREPROCESS_CFG)


def load_local_dir(model_dir: Path | str) -> tuple[Any, Callable[[Image.Image], Any], Any]:
    """Load a folder the way clipsearch does: open_clip's factory with `local-dir:`; returns model, preprocess,
    tokenizer (model in eval mode)."""
    import open_clip

    spec = f"local-dir:{Path(model_dir)}"
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(spec)


def measure_pixel_stats(count: int = 300, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the world's pictures, in [0, 1] (how `PREPROCESS_CFG` was chosen)."""
    rng = np.random.default_rng(seed)
    pixels = np.stack([np.asarray(draw_shape(*COMBOS[i % len(COMBOS)], 64, rng)) for i in range(count)]) / 255.0
    return pixels.mean(axis=(0, 1, 2)).tolist(), pixels.std(axis=(0, 1, 2)).tolist()


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainReport:
    """What `train` did, for the model folder's README."""

    steps: int
    seed: int
    batch_size: int
    pool_size: int
    seconds: float
    final_loss: float
    text_to_image_top1: float
    image_to_text_top1: float


def _draw_pool(count: int, preprocess: Callable[[Image.Image], torch.Tensor],
               rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` pictures cycling through every combination, each already through open_clip's own preprocess.

    Passing the very transform that `create_model_and_transforms` returns (resize shortest side, centre crop,
    normalise) means the model trains on exactly the distribution clipsearch feeds it at search time.
    """
    import torch

    labels = torch.arange(count) % len(COMBOS)
    images = [preprocess(draw_training_image(*COMBOS[int(label)], rng)) for label in labels]
    return torch.stack(images), labels


def _batches(labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of one batch in which no combination appears twice.

    A repeated caption in a CLIP batch is a false negative: the loss would push a red circle away from "a red
    circle". With at most one picture per combination, the plain symmetric InfoNCE target is exactly right.
    """
    import torch

    combos = torch.randperm(len(COMBOS), generator=generator)[: min(batch_size, len(COMBOS))]
    per_combo = len(labels) // len(COMBOS)
    picks = torch.randint(0, per_combo, (len(combos),), generator=generator)
    return picks * len(COMBOS) + combos


def _mirror_some(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror about half the pictures left to right: every shape here is symmetric that way, so this doubles the
    pool for free (the pool, not the model, is what costs time on two cores)."""
    import torch

    mirrored = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(mirrored[:, None, None, None], images.flip(-1), images)


def _clip_step(model: Any, images: torch.Tensor, texts: torch.Tensor, loss_fn: Any,
               optimizer: Any) -> float:
    import torch

    image_features = model.encode_image(images, normalize=True)
    text_features = model.encode_text(texts, normalize=True)
    loss = loss_fn(image_features, text_features, model.logit_scale.exp())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))  # as in the CLIP paper: temperature at most 100
    return loss.item()


def _make_optimizer(model: torch.nn.Module, steps: int, lr: float) -> tuple[Any, Any]:
    import torch

    # No weight decay on gains, biases, embeddings and the temperature, as open_clip's own training does.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n and "logit" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n
                                                               and "logit" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay,
                                                                              "weight_decay": 0.0}], lr=lr,
                                  fused=True)  # several times faster than the default on CPU
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _fresh_model(seed: int, model_cfg: dict[str, Any] | None = None) -> tuple[Any, Callable[[Image.Image], Any], Any]:
    """A random-init model, its inference preprocess and its tokenizer, all from open_clip's factory reading a
    config-only folder: the very objects clipsearch will get when it loads the trained folder."""
    import tempfile

    import open_clip
    import torch

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_config(tmp, model_cfg)
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
    return model, preprocess, tokenizer


def train(out_dir: Path | str, steps: int = 1500, seed: int = 0, batch_size: int = 35,
          pool_size: int = 5600, lr: float = 2e-3, log: Callable[[str], None] | None = print,
          model_cfg: dict[str, Any] | None = None) -> TrainReport:
    """Train the tiny CLIP on the shapes world with the CLIP objective and save it as a `local-dir:` folder.

    Deterministic for a given seed on a given machine (threads pinned to 2).
    """
    import open_clip
    import torch

    torch.set_num_threads(2)
    started = time.perf_counter()
    model, preprocess, tokenizer = _fresh_model(seed, model_cfg)
    all_texts = tokenizer(all_captions())
    pool_images, pool_labels = _draw_pool(pool_size, preprocess, np.random.default_rng(seed))
    optimizer, scheduler = _make_optimizer(model, steps, lr)
    loss_fn = open_clip.ClipLoss()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss = float("nan")
    for step in range(steps):
        batch = _batches(pool_labels, batch_size, generator)
        images = _mirror_some(pool_images[batch], generator)
        loss = _clip_step(model, images, all_texts[pool_labels[batch]], loss_fn, optimizer)
        scheduler.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"step {step:5d}  loss {loss:.4f}  temperature {1 / model.logit_scale.exp().item():.4f}")
    model.eval()
    save_local_dir(model, out_dir, model_cfg)
    t2i, i2t = evaluate(out_dir, seed=seed + 1)
    report = TrainReport(steps, seed, batch_size, pool_size, time.perf_counter() - started, loss, t2i, i2t)
    write_model_readme(out_dir, report)
    if log:
        log(f"done in {report.seconds:.1f} s: text->image top-1 {t2i:.3f}, image->text top-1 {i2t:.3f}")
    return report


def write_model_readme(out_dir: Path | str, report: TrainReport) -> Path:
    """Say in the model folder what it is, how it was made and how well it retrieves."""
    text = f"""# tiny-clip

A tiny open_clip CLIP (ViT image tower, {MODEL_CFG["embed_dim"]}-d embeddings) trained by clipsearch on its own
generated world of coloured shapes, for the quick start and the tests. It knows {len(COMBOS)} captions such as
"a red circle" and nothing else. Load it with `--model local-dir:data/tiny-clip`.

Made with `python -m clipsearch.tinyclip train --out data/tiny-clip --steps {report.steps} --seed {report.seed}`:
symmetric cross-entropy over the image-text similarity matrix with a learnable temperature (the CLIP
objective), batch {report.batch_size}, a pool of {report.pool_size} generated pictures, {report.seconds:.0f} s on
2 CPU cores, final loss {report.final_loss:.3f}.

Retrieval on freshly drawn pictures (top-1): text->image {report.text_to_image_top1:.3f},
image->text {report.image_to_text_top1:.3f}.

Weights and pictures are generated by the project and dedicated to the public domain (CC0 1.0).
"""
    path = Path(out_dir) / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def evaluate(model_dir: Path | str, seed: int = 1, per_combo: int = 4, size: int | None = None) -> tuple[float, float]:
    """Top-1 retrieval accuracy on freshly drawn pictures, loading the saved folder through open_clip.

    text->image: for each caption, is the nearest of one picture per combination the right one (averaged over
    `per_combo` rounds); image->text: is the nearest caption of each picture its own.
    """
    import torch

    model, preprocess, tokenizer = load_local_dir(model_dir)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        texts = model.encode_text(tokenizer(all_captions()), normalize=True)
        hits_t2i, hits_i2t = 0.0, 0.0
        for _ in range(per_combo):
            pictures = [draw_shape(s, c, size, rng) if size else draw_training_image(s, c, rng) for s, c in COMBOS]
            images = model.encode_image(torch.stack([preprocess(p) for p in pictures]), normalize=True)
            similarity = texts @ images.T
            truth = torch.arange(len(COMBOS))
            hits_t2i += (similarity.argmax(dim=1) == truth).float().mean().item()
            hits_i2t += (similarity.argmax(dim=0) == truth).float().mean().item()
    return hits_t2i / per_combo, hits_i2t / per_combo


# --------------------------------------------------------------------------------------------------------------
# The sample photo library (data/photos)
# --------------------------------------------------------------------------------------------------------------

# Made-up cameras and one year of dates, so the sample library exercises the camera and date filters.
SAMPLE_CAMERAS: tuple[tuple[str, str], ...] = (("Google", "Pixel 8"), ("Canon", "Canon EOS R6"), ("FUJIFILM", "X-T5"))
SAMPLE_FORMATS: tuple[tuple[str, str], ...] = (("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"))
SAMPLE_LICENSE = """# The sample photos

Every picture in this folder was drawn by `python -m clipsearch.tinyclip photos --out data/photos`
(clipsearch's own generator of coloured shapes). They are dedicated to the public domain under CC0 1.0
(https://creativecommons.org/publicdomain/zero/1.0/): use them for anything, no attribution needed.
"""


def _sample_exif(index: int, rng: np.random.Generator) -> Image.Exif:
    """Camera-like EXIF: make, model and date taken (stored in the IFD where cameras put it)."""
    exif = Image.Exif()
    make, model = SAMPLE_CAMERAS[index % len(SAMPLE_CAMERAS)]
    taken = datetime(2024, 1, 1, 9) + timedelta(days=int(rng.integers(0, 366)), minutes=int(rng.integers(0, 600)))
    exif[0x010F], exif[0x0110] = make, model  # Make, Model
    exif.get_ifd(0x8769)[0x9003] = taken.strftime("%Y:%m:%d %H:%M:%S")  # Exif IFD: DateTimeOriginal
    return exif


def make_photos(out_dir: Path | str, per_combo: int = 2, seed: int = 0, size: tuple[int, int] = (320, 240),
                combos: Sequence[tuple[str, str]] = COMBOS) -> list[Path]:
    """Write `per_combo` pictures of every (shape, colour) into `out_dir/<colour>/`, named after their caption.

    Most are JPEGs with camera EXIF (make, model, date taken); every fifth is a PNG or WebP without it, so the
    sample library also has formats and photos without a date. Returns the paths written, in order.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    written: list[Path] = []
    for number in range(per_combo):
        for shape, colour in combos:
            index = len(written)
            image = draw_shape(shape, colour, size if number % 2 == 0 else size[::-1], rng)
            fmt, suffix = SAMPLE_FORMATS[(index // 5) % 3] if index % 5 == 4 else SAMPLE_FORMATS[0]
            path = out / colour / f"{colour}-{shape}-{number + 1}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            extra = {"exif": _sample_exif(index, rng), "quality": 88} if fmt == "JPEG" else {}
            image.save(path, format=fmt, **extra)
            written.append(path)
    (out / "LICENSE.md").write_text(SAMPLE_LICENSE, encoding="utf-8")
    return written


# --------------------------------------------------------------------------------------------------------------
# The script
# --------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clipsearch.tinyclip", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="train the tiny CLIP and save it as a local-dir: folder")
    train_cmd.add_argument("--out", required=True, type=Path)
    train_cmd.add_argument("--steps", type=int, default=1500)
    train_cmd.add_argument("--seed", type=int, default=0)
    photos_cmd = commands.add_parser("photos", help="write the sample photo library")
    photos_cmd.add_argument("--out", required=True, type=Path)
    photos_cmd.add_argument("--per-combo", type=int, default=2)
    photos_cmd.add_argument("--seed", type=int, default=0)
    random_cmd = commands.add_parser("random", help="save a random-init model of the same architecture")
    random_cmd.add_argument("--out", required=True, type=Path)
    random_cmd.add_argument("--seed", type=int, default=0)
    random_cmd.add_argument("--embed-dim", type=int)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "train":
        train(args.out, steps=args.steps, seed=args.seed)
    elif args.command == "photos":
        print(f"wrote {len(make_photos(args.out, per_combo=args.per_combo, seed=args.seed))} photos to {args.out}")
    else:
        print(random_init_dir(args.out, seed=args.seed, embed_dim=args.embed_dim))


if __name__ == "__main__":
    main()
