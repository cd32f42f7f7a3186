"""``visionflow evaluate`` on real annotations (BCCD), its outputs, its errors and its light imports."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from components.errors import EvaluationError
from components.metrics.coco import COCO_METRIC_NAMES
from components.metrics.evaluate_files import evaluate_files

BCCD = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bccd" / "BCCD"
if not BCCD.exists():
    BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd" / "BCCD"
REPO = Path(__file__).resolve().parents[1]


def bccd_to_coco(n_images: int = 25) -> dict:
    """The first BCCD VOC XML files as COCO instances (boxes as they are, ``difficult`` kept)."""
    files = sorted((BCCD / "Annotations").glob("*.xml"))[:n_images]
    names = ["Platelets", "RBC", "WBC"]
    images, anns = [], []
    for i, f in enumerate(files):
        root = ET.parse(f).getroot()
        size = root.find("size")
        images.append(
            {
                "id": i + 1,
                "file_name": root.findtext("filename"),
                "width": int(size.findtext("width")),
                "height": int(size.findtext("height")),
            }
        )
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            if x2 <= x1 or y2 <= y1:  # BCCD has a few degenerate boxes; ingest reports them, we skip them
                continue
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": names.index(obj.findtext("name").strip()) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "difficult": int(obj.findtext("difficult") or 0),
                }
            )
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
    }


def simulated_predictions(gt: dict, seed: int = 0) -> list[dict]:
    """A plausible detector's output: jittered hits with confident scores, misses, wrong classes, false alarms."""
    rng = np.random.default_rng(seed)
    res = []
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue  # missed
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() < 0.9 else int(rng.integers(1, 4))
        res.append(
            {
                "image_id": a["image_id"],
                "category_id": cat,
                "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                "score": float(rng.uniform(0.3, 1.0)),
            }
        )
    for img in gt["images"]:
        for _ in range(int(rng.integers(0, 6))):
            x, y = rng.uniform(0, img["width"] - 60), rng.uniform(0, img["height"] - 60)
            res.append(
                {
                    "image_id": img["id"],
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": [x, y, 60.0, 55.0],
                    "score": float(rng.uniform(0, 0.6)),
                }
            )
    return res


def _pycocotools_stats(gt: dict, res: list[dict], iou_type: str) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        e = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(res)), iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


@pytest.fixture()
def bccd_files(tmp_path):
    gt = bccd_to_coco()
    res = simulated_predictions(gt)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(res))
    return tmp_path / "gt.json", tmp_path / "pred.json", gt, res


def test_bccd_bbox_equals_pycocotools_and_writes_reports(bccd_files, tmp_path, capsys):
    gt_path, pred_path, gt, res = bccd_files
    out = tmp_path / "metrics" / "evaluate.json"
    metrics = evaluate_files(gt_path, pred_path, iou_type="bbox", out=out)
    np.testing.assert_allclose(
        [metrics["bbox"][k] for k in COCO_METRIC_NAMES],
        _pycocotools_stats(gt, res, "bbox"),
        rtol=0,
        atol=1e-9,
    )
    printed = capsys.readouterr().out
    assert (
        "AP @[IoU=0.50:0.95 | area=   all | maxDets=100]" in printed
        and "RBC" in printed
        and "VOC AP@0.5" in printed
    )
    assert json.loads(out.read_text())["bbox"]["map"] == metrics["bbox"]["map"]
    plots = tmp_path / "metrics" / "evaluate_plots"
    for name in (
        "pr_curves.png",
        "pr_iou50.csv",
        "pr_iou75.csv",
        "confusion_matrix.png",
        "confusion_matrix.json",
        "confusion_dvc.json",
    ):
        assert (plots / name).stat().st_size > 0, name
    assert (plots / "pr_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (plots / "pr_iou50.csv").read_text().splitlines()[0]
    assert header == "recall,Platelets,RBC,WBC"
    cm = json.loads((plots / "confusion_matrix.json").read_text())
    assert cm["labels"] == ["Platelets", "RBC", "WBC", "background"]
    n_gt = sum(1 for a in gt["annotations"] if not a["difficult"])
    assert sum(sum(r) for r in cm["matrix"][:3]) == n_gt  # every counted object is found or missed once
    assert len(json.loads((plots / "confusion_dvc.json").read_text())) == sum(map(sum, cm["matrix"]))


def test_bccd_segm_with_rle_predictions(tmp_path):
    gt = bccd_to_coco(8)
    for a in gt["annotations"]:  # ellipse-ish polygons inside each box as instance masks
        x, y, w, h = a["bbox"]
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        a["segmentation"] = [
            np.c_[x + w / 2 + 0.45 * w * np.cos(t), y + h / 2 + 0.45 * h * np.sin(t)]
            .ravel()
            .round(2)
            .tolist()
        ]
    res = []
    for r in simulated_predictions(gt, seed=1):
        img = gt["images"][r["image_id"] - 1]
        m = np.zeros((img["height"], img["width"]), np.uint8)
        x, y, w, h = (int(round(v)) for v in r["bbox"])
        m[max(y, 0) : y + h, max(x, 0) : x + w] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        res.append(
            {
                "image_id": r["image_id"],
                "category_id": r["category_id"],
                "segmentation": rle,
                "score": r["score"],
            }
        )
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(res))
    metrics = evaluate_files(tmp_path / "gt.json", tmp_path / "pred.json", iou_type="segm", quiet=True)
    np.testing.assert_allclose(
        [metrics["segm"][k] for k in COCO_METRIC_NAMES],
        _pycocotools_stats(gt, res, "segm"),
        rtol=0,
        atol=1e-9,
    )


