"""The finetune stage: the lecture's transfer-learning strategies compared on a small labelled budget.

On the target task (default ``data/hymenoptera``, ants vs bees, the PyTorch transfer-learning
tutorial's data), with ``finetune.label_fraction`` of its train split, each strategy trains the
same classifier (``components.models.classifier.classifier``) through the one engine:

* ``scratch``: the ImageNet architecture, randomly initialised ("training from data of the new
  task only"), one learning rate;
* ``feature_extraction``: the ImageNet backbone frozen as "a fixed feature extractor" (all its
  stages ``requires_grad=False``, BatchNorm in eval mode), only the new head trains;
* ``fine_tuning``: the ImageNet backbone also trained, "continuing backpropagation", all blocks or
  the last ``unfreeze_last_k``, at ``backbone_lr_mult`` x the head's learning rate;
* ``own_fine_tuning``: the same recipe from our own backbone (the pretrain stage's ``backbone.pt``).

Validation accuracy is measured as the checkpoint is served (``finetune.eval_crop``,
:func:`components.stages.pretrain.classification_eval_transform`): the photo's shorter side resized to ``image_size / eval_crop``
and the centre square kept, torchvision's evaluation preset for these ImageNet weights (256 -> 224);
squashing a 4:3 photo to a square, as ``eval_crop: null`` does, shows the network proportions it never
saw in training (``RandomResizedCrop`` keeps them within 3:4..4:3).

Writes ``<out>/<strategy>/{best,last}.pt``, ``<out>/best.json`` (the strategy with the best
validation accuracy and its checkpoint, for the register stage), ``<out>/strategies.png`` (bar
chart), ``<out>/confusion_matrix.png`` (the best strategy's), per strategy
``training_curves.png`` and ``confusion_matrix.png``, and ``metrics/finetune.json``; one MLflow
run with a nested run per strategy. Files under ``<out>`` are a function of code, data and params
(no run ids or timings); the run ids and times go to ``metrics/finetune.json`` and the state files
``.visionflow/stages/finetune.json`` (parent run) and ``finetune@<strategy>.json`` (each child run
and its epoch times), from which ``--resume`` re-opens the same runs and continues each
strategy from its ``last.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.config import AugmentConfig, FinetuneConfig, TrackingConfig
from components.engine import (
    FitResult,
    dataset_record,
    load_checkpoint,
    prepare_out_dir,
    seed_everything,
    torch_threads,
)
from components.errors import CheckpointError
from components.io import write_json
from components.models.classifier import Classifier
from components.plots import plot_confusion_matrix, plot_strategy_comparison, plot_training_curves
from components.stages.pretrain import (
    METRICS_DIR,
    fit_classifier,
    load_classification_data,
    parameter_counts,
)
from components.stages.runner import training_run, worker_result

STRATEGY_TITLES = {
    "scratch": "scratch (random init)",
    "feature_extraction": "ImageNet features, frozen",
    "fine_tuning": "ImageNet, fine-tuned",
    "own_fine_tuning": "own backbone, fine-tuned",
}

if TYPE_CHECKING:
    from components.tracking import RunContext


def strategy_model(strategy: str, cfg: FinetuneConfig, num_classes: int) -> tuple[Classifier, dict[str, Any], list[dict[str, Any]] | None, dict[str, Any]]:
    """Build the classifier of one strategy.

    Returns:
        ``(model, model_args for the checkpoint (weights=None: the state_dict carries them),
        optimiser param groups or None, a description of the initialisation)``.

    Raises:
        CheckpointError: ImageNet weights unavailable offline, or the own backbone missing.
    """
    from components.models.registry import get_model

    ref = cfg.imagenet_backbone
    if strategy == "own_fine_tuning":
        arch = _own_backbone_arch(Path(cfg.own_backbone))
        weights: str | None = cfg.own_backbone
    else:
        arch, weights = ref.arch, (None if strategy == "scratch" else ref.weights)
    trainable = {"scratch": None, "feature_extraction": 0}.get(strategy, cfg.unfreeze_last_k)
    fine_tuned = strategy in ("fine_tuning", "own_fine_tuning")
    model_args = {"num_classes": num_classes, "backbone": arch, "weights": None, "trainable_layers": trainable, "frozen_bn": fine_tuned and cfg.frozen_bn}
    model = get_model("classification", "classifier", **{**model_args, "weights": weights})
    assert isinstance(model, Classifier)
    groups = model.param_groups(backbone_lr_mult=cfg.backbone_lr_mult) if fine_tuned else None
    init = {"backbone": arch, "weights": weights, "trainable_layers": trainable, "backbone_lr_mult": cfg.backbone_lr_mult if groups else 1.0, "frozen_bn": model_args["frozen_bn"]}
    return model, model_args, groups, init


def _own_backbone_arch(path: Path) -> str:
    if not path.is_file():
        raise CheckpointError("own backbone checkpoint not found", file=path, record="finetune.own_backbone", fix="run `visionflow pretrain` first")
    ckpt = load_checkpoint(path)
    arch = ckpt.get("backbone_arch") or (ckpt.get("model_args") or {}).get("backbone")
    if not isinstance(arch, str):
        raise CheckpointError("checkpoint does not name its backbone (backbone_arch)", file=path, fix="re-run `visionflow pretrain`")
    return arch


def run_finetune(cfg: FinetuneConfig, augment: AugmentConfig, tracking: TrackingConfig, *, resume: bool = False, context: RunContext | None = None
) -> dict[str, Any]:
    """Train and compare the strategies of ``cfg.strategies`` on ``cfg.dataset``.

    Returns:
        The metrics written to ``metrics/finetune.json``: per strategy accuracy, macro F1,
        per-class accuracy, confusion matrix, train time; and the best strategy.

    Raises:
        DataError: the dataset is missing or unusable.
        CheckpointError: weights unavailable (offline ImageNet file, own backbone), bad ``last.pt``.
        TrainingError: a strategy diverged (NaN/inf loss); ``best.json`` is then not written.
        TrackingError: MLflow is unreachable.
    """
    with torch_threads(cfg.train.threads):
        return _run_finetune(cfg, augment, tracking, resume=resume, context=context)


def _run_finetune(
    cfg: FinetuneConfig, augment: AugmentConfig, tracking: TrackingConfig, *, resume: bool, context: RunContext | None
) -> dict[str, Any]:
    out = prepare_out_dir(Path(cfg.out), resume=resume)
    (out / "best.json").unlink(missing_ok=True)  # written again only when every strategy finished
    dataset = dataset_record(cfg.dataset)
    size_of = {s: (cfg.own_image_size or cfg.image_size) if s == "own_fine_tuning" else cfg.image_size for s in cfg.strategies}
    data = load_classification_data(
        cfg.dataset, augment, image_size=max(size_of.values()), label_fraction=cfg.label_fraction, seed=cfg.train.seed
    )
    rows: dict[str, dict[str, Any]] = {}
    params = {"finetune": cfg.model_dump(mode="json"), "augment": augment.model_dump(mode="json")}
    with training_run(
        tracking, context=context, stage="finetune", out_dir=out, run_name="finetune", tags={"visionflow.stage": "finetune"}, resume=resume, prepare=False,
        params=params, section=cfg, dataset=cfg.dataset,
    ) as parent:
        for strategy in cfg.strategies:
            row = _train_strategy(
                strategy, cfg, data, dataset, size_of[strategy], tracking, parent, resume=resume, resume_run=resume and parent.resumed,
                context=context,
            )
            if row is not None:
                rows[strategy] = row
        if (worker := worker_result()) is not None:
            return worker
        metrics = _finetune_metrics(cfg, data, dataset, rows, size_of, parent.run_id)
        _write_outputs(cfg, data, rows, metrics, out, parent.logger)
    return metrics


def _train_strategy(
    strategy: str, cfg: FinetuneConfig, data: Any, dataset: dict[str, str], image_size: int, tracking: TrackingConfig, parent: Any, *,
    resume: bool, resume_run: bool, context: RunContext | None = None,
) -> dict[str, Any] | None:
    """Train one strategy in its nested run; its row of ``metrics/finetune.json`` (None on torchrun workers).

    ``resume`` continues ``last.pt``; ``resume_run`` re-opens the strategy's MLflow run (only when the parent run was re-opened).
    """
    strategy_dir = Path(cfg.out) / strategy
    tags = {"visionflow.stage": "finetune", "visionflow.strategy": strategy}
    with training_run(
        tracking, context=context, stage=f"finetune@{strategy}", out_dir=strategy_dir, run_name=f"finetune.{strategy}", tags=tags, resume=resume_run,
        prepare=False, nested=True, state={"mlflow_parent_run_id": parent.run_id},
    ) as run:
        logger = run.logger
        seed_everything(cfg.train.seed)
        model, model_args, groups, init = strategy_model(strategy, cfg, len(data.classes))
        init["image_size"] = image_size
        if not run.resumed:
            logger.log_params({"strategy": strategy, **{f"init.{k}": v for k, v in init.items()}, **parameter_counts(model)})
            logger.log_dataset(name=Path(cfg.dataset).name, source=cfg.dataset)
        meta = {
            "task": "classification",
            "model_name": "classifier",
            "model_args": model_args,
            "categories": data.classes,
            "image_size": image_size,
            "eval_crop": cfg.eval_crop,  # the served input contract (pretrain.classification_eval_transform, as ImagePredictor applies it)
            "backbone_arch": init["backbone"],
            "stage": "finetune",
            "strategy": strategy,
            "init": init,
            "dataset": dataset,
            "label_fraction": cfg.label_fraction,
        }
        result = fit_classifier(
            model, data.at_size(image_size, cfg.eval_crop), cfg.train, out_dir=strategy_dir, meta=meta, param_groups=groups, resume=resume,
            log_metrics=logger.log_metrics, desc=f"finetune.{strategy}", state_file=run.state_file,
        )
        if worker_result() is not None:
            return None
        row = _strategy_row(strategy, strategy_dir, data, result, model, init, image_size, logger)
        logger.log_metrics({"best_accuracy": row["accuracy"], "best_macro_f1": row["macro_f1"], "train_time_s": row["train_time_s"]})
        parent.logger.log_metrics({f"{strategy}.accuracy": row["accuracy"], f"{strategy}.macro_f1": row["macro_f1"]})
    return row


def _strategy_row(
    strategy: str, strategy_dir: Path, data: Any, result: FitResult, model: Any, init: dict[str, Any], image_size: int, logger: Any
) -> dict[str, Any]:
    """Draw the strategy's curves and confusion matrix; its row of ``metrics/finetune.json``."""
    best = result.best_metrics
    curves = plot_training_curves(result.history, strategy_dir / "training_curves.png", title=f"finetune: {STRATEGY_TITLES[strategy]}")
    matrix = plot_confusion_matrix(
        best["confusion_matrix"], data.classes, strategy_dir / "confusion_matrix.png",
        title=f"{STRATEGY_TITLES[strategy]}: accuracy {best['accuracy']:.3f}",
    )
    for path in (curves, matrix):
        logger.log_artifact(path, "plots")
    return {
        "accuracy": best.get("accuracy"),
        "macro_f1": best.get("macro_f1"),
        "loss": best.get("loss"),
        "per_class_accuracy": best.get("per_class_accuracy"),
        "confusion_matrix": best.get("confusion_matrix"),
        "train_time_s": round(result.train_time_s, 2),
        "train_cpu_s": round(result.cpu_time_s, 2),
        "epoch_time_s": [round(t, 2) for t in result.epoch_time_s],
        "image_size": image_size,
        "images_per_s": round(result.images_per_s, 1),
        "epochs": result.epochs_completed,
        "best_epoch": result.best_epoch,
        **parameter_counts(model),
        "init": init,
        "checkpoint": str(result.best_path),
        "run_id": logger.run_id,
    }


