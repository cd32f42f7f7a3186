"""`visionflow predict`: inputs (files, folders, globs), output names, COCO results, bad images one by one, PNG masks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import object_images, write_tiny_checkpoint
from PIL import Image

from components.errors import CheckpointError, DataError
from components.stages.predict import (
    MAX_SIDE,
    ImageFile,
    ImagePredictor,
    coco_ids,
    collect_images,
    image_to_rgb,
    predict_files,
    read_image_file,
)
from flows.cli import main

CATS = ["circle", "square"]


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def yolo_ckpt(tmp_path_factory) -> Path:
    """A random-weight YOLO v1 checkpoint in the engine's format (64 px input, 2 classes)."""
    path = tmp_path_factory.mktemp("yolo") / "best.pt"
    return write_tiny_checkpoint(path, task="detection", model_name="yolo", categories=CATS, image_size=64,
                                 model_args={"num_classes": 2, "image_size": 64, "S": 4, "hidden": 32})


# --------------------------------------------------------------------------- inputs and names


def test_collect_images_walks_folders_globs_and_keeps_names_apart(tmp_path):
    shots = tmp_path / "shots"
    for rel in ("a.jpg", "a.png", "B.JPEG", "sub/a.png", "sub/deeper/c.PNG"):
        save(shots / rel, rgb(4, 4))
    (shots / "notes.txt").write_text("not an image")
    other = save(tmp_path / "other" / "a.png", rgb(4, 4))

    files = collect_images([shots, other, str(shots / "*.jpg")])  # the glob's file is already in: kept once
    names = [f.name for f in files]
    assert names == ["shots/B.JPEG", "shots/a.jpg", "shots/a.png", "shots/sub/a.png", "shots/sub/deeper/c.PNG", "other/a.png"]
    assert len(set(names)) == len(names)  # a.jpg / a.png and same names in other folders never collide

    assert [f.name for f in collect_images([shots / "sub"])] == ["a.png", "deeper/c.PNG"]
    assert [f.name for f in collect_images([str(tmp_path / "**" / "a.png")])] == ["other/a.png", "shots/a.png", "shots/sub/a.png"]
    assert [f.name for f in collect_images([shots / "notes.txt"])] == ["notes.txt"]  # named explicitly: tried, then reported
    assert [f.name for f in collect_images([str(shots / "*")])] == ["B.JPEG", "a.jpg", "a.png", "sub/a.png", "sub/deeper/c.PNG"]

    with pytest.raises(DataError, match="no such file or folder"):
        collect_images([tmp_path / "missing"])
    with pytest.raises(DataError, match="glob matches no image file"):
        collect_images([str(tmp_path / "*.webp")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        collect_images([tmp_path / "empty"])


# --------------------------------------------------------------------------- conversions, one by one


def test_image_conversions_are_the_documented_ones(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    array, notes = image_to_rgb(Image.fromarray(grey))
    assert array.shape == (6, 8, 3) and (array == grey[:, :, None]).all() and notes == ["L converted to RGB"]

    deep = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)  # 16-bit grey: x * 255 / 65535, rounded
    array, notes = read_image_file(save(tmp_path / "deep.png", deep)).array, read_image_file(tmp_path / "deep.png").notes
    assert array[0, :, 0].tolist() == [0, 1, 255, 128] and "16-bit" in notes[0]

    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, :3] = 200
    rgba[0, :, 3] = [0, 255, 128]  # transparent, opaque, half
    array = read_image_file(save(tmp_path / "rgba.png", rgba)).array
    assert array[0, 0].tolist() == [0, 0, 0] and array[0, 1].tolist() == [200, 200, 200]  # over black
    assert abs(int(array[0, 2, 0]) - 100) <= 1

    wide = read_image_file(save(tmp_path / "wide.png", rgb(20, 10_000)))
    assert wide.size == (20, 10_000) and wide.array.shape[1] == MAX_SIDE and "shrunk" in wide.notes[0]
    assert read_image_file(save(tmp_path / "one.png", rgb(1, 1))).array.shape == (1, 1, 3)


def test_bad_images_are_reported_one_by_one_and_the_others_predicted(tmp_path, yolo_ckpt, capsys, one_torch_thread):
    folder = tmp_path / "in"
    ok = {name: save(folder / name, rgb(48, 64, seed=i)) for i, name in enumerate(("a.png", "b.png"))}
    save(folder / "grey.png", rgb(48, 64, seed=5)[:, :, 0])
    rgba = np.dstack([rgb(48, 64, seed=6), np.full((48, 64), 255, np.uint8)])
    save(folder / "rgba.png", rgba)
    save(folder / "deep.png", (rgb(48, 64, seed=7)[:, :, 0].astype(np.uint16) * 257))
    save(folder / "one.png", rgb(1, 1))
    save(folder / "wide.png", rgb(30, 10_000))
    (folder / "text.png").write_bytes(b"this is not an image")
    buf = io.BytesIO()
    Image.fromarray(rgb(64, 64)).save(buf, format="JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])

    out = tmp_path / "preds.json"
    code = main(["predict", "--model", str(yolo_ckpt), str(folder), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1  # some failed: not 0, and not the 2 of a broken command
    assert "2 of 9 images failed" in captured.err
    for name, what in (("text.png", "not an image"), ("cut.jpg", "truncated or corrupt")):
        line = next(ln for ln in captured.err.splitlines() if name in ln and "skipped" in ln)
        assert what in line and "fix:" in line and str(folder) in line

    index = json.loads(out.with_name("preds.images.json").read_text())
    predicted = {im["file_name"]: im for im in index["images"]}
    assert set(predicted) == {"a.png", "b.png", "grey.png", "rgba.png", "deep.png", "one.png", "wide.png"}
    assert set(index["failed"]) == {"text.png", "cut.jpg"}
    assert (predicted["wide.png"]["height"], predicted["wide.png"]["width"]) == (30, 10_000)
    results = json.loads(out.read_text())
    wide_id, one_id = predicted["wide.png"]["id"], predicted["one.png"]["id"]
    wide = [r["bbox"] for r in results if r["image_id"] == wide_id]
    assert wide and max(x + w for x, _, w, _ in wide) <= 10_000 + 1e-3 and max(x + w for x, _, w, _ in wide) > MAX_SIDE
    assert all(x + w <= 1 + 1e-4 and y + h <= 1 + 1e-4 for r in results if r["image_id"] == one_id for x, y, w, h in [r["bbox"]])

    # a conversion is exactly the converted pixels: grey = its channel repeated, RGBA (opaque) = its RGB
    predictor = ImagePredictor.from_checkpoint(yolo_ckpt, device="cpu")
    grey_rgb = np.repeat(rgb(48, 64, seed=5)[:, :, :1], 3, axis=2)
    expected = predictor.predict([grey_rgb, rgba[:, :, :3]], batch_size=1)  # batch 1 and 1 thread as below: same float sums
    got = predict_files(str(yolo_ckpt), [folder / "grey.png", folder / "rgba.png"], batch_size=1)["predictions"]
    assert got["grey.png"]["scores"] == expected[0]["scores"] and got["rgba.png"]["boxes"] == expected[1]["boxes"]

    # all good: exit 0
    assert main(["predict", "--model", str(yolo_ckpt), *map(str, ok.values()), "--out", str(tmp_path / "ok.json")]) == 0


# --------------------------------------------------------------------------- COCO ids


def test_coco_ids_match_file_names_and_category_names(tmp_path):
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "x/a.png"}, {"id": 9, "file_name": "b.png"}, {"id": 11, "file_name": "y/c.png"},
                   {"id": 12, "file_name": "z/c.png"}],
        "categories": [{"id": 3, "name": "square"}, {"id": 5, "name": "circle"}, {"id": 8, "name": "star"}],
    }))
    files = [ImageFile(Path("in/a.png"), "a.png"), ImageFile(Path("in/b.png"), "b.png")]
    images, cats = coco_ids(files, CATS, coco)
    assert images == {"a.png": 7, "b.png": 9} and cats == {"circle": 5, "square": 3}
    assert coco_ids(files, CATS, None) == ({"a.png": 1, "b.png": 2}, {"circle": 1, "square": 2})

    with pytest.raises(DataError, match=r"in/d\.png.*not among the images of .*instances\.json"):
        coco_ids([ImageFile(Path("in/d.png"), "d.png")], CATS, coco)
    with pytest.raises(DataError, match="ambiguous"):
        coco_ids([ImageFile(Path("in/c.png"), "c.png")], CATS, coco)
    assert coco_ids([ImageFile(Path("in/z/c.png"), "z/c.png")], CATS, coco)[0] == {"z/c.png": 12}  # the relative path decides
    with pytest.raises(DataError, match=r"instances\.json \[categories\].*\['hexagon'\]"):
        coco_ids(files, ["circle", "hexagon"], coco)


