"""Whether Triton is usable: asked on the first call, never when a kernels package is imported."""

from __future__ import annotations

import functools


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
