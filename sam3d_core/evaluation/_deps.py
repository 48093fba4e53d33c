"""The evaluation's optional dependencies, imported in one place with the install hint."""

from __future__ import annotations

HINT = "pip install 'sam3d[eval]'"


def scipy_modules():
    """scipy with its `spatial` (KD-tree, convex hull, distances) and `optimize` (assignment) modules loaded."""
    try:
        import scipy.optimize
        import scipy.spatial
    except ImportError as e:
        raise ImportError(f"the evaluation metrics need scipy: {HINT}") from e
    return scipy


def trimesh_module():
    """trimesh with `registration` (ICP), `sample` (surface sampling) and `creation` (primitives) loaded."""
    try:
        import trimesh
        import trimesh.creation
        import trimesh.registration
        import trimesh.sample
    except ImportError as e:
        raise ImportError(f"the evaluation needs trimesh: {HINT}") from e
    return trimesh
