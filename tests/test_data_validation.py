"""Bad input gets a clear answer and loses nothing: every bad-input kind, in default and strict mode.

Each case builds a tiny COCO (or VOC / masks) source in tmp_path with exactly one flaw next to
good records. Default mode repairs or skips it and writes one report line naming the file, the
record and the action; strict mode raises DataError naming the file and the record (exit 2 from
the CLI). Unparseable sources fail in both modes with the file and the position.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from components.config import DataConfig
from components.data.archives import extract_archive
from components.data.ingest import ingest
from components.errors import DataError
from flows.cli import main as cli_main


def make_coco(root: Path) -> dict:
    """Three 32x24 JPEG images, each with one 'box' object (a square polygon), and the COCO dict."""
    images, anns = [], []
    for i in range(1, 4):
        rng = np.random.default_rng(i)
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
            root / "images" / f"im{i}.jpg", quality=90
        )
        images.append({"id": i, "file_name": f"im{i}.jpg", "width": 32, "height": 24})
        anns.append(
            {
                "id": i,
                "image_id": i,
                "category_id": 1,
                "bbox": [4, 4, 10, 10],
                "area": 100.0,
                "iscrowd": 0,
                "segmentation": [[4, 4, 14, 4, 14, 14, 4, 14]],
            }
        )
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "disc"}],
    }


def _truncate(root: Path, data: dict) -> None:
    path = root / "images" / "im2.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _missing(root: Path, data: dict) -> None:
    (root / "images" / "im2.jpg").unlink()


def _set_bbox(bbox: list) -> Callable[[Path, dict], None]:
    def mutate(root: Path, data: dict) -> None:
        data["annotations"][1]["bbox"] = bbox
        if any(v != v for v in bbox):  # NaN: keep the valid polygon, so the box itself is what fails
            return
        data["annotations"][1]["segmentation"] = [
            [
                bbox[0],
                bbox[1],
                bbox[0] + bbox[2],
                bbox[1],
                bbox[0] + bbox[2],
                bbox[1] + bbox[3],
                bbox[0],
                bbox[1] + bbox[3],
            ]
        ]

    return mutate


def _unknown_category(root: Path, data: dict) -> None:
    data["annotations"][1]["category_id"] = 99


def _orphan(root: Path, data: dict) -> None:
    data["annotations"][1]["image_id"] = 999


def _duplicate_image_id(root: Path, data: dict) -> None:
    data["images"].append({"id": 1, "file_name": "im3.jpg", "width": 32, "height": 24})


def _segmentation(seg: object) -> Callable[[Path, dict], None]:
    def mutate(root: Path, data: dict) -> None:
        data["annotations"][1]["segmentation"] = seg

    return mutate


def _duplicate_box(root: Path, data: dict) -> None:
    data["annotations"].append(dict(data["annotations"][1], id=10))


def _declared_size(root: Path, data: dict) -> None:
    data["images"][1]["width"] = 64


# name, mutation, expected (record, reason starts with, action)
CASES = [
    ("truncated image", _truncate, ("image 2", "unreadable or truncated image", "skipped")),
    ("missing image", _missing, ("image 2", "missing image file", "skipped")),
    ("box outside", _set_bbox([20, 10, 20, 20]), ("annotation 2", "box outside the 32x24 image", "repaired")),
    ("box entirely outside", _set_bbox([40, 30, 5, 5]), ("annotation 2", "box entirely outside", "skipped")),
    ("zero box", _set_bbox([4, 4, 0, 10]), ("annotation 2", "zero or negative box size", "skipped")),
    ("negative box", _set_bbox([4, 4, 10, -3]), ("annotation 2", "zero or negative box size", "skipped")),
    (
        "NaN box",
        _set_bbox([float("nan"), 4, 10, 10]),
        ("annotation 2", "NaN or infinite box coordinate", "skipped"),
    ),
    ("unknown category", _unknown_category, ("annotation 2", "unknown category", "skipped")),
    (
        "annotation of a missing image",
        _orphan,
        ("annotation 2", "annotation points at a missing image", "skipped"),
    ),
    ("duplicate image id", _duplicate_image_id, ("image 1", "duplicate image id", "skipped")),
    ("malformed polygon", _segmentation([[4, 4, 14]]), ("annotation 2", "malformed polygon", "skipped")),
    (
        "partly malformed polygon",
        _segmentation([[4, 4, 14, 4, 14, 14], [1, 2, 3]]),
        ("annotation 2", "malformed polygon 1", "repaired"),
    ),
    (
        "RLE size differs",
        _segmentation({"size": [10, 10], "counts": "0"}),
        ("annotation 2", "mask size 10x10 differs", "skipped"),
    ),
    ("duplicate box", _duplicate_box, ("annotation 10", "duplicate box", "skipped")),
    ("declared size differs", _declared_size, ("image 2", "declared size 64x24 differs", "repaired")),
]


def tree_digest(root: Path) -> str:
    h = hashlib.md5()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("name,mutate,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_record_default_and_strict(tmp_path, name, mutate, expected):
    src = tmp_path / "src"
    data = make_coco(src)
    mutate(src, data)
    ann = src / "instances.json"
    ann.write_text(json.dumps(data))
    before = tree_digest(src)

    summary = ingest(f"coco:{ann}", tmp_path / "out", cfg=DataConfig())
    record, reason, action = expected
    decisions = json.loads((tmp_path / "out" / "ingest_report.json").read_text())["decisions"]
    assert any(
        d["record"] == record and d["reason"].startswith(reason) and d["action"] == action and d["file"]
        for d in decisions
    ), decisions
    assert summary["report"]["total"] == len(decisions) >= 1
    assert sum(summary["splits"].values()) >= 2  # the good records are all there
    assert tree_digest(src) == before  # source files are never modified

    with pytest.raises(DataError) as err:
        ingest(f"coco:{ann}", tmp_path / "strict", cfg=DataConfig(), strict=True)
    assert f"[{record}]" in str(err.value) and err.value.file
    assert not (tmp_path / "strict").exists()  # nothing half-written


def test_invalid_xml_and_mis_sized_mask(tmp_path):
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20)).save(voc / "JPEGImages" / f"{i}.jpg")
        (voc / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename><object><name>x</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
            "<xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>"
        )
    (voc / "Annotations" / "1.xml").write_text("<annotation><filename>1.jpg</filename><object>")
    ingest(f"voc:{voc}", tmp_path / "out", cfg=DataConfig())
    (d,) = json.loads((tmp_path / "out" / "ingest_report.json").read_text())["decisions"]
    assert d["record"] == "1" and d["reason"].startswith("invalid XML at line 1") and d["action"] == "skipped"
    with pytest.raises(DataError, match=r"1\.xml \[1\]: invalid XML"):
        ingest(f"voc:{voc}", tmp_path / "strict", cfg=DataConfig(), strict=True)

    masks = tmp_path / "masks"
    for i in range(3):
        (masks / "image").mkdir(parents=True, exist_ok=True)
        (masks / "label").mkdir(exist_ok=True)
        Image.new("L", (16, 16)).save(masks / "image" / f"{i}.png")
        Image.new("L", (16, 12 if i == 2 else 16)).save(masks / "label" / f"{i}.png")
    ingest(f"masks:{masks}", tmp_path / "mout", cfg=DataConfig())
    (d,) = json.loads((tmp_path / "mout" / "ingest_report.json").read_text())["decisions"]
    assert (d["record"], d["action"]) == ("2", "skipped") and d["reason"].startswith(
        "mask size 16x12 differs"
    )
    with pytest.raises(DataError, match=r"\[2\]: mask size"):
        ingest(f"masks:{masks}", tmp_path / "mstrict", cfg=DataConfig(), strict=True)


@pytest.mark.parametrize("strict", [False, True])
def test_unparseable_source_fails_in_both_modes(tmp_path, strict):
    ann = tmp_path / "instances.json"
    ann.write_text('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [')
    with pytest.raises(DataError) as err:
        ingest(f"coco:{ann}", tmp_path / "out", cfg=DataConfig(), strict=strict)
    assert (
        str(ann) in str(err.value)
        and "line 1, column" in str(err.value)
        and "not valid JSON" in str(err.value)
    )
    yolo = tmp_path / "yolo"
    yolo.mkdir()
    (yolo / "data.yaml").write_text("names: [a, b\ntrain: images\n")
    with pytest.raises(DataError, match=r"data\.yaml \[line \d+, column \d+\]: not valid YAML"):
        ingest(f"yolo:{yolo}", tmp_path / "out", cfg=DataConfig(), strict=strict)


def test_nothing_usable_remains(tmp_path):
    src = tmp_path / "src"
    data = make_coco(src)
    for p in (src / "images").iterdir():
        p.unlink()
    (src / "instances.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="nothing usable remains"):
        ingest(f"coco:{src / 'instances.json'}", tmp_path / "out", cfg=DataConfig())


def test_cli_exit_codes(tmp_path, capsys):
    src = tmp_path / "src"
    data = make_coco(src)
    _set_bbox([4, 4, 0, 10])(src, data)
    (src / "instances.json").write_text(json.dumps(data))
    args = ["ingest", "--source", f"coco:{src / 'instances.json'}", "--out", str(tmp_path / "out")]
    assert cli_main(args) == 0
    assert cli_main([*args, "--strict"]) == 2
    err = capsys.readouterr().err
    assert "instances.json [annotation 2]: zero or negative box size" in err
    assert cli_main(["ingest", "--source", "nonsense:x", "--out", str(tmp_path / "o")]) == 2


# --------------------------------------------------------------------------- archives (issue 8: zip slip)


def test_archive_members_escaping_the_target_are_rejected(tmp_path):
    evil_zip = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil_zip, "w") as zf:
        zf.writestr("ok/readme.txt", "fine")
        zf.writestr("../escaped.txt", "gotcha")
    with pytest.raises(DataError, match=r"\[\.\./escaped\.txt\]: archive member escapes"):
        extract_archive(evil_zip, tmp_path / "x")
    assert not (tmp_path / "escaped.txt").exists()

    evil_tar = tmp_path / "evil.tar"
    with tarfile.open(evil_tar, "w") as tf:
        for name in ("/abs/path.txt",):
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match="escapes"):
        extract_archive(evil_tar, tmp_path / "y")
    link_tar = tmp_path / "link.tar"
    with tarfile.open(link_tar, "w") as tf:
        info = tarfile.TarInfo("data/link")
        info.type, info.linkname = tarfile.SYMTYPE, "../../etc/passwd"
        tf.addfile(info)
    with pytest.raises(DataError, match="escapes"):
        extract_archive(link_tar, tmp_path / "z")


def test_archive_source_ingests(tmp_path):
    src = tmp_path / "set"
    (src / "train" / "a").mkdir(parents=True)
    (src / "train" / "b").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(src / "train" / "a" / "1.png")
    Image.new("RGB", (8, 8), "blue").save(src / "train" / "b" / "2.png")
    archive = tmp_path / "set.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="set")
    summary = ingest(f"imagefolder:{archive}", tmp_path / "out", cfg=DataConfig())
    assert summary["splits"] == {"train": 2} and summary["categories"] == ["a", "b"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 50) | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = st.sampled_from(
    ["id", "image_id", "category_id", "bbox", "segmentation", "iscrowd", "file_name", "width"]
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["images", "annotations", "categories"]), field=FIELDS, value=JSON_VALUES)
def test_fuzzed_coco_fields_give_a_dataset_or_a_data_error(tmp_path, where, field, value):
    """Any value in any field: either a dataset with a report, or a DataError - never another exception."""
    src = tmp_path / "fuzz"
    data = make_coco(src)
    data[where][0][field] = value
    (src / "instances.json").write_text(json.dumps(data))
    try:
        ingest(f"coco:{src / 'instances.json'}", tmp_path / "fuzz_out", cfg=DataConfig())
    except DataError as err:
        assert err.file


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    label=st.text(alphabet="0123456789 .-e\nnaif", max_size=40),
    box=st.lists(st.text(max_size=5), min_size=4, max_size=4),
)
def test_fuzzed_yolo_and_voc_labels_give_a_dataset_or_a_data_error(tmp_path, label, box):
    yolo = tmp_path / "yolo"
    (yolo / "images" / "train").mkdir(parents=True, exist_ok=True)
    (yolo / "labels" / "train").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12)).save(yolo / "images" / "train" / "a.png")
    (yolo / "labels" / "train" / "a.txt").write_text(label)
    (yolo / "data.yaml").write_text("train: images/train\nnames: [a, b]\n")
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    (voc / "JPEGImages").mkdir(exist_ok=True)
    Image.new("RGB", (16, 12)).save(voc / "JPEGImages" / "a.jpg")
    values = "".join(
        f"<{k}>{v.replace('<', '').replace('&', '')}</{k}>"
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
    )
    (voc / "Annotations" / "a.xml").write_text(
        f"<annotation><object><name>x</name><bndbox>{values}</bndbox></object></annotation>"
    )
    for spec in (f"yolo:{yolo}", f"voc:{voc}"):
        try:
            ingest(spec, tmp_path / "out", cfg=DataConfig())
        except DataError as err:
            assert err.file
