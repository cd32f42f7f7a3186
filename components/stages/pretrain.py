"""The pretrain stage: the backbone checkpoint that finetune, detect and segment load.

The lecture: "pre-trained models [are] generic and re-usable assets". Two sources (``pretrain.source``):

* ``imagenet``: torchvision's ImageNet weights (``pretrain.backbone.weights``, default
  ``IMAGENET1K_V1``) saved as the project's checkpoint, with torchvision's 1000-class layer as the
  head, so the file is a complete ImageNet classifier and its ``backbone.*`` keys a backbone;
* ``dataset``: our own backbone trained as a classifier on a canonical dataset's classification
  view (default ``data/cifar10``, the ingested ``cifar10_subset``), through the one engine.

Writes ``<out>/backbone.pt`` (a classifier checkpoint whose ``backbone.*`` keys
``components.models.backbones.load_backbone_state`` extracts; ``backbone_arch`` set),
``<out>/train/{best,last}.pt``, ``<out>/training_curves.png`` (:mod:`components.plots`), ``metrics/pretrain.json``, and an
MLflow run (params, per-epoch metrics, lineage, the plot). Everything under ``<out>`` is a function
of the code, the data and the params (byte-identical when the stage runs again); the MLflow run id
and the timings go to ``metrics/pretrain.json`` and the state file ``.visionflow/stages/pretrain.json``,
from which ``--resume`` re-opens the same run and continues from ``<out>/train/last.pt``.

The helpers that load a classification view and train a classifier on it live here too;
the finetune stage re-uses them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from components.config import AugmentConfig, PretrainConfig, TrackingConfig, TrainConfig
from components.engine import (
    FitResult,
    build_loader,
    count_parameters,
    dataset_record,
    fit,
    load_checkpoint,
    log_line,
    prepare_out_dir,
    progress,
    save_checkpoint,
    seed_everything,
    torch_threads,
)
from components.errors import CheckpointError, DataError
from components.io import write_json
from components.metrics.classification import evaluate_classification
from components.models.classifier import classification_step
from components.plots import plot_training_curves
from components.stages.runner import training_run, worker_result

METRICS_DIR = Path("metrics")
#: images are decoded once and kept with their shorter side at most this factor x image_size
#: (torchvision's 256/224 for ImageNet evaluation), before the random crop of each epoch
CACHE_SCALE = 8 / 7

if TYPE_CHECKING:
    from components.tracking import RunContext


# --------------------------------------------------------------------------- data


class DecodedImages(Dataset):
    """A classification view decoded once into memory, downscaled, then transformed on the fly.

    Decoding full-size JPEG photos is a large share of an epoch of a small CPU model (hymenoptera's
    397 photos take ~4 s to decode, a feature-extraction epoch ~6 s of CPU); decoding each file
    once (shorter side reduced to ``CACHE_SCALE * image_size`` when larger, kept as uint8) and
    re-applying the random augmentation every epoch keeps the augmentation while paying the decode
    once for every epoch and every strategy.

    Args:
        base: a :class:`~components.data.datasets.ClassificationDataset` without transform.
        image_size: the training resolution.
        indices: the subset of ``base`` to keep (e.g. a label budget), all when None.
    """

    def __init__(self, base: Any, *, image_size: int, indices: Sequence[int] | None = None):
        self.classes: list[str] = list(base.classes)
        keep = list(range(len(base))) if indices is None else list(indices)
        limit = math.ceil(CACHE_SCALE * image_size)
        self.images: list[torch.Tensor] = []
        self.targets: list[int] = []
        name = f"{Path(str(base.root)).name}/{base.split}"
        start = time.perf_counter()
        for i in progress(keep, desc=f"decoding {name}", leave=False):
            image, label = base[i]
            h, w = image.shape[-2:]
            if min(h, w) > limit:
                image = TF.resize(image, limit, antialias=True)
            self.images.append(TF.to_dtype(image.as_subclass(torch.Tensor), torch.uint8, scale=True))
            self.targets.append(int(label))
        log_line(f"decoded {len(keep)} images of {name} in {time.perf_counter() - start:.1f} s")
        self.transform: Callable[[Any], Any] | None = None

    def with_transform(self, transform: Callable[[Any], Any] | None) -> DecodedImages:
        """A view of the same decoded images with another transform (no copy)."""
        view = object.__new__(DecodedImages)
        view.__dict__.update(self.__dict__)
        view.transform = transform
        return view

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = tv_tensors.Image(TF.to_dtype(self.images[index], torch.float32, scale=True))
        if self.transform is not None:
            image = self.transform(image)
        return image.as_subclass(torch.Tensor), self.targets[index]


def label_budget(targets: Sequence[int], fraction: float, *, seed: int) -> list[int]:
    """A stratified, seeded subset: ``ceil(fraction * n_c)`` (at least 1) images of each class ``c``.

    Returns:
        Sorted indices into ``targets``.
    """
    if fraction >= 1.0:
        return list(range(len(targets)))
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    keep: list[int] = []
    for _, idx in sorted(by_class.items()):
        order = torch.randperm(len(idx), generator=g).tolist()
        keep += [idx[j] for j in order[: max(1, math.ceil(fraction * len(idx)))]]
    return sorted(keep)


@dataclass
class ClassificationData:
    """Train and validation sets of one canonical dataset, decoded once, transformed at ``image_size``."""

    root: Path
    classes: list[str]
    train: DecodedImages
    val: DecodedImages
    val_split: str
    image_size: int
    augment: AugmentConfig

    def at_size(self, image_size: int, eval_crop: float | None = None) -> ClassificationData:
        """The same decoded images with the train/eval transforms of another resolution (no re-decoding).

        ``eval_crop``: the val view's :func:`classification_eval_transform` (None: the square squash).
        """
        from components.augment import build_transforms

        return ClassificationData(
            root=self.root,
            classes=self.classes,
            train=self.train.with_transform(build_transforms("classification", self.augment, train=True, image_size=image_size)),
            val=self.val.with_transform(classification_eval_transform(image_size, eval_crop)),
            val_split=self.val_split,
            image_size=image_size,
            augment=self.augment,
        )


def classification_eval_transform(image_size: int, eval_crop: float | None) -> Any:
    """A classifier's evaluation transform: the one its stage validates with and every server of its checkpoint applies.

    ``eval_crop`` set: the shorter side resized to ``round(image_size / eval_crop)`` (antialiased bilinear),
    then the centre ``image_size x image_size`` square (torchvision's ImageNet evaluation preset: 256 then
    224 at 0.875), so a photo keeps its aspect ratio as ``RandomResizedCrop`` showed it in training.
    ``None``: the whole image squashed to ``image_size x image_size`` (``augment.build_transforms``'
    evaluation resize, which pretrain's square CIFAR images and every other task use).
    """
    if eval_crop is None:
        return v2.Resize((image_size, image_size), antialias=True)
    return v2.Compose([v2.Resize(round(image_size / eval_crop), antialias=True), v2.CenterCrop(image_size)])


def load_classification_data(
    root: str | Path, augment: AugmentConfig, *, image_size: int, label_fraction: float = 1.0, seed: int = 0
) -> ClassificationData:
    """The ``train`` split (augmented, optionally a label budget) and the ``val`` split (else ``test``).

    Raises:
        DataError: the folder is not an ingested dataset with a classification view, or a split is empty.
    """
    from components.data.datasets import ClassificationDataset, load_manifest

    root = Path(root)
    if not (root / "dataset.json").is_file():
        raise DataError(
            "no canonical dataset here",
            file=root,
            fix=f"ingest it first, e.g. `visionflow ingest --source imagefolder:../shared/data/... --out {root}`",
        )
    splits = load_manifest(root)["splits"]
    val_split = next((s for s in ("val", "test") if s in splits), None)
    if "train" not in splits or val_split is None:
        raise DataError(f"needs a train and a val (or test) split, has {list(splits)}", file=root / "dataset.json", fix="re-ingest with a split")
    train_base = ClassificationDataset(root, "train")
    val_base = ClassificationDataset(root, val_split)
    for ds in (train_base, val_base):
        if len(ds) == 0:
            raise DataError(f"the {ds.split} split has no images", file=root / "classification" / ds.split, fix="re-run the ingest stage")
    indices = label_budget(train_base.targets, label_fraction, seed=seed)
    decoded = ClassificationData(
        root=root,
        classes=list(train_base.classes),
        train=DecodedImages(train_base, image_size=image_size, indices=indices),
        val=DecodedImages(val_base, image_size=image_size),
        val_split=val_split,
        image_size=image_size,
        augment=augment,
    )
    return decoded.at_size(image_size)


# --------------------------------------------------------------------------- training


def fit_classifier(
    model: nn.Module,
    data: ClassificationData,
    cfg: TrainConfig,
    *,
    out_dir: Path,
    meta: Mapping[str, Any],
    param_groups: list[dict[str, Any]] | None = None,
    resume: bool = False,
    log_metrics: Callable[[Mapping[str, float], int], None] | None = None,
    desc: str = "",
    state_file: Path | None = None,
) -> FitResult:
    """Train a classifier with the engine: cross-entropy steps, accuracy/F1 validation each epoch."""
    seed_everything(cfg.seed)
    return fit(
        model,
        train_loader=build_loader(data.train, cfg, train=True),
        val_loader=build_loader(data.val, cfg, train=False, batch_size=max(cfg.batch_size, 64)),
        step=classification_step,
        evaluate=partial(evaluate_classification, class_names=data.classes),
        cfg=cfg,
        out_dir=out_dir,
        meta=meta,
        param_groups=param_groups,
        resume=resume,
        log_metrics=log_metrics,
        desc=desc,
        state_file=state_file,
    )


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"params": all, "trainable_params": those with requires_grad}``."""
    return {"params": count_parameters(model), "trainable_params": count_parameters(model, trainable=True)}


# --------------------------------------------------------------------------- the stage


def run_pretrain(cfg: PretrainConfig, augment: AugmentConfig, tracking: TrackingConfig, *, resume: bool = False, context: RunContext | None = None
) -> dict[str, Any]:
    """Produce ``<cfg.out>/backbone.pt`` from ImageNet weights or by training on ``cfg.dataset``.

    Args:
        resume: continue from ``<out>/train/last.pt`` in the MLflow run recorded by the state
            file ``.visionflow/stages/pretrain.json`` (a fresh start without it).

    Returns:
        The metrics written to ``metrics/pretrain.json``.

    Raises:
        DataError: the dataset is missing or unusable.
        CheckpointError: ImageNet weights are unavailable offline, or ``--resume`` met a bad ``last.pt``.
        TrainingError: the loss diverged (no ``backbone.pt`` is written).
        TrackingError: MLflow is unreachable.
    """
    with torch_threads(cfg.train.threads):
        out = prepare_out_dir(Path(cfg.out), resume=resume)
        if cfg.source == "imagenet":
            return _run_pretrain_imagenet(cfg, tracking, out, context=context)
        return _run_pretrain_dataset(cfg, augment, tracking, out, resume=resume, context=context)


def _run_pretrain_imagenet(cfg: PretrainConfig, tracking: TrackingConfig, out: Path, *, context: RunContext | None) -> dict[str, Any]:
    tags = {"visionflow.stage": "pretrain", "visionflow.source": "imagenet"}
    with training_run(
        tracking, context=context, stage="pretrain", out_dir=out, run_name="pretrain", tags=tags, resume=False, prepare=False,
        params={"pretrain": cfg.model_dump(mode="json")}, section=cfg,
    ) as run:
        metrics = _pretrain_imagenet(cfg, out)
        metrics["run_id"] = run.run_id
        run.logger.log_metrics({k: v for k, v in metrics.items() if k in ("accuracy", "params")})
        write_json(metrics, METRICS_DIR / "pretrain.json")
        run.logger.log_artifact(METRICS_DIR / "pretrain.json")
    return metrics


def _run_pretrain_dataset(
    cfg: PretrainConfig, augment: AugmentConfig, tracking: TrackingConfig, out: Path, *, resume: bool, context: RunContext | None
) -> dict[str, Any]:
    from components.models.registry import get_model

    train_dir = out / "train"
    tags = {"visionflow.stage": "pretrain", "visionflow.source": "dataset"}
    params = {"pretrain": cfg.model_dump(mode="json"), "augment": augment.model_dump(mode="json")}
    with training_run(
        tracking, context=context, stage="pretrain", out_dir=out, run_name="pretrain", tags=tags, resume=resume, prepare=False,
        params=params, section=cfg, dataset=cfg.dataset,
    ) as run:
        data = load_classification_data(cfg.dataset, augment, image_size=cfg.image_size, seed=cfg.train.seed)
        seed_everything(cfg.train.seed)
        arch = cfg.backbone.arch
        model_args = {"num_classes": len(data.classes), "backbone": arch, "weights": None, "trainable_layers": cfg.backbone.trainable_layers}
        model = get_model("classification", "classifier", **{**model_args, "weights": cfg.backbone.weights})
        dataset = dataset_record(cfg.dataset)
        meta = {
            "task": "classification",
            "model_name": "classifier",
            "model_args": model_args,
            "categories": data.classes,
            "image_size": cfg.image_size,
            "backbone_arch": arch,
            "stage": "pretrain",
            "source": "dataset",
            "dataset": dataset,
            "init_weights": cfg.backbone.weights,
        }
        result = fit_classifier(
            model, data, cfg.train, out_dir=train_dir, meta=meta, resume=resume, log_metrics=run.logger.log_metrics, desc="pretrain",
            state_file=run.state_file,
        )
        if (worker := worker_result()) is not None:
            return worker
        if result.best_path is None:
            raise CheckpointError("training wrote no best.pt", file=train_dir, fix="re-run the stage without --resume")
        backbone_path = save_checkpoint(out / "backbone.pt", load_checkpoint(result.best_path))
        curves = plot_training_curves(result.history, out / "training_curves.png", title=f"pretrain: {arch} on {Path(cfg.dataset).name}")
        metrics = _dataset_metrics(cfg, data, dataset, result, model, backbone_path, run.run_id)
        write_json(metrics, METRICS_DIR / "pretrain.json")
        run.logger.log_metrics({"best_accuracy": metrics["accuracy"], "best_macro_f1": metrics["macro_f1"], "train_time_s": metrics["train_time_s"]})
        run.logger.log_artifact(curves, "plots")
        run.logger.log_artifact(METRICS_DIR / "pretrain.json")
    return metrics


def _dataset_metrics(
    cfg: PretrainConfig, data: ClassificationData, dataset: Mapping[str, str], result: FitResult, model: nn.Module, checkpoint: Path, run_id: str
) -> dict[str, Any]:
    """``metrics/pretrain.json`` of a backbone trained on ``cfg.dataset``."""
    best = result.best_metrics
    return {
        "source": "dataset",
        "dataset": str(cfg.dataset),
        "dataset_md5": dataset["md5"],
        "val_split": data.val_split,
        "backbone": cfg.backbone.arch,
        "image_size": cfg.image_size,
        "accuracy": best.get("accuracy"),
        "macro_f1": best.get("macro_f1"),
        "loss": best.get("loss"),
        "per_class_accuracy": best.get("per_class_accuracy"),
        "epochs": result.epochs_completed,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "train_time_s": round(result.train_time_s, 2),
        "train_cpu_s": round(result.cpu_time_s, 2),
        "epoch_time_s": [round(t, 2) for t in result.epoch_time_s],
        "images_per_s": round(result.images_per_s, 1),
        "num_train": len(data.train),
        "num_val": len(data.val),
        **parameter_counts(model),
        "checkpoint": str(checkpoint),
        "run_id": run_id,
    }


def _pretrain_imagenet(cfg: PretrainConfig, out: Path) -> dict[str, Any]:
    """torchvision's pretrained classifier as a project checkpoint (backbone + its own 1000-class head)."""
    import torchvision

    from components.models.backbones import _torchvision_model
    from components.models.registry import get_model, resolve_model_name

    arch, weights = cfg.backbone.arch, cfg.backbone.weights or "IMAGENET1K_V1"
    if resolve_model_name("backbone", arch) == "convnet_small":
        raise CheckpointError(f"{arch} has no ImageNet weights", record="pretrain.backbone.arch", fix="use mobilenet_v2 (or set pretrain.source: dataset)")
    enum = torchvision.models.get_model_weights(arch)[weights] if weights in torchvision.models.get_model_weights(arch).__members__ else None
    categories = list(enum.meta["categories"]) if enum is not None else [str(i) for i in range(1000)]
    model = get_model("classification", "classifier", num_classes=len(categories), backbone=arch, weights=weights)
    fc = _torchvision_fc(_torchvision_model(arch, weights))
    model.get_classifier().load_state_dict(fc.state_dict())
    acc = (enum.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1") if enum is not None else None)
    model_args = {"num_classes": len(categories), "backbone": arch, "weights": None, "trainable_layers": None}
    save_checkpoint(
        out / "backbone.pt",
        {
            "task": "classification",
            "model_name": "classifier",
            "model_args": model_args,
            "state_dict": model.state_dict(),
            "categories": categories,
            "image_size": 224,
            "backbone_arch": arch,
            "stage": "pretrain",
            "source": "imagenet",
            "init_weights": weights,
        },
    )
    return {
        "source": "imagenet",
        "backbone": arch,
        "weights": weights,
        # the published ImageNet-1K val top-1 of these weights (torchvision's Weights.meta), as a fraction
        "accuracy": acc / 100 if acc is not None else None,
        "accuracy_source": "torchvision Weights.meta ImageNet-1K acc@1 (published, not measured here)",
        **parameter_counts(model),
        "checkpoint": str(out / "backbone.pt"),
    }


def _torchvision_fc(model: nn.Module) -> nn.Linear:
    """The last linear layer of a torchvision classifier (``fc`` or ``classifier[-1]``)."""
    fc = getattr(model, "fc", None)
    if fc is None:
        head = model.classifier
        fc = head[-1] if isinstance(head, nn.Sequential) else head
    assert isinstance(fc, nn.Linear)
    return fc
