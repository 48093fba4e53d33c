"""LoRA through peft: adapters on the per-modality attention Linears only, the frozen base untouched, a merged
adapter equal to base + adapter, and an adapter kept separate loaded on top of its base model by name."""

from __future__ import annotations

import json

import pytest
import torch
from train_fixture import make_dataset, tiny

from sam3d_core.models.ss_flow import latent_shapes
from sam3d_core.models.stages import Stage1Model, init_random_weights
from sam3d_core.registry import stage1_preset
from sam3d_core.training.config import ConfigError
from sam3d_core.training.loop import load_base, train
from sam3d_core.training.lora import apply_lora, merge, target_modules
from sam3d_core.training.memory import fit_advice
from sam3d_core.training.output import load_adapted_state, model_card, write_weights
from sam3d_core.weights import hub
from sam3d_core.weights.store import CheckpointError

PATTERNS = ("blocks.*.self_attn.*", "blocks.*.cross_attn.*")


def inputs(cfg, b=2):
    gen = torch.Generator().manual_seed(0)
    x = {k: torch.randn(b, *s, generator=gen) for k, s in latent_shapes(cfg.flow).items()}
    return (
        x,
        torch.tensor([100.0, 700.0][:b]),
        torch.randn(b, 20, cfg.flow.cond_channels, generator=gen),
        torch.zeros(b),
    )


def test_targets_are_the_leaf_linears_of_the_per_modality_attention_dicts():
    g = Stage1Model(stage1_preset("tiny")).generator
    names = target_modules(g, PATTERNS)
    per_block = [n.removeprefix("blocks.0.") for n in names if n.startswith("blocks.0.")]
    streams = ("shape", "6drotation_normalized")
    assert sorted(per_block) == sorted(
        [f"self_attn.{p}.{s}" for p in ("to_qkv", "to_out") for s in streams]
        + [f"cross_attn.{s}.{p}" for s in streams for p in ("to_q", "to_kv", "to_out")]
    )
    assert len(names) == 10 * stage1_preset("tiny").flow.num_blocks
    with pytest.raises(ConfigError, match="match no Linear layer"):
        target_modules(g, ("generator.blocks.*",))  # names are relative to the flow model


def test_a_merged_adapter_equals_base_plus_adapter_and_the_base_stays_bit_identical():
    cfg = stage1_preset("tiny")
    g = init_random_weights(Stage1Model(cfg)).generator
    before = {k: v.clone() for k, v in g.state_dict().items()}
    x, t, cond, d = inputs(cfg)
    with torch.no_grad():
        base_out = g(x, t, cond, d)
    peft_model = apply_lora(g, 4, 8.0, 0.0, PATTERNS)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        adapted = peft_model(x, t, cond, d)
        with peft_model.disable_adapter():  # the DPO reference: exactly the base
            ref = peft_model(x, t, cond, d)
    assert all(torch.equal(ref[k], base_out[k]) for k in ref)
    assert not torch.allclose(adapted["shape"], base_out["shape"])
    merged = merge(peft_model)
    with torch.no_grad():
        merged_out = merged(x, t, cond, d)
    for k in adapted:
        torch.testing.assert_close(merged_out[k], adapted[k], rtol=1e-4, atol=1e-5)
    state = merged.state_dict()
    assert set(state) == set(before)
    changed = {k for k in before if not torch.equal(state[k], before[k])}
    assert changed == {f"{n}.weight" for n in target_modules(merged, PATTERNS)}  # biases and the rest untouched


