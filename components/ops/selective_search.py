"""Selective search (Uijlings et al., 2013): the region proposals of R-CNN and Fast R-CNN.

The lecture's R-CNN part 1: "selective search looks at the image through windows of different
sizes, and for each size tries to group together adjacent pixels that are similar by texture,
color or intensity". Following the paper:

1. an initial over-segmentation with Felzenszwalb and Huttenlocher's graph method
   (:func:`skimage.segmentation.felzenszwalb`), one per scale ``k`` and colour space;
2. hierarchical grouping: the two most similar *adjacent* regions are merged, again and again,
   until a single region covers the image. The similarity is a sum of the paper's measures in
   [0, 1]: colour (intersection of 25-bin per-channel histograms), texture (intersection of
   10-bin histograms of Gaussian derivatives in 8 orientations per channel), size (favours
   merging small regions first) and fill (favours regions whose union fills its bounding box);
3. every region of every hierarchy is a box hypothesis. Hypotheses are ranked as in the paper:
   region ``i`` of strategy ``j`` (``i = 1`` the top of the hierarchy, the whole image) gets the
   value ``RND * i`` with ``RND ~ U[0, 1]`` from a seeded generator, so the ranking mixes levels
   of all strategies and is deterministic; duplicate boxes keep their best value.

Region histograms are computed for all regions at once with :func:`numpy.bincount`; merging
updates histograms by the size-weighted average (as the paper does), so grouping costs one
vectorised similarity per new region and its neighbours.

Proposals are cached on disk by :class:`ProposalCache` (image content hash + parameters), so
training epochs over the same image do not recompute them.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from components.errors import DataError
from components.io import atomic_write_bytes, content_hash

ColorSpace = Literal["rgb", "hsv", "lab", "gray"]
SIMILARITY_MEASURES = {"c": "colour", "t": "texture", "s": "size", "f": "fill"}
COLOUR_BINS = 25  # per channel, as in the paper
TEXTURE_BINS = 10  # per channel and orientation, as in the paper
TEXTURE_ORIENTATIONS = 8


@dataclass(frozen=True)
class SelectiveSearchParams:
    """The diversification strategies of selective search and the output size.

    Attributes:
        scales: Felzenszwalb's ``k`` (``scale`` in scikit-image): larger values give larger initial regions.
        sigma: Gaussian smoothing before the over-segmentation.
        min_size: smallest initial region, in pixels.
        color_spaces: colour spaces in which both segmentation and similarities are computed.
        similarities: combinations of the measures, letters of ``"ctsf"`` (colour, texture, size, fill);
            the paper's "fast" mode uses ``("ctsf", "tsf")``.
        max_proposals: keep the best ranked boxes only (``None`` keeps all).
        min_box_size: boxes with a side shorter than this (pixels) are dropped.
        max_side: images whose longer side exceeds this are downscaled for the search and the boxes scaled back.
        seed: seed of the ranking's random numbers (the output is a deterministic function of image and params).
    """

    scales: tuple[float, ...] = (50.0, 100.0, 200.0)
    sigma: float = 0.8
    min_size: int = 20
    color_spaces: tuple[ColorSpace, ...] = ("hsv", "lab")
    similarities: tuple[str, ...] = ("ctsf", "tsf")
    max_proposals: int | None = 2000
    min_box_size: int = 4
    max_side: int | None = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for combo in self.similarities:
            if not combo or set(combo) - set(SIMILARITY_MEASURES):
                raise ValueError(f"similarity combination {combo!r} must be letters of 'ctsf'")
        for space in self.color_spaces:
            if space not in ("rgb", "hsv", "lab", "gray"):
                raise ValueError(f"unknown colour space {space!r}; use rgb, hsv, lab or gray")
        if not self.scales:
            raise ValueError("selective search needs at least one scale")

    def digest(self) -> str:
        """A stable hash of the parameters (part of the proposal cache key)."""
        return content_hash(asdict(self))


# --------------------------------------------------------------------------- image preparation


def _to_hwc_float(image: np.ndarray | Tensor) -> np.ndarray:
    """Image as float64 ``[H, W, 3]`` in [0, 1] from a ``Tensor[3, H, W]`` in [0, 1] or a uint8/float ``[H, W, C]`` array."""
    if isinstance(image, Tensor):
        arr = image.detach().to("cpu", torch.float32)
        if arr.ndim != 3 or arr.shape[0] not in (1, 3):
            raise DataError(
                f"selective search expects an image Tensor[3, H, W], got shape {tuple(arr.shape)}",
                fix="pass one image, not a batch",
            )
        arr = arr.permute(1, 2, 0).numpy().astype(np.float64)
    else:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise DataError(
                f"selective search expects an image [H, W, 3], got shape {arr.shape}", fix="pass an RGB image"
            )
        arr = arr[..., :3]
        arr = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise DataError(
            f"image of size {arr.shape[:2]} is too small for selective search",
            fix="use images of at least 2x2 pixels",
        )
    return np.clip(arr, 0.0, 1.0)


def _convert_colour(rgb: np.ndarray, space: ColorSpace) -> np.ndarray:
    """``rgb [H, W, 3]`` in [0, 1] converted to ``space``, each channel rescaled to [0, 1] for the histograms."""
    from skimage import color

    if space == "rgb":
        return rgb
    if space == "hsv":
        return color.rgb2hsv(rgb)
    if space == "gray":
        return np.repeat(color.rgb2gray(rgb)[..., None], 3, axis=2)
    lab = color.rgb2lab(rgb)
    # L in [0, 100], a and b roughly in [-128, 127]
    return np.stack(
        [lab[..., 0] / 100.0, (lab[..., 1] + 128.0) / 255.0, (lab[..., 2] + 128.0) / 255.0], axis=2
    ).clip(0.0, 1.0)


def _texture_responses(img: np.ndarray) -> np.ndarray:
    """Positive parts of Gaussian derivatives (sigma 1) in 8 orientations per channel: ``[H, W, 3 * 8]`` in [0, 1].

    The paper's SIFT-like texture measure: the derivative in direction ``theta`` is
    ``cos(theta) * dI/dx + sin(theta) * dI/dy``; opposite directions keep opposite signs, so
    keeping the positive part of each of the 8 directions loses nothing.
    """
    out = []
    angles = np.arange(TEXTURE_ORIENTATIONS) * (2.0 * np.pi / TEXTURE_ORIENTATIONS)
    for c in range(img.shape[2]):
        gy = ndimage.gaussian_filter(img[..., c], sigma=1.0, order=(1, 0))
        gx = ndimage.gaussian_filter(img[..., c], sigma=1.0, order=(0, 1))
        for theta in angles:
            r = np.maximum(np.cos(theta) * gx + np.sin(theta) * gy, 0.0)
            peak = r.max()
            out.append(r / peak if peak > 0 else r)
    return np.stack(out, axis=2)


def _bin_offsets(values: np.ndarray, bins: int) -> np.ndarray:
    """Histogram cell of every pixel and channel: ``int64 [H * W, D]`` with values ``d * bins + bin`` (computed once per image)."""
    d = values.shape[2]
    idx = np.minimum((values * bins).astype(np.int64), bins - 1)
    return (np.arange(d) * bins + idx).reshape(-1, d)


def _region_histograms(labels: np.ndarray, n: int, offsets: np.ndarray, bins: int) -> np.ndarray:
    """L1-normalised histograms of every region at once: ``[n, D * bins]`` from :func:`_bin_offsets`."""
    width = offsets.shape[1] * bins
    flat = labels.reshape(-1, 1) * width + offsets
    hist = np.bincount(flat.ravel(), minlength=n * width).reshape(n, width).astype(np.float64)
    return hist / np.maximum(hist.sum(axis=1, keepdims=True), 1e-12)


def _adjacent_pairs(labels: np.ndarray) -> np.ndarray:
    """Unique pairs ``(a, b)``, ``a < b``, of regions touching in 8-connectivity: ``int64 [P, 2]``."""
    pairs = [
        (labels[:, :-1], labels[:, 1:]),
        (labels[:-1, :], labels[1:, :]),
        (labels[:-1, :-1], labels[1:, 1:]),
        (labels[:-1, 1:], labels[1:, :-1]),
    ]
    a = np.concatenate([p[0].ravel() for p in pairs])
    b = np.concatenate([p[1].ravel() for p in pairs])
    keep = a != b
    lo, hi = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    n = int(labels.max()) + 1
    code = np.unique(lo.astype(np.int64) * n + hi)
    return np.stack([code // n, code % n], axis=1)


# --------------------------------------------------------------------------- hierarchical grouping


@dataclass
class _Regions:
    """Growing table of regions (initial ones first, then one row per merge)."""

    size: np.ndarray  # [M] pixels
    box: np.ndarray  # [M, 4] x1, y1, x2, y2 (x2, y2 exclusive)
    colour: np.ndarray  # [M, 75]
    texture: np.ndarray  # [M, 240]
    image_area: float
    measures: str = "ctsf"
    neighbours: list[set[int]] = field(default_factory=list)

    def similarity(self, i: int, others: np.ndarray) -> np.ndarray:
        """The paper's s(r_i, r_j) = sum of the chosen measures, for one region against many: ``[len(others)]``."""
        s = np.zeros(len(others))
        if "c" in self.measures:
            s += np.minimum(self.colour[i], self.colour[others]).sum(axis=1)
        if "t" in self.measures:
            s += np.minimum(self.texture[i], self.texture[others]).sum(axis=1)
        if "s" in self.measures:
            s += 1.0 - (self.size[i] + self.size[others]) / self.image_area
        if "f" in self.measures:
            x1 = np.minimum(self.box[i, 0], self.box[others, 0])
            y1 = np.minimum(self.box[i, 1], self.box[others, 1])
            x2 = np.maximum(self.box[i, 2], self.box[others, 2])
            y2 = np.maximum(self.box[i, 3], self.box[others, 3])
            s += 1.0 - ((x2 - x1) * (y2 - y1) - self.size[i] - self.size[others]) / self.image_area
        return s


