"""Typed schema of params.yaml: strict loader, ``--set`` overrides, per-stage sections.

Config is data, validated once at the edge: :func:`load_params` reads the YAML, applies
``key.path=value`` overrides, and validates the whole tree into frozen pydantic records
that reject unknown keys, wrong types and out-of-range values with the key path and the
allowed values. Below the edge, functions take plain typed arguments or one section.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")

Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]


class Section(BaseModel):
    """Base of every section: frozen, unknown keys rejected, no coercion of str to numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, validate_default=True)


# --------------------------------------------------------------------------- shared records


class EarlyStopping(Section):
    monitor: str | None = None  # a validation metric name, e.g. "accuracy", "map_50", "miou", "loss"
    mode: Literal["min", "max"] = "max"
    patience: PositiveInt = 5


class TrainConfig(Section):
    """Settings of the one training engine, shared by every stage."""

    epochs: PositiveInt = 5
    batch_size: PositiveInt = 16
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 1e-4
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    warmup_epochs: NonNegativeFloat = 0.0
    step_size: PositiveInt = 10
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    grad_clip: NonNegativeFloat = 0.0  # 0 disables clipping
    amp: bool = True  # used only on CUDA
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: NonNegativeInt = 0
    seed: int = 0
    max_steps_per_epoch: PositiveInt | None = None
    nprocs: PositiveInt = 1  # >1 launches torchrun (DDP: gloo on CPU, nccl on CUDA); processes per node
    # machines of one torchrun job (c10d rendezvous at rdzv_endpoint); each node runs the same stage command,
    # its node rank from $NODE_RANK (0 hosts the rendezvous store; README "Scale-out")
    nnodes: PositiveInt = 1
    rdzv_endpoint: str | None = None  # HOST:PORT of node 0, required when nnodes > 1
    threads: PositiveInt | None = None  # CPU intra-op threads during fit (None: torch's default); 1 is fastest on a shared CPU
    early_stopping: EarlyStopping = EarlyStopping()  # monitor also picks best.pt (None: best = last epoch)

    @model_validator(mode="after")
    def _rendezvous(self) -> TrainConfig:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint: HOST:PORT of node 0 (the c10d rendezvous every node joins)")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"rdzv_endpoint must be HOST:PORT (e.g. 10.0.0.5:29400), got {self.rdzv_endpoint!r}")
        return self


class BackboneRef(Section):
    """Which backbone a model starts from.

    ``weights`` is ``null`` (random init), a torchvision weights enum name such as
    ``IMAGENET1K_V1`` (loaded through torchvision's weights API from its cache), or the path
    of a checkpoint (e.g. the pretrain stage's ``outputs/pretrain/backbone.pt``).
    """

    arch: str = "convnet_small"
    weights: str | None = None
    trainable_layers: NonNegativeInt | None = None  # None = all


# --------------------------------------------------------------------------- data


class ShapesConfig(Section):
    image_size: Annotated[int, Field(ge=32, le=1024)] = 128
    num_train: PositiveInt = 320
    num_val: PositiveInt = 64
    num_test: PositiveInt = 64
    min_objects: PositiveInt = 1
    max_objects: PositiveInt = 4
    min_size: Annotated[int, Field(ge=4)] = 20
    max_size: Annotated[int, Field(ge=4)] = 60
    classes: list[Literal["circle", "square", "triangle", "star", "hexagon", "cross", "ellipse", "diamond"]] = [
        "circle",
        "square",
        "triangle",
        "star",
        "hexagon",
        "cross",
    ]
    occlusion: Probability = 0.3  # chance that an object may overlap earlier ones
    texture: bool = True
    crop_size: Annotated[int, Field(ge=8)] = 32  # size of the ImageFolder view's crops

    @model_validator(mode="after")
    def _ranges(self) -> ShapesConfig:
        if self.min_objects > self.max_objects:
            raise ValueError("min_objects must be <= max_objects")
        if self.min_size > self.max_size:
            raise ValueError("min_size must be <= max_size")
        if self.max_size > self.image_size:
            raise ValueError("max_size must be <= image_size")
        if len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise ValueError("classes must be at least 2 distinct shape names")
        return self


