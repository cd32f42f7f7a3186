"""Fuzzing the untrusted inputs: ``visionflow ingest`` sources and ``visionflow evaluate`` files.

Every input a user can hand the pipeline is generated here from hypothesis strategies that mix
valid structure with garbage (wrong types, NaN/inf, huge and negative numbers, truncated bytes,
random bytes, malformed RLE). The contract under test (issue 8, "bad input everywhere"): each
call either succeeds or raises the stage's own error type (:class:`DataError` for ingest,
:class:`EvaluationError` for evaluate) naming the file; any other exception is a crash.

The example counts are bounded so the module stays inside the test budget (a few seconds per
property on a shared CPU). For a longer fuzzing session raise them, e.g.
``VISIONFLOW_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py`` (the random seed then varies per run;
by default it is derandomised, so CI runs are reproducible).

Crashes found were fixed; each keeps a regression test with its minimal reproducer (``test_known_crash_*``)
that now asserts the clear error.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tarfile
import tempfile
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from PIL import Image

from components.config import DataConfig
from components.data.ingest import ingest
from components.errors import DataError, EvaluationError, VisionflowError
from components.metrics.evaluate_files import evaluate_files

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = REPO / "components"
EXAMPLES = int(os.environ.get("VISIONFLOW_FUZZ_EXAMPLES", "0"))
CATS = ["cat", "dog"]


def fuzz_settings(default_examples: int) -> settings:
    """Bounded by default (derandomised, no deadline on a shared CPU); ``VISIONFLOW_FUZZ_EXAMPLES`` raises it."""
    return settings(
        max_examples=EXAMPLES or default_examples,
        deadline=None,
        derandomize=EXAMPLES == 0,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


#: Crashes already found and reported, keyed by (exception type, file, function) of the raising frame
#: inside ``components/``, each with a regression test below; the fuzzers discard examples that
#: hit one (``reject``), so they keep searching for *new* crashes instead of re-finding a known one.
#: Remove an entry when its owner fixes it (its reproducer then XPASSes, which strict mode reports).
KNOWN_CRASHES: dict[tuple[str, str, str], str] = {}


def _crash_site(err: BaseException) -> tuple[str, str, str] | None:
    """(exception type, repo-relative file, function) of the innermost traceback frame under components/."""
    site = None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        path = Path(frame.f_code.co_filename).resolve()
        if path.is_relative_to(COMPONENTS):
            site = (type(err).__name__, path.relative_to(REPO).as_posix(), frame.f_code.co_name)
    return site


def expect_clear_error(call: Callable[[], Any], error: type[VisionflowError]) -> Any:
    """Run ``call``: a result, or ``error`` naming a file or a record; anything else propagates (a crash)."""
    try:
        result = call()
    except error as err:
        assert err.file or err.record, f"{type(err).__name__} names neither file nor record: {err}"
        assert str(err)
        record_outcome(f"{type(err).__name__}: {err.message[:40]}")
        return err
    except Exception as err:
        if _crash_site(err) in KNOWN_CRASHES:
            reject()  # reported; see the reproducer named in KNOWN_CRASHES
        raise
    record_outcome("accepted")
    return result


def record_outcome(outcome: str) -> None:
    """A hypothesis event (``--hypothesis-show-statistics`` shows how deep the inputs got); no-op outside hypothesis."""
    if currently_in_test_context():
        event(outcome)


# --------------------------------------------------------------------------- strategies: values that break parsers

#: numbers a real exporter writes, plus the ones that break naive code (JSON NaN/Infinity included)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.5, 1e308, -1e-308, 2**31, 2**63]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=8))
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def maybe(valid: st.SearchStrategy, garbage: st.SearchStrategy = json_values) -> st.SearchStrategy:
    """Mostly the valid value, sometimes garbage: deep records get past the first type checks."""
    return st.one_of(valid, valid, valid, garbage)


rle_counts = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=48, max_codepoint=111), max_size=12),  # pycocotools' alphabet
    st.text(max_size=8),
    st.lists(st.integers(min_value=-5, max_value=400), max_size=6),
    json_values,
)
rle = st.fixed_dictionaries(
    {"size": maybe(st.lists(st.integers(min_value=-2, max_value=40), min_size=2, max_size=2)), "counts": rle_counts}
)
polygon = st.lists(st.lists(numbers, max_size=10), max_size=3)
segmentation = st.one_of(rle, polygon, json_values)
bbox = maybe(st.lists(st.floats(min_value=-5, max_value=40, allow_nan=False), min_size=4, max_size=4), st.lists(numbers, max_size=5))


def png_bytes(size: tuple[int, int] = (24, 20), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size: tuple[int, int] = (24, 20), seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def mangled(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` truncated, with bytes flipped, or replaced by random bytes."""
    return st.one_of(
        st.integers(min_value=0, max_value=len(data)).map(lambda n: data[:n]),
        st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
            lambda flips: bytes(_flip(bytearray(data), flips))
        ),
        st.binary(max_size=64),
    )


