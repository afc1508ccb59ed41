"""The embedded default: procedural 32x32 RGB images, generated deterministically, nothing to download.

A class is a combination of a *shape* (10), a colour *palette* (8) and a *texture* (6): 480 possible
classes in one fixed pseudo-random order (:func:`class_vocabulary`). The target classes of
``data.source: synthetic`` are the first ``num_classes`` of that order; the pretrain stage's *source*
classes (:func:`render_source_classes`) are the last ones, so the two never share a class whatever either
count is (up to 480 together, checked by the params schema).
Classes that share two of the three attributes differ only in the third, and every image gets a random
pose (position, rotation, scale, aspect), colour jitter, a gradient background with clutter blobs drawn
from the same palettes, and pixel noise, so the task is not trivial; ``difficulty`` scales the nuisance.

Rendering is vectorised with numpy over chunks of images.
"""

from __future__ import annotations

import itertools

import numpy as np

from lpt.data.longtail import longtail_counts
from lpt.data.sources.base import BadItems, IngestError, Item, SourceData

__all__ = ["load", "class_vocabulary", "class_name", "render", "render_source_classes", "source_class_combos",
           "SHAPES", "PALETTES", "TEXTURES", "VOCABULARY_SIZE"]

SHAPES = ("disk", "square", "triangle", "ring", "plus", "diamond", "star", "bar", "crescent", "pair")
TEXTURES = ("solid", "stripes", "checker", "dots", "rings", "gradient")
# name: (colour A, colour B, background), RGB in [0, 1]; the texture mixes A and B inside the shape.
PALETTES = {
    "ember": ((0.90, 0.30, 0.10), (1.00, 0.85, 0.20), (0.15, 0.05, 0.10)),
    "ocean": ((0.10, 0.30, 0.90), (0.30, 0.90, 0.90), (0.85, 0.85, 0.75)),
    "forest": ((0.10, 0.60, 0.20), (0.75, 0.90, 0.30), (0.30, 0.20, 0.10)),
    "royal": ((0.50, 0.10, 0.70), (0.90, 0.80, 0.20), (0.10, 0.10, 0.30)),
    "candy": ((1.00, 0.40, 0.70), (0.40, 0.80, 1.00), (0.95, 0.95, 0.95)),
    "mono": ((0.10, 0.10, 0.10), (0.90, 0.90, 0.90), (0.50, 0.50, 0.50)),
    "sunset": ((0.90, 0.50, 0.20), (0.60, 0.10, 0.40), (0.20, 0.30, 0.60)),
    "mint": ((0.20, 0.80, 0.60), (0.10, 0.20, 0.30), (0.95, 0.80, 0.60)),
}
_PAL = np.array(list(PALETTES.values()), dtype=np.float32)  # (P, 3 roles, 3 channels)
VOCAB_SEED = 20230501  # fixed: class identities do not change with params.seed
VOCABULARY_SIZE = len(SHAPES) * len(PALETTES) * len(TEXTURES)
CHUNK = 2048


def class_vocabulary() -> list[tuple[int, int, int]]:
    """All (shape, palette, texture) combinations in a fixed pseudo-random order."""
    combos = list(itertools.product(range(len(SHAPES)), range(len(PALETTES)), range(len(TEXTURES))))
    order = np.random.default_rng(VOCAB_SEED).permutation(len(combos))
    return [combos[i] for i in order]


def class_name(combo: tuple[int, int, int]) -> str:
    """``shape-palette-texture``, e.g. ``star-ocean-checker``."""
    s, p, t = combo
    return f"{SHAPES[s]}-{list(PALETTES)[p]}-{TEXTURES[t]}"