class SplitConfig(Section):
    """Seeded split used when the source gives none."""

    train: Fraction = 0.8
    val: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    test: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1

    @model_validator(mode="after")
    def _sum(self) -> SplitConfig:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1 (got {self.train + self.val + self.test:g})")
        return self


SOURCE_FORMATS = ("shapes", "coco", "voc", "yolo", "imagefolder", "masks")
METRICS_DIR = "metrics"  # every stage's metrics file (dvc.yaml's `metrics:`); one folder, read by register


def stage_metrics_path(task: str, arch: str) -> Path:
    """``metrics/<task>/<arch>.json``: one folder per task, so the compare and register stages depend on the folder."""
    return Path(METRICS_DIR) / task / f"{arch}.json"


class DataConfig(Section):
    """The dataset that drives the pipeline: ingested into ``out``, read by augment, detect and segment.

    ``path`` is a DVC dependency of the ingest stage: adding, removing or editing a file under it
    re-runs ingest and everything downstream. For the built-in ``shapes`` source it is the
    generator's code (the dataset is a function of it and ``data.shapes``).
    """

    format: Literal[SOURCE_FORMATS] = "shapes"  # type: ignore[valid-type]
    path: str = "components/data/shapes.py"  # source folder, archive or (coco) annotation file
    out: str = "data/shapes"
    images: str | None = None  # images folder for coco: sources
    strict: bool = False
    seed: int = 0
    split: SplitConfig = SplitConfig()
    duplicate_iou: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9  # same-category boxes overlapping this much are duplicates
    masks_category: str | None = None  # masks: sources: category name (None: pedestrian / membrane / object by layout)
    masks_foreground: Literal["auto", "dark", "bright"] = "auto"  # binary masks: which pixels are category 1
    classes: list[str] | None = None  # category names in id order 1..K (others reported); None: the source's order
    shapes: ShapesConfig = ShapesConfig()

    @property
    def source(self) -> str:
        """The ingest spec: ``shapes`` or ``FORMAT:PATH``."""
        return "shapes" if self.format == "shapes" else f"{self.format}:{self.path}"


# --------------------------------------------------------------------------- augmentation


class AugmentConfig(Section):
    """Named transforms.v2 presets per task, and the knobs of the YOLO-style recipe."""

    classification: Literal["none", "basic", "strong"] = "basic"
    detection: Literal["none", "basic", "yolo"] = "yolo"
    segmentation: Literal["none", "basic", "elastic"] = "basic"
    hflip: Probability = 0.5
    vflip: Probability = 0.0
    scale: tuple[PositiveFloat, PositiveFloat] = (0.75, 1.25)
    translate: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    hsv_h: Annotated[float, Field(ge=0.0, le=0.5)] = 0.015
    hsv_s: Probability = 0.5
    hsv_v: Probability = 0.3
    crop_scale: tuple[Fraction, Fraction] = (0.5, 1.0)
    elastic_alpha: NonNegativeFloat = 34.0
    elastic_sigma: PositiveFloat = 4.0
    min_box_size: NonNegativeFloat = 2.0  # boxes smaller than this after a transform are dropped
    seed: int = 0
    preview_samples: PositiveInt = 8
    out: str = "outputs/augment"


# --------------------------------------------------------------------------- classification


class PretrainConfig(Section):
    """Produce the backbone checkpoint that finetune, detect and segment load."""

    source: Literal["imagenet", "dataset"] = "dataset"
    dataset: str = "data/cifar10"  # canonical dataset whose classification view trains the backbone
    backbone: BackboneRef = BackboneRef()
    image_size: Annotated[int, Field(ge=16)] = 32
    out: str = "outputs/pretrain"
    train: TrainConfig = TrainConfig(epochs=3, batch_size=128, lr=3e-3, threads=1)


