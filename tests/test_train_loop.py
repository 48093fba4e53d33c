"""The training loop end to end at the tiny presets on the CPU: every objective and parameter choice trains and
exports weights the pipeline loads; frozen weights stay bit-identical; resume is exact; bad input is named."""

from __future__ import annotations

import dataclasses
import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from train_fixture import make_dataset, tiny

from sam3d_core.data.sample import SampleDataset, SampleError, ShardWriter
from sam3d_core.models.ss_flow import latent_shapes
from sam3d_core.training import checkpoint
from sam3d_core.training.config import ConfigError
from sam3d_core.training.loop import TrainingError, load_base, train
from sam3d_core.weights import hub
from sam3d_core.weights.store import CheckpointError, verify_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("samples") / "pairs", n=4, pairs=True)


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def base_state(cfg):
    model, _ = load_base(cfg)
    return model.state_dict()


@pytest.mark.parametrize(
    "name, kw",
    [
        ("sft-stage1", {}),
        ("lora-stage1", {}),
        ("dpo-stage1", {}),
        ("shortcut-stage1", {"shortcut_prob": 1.0, "shortcut_cfg_prob": 1.0}),
        ("sft-stage2", {"grad_checkpointing": True}),
        ("dpo-stage2", {"grad_checkpointing": True}),
        ("dpo-stage2", {"params": "full"}),  # the reference is then a frozen copy
    ],
)
def test_each_recipe_trains_and_exports_weights_the_pipeline_loads(data, tmp_path, name, kw):
    cfg = tiny(name, data, tmp_path / "run", steps=2, **kw)
    result = train(cfg)
    assert result.weights == tmp_path / "run" / "weights" and verify_folder(result.weights) == []
    lines = [r for r in records(result.run_dir) if "loss" in r]
    assert [r["step"] for r in lines] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
    manifest = json.loads((result.weights / "manifest.json").read_text())
    assert manifest["stages"] == [f"stage{cfg.stage}"] and "README.md" in manifest["files"]
    card = (result.weights / "README.md").read_text()
    assert "## Data" in card and "| 4 | CC0-1.0 (4) |" in card and f"recipe `{name}`" in card

    cfg_out, state, _ = (hub.load_stage1_state if cfg.stage == 1 else hub.load_stage2_state)(result.weights)
    base = base_state(cfg)
    assert set(state) == set(base)
    changed = {k for k in base if not torch.equal(state[k], base[k])}
    # frozen weights are bit-identical: the condition embedder and the decoders always, every
    # non-adapted layer with LoRA; the trained ones moved
    assert changed and all(k.startswith("generator.") for k in changed), sorted(changed)[:5]
    if cfg.params == "lora":
        assert all(k.endswith(".weight") and ("attn" in k) for k in changed), sorted(changed)[:5]
    if name == "shortcut-stage1":
        assert cfg_out.flow.is_shortcut_model


def test_the_trained_weights_run_in_the_pipeline(data, tmp_path):
    from train_fixture import make_sample

    from sam3d_core.pipeline.stage1 import Stage1Pipeline

    result = train(tiny("sft-stage1", data, tmp_path / "run", steps=1, ema_decay=0.0))
    pipe = Stage1Pipeline.from_pretrained(str(result.weights), device="cpu")
    s = make_sample(0)
    out = pipe(s.photo, s.mask, s.pointmap, seed=0, steps=2)
    assert out.latents["shape"].shape == (1, 4096, 8) and pipe.weights_id.startswith("sha256:")


