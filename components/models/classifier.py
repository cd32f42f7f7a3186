"""Image classifiers: the lecture's convnet from scratch, and a backbone + new head for transfer learning.

Contract (task ``"classification"``): ``model(images: Tensor[N, 3, H, W]) -> logits: Tensor[N, K]``.
The softmax output layer of the lecture, ``h = softmax(logits)`` (a point of the simplex
``triangle^K`` estimating ``P(Y = i | x)``), is applied by :meth:`predict_proba`; training minimises
the cross-entropy ``-log h_y``, computed from the logits by ``F.cross_entropy`` (log-softmax + NLL
in one numerically stable step) in :func:`classification_step`.

Inputs are RGB in [0, 1], as the datasets and the augmentation presets give them; each model
standardises them with the ImageNet mean and std itself (non-persistent buffers), the statistics
torchvision's pretrained backbones were trained with, so the registered model needs no separate
preprocessing step and every backbone (ours included) sees the same input distribution.

Both models expose timm's names so that transfer learning is done through arguments, not forks:
``forward_features(x) -> Tensor[N, C, h, w]``, ``forward_head(features, pre_logits=False)``,
``get_classifier()`` and ``reset_classifier(num_classes)`` (a new, randomly initialised head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.models.backbones import Backbone, build_backbone
from components.models.registry import passes_kwargs_to, register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _ClassifierAPI(nn.Module):
    """The shared half of both classifiers: ``forward = forward_head(forward_features(x))``."""

    head: nn.Sequential

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: Tensor) -> Tensor:
        """Tensor[N, 3, H, W] in [0, 1] -> standardised with the ImageNet mean/std."""
        return (x - self.mean) / self.std

    def forward_features(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool ``features`` (Tensor[N, C, h, w]) and map them to logits (Tensor[N, K]).

        With ``pre_logits=True`` returns the pooled feature vector (Tensor[N, D]) the last linear
        layer sees: the "generic re-usable" representation of the lecture's transfer learning.
        """
        for name, layer in self.head.named_children():
            if pre_logits and name == "fc":
                return features
            features = layer(features)
        return features

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        """The last fully connected layer (the one transfer learning replaces)."""
        fc = self.head.fc
        assert isinstance(fc, nn.Linear)
        return fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the output layer by a fresh ``Linear(D, num_classes)``: "remove the last layer"."""
        old = self.get_classifier()
        self.head.fc = nn.Linear(old.in_features, num_classes).to(old.weight.device)
        self.num_classes = num_classes

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities ``softmax(logits)`` (Tensor[N, K], rows sum to 1)."""
        return self.forward(x).softmax(dim=1)


class ConvNet(_ClassifierAPI):
    """The lecture's convolutional network: [conv -> ReLU -> conv -> ReLU -> max-pool] x L, then FC layers.

    Args:
        num_classes: K, the size of the softmax output.
        widths: channels of each convolution block; each block halves the resolution.
        hidden: width of the hidden fully connected layer.
        dropout: dropout before each fully connected layer.
        in_channels: 3 for RGB.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        widths: Sequence[int] = (32, 64, 128),
        hidden: int = 256,
        dropout: float = 0.1,
        in_channels: int = 3,
    ):
        super().__init__()
        if in_channels != 3:
            self.mean, self.std = torch.zeros(1, in_channels, 1, 1), torch.ones(1, in_channels, 1, 1)
        blocks: list[nn.Module] = []
        cin = in_channels
        for w in widths:
            blocks += [
                nn.Conv2d(cin, w, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            cin = w
        self.features = nn.Sequential(*blocks)
        self.num_classes = num_classes
        # A fixed 2x2 grid keeps some spatial layout for the FC layers at any input size.
        self.head = nn.Sequential()
        self.head.add_module("pool", nn.AdaptiveAvgPool2d(2))
        self.head.add_module("flatten", nn.Flatten(1))
        self.head.add_module("drop1", nn.Dropout(dropout))
        self.head.add_module("fc1", nn.Linear(cin * 4, hidden))
        self.head.add_module("relu", nn.ReLU(inplace=True))
        self.head.add_module("drop2", nn.Dropout(dropout))
        self.head.add_module("fc", nn.Linear(hidden, num_classes))
        for m in self.modules():  # He init for ReLU networks (torchvision's VGG/ResNet): trains from scratch without BatchNorm
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Tensor[N, 3, H, W] in [0, 1] -> feature maps Tensor[N, widths[-1], H / 2^L, W / 2^L]."""
        return self.features(self.normalize(x))


