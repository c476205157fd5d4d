"""Config loading errors, data sources and their errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.config import RunConfig, TrainConfig, apply_overrides, from_dict, save_config
from stepdistill.data import Digits16, HFDatasetFolder, ImageFolder, PromptFile, build_dataset, load_digits16
from stepdistill.errors import ConfigError, DataError, UserError
from stepdistill.trainers import load_config


def write(path, text):
    path.write_text(text)
    return path


def test_load_config_with_overrides(tmp_path):
    f = write(tmp_path / "c.yaml", "method: teacher\ntrain:\n  max_steps: 10\nmethod_args:\n  num_classes: 3\n")
    cfg = load_config(f, ["train.max_steps=7", "optim.main.lr=0.002", "method_args.block_out_channels=[8,16,16]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.max_steps == 7
    assert cfg.optim["main"].lr == 0.002
    assert cfg.method_args.num_classes == 3 and cfg.method_args.block_out_channels == [8, 16, 16]
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_scientific_notation_without_dot_is_a_float(tmp_path):
    f = write(tmp_path / "c.yaml", "method: teacher\noptim:\n  main:\n    lr: 3e-4\n")
    cfg = load_config(f, ["optim.main.weight_decay=1e-2"])
    assert cfg.optim["main"].lr == 3e-4 and cfg.optim["main"].weight_decay == 0.01


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert from_dict(TrainConfig, {"ema_decay": 1}).ema_decay == 1.0
    with pytest.raises(ConfigError, match="'train.max_steps' expects an integer"):
        from_dict(TrainConfig, {"max_steps": 1.5}, prefix="train")


@pytest.mark.parametrize("override,match", [
    (["train.max_stepz=3"], "unknown config key 'train.max_stepz'"),
    (["train.max_steps=abc"], "'train.max_steps' expects an integer"),
    (["data.center_crop=3"], "'data.center_crop' expects true/false"),
    (["method_args.nope=1"], "unknown config key 'method_args.nope'"),
    (["optim.main.lr=fast"], "'optim.main.lr' expects a number"),
    (["train=3"], "'train' expects a mapping"),
    (["noequals"], "not of the form key=value"),
])
def test_config_errors_name_the_key(tmp_path, override, match):
    f = write(tmp_path / "c.yaml", "method: teacher\n")
    with pytest.raises(ConfigError, match=match):
        load_config(f, override)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "a: [1, 2\n"))
    with pytest.raises(UserError, match="unknown method 'nosuch'"):
        load_config(write(tmp_path / "m.yaml", "method: nosuch\n"))
    with pytest.raises(ConfigError, match="config is for method 'teacher'"):
        load_config(write(tmp_path / "t.yaml", "method: teacher\n"), method="dmd2")


def test_apply_overrides_nested():
    d = apply_overrides({}, ["a.b.c=1", "a.d=[1, 2]", "e=hello"])
    assert d == {"a": {"b": {"c": 1}, "d": [1, 2]}, "e": "hello"}


def test_digits16():
    x, y = load_digits16()
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1
    assert sorted(set(y.tolist())) == list(range(10))
    ds = Digits16()
    item = ds[5]
    assert item["image"].shape == (1, 16, 16) and item["label"] == int(y[5])


def test_image_folder_with_captions(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"im{i}.png", "text": f"cap {i}"})
                                                        for i in range(3)))
    ds = build_dataset(str(tmp_path), resolution=16)
    assert isinstance(ds, ImageFolder) and len(ds) == 3
    item = ds[1]
    assert item["image"].shape == (3, 16, 16) and item["prompt"] == "cap 1"
    assert -1 <= item["image"].min() and item["image"].max() <= 1


def test_image_folder_txt_captions_and_no_captions(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    assert "prompt" not in ImageFolder(tmp_path, 8)[0]
    (tmp_path / "a.txt").write_text("a black square\n")
    assert ImageFolder(tmp_path, 8)[0]["prompt"] == "a black square"


def test_prompt_file(tmp_path):
    f = write(tmp_path / "p.txt", "a cat\n\n  a dog  \n")
    ds = build_dataset(str(f))
    assert isinstance(ds, PromptFile) and ds.prompts == ["a cat", "a dog"]


def test_hf_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = [Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)) for i in range(3)]
    datasets.Dataset.from_dict({"image": imgs, "text": ["x", "y", "z"]}).save_to_disk(str(tmp_path / "ds"))
    ds = build_dataset(str(tmp_path / "ds"), resolution=8)
    assert isinstance(ds, HFDatasetFolder) and len(ds) == 3
    assert ds[2]["image"].shape == (3, 8, 8) and ds[2]["prompt"] == "z"
    with pytest.raises(DataError, match="no column 'img'"):
        build_dataset(str(tmp_path / "ds"), image_column="img")


def test_data_errors_name_the_source(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        build_dataset(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="holds no prompts"):
        build_dataset(str(write(tmp_path / "blank.txt", "\n \n")))
    with pytest.raises(DataError, match="not a prompt file"):
        build_dataset(str(write(tmp_path / "x.csv", "a,b\n")))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png' is unreadable"):
        build_dataset(str(bad), resolution=8)[0]
    unreadable = write(tmp_path / "latin.txt", "")
    unreadable.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(DataError, match="unreadable"):
        PromptFile(unreadable)
