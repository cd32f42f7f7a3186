"""ONNX export (components/export): every model family agrees with ImagePredictor; the consumer runs without torch.

Agreement is the issue's: boxes within 1 px, scores within 1e-4, labels equal, masks on >= 99.9 % of
pixels, on images of several sizes, at batch 1 and 3. Models are tiny and untrained (random weights,
seeded) with low score thresholds so that every detector returns detections to compare.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import object_images
from PIL import Image

from components.export.onnx_export import (
    ExportError,
    export_model,
    export_reference,
    selective_search_proposals,
)
from components.export.onnx_runtime import OnnxPredictor, encode_rle, resize_bilinear, resize_center_crop
from components.models import get_model, list_models
from components.stages.predict import ImagePredictor

REPO = Path(__file__).resolve().parents[1]
CATS = ["circle", "square"]
SEARCH = {"proposals_per_image": 40, "ss_scales": [100.0], "ss_color_spaces": ["hsv"], "ss_similarities": ["ctsf"]}
# (task, builder, tiny arguments); detectors at 64 px with a low threshold so that random weights give detections
CASES: dict[str, tuple[str, str, dict]] = {
    "classifier": ("classification", "classifier", {"num_classes": 2, "backbone": "convnet_small", "weights": None}),
    "classifier_crop": ("classification", "classifier", {"num_classes": 2, "backbone": "convnet_small", "weights": None}),
    "convnet": ("classification", "convnet", {"num_classes": 2}),
    "backbone": ("backbone", "convnet_small", {}),
    "sliding_window": ("detection", "sliding_window", {"window_sizes": [24], "crop_size": 16, "score_threshold": 0.3}),
    "overfeat": ("detection", "overfeat", {"window_size": 32, "head_channels": 32, "scales": [1.0, 0.75], "score_threshold": 0.3}),
    "yolo": ("detection", "yolo", {"S": 4, "hidden": 32, "dropout": 0.0}),
    "ssd": ("detection", "ssd", {}),
    "faster_rcnn": ("detection", "faster_rcnn", {"fpn_channels": 16, "representation_size": 64, "rpn_pre_nms_top_n": 100, "rpn_post_nms_top_n": 50}),
    "retinanet": ("detection", "retinanet", {"fpn_channels": 16, "score_threshold": 0.0}),
    "rcnn": ("detection", "rcnn", {**SEARCH, "crop_size": 16, "score_threshold": 0.0}),
    "fast_rcnn": ("detection", "fast_rcnn", {**SEARCH, "score_threshold": 0.0}),
    "fcn": ("segmentation", "fcn", {}),
    "unet": ("segmentation", "unet", {"base_channels": 8, "depth": 2}),
    "mask_rcnn": ("segmentation", "mask_rcnn", {"score_threshold": 0.0}),
}


def _build(key: str) -> tuple[torch.nn.Module, dict]:
    task, name, extra = CASES[key]
    args = dict(extra)
    if task in ("detection", "segmentation"):
        args = {"num_classes": len(CATS), **args}
        if name not in ("fcn", "unet"):
            args["image_size"] = 64
    torch.manual_seed(0)
    model = get_model(task, name, **args).eval()
    ckpt = {"task": task, "model_name": name, "model_args": args, "categories": [] if task == "backbone" else CATS, "image_size": 64}
    if key.startswith("classifier"):
        ckpt.update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], image_size=32)
    if key == "classifier_crop":  # the finetune stage's checkpoints: shorter side to 37, centre 32 x 32
        ckpt["eval_crop"] = 0.875
    return model, ckpt


def assert_records_agree(ref: list[dict], got: list[dict]) -> None:
    """The issue's tolerances; detections are paired by label, score and box (equal scores may come in either order)."""
    assert len(ref) == len(got)
    for r, g in zip(ref, got, strict=True):
        assert r.keys() == g.keys()
        if "probabilities" in r:
            assert r["label"] == g["label"]
            np.testing.assert_allclose(g["probabilities"], r["probabilities"], atol=1e-4)
        if "embedding" in r:
            np.testing.assert_allclose(g["embedding"], r["embedding"], atol=1e-4, rtol=1e-4)
        if "mask" in r:
            assert (np.asarray(r["mask"]) == np.asarray(g["mask"])).mean() >= 0.999
        if "boxes" in r:
            assert len(r["boxes"]) == len(g["boxes"]), (len(r["boxes"]), len(g["boxes"]))
            free = list(range(len(g["boxes"])))
            for i in range(len(r["boxes"])):
                match = [j for j in free if g["labels"][j] == r["labels"][i] and abs(g["scores"][j] - r["scores"][i]) <= 1e-4
                         and np.abs(np.subtract(g["boxes"][j], r["boxes"][i])).max() <= 1.0]
                assert match, f"detection {i} {r['labels'][i]} {r['scores'][i]} {r['boxes'][i]} has no counterpart"
                free.remove(match[0])
                if "masks" in r:
                    a, b = _decode(r["masks"][i]), _decode(g["masks"][match[0]])
                    assert (a == b).mean() >= 0.999