def test_layout_only_training_leaves_shape_predictions_bit_identical(data, tmp_path):
    """The MoT attention mask (shape attends to shape only) lets the layout train alone."""
    cfg = tiny("sft-stage1", data, tmp_path / "run", steps=2, freeze=("layout_only",), lr=1e-3)
    result = train(cfg)
    _, state, _ = hub.load_stage1_state(result.weights)
    base = base_state(cfg)
    changed = sorted(k for k in base if not torch.equal(state[k], base[k]))
    assert changed and all(".6drotation_normalized." in k or "latent_mapping." in k for k in changed), changed
    before, _ = load_base(cfg)
    after, _ = load_base(cfg)
    after.load_state_dict(state)
    x = {
        k: torch.randn(1, *s, generator=torch.Generator().manual_seed(1))
        for k, s in latent_shapes(before.cfg.flow).items()
    }
    cond, t, d = (
        torch.randn(1, 154, 64, generator=torch.Generator().manual_seed(2)),
        torch.tensor([300.0]),
        torch.zeros(1),
    )
    with torch.no_grad():
        v0, v1 = before.generator(x, t, cond, d), after.generator(x, t, cond, d)
    assert torch.equal(v0["shape"], v1["shape"])
    assert not torch.equal(v0["translation"], v1["translation"])