def _flip(buf: bytearray, flips: list[tuple[int, int]]) -> bytearray:
    for i, b in flips:
        buf[i] = b
    return buf


@pytest.fixture(scope="module")
def scratch():
    """One scratch folder per module; each example works in a fresh sub-folder (hypothesis forbids tmp_path per example)."""
    root = Path(tempfile.mkdtemp(prefix="visionflow-fuzz-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def fresh(root: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=root))


def run_ingest(spec: str, work: Path) -> Any:
    return expect_clear_error(lambda: ingest(spec, work / "out", cfg=DataConfig()), DataError)


# --------------------------------------------------------------------------- ingest: COCO


coco_image = st.fixed_dictionaries(
    {
        "id": maybe(st.integers(min_value=1, max_value=3)),
        "file_name": maybe(st.sampled_from(["a.png", "b.jpg", "missing.png"]), st.one_of(json_values, st.text(max_size=12))),
        "width": maybe(st.integers(min_value=1, max_value=30), numbers),
        "height": maybe(st.integers(min_value=1, max_value=30), numbers),
    }
)
coco_annotation = st.fixed_dictionaries(
    {
        "id": maybe(st.integers(min_value=1, max_value=6)),
        "image_id": maybe(st.integers(min_value=0, max_value=3)),
        "category_id": maybe(st.integers(min_value=0, max_value=3)),
        "bbox": bbox,
        "area": maybe(st.floats(min_value=0, max_value=900)),
        "iscrowd": maybe(st.integers(0, 1)),
    },
    optional={"segmentation": segmentation},
)
coco_category = st.fixed_dictionaries(
    {"id": maybe(st.integers(min_value=1, max_value=3)), "name": maybe(st.sampled_from(CATS + ["", "bird"]))}
)
coco_document = st.one_of(
    st.fixed_dictionaries(
        {
            "images": maybe(st.lists(coco_image, max_size=4)),
            "annotations": maybe(st.lists(coco_annotation, max_size=6)),
            "categories": maybe(st.lists(coco_category, max_size=3)),
        }
    ),
    json_values,
)


def write_coco_source(root: Path, document: Any) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(png_bytes())
    (root / "images" / "b.jpg").write_bytes(jpeg_bytes())
    path = root / "instances.json"
    path.write_text(json.dumps(document))  # NaN/Infinity as JSON tokens, as Python exporters write them
    return path


@fuzz_settings(40)
@given(document=coco_document)
def test_coco_documents_fail_clearly(scratch, document):
    work = fresh(scratch)
    path = write_coco_source(work / "src", document)
    run_ingest(f"coco:{path}", work)


VALID_COCO = {
    "images": [{"id": 1, "file_name": "a.png", "width": 24, "height": 20}, {"id": 2, "file_name": "b.jpg", "width": 24, "height": 20}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0,
         "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [4, 4, 12, 9], "area": 108, "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
}


@fuzz_settings(30)
@given(blob=mangled(json.dumps(VALID_COCO).encode()))
def test_coco_bytes_fail_clearly(scratch, blob):
    work = fresh(scratch)
    path = write_coco_source(work / "src", {})
    path.write_bytes(blob)
    run_ingest(f"coco:{path}", work)


@fuzz_settings(20)
@given(image_a=mangled(png_bytes()), image_b=mangled(jpeg_bytes()))
def test_corrupt_images_fail_clearly(scratch, image_a, image_b):
    """Truncated, bit-flipped or random image bytes behind a valid annotation file."""
    work = fresh(scratch)
    path = write_coco_source(work / "src", VALID_COCO)
    (work / "src" / "images" / "a.png").write_bytes(image_a)
    (work / "src" / "images" / "b.jpg").write_bytes(image_b)
    run_ingest(f"coco:{path}", work)


# --------------------------------------------------------------------------- ingest: VOC

xml_text = st.one_of(
    st.sampled_from(["cat", "dog", "12", "-3", "1e9", "nan", "inf", "0", "", "  7.5 "]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="<>&\x00"), max_size=10),
)


@st.composite
def voc_xml(draw) -> str:
    objects = ""
    for _ in range(draw(st.integers(0, 3))):
        box = "".join(f"<{k}>{draw(xml_text)}</{k}>" for k in ("xmin", "ymin", "xmax", "ymax"))
        objects += (
            f"<object><name>{draw(xml_text)}</name><difficult>{draw(xml_text)}</difficult>"
            + (f"<bndbox>{box}</bndbox>" if draw(st.booleans()) else "")
            + "</object>"
        )
    doc = (
        f"<annotation><filename>{draw(st.sampled_from(['a.jpg', 'b.jpg', '', 'zz.jpg', '../a.jpg']))}</filename>"
        f"<size><width>{draw(xml_text)}</width><height>{draw(xml_text)}</height><depth>3</depth></size>"
        f"{objects}</annotation>"
    )
    cut = draw(st.one_of(st.just(len(doc)), st.integers(0, len(doc))))
    return doc[:cut]


@fuzz_settings(35)
@given(first=voc_xml(), second=voc_xml(), split_list=st.one_of(st.none(), st.text(max_size=20)))
def test_voc_annotations_fail_clearly(scratch, first, second, split_list):
    work = fresh(scratch)
    src = work / "src"
    (src / "Annotations").mkdir(parents=True)
    (src / "JPEGImages").mkdir()
    (src / "JPEGImages" / "a.jpg").write_bytes(jpeg_bytes())
    (src / "JPEGImages" / "b.jpg").write_bytes(jpeg_bytes(seed=2))
    (src / "Annotations" / "a.xml").write_text(first)
    (src / "Annotations" / "b.xml").write_text(second)
    if split_list is not None:
        (src / "ImageSets" / "Main").mkdir(parents=True)
        (src / "ImageSets" / "Main" / "train.txt").write_text(split_list)
    run_ingest(f"voc:{src}", work)


# --------------------------------------------------------------------------- ingest: YOLO

label_token = st.one_of(
    st.sampled_from(["0", "1", "2", "-1", "0.5", "0.25", "1.5", "nan", "inf", "-0.1", "1e400", "x"]),
    st.text(alphabet="0123456789.-e+", max_size=6),
)
label_line = st.lists(label_token, min_size=0, max_size=9).map(" ".join)
label_file = st.one_of(st.lists(label_line, max_size=4).map("\n".join), st.binary(max_size=24).map(lambda b: b.decode("latin-1")))
data_yaml = st.one_of(
    st.just("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: cat\n  1: dog\n"),
    st.builds(
        lambda names, nc, train: f"train: {train}\nnames: {json.dumps(names)}\n" + (f"nc: {nc}\n" if nc is not None else ""),
        names=json_values,
        nc=st.one_of(st.none(), st.integers(-1, 3)),
        train=st.sampled_from(["images/train", "nowhere", "[images/train, images/val]", "", "{a: 1}"]),
    ),
    st.text(max_size=40),
)


@fuzz_settings(35)
@given(yaml_text=data_yaml, train_labels=label_file, val_labels=label_file)
def test_yolo_sources_fail_clearly(scratch, yaml_text, train_labels, val_labels):
    work = fresh(scratch)
    src = work / "src"
    for split, labels in (("train", train_labels), ("val", val_labels)):
        (src / "images" / split).mkdir(parents=True)
        (src / "labels" / split).mkdir(parents=True)
        (src / "images" / split / "a.png").write_bytes(png_bytes(seed=len(split)))
        (src / "labels" / split / "a.txt").write_text(labels, encoding="latin-1")
    (src / "data.yaml").write_text(yaml_text)
    run_ingest(f"yolo:{src}", work)


# --------------------------------------------------------------------------- ingest: archives


@fuzz_settings(25)
@given(kind=st.sampled_from([".zip", ".tar.gz"]), data=st.data())
def test_corrupt_archives_fail_clearly(scratch, kind, data):
    """A VOC folder packed as an archive, then truncated or bit-flipped."""
    work = fresh(scratch)
    buf = io.BytesIO()
    members = {"voc/Annotations/a.xml": b"<annotation><filename>a.jpg</filename></annotation>", "voc/JPEGImages/a.jpg": jpeg_bytes()}
    if kind == ".zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for name, blob in members.items():
                zf.writestr(name, blob)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, blob in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    archive = work / f"voc{kind}"
    archive.write_bytes(data.draw(mangled(buf.getvalue())))
    run_ingest(f"voc:{archive}", work)


# --------------------------------------------------------------------------- evaluate: ground truth and results files

EVAL_GT = {
    "images": [{"id": 1, "width": 20, "height": 16}, {"id": 2, "width": 20, "height": 16}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 6], "area": 48, "iscrowd": 0,
         "segmentation": [[2, 2, 10, 2, 10, 8, 2, 8]]},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 4, 9, 9], "area": 81, "iscrowd": 0,
         "segmentation": {"size": [16, 20], "counts": "d297000000000000000l2"}},
    ],
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
}
EVAL_RESULTS = [
    {"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [2, 2, 8, 6]},
    {"image_id": 2, "category_id": 2, "score": 0.8, "bbox": [5, 4, 9, 8]},
]

eval_annotation = st.fixed_dictionaries(
    {
        "id": maybe(st.integers(1, 5)),
        "image_id": maybe(st.integers(0, 3)),
        "category_id": maybe(st.integers(0, 3)),
        "area": maybe(st.floats(0, 400)),
        "bbox": bbox,
    },
    optional={"segmentation": segmentation, "iscrowd": maybe(st.integers(0, 1))},
)
eval_gt = st.one_of(
    st.fixed_dictionaries(
        {
            "images": maybe(
                st.lists(
                    st.fixed_dictionaries(
                        {"id": maybe(st.integers(1, 3)), "width": maybe(st.integers(0, 30), numbers), "height": maybe(st.integers(0, 30), numbers)}
                    ),
                    max_size=3,
                )
            ),
            "annotations": maybe(st.lists(eval_annotation, max_size=4)),
            "categories": maybe(st.lists(st.fixed_dictionaries({"id": maybe(st.integers(1, 3)), "name": maybe(st.sampled_from(CATS))}), max_size=3)),
        }
    ),
    json_values,
)
eval_result = st.fixed_dictionaries(
    {
        "image_id": maybe(st.integers(0, 3)),
        "category_id": maybe(st.integers(0, 3)),
        "score": maybe(st.floats(0, 1), numbers),
    },
    optional={"bbox": bbox, "segmentation": segmentation},
)
eval_results = st.one_of(st.lists(eval_result, max_size=5), json_values)


def run_evaluate(work: Path, gt: Any, results: Any, iou_type: str, *, raw: bool = False) -> Any:
    gt_path, pred_path = work / "gt.json", work / "pred.json"
    gt_path.write_bytes(gt if raw else json.dumps(gt).encode())
    pred_path.write_bytes(results if isinstance(results, bytes) else json.dumps(results).encode())
    return expect_clear_error(lambda: evaluate_files(gt_path, pred_path, iou_type=iou_type, quiet=True), EvaluationError)


@fuzz_settings(50)
@given(gt=eval_gt, iou_type=st.sampled_from(["bbox", "segm"]))
def test_evaluate_ground_truth_fails_clearly(scratch, gt, iou_type):
    run_evaluate(fresh(scratch), gt, EVAL_RESULTS, iou_type)


@fuzz_settings(50)
@given(results=eval_results, iou_type=st.sampled_from(["bbox", "segm"]))
def test_evaluate_results_fail_clearly(scratch, results, iou_type):
    """Garbage results: NaN/inf scores, wrong types, malformed boxes, malformed RLE and polygons."""
    run_evaluate(fresh(scratch), EVAL_GT, results, iou_type)


@fuzz_settings(30)
@given(gt_blob=mangled(json.dumps(EVAL_GT).encode()), pred_blob=mangled(json.dumps(EVAL_RESULTS).encode()))
def test_evaluate_truncated_files_fail_clearly(scratch, gt_blob, pred_blob):
    run_evaluate(fresh(scratch), gt_blob, pred_blob, "bbox", raw=True)


def test_nan_score_names_the_record(tmp_path):
    """The fuzzers' most common find, pinned: a NaN score is an EvaluationError naming the file and result index."""
    results = [dict(EVAL_RESULTS[0]), {**EVAL_RESULTS[1], "score": math.nan}]
    err = run_evaluate(tmp_path, EVAL_GT, results, "bbox")
    assert isinstance(err, EvaluationError)
    assert err.file == str(tmp_path / "pred.json") and "results[1]" in (err.record or "")


@pytest.mark.parametrize(
    "counts",
    ["Q51?00", "\x7f\x7f", "o", [3, -1], [1, 2, 3]],
    ids=["short-runs", "outside-alphabet", "dangling-continuation", "negative-run", "wrong-total"],
)
def test_malformed_rle_is_rejected_before_pycocotools(tmp_path, counts):
    """Malformed RLE must never reach pycocotools' C decoder (which can read past its buffer)."""
    results = [{"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": {"size": [16, 20], "counts": counts}}]
    err = run_evaluate(tmp_path, EVAL_GT, results, "segm")
    assert isinstance(err, EvaluationError), err
    assert "results[0]" in (err.record or "")


# --------------------------------------------------------------------------- crashes found and fixed: regression tests


def write_voc_source(root: Path, xml: str) -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "JPEGImages" / "a.jpg").write_bytes(jpeg_bytes())
    (root / "Annotations" / "a.xml").write_text(xml)
    return root


