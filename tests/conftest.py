"""Shared fixtures: no network, a tiny-thread torch, one Prefect test harness per session."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (about 20 s to start), shared by flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def tracking_cfg(tmp_path, monkeypatch):
    """A TrackingConfig pointing at a fresh sqlite MLflow store under tmp_path."""
    from components.config import TrackingConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("VISIONFLOW_PARENT_RUN_ID", raising=False)
    return TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="test", artifact_location=(tmp_path / "mlartifacts").as_uri())