def _initial_regions(labels: np.ndarray, colour_offsets: np.ndarray, texture_offsets: np.ndarray) -> _Regions:
    """Size, box, colour and texture histograms of the over-segmentation's regions, and their adjacency."""
    n = int(labels.max()) + 1
    m = 2 * n - 1  # n initial regions and at most n - 1 merges
    size = np.zeros(m)
    size[:n] = np.bincount(labels.ravel(), minlength=n)
    box = np.zeros((m, 4))
    for r, sl in enumerate(ndimage.find_objects(labels + 1)):
        if sl is not None:
            box[r] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    colour = np.zeros((m, colour_offsets.shape[1] * COLOUR_BINS))
    colour[:n] = _region_histograms(labels, n, colour_offsets, COLOUR_BINS)
    tex = np.zeros((m, texture_offsets.shape[1] * TEXTURE_BINS))
    tex[:n] = _region_histograms(labels, n, texture_offsets, TEXTURE_BINS)
    regions = _Regions(size, box, colour, tex, float(labels.size), "ctsf", [set() for _ in range(n)])
    for a, b in _adjacent_pairs(labels):
        regions.neighbours[a].add(int(b))
        regions.neighbours[b].add(int(a))
    return regions


def _with_measures(base: _Regions, measures: str) -> _Regions:
    """A fresh copy of the initial regions for one grouping strategy (grouping mutates the table)."""
    return _Regions(
        base.size.copy(),
        base.box.copy(),
        base.colour.copy(),
        base.texture.copy(),
        base.image_area,
        measures,
        [set(s) for s in base.neighbours],
    )