def test_an_adapter_kept_separate_loads_on_top_of_its_base_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    data = make_dataset(tmp_path / "samples", n=2)
    # an installed base model (a tiny random one, written like any weights folder)
    base_cfg = tiny("sft-stage2", data, tmp_path / "unused")
    model, info = load_base(base_cfg)
    write_weights(hub.models_dir(), "tiny-base", 2, model.cfg, model.state_dict(), info, "# base\n", {})
    _, _, digest = hub.load_stage2_state("tiny-base")

    common = dict(base="tiny-base", params="lora", steps=2, lr=1e-2, ema_decay=0.0)
    merged = train(tiny("sft-stage2", data, tmp_path / "merged", **common))
    separate = train(tiny("sft-stage2", data, tmp_path / "adapter", lora_merge=False, **common))
    manifest = json.loads((separate.weights / "manifest.json").read_text())
    assert manifest["kind"] == "lora-adapter" and "adapter_model.safetensors" in manifest["files"]
    base_info = json.loads((separate.weights / "adapter_base.json").read_text())["base"]
    assert base_info["name"] == "tiny-base" and base_info["digest"] == digest

    _, state, _ = load_adapted_state(separate.weights, 2)
    _, want, _ = hub.load_stage2_state(merged.weights)
    assert set(state) == set(want)
    for k in want:
        torch.testing.assert_close(state[k], want[k], rtol=0, atol=1e-6)

    # the CLI installs base + adapter as a model the worker and the add-on load by name
    from sam3d_core.cli.main import main

    assert main(["train", "--merge", str(separate.weights), "--name", "studio-v1"]) == 0
    _, installed, _ = hub.load_stage2_state("studio-v1")
    assert all(torch.equal(installed[k], state[k]) for k in state)

    # an adapter on other base weights is refused
    info_path = separate.weights / "adapter_base.json"
    other = json.loads(info_path.read_text())
    other["base"]["digest"] = "0" * 16
    info_path.write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match="failed its integrity check"):  # the manifest's hash sees the edit
        load_adapted_state(separate.weights, 2)


def test_fit_advice_names_the_micro_batch_that_fits():
    gib = 1024**3
    msg = fit_advice(
        80 * gib, 20 * gib, 9 * gib, 8, 8, 1, lora=False, checkpointing=False, fsdp=False, device_name="H100"
    )
    # usable 0.92 * 80 = 73.6 GiB; (73.6 - 20) / 9 = 5.96 -> 5 samples
    assert "micro_batch = 8 does not fit on H100 (80 GiB)" in msg and "micro_batch = 5 fits" in msg
    assert "accumulating 2 micro-batches" in msg and "grad_checkpointing = true" in msg
    msg = fit_advice(80 * gib, 78 * gib, None, 1, 6, 1, lora=False, checkpointing=True, fsdp=False)
    assert "does not fit on top of them even at micro_batch = 1" in msg and "params = 'lora'" in msg
    assert "distributed = 'fsdp'" in msg


def test_the_model_card_has_the_data_steps_device_time_and_eval_table():
    card = model_card(
        "props-v1",
        {"recipe": "lora-stage1", "stage": 1, "objective": "flow", "params": "lora", "batch_size": 6, "lr": 1e-4,
         "ema_decay": 0.0, "precision": "auto"},
        {"name": "official", "digest": "abc"},
        [{"folder": "captures", "samples": 120, "licences": {"CC-BY-4.0": 120}}],
        2000, 12000, "NVIDIA H200", 8, 7200.0, {"val_loss": 0.25, "eval_f1": 0.8},
    )  # fmt: skip
    assert "| captures | 120 | CC-BY-4.0 (120) |" in card and "steps: 2000 (12000 samples seen)" in card
    assert "device time 16.00 GPU-h" in card and "| val_loss | 0.25 |" in card and "| eval_f1 | 0.8 |" in card


def test_fit_advice_when_activations_not_weights_are_the_problem():
    gib = 1024**3
    msg = fit_advice(140 * gib, int(4.6 * gib), None, 3, 3, 1, lora=True, checkpointing=False, fsdp=False)
    assert "grad_checkpointing = true" in msg and "fsdp" not in msg  # sharding weights would not help


def test_one_sample_of_a_batch_runs_alone():
    """What the out-of-memory handler measures: the micro-batch cut to its first sample, both stages."""
    from train_fixture import objective_and_batch

    from sam3d_core.training.loop import _first_sample

    for name in ("dpo-stage2", "sft-stage2"):
        obj, batch, draws = objective_and_batch(name, n=2)
        one, one_draws = _first_sample(batch, draws, 2)
        assert one.size == 1 and int(one.target["coords"][:, 0].max()) == 0
        assert one_draws.noise["chosen"].shape == one.target["feats"].shape
        loss, _ = obj(one, one_draws)
        assert torch.isfinite(loss)
