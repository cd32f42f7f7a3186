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
from typing import Any

from components.config import AugmentConfig, FinetuneConfig, TrackingConfig
from components.distributed import is_main_process, rank
from components.engine import (
    dataset_record,
    load_checkpoint,
    prepare_out_dir,
    resumed_run_id,
    seed_everything,
    stage_state_path,
    torch_threads,
    update_stage_state,
)
from components.errors import CheckpointError
from components.models.classifier import Classifier
from components.plots import plot_confusion_matrix, plot_strategy_comparison, plot_training_curves, write_json
from components.stages.pretrain import (
    METRICS_DIR,
    count_parameters,
    fit_classifier,
    load_classification_data,
    run_exists,
)

STRATEGY_TITLES = {
    "scratch": "scratch (random init)",
    "feature_extraction": "ImageNet features, frozen",
    "fine_tuning": "ImageNet, fine-tuned",
    "own_fine_tuning": "own backbone, fine-tuned",
}


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


def run_finetune(cfg: FinetuneConfig, augment: AugmentConfig, tracking: TrackingConfig, *, resume: bool = False) -> dict[str, Any]:
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
        return _run_finetune(cfg, augment, tracking, resume=resume)


def _run_finetune(cfg: FinetuneConfig, augment: AugmentConfig, tracking: TrackingConfig, *, resume: bool) -> dict[str, Any]:
    from components.tracking import start_run

    out = prepare_out_dir(Path(cfg.out), resume=resume)
    (out / "best.json").unlink(missing_ok=True)  # written again only when every strategy finished
    state_file = stage_state_path("finetune")
    exists = run_exists(tracking) if resume else None
    parent_id = resumed_run_id(state_file, out=out, resume=resume, exists=exists)
    dataset = dataset_record(cfg.dataset)
    size_of = {s: (cfg.own_image_size or cfg.image_size) if s == "own_fine_tuning" else cfg.image_size for s in cfg.strategies}
    data = load_classification_data(
        cfg.dataset, augment, image_size=max(size_of.values()), label_fraction=cfg.label_fraction, seed=cfg.train.seed
    )
    rows: dict[str, dict[str, Any]] = {}
    with start_run(tracking, run_name="finetune", tags={"visionflow.stage": "finetune"}, run_id=parent_id) as parent:
        update_stage_state(state_file, replace=parent_id is None, stage="finetune", out=str(out), mlflow_run_id=parent.run_id, status="running")
        if parent_id is None:
            parent.log_params({"finetune": cfg.model_dump(mode="json"), "augment": augment.model_dump(mode="json")})
            parent.log_lineage(section=cfg, dataset=cfg.dataset)
        for strategy in cfg.strategies:
            strategy_dir = out / strategy
            child_state = stage_state_path(f"finetune@{strategy}")
            child_id = resumed_run_id(child_state, out=strategy_dir, resume=resume and parent_id is not None, exists=exists)
            with start_run(tracking, run_name=f"finetune.{strategy}", tags={"visionflow.stage": "finetune", "visionflow.strategy": strategy}, run_id=child_id, nested=True) as logger:
                update_stage_state(
                    child_state, replace=child_id is None, stage=f"finetune@{strategy}", out=str(strategy_dir),
                    mlflow_run_id=logger.run_id, mlflow_parent_run_id=parent.run_id, status="running",
                )
                seed_everything(cfg.train.seed)
                model, model_args, groups, init = strategy_model(strategy, cfg, len(data.classes))
                init["image_size"] = size_of[strategy]
                if child_id is None:
                    logger.log_params({"strategy": strategy, **{f"init.{k}": v for k, v in init.items()}, **count_parameters(model)})
                meta = {
                    "task": "classification",
                    "model_name": "classifier",
                    "model_args": model_args,
                    "categories": data.classes,
                    "image_size": size_of[strategy],
                    "backbone_arch": init["backbone"],
                    "stage": "finetune",
                    "strategy": strategy,
                    "init": init,
                    "dataset": dataset,
                    "label_fraction": cfg.label_fraction,
                }
                result = fit_classifier(
                    model, data.at_size(size_of[strategy]), cfg.train, out_dir=strategy_dir, meta=meta, param_groups=groups, resume=resume,
                    log_metrics=logger.log_metrics, desc=f"finetune.{strategy}", state_file=child_state,
                )
                if not is_main_process():  # torchrun: ranks 1.. trained their shard; rank 0 alone writes files
                    continue
                best = result.best_metrics
                curves = plot_training_curves(result.history, strategy_dir / "training_curves.png", title=f"finetune: {STRATEGY_TITLES[strategy]}")
                matrix = plot_confusion_matrix(
                    best["confusion_matrix"], data.classes, strategy_dir / "confusion_matrix.png",
                    title=f"{STRATEGY_TITLES[strategy]}: accuracy {best['accuracy']:.3f}",
                )
                for path in (curves, matrix):
                    logger.log_artifact(path, "plots")
                rows[strategy] = {
                    "accuracy": best.get("accuracy"),
                    "macro_f1": best.get("macro_f1"),
                    "loss": best.get("loss"),
                    "per_class_accuracy": best.get("per_class_accuracy"),
                    "confusion_matrix": best.get("confusion_matrix"),
                    "train_time_s": round(result.train_time_s, 2),
                    "train_cpu_s": round(result.cpu_time_s, 2),
                    "epoch_time_s": [round(t, 2) for t in result.epoch_time_s],
                    "image_size": size_of[strategy],
                    "images_per_s": round(result.images_per_s, 1),
                    "epochs": result.epochs_completed,
                    "best_epoch": result.best_epoch,
                    **count_parameters(model),
                    "init": init,
                    "checkpoint": str(result.best_path),
                    "run_id": logger.run_id,
                }
                logger.log_metrics({"best_accuracy": rows[strategy]["accuracy"], "best_macro_f1": rows[strategy]["macro_f1"], "train_time_s": rows[strategy]["train_time_s"]})
                parent.log_metrics({f"{strategy}.accuracy": rows[strategy]["accuracy"], f"{strategy}.macro_f1": rows[strategy]["macro_f1"]})
                update_stage_state(child_state, status="finished")

        if not is_main_process():
            return {"rank": rank(), "role": "worker"}
        best_strategy = max(rows, key=lambda s: (rows[s]["accuracy"] or 0.0, rows[s]["macro_f1"] or 0.0))
        metrics = {
            "dataset": str(cfg.dataset),
            "dataset_md5": dataset["md5"],
            "val_split": data.val_split,
            "label_fraction": cfg.label_fraction,
            "num_train": len(data.train),
            "num_val": len(data.val),
            "image_size": cfg.image_size,
            "own_image_size": size_of.get("own_fine_tuning"),
            "classes": data.classes,
            "strategies": rows,
            "best": {"strategy": best_strategy, "accuracy": rows[best_strategy]["accuracy"], "checkpoint": rows[best_strategy]["checkpoint"]},
            "total_train_time_s": round(sum(r["train_time_s"] for r in rows.values()), 2),
            "total_train_cpu_s": round(sum(r["train_cpu_s"] for r in rows.values()), 2),
            "run_id": parent.run_id,
        }
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
        update_stage_state(state_file, status="finished")
    return metrics
