"""The retrain run's report: overhead as wall time minus the union of the stage spans, registry rows, the summary."""

from __future__ import annotations

import pytest

from components.run_report import outcome, registry_rows, summary_markdown, timing, union_seconds


def test_union_of_overlapping_stage_spans():
    # two stages side by side (0-10, 5-12), a gap, one alone (20-25): 17 s inside stages
    assert union_seconds([(20.0, 25.0), (0.0, 10.0), (5.0, 12.0)]) == pytest.approx(17.0)
    assert union_seconds([(0.0, 10.0), (2.0, 3.0)]) == pytest.approx(10.0)  # one inside another
    assert union_seconds([]) == 0.0
    stages = {"a": {"state": "ran", "started": 100.0, "seconds": 10.0}, "b": {"state": "up to date", "seconds": 0.0}}
    assert timing(stages, 12.5) == {"wall_s": 12.5, "stages_s": 10.0, "overhead_s": 2.5}


def test_outcome_of_the_stage_states():
    assert outcome({"a": {"state": "ran"}, "b": {"state": "failed"}}) == "failed"
    assert outcome({"a": {"state": "up to date"}, "b": {"state": "skipped"}}) == "trained"
    assert outcome({"a": {"state": "up to date"}}) == "up to date"


def test_summary_shows_skip_reasons_and_both_gate_numbers():
    register = {"models": {
        "own-detector-yolo": {"status": "registered", "version": "2", "decision": "promoted", "metric": "map_50",
                              "candidate_value": 0.95, "champion_version_before": "1", "champion_value": 0.91,
                              "comparison": "evaluated", "test_data_hash": "abc.dir"},
        "own-backbone": {"status": "unchanged", "version": "1", "reason": "unchanged: version 1"},
        "own-segmenter-fcn": {"status": "skipped", "reason": "data/own has no segmentation masks"},
    }}
    rows = {r["model"]: r for r in registry_rows(register)}
    assert rows["own-detector-yolo"]["champion_value"] == 0.91 and rows["own-detector-yolo"]["candidate_value"] == 0.95
    assert rows["own-backbone"]["status"] == "unchanged" and rows["own-segmenter-fcn"]["champion_value"] == ""
    report = {"outcome": "trained", "flow_run_id": "f1", "mlflow_run_id": "r1", "register": register,
              "timing": {"wall_s": 12.5, "stages_s": 10.0, "overhead_s": 2.5},
              "stages": {"segment@fcn": {"state": "skipped", "seconds": 3.0, "reason": "data/own has no segmentation masks"}}}
    text = summary_markdown(report)
    assert "| segment@fcn | skipped | 3.0 | data/own has no segmentation masks |" in text
    assert "0.91" in text and "0.95" in text and "abc.dir" in text and "orchestration overhead 2.5 s" in text