class FinetuneConfig(Section):
    dataset: str = "data/hymenoptera"
    label_fraction: Fraction = 1.0
    image_size: Annotated[int, Field(ge=16)] = 160
    own_image_size: Annotated[int, Field(ge=16)] | None = 64  # own backbone's row (pretrained at 32 px); None: image_size
    imagenet_backbone: BackboneRef = BackboneRef(arch="mobilenet_v2", weights="IMAGENET1K_V1")
    own_backbone: str = "outputs/pretrain/backbone.pt"
    strategies: list[Literal["scratch", "feature_extraction", "fine_tuning", "own_fine_tuning"]] = [
        "scratch",
        "feature_extraction",
        "fine_tuning",
        "own_fine_tuning",
    ]
    unfreeze_last_k: NonNegativeInt | None = 1  # fine-tune the last k backbone stages (None = all)
    backbone_lr_mult: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    frozen_bn: bool = True  # fine-tuning keeps the backbone's BatchNorm statistics (eval mode); weights still train
    # validation (and every server of the checkpoint): shorter side to round(image_size / eval_crop), then the centre
    # image_size square (torchvision's ImageNet preset, 256 -> 224); None: squash the whole photo to a square.
    # Below 0.875 the side exceeds the decoded copy (kept at 8/7 x image_size, pretrain.CACHE_SCALE): it is enlarged
    eval_crop: Annotated[float, Field(gt=0.0, le=1.0)] | None = 0.875
    out: str = "outputs/finetune"
    train: TrainConfig = TrainConfig(epochs=3, batch_size=16, lr=1e-3, threads=1)


# --------------------------------------------------------------------------- detection


DetectionPreset = Literal["none", "basic", "yolo"]  # the augment.detection presets (components.augment)


class DetectorConfig(Section):
    """Settings common to every detector; each architecture's section extends it."""

    backbone: BackboneRef = BackboneRef(arch="convnet_small", weights="outputs/pretrain/backbone.pt")
    image_size: Annotated[int, Field(ge=32)] = 128
    score_threshold: Probability = 0.05
    nms_iou: Probability = 0.5
    max_detections: PositiveInt = 100
    # training augmentation of this detector: null = the shared ``augment.detection`` preset; a preset
    # name (none, basic, yolo) overrides it for this detector only (e.g. milder for a short schedule)
    augment: DetectionPreset | None = None
    train: TrainConfig = TrainConfig(epochs=10, batch_size=8, lr=1e-3, threads=1)


class SlidingWindowConfig(DetectorConfig):
    augment: DetectionPreset | None = "basic"  # flips only (the yolo preset's affine + crops are too strong for 6 epochs)
    train: TrainConfig = TrainConfig(epochs=5, batch_size=8, lr=1e-3, threads=1)
    window_sizes: list[PositiveInt] = [24, 40, 64]
    stride_fraction: Fraction = 0.5
    negatives_per_image: PositiveInt = 8
    positives_per_image: PositiveInt = 16  # ground-truth boxes + grid windows with IoU >= 0.5, per image
    crop_size: Annotated[int, Field(ge=8)] = 32  # each window is resized to this (the classifier's input)


class OverFeatConfig(DetectorConfig):
    augment: DetectionPreset | None = "basic"
    # 4 epochs: test mAP@0.5 0.31 in 120 CPU s (6 epochs: 0.45 in 171 s), within the stage's 15 minutes
    train: TrainConfig = TrainConfig(epochs=4, batch_size=8, lr=1e-3, threads=1)
    scales: list[PositiveFloat] = [1.0, 1.5]
    merge_iou: Probability = 0.3
    hard_negative_ratio: NonNegativeFloat = 3.0
    negatives_per_image: NonNegativeInt = 8  # random background windows per image
    window_size: PositiveInt = 48  # window side at scale 1, pixels


class YoloConfig(DetectorConfig):
    # horizontal flips only: the yolo preset's affine + aspect-changing crops cost 0.2 mAP@0.5 in 16 epochs
    augment: DetectionPreset | None = "basic"
    train: TrainConfig = TrainConfig(epochs=16, batch_size=8, lr=1e-3, threads=1)
    S: Annotated[int, Field(ge=1, le=64)] = 8  # the lecture's 7; 8 = the 8x8 feature map of a 128 px image at stride 16
    B: Annotated[int, Field(ge=1, le=10)] = 2
    lambda_coord: NonNegativeFloat = 5.0
    lambda_obj: NonNegativeFloat = 1.0
    lambda_noobj: NonNegativeFloat = 0.5
    lambda_classes: NonNegativeFloat = 1.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    leaky_slope: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    head: Literal["fc", "conv"] = "conv"  # fc: the paper's fully connected head; conv: a 2D conv head
    hidden: PositiveInt = 128


