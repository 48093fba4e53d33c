"""SAM, SAM 2 and SAM 3 checkpoints in the user data folder: import, list, verify, remove, load.

An imported checkpoint is a folder `<data dir>/segment/<name>/` holding
    sam.safetensors   the state dict, converted once (never unpickled again)
    manifest.json     kind (sam | sam2 | sam3), model type, sha256 and size of sam.safetensors and of the source
    bpe_simple_vocab_16e6.txt.gz   (SAM 3 only, when given or found beside the file) its text tokeniser's vocabulary
Importing reads a .pth / .pt with torch.load(weights_only=True), which refuses pickled code; loading
checks the sha256 of sam.safetensors before reading it. Offline: nothing here touches the network.

SAM (segment-anything) state dicts have the prefixes image_encoder. / prompt_encoder. / mask_decoder.;
SAM 2 checkpoints (facebookresearch/sam2) hold {"model": state dict} with a Hiera trunk under
image_encoder.trunk. and the heads under sam_prompt_encoder. / sam_mask_decoder. (plus memory modules
used for video). SAM 3 checkpoints (facebook/sam3, sam3.pt) hold the image model under "detector." and the video
tracker under "tracker."; only the detector entries are kept (prefix removed), with the model's sizes (`Sam3Config`:
the official one, or the one in a .safetensors file's metadata "sam3d_sam3_config") checked against the shapes.
The file's family decides the kind; sam2's and sam3's own loaders call torch.load (and sam3's downloads when given
no file), so we never hand them the file.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
import re
import shutil
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


# SAM 3 (github.com/facebookresearch/sam3; weights gated on Hugging Face as facebook/sam3). Its image model's
# state dict has these parts (after removing "detector.").
SAM3_REQUIRED = (
    "backbone.vision_backbone.trunk.",
    "backbone.language_backbone.",
    "transformer.encoder.",
    "transformer.decoder.",
    "geometry_encoder.",
    "segmentation_head.",
    "dot_prod_scoring.",
)
SAM3_CONFIG_KEY = "sam3d_sam3_config"  # safetensors metadata: a Sam3Config as JSON (reduced test models)
SAM3_WEIGHTS = "sam.safetensors"


def segment_dir() -> Path:
    return data_dir() / "segment"


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


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
    """'sam3' for SAM 3's keys (detector./tracker., or its image model's backbone.vision_backbone.), 'sam2' when the
    keys look like a SAM 2 model, else 'sam'."""
    sam3_prefixes = ("detector.", "tracker.", "backbone.vision_backbone.", "backbone.language_backbone.")
    if any(k.startswith(sam3_prefixes) for k in sd):
        return "sam3"
    return "sam2" if any(k.startswith("image_encoder.trunk.") for k in sd) else "sam"


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A SAM / SAM 2 .pth, .pt or .safetensors -> its state dict, refusing pickled code, truncated
    files and anything that is not one of the two model families."""
    sd = _read_state(path)
    if family_of(sd) == "sam3":
        from sam3d_core.segment.sam3_config import WHERE_TO_GET as SAM3_WHERE_TO_GET
        from sam3d_core.segment.sam3_config import detector_state

        det = detector_state(sd)
        missing = [p for p in SAM3_REQUIRED if not any(k.startswith(p) for k in det)]
        if missing:
            what = "only video-tracker entries" if not det else f"no {missing[0]!r} entries"
            raise CheckpointError(
                f"{path.name}: SAM 3 entries but {what}; not a complete SAM 3 image checkpoint? {SAM3_WHERE_TO_GET}"
            )
        return det
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


