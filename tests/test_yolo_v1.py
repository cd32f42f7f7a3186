"""YOLO v1: target encoding round trip, the loss against a loop-based reference, decoding."""

from __future__ import annotations

import math

import pytest
import torch

from components.models.yolo_v1 import YOLOv1, decode_boxes, encode_targets, yolo_v1_loss


def _random_boxes(g: torch.Generator, n: int, size: int) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * (size - 20)
    wh = 4 + torch.rand(n, 2, generator=g) * 16
    return torch.cat([xy, xy + wh], dim=1)


def test_encoding_round_trips_boxes():
    """encode -> decode returns the input boxes (one object centre per cell), labels included."""
    S, C, H, W = 7, 5, 112, 140
    boxes = torch.tensor(
        [
            [3.0, 4.0, 40.0, 50.0],
            [70.0, 10.0, 139.0, 30.0],
            [20.0, 80.0, 60.0, 111.0],
            [100.0, 60.0, 110.0, 100.0],
        ]
    )
    labels = torch.tensor([1, 5, 2, 3])
    target = encode_targets([boxes], [labels], S=S, num_classes=C, image_size=(H, W))
    obj = target[0, ..., 4] > 0
    assert int(obj.sum()) == len(boxes)
    assert torch.all((target[0, ..., :4] >= 0) & (target[0, ..., :4] <= 1))
    decoded = decode_boxes(target[..., :4], image_size=(H, W))[0][obj]
    decoded_labels = target[0, ..., 5:][obj].argmax(-1) + 1
    # the grid's row-major order differs from the input order: match each input box
    for box, label in zip(boxes, labels, strict=True):
        k = torch.cdist(decoded, box[None]).argmin()
        torch.testing.assert_close(decoded[k], box, atol=1e-4, rtol=0)
        assert decoded_labels[k] == label


def test_encoding_keeps_largest_box_of_a_shared_cell():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 14.0, 14.0]])  # both centres in cell (0, 0)
    target = encode_targets([boxes], [torch.tensor([1, 2])], S=4, num_classes=2, image_size=(64, 64))
    assert int(target[0, ..., 4].sum()) == 1
    torch.testing.assert_close(target[0, 0, 0, 2:4], torch.tensor([14 / 64, 14 / 64]))
    assert target[0, 0, 0, 6] == 1  # class 2


def _reference_loss(pred, target, S, B, C, lambdas):
    """The lecture's formula written as plain loops over images, cells and boxes."""
    lc, lo, ln, lk = lambdas
    terms = dict.fromkeys(("loss_coord", "loss_obj", "loss_noobj", "loss_classes"), 0.0)

    def xyxy(x, y, w, h, row, col):
        cx, cy = (col + x) / S, (row + y) / S
        return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    N = pred.shape[0]
    for n in range(N):
        for row in range(S):
            for col in range(S):
                t = target[n, row, col].tolist()
                p = pred[n, row, col].tolist()
                has_obj = t[4] == 1.0
                ious = [
                    iou(xyxy(*p[5 * j : 5 * j + 4], row, col), xyxy(*t[:4], row, col)) if has_obj else 0.0
                    for j in range(B)
                ]
                responsible = max(range(B), key=lambda j: (ious[j], -j)) if has_obj else None
                for j in range(B):
                    x, y, w, h, c = p[5 * j : 5 * j + 5]
                    if j == responsible:
                        terms["loss_coord"] += lc * (
                            (t[0] - x) ** 2
                            + (t[1] - y) ** 2
                            + (math.sqrt(t[2]) - math.sqrt(w)) ** 2
                            + (math.sqrt(t[3]) - math.sqrt(h)) ** 2
                        )
                        terms["loss_obj"] += lo * (ious[j] - c) ** 2
                    else:
                        terms["loss_noobj"] += ln * c**2
                if has_obj:
                    terms["loss_classes"] += lk * sum((t[5 + k] - p[5 * B + k]) ** 2 for k in range(C))
    return {k: v / N for k, v in terms.items()}


