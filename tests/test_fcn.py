"""FCN: the lecture's transposed convolution, bilinear initialisation, any input size, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from components.errors import ConfigError
from components.models import get_model
from components.models.backbones import build_backbone
from components.models.fcn import FCN, BilinearTransposedConv2d, bilinear_kernel

# The lecture's worked example (Dumoulin and Visin): kernel u, input x, output h = U^T v(x).
KERNEL = torch.tensor([[1.0, 4, 1], [1, 4, 3], [3, 3, 1]])
X = torch.tensor([[2.0, 1], [4, 4]])
H = torch.tensor([[2.0, 9, 6, 1], [6, 29, 30, 7], [10, 29, 33, 13], [12, 24, 16, 4]])
# U^T as printed on the slide (16 x 4): column j is the kernel placed where input cell j lands
U_T_LECTURE = torch.tensor(
    [
        [1.0, 0, 0, 0], [4, 1, 0, 0], [1, 4, 0, 0], [0, 1, 0, 0],
        [1, 0, 1, 0], [4, 1, 4, 1], [3, 4, 1, 4], [0, 3, 0, 1],
        [3, 0, 1, 0], [3, 3, 4, 1], [1, 3, 3, 4], [0, 1, 0, 3],
        [0, 0, 3, 0], [0, 0, 3, 3], [0, 0, 1, 3], [0, 0, 0, 1],
    ]
)  # fmt: skip


def convolution_matrix(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """U (out_cells x in_cells): the convolution by ``kernel`` (no padding, stride 1) of a size x size input, as a matrix.

    Built column by column from torch's own conv2d applied to each basis image, so it is an
    independent reference for the transposed convolution.
    """
    basis = torch.eye(size * size).view(size * size, 1, size, size)
    columns = F.conv2d(basis, kernel.view(1, 1, *kernel.shape))  # [in_cells, 1, out, out]
    return columns.flatten(1).T


def test_transposed_convolution_reproduces_the_lecture_example():
    out = F.conv_transpose2d(X.view(1, 1, 2, 2), KERNEL.view(1, 1, 3, 3))
    assert torch.equal(out.view(4, 4), H)
    layer = torch.nn.ConvTranspose2d(1, 1, kernel_size=3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(KERNEL.view(1, 1, 3, 3))
    assert torch.equal(layer(X.view(1, 1, 2, 2)).view(4, 4), H)


def test_transposed_convolution_is_multiplication_by_the_transposed_matrix():
    U = convolution_matrix(KERNEL, 4)  # the convolution maps a 4x4 input to 2x2: U is 4 x 16
    assert U.shape == (4, 16)
    assert torch.equal(U.T, U_T_LECTURE)
    assert torch.equal(U.T @ X.flatten(), H.flatten())
    # backward pass of the transposed convolution: the gradient is multiplied by U instead of U^T
    x = X.view(1, 1, 2, 2).clone().requires_grad_(True)
    grad_out = torch.arange(16.0).view(1, 1, 4, 4)
    F.conv_transpose2d(x, KERNEL.view(1, 1, 3, 3)).backward(grad_out)
    assert torch.equal(x.grad.flatten(), U @ grad_out.flatten())


def test_bilinear_kernel_matches_fcn_upsample_filt():
    # FCN's surgery.upsample_filt(4): the 1-D taps for factor 2 are (0.25, 0.75, 0.75, 0.25)
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.allclose(bilinear_kernel(2), taps[:, None] * taps[None, :])
    with pytest.raises(ValueError):
        BilinearTransposedConv2d(3, 3)


@pytest.mark.parametrize("factor", [2, 4, 8, 16])
def test_bilinear_initialisation_equals_bilinear_interpolation(factor):
    x = torch.randn(2, 3, 5, 7)
    up = BilinearTransposedConv2d(3, factor)(x)
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert up.shape == (2, 3, 5 * factor, 7 * factor)
    assert torch.allclose(up, ref, atol=1e-5)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_bilinear_initialisation_upsamples_a_smooth_image_almost_exactly(factor):
    n = 16

    def smooth(
        cells: int,
    ) -> torch.Tensor:  # cos(pi x) cos(pi y) sampled at the pixel centres of a cells x cells grid
        c = torch.cos(math.pi * (torch.arange(cells) + 0.5) / cells)
        return (c[:, None] * c[None, :]).view(1, 1, cells, cells)

    low, high = smooth(n), smooth(n * factor)
    up = BilinearTransposedConv2d(1, factor)(low)
    nearest = F.interpolate(low, scale_factor=factor, mode="nearest")
    assert (up - high).abs().max() < 0.015  # values span [-1, 1]
    assert (up - high).abs().mean() < 0.004
    assert (nearest - high).abs().mean() > 5 * (up - high).abs().mean()


@pytest.mark.parametrize("skips,head_channels", [("32s", 0), ("16s", 0), ("8s", 0), ("8s", 32)])
@pytest.mark.parametrize("size", [(64, 64), (37, 51), (33, 32), (1, 1)])
def test_fcn_output_has_the_input_size(skips, head_channels, size):
    model = get_model(
        "segmentation", "fcn", num_classes=4, skips=skips, head_channels=head_channels, dropout=0.1
    ).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, *size))
    assert logits.shape == (2, 4, *size)
    assert torch.isfinite(logits).all()


def test_fcn_skips_start_at_zero_and_use_earlier_stages():
    model = get_model("segmentation", "fcn", num_classes=3, skips="8s")
    strides = model.backbone.strides
    assert model.levels == [3, 2, 1]
    assert [up.factor for up in model.skip_upsample] == [strides[3] // strides[2], strides[2] // strides[1]]
    assert model.upsample.factor == strides[1]
    assert all(torch.count_nonzero(s.weight) == 0 for s in model.skip_scores)
    with pytest.raises(ConfigError):
        FCN(build_backbone("convnet_small"), 3, skips="4s")  # type: ignore[arg-type]


def test_fcn_loads_a_pretrained_backbone_checkpoint(tmp_path):
    backbone = build_backbone("convnet_small")
    path = tmp_path / "backbone.pt"
    torch.save({"state_dict": backbone.state_dict(), "backbone_arch": "convnet_small"}, path)
    model = get_model("segmentation", "fcn", num_classes=3, backbone_weights=str(path), trainable_layers=2)
    for key, value in backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value)
    frozen = [p.requires_grad for p in model.backbone.stages[0].parameters()]
    assert frozen and not any(frozen)


def tiny_scenes(n: int = 4, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy grey images with one bright square (class 1) and one dark disc (class 2): (Tensor[n,3,S,S], Tensor[n,S,S])."""
    g = torch.Generator().manual_seed(seed)
    images = 0.5 + 0.05 * torch.randn(n, 3, size, size, generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.int64)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        x0, y0 = torch.randint(0, size // 2 - 8, (2,), generator=g).tolist()
        images[i, :, y0 : y0 + 10, x0 : x0 + 10] += 0.4
        masks[i, y0 : y0 + 10, x0 : x0 + 10] = 1
        cx, cy = torch.randint(size // 2 + 5, size - 5, (2,), generator=g).tolist()
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
        images[i, :, disc] -= 0.4
        masks[i, disc] = 2
    return images.clamp(0, 1), masks


def train_semantic(model: torch.nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
    """A few Adam steps of pixel-wise cross-entropy on :func:`tiny_scenes`; returns the losses."""
    torch.manual_seed(0)
    images, masks = tiny_scenes()
    masks[:, 0, 0] = 255  # an ignored pixel must not break the loss
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(images), masks, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("head_channels", [0, 32])
def test_fcn_trains_with_falling_loss(head_channels):
    torch.manual_seed(0)
    model = get_model("segmentation", "fcn", num_classes=3, skips="8s", head_channels=head_channels)
    losses = train_semantic(model, steps=25)
    assert losses[-1] < 0.4 * losses[0], losses
