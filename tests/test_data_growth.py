"""A user's own, growing dataset re-ingested by a scheduled retraining (issue 14, the data part).

Stable splits (a hash of each image's path and ``data.seed``), stable category ids (sorted names
or ``data.classes``), ``classes_changed`` against the previous ingest, byte-identical output for
the same source wherever it lies, and real labels as they come (YOLO rounding, orphan label
files, report counts grouped by a fixed kind).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import DataConfig, SplitConfig
from components.data.canonical import split_of
from components.data.ingest import ingest
from components.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


def write_image(path: Path, w: int, h: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")


def write_voc_images(root: Path, start: int, stop: int, objects=None) -> None:
    """VOC images ``img{start}..img{stop - 1}`` (JPEG and PNG alternating), each with one box.

    ``objects`` maps an index to ``[(name, xmin, ymin, xmax, ymax)]`` to override the default box.
    """
    for i in range(start, stop):
        name = f"img{i}.{'jpg' if i % 2 else 'png'}"
        write_image(root / "JPEGImages" / name, 24, 20, i)
        objs = (objects or {}).get(i, [("cat" if i % 3 else "dog", 2, 2, 12, 10)])
        xml = "".join(
            f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
            f"<ymax>{d}</ymax></bndbox></object>"
            for n, a, b, c, d in objs
        )
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"img{i}.xml").write_text(
            f"<annotation><filename>{name}</filename><size><width>24</width><height>20</height></size>"
            f"{xml}</annotation>"
        )


def split_by_file(out: Path) -> dict[str, str]:
    """``{file_name: split}`` of a canonical dataset's detection view."""
    found = {}
    for split in SPLITS:
        path = out / "annotations" / f"instances_{split}.json"
        if path.is_file():
            found.update({im["file_name"]: split for im in json.loads(path.read_text())["images"]})
    return found


def tree_digest(root: Path) -> str:
    h = hashlib.md5()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def decisions(out: Path) -> list[dict]:
    return json.loads((out / "ingest_report.json").read_text())["decisions"]


# --------------------------------------------------------------------------- stable splits


def test_adding_images_never_moves_an_earlier_image(tmp_path):
    src, out = tmp_path / "voc", tmp_path / "data"
    write_voc_images(src, 0, 36)
    ingest(f"voc:{src}", out, cfg=DataConfig())
    before = split_by_file(out)
    assert len(before) == 36 and set(before.values()) <= set(SPLITS)

    write_voc_images(src, 36, 54)  # the source grows by half
    summary = ingest(f"voc:{src}", out, cfg=DataConfig())
    after = split_by_file(out)
    assert len(after) == 54 and sum(summary["splits"].values()) == 54
    assert {name: after[name] for name in before} == before
    # each split is the hash of the image's path relative to the VOC folder, and the seed
    assert all(split_of(f"JPEGImages/{n}", DataConfig().split, 0) == s for n, s in after.items())
    # another seed draws another split
    assert any(split_of(f"JPEGImages/{n}", DataConfig().split, 1) != s for n, s in after.items())


def test_split_fractions_are_respected_on_average():
    cfg = SplitConfig(train=0.7, val=0.2, test=0.1)
    counts = Counter(split_of(f"images/{i:05d}.jpg", cfg, seed=3) for i in range(600))
    assert abs(counts["train"] / 600 - 0.7) < 0.06
    assert abs(counts["val"] / 600 - 0.2) < 0.05
    assert abs(counts["test"] / 600 - 0.1) < 0.04
    only_train = SplitConfig(train=1.0, val=0.0, test=0.0)
    assert {split_of(str(i), only_train, 0) for i in range(100)} == {"train"}


def test_shipped_splits_are_kept(tmp_path):
    src = tmp_path / "voc"
    write_voc_images(src, 0, 6)
    (src / "ImageSets" / "Main").mkdir(parents=True)
    (src / "ImageSets" / "Main" / "train.txt").write_text("img0\nimg1\nimg2\nimg3\n")
    (src / "ImageSets" / "Main" / "val.txt").write_text("img4\nimg5\n")
    summary = ingest(f"voc:{src}", tmp_path / "out", cfg=DataConfig())
    assert summary["splits"] == {"train": 4, "val": 2}


# --------------------------------------------------------------------------- byte-identical output


