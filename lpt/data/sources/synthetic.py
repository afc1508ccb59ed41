"""The embedded default: procedural 32x32 RGB images, generated deterministically, nothing to download.

A class is a combination of a *shape* (10), a colour *palette* (8) and a *texture* (6): 480 possible
classes. The target classes and the disjoint ``source`` classes (used to pretrain the backbone) are drawn
from the same vocabulary in different combinations, so features learnt on the source classes transfer.
Classes that share two of the three attributes differ only in the third, and every image gets a random
pose (position, rotation, scale, aspect), colour jitter, a gradient background with clutter blobs drawn
from the same palettes, and pixel noise, so the task is not trivial; ``difficulty`` scales the nuisance.

More classes than the 480 combinations (the iNat stand-in has 8,142) are *hue variants* of the
combinations: identity ``k`` is combination ``k mod 480`` with its palette's hues rotated by
``1 + k // 480`` golden angles (:func:`class_identities`). Up to 480 classes, the targets are the plain
combinations, the first ones of the vocabulary; the backbone's pretraining classes are the last plain
ones (:func:`render_source_classes`), so with more than 480 targets, none is a plain combination and the
two sets stay disjoint whatever ``pretrain.source_classes`` is.

Rendering is vectorised with numpy over chunks of images. A split is rendered lazily, one chunk at a time
as ingest iterates it (:class:`RenderedSplit`), so ingest's memory does not grow with the split's size;
the images are the same as rendering the split at once (one generator per split, drawn in order).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from lpt.data.longtail import profile_counts
from lpt.data.sources.base import BadItems, IngestError, Item, SourceData

__all__ = ["load", "class_vocabulary", "class_identities", "class_name", "render", "RenderedSplit",
           "render_source_classes", "source_class_combos", "SHAPES", "PALETTES", "TEXTURES", "VOCABULARY_SIZE"]

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
HUE_STEP = 137.50776405  # degrees, the golden angle: variant v rotates hues by v steps, never landing on an earlier one


def class_vocabulary() -> list[tuple[int, int, int]]:
    """All (shape, palette, texture) combinations in a fixed pseudo-random order."""
    combos = list(itertools.product(range(len(SHAPES)), range(len(PALETTES)), range(len(TEXTURES))))
    order = np.random.default_rng(VOCAB_SEED).permutation(len(combos))
    return [combos[i] for i in order]


def class_identities(count: int) -> np.ndarray:
    """The ``count`` target class identities: (shape, palette, texture, hue variant) rows, (count, 4) int.

    Up to :data:`VOCABULARY_SIZE`, the first ``count`` combinations of the vocabulary, plain (variant 0).
    More: every identity a hue variant (``k mod 480`` with variant ``1 + k // 480``), so identities never
    repeat and none is a plain combination (the pretraining classes are plain ones).
    """
    vocab = np.asarray(class_vocabulary(), dtype=np.int64)
    index = np.arange(count)
    variant = index // len(vocab) + (1 if count > len(vocab) else 0)
    return np.column_stack([vocab[index % len(vocab)], variant])


def class_name(combo: tuple[int, ...]) -> str:
    """``shape-palette-texture``, e.g. ``star-ocean-checker``; a hue variant adds ``-hue<v>``."""
    s, p, t = combo[:3]
    variant = int(combo[3]) if len(combo) > 3 else 0
    return f"{SHAPES[s]}-{list(PALETTES)[p]}-{TEXTURES[t]}" + (f"-hue{variant}" if variant else "")


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
        combos: (N, 3) int array of (shape, palette, texture), or (N, 4) with a hue variant
            (:func:`class_identities`; variant 0 renders exactly as the 3-column form).
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
    if combos.shape[1] > 3:
        pal = _rotate_hue(pal, combos[:, 3])  # draws nothing from rng: variant 0 images are unchanged
    pal = pal * np.exp(rng.normal(0, 0.12 * d, (n, 3, 3))).astype(np.float32)
    pal = np.clip(pal + rng.normal(0, 0.06 * d, (n, 1, 1)).astype(np.float32), 0.0, 1.0)
    fg = pal[:, None, None, 0] * (1 - tex[..., None]) + pal[:, None, None, 1] * tex[..., None]
    bg = _background(pal[:, 2], x, y, size, d, rng)
    img = bg * (1 - alpha) + fg * alpha
    img += rng.normal(0, 0.05 * d, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _rotate_hue(pal: np.ndarray, variant: np.ndarray) -> np.ndarray:
    """Rotate each colour of rows with ``variant > 0`` about the grey axis by ``variant * HUE_STEP`` degrees.

    Rodrigues' rotation about (1, 1, 1) / sqrt(3) keeps a colour's grey level and saturation and turns its
    hue; results are clipped to [0, 1].
    """
    out = pal.copy()
    rows = np.where(variant > 0)[0]
    if len(rows):
        theta = np.deg2rad(variant[rows].astype(np.float64) * HUE_STEP)
        c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        k = np.full(3, 1.0 / np.sqrt(3.0))
        kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
        rot = c * np.eye(3) + s * kx + (1.0 - c) * np.outer(k, k)  # (R, 3, 3)
        out[rows] = np.clip(np.einsum("rij,rcj->rci", rot, pal[rows].astype(np.float64)), 0.0, 1.0)
    return out.astype(np.float32)


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
class RenderedSplit:
    """One split's items, rendered ``CHUNK`` images at a time while they are iterated.

    Ingest holds one chunk (plus what its encoders have in flight) instead of the whole split. The
    generator state at the start is kept, so every iteration renders the same images, in the same order,
    as rendering the split in one go would.

    Args:
        name: split name (in each item's ``source_id``).
        labels: the split's labels in item order.
        class_combos: (C, 3 or 4) identity rows per label.
        size: image side.
        difficulty: nuisance scale.
        rng: the split's generator, positioned where rendering starts (it is not advanced here).
    """

    def __init__(self, name: str, labels: np.ndarray, class_combos: np.ndarray, size: int, difficulty: float,
                 rng: np.random.Generator) -> None:
        self.name, self.labels, self.class_combos = name, labels, class_combos
        self.size, self.difficulty = size, difficulty
        self._state = rng.bit_generator.state  # a copy (a dict of ints)
        self._bit_generator = type(rng.bit_generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[Item]:
        bit_generator = self._bit_generator()
        bit_generator.state = self._state
        rng = np.random.Generator(bit_generator)
        for start in range(0, len(self.labels), CHUNK):
            lab = self.labels[start: start + CHUNK]
            images = render(self.class_combos[lab], self.size, self.difficulty, rng)  # (n, S, S, 3)
            for i, c in enumerate(lab):
                yield Item(f"synthetic/{self.name}[{start + i}]", int(c), images[i])


def load(cfg, seed: int, bad: BadItems) -> SourceData:  # noqa: ARG001 - generated data is never bad
    """Generate the target splits of the synthetic source.

    Args:
        cfg: the ``data`` section (``DataConfig``).
        seed: ``params.seed``: the same seed gives the same images.
        bad: unused (generated images are always valid).

    Returns:
        train (long-tailed with ``synthetic.profile``), val and test (balanced) over
        ``synthetic.num_classes`` classes (:func:`class_identities`), each split a :class:`RenderedSplit`
        (rendered while ingest iterates it). (The backbone's pretraining classes are made by the pretrain
        stage itself: :func:`render_source_classes`.)
    """
    syn = cfg.synthetic
    target = class_identities(syn.num_classes)  # (C, 4)
    counts = profile_counts(syn.profile, syn.num_classes, cfg.max_per_class, cfg.imbalance_ratio)
    label_sets = {
        "train": np.repeat(np.arange(syn.num_classes), counts),
        "val": np.repeat(np.arange(syn.num_classes), cfg.val_per_class),
        "test": np.repeat(np.arange(syn.num_classes), cfg.test_per_class),
    }
    splits = {}
    for code, (name, labels) in enumerate(label_sets.items()):
        rng = np.random.default_rng([seed, code])
        labels = labels[rng.permutation(len(labels))]  # shards mix classes (streaming shuffles locally)
        splits[name] = RenderedSplit(name, labels, target, syn.image_size, syn.difficulty, rng)
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
