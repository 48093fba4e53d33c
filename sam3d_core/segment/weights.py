"""SAM (segment-anything) checkpoints in the user data folder: import, list, verify, remove, load.

An imported checkpoint is a folder `<data dir>/segment/<name>/` holding
    sam.safetensors   the state dict, converted once (never unpickled again)
    manifest.json     model type, sha256 and size of sam.safetensors and of the source .pth
Importing reads the .pth with torch.load(weights_only=True), which refuses pickled code; loading
checks the sha256 of sam.safetensors before reading it. Offline: nothing here touches the network.
"""

from __future__ import annotations

import datetime as _dt
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sam3d_core.convert import CheckpointError
from sam3d_core.hub import data_dir, sha256_file, staged_folder, verify_folder

# Official file names (dl.fbaipublicfiles.com/segment_anything/). Their full sha256 is not published
# by Meta; we record the hash at import and check it on every load.
SAM_FILES = {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_b": "sam_vit_b_01ec64.pth"}
ENCODER_WIDTH = {1280: "vit_h", 1024: "vit_l", 768: "vit_b"}  # image_encoder.patch_embed.proj.weight dim 0
PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
WHERE_TO_GET = ("download one of " + ", ".join(SAM_FILES.values()) + " from the segment-anything README "
                "(github.com/facebookresearch/segment-anything#model-checkpoints), then run "
                "`sam3d weights import-sam FILE`")


def segment_dir() -> Path:
    return data_dir() / "segment"


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A SAM .pth or .safetensors -> its state dict, refusing pickled code, truncated files and
    anything but tensors under SAM's three prefixes."""
    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path))  # a JSON header and raw buffers: no code
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: code, or a class we do not know
        raise CheckpointError(f"{path.name} holds pickled objects other than tensors and was refused "
                              f"(it could run code when loaded). Use an official file: {WHERE_TO_GET}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, SafetensorError) as e:
        raise CheckpointError(f"{path.name} cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]}); truncated or corrupt download? {WHERE_TO_GET}") from e
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path.name} is not a SAM state dict (a dict of tensors); {WHERE_TO_GET}")
    bad = sorted(k for k in sd if not k.startswith(PREFIXES))
    if bad:
        raise CheckpointError(f"{path.name}: {len(bad)} entries outside {PREFIXES} (e.g. {bad[0]!r}); "
                              f"not a segment-anything checkpoint? {WHERE_TO_GET}")
    return sd


def model_type_of(sd: dict[str, torch.Tensor]) -> str:
    """vit_h / vit_l / vit_b from the encoder width, else 'custom'."""
    w = sd.get("image_encoder.patch_embed.proj.weight")
    return ENCODER_WIDTH.get(int(w.shape[0]), "custom") if w is not None else "custom"


def import_sam_checkpoint(src: str | Path, name: str | None = None, overwrite: bool = False,
                          root: Path | None = None) -> Path:
    """Convert a SAM .pth (or copy a .safetensors) into `<root>/<name>/`. name defaults to the model type."""
    src = Path(src).expanduser()
    if not src.is_file():
        raise CheckpointError(f"{src} is not a file; {WHERE_TO_GET}")
    sd = read_checkpoint(src)
    model_type = model_type_of(sd)
    name = name or model_type
    root = segment_dir() if root is None else Path(root)
    with staged_folder(root, name, overwrite) as tmp:
        out = tmp / "sam.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out), metadata={"format": "pt"})
        manifest = {
            "kind": "sam", "model_type": model_type, "source": str(src.resolve()),
            "source_file": {"name": src.name, "sha256": sha256_file(src), "bytes": src.stat().st_size},
            "files": {out.name: {"sha256": sha256_file(out), "bytes": out.stat().st_size}},
            "imported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root / name


def resolve(name: str | Path, root: Path | None = None) -> Path:
    p = Path(name).expanduser()
    if (p / "manifest.json").is_file():
        return p
    q = (segment_dir() if root is None else Path(root)) / str(name)
    if (q / "manifest.json").is_file():
        return q
    raise CheckpointError(f"no imported SAM checkpoint {str(name)!r} (looked in {p} and {q}); "
                          f"`sam3d weights list` shows what is there; {WHERE_TO_GET}")


def verify(name: str | Path, root: Path | None = None) -> list[str]:
    """Problems found (empty = intact): files missing, truncated or with a different sha256."""
    return verify_folder(resolve(name, root))


def list_sam(root: Path | None = None) -> list[dict]:
    root = segment_dir() if root is None else Path(root)
    out = []
    for m in sorted(root.glob("*/manifest.json")) if root.is_dir() else []:
        data = json.loads(m.read_text())
        out.append({"name": m.parent.name, "model_type": data["model_type"], "folder": str(m.parent),
                    "bytes": sum(r["bytes"] for r in data["files"].values()), "source": data["source_file"]["name"]})
    return out


def remove(name: str, root: Path | None = None) -> Path:
    folder = resolve(name, root)
    shutil.rmtree(folder)
    return folder


def load_sam_state(name: str | Path, root: Path | None = None) -> tuple[str, dict[str, torch.Tensor], str]:
    """(model type, state dict, sha256) of an imported checkpoint, after checking its hash."""
    folder = resolve(name, root)
    problems = verify(folder)
    if problems:
        raise CheckpointError(f"{folder} failed its integrity check: " + "; ".join(problems)
                              + ". Re-import it with `sam3d weights import-sam FILE --overwrite`.")
    manifest = json.loads((folder / "manifest.json").read_text())
    sd = load_file(str(folder / "sam.safetensors"))
    return manifest["model_type"], sd, manifest["files"]["sam.safetensors"]["sha256"]