def _bad(tmp_path: Path, gt: dict, res, iou_type: str = "bbox") -> str:
    (tmp_path / "g.json").write_text(json.dumps(gt))
    (tmp_path / "p.json").write_text(res if isinstance(res, str) else json.dumps(res))
    with pytest.raises(EvaluationError) as info:
        evaluate_files(tmp_path / "g.json", tmp_path / "p.json", iou_type=iou_type, quiet=True)
    return str(info.value)


def test_bad_files_name_the_record(tmp_path):
    gt = bccd_to_coco(3)
    res = simulated_predictions(gt)
    r = copy.deepcopy(res)
    del r[4]["score"]
    assert "results[4]" in _bad(tmp_path, gt, r) and "score" in _bad(tmp_path, gt, r)
    r = copy.deepcopy(res)
    r[2]["image_id"] = 999
    assert "results[2] image_id 999" in _bad(tmp_path, gt, r)
    r = copy.deepcopy(res)
    r[3]["score"] = math.nan
    msg = _bad(tmp_path, gt, r)  # json writes NaN, Python's json reads it
    assert "results[3]" in msg and "nan" in msg
    r = copy.deepcopy(res)
    r[1]["bbox"] = [1, 2, 3]
    assert "results[1]" in _bad(tmp_path, gt, r)
    assert "not valid JSON" in _bad(tmp_path, gt, "[{")
    g = copy.deepcopy(gt)
    del g["annotations"][5]["area"]
    assert "annotations[5] id 6" in _bad(tmp_path, g, res) and "'area'" in _bad(tmp_path, g, res)
    g = copy.deepcopy(gt)
    g["annotations"][2]["image_id"] = 77
    assert "annotations[2]" in _bad(tmp_path, g, res)
    g = copy.deepcopy(gt)
    del g["categories"]
    assert "categories" in _bad(tmp_path, g, res)
    # a malformed RLE must not reach pycocotools' C code
    g = copy.deepcopy(gt)
    for a in g["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    seg = [
        {
            "image_id": 1,
            "category_id": 2,
            "score": 0.5,
            "segmentation": {"size": [480, 640], "counts": "PPYo1"},
        }
    ]
    assert "results[0]" in _bad(tmp_path, g, seg, "segm") and "RLE" in _bad(tmp_path, g, seg, "segm")
    seg[0]["segmentation"] = {"size": [480, 640], "counts": [10, 20]}
    assert "uncompressed RLE" in _bad(tmp_path, g, seg, "segm")
    with pytest.raises(EvaluationError, match="not found"):
        evaluate_files(tmp_path / "missing.json", tmp_path / "p.json")


def test_cli_prints_one_line_and_exits_2(bccd_files, tmp_path):
    gt_path, pred_path, gt, res = bccd_files
    res[0]["image_id"] = 12345
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(res))
    code = "from flows.cli import main; raise SystemExit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; " + code, "evaluate", "--gt", str(gt_path), "--pred", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "results[0] image_id 12345" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_evaluate_import_is_light():
    """The evaluate command's module pulls in no torch, training code, MLflow, Prefect or matplotlib."""
    code = (
        "import sys, components.metrics.evaluate_files;"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'mlflow', 'prefect', 'matplotlib', 'pandas'});"
        "train = [m for m in sys.modules if m in ('components.engine', 'components.models', 'components.tracking')];"
        "print(heavy + train)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_visionflow_evaluate_on_the_ingested_bccd_test_split(tmp_path):
    """The real chain: `visionflow ingest` writes the canonical BCCD, `visionflow evaluate` scores predictions on it."""
    ingest_module = pytest.importorskip("components.data.ingest")
    from components.config import DataConfig

    root = tmp_path / "bccd"
    ingest_module.ingest(f"voc:{BCCD}", root, cfg=DataConfig())
    gt_path = root / "annotations" / "instances_test.json"
    gt = json.loads(gt_path.read_text())
    res = simulated_predictions(gt, seed=3)
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps(res))
    out = tmp_path / "metrics" / "evaluate.json"
    cli = Path(sys.executable).parent / "visionflow"
    cmd = (
        [str(cli)]
        if cli.exists()
        else [
            sys.executable,
            "-c",
            "import sys; from flows.cli import main; raise SystemExit(main(sys.argv[1:]))",
        ]
    )
    proc = subprocess.run(
        [*cmd, "evaluate", "--gt", str(gt_path), "--pred", str(pred_path), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "map_50" in proc.stdout and "Platelets" in proc.stdout
    metrics = json.loads(out.read_text())["bbox"]
    np.testing.assert_allclose(
        [metrics[k] for k in COCO_METRIC_NAMES], _pycocotools_stats(gt, res, "bbox"), rtol=0, atol=1e-9
    )
    assert (out.parent / "evaluate_plots" / "pr_curves.png").exists()
