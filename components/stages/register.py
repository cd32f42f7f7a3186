"""The ``register`` stage: every trained model becomes a registered MLflow pyfunc model, gated to ``champion``.

For each stage output (pretrain's backbone, finetune's best classifier, each detector, each
segmenter), found where the params of this run put it (``<section>.out``, metrics in
``metrics/``), the stage

1. skips a model whose stage wrote ``status: skipped`` (the data cannot feed it), with its reason;
2. refuses outputs of failed or diverged runs: no checkpoint, a ``diverged.json`` marker (written
   by the engine on NaN/inf loss), metrics missing, older than the checkpoint, marked failed,
   non-finite, written for another dataset, or whose MLflow run ended ``FAILED``/``KILLED``;
3. refuses a checkpoint that is not a model of the dataset the params point to: its
   ``categories`` differ from the dataset's, or its recorded data hash (``dataset.md5``, else its
   training run's ``visionflow.data_hash``) or params hash differs from the current one, so no
   version carries lineage that is not its own;
4. creates nothing when the checkpoint's sha256 equals the latest version's
   (``visionflow.checkpoint_sha256``): "unchanged: version N";
5. measures the champion on the candidate's test data with the stage's own evaluator (rebuilt
   from the champion version's checkpoint artifact), writes a *portable* checkpoint (weights,
   build arguments without file paths, categories and preprocessing) and logs it as a pyfunc
   model, in a run tagged with the model's lineage (git commit of its training run, DVC hash of
   the data, params hash, Prefect flow run), with its ONNX export in the same run (``onnx/``,
   ``register.onnx``; :mod:`components.export.onnx_export`);
6. registers a new version of ``<prefix>-backbone``, ``<prefix>-classifier``,
   ``<prefix>-detector-<arch>`` or ``<prefix>-segmenter-<arch>`` with a model card and the
   ``candidate`` alias, and moves ``champion`` only when the candidate beats the champion's number
   on the same test data by the margin (``register.<kind>``); when the champion cannot be measured
   there, ``register.on_incomparable`` decides. The decision is stored as ``gate.*`` version tags
   and in ``metrics/register.json``.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.config import METRICS_DIR, Gate, Params
from components.errors import CheckpointError
from components.io import write_json

REGISTER_REPORT = Path(METRICS_DIR) / "register.json"
FAILED_STATUSES = ("failed", "diverged", "interrupted", "killed", "error")
# build arguments that point at weight files: irrelevant once the state_dict is loaded, and absent
# on a consumer's machine, so the portable checkpoint drops them (the builder's default, None, applies)
WEIGHT_ARGS = ("weights", "backbone_weights", "weights_backbone", "init_from")


@dataclass
class Candidate:
    """One trained model the stage may register.

    Attributes:
        kind: ``backbone``, ``classifier``, ``detector`` or ``segmenter`` (selects the gate).
        registered_name: e.g. ``visionflow-detector-yolo``.
        stage: the params section it was trained from, e.g. ``detect.yolo``.
        checkpoint: the stage's checkpoint file, where that section's ``out`` puts it.
        metrics_file: the stage's ``metrics/*.json``.
        dataset: the canonical dataset folder the params say it was trained and tested on
            (None: pretrain from ImageNet weights, no dataset of ours).
        section: the params section (hashed into the lineage, shown on the model card).
        metrics: the metrics of this model (the subtree of ``metrics_file`` that concerns it).
        problem: why the metrics do not belong to these params (another dataset, a checkpoint
            outside the section's ``out``), found while locating it; refused when set.
        skipped: the stage's reason when it wrote ``status: skipped`` (the data cannot feed it).
    """

    kind: str
    registered_name: str
    stage: str
    checkpoint: Path
    metrics_file: Path
    dataset: Path | None
    section: Any
    metrics: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    skipped: str | None = None


# --------------------------------------------------------------------------- finding candidates


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_metric(tree: Mapping[str, Any], name: str, *, prefer: tuple[str, ...] = ("test",)) -> float | None:
    """The value of metric ``name`` in a nested metrics dict, preferring the ``test`` split's subtree.

    ``{"test": {"bbox": {"map_50": 0.8}}, "val": {...}}`` -> 0.8. Breadth-first inside the preferred
    subtree, then in the whole tree; None when absent or not a number.
    """
    for key in prefer:
        if isinstance(tree.get(key), Mapping):
            found = find_metric(tree[key], name, prefer=())
            if found is not None:
                return found
    queue: list[Mapping[str, Any]] = [tree]
    while queue:
        node = queue.pop(0)
        value = node.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        queue.extend(v for v in node.values() if isinstance(v, Mapping))
    return None


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _within(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _candidate(
    kind: str, name: str, stage: str, *, out_dir: Path, default: str, metrics_file: Path, tree: Mapping[str, Any],
    dataset: Path | None, section: Any, metrics: Mapping[str, Any] | None = None, section_name: str,
) -> Candidate:
    """A candidate whose checkpoint lies where ``section_name.out`` puts it, its metrics checked against the params.

    The metrics may name the checkpoint (``checkpoint``/``best_path``: ``best.pt``, or ``last.pt``
    when no epoch was best) but only inside ``out_dir``; metrics written for another dataset or
    naming a file elsewhere are another run's, and the candidate carries that as its ``problem``.
    """
    sub = dict(metrics if metrics is not None else tree)
    named = sub.get("checkpoint") or sub.get("best_path")
    checkpoint = out_dir / default
    problem = None
    if isinstance(named, str) and named:
        if _within(Path(named), out_dir):
            checkpoint = Path(named)
        else:
            problem = f"{metrics_file} names checkpoint {named}, outside {section_name}.out ({out_dir}): metrics of another run"
    trained_on = tree.get("dataset")
    if problem is None and dataset is not None and isinstance(trained_on, str) and not _same_path(trained_on, dataset):
        problem = f"{metrics_file} was written for dataset {trained_on}, the params point to {dataset}: re-run {stage}"
    skipped = None
    if str(tree.get("status", "")).lower() == "skipped":
        skipped = str(tree.get("reason") or f"{metrics_file} marks the stage skipped")
    return Candidate(kind, name, stage, checkpoint, metrics_file, dataset, section, sub, problem=problem, skipped=skipped)


def discover_candidates(params: Params, *, metrics_dir: Path = Path(METRICS_DIR)) -> list[Candidate]:
    """The models the pipeline's stages should have produced, where the params of this run put them.

    pretrain: ``<pretrain.out>/backbone.pt``; finetune: ``<finetune.out>/<strategy>/best.pt`` of the
    strategy with the best gate metric; detect: ``<detect.out>/<arch>/best.pt``; segment:
    ``<segment.out>/<arch>/best.pt``; their metrics: ``<METRICS_DIR>/pretrain.json``, ``finetune.json``, ``detect/<arch>.json``, ``segment/<arch>.json``.
    """
    prefix = params.register.prefix
    out: list[Candidate] = []
    pre = params.pretrain
    pre_metrics = metrics_dir / "pretrain.json"
    pre_tree = _read_json(pre_metrics) or {}
    out.append(
        _candidate("backbone", f"{prefix}-backbone", "pretrain", out_dir=Path(pre.out), default="backbone.pt", metrics_file=pre_metrics, tree=pre_tree,
                   dataset=None if pre.source == "imagenet" else Path(pre.dataset), section=pre, section_name="pretrain")
    )
    ft_metrics = metrics_dir / "finetune.json"
    out.append(_best_strategy(params, ft_metrics, _read_json(ft_metrics) or {}))
    for arch in params.detect.architectures:
        path = metrics_dir / "detect" / f"{arch}.json"
        out.append(_candidate("detector", f"{prefix}-detector-{arch}", f"detect.{arch}", out_dir=Path(params.detect.out) / arch, default="best.pt",
                              metrics_file=path, tree=_read_json(path) or {}, dataset=Path(params.detect.dataset), section=params.detect.arch(arch),
                              section_name="detect"))
    for arch in params.segment.architectures:
        path = metrics_dir / "segment" / f"{arch}.json"
        out.append(_candidate("segmenter", f"{prefix}-segmenter-{arch}", f"segment.{arch}", out_dir=Path(params.segment.out) / arch, default="best.pt",
                              metrics_file=path, tree=_read_json(path) or {}, dataset=Path(params.segment.dataset), section=params.segment.arch(arch),
                              section_name="segment"))
    return out


def _best_strategy(params: Params, metrics_file: Path, tree: Mapping[str, Any]) -> Candidate:
    """The finetune strategy with the best classifier gate metric becomes the classifier candidate."""
    ft, gate = params.finetune, params.register.classifier
    name = f"{params.register.prefix}-classifier"
    scored = []
    for strategy in ft.strategies:
        sub = tree.get(strategy) if isinstance(tree.get(strategy), Mapping) else (tree.get("strategies") or {}).get(strategy)
        if isinstance(sub, Mapping):
            value = find_metric(sub, gate.metric)
            if value is not None and math.isfinite(value):
                scored.append((value if gate.higher_is_better else -value, strategy, dict(sub)))
    common = dict(out_dir=Path(ft.out), metrics_file=metrics_file, tree=tree, dataset=Path(ft.dataset), section=ft, section_name="finetune")
    if not scored:
        return _candidate("classifier", name, "finetune", default="best.pt", metrics={k: v for k, v in tree.items() if k != "checkpoint"}, **common)  # type: ignore[arg-type]
    _, strategy, sub = max(scored)
    return _candidate("classifier", name, f"finetune.{strategy}", default=f"{strategy}/best.pt", metrics={**sub, "strategy": strategy}, **common)  # type: ignore[arg-type]


def refusal(candidate: Candidate, gate: Gate, *, tracking: Any = None) -> str | None:
    """Why ``candidate`` must not be registered (a failed, diverged or unfinished run, another run's metrics), or None.

    Args:
        candidate: the model.
        gate: its gate (the metric must be present and finite).
        tracking: a TrackingConfig to check the training run's MLflow status, when the metrics name one.
    """
    if candidate.problem:
        return candidate.problem
    ckpt = candidate.checkpoint
    if (ckpt.parent / "diverged.json").exists():
        return f"training diverged ({ckpt.parent / 'diverged.json'})"
    if not ckpt.is_file():
        return f"no checkpoint {ckpt}: the stage did not run or did not finish"
    if not candidate.metrics_file.is_file():
        return f"no metrics file {candidate.metrics_file}: the stage did not finish"
    if candidate.metrics_file.stat().st_mtime + 1.0 < ckpt.stat().st_mtime:
        return f"{candidate.metrics_file} is older than {ckpt}: the run that wrote the checkpoint did not finish"
    status = str(candidate.metrics.get("status", "")).lower()
    if status in FAILED_STATUSES:
        return f"the run is marked {status!r} in {candidate.metrics_file}"
    value = find_metric(candidate.metrics, gate.metric)
    if value is None or not math.isfinite(value):
        return f"gate metric {gate.metric!r} missing or not finite in {candidate.metrics_file}"
    run_id = _training_run(candidate.metrics)
    if tracking is not None and run_id:
        from components.tracking import run_status

        state = run_status(tracking, run_id)
        if state in ("FAILED", "KILLED"):
            return f"its MLflow run {run_id} ended {state}"
    return None


def _training_run(metrics: Mapping[str, Any], ckpt: Mapping[str, Any] | None = None) -> str | None:
    for value in (metrics.get("run_id"), metrics.get("mlflow_run_id"), *((ckpt.get("mlflow_run_id"), ckpt.get("run_id")) if ckpt else ())):
        if isinstance(value, str) and value:
            return value
    return None


# --------------------------------------------------------------------------- the model's own data


def dataset_categories(root: Path) -> list[str] | None:
    """The class list of a canonical dataset: ``dataset.json``'s ``categories``, else the COCO annotations'.

    None when the folder has neither (not a canonical dataset: nothing to check against).
    """
    from components.data.datasets import load_manifest
    from components.errors import DataError

    try:
        return [str(c) for c in load_manifest(root)["categories"]]
    except DataError:
        pass
    for path in sorted((root / "annotations").glob("instances_*.json")):
        data = _read_json(path)
        if data and isinstance(data.get("categories"), list):
            cats = sorted(data["categories"], key=lambda c: c.get("id", 0) if isinstance(c, Mapping) else 0)
            return [str(c["name"]) for c in cats if isinstance(c, Mapping) and "name" in c]
    return None


@dataclass
class DataCheck:
    """The checkpoint checked against the dataset the params point to.

    Attributes:
        refusal: why the checkpoint is not a model of this data (categories, data hash, path), or None.
        data_hash: the dataset's current DVC hash (None without a dataset).
        verified: the checkpoint (or its training run) recorded its data and it matches.
        categories: the checkpoint's class list.
        notes: what could not be checked (an older checkpoint, a folder without manifest).
    """

    refusal: str | None
    data_hash: str | None = None
    verified: bool = False
    categories: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_data(candidate: Candidate, ckpt: Mapping[str, Any], *, run_data_hash: str | None = None) -> DataCheck:
    """Is ``ckpt`` a model of the dataset ``candidate.dataset``? Categories, then the recorded data hash.

    A checkpoint records ``dataset: {"path", "md5"}`` (the DVC md5 of the folder it trained on);
    older checkpoints record the path only, or nothing: then the training run's
    ``visionflow.data_hash`` tag (``run_data_hash``) is used, or nothing is checked (noted).
    """
    from components.data.versioning import dvc_directory_md5

    cats = [str(c) for c in (ckpt.get("categories") or [])]
    root = candidate.dataset
    if root is None:
        return DataCheck(None, categories=cats, notes=["no dataset: ImageNet weights"])
    if not root.is_dir():
        return DataCheck(f"the dataset {root} the params point to is missing: cannot verify {candidate.checkpoint} is a model of it", categories=cats)
    notes: list[str] = []
    recorded = ckpt.get("dataset")
    rec_path = recorded.get("path") if isinstance(recorded, Mapping) else recorded if isinstance(recorded, str) else None
    rec_md5 = recorded.get("md5") if isinstance(recorded, Mapping) else None
    expected = dataset_categories(root)
    if expected is None:
        notes.append(f"categories not verified: {root} has no dataset.json")
    elif cats != expected:
        return DataCheck(
            f"{candidate.checkpoint} predicts categories {cats} (trained on {rec_path or 'another dataset'}), "
            f"the dataset {root} the params point to has {expected}: re-run {candidate.stage.split('.')[0]} on it",
            categories=cats,
        )
    current = dvc_directory_md5(root)
    if isinstance(rec_md5, str) and rec_md5:
        if rec_md5 != current:
            return DataCheck(
                f"{candidate.checkpoint} was trained on {rec_path or 'a dataset'} (DVC md5 {rec_md5}); the dataset {root} the params point to "
                f"is now md5 {current}: re-run {candidate.stage.split('.')[0]} on it",
                data_hash=current, categories=cats,
            )
        return DataCheck(None, data_hash=current, verified=True, categories=cats, notes=notes)
    if isinstance(rec_path, str) and rec_path and not _same_path(rec_path, root):
        return DataCheck(f"{candidate.checkpoint} was trained on {rec_path}, the params point to {root}", data_hash=current, categories=cats)
    if run_data_hash:
        if run_data_hash != current:
            return DataCheck(
                f"the training run of {candidate.checkpoint} read data md5 {run_data_hash}; the dataset {root} is now md5 {current}",
                data_hash=current, categories=cats,
            )
        return DataCheck(None, data_hash=current, verified=True, categories=cats, notes=notes)
    notes.append("data hash not verified: the checkpoint records no dataset md5")
    return DataCheck(None, data_hash=current, categories=cats, notes=notes)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (the identity of a checkpoint: same bytes, same model)."""
    from components.io import sha256_file

    return sha256_file(Path(path))


# --------------------------------------------------------------------------- portable checkpoint and examples


def write_portable_checkpoint(src: Path, dst: Path, *, as_backbone: bool = False) -> dict[str, Any]:
    """Copy what inference needs (weights, build args without weight paths, categories, preprocessing).

    Args:
        src: the stage's checkpoint.
        dst: where the portable checkpoint goes.
        as_backbone: keep only the backbone of a classifier checkpoint (pretrain's ``backbone.pt``):
            the registered backbone is a feature extractor (``task: backbone``).

    Raises:
        CheckpointError: ``src`` is unreadable or cannot rebuild its model.
    """
    import torch

    from components.engine import load_checkpoint, load_model, save_checkpoint
    from components.models.backbones import load_backbone_state

    ckpt = load_checkpoint(src)
    args = {k: (None if k in WEIGHT_ARGS else v) for k, v in dict(ckpt.get("model_args") or {}).items()}
    keep = ("task", "model_name", "categories", "image_size", "eval_crop", "mean", "std", "score_threshold", "mask_threshold", "num_classes")
    portable = {k: ckpt[k] for k in keep if k in ckpt}
    portable.update(model_args=args, state_dict=ckpt["state_dict"], source_checkpoint=str(src))
    if as_backbone and ckpt.get("task") != "backbone":
        arch = args.get("backbone") or ckpt.get("backbone_arch")
        if not isinstance(arch, str):
            raise CheckpointError("cannot tell the backbone architecture", file=src, fix="the checkpoint's model_args need a 'backbone' name")
        portable.update(task="backbone", model_name=arch, model_args={}, state_dict=load_backbone_state(src, arch=arch), categories=[])
    if "task" not in portable or "model_name" not in portable:
        raise CheckpointError("checkpoint lacks task/model_name", file=src, fix="re-run the stage with this version of visionflow")
    save_checkpoint(dst, portable)
    try:
        with torch.no_grad():
            load_model(dst)  # the portable file must rebuild on its own, exactly as a consumer will
    except CheckpointError as err:  # name the stage's checkpoint, not the temporary portable copy
        raise CheckpointError(err.message, file=src, record=err.record, fix=err.fix) from None
    return portable


def example_images(dataset: Path | None, *, count: int = 2) -> list[bytes]:
    """Encoded images for a model's input example: the dataset's first test (else val/train) images."""
    exts = (".png", ".jpg", ".jpeg")
    for split in ("test", "val", "train") if dataset is not None else ():
        for base in (dataset / "images" / split, dataset / "classification" / split):
            if base.is_dir():
                files = sorted(p for p in base.rglob("*") if p.suffix.lower() in exts)[:count]
                if files:
                    return [p.read_bytes() for p in files]
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()  # no dataset on this machine: a neutral grey image still documents the format
    Image.fromarray(np.full((64, 64, 3), 127, np.uint8)).save(buf, format="PNG")
    return [buf.getvalue()]


# --------------------------------------------------------------------------- model card


def model_card(candidate: Candidate, *, ckpt: Mapping[str, Any], lineage: Mapping[str, str], gate: Gate, run_ids: Mapping[str, str]) -> str:
    """The version description: data, params, metrics, lineage and how to use it (markdown)."""
    cats = ", ".join(map(str, ckpt.get("categories") or [])) or "n/a"
    flat = _flat_numbers(candidate.metrics)
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in list(flat.items())[:40])
    section = candidate.section.model_dump(mode="json") if hasattr(candidate.section, "model_dump") else {}
    lines = [
        f"# {candidate.registered_name}",
        "",
        f"**Task**: {ckpt.get('task')} · **model**: `{ckpt.get('model_name')}` · **stage**: `{candidate.stage}` · **categories**: {cats}",
        "",
        "## Data",
        f"- dataset `{candidate.dataset}` · DVC hash `{lineage.get('visionflow.data_hash', 'n/a')}`",
        "",
        "## Params",
        f"- section `{candidate.stage}` · params hash `{lineage.get('visionflow.params_hash', 'n/a')}`",
        "```yaml",
        yaml.safe_dump(section, sort_keys=False).strip(),
        "```",
        "",
        f"## Metrics ({candidate.metrics_file})",
        f"Gate: `{gate.metric}` ({'higher' if gate.higher_is_better else 'lower'} is better, margin {gate.margin}).",
        "",
        "| metric | value |",
        "| --- | --- |",
        rows or "| (none) | |",
        "",
        "## Lineage",
        f"- git commit `{lineage.get('visionflow.git_commit')}` (dirty: {lineage.get('visionflow.git_dirty')})",
        *(f"- {k}: `{v}`" for k, v in run_ids.items()),
        "",
        "## Use",
        "```python",
        "import mlflow, pandas as pd",
        f'model = mlflow.pyfunc.load_model("models:/{candidate.registered_name}@champion")',
        'model.predict(pd.DataFrame({"image": [open("image.png", "rb").read()]}))',
        "```",
        "Input column `image`: PNG/JPEG bytes, their base64 text, or an HxWx3 array. Over HTTP "
        '(`mlflow models serve`): `{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}`.',
    ]
    return "\n".join(lines)


def _flat_numbers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[f"{prefix}{k}"] = float(v)
    return out


KIND_DESCRIPTIONS = {
    "backbone": "Backbone pretrained by visionflow; pyfunc input column `image`, output `embedding` (pooled last feature map).",
    "classifier": "Image classifier (visionflow finetune); pyfunc output per image: `label`, `score`, `probabilities`.",
    "detector": "Object detector (visionflow detect); pyfunc output per image: `boxes` (xyxy pixels), `labels` (names), `scores`.",
    "segmenter": "Segmenter (visionflow segment); pyfunc output per image: `mask` (class index per pixel) or instance `boxes`/`labels`/`scores`/`masks` (RLE).",
}


# --------------------------------------------------------------------------- the champion on the candidate's test data


def evaluate_on_test_data(model: Any, ckpt: Mapping[str, Any], candidate: Candidate, params: Params, *, metric: str) -> dict[str, Any]:
    """Run ``model`` through the evaluator its family's stage uses, on ``candidate``'s test data.

    Detectors: ``detect.evaluate_detector`` on the test split; segmenters: ``segment.evaluate_semantic``
    (and ``evaluate_instances`` for Mask R-CNN when the gate metric is a COCO one) on the test
    split; classifiers: ``evaluate_classification`` on the split finetune validates on (``val``,
    else ``test``). Images are resized to the model's own ``image_size`` (its input contract; a
    classifier's recorded ``eval_crop``: shorter side, then the centre square).

    Raises:
        DataError: the dataset lacks the split or view. ValueError: not a family with an evaluator here.
    """
    import torch

    from components.engine import build_loader, resolve_device

    root = candidate.dataset
    if root is None:
        raise ValueError("no dataset to evaluate on")
    cats = [str(c) for c in (ckpt.get("categories") or [])]
    size = int(ckpt.get("image_size") or (ckpt.get("model_args") or {}).get("image_size") or 0)
    if size <= 0:
        raise ValueError("the checkpoint records no image_size")
    train = candidate.section.train
    device = resolve_device(train.device)
    model.to(device).eval()
    augment = params.augment
    with torch.no_grad():
        if candidate.kind == "detector":
            from components.data.datasets import detection_collate
            from components.stages.detect import detection_datasets, evaluate_detector

            test = detection_datasets(root, augment, size)["test"]
            loader = build_loader(test, train, train=False, collate_fn=detection_collate, batch_size=max(train.batch_size, 8))
            return {"test": evaluate_detector(model, loader, device, categories=cats)}
        if candidate.kind == "segmenter":
            from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

            from components.stages.segment import (
                evaluate_instances,
                evaluate_semantic,
                instance_dataset,
                semantic_collate,
                semantic_datasets,
            )

            instance = None
            if ckpt.get("segmentation") == "instance" or isinstance(model, GeneralizedRCNN):
                instance = {"score_threshold": float(ckpt.get("score_threshold", 0.5)), "mask_threshold": float(ckpt.get("mask_threshold", 0.5))}
            test = semantic_datasets(root, augment, size)["test"]
            loader = build_loader(test, train, train=False, collate_fn=semantic_collate, batch_size=max(train.batch_size, 8))
            result = evaluate_semantic(
                model, loader, device, num_classes=len(cats) + 1, ignore_index=params.segment.ignore_index,
                class_names=["background", *cats], instance=instance,
            )
            if instance is not None and find_metric(result, metric) is None:
                from components.data.datasets import detection_collate

                coco = build_loader(instance_dataset(root, "test", augment, size, train=False), train, train=False,
                                    collate_fn=detection_collate, batch_size=max(train.batch_size, 8))
                result.update(evaluate_instances(model, coco, device, categories=cats, mask_threshold=instance["mask_threshold"]))
            return {"test": result}
        if candidate.kind == "classifier":
            from components.data.datasets import ClassificationDataset, load_manifest
            from components.metrics.classification import evaluate_classification
            from components.stages.pretrain import DecodedImages, classification_eval_transform

            splits = load_manifest(root)["splits"]
            split = next((s for s in ("val", "test") if s in splits), "test")  # the split finetune validates on
            decoded = DecodedImages(ClassificationDataset(root, split), image_size=size)
            data = decoded.with_transform(classification_eval_transform(size, ckpt.get("eval_crop")))  # as finetune validated it
            loader = build_loader(data, train, train=False, batch_size=max(train.batch_size, 64))
            return {"test": evaluate_classification(model, loader, device, class_names=cats)}
    raise ValueError(f"no evaluator for a {candidate.kind}")


def measure_champion(candidate: Candidate, params: Params, *, gate: Gate, task: str, categories: list[str], data_hash: str | None, workdir: Path) -> Any:
    """The current champion measured on ``candidate``'s test data, or why it cannot be (a ChampionMeasure).

    1. no champion: ``method="none"``;
    2. rebuild the champion from its version's checkpoint artifact and evaluate it with the stage's
       evaluator on the candidate's test split (``evaluated``), unless its task or class list
       differs from the candidate's (``incomparable``: those numbers would not be comparable);
    3. when it cannot be evaluated (a backbone has no head; the data has no such split), its own
       recorded value is used only if it was measured on data with the same DVC hash (``recorded``);
    4. otherwise ``incomparable``, with the reason in one line.
    """
    from components import tracking
    from components.engine import load_model
    from components.errors import VisionflowError

    champion = tracking.alias_version_info(candidate.registered_name, params.register.champion_alias)
    if champion is None:
        return tracking.ChampionMeasure(version=None, method="none", note="no champion yet")
    v = champion.version
    tag_cats = champion.tags.get("visionflow.categories")
    champ_cats: list[str] | None = json.loads(tag_cats) if tag_cats else None
    why = None
    try:
        path = tracking.download_version_checkpoint(candidate.registered_name, v, workdir / f"champion-v{v}")
        model, ckpt = load_model(path)
        champ_cats = [str(c) for c in (ckpt.get("categories") or [])]
    except VisionflowError as err:
        model, ckpt, why = None, {}, f"cannot load champion v{v}: {err.message}"
    measured = lambda value, method, note: tracking.ChampionMeasure(  # noqa: E731
        version=v, value=value, method=method, note=note, categories=None if champ_cats is None else tuple(champ_cats)
    )
    if model is not None and str(ckpt.get("task")) != task:
        return measured(None, "incomparable", f"champion v{v} is a {ckpt.get('task')} model, the candidate a {task} model")
    if champ_cats is not None and candidate.kind != "backbone" and champ_cats != categories:
        return measured(None, "incomparable", f"champion v{v} predicts {champ_cats}, the test data has {categories}")
    if model is not None and candidate.kind != "backbone" and candidate.dataset is not None:
        try:
            result = evaluate_on_test_data(model, ckpt, candidate, params, metric=gate.metric)
        except (VisionflowError, RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
            why = f"champion v{v} could not be evaluated on {candidate.dataset}: {str(err).splitlines()[0][:200] if str(err) else type(err).__name__}"
        else:
            value = find_metric(result, gate.metric)
            if value is not None:
                return measured(value, "evaluated", f"champion v{v} evaluated on the test data of {candidate.dataset} (md5 {data_hash})")
            why = f"the evaluator gave no {gate.metric} for champion v{v}"
    elif model is not None:
        why = "a backbone has no head to evaluate" if candidate.kind == "backbone" else "no dataset to evaluate on"
    champ_hash = champion.tags.get("gate.test_data_hash") or champion.tags.get("visionflow.data_hash")
    recorded = champion.tags.get(f"metric.{gate.metric}")
    if data_hash and champ_hash == data_hash and recorded not in (None, "", "None"):
        return measured(recorded, "recorded", f"champion v{v}'s own {gate.metric}, measured on the same data (md5 {data_hash}); {why}")
    return measured(None, "incomparable", why or f"champion v{v} has no {gate.metric} on this data")


# --------------------------------------------------------------------------- the stage


@dataclass
class Admission:
    """What the checks of one candidate found: its checkpoint, training run, data and identity."""

    ckpt: dict[str, Any]  # the portable checkpoint's record (task, model name, categories, ...)
    training_run: str | None
    run_tags: dict[str, str] | None
    data: Any  # check_data's result: categories, data hash, verified, notes
    sha: str


def admit_candidate(candidate: Candidate, params: Params, portable_path: Path) -> Admission | dict[str, Any]:
    """Write the portable checkpoint and check that it is a new model of the data the params point to.

    Returns:
        An :class:`Admission`, or the report entry of a ``refused`` (other categories, data or
        params hash) or ``unchanged`` (same sha256 as the latest version) candidate.
    """
    from components import tracking
    from components.engine import load_checkpoint

    ckpt = write_portable_checkpoint(candidate.checkpoint, portable_path, as_backbone=candidate.kind == "backbone")
    raw = load_checkpoint(candidate.checkpoint)
    training_run = _training_run(candidate.metrics, raw)
    run_tags = tracking.run_tags(params.tracking, training_run) if training_run else None
    data = check_data(candidate, raw, run_data_hash=(run_tags or {}).get(f"{tracking.TAG_PREFIX}data_hash"))
    if data.refusal:
        return {"status": "refused", "reason": data.refusal}
    params_hash = tracking.section_hash(candidate.section)
    trained_hash = (run_tags or {}).get(f"{tracking.TAG_PREFIX}params_hash")
    if trained_hash and trained_hash != params_hash:
        return {"status": "refused", "reason": f"{candidate.checkpoint} was trained with params.{candidate.stage.split('.')[0]} hash {trained_hash}, "
                f"the params are now hash {params_hash}: re-run the stage"}
    sha = file_sha256(candidate.checkpoint)
    tracking.connect(params.tracking)
    latest = tracking.latest_version(candidate.registered_name)
    if latest is not None and latest.tags.get(tracking.CHECKPOINT_SHA_TAG) == sha:
        return {"status": "unchanged", "reason": f"unchanged: version {latest.version}", "version": latest.version, "checkpoint_sha256": sha}
    return Admission(ckpt=ckpt, training_run=training_run, run_tags=run_tags, data=data, sha=sha)


def provenance_of(run: Any, candidate: Candidate, admitted: Admission) -> dict[str, str]:
    """The version's provenance tags: its training run's commit and flow run (not the register run's), data, params."""
    from components import tracking

    tags = run.log_provenance(section=candidate.section, dataset=candidate.dataset, dataset_name=None if candidate.dataset is None else candidate.dataset.name)
    tags.pop(f"{tracking.TAG_PREFIX}prefect_flow_run_id", None)
    if admitted.run_tags:
        for key in ("git_commit", "git_dirty", "prefect_flow_run_id"):
            if admitted.run_tags.get(f"{tracking.TAG_PREFIX}{key}"):
                tags[f"{tracking.TAG_PREFIX}{key}"] = admitted.run_tags[f"{tracking.TAG_PREFIX}{key}"]
        tags["mlflow.source.git.commit"] = tags[f"{tracking.TAG_PREFIX}git_commit"]
    return tags


def version_tags(candidate: Candidate, admitted: Admission, provenance: Mapping[str, str], *, register_run: str, changed: str | None) -> dict[str, str]:
    """Every tag of the new version: provenance, checkpoint identity, categories, where the lineage came from."""
    from components import tracking

    tags = {
        **provenance,
        "visionflow.stage": candidate.stage,
        "visionflow.register_run_id": register_run,
        "visionflow.checkpoint": str(candidate.checkpoint),
        tracking.CHECKPOINT_SHA_TAG: admitted.sha,
        "visionflow.categories": json.dumps(admitted.data.categories),
        "visionflow.data_hash_verified": str(admitted.data.verified).lower(),
        "visionflow.provenance_source": f"training run {admitted.training_run}" if admitted.run_tags else "register run (training run unknown)",
    }
    if admitted.training_run:
        tags["visionflow.training_run_id"] = admitted.training_run
    if changed:
        tags["visionflow.categories_changed"] = changed
    return tags


def gate_card(card: str, measure: Any, admitted: Admission, changed: str | None) -> str:
    """The model card with its gate section: how the champion was measured, a changed class list, data notes."""
    extra = [f"- champion on this test data: {measure.method} ({measure.note})" if measure.version else "- no champion before this version"]
    if changed:
        extra.insert(0, f"- **class list changed** from champion {changed}")
    extra += [f"- note: {n}" for n in admitted.data.notes]
    return card + "\n\n## Gate and data checks\n" + "\n".join(extra)


def register_candidate(candidate: Candidate, params: Params, context: Any = None) -> dict[str, Any]:
    """Check, log, register and gate one candidate whose run finished; returns its report entry.

    The entry's ``status`` is ``registered``, ``unchanged`` (the checkpoint's sha256 equals the
    latest version's: nothing is created) or ``refused`` (the checkpoint is not a model of the
    dataset the params point to: other categories, data hash, params hash).

    Raises:
        CheckpointError: the checkpoint cannot rebuild its model.
        TrackingError: the tracking store or registry is unusable.
    """
    from components import tracking

    gate: Gate = getattr(params.register, candidate.kind)
    value = find_metric(candidate.metrics, gate.metric)
    name = candidate.registered_name
    with tempfile.TemporaryDirectory(prefix="visionflow-register-") as tmp:
        portable_path = Path(tmp) / "model.pt"
        admitted = admit_candidate(candidate, params, portable_path)
        if not isinstance(admitted, Admission):
            return admitted
        ckpt, data = admitted.ckpt, admitted.data
        task = str(ckpt["task"])
        measure = measure_champion(candidate, params, gate=gate, task=task, categories=data.categories, data_hash=data.data_hash, workdir=Path(tmp))
        changed = None
        if measure.categories is not None and candidate.kind != "backbone" and list(measure.categories) != data.categories:
            changed = f"v{measure.version}: {list(measure.categories)} -> {data.categories}"
        model_name = str(ckpt.get("model_name", "")).lower()
        with tracking.start_run(params.tracking, run_name=f"register-{name}", tags={"visionflow.stage": "register"}, context=context) as run:
            provenance = provenance_of(run, candidate, admitted)
            run_ids = {"register run": run.run_id, **({"training run": admitted.training_run} if admitted.training_run else {})}
            if context is not None and context.flow_run_id:
                run_ids["prefect flow run"] = context.flow_run_id
            run.log_params({"registered_name": name, "stage": candidate.stage, "checkpoint": str(candidate.checkpoint)})
            run.log_metrics(_flat_numbers(candidate.metrics))
            model_uri = tracking.log_pyfunc_model(
                checkpoint=portable_path,
                task=task,
                instance=task == "segmentation" and "mask" in model_name and "rcnn" in model_name,
                example_images=example_images(candidate.dataset),
                metadata={"categories": list(ckpt.get("categories") or []), "stage": candidate.stage, "gate_metric": gate.metric, "gate_value": value},
            )
            onnx = log_onnx(portable_path, Path(tmp) / "onnx", run) if params.register.onnx else {"onnx": None, "onnx_note": "register.onnx is false"}
            card = gate_card(model_card(candidate, ckpt=ckpt, lineage=provenance, gate=gate, run_ids=run_ids), measure, admitted, changed)
            tags = version_tags(candidate, admitted, provenance, register_run=run.run_id, changed=changed)
            if onnx["onnx"]:
                tags[tracking.ONNX_TAG] = onnx["onnx"]
            version = tracking.register_version(
                model_uri,
                name,
                version_description=card,
                model_description=KIND_DESCRIPTIONS[candidate.kind] + f"\n\nGate: `{gate.metric}`, margin {gate.margin}; see each version's card.",
                tags=tags,
                alias=params.register.candidate_alias,
            )
            decision = tracking.apply_gate(
                name, version, gate=gate, value=value, champion_alias=params.register.champion_alias, measured=measure,
                on_incomparable=params.register.on_incomparable, test_data_hash=data.data_hash,
            )
            run.set_tags({"visionflow.registered_version": version, "visionflow.promoted": str(decision.promoted).lower()})
    return {
        "status": "registered", "registered_name": name, "version": version, "model_uri": model_uri, "run_id": run.run_id,
        "checkpoint_sha256": admitted.sha, "promoted": decision.promoted, "decision": decision.decision, "reason": decision.reason,
        "metric": gate.metric, "value": value, "candidate_value": decision.candidate_value, "champion_version_before": measure.version,
        "champion_value_before": decision.champion_value, "champion_value": decision.champion_value, "comparison": decision.comparison,
        "champion_measure": measure.note, "test_data_hash": data.data_hash, "margin": gate.margin, "categories_changed": changed,
        "data_hash_verified": data.verified, **onnx,
    }


def log_onnx(portable_path: Path, folder: Path, run: Any) -> dict[str, Any]:
    """Export the portable checkpoint to ONNX and log it in the register run under ``onnx/``.

    Returns:
        ``{"onnx": "runs:/<run>/onnx/<model>.onnx", "onnx_seconds": s}``, or ``{"onnx": None,
        "onnx_note": why}`` when the export refuses the checkpoint (:class:`ExportError`: a model with
        no ONNX graph, a detector checkpoint without ``image_size``, or the exporter failed). R-CNN and
        Fast R-CNN do export: their graph takes the selective-search proposals as a second input.
    """
    from components import tracking
    from components.export.onnx_export import ExportError, export_onnx

    try:
        result = export_onnx(portable_path, folder)
    except ExportError as err:
        return {"onnx": None, "onnx_note": err.message}
    run.log_artifact(result.path, tracking.ONNX_ARTIFACT_PATH)
    return {"onnx": f"runs:/{run.run_id}/{tracking.ONNX_ARTIFACT_PATH}/{result.path.name}", "onnx_seconds": round(result.seconds, 2)}


def run_register(params: Params, context: Any = None) -> dict:
    """Register every finished model that changed and gate it to ``champion`` (the ``visionflow register`` stage).

    Returns:
        ``{"registered": {name: entry}, "unchanged": {name: entry}, "refused": {name: reason},
        "skipped": {name: reason}, "models": {name: row}}`` (see :func:`model_summary`), also
        written to ``metrics/register.json``. A registered entry carries ``version``, ``promoted``,
        ``decision`` (``promoted``/``kept``), ``reason``, ``metric``, ``candidate_value``,
        ``champion_version_before``, ``champion_value`` (measured on the candidate's test data;
        None when incomparable), ``comparison`` (``evaluated``, ``recorded``, ``incomparable``,
        ``none``), ``test_data_hash``, ``categories_changed``, ``checkpoint_sha256``, ``onnx``
        (the ONNX artifact's URI, also the version's ``visionflow.onnx_artifact`` tag, or None with
        ``onnx_note``) and ``onnx_seconds``; ``onnx_seconds`` at the top is their sum.

    Raises:
        TrackingError: the tracking store or registry is unusable.
        CheckpointError: an accepted checkpoint cannot rebuild its model.
    """
    report: dict[str, Any] = {"registered": {}, "unchanged": {}, "refused": {}, "skipped": {}}
    if not params.register.enabled:
        return {**report, "disabled": "register.enabled is false"}
    for candidate in discover_candidates(params):
        name = candidate.registered_name
        if candidate.skipped:
            report["skipped"][name] = candidate.skipped
            continue
        reason = refusal(candidate, getattr(params.register, candidate.kind), tracking=params.tracking)
        if reason is not None:
            report["refused"][name] = reason
            continue
        entry = register_candidate(candidate, params, context)
        status = entry.pop("status")
        if status == "refused":
            report["refused"][name] = entry["reason"]
        else:
            report[status][name] = entry
    report["models"] = model_summary(report)
    report["onnx_seconds"] = round(sum(e.get("onnx_seconds") or 0.0 for e in report["registered"].values()), 2)
    write_json(report, REGISTER_REPORT)
    return report


SUMMARY_KEYS = ("version", "decision", "promoted", "metric", "champion_version_before", "champion_value", "candidate_value",
                "test_data_hash", "comparison", "categories_changed", "reason", "onnx", "onnx_seconds", "onnx_note")


def model_summary(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """One row per model: ``status`` (registered, unchanged, refused, skipped), its version and the gate's numbers."""
    rows: dict[str, dict[str, Any]] = {}
    for status in ("registered", "unchanged"):
        for name, entry in report.get(status, {}).items():
            rows[name] = {"status": status, **{k: entry[k] for k in SUMMARY_KEYS if k in entry}}
    for status in ("refused", "skipped"):
        for name, reason in report.get(status, {}).items():
            rows[name] = {"status": status, "reason": reason}
    return rows
