"""`sam3d weights import | list | verify | remove` on an official-layout folder made by the official code."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from sam3d_core.cli.main import main
from sam3d_core.pipeline.stage1 import Stage1Pipeline
from sam3d_core.weights import hub
from sam3d_core.weights.convert import CheckpointError, stage1_config_from_official

OFFICIAL = Path(__file__).parent / "fixtures" / "stage1_small" / "official"


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture()
def official_copy(tmp_path) -> Path:
    dst = tmp_path / "checkpoints"
    shutil.copytree(OFFICIAL, dst)
    return dst


def test_config_from_official_yaml_matches_the_reduced_sizes():
    cfg = stage1_config_from_official(OFFICIAL)
    assert (cfg.condition.dino.embed_dim, cfg.condition.dino.depth, cfg.condition.dino.num_heads) == (64, 2, 2)
    assert cfg.condition.dino.image_size == cfg.preprocess.image_size == 70
    assert cfg.condition.pointmap.input_size == 40 and cfg.condition.pointmap.embed_dim == 32
    assert (cfg.flow.model_channels, cfg.flow.num_blocks, cfg.flow.num_heads) == (64, 2, 2)
    assert cfg.decoder.channels == (32, 16, 8)


def test_official_yamls_give_the_official_preset():
    from sam3d_core.registry import stage1_preset

    folder = Path(__file__).parents[2] / "shared" / "reference" / "official_configs"
    if not folder.is_dir():  # CI keeps shared/ beside the checkout; elsewhere use the fixture's parent
        pytest.skip(f"{folder} is not present on this machine")
    assert stage1_config_from_official(folder) == stage1_preset("official")


def test_import_official_folder_then_load(home, official_copy):
    rep = hub.import_official(official_copy)
    assert rep.folder == home / "models" / "official"
    manifest = json.loads((rep.folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"ss_generator.safetensors", "ss_decoder.safetensors", "stage1.json"}
    assert set(manifest["sources"]) == {"ss_generator.ckpt", "ss_decoder.ckpt"}
    assert hub.verify("official") == []
    pipe = Stage1Pipeline.from_pretrained("official", device="cpu")
    raw = torch.load(official_copy / "ss_decoder.ckpt", weights_only=True)
    key = next(iter(raw))
    torch.testing.assert_close(pipe.model.decoder.state_dict()[key], raw[key].float(), rtol=0, atol=0)
    assert pipe.weights_id.startswith("sha256:")
    assert [m["name"] for m in hub.list_models()] == ["official"]


def test_import_refuses_to_overwrite_unless_asked(home, official_copy):
    hub.import_official(official_copy)
    with pytest.raises(CheckpointError, match="already exists"):
        hub.import_official(official_copy)
    hub.import_official(official_copy, overwrite=True)


def test_truncated_checkpoint_is_rejected_with_the_fix(home, official_copy):
    ckpt = official_copy / "ss_generator.ckpt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        hub.import_official(official_copy)
    assert "ss_generator.ckpt" in str(e.value) and "re-download" in str(e.value)
    assert not (home / "models" / "official").exists()


def test_mismatched_checkpoint_lists_missing_unexpected_and_shapes(home, official_copy):
    path = official_copy / "ss_generator.ckpt"
    ckpt = torch.load(path, weights_only=True)
    sd = ckpt["state_dict"]
    gen = "_base_models.generator.reverse_fn.backbone."
    del sd[gen + "t_embedder.mlp.0.weight"]
    sd[gen + "blocks.0.mlp.shape.mlp.0.bias"] = torch.zeros(7)
    sd[gen + "blocks.99.extra.weight"] = torch.zeros(3)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as e:
        hub.import_official(official_copy)
    msg = str(e.value)
    assert "1 missing tensors: generator.t_embedder.mlp.0.weight" in msg
    assert "1 unexpected tensors: generator.blocks.99.extra.weight" in msg
    assert "shape of generator.blocks.0.mlp.shape.mlp.0.bias: file (7,)" in msg


def test_missing_file_names_it_and_where_to_get_it(home, official_copy):
    (official_copy / "ss_decoder.ckpt").unlink()
    with pytest.raises(CheckpointError, match=r"missing ss_decoder\.ckpt .*facebook/sam-3d-objects"):
        hub.import_official(official_copy)


class _Payload:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_checkpoint_with_pickled_code_is_refused(home, official_copy):
    path = official_copy / "ss_decoder.ckpt"
    sd = torch.load(path, weights_only=True)
    sd["evil"] = _Payload()
    torch.save(sd, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match="refusing to load"):
        hub.import_official(official_copy)


def test_wrong_yaml_target_is_rejected(home, official_copy):
    y = official_copy / "ss_decoder.yaml"
    y.write_text(y.read_text().replace("SparseStructureDecoderTdfyWrapper", "SomethingElse"))
    with pytest.raises(CheckpointError, match="_target_"):
        hub.import_official(official_copy)


def test_verify_detects_a_modified_file_and_load_refuses_it(home, official_copy):
    rep = hub.import_official(official_copy)
    f = rep.folder / "ss_decoder.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert any("sha256" in p for p in hub.verify("official"))
    with pytest.raises(CheckpointError, match="integrity"):
        Stage1Pipeline.from_pretrained("official", device="cpu")


def test_cli_weights_commands(home, official_copy, capsys):
    assert main(["weights", "import", str(official_copy)]) == 0
    assert main(["weights", "list"]) == 0
    assert "official" in capsys.readouterr().out
    assert main(["weights", "verify", "official"]) == 0
    assert main(["weights", "remove", "official"]) == 0
    assert main(["weights", "verify", "official"]) == 2  # now missing: a clear error, not a traceback
    assert "no imported model 'official'" in capsys.readouterr().err


STAGE2 = Path(__file__).parent / "fixtures" / "stage2_small" / "official"


def test_stage2_yamls_give_the_tiny_stage2_preset():
    from sam3d_core.registry import stage2_preset
    from sam3d_core.weights.convert import stage2_config_from_official

    assert stage2_config_from_official(STAGE2) == stage2_preset("tiny")


def test_import_both_stages_from_one_folder_like_the_release(home, tmp_path):
    both = tmp_path / "release"
    shutil.copytree(OFFICIAL, both)
    for f in STAGE2.iterdir():  # its pipeline.yaml names both stages' files
        shutil.copy(f, both / f.name)
    rep = hub.import_official(both)
    assert rep.stages == ("stage1", "stage2")
    manifest = json.loads((rep.folder / "manifest.json").read_text())
    assert {
        "stage1.json",
        "stage2.json",
        "slat_generator.safetensors",
        "slat_decoder_gs.safetensors",
        "slat_decoder_mesh.safetensors",
    } <= set(manifest["files"])
    cfg, state, _ = hub.load_stage2_state("official")
    raw = torch.load(STAGE2 / "slat_decoder_mesh.ckpt", weights_only=True)
    key = next(iter(raw))
    torch.testing.assert_close(state[f"decoder_mesh.{key}"], raw[key], rtol=0, atol=0)
    assert hub.load_stage1_state("official")[0].flow.num_blocks == 2


def test_stage2_only_folder_has_no_stage1(home, tmp_path):
    dst = tmp_path / "s2"
    shutil.copytree(STAGE2, dst)
    rep = hub.import_official(dst)
    assert rep.stages == ("stage2",)
    with pytest.raises(CheckpointError, match="has no stage1 weights"):
        hub.load_stage1_state("official")


def test_stage2_mismatched_decoder_is_rejected(home, tmp_path):
    dst = tmp_path / "s2"
    shutil.copytree(STAGE2, dst)
    sd = torch.load(dst / "slat_decoder_gs.ckpt", weights_only=True)
    sd["out_layer.weight"] = sd["out_layer.weight"][:-1]
    torch.save(sd, dst / "slat_decoder_gs.ckpt")
    with pytest.raises(CheckpointError, match=r"shape of decoder_gs\.out_layer\.weight"):
        hub.import_official(dst)


def test_folder_without_any_generator_yaml(home, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither ss_generator.yaml nor slat_generator.yaml"):
        hub.import_official(tmp_path / "empty")