def _group_hierarchically(regions: _Regions, n: int) -> int:
    """Merge the most similar adjacent pair until none is left; returns the number of regions created in total.

    Region ``n + t`` is the ``t``-th merge; a priority queue with lazy deletion holds the
    similarities, and a merge pushes the new region's similarity to each of its neighbours.
    """
    alive = np.zeros(len(regions.size), dtype=bool)
    alive[:n] = True
    heap: list[tuple[float, int, int]] = []
    for a in range(n):
        others = np.array(sorted(b for b in regions.neighbours[a] if b > a), dtype=np.int64)
        if len(others):
            for b, s in zip(others.tolist(), regions.similarity(a, others).tolist(), strict=True):
                heap.append((-s, a, b))
    heapq.heapify(heap)
    total = n
    while heap:
        _, a, b = heapq.heappop(heap)
        if not (alive[a] and alive[b]):
            continue
        t = total
        total += 1
        sa, sb = regions.size[a], regions.size[b]
        regions.size[t] = sa + sb
        regions.box[t, :2] = np.minimum(regions.box[a, :2], regions.box[b, :2])
        regions.box[t, 2:] = np.maximum(regions.box[a, 2:], regions.box[b, 2:])
        # the paper propagates histograms by the size-weighted average: C_t = (size_a C_a + size_b C_b) / size_t
        regions.colour[t] = (sa * regions.colour[a] + sb * regions.colour[b]) / (sa + sb)
        regions.texture[t] = (sa * regions.texture[a] + sb * regions.texture[b]) / (sa + sb)
        alive[a] = alive[b] = False
        alive[t] = True
        neigh = (regions.neighbours[a] | regions.neighbours[b]) - {a, b}
        regions.neighbours.append(neigh)
        for k in neigh:
            regions.neighbours[k].discard(a)
            regions.neighbours[k].discard(b)
            regions.neighbours[k].add(t)
        if neigh:
            others = np.array(sorted(neigh), dtype=np.int64)
            for k, s in zip(others.tolist(), regions.similarity(t, others).tolist(), strict=True):
                heapq.heappush(heap, (-s, k, t))
    return total