class SSDConfig(DetectorConfig):
    augment: DetectionPreset | None = "basic"
    train: TrainConfig = TrainConfig(epochs=8, batch_size=8, lr=1e-3, threads=1)
    # default boxes of 26 to 90 px (with the in-between scales) for the shapes' 18-61 px objects
    min_scale: Fraction = 0.2  # default-box scale of the finest map, fraction of the image side
    max_scale: Fraction = 0.7


class FasterRCNNConfig(DetectorConfig):
    augment: DetectionPreset | None = "basic"  # 0.77 mAP@0.5 in 6 epochs, 0.48 with the yolo preset
    train: TrainConfig = TrainConfig(epochs=6, batch_size=8, lr=1e-3, threads=1)
    rpn_pre_nms_top_n: PositiveInt = 500
    rpn_post_nms_top_n: PositiveInt = 200
    box_batch_size_per_image: PositiveInt = 64
    min_stride: PositiveInt = 4  # backbone levels of smaller stride stay out of the FPN
    fpn_channels: PositiveInt = 64
    representation_size: PositiveInt = 256  # width of the box head's two fully connected layers
    anchor_scale: PositiveFloat = 4.0  # RPN anchors of anchor_scale x stride pixels per pyramid level
    aspect_ratios: list[PositiveFloat] = [0.5, 1.0, 2.0]


class RetinaNetConfig(DetectorConfig):
    augment: DetectionPreset | None = "basic"
    train: TrainConfig = TrainConfig(epochs=8, batch_size=8, lr=2e-3, threads=1, warmup_epochs=1.0, grad_clip=10.0)  # focal loss spikes without warm-up
    anchor_scale: PositiveFloat = 3.0  # anchors of anchor_scale x stride x 2^(k/3) pixels per pyramid level
    head_groups: NonNegativeInt = 16  # GroupNorm groups in the two subnets (torchvision's v2 head); 0 = the paper's, none


class SelectiveSearchDetectorConfig(DetectorConfig):
    """Detectors whose regions come from selective search (R-CNN, Fast R-CNN); keys = builder arguments."""

    # the CPU demo searches one strategy (HSV, k=100, all four similarities): recall 0.99 at IoU 0.7 with 50
    # proposals on shapes; the paper's "fast" mode is ss_scales [50, 100], ss_color_spaces [hsv, lab], ss_similarities [ctsf, tsf]
    # flips only: the proposal cache is keyed by image content, so every affine-augmented image was a
    # new selective search (half of R-CNN's and Fast R-CNN's time); with flips the cache hits after epoch 2
    augment: DetectionPreset | None = "basic"
    train: TrainConfig = TrainConfig(epochs=8, batch_size=8, lr=1e-3, threads=1)  # 8 of 10: the stage's 15 minutes
    proposals_per_image: PositiveInt = 50  # R-CNN test mAP@0.5 0.78 with 50 or 100 (10 epochs); 50 halves its per-region CNN passes
    ss_scales: list[PositiveFloat] = [100.0]  # Felzenszwalb k, one over-segmentation each
    ss_sigma: NonNegativeFloat = 0.8
    ss_min_size: PositiveInt = 20
    ss_color_spaces: list[Literal["rgb", "hsv", "lab", "gray"]] = ["hsv"]
    ss_similarities: list[Annotated[str, Field(pattern=r"^[ctsf]+$")]] = ["ctsf"]  # colour, texture, size, fill
    proposal_cache: str | None = ".visionflow/cache/proposals"  # on-disk cache keyed by image content + search params


class RCNNConfig(SelectiveSearchDetectorConfig):
    crop_size: PositiveInt = 32  # side of the warped region fed to the CNN (the pretrain stage's image size)
    rois_per_image: PositiveInt = 32
    classifier_loss: Literal["hinge", "logistic"] = "hinge"  # linear SVMs or logistic regression, one-vs-rest


class FastRCNNConfig(SelectiveSearchDetectorConfig):
    roi_output_size: PositiveInt = 7
    feature_stride: PositiveInt = 8  # the backbone stage nearest this stride is RoI-pooled
    representation_size: PositiveInt = 256
    rois_per_image: PositiveInt = 64


