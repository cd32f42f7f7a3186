"""R-CNN and Fast R-CNN: RoI pooling on a hand-made map, the warp, training steps with falling loss, valid boxes."""

from __future__ import annotations

import inspect

import pytest
import torch
from torchvision.ops import box_iou

from components.config import FastRCNNConfig, RCNNConfig
from components.errors import DataError
from components.models import get_model, list_models
from components.models.rcnn_lineage import RCNN, FastRCNN, RoIPool, fast_rcnn, rcnn

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {
    "image_size": 64,
    "proposals_per_image": 40,
    "ss_scales": [100.0],
    "ss_color_spaces": ["hsv"],
    "ss_similarities": ["ctsf"],
}
COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.2, 0.9]])




def _toy_batch(
    n: int = 4, size: int = 64, seed: int = 0
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Plain grey images, one coloured square each; the class is the colour (2 classes)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        side = int(torch.randint(size // 4, size // 2, (1,), generator=g))
        x0, y0 = (int(v) for v in torch.randint(0, size - side, (2,), generator=g))
        image = torch.full((3, size, size), 0.6)
        image[:, y0 : y0 + side, x0 : x0 + side] = COLOURS[i % 2][:, None, None]
        images.append(image)
        targets.append(
            {
                "boxes": torch.tensor([[x0, y0, x0 + side, y0 + side]], dtype=torch.float32),
                "labels": torch.tensor([i % 2 + 1]),
            }
        )
    return images, targets


def test_roi_pool_shapes_and_values_on_a_hand_made_feature_map():
    fmap = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)  # value = 64 c + 8 y + x
    pool = RoIPool("0", output_size=2, spatial_scale=0.5)  # a stride-2 map: image boxes are halved
    proposals = [torch.tensor([[0.0, 0.0, 14.0, 14.0], [8.0, 4.0, 14.0, 6.0]])]
    out = pool({"0": fmap}, proposals, [(16, 16)])
    assert out.shape == (2, 2, 2, 2)  # [R, C, s, s]
    # box 1 covers feature cells 0..7: each output bin is the max of a 4x4 quadrant, i.e. its bottom-right cell
    torch.testing.assert_close(out[0, 0], torch.tensor([[27.0, 31.0], [59.0, 63.0]]))
    torch.testing.assert_close(out[0, 1], out[0, 0] + 64)
    # box 2 covers cells x 4..7, y 2..3: bins split x into 4..5 | 6..7 and y into 2 | 3
    torch.testing.assert_close(
        out[1, 0], torch.tensor([[8 * 2 + 5.0, 8 * 2 + 7.0], [8 * 3 + 5.0, 8 * 3 + 7.0]])
    )


def test_roi_pool_keeps_images_apart():
    fmap = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    pool = RoIPool("0", output_size=3, spatial_scale=1.0)
    out = pool(
        {"0": fmap},
        [torch.tensor([[0.0, 0.0, 3.0, 3.0]]), torch.tensor([[0.0, 0.0, 3.0, 3.0]] * 2)],
        [(4, 4)] * 2,
    )
    assert out.shape == (3, 1, 3, 3)
    assert out[0].eq(0).all() and out[1:].eq(1).all()


def test_rcnn_warp_crops_the_region_to_the_cnn_input():
    model = rcnn(num_classes=2, crop_size=8, **TINY)
    batch = torch.zeros(1, 3, 32, 32)
    batch[0, 0, 8:24, 4:12] = 1.0  # a red 8x16 region
    crops = model.warp_regions(batch, [torch.tensor([[4.0, 8.0, 12.0, 24.0], [20.0, 0.0, 32.0, 6.0]])])
    assert crops.shape == (2, 3, 8, 8)
    # the region fills its crop, stretched; bilinear sampling blends the outermost samples with the border
    torch.testing.assert_close(crops[0, 0, 1:-1, 1:-1], torch.ones(6, 6))
    assert crops[0, 0].min() >= 0.85
    assert crops[1].abs().max() == 0 and crops[0, 1:].abs().max() == 0


def _train(model: torch.nn.Module, images, targets, steps: int, lr: float) -> list[float]:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    history = []
    for _ in range(steps):
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    return history


def _assert_valid_detections(detections, images, num_classes: int) -> None:
    assert len(detections) == len(images)
    for det, image in zip(detections, images, strict=True):
        h, w = image.shape[-2:]
        boxes, labels, scores = det["boxes"], det["labels"], det["scores"]
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) == len(labels) == len(scores)
        assert (
            torch.all(boxes[:, 0] >= 0)
            and torch.all(boxes[:, 1] >= 0)
            and torch.all(boxes[:, 2] <= w)
            and torch.all(boxes[:, 3] <= h)
        )
        assert torch.all(boxes[:, 2] > boxes[:, 0]) and torch.all(boxes[:, 3] > boxes[:, 1])
        assert labels.dtype == torch.int64 and torch.all((labels >= 1) & (labels <= num_classes))
        assert torch.all((scores >= 0) & (scores <= 1))


@pytest.mark.parametrize(
    ("name", "extra", "steps", "lr"),
    [
        ("rcnn", {"crop_size": 16, "rois_per_image": 16}, 20, 3e-3),
        ("rcnn", {"crop_size": 16, "rois_per_image": 16, "classifier_loss": "logistic"}, 20, 3e-3),
        ("fast_rcnn", {}, 20, 3e-3),
    ],
)
def test_trains_with_falling_loss_and_detects(name, extra, steps, lr, tmp_path):
    torch.manual_seed(0)
    images, targets = _toy_batch()
    model = get_model("detection", name, num_classes=2, proposal_cache=str(tmp_path), **TINY, **extra)
    history = _train(model, images, targets, steps, lr)
    assert sum(history[-3:]) / 3 < 0.5 * sum(history[:3]) / 3, history
    # selective search ran once per image, then the cache served
    assert model.proposer.cache.misses == len(images)
    model.eval()
    with torch.no_grad():
        detections = model(images)
    _assert_valid_detections(detections, images, 2)
    assert set(model.last_timings) == {"proposals_s", "features_s", "head_s"}
    # the trained detector finds the training objects with the right class
    for det, target in zip(detections, targets, strict=True):
        assert len(det["boxes"]) > 0
        assert box_iou(target["boxes"], det["boxes"][:1]).item() > 0.5
        assert det["labels"][0] == target["labels"][0]


def test_boxes_are_mapped_back_to_the_input_size():
    """The network input is resized (longer side image_size); detections come back in the input's pixels."""
    images, _ = _toy_batch(2, size=96)
    images = [img[:, :, :80] for img in images]  # 96 x 80 inputs, network at 48
    for model in (
        rcnn(num_classes=2, **{**TINY, "image_size": 48}),
        fast_rcnn(num_classes=2, **{**TINY, "image_size": 48}),
    ):
        model.eval()
        with torch.no_grad():
            _assert_valid_detections(model(images), images, 2)


def test_registered_and_builders_accept_every_param_of_their_section():
    assert {"rcnn", "fast_rcnn"} <= set(list_models("detection"))
    for builder, section in ((rcnn, RCNNConfig), (fast_rcnn, FastRCNNConfig)):
        accepted = set(inspect.signature(builder).parameters)
        own = set(section.model_fields) - {"backbone", "train", "augment"}  # the stage's keys, not the builder's
        assert own <= accepted, own - accepted
    assert isinstance(get_model("detection", "rcnn", num_classes=3, **TINY), RCNN)
    assert isinstance(get_model("detection", "fast_rcnn", num_classes=3, **TINY), FastRCNN)


def test_bad_inputs_raise_data_errors():
    model = fast_rcnn(num_classes=2, **TINY)
    images, targets = _toy_batch(1)
    with pytest.raises(DataError, match="no targets"):
        model(images)
    with pytest.raises(DataError, match="Tensor\\[3, H, W\\]"):
        model([torch.rand(1, 3, 8, 8)], targets)
    with pytest.raises(DataError, match="zero or negative"):
        model(images, [{"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]]), "labels": torch.tensor([1])}])


# --------------------------------------------------------------------------- the lineage stage


@pytest.fixture(scope="module")
def lineage_setup(tmp_path_factory):
    """A tiny canonical shapes dataset and untrained R-CNN, Fast R-CNN and Faster R-CNN checkpoints."""
    from components.config import DataConfig, DetectConfig, ShapesConfig
    from components.data.ingest import ingest
    from components.engine import save_checkpoint

    root = tmp_path_factory.mktemp("lineage")
    shapes = ShapesConfig(
        image_size=64, num_train=1, num_val=1, num_test=3, min_size=16, max_size=32, max_objects=2
    )
    ingest("shapes", root / "shapes", cfg=DataConfig(shapes=shapes))
    search = {k: v for k, v in TINY.items() if k != "image_size"}
    cfg = DetectConfig(
        dataset=str(root / "shapes"),
        out=str(root / "detect"),
        rcnn=RCNNConfig(image_size=64, crop_size=16, **search),
        fast_rcnn=FastRCNNConfig(image_size=64, **search),
    )
    categories = list(shapes.classes)
    for arch, args in (
        ("rcnn", {"image_size": 64, "crop_size": 16, **search}),
        ("fast_rcnn", {"image_size": 64, **search}),
        ("faster_rcnn", {"image_size": 64}),
    ):
        args = {"num_classes": len(categories), **args}
        model = get_model("detection", arch, **args)
        save_checkpoint(
            root / "detect" / arch / "best.pt",
            {
                "task": "detection",
                "model_name": arch,
                "model_args": args,
                "state_dict": model.state_dict(),
                "categories": categories,
            },
        )
    return cfg, root


def test_lineage_measures_and_writes_the_table(lineage_setup):
    import json

    from components.stages.lineage import LINEAGE, run_lineage

    cfg, root = lineage_setup
    result = run_lineage(cfg, metrics_file=root / "rcnn_lineage.json")
    saved = json.loads((root / "rcnn_lineage.json").read_text())
    assert list(saved["detectors"]) == list(LINEAGE) and saved["num_images"] == 3
    for row in saved["detectors"].values():
        assert row["proposals_ms"] > 0 and row["features_ms"] > 0 and row["head_ms"] > 0
        assert row["total_ms"] >= 0.9 * (row["proposals_ms"] + row["features_ms"] + row["head_ms"])
        assert 0 <= row["map"] <= row["map_50"] <= 1
    assert len(saved["proposals"]) == 3
    for curve in saved["proposals"].values():
        for key in ("recall_50", "recall_70"):
            assert all(0 <= r <= 1 for r in curve[key]) and curve[key] == sorted(curve[key])
        assert all(a >= b for a, b in zip(curve["recall_50"], curve["recall_70"], strict=True))
    sweep = saved["feature_cost_vs_regions"]
    assert set(sweep) == {"rcnn", "fast_rcnn"}
    for row in sweep.values():
        assert len(row["ms_per_image"]) == len(row["counts"]) and all(ms > 0 for ms in row["ms_per_image"])
        assert row["regions"] == sorted(row["regions"]) and all(
            r <= c for r, c in zip(row["regions"], row["counts"], strict=True)
        )
    assert [c["claim"] for c in saved["claims"]] == [c["claim"] for c in result["claims"]]
    assert all(isinstance(c["holds"], bool) for c in saved["claims"])
    assert (root / "detect" / "lineage" / "rcnn_lineage.png").stat().st_size > 10_000


def test_lineage_names_the_missing_checkpoint(lineage_setup, tmp_path):
    from components.errors import CheckpointError
    from components.stages.lineage import run_lineage

    cfg, _ = lineage_setup
    with pytest.raises(CheckpointError, match="visionflow detect --arch rcnn"):
        run_lineage(cfg.model_copy(update={"out": str(tmp_path)}), metrics_file=tmp_path / "m.json")


def test_lineage_is_skipped_when_detect_skipped_its_detectors(lineage_setup, tmp_path):
    import json

    from components.engine import write_skipped
    from components.stages.lineage import run_lineage

    cfg, _ = lineage_setup
    out = tmp_path / "detect"
    for arch in ("rcnn", "fast_rcnn", "faster_rcnn"):
        write_skipped(out / arch, "data/own has no boxes (mask folder binary masks only)")
    result = run_lineage(cfg.model_copy(update={"out": str(out)}), metrics_file=tmp_path / "m.json")
    assert result["status"] == "skipped" and result["reason"].startswith("detect skipped rcnn (data/own has no boxes")
    assert json.loads((tmp_path / "m.json").read_text()) == result
    assert [p.name for p in (out / "lineage").iterdir()] == ["SKIPPED.txt"]


@pytest.mark.slow
def test_lineage_reproduces_the_lecture_claims_on_shapes(tmp_path, monkeypatch, tracking_cfg):
    """The README's lineage figures: detect stage for the three detectors, then the lineage (minutes on a GPU, long on CPU).

    Needs the pretrain stage's backbone (``$VISIONFLOW_BACKBONE``, default ``outputs/pretrain/backbone.pt``).
    """
    import os
    from pathlib import Path

    from components.config import DataConfig, load_params
    from components.data.ingest import ingest
    from components.stages.detect import run_detect
    from components.stages.lineage import run_lineage

    backbone = Path(os.environ.get("VISIONFLOW_BACKBONE", "outputs/pretrain/backbone.pt")).resolve()
    if not backbone.exists():
        pytest.skip(
            f"no pretrained backbone at {backbone} (run `visionflow pretrain` or set VISIONFLOW_BACKBONE)"
        )
    params = load_params(Path("params.yaml").resolve())
    monkeypatch.chdir(tmp_path)  # the stages write metrics/ and outputs/ relative to the working directory
    ingest("shapes", tmp_path / "shapes", cfg=DataConfig())
    sets = {"dataset": str(tmp_path / "shapes"), "out": str(tmp_path / "outputs/detect")}
    for arch in ("rcnn", "fast_rcnn", "faster_rcnn"):
        section = params.detect.arch(arch)
        sets[arch] = section.model_copy(
            update={"backbone": section.backbone.model_copy(update={"weights": str(backbone)})}
        )
    cfg = params.detect.model_copy(update=sets)
    for arch in ("rcnn", "fast_rcnn", "faster_rcnn"):
        run_detect(cfg, arch, params.augment, params.evaluate, tracking_cfg)
    result = run_lineage(cfg)
    maps = {arch: row["map_50"] for arch, row in result["detectors"].items()}
    assert maps["rcnn"] > 0.6 and maps["fast_rcnn"] > 0.75 and maps["faster_rcnn"] > 0.75, maps
    assert [c["holds"] for c in result["claims"][:2]] == [True, True], result["claims"]
