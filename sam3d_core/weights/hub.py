"""Find, import, verify and load model weights. Offline only: nothing here touches the network.

An imported model is a folder `<data dir>/models/<name>/` holding, for each stage the official folder had,
    stage1.json                    our Stage1Config
    ss_generator.safetensors       condition_embedder.* and generator.* tensors
    ss_decoder.safetensors         decoder.* tensors
    stage2.json                    our Stage2Config
    slat_generator.safetensors     condition_embedder.* and generator.* tensors
    slat_decoder_gs.safetensors    decoder_gs.* tensors
    slat_decoder_mesh.safetensors  decoder_mesh.* tensors
    ss_encoder.json                our SSEncoderConfig       } where the official folder has non-empty encoder
    ss_encoder.safetensors         the encoder's own keys    } files (early releases shipped them empty: those
    slat_encoder.json              our SLatEncoderConfig     } are skipped with a note), or where
    slat_encoder.safetensors       the encoder's own keys    } `save_encoder` added a fitted one
    manifest.json                  sha256 and size of every file above and of the official sources
The sha256 of every weight file is checked when it is loaded.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sam3d_core.config import (
    DinoConfig,
    SLatEncoderConfig,
    SSEncoderConfig,
    Stage1Config,
    Stage2Config,
    load_json,
    save_json,
)
from sam3d_core.models.slat_vae import SLatEncoder
from sam3d_core.models.ss_vae import SSEncoder
from sam3d_core.models.stages import Stage1Model, Stage2Model
from sam3d_core.version import __version__
from sam3d_core.weights.convert import (
    SLAT_ENCODER_COMPONENTS,
    SS_ENCODER_COMPONENTS,
    STAGE1_COMPONENTS,
    STAGE2_COMPONENTS,
    WHERE_TO_GET,
    CheckpointError,
    Component,
    convert_state_dict,
    encoder_files,
    load_official_checkpoint,
    slat_encoder_config_from_official,
    ss_encoder_config_from_official,
    stage1_config_from_official,
    stage2_config_from_official,
    state_dict_of,
)
from sam3d_core.weights.store import (
    MANIFEST_FORMAT,
    check_model_name,
    folder_bytes,
    models_dir,
    read_manifest,
    remove_model_folder,
    scan_models,
    sha256_file,
    staged_folder,
    verify_folder,
)

FIT_ENCODER_HINT = "docs/encoders.md: `sam3d weights fit-encoder` trains one against the frozen decoder"


@dataclass(frozen=True)
class ImportReport:
    name: str
    folder: Path
    num_tensors: int
    num_parameters: int
    ignored_keys: int  # official entries outside the prefixes we load (e.g. EMA copies), as upstream
    stages: tuple[str, ...] = ("stage1",)
    notes: tuple[str, ...] = ()  # optional parts not imported, and why (e.g. the empty encoders of early releases)


def expected_stage1_shapes(cfg: Stage1Config) -> dict[str, tuple[int, ...]]:
    """Every tensor our Stage1Model holds in its state dict, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Stage1Model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def expected_stage2_shapes(cfg: Stage2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the stage-2 networks under our prefixes, built on the meta device."""
    with torch.device("meta"):
        model = Stage2Model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def expected_module_shapes(cls: type[torch.nn.Module], cfg: object) -> dict[str, tuple[int, ...]]:
    """Every tensor of a single network (the encoders), built on the meta device."""
    with torch.device("meta"):
        model = cls(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_keys(got: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], src: Path) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if tuple(got[k].shape) != expected[k])
    if not (missing or unexpected or wrong):
        return
    lines = [f"{src}: the checkpoint does not match the model its YAML describes."]
    for title, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            lines.append(f"  {len(keys)} {title} tensors: " + ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else ""))
    for k in wrong[:12]:
        lines.append(f"  shape of {k}: file {tuple(got[k].shape)}, model {expected[k]}")
    lines.append(f"  Files from different releases or a partial download? {WHERE_TO_GET}")
    raise CheckpointError("\n".join(lines))


@dataclass(frozen=True)
class _Stage:
    """One importable stage: the YAML whose presence marks it, its files and its config reader."""

    name: str  # stage1 | stage2 | ss_encoder | slat_encoder: also the name of its config JSON
    marker: str  # the generator YAML (the encoder's own YAML for the optional encoders)
    components: tuple[Component, ...]
    read_config: Callable[[Path], object]
    expected_shapes: Callable[[object], dict[str, tuple[int, ...]]]
    optional: bool = False  # an encoder: imported when its files are there and fit, else skipped with a note


STAGES = (
    _Stage(
        "stage1",
        "ss_generator.yaml",
        STAGE1_COMPONENTS,
        stage1_config_from_official,
        lambda cfg: expected_stage1_shapes(cfg),
    ),
    _Stage(
        "stage2",
        "slat_generator.yaml",
        STAGE2_COMPONENTS,
        stage2_config_from_official,
        lambda cfg: expected_stage2_shapes(cfg),
    ),
    _Stage(
        "ss_encoder",
        "ss_encoder.yaml",
        SS_ENCODER_COMPONENTS,
        ss_encoder_config_from_official,
        lambda cfg: expected_module_shapes(SSEncoder, cfg),
        optional=True,
    ),
    _Stage(
        "slat_encoder",
        "slat_encoder.yaml",
        SLAT_ENCODER_COMPONENTS,
        slat_encoder_config_from_official,
        lambda cfg: expected_module_shapes(SLatEncoder, cfg),
        optional=True,
    ),
)


def _encoder_skip_reason(src: Path, st: _Stage) -> str | None:
    """None when the encoder's YAML and weights are there and non-empty, else why it is not imported."""
    yaml_path, weights = encoder_files(src, st.name)
    if not yaml_path.is_file():
        return f"no {yaml_path.name} in the folder"
    empty = [p.name for p in (yaml_path, weights) if p.is_file() and p.stat().st_size == 0]
    if empty:
        return f"{' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty (0 bytes, as in early releases)"
    if not weights.is_file():
        return f"{yaml_path.name} is there but not {weights.name}"
    return None


def _check_encoder_fits(name: str, cfg, configs: dict) -> None:
    """An encoder must produce the latent its stage's decoders read (and read the DINO width stage 2 uses)."""
    if name == "ss_encoder" and "stage1" in configs:
        s1 = configs["stage1"]
        got = (cfg.latent_channels, 64 // 2 ** (len(cfg.channels) - 1))  # channels and side of a 64^3 grid's latent
        if got != (s1.decoder.latent_channels, s1.flow.resolution):
            raise CheckpointError(
                f"ss_encoder gives a {got[1]}^3 x {got[0]} latent from a 64^3 grid; stage 1 uses "
                f"{s1.flow.resolution}^3 x {s1.decoder.latent_channels}"
            )
    if name == "slat_encoder" and "stage2" in configs:
        s2 = configs["stage2"]
        if (cfg.latent_channels, cfg.in_channels) != (s2.flow.latent_channels, s2.condition.dino.embed_dim):
            raise CheckpointError(
                f"slat_encoder maps {cfg.in_channels} -> {cfg.latent_channels} channels; stage 2 has DINO width "
                f"{s2.condition.dino.embed_dim} and {s2.flow.latent_channels} latent channels"
            )


def _read_stage(src: Path, st: _Stage, cfg) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], dict, int]:
    """Load, rename and check one stage's checkpoints: (tensors, keys per file, source records, ignored entries).

    Raises CheckpointError before anything is written."""
    tensors, per_file, sources, ignored = {}, {}, {}, 0
    for comp in st.components:
        path = encoder_files(src, comp.name)[1] if st.optional else src / f"{comp.name}.ckpt"
        raw = load_official_checkpoint(path)
        converted, total = convert_state_dict(raw, comp, path), len(state_dict_of(raw, comp, path))
        ignored += total - len(converted)
        tensors.update(converted)
        per_file[comp.name] = list(converted)
        sources[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    _check_keys(tensors, st.expected_shapes(cfg), src)
    return tensors, per_file, sources, ignored


def import_official(
    src: str | Path, name: str = "official", root: Path | None = None, overwrite: bool = False
) -> ImportReport:
    """Convert an official checkpoint folder (YAML + .ckpt) into a verified model folder of ours.

    Every stage whose generator YAML is in the folder is imported (stage 1: ss_*, stage 2: slat_*), and each
    encoder (ss_encoder, slat_encoder) whose YAML and weights are there and non-empty, checked like the rest.
    An encoder that is absent, empty (early releases) or does not fit is skipped with a note in the report:
    the encoders are optional, so they never fail the import.
    """
    name = check_model_name(name)  # a name, never a path: checked before anything is read
    try:
        src = Path(src).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop (RuntimeError before 3.13), a NUL byte
        raise CheckpointError(f"{src} cannot be opened ({e}); pass the official checkpoints/ folder itself") from None
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder; pass the official checkpoints/ folder ({WHERE_TO_GET})")
    stages = [st for st in STAGES if not st.optional and (src / st.marker).is_file()]
    if not stages:
        raise CheckpointError(f"{src} holds neither ss_generator.yaml nor slat_generator.yaml; {WHERE_TO_GET}")
    configs = {st.name: st.read_config(src) for st in stages}  # all YAMLs checked before any heavy work
    notes: list[str] = []
    for st in (st for st in STAGES if st.optional):
        try:
            reason = _encoder_skip_reason(src, st)
            if reason is None:
                configs[st.name] = st.read_config(src)
                _check_encoder_fits(st.name, configs[st.name], configs)
                stages.append(st)
        except (CheckpointError, ValueError, TypeError) as e:  # int() of a bad YAML value: TypeError/ValueError
            reason = str(e).splitlines()[0]
        if reason is not None:
            notes.append(f"{st.name} not imported: {reason}; {FIT_ENCODER_HINT}")
    root = models_dir() if root is None else Path(root)
    with staged_folder(root, name, overwrite) as tmp:
        sources, files, counts = {}, {}, [0, 0, 0]  # tensors, parameters, ignored entries
        imported = []
        for st in stages:
            try:
                tensors, per_file, st_sources, ignored = _read_stage(src, st, configs[st.name])
            except CheckpointError as e:
                if not st.optional:
                    raise
                notes.append(f"{st.name} not imported: {' '.join(str(e).split())}")
                continue
            imported.append(st.name)
            sources.update(st_sources)
            counts[2] += ignored
            for comp_name, keys in per_file.items():
                out = tmp / f"{comp_name}.safetensors"
                save_file({k: tensors[k].contiguous() for k in keys}, str(out), metadata={"format": "pt"})
                files[out.name] = {"sha256": sha256_file(out), "bytes": out.stat().st_size}
            cfg_file = tmp / f"{st.name}.json"
            save_json(configs[st.name], cfg_file)
            files[cfg_file.name] = {"sha256": sha256_file(cfg_file), "bytes": cfg_file.stat().st_size}
            counts[0] += len(tensors)
            counts[1] += sum(t.numel() for t in tensors.values())
            del tensors
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "stages": imported,
            "source": str(src),
            "sources": sources,
            "files": files,
            "imported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "sam3d_version": __version__,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return ImportReport(name, root / name, counts[0], counts[1], counts[2], tuple(imported), tuple(notes))


DEFAULT_MODEL = "default"


def bundled_default_dir() -> Path | None:
    """The default model shipped in the repository's assets/default (our own, trained from scratch by `sam3d
    train-default`; docs/training.md), or None when this installation has none."""
    folder = Path(__file__).resolve().parents[2] / "assets" / DEFAULT_MODEL
    return folder if (folder / "manifest.json").is_file() else None


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """An imported model's folder. A name (no path separator) is looked up only in the models folder (and
    'default', when not imported, is the bundled default model); a path (a Path, or text with a separator) is
    taken as the folder itself, for loading a model kept elsewhere."""
    is_path = isinstance(name_or_path, Path) or any(sep in str(name_or_path) for sep in ("/", "\\"))
    if is_path:
        folder = Path(name_or_path).expanduser()
        where = str(folder)
    else:
        folder = models_dir() / check_model_name(name_or_path)
        where = str(models_dir())
        bundled = bundled_default_dir() if name_or_path == DEFAULT_MODEL else None
        if bundled is not None and not (folder / "manifest.json").is_file():
            folder = bundled
    if not (folder / "manifest.json").is_file():
        raise CheckpointError(
            f"no imported model {str(name_or_path)!r} (looked in {where}); "
            f"run `sam3d weights list` to see what is there, or import one: {WHERE_TO_GET}"
        )
    return folder


def verify(model_dir: str | Path) -> list[str]:
    """Check every file of an imported model against its manifest. Returns the problems found."""
    return verify_folder(resolve_model_dir(model_dir))


def list_models() -> list[dict]:
    """The usable imported models (a folder whose manifest cannot be read is left out: see `list_broken`)."""
    return [
        {
            "name": folder.name,
            "folder": str(folder),
            "bytes": folder_bytes(data),
            "imported_at": data.get("imported_at"),
            "source": data.get("source"),
        }
        for folder, data, problem in scan_models(models_dir())
        if data is not None
    ]


def list_broken() -> list[dict]:
    """Model folders whose manifest cannot be read: name, folder and the problem (with the fix)."""
    return [
        {"name": folder.name, "folder": str(folder), "problem": problem}
        for folder, data, problem in scan_models(models_dir())
        if data is None
    ]


def remove(name: str) -> Path:
    """Delete the imported model `name` (a name, looked up only in the models folder): the files its manifest
    lists, the manifest, then the folder if nothing else is in it."""
    return remove_model_folder(models_dir(), name, "model")


def _load_stage_state(
    model_dir: str | Path, stage: str, cls: type, components, check_hashes: bool, fix: str = WHERE_TO_GET
):
    folder = resolve_model_dir(model_dir)
    if not (folder / f"{stage}.json").is_file():
        raise CheckpointError(
            f"{folder} has no {stage} weights (its official folder lacked them); "
            f"re-import a folder that has them: {fix}"
        )
    if check_hashes:
        problems = verify_folder(folder)
        if problems:
            raise CheckpointError(
                f"{folder} failed its integrity check: "
                + "; ".join(problems)
                + ". Re-import the official folder with `sam3d weights import`."
            )
    manifest = read_manifest(folder)
    cfg = load_json(cls, folder / f"{stage}.json")
    state: dict[str, torch.Tensor] = {}
    names = []
    for comp in components:
        for fname in component_files(manifest, comp.name):
            state.update(load_file(str(folder / fname)))
            names.append(fname)
    if manifest.get("storage_dtype") == "float16":  # shipped small (our default model): compute in float32
        state = {k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()}
    names.append(f"{stage}.json")
    digest = hashlib.sha256("".join(manifest["files"][n]["sha256"] for n in names).encode())
    return cfg, state, digest.hexdigest()[:16]


def component_files(manifest: dict, component: str) -> list[str]:
    """The file(s) of one component: `NAME.safetensors`, or its parts `NAME-00001-of-0000N.safetensors` (files kept
    under a size limit), in order. CheckpointError when neither is listed complete."""
    files = manifest["files"]
    if f"{component}.safetensors" in files:
        return [f"{component}.safetensors"]
    parts = sorted(f for f in files if f.startswith(f"{component}-") and f.endswith(".safetensors"))
    n = len(parts)
    if n and parts == [f"{component}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]:
        return parts
    raise CheckpointError(
        f"the model folder's manifest lists no complete {component} weights ({component}.safetensors or its "
        "numbered parts); re-import or re-install the model"
    )


def load_stage1_state(model_dir: str | Path, check_hashes: bool = True) -> tuple[Stage1Config, dict, str]:
    """Config, tensors and a short weights hash (provenance) of an imported model's stage 1."""
    return _load_stage_state(model_dir, "stage1", Stage1Config, STAGE1_COMPONENTS, check_hashes)


def load_stage2_state(model_dir: str | Path, check_hashes: bool = True) -> tuple[Stage2Config, dict, str]:
    """Config, tensors and a short weights hash (provenance) of an imported model's stage 2."""
    return _load_stage_state(model_dir, "stage2", Stage2Config, STAGE2_COMPONENTS, check_hashes)


def load_ss_encoder_state(model_dir: str | Path, check_hashes: bool = True) -> tuple[SSEncoderConfig, dict, str]:
    """Config, tensors (SSEncoder keys) and a short weights hash of an imported model's sparse-structure encoder."""
    return _load_stage_state(
        model_dir, "ss_encoder", SSEncoderConfig, SS_ENCODER_COMPONENTS, check_hashes, fix=FIT_ENCODER_HINT
    )


def load_slat_encoder_state(model_dir: str | Path, check_hashes: bool = True) -> tuple[SLatEncoderConfig, dict, str]:
    """Config, tensors (SLatEncoder keys) and a short weights hash of an imported model's SLAT encoder."""
    return _load_stage_state(
        model_dir,
        "slat_encoder",
        SLatEncoderConfig,
        SLAT_ENCODER_COMPONENTS,
        check_hashes,
        fix=f"{WHERE_TO_GET} (a revision that ships slat_encoder.ckpt)",
    )


DINO_PREFIX = "condition_embedder.module_list.0.backbone."


def _check_files(folder: Path, manifest: dict, names) -> None:
    for fname in names:
        rec, path = manifest["files"].get(fname), folder / fname
        if rec is None or not path.is_file() or sha256_file(path) != rec["sha256"]:
            raise CheckpointError(
                f"{path} failed its integrity check (missing or changed since import); "
                "re-import the official folder with `sam3d weights import`"
            )


def has_stage(model_dir: str | Path, stage: str) -> bool:
    """Whether an imported model has `stage` (stage1, stage2, ss_encoder, slat_encoder)."""
    folder = resolve_model_dir(model_dir)
    return stage in json.loads((folder / "manifest.json").read_text()).get("stages", [])


def load_ss_decoder_state(model_dir: str | Path, check_hashes: bool = True) -> tuple[Stage1Config, dict]:
    """Stage 1's config and its occupancy decoder's tensors (SSDecoder keys) alone, without the 6 GB generator."""
    folder = resolve_model_dir(model_dir)
    if not (folder / "stage1.json").is_file():
        raise CheckpointError(f"{folder} has no stage1 weights; import a folder with ss_decoder: {WHERE_TO_GET}")
    if check_hashes:
        manifest = json.loads((folder / "manifest.json").read_text())
        _check_files(folder, manifest, ("ss_decoder.safetensors", "stage1.json"))
    state = load_file(str(folder / "ss_decoder.safetensors"))
    return load_json(Stage1Config, folder / "stage1.json"), {k.removeprefix("decoder."): v for k, v in state.items()}


def load_dino_state(model_dir: str | Path, check_hashes: bool = True) -> tuple[DinoConfig, dict[str, torch.Tensor]]:
    """The condition embedder's DINOv2 backbone (image embedder) of an imported model, stage 2's where it has one,
    else stage 1's: (its DinoConfig, DinoVisionTransformer tensors). Reads only those tensors of the generator
    file; with `check_hashes` that file and its config are checked against the manifest first."""
    folder = resolve_model_dir(model_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    sources = {
        "stage2": (Stage2Config, "slat_generator.safetensors"),
        "stage1": (Stage1Config, "ss_generator.safetensors"),
    }
    stage = next((s for s in sources if (folder / f"{s}.json").is_file()), None)
    if stage is None:
        raise CheckpointError(f"{folder} has neither stage 1 nor stage 2 weights; re-import it: {WHERE_TO_GET}")
    cls, weights = sources[stage]
    if check_hashes:
        _check_files(folder, manifest, (weights, f"{stage}.json"))
    cfg = load_json(cls, folder / f"{stage}.json").condition.dino
    with safe_open(str(folder / weights), framework="pt") as f:
        state = {k[len(DINO_PREFIX) :]: f.get_tensor(k) for k in f.keys() if k.startswith(DINO_PREFIX)}
    return cfg, state


def save_encoder(
    model_dir: str | Path,
    stage: str,
    cfg: SSEncoderConfig | SLatEncoderConfig,
    state: dict[str, torch.Tensor],
    info: dict,
    overwrite: bool = False,
) -> Path:
    """Add an encoder trained here (`data.fit_encoder`) to an imported model folder as `<stage>.safetensors` +
    `<stage>.json`, keys and shapes checked, and record it with `info` under the manifest's "fitted" entry.

    stage: "ss_encoder" | "slat_encoder". Refuses to replace an encoder the folder already has unless `overwrite`.
    Each file is written under a temporary name and moved into place, the manifest last."""
    cls = {"ss_encoder": SSEncoder, "slat_encoder": SLatEncoder}.get(stage)
    if cls is None:
        raise ValueError(f"stage: got {stage!r}, expected 'ss_encoder' or 'slat_encoder'")
    folder = resolve_model_dir(model_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    if stage in manifest.get("stages", []) and not overwrite:
        raise CheckpointError(f"{folder} already has a {stage}; pass overwrite=True (--overwrite) to replace it")
    _check_keys(state, expected_module_shapes(cls, cfg), folder)

    def write(name: str, save: Callable[[Path], None]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=folder)
        os.close(fd)
        try:
            save(Path(tmp))
            os.replace(tmp, folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        manifest["files"][name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    write(f"{stage}.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write(f"{stage}.json", lambda p: save_json(cfg, p))
    manifest["stages"] = [s for s in manifest.get("stages", []) if s != stage] + [stage]
    manifest.setdefault("fitted", {})[stage] = info
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / "manifest.json")
    return folder