# ------------------------------------------------------------------------------------------ shapes
def _shape_field(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed 'inside-ness' of a shape in its own coordinates (> 0 inside, roughly a distance)."""
    r = np.sqrt(u * u + v * v)
    au, av = np.abs(u), np.abs(v)
    if shape == 0:  # disk
        return 0.95 - r
    if shape == 1:  # square
        return 0.8 - np.maximum(au, av)
    if shape == 2:  # triangle, apex up
        return np.minimum(0.7 - v, 0.55 * (v + 0.95) - au)
    if shape == 3:  # ring
        return 0.28 - np.abs(r - 0.68)
    if shape == 4:  # plus
        return np.maximum(np.minimum(0.32 - au, 0.95 - av), np.minimum(0.32 - av, 0.95 - au))
    if shape == 5:  # diamond
        return 0.7 * (1.0 - au - av)
    if shape == 6:  # five-pointed star
        phi = np.arctan2(v, u)
        return 0.62 + 0.3 * np.cos(5 * phi) - r
    if shape == 7:  # bar (flat ellipse)
        return 0.42 * (1.0 - np.sqrt(u * u + (v / 0.42) ** 2))
    if shape == 8:  # crescent
        return np.minimum(0.95 - r, np.sqrt((u - 0.45) ** 2 + (v + 0.1) ** 2) - 0.7)
    # pair of dots
    return 0.45 - np.minimum(np.sqrt((u - 0.5) ** 2 + v * v), np.sqrt((u + 0.5) ** 2 + v * v))


def _texture_field(texture: int, u: np.ndarray, v: np.ndarray, freq: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Mix weight of colour B inside the shape, in [0, 1]."""
    f, p = freq[:, None, None], phase[:, None, None]
    if texture == 0:  # solid
        return np.zeros_like(u)
    if texture == 1:  # stripes
        return (np.sin(f * u + p) > 0).astype(np.float32)
    if texture == 2:  # checker
        return (np.sin(f * u + p) * np.sin(f * v + p) > 0).astype(np.float32)
    if texture == 3:  # dots
        return (np.cos(1.3 * f * u + p) + np.cos(1.3 * f * v + p) > 1.0).astype(np.float32)
    if texture == 4:  # concentric rings
        return (np.sin(1.4 * f * np.sqrt(u * u + v * v) + p) > 0).astype(np.float32)
    return np.clip(0.5 + 0.6 * (u + v) / 1.6, 0.0, 1.0)  # gradient


# ------------------------------------------------------------------------------------------ render
def render(combos: np.ndarray, size: int, difficulty: float, rng: np.random.Generator) -> np.ndarray:
    """Render one image per row of ``combos``.

    Args:
        combos: (N, 3) int array of (shape, palette, texture).
        size: image side in pixels.
        difficulty: nuisance scale; 0 renders every class at a canonical pose without noise.
        rng: source of all randomness (the images are a pure function of its state).

    Returns:
        (N, size, size, 3) uint8 images.
    """
    n, d = len(combos), float(difficulty)
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(axis, axis, indexing="ij")  # (S, S), image coords in [-1, 1]

    def jitter(lo: float, hi: float, scale: float = 1.0) -> np.ndarray:
        return (rng.uniform(lo, hi, n) * d * scale).astype(np.float32)

    cx, cy = jitter(-0.28, 0.28), jitter(-0.28, 0.28)
    scale = (0.62 * np.exp(jitter(-0.25, 0.25))).astype(np.float32)
    aspect = np.exp(jitter(-0.15, 0.15)).astype(np.float32)
    theta = jitter(-0.7, 0.7)
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    dx, dy = x[None] - cx[:, None, None], y[None] - cy[:, None, None]
    u = (dx * cos + dy * sin) / (scale * aspect)[:, None, None]  # (N, S, S) shape coordinates
    v = (-dx * sin + dy * cos) / (scale / aspect)[:, None, None]

    shape_f, tex = np.empty_like(u), np.empty_like(u)
    freq = (6.0 * np.exp(jitter(-0.15, 0.15))).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32) * min(d, 1.0)
    for k in range(len(SHAPES)):
        idx = np.where(combos[:, 0] == k)[0]
        if len(idx):
            shape_f[idx] = _shape_field(k, u[idx], v[idx])
    for k in range(len(TEXTURES)):
        idx = np.where(combos[:, 2] == k)[0]
        if len(idx):
            tex[idx] = _texture_field(k, u[idx], v[idx], freq[idx], phase[idx])
    # anti-aliased coverage: the field is in shape units, one pixel is 2 / size image units
    alpha = np.clip(0.5 + shape_f * (scale * size / 2.0)[:, None, None], 0.0, 1.0)[..., None]

    pal = _PAL[combos[:, 1]]  # (N, 3 roles, 3 ch)
    pal = pal * np.exp(rng.normal(0, 0.12 * d, (n, 3, 3))).astype(np.float32)
    pal = np.clip(pal + rng.normal(0, 0.06 * d, (n, 1, 1)).astype(np.float32), 0.0, 1.0)
    fg = pal[:, None, None, 0] * (1 - tex[..., None]) + pal[:, None, None, 1] * tex[..., None]
    bg = _background(pal[:, 2], x, y, size, d, rng)
    img = bg * (1 - alpha) + fg * alpha
    img += rng.normal(0, 0.05 * d, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _background(colour: np.ndarray, x: np.ndarray, y: np.ndarray, size: int, d: float,
                rng: np.random.Generator) -> np.ndarray:
    """Background colour with a random linear gradient and two clutter blobs of palette colours."""
    n = len(colour)
    g = rng.normal(0, 0.12 * d, (n, 2)).astype(np.float32)
    bg = colour[:, None, None, :] + (g[:, 0, None, None] * x + g[:, 1, None, None] * y)[..., None]
    for _ in range(2 if d > 0 else 0):
        bx, by = rng.uniform(-1, 1, n).astype(np.float32), rng.uniform(-1, 1, n).astype(np.float32)
        rad = rng.uniform(0.08, 0.22, n).astype(np.float32) * min(d, 1.0)
        blob_colour = _PAL.reshape(-1, 3)[rng.integers(0, _PAL.shape[0] * 2, n)]  # colours A/B of any palette
        dist = np.sqrt((x[None] - bx[:, None, None]) ** 2 + (y[None] - by[:, None, None]) ** 2)
        cover = np.clip(0.5 + (rad[:, None, None] - dist) * size / 2.0, 0.0, 1.0)[..., None]
        bg = bg * (1 - cover) + blob_colour[:, None, None, :] * cover
    return bg


# ------------------------------------------------------------------------------------------ splits
def _split_items(name: str, labels: np.ndarray, class_combos: np.ndarray, size: int, difficulty: float,
                 rng: np.random.Generator) -> list[Item]:
    items: list[Item] = []
    for start in range(0, len(labels), CHUNK):
        lab = labels[start: start + CHUNK]
        images = render(class_combos[lab], size, difficulty, rng)
        items.extend(Item(f"synthetic/{name}[{start + i}]", int(c), images[i]) for i, c in enumerate(lab))
    return items


def load(cfg, seed: int, bad: BadItems) -> SourceData:  # noqa: ARG001 - generated data is never bad
    """Generate the target splits of the synthetic source.

    Args:
        cfg: the ``data`` section (``DataConfig``).
        seed: ``params.seed``: the same seed gives the same images.
        bad: unused (generated images are always valid).

    Returns:
        train (long-tailed), val and test (balanced) over the first ``synthetic.num_classes`` classes of
        the vocabulary. (The backbone's pretraining classes are made by the pretrain stage itself:
        :func:`render_source_classes`.)
    """
    syn = cfg.synthetic
    vocab = class_vocabulary()
    target = np.array(vocab[: syn.num_classes])
    counts = longtail_counts(syn.num_classes, cfg.max_per_class, cfg.imbalance_ratio)
    label_sets = {
        "train": np.repeat(np.arange(syn.num_classes), counts),
        "val": np.repeat(np.arange(syn.num_classes), cfg.val_per_class),
        "test": np.repeat(np.arange(syn.num_classes), cfg.test_per_class),
    }
    splits = {}
    for code, (name, labels) in enumerate(label_sets.items()):
        rng = np.random.default_rng([seed, code])
        labels = labels[rng.permutation(len(labels))]  # shards mix classes (streaming shuffles locally)
        splits[name] = _split_items(name, labels, target, syn.image_size, syn.difficulty, rng)
    return SourceData(class_names=[class_name(tuple(c)) for c in target], splits=splits,
                      image_size=(syn.image_size, syn.image_size))


# ------------------------------------------------------------------------------------ source classes
_SOURCE_STREAM = 3  # rng stream code of the source classes (train/val/test use 0/1/2)


def source_class_combos(num_classes: int) -> np.ndarray:
    """The pretraining (*source*) classes: the last ``num_classes`` of the vocabulary, as (K, 3) combos.

    Raises:
        IngestError: more classes than the vocabulary holds.
    """
    vocab = class_vocabulary()
    if not 1 <= num_classes <= len(vocab):
        raise IngestError(f"pretrain.source_classes = {num_classes}: expected 1..{len(vocab)} "
                          "(shape x palette x texture combinations)")
    return np.array(vocab[len(vocab) - num_classes:])


def render_source_classes(num_classes: int, per_class: int, size: int, seed: int,
                          difficulty: float = 1.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Balanced images of the source classes, rendered at ``size`` px (the pretrain stage's data).

    Args:
        num_classes: source classes, the last ones of :func:`class_vocabulary` (disjoint from the
            synthetic target classes, which are the first ones).
        per_class: images per class.
        size: image side in pixels (the pretrain stage passes ``transforms.input_size``).
        seed: ``params.seed``; the images are a pure function of the arguments.
        difficulty: nuisance scale, as ``data.synthetic.difficulty``.

    Returns:
        ``(images (N, size, size, 3) uint8, labels (N,) int64, class names)``, classes interleaved in a
        seeded random order.
    """
    combos = source_class_combos(num_classes)
    rng = np.random.default_rng([seed, _SOURCE_STREAM])
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    labels = labels[rng.permutation(len(labels))]
    images = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    for start in range(0, len(labels), CHUNK):
        images[start: start + CHUNK] = render(combos[labels[start: start + CHUNK]], size, difficulty, rng)
    return images, labels, [class_name(tuple(c)) for c in combos]
