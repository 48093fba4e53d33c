"""Small sparse voxel sets shared by the kernel tests."""

from __future__ import annotations

import pytest
import torch


def random_voxels(batch: int, res: int, density: float, seed: int = 0) -> torch.Tensor:
    """[N, 4] int32 (batch, x, y, z): a random occupancy of a `res`³ grid per batch item, rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    coords = (torch.rand(batch, res, res, res, generator=g) < density).nonzero().to(torch.int32)
    return coords[torch.randperm(coords.shape[0], generator=g)]


def sphere_shell(res: int, batch: int = 1) -> torch.Tensor:
    """[N, 4] int32: voxels of a one-voxel-thick sphere surface filling a `res`³ grid (a typical object)."""
    r = torch.arange(res, dtype=torch.float32) - (res - 1) / 2
    d = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2).sqrt()
    shell = ((d - (res / 2 - 1.5)).abs() < 0.87).nonzero()
    return torch.cat([torch.cat([torch.full_like(shell[:, :1], b), shell], 1) for b in range(batch)]).to(torch.int32)


@pytest.fixture
def voxels():
    """`voxels(batch, res, density, seed)` -> random [N, 4] int32 coords (see `random_voxels`)."""
    return random_voxels


@pytest.fixture
def shell():
    """`shell(res, batch)` -> [N, 4] int32 coords of a sphere surface (see `sphere_shell`)."""
    return sphere_shell
