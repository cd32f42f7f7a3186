"""The built-in shapes dataset: byte-identical reruns, labels from the visible pixels, fast defaults."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import DataConfig, ShapesConfig
from components.data.canonical import decode_segmentation
from components.data.ingest import ingest


def tiny(**overrides) -> DataConfig:
    shapes = dict(
        image_size=64,
        num_train=6,
        num_val=3,
        num_test=2,
        min_size=12,
        max_size=30,
        crop_size=16,
        min_objects=2,
        max_objects=4,
        occlusion=0.8,
    )
    shapes.update(overrides)
    return DataConfig(shapes=ShapesConfig(**shapes))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_and_params_give_identical_bytes(tmp_path):
    a = ingest("shapes", tmp_path / "a", cfg=tiny())
    b = ingest("shapes", tmp_path / "b", cfg=tiny())
    fa, fb = files(tmp_path / "a"), files(tmp_path / "b")
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    assert a["dvc_md5"] == b["dvc_md5"]
    kinds = {k.split("/")[0] for k in fa}
    assert kinds == {"annotations", "classification", "dataset.json", "images", "ingest_report.json", "masks"}
    # another seed changes the data; more training images leave val/test untouched (one generator per image)
    c = ingest("shapes", tmp_path / "c", cfg=tiny().model_copy(update={"seed": 1}))
    assert c["dvc_md5"] != a["dvc_md5"]
    ingest("shapes", tmp_path / "d", cfg=tiny(num_train=2))
    fd = files(tmp_path / "d")
    assert all(fd[k] == fa[k] for k in fa if k.startswith("images/val/"))


def test_labels_are_the_visible_pixels(tmp_path):
    cfg = tiny(num_train=12)
    summary = ingest("shapes", tmp_path / "s", cfg=cfg)
    assert summary["categories"] == cfg.shapes.classes
    assert summary["tasks"] == [
        "classification",
        "detection",
        "instance_segmentation",
        "semantic_segmentation",
    ]
    coco = json.loads((tmp_path / "s/annotations/instances_train.json").read_text())
    by_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert sum(len(v) for v in by_image.values()) >= 12 * 2 * 0.7  # few objects are dropped as mostly hidden
    for image in coco["images"]:
        h, w = image["height"], image["width"]
        assert (w, h) == (64, 64)
        pixels = np.asarray(Image.open(tmp_path / "s/images/train" / image["file_name"]))
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        semantic = np.asarray(Image.open(tmp_path / "s/masks/train" / image["file_name"]))
        union = np.zeros((h, w), dtype=int)
        for ann in by_image.get(image["id"], []):
            m = decode_segmentation(ann["segmentation"], h, w)
            ys, xs = np.nonzero(m)
            x, y, bw, bh = ann["bbox"]
            assert [x, y, x + bw, y + bh] == [
                xs.min(),
                ys.min(),
                xs.max() + 1,
                ys.max() + 1,
            ]  # box of the visible mask
            assert ann["area"] == m.sum() >= 40
            assert (semantic[m] == ann["category_id"]).all()
            union += m
            assert 1 <= ann["category_id"] <= len(cfg.shapes.classes) and ann["iscrowd"] == 0
        assert union.max() <= 1  # visible masks never overlap: later shapes hide earlier ones
        labelled = (semantic > 0) & (semantic < 255)
        assert (labelled == (union == 1)).all()
    crops = list((tmp_path / "s/classification/train").rglob("*.png"))
    assert len(crops) == len(coco["annotations"]) and Image.open(crops[0]).size == (16, 16)


@pytest.mark.slow
def test_default_params_are_fast(tmp_path):
    start = time.perf_counter()
    summary = ingest("shapes", tmp_path / "shapes", cfg=DataConfig())
    assert time.perf_counter() - start < 30
    assert summary["splits"] == {"train": 320, "val": 64, "test": 64}