def test_coco_file_errors_stop_before_predicting(tmp_path, yolo_ckpt, capsys):
    save(tmp_path / "in" / "a.png", rgb(8, 8))
    coco = tmp_path / "gt.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "other.png"}], "categories": [{"id": 1, "name": "circle"}]}))
    assert main(["predict", "--model", str(yolo_ckpt), str(tmp_path / "in"), "--coco", str(coco), "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "a.png" in err and "gt.json" in err and "fix:" in err and not (tmp_path / "p.json").exists()


# --------------------------------------------------------------------------- segmentation: PNG masks


def test_semantic_segmenter_writes_one_png_mask_per_image(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "fcn.pt", task="segmentation", model_name="fcn", model_args={"num_classes": 2},
                                 categories=CATS, image_size=64)
    save(tmp_path / "in" / "a.jpg", rgb(40, 50, seed=1), format="JPEG")
    save(tmp_path / "in" / "a.png", rgb(30, 20, seed=2))
    out = tmp_path / "seg.json"
    assert main(["predict", "--model", str(ckpt), str(tmp_path / "in"), "--out", str(out)]) == 0
    index = json.loads(out.read_text())
    assert index["categories"] == ["background", *CATS]
    assert sorted(index["masks"]) == ["a.jpg", "a.png"]
    for name, size in (("a.jpg", (40, 50)), ("a.png", (30, 20))):
        mask = np.asarray(Image.open(index["masks"][name]))
        assert Path(index["masks"][name]) == tmp_path / "seg_masks" / f"{name}.png"
        assert mask.shape == size and mask.dtype == np.uint8 and mask.max() <= len(CATS)


# --------------------------------------------------------------------------- ONNX files


def test_onnx_file_predicts_like_its_checkpoint(tmp_path, yolo_ckpt, one_torch_thread):
    from components.export.onnx_export import export_onnx

    onnx_path = export_onnx(yolo_ckpt, tmp_path / "export").path
    images = [save(tmp_path / "in" / f"{i}.png", rgb(48, 64, seed=i)) for i in range(3)]
    via_onnx = predict_files(str(onnx_path), [tmp_path / "in"], out=tmp_path / "onnx.json")
    via_torch = predict_files(str(yolo_ckpt), [tmp_path / "in"], out=tmp_path / "torch.json")
    assert via_onnx["task"] == "detection" and via_onnx["predicted"] == len(images)
    for name, ref in via_torch["predictions"].items():
        got = via_onnx["predictions"][name]
        assert got["labels"] == ref["labels"] and len(ref["labels"]) > 0
        np.testing.assert_allclose(got["boxes"], ref["boxes"], atol=1.0)
        np.testing.assert_allclose(got["scores"], ref["scores"], atol=1e-4)
    coco_onnx, coco_torch = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("onnx", "torch"))
    assert [(r["image_id"], r["category_id"]) for r in coco_onnx] == [(r["image_id"], r["category_id"]) for r in coco_torch]

    with pytest.raises(CheckpointError, match="ONNX file not found"):
        predict_files(str(tmp_path / "missing.onnx"), [tmp_path / "in"])


def test_onnx_rcnn_file_runs_its_selective_search_beside_the_graph(tmp_path, one_torch_thread):
    """`--model x.onnx` of an R-CNN graph: predict computes the proposals the graph takes, as the pyfunc does."""
    from components.export.onnx_export import export_onnx

    search = {"proposals_per_image": 40, "ss_scales": [100.0], "ss_color_spaces": ["hsv"], "ss_similarities": ["ctsf"]}
    ckpt = write_tiny_checkpoint(tmp_path / "rcnn.pt", task="detection", model_name="rcnn", categories=CATS, image_size=64,
                                 model_args={**search, "crop_size": 16, "score_threshold": 0.0, "num_classes": len(CATS)})
    onnx_path = export_onnx(ckpt, tmp_path / "export").path
    for i, image in enumerate(object_images()[:2]):
        save(tmp_path / "in" / f"{i}.png", image)
    via_onnx = predict_files(str(onnx_path), [tmp_path / "in"], out=tmp_path / "onnx.json")
    via_torch = predict_files(str(ckpt), [tmp_path / "in"], out=tmp_path / "torch.json")
    assert via_onnx["predicted"] == 2 and not via_onnx.get("failed")
    for name, ref in via_torch["predictions"].items():
        got = via_onnx["predictions"][name]
        assert got["labels"] == ref["labels"] and len(ref["labels"]) > 0
        np.testing.assert_allclose(got["boxes"], ref["boxes"], atol=1.0)
        np.testing.assert_allclose(got["scores"], ref["scores"], atol=1e-4)


# --------------------------------------------------------------------------- instance segmentation: COCO results with RLE


def test_instance_segmenter_writes_coco_results_with_rle_that_evaluate_takes(tmp_path, capsys):
    ckpt = write_tiny_checkpoint(tmp_path / "mask_rcnn.pt", task="segmentation", model_name="mask_rcnn", categories=CATS, image_size=64,
                                 model_args={"num_classes": 2, "image_size": 64, "score_threshold": 0.0})
    sizes = {"a.png": (48, 64), "wide.png": (20, MAX_SIDE + 904)}  # the wide one is shrunk, its masks mapped back
    for i, (name, (h, w)) in enumerate(sizes.items()):
        save(tmp_path / "in" / name, rgb(h, w, seed=i))
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({
        "images": [{"id": 10 + i, "file_name": name, "height": h, "width": w} for i, (name, (h, w)) in enumerate(sizes.items())],
        "annotations": [{"id": 1 + i, "image_id": 10 + i, "category_id": 2, "bbox": [2, 2, 12, 10], "area": 120, "iscrowd": 0,
                         "segmentation": [[2, 2, 14, 2, 14, 12, 2, 12]]} for i in range(len(sizes))],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
    }))
    out = tmp_path / "inst.json"
    assert main(["predict", "--model", str(ckpt), str(tmp_path / "in"), "--coco", str(gt), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results and {r["image_id"] for r in results} <= {10, 11}
    for r in results:
        h, w = sizes["a.png" if r["image_id"] == 10 else "wide.png"]
        assert r["segmentation"]["size"] == [h, w] and len(r["bbox"]) == 4
    assert main(["evaluate", "--gt", str(gt), "--pred", str(out), "--iou-type", "segm", "--out", str(tmp_path / "m.json")]) == 0
    assert "map" in json.loads((tmp_path / "m.json").read_text())["segm"]


def test_classifier_input_is_torchvisions_imagenet_preset_when_the_checkpoint_crops():
    """A finetune checkpoint (``eval_crop`` 0.875, ImageNet mean/std) is fed exactly what the weights' own transforms give."""
    import torch
    from torchvision.models import MobileNet_V2_Weights

    from components.stages.predict import ImagePredictor

    preset = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()  # Resize(256) + CenterCrop(224) + normalise; no download
    ckpt = {"task": "classification", "model_name": "classifier", "categories": ["a", "b"], "image_size": 224, "eval_crop": 0.875,
            "mean": list(preset.mean), "std": list(preset.std)}
    g = torch.Generator().manual_seed(0)
    for h, w in ((375, 500), (500, 333), (240, 240)):
        x = torch.rand(3, h, w, generator=g)
        want = preset(x)
        torch.testing.assert_close(ImagePredictor(torch.nn.Identity(), ckpt, device="cpu")._prepare(x), want, atol=1e-5, rtol=0)
        squash = ImagePredictor(torch.nn.Identity(), {**ckpt, "eval_crop": None}, device="cpu")._prepare(x)
        assert squash.shape == want.shape and (h == w or not torch.allclose(squash, want, atol=1e-3))  # the test can fail
    detector = ImagePredictor(torch.nn.Identity(), {**ckpt, "task": "detection"}, device="cpu")
    assert detector.eval_crop is None  # boxes map back through the square resize: only classifiers crop
