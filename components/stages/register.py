"""The ``register`` stage: every trained model becomes a registered MLflow pyfunc model, gated to ``champion``.

For each stage output (pretrain's backbone, finetune's best classifier, each detector, each
segmenter) the stage

1. refuses outputs of failed or diverged runs: no checkpoint, a ``diverged.json`` marker (written
   by the engine on NaN/inf loss), metrics missing, older than the checkpoint, marked failed,
   non-finite, or whose MLflow run ended ``FAILED``/``KILLED``: such outputs register nothing;
2. writes a *portable* checkpoint (weights, build arguments without file paths, categories and
   preprocessing: no optimiser state) and logs it as a pyfunc model with a signature and an input
   example, in a run nested under the pipeline's run, tagged with its lineage (git commit, DVC
   hash of the data, params hash, Prefect flow run, training run);
3. registers a new version of ``<prefix>-backbone``, ``<prefix>-classifier``,
   ``<prefix>-detector-<arch>`` or ``<prefix>-segmenter-<arch>`` with a model card as its
   description and the ``candidate`` alias;
4. moves ``champion`` only when the version's gate metric (params ``register.<kind>``) beats the
   champion's by the margin; the decision is stored as ``gate.*`` version tags and in
   ``metrics/register.json``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.config import Gate, Params
from components.errors import CheckpointError
from components.stages.predict import write_json_atomic

METRICS_DIR = Path("metrics")
REGISTER_REPORT = METRICS_DIR / "register.json"
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
        checkpoint: the stage's checkpoint file.
        metrics_file: the stage's ``metrics/*.json``.
        metrics: the metrics of this model (the subtree of ``metrics_file`` that concerns it).
        dataset: the canonical dataset folder it was trained and tested on.
        section: the params section (hashed into the lineage, shown on the model card).
    """

    kind: str
    registered_name: str
    stage: str
    checkpoint: Path
    metrics_file: Path
    dataset: Path
    section: Any
    metrics: dict[str, Any] = field(default_factory=dict)


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


def _checkpoint_for(metrics: Mapping[str, Any], default: Path) -> Path:
    path = metrics.get("checkpoint") or metrics.get("best_path")
    return Path(path) if isinstance(path, str) else default


def discover_candidates(params: Params, *, metrics_dir: Path = METRICS_DIR) -> list[Candidate]:
    """The models the pipeline's stages should have produced, by the paths ``dvc.yaml`` declares."""
    prefix = params.register.prefix
    out: list[Candidate] = []
    pre = params.pretrain
    pre_metrics = metrics_dir / "pretrain.json"
    pre_tree = _read_json(pre_metrics) or {}
    out.append(
        Candidate("backbone", f"{prefix}-backbone", "pretrain", _checkpoint_for(pre_tree, Path(pre.out) / "backbone.pt"), pre_metrics, Path(pre.dataset), pre, pre_tree)
    )
    ft_metrics = metrics_dir / "finetune.json"
    out.append(_best_strategy(params, ft_metrics, _read_json(ft_metrics) or {}))
    for arch in params.detect.architectures:
        path = metrics_dir / f"detect_{arch}.json"
        tree = _read_json(path) or {}
        ckpt = _checkpoint_for(tree, Path(params.detect.out) / arch / "best.pt")
        out.append(Candidate("detector", f"{prefix}-detector-{arch}", f"detect.{arch}", ckpt, path, Path(params.detect.dataset), params.detect.arch(arch), tree))
    for arch in params.segment.architectures:
        path = metrics_dir / f"segment_{arch}.json"
        tree = _read_json(path) or {}
        ckpt = _checkpoint_for(tree, Path(params.segment.out) / arch / "best.pt")
        out.append(Candidate("segmenter", f"{prefix}-segmenter-{arch}", f"segment.{arch}", ckpt, path, Path(params.segment.dataset), params.segment.arch(arch), tree))
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
    if not scored:
        return Candidate("classifier", name, "finetune", Path(ft.out) / "best.pt", metrics_file, Path(ft.dataset), ft, dict(tree))
    _, strategy, sub = max(scored)
    sub = {**sub, "strategy": strategy}
    return Candidate("classifier", name, f"finetune.{strategy}", _checkpoint_for(sub, Path(ft.out) / strategy / "best.pt"), metrics_file, Path(ft.dataset), ft, sub)


def refusal(candidate: Candidate, gate: Gate, *, tracking: Any = None) -> str | None:
    """Why ``candidate`` must not be registered (a failed, diverged or unfinished run), or None.

    Args:
        candidate: the model.
        gate: its gate (the metric must be present and finite).
        tracking: a TrackingConfig to check the training run's MLflow status, when the metrics name one.
    """
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
    run_id = candidate.metrics.get("run_id") or candidate.metrics.get("mlflow_run_id")
    if tracking is not None and isinstance(run_id, str):
        from components.tracking import run_status

        state = run_status(tracking, run_id)
        if state in ("FAILED", "KILLED"):
            return f"its MLflow run {run_id} ended {state}"
    return None


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
    keep = ("task", "model_name", "categories", "image_size", "mean", "std", "score_threshold", "mask_threshold", "num_classes")
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


