"""SAM and SAM 2 checkpoints in the user data folder: import, list, verify, remove, load.

An imported checkpoint is a folder `<data dir>/segment/<name>/` holding
    sam.safetensors   the state dict, converted once (never unpickled again)
    manifest.json     kind (sam | sam2), model type, sha256 and size of sam.safetensors and of the source
Importing reads a .pth / .pt with torch.load(weights_only=True), which refuses pickled code; loading
checks the sha256 of sam.safetensors before reading it. Offline: nothing here touches the network.

SAM (segment-anything) state dicts have the prefixes image_encoder. / prompt_encoder. / mask_decoder.;
SAM 2 checkpoints (facebookresearch/sam2) hold {"model": state dict} with a Hiera trunk under
image_encoder.trunk. and the heads under sam_prompt_encoder. / sam_mask_decoder. (plus memory modules
used for video). The file's family decides the kind; sam2's own loader calls torch.load, so we never
hand it the file.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sam3d_core.weights.store import (
    CheckpointError,
    check_model_name,
    data_dir,
    folder_bytes,
    read_manifest,
    remove_model_folder,
    scan_models,
    sha256_file,
    staged_folder,
    torch_load_refusal,
    verify_folder,
)

# Official file names (dl.fbaipublicfiles.com/segment_anything/). Their full sha256 is not published
# by Meta; we record the hash at import and check it on every load.
SAM_FILES = {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_b": "sam_vit_b_01ec64.pth"}
ENCODER_WIDTH = {1280: "vit_h", 1024: "vit_l", 768: "vit_b"}  # image_encoder.patch_embed.proj.weight dim 0
PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
WHERE_TO_GET = (
    "download one of " + ", ".join(SAM_FILES.values()) + " from the segment-anything README "
    "(github.com/facebookresearch/segment-anything#model-checkpoints), then run "
    "`sam3d weights import-sam FILE`"
)

# SAM 2.1 (github.com/facebookresearch/sam2, checkpoints/download_ckpts.sh). The size is read from the
# number of Hiera blocks (stages 1+2+7+2, 1+2+11+2, 2+3+16+3, 2+6+36+4).
SAM2_SIZES = ("tiny", "small", "base_plus", "large")
SAM2_FILES = {s: f"sam2.1_hiera_{s}.pt" for s in SAM2_SIZES}
SAM2_DEPTH = {12: "tiny", 16: "small", 24: "base_plus", 48: "large"}
SAM2_REQUIRED = ("image_encoder.trunk.", "sam_prompt_encoder.", "sam_mask_decoder.")
SAM2_WHERE_TO_GET = (
    "download one of " + ", ".join(SAM2_FILES.values()) + " from the sam2 README "
    "(github.com/facebookresearch/sam2#download-checkpoints), then run "
    "`sam3d weights import-sam FILE`"
)


def segment_dir() -> Path:
    return data_dir() / "segment"


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A .pth / .pt / .safetensors -> a dict of tensors (a {"model": ...} wrapper unwrapped)."""
    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path))  # a JSON header and raw buffers: no code
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except SafetensorError as e:
        raise CheckpointError(
            f"{path.name} cannot be read as a safetensors file ({str(e)[:200]}); truncated or corrupt download? "
            f"{WHERE_TO_GET}"
        ) from None
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, KeyError (text), zip errors, ...
        raise CheckpointError(f"{torch_load_refusal(path, e)} Use an official file: {WHERE_TO_GET}") from None
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    if (
        not isinstance(sd, dict)
        or not sd
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
    ):
        raise CheckpointError(f"{path.name} is not a SAM state dict (a dict of tensors); {WHERE_TO_GET}")
    return sd


def family_of(sd: dict[str, torch.Tensor]) -> str:
    """'sam2' when the keys look like a SAM 2 model, else 'sam'."""
    return "sam2" if any(k.startswith("image_encoder.trunk.") for k in sd) else "sam"


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A SAM / SAM 2 .pth, .pt or .safetensors -> its state dict, refusing pickled code, truncated
    files and anything that is not one of the two model families."""
    sd = _read_state(path)
    if family_of(sd) == "sam2":
        missing = [p for p in SAM2_REQUIRED if not any(k.startswith(p) for k in sd)]
        if missing:
            raise CheckpointError(
                f"{path.name}: a Hiera image encoder but no {missing[0]!r} entries; not a "
                f"complete SAM 2 checkpoint? {SAM2_WHERE_TO_GET}"
            )
        return sd
    bad = sorted(k for k in sd if not k.startswith(PREFIXES))
    if bad:
        raise CheckpointError(
            f"{path.name}: {len(bad)} entries outside {PREFIXES} (e.g. {bad[0]!r}); "
            f"not a segment-anything or SAM 2 checkpoint? {WHERE_TO_GET}; or {SAM2_WHERE_TO_GET}"
        )
    return sd


def model_type_of(sd: dict[str, torch.Tensor]) -> str:
    """SAM: vit_h / vit_l / vit_b from the encoder width. SAM 2: tiny / small / base_plus / large from the
    number of Hiera blocks. 'custom' otherwise."""
    if family_of(sd) == "sam2":
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))}
        return SAM2_DEPTH.get(len(blocks), "custom")
    w = sd.get("image_encoder.patch_embed.proj.weight")
    return ENCODER_WIDTH.get(int(w.shape[0]), "custom") if w is not None else "custom"


def sam2_version_of(sd: dict[str, torch.Tensor]) -> str:
    """'2.1' when the checkpoint has SAM 2.1's spatial no-object embedding, else '2'."""
    return "2.1" if "no_obj_embed_spatial" in sd else "2"