def _finetune_metrics(
    cfg: FinetuneConfig, data: Any, dataset: dict[str, str], rows: dict[str, dict[str, Any]], size_of: dict[str, int], run_id: str
) -> dict[str, Any]:
    """``metrics/finetune.json``: every strategy's row and the best one (by accuracy, then macro F1)."""
    best_strategy = max(rows, key=lambda s: (rows[s]["accuracy"] or 0.0, rows[s]["macro_f1"] or 0.0))
    return {
        "dataset": str(cfg.dataset),
        "dataset_md5": dataset["md5"],
        "val_split": data.val_split,
        "label_fraction": cfg.label_fraction,
        "num_train": len(data.train),
        "num_val": len(data.val),
        "image_size": cfg.image_size,
        "own_image_size": size_of.get("own_fine_tuning"),
        "eval_crop": cfg.eval_crop,
        "classes": data.classes,
        "strategies": rows,
        "best": {"strategy": best_strategy, "accuracy": rows[best_strategy]["accuracy"], "checkpoint": rows[best_strategy]["checkpoint"]},
        "total_train_time_s": round(sum(r["train_time_s"] for r in rows.values()), 2),
        "total_train_cpu_s": round(sum(r["train_cpu_s"] for r in rows.values()), 2),
        "run_id": run_id,
    }