DETECTOR_ARCHS = ("sliding_window", "overfeat", "yolo", "ssd", "faster_rcnn", "retinanet", "rcnn", "fast_rcnn")


class DetectConfig(Section):
    dataset: str = "data/shapes"  # not a key of params.yaml: always data.out (Params sets it)
    architectures: list[Literal[DETECTOR_ARCHS]] = list(DETECTOR_ARCHS)  # type: ignore[valid-type]
    out: str = "outputs/detect"
    sliding_window: SlidingWindowConfig = SlidingWindowConfig()
    overfeat: OverFeatConfig = OverFeatConfig()
    yolo: YoloConfig = YoloConfig()
    ssd: SSDConfig = SSDConfig()
    faster_rcnn: FasterRCNNConfig = FasterRCNNConfig()
    retinanet: RetinaNetConfig = RetinaNetConfig()
    rcnn: RCNNConfig = RCNNConfig()
    fast_rcnn: FastRCNNConfig = FastRCNNConfig()

    def arch(self, name: str) -> DetectorConfig:
        """The section of one architecture, e.g. ``cfg.detect.arch("yolo")``."""
        if name not in DETECTOR_ARCHS:
            raise ConfigError(f"unknown detector {name!r}", record="detect", fix=f"use one of {list(DETECTOR_ARCHS)}")
        return getattr(self, name)


# --------------------------------------------------------------------------- segmentation


# The segmenters start from torchvision's ImageNet MobileNetV2 (cached offline): on the shapes data it
# gives FCN 0.62 test mIoU after 4 epochs where the CIFAR-pretrained convnet_small gave 0.42 after 15,
# for less CPU per image (about 0.1 GMAC at 128 px against 0.2); see the README's segmentation table.
SEGMENTER_BACKBONE = BackboneRef(arch="mobilenet_v2", weights="IMAGENET1K_V1")


class SegmenterConfig(Section):
    backbone: BackboneRef = SEGMENTER_BACKBONE
    backbone_lr_mult: PositiveFloat = 1.0  # the pretrained backbone's lr / the new layers' lr (fine-tuning recipe)
    image_size: Annotated[int, Field(ge=16)] = 128
    train: TrainConfig = TrainConfig(epochs=10, batch_size=8, lr=1e-3, threads=1)


class FCNConfig(SegmenterConfig):
    skips: Literal["32s", "16s", "8s"] = "8s"
    head_channels: NonNegativeInt = 256  # 3x3 conv before the 1x1 score conv (FCN's fc6); 0: none
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    train: TrainConfig = TrainConfig(epochs=8, batch_size=8, lr=3e-3, threads=1)


class UNetConfig(SegmenterConfig):
    # the ImageNet encoder frozen (feature extraction): trained end to end at this lr, the full-resolution
    # loss wrecks its features and UNet outlines the shapes without telling them apart (test mIoU 0.25 in
    # 7 epochs, against 0.67 / 0.54 (seeds 0 / 1) frozen with deep supervision in 12 epochs for the same CPU)
    backbone: BackboneRef = BackboneRef(arch="mobilenet_v2", weights="IMAGENET1K_V1", trainable_layers=0)
    base_channels: PositiveInt = 16
    depth: Annotated[int, Field(ge=1, le=6)] = 4  # pooling steps of the classic contracting path
    pretrained_encoder: bool = True  # the backbone as the contracting path (False: the classic UNet encoder)
    aux_weight: NonNegativeFloat = 0.4  # deep supervision: weight of the coarsest decoded level's own loss; 0 = none
    train: TrainConfig = TrainConfig(epochs=12, batch_size=8, lr=3e-3, threads=1)


class MaskRCNNConfig(SegmenterConfig):
    score_threshold: Probability = 0.05  # detections kept for COCO AP
    mask_threshold: Probability = 0.5  # mask probability that makes a pixel foreground
    semantic_score_threshold: Probability = 0.5  # instances painted into the semantic map (mIoU)
    train: TrainConfig = TrainConfig(epochs=3, batch_size=4, lr=1e-3, threads=1)


SEGMENTER_ARCHS = ("fcn", "unet", "mask_rcnn")