def test_same_source_gives_identical_bytes_wherever_it_lies(tmp_path):
    src = tmp_path / "first" / "voc"
    # one box outside the image: a decision in the report, which must not name an absolute path
    write_voc_images(src, 0, 10, objects={3: [("cat", 2, 2, 40, 10)]})
    moved = tmp_path / "second" / "elsewhere" / "voc"
    shutil.copytree(src, moved)
    archive = tmp_path / "voc.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, Path("voc") / p.relative_to(src))

    outs = [tmp_path / "a" / "data", tmp_path / "b" / "deeper" / "data"]
    ingest(f"voc:{src}", outs[0], cfg=DataConfig())
    ingest(f"voc:{moved}", outs[1], cfg=DataConfig())
    digests = {tree_digest(out) for out in outs}
    assert len(digests) == 1
    zipped = [tmp_path / "c" / "data", tmp_path / "d" / "data"]
    for out in zipped:  # each extracted to another random temporary folder
        ingest(f"voc:{archive}", out, cfg=DataConfig())
    assert tree_digest(zipped[0]) == tree_digest(zipped[1])
    assert decisions(zipped[0]) == decisions(outs[0])
    ingest(f"voc:{src}", outs[0], cfg=DataConfig())  # re-ingest over itself: nothing changed
    assert tree_digest(outs[0]) in digests

    (d,) = decisions(outs[0])
    assert d["file"] == "Annotations/img3.xml" and d["kind"] == "box outside the image"
    for p in outs[0].rglob("*"):
        if p.is_file() and p.suffix == ".json":
            text = p.read_text()
            assert str(tmp_path) not in text and "seconds" not in text and "/tmp" not in text, p
    manifest = json.loads((outs[0] / "dataset.json").read_text())
    assert manifest["source"] == "voc:voc" and "path" not in manifest["params"]


# --------------------------------------------------------------------------- category ids


def test_category_ids_are_sorted_names_not_reading_order(tmp_path):
    src = tmp_path / "voc"
    write_voc_images(src, 0, 4, objects={0: [("zebra", 1, 1, 9, 9)], 1: [("ant", 1, 1, 9, 9)]})
    summary = ingest(f"voc:{src}", tmp_path / "out", cfg=DataConfig())
    assert summary["categories"] == ["ant", "cat", "dog", "zebra"]
    assert summary["classes_changed"] == {"added": [], "removed": []}


def test_data_classes_fixes_the_order_and_reports_other_classes(tmp_path):
    src = tmp_path / "voc"
    write_voc_images(src, 0, 6, objects={2: [("bird", 1, 1, 9, 9), ("cat", 10, 5, 20, 15)]})
    cfg = DataConfig(classes=["dog", "cat", "horse"])
    summary = ingest(f"voc:{src}", tmp_path / "out", cfg=cfg)
    assert summary["categories"] == ["dog", "cat", "horse"]
    cats = json.loads((tmp_path / "out" / "dataset.json").read_text())["categories"]
    assert cats == ["dog", "cat", "horse"]
    (d,) = decisions(tmp_path / "out")
    assert (d["file"], d["record"], d["kind"], d["action"]) == (
        "Annotations/img2.xml",
        "img2/object 0",
        "unknown category",
        "skipped",
    )
    for split in SPLITS:
        path = tmp_path / "out" / "annotations" / f"instances_{split}.json"
        if path.is_file():
            coco = json.loads(path.read_text())
            assert coco["categories"] == [
                {"id": 1, "name": "dog"},
                {"id": 2, "name": "cat"},
                {"id": 3, "name": "horse"},
            ]

    with pytest.raises(DataError) as err:
        ingest(f"voc:{src}", tmp_path / "strict", cfg=cfg, strict=True)
    assert "img2.xml [img2/object 0]: unknown category 'bird'" in str(err.value)
    assert "data.classes" in err.value.fix
    with pytest.raises(ConfigError, match=r"data\.classes"):
        ingest(f"voc:{src}", tmp_path / "dup", cfg=DataConfig(classes=["cat", "cat"]))


def test_classes_changed_against_the_previous_ingest(tmp_path):
    src, out = tmp_path / "voc", tmp_path / "data"
    write_voc_images(src, 0, 6)
    assert ingest(f"voc:{src}", out, cfg=DataConfig())["classes_changed"] == {"added": [], "removed": []}
    first = tree_digest(out)
    # the source grows by a new class, and loses every 'dog'
    write_voc_images(src, 6, 8, objects={6: [("fox", 1, 1, 9, 9)], 7: [("cat", 1, 1, 9, 9)]})
    for xml in (src / "Annotations").glob("*.xml"):
        xml.write_text(xml.read_text().replace("<name>dog</name>", "<name>cat</name>"))
    summary = ingest(f"voc:{src}", out, cfg=DataConfig())
    assert summary["categories"] == ["cat", "fox"]
    assert summary["classes_changed"] == {"added": ["fox"], "removed": ["dog"]}
    changed = tree_digest(out)
    # the change is reported by the summary, not written into the (DVC-tracked) folder ...
    assert "classes_changed" not in (out / "dataset.json").read_text()
    # ... so the same source gives the same bytes whatever was there before
    again = ingest(f"voc:{src}", out, cfg=DataConfig())
    assert again["classes_changed"] == {"added": [], "removed": []} and tree_digest(out) == changed != first


# --------------------------------------------------------------------------- YOLO as it comes