def _count(sd: dict, pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def sam3_sizes(sd: dict[str, torch.Tensor]) -> dict[str, int | float]:
    """The sizes of a SAM 3 image model that its state dict shows (the rest, heads and windows, it does not)."""
    p = "backbone.vision_backbone.trunk."
    t = "backbone.language_backbone.encoder."
    patch = sd[p + "patch_embed.proj.weight"].shape  # [D, 3, p, p]
    tok = sd[t + "token_embedding.weight"].shape  # [vocab, width]
    return {
        "vit_dim": int(patch[0]),
        "patch_size": int(patch[-1]),
        "vit_depth": _count(sd, re.escape(p) + r"blocks\.(\d+)\."),
        "vit_mlp_ratio": float(sd[p + "blocks.0.mlp.fc1.weight"].shape[0] / patch[0]),
        "vocab_size": int(tok[0]),
        "text_width": int(tok[1]),
        "context_length": int(sd[t + "positional_embedding"].shape[0]),
        "text_layers": _count(sd, re.escape(t) + r"transformer\.resblocks\.(\d+)\."),
        "d_model": int(sd["dot_prod_scoring.hs_proj.weight"].shape[0]),
        "num_queries": int(sd["transformer.decoder.query_embed.weight"].shape[0]),
        "encoder_layers": _count(sd, r"transformer\.encoder\.layers\.(\d+)\."),
        "decoder_layers": _count(sd, r"transformer\.decoder\.layers\.(\d+)\."),
        "geometry_layers": _count(sd, r"geometry_encoder\.encode\.(\d+)\."),
        "ffn_dim": int(sd["geometry_encoder.encode.0.linear1.weight"].shape[0]),
    }


def sam3_config_of(sd: dict[str, torch.Tensor], metadata: dict | None, name: str):
    """(Sam3Config, "official" | "custom") for a SAM 3 image state dict: the config in the file's metadata, else the
    official one; either must agree with every size the shapes show (CheckpointError naming the first that does
    not)."""
    from sam3d_core.segment.sam3_config import OFFICIAL, WHERE_TO_GET, Sam3Config

    try:
        sizes = sam3_sizes(sd)
    except (KeyError, IndexError) as e:
        raise CheckpointError(
            f"{name}: a SAM 3 checkpoint without {e}; truncated, or not SAM 3? {WHERE_TO_GET}"
        ) from None
    text = (metadata or {}).get(SAM3_CONFIG_KEY)
    if text:
        try:
            cfg = Sam3Config.from_json(text)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{name}: its {SAM3_CONFIG_KEY} metadata is not a SAM 3 config ({e})") from None
    else:
        cfg = OFFICIAL
    for key, value in sizes.items():
        if abs(getattr(cfg, key) - value) > 1e-6:
            where = f"its {SAM3_CONFIG_KEY} metadata says" if text else "the official SAM 3 has"
            raise CheckpointError(
                f"{name}: {key} is {value:g} in the weights but {where} {getattr(cfg, key):g}; "
                + (
                    "the metadata does not describe these weights"
                    if text
                    else "a custom-size SAM 3 needs its sizes: save it as .safetensors with metadata "
                    f"{SAM3_CONFIG_KEY} "
                    "(a Sam3Config as JSON), or use the official sam3.pt; " + WHERE_TO_GET
                )
            )
    return cfg, ("custom" if text and cfg != OFFICIAL else "official")


def sam2_version_of(sd: dict[str, torch.Tensor]) -> str:
    """'2.1' when the checkpoint has SAM 2.1's spatial no-object embedding, else '2'."""
    return "2.1" if "no_obj_embed_spatial" in sd else "2"


def import_sam_checkpoint(
    src: str | Path,
    name: str | None = None,
    overwrite: bool = False,
    root: Path | None = None,
    bpe: str | Path | None = None,
) -> Path:
    """Convert a SAM .pth / SAM 2 .pt / SAM 3 .pt (or copy a .safetensors) into `<root>/<name>/`.

    name defaults to the model type (vit_b, ...) for SAM, to sam2.1_hiera_<size> (or sam2_hiera_<size>)
    for SAM 2 and to sam3 for SAM 3. bpe: SAM 3's text vocabulary (bpe_simple_vocab_16e6.txt.gz), copied beside the
    weights; when not given, one beside the checkpoint file is taken."""
    from sam3d_core.segment.sam3_config import BPE_NAME

    if name is not None:
        check_model_name(name, "checkpoint name")  # before anything is read
    src = Path(src).expanduser()
    if not src.is_file():
        raise CheckpointError(f"{src} is not a file; {WHERE_TO_GET}; or {SAM2_WHERE_TO_GET}")
    if bpe is not None:
        bpe = Path(bpe).expanduser()
        _check_bpe(bpe)
    sd = read_checkpoint(src)
    kind = family_of(sd)
    extra = {}
    if kind == "sam3":
        metadata = _safetensors_metadata(src) if src.suffix == ".safetensors" else {}
        cfg, model_type = sam3_config_of(sd, metadata, src.name)
        extra["config"] = json.loads(cfg.to_json())
        if bpe is None and (src.parent / BPE_NAME).is_file():
            bpe = src.parent / BPE_NAME
            _check_bpe(bpe)
        default = "sam3" if model_type == "official" else "sam3_custom"
    else:
        model_type = model_type_of(sd)
    if kind == "sam2":
        extra["version"] = sam2_version_of(sd)
        default = f"sam{extra['version']}_hiera_{model_type}"
    elif kind == "sam":
        default = model_type
    name = check_model_name(name or default, "checkpoint name")
    root = segment_dir() if root is None else Path(root)
    with staged_folder(root, name, overwrite) as tmp:
        out = tmp / "sam.safetensors"
        meta = {"format": "pt"}
        if kind == "sam3":
            meta[SAM3_CONFIG_KEY] = json.dumps(extra["config"], sort_keys=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out), metadata=meta)
        files = {out.name: {"sha256": sha256_file(out), "bytes": out.stat().st_size}}
        if kind == "sam3" and bpe is not None:
            dst = tmp / BPE_NAME
            shutil.copyfile(bpe, dst)
            files[dst.name] = {"sha256": sha256_file(dst), "bytes": dst.stat().st_size}
        manifest = {
            "kind": kind,
            "model_type": model_type,
            **extra,
            "source": str(src.resolve()),
            "source_file": {"name": src.name, "sha256": sha256_file(src), "bytes": src.stat().st_size},
            "files": files,
            "imported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root / name


def _check_bpe(path: Path) -> None:
    """A CLIP byte-pair vocabulary: a gzip of text lines, the first one its "#version" header."""
    from sam3d_core.segment.sam3_config import BPE_HINT

    if not path.is_file():
        raise CheckpointError(f"--bpe {path}: no such file; {BPE_HINT}")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            head = f.readline()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise CheckpointError(f"--bpe {path.name} is not a gzipped vocabulary ({e}); {BPE_HINT}") from None
    if "#version" not in head:  # CLIP's first line: "bpe_simple_vocab_16e6.txt#version: 0.2
        raise CheckpointError(f"--bpe {path.name} does not start like CLIP's BPE vocabulary; {BPE_HINT}")


def find_bpe(folder: Path | None = None) -> Path:
    """SAM 3's text vocabulary: the one imported with the checkpoint, else the one sam3's builder looks for beside
    the package, else open_clip's packaged copy. CheckpointError saying how to get it otherwise."""
    import importlib.util

    from sam3d_core.segment.sam3_config import BPE_HINT, BPE_NAME

    candidates = [folder / BPE_NAME] if folder is not None else []
    for pkg, rel in (("sam3", ("..", "assets", BPE_NAME)), ("sam3", ("assets", BPE_NAME)), ("open_clip", (BPE_NAME,))):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            candidates.append(Path(list(spec.submodule_search_locations)[0], *rel))
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise CheckpointError(f"no {BPE_NAME} found (looked in {', '.join(str(c) for c in candidates)}); {BPE_HINT}")


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


def load_sam3_state(name: str | Path, root: Path | None = None):
    """(Sam3Config, image-model state dict, path of the BPE vocabulary, sha256) of an imported SAM 3 checkpoint,
    after checking its hashes."""
    from sam3d_core.segment.sam3_config import Sam3Config

    manifest, sd = _load_checked(name, root, "sam3")
    folder = resolve(name, root)
    try:
        cfg = Sam3Config.from_json(json.dumps(manifest["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"{folder.name!r}: its manifest has no usable SAM 3 config ({e}); re-import it with "
            "`sam3d weights import-sam FILE --overwrite`"
        ) from None
    return cfg, sd, find_bpe(folder), manifest["files"]["sam.safetensors"]["sha256"]


def load_sam2_state(name: str | Path, root: Path | None = None) -> tuple[str, str, dict[str, torch.Tensor], str]:
    """(size, version, state dict, sha256) of an imported SAM 2 checkpoint, after checking its hash."""
    manifest, sd = _load_checked(name, root, "sam2")
    return manifest["model_type"], manifest.get("version", "2.1"), sd, manifest["files"]["sam.safetensors"]["sha256"]
