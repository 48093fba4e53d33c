"""Layout: where stage 1 puts the object in the camera frame.

Stage 1 predicts, besides the shape, four pose latents in a scale-and-shift-invariant frame
(official pose convention "ScaleShiftInvariant"): a normalized 6D rotation, a log scale, a translation
and a translation scale (unused). The point map was normalized by a scene scale sigma and shift before
conditioning; undoing it gives the object's pose in the PyTorch3D camera frame (x left, y up,
z forward):

    p_cam = (p_local * scale) @ R + translation        (row vectors, as PyTorch3D's Transform3d)

with p_local in the voxel frame [-0.5, 0.5]^3 (TRELLIS, z-up), see `local_voxel_centers`.
In closed form (sigma isotropic): scale = mean(exp(x_scale)) * sigma, R = gram_schmidt(6D),
translation = x_translation * sigma + shift. `encode_pose` is the exact inverse (pose -> latents, for training
targets); frame conversions of the pose (OpenCV, glTF, Blender) live in `sam3d_core.geometry.frames`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Statistics of the 6D rotation targets in training; the model predicts (r6 - MEAN) / STD.
ROT6D_MEAN: tuple[float, ...] = (
    -0.06366084883674913,
    0.008438224692279752,
    0.00017084786438302483,
    0.0007126610473540038,
    -0.0030916726538816417,
    0.5166093753457688,
)
ROT6D_STD: tuple[float, ...] = (
    0.6656971967514863,
    0.6787012271867754,
    0.30345010594844524,
    0.4394504420678794,
    0.39817973931717104,
    0.6176286868761914,
)

# ---------------------------------------------------------------------------------------------------
# Rotation representations
# ---------------------------------------------------------------------------------------------------


def rotation_6d_to_matrix(r6: torch.Tensor) -> torch.Tensor:
    """6D rotation [..., 6] -> rotation matrix [..., 3, 3] by Gram-Schmidt.

    b1 = normalize(a1), b2 = normalize(a2 - <b1, a2> b1), b3 = b1 x b2; the b's are the COLUMNS.
    """
    if r6.shape[-1] != 6:
        raise ValueError(f"r6: got shape {tuple(r6.shape)}, expected [..., 6] (two stacked 3-vectors)")
    a1, a2 = r6[..., :3], r6[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)  # [..., 3, 3]


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Quaternion [..., 4] (w, x, y, z; need not be unit) -> rotation matrix [..., 3, 3].

    Same matrix as PyTorch3D's `quaternion_to_matrix`.
    """
    if q.shape[-1] != 4:
        raise ValueError(f"q: got shape {tuple(q.shape)}, expected [..., 4] with (w, x, y, z)")
    w, x, y, z = q.unbind(-1)
    s = 2.0 / (q * q).sum(-1)
    rows = (
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    )  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def matrix_to_quaternion(matrix: torch.Tensor) -> torch.Tensor:
    """Rotation matrix [..., 3, 3] -> unit quaternion [..., 4] (w, x, y, z) with w >= 0.

    Inverse of `quaternion_to_matrix`, with PyTorch3D's sign choice (real part made non-negative).
    The quaternion is read from whichever of 4w^2, 4x^2, 4y^2, 4z^2 is largest (best conditioned).
    """
    if matrix.shape[-2:] != (3, 3):
        raise ValueError(f"matrix: got shape {tuple(matrix.shape)}, expected [..., 3, 3]")
    m = matrix.reshape(*matrix.shape[:-2], 9).unbind(-1)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m
    four_sq = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    ).clamp_min(0)  # [..., 4] = 4 * (w^2, x^2, y^2, z^2)
    # Row i holds 4 * q_i * (w, x, y, z).
    rows = torch.stack(
        [
            torch.stack([four_sq[..., 0], m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, four_sq[..., 1], m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, four_sq[..., 2], m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, four_sq[..., 3]], dim=-1),
        ],
        dim=-2,
    )  # [..., 4, 4]
    best = four_sq.argmax(dim=-1, keepdim=True)  # [..., 1]
    row = torch.gather(rows, -2, best[..., None].expand(*best.shape, 4)).squeeze(-2)  # [..., 4]
    q = row / (2.0 * torch.gather(four_sq, -1, best).sqrt())
    return torch.where(q[..., :1] < 0, -q, q)


def quaternion_invert(q: torch.Tensor) -> torch.Tensor:
    """Inverse of unit quaternions [..., 4] (w, x, y, z): the conjugate (w, -x, -y, -z)."""
    if q.shape[-1] != 4:
        raise ValueError(f"q: got shape {tuple(q.shape)}, expected [..., 4] with (w, x, y, z)")
    return q * q.new_tensor([1.0, -1.0, -1.0, -1.0])


