"""The ``visionflow`` command line: one sub-command per stage, plus run/serve/predict/evaluate.

Stage commands call the same component functions as the Prefect flows and ``dvc repro``
(``dvc.yaml``'s ``cmd`` lines are these commands). Imports are lazy so that light commands
(``visionflow evaluate``) never import torch training code, MLflow or Prefect.

Every user-facing error is a :class:`components.errors.VisionflowError`: printed as one line
naming the file, the record and the fix, exit code 2.

A training stage (``pretrain``, ``finetune``, ``detect --arch``, ``segment --arch``) whose
``train.nprocs > 1`` (params or ``--set``) re-runs its own command line under ``torchrun``
(:mod:`flows.torchrun_stage`): one MLflow run, one set of files, rank 0's result printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _params(args: argparse.Namespace) -> Any:
    from components.config import load_params

    return load_params(args.params, args.set)


def _run_context() -> Any:
    """The run context the retrain flow gives a stage process in its environment (empty by hand or under dvc repro)."""
    import os

    from components.pipeline import FLOW_RUN_ENV, PARENT_RUN_ENV
    from components.tracking import RunContext

    return RunContext(flow_run_id=os.environ.get(FLOW_RUN_ENV) or None, parent_run_id=os.environ.get(PARENT_RUN_ENV) or None)


def _print(result: Any) -> None:
    if result is None:
        return
    if isinstance(result, dict):  # indented on a terminal; one line for a log (a pipeline's stage process, cron)
        print(json.dumps(result, indent=2 if sys.stdout.isatty() else None, default=str))
    else:
        print(result)


# --------------------------------------------------------------------------- commands


def cmd_ingest(args: argparse.Namespace) -> Any:
    from components.data.ingest import ingest

    params = _params(args)
    cfg = params.data
    if args.source:  # another dataset than data's (a source of orchestration.datasets): data.classes is not its list
        cfg = cfg.model_copy(update={"classes": None})
    return ingest(
        args.source or cfg.source,
        Path(args.out or cfg.out),
        cfg=cfg,
        images=args.images if args.source else (args.images or cfg.images),  # data.images belongs to data.path
        strict=args.strict or cfg.strict,
        tracking=params.tracking if args.track else None,
    )


def cmd_augment(args: argparse.Namespace) -> Any:
    from components.augment import write_preview

    params = _params(args)
    return write_preview(Path(args.dataset or params.data.out), params.augment, Path(args.out or params.augment.out))


def cmd_pretrain(args: argparse.Namespace) -> Any:
    from components.stages.pretrain import run_pretrain

    params = _params(args)
    return run_pretrain(params.pretrain, params.augment, params.tracking, resume=args.resume, context=_run_context())


def cmd_finetune(args: argparse.Namespace) -> Any:
    from components.stages.finetune import run_finetune

    params = _params(args)
    return run_finetune(params.finetune, params.augment, params.tracking, resume=args.resume, context=_run_context())


def cmd_detect(args: argparse.Namespace) -> Any:
    from components.stages import detect

    params = _params(args)
    if args.compare:
        return detect.compare_detectors(params.detect)
    if getattr(args, "lineage", False):
        from components.stages.lineage import run_lineage

        return run_lineage(params.detect)
    return detect.run_detect(params.detect, args.arch, params.augment, params.evaluate, params.tracking, resume=args.resume, context=_run_context())


def cmd_segment(args: argparse.Namespace) -> Any:
    from components.stages import segment

    params = _params(args)
    if args.compare:
        return segment.compare_segmenters(params.segment)
    return segment.run_segment(params.segment, args.arch, params.augment, params.tracking, resume=args.resume, context=_run_context())


def cmd_evaluate(args: argparse.Namespace) -> Any:
    from components.metrics.evaluate_files import evaluate_files

    evaluate_files(Path(args.gt), Path(args.pred), iou_type=args.iou_type, out=Path(args.out) if args.out else None)
    return None


def cmd_register(args: argparse.Namespace) -> Any:
    from components.stages.register import run_register

    return run_register(_params(args), context=_run_context())


def cmd_export(args: argparse.Namespace) -> Any:
    from components.export.onnx_export import export_reference

    tracking = _params(args).tracking if args.model.startswith("models:/") else None
    return export_reference(args.model, Path(args.out), tracking=tracking, fmt=args.format)


def cmd_predict(args: argparse.Namespace) -> Any:
    """Predict every image; each bad one is reported (stderr) and skipped; exit 1 when any failed."""
    from components.stages.predict import PartialPredictionError, predict_files

    result = predict_files(
        args.model, args.images, out=Path(args.out) if args.out else None, coco=Path(args.coco) if args.coco else None,
        draw=Path(args.draw) if args.draw else None, batch_size=args.batch_size, device=args.device, threads=args.threads or None,
    )
    if args.out:  # the predictions are in the file; stdout gets the summary
        result.pop("predictions")
    if result["failed"]:
        _print(result)
        raise PartialPredictionError(
            f"{len(result['failed'])} of {result['images']} images failed (listed above); the other {result['predicted']} were predicted"
            + (f" and written to {args.out}" if args.out else ""),
            fix="fix or remove the listed files",
        )
    return result


def cmd_run(args: argparse.Namespace) -> Any:
    from flows.retrain import run_pipeline

    return run_pipeline(args.params, args.set, force=args.force)


def cmd_serve(args: argparse.Namespace) -> Any:
    from flows.retrain import serve_pipeline

    return serve_pipeline(args.params, args.set, cron=args.cron, name=args.name, watch=args.watch, interval=args.interval)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], Any], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a param (repeatable)")
        p.set_defaults(func=fn)
        return p

    p = add("ingest", cmd_ingest, "convert a source dataset to the canonical layout, validating every record")
    p.add_argument("--source", help="shapes | coco:FILE.json | voc:DIR | yolo:DIR | imagefolder:DIR | masks:DIR (default: data.source)")
    p.add_argument("--out", help="output folder (default: data.out)")
    p.add_argument("--images", help="images folder for coco: sources (default: images/ beside the JSON)")
    p.add_argument("--strict", action="store_true", help="fail (exit 2) on the first problem instead of repairing/skipping")
    p.add_argument("--track", action="store_true", help="log dataset statistics to MLflow")

    p = add("augment", cmd_augment, "draw a preview grid of augmented samples and record the policy")
    p.add_argument("--dataset", help="canonical dataset folder (default: data.out)")
    p.add_argument("--out", help="output folder (default: augment.out)")

    for name, fn, text in (
        ("pretrain", cmd_pretrain, "produce the backbone checkpoint (ImageNet weights or our own pretraining)"),
        ("finetune", cmd_finetune, "transfer learning: scratch vs feature extraction vs fine-tuning"),
    ):
        p = add(name, fn, text)
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    for name, fn, text in (
        ("detect", cmd_detect, "train and evaluate one detector architecture"),
        ("segment", cmd_segment, "train and evaluate one segmentation architecture"),
    ):
        p = add(name, fn, text)
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--arch", help="architecture name (see params)")
        group.add_argument("--compare", action="store_true", help="write the comparison table of the trained architectures")
        if name == "detect":
            group.add_argument("--lineage", action="store_true", help="time R-CNN -> Fast R-CNN -> Faster R-CNN on the test split")
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    p = add("evaluate", cmd_evaluate, "COCO/VOC metrics of a COCO results file against COCO ground truth")
    p.add_argument("--gt", required=True, help="COCO instances JSON")
    p.add_argument("--pred", required=True, help="COCO results JSON (list of detections)")
    p.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    p.add_argument("--out", help="write the metrics JSON here")

    add("register", cmd_register, "register trained models in MLflow and move `champion` through the gate")

    p = add("export", cmd_export, "export a registered version or a checkpoint to ONNX (onnxruntime + numpy + Pillow consumers)")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, or a checkpoint path")
    p.add_argument("--format", default="onnx", choices=("onnx",), help="export format (onnx)")
    p.add_argument("--out", default="exports", help="output folder (default: exports/)")

    p = add("predict", cmd_predict, "run a registered model, an ONNX file or a checkpoint on image files, folders and globs")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, runs:/ID/model, MODEL.onnx, or a checkpoint path")
    p.add_argument("images", nargs="+", help="image files, folders (walked recursively) and glob patterns")
    p.add_argument("--out", help="detectors: COCO results JSON (+ OUT.images.json); segmenters: index JSON + OUT_masks/ PNGs; "
                                 "classifiers: predictions JSON")
    p.add_argument("--coco", help="COCO instances JSON whose image ids (by file name) and category ids (by name) the results use")
    p.add_argument("--draw", help="write images with predictions drawn into this folder")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8: the stages' evaluation batch)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (checkpoints)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the stages' train.threads, so scores match "
                                                          "the stage's to the bit; 0: torch's default)")

    p = add("run", cmd_run, "bring every stage of dvc.yaml up to date (Prefect flow; --params/--set are written to params.yaml)")
    p.add_argument("--force", action="store_true", help="run every stage even when dvc status finds it up to date")

    p = add("serve", cmd_serve, "serve the retrain flow as a Prefect deployment: on a schedule and/or when the sources change")
    p.add_argument("--cron", help='schedule, e.g. "0 3 * * 1"')
    p.add_argument("--watch", action="store_true", help="also start a run when the source data changes (polls dvc status)")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between two looks at the sources (--watch)")
    p.add_argument("--name", default="visionflow-retrain", help="deployment name")
    return parser


def run_command(args: argparse.Namespace, argv: list[str]) -> Any:
    """Run one parsed command; a training stage with ``train.nprocs > 1`` runs under torchrun.

    In the launching process (``train.nprocs > 1``, not yet a worker) the same command line is
    started under torchrun and rank 0's result is returned; inside a torchrun worker the stage
    runs in the process group (:mod:`flows.torchrun_stage`); otherwise it simply runs.
    """
    if args.command not in ("pretrain", "finetune", "detect", "segment"):
        return args.func(args)
    from components.distributed import in_torchrun_worker, should_launch
    from flows.torchrun_stage import launch_stage, run_as_worker, stage_train_config

    cfg = stage_train_config(args.command, _params(args), getattr(args, "arch", None))
    if cfg is None:
        return args.func(args)
    if in_torchrun_worker():
        return run_as_worker(lambda: args.func(args), cfg)
    if should_launch(cfg):
        return launch_stage(argv, cfg.nprocs, cfg=cfg)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    from components.errors import TRANSIENT_EXIT_CODE, VisionflowError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        _print(run_command(args, argv))
    except VisionflowError as err:
        print(f"visionflow {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except (ConnectionError, TimeoutError) as err:
        print(f"visionflow {args.command}: transient error (a retry may cure it): {err!r}", file=sys.stderr)
        return TRANSIENT_EXIT_CODE
    except KeyboardInterrupt:
        print(f"visionflow {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
