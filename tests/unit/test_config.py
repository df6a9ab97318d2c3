import pytest

from medlens.config import config_from_dict, load_config
from medlens.errors import ConfigError


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ndata: {name: pneumoniamnist}\ntrain: {lrr: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.lrr" in msg and "train.lr" in msg and str(p) in msg and "\n" not in msg


def test_bad_value_and_missing_name():
    with pytest.raises(ConfigError, match="train.epochs"):
        config_from_dict({"data": {"name": "pneumoniamnist"}, "train": {"epochs": 0}})
    with pytest.raises(ConfigError, match="data.name is required"):
        config_from_dict({"data": {"source": "medmnist"}})
    with pytest.raises(ConfigError, match="threshold"):
        config_from_dict({"data": {"name": "pneumoniamnist"}, "evaluation": {"threshold": "magic"}})


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {name: pneumoniamnist}\n")
    cfg = load_config(p, ["train.epochs=3", "model.params={widths: [4, 8]}"])
    assert cfg.train.epochs == 3 and cfg.model.params == {"widths": [4, 8]}


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert configs
    for c in configs:
        load_config(c)
