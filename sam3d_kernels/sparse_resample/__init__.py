"""Sparse 2x down/upsampling with the official mean-with-include_self quirk (see `reference.py`).

These are pure PyTorch on every device: a `unique` plus one scatter / gather is already a single
bandwidth-bound kernel each, so there is no Triton twin.
"""

from __future__ import annotations

from .reference import downsample2, upsample2

__all__ = ["downsample2", "upsample2"]
