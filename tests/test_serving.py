"""`mlflow models serve -m models:/...@champion --env-manager local` answers a real HTTP /invocations request."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
from conftest import free_port, stop_process_group
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()[-3000:] if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no answer from {url} within {timeout} s")


def test_models_serve_answers_invocations(registry_store, tmp_path):
    _, uri, _, _ = registry_store
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(
        [str(REPO / ".venv/bin/mlflow"), "models", "serve", "-m", "models:/visionflow-detector-yolo@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ping", proc, timeout=150)
        images = []
        for seed in range(3):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
            images.append([base64.b64encode(buf.getvalue()).decode()])
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": images}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            answer = json.loads(resp.read())
        predictions = answer["predictions"]
        assert len(predictions) == 3
        for row in predictions:
            assert set(row) >= {"boxes", "labels", "scores"}
            assert all(len(b) == 4 and 0 <= b[0] <= b[2] <= 64.5 and 0 <= b[1] <= b[3] <= 48.5 for b in row["boxes"])
            assert set(row["labels"]) <= {"circle", "square"}
        bad = json.dumps({"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}}).encode()
        try:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=bad, headers={"Content-Type": "application/json"}), timeout=60)
            raise AssertionError("a non-image must be refused")
        except urllib.error.HTTPError as err:
            assert err.code in (400, 500) and "not" in err.read().decode().lower()
    finally:
        stop_process_group(proc)