def example_images(dataset: Path, *, count: int = 2) -> list[bytes]:
    """Encoded images for a model's input example: the dataset's first test (else val/train) images."""
    exts = (".png", ".jpg", ".jpeg")
    for split in ("test", "val", "train"):
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


# --------------------------------------------------------------------------- the stage


def register_candidate(candidate: Candidate, params: Params) -> dict[str, Any]:
    """Log, register and gate one accepted candidate; returns its report entry."""
    from components import tracking

    gate: Gate = getattr(params.register, candidate.kind)
    value = find_metric(candidate.metrics, gate.metric)
    with tempfile.TemporaryDirectory(prefix="visionflow-register-") as tmp:
        portable_path = Path(tmp) / "model.pt"
        ckpt = write_portable_checkpoint(candidate.checkpoint, portable_path, as_backbone=candidate.kind == "backbone")
        task = str(ckpt["task"])
        instance = task == "segmentation" and "mask" in str(ckpt.get("model_name", "")).lower() and "rcnn" in str(ckpt.get("model_name", "")).lower()
        with tracking.start_run(params.tracking, run_name=f"register-{candidate.registered_name}", tags={"visionflow.stage": "register"}) as run:
            lineage = run.log_lineage(section=candidate.section, dataset=candidate.dataset, dataset_name=candidate.dataset.name)
            training_run = candidate.metrics.get("run_id") or candidate.metrics.get("mlflow_run_id") or ckpt.get("run_id")
            run_ids = {"register run": run.run_id, **({"training run": str(training_run)} if training_run else {})}
            if os.environ.get(tracking.FLOW_RUN_ENV):
                run_ids["prefect flow run"] = os.environ[tracking.FLOW_RUN_ENV]
            run.log_params({"registered_name": candidate.registered_name, "stage": candidate.stage, "checkpoint": str(candidate.checkpoint)})
            run.log_metrics(_flat_numbers(candidate.metrics))
            model_uri = tracking.log_pyfunc_model(
                checkpoint=portable_path,
                task=task,
                instance=instance,
                example_images=example_images(candidate.dataset),
                metadata={"categories": list(ckpt.get("categories") or []), "stage": candidate.stage, "gate_metric": gate.metric, "gate_value": value},
            )
            card = model_card(candidate, ckpt=ckpt, lineage=lineage, gate=gate, run_ids=run_ids)
            tags = {**lineage, "visionflow.stage": candidate.stage, "visionflow.register_run_id": run.run_id, "visionflow.checkpoint": str(candidate.checkpoint)}
            if training_run:
                tags["visionflow.training_run_id"] = str(training_run)
            version = tracking.register_version(
                model_uri,
                candidate.registered_name,
                version_description=card,
                model_description=KIND_DESCRIPTIONS[candidate.kind] + f"\n\nGate: `{gate.metric}`, margin {gate.margin}; see each version's card.",
                tags=tags,
                alias=params.register.candidate_alias,
            )
            decision = tracking.apply_gate(candidate.registered_name, version, gate=gate, value=value, champion_alias=params.register.champion_alias)
            run.set_tags({"visionflow.registered_version": version, "visionflow.promoted": str(decision.promoted).lower()})
    return {
        "registered_name": candidate.registered_name,
        "version": version,
        "model_uri": model_uri,
        "run_id": run.run_id,
        "promoted": decision.promoted,
        "decision": decision.reason,
        "metric": gate.metric,
        "value": value,
        "champion_version_before": decision.champion_version,
        "champion_value_before": decision.champion_value,
        "margin": gate.margin,
    }


def run_register(params: Params) -> dict:
    """Register every finished model and gate it to ``champion`` (the ``visionflow register`` stage).

    Returns:
        ``{"registered": {name: entry}, "refused": {name: reason}}``, also written to
        ``metrics/register.json``.

    Raises:
        TrackingError: the tracking store or registry is unusable.
        CheckpointError: an accepted checkpoint cannot rebuild its model.
    """
    if not params.register.enabled:
        return {"registered": {}, "refused": {}, "skipped": "register.enabled is false"}
    registered: dict[str, Any] = {}
    refused: dict[str, str] = {}
    for candidate in discover_candidates(params):
        gate: Gate = getattr(params.register, candidate.kind)
        reason = refusal(candidate, gate, tracking=params.tracking)
        if reason is not None:
            refused[candidate.registered_name] = reason
            continue
        registered[candidate.registered_name] = register_candidate(candidate, params)
    report = {"registered": registered, "refused": refused}
    write_json_atomic(REGISTER_REPORT, report)
    return report