@pytest.mark.parametrize("S,B,C", [(3, 2, 4), (5, 3, 2)])
def test_loss_equals_loop_reference_term_by_term(S, B, C):
    g = torch.Generator().manual_seed(S * 10 + B)
    N = 3
    pred = torch.rand(N, S, S, 5 * B + C, generator=g, dtype=torch.float64)
    boxes = [_random_boxes(g, 4, 96).double() for _ in range(N)]
    labels = [torch.randint(1, C + 1, (4,), generator=g) for _ in range(N)]
    target = encode_targets(boxes, labels, S=S, num_classes=C, image_size=(96, 96)).double()
    # make some predicted boxes overlap their cell's target so that IoUs are not all zero
    obj = target[..., 4] > 0
    pred[..., 0:4][obj] = (
        target[..., :4][obj] + 0.05 * torch.rand(int(obj.sum()), 4, generator=g, dtype=torch.float64)
    ).clamp(0, 1)
    lambdas = (5.0, 1.3, 0.5, 0.7)
    got = yolo_v1_loss(
        pred,
        target,
        B=B,
        lambda_coord=lambdas[0],
        lambda_obj=lambdas[1],
        lambda_noobj=lambdas[2],
        lambda_classes=lambdas[3],
    )
    want = _reference_loss(pred, target, S, B, C, lambdas)
    assert set(got) == set(want)
    for key in want:
        assert got[key].item() == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    assert want["loss_obj"] > 0 and want["loss_coord"] > 0


def test_confidence_target_is_detached():
    """The IoU used as the confidence target carries no gradient to the box outputs."""
    S, B, C = 2, 1, 2
    target = encode_targets(
        [torch.tensor([[4.0, 4.0, 20.0, 28.0]])], [torch.tensor([1])], S=S, num_classes=C, image_size=(32, 32)
    )
    pred = torch.full((1, S, S, 5 * B + C), 0.5, requires_grad=True)
    loss = yolo_v1_loss(
        pred, target, B=B, lambda_coord=0.0, lambda_obj=1.0, lambda_noobj=0.0, lambda_classes=0.0
    )
    loss["loss_obj"].backward()
    assert torch.count_nonzero(pred.grad[..., :4]) == 0
    assert torch.count_nonzero(pred.grad[..., 4]) == 1


def test_decode_uses_class_specific_confidence_and_maps_back_to_input_size():
    """A hand-set grid decodes to one box with score c * p, in the input image's pixels."""
    model = YOLOv1.__new__(YOLOv1)  # decode only needs its settings
    torch.nn.Module.__init__(model)
    model.S, model.B, model.num_classes = 2, 1, 3
    model.score_threshold, model.nms_iou, model.max_detections = 0.1, 0.5, 10
    pred = torch.zeros(1, 2, 2, 5 + 3)
    pred[0, 1, 0] = torch.tensor([0.5, 0.5, 0.25, 0.5, 0.8, 0.1, 0.2, 0.7])  # cell row 1, col 0
    (det,) = model.decode(pred, image_size=(64, 64))
    # centre (0.25, 0.75) * 64 = (16, 48), size (16, 32); the best class is 3 with c * p = 0.56
    torch.testing.assert_close(det["boxes"][0], torch.tensor([8.0, 32.0, 24.0, 64.0]))
    assert det["labels"][0] == 3 and det["scores"][0].item() == pytest.approx(0.56)
    assert set(det["labels"].tolist()) == {2, 3}  # class 1 (0.08) falls below the threshold


def test_grid_finer_than_the_feature_map_is_a_config_error():
    """S larger than the backbone's last map would make neighbouring cells average the same features."""
    from components.errors import ConfigError
    from components.models.backbones import build_backbone

    backbone = build_backbone("convnet_small")  # stride 16: a 64 px image gives a 4x4 map
    with pytest.raises(ConfigError, match=r"detect\.yolo\.S") as info:
        YOLOv1(backbone, num_classes=2, S=8, image_size=64)
    assert "image_size to at least 128" in str(info.value)
    assert YOLOv1(backbone, num_classes=2, S=4, image_size=64).S == 4
