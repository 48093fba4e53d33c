"""The same script under torchrun: 2 real processes (gloo, CPU) give the loss curve of 1 process for a fixed
global batch (1 process accumulates 2 micro-batches, 2 processes take one each), with DDP and with FSDP2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixture import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def config(path: Path, data: Path, output: str, **extra) -> Path:
    lines = [
        'recipe = "sft-stage2"', 'base = "random"', 'preset = "tiny"', f'data = ["{data}"]', f'output = "{output}"',
        "steps = 3", "batch_size = 2", "micro_batch = 1", "num_workers = 0", "warmup_steps = 1", "log_every = 1",
        "lr = 1e-3", "p_uncond = 0.5",
    ] + [f"{k} = {json.dumps(v)}" for k, v in extra.items()]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_dataset(tmp / "samples", n=4)
    run([sys.executable, "-m", "sam3d_core.cli", "train", str(config(tmp / "one.toml", data, "one")), "--quiet"], tmp)
    return tmp, data


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_loss_curve(single, mode):
    tmp, data = single
    cfg = config(tmp / f"{mode}.toml", data, mode, distributed=mode)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run([*torchrun, "-m", "sam3d_core.cli", "train", str(cfg), "--quiet"], tmp)
    one, two = losses(tmp / "one"), losses(tmp / mode)
    assert len(one) == len(two) == 3
    assert one[0] != one[2]  # the curve moves, so equal curves say something
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-6)
    a = load_file(str(tmp / "one" / "weights" / "slat_generator.safetensors"))
    b = load_file(str(tmp / mode / "weights" / "slat_generator.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
