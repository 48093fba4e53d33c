"""LoRA adapters on the flow models through `peft` (the maintained library; nothing hand-rolled here).

    peft_model = apply_lora(generator, rank=16, alpha=16, dropout=0, targets=("blocks.*.self_attn.*", ...))
    with peft_model.disable_adapter():     # the frozen reference of DPO: the base model, same memory
        ...
    merged = merge(peft_model)             # a plain SSFlowModel / SLatFlowModel with W + (alpha / r) B A

Targets are fnmatch patterns over module names; every nn.Linear they match gets an adapter. In stage 1 the
default patterns reach the per-modality attention dicts (`self_attn.to_qkv.shape`, `cross_attn.<stream>.to_kv`,
...), i.e. every leaf Linear of both MoT streams' attention. An adapter kept separate is a folder of peft's own
files (adapter_config.json + adapter_model.safetensors) plus our manifest; `load_adapter` checks its hashes and
the base model it was trained on, then applies it on top of that base.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from pathlib import Path

import torch.nn as nn

from sam3d_core.training.config import ConfigError
from sam3d_core.weights.store import CheckpointError, sha256_file, verify_folder

ADAPTER_FORMAT = "sam3d-lora"


def _peft():
    try:
        import peft
    except ModuleNotFoundError as e:
        if e.name != "peft":  # installed, but something it imports is missing: say what, not "install peft"
            raise ImportError(f"peft is installed but does not import ({e}): reinstall it with its dependencies") from e
        raise ImportError("params = 'lora' needs peft: pip install 'sam3d[train]' (or pip install peft)") from None
    except ImportError as e:  # installed but broken (a version clash, a package that shadows one of its imports)
        raise ImportError(f"peft is installed but does not import ({e})") from e
    return peft


def target_modules(generator: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Names of the nn.Linear modules of `generator` matched by any pattern (fnmatch)."""
    names = [
        n for n, m in generator.named_modules() if isinstance(m, nn.Linear) and any(fnmatchcase(n, p) for p in patterns)
    ]
    if not names:
        raise ConfigError(
            f"lora_targets = {list(patterns)} match no Linear layer of the flow model; use patterns such as "
            "'blocks.*.self_attn.*' (module names without the 'generator.' prefix)"
        )
    return names


def apply_lora(generator: nn.Module, rank: int, alpha: float, dropout: float, targets: tuple[str, ...]):
    """Wrap `generator` in a peft model with adapters on the matched Linears; base weights frozen."""
    peft = _peft()
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules(generator, targets), bias="none"
    )
    return peft.get_peft_model(generator, config)


def merge(peft_model) -> nn.Module:
    """The base module with every adapter folded into its weights (W <- W + alpha / r * B @ A)."""
    return peft_model.merge_and_unload()


def adapter_state(peft_model) -> dict:
    """The adapter tensors in peft's own naming (what `save_adapter` writes)."""
    return _peft().get_peft_model_state_dict(peft_model)


def save_adapter(peft_model, folder: Path, base: dict) -> list[Path]:
    """Write peft's adapter files into `folder` (which exists); `base` describes the base model. Returns the files."""
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)  # peft's generic card; ours is written by output.py
    info = {"format": ADAPTER_FORMAT, "base": base}
    (folder / "adapter_base.json").write_text(json.dumps(info, indent=2))
    return [folder / n for n in ("adapter_config.json", "adapter_model.safetensors", "adapter_base.json")]


def load_adapter(generator: nn.Module, folder: str | Path, base_digest: str | None = None, merged: bool = True):
    """Apply the adapter in `folder` (hashes checked) to `generator`; merged=True folds it into the weights.

    base_digest: the weights hash of the base model `generator` came from; a mismatch with the base the adapter
    was trained on is an error (an adapter on the wrong base gives silently wrong outputs).
    """
    folder = Path(folder)
    if not (folder / "manifest.json").is_file() or not (folder / "adapter_base.json").is_file():
        raise CheckpointError(f"{folder} is not a sam3d LoRA adapter folder (no manifest.json / adapter_base.json)")
    problems = verify_folder(folder)
    if problems:
        raise CheckpointError(f"{folder} failed its integrity check: " + "; ".join(problems))
    info = json.loads((folder / "adapter_base.json").read_text())
    want = info.get("base", {}).get("digest")
    if base_digest is not None and want and want != base_digest:
        raise CheckpointError(
            f"{folder} was trained on base weights {want}, not {base_digest}; load it on top of "
            f"{info['base'].get('name', 'its base model')!r}"
        )
    model = _peft().PeftModel.from_pretrained(generator, str(folder))
    return merge(model) if merged else model


def file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}
