"""The built-in "shapes" scene dataset: a deterministic teaching set for detection and segmentation.

Each image is a textured background (smoothed noise, a linear gradient or stripes) with
``min_objects..max_objects`` shapes (circle, square, triangle, star, hexagon, cross, ellipse,
diamond) of random colour, rotation and size (the longer side of the box, ``min_size..max_size`` px). Later shapes are drawn
over earlier ones (partial occlusion), so every label is computed from the *visible* pixels:
the instance mask, its box and area, and the semantic mask. An object whose visible part is
tiny is dropped, and its remaining pixels are marked 255 (ignore) in the semantic mask.

Shapes are rasterised at 4x resolution and area-averaged: the image blends the anti-aliased
coverage, the mask is ``coverage >= 0.5``, so mask and pixels agree exactly at 1x.

Determinism: every image draws from its own ``numpy`` generator seeded by
``(seed, split, index)``, so the same params give the same pixels whatever the other split
sizes are, and adding images to ``train`` never changes ``val``.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from components.config import ShapesConfig
from components.data.records import SPLITS, ImageRecord, ObjectRecord, SourceDataset

SUPERSAMPLE = 4
#: an object stays labelled only if at least this fraction of it, and MIN_VISIBLE_PIXELS pixels, are visible
MIN_VISIBLE_FRACTION = 0.35
MIN_VISIBLE_PIXELS = 40
#: smallest RGB distance between an object's colour and the background under it
MIN_CONTRAST = 80.0


def _unit_polygon(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices ``float[V, 2]`` of a shape inscribed in the unit circle, before rotation."""
    if kind in ("circle", "ellipse"):
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        ry = 1.0 if kind == "circle" else rng.uniform(0.45, 0.65)
        return np.stack([np.cos(t), ry * np.sin(t)], axis=1)
    if kind == "square":
        s = 1 / math.sqrt(2)
        return np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    if kind == "triangle":
        t = np.array([-90, 30, 150]) * math.pi / 180
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if kind == "hexagon":
        t = np.arange(6) * math.pi / 3
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if kind == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    if kind == "cross":
        a, b = 0.33, 0.95
        return np.array(
            [
                [-a, -b],
                [a, -b],
                [a, -a],
                [b, -a],
                [b, a],
                [a, a],
                [a, b],
                [-a, b],
                [-a, a],
                [-b, a],
                [-b, -a],
                [-a, -a],
            ]
        )
    if kind == "diamond":
        return np.array([[0, -1.0], [0.6, 0], [0, 1.0], [-0.6, 0]])
    raise ValueError(f"unknown shape {kind!r}")  # unreachable: ShapesConfig restricts the names


def _background(size: int, rng: np.random.Generator, texture: bool) -> np.ndarray:
    """A ``float32[H, W, 3]`` background in [0, 255]: plain, smoothed noise, gradient or stripes."""
    base = rng.uniform(40, 215, size=3)
    if not texture:
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32).copy()
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:  # smoothed noise: low-resolution noise upsampled bilinearly
        cells = int(rng.integers(4, 12))
        low = rng.normal(0, 30, size=(cells, cells, 3)).astype(np.float32)
        up = np.stack(
            [np.asarray(Image.fromarray(low[..., c]).resize((size, size), Image.BILINEAR)) for c in range(3)],
            axis=-1,
        )
        img = base + up
    elif kind == 1:  # linear gradient between two colours
        other = rng.uniform(40, 215, size=3)
        angle = rng.uniform(0, 2 * math.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = base + t[..., None] * (other - base)
    else:  # stripes of a second colour
        other = np.clip(base + rng.normal(0, 45, size=3), 0, 255)
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.3)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
        img = base + t[..., None] * (other - base)
    img = img + rng.normal(0, 6, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.float32)


