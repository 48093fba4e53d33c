"""Fitting a sparse-structure encoder against a frozen decoder (data/fit_encoder.py).

The tiny preset's encoder and decoder on an 8^3 grid (2^3 latent: the networks are fully convolutional, and 64^3
costs ~100x more per step on a CPU). The frozen "official" decoder is first trained jointly with a throwaway
encoder, as the official VAE was; then a fresh encoder is fitted against it alone.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam3d_core.data.fit_encoder import (
    FitConfig,
    _grids,
    decoded_iou,
    dice_loss,
    fit_ss_encoder,
    mirror_config,
)
from sam3d_core.models.ss_vae import SSDecoder, SSEncoder
from sam3d_core.registry import stage1_preset

R = 8
FIT_THRESHOLD = 0.9  # the mean decoded IoU the fitted encoder must reach on the shapes


def _block(lo, hi) -> np.ndarray:
    g = np.stack(np.meshgrid(*[np.arange(R)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return g[((g >= lo) & (g < hi)).all(1)]


CUBE = _block([2, 2, 2], [6, 6, 6])
SHAPES = [
    CUBE,
    _block([1, 3, 2], [7, 5, 6]),
    _block([3, 1, 1], [5, 7, 7]),
    np.concatenate([_block([1, 1, 1], [7, 3, 3]), _block([1, 1, 3], [3, 3, 7])]),  # an L
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These convolutions are tiny: a second thread only adds contention on a shared CPU (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def frozen_decoder(one_thread) -> SSDecoder:
    """A tiny decoder that can decode SHAPES: trained jointly with a throwaway encoder (BCE + dice)."""
    cfg = stage1_preset("tiny").decoder
    torch.manual_seed(0)
    dec, enc = SSDecoder(cfg), SSEncoder(mirror_config(cfg))
    opt = torch.optim.Adam([*dec.parameters(), *enc.parameters()], lr=3e-3)
    x = _grids(SHAPES, R, torch.device("cpu"))
    for _ in range(150):
        logits = dec(enc(x)[0])
        loss = F.binary_cross_entropy_with_logits(logits, x) + dice_loss(logits, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert decoded_iou(enc, dec, SHAPES, R) > 0.98, "the joint pre-training did not converge; the test is moot"
    return dec


def test_fitting_against_the_frozen_decoder_reaches_the_iou(frozen_decoder):
    torch.manual_seed(1)
    encoder = SSEncoder(mirror_config(frozen_decoder.cfg))
    before_decoder = copy.deepcopy(frozen_decoder.state_dict())
    cube_before = decoded_iou(encoder, frozen_decoder, [CUBE], R)
    cfg = FitConfig(max_steps=80, batch_size=4, lr=3e-3, eval_every=5, target_iou=FIT_THRESHOLD, resolution=R)
    seen = []
    result = fit_ss_encoder(encoder, frozen_decoder, SHAPES, SHAPES, cfg, progress=lambda *a: seen.append(a))

    assert result.history[0][2] < FIT_THRESHOLD  # a fresh encoder does not decode to the shapes
    assert result.reached and result.iou >= FIT_THRESHOLD
    assert result.steps < cfg.max_steps  # stopped at the target
    assert result.iou == pytest.approx(decoded_iou(encoder, frozen_decoder, SHAPES, R))
    assert [s[0] for s in seen] == [h[0] for h in result.history[1:]]
    # the cube's round trip improves
    cube_after = decoded_iou(encoder, frozen_decoder, [CUBE], R)
    assert cube_after >= FIT_THRESHOLD > cube_before
    # the decoder is frozen: not one weight moved
    for k, v in frozen_decoder.state_dict().items():
        assert torch.equal(v, before_decoder[k]), k
    assert np.isfinite(result.latent_mean) and result.latent_std > 0


def test_fit_refuses_empty_shape_lists(frozen_decoder):
    enc = SSEncoder(mirror_config(frozen_decoder.cfg))
    with pytest.raises(ValueError, match="held_out 0"):
        fit_ss_encoder(enc, frozen_decoder, SHAPES, [], FitConfig(resolution=R))


def test_mirror_of_the_official_decoder_is_the_official_encoder():
    from sam3d_core.registry import encoder_preset

    assert mirror_config(stage1_preset("official").decoder) == encoder_preset("official").ss_encoder
    assert mirror_config(stage1_preset("tiny").decoder) == encoder_preset("tiny").ss_encoder


def _sample(i: int, occupancy: np.ndarray):
    from sam3d_core.data.sample import Sample

    return Sample(
        sample_id=f"s{i}",
        photo=np.zeros((8, 8, 3), np.uint8),
        mask=np.ones((8, 8), bool),
        K=np.array([[8.0, 0, 4], [0, 8, 4], [0, 0, 1]]),
        rotation=np.eye(3),
        translation=np.array([0.0, 0, 2]),
        scale=np.ones(3),
        occupancy=occupancy,
    )


def test_fit_encoder_command_adds_the_encoder_to_the_model(tmp_path, monkeypatch, capsys):
    """The command's wiring on the tiny stage-1 fixture at 64^3 (one step: its decoder is random, so the IoU target
    is set to 0 by hand; reaching a real target is the test above)."""
    import shutil
    from pathlib import Path

    from sam3d_core.cli.main import main
    from sam3d_core.data.sample import ShardWriter
    from sam3d_core.weights import hub

    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    src = tmp_path / "official"
    shutil.copytree(Path(__file__).parent / "fixtures" / "stage1_small" / "official", src)
    hub.import_official(src)
    data = tmp_path / "samples"
    cube = np.stack(np.meshgrid(*[np.arange(24, 40)] * 3, indexing="ij"), -1).reshape(-1, 3)
    with ShardWriter(data) as w:
        w.add(_sample(0, cube))
        w.add(_sample(1, cube[cube[:, 2] < 30]))
    args = ["weights", "fit-encoder", "official", "--data", str(data), "--max-steps", "1", "--batch-size", "1"]
    assert not hub.has_stage("official", "ss_encoder")
    assert main([*args, "--eval-every", "1", "--target-iou", "0.0"]) == 0
    assert "ss_encoder fitted: held-out IoU" in capsys.readouterr().out
    assert hub.has_stage("official", "ss_encoder") and hub.verify("official") == []
    cfg, _, _ = hub.load_ss_encoder_state("official")
    assert cfg.channels == (8, 16, 32)  # the mirror of the fixture's decoder
    manifest = (hub.resolve_model_dir("official") / "manifest.json").read_text()
    assert '"held_out_shapes": 1' in manifest and '"train_shapes": 1' in manifest
    assert main([*args, "--target-iou", "0.0"]) == 2  # already has one: a one-line error, no traceback
    assert "already has an ss_encoder; pass --overwrite" in capsys.readouterr().err
