"""The pure parts of ``benchmarks/bench_seeds.py``: metrics files -> issue 16's shape, mean/sample std, targets, hash.

No training: the metrics files are written here in the stages' format (``metrics/detect/<arch>.json``,
``metrics/segment/<arch>.json``, ``metrics/finetune.json``).
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_seeds", ROOT / "benchmarks" / "bench_seeds.py")
bench_seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_seeds)


def write_seed(folder: Path, *, yolo: float, unet: float, mask_segm: float, fe: float, skipped_ssd: bool = False) -> Path:
    """One seed's metrics files, as the detect/segment/finetune stages write them (only the keys read)."""
    (folder / "detect").mkdir(parents=True)
    (folder / "segment").mkdir(parents=True)
    (folder / "detect" / "yolo.json").write_text(json.dumps({"arch": "yolo", "status": "finished", "test": {"map_50": yolo, "map": yolo / 2}}))
    if skipped_ssd:
        (folder / "detect" / "ssd.json").write_text(json.dumps({"arch": "ssd", "status": "skipped", "reason": "no boxes"}))
    (folder / "segment" / "unet.json").write_text(json.dumps({"arch": "unet", "status": "finished", "test": {"miou": unet}}))
    (folder / "segment" / "mask_rcnn.json").write_text(
        json.dumps({"arch": "mask_rcnn", "status": "finished", "test": {"miou": 0.4, "segm": {"map": mask_segm, "map_50": 0.8}}})
    )
    (folder / "finetune.json").write_text(json.dumps({"strategies": {"feature_extraction": {"accuracy": fe}, "scratch": {"accuracy": 0.5}}}))
    return folder


def test_summarize_is_mean_and_sample_std():
    values = [0.571, 0.640, 0.665]
    got = bench_seeds.summarize(values)
    assert got["mean"] == pytest.approx(statistics.fmean(values), abs=1e-4)
    assert got["std"] == pytest.approx(statistics.stdev(values), abs=1e-4)  # ddof=1
    assert got["std"] > statistics.pstdev(values)  # not the population std
    assert got["values"] == values and got["n"] == 3
    assert bench_seeds.summarize([0.5])["std"] is None  # one seed: no spread to report


def test_seed_files_aggregate_to_the_issue_shape(tmp_path):
    per_seed = {
        0: bench_seeds.seed_metrics(write_seed(tmp_path / "0", yolo=0.80, unet=0.60, mask_segm=0.50, fe=0.92, skipped_ssd=True)),
        1: bench_seeds.seed_metrics(write_seed(tmp_path / "1", yolo=0.70, unet=0.70, mask_segm=0.54, fe=0.94)),
        2: bench_seeds.seed_metrics(write_seed(tmp_path / "2", yolo=0.75, unet=0.65, mask_segm=0.52, fe=0.96)),
    }
    assert "ssd" not in per_seed[0]["detectors"]  # a skipped stage carries no figure
    table = bench_seeds.aggregate(per_seed)
    assert set(table) == {"detectors", "segmenters", "finetune"}
    yolo = table["detectors"]["yolo"]
    assert set(yolo) == {"map_50", "map"}
    assert yolo["map_50"]["values"] == [0.8, 0.7, 0.75] and yolo["map_50"]["seeds"] == [0, 1, 2]
    assert yolo["map_50"]["mean"] == pytest.approx(0.75) and yolo["map_50"]["std"] == pytest.approx(0.05)
    assert yolo["map"]["mean"] == pytest.approx(0.375)
    assert table["segmenters"]["mask_rcnn"]["segm_map"]["mean"] == pytest.approx(0.52)
    assert table["finetune"]["feature_extraction"]["accuracy"]["mean"] == pytest.approx(0.94)


def test_targets_take_the_best_strategy_and_check_the_std(tmp_path):
    per_seed = {s: bench_seeds.seed_metrics(write_seed(tmp_path / str(s), yolo=y, unet=u, mask_segm=0.5, fe=f))
                for s, (y, u, f) in enumerate([(0.9, 0.5, 0.95), (0.5, 0.52, 0.96), (0.7, 0.54, 0.97)])}
    rows = {(r["model"], r["metric"]): r for r in bench_seeds.check_targets(bench_seeds.aggregate(per_seed))}
    assert rows[("yolo", "map_50")]["mean_met"] and rows[("yolo", "map_50")]["std_met"] is False  # 0.7 +- 0.2
    assert not rows[("unet", "miou")]["mean_met"] and rows[("unet", "miou")]["std_met"]
    assert rows[("feature_extraction", "accuracy")]["mean_met"]  # the best strategy, not "scratch"
    assert rows[("mask_rcnn", "segm_map")]["mean_met"]  # 0.5 >= 0.5
    assert ("ssd", "map_50") not in rows  # no figures, no row


def test_params_hash_is_stable_and_sensitive():
    a = {"detect": {"yolo": {"train": {"epochs": 16, "seed": 0}}}, "data": {"seed": 0}}
    b = {"data": {"seed": 0}, "detect": {"yolo": {"train": {"seed": 0, "epochs": 16}}}}  # same data, other key order
    assert bench_seeds.params_hash(a) == bench_seeds.params_hash(b)
    assert bench_seeds.params_hash(a) != bench_seeds.params_hash({**a, "data": {"seed": 1}})


def test_seed_overrides_touch_only_training_seeds():
    params = {"detect": {"architectures": ["yolo", "ssd"]}, "segment": {"architectures": ["fcn"]}}
    assert bench_seeds.seed_overrides(params, 2) == [
        "detect.yolo.train.seed=2", "detect.ssd.train.seed=2", "segment.fcn.train.seed=2", "finetune.train.seed=2",
    ]


