"""``benchmarks/bench_recipes.py``: the recipes as shipped, their overrides and the aggregation over seeds (no training).

The trainings themselves are the stages' (tests/test_stage_detect.py, tests/test_stage_segment.py); here the
metrics files are written in the stages' format and the recipe files are validated as a user's run would load them.
"""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest

from components.config import load_params

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_recipes", ROOT / "benchmarks" / "bench_recipes.py")
bench_recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_recipes)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_a_valid_params_file(path):
    params = load_params(path)
    assert params.data.path, path


def test_a_case_changes_only_where_the_data_comes_from_and_goes(tmp_path):
    recipe, stage = bench_recipes.RECIPES["boxes"]
    sets = bench_recipes.case_overrides("boxes:bccd", tmp_path) + bench_recipes.job_overrides(stage, "yolo", 2)
    shipped = load_params(ROOT / recipe).model_dump(mode="json")
    case = load_params(ROOT / recipe, overrides=sets).model_dump(mode="json")
    assert case["data"]["path"].endswith("shared/data/bccd/BCCD")
    assert case["data"]["out"] == str(tmp_path / "boxes-bccd" / "data")
    assert case["detect"]["yolo"]["train"]["seed"] == 2
    for changed in (("data", "path"), ("data", "out"), ("detect", "yolo", "train", "seed"), ("detect", "dataset"), ("segment", "dataset")):
        for d in (shipped, case):
            node = d
            for key in changed[:-1]:
                node = node[key]
            node.pop(changed[-1])
    assert case == shipped  # every knob of the recipe as it ships
    assert bench_recipes.architectures("boxes:raccoon") == ["faster_rcnn", "yolo"]
    assert bench_recipes.architectures("masks:membrane") == ["fcn", "unet"]


def detect_metrics(map_50: float) -> dict:
    return {"arch": "yolo", "status": "finished", "train_cpu_time_s": 100.0 + map_50, "epochs": 3,
            "test": {"num_images": 20, "map_50": map_50, "map": map_50 / 2, "per_class": {"raccoon": {"ap_50": map_50, "ap": 0.1}}}}


def history(values: list[float], key: str = "map_50") -> list[dict]:
    return [{"epoch": i + 1, "val": {key: v}} for i, v in enumerate(values)]


def test_seeds_aggregate_to_mean_and_sample_std_with_curves_and_costs():
    jobs = {
        ("boxes:raccoon", "yolo", s): bench_recipes.job_result("detect", "yolo", detect_metrics(v), history([v - 0.2, v - 0.1, v]))
        for s, v in enumerate([0.8, 0.9, 0.7])
    }
    segment = {"arch": "unet", "status": "finished", "train_cpu_time_s": 50.0, "epochs": 2,
               "test": {"num_images": 7, "miou": 0.7, "per_class_iou": {"background": 0.9, "membrane": 0.5}}}
    jobs[("masks:membrane", "unet", 0)] = bench_recipes.job_result("segment", "unet", segment, history([0.5, 0.6], "miou"))
    jobs[("masks:membrane", "fcn", 0)] = bench_recipes.job_result(
        "segment", "fcn", {"arch": "fcn", "status": "skipped", "reason": "no masks"}, [])
    table = bench_recipes.aggregate(jobs)

    yolo = table["boxes:raccoon"]["yolo"]
    assert yolo["map_50"]["mean"] == pytest.approx(0.8)
    assert yolo["map_50"]["std"] == pytest.approx(statistics.stdev([0.8, 0.9, 0.7]), abs=1e-4)
    assert yolo["map"]["values"] == [0.4, 0.45, 0.35]
    assert yolo["per_class"]["raccoon"]["mean"] == pytest.approx(0.8)
    assert yolo["train_cpu_s"]["mean"] == pytest.approx(100.8)
    assert yolo["curve"]["mean"] == pytest.approx([0.6, 0.7, 0.8])
    assert yolo["curve"]["std"][0] == pytest.approx(0.1, abs=1e-4)
    assert yolo["seeds"] == [0, 1, 2] and yolo["test_images"] == 20 and yolo["epochs"] == 3
    unet = table["masks:membrane"]["unet"]
    assert unet["miou"]["mean"] == 0.7 and unet["miou"]["std"] is None  # one seed: no spread claimed
    assert unet["per_class"]["membrane"]["values"] == [0.5]
    assert table["masks:membrane"]["fcn"] == {"skipped": "no masks"}


def test_figures_are_written_for_the_finished_cases(tmp_path):
    jobs = {("boxes:raccoon", "yolo", s): bench_recipes.job_result("detect", "yolo", detect_metrics(v), history([v]))
            for s, v in enumerate([0.8, 0.9])}
    paths = bench_recipes.plot(bench_recipes.aggregate(jobs), tmp_path / "recipes.json")
    assert [p.name for p in paths] == ["recipes.png", "recipes_curves.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_the_readme_table_shows_mean_std_and_every_seed():
    jobs = {("boxes:bccd", "yolo", s): bench_recipes.job_result("detect", "yolo", detect_metrics(v), history([v]))
            for s, v in enumerate([0.8, 0.9, 0.7])}
    jobs[("masks:membrane", "fcn", 0)] = {"status": "skipped", "reason": "no masks"}
    rows = bench_recipes.markdown(bench_recipes.aggregate(jobs)).splitlines()
    assert rows[2].startswith("| boxes | bccd (20) | yolo | 0.800 ± 0.100 (0.800, 0.900, 0.700) | 0.400 ± 0.050 |")
    assert "raccoon 0.80" in rows[2] and rows[2].endswith("| 3 | 101 |")
    assert rows[3] == "| masks | membrane | fcn | skipped: no masks | | | | |"
