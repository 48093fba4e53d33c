"""The training configuration: one frozen dataclass, its TOML form, and the named recipes.

    cfg = load_config("finetune.toml")              # a TOML file; `recipe = "sft-stage1"` starts from a recipe
    cfg = recipe("lora-stage1", data=("captures/",), output="runs/props")

Every field carries its documentation in `field(metadata={"doc": ...})`; `describe()` renders them (the
`sam3d train --template` output and docs/training.md are made from it). A TOML file mirrors the dataclass:
top-level keys are fields, `[loss_weights]` is the one table. Unknown keys and wrong types are errors that
name the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sam3d_core.config import POSE_LATENTS

OBJECTIVES = ("flow", "dpo", "shortcut")
PARAMS = ("full", "lora")
PRECISIONS = ("auto", "bf16", "fp32")
TIME_SAMPLERS = ("lognormal", "uniform")
DISTRIBUTED = ("ddp", "fsdp")
VIEW_DEVICES = ("auto", "cpu", "device")


class ConfigError(ValueError):
    """A training configuration that cannot be used; the message names the key and the fix."""


def _f(default: Any, doc: str, **kw) -> Any:
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass(frozen=True)
class LossWeights:
    """Per-modality weights of the stage-1 flow-matching loss (paper eq. 1, Table 5)."""

    shape: float = _f(1.0, "the 16^3 x 8 shape latent (S)")
    rotation: float = _f(0.1, "the normalised 6D rotation (R)")
    translation: float = _f(1.0, "the scale-shift-invariant translation (t)")
    scale: float = _f(0.1, "the log scale (s)")
    translation_scale: float = _f(0.0, "the unused translation-scale latent (0 in the official config)")

    def by_latent(self) -> dict[str, float]:
        """The weights keyed by the flow model's latent names."""
        names = {"shape": "shape", "6drotation_normalized": "rotation"}
        names.update({n: n for n, _ in POSE_LATENTS if n not in names})
        return {latent: float(getattr(self, ours)) for latent, ours in names.items()}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. See docs/training.md for the recipes and examples."""

    # --- what to train ---
    recipe: str = _f("", "the named recipe this configuration started from (informational)")
    stage: int = _f(1, "1: the geometry model (shape + layout MoT); 2: the texture & refinement model (SLAT flow)")
    objective: str = _f("flow", "flow (supervised flow matching) | dpo (preference pairs) | shortcut (few-step)")
    params: str = _f("full", "full: train the unfrozen weights | lora: train LoRA adapters only (peft)")
    base: str = _f(
        "official",
        "the weights to start from: an imported model name or folder (`sam3d weights list`), or 'random' "
        "for random weights of `preset` (tests, benchmarks)",
    )
    preset: str = _f("official", "the model configuration preset used when base = 'random' (official | tiny)")
    freeze: tuple[str, ...] = _f(
        ("condition_embedder",),
        "what stays frozen (full fine-tuning): groups condition_embedder, shared (time embedder + adaLN, the "
        "official freeze_shared_parameters), d_embedder, shape_stream, pose_stream, layout_only (everything "
        "but the pose stream), or fnmatch patterns over parameter names such as 'generator.blocks.0.*'",
    )
    # --- data ---
    data: tuple[str, ...] = _f((), "sample folders (`sam3d data`; each holds a dataset.json) to train on")
    val_data: tuple[str, ...] = _f((), "sample folders for the validation loss (optional)")
    num_workers: int = _f(2, "data-loader processes per training process (0 = load in the training process)")
    view_device: str = _f(
        "auto",
        "a render pack's views: cpu (each rendered and preprocessed by the loader's processes) | device (a "
        "micro-batch rendered and preprocessed at once on the training device; the processes only draw the "
        "scenes; stage 1, flow or shortcut) | auto (device when training on CUDA, else cpu)",
    )
    # --- output ---
    output: str = _f("", "the run folder: checkpoints/, metrics.jsonl, tensorboard/ and the final weights/")
    name: str = _f("", "the model's name (weights folder, model card); default: the run folder's name")
    install: bool = _f(False, "also install the weights into the data folder under `name` (`--model NAME`)")
    # --- optimisation ---
    steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(6, "samples per optimizer step over all processes (the paper: 6 per GPU for stage 1)")
    micro_batch: int = _f(
        0, "samples per process per forward pass; 0 = batch_size / processes; the rest is gradient accumulation"
    )
    lr: float = _f(1e-5, "peak learning rate (AdamW)")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    weight_decay: float = _f(0.0, "AdamW weight decay (the paper trains without)")
    warmup_steps: int = _f(100, "linear warm-up steps before the cosine decay")
    min_lr_ratio: float = _f(0.1, "the cosine schedule ends at lr * min_lr_ratio")
    grad_clip: float = _f(1.0, "clip the gradient norm to this value (0 = no clipping)")
    ema_decay: float = _f(0.999, "exponential moving average of the trained weights (0 = off); exported if on")
    precision: str = _f("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32")
    grad_checkpointing: bool = _f(False, "recompute each transformer block in the backward pass (less memory)")
    seed: int = _f(0, "seed of the data order and of every random draw (noise, time, dropout)")
    # --- flow matching (paper C.2) ---
    loss_weights: LossWeights = _f(LossWeights(), "stage-1 per-modality loss weights (table [loss_weights])")
    time_sampler: str = _f(
        "lognormal", "training time t: lognormal = sigmoid(N(time_mean, time_std)) (official) | uniform"
    )
    time_mean: float = _f(-1.0, "mean of the logit-normal time sampler (official: -1)")
    time_std: float = _f(1.0, "standard deviation of the logit-normal time sampler (official: 1)")
    p_uncond: float = _f(0.1, "probability that a sample's condition is zeroed (trains the CFG branch)")
    pointmap_dropout: float = _f(0.1, "stage 1: probability that a sample's point-map tokens are zeroed")
    # --- DPO (paper C.3) ---
    dpo_beta: float = _f(5000.0, "DPO strength beta * T * w(t) of eq. 2 (constant w); errors are per-element means")
    # --- shortcut distillation (paper C.4) ---
    shortcut_prob: float = _f(0.25, "probability that a batch trains self-consistency instead of flow matching")
    shortcut_cfg_strength: float = _f(2.0, "CFG strength distilled into the shortcut targets (shape only)")
    shortcut_cfg_prob: float = _f(0.25, "probability that a self-consistency batch's targets use CFG")
    shortcut_loss_weight: float = _f(1.0, "weight of the self-consistency loss")
    shortcut_max_exponent: int = _f(7, "step sizes d are drawn from 1 / 2^k, k = 0 .. this")
    # --- LoRA ---
    lora_rank: int = _f(16, "LoRA rank r")
    lora_alpha: float = _f(16.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch input")
    lora_targets: tuple[str, ...] = _f(
        ("blocks.*.self_attn.*", "blocks.*.cross_attn.*"),
        "fnmatch patterns over the flow model's module names; every nn.Linear they match gets an adapter "
        "(default: the attention projections, per modality in stage 1)",
    )
    lora_merge: bool = _f(True, "merge the adapters into the exported weights; false: export the adapter alone")
    # --- scale-out ---
    distributed: str = _f("ddp", "under torchrun with several processes: ddp | fsdp (FSDP2, shards the weights)")
    device: str = _f("", "torch device; '' = cuda:LOCAL_RANK when CUDA is present, else cpu")
    # --- bookkeeping ---
    log_every: int = _f(10, "steps between metric lines (metrics.jsonl, TensorBoard)")
    save_every: int = _f(500, "steps between checkpoints (and one at the end)")
    keep_checkpoints: int = _f(2, "how many checkpoints to keep (the newest)")
    val_every: int = _f(0, "steps between validation-loss passes over val_data (0 = off)")
    val_batches: int = _f(4, "batches per validation pass")
    eval_every: int = _f(0, "steps between `sam3d eval` runs on eval_data (0 = off; needs sam3d_core.evaluation)")
    eval_data: str = _f("", "a sample folder for `sam3d eval` (the metrics of the model card's table)")

    # ------------------------------------------------------------------------------------------------

    def check(self) -> TrainConfig:
        """Raise ConfigError naming the first field with an impossible value; returns self."""
        choices = {
            "objective": OBJECTIVES,
            "params": PARAMS,
            "precision": PRECISIONS,
            "time_sampler": TIME_SAMPLERS,
            "distributed": DISTRIBUTED,
            "view_device": VIEW_DEVICES,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} = {getattr(self, key)!r}: expected one of {', '.join(allowed)}")
        if self.stage not in (1, 2):
            raise ConfigError(f"stage = {self.stage}: expected 1 (geometry) or 2 (texture & refinement)")
        if self.view_device == "device" and (self.stage != 1 or self.objective == "dpo"):
            raise ConfigError(
                "view_device = 'device' renders stage-1 views of a render pack (flow or shortcut); "
                "set view_device = 'cpu' (or 'auto') for this run"
            )
        if self.objective == "shortcut" and self.stage != 1:
            raise ConfigError("objective = 'shortcut' is for stage 1 only (the paper distils the geometry model)")
        for key in ("steps", "batch_size", "lora_rank", "log_every", "save_every", "keep_checkpoints", "val_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} = {getattr(self, key)}: expected an integer >= 1")
        for key in ("micro_batch", "warmup_steps", "val_every", "eval_every", "num_workers", "shortcut_max_exponent"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} = {getattr(self, key)}: expected an integer >= 0")
        if not self.lr > 0:
            raise ConfigError(f"lr = {self.lr}: expected a positive learning rate such as 1e-5")
        for key in ("p_uncond", "pointmap_dropout", "shortcut_prob", "shortcut_cfg_prob", "lora_dropout"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{key} = {getattr(self, key)}: expected a probability in [0, 1]")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay = {self.ema_decay}: expected a value in [0, 1), such as 0.999 (0 = off)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio = {self.min_lr_ratio}: expected a value in [0, 1]")
        if self.grad_clip < 0 or self.weight_decay < 0 or self.time_std <= 0 or self.dpo_beta <= 0:
            raise ConfigError("grad_clip and weight_decay must be >= 0, time_std and dpo_beta > 0")
        if not self.data:
            raise ConfigError('data is empty: list at least one sample folder (data = ["captures/samples"])')
        if not self.output:
            raise ConfigError('output is empty: name a run folder (output = "runs/my-props")')
        if self.eval_every and not self.eval_data:
            raise ConfigError("eval_every is set but eval_data is empty: name a sample folder for `sam3d eval`")
        if self.name and ("/" in self.name or "\\" in self.name or self.name.startswith(".")):
            raise ConfigError(f"name = {self.name!r}: a name, not a path (letters, digits, '-', '_')")
        if self.install and not (self.name or Path(self.output).name):
            raise ConfigError("install = true needs a name")
        return self

    @property
    def model_name(self) -> str:
        return self.name or Path(self.output).name


# --- recipes ----------------------------------------------------------------------------------------

# Hyper-parameters from the paper's Tables 5-6 where it gives them; the rest are stated choices.
RECIPES: dict[str, dict[str, Any]] = {
    # Geometry SFT (Table 5, alignment SFT on MITL / Art-3DO: lr 1e-5, S 1.0, R 0.1, t 1.0, s 0.1).
    "sft-stage1": dict(stage=1, objective="flow", params="full", lr=1e-5, batch_size=6, grad_checkpointing=True),
    # Texture SFT (Table 6: lr 1e-5, EMA 0.999, batch 4).
    "sft-stage2": dict(stage=2, objective="flow", params="full", lr=1e-5, batch_size=4, grad_checkpointing=True),
    # LoRA on the attention projections of both MoT streams; adapters start at zero and take a larger rate.
    "lora-stage1": dict(stage=1, objective="flow", params="lora", lr=1e-4, batch_size=6, ema_decay=0.0),
    # Geometry DPO (Table 5: shape only, S 1.0). Eq. 3 draws t uniformly; the reference is the base with the
    # adapters switched off. The paper fine-tunes fully at 2.5e-6; zero-initialised adapters need more.
    "dpo-stage1": dict(
        stage=1,
        objective="dpo",
        params="lora",
        lr=1e-5,
        batch_size=6,
        ema_decay=0.0,
        grad_checkpointing=True,  # chosen + rejected: twice the activations of SFT
        time_sampler="uniform",
        p_uncond=0.0,
        pointmap_dropout=0.0,
        loss_weights=LossWeights(shape=1.0, rotation=0.0, translation=0.0, scale=0.0),
    ),
    # Texture DPO (Table 6: batch 3, EMA 0.99; lr 1e-6 for full fine-tuning, more for adapters).
    "dpo-stage2": dict(
        stage=2,
        objective="dpo",
        params="lora",
        lr=5e-6,
        batch_size=3,
        ema_decay=0.0,
        grad_checkpointing=True,
        time_sampler="uniform",
        p_uncond=0.0,
    ),
    # Shortcut distillation (C.4: ~4K iterations, 25% self-consistency, CFG 2 in the targets). The official
    # ss_generator.yaml freezes the shared parameters (time embedder, adaLN) in this stage.
    "shortcut-stage1": dict(
        stage=1,
        objective="shortcut",
        params="full",
        lr=1e-5,
        batch_size=6,
        steps=4000,
        freeze=("condition_embedder", "shared"),
        grad_checkpointing=True,
    ),
}


def recipe(name: str, **overrides: Any) -> TrainConfig:
    """The named recipe with `overrides` applied (not checked; call .check())."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return from_mapping({**RECIPES[name], "recipe": name, **overrides}, where="recipe " + name)


