"""params.yaml validation: unknown keys, wrong types, out-of-range values and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from components.config import Params, apply_overrides, load_params, parse_override
from components.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_are_the_schema_defaults():
    """params.yaml validates, and every knob in the schema is written out in it."""
    params = load_params(REPO / "params.yaml")
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(tree) == set(Params.model_fields)
    assert params.detect.yolo.S >= 1


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("detect.yolo.S=abc", "detect.yolo.S"),
        ("detect.yolo.lambda_cord=5", "allowed keys"),
        ("detect.architectures=[yolo, bogus]", "allowed values"),
        ("data.split.train=0.5", "sum to 1"),
        ("augment.hflip=1.5", "augment.hflip"),
        ("segment.unet.depth=0", "segment.unet.depth"),
        ("nonsense.key=1", "nonsense"),
    ],
)
def test_invalid_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_params(REPO / "params.yaml", [override])
    assert needle in str(info.value)
    assert "params.yaml" in str(info.value)


def test_overrides_are_parsed_as_yaml_and_applied():
    params = load_params(REPO / "params.yaml", ["detect.yolo.lambda_coord=2.5", "data.strict=true", "detect.architectures=[yolo, ssd]"])
    assert params.detect.yolo.lambda_coord == 2.5
    assert params.data.strict is True
    assert params.detect.architectures == ["yolo", "ssd"]


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("detect.yolo.S")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("detect..S=1")
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_broken_yaml_names_the_position(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data:\n  source: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_params(bad)
    assert str(bad) in str(info.value) and "line" in str(info.value)


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="--params"):
        load_params(tmp_path / "nope.yaml")


def test_sections_are_frozen():
    params = Params()
    with pytest.raises(ValidationError, match="frozen"):
        params.data.seed = 3  # type: ignore[misc]


def test_architecture_names_are_the_model_registry_s():
    """The params schema has one section per registered detector/segmenter, and its lists name exactly those."""
    from components.config import DETECTOR_ARCHS, SEGMENTER_ARCHS, DetectConfig, SegmentConfig
    from components.models import list_models

    assert set(DETECTOR_ARCHS) == set(list_models("detection"))
    assert set(SEGMENTER_ARCHS) == set(list_models("segmentation"))
    assert set(DETECTOR_ARCHS) <= set(DetectConfig.model_fields) and set(SEGMENTER_ARCHS) <= set(SegmentConfig.model_fields)


def test_removed_dataset_keys_are_refused_with_the_fix(tmp_path):
    """One dataset drives the pipeline: detect/segment.dataset are refused in one short line naming data.out."""
    with pytest.raises(ConfigError) as err:
        load_params(Path(__file__).resolve().parents[1] / "params.yaml", ["segment.dataset=data/other"])
    message = str(err.value)
    assert "segment.dataset is no longer a key" in message and "data.out" in message and len(message) < 400
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", ["data.out=data/own"])
    assert params.detect.dataset == params.segment.dataset == "data/own"