def _hierarchy_boxes(base: _Regions, measures: str) -> np.ndarray:
    """All region boxes of one grouping strategy, top of the hierarchy (the whole image) first: ``[M, 4]``."""
    n = len(base.neighbours)
    regions = _with_measures(base, measures)
    total = _group_hierarchically(regions, n)
    return regions.box[:total][::-1]


# --------------------------------------------------------------------------- public API


def selective_search(image: np.ndarray | Tensor, params: SelectiveSearchParams | None = None) -> Tensor:
    """Ranked box proposals of one image.

    Args:
        image: ``Tensor[3, H, W]`` float in [0, 1] (the detection contract's image) or an
            ``[H, W, 3]`` uint8/float array.
        params: the diversification strategies and output size (defaults: the paper's "fast" mode
            with a third scale).

    Returns:
        Tensor[N, 4] float32: proposals ``(x1, y1, x2, y2)`` in pixels of ``image``, inside the
        image, best ranked first, no two identical; ``N <= params.max_proposals``.

    Raises:
        DataError: the input is not one image.
    """
    from skimage.segmentation import felzenszwalb

    params = params or SelectiveSearchParams()
    rgb = _to_hwc_float(image)
    h, w = rgb.shape[:2]
    factor = 1.0
    if params.max_side is not None and max(h, w) > params.max_side:
        from skimage.transform import resize

        factor = max(h, w) / params.max_side
        rgb = resize(rgb, (round(h / factor), round(w / factor)), order=1, anti_aliasing=True)

    boxes_all: list[np.ndarray] = []
    values_all: list[np.ndarray] = []
    strategy = 0
    for space in params.color_spaces:
        img = _convert_colour(rgb, space)
        colour_offsets = _bin_offsets(img, COLOUR_BINS)
        texture_offsets = _bin_offsets(_texture_responses(img), TEXTURE_BINS)
        for k in params.scales:
            labels = felzenszwalb(img, scale=k, sigma=params.sigma, min_size=params.min_size, channel_axis=-1)
            labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)  # consecutive ids 0..n-1
            base = _initial_regions(labels, colour_offsets, texture_offsets)
            for measures in params.similarities:
                boxes = _hierarchy_boxes(base, measures)
                rng = np.random.default_rng([params.seed, strategy])
                position = np.arange(1, len(boxes) + 1, dtype=np.float64)  # 1 = the whole-image region
                boxes_all.append(boxes)
                values_all.append(rng.random(len(boxes)) * position)
                strategy += 1

    boxes = np.concatenate(boxes_all) * factor
    values = np.concatenate(values_all)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= params.min_box_size) & (
        (boxes[:, 3] - boxes[:, 1]) >= params.min_box_size
    )
    boxes, values = boxes[keep], values[keep]
    order = np.argsort(values, kind="stable")
    boxes = np.round(boxes[order], 2)
    # duplicates (the same box from several strategies or levels) keep their best rank
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)]
    if params.max_proposals is not None:
        boxes = boxes[: params.max_proposals]
    return torch.from_numpy(boxes.astype(np.float32))


