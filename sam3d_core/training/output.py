"""The result of a run: a weights folder that the CLI, the worker, the add-on and the app load as they load the
imported official weights (`--model FOLDER`, or `--model NAME` once installed), with a model card.

Layout (as `weights.hub` writes on import; the same config JSON, component files and manifest with sha256):
    stage1.json, ss_generator.safetensors, ss_decoder.safetensors            the trained stage (or stage 2's)
    stage2.json, slat_generator.safetensors, ...                            the other stage, copied from the base
    README.md                                                               the model card
    manifest.json                                                           sha256 and size of every file
A LoRA adapter kept separate is a folder of peft's adapter files + adapter_base.json (the base model's name
and weights hash) + README.md + manifest.json; `load_adapted_state` rebuilds the full weights from it and
the base by name.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from sam3d_core.config import Stage1Config, Stage2Config, load_json, save_json
from sam3d_core.models.stages import Stage1Model, Stage2Model
from sam3d_core.version import __version__
from sam3d_core.weights.convert import STAGE1_COMPONENTS, STAGE2_COMPONENTS
from sam3d_core.weights.store import MANIFEST_FORMAT, CheckpointError, sha256_file, staged_folder

STAGES = {
    1: ("stage1", STAGE1_COMPONENTS, Stage1Config, Stage1Model),
    2: ("stage2", STAGE2_COMPONENTS, Stage2Config, Stage2Model),
}


def _record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _write_stage(folder: Path, stage: int, cfg, state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The stage's config JSON and one safetensors file per component (split by our key prefixes)."""
    name, components, _, _ = STAGES[stage]
    files = {}
    for comp in components:
        prefixes = tuple(ours for _, ours in comp.prefixes)
        part = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(prefixes)}
        path = folder / f"{comp.name}.safetensors"
        save_file(part, str(path), metadata={"format": "pt"})
        files[path.name] = _record(path)
    save_json(cfg, folder / f"{name}.json")
    files[f"{name}.json"] = _record(folder / f"{name}.json")
    return files


def _copy_other_stage(folder: Path, base_dir: Path | None, trained_stage: int) -> tuple[dict, list[str]]:
    """Copy the untouched stage's files from the base model folder (when it has them)."""
    if base_dir is None:
        return {}, []
    name, components, _, _ = STAGES[3 - trained_stage]
    names = [f"{c.name}.safetensors" for c in components] + [f"{name}.json"]
    if not all((base_dir / n).is_file() for n in names):
        return {}, []
    files = {}
    for n in names:
        shutil.copyfile(base_dir / n, folder / n)
        files[n] = _record(folder / n)
    return files, [name]


def write_weights(
    root: Path,
    name: str,
    stage: int,
    cfg,
    state: dict[str, torch.Tensor] | None,
    base: dict,
    card: str,
    training: dict,
    adapter=None,
    overwrite: bool = False,
) -> Path:
    """Write the weights folder root/name atomically (`staged_folder`): the trained stage's full `state`, or,
    with `adapter` (a peft model), the adapter alone. base: {"name", "folder", "digest"} of the base model."""
    with staged_folder(root, name, overwrite) as tmp:
        if adapter is None:
            files = _write_stage(tmp, stage, cfg, state)
            other, other_stages = _copy_other_stage(tmp, Path(base["folder"]) if base.get("folder") else None, stage)
            files.update(other)
            stages = sorted([STAGES[stage][0], *other_stages])
        else:
            from sam3d_core.training.lora import save_adapter

            files = {p.name: _record(p) for p in save_adapter(adapter, tmp, base)}
            save_json(cfg, tmp / f"{STAGES[stage][0]}.json")
            files[f"{STAGES[stage][0]}.json"] = _record(tmp / f"{STAGES[stage][0]}.json")
            stages = []
        (tmp / "README.md").write_text(card)
        files["README.md"] = _record(tmp / "README.md")
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "stages": stages,
            "kind": "weights" if adapter is None else "lora-adapter",
            "source": f"sam3d train from {base.get('name')}",
            "sources": {},
            "files": files,
            "imported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "sam3d_version": __version__,
            "training": training,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return root / name


def load_adapted_state(adapter_dir: str | Path, stage: int, check_hashes: bool = True) -> tuple[object, dict, str]:
    """Config, full state dict and a weights hash of `base + adapter`: the adapter's base model is found by
    name (`sam3d weights list`) and its weights hash checked; the adapter is merged into the weights."""
    from sam3d_core.training.lora import load_adapter
    from sam3d_core.weights.hub import load_stage1_state, load_stage2_state

    folder = Path(adapter_dir)
    info_path = folder / "adapter_base.json"
    if not info_path.is_file():
        raise CheckpointError(f"{folder} is not a LoRA adapter folder written by `sam3d train` (no adapter_base.json)")
    base = json.loads(info_path.read_text())["base"]
    loader = load_stage1_state if stage == 1 else load_stage2_state
    cfg, state, digest = loader(
        base["folder"] if base.get("folder") and Path(base["folder"]).is_dir() else base["name"]
    )
    name, _, cfg_cls, model_cls = STAGES[stage]
    adapter_cfg = load_json(cfg_cls, folder / f"{name}.json")
    with torch.device("meta"):
        model = model_cls(adapter_cfg)
    model.load_state_dict(state, strict=True, assign=True)
    model.generator = load_adapter(model.generator, folder, base_digest=base.get("digest"), merged=True)
    return adapter_cfg, model.state_dict(), f"{digest}+{sha256_file(folder / 'adapter_model.safetensors')[:8]}"


def model_card(
    name: str,
    cfg_mapping: dict,
    base: dict,
    data: list[dict],
    steps: int,
    samples: int,
    device: str,
    world: int,
    elapsed_s: float,
    evals: dict,
) -> str:
    """The README.md of a weights folder: what was trained on what, for how long, and how it scores."""
    lines = [
        f"# {name}",
        "",
        f"Fine-tuned from `{base.get('name')}` (weights {base.get('digest')}) with `sam3d train` "
        f"(recipe `{cfg_mapping.get('recipe') or 'custom'}`: stage {cfg_mapping['stage']}, objective "
        f"{cfg_mapping['objective']}, {cfg_mapping['params']} parameters).",
        "",
        "## Data",
        "",
        "| folder | samples | licences |",
        "|---|---|---|",
    ]
    for d in data:
        lic = ", ".join(f"{k} ({v})" for k, v in sorted(d.get("licences", {}).items())) or "unknown"
        lines.append(f"| {d['folder']} | {d['samples']} | {lic} |")
    hours = elapsed_s / 3600
    lines += [
        "",
        "## Training",
        "",
        f"- steps: {steps} ({samples} samples seen), batch {cfg_mapping['batch_size']}, lr {cfg_mapping['lr']}",
        f"- device: {device} x {world}; wall time {hours:.2f} h; device time {hours * world:.2f} GPU-h",
        f"- EMA: {cfg_mapping['ema_decay'] or 'off'}; precision {cfg_mapping['precision']}",
        "",
        "## Evaluation",
        "",
    ]
    if evals:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(evals.items())]
    else:
        lines.append("No evaluation was run (set val_data / eval_data in the configuration).")
    lines += ["", "## Configuration", "", "```json", json.dumps(cfg_mapping, indent=1), "```", ""]
    return "\n".join(lines)
