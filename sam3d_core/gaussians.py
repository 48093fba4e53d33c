"""3D Gaussians as decoded from a SLAT: raw fields, their activations, and a 3DGS-convention PLY writer.

Positions live in the object's local frame [-0.5, 0.5]³ (z up). The raw fields are what the decoder
predicts; the `get_*` properties apply the official activations and biases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SH_C0 = 0.28209479177387814  # degree-0 spherical harmonic: colour = SH_C0 * dc + 0.5


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def logit(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x / (1 - x))


@dataclass
class Gaussians:
    """M Gaussians (sh degree 0). Raw fields as predicted; biases from `SLatGaussianDecoderConfig`."""

    _xyz: torch.Tensor  # [M, 3] in [0, 1]
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

    def save_ply(self, path: str | Path) -> None:
        """Write the 3DGS PLY convention (binary little-endian float32): x y z, nx ny nz (0), f_dc_0..2,
        opacity (logit), scale_0..2 (log), rot_0..3 (w x y z, not normalised, as the official writer)."""
        opacity = self.get_opacity.detach().double()
        columns = [
            ("x", self.get_xyz[:, 0]),
            ("y", self.get_xyz[:, 1]),
            ("z", self.get_xyz[:, 2]),
            *[(name, torch.zeros(len(self))) for name in ("nx", "ny", "nz")],
            *[(f"f_dc_{i}", self._features_dc[:, 0, i]) for i in range(3)],
            ("opacity", torch.log(opacity / (1 - opacity))[:, 0]),
            *[(f"scale_{i}", torch.log(self.get_scaling[:, i])) for i in range(3)],
            *[(f"rot_{i}", self.rotation_unnormalised[:, i]) for i in range(4)],
        ]
        rows = np.empty(len(self), dtype=[(name, "<f4") for name, _ in columns])
        for name, values in columns:
            rows[name] = values.detach().float().cpu().numpy()
        header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(self)}"]
        header += [f"property float {name}" for name, _ in columns] + ["end_header"]
        with open(path, "wb") as f:
            f.write(("\n".join(header) + "\n").encode("ascii"))
            f.write(rows.tobytes())
