"""`sam3d weights import` with encoder files: imported when present and right, skipped with a note when empty
(early releases), absent or wrong, never failing the import; fitted encoders added with `save_encoder`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from sam3d_core.cli.main import main
from sam3d_core.config import SLatEncoderConfig, SSEncoderConfig
from sam3d_core.data.latents import LatentEncoder
from sam3d_core.models.slat_vae import SLatEncoder
from sam3d_core.models.ss_vae import SSEncoder
from sam3d_core.models.stages import init_random_weights
from sam3d_core.weights import hub
from sam3d_core.weights.convert import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures"

# The official YAML layout (SparseStructureEncoderTdfyWrapper / SLatEncoderTdfyWrapper constructor arguments) at the
# sizes that fit the tiny stage-1 and stage-2 fixtures.
SS_YAML = """\
_target_: sam3d_objects.model.backbone.tdfy_dit.models.sparse_structure_vae.SparseStructureEncoderTdfyWrapper
in_channels: 1
latent_channels: 8
num_res_blocks: 2
num_res_blocks_middle: 2
channels:
- 8
- 16
- 32
sample_posterior: false
return_raw: true
"""
SLAT_YAML = """\
_target_: sam3d_objects.model.backbone.tdfy_dit.models.structured_latent_vae.encoder.SLatEncoderTdfyWrapper
resolution: 64
in_channels: 64
model_channels: 64
latent_channels: 8
num_blocks: 2
num_heads: 2
mlp_ratio: 4
attn_mode: swin
window_size: 8
use_fp16: true
"""
SS_CFG = SSEncoderConfig(channels=(8, 16, 32))
SLAT_CFG = SLatEncoderConfig(in_channels=64, model_channels=64, num_blocks=2, num_heads=2)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _release(tmp_path: Path, encoders: bool) -> Path:
    """Both stages' official fixture folders in one, like the release (+ encoder files in the official layout)."""
    folder = tmp_path / "release"
    shutil.copytree(FIXTURES / "stage1_small" / "official", folder)
    for f in (FIXTURES / "stage2_small" / "official").iterdir():
        shutil.copy(f, folder / f.name)
    if encoders:
        (folder / "ss_encoder.yaml").write_text(SS_YAML)
        (folder / "slat_encoder.yaml").write_text(SLAT_YAML)
        torch.save(init_random_weights(SSEncoder(SS_CFG), seed=5).state_dict(), folder / "ss_encoder.ckpt")
        torch.save(init_random_weights(SLatEncoder(SLAT_CFG), seed=6).state_dict(), folder / "slat_encoder.ckpt")
    return folder


def test_encoders_are_imported_key_checked_and_usable(tmp_path):
    src = _release(tmp_path, encoders=True)
    rep = hub.import_official(src)
    assert rep.stages == ("stage1", "stage2", "ss_encoder", "slat_encoder")
    assert rep.notes == ()
    manifest = json.loads((rep.folder / "manifest.json").read_text())
    assert {"ss_encoder.safetensors", "ss_encoder.json", "slat_encoder.safetensors", "slat_encoder.json"} <= set(
        manifest["files"]
    )
    assert {"ss_encoder.ckpt", "slat_encoder.ckpt"} <= set(manifest["sources"])
    assert hub.verify("official") == []
    cfg, state, weights_id = hub.load_ss_encoder_state("official")
    assert cfg == SS_CFG and len(weights_id) == 16
    raw = torch.load(src / "ss_encoder.ckpt", weights_only=True)
    assert set(state) == set(raw)
    torch.testing.assert_close(state["out_layer.2.weight"], raw["out_layer.2.weight"], rtol=0, atol=0)
    assert hub.load_slat_encoder_state("official")[0] == SLAT_CFG
    # the DINO that feeds the SLAT encoder: stage 2's image embedder, read alone from the generator file
    dino_cfg, dino_state = hub.load_dino_state("official")
    gen = torch.load(src / "slat_generator.ckpt", weights_only=True)["state_dict"]
    key = "_base_models.condition_embedder.module_list.0.backbone.blocks.1.mlp.fc2.weight"
    torch.testing.assert_close(dino_state["blocks.1.mlp.fc2.weight"], gen[key], rtol=0, atol=0)
    assert dino_cfg.embed_dim == SLAT_CFG.in_channels == 64

    enc = LatentEncoder.from_imported("official", num_views=4)
    assert enc.cfg.num_views == 4 and enc.cfg.dino.image_size == 70
    assert enc.provenance["encoders"].startswith("ss:")
    torch.testing.assert_close(enc.ss_encoder.state_dict()["input_layer.weight"], raw["input_layer.weight"])
    surface = [[50, 32, 32], [13, 32, 32], [32, 50, 32], [32, 13, 32], [32, 32, 50], [32, 32, 13]]  # |c| = 0.29
    out = enc.encode_sample(trimesh.creation.icosphere(radius=0.3), np.array([*surface, [32, 32, 32]]))
    assert len(out["slat_coords"]) in range(1, 7) and all(c in surface for c in out["slat_coords"].tolist())
    assert out["ss_latent"].shape == (8, 16, 16, 16) and np.isfinite(out["slat_feats"]).all()


