"""Depth-model adapters: registry and selection, open_photo's use of them, MoGe's output conversion and
weights import. A small deterministic adapter (depth from brightness) stands in for a real network."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sam3d_core.cli.weights import add_depth_parser
from sam3d_core.inputs import depth as D
from sam3d_core.inputs.camera import intrinsics_from_fov, pointmap_from_depth
from sam3d_core.inputs.imageio import InputError
from sam3d_core.pipeline.reconstruct import Pipeline
from sam3d_core.weights.store import CheckpointError

H, W = 40, 48
TOY_FOV = 50.0
EXIF_IFD = 0x8769


class BrightnessDepth(D.DepthModel):
    """depth = 1 + 2 * brightness (metres), unknown (0) on pure black pixels; K from a 50 degree field of view."""

    def __init__(self, name: str, ready: bool = True):
        self.name, self.ready, self.calls = name, ready, 0

    def available(self) -> tuple[bool, str]:
        return (True, "always ready") if self.ready else (False, f"no weights for {self.name}; import them first")

    def predict(self, rgb: np.ndarray) -> D.DepthResult:
        self.calls += 1
        h, w = rgb.shape[:2]
        d = 1.0 + 2.0 * rgb.astype(np.float32).mean(axis=2) / 255.0
        d[rgb.max(axis=2) == 0] = 0.0  # pointmap_from_depth: <= 0 is unknown -> +inf
        K = intrinsics_from_fov(w, h, TOY_FOV)
        return D.DepthResult(pointmap_from_depth(d, K), K, self.name)


@pytest.fixture
def toys(tmp_path, monkeypatch):
    """An unavailable adapter registered before an available one; an empty data folder, so MoGe has no weights."""
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    off, on = BrightnessDepth("toy-off", ready=False), BrightnessDepth("toy")
    D.register_depth_model("toy-off", lambda device: off)
    D.register_depth_model("toy", lambda device: on)
    yield off, on
    D.unregister_depth_model("toy-off")
    D.unregister_depth_model("toy")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load("tiny", "cpu", stage2=False)[0]


def photo_file(tmp_path, focal_35mm: float | None = None):
    rng = np.random.default_rng(0)
    rgb = rng.integers(1, 256, (H, W, 3), dtype=np.uint8)
    rgb[:4, :6] = 0  # pure black: the toy model's unknown depth
    im = Image.fromarray(rgb)
    path = tmp_path / "photo.png"
    if focal_35mm is None:
        im.save(path)
    else:
        ex = Image.Exif()
        ex[0x0112] = 1  # Pillow writes the Exif IFD only next to a base-IFD tag
        ex.get_ifd(EXIF_IFD)[0xA405] = focal_35mm  # FocalLengthIn35mmFilm
        im.save(path, exif=ex)
    return path, rgb


# ----------------------------------------------------------------------------------------------
# Registry and selection


def test_auto_skips_unavailable_adapters_and_picks_the_first_usable(toys):
    off, on = toys
    model, why = D.load_depth_model("auto")
    assert model is on and "toy" in why
    names = D.depth_model_names()
    assert names.index("moge") < names.index("toy-off") < names.index("toy")  # built-in first, then in order
    status = {n: (ok, reason) for n, ok, reason in D.depth_model_status()}
    assert status["toy-off"] == (False, "no weights for toy-off; import them first")
    assert status["moge"][0] is False  # no weights in the empty data folder


def test_auto_without_any_usable_adapter_gives_none_and_every_reason(toys, monkeypatch):
    toys[1].ready = False
    model, why = D.load_depth_model("auto")
    assert model is None
    assert "moge:" in why and "toy-off: no weights for toy-off" in why and "toy: no weights for toy" in why


def test_none_disables_and_named_unavailable_or_unknown_is_a_clear_error(toys):
    assert D.load_depth_model("none")[0] is None and D.load_depth_model(None)[0] is None
    with pytest.raises(D.DepthModelError, match=r"'toy-off' is not usable: no weights for toy-off.*--depth-model none"):
        D.load_depth_model("toy-off")
    with pytest.raises(D.DepthModelError, match=r"unknown depth model 'nope'; expected one of: auto, none, moge"):
        D.load_depth_model("nope")
    with pytest.raises(ValueError, match="already registered"):
        D.register_depth_model("toy", lambda device: BrightnessDepth("other"))
    with pytest.raises(ValueError, match="other than"):
        D.register_depth_model("auto", lambda device: BrightnessDepth("auto"))


def test_run_depth_model_refuses_a_point_map_of_the_wrong_size():
    class Cropping(BrightnessDepth):
        def predict(self, rgb):
            res = super().predict(rgb)
            return D.DepthResult(res.pointmap_p3d[1:], res.K, res.source)

    rgb = np.full((H, W, 3), 128, np.uint8)
    with pytest.raises(RuntimeError, match=rf"shape \({H - 1}, {W}, 3\) for a {W}x{H} photo"):
        D.run_depth_model(Cropping("crop"), rgb)


# ----------------------------------------------------------------------------------------------
# Pipeline.open_photo


def test_open_photo_auto_uses_the_adapter_point_map_and_its_K(toys, pipe, tmp_path):
    path, rgb = photo_file(tmp_path)
    ctx = pipe.open_photo(path)
    assert ctx.pointmap_source == "toy" and ctx.intrinsics_source == "depth_model"
    K = intrinsics_from_fov(W, H, TOY_FOV)
    np.testing.assert_allclose(ctx.K, K)
    pm = ctx.pointmap
    assert pm.shape == (H, W, 3) and pm.dtype == np.float32
    # PyTorch3D frame by hand: pixel (i, j) centre (j + 0.5, i + 0.5); x left, y up, z forward
    for i, j in ((10, 3), (39, 47), (5, 20)):
        d = 1.0 + 2.0 * rgb[i, j].astype(np.float32).mean() / 255.0
        expected = [-(j + 0.5 - K[0, 2]) / K[0, 0] * d, -(i + 0.5 - K[1, 2]) / K[1, 1] * d, d]
        np.testing.assert_allclose(pm[i, j], expected, rtol=1e-5)
    assert np.isposinf(pm[:4, :6]).all() and np.isfinite(pm[4:]).all()  # +inf exactly where it is unknown


def test_open_photo_keeps_user_K_and_exif_before_the_adapter_K(toys, pipe, tmp_path):
    path, _ = photo_file(tmp_path, focal_35mm=28.0)
    ctx = pipe.open_photo(path)
    assert ctx.intrinsics_source == "exif" and ctx.pointmap_source == "toy"
    assert not np.allclose(ctx.K, intrinsics_from_fov(W, H, TOY_FOV))
    ctx = pipe.open_photo(path, fov_deg=70.0)
    assert ctx.intrinsics_source == "user" and ctx.pointmap_source == "toy"
    np.testing.assert_allclose(ctx.K, intrinsics_from_fov(W, H, 70.0))


def test_open_photo_none_and_given_depth_bypass_the_adapter(toys, pipe, tmp_path):
    off, on = toys
    path, _ = photo_file(tmp_path)
    before = on.calls
    ctx = pipe.open_photo(path, depth_model="none")
    assert ctx.pointmap_source == "fallback plane" and ctx.intrinsics_source == "default_fov"
    np.testing.assert_allclose(ctx.pointmap[..., 2], 1.0)
    ctx = pipe.open_photo(path, depth=np.full((H, W), 3.0, np.float32))  # "auto": the given depth wins
    assert ctx.pointmap_source == "depth"
    np.testing.assert_allclose(ctx.pointmap[..., 2], 3.0)
    assert on.calls == before
    with pytest.raises(InputError, match="depth_model='toy' was asked for but a depth map was given too") as e:
        pipe.open_photo(path, depth=np.ones((H, W), np.float32), depth_model="toy")
    assert e.value.field == "depth_model"


def test_open_photo_named_unavailable_adapter_is_a_clear_input_error(toys, pipe, tmp_path):
    path, _ = photo_file(tmp_path)
    with pytest.raises(InputError, match=r"depth model 'moge' is not usable: .*sam3d weights import-depth") as e:
        pipe.open_photo(path, depth_model="moge")
    assert e.value.field == "depth_model" and e.value.details == {"depth_model": "moge"}
    assert pipe.open_photo(path, depth_model="toy").pointmap_source == "toy"


def test_cli_flag_reaches_open_photo_and_the_source_is_printed(toys, tmp_path, capsys):
    from sam3d_core.cli.reconstruct import _open, add_model_args

    path, _ = photo_file(tmp_path)
    parser = argparse.ArgumentParser()
    parser.add_argument("photo")
    add_model_args(parser)
    args = parser.parse_args([str(path), "--model", "tiny", "--device", "cpu", "--depth-model", "toy"])
    _, ctx = _open(args)
    assert ctx.pointmap_source == "toy" and "point map: toy" in capsys.readouterr().err
    args = parser.parse_args([str(path), "--model", "tiny", "--device", "cpu", "--depth-model", "none"])
    _, ctx = _open(args)
    assert ctx.pointmap_source == "fallback plane" and "layout in relative units" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# MoGe output -> PyTorch3D frame and pixel intrinsics


def test_moge_points_convert_as_the_official_homogeneous_transform():
    rng = np.random.default_rng(1)
    pts = (rng.normal(size=(5, 7, 3)) + [0, 0, 4]).astype(np.float32)
    pts[1, 2] = np.inf  # MoGe's invalid pixel
    pts[3, 4, 2] = np.inf  # one non-finite coordinate is enough
    out = D.opencv_pointmap_to_pytorch3d(pts)
    # The official code: Transform3d().rotate(R), R = diag(-1, -1, 1), on [x, y, z, 1] row vectors, then / w.
    # Written out elementwise, so that 0 * inf = NaN is IEEE's, not a BLAS kernel's.
    M = torch.eye(4)
    M[:3, :3] = torch.diag(torch.tensor([-1.0, -1.0, 1.0]))
    homog = torch.cat([torch.from_numpy(pts).reshape(-1, 3), torch.ones(35, 1)], dim=1)  # [35, 4]
    prod = (homog[:, :, None] * M[None]).sum(dim=1)  # [35, 4]
    official = (prod[:, :3] / prod[:, 3:]).reshape(5, 7, 3).numpy()
    np.testing.assert_array_equal(out, official)  # NaN positions included
    assert np.isnan(out[1, 2]).all() and np.isnan(out[3, 4]).all()
    np.testing.assert_array_equal(out[0, 0], pts[0, 0] * [-1, -1, 1])  # x left, y up, z forward


def test_moge_intrinsics_become_pixel_intrinsics_that_reproject_the_points():
    h, w = 30, 40
    fx_n, fy_n = 0.9, 1.2  # MoGe: fx in image widths, fy in image heights, centre (0.5, 0.5)
    K_norm = np.array([[fx_n, 0, 0.5], [0, fy_n, 0.5], [0, 0, 1.0]])
    # a MoGe-like point map that is exactly projective: pixel centre ((j + 0.5) / w, (i + 0.5) / h) at depth z
    v, u = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    z = 2.0 + u + v
    pts = np.stack([(u - 0.5) / fx_n * z, (v - 0.5) / fy_n * z, z], axis=-1).astype(np.float32)
    pts[0, 0] = np.inf
    pm, K = D.moge_to_pytorch3d(pts, K_norm)
    np.testing.assert_allclose(K, [[fx_n * w, 0, w / 2], [0, fy_n * h, h / 2], [0, 0, 1]])
    # projecting our PyTorch3D points with the pixel K lands on each pixel's centre
    cv = pm[1:, 1:] * [-1, -1, 1]
    uv = cv[..., :2] / cv[..., 2:] * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
    jj, ii = np.meshgrid(np.arange(1, w) + 0.5, np.arange(1, h) + 0.5)
    np.testing.assert_allclose(uv[..., 0], jj, atol=1e-3)
    np.testing.assert_allclose(uv[..., 1], ii, atol=1e-3)
    with pytest.raises(ValueError, match="expected a finite 3x3"):
        D.normalized_to_pixel_intrinsics(np.eye(2), w, h)


def test_moge_adapter_says_why_it_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path))
    ok, why = D.MoGeAdapter().available()
    assert ok is False
    assert f"no MoGe weights imported in {tmp_path / 'depth' / 'moge-vitl'}" in why
    assert "sam3d weights import-depth" in why
    if importlib.util.find_spec("moge") is None:
        assert "moge package is not installed" in why and "pip install" in why


# ----------------------------------------------------------------------------------------------
# Weights import


def fake_moge_checkpoint() -> dict:
    """A MoGe v1 model.pt's layout at toy sizes: {'model': state dict, 'model_config': constructor kwargs}."""
    g = torch.Generator().manual_seed(0)
    sd = {
        "backbone.patch_embed.proj.weight": torch.randn(8, 3, 14, 14, generator=g),
        "head.projects.0.weight": torch.randn(4, 8, 1, 1, generator=g),
        "image_mean": torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
    }
    return {
        "model": sd,
        "model_config": {
            "encoder": "dinov2_vitl14",
            "intermediate_layers": 4,
            "num_tokens_range": [1200, 2500],
            "remap_output": "exp",
        },
    }


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Payload:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_import_records_sha256_and_loads_back_checked(tmp_path):
    ckpt = fake_moge_checkpoint()
    src = tmp_path / "snapshot" / "model.pt"
    src.parent.mkdir()
    torch.save(ckpt, src)
    dest = D.import_depth_weights(src.parent, "moge-vitl", root=tmp_path / "depth")  # a folder holding model.pt
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["kind"] == "moge" and manifest["source_file"]["sha256"] == sha256(src)
    for name in ("model.safetensors", "config.json"):
        assert manifest["files"][name]["sha256"] == sha256(dest / name)
    config, state, digest = D.load_depth_state("moge-vitl", root=tmp_path / "depth")
    assert config == ckpt["model_config"] and digest == sha256(dest / "model.safetensors")
    assert state.keys() == ckpt["model"].keys()
    for k, v in ckpt["model"].items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    assert [m["name"] for m in D.list_depth_weights(tmp_path / "depth")] == ["moge-vitl"]
    cfg = dest / "config.json"
    cfg.write_text(cfg.read_text().replace("exp", "EXP"))  # same size: only the hash can tell
    with pytest.raises(CheckpointError, match="config.json: sha256 differs"):
        D.load_depth_state(dest)
    with pytest.raises(CheckpointError, match="already exists"):
        D.import_depth_weights(src, "moge-vitl", root=tmp_path / "depth")