def quaternion_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a (x) b of quaternions [..., 4] (w, x, y, z), real part made non-negative.

    quaternion_to_matrix(a (x) b) = quaternion_to_matrix(a) @ quaternion_to_matrix(b), as PyTorch3D's
    `quaternion_multiply` (which also standardises the sign).
    """
    if a.shape[-1] != 4 or b.shape[-1] != 4:
        raise ValueError(f"a, b: got shapes {tuple(a.shape)}, {tuple(b.shape)}, expected [..., 4] (w, x, y, z)")
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    q = torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )
    return torch.where(q[..., :1] < 0, -q, q)


# ---------------------------------------------------------------------------------------------------
# The pose
# ---------------------------------------------------------------------------------------------------


@dataclass
class Pose:
    """Object-to-camera similarity transform in the PyTorch3D camera frame (row-vector convention).

    rotation [B, 3, 3] (applied as p @ R), quaternion [B, 4] (w, x, y, z) of the same rotation,
    translation [B, 3], scale [B, 3] (uniform in the official decoding).
    """

    rotation: torch.Tensor
    quaternion: torch.Tensor
    translation: torch.Tensor
    scale: torch.Tensor

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """Local points [B, N, 3] (or [N, 3] when B == 1) -> camera-frame points of the same shape."""
        b = self.rotation.shape[0]
        squeeze = points.ndim == 2 and b == 1
        p = points[None] if squeeze else points
        if p.ndim != 3 or p.shape[0] != b or p.shape[-1] != 3:
            raise ValueError(
                f"points: got shape {tuple(points.shape)}, expected [{b}, N, 3]" + (" or [N, 3]" if b == 1 else "")
            )
        p = p * self.scale[:, None, :].to(p.dtype)
        out = p @ self.rotation.to(p.dtype) + self.translation[:, None, :].to(p.dtype)  # [B, N, 3]
        return out[0] if squeeze else out

    def __getitem__(self, index: int) -> Pose:
        """The pose of object `index` as a batch of one."""
        b = self.rotation.shape[0]
        if not -b <= index < b:
            raise IndexError(f"index {index} out of range for a batch of {b} poses")
        sl = slice(index % b, index % b + 1)
        return Pose(self.rotation[sl], self.quaternion[sl], self.translation[sl], self.scale[sl])

    def as_matrix(self) -> torch.Tensor:
        """[B, 4, 4] homogeneous matrix M for column vectors: p_cam = M @ [p; 1], the same map as `apply`."""
        b = self.rotation.shape[0]
        m = torch.zeros(b, 4, 4, dtype=self.rotation.dtype, device=self.rotation.device)
        m[:, :3, :3] = self.rotation.transpose(-1, -2) * self.scale[:, None, :]  # R^T diag(scale)
        m[:, :3, 3] = self.translation
        m[:, 3, 3] = 1.0
        return m


def _pose_latent(latents: dict[str, torch.Tensor], name: str, channels: int) -> torch.Tensor:
    if name not in latents:
        raise ValueError(f"latents: no key {name!r} (got {sorted(latents)}); pass the stage-1 sampler's output dict")
    x = latents[name]
    if x.ndim == 3 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 2 or x.shape[1] != channels:
        raise ValueError(
            f"latents[{name!r}]: got shape {tuple(latents[name].shape)}, expected [B, 1, {channels}] or [B, {channels}]"
        )
    return x.float()  # [B, C]


def _scene_vector(value: torch.Tensor, name: str, batch: int) -> torch.Tensor:
    if value.ndim == 1:
        value = value[None]
    if value.ndim != 2 or value.shape[1] != 3 or value.shape[0] not in (1, batch):
        raise ValueError(
            f"{name}: got shape {tuple(value.shape)}, expected [{batch}, 3] (or [1, 3] / [3] to broadcast); "
            "pass the point-map normalization returned by preprocessing"
        )
    return value.float().expand(batch, 3)


def decode_pose(
    latents: dict[str, torch.Tensor],
    pointmap_scale: torch.Tensor,
    pointmap_shift: torch.Tensor,
    downsample_factor: float = 1.0,
) -> Pose:
    """Stage-1 pose latents -> object pose in the camera frame (official ScaleShiftInvariant decoder).

    latents: '6drotation_normalized' [B, 1, 6], 'scale' [B, 1, 3] (log), 'translation' [B, 1, 3]
    ('translation_scale' is ignored, as officially). pointmap_scale / pointmap_shift [B, 3]: the point
    map normalization (p_normalized = (p - shift) / scale). downsample_factor: from `cap_voxels`,
    multiplies the scale because the voxels were shrunk by it. Computed in float32.
    """
    r6 = _pose_latent(latents, "6drotation_normalized", 6)
    log_scale = _pose_latent(latents, "scale", 3)
    t = _pose_latent(latents, "translation", 3)
    b = r6.shape[0]
    if log_scale.shape[0] != b or t.shape[0] != b:
        raise ValueError(
            f"latents: batch sizes differ (rotation {b}, scale {log_scale.shape[0]}, "
            f"translation {t.shape[0]}); expected one batch size for all pose latents"
        )
    sigma = _scene_vector(pointmap_scale, "pointmap_scale", b).to(r6.device)  # [B, 3]
    shift = _scene_vector(pointmap_shift, "pointmap_shift", b).to(r6.device)  # [B, 3]

    mean = torch.tensor(ROT6D_MEAN, dtype=r6.dtype, device=r6.device)
    std = torch.tensor(ROT6D_STD, dtype=r6.dtype, device=r6.device)
    rot = rotation_6d_to_matrix(r6 * std + mean)  # [B, 3, 3]
    # The official decoder stores the rotation as a quaternion before composing: same rounding here.
    rot = quaternion_to_matrix(matrix_to_quaternion(rot))

    # Row-vector composition p -> ((p * s) @ R + t) * sigma + shift, then split the 3x3 part
    # diag(s) R diag(sigma) into per-row norms (scale) and a rotation.
    linear = torch.exp(log_scale)[:, :, None] * rot * sigma[:, None, :]  # [B, 3, 3]
    axis_scale = linear.norm(dim=-1)  # [B, 3]
    rotation = linear / axis_scale[:, :, None]
    translation = t * sigma + shift  # [B, 3]
    scale = axis_scale.mean(dim=-1, keepdim=True).expand(b, 3) * downsample_factor
    return Pose(rotation, matrix_to_quaternion(rotation), translation, scale)


def encode_pose(
    pose: Pose,
    pointmap_scale: torch.Tensor,
    pointmap_shift: torch.Tensor,
    downsample_factor: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Object pose in the camera frame -> stage-1 pose latents; the exact inverse of `decode_pose`.

    pose: rotation [B, 3, 3] (a proper rotation), translation [B, 3], scale [B, 3] (decoding returns the
    mean of a per-axis scale, so only a uniform scale round-trips exactly). pointmap_scale / pointmap_shift:
    the point-map normalization of the photo (isotropic scale, as the official normalization produces).
    Returns float32 '6drotation_normalized' [B, 1, 6] (the first two columns of R, normalized with the
    training statistics), 'scale' [B, 1, 3] (log of scale / (sigma * downsample_factor)) and
    'translation' [B, 1, 3] ((t - shift) / sigma). 'translation_scale' is not produced: decoding ignores it.
    """
    rot = pose.rotation.double()
    b = rot.shape[0]
    if rot.shape != (b, 3, 3) or pose.translation.shape != (b, 3) or pose.scale.shape not in ((b, 3), (b, 1)):
        raise ValueError(
            f"pose: got rotation {tuple(rot.shape)}, translation {tuple(pose.translation.shape)}, scale "
            f"{tuple(pose.scale.shape)}; expected [B, 3, 3], [B, 3], [B, 3]"
        )
    eye = torch.eye(3, dtype=rot.dtype, device=rot.device).expand(b, 3, 3)
    if not torch.allclose(rot.transpose(-1, -2) @ rot, eye, atol=1e-4) or (torch.linalg.det(rot) <= 0).any():
        raise ValueError("pose.rotation: not a proper rotation (R^T R != I or det <= 0); pass an orthonormal R, det +1")
    if not downsample_factor > 0:
        raise ValueError(f"downsample_factor: got {downsample_factor}, expected the positive factor from cap_voxels")
    sigma = _scene_vector(pointmap_scale, "pointmap_scale", b).to(rot)  # [B, 3]
    shift = _scene_vector(pointmap_shift, "pointmap_shift", b).to(rot)  # [B, 3]
    if not torch.allclose(sigma, sigma[:, :1].expand(b, 3), rtol=1e-6) or (sigma <= 0).any():
        raise ValueError(
            f"pointmap_scale: got {sigma.tolist()}, expected one positive value per object repeated on the 3 axes "
            "(the official scene scale is isotropic)"
        )
    mean = torch.tensor(ROT6D_MEAN, dtype=rot.dtype, device=rot.device)
    std = torch.tensor(ROT6D_STD, dtype=rot.dtype, device=rot.device)
    r6 = torch.cat([rot[..., :, 0], rot[..., :, 1]], dim=-1)  # Gram-Schmidt returns these two columns as they are
    log_scale = torch.log(pose.scale.double().to(rot.device).expand(b, 3) / (sigma * downsample_factor))
    translation = (pose.translation.double().to(rot.device) - shift) / sigma
    return {
        "6drotation_normalized": ((r6 - mean) / std)[:, None].float(),
        "scale": log_scale[:, None].float(),
        "translation": translation[:, None].float(),
    }


def local_voxel_centers(coords: torch.Tensor, resolution: int = 64) -> torch.Tensor:
    """Voxel coords [N, 4] (batch, x, y, z) -> cell centres [N, 3] float32 in the local frame.

    Centre of cell i is (i + 0.5) / resolution - 0.5, inside [-0.5, 0.5]^3 (TRELLIS frame, z-up).
    """
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"coords: got shape {tuple(coords.shape)}, expected [N, 4] (batch, x, y, z)")
    if resolution < 1:
        raise ValueError(f"resolution: got {resolution}, expected the grid side such as 64")
    return (coords[:, 1:].float() + 0.5) / resolution - 0.5
