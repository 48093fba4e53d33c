"""SLAT Gaussian decoder and the Gaussians container: official key table, fixture parity, PLY writer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sam3d_core.geometry.gaussians import SH_C0, Gaussians
from sam3d_core.models.slat_vae import SLatGaussianDecoder, hammersley_offsets, radical_inverse
from sam3d_core.registry import stage2_preset

FIXTURE = Path(__file__).parent / "fixtures" / "stage2_small"
FIELDS = ("_xyz", "_features_dc", "_scaling", "_rotation", "_opacity")
ACTIVATED = ("get_xyz", "get_scaling", "get_opacity", "get_rotation")


def _official_table(c: int = 768, blocks: int = 12, out: int = 448, g: int = 32) -> dict[str, tuple[int, ...]]:
    """slat_decoder_gs.ckpt keys and shapes, written out from spec section 4.9."""
    table = {"input_layer.weight": (c, 8), "input_layer.bias": (c,)}
    for i in range(blocks):
        p = f"blocks.{i}"
        table |= {f"{p}.attn.to_qkv.weight": (3 * c, c), f"{p}.attn.to_qkv.bias": (3 * c,)}
        table |= {f"{p}.attn.to_out.weight": (c, c), f"{p}.attn.to_out.bias": (c,)}
        table |= {f"{p}.mlp.mlp.0.weight": (4 * c, c), f"{p}.mlp.mlp.0.bias": (4 * c,)}
        table |= {f"{p}.mlp.mlp.2.weight": (c, 4 * c), f"{p}.mlp.mlp.2.bias": (c,)}
    table |= {"out_layer.weight": (out, c), "out_layer.bias": (out,), "offset_perturbation": (g, 3)}
    return table


def test_official_keys_and_shapes_on_meta():
    with torch.device("meta"):
        model = SLatGaussianDecoder(stage2_preset("official").gaussian)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _official_table()
    assert len(got) == 101


def test_hammersley_default_matches_checkpoints():
    assert [radical_inverse(2, i) for i in range(5)] == [0.0, 0.5, 0.25, 0.75, 0.125]
    assert radical_inverse(3, 5) == pytest.approx(2 / 3 + 1 / 9)
    for name, g in (("slat_decoder_gs", 32), ("slat_decoder_gs_4", 4)):
        ckpt = torch.load(FIXTURE / "official" / f"{name}.ckpt", weights_only=True, map_location="cpu")
        torch.testing.assert_close(hammersley_offsets(g, 1.5), ckpt["offset_perturbation"], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "data.safetensors")


def _decoder(name: str, g: int) -> SLatGaussianDecoder:
    cfg = dataclasses.replace(stage2_preset("tiny").gaussian, num_gaussians=g)
    model = SLatGaussianDecoder(cfg).eval()
    ckpt = torch.load(FIXTURE / "official" / f"{name}.ckpt", weights_only=True, map_location="cpu")
    model.load_state_dict(ckpt, strict=True)
    return model


@pytest.mark.parametrize("name, prefix, g", [("slat_decoder_gs", "gs/", 32), ("slat_decoder_gs_4", "gs4/", 4)])
def test_parity_with_official(data, name, prefix, g):
    model = _decoder(name, g)
    feats, coords = data["sample/slat_feats"], data["input/coords"].int()
    with torch.no_grad():
        gs = model(feats, coords)
    assert len(gs) == coords.shape[0] * g
    for field in FIELDS + ACTIVATED:
        got, want = getattr(gs, field), data[prefix + field]
        assert got.shape == want.shape, field
        rel = (got - want).abs().max() / want.abs().max()
        assert rel <= 1e-4, f"{field}: relative error {rel:.2e}"
    # every Gaussian stays within 0.75 voxel of its voxel centre (tanh bound * voxel_size / 2)
    centre = (coords[:, 1:].float() + 0.5) / 64
    offset = gs._xyz.reshape(-1, g, 3) - centre[:, None]
    assert offset.abs().max() <= 0.75 / 64 + 1e-6


def test_batch_of_objects_is_rejected():
    model = SLatGaussianDecoder(dataclasses.replace(stage2_preset("tiny").gaussian, num_gaussians=4))
    coords = torch.tensor([[0, 1, 2, 3], [1, 1, 2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match="one object"):
        model(torch.zeros(2, 8), coords)


def _random_gaussians(m: int = 7) -> Gaussians:
    gen = torch.Generator().manual_seed(0)
    return Gaussians(
        _xyz=torch.rand(m, 3, generator=gen),
        _features_dc=torch.randn(m, 1, 3, generator=gen),
        _scaling=torch.randn(m, 3, generator=gen),
        _rotation=torch.randn(m, 4, generator=gen) * 0.1,
        _opacity=torch.randn(m, 1, generator=gen),
    )


def test_activations_at_zero_are_the_biases():
    zeros = Gaussians(
        torch.full((2, 3), 0.5), torch.zeros(2, 1, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 1)
    )
    torch.testing.assert_close(zeros.get_xyz, torch.zeros(2, 3))
    torch.testing.assert_close(zeros.get_scaling, torch.full((2, 3), (0.004**2 + 0.0009**2) ** 0.5))
    torch.testing.assert_close(zeros.get_opacity, torch.full((2, 1), 0.1))
    torch.testing.assert_close(zeros.get_rotation, torch.tensor([[1.0, 0, 0, 0]] * 2))
    torch.testing.assert_close(zeros.colors, torch.full((2, 3), 0.5))
    assert SH_C0 == pytest.approx(0.5 / np.sqrt(np.pi))


def _read_binary_ply(path: Path) -> np.ndarray:
    """A minimal reader for binary little-endian PLY with float vertex properties only."""
    raw = path.read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    lines = raw[:end].decode("ascii").splitlines()
    assert lines[:2] == ["ply", "format binary_little_endian 1.0"]
    count = int(lines[2].split()[-1])
    names = [line.split()[-1] for line in lines if line.startswith("property float ")]
    rows = np.frombuffer(raw[end:], dtype=[(n, "<f4") for n in names])
    assert rows.shape == (count,)
    return rows


def test_save_ply_round_trip(tmp_path):
    gs = _random_gaussians()
    path = tmp_path / "gs.ply"
    gs.save_ply(path)
    rows = _read_binary_ply(path)
    expected_names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
    expected_names += ["scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert list(rows.dtype.names) == expected_names

    def col(*names: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([rows[n] for n in names], axis=1).astype(np.float32))

    torch.testing.assert_close(col("x", "y", "z"), gs.get_xyz)
    assert not col("nx", "ny", "nz").any()
    torch.testing.assert_close(col("f_dc_0", "f_dc_1", "f_dc_2"), gs._features_dc[:, 0])
    torch.testing.assert_close(torch.sigmoid(col("opacity")), gs.get_opacity)
    torch.testing.assert_close(torch.exp(col("scale_0", "scale_1", "scale_2")), gs.get_scaling)
    torch.testing.assert_close(
        torch.nn.functional.normalize(col("rot_0", "rot_1", "rot_2", "rot_3"), dim=-1), gs.get_rotation
    )


def test_save_ply_reads_in_trimesh(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    gs = _random_gaussians()
    gs.save_ply(tmp_path / "gs.ply")
    cloud = trimesh.load(tmp_path / "gs.ply")
    np.testing.assert_allclose(np.asarray(cloud.vertices), gs.get_xyz.numpy(), atol=1e-6)
