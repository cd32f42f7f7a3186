"""The registered pyfunc's `predict` is type-hinted (no MLflow "Add type hints" warning) and still serves its signature."""

from __future__ import annotations

import base64
import io
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import write_tiny_checkpoint
from PIL import Image

HINT_WARNING = "Add type hints to the `predict` method"


def png(seed: int, size: tuple[int, int] = (40, 56)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def hint_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if HINT_WARNING in str(w.message)]


@pytest.fixture()
def logged_detector(tmp_path, tracking_cfg):
    """A tiny YOLO logged as the register stage logs it (models-from-code pyfunc); yields its model URI."""
    import mlflow

    from components import tracking

    ckpt = write_tiny_checkpoint(tmp_path / "yolo.pt", task="detection", model_name="yolo", categories=["circle", "square"],
                                 image_size=64, model_args={"num_classes": 2, "image_size": 64, "S": 4, "hidden": 32})
    tracking.connect(tracking_cfg)
    with mlflow.start_run():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            uri = tracking.log_pyfunc_model(checkpoint=ckpt, task="detection", example_images=[png(0)])
    assert hint_warnings(caught) == []  # logging does not warn either
    return uri


def test_pyfunc_predict_is_type_hinted_and_predicts_any_batch(logged_detector):
    import mlflow
    from mlflow.pyfunc import PythonModel

    with warnings.catch_warnings(record=True) as control:  # the check can see the warning: an unhinted predict raises it
        warnings.simplefilter("always")

        class Unhinted(PythonModel):
            def predict(self, context, model_input, params=None):
                return model_input

    assert hint_warnings(control), "MLflow no longer warns about unhinted predict: update this test"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model(logged_detector)  # executes the model's code: defines VisionflowModel
        one = model.predict(pd.DataFrame({"image": [png(1)]}))
        three = model.predict(pd.DataFrame({"image": [png(2), base64.b64encode(png(3)).decode(), np.zeros((30, 20, 3), np.uint8)]}))
    assert hint_warnings(caught) == []
    assert len(one) == 1 and len(three) == 3
    assert {"boxes", "labels", "scores"} <= set(three.columns)
    assert all(0 <= b[0] <= b[2] <= 20 + 1e-3 and 0 <= b[1] <= b[3] <= 30 + 1e-3 for b in three.iloc[2]["boxes"])
    signature = model.metadata.signature  # the explicit signature stands (a DataFrame hint infers none)
    assert signature.inputs.input_names() == ["image"]
    assert {"boxes", "labels", "scores"} <= set(signature.outputs.input_names())


def test_scoring_server_answers_a_dataframe_split_request(logged_detector):
    import mlflow
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    model = mlflow.pyfunc.load_model(logged_detector)
    client = TestClient(scoring_server.init(model))
    images = [[base64.b64encode(png(seed)).decode()] for seed in range(3)]
    answer = client.post("/invocations", json={"dataframe_split": {"columns": ["image"], "data": images}})
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert len(predictions) == 3
    direct = model.predict(pd.DataFrame({"image": [row[0] for row in images]}))
    for row, (_, expected) in zip(predictions, direct.iterrows(), strict=True):
        assert row["labels"] == list(expected["labels"]) and np.allclose(row["scores"], expected["scores"])
    bad = client.post("/invocations", json={"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}})
    assert bad.status_code in (400, 500) and "not an image" in bad.text
