"""Find, import, verify and load model weights. Offline only: nothing here touches the network.

An imported model is a folder `<data dir>/models/<name>/` holding, for each stage the official folder had,
    stage1.json                    our Stage1Config
    ss_generator.safetensors       condition_embedder.* and generator.* tensors
    ss_decoder.safetensors         decoder.* tensors
    stage2.json                    our Stage2Config
    slat_generator.safetensors     condition_embedder.* and generator.* tensors
    slat_decoder_gs.safetensors    decoder_gs.* tensors
    slat_decoder_mesh.safetensors  decoder_mesh.* tensors
    manifest.json                  sha256 and size of every file above and of the official sources
The sha256 of every weight file is checked when it is loaded.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sam3d_core.config import Stage1Config, Stage2Config, load_json, save_json
from sam3d_core.models.stages import Stage1Model, Stage2Model
from sam3d_core.version import __version__
from sam3d_core.weights.convert import (
    STAGE1_COMPONENTS,
    STAGE2_COMPONENTS,
    WHERE_TO_GET,
    CheckpointError,
    Component,
    convert_state_dict,
    load_official_checkpoint,
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


@dataclass(frozen=True)
class ImportReport:
    name: str
    folder: Path
    num_tensors: int
    num_parameters: int
    ignored_keys: int  # official entries outside the prefixes we load (e.g. EMA copies), as upstream
    stages: tuple[str, ...] = ("stage1",)


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

    name: str  # stage1 | stage2: also the name of its config JSON
    marker: str  # the generator YAML
    components: tuple[Component, ...]
    read_config: Callable[[Path], object]
    expected_shapes: Callable[[object], dict[str, tuple[int, ...]]]


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
)


def import_official(
    src: str | Path, name: str = "official", root: Path | None = None, overwrite: bool = False
) -> ImportReport:
    """Convert an official checkpoint folder (YAML + .ckpt) into a verified model folder of ours.

    Every stage whose generator YAML is in the folder is imported (stage 1: ss_*, stage 2: slat_*).
    """
    name = check_model_name(name)  # a name, never a path: checked before anything is read
    try:
        src = Path(src).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop (RuntimeError before 3.13), a NUL byte
        raise CheckpointError(f"{src} cannot be opened ({e}); pass the official checkpoints/ folder itself") from None
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder; pass the official checkpoints/ folder ({WHERE_TO_GET})")
    stages = [st for st in STAGES if (src / st.marker).is_file()]
    if not stages:
        raise CheckpointError(f"{src} holds neither ss_generator.yaml nor slat_generator.yaml; {WHERE_TO_GET}")
    configs = {st.name: st.read_config(src) for st in stages}  # all YAMLs checked before any heavy work
    root = models_dir() if root is None else Path(root)
    with staged_folder(root, name, overwrite) as tmp:
        sources, files, counts = {}, {}, [0, 0, 0]  # tensors, parameters, ignored entries
        for st in stages:
            tensors, per_file = {}, {}
            for comp in st.components:
                path = src / f"{comp.name}.ckpt"
                raw = load_official_checkpoint(path)
                converted, total = convert_state_dict(raw, comp, path), len(state_dict_of(raw, comp, path))
                counts[2] += total - len(converted)
                tensors.update(converted)
                per_file[comp.name] = list(converted)
                sources[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            _check_keys(tensors, st.expected_shapes(configs[st.name]), src)
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
            "stages": [st.name for st in stages],
            "source": str(src),
            "sources": sources,
            "files": files,
            "imported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "sam3d_version": __version__,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return ImportReport(name, root / name, counts[0], counts[1], counts[2], tuple(st.name for st in stages))


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """An imported model's folder. A name (no path separator) is looked up only in the models folder; a path
    (a Path, or text with a separator) is taken as the folder itself, for loading a model kept elsewhere."""
    is_path = isinstance(name_or_path, Path) or any(sep in str(name_or_path) for sep in ("/", "\\"))
    if is_path:
        folder = Path(name_or_path).expanduser()
        where = str(folder)
    else:
        folder = models_dir() / check_model_name(name_or_path)
        where = str(models_dir())
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


def _load_stage_state(model_dir: str | Path, stage: str, cls: type, components, check_hashes: bool):
    folder = resolve_model_dir(model_dir)
    if not (folder / f"{stage}.json").is_file():
        raise CheckpointError(
            f"{folder} has no {stage} weights (its official folder lacked them); "
            f"re-import a folder that has them: {WHERE_TO_GET}"
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
    for comp in components:
        state.update(load_file(str(folder / f"{comp.name}.safetensors")))
    names = [f"{c.name}.safetensors" for c in components] + [f"{stage}.json"]
    digest = hashlib.sha256("".join(manifest["files"][n]["sha256"] for n in names).encode())
    return cfg, state, digest.hexdigest()[:16]


def load_stage1_state(model_dir: str | Path, check_hashes: bool = True) -> tuple[Stage1Config, dict, str]:
    """Config, tensors and a short weights hash (provenance) of an imported model's stage 1."""
    return _load_stage_state(model_dir, "stage1", Stage1Config, STAGE1_COMPONENTS, check_hashes)


def load_stage2_state(model_dir: str | Path, check_hashes: bool = True) -> tuple[Stage2Config, dict, str]:
    """Config, tensors and a short weights hash (provenance) of an imported model's stage 2."""
    return _load_stage_state(model_dir, "stage2", Stage2Config, STAGE2_COMPONENTS, check_hashes)
