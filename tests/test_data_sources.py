"""Every source format round-trips to the same boxes and masks; the real datasets' quirks are found.

A tiny ground-truth scene (a few images with polygon objects, masks decoded by pycocotools) is
written in each format into tmp_path, ingested, and read back through DetectionDataset /
SegmentationDataset / ClassificationDataset.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from components.config import DataConfig
from components.data.canonical import split_of
from components.data.datasets import (
    ClassificationDataset,
    DetectionDataset,
    SegmentationDataset,
    load_manifest,
)
from components.data.ingest import ingest

CATS = ["cat", "dog"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# name, (width, height), objects [(category, polygon xy list)]
SCENE = [
    ("a.png", (48, 40), [("cat", [4, 4, 20, 4, 20, 18, 4, 18]), ("dog", [24, 10, 44, 10, 34, 36])]),
    ("b.png", (48, 40), [("dog", [2, 20, 30, 20, 30, 38, 2, 38])]),
    ("c.png", (40, 48), [("cat", [10, 5, 30, 5, 30, 25]), ("cat", [5, 30, 25, 30, 25, 45, 5, 45])]),
    ("d.png", (48, 40), [("dog", [30, 2, 46, 2, 46, 20, 30, 20])]),
]


def poly_mask(poly: list[float], w: int, h: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w))).astype(bool)


def mask_box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def ground_truth() -> dict[str, list[tuple[str, list[float], np.ndarray]]]:
    """{file stem: [(category, xyxy box of the mask, bool mask)]}."""
    out = {}
    for name, (w, h), objs in SCENE:
        out[Path(name).stem] = [(c, mask_box(m := poly_mask(p, w, h)), m) for c, p in objs]
    return out


def write_pixels(path: Path, w: int, h: int, seed: int, fmt: str = "PNG") -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)


def write_coco(root: Path, *, rle: bool = False) -> Path:
    gt = ground_truth()
    images, anns = [], []
    for i, (name, (w, h), objs) in enumerate(SCENE, start=1):
        write_pixels(root / "images" / name, w, h, i)
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for (cat, box, m), (_, poly) in zip(gt[Path(name).stem], objs, strict=True):
            seg = mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) if rle else [poly]
            if rle:
                seg = {"size": seg["size"], "counts": seg["counts"].decode()}
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": CATS.index(cat) + 1,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "area": float(m.sum()),
                    "iscrowd": 0,
                    "segmentation": seg,
                }
            )
    path = root / "instances.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": anns,
                "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CATS)],
            }
        )
    )
    return path


def write_voc(root: Path, *, lower: bool = False) -> Path:
    gt = ground_truth()
    ann_dir, img_dir = (
        root / ("annotations" if lower else "Annotations"),
        root / ("images" if lower else "JPEGImages"),
    )
    ann_dir.mkdir(parents=True)
    for i, (name, (w, h), _objs) in enumerate(SCENE, start=1):
        stem = Path(name).stem
        write_pixels(img_dir / f"{stem}.jpg", w, h, i, "JPEG")
        objects = "".join(
            f"<object><name>{c}</name><difficult>{int(j == 1)}</difficult><bndbox><xmin>{b[0]:g}</xmin><ymin>{b[1]:g}</ymin>"
            f"<xmax>{b[2]:g}</xmax><ymax>{b[3]:g}</ymax></bndbox></object>"
            for j, (c, b, _m) in enumerate(gt[stem])
        )
        (ann_dir / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{w}</width><height>{h}</height><depth>3</depth>"
            f"</size>{objects}</annotation>"
        )
    return root


def write_yolo(root: Path, *, polygons: bool = False) -> Path:
    gt = ground_truth()
    for i, (name, (w, h), objs) in enumerate(SCENE, start=1):
        split = "train" if i <= 3 else "val"
        stem = Path(name).stem
        write_pixels(root / "images" / split / name, w, h, i)
        lines = []
        for (c, b, _m), (_, poly) in zip(gt[stem], objs, strict=True):
            if polygons:
                coords = " ".join(f"{v / (w if k % 2 == 0 else h):.8f}" for k, v in enumerate(poly))
                lines.append(f"{CATS.index(c)} {coords}")
            else:
                cx, cy, bw, bh = (
                    (b[0] + b[2]) / 2 / w,
                    (b[1] + b[3]) / 2 / h,
                    (b[2] - b[0]) / w,
                    (b[3] - b[1]) / h,
                )
                lines.append(f"{CATS.index(c)} {cx:.8f} {cy:.8f} {bw:.8f} {bh:.8f}")
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\nnames:\n  0: cat\n  1: dog\n"
    )
    return root


def read_back(out: Path, masks: bool) -> dict[str, list[tuple[str, list[float], np.ndarray | None]]]:
    manifest = load_manifest(out)
    got = {}
    for split in manifest["splits"]:
        ds = DetectionDataset(out, split, masks=masks)
        for i in range(len(ds)):
            image, target = ds[i]
            assert (
                image.dtype == torch.float32 and image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1
            )
            stem = Path(ds.images[i]["file_name"]).stem
            got[stem] = [
                (
                    ds.classes[int(label) - 1],
                    box.tolist(),
                    target["masks"][j].numpy().astype(bool) if masks else None,
                )
                for j, (label, box) in enumerate(zip(target["labels"], target["boxes"], strict=True))
            ]
    return got


def assert_same(got: dict, *, masks: bool, atol: float = 0.0) -> None:
    gt = ground_truth()
    assert sorted(got) == sorted(gt)
    for stem, objs in gt.items():
        assert len(got[stem]) == len(objs), stem
        for (c, box, m), (gc, gbox, gm) in zip(objs, got[stem], strict=True):
            assert gc == c
            np.testing.assert_allclose(gbox, box, atol=atol)
            if masks:
                np.testing.assert_array_equal(gm, m)


def cfg() -> DataConfig:
    return DataConfig()


@pytest.mark.parametrize("rle", [False, True], ids=["polygons", "rle"])
def test_coco_round_trip(tmp_path, rle):
    src = write_coco(tmp_path / "src", rle=rle)
    out = tmp_path / "out"
    summary = ingest(f"coco:{src}", out, cfg=cfg())
    assert summary["report"]["total"] == 0
    assert summary["categories"] == CATS
    assert "instance_segmentation" in summary["tasks"]
    assert_same(read_back(out, masks=True), masks=True)
    # the canonical layout is itself a coco:DIR source, and re-ingests to the same labels and splits
    again = ingest(f"coco:{out}", tmp_path / "again", cfg=cfg())
    assert again["splits"] == summary["splits"]
    assert_same(read_back(tmp_path / "again", masks=True), masks=True)


@pytest.mark.parametrize("lower", [False, True], ids=["JPEGImages", "images"])
def test_voc_round_trip_keeps_difficult(tmp_path, lower):
    src = write_voc(tmp_path / "src", lower=lower)
    out = tmp_path / "out"
    summary = ingest(f"voc:{src}", out, cfg=cfg())
    assert summary["report"]["total"] == 0 and summary["categories"] == CATS
    assert_same(read_back(out, masks=False), masks=False)
    anns = [
        a
        for s in summary["splits"]
        for a in json.loads((out / f"annotations/instances_{s}.json").read_text())["annotations"]
    ]
    assert sorted(a["difficult"] for a in anns) == [0, 0, 0, 0, 1, 1]  # the second object of each image
    crops = ClassificationDataset(out, "train")
    assert crops.classes == CATS and len(crops) > 0


@pytest.mark.parametrize("polygons", [False, True], ids=["boxes", "polygons"])
def test_yolo_round_trip(tmp_path, polygons):
    src = write_yolo(tmp_path / "src", polygons=polygons)
    out = tmp_path / "out"
    summary = ingest(f"yolo:{src}", out, cfg=cfg())
    assert summary["splits"] == {"train": 3, "val": 1}
    assert_same(read_back(out, masks=polygons), masks=polygons, atol=1e-4)


def test_penn_fudan_instance_masks(tmp_path):
    gt = ground_truth()
    src = tmp_path / "PennFudanPed"
    for i, (name, (w, h), _objs) in enumerate(SCENE, start=1):
        stem = Path(name).stem
        write_pixels(src / "PNGImages" / name, w, h, i)
        ids = np.zeros((h, w), dtype=np.uint8)
        for k, (_c, _b, m) in enumerate(gt[stem], start=1):
            ids[m & (ids == 0)] = k
        (src / "PedMasks").mkdir(exist_ok=True)
        Image.fromarray(ids).save(src / "PedMasks" / f"{stem}_mask.png")
    out = tmp_path / "out"
    summary = ingest(f"masks:{src}", out, cfg=cfg())
    assert summary["categories"] == ["pedestrian"]
    got = read_back(out, masks=True)
    for stem, objs in gt.items():
        assert [g[1] for g in got[stem]] == [b for _c, b, _m in objs]
        for (_c, _b, m), (_gc, _gb, gm) in zip(objs, got[stem], strict=True):
            np.testing.assert_array_equal(gm, m)
    for split in summary["splits"]:  # the semantic view marks every pedestrian pixel 1
        seg = SegmentationDataset(out, split)
        image, mask = seg[0]
        stem = Path(seg.files[0]).stem
        assert set(mask.unique().tolist()) <= {0, 1}
        assert (mask == 1).sum() == np.logical_or.reduce([m for _c, _b, m in gt[stem]]).sum()


def test_binary_masks_dark_foreground(tmp_path):
    src = tmp_path / "membrane"
    label = np.full((32, 32), 255, dtype=np.uint8)
    label[:, 10:14] = 0  # a dark "membrane" stripe
    for i in range(5):
        write_pixels(src / "image" / f"{i}.png", 32, 32, i)
        (src / "label").mkdir(exist_ok=True)
        Image.fromarray(label).save(src / "label" / f"{i}.png")
    out = tmp_path / "out"
    summary = ingest(f"masks:{src}", out, cfg=cfg())
    assert summary["tasks"] == ["semantic_segmentation"] and summary["categories"] == ["membrane"]
    split = next(iter(summary["splits"]))
    _, mask = SegmentationDataset(out, split)[0]
    assert mask.dtype == torch.int64 and mask.shape == (32, 32)
    assert torch.equal(mask, torch.from_numpy((label < 128).astype(np.int64)))


def test_imagefolder_with_and_without_split_folders(tmp_path):
    for split in ("train", "val"):
        for c in CATS:
            for i in range(3):
                write_pixels(tmp_path / "split" / split / c / f"{c}{i}.jpg", 20, 16, i, "JPEG")
                write_pixels(tmp_path / "flat" / c / f"{split}{c}{i}.jpg", 20, 16, i, "JPEG")
    a = ingest(f"imagefolder:{tmp_path / 'split'}", tmp_path / "a", cfg=cfg())
    assert a["splits"] == {"train": 6, "val": 6} and a["tasks"] == ["classification"]
    ds = ClassificationDataset(tmp_path / "a", "val")
    image, label = ds[0]
    assert image.shape == (3, 16, 20) and label == 0 and sorted(set(ds.targets)) == [0, 1]
    assert not (tmp_path / "a" / "images").exists()  # classification-only: only the ImageFolder view
    b = ingest(f"imagefolder:{tmp_path / 'flat'}", tmp_path / "b", cfg=cfg())
    # the seeded split of each image is a function of its path <class>/<file> (and data.seed) only
    keys = [f"{c}/{split}{c}{i}.jpg" for split in ("train", "val") for c in CATS for i in range(3)]
    expected = Counter(split_of(k, cfg().split, cfg().seed) for k in keys)
    assert b["splits"] == {s: expected[s] for s in ("train", "val", "test") if expected[s]}


# --------------------------------------------------------------------------- the real datasets (copied subsets)


needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared datasets not present")


@needs_shared
def test_bccd_flaws_are_reported(tmp_path):
    """BloodImage_00338 has a zero-size box, 00020 a duplicate RBC: both skipped and reported."""
    bccd = SHARED / "bccd" / "BCCD"
    src = tmp_path / "BCCD"
    stems = ["BloodImage_00020", "BloodImage_00338", "BloodImage_00001"]
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (src / sub).mkdir(parents=True)
    for s in stems:
        shutil.copy(bccd / "Annotations" / f"{s}.xml", src / "Annotations")
        shutil.copy(bccd / "JPEGImages" / f"{s}.jpg", src / "JPEGImages")
    (src / "ImageSets/Main/train.txt").write_text("\n".join(stems[:2]) + "\n")
    (src / "ImageSets/Main/test.txt").write_text(stems[2] + "\n")
    summary = ingest(f"voc:{src}", tmp_path / "out", cfg=cfg())
    assert summary["splits"] == {"train": 2, "test": 1}
    report = json.loads((tmp_path / "out" / "ingest_report.json").read_text())["decisions"]
    reasons = {(d["record"].split("/")[0], d["reason"].split(":")[0], d["action"]) for d in report}
    assert ("BloodImage_00338", "zero or negative box size", "skipped") in reasons
    assert ("BloodImage_00020", "duplicate box", "skipped") in reasons
    n_xml = sum(len(ET.parse(src / "Annotations" / f"{s}.xml").getroot().findall("object")) for s in stems)
    assert sum(summary["objects"].values()) == n_xml - len(report)


@needs_shared
def test_hymenoptera_gif_is_reported(tmp_path):
    src = tmp_path / "hym"
    (src / "train" / "ants").mkdir(parents=True)
    (src / "train" / "bees").mkdir(parents=True)
    shutil.copy(SHARED / "hymenoptera_data/train/ants/imageNotFound.gif", src / "train/ants")
    for cls in ("ants", "bees"):
        first = sorted((SHARED / "hymenoptera_data/train" / cls).glob("*.jpg"))[0]
        shutil.copy(first, src / "train" / cls)
    summary = ingest(f"imagefolder:{src}", tmp_path / "out", cfg=cfg())
    assert summary["splits"] == {"train": 2}
    (decision,) = json.loads((tmp_path / "out" / "ingest_report.json").read_text())["decisions"]
    assert decision["record"] == "train/ants/imageNotFound.gif" and decision["action"] == "skipped"
    assert "not a JPEG or PNG" in decision["reason"] and "GIF" in decision["reason"]


@needs_shared
def test_membrane_ingests_whole(tmp_path):
    before = hashlib.md5((SHARED / "membrane/label/0.png").read_bytes()).hexdigest()
    summary = ingest(f"masks:{SHARED / 'membrane'}", tmp_path / "membrane", cfg=cfg())
    assert summary["splits"] == {"train": 23, "val": 3, "test": 4} and summary["categories"] == ["membrane"]
    _, mask = SegmentationDataset(tmp_path / "membrane", "val")[0]
    assert set(mask.unique().tolist()) == {0, 1} and 0.1 < (mask == 1).float().mean() < 0.4
    assert hashlib.md5((SHARED / "membrane/label/0.png").read_bytes()).hexdigest() == before


def test_coco_images_folder_option(tmp_path):
    src = write_coco(tmp_path / "src")
    (tmp_path / "src" / "images").rename(tmp_path / "pixels")
    summary = ingest(f"coco:{src}", tmp_path / "out", cfg=cfg(), images=str(tmp_path / "pixels"))
    assert summary["report"]["total"] == 0 and sum(summary["splits"].values()) == len(SCENE)
