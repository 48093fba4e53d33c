"""bench/random_model.py: a random-weight model folder that loads as an imported model (hash-checked), with the
weights of the random pipelines the other benchmarks build."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sam3d_core.pipeline.reconstruct import Pipeline
from sam3d_core.pipeline.stage1 import Stage1Pipeline
from sam3d_core.pipeline.stage2 import Stage2Pipeline
from sam3d_core.registry import stage1_preset, stage2_preset
from sam3d_core.weights.store import CheckpointError, verify_folder

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "random_model.py"


def _script():
    spec = importlib.util.spec_from_file_location("random_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_model_folder_loads_with_the_random_pipelines_weights(tmp_path):
    folder = _script().write_random_model(tmp_path / "tiny-random", "tiny")
    assert verify_folder(folder) == []
    assert not [p for p in tmp_path.iterdir() if p.name != "tiny-random"]  # its temporary folder is gone
    pipe, which = Pipeline.load(str(folder), "cpu")
    assert pipe.stage2 is not None, which
    for loaded, fresh in (
        (pipe.stage1.model, Stage1Pipeline.from_random(stage1_preset("tiny"), seed=0).model),
        (pipe.stage2.model, Stage2Pipeline.from_random(stage2_preset("tiny"), seed=1).model),
    ):
        a, b = loaded.state_dict(), fresh.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="already exists"):
        _script().write_random_model(folder, "tiny")