@pytest.mark.parametrize("params", ["full", "lora"])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(data, tmp_path, params):
    # lora_dropout: the adapters' dropout draws from the global generator, which the checkpoint restores
    kw = dict(
        steps=4, save_every=1, ema_decay=0.9, lr=1e-3, params=params, lora_dropout=0.1 if params == "lora" else 0.0
    )
    full = train(tiny("sft-stage2", data, tmp_path / "a", **kw))

    def stop_at_3(p):
        if p["step"] == 3:
            raise KeyboardInterrupt  # a user's Ctrl-C after step 3, before its checkpoint

    cfg = tiny("sft-stage2", data, tmp_path / "b", **kw)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=stop_at_3)
    assert checkpoint.latest(tmp_path / "b").name == "step-000002"
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(cfg)
    resumed = train(cfg, resume=True)
    loss = {r["step"]: r["loss"] for r in records(tmp_path / "a") if "loss" in r}
    loss_b = {r["step"]: r["loss"] for r in records(tmp_path / "b") if "loss" in r}
    assert loss_b[3] == loss[3] and loss_b[4] == loss[4]
    for name in ("trainable.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "a" / "checkpoints" / "step-000004" / name))
        b = load_file(str(tmp_path / "b" / "checkpoints" / "step-000004" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    wa, wb = (
        load_file(str(full.weights / "slat_generator.safetensors")),
        load_file(str(resumed.weights / "slat_generator.safetensors")),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    cfg = tiny("sft-stage2", data, tmp_path / "run", steps=6, save_every=1, lr=1e30, warmup_steps=0, grad_clip=0.0)
    with pytest.raises(
        TrainingError, match=r"the loss became (nan|inf).*The last good checkpoint is .*step-0000\d\d.*Lower lr"
    ):
        train(cfg)
    last = checkpoint.latest(tmp_path / "run")
    state = json.loads((last / "state.json").read_text())
    assert torch.isfinite(torch.tensor(state["metrics"]["loss"]))
    assert records(tmp_path / "run")[-1]["event"] == "nan"
    assert not (tmp_path / "run" / "weights").exists()


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    cfg = tiny("sft-stage2", data, tmp_path / "run", steps=3, save_every=1)
    real_write, state = os.write, {"bytes": 0}

    def full_disk(fd, data):  # the disk fills up during the second checkpoint
        path = os.readlink(f"/proc/self/fd/{fd}")
        if "/checkpoints/.step-000002" in path:
            state["bytes"] += len(data)
            if state["bytes"] > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(
        checkpoint.DiskFullError,
        match=r"disk is full: checkpoint step-000002 could not be written.*step-000001 is intact",
    ):
        train(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]  # no half-written folder
    monkeypatch.setattr(os, "write", real_write)
    result = train(cfg, resume=True)  # space freed: the run continues from step 1
    assert result.steps == 3 and checkpoint.latest(tmp_path / "run").name == "step-000003"


def test_a_checkpoint_of_another_model_is_refused(data, tmp_path):
    cfg = tiny("sft-stage2", data, tmp_path / "run", steps=1)
    train(cfg)
    other = dataclasses.replace(cfg, params="lora", steps=2)
    with pytest.raises(
        CheckpointError, match=r"checkpoint of another model \(params: checkpoint \"full\", this run \"lora\""
    ):
        train(other, resume=True)
    other = dataclasses.replace(cfg, seed=5, steps=2)  # other random base weights
    with pytest.raises(
        CheckpointError, match=r"base_weights: checkpoint \"random:tiny:0\", this run \"random:tiny:5\""
    ):
        train(other, resume=True)


def test_bad_data_is_named(tmp_path):
    with ShardWriter(tmp_path / "empty"):
        pass
    cfg = tiny("sft-stage2", tmp_path / "empty", tmp_path / "run")
    with pytest.raises(SampleError, match=r"data: no samples in .*empty; build some with `sam3d data`"):
        train(cfg)
    (tmp_path / "notdata").mkdir()
    with pytest.raises(SampleError, match=r"data: .*notdata has no dataset.json"):
        train(dataclasses.replace(cfg, data=(str(tmp_path / "notdata"),)))
    from train_fixture import make_sample

    with ShardWriter(tmp_path / "nolatent") as w:
        s = make_sample(0)
        w.add(dataclasses.replace(s, ss_latent=None))
    with pytest.raises(SampleError, match=r"sample s000 has no ss_latent; stage-1 training needs the shape latent"):
        train(tiny("sft-stage1", tmp_path / "nolatent", tmp_path / "run1"))
    with pytest.raises(SampleError, match=r"sample s000 has no rejected alternative; DPO trains on preference pairs"):
        train(tiny("dpo-stage2", make_dataset(tmp_path / "single", n=1), tmp_path / "run2"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty and holds no sam3d run"):
        train(dataclasses.replace(cfg, output=str(tmp_path / "foreign")))
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_the_cli_trains_and_reports_errors_in_one_line(data, tmp_path, capsys):
    from sam3d_core.cli.main import main

    (tmp_path / "bad.toml").write_text('data = ["x"]\noutput = "o"\nstepz = 3\n')
    assert main(["train", str(tmp_path / "bad.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'stepz'; did you mean 'steps'?" in err
    good = tmp_path / "good.toml"
    good.write_text(
        f'recipe = "sft-stage2"\nbase = "random"\npreset = "tiny"\ndata = ["{data}"]\noutput = "run"\n'
        "steps = 2\nbatch_size = 2\nnum_workers = 0\nwarmup_steps = 1\n"
    )
    assert main(["train", str(good)]) == 0
    out = capsys.readouterr()
    assert f"weights: {tmp_path / 'run' / 'weights'}" in out.out and "2/2  loss" in out.err
    assert main(["train", "--template", "dpo-stage1"]) == 0
    assert 'objective = "dpo"' in capsys.readouterr().out


def test_validation_and_the_eval_hook_fill_the_metrics_and_the_model_card(data, tmp_path):
    cfg = tiny(
        "sft-stage1", data, tmp_path / "run", steps=2, val_data=(str(data),), val_every=1, val_batches=2,
        eval_every=2, eval_data=str(data),
    )  # fmt: skip
    result = train(cfg)
    lines = records(result.run_dir)
    val = [r["val_loss"] for r in lines if "val_loss" in r]
    assert len(val) == 2 and val[0] != val[1]  # fixed batches and draws: the change is the model's
    evals = [r for r in lines if "eval_n" in r]  # `sam3d eval` ran on the exported weights at step 2
    assert len(evals) == 1 and evals[0]["step"] == 2
    assert evals[0]["eval_n"] + evals[0]["eval_failed"] == len(SampleDataset(data))
    assert any(k.startswith("eval_") and k not in ("eval_n", "eval_failed") for k in evals[0]), evals[0]
    assert (result.run_dir / "eval-000002" / "manifest.json").is_file()  # the weights it evaluated
    assert f"| val_loss | {val[-1]:.6g} |" in (result.weights / "README.md").read_text()