class SegmentConfig(Section):
    dataset: str = "data/shapes"  # not a key of params.yaml: always data.out (Params sets it)
    architectures: list[Literal[SEGMENTER_ARCHS]] = list(SEGMENTER_ARCHS)  # type: ignore[valid-type]
    out: str = "outputs/segment"
    ignore_index: int = 255
    overlays: PositiveInt = 8  # test images drawn with their true and predicted masks
    fcn: FCNConfig = FCNConfig()
    unet: UNetConfig = UNetConfig()
    mask_rcnn: MaskRCNNConfig = MaskRCNNConfig()

    def arch(self, name: str) -> SegmenterConfig:
        if name not in SEGMENTER_ARCHS:
            raise ConfigError(f"unknown segmenter {name!r}", record="segment", fix=f"use one of {list(SEGMENTER_ARCHS)}")
        return getattr(self, name)


# --------------------------------------------------------------------------- evaluation, registry, tracking


class EvaluateConfig(Section):
    pr_iou_thresholds: list[Probability] = [0.5, 0.75]  # IoU thresholds of the detect stage's PR curves


class Gate(Section):
    metric: str
    margin: NonNegativeFloat = 0.0
    higher_is_better: bool = True


class RegisterConfig(Section):
    enabled: bool = True
    prefix: str = "visionflow"
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"
    # the champion cannot be measured on the candidate's test data (other categories or task, its
    # checkpoint fails to load, a backbone without a head on changed data): promote the candidate
    # (the one model shown to fit the current data) or keep the champion until a person moves it
    on_incomparable: Literal["promote", "keep"] = "promote"
    classifier: Gate = Gate(metric="accuracy", margin=0.0)
    detector: Gate = Gate(metric="map_50", margin=0.0)
    segmenter: Gate = Gate(metric="miou", margin=0.0)
    backbone: Gate = Gate(metric="accuracy", margin=0.0)
    # export each new version to ONNX in its register run (artifact onnx/, version tag visionflow.onnx_artifact);
    # about 50 s for all default models on 2 CPU cores (README "Export (ONNX)")
    onnx: bool = True


class TrackingConfig(Section):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the repo
    experiment: str = "visionflow"
    artifact_location: str | None = None  # None: ./mlartifacts beside the database


class SourceDataset(Section):
    """A dataset the pipeline ingests besides ``data``: ``visionflow ingest --source FORMAT:PATH --out OUT``."""

    format: Literal["coco", "voc", "yolo", "imagefolder", "masks"] = "imagefolder"
    path: str  # the source folder (or annotation file for coco), relative to the repository root
    out: str

    @property
    def source(self) -> str:
        return f"{self.format}:{self.path}"


class OrchestrationConfig(Section):
    """How ``visionflow run`` drives the stages of ``dvc.yaml`` (what DVC itself does not: concurrency, retries)."""

    # threads: up to max_workers stage processes at once; dask: the stage tasks on a Dask cluster (prefect-dask)
    task_runner: Literal["sequential", "threads", "dask"] = "threads"
    max_workers: PositiveInt = 2  # threads: stage processes at once; dask without address: worker processes of a local cluster
    address: str | None = None  # dask: the scheduler, e.g. tcp://10.0.0.5:8786; null = a local cluster of max_workers processes
    retries: NonNegativeInt = 2  # for transient failures only (exit code 75: tracking server, I/O), resumed from last.pt
    retry_delay_seconds: NonNegativeFloat = 5.0
    force: bool = False  # run every stage even when dvc status finds it up to date (as dvc repro -f)
    datasets: dict[str, SourceDataset] = {
        "hymenoptera": SourceDataset(path="../shared/data/hymenoptera_data", out="data/hymenoptera"),
        "cifar10": SourceDataset(path="../shared/data/cifar10_subset", out="data/cifar10"),
    }