def import_sam_checkpoint(
    src: str | Path, name: str | None = None, overwrite: bool = False, root: Path | None = None
) -> Path:
    """Convert a SAM .pth / SAM 2 .pt (or copy a .safetensors) into `<root>/<name>/`.

    name defaults to the model type (vit_b, ...) for SAM and to sam2.1_hiera_<size> (or sam2_hiera_<size>)
    for SAM 2."""
    if name is not None:
        check_model_name(name, "checkpoint name")  # before anything is read
    src = Path(src).expanduser()
    if not src.is_file():
        raise CheckpointError(f"{src} is not a file; {WHERE_TO_GET}; or {SAM2_WHERE_TO_GET}")
    sd = read_checkpoint(src)
    kind, model_type = family_of(sd), model_type_of(sd)
    extra = {}
    if kind == "sam2":
        extra["version"] = sam2_version_of(sd)
        default = f"sam{extra['version']}_hiera_{model_type}"
    else:
        default = model_type
    name = check_model_name(name or default, "checkpoint name")
    root = segment_dir() if root is None else Path(root)
    with staged_folder(root, name, overwrite) as tmp:
        out = tmp / "sam.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out), metadata={"format": "pt"})
        manifest = {
            "kind": kind,
            "model_type": model_type,
            **extra,
            "source": str(src.resolve()),
            "source_file": {"name": src.name, "sha256": sha256_file(src), "bytes": src.stat().st_size},
            "files": {out.name: {"sha256": sha256_file(out), "bytes": out.stat().st_size}},
            "imported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root / name


def resolve(name: str | Path, root: Path | None = None) -> Path:
    """An imported checkpoint's folder. A name is looked up only in the segment folder; a path (a Path, or text
    with a separator) is taken as the folder itself, for loading one kept elsewhere."""
    base = segment_dir() if root is None else Path(root)
    if isinstance(name, Path) or any(sep in str(name) for sep in ("/", "\\")):
        folder, where = Path(name).expanduser(), str(name)
    else:
        folder, where = base / check_model_name(name, "checkpoint name"), str(base)
    if not (folder / "manifest.json").is_file():
        raise CheckpointError(
            f"no imported SAM checkpoint {str(name)!r} (looked in {where}); "
            f"`sam3d weights list` shows what is there; {WHERE_TO_GET}"
        )
    return folder


def verify(name: str | Path, root: Path | None = None) -> list[str]:
    """Problems found (empty = intact): files missing, truncated or with a different sha256."""
    return verify_folder(resolve(name, root))


def list_sam(root: Path | None = None, kind: str | None = None, broken: bool = False) -> list[dict]:
    """Imported checkpoints, optionally of one kind ('sam' or 'sam2'). A folder whose manifest cannot be read is
    left out; `broken=True` lists only those (name, folder, problem)."""
    root = segment_dir() if root is None else Path(root)
    out = []
    for folder, data, problem in scan_models(root):
        if broken:
            if data is None:
                out.append({"name": folder.name, "folder": str(folder), "problem": problem})
            continue
        if data is None:
            continue
        source = data.get("source_file")
        rec = {
            "name": folder.name,
            "kind": data.get("kind", "sam"),
            "model_type": data.get("model_type", "custom"),
            "folder": str(folder),
            "bytes": folder_bytes(data),
            "source": source.get("name") if isinstance(source, dict) else None,
        }
        if kind is None or rec["kind"] == kind:
            out.append(rec)
    return out


def remove(name: str, root: Path | None = None) -> Path:
    """Delete the imported checkpoint `name` (looked up only in the segment folder): the files its manifest lists,
    the manifest, then the folder if nothing else is in it."""
    return remove_model_folder(segment_dir() if root is None else Path(root), name, "SAM checkpoint")


def _load_checked(name: str | Path, root: Path | None, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = resolve(name, root)
    manifest = read_manifest(folder)
    if manifest.get("kind", "sam") != kind:
        raise CheckpointError(
            f"{folder.name!r} is a {manifest.get('kind', 'sam')} checkpoint, not {kind}; "
            f"`sam3d weights list` shows the kind of each imported checkpoint"
        )
    problems = verify_folder(folder)
    if problems:
        raise CheckpointError(
            f"{folder} failed its integrity check: "
            + "; ".join(problems)
            + ". Re-import it with `sam3d weights import-sam FILE --overwrite`."
        )
    return manifest, load_file(str(folder / "sam.safetensors"))


def load_sam_state(name: str | Path, root: Path | None = None) -> tuple[str, dict[str, torch.Tensor], str]:
    """(model type, state dict, sha256) of an imported SAM checkpoint, after checking its hash."""
    manifest, sd = _load_checked(name, root, "sam")
    return manifest["model_type"], sd, manifest["files"]["sam.safetensors"]["sha256"]


def load_sam2_state(name: str | Path, root: Path | None = None) -> tuple[str, str, dict[str, torch.Tensor], str]:
    """(size, version, state dict, sha256) of an imported SAM 2 checkpoint, after checking its hash."""
    manifest, sd = _load_checked(name, root, "sam2")
    return manifest["model_type"], manifest.get("version", "2.1"), sd, manifest["files"]["sam.safetensors"]["sha256"]