def test_import_refuses_pickled_code_and_other_checkpoints(tmp_path):
    ckpt = fake_moge_checkpoint()
    ckpt["model_config"]["evil"] = _Payload()
    bad = tmp_path / "evil.pt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match="pickled objects .* refused"):
        D.import_depth_weights(bad, root=tmp_path / "depth")
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="neither MoGe's model.pt"):
        D.import_depth_weights(plain, root=tmp_path / "depth")
    v2 = fake_moge_checkpoint()
    v2["model_config"]["encoder"] = {"backbone": "dinov2_vitl14"}  # MoGe-2 nests its module configs
    torch.save(v2, tmp_path / "v2.pt")
    with pytest.raises(CheckpointError, match="not a MoGe v1 checkpoint"):
        D.import_depth_weights(tmp_path / "v2.pt", root=tmp_path / "depth")
    assert not (tmp_path / "depth" / "moge-vitl").exists()


def test_import_depth_subcommand(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    src = tmp_path / "model.pt"
    torch.save(fake_moge_checkpoint(), src)
    parser = argparse.ArgumentParser()
    add_depth_parser(parser.add_subparsers(dest="action"))
    args = parser.parse_args(["import-depth", str(src), "--name", "mine"])
    assert args.func(args) == 0
    assert sha256(src) in capsys.readouterr().out
    assert (tmp_path / "home" / "depth" / "mine" / "model.safetensors").is_file()
    ok, why = D.MoGeAdapter(weights="mine").available()
    assert "no MoGe weights" not in why  # the weights are found; only the package may be missing
    assert ok == (importlib.util.find_spec("moge") is not None)


# ----------------------------------------------------------------------------------------------
# MoGeAdapter end to end, with a stand-in `moge` package (the real one is not on PyPI)

STAND_IN_MOGE = '''
import torch
from torch import nn

CALLS = []


class MoGeModel(nn.Module):
    """MoGe v1's interface at toy size: depth = 1 + head.bias[0] + image mean; black pixels invalid (+inf)."""

    def __init__(self, encoder="dinov2_vitl14", fx=0.8, fy=1.1):
        super().__init__()
        self.backbone, self.head, self.fx, self.fy = nn.Linear(3, 4), nn.Linear(4, 1), fx, fy

    @torch.inference_mode()
    def infer(self, image, force_projection=True, use_fp16=True):
        CALLS.append({"force_projection": force_projection, "use_fp16": use_fp16, "dtype": image.dtype})
        _, h, w = image.shape
        v, u = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        z = 1.0 + self.head.bias[0] + image.mean(0)
        points = torch.stack([(u - 0.5) / self.fx * z, (v - 0.5) / self.fy * z, z], -1)
        points = torch.where((image.sum(0) > 0)[..., None], points, torch.inf)
        K = torch.tensor([[self.fx, 0, 0.5], [0, self.fy, 0.5], [0, 0, 1.0]])
        return {"points": points, "intrinsics": K}
'''


@pytest.fixture
def stand_in_moge(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "moge" / "model"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "v1.py").write_text(STAND_IN_MOGE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    import moge.model.v1 as v1

    yield v1
    for name in ("moge.model.v1", "moge.model", "moge"):
        sys.modules.pop(name, None)


def test_moge_adapter_loads_imported_weights_and_converts_like_the_official_pipeline(stand_in_moge, pipe, tmp_path):
    net = stand_in_moge.MoGeModel()
    with torch.no_grad():
        net.head.bias.fill_(2.0)  # loaded from the file, not the random init: depth = 3 + image mean
    src = tmp_path / "model.pt"
    torch.save({"model": net.state_dict(), "model_config": {"encoder": "dinov2_vitl14", "fx": 0.8, "fy": 1.1}}, src)
    root = tmp_path / "depth"
    D.import_depth_weights(src, "w", root=root)
    D.register_depth_model("moge-test", lambda device: D.MoGeAdapter(device, weights="w", root=root))
    try:
        ok, why = D.get_depth_model("moge-test").available()
        assert ok, why
        path, rgb = photo_file(tmp_path)
        ctx = pipe.open_photo(path, depth_model="moge-test")
    finally:
        D.unregister_depth_model("moge-test")
    assert stand_in_moge.CALLS == [{"force_projection": False, "use_fp16": False, "dtype": torch.float32}]
    assert ctx.pointmap_source.startswith("moge (w, sha256 ") and ctx.intrinsics_source == "depth_model"
    np.testing.assert_allclose(ctx.K, [[0.8 * W, 0, W / 2], [0, 1.1 * H, H / 2], [0, 0, 1]])
    z = 3.0 + (rgb.astype(np.float64) / 255).mean(axis=2)
    valid = rgb.max(axis=2) > 0
    np.testing.assert_allclose(ctx.pointmap[..., 2][valid], z[valid], rtol=1e-6)
    assert np.isnan(ctx.pointmap[~valid]).all()  # +inf in MoGe's frame -> all-NaN after the official rotation
    # x left, y up: the top-left pixel of the valid region lies at +x, +y in the PyTorch3D frame
    assert ctx.pointmap[5, 7, 0] > 0 and ctx.pointmap[5, 7, 1] > 0