def _write_outputs(cfg: FinetuneConfig, data: Any, rows: dict[str, dict[str, Any]], metrics: dict[str, Any], out: Path, parent: Any) -> None:
    """The comparison bars, the best strategy's confusion matrix, ``best.json`` and ``metrics/finetune.json``."""
    best_strategy = metrics["best"]["strategy"]
    bars = plot_strategy_comparison(
        rows, out / "strategies.png", labels=STRATEGY_TITLES, title=f"{Path(cfg.dataset).name}: {len(data.train)} labelled train images, {data.val_split} split"
    )
    matrix = plot_confusion_matrix(
        rows[best_strategy]["confusion_matrix"], data.classes, out / "confusion_matrix.png",
        title=f"best: {STRATEGY_TITLES[best_strategy]} (accuracy {rows[best_strategy]['accuracy']:.3f})",
    )
    write_json({"strategy": best_strategy, "checkpoint": rows[best_strategy]["checkpoint"], "metric": "accuracy", "value": rows[best_strategy]["accuracy"]}, out / "best.json")
    write_json(metrics, METRICS_DIR / "finetune.json")
    for path in (bars, matrix):
        parent.log_artifact(path, "plots")
    parent.log_artifact(METRICS_DIR / "finetune.json")
    parent.set_tags({"visionflow.best_strategy": best_strategy})