def _decode(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})


def test_every_registered_model_is_exported_or_refused_with_a_reason():
    names = {name for task in ("classification", "detection", "segmentation") for name in list_models(task)}
    covered = {CASES[k][1] for k in CASES}
    assert names <= covered, f"add a CASES entry for {sorted(names - covered)}"


@pytest.mark.parametrize("key", sorted(CASES))
def test_onnx_agrees_with_image_predictor(key, tmp_path, one_torch_thread):
    model, ckpt = _build(key)
    meta = export_model(model, ckpt, tmp_path / f"{key}.onnx")
    images = object_images()
    ref = ImagePredictor(model, ckpt, device="cpu").predict(images)
    predictor = OnnxPredictor(tmp_path / f"{key}.onnx")
    assert predictor.task == ckpt["task"] and predictor.categories == ckpt["categories"]
    proposals = selective_search_proposals(predictor.meta, images) if predictor.needs_proposals else None
    got = predictor.predict(images, proposals=proposals)
    assert_records_agree(ref, got)
    assert_records_agree(ref[:1], predictor.predict(images[:1], proposals=proposals and proposals[:1]))
    if "boxes" in ref[0]:
        assert sum(len(r["boxes"]) for r in ref) > 0, "the comparison needs detections"
    if meta["batch"] == "dynamic":  # the graph itself takes batches of 1 and 3
        x = np.stack([predictor.preprocess(img) for img in images])
        three = predictor.session.run(None, {"images": x})
        one = predictor.session.run(None, {"images": x[2:3]})
        for a, b in zip(three, one, strict=True):
            np.testing.assert_allclose(a[2:3], b, atol=1e-5)


def test_proposal_graphs_refuse_a_call_without_proposals_and_take_any_count(tmp_path):
    model, ckpt = _build("fast_rcnn")
    export_model(model, ckpt, tmp_path / "f.onnx")
    predictor = OnnxPredictor(tmp_path / "f.onnx")
    with pytest.raises(ValueError, match="proposals"):
        predictor.predict(object_images()[:1])
    for boxes in ([[2, 3, 30, 40]], np.zeros((0, 4)), [[0, 0, 10, 10]] * 50):  # one box, none (the whole image), many
        (record,) = predictor.predict(object_images()[:1], proposals=[np.asarray(boxes, np.float32)])
        assert set(record) == {"boxes", "labels", "scores"}


def test_export_errors_name_the_fix(tmp_path):
    with pytest.raises(ExportError, match="no ONNX export"):
        export_model(torch.nn.Linear(2, 2), {"task": "detection", "model_name": "linear", "image_size": 8}, tmp_path / "x.onnx")
    from components.errors import CheckpointError, ConfigError

    with pytest.raises(ConfigError, match="--format onnx"):
        export_reference("x.pt", tmp_path, fmt="tflite")
    with pytest.raises(CheckpointError, match="not found"):
        export_reference(str(tmp_path / "missing.pt"), tmp_path)


@pytest.mark.parametrize(("size", "out"), [((37, 53), (64, 64)), ((64, 64), (20, 31)), ((200, 9), (64, 64))])
def test_resize_matches_torch_interpolate(size, out):
    x = torch.rand(3, *size, generator=torch.Generator().manual_seed(1))
    for antialias in (True, False):
        want = torch.nn.functional.interpolate(x[None], size=out, mode="bilinear", align_corners=False, antialias=antialias)[0]
        np.testing.assert_allclose(resize_bilinear(x.numpy(), out, antialias=antialias), want.numpy(), atol=1e-5)


@pytest.mark.parametrize(("size", "side", "crop"), [((48, 80), 32, 0.875), ((100, 70), 32, 0.875), ((64, 64), 32, 0.875),
                                                   ((375, 500), 224, 0.875), ((31, 45), 32, 1.0), ((7, 300), 16, 0.5)])
def test_resize_center_crop_matches_the_torch_evaluation_transform(size, side, crop):
    from components.stages.pretrain import classification_eval_transform

    x = torch.rand(3, *size, generator=torch.Generator().manual_seed(2))
    want = classification_eval_transform(side, crop)(x)
    got = resize_center_crop(x.numpy(), side, crop)
    assert got.shape == (3, side, side)
    np.testing.assert_allclose(got, want.numpy(), atol=3e-5)  # float32 sums in another order (375 x 500: 1.1e-5)


