"""Layout decoding: rotation conversions, ScaleShiftInvariant pose decoding, the Pose transform."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sam3d_core.geometry.layout import (
    ROT6D_MEAN,
    ROT6D_STD,
    Pose,
    decode_pose,
    local_voxel_centers,
    matrix_to_quaternion,
    quaternion_to_matrix,
    rotation_6d_to_matrix,
)

FIXTURE = Path(__file__).parent / "fixtures" / "stage1_small"


def _random_unit_quaternions(n: int, seed: int = 0) -> torch.Tensor:
    q = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[:, :1] < 0, -q, q)


def test_rotation_6d_gram_schmidt_columns():
    r6 = torch.randn(5, 2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rot = rotation_6d_to_matrix(r6)
    assert rot.shape == (5, 2, 3, 3)
    eye = torch.eye(3, dtype=torch.float64).expand_as(rot)
    torch.testing.assert_close(rot.transpose(-1, -2) @ rot, eye)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(5, 2, dtype=torch.float64))
    # First column is a1 normalized; the second lies in span(a1, a2) on a2's side.
    a1, a2 = r6[..., :3], r6[..., 3:]
    torch.testing.assert_close(rot[..., :, 0], a1 / a1.norm(dim=-1, keepdim=True))
    assert ((rot[..., :, 1] * a2).sum(-1) > 0).all()


def test_quaternion_to_matrix_about_z():
    theta = 0.7
    q = torch.tensor([math.cos(theta / 2), 0.0, 0.0, math.sin(theta / 2)], dtype=torch.float64)
    c, s = math.cos(theta), math.sin(theta)
    expected = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(quaternion_to_matrix(q), expected)
    torch.testing.assert_close(quaternion_to_matrix(2.5 * q), expected)  # scale-free


def test_quaternion_round_trips():
    q = _random_unit_quaternions(200)
    torch.testing.assert_close(matrix_to_quaternion(quaternion_to_matrix(q)), q)
    # Half turns (w = 0) and the identity take the other three branches of the conversion.
    special = torch.tensor(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0.6, 0.8, 0]], dtype=torch.float64
    )
    back = matrix_to_quaternion(quaternion_to_matrix(special))
    torch.testing.assert_close(quaternion_to_matrix(back), quaternion_to_matrix(special))
    assert (back.norm(dim=-1) - 1).abs().max() < 1e-12


def test_matrix_to_quaternion_real_part_non_negative():
    q = -_random_unit_quaternions(50, seed=3)  # w <= 0 going in
    out = matrix_to_quaternion(quaternion_to_matrix(q))
    assert (out[:, 0] >= 0).all()
    torch.testing.assert_close(out, -q)


def _row_vector_matrix(scale, rot, trans) -> torch.Tensor:
    """PyTorch3D-style row-vector 4x4: p_h @ M, M = S(scale) @ R @ T(trans)."""
    b = rot.shape[0]
    s, r, t = torch.eye(4).repeat(b, 1, 1), torch.eye(4).repeat(b, 1, 1), torch.eye(4).repeat(b, 1, 1)
    s[:, :3, :3] = torch.diag_embed(scale)
    r[:, :3, :3] = rot
    t[:, 3, :3] = trans
    return s @ r @ t


def _latents(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "6drotation_normalized": torch.randn(b, 1, 6, generator=g),
        "scale": 0.3 * torch.randn(b, 1, 3, generator=g),
        "translation": torch.randn(b, 1, 3, generator=g),
        "translation_scale": torch.randn(b, 1, 1, generator=g),
        "shape": torch.randn(b, 4096, 8, generator=g),
    }


def test_decode_pose_matches_4x4_composition():
    lat = _latents(3)
    sigma = torch.tensor([[2.0], [0.5], [1.3]]).expand(3, 3)
    shift = torch.tensor([[0.1, -0.2, 3.0], [0.0, 0.0, 1.0], [-1.0, 2.0, 5.0]])
    pose = decode_pose(lat, sigma, shift, downsample_factor=2)

    std, mean = torch.tensor(ROT6D_STD), torch.tensor(ROT6D_MEAN)
    rot = rotation_6d_to_matrix(lat["6drotation_normalized"][:, 0] * std + mean)
    m = _row_vector_matrix(lat["scale"][:, 0].exp(), rot, lat["translation"][:, 0])
    m = m @ _row_vector_matrix(sigma, torch.eye(3).repeat(3, 1, 1), shift)
    axis_scale = m[:, :3, :3].norm(dim=-1)
    torch.testing.assert_close(pose.translation, m[:, 3, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pose.rotation, m[:, :3, :3] / axis_scale[:, :, None], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pose.scale, 2 * axis_scale.mean(-1, keepdim=True).expand(3, 3))
    # Closed form with an isotropic scene scale.
    torch.testing.assert_close(pose.rotation, rot, rtol=1e-5, atol=1e-5)
    s_closed = lat["scale"][:, 0].exp().mean(-1, keepdim=True) * sigma * 2
    torch.testing.assert_close(pose.scale, s_closed)
    torch.testing.assert_close(pose.translation, lat["translation"][:, 0] * sigma + shift)
    torch.testing.assert_close(quaternion_to_matrix(pose.quaternion), pose.rotation, rtol=1e-5, atol=1e-5)


def test_pose_apply_and_as_matrix_agree_with_composition():
    lat = _latents(2, seed=5)
    lat["scale"] = lat["scale"][..., :1].expand(2, 1, 3)  # uniform object scale: apply() is exact
    sigma, shift = torch.full((2, 3), 1.7), torch.tensor([[0.3, 0.1, 2.0], [0.0, -1.0, 4.0]])
    pose = decode_pose(lat, sigma, shift)
    points = torch.rand(2, 10, 3) - 0.5
    rot = rotation_6d_to_matrix(lat["6drotation_normalized"][:, 0] * torch.tensor(ROT6D_STD) + torch.tensor(ROT6D_MEAN))
    m = _row_vector_matrix(lat["scale"][:, 0].exp(), rot, lat["translation"][:, 0])
    m = m @ _row_vector_matrix(sigma, torch.eye(3).repeat(2, 1, 1), shift)
    homog = torch.cat([points, torch.ones(2, 10, 1)], dim=-1)
    expected = (homog @ m)[..., :3]
    torch.testing.assert_close(pose.apply(points), expected, rtol=1e-5, atol=1e-5)
    col = (pose.as_matrix() @ homog.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(col[..., :3], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(col[..., 3], torch.ones(2, 10))
    single = Pose(pose.rotation[:1], pose.quaternion[:1], pose.translation[:1], pose.scale[:1])
    torch.testing.assert_close(single.apply(points[0]), expected[0], rtol=1e-5, atol=1e-5)


def test_decode_pose_broadcasts_scene_and_flat_latents():
    lat = _latents(2, seed=2)
    flat = {k: v[:, 0] for k, v in lat.items() if k != "shape"}
    a = decode_pose(lat, torch.tensor([1.5, 1.5, 1.5]), torch.zeros(1, 3))
    b = decode_pose(flat, torch.full((2, 3), 1.5), torch.zeros(2, 3))
    for x, y in zip(
        (a.rotation, a.translation, a.scale, a.quaternion),
        (b.rotation, b.translation, b.scale, b.quaternion),
        strict=True,
    ):
        torch.testing.assert_close(x, y)
    assert a.quaternion.shape == (2, 4) and a.rotation.shape == (2, 3, 3)


def test_local_voxel_centers():
    coords = torch.tensor([[0, 0, 0, 0], [0, 63, 32, 1], [1, 5, 6, 7]], dtype=torch.int32)
    centers = local_voxel_centers(coords)
    expected = (coords[:, 1:].double() + 0.5) / 64 - 0.5
    torch.testing.assert_close(centers, expected.float())
    assert centers.dtype == torch.float32 and centers.abs().max() < 0.5
    torch.testing.assert_close(local_voxel_centers(coords, resolution=16)[0], torch.full((3,), 0.5 / 16 - 0.5))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: rotation_6d_to_matrix(torch.zeros(2, 5)), "r6"),
        (lambda: quaternion_to_matrix(torch.zeros(3)), "q"),
        (lambda: matrix_to_quaternion(torch.zeros(3, 4)), "matrix"),
        (
            lambda: decode_pose({"scale": torch.zeros(1, 1, 3)}, torch.ones(3), torch.zeros(3)),
            "6drotation_normalized",
        ),
        (
            lambda: decode_pose(_latents(1) | {"scale": torch.zeros(1, 1, 1)}, torch.ones(3), torch.zeros(3)),
            "scale",
        ),
        (lambda: decode_pose(_latents(2), torch.ones(3, 3), torch.zeros(3)), "pointmap_scale"),
        (lambda: decode_pose(_latents(1), torch.ones(3), torch.zeros(1, 2)), "pointmap_shift"),
        (lambda: local_voxel_centers(torch.zeros(3, 3, dtype=torch.int32)), "coords"),
        (lambda: decode_pose(_latents(2), torch.ones(3), torch.zeros(3)).apply(torch.zeros(5, 3)), "points"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(not (FIXTURE / "data.safetensors").exists(), reason="parity fixture stage1_small absent")
@pytest.mark.parametrize("run", ["sample", "shortcut"])
def test_parity_with_official_fixture(run):
    """Official ScaleShiftInvariant decoding of the recorded stage-1 latents (downsample factor 1)."""
    from safetensors import safe_open

    names = ("6drotation_normalized", "scale", "translation", "translation_scale")
    pose_prefix = "pose" if run == "sample" else "shortcut/pose"
    with safe_open(FIXTURE / "data.safetensors", "pt") as data:
        latents = {k: data.get_tensor(f"{run}/final/{k}") for k in names}
        scale, shift = data.get_tensor("pre/pointmap_scale"), data.get_tensor("pre/pointmap_shift")
        ref = {k: data.get_tensor(f"{pose_prefix}/{k}") for k in ("translation", "rotation", "scale")}
    pose = decode_pose(latents, scale, shift)
    torch.testing.assert_close(pose.translation, ref["translation"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pose.quaternion, ref["rotation"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pose.scale, ref["scale"], rtol=1e-4, atol=1e-6)