def _coverage(vertices: np.ndarray, size: int) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Anti-aliased coverage in [0, 1] of a polygon given in pixel coordinates, in its own window.

    Only the polygon's bounding window is rasterised (at ``SUPERSAMPLE`` x resolution, then
    area-averaged), which is what keeps the generator fast.

    Returns:
        coverage ``float32[h, w]`` of the window, and the window's ``(rows, cols)`` slices in the image.
    """
    s = SUPERSAMPLE
    x0, y0 = np.clip(np.floor(vertices.min(axis=0)).astype(int), 0, size)
    x1, y1 = np.clip(np.ceil(vertices.max(axis=0)).astype(int) + 1, 0, size)
    window = (slice(int(y0), int(y1)), slice(int(x0), int(x1)))
    h, w = int(y1 - y0), int(x1 - x0)
    if h <= 0 or w <= 0:
        return np.zeros((0, 0), dtype=np.float32), window
    canvas = Image.new("L", (w * s, h * s), 0)
    ImageDraw.Draw(canvas).polygon([((x - x0) * s, (y - y0) * s) for x, y in vertices.tolist()], fill=255)
    hi = np.asarray(canvas, dtype=np.float32) / 255.0
    return hi.reshape(h, s, w, s).mean(axis=(1, 3)), window


def _boxes_overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def render_scene(
    cfg: ShapesConfig, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[str, np.ndarray]], np.ndarray]:
    """Draw one scene.

    Returns:
        image ``uint8[H, W, 3]``, the kept objects ``[(class name, visible mask bool[H, W])]`` in
        drawing order, and the semantic mask ``uint8[H, W]`` (0 background, k = index in
        ``cfg.classes`` + 1, 255 = visible remnant of a dropped, mostly hidden object).
    """
    size = cfg.image_size
    image = _background(size, rng, cfg.texture)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    drawn: list[tuple[str, np.ndarray]] = []
    boxes: list[tuple[float, ...]] = []
    for _ in range(n):
        kind = cfg.classes[int(rng.integers(len(cfg.classes)))]
        may_overlap = rng.random() < cfg.occlusion
        angle = rng.uniform(0, 2 * math.pi)
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        shape = _unit_polygon(kind, rng) @ rot.T
        shape = shape - (shape.min(axis=0) + shape.max(axis=0)) / 2  # centred on its box
        shape = shape / np.ptp(shape, axis=0).max()  # the longer box side is 1
        for _attempt in range(20):
            extent = rng.uniform(cfg.min_size, cfg.max_size)  # the object's longer box side in px
            half = np.ptp(shape, axis=0) * extent / 2
            cx, cy = rng.uniform(half, size - half)
            box = (cx - half[0], cy - half[1], cx + half[0], cy + half[1])
            if may_overlap or not any(_boxes_overlap(box, b) for b in boxes):
                break
        else:
            continue  # no free place for a non-overlapping object: leave it out
        vertices = shape * extent + np.array([cx, cy])
        cover, window = _coverage(vertices, size)
        if not (cover >= 0.5).any():
            continue
        mask = np.zeros((size, size), dtype=bool)
        mask[window] = cover >= 0.5
        patch = image[window]
        under = patch[cover >= 0.5].mean(axis=0)
        colour = rng.uniform(0, 255, size=3)
        for _ in range(10):
            if np.linalg.norm(colour - under) >= MIN_CONTRAST:
                break
            colour = rng.uniform(0, 255, size=3)
        shade = colour + rng.normal(0, 4, size=patch.shape)
        image[window] = patch * (1 - cover[..., None]) + shade * cover[..., None]
        drawn.append((kind, mask))
        boxes.append(box)

    semantic = np.zeros((size, size), dtype=np.uint8)
    kept: list[tuple[str, np.ndarray]] = []
    hidden = np.zeros((size, size), dtype=bool)
    visible_masks: list[tuple[str, np.ndarray, int]] = []
    for kind, mask in reversed(drawn):  # later shapes hide earlier ones
        visible = mask & ~hidden
        hidden |= mask
        visible_masks.append((kind, visible, int(mask.sum())))
    for kind, visible, full in reversed(visible_masks):
        area = int(visible.sum())
        if area >= MIN_VISIBLE_PIXELS and area >= MIN_VISIBLE_FRACTION * full:
            kept.append((kind, visible))
            semantic[visible] = cfg.classes.index(kind) + 1
        else:
            semantic[visible] = 255
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), kept, semantic


def build_shapes(cfg: ShapesConfig, *, seed: int) -> SourceDataset:
    """Generate the shapes dataset as format-neutral records (written by :mod:`canonical`).

    Args:
        cfg: the ``data.shapes`` params (sizes, counts, classes, occlusion, texture).
        seed: ``data.seed``.
    """
    counts = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
    records: list[ImageRecord] = []
    for split_index, split in enumerate(SPLITS):
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, split_index, i])
            pixels, objects, semantic = render_scene(cfg, rng)
            name = f"{split}_{i:05d}.png"
            records.append(
                ImageRecord(
                    record=f"{split}/{i}",
                    name=name,
                    pixels=pixels,
                    split=split,
                    objects=[
                        ObjectRecord(kind, None, f"{split}/{i}/object {j}", mask=m)
                        for j, (kind, m) in enumerate(objects)
                    ],
                    semantic=semantic,
                )
            )
    return SourceDataset(
        name="shapes",
        spec="shapes",
        categories=list(cfg.classes),
        tasks=["classification", "detection", "instance_segmentation", "semantic_segmentation"],
        records=records,
        crop_size=cfg.crop_size,
    )
