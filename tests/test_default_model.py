"""The default model's training path (issue 14): render packs, on-the-fly views, the VAE fold, the resumable
phases of `sam3d train-default`, split fp16 weights, and the bundled default in the model choice.

Everything runs the real code at the "tiny" preset on the CPU (the "default" preset is the same code at a size
that needs the GPU machine to train: docs/training.md)."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import trimesh

from sam3d_core.data.pack import (
    GRID,
    RenderPack,
    RenderPackDataset,
    ViewSettings,
    jpeg_bytes,
    render_mesh_arrays,
    write_pack,
)
from sam3d_core.data.sample import SampleError
from sam3d_core.data.voxelize import voxelize


class _Asset:
    """What render_mesh_arrays reads from a meshio.Asset."""

    def __init__(self, mesh: trimesh.Trimesh, rgb: tuple[float, float, float]):
        self.vertices = np.asarray(mesh.vertices, np.float64)
        self.faces = np.asarray(mesh.faces, np.int64)
        self.colors = np.tile(np.asarray(rgb, np.float32), (len(self.vertices), 1))
        self.uvs = self.face_texture = None
        self.textures = []


def _local(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    mesh = mesh.copy()
    mesh.apply_translation(-mesh.bounds.mean(axis=0))
    mesh.apply_scale(0.98 / mesh.extents.max())
    return mesh


def make_pack(folder, n_bg: int = 2):
    """Three objects (box, cylinder, sphere) and n_bg plain backgrounds."""
    meshes = [
        (_local(trimesh.creation.box((1.0, 0.6, 0.4))), (0.8, 0.2, 0.2), "box", 0.5),
        (_local(trimesh.creation.cylinder(0.3, 1.0, sections=24)), (0.2, 0.7, 0.3), "cylinder", 0.8),
        (_local(trimesh.creation.icosphere(2)), (0.2, 0.3, 0.8), "sphere", 0.3),
    ]
    verts, faces, cols, occs, objects = [], [], [], [], []
    for mesh, rgb, name, size in meshes:
        v, f, c = render_mesh_arrays(_Asset(mesh, rgb), max_faces=200)
        occ = voxelize(mesh.vertices, mesh.faces)
        grid = np.zeros((GRID,) * 3, bool)
        grid[tuple(occ.T)] = True
        verts.append(v), faces.append(f), cols.append(c), occs.append(np.packbits(grid.reshape(-1)))
        objects.append({"name": name, "group": "other", "size_m": size, "licence": "CC0-1.0", "attribution": "test"})
    rng = np.random.default_rng(0)
    bgs = [jpeg_bytes(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(n_bg)]
    write_pack(folder, verts, faces, cols, occs, objects, bgs, [{"name": "noise", "licence": "CC0-1.0"}] * n_bg, "test")
    return RenderPack.load(folder)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    p = make_pack(tmp_path_factory.mktemp("pack"))
    # the default model's latent grid: [8, 8, 8, 8]
    p.save_latents(np.random.default_rng(1).normal(size=(len(p), 8, 8, 8, 8)).astype(np.float32), {"test": True})
    return RenderPack.load(p.folder)


def test_pack_round_trip_keeps_meshes_occupancy_and_backgrounds(pack):
    assert len(pack) == 3 and pack.num_backgrounds == 2
    v, f, c = pack.mesh(1)
    assert v.dtype == np.float32 and f.max() < len(v) and len(f) <= 200 and c.shape == v.shape
    assert np.abs(v).max() <= 0.5 + 1e-3  # the local frame
    occ = pack.occupancy(0)
    box = _local(trimesh.creation.box((1.0, 0.6, 0.4)))
    expect = np.zeros((GRID,) * 3, bool)
    expect[tuple(voxelize(box.vertices, box.faces).T)] = True
    assert occ.shape == (GRID,) * 3 and (occ == expect).all()
    assert pack.background(1).shape == (48, 64, 3)
    assert pack.latents.shape == (3, 8, 8, 8, 8)


def test_a_pack_without_latents_cannot_train_and_says_how_to_get_them(tmp_path):
    p = make_pack(tmp_path / "p", n_bg=1)
    with pytest.raises(SampleError, match="no stage-1 latents yet"):
        RenderPackDataset(p)


def test_not_a_pack_is_refused_with_the_command_that_makes_one(tmp_path):
    with pytest.raises(SampleError, match="sam3d data pack"):
        RenderPack.load(tmp_path)


def test_rendered_views_are_deterministic_valid_samples_with_exact_targets(pack):
    views = ViewSettings(size=96, p_flat_pointmap=0.0, p_mask_noise=0.0, p_wall=0)
    ds = RenderPackDataset(pack, seed=3, settings=views)
    a, b, c = ds[7], ds[7], ds[8]
    assert (a.photo == b.photo).all() and (a.mask == b.mask).all() and a.sample_id == b.sample_id
    assert a.sample_id != c.sample_id
    for s in (a, c):
        s.check()  # shapes, dtypes, a proper rotation; NaN allowed in the point map only
        assert s.mask.any() and (s.mask <= s.amodal_mask).all()  # visible pixels are part of the object
        obj = int(s.sample_id.split(":")[1])
        assert np.allclose(s.scale, pack.meta["objects"][obj]["size_m"])
        assert (s.ss_latent == pack.latents[obj]).all()
        # The point map is the scene's geometry: where the target is visible, its points lie on the placed object.
        pts = s.pointmap[s.mask]
        assert np.isfinite(pts).all()
        local = (pts - s.translation) @ s.rotation.T / s.scale[0]  # camera -> local (row vectors: p = l s R + t)
        assert np.abs(local).max() < 0.5 + 0.02
        assert np.isnan(s.pointmap[~s.amodal_mask & ~np.isfinite(s.pointmap).all(-1)]).all()


def test_wall_views_give_the_background_a_depth_behind_the_object(pack):
    views = ViewSettings(size=64, p_flat_pointmap=0.0, p_wall=1.0, p_occluded=0, p_occluder=0)
    ds = RenderPackDataset(pack, seed=2, settings=views)
    s = ds[4]
    assert np.isfinite(s.pointmap).all()
    back = s.pointmap[~s.amodal_mask][..., 2]
    assert back.min() > s.translation[2] * 1.29  # behind the object's centre (no occluder hides the wall here)


def test_flat_point_map_views_use_the_no_depth_fallback_plane(pack):
    views = ViewSettings(size=64, p_flat_pointmap=1.0, p_occluded=0, p_occluder=0, p_mask_noise=0)
    s = RenderPackDataset(pack, seed=0, settings=views)[0]
    metric = RenderPackDataset(pack, seed=0, settings=replace(views, p_flat_pointmap=0.0))[0]  # the same scene
    assert np.isfinite(s.pointmap).all() and np.allclose(s.pointmap[..., 2], 1.0)
    # The target is the scene scaled so that the visible surface sits at depth ~1 (relative units, as the product
    # places objects without depth): same rotation, same direction and size-to-distance ratio as the metric pose.
    assert np.allclose(s.rotation, metric.rotation) and (s.photo == metric.photo).all()
    seen = metric.pointmap[metric.mask][:, 2]
    assert np.allclose(s.translation, metric.translation / np.median(seen))
    assert np.allclose(s.scale, metric.scale / np.median(seen))
    assert 0.8 < s.translation[2] < 1.6


def test_a_dataloader_worker_gets_a_working_copy(pack):
    ds = RenderPackDataset(pack, seed=1, settings=ViewSettings(size=64))
    ds[0]  # meshes cached in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._meshes == {} and (clone[0].photo == ds[0].photo).all()


def test_the_analytic_latent_holds_each_blocks_occupied_fraction_in_the_decoders_layout():
    from sam3d_core.models.ss_vae import pixel_shuffle_3d
    from sam3d_core.training.default_model import occupancy_latent

    grid = torch.zeros(1, 1, 64, 64, 64)
    grid[0, 0, 8:12, 20:24, 40:42] = 1  # half of the 4^3 block (2, 5, 10)
    lat = occupancy_latent(grid)
    assert lat.shape == (1, 8, 8, 8, 8) and float(lat.sum()) == 0.5
    # the decoder's pixel shuffle puts channel i*4 + j*2 + k of cell (x, y, z) at block (2x + i, 2y + j, 2z + k)
    frac = pixel_shuffle_3d(lat, 2)  # [1, 1, 16, 16, 16]
    assert float(frac[0, 0, 2, 5, 10]) == 0.5 and float(frac.sum()) == 0.5


def test_a_fresh_flow_model_predicts_zero_and_its_blocks_are_the_identity():
    from sam3d_core.models.ss_flow import latent_shapes
    from sam3d_core.models.stages import Stage1Model
    from sam3d_core.registry import stage1_preset
    from sam3d_core.training.default_model import init_for_training

    model = init_for_training(Stage1Model(stage1_preset("tiny")), 0)
    gen = model.generator
    lat = {k: torch.randn(2, n, c) for k, (n, c) in latent_shapes(gen.cfg).items()}
    cond = torch.randn(2, 5, gen.cfg.cond_channels)
    with torch.no_grad():
        out = gen(lat, torch.tensor([0.3, 0.7]), cond)
    assert all(float(v.abs().max()) == 0.0 for v in out.values())
    tokens = [p for n, p in model.named_parameters() if n.endswith("pos_embed")]
    assert tokens and all(0.005 < float(p.std()) < 0.05 for p in tokens)  # N(0, 0.02^2), not garbage


def test_the_decoder_logit_shift_is_the_one_that_makes_the_surface_right():
    """A decoder whose surface is 2 voxels fat (logit = 7.05 - distance for a ball of radius 5): the shift is -2."""
    from contextlib import nullcontext

    from sam3d_core.training.default_model import calibrate_logit_shift

    ax = torch.arange(24, dtype=torch.float32) - 12
    dist = (ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2).sqrt()
    ball = (dist**2 <= 25)[None, None]  # [1, 1, 24, 24, 24]

    class Fat(torch.nn.Module):
        def forward(self, latent):
            return (7.05 - dist)[None, None].expand(len(latent), 1, 24, 24, 24)

    grids = ball.expand(3, 1, 24, 24, 24)
    shift = calibrate_logit_shift(Fat(), torch.zeros(3, 1), grids, [0, 1, 2], torch.device("cpu"), nullcontext())
    assert shift == -2.0
    assert ((7.05 - dist + shift > 0) == ball[0, 0]).all()


def test_component_files_accept_complete_numbered_parts_only():
    from sam3d_core.weights.hub import component_files
    from sam3d_core.weights.store import CheckpointError

    rec = {"sha256": "0" * 64, "bytes": 1}
    one = {"files": {"ss_decoder.safetensors": rec}}
    assert component_files(one, "ss_decoder") == ["ss_decoder.safetensors"]
    parts = {"files": {f"ss_generator-{k:05d}-of-00003.safetensors": rec for k in (2, 1, 3)}}
    assert component_files(parts, "ss_generator") == [f"ss_generator-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)]
    del parts["files"]["ss_generator-00002-of-00003.safetensors"]
    with pytest.raises(CheckpointError, match="no complete ss_generator"):
        component_files(parts, "ss_generator")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pack):
    """A whole `sam3d train-default` run at the tiny preset, in two calls: the first pauses, the second resumes."""
    import shutil

    from sam3d_core.training.default_model import DefaultPlan, run

    root = tmp_path_factory.mktemp("default")
    folder = root / "pack"
    shutil.copytree(pack.folder, folder)
    (folder / "latents.npy").unlink()  # the run encodes its own
    plan = DefaultPlan(
        pack=str(folder), out=str(root / "run"), preset="default-tiny", device="cpu", workers=0, decoder_steps=2,
        decoder_batch=1, steps=3, batch_size=2, warmup_steps=1, save_every=1, max_file_bytes=600_000, cfg_views=2,
        blind_views=24,
    )  # fmt: skip
    logs: list[str] = []
    first = run(plan, log=logs.append, stop_after_s=0.0)
    second = run(plan, log=logs.append)
    return root, first, second, logs


def test_train_default_pauses_resumes_and_exports_a_loadable_split_fp16_model(trained):
    from sam3d_core.pipeline.stage1 import Stage1Pipeline
    from sam3d_core.weights.store import verify_folder

    root, first, second, logs = trained
    assert first["status"] == "paused" and first["step"] == 1
    assert second["status"] == "done"
    out = root / "run" / "default"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["storage_dtype"] == "float16" and manifest["stages"] == ["stage1"]
    assert not verify_folder(out)
    sizes = [r["bytes"] for n, r in manifest["files"].items() if n.endswith(".safetensors")]
    assert max(sizes) <= 600_000 and any("-of-" in n for n in manifest["files"])
    metrics = [json.loads(x) for x in (root / "run" / "flow" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m.get("event") == "paused"] == [1]
    assert max(m["step"] for m in metrics if "loss" in m) == 3  # resumed at step 1, ran steps 2 and 3
    pipe = Stage1Pipeline.from_pretrained(str(out), device="cpu")
    assert all(p.dtype == torch.float32 for p in pipe.model.parameters())
    card = (out / "README.md").read_text()
    assert "CC0-1.0" in card and "What it cannot do" in card
    # The shipped sampler's guidance strength is the one the validation views chose, and the card says so.
    from sam3d_core.training.default_model import CFG_CANDIDATES, LOGIT_SHIFTS

    state = json.loads((root / "run" / "state.json").read_text())
    chosen = state["sampler"]["cfg_strength"]
    assert chosen in CFG_CANDIDATES
    assert sorted(state["sampler"]["mean_add_s"]) == sorted(f"{c:g}" for c in CFG_CANDIDATES)
    assert json.loads((out / "stage1.json").read_text())["sampler"]["cfg_strength"] == chosen
    assert pipe.cfg.sampler.cfg_strength == chosen and f"guidance strength {chosen}" in card
    assert state["decoder"]["logit_shift"] in LOGIT_SHIFTS
    # the rotation term against an image-blind model's, in the state, the log and the card
    flow = state["flow"]
    assert 0 < flow["rotation_blind"] < 2.5 and flow["rotation_loss"] > 0
    assert any(line.startswith("flow: rotation term") for line in logs)
    assert f"a model blind to the image:\n  {flow['rotation_blind']:.3f}" in card


def test_the_eval_table_goes_into_the_model_card_and_the_manifest_still_verifies(trained, tmp_path):
    import shutil

    from sam3d_core.training.default_model import add_eval_to_card
    from sam3d_core.weights.store import verify_folder

    folder = tmp_path / "default"
    shutil.copytree(trained[0] / "run" / "default", folder)
    overall = {"n": 120, "failed": 0, "f1": 0.0148, "precision": 0.01, "recall": 0.02, "viou": 0.0338,
               "chamfer": 0.1703, "emd": 0.4067, "iou3d": 0.2883, "icp_rot": 34.2, "rot_err": 88.33,
               "add_s": 0.1456, "add_s_01": 0.3667}  # fmt: skip
    results = tmp_path / "results.json"
    results.write_text(json.dumps({
        "created": "2026-12-03T15:06:14+00:00", "dataset": {"path": "/tmp/bench", "evaluated": 120},
        "settings": {"points": 100000, "refine_layout": False},
        "models": [{"name": "/tmp/work/run/default", "aggregates": {"overall": overall}},
                   {"name": "box", "aggregates": {"overall": dict(overall, f1=0.0103)}}],
    }))  # fmt: skip
    for _ in range(2):  # a second call replaces the section instead of adding another
        add_eval_to_card(folder, [results], names={"/tmp/work/run/default": "default"})
    card = (folder / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and "What it cannot do" in card
    assert "| default | 120 | 0 | 0.0148 | 0.0338 | 0.1703 |" in card and "| box | 120 | 0 | 0.0103 |" in card
    assert not verify_folder(folder)  # the card's new hash is recorded
    with pytest.raises(ValueError, match="not a default-model folder"):
        add_eval_to_card(tmp_path, [results])


def test_train_default_refuses_a_folder_that_is_not_its_own(tmp_path, pack):
    from sam3d_core.training.default_model import DefaultPlan, run

    out = tmp_path / "mine"
    (out / "decoder").mkdir(parents=True)
    (out / "decoder" / "notes.txt").write_text("the user's")
    with pytest.raises(ValueError, match="not a run folder of `sam3d train-default`"):
        run(DefaultPlan(pack=str(pack.folder), out=str(out), preset="default-tiny", device="cpu"), log=lambda s: None)
    assert (out / "decoder" / "notes.txt").read_text() == "the user's" and not (out / "state.json").exists()


def test_the_bundled_default_is_chosen_without_imported_weights_and_says_so(trained, monkeypatch, tmp_path):
    from sam3d_core.pipeline.reconstruct import Pipeline
    from sam3d_core.weights import hub

    root = trained[0]
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))  # no imported model
    monkeypatch.setattr(hub, "bundled_default_dir", lambda: root / "run" / "default")
    pipe, which = Pipeline.load(device="cpu")
    assert "bundled default model" in which and "no imported weights" in which
    assert pipe.stage2 is None and pipe.stage1.weights_id.startswith("sha256:")
    monkeypatch.setattr(hub, "bundled_default_dir", lambda: None)
    _, which = Pipeline.load(device="cpu")
    assert which.startswith("tiny random-weight model")
