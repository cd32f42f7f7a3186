"""UNet: symmetric contracting/expanding paths with concatenated skips, any input size, training."""

from __future__ import annotations

import pytest
import torch
from test_fcn import train_semantic  # the tiny scenes and training loop shared by the segmentation tests

from components.errors import ConfigError
from components.models import get_model
from components.models.backbones import build_backbone
from components.models.unet import UNet


@pytest.mark.parametrize("pretrained_encoder", [False, True])
@pytest.mark.parametrize("size", [(64, 64), (37, 51), (33, 32), (1, 1)])
def test_unet_output_has_the_input_size(pretrained_encoder, size):
    model = get_model(
        "segmentation", "unet", num_classes=3, base_channels=8, depth=3, pretrained_encoder=pretrained_encoder
    ).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, *size))
    assert logits.shape == (2, 3, *size)
    assert torch.isfinite(logits).all()


def test_unet_paths_are_symmetric_and_concatenate_skips():
    model = UNet(3, base_channels=8, depth=3)
    down = [block[1][0].out_channels for block in model.down]  # DoubleConv's first convolution
    up = [block.up.out_channels for block in model.up]
    assert down == [16, 32, 64]
    assert up == [32, 16, 8]  # the expanding path mirrors the contracting path
    # each expanding block convolves the concatenation [skip, up-sampled]: twice the channels
    assert [block.conv[0].in_channels for block in model.up] == [64, 32, 16]
    x = torch.rand(1, 3, 24, 24)
    feats = model.contract(model.normalize(x))
    assert [f.shape[-1] for f in feats] == [24, 12, 6, 3]


def test_unet_with_a_pretrained_backbone_encoder(tmp_path):
    backbone = build_backbone("convnet_small")
    path = tmp_path / "backbone.pt"
    torch.save({"state_dict": backbone.state_dict(), "backbone_arch": "convnet_small"}, path)
    model = get_model(
        "segmentation", "unet", num_classes=3, pretrained_encoder=True, backbone_weights=str(path)
    )
    assert model.strides == [1, *backbone.strides]
    for key, value in backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value)


@pytest.mark.parametrize("pretrained_encoder", [False, True])
def test_unet_trains_with_falling_loss(pretrained_encoder):
    torch.manual_seed(0)
    model = get_model(
        "segmentation", "unet", num_classes=3, base_channels=8, depth=3, pretrained_encoder=pretrained_encoder
    )
    losses = train_semantic(model, steps=25)
    assert losses[-1] < 0.4 * losses[0], losses


def test_unet_head_starts_at_the_class_prior():
    # prior initialisation: at step 0 the mean softmax is (close to) the pixel class frequencies,
    # so training does not spend its first steps learning that most pixels are background
    prior = [0.85, 0.1, 0.05]
    torch.manual_seed(0)
    model = get_model("segmentation", "unet", num_classes=3, base_channels=8, depth=2, class_prior=prior).eval()
    assert torch.allclose(model.head.bias, torch.tensor(prior).log())
    with torch.no_grad():
        mean_softmax = model(torch.rand(2, 3, 32, 32)).softmax(dim=1).mean(dim=(0, 2, 3))
    assert torch.allclose(mean_softmax, torch.tensor(prior), atol=0.1), mean_softmax


def test_unet_rejects_a_bad_class_prior():
    with pytest.raises(ConfigError, match="class_prior"):
        get_model("segmentation", "unet", num_classes=3, base_channels=8, depth=2, class_prior=[0.9, 0.1])
    with pytest.raises(ConfigError, match="class_prior"):
        get_model("segmentation", "unet", num_classes=3, base_channels=8, depth=2, class_prior=[0.9, 0.1, 0.0])


def test_deep_supervision_adds_a_coarse_loss_in_training_only():
    """Training returns {"out", "aux"} at the input size; the stage's loss is CE(out) + w * CE(aux); eval returns logits."""
    import torch.nn.functional as F
    from test_fcn import tiny_scenes

    from components.stages.segment import semantic_step

    torch.manual_seed(0)
    model = get_model("segmentation", "unet", num_classes=3, base_channels=8, depth=3, deep_supervision=True)
    images, masks = tiny_scenes()
    model.train()
    output = model(images)
    assert set(output) == {"out", "aux"}
    assert output["out"].shape == output["aux"].shape == (images.shape[0], 3, *images.shape[-2:])
    losses = semantic_step(model, (images, masks), torch.device("cpu"), ignore_index=255, aux_weight=0.4)
    expected = F.cross_entropy(output["out"], masks) + 0.4 * F.cross_entropy(output["aux"], masks)
    torch.testing.assert_close(losses["loss"], expected)
    losses["loss"].backward()
    assert model.aux_head.weight.grad is not None and model.aux_head.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (images.shape[0], 3, *images.shape[-2:])
    plain = get_model("segmentation", "unet", num_classes=3, base_channels=8, depth=3)
    assert plain.aux_head is None and isinstance(plain.train()(images), torch.Tensor)
