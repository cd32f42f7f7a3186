"""Backbones: multi-level feature extractors shared by classification, detection and segmentation.

The lecture's closing point is this module's reason to exist: a network trained for
classification is re-used as the backbone of detectors and segmenters. Every backbone has
the same contract:

* ``forward(x: Tensor[N, 3, H, W]) -> OrderedDict[str, Tensor]`` with one feature map per
  stage, keys ``"0"``, ``"1"``, ... from high to low resolution;
* ``channels`` (list[int]) and ``strides`` (list[int]) per stage, ``out_channels`` of the last;
* ``forward_features(x) -> Tensor`` the last stage only (timm's name);
* ``freeze(trainable_layers)`` freezes all but the last ``k`` stages, frozen BatchNorm in eval mode.

Backbones are built by name (:func:`build_backbone`) with ``weights`` being ``None``, a
torchvision weights enum name (``"IMAGENET1K_V1"``, loaded through torchvision's own weights
API and cache), or the path of a project checkpoint (e.g. the pretrain stage's output).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from components.errors import CheckpointError
from components.models.registry import register_model, resolve_model_name

# torchvision architectures: where each stage ends in ``model.features`` (or which children form it)
_TV_STAGES: dict[str, list[tuple[int, int]]] = {
    "mobilenet_v2": [(0, 4), (4, 7), (7, 14), (14, 19)],
    "mobilenet_v3_small": [(0, 2), (2, 4), (4, 9), (9, 13)],
    "mobilenet_v3_large": [(0, 4), (4, 7), (7, 13), (13, 17)],
}
_TV_STRIDES = [4, 8, 16, 32]


class Backbone(nn.Module):
    """A sequence of stages, each halving (or more) the resolution; see the module docstring."""

    def __init__(self, stages: Sequence[nn.Module], channels: Sequence[int], strides: Sequence[int], arch: str):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.channels = list(channels)
        self.strides = list(strides)
        self.arch = arch
        self._frozen_stages: int = 0

    @property
    def out_channels(self) -> int:
        return self.channels[-1]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats: OrderedDict[str, Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            feats[str(i)] = x
        return feats

    def forward_features(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def freeze(self, trainable_layers: int | None) -> None:
        """Freeze every stage but the last ``trainable_layers`` (``None``: train all, ``0``: freeze all).

        Frozen stages keep ``requires_grad=False`` and their BatchNorm layers stay in eval mode,
        so their running statistics are bit-identical after training steps.
        """
        n = len(self.stages)
        k = n if trainable_layers is None else max(0, min(n, trainable_layers))
        self._frozen_stages = n - k
        for i, stage in enumerate(self.stages):
            for p in stage.parameters():
                p.requires_grad_(i >= self._frozen_stages)
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for stage in list(self.stages)[: self._frozen_stages]:
            stage.eval()
        return self


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@register_model("backbone")
def convnet_small(*, widths: Sequence[int] = (16, 32, 64, 128), in_channels: int = 3) -> Backbone:
    """The project's own small backbone, fast on CPU: the lecture's convnet body.

    Four stages of (3x3 conv, BatchNorm, ReLU) x 2 followed by 2x2 max pooling; strides
    2, 4, 8, 16 and ``widths`` channels. About 0.2 GMAC for a 128x128 image.
    """
    stages = []
    cin = in_channels
    for w in widths:
        stages.append(nn.Sequential(_conv_bn_relu(cin, w), _conv_bn_relu(w, w), nn.MaxPool2d(2)))
        cin = w
    strides = [2 ** (i + 1) for i in range(len(widths))]
    return Backbone(stages, widths, strides, arch="convnet_small")


def _torchvision_model(arch: str, weights: str | None) -> nn.Module:
    import torchvision

    if weights is None:
        return torchvision.models.get_model(arch, weights=None)
    try:
        enum = torchvision.models.get_model_weights(arch)[weights]
    except KeyError:
        options = [w.name for w in torchvision.models.get_model_weights(arch)]
        raise CheckpointError(
            f"torchvision has no weights {weights!r} for {arch}", record=weights, fix=f"use one of {options}, a checkpoint path or null"
        ) from None
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
    try:
        return torchvision.models.get_model(arch, weights=enum)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a truncated file raises RuntimeError
        raise CheckpointError(
            f"cannot load torchvision weights {arch}.{weights} ({type(err).__name__}: {err})",
            file=cache,
            fix=f"this machine is offline: put {Path(enum.url).name} into {cache.parent} "
            "(`bash scripts/seed_weights.sh` does it for mobilenet_v2) or set weights: null",
        ) from None


def _tv_backbone(arch: str, weights: str | None) -> Backbone:
    model = _torchvision_model(arch, weights)
    if arch.startswith("resnet"):
        m: Any = model
        stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1)
        stages = [stem, m.layer2, m.layer3, m.layer4]
        channels = [_last_channels(s) for s in stages]
        return Backbone(stages, channels, _TV_STRIDES, arch=arch)
    features = model.features  # type: ignore[attr-defined]
    stages = [nn.Sequential(*[features[i] for i in range(a, b)]) for a, b in _TV_STAGES[arch]]
    channels = [_last_channels(s) for s in stages]
    return Backbone(stages, channels, _TV_STRIDES, arch=arch)


def _last_channels(module: nn.Module) -> int:
    out = None
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            out = m.out_channels
    if out is None:
        raise ValueError("stage has no convolution")
    return out


def _register_tv(arch: str) -> None:
    def builder(*, weights: str | None = None) -> Backbone:
        return _tv_backbone(arch, weights)

    builder.__name__ = arch
    builder.__doc__ = f"torchvision's {arch} split into 4 stages (strides 4, 8, 16, 32); ``weights`` an enum name or None."
    register_model("backbone", arch)(builder)


for _arch in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet34", "resnet50"):
    _register_tv(_arch)


def is_torchvision_weights(weights: str | None) -> bool:
    """True when ``weights`` names a torchvision enum (``IMAGENET1K_V1``) rather than a file."""
    return weights is not None and weights.isupper() and not Path(weights).suffix


def load_backbone_state(path: str | Path, *, arch: str) -> dict[str, Tensor]:
    """Backbone weights from a project checkpoint: a backbone's own or a classifier's ``backbone.*`` keys.

    Raises:
        CheckpointError: the file is missing, corrupt, not a checkpoint, or of another architecture.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            "backbone checkpoint not found", file=path, fix="run the pretrain stage first (`visionflow pretrain`) or set backbone.weights"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a corrupt file; re-raised with the file named
        raise CheckpointError(f"cannot read checkpoint ({type(err).__name__}: {err})", file=path, fix="re-run the stage that wrote it") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError("not a visionflow checkpoint (no state_dict)", file=path, fix="point weights at a file written by visionflow")
    ckpt_arch = ckpt.get("backbone_arch") or ckpt.get("model_args", {}).get("arch")
    arch = resolve_model_name("backbone", arch)
    if ckpt_arch is not None:  # a checkpoint written before a rename names the old architecture
        ckpt_arch = resolve_model_name("backbone", ckpt_arch)
    if ckpt_arch is not None and ckpt_arch != arch:
        raise CheckpointError(
            f"checkpoint holds a {ckpt_arch} backbone, params ask for {arch}",
            file=path,
            record="backbone.arch",
            fix=f"set backbone.arch: {ckpt_arch} or point weights at a {arch} checkpoint",
        )
    state = ckpt["state_dict"]
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def build_backbone(arch: str, *, weights: str | None = None, trainable_layers: int | None = None) -> Backbone:
    """Build a registered backbone and load ``weights`` (None, torchvision enum name, or checkpoint path)."""
    from components.models.registry import get_model

    arch = resolve_model_name("backbone", arch)
    if weights is not None and not is_torchvision_weights(weights):
        backbone = get_model("backbone", arch)
        state = load_backbone_state(weights, arch=arch)
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint does not fit {arch}: {len(missing)} missing, {len(unexpected)} unexpected keys "
                f"(e.g. {(missing or unexpected)[:3]})",
                file=weights,
                fix="use a checkpoint written for this architecture",
            )
    elif weights is not None:
        if arch == "convnet_small":
            raise CheckpointError(f"convnet_small has no torchvision weights {weights!r}", record="backbone.weights", fix="use a checkpoint path or null")
        backbone = get_model("backbone", arch, weights=weights)
    else:
        backbone = get_model("backbone", arch)
    assert isinstance(backbone, Backbone)
    backbone.freeze(trainable_layers)
    return backbone
