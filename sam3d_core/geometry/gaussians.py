"""3D Gaussians as decoded from a SLAT: raw fields, their activations, posing, and a 3DGS-convention PLY writer.

Decoded positions live in the object's local frame [-0.5, 0.5]³ (z up). The raw fields are what the decoder
predicts; the `get_*` properties apply the official activations and biases. `posed` places them with the
stage-1 pose in the PyTorch3D camera frame (or another frame of `sam3d_core.geometry.frames`, e.g. our glTF world).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sam3d_core.geometry.frames import CONVENTIONS, FROM_P3D
from sam3d_core.geometry.layout import Pose, matrix_to_quaternion, quaternion_invert, quaternion_multiply

SH_C0 = 0.28209479177387814  # degree-0 spherical harmonic: colour = SH_C0 * dc + 0.5


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def logit(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x / (1 - x))


@dataclass
class Gaussians:
    """M Gaussians (sh degree 0). Raw fields as predicted; biases from `SLatGaussianDecoderConfig`."""

    _xyz: torch.Tensor  # [M, 3]; get_xyz = _xyz - 0.5 (the official aabb offset), so [0, 1] when local
    _features_dc: torch.Tensor  # [M, 1, 3]
    _scaling: torch.Tensor  # [M, 3]
    _rotation: torch.Tensor  # [M, 4] (w, x, y, z), before the identity bias
    _opacity: torch.Tensor  # [M, 1]
    scaling_bias: float = 0.004
    opacity_bias: float = 0.1
    min_kernel_size: float = 0.0009  # the 3D filter: added in quadrature to every scale

    def __len__(self) -> int:
        return self._xyz.shape[0]

    @property
    def get_xyz(self) -> torch.Tensor:  # [M, 3] in [-0.5, 0.5]
        return self._xyz - 0.5

    @property
    def get_scaling(self) -> torch.Tensor:  # [M, 3]
        bias = inverse_softplus(torch.tensor(self.scaling_bias, dtype=torch.float32)).to(self._scaling.device)
        scales = F.softplus(self._scaling + bias)
        return torch.sqrt(scales.square() + self.min_kernel_size**2)

    @property
    def get_opacity(self) -> torch.Tensor:  # [M, 1] in (0, 1)
        bias = logit(torch.tensor(self.opacity_bias, dtype=torch.float32)).to(self._opacity.device)
        return torch.sigmoid(self._opacity + bias)

    @property
    def rotation_unnormalised(self) -> torch.Tensor:  # [M, 4]: raw + identity quaternion
        return self._rotation + self._rotation.new_tensor([1.0, 0.0, 0.0, 0.0])

    @property
    def get_rotation(self) -> torch.Tensor:  # [M, 4] unit quaternions (w, x, y, z)
        return F.normalize(self.rotation_unnormalised, dim=-1)

    @property
    def colors(self) -> torch.Tensor:  # [M, 3] RGB, nominally in [0, 1]
        return SH_C0 * self._features_dc[:, 0] + 0.5

    def transformed(self, rotation: torch.Tensor, translation: torch.Tensor, scale: float) -> Gaussians:
        """A similarity applied to the Gaussians: x' = (x * scale) @ rotation + translation (row vectors).

        rotation [3, 3] proper rotation, translation [3], scale > 0. Follows the official `make_scene` rule:
        q' = q_R^-1 (x) q, so that the covariance becomes scale^2 R^T Sigma R; scale' = max(scale_g * scale,
        1.1 * min_kernel * scale) and min_kernel *= scale (the 3D filter scales with the object).
        """
        rot = torch.as_tensor(rotation, dtype=torch.float64)
        t = torch.as_tensor(translation, dtype=torch.float64).reshape(-1)
        if rot.shape != (3, 3) or t.shape != (3,):
            raise ValueError(f"rotation, translation: got {tuple(rot.shape)}, {tuple(t.shape)}; expected [3, 3], [3]")
        if not torch.allclose(rot.T @ rot, torch.eye(3, dtype=rot.dtype), atol=1e-4) or torch.linalg.det(rot) <= 0:
            raise ValueError("rotation: not a proper rotation (R^T R != I or det <= 0); a mirror would flip the object")
        if not scale > 0:
            raise ValueError(f"scale: got {scale}, expected a positive uniform scale")
        dtype, device = self._xyz.dtype, self._xyz.device
        rot, t = rot.to(device), t.to(device)
        xyz = (self.get_xyz.double() * scale) @ rot + t  # [M, 3]
        q_rot = matrix_to_quaternion(rot)  # quaternion_to_matrix(q_rot) = rot (PyTorch3D convention)
        quat = quaternion_multiply(quaternion_invert(q_rot)[None], self.get_rotation.double())  # [M, 4]
        min_kernel = self.min_kernel_size * scale
        scales = torch.clamp_min(self.get_scaling.double() * scale, 1.1 * min_kernel)  # [M, 3]
        # Invert get_scaling: softplus(raw + bias) = sqrt(scale^2 - min_kernel^2).
        bias = inverse_softplus(torch.tensor(self.scaling_bias, dtype=torch.float64))
        raw_scaling = inverse_softplus(torch.sqrt(scales.square() - min_kernel**2)) - bias.to(device)
        return Gaussians(
            _xyz=(xyz + 0.5).to(dtype),
            _features_dc=self._features_dc.clone(),  # degree-0 colour does not depend on direction
            _scaling=raw_scaling.to(dtype),
            _rotation=(quat - quat.new_tensor([1.0, 0.0, 0.0, 0.0])).to(dtype),
            _opacity=self._opacity.clone(),
            scaling_bias=self.scaling_bias,
            opacity_bias=self.opacity_bias,
            min_kernel_size=min_kernel,
        )

    def posed(self, pose: Pose, convention: str = "pytorch3d") -> Gaussians:
        """The Gaussians placed with a stage-1 pose of ONE object (a batch of one: `pose[i]`).

        convention "pytorch3d": the photo's camera frame, as the official `make_scene`; "gltf": our glTF scene
        world (for a scene PLY next to the scene GLB); "opencv", "blender" likewise (see `sam3d_core.geometry.frames`).
        """
        if pose.rotation.shape[0] != 1:
            raise ValueError(f"pose: got a batch of {pose.rotation.shape[0]} poses, expected one; pass pose[i]")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention: got {convention!r}, expected one of {CONVENTIONS}")
        s = pose.scale[0].double()
        if not torch.allclose(s, s[:1].expand(3), rtol=1e-6):
            raise ValueError(f"pose.scale: got {s.tolist()}, expected a uniform scale (decode_pose returns one)")
        to_frame = torch.as_tensor(FROM_P3D[convention], dtype=torch.float64)  # column-vector 3x3 rotation
        rot = pose.rotation[0].double().cpu() @ to_frame.T  # row vectors: p_frame = p_p3d @ to_frame^T
        t = pose.translation[0].double().cpu() @ to_frame.T
        return self.transformed(rot, t, float(s[0]))

    def save_ply(self, path: str | Path) -> None:
        """Write the 3DGS PLY convention (binary little-endian float32): x y z, nx ny nz (0), f_dc_0..2,
        opacity (logit), scale_0..2 (log), rot_0..3 (w x y z, not normalised, as the official writer)."""
        opacity = self.get_opacity.detach().double()
        names = ["x", "y", "z", "nx", "ny", "nz", *(f"f_dc_{i}" for i in range(3)), "opacity"]
        names += [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
        columns = [
            self.get_xyz,
            self._xyz.new_zeros(len(self), 3),
            self._features_dc[:, 0],
            torch.log(opacity / (1 - opacity)),
            torch.log(self.get_scaling),
            self.rotation_unnormalised,
        ]
        # One [M, 17] float32 table (each column rounded to float32 from its own precision), written straight
        # from its memory: a PLY vertex row is exactly a row of it.
        table = torch.cat([c.detach().float() for c in columns], 1).cpu().numpy().astype("<f4", copy=False)
        header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(self)}"]
        header += [f"property float {name}" for name in names] + ["end_header"]
        with open(path, "wb") as f:
            f.write(("\n".join(header) + "\n").encode("ascii"))
            f.write(memoryview(np.ascontiguousarray(table)))