def test_empty_encoder_files_of_early_releases_are_skipped_with_a_note(tmp_path, capsys):
    src = _release(tmp_path, encoders=False)
    for name in ("ss_encoder.yaml", "ss_encoder.ckpt", "ss_encoder.safetensors"):  # the first release: 0 bytes
        (src / name).write_bytes(b"")
    (src / "slat_encoder.yaml").write_bytes(b"")
    assert main(["weights", "import", str(src)]) == 0
    out = capsys.readouterr().out
    assert "imported stage1 + stage2:" in out
    assert "note: ss_encoder not imported: ss_encoder.yaml and ss_encoder.ckpt are empty (0 bytes" in out
    assert "note: slat_encoder not imported: slat_encoder.yaml is empty (0 bytes" in out
    assert "sam3d weights fit-encoder" in out
    manifest = json.loads((hub.resolve_model_dir("official") / "manifest.json").read_text())
    assert manifest["stages"] == ["stage1", "stage2"]
    assert not any(f.startswith(("ss_encoder", "slat_encoder")) for f in manifest["files"])
    with pytest.raises(CheckpointError, match="has no ss_encoder weights.*fit-encoder"):
        LatentEncoder.from_imported("official")


def test_folder_without_encoders_notes_it(tmp_path):
    rep = hub.import_official(_release(tmp_path, encoders=False))
    assert rep.stages == ("stage1", "stage2")
    assert rep.notes == (
        f"ss_encoder not imported: no ss_encoder.yaml in the folder; {hub.FIT_ENCODER_HINT}",
        f"slat_encoder not imported: no slat_encoder.yaml in the folder; {hub.FIT_ENCODER_HINT}",
    )


def test_a_mismatched_encoder_is_skipped_and_the_rest_imported(tmp_path):
    src = _release(tmp_path, encoders=True)
    sd = torch.load(src / "ss_encoder.ckpt", weights_only=True)
    sd["out_layer.2.weight"] = sd["out_layer.2.weight"][:-1]
    del sd["blocks.0.conv1.bias"]
    torch.save(sd, src / "ss_encoder.ckpt")
    rep = hub.import_official(src)
    assert rep.stages == ("stage1", "stage2", "slat_encoder")
    (note,) = rep.notes
    assert note.startswith("ss_encoder not imported:")
    assert "1 missing tensors: blocks.0.conv1.bias" in note
    assert "shape of out_layer.2.weight: file (15, 32, 3, 3, 3), model (16, 32, 3, 3, 3)" in note
    assert hub.verify("official") == []


def test_encoder_that_does_not_fit_its_stage_and_unknown_yaml_are_skipped(tmp_path):
    src = _release(tmp_path, encoders=True)
    (src / "slat_encoder.yaml").write_text(SLAT_YAML.replace("in_channels: 64", "in_channels: 1024"))
    (src / "ss_encoder.yaml").write_text(SS_YAML.replace("SparseStructureEncoderTdfyWrapper", "SomethingElse"))
    rep = hub.import_official(src)
    assert rep.stages == ("stage1", "stage2")
    assert "ss_encoder not imported: ss_encoder.yaml: _target_ is" in rep.notes[0]
    assert "slat_encoder not imported: slat_encoder maps 1024 -> 8 channels; stage 2 has DINO width 64" in rep.notes[1]