def test_curve_band_and_history_scalars():
    history = [{"epoch": 1, "lr": 0.1, "train_loss": 2.0, "val": {"map_50": 0.2, "per_class": {"a": 1}}}, {"epoch": 2, "lr": 0.05, "val": {"map_50": 0.4}}]
    rows = bench_seeds.epoch_history(history)
    assert rows[0] == {"epoch": 1, "lr": 0.1, "train_loss": 2.0, "val": {"map_50": 0.2}}
    means, stds = bench_seeds.curve_band([[0.2, 0.4, 0.5], [0.4, 0.6]])  # cut to the shorter curve
    assert means == pytest.approx([0.3, 0.5]) and stds == pytest.approx([statistics.stdev([0.2, 0.4])] * 2)
    histories = {0: {"detectors": {"yolo": rows}}, 1: {"detectors": {"yolo": [{"epoch": 1, "val": {"map_50": 0.4}}]}, "segmenters": {}}}
    curve = bench_seeds.val_curves(histories)["detectors"]["yolo"]  # the seeds' curves of one model, cut to the shortest
    assert curve["metric"] == "map_50" and curve["n"] == 2 and curve["mean"] == pytest.approx([0.3])


def test_target_of_a_bar_marks_only_the_best_strategy(tmp_path):
    per_seed = {s: bench_seeds.seed_metrics(write_seed(tmp_path / str(s), yolo=0.7, unet=0.6, mask_segm=0.5, fe=0.9)) for s in (0, 1)}
    table = bench_seeds.aggregate(per_seed)
    assert bench_seeds.target_of(table, "detectors", "yolo", "map_50") == 0.6
    assert bench_seeds.target_of(table, "detectors", "yolo", "map") is None
    assert bench_seeds.target_of(table, "finetune", "feature_extraction", "accuracy") == 0.95
    assert bench_seeds.target_of(table, "finetune", "scratch", "accuracy") is None  # "scratch clearly below": no target


def test_curve_verdict_extrapolates_in_log_epochs():
    rising = [0.2 + 0.1 * __import__("math").log(e) for e in range(1, 9)]  # +0.069 per doubling, 0.408 at epoch 8
    verdict = bench_seeds.curve_verdict(rising, 0.5)
    assert verdict["rising"] and verdict["gain_per_doubling"] == pytest.approx(0.0693, abs=1e-3)
    assert verdict["extrapolated_epochs"] == 21  # exp(3) = 20.09: the line reaches 0.5 during epoch 21
    assert bench_seeds.curve_verdict(rising, 0.3)["extrapolated_epochs"] == 8  # already met at the last epoch
    flat = bench_seeds.curve_verdict([0.5, 0.5, 0.5, 0.5], 0.6)
    assert not flat["rising"] and flat["extrapolated_epochs"] is None  # a flat trend gives no budget


def test_save_partial_takes_only_the_stages_finished_since_the_seed_started(tmp_path):
    import os
    import time

    import torch
    import yaml

    clone, dest = tmp_path / "clone", tmp_path / "seeds" / "1"
    (clone / "metrics" / "detect").mkdir(parents=True)
    (clone / "metrics" / "segment").mkdir(parents=True)
    params = {"detect": {"architectures": ["yolo", "ssd"], "out": "outputs/detect"}, "segment": {"architectures": ["fcn"], "out": "outputs/segment"},
              "finetune": {"strategies": ["scratch"], "out": "outputs/finetune"}}
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    write_seed(tmp_path / "files", yolo=0.7, unet=0.6, mask_segm=0.5, fe=0.9)
    for arch in ("yolo", "ssd"):  # ssd: a committed file from before the seed started
        (clone / "metrics" / "detect" / f"{arch}.json").write_text((tmp_path / "files" / "detect" / "yolo.json").read_text())
        (clone / "outputs" / "detect" / arch).mkdir(parents=True)
        torch.save({"state_dict": {}, "history": [{"epoch": 1, "val": {"map_50": 0.5}}]}, clone / "outputs" / "detect" / arch / "last.pt")
    old = time.time() - 3600
    os.utime(clone / "metrics" / "detect" / "ssd.json", (old, old))
    dest.mkdir(parents=True)
    (dest / "started").write_text(str(time.time() - 60))
    run = bench_seeds.save_partial(clone, dest, 1)
    assert run["partial"] and run["finished_stages"] == ["detect@yolo"]  # ssd is stale, fcn and finetune never finished
    metrics = bench_seeds.seed_metrics(dest)
    assert set(metrics["detectors"]) == {"yolo"} and not metrics["segmenters"] and not metrics["finetune"]
    assert json.loads((dest / "history.json").read_text())["detectors"] == {"yolo": [{"epoch": 1, "val": {"map_50": 0.5}}]}


def test_training_cpu_seconds_come_along_where_the_stage_wrote_them(tmp_path):
    folder = write_seed(tmp_path / "0", yolo=0.8, unet=0.6, mask_segm=0.5, fe=0.9)
    data = json.loads((folder / "detect" / "yolo.json").read_text())
    (folder / "detect" / "yolo.json").write_text(json.dumps({**data, "train_cpu_time_s": 409.5}))
    (folder / "finetune.json").write_text(json.dumps({"strategies": {"scratch": {"accuracy": 0.5, "train_cpu_s": 86.4}}}))
    got = bench_seeds.seed_metrics(folder)
    assert got["detectors"]["yolo"]["train_cpu_s"] == 409.5 and got["finetune"]["scratch"]["train_cpu_s"] == 86.4
    assert "train_cpu_s" not in got["segmenters"]["unet"]  # not written by the stage: not invented
