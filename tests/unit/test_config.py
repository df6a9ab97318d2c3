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
    with pytest.raises(ConfigError, match=r"data.name \(e.g. pneumoniamnist\) or data.path .* is required"):
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


# --- numeric audit (issue 11: negative counts and strengths refused by the config) -----------------

BASE = {"name": "n", "data": {"name": "pneumoniamnist"}}


def _with(section: str, key: str, value):
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    if section:
        d.setdefault(section, {})[key] = value
    else:
        d[key] = value
    return d


@pytest.mark.parametrize("section,key,value", [
    ("", "seed", -1), ("", "seed", 2**32),
    ("data", "size", 0), ("data", "size", -28),
    ("data", "val_fraction", -0.1), ("data", "test_fraction", 1.0),
    ("data", "pixel_spacing", float("inf")), ("data", "pixel_spacing", -0.5),
    ("data", "max_samples", 0),
    ("train", "epochs", -1), ("train", "batch_size", 0), ("train", "lr", float("inf")), ("train", "lr", -1e-3),
    ("train", "lr", float("nan")), ("train", "weight_decay", float("inf")), ("train", "warmup_epochs", -1),
    ("train", "undersample_ratio", float("inf")), ("train", "label_smoothing", -0.1),
    ("train", "num_threads", 0), ("train", "early_stopping_patience", 0),
    ("evaluation", "bootstrap", -5), ("evaluation", "ci", 1.0),
    ("segmentation", "patches_per_epoch", -1), ("segmentation", "min_size", -1),
    ("segmentation", "sw_batch_size", 0), ("segmentation", "largest_components", 0),
    ("segmentation", "foreground_ratio", 1.5), ("segmentation", "overlap", -0.25),
    ("segmentation", "tversky_alpha", -0.3), ("segmentation", "val_every", 0),
])
def test_negative_or_out_of_range_numbers_are_refused(section, key, value):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_with(section, key, value))
    msg = str(e.value)
    assert (f"{section}.{key}" if section else f"'{key}'") in msg and "\n" not in msg


@pytest.mark.parametrize("section,key,value", [
    ("augment", "noise", -0.1), ("augment", "rotate", -10), ("augment", "brightness", 2.0),
    ("augment", "hflip", float("nan")), ("augment", "scale", float("inf")),
])
def test_augmentation_strengths_are_bounded(section, key, value):
    d = _with("train", "augment", {key: value})
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert f"train.augment.{key}" in str(e.value)


@pytest.mark.parametrize("over,needle", [
    ({"data": {"name": "pneumoniamnist", "val_fraction": 0.5, "test_fraction": 0.5}}, "data.val_fraction"),
    ({"data": {"name": "pneumoniamnist", "val_fraction": 0.3, "test_fraction": 0.7}}, "below 1"),
    ({"segmentation": {"loss": "tversky", "tversky_alpha": 0, "tversky_beta": 0}}, "tversky"),
    ({"segmentation": {"label_values": [0, 0]}}, "label_values"),
    ({"segmentation": {"label_values": [0]}}, "label_values"),
    ({"segmentation": {"label_values": [0, 1, 2], "class_names": ["bg", "a"]}}, "class_names"),
    ({"segmentation": {"class_names": ["bg", "bg"]}}, "class_names"),
    ({"data": {"name": "pneumoniamnist", "patient_pattern": "Image_(\\d+"}}, "data.patient_pattern"),
])
def test_combinations_that_cannot_work_are_refused(over, needle):
    d = {**BASE, **over}
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_every_scalar_number_in_the_config_has_a_lower_bound():
    """Audit: a new count, strength or fraction cannot be added without a range."""
    import types
    import typing

    from annotated_types import Ge, Gt

    from medlens.config import (AugmentConfig, DataConfig, EvalConfig, ExperimentConfig, ModelConfig,
                                SegmentationConfig, TrainConfig)

    unbounded = []
    for model in (ExperimentConfig, DataConfig, ModelConfig, AugmentConfig, TrainConfig, EvalConfig,
                  SegmentationConfig):
        for name, f in model.model_fields.items():
            ann = f.annotation  # int, float, or one of them | None
            scalar = set(typing.get_args(ann)) - {type(None)} if isinstance(ann, types.UnionType) else {ann}
            if scalar not in ({int}, {float}):
                continue
            if not any(isinstance(m, (Ge, Gt)) for m in f.metadata):
                unbounded.append(f"{model.__name__}.{name}")
    assert unbounded == []


def test_shipped_configs_keep_medlens_data_unexpanded():
    from pathlib import Path

    from medlens.config import dump_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "chasedb1_unet.yaml")
    assert cfg.data.path == "$MEDLENS_DATA/chasedb1/CHASEDB1"
    assert "path: $MEDLENS_DATA/chasedb1/CHASEDB1" in dump_config(cfg)
    assert cfg.data.resolved_path().parts[-2:] == ("chasedb1", "CHASEDB1") and "$" not in str(cfg.data.resolved_path())


def test_window_and_clahe_refused_where_they_would_apply_only_at_prediction():
    from medlens.config import config_from_dict

    for source, extra in (("medmnist", {"name": "pneumoniamnist"}), ("hdf5", {"path": "store.h5"})):
        for key, val in (("clahe", True), ("window", "lung")):
            with pytest.raises(ConfigError, match="prepare image files"):
                config_from_dict({"data": {"source": source, key: val, **extra}})
    cfg = config_from_dict({"data": {"source": "folder", "path": "x", "clahe": True, "window": "lung"}})
    assert cfg.data.clahe and cfg.data.window == "lung"
