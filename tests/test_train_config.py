"""The training configuration: recipes, TOML round trip, and the messages for bad configurations."""

from __future__ import annotations

import dataclasses

import pytest

from sam3d_core.training.config import RECIPES, ConfigError, LossWeights, TrainConfig, describe, load_config, recipe


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_every_field_is_documented():
    for cls in (TrainConfig, LossWeights):
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("doc", "")) > 10, f"{cls.__name__}.{f.name} has no documentation"


def test_recipes_are_complete_and_valid(tmp_path):
    assert set(RECIPES) == {"sft-stage1", "sft-stage2", "lora-stage1", "dpo-stage1", "dpo-stage2", "shortcut-stage1"}
    for name in RECIPES:
        cfg = recipe(name, data=("d",), output=str(tmp_path / name)).check()
        assert cfg.recipe == name
    assert recipe("dpo-stage1").loss_weights == LossWeights(shape=1.0, rotation=0.0, translation=0.0, scale=0.0)
    assert recipe("sft-stage1").loss_weights.by_latent() == {
        "shape": 1.0, "6drotation_normalized": 0.1, "translation": 1.0, "scale": 0.1, "translation_scale": 0.0,
    }  # fmt: skip
    assert recipe("shortcut-stage1").stage == 1 and recipe("dpo-stage2").params == "lora"


def test_toml_round_trip_through_the_template(tmp_path):
    cfg = recipe("dpo-stage1", data=("a", "b"), output="out", steps=7, lr=3e-6)
    path = write(tmp_path, describe(cfg))
    back = load_config(path)
    # relative paths are taken from the file's folder
    assert back.data == (str(tmp_path / "a"), str(tmp_path / "b")) and back.output == str(tmp_path / "out")
    assert dataclasses.replace(back, data=cfg.data, output=cfg.output) == cfg


def test_a_toml_file_starts_from_a_recipe_and_overrides_it(tmp_path):
    path = write(
        tmp_path, 'recipe = "lora-stage1"\ndata = ["s"]\noutput = "o"\nlora_rank = 4\n[loss_weights]\nscale = 0.5\n'
    )
    cfg = load_config(path)
    assert cfg.params == "lora" and cfg.lora_rank == 4 and cfg.lr == RECIPES["lora-stage1"]["lr"]
    assert cfg.loss_weights.scale == 0.5 and cfg.loss_weights.shape == 1.0
    assert load_config(path, recipe_name="sft-stage2").stage == 2


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, 'data = ["s"]\noutput = "o"\nlearning_rate = 1e-4\n')
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate'; known keys: .*\blr\b"):
        load_config(path)
    path = write(tmp_path, 'data = ["s"]\noutput = "o"\nbatchsize = 4\n')
    with pytest.raises(ConfigError, match=r"unknown key 'batchsize'; did you mean 'batch_size'\?"):
        load_config(path)
    path = write(tmp_path, 'data = ["s"]\noutput = "o"\n[loss_weights]\nrot = 0.1\n')
    with pytest.raises(ConfigError, match=r"unknown key 'loss_weights.rot'"):
        load_config(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ('steps = "100"', r"steps = '100' \(str\): expected an integer"),
        ("lr = true", r"lr = True \(bool\): expected a number"),
        ('data = "folder"', r"data = 'folder' \(str\): expected a list of strings"),
        ("betas = [0.9]", r"betas = \[0.9\] \(list\): expected a list of 2 numbers"),
        ("grad_checkpointing = 1", r"grad_checkpointing = 1 \(int\): expected true or false"),
        ("loss_weights = 3", r"loss_weights = 3 \(int\): expected a table \[LossWeights\]"),
    ],
)
def test_wrong_types_are_named(tmp_path, line, message):
    base = {"data": 'data = ["s"]', "output": 'output = "o"'}
    key = line.split(" =")[0]
    lines = [v for k, v in base.items() if k != key] + [line]
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "\n".join(lines) + "\n"))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(objective="ppo"), r"objective = 'ppo': expected one of flow, dpo, shortcut"),
        (dict(stage=3), r"stage = 3: expected 1"),
        (dict(objective="shortcut", stage=2), r"shortcut' is for stage 1 only"),
        (dict(p_uncond=1.5), r"p_uncond = 1.5: expected a probability"),
        (dict(data=()), r"data is empty"),
        (dict(name="../x"), r"name = '../x': a name, not a path"),
        (dict(steps=0), r"steps = 0: expected an integer >= 1"),
    ],
)
def test_impossible_values_are_named(change, message):
    cfg = dataclasses.replace(TrainConfig(data=("d",), output="o"), **change)
    with pytest.raises(ConfigError, match=message):
        cfg.check()


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file; write one with `sam3d train --template"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "steps = = 3\n"))
    with pytest.raises(ConfigError, match="unknown recipe 'sft'"):
        recipe("sft")