def test_known_crash_voc_infinite_size(tmp_path):
    src = write_voc_source(
        tmp_path / "src",
        "<annotation><filename>a.jpg</filename><size><width>12</width><height>INF</height></size></annotation>",
    )
    ingest(f"voc:{src}", tmp_path / "out", cfg=DataConfig())  # the image's own size is used, and reported
    report = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert [d["action"] for d in report["decisions"]] == ["repaired"]
    assert "not a valid image size" in report["decisions"][0]["reason"]


def test_known_crash_unhashable_result_image_id(tmp_path):
    gt, pred = tmp_path / "gt.json", tmp_path / "pred.json"
    gt.write_text(json.dumps(EVAL_GT))
    pred.write_text(json.dumps([{"image_id": [], "category_id": 1, "score": 0.5, "bbox": [0, 0, 1, 1]}]))
    with pytest.raises(EvaluationError):
        evaluate_files(gt, pred, iou_type="bbox", quiet=True)


@pytest.mark.parametrize("height", [math.inf, math.nan], ids=["inf", "nan"])
def test_known_crash_coco_non_finite_image_size(tmp_path, height):
    document = {"images": [{"id": 1, "file_name": "a.png", "width": 1, "height": height}], "annotations": [], "categories": []}
    path = write_coco_source(tmp_path / "src", document)
    ingest(f"coco:{path}", tmp_path / "out", cfg=DataConfig())  # the image's own size is used, and reported
    report = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert any("not a valid image size" in d["reason"] and d["action"] == "repaired" for d in report["decisions"])


def test_known_crash_yolo_split_entry_not_a_path(tmp_path):
    src = tmp_path / "src"
    (src / "images" / "train").mkdir(parents=True)
    (src / "images" / "train" / "a.png").write_bytes(png_bytes())
    (src / "data.yaml").write_text("train: {0}\nnames: [cat]\n")
    with pytest.raises(DataError):
        ingest(f"yolo:{src}", tmp_path / "out", cfg=DataConfig())


@pytest.mark.parametrize("key", ["id", "image_id", "category_id"])
def test_known_crash_unhashable_ground_truth_ids(tmp_path, key):
    gt = json.loads(json.dumps(EVAL_GT))
    gt["annotations"][0][key] = []
    gt_path, pred_path = tmp_path / "gt.json", tmp_path / "pred.json"
    gt_path.write_text(json.dumps(gt))
    pred_path.write_text(json.dumps(EVAL_RESULTS))
    with pytest.raises(EvaluationError):
        evaluate_files(gt_path, pred_path, iou_type="bbox", quiet=True)