def write_yolo_folder(root: Path, labels: dict[str, str], images: list[str], *, plain: bool = False) -> Path:
    sub = "" if plain else "train"
    for name in images:
        write_image(root / "images" / sub / name, 40, 20, len(name))
    for stem, text in labels.items():
        (root / "labels" / sub).mkdir(parents=True, exist_ok=True)
        (root / "labels" / sub / f"{stem}.txt").write_text(text)
    if plain:
        (root / "classes.txt").write_text("cat\ndog\n")
    else:
        (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [cat, dog]\n")
    return root


def test_yolo_rounding_past_the_edge_is_clipped_silently(tmp_path):
    # right edge at 1.0000004 x 40 px, top edge at -0.00001 x 20 px: rounding, not a flaw
    src = write_yolo_folder(
        tmp_path / "y",
        {"a": "0 0.7500002 0.49999 0.5000004 0.99999\n", "b": "1 0.5 0.5 0.5 0.5\n"},
        ["a.png", "b.png"],
    )
    for strict, out in ((False, tmp_path / "out"), (True, tmp_path / "strict")):
        summary = ingest(f"yolo:{src}", out, cfg=DataConfig(), strict=strict)
        assert summary["report"]["total"] == 0 and sum(summary["objects"].values()) == 2
    boxes = {
        a["image_id"]: a["bbox"]
        for a in json.loads((tmp_path / "out" / "annotations" / "instances_train.json").read_text())[
            "annotations"
        ]
    }
    x, y, w, h = boxes[1]
    assert x + w == 40.0 and y == 0.0 and h == pytest.approx(20.0, abs=1e-3)
    # a box further out than rounding is still clipped *and reported*
    (src / "labels" / "train" / "b.txt").write_text("1 0.9 0.5 0.4 0.5\n")
    summary = ingest(f"yolo:{src}", tmp_path / "out2", cfg=DataConfig())
    assert summary["report"]["by_kind"] == {"box outside the image": 1}


def test_yolo_label_without_image_is_reported(tmp_path):
    src = write_yolo_folder(
        tmp_path / "y",
        {"a": "0 0.5 0.5 0.2 0.2\n", "lost": "0 0.5 0.5 0.2 0.2\n1 0.2 0.2 0.1 0.1\n\n"},
        ["a.png"],
    )
    summary = ingest(f"yolo:{src}", tmp_path / "out", cfg=DataConfig())
    (d,) = decisions(tmp_path / "out")
    assert (
        d["file"] == "labels/train/lost.txt" and d["record"] == "lost" and d["kind"] == "label without image"
    )
    assert "2 boxes lost" in d["reason"] and d["action"] == "skipped"
    assert summary["report"]["by_kind"] == {"label without image": 1}
    with pytest.raises(DataError) as err:
        ingest(f"yolo:{src}", tmp_path / "strict", cfg=DataConfig(), strict=True)
    assert (
        "lost.txt [lost]: label without image: 2 boxes lost" in str(err.value) and "lost.jpg" in err.value.fix
    )


def test_plain_yolo_folder_gets_stable_seeded_splits(tmp_path):
    src = tmp_path / "plain"
    names = [f"im{i}.png" for i in range(30)]
    write_yolo_folder(src, {Path(n).stem: "1 0.5 0.5 0.2 0.4\n" for n in names}, names, plain=True)
    out = tmp_path / "out"
    summary = ingest(f"yolo:{src}", out, cfg=DataConfig())
    assert summary["categories"] == ["cat", "dog"] and sum(summary["splits"].values()) == 30
    before = split_by_file(out)
    assert all(split_of(f"images/{n}", DataConfig().split, 0) == s for n, s in before.items())
    more = [f"im{i}.png" for i in range(30, 45)]
    write_yolo_folder(src, {Path(n).stem: "0 0.5 0.5 0.2 0.4\n" for n in more}, more, plain=True)
    ingest(f"yolo:{src}", out, cfg=DataConfig())
    after = split_by_file(out)
    assert len(after) == 45 and {n: after[n] for n in before} == before


# --------------------------------------------------------------------------- report grouping


def test_report_counts_group_by_kind_not_by_values(tmp_path):
    src = tmp_path / "voc"
    write_voc_images(
        src,
        0,
        5,
        objects={
            0: [("cat", 2, 2, 30, 10)],  # outside the 24x20 image
            1: [("cat", -3, 2, 10, 10)],  # outside, other values
            2: [("cat", 5, 5, 5, 9)],  # zero width
            3: [("cat", 2, 2, 12, 10), ("cat", 2, 2, 12, 10)],  # duplicate
        },
    )
    summary = ingest(f"voc:{src}", tmp_path / "out", cfg=DataConfig())
    assert summary["report"]["by_kind"] == {
        "box outside the image": 2,
        "duplicate box": 1,
        "zero-size box": 1,
    }
    records = {d["record"] for d in decisions(tmp_path / "out")}
    assert records == {"img0/object 0", "img1/object 0", "img2/object 0", "img3/object 1"}