# --- TOML and mappings ------------------------------------------------------------------------------


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        inner = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}[args[0]]
        return f"a list of {inner}" if args[-1] is Ellipsis else f"a list of {len(args)} {inner}"
    if dataclasses.is_dataclass(hint):
        return f"a table [{hint.__name__}]"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[hint]


def _coerce(key: str, hint: Any, value: Any, where: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r} ({type(value).__name__}): expected {_type_name(hint)}")

    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise bad()
        return _build(hint, value, where, prefix=f"{key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = typing.get_args(hint)
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise bad()
        inner = args[0]
        return tuple(_coerce(key, inner, v, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise bad()


def _build(cls: type, data: dict, where: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key {prefix + key!r}{hint}")
    return cls(**{k: _coerce(prefix + k, hints[k], v, where) for k, v in data.items()})


def from_mapping(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """A TrainConfig from a dict (a parsed TOML file); `recipe = NAME` starts from that recipe."""
    data = dict(data)
    name = data.get("recipe", "")
    if name:
        if not isinstance(name, str) or name not in RECIPES:
            raise ConfigError(f"{where}: recipe = {name!r}: expected one of {', '.join(RECIPES)}")
        data = {**RECIPES[name], **data}
    return _build(TrainConfig, data, where)


def load_config(path: str | Path, recipe_name: str | None = None) -> TrainConfig:
    """Read a TOML file (relative data / output paths are taken from the file's folder); check it."""
    path = Path(path)
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; write one with `sam3d train --template sft-stage1 > {path}`"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    if recipe_name:
        data["recipe"] = recipe_name
    base = path.resolve().parent
    for key in ("data", "val_data"):
        if isinstance(data.get(key), list):
            data[key] = [str(base / p) if isinstance(p, str) else p for p in data[key]]
    for key in ("output", "eval_data"):
        if isinstance(data.get(key), str) and data[key]:
            data[key] = str(base / data[key])
    return from_mapping(data, where=str(path)).check()


def to_mapping(cfg: TrainConfig) -> dict[str, Any]:
    """The JSON/TOML-ready dict of a config (tuples become lists)."""
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def describe(cfg: TrainConfig | None = None) -> str:
    """A documented TOML file of `cfg` (default: the defaults): every field with its documentation."""
    cfg = cfg or TrainConfig()
    lines = [f"# sam3d train configuration{f' (recipe {cfg.recipe})' if cfg.recipe else ''}", ""]
    table = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            table.append("")
            table.append(f"# {f.metadata['doc']}")
            table.append(f"[{f.name}]")
            for g in dataclasses.fields(value):
                table.append(f"{g.name} = {_toml_value(getattr(value, g.name))}  # {g.metadata['doc']}")
            continue
        lines.append(f"# {f.metadata['doc']}")
        lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines + table) + "\n"
