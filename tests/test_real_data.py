"""Faster R-CNN and YOLO v1 on real images with the ImageNet backbone: the issue's figures, reproduced.

Each case ingests the source of ``configs/detect_<dataset>.yaml`` (``../shared/data/raccoon``: one
class, large objects, seeded 80/10/10 split; ``../shared/data/bccd/BCCD``: RBC / WBC / Platelets,
its own test split), trains the architecture with that file's settings and scores the held-out
test split with the project's evaluator. The floors are the figures measured by
``benchmarks/bench_real_data.py`` (``benchmarks/results/real_data_detection.json``) minus a margin
for run-to-run noise (thread scheduling changes float summation order). Minutes of CPU per case:
``pytest tests/test_real_data.py -m slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARGIN = 0.1  # below the measured figure: one seed, 20 (raccoon) or 72 (BCCD) test images

# measured (benchmarks/results/real_data_detection.json): mAP@0.5 and, for BCCD, AP@0.5 per class
MEASURED: dict[tuple[str, str], tuple[float, dict[str, float]]] = {
    ("raccoon", "faster_rcnn"): (1.0, {}),
    ("raccoon", "yolo"): (0.934, {}),
    ("bccd", "faster_rcnn"): (0.908, {"Platelets": 0.897, "RBC": 0.853, "WBC": 0.974}),
    ("bccd", "yolo"): (0.615, {"Platelets": 0.214, "RBC": 0.755, "WBC": 0.876}),
}


def repo_source(source: str) -> tuple[str, Path]:
    """``kind:path`` with a relative path resolved against the repository root (the configs' convention)."""
    kind, _, path = source.partition(":")
    resolved = Path(path) if Path(path).is_absolute() else (REPO / path).resolve()
    return f"{kind}:{resolved}", resolved


def test_repo_source_resolves_against_the_repository_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec, path = repo_source("voc:../shared/data/raccoon")
    assert path == (REPO.parent / "shared" / "data" / "raccoon").resolve()
    assert spec == f"voc:{path}"
    assert repo_source(f"voc:{tmp_path}") == (f"voc:{tmp_path}", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("dataset", "arch"), list(MEASURED))
def test_real_data_figures(dataset, arch, tmp_path, tracking_cfg, monkeypatch):
    """The measured figures of ``arch`` on ``dataset``'s held-out test split, within ``MARGIN``."""
    from components.config import load_params
    from components.data.ingest import ingest
    from components.stages.detect import run_detect

    params = load_params(REPO / "configs" / f"detect_{dataset}.yaml")
    source, path = repo_source(params.data.source)
    if not path.is_dir():
        pytest.skip(f"{path} is not on this machine (the real datasets live in ../shared/data beside the repo)")
    monkeypatch.chdir(tmp_path)  # data/, outputs/ and metrics/ of the config land in tmp_path
    ingest(source, Path(params.data.out), cfg=params.data)
    metrics = run_detect(params.detect, arch, params.augment, params.evaluate, tracking_cfg)

    test = metrics["test"]
    per_class = {name: v["ap_50"] for name, v in test["per_class"].items()}
    print(dataset, arch, {k: round(test[k], 4) for k in ("map_50", "map")}, per_class)
    map_50, class_ap_50 = MEASURED[(dataset, arch)]
    assert test["map_50"] >= map_50 - MARGIN
    for name, ap_50 in class_ap_50.items():
        assert per_class[name] >= ap_50 - MARGIN, name