def image_digest(image: Tensor | np.ndarray) -> str:
    """Content hash of an image (its 8-bit quantisation and shape): the proposal cache key."""
    if isinstance(image, Tensor):
        arr = (image.detach().to("cpu", torch.float32).clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    else:
        arr = np.asarray(image)
        arr = arr if arr.dtype == np.uint8 else (np.clip(arr, 0, 1) * 255.0).round().astype(np.uint8)
    h = hashlib.sha256(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:32]


class ProposalCache:
    """Selective-search proposals cached on disk, one file per (image content, parameters).

    Training epochs, validation and the lineage timing see the same images many times; the
    search costs tens of milliseconds per image on a CPU, the cache a file read. Files are
    written atomically (temporary file + rename), so concurrent readers never see a partial one.

    Args:
        root: cache folder (``None``: keep proposals in memory only, for this process).
        params: the selective-search parameters; their digest is part of every key.
        memory_items: proposals also kept in memory for the most recently used images.
    """

    def __init__(self, root: str | Path | None, params: SelectiveSearchParams, *, memory_items: int = 4096):
        self.root = Path(root) / params.digest() if root is not None else None
        self.params = params
        self._memory: OrderedDict[str, Tensor] = OrderedDict()  # least recently used first
        self.memory_items = memory_items
        self.hits = 0
        self.misses = 0
        self.search_seconds = 0.0  # time spent in selective search on misses

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.npy"

    def get(self, image: Tensor | np.ndarray) -> Tensor:
        """Proposals of ``image`` (``Tensor[N, 4]`` xyxy pixels), computed once per content and parameters."""
        import time

        key = image_digest(image)
        if key in self._memory:
            self.hits += 1
            self._memory.move_to_end(key)
            return self._memory[key]
        if self.root is not None:
            path = self._path(key)
            if path.exists():
                try:
                    array = np.load(path, allow_pickle=False)
                except (OSError, ValueError, EOFError):  # a corrupt entry is recomputed and rewritten
                    array = None
                if (
                    array is not None
                    and array.ndim == 2
                    and array.shape[1] == 4
                    and array.dtype == np.float32
                ):
                    self.hits += 1
                    boxes = torch.from_numpy(array)
                    self._remember(key, boxes)
                    return boxes
        self.misses += 1
        start = time.perf_counter()
        boxes = selective_search(image, self.params)
        self.search_seconds += time.perf_counter() - start
        self._remember(key, boxes)
        if self.root is not None:
            try:
                self._write(self._path(key), boxes)
            except OSError as err:  # e.g. a consumer's read-only folder: keep serving from memory
                warnings.warn(
                    f"proposal cache {self.root} is not writable ({err}); caching in memory only",
                    stacklevel=2,
                )
                self.root = None
        return boxes

    def _remember(self, key: str, boxes: Tensor) -> None:
        self._memory[key] = boxes
        self._memory.move_to_end(key)
        while (
            len(self._memory) > self.memory_items
        ):  # augmented training images are seen once: bound the memory
            self._memory.popitem(last=False)

    @staticmethod
    def _write(path: Path, boxes: Tensor) -> None:
        buffer = io.BytesIO()
        np.save(buffer, boxes.numpy().astype(np.float32), allow_pickle=False)
        atomic_write_bytes(path, buffer.getvalue())


def proposal_recall(
    proposals: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    counts: Sequence[int],
    iou_thresholds: Sequence[float] = (0.5, 0.7),
) -> dict[float, list[float]]:
    """Fraction of ground-truth boxes covered by one of the first ``n`` proposals at IoU >= t.

    Args:
        proposals: per image, ``Tensor[N_i, 4]`` ranked proposals (xyxy pixels).
        gt_boxes: per image, ``Tensor[G_i, 4]`` ground-truth boxes (xyxy pixels).
        counts: the numbers of proposals ``n`` at which to measure recall.
        iou_thresholds: IoU thresholds ``t``.

    Returns:
        ``{t: [recall at counts[0], recall at counts[1], ...]}``; recall is over all GT boxes of all images.
    """
    from torchvision.ops import box_iou

    best = {n: [] for n in counts}  # per n: the best IoU of every GT box with the first n proposals
    for props, gts in zip(proposals, gt_boxes, strict=True):
        if len(gts) == 0:
            continue
        if len(props) == 0:
            for n in counts:
                best[n].append(torch.zeros(len(gts)))
            continue
        iou = box_iou(gts.float(), props.float())  # [G, N]
        running = iou.cummax(dim=1).values  # best IoU within the first j + 1 proposals
        for n in counts:
            best[n].append(running[:, min(n, props.shape[0]) - 1])
    out: dict[float, list[float]] = {}
    for t in iou_thresholds:
        out[t] = [
            float((torch.cat(best[n]) >= t).float().mean()) if best[n] else float("nan") for n in counts
        ]
    return out