def test_rle_equals_pycocotools():
    from components.data.canonical import encode_rle as coco_rle

    rng = np.random.default_rng(3)
    for mask in (rng.random((17, 23)) > 0.5, np.ones((5, 4), bool), np.zeros((6, 3), bool), rng.random((90, 120)) > 0.97):
        assert encode_rle(mask) == coco_rle(mask)


BLOCK_TORCH = """
import importlib.util, json, sys
import numpy as np
from PIL import Image

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "components", "mlflow", "pandas"}:
            raise ImportError(f"{name} is blocked: the ONNX consumer must not need it")
        return None

sys.meta_path.insert(0, Blocked())
spec = importlib.util.spec_from_file_location("onnx_runtime", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
images = [np.asarray(Image.open(p).convert("RGB")) for p in sys.argv[3:]]
predictor = module.OnnxPredictor(sys.argv[2])
print(json.dumps({"task": predictor.task, "records": predictor.predict(images), "torch": "torch" in sys.modules}))
"""


def test_registered_versions_carry_onnx_and_a_torch_free_process_predicts_like_the_pyfunc(registry_store, tmp_path):
    import mlflow

    from components import tracking

    cfg, uri, _work, report = registry_store
    tracking.connect(cfg)
    for name in ("visionflow-detector-yolo", "visionflow-segmenter-fcn", "visionflow-classifier"):
        entry = report["registered"][name]
        assert entry["onnx"].startswith(f"runs:/{entry['run_id']}/onnx/") and entry["onnx_seconds"] > 0
        version = tracking.resolve_version(name, "champion")
        assert version.tags[tracking.ONNX_TAG] == entry["onnx"]
    assert report["onnx_seconds"] >= sum(e.get("onnx_seconds") or 0 for e in report["registered"].values()) - 1e-6
    # a consumer copies the consumer module alone next to the downloaded graph
    module = tmp_path / "onnx_runtime.py"
    module.write_text((REPO / "components/export/onnx_runtime.py").read_text())
    files = []
    for i, img in enumerate(object_images()):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(files[-1])
    for name in ("visionflow-detector-yolo", "visionflow-segmenter-fcn", "visionflow-classifier"):
        onnx_file = tracking.download_version_onnx(name, "champion", tmp_path / name)
        proc = subprocess.run([sys.executable, "-I", "-c", BLOCK_TORCH, str(module), str(onnx_file), *map(str, files)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        answer = json.loads(proc.stdout)
        assert answer["torch"] is False
        pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        import pandas as pd

        frame = pyfunc.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
        assert_records_agree(frame.to_dict(orient="records"), answer["records"])
        if name == "visionflow-classifier":  # the finetune checkpoint's input contract reached both servers
            assert pyfunc.unwrap_python_model().predictor.eval_crop == 0.875
            assert OnnxPredictor(onnx_file).meta["eval_crop"] == 0.875


def test_cli_export_of_a_registered_version_attaches_onnx_when_missing(registry_store, tmp_path):
    from mlflow import MlflowClient

    from components import tracking
    from flows.cli import main

    cfg, uri, work, _report = registry_store
    tracking.connect(cfg)
    name = "visionflow-detector-yolo"
    version = tracking.resolve_version(name, "champion").version
    MlflowClient().delete_model_version_tag(name, version, tracking.ONNX_TAG)
    argv = ["export", "--params", str(REPO / "params.yaml"), "--set", f"tracking.uri={uri}", "--set", "tracking.experiment=registry",
            "--model", f"models:/{name}@champion", "--format", "onnx", "--out", str(tmp_path)]
    assert main(argv) == 0
    exported = tmp_path / f"{name}-v{version}.onnx"
    assert OnnxPredictor(exported).task == "detection"
    attached = tracking.resolve_version(name, "champion").tags[tracking.ONNX_TAG]
    assert attached.endswith(f"onnx/{exported.name}")
    assert tracking.download_version_onnx(name, version, tmp_path / "back").read_bytes() == exported.read_bytes()
    assert main([*argv[:-6], "--model", "models:/visionflow-detector-yolo", "--out", str(tmp_path)]) == 2
    # a checkpoint file exports without any registry
    checkpoint = work / "outputs/segment/fcn/best.pt"
    assert main(["export", "--model", str(checkpoint), "--out", str(tmp_path / "ckpt")]) == 0
    assert OnnxPredictor(tmp_path / "ckpt" / "fcn.onnx").task == "segmentation"