def test_safetensors_encoder_weights_are_read_when_the_ckpt_is_empty(tmp_path):
    from safetensors.torch import save_file

    src = _release(tmp_path, encoders=True)
    sd = torch.load(src / "ss_encoder.ckpt", weights_only=True)
    (src / "ss_encoder.ckpt").write_bytes(b"")
    save_file(sd, str(src / "ss_encoder.safetensors"))
    rep = hub.import_official(src)
    assert "ss_encoder" in rep.stages
    manifest = json.loads((rep.folder / "manifest.json").read_text())
    assert "ss_encoder.safetensors" in manifest["sources"] and "ss_encoder.ckpt" not in manifest["sources"]
    torch.testing.assert_close(hub.load_ss_encoder_state("official")[1]["input_layer.weight"], sd["input_layer.weight"])


def test_save_encoder_adds_a_fitted_encoder_and_refuses_to_replace_it(tmp_path):
    hub.import_official(_release(tmp_path, encoders=False))
    enc = init_random_weights(SSEncoder(SS_CFG), seed=9)
    info = {"held_out_iou": 0.93}
    folder = hub.save_encoder("official", "ss_encoder", SS_CFG, enc.state_dict(), info)
    assert hub.verify("official") == []
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["stages"] == ["stage1", "stage2", "ss_encoder"] and manifest["fitted"]["ss_encoder"] == info
    assert hub.has_stage("official", "ss_encoder")
    cfg, state, _ = hub.load_ss_encoder_state("official")
    assert cfg == SS_CFG and torch.equal(state["input_layer.weight"], enc.state_dict()["input_layer.weight"])
    with pytest.raises(CheckpointError, match="already has a ss_encoder; pass overwrite=True"):
        hub.save_encoder("official", "ss_encoder", SS_CFG, enc.state_dict(), info)
    bad = dict(enc.state_dict())
    bad.pop("out_layer.2.bias")
    with pytest.raises(CheckpointError, match="1 missing tensors: out_layer.2.bias"):
        hub.save_encoder("official", "ss_encoder", SS_CFG, bad, info, overwrite=True)
    assert not list(folder.glob(".*"))  # no temporary files left behind


def test_sam3d_data_captures_with_the_imported_encoder_writes_the_latents(tmp_path):
    """End to end: `sam3d data captures --encoder official` resolves LatentEncoder.load and stores its targets."""
    from PIL import Image

    from sam3d_core.data.sample import SampleDataset
    from sam3d_core.geometry import frames

    hub.import_official(_release(tmp_path, encoders=True))
    cap = tmp_path / "caps" / "cube"
    cap.mkdir(parents=True)
    cube = trimesh.creation.box(extents=(0.2, 0.2, 0.2))
    cube.visual = trimesh.visual.ColorVisuals(cube, vertex_colors=np.tile([200, 40, 40, 255], (8, 1)))
    K = np.array([[150.0, 0.0, 80.0], [0.0, 150.0, 60.0], [0.0, 0.0, 1.0]])
    matrix = np.eye(4)
    matrix[:3, 3] = [0.05, -0.02, 1.0]
    uv = frames.project_points_opencv(frames.transform_points(matrix, cube.vertices), K)
    mask = frames.rasterize_triangles(uv, cube.faces, 160, 120)
    Image.fromarray(np.where(mask[..., None], 200, 40).astype(np.uint8).repeat(3, 2)).save(cap / "photo.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(cap / "mask.png")
    cube.export(cap / "mesh.obj")
    (cap / "camera.json").write_text(json.dumps({"K": K.tolist()}))
    (cap / "pose.json").write_text(json.dumps({"matrix": matrix.tolist(), "convention": "opencv"}))
    out = tmp_path / "out"
    assert main(["data", "captures", str(tmp_path / "caps"), "--out", str(out), "--encoder", "official"]) == 0
    s = SampleDataset(out)[0]
    assert s.ss_latent.shape == (8, 16, 16, 16) and np.isfinite(s.ss_latent).all()
    # a surface cube filling the grid: every occupied voxel lies on the outside, so every one is seen
    assert sorted(s.slat_coords.tolist()) == sorted(s.occupancy.tolist()) and s.slat_feats.shape == (
        len(s.occupancy),
        8,
    )
