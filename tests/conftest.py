"""Shared test settings: `gpu` tests run only where CUDA is present."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the GPU machine (make test there)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