with warnings.catch_warnings():
    # "register" is the stage's name in params.yaml; pydantic warns that it shadows BaseModel.register.
    warnings.filterwarnings("ignore", message='Field name "register"')

    class Params(Section):
        """The whole params.yaml."""

        data: DataConfig = DataConfig()
        augment: AugmentConfig = AugmentConfig()
        pretrain: PretrainConfig = PretrainConfig()
        finetune: FinetuneConfig = FinetuneConfig()
        detect: DetectConfig = DetectConfig()
        segment: SegmentConfig = SegmentConfig()
        evaluate: EvaluateConfig = EvaluateConfig()
        register: RegisterConfig = RegisterConfig()
        tracking: TrackingConfig = TrackingConfig()
        orchestration: OrchestrationConfig = OrchestrationConfig()

        @model_validator(mode="before")
        @classmethod
        def _one_dataset(cls, tree: Any) -> Any:
            """detect and segment read ``data.out``: one dataset drives the pipeline, no second key to keep in sync."""
            if not isinstance(tree, dict):
                return tree
            data = tree.get("data") or {}
            out = data.get("out", DataConfig().out) if isinstance(data, dict) else DataConfig().out
            tree = dict(tree)
            for name in ("detect", "segment"):
                section = tree.get(name) or {}
                if not isinstance(section, dict):
                    continue
                for gone in ("dataset", "metrics"):
                    if gone in section:
                        raise ValueError(
                            f"{name}.{gone} is no longer a key: every stage reads the dataset of data.out and writes "
                            f"its metrics under {METRICS_DIR}/; remove {name}.{gone} (set data.out instead)"
                        )
                tree[name] = {**section, "dataset": out}
            return tree


# --------------------------------------------------------------------------- loading


def _get_path(tree: dict[str, Any], keys: list[str], full: str) -> Any:
    node: Any = tree
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise ConfigError(f"no key {full!r}", record=full, fix="check the key path against params.yaml")
        node = node[key]
    return node


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key.path=value``; the value is parsed as YAML (so ``0.5``, ``true``, ``[a, b]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key.path=value", record=text, fix="write e.g. --set detect.yolo.S=7")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not k for k in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key", record=text, fix="write e.g. --set detect.yolo.S=7")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"value of override {key!r} is not valid YAML: {err}", record=key) from None
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``tree`` with each ``key.path=value`` applied (new keys are left for validation to reject)."""
    out = json.loads(json.dumps(tree))  # deep copy of plain data
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(keys)}: {key!r} is a value, not a section", record=".".join(keys))
            node = child
        node[keys[-1]] = value
    return out


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    path = ".".join(str(p) for p in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _submodel(model, [p for p in error["loc"][:-1] if isinstance(p, str)])
        allowed = sorted(parent.model_fields) if parent is not None else []
        return f"{path}: unknown key (allowed keys: {', '.join(allowed)})"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{path}: got {error.get('input')!r}, allowed values: {expected}"
    if not path:  # a check of the whole file (Params' own validators): its input is the whole tree
        return str(error["msg"]).removeprefix("Value error, ")
    return f"{path}: {error['msg']} (got {error.get('input')!r})"


def _submodel(model: type[BaseModel], keys: list[str]) -> type[BaseModel] | None:
    current: Any = model
    for key in keys:
        field = getattr(current, "model_fields", {}).get(key)
        if field is None:
            return None
        current = field.annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def validate_params(tree: dict[str, Any], *, source: str = "params.yaml") -> Params:
    """Validate a plain tree into :class:`Params`, raising one :class:`ConfigError` listing every problem."""
    if not isinstance(tree, dict):
        raise ConfigError("the top level must be a mapping of sections", file=source)
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        problems = [_describe(e, Params) for e in err.errors()]
        first_key = ".".join(str(p) for p in err.errors()[0]["loc"]) or None
        raise ConfigError(
            "invalid params: " + "; ".join(problems),
            file=source,
            record=first_key,
            fix="correct the key(s) named above in the file or in --set",
        ) from None


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """Load params.yaml (or ``path``), apply ``--set`` overrides, validate.

    Raises:
        ConfigError: the file is missing or not YAML, or a key is unknown, mistyped or out of range.
    """
    path = Path(path) if path is not None else DEFAULT_PARAMS
    if not path.exists():
        raise ConfigError("params file not found", file=path, fix="run from the repository root or pass --params FILE")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        raise ConfigError(f"not valid YAML: {getattr(err, 'problem', err)}", file=path, record=where) from None
    if not isinstance(tree, dict):
        raise ConfigError("the top level must be a mapping of sections", file=path)
    tree = apply_overrides(tree, overrides or [])
    return validate_params(tree, source=str(path))