class Classifier(_ClassifierAPI):
    """A backbone (:mod:`components.models.backbones`) + global average pooling + a new linear head.

    Args:
        backbone: a built :class:`~components.models.backbones.Backbone`; frozen stages stay frozen.
        num_classes: K.
        dropout: dropout before the linear layer.
        frozen_bn: keep every BatchNorm of the backbone in eval mode while training (running
            statistics fixed, affine weights still trained): fine-tuning on a few hundred images
            in batches of 16 otherwise replaces ImageNet's statistics by noisy batch estimates
            (torchvision's detection models freeze BatchNorm for the same reason).
    """

    def __init__(self, backbone: Backbone, *, num_classes: int, dropout: float = 0.0, frozen_bn: bool = False):
        super().__init__()
        self.backbone = backbone
        self.frozen_bn = frozen_bn
        self.num_classes = num_classes
        self.head = nn.Sequential()
        self.head.add_module("pool", nn.AdaptiveAvgPool2d(1))
        self.head.add_module("flatten", nn.Flatten(1))
        self.head.add_module("drop", nn.Dropout(dropout))
        self.head.add_module("fc", nn.Linear(backbone.out_channels, num_classes))

    def forward_features(self, x: Tensor) -> Tensor:
        """Tensor[N, 3, H, W] in [0, 1] -> the backbone's last stage, Tensor[N, C, H/s, W/s]."""
        return self.backbone.forward_features(self.normalize(x))

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def param_groups(self, *, backbone_lr_mult: float) -> list[dict[str, Any]]:
        """Optimiser groups for fine-tuning: the pretrained backbone at ``lr * backbone_lr_mult``, the new head at ``lr``.

        Frozen parameters are left to the engine, which skips them.
        """
        return [
            {"name": "backbone", "params": list(self.backbone.parameters()), "lr_mult": backbone_lr_mult},
            {"name": "head", "params": list(self.head.parameters()), "lr_mult": 1.0},
        ]


@register_model("classification")
@passes_kwargs_to(ConvNet)
def convnet(**kwargs: Any) -> ConvNet:
    """The lecture's convnet from scratch (conv, pooling, fully connected, softmax/cross-entropy).

    Input Tensor[N, in_channels, H, W] (H, W >= 2^len(widths)); output logits Tensor[N, num_classes].
    ``**kwargs`` go to :class:`ConvNet` (``num_classes``, ``widths``, ``hidden``, ``dropout``, ``in_channels``).
    """
    return ConvNet(**kwargs)


@register_model("classification")
@passes_kwargs_to(Classifier)
def classifier(
    *,
    num_classes: int,
    backbone: str = "convnet_small",
    weights: str | None = None,
    trainable_layers: int | None = None,
    **kwargs: Any,
) -> Classifier:
    """A registered backbone with a new classification head (transfer learning by arguments).

    Args:
        num_classes: K.
        backbone: backbone name (``convnet_small``, ``mobilenet_v2``, ``resnet18``, ...).
        weights: ``None`` (scratch), a torchvision weights enum name (``"IMAGENET1K_V1"``) or the
            path of a project checkpoint (e.g. ``outputs/pretrain/backbone.pt``).
        trainable_layers: how many of the backbone's last stages train: ``0`` = feature
            extraction (frozen backbone, BatchNorm in eval), ``k`` = fine-tune the last k blocks,
            ``None`` = fine-tune all.
        **kwargs: passed to :class:`Classifier` (``dropout`` before the linear head, ``frozen_bn``).

    Input Tensor[N, 3, H, W] in [0, 1] normalised as the backbone expects; output logits Tensor[N, K].
    """
    body = build_backbone(backbone, weights=weights, trainable_layers=trainable_layers)
    return Classifier(body, num_classes=num_classes, **kwargs)


def classification_step(model: nn.Module, batch: tuple[Tensor, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The engine's ``step`` for classifiers: cross-entropy of the logits, plus the batch accuracy.

    Args:
        batch: ``(images Tensor[N, 3, H, W], labels Tensor[N] int64 in 0..K-1)``.
    """
    images, labels = batch
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
    return {"loss": loss, "accuracy": accuracy}
