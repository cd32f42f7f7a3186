"""UNet (Ronneberger et al. 2015) for semantic segmentation, written here.

The lecture: "The UNet architecture builds upon the previous FCN architecture. It consists in
symmetric contraction and expansion paths, along with a concatenation of high resolution features
from the contracting path to the up-sampled features from the expanding path. These connections
allow for localization."

* Contracting path: ``depth`` times (two 3x3 conv + BatchNorm + ReLU, then 2x2 max pooling),
  doubling the channels at each step; a bottleneck of two 3x3 convolutions.
* Expanding path: ``depth`` times (2x2 transposed convolution halving the channels, concatenation
  with the contracting path's feature map of the same resolution, two 3x3 convolutions).
* A 1x1 convolution maps the last feature map to K + 1 class scores.

Optionally the contracting path is a pretrained project backbone (``encoder="backbone"``): its
stages give the skip features at strides ``s_0 < s_1 < ...``, a small full-resolution stem gives
the stride-1 skip, and the expanding path mirrors those strides.

Initialisation matters on a small CPU budget (on the shapes data with the MobileNetV2 encoder, the
validation cross-entropy after 2 epochs is 0.56 with neither of the two points below, 0.42 with
the first alone, 0.29 with both):

* every 3x3 and up-sampling convolution written here (stem, contracting and expanding paths)
  starts from He (Kaiming) normal weights, ``fan_out`` mode as torchvision's ResNets, instead of
  PyTorch's default uniform init,
  which is about 2.4x smaller: the up-sampling transposed convolutions are not followed by
  BatchNorm, so with the default init the up-sampled deep (semantic) features enter the
  concatenation 3-6x weaker than the BatchNorm-ed skip features and the network first fits the
  shallow skips;
* the 1x1 head's bias starts at the log of the pixel class frequencies (``class_prior``), the prior
  initialisation of RetinaNet: at step 0 the softmax already predicts the class prior, so the first
  hundred steps are not spent learning that 85 % of the pixels are background.

Convolutions are padded ("same"), unlike the paper's valid convolutions, and the input is padded
(replicate) to a multiple of the total stride and the logits cropped back, so the output has the
input's spatial size for odd and even sizes alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.errors import ConfigError
from components.models.backbones import Backbone, build_backbone
from components.models.fcn import IMAGENET_MEAN, IMAGENET_STD, ImageNormalize, pad_to_multiple
from components.models.registry import passes_kwargs_to, register_model


class DoubleConv(nn.Sequential):
    """(3x3 convolution, BatchNorm, ReLU) x 2: UNet's building block. ``[N, cin, H, W] -> [N, cout, H, W]``."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """One step of the expanding path: transposed-convolution up-sampling, concatenation, DoubleConv.

    Args:
        cin: channels of the coarser (expanding-path) input.
        cskip: channels of the contracting path's feature map at the finer resolution.
        cout: output channels.
        factor: up-sampling factor (ratio of the two strides; 2 in the classic UNet).

    Shapes:
        ``x [N, cin, h, w]``, ``skip [N, cskip, h * factor, w * factor]`` -> ``[N, cout, h * factor, w * factor]``.
    """

    def __init__(self, cin: int, cskip: int, cout: int, factor: int = 2):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, kernel_size=factor, stride=factor)
        self.conv = DoubleConv(cout + cskip, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:  # noqa: D102
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """UNet with the classic encoder or a backbone encoder; see the module docstring.

    Args:
        num_classes: K + 1 output maps (background included).
        base_channels: channels of the first (full-resolution) level; level i has ``base * 2**i``.
        depth: number of pooling steps of the classic contracting path.
        backbone: if given, it is the contracting path (its stages are the levels below the stem).
        image_mean, image_std: per-channel normalisation applied to the [0, 1] input.
        class_prior: pixel frequency of each of the K + 1 classes (e.g. on the train split): the
            head's bias starts at its log (prior initialisation); None keeps a zero bias.
        deep_supervision: add a 1x1 classifier on the coarsest decoded level whose loss is added in
            training (see :meth:`forward`). It gives the deep, class-deciding features a direct
            gradient instead of one through every decoder level; without it, on the shapes data,
            UNet outlines the objects well but gives whole shapes the wrong class.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        base_channels: int = 16,
        depth: int = 4,
        backbone: Backbone | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        class_prior: Sequence[float] | None = None,
        deep_supervision: bool = False,
    ):
        super().__init__()
        self.normalize = ImageNormalize(image_mean, image_std)
        self.num_classes = num_classes
        self.stem = DoubleConv(3, base_channels)  # stride 1: the highest-resolution skip
        self.backbone = backbone
        if backbone is None:
            channels = [base_channels * 2**i for i in range(depth + 1)]
            strides = [2**i for i in range(depth + 1)]
            self.down = nn.ModuleList(
                nn.Sequential(nn.MaxPool2d(2), DoubleConv(channels[i], channels[i + 1])) for i in range(depth)
            )
        else:
            channels = [base_channels, *backbone.channels]
            strides = [1, *backbone.strides]
            self.down = nn.ModuleList()
        for fine, coarse in zip(strides[:-1], strides[1:], strict=True):
            if coarse % fine:
                raise ConfigError(
                    f"encoder strides {strides} are not nested",
                    record="backbone",
                    fix="use a backbone whose strides double",
                )
        self.strides = strides
        self.up = nn.ModuleList()
        cin = channels[-1]
        for i in reversed(range(len(channels) - 1)):
            cout = channels[i] if backbone is None else max(base_channels, channels[i])
            self.up.append(UpBlock(cin, channels[i], cout, factor=strides[i + 1] // strides[i]))
            cin = cout
        self.head = nn.Conv2d(cin, num_classes, kernel_size=1)
        # deep supervision: class scores from the coarsest decoded level, trained with their own loss
        self.aux_head = nn.Conv2d(self.up[0].conv[0].out_channels, num_classes, kernel_size=1) if deep_supervision else None
        self.reset_parameters(class_prior)

    def reset_parameters(self, class_prior: Sequence[float] | None = None) -> None:
        """He-normal init of the 3x3 and up-sampling convolutions written here, the head's bias at ``log(class_prior)``.

        The backbone (pretrained or not) keeps its own weights; the 1x1 head keeps PyTorch's default
        (small) weights, so the initial logits are close to the prior.

        Raises:
            ConfigError: ``class_prior`` has not K + 1 positive entries.
        """
        own = [self.stem, self.up] + ([self.down] if self.backbone is None else [])
        for module in (m for part in own for m in part.modules()):
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if class_prior is not None:
            prior = torch.as_tensor(list(class_prior), dtype=torch.float32)
            if prior.shape != (self.num_classes,) or not bool((prior > 0).all()):
                raise ConfigError(
                    f"class_prior needs {self.num_classes} positive frequencies, got {prior.tolist()}",
                    record="class_prior",
                    fix="pass the pixel frequency of every class, background included (or None)",
                )
            with torch.no_grad():
                self.head.bias.copy_((prior / prior.sum()).log())

    def contract(self, x: Tensor) -> list[Tensor]:
        """Contracting path: feature maps from stride 1 (stem) to the bottleneck."""
        feats = [self.stem(x)]
        if self.backbone is None:
            for block in self.down:
                feats.append(block(feats[-1]))
        else:
            feats.extend(self.backbone(x).values())
        return feats

    def forward(self, images: Tensor) -> Tensor:
        """Per-pixel class scores.

        Args:
            images: Tensor[N, 3, H, W] in [0, 1], any H, W (grey images repeated to 3 channels).

        Returns:
            Tensor[N, K + 1, H, W]: logits, same spatial size as the input. In training mode with
            ``deep_supervision``, a dict ``{"out": logits, "aux": coarse logits}`` instead (torchvision's
            segmentation-model convention): ``aux`` are the class scores of the coarsest decoded level
            (stride 16 with the MobileNetV2 encoder), bilinearly up-sampled to ``H x W``.
        """
        h, w = images.shape[-2:]
        x = pad_to_multiple(self.normalize(images), self.strides[-1])
        feats = self.contract(x)
        y = feats[-1]
        aux = None
        for i, (block, skip) in enumerate(zip(self.up, reversed(feats[:-1]), strict=True)):
            y = block(y, skip)
            if i == 0 and self.aux_head is not None and self.training:
                aux = F.interpolate(self.aux_head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.head(y)[..., :h, :w]
        if aux is not None:
            return {"out": logits, "aux": aux[..., :h, :w]}
        return logits


@register_model("segmentation")
@passes_kwargs_to(UNet, exclude=("backbone",))
def unet(
    *,
    num_classes: int,
    pretrained_encoder: bool = False,
    backbone_arch: str = "convnet_small",
    backbone_weights: str | None = None,
    trainable_layers: int | None = None,
    **kwargs: Any,
) -> UNet:
    """UNet: semantic segmentation contract.

    Input ``Tensor[N, 3, H, W]`` in [0, 1] (any H, W); output logits ``Tensor[N, K + 1, H, W]``.

    Args:
        num_classes: K + 1 (background included).
        pretrained_encoder: use the project backbone ``backbone_arch`` (loaded from ``backbone_weights``)
            as the contracting path (``depth`` is then ignored).
        backbone_arch, backbone_weights, trainable_layers: the backbone, as in :func:`build_backbone`.
        **kwargs: passed to :class:`UNet` (``base_channels``, ``depth``, ``deep_supervision``, ...).
            ``class_prior`` is only an initialisation: a checkpoint's state dict overrides it, so it
            is not a model arg.
    """
    backbone = None
    if pretrained_encoder:
        backbone = build_backbone(backbone_arch, weights=backbone_weights, trainable_layers=trainable_layers)
    return UNet(num_classes, backbone=backbone, **kwargs)
