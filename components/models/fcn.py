"""Fully convolutional network (FCN, Long et al. 2015) for semantic segmentation, written here.

The lecture's simplest design of an FCN for segmentation consists in

* using a (pre-trained) convolutional network for down-sampling and extracting image features
  (our multi-level :class:`~components.models.backbones.Backbone`);
* replacing the dense layers with a 1x1 convolution layer that turns the number of channels into
  the number of categories (``score``);
* up-sampling the feature map to the size of the input image with transposed convolution layer(s)
  (:class:`BilinearTransposedConv2d`), initialised as bilinear interpolation.

Skip connections from earlier backbone stages (FCN-16s / FCN-8s) add the class scores of
higher-resolution features to the up-sampled coarse scores, which sharpens object boundaries.

A transposed convolution is a convolution whose forward and backward passes are swapped: with
``U`` the matrix of the convolution by the kernel ``u``, its forward pass is ``v(h) = U^T v(x)``
(up-sampling) and its backward pass multiplies the gradient by ``U``.

Any input size works, odd sizes included: the image is padded (replicate) to a multiple of the
backbone's largest stride, so that every stage's feature map has exactly ``size / stride`` cells,
and the logits are cropped back to the input size. Output size = input size, as the lecture stresses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.errors import ConfigError
from components.models.backbones import Backbone, build_backbone
from components.models.registry import passes_kwargs_to, register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FCNSkips = Literal["32s", "16s", "8s"]
_SKIP_LEVELS: dict[str, int] = {"32s": 0, "16s": 1, "8s": 2}


def bilinear_kernel(factor: int) -> Tensor:
    """The 2-D bilinear interpolation kernel of an up-sampling by ``factor`` (FCN's ``upsample_filt``).

    Args:
        factor: integer up-sampling factor (the transposed convolution's stride).

    Returns:
        Tensor[2 * factor, 2 * factor]: separable triangle ``(1 - |i - c| / f) (1 - |j - c| / f)``
        centred at ``c = f - 0.5``. Used as the weight of a stride-``f`` transposed convolution,
        it reproduces ``F.interpolate(mode="bilinear", align_corners=False)``.
    """
    if factor < 1:
        raise ValueError(f"up-sampling factor must be >= 1, got {factor}")
    size = 2 * factor
    center = factor - 0.5
    taps = 1.0 - (torch.arange(size, dtype=torch.float32) - center).abs() / factor
    return taps[:, None] * taps[None, :]


class BilinearTransposedConv2d(nn.ConvTranspose2d):
    """Up-sampling by an integer ``factor`` with a (learnable) transposed convolution, initialised bilinear.

    Kernel ``2 * factor``, stride ``factor``; the weight starts as :func:`bilinear_kernel` on the
    channel diagonal (each class map is up-sampled on its own, zero cross-channel weights) as in
    FCN. The input is padded by one cell (replicate) before the transposed convolution and the
    output cropped by ``3 * factor / 2``, so that the border cells see the same clamped values as
    bilinear interpolation: at initialisation the layer *is* ``F.interpolate(scale_factor=factor,
    mode="bilinear", align_corners=False)``, everywhere, not only in the interior.

    Args:
        channels: number of input and output channels (class maps).
        factor: up-sampling factor, 1 or an even integer (the strides of a backbone are powers of 2).
        learnable: if False the bilinear weight is frozen (FCN's final fixed up-sampling).

    Shapes:
        ``[N, C, h, w] -> [N, C, h * factor, w * factor]``.
    """

    def __init__(self, channels: int, factor: int, *, learnable: bool = True):
        if factor != 1 and factor % 2:
            raise ValueError(f"bilinear transposed convolution needs factor 1 or even, got {factor}")
        super().__init__(channels, channels, kernel_size=2 * factor, stride=factor, bias=False)
        self.factor = factor
        self.reset_parameters()
        self.weight.requires_grad_(learnable)

    def reset_parameters(self) -> None:
        # nn.ConvTranspose2d.__init__ calls this before self.factor exists: keep its default init then
        if not hasattr(self, "factor"):
            super().reset_parameters()
            return
        with torch.no_grad():
            self.weight.zero_()
            kernel = bilinear_kernel(self.factor)
            for c in range(self.weight.shape[0]):
                self.weight[c, c] = kernel

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:  # noqa: D102
        h, w = x.shape[-2:]
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        y = F.conv_transpose2d(x, self.weight, None, stride=self.factor)
        offset = 3 * self.factor // 2
        return y[..., offset : offset + h * self.factor, offset : offset + w * self.factor]


def pad_to_multiple(images: Tensor, multiple: int) -> Tensor:
    """Pad ``images [N, C, H, W]`` on the bottom/right (replicate) so that H and W are multiples of ``multiple``."""
    h, w = images.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")


class ImageNormalize(nn.Module):
    """``(x - mean) / std`` per channel, inside the model so that it takes images in [0, 1] like the detectors."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, images: Tensor) -> Tensor:  # noqa: D102
        return (images - self.mean) / self.std


class FCN(nn.Module):
    """FCN-32s / 16s / 8s on a multi-level backbone.

    ``score`` (1x1 convolution, channels -> K + 1 classes) turns the last backbone stage (optionally
    after a 3x3 ``head`` convolution) into coarse class scores; with skips, each earlier stage gets its own 1x1 ``skip_scores`` convolution
    (initialised at zero, as in the paper, so training starts from the coarse FCN-32s prediction),
    added after a learnable 2x transposed-convolution up-sampling of the coarser scores. A final
    transposed convolution up-samples by the finest used stride to the input size.

    Args:
        backbone: multi-level feature extractor (``forward -> OrderedDict{"0".."L-1"}``).
        num_classes: K + 1 output maps (background included).
        skips: ``"32s"`` scores from the last stage only; ``"16s"`` adds the second-to-last stage;
            ``"8s"`` also the third-to-last. (The names follow the paper's VGG strides; on a backbone
            of strides 2..16 "32s" means "last stage only".)
        head_channels: if > 0, a 3x3 convolution (+ BatchNorm, ReLU) of this width on the last stage
            before ``score``, the convolutionalised fully connected layer of the FCN paper (fc6);
            0 gives the lecture's simplest design (backbone, then the 1x1 convolution).
        dropout: dropout on the last features before ``score`` (0 disables it).
        image_mean, image_std: per-channel normalisation applied to the [0, 1] input.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        skips: FCNSkips = "8s",
        head_channels: int = 0,
        dropout: float = 0.0,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        if skips not in _SKIP_LEVELS:
            raise ConfigError(
                f"unknown FCN skips {skips!r}", record="skips", fix=f"use one of {list(_SKIP_LEVELS)}"
            )
        n_skips = _SKIP_LEVELS[skips]
        if n_skips >= len(backbone.strides):
            raise ConfigError(
                f"FCN-{skips} needs {n_skips + 1} backbone stages, {backbone.arch} has {len(backbone.strides)}",
                record="skips",
                fix="use fewer skips",
            )
        self.normalize = ImageNormalize(image_mean, image_std)
        self.backbone = backbone
        self.num_classes = num_classes
        self.skips = skips
        last = len(backbone.strides) - 1
        # feature levels used, coarse to fine: last stage, then the skip stages
        self.levels = [last - i for i in range(n_skips + 1)]
        head: list[nn.Module] = []
        channels = backbone.channels[last]
        if head_channels > 0:  # FCN's convolutionalised fc6: a 3x3 convolution adds context and capacity
            head += [
                nn.Conv2d(channels, head_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(head_channels),
                nn.ReLU(inplace=True),
            ]
            channels = head_channels
        if dropout > 0:
            head.append(nn.Dropout2d(dropout))
        self.head = nn.Sequential(*head)
        self.score = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.skip_scores = nn.ModuleList()
        self.skip_upsample = nn.ModuleList()
        for coarse, fine in zip(self.levels[:-1], self.levels[1:], strict=True):
            conv = nn.Conv2d(backbone.channels[fine], num_classes, kernel_size=1)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.skip_scores.append(conv)
            self.skip_upsample.append(
                BilinearTransposedConv2d(num_classes, backbone.strides[coarse] // backbone.strides[fine])
            )
        self.upsample = BilinearTransposedConv2d(num_classes, backbone.strides[self.levels[-1]])
        self.output_stride = max(backbone.strides)

    def forward(self, images: Tensor) -> Tensor:
        """Per-pixel class scores.

        Args:
            images: Tensor[N, 3, H, W] in [0, 1], any H, W.

        Returns:
            Tensor[N, K + 1, H, W]: logits (no softmax), same spatial size as the input.
        """
        h, w = images.shape[-2:]
        x = pad_to_multiple(self.normalize(images), self.output_stride)
        feats = list(self.backbone(x).values())
        scores = self.score(self.head(feats[self.levels[0]]))
        for level, skip, up in zip(self.levels[1:], self.skip_scores, self.skip_upsample, strict=True):
            scores = up(scores) + skip(feats[level])
        return self.upsample(scores)[..., :h, :w]


@register_model("segmentation")
@passes_kwargs_to(FCN)
def fcn(
    *,
    num_classes: int,
    backbone_arch: str = "convnet_small",
    backbone_weights: str | None = None,
    trainable_layers: int | None = None,
    **kwargs: Any,
) -> FCN:
    """FCN on a project backbone: semantic segmentation contract.

    Input ``Tensor[N, 3, H, W]`` in [0, 1] (any H, W); output logits ``Tensor[N, K + 1, H, W]``.

    Args:
        num_classes: K + 1 (background included).
        backbone_arch: a registered backbone (``convnet_small``, ``mobilenet_v2``, ...).
        backbone_weights: None (random), a torchvision enum name (``IMAGENET1K_V1``) or a checkpoint path.
        trainable_layers: backbone stages left trainable (None = all).
        **kwargs: passed to :class:`FCN` (``skips``, ``head_channels``, ``dropout``, ...).
    """
    backbone = build_backbone(backbone_arch, weights=backbone_weights, trainable_layers=trainable_layers)
    return FCN(backbone, num_classes, **kwargs)
