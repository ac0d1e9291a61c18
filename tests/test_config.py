"""Config: recipes load into typed dataclasses; every mistake fails at start-up naming the key."""

import dataclasses
import re
import subprocess
import sys

import pytest
import yaml

from carbrand.config import PRECISIONS, Config, load_config
from carbrand.errors import ConfigError
from carbrand.precision import AUTOCAST_DTYPES
from tests.helpers.paths import REPO


def test_default_yaml_documents_every_key_with_its_default():
    text = (REPO / "configs/default.yaml").read_text()
    assert load_config(REPO / "configs/default.yaml") == Config()
    for section in dataclasses.fields(Config):
        for field in dataclasses.fields(section.default_factory()):
            assert re.search(rf"^  {field.name}: .*# \S", text, re.M), f"{section.name}.{field.name} undocumented"


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_recipe_loads(recipe):
    load_config(REPO / "configs" / recipe)


def test_overrides_are_typed(tmp_path):
    config = load_config(None, ["optim.lr=0.05", "data.batch_size=8", "train.channels_last=false",
                                "model.pretrained=/weights/r50 (v2).pt", "wandb.tags=[a, b]", "optim.warmup_epochs=2"])
    assert config.optim.lr == 0.05
    assert config.data.batch_size == 8
    assert config.train.channels_last is False
    assert config.model.pretrained == "/weights/r50 (v2).pt"
    assert config.wandb.tags == ["a", "b"]
    assert config.optim.warmup_epochs == 2.0 and isinstance(config.optim.warmup_epochs, float)


def test_exponent_notation_is_a_float():
    """YAML 1.1 (PyYAML) leaves 1e-3 and 1.0e3 as strings; for a float key they are what the user meant."""
    config = load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5.0e2", "optim.momentum=.5E-1"])
    assert (config.optim.lr, config.optim.weight_decay, config.optim.momentum) == (0.001, 500.0, 0.05)
    with pytest.raises(ConfigError, match="'data.batch_size' must be of type int"):
        load_config(None, ["data.batch_size=1e3"])
    with pytest.raises(ConfigError, match="'optim.lr' must be of type float"):
        load_config(None, ["optim.lr=1e"])


def test_override_wins_over_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"batch_size": 32}, "train": {"epochs": 3}}))
    config = load_config(recipe, ["data.batch_size=4"])
    assert (config.data.batch_size, config.train.epochs) == (4, 3)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=0.1", "optim.lrr"),
        ("dataa.batch_size=1", "dataa"),
        ("data.batch_size=-4", "data.batch_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.batch_size=4.5", "data.batch_size"),
        ("data.batch_size=many", "data.batch_size"),
        ("data.loader=pillow", "data.loader"),
        ("train.precision=fp8", "train.precision"),
        ("train.channels_last=maybe", "train.channels_last"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=true", "optim.lr"),
        ("model.arch=", "model.arch"),
        ("model.pretrained_key_map=lukemelas", "model.pretrained_key_map"),
        ("data.eval_image_size=16", "data.eval_image_size"),
        ("data.eval_crops=0", "data.eval_crops"),
        ("data.eval_crops=9", "data.eval_crops"),
        ("data.mean=[0.5,0.5]", "data.mean"),
        ("data.std=[0.5,0.5,0]", "data.std"),
        ("optim.backbone_lr_scale=-1", "optim.backbone_lr_scale"),
        ("model.drop_rate=1.0", "model.drop_rate"),
        ("model.drop_path_rate=0.1", "model.drop_path_rate"),  # the default arch is torchvision's ResNet-50: it has none
        ("train.label_smoothing=1.0", "train.label_smoothing"),
        ("wandb.tags=notalist", "wandb.tags"),
        ("data=3", "data"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        load_config(None, [override])


def test_malformed_override_and_files(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)


def test_yaml_is_loaded_safely(tmp_path):
    """A Python-object tag must never construct anything."""
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    evil.write_text(f"data: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError):
        load_config(evil)
    assert not marker.exists()


def test_cli_bad_config_is_one_line_and_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "carbrand.cli", "train", "--config", str(REPO / "configs/cars5_cpu.yaml"),
                             "data.batch_size=-1"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.batch_size" in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()  # nothing written on a usage error


def test_yaml_no_and_off_stay_strings_only_true_false_are_booleans(tmp_path):
    """YAML 1.1 reads `no` as false; `precision: no` must mean the precision called "no"."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  precision: no\n  channels_last: false\n")
    config = load_config(recipe, ["model.compile=true"])
    assert config.train.precision == "no" and config.train.channels_last is False and config.model.compile is True
    assert load_config(None, ["train.precision=no"]).train.precision == "no"
    with pytest.raises(ConfigError, match="'train.channels_last' must be of type bool, got 'off'"):
        load_config(None, ["train.channels_last=off"])


def test_every_precision_name_has_an_autocast_dtype():
    """config.PRECISIONS validates train.precision without torch; precision.AUTOCAST_DTYPES gives each its meaning,
    but auto, which resolve_precision turns into one of the others before torch sees it."""
    assert set(AUTOCAST_DTYPES) == set(PRECISIONS) - {"auto"}
    assert Config().train.precision == "auto"
