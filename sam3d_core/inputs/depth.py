"""Depth models: photo -> metric point map in the PyTorch3D camera frame, behind one small interface.

    model, why = load_depth_model("auto")       # the first available adapter, or (None, why none is)
    res = run_depth_model(model, rgb)             # rgb [H, W, 3] uint8 -> DepthResult (shapes checked)
    res.pointmap_p3d                              # [H, W, 3] float32: x left, y up, z forward; non-finite = invalid
    res.K                                         # [3, 3] pixel intrinsics (OpenCV convention) or None

Adapters register a factory under a name (`register_depth_model`); "auto" takes the first available one
in registration order. Built in: `moge`, MoGe v1 as the official pipeline runs it (`Ruicheng/moge-vitl`,
`infer(image, force_projection=False)` under fp16 autocast). It is available when the `moge` package
imports and its weights were imported with `sam3d weights import-depth` into `<data dir>/depth/<name>/`:
    model.safetensors   MoGe's state dict (read without unpickling)
    config.json         MoGe's `model_config` (its constructor arguments)
    manifest.json       kind, version, sha256 and size of both files and of the source checkpoint
Importing reads a .pt with torch.load(weights_only=True), which refuses pickled code; loading checks the
sha256 first and builds MoGeModel itself (MoGe's `from_pretrained` is never handed a file).
Importing this module is free: torch, safetensors and moge are imported only to import or run a model.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sam3d_core.geometry import frames

MOGE_COMMIT = "a8c37341bc0325ca99b9d57981cc3bb2bd3e255b"  # the MoGe commit the official pipeline pins
MOGE_INSTALL_HINT = (
    f"pip install 'moge @ git+https://github.com/microsoft/MoGe.git@{MOGE_COMMIT}' "
    "(MoGe v1, the version the official pipeline uses)"
)
MOGE_WHERE_TO_GET = (
    "download model.pt of Ruicheng/moge-vitl (huggingface.co/Ruicheng/moge-vitl), then run "
    "`sam3d weights import-depth model.pt --name moge-vitl`"
)
MOGE_DEFAULT_WEIGHTS = "moge-vitl"
MOGE_PREFIXES = ("backbone.", "head.")  # MoGe v1: DINOv2 encoder + convolutional head (+ image_mean/std buffers)


class DepthModelError(ValueError):
    """A depth model that was asked for by name is unknown or cannot be used here."""


@dataclass(frozen=True)
class DepthResult:
    """One photo's geometry from a depth model.

    pointmap_p3d: [H, W, 3] float32 in the PyTorch3D camera frame (x left, y up, z forward), in the
    model's units (metres for MoGe); invalid pixels are non-finite (+inf, or NaN where the official
    frame conversion makes them NaN, see `moge_to_pytorch3d`). K: [3, 3] pixel intrinsics (OpenCV
    convention, pixel centres at i + 0.5) or None. source: provenance, starting with the adapter's name.
    """

    pointmap_p3d: np.ndarray
    K: np.ndarray | None
    source: str


class DepthModel:
    """Interface of a depth-model adapter. `available()` must be cheap (no weights loaded, no heavy import):
    it runs on every `Pipeline.open_photo`; `predict` may load the model on first use and keep it."""

    name: str = ""

    def available(self) -> tuple[bool, str]:
        """(usable now, what is installed and imported, or what is missing and how to fix it)."""
        raise NotImplementedError

    def predict(self, rgb: np.ndarray) -> DepthResult:
        """rgb [H, W, 3] uint8 -> DepthResult of the same H, W."""
        raise NotImplementedError


# -------------------------------------------------------------------------------------------------
# Registry
# -------------------------------------------------------------------------------------------------

DepthFactory = Callable[[str | None], DepthModel]  # device ("cuda", "cpu" or None: the best) -> adapter
_FACTORIES: dict[str, DepthFactory] = {}
_INSTANCES: dict[tuple[str, str | None], DepthModel] = {}  # loaded weights stay loaded between photos
_RESERVED = ("auto", "none")


def register_depth_model(name: str, factory: DepthFactory, *, overwrite: bool = False) -> None:
    """Make an adapter known under `name`; "auto" tries adapters in registration order."""
    if not name or name in _RESERVED:
        raise ValueError(f"depth model name {name!r}: expected a non-empty name other than {_RESERVED}")
    if name in _FACTORIES and not overwrite:
        raise ValueError(f"a depth model {name!r} is already registered; pass overwrite=True to replace it")
    unregister_depth_model(name)
    _FACTORIES[name] = factory


def unregister_depth_model(name: str) -> None:
    """Forget an adapter (and its loaded instances); unknown names are ignored."""
    _FACTORIES.pop(name, None)
    for key in [k for k in _INSTANCES if k[0] == name]:
        del _INSTANCES[key]


def depth_model_names() -> list[str]:
    return list(_FACTORIES)


def get_depth_model(name: str, device: str | None = None) -> DepthModel:
    """The adapter registered as `name`, built once per device (available or not)."""
    if name not in _FACTORIES:
        known = ", ".join(["auto", "none", *_FACTORIES])
        raise DepthModelError(f"unknown depth model {name!r}; expected one of: {known}")
    key = (name, device)
    if key not in _INSTANCES:
        _INSTANCES[key] = _FACTORIES[name](device)
    return _INSTANCES[key]


def depth_model_status(device: str | None = None) -> list[tuple[str, bool, str]]:
    """Every registered adapter in "auto" order: (name, usable now, why or why not)."""
    out = []
    for name in _FACTORIES:
        ok, why = get_depth_model(name, device).available()
        out.append((name, ok, why))
    return out


def load_depth_model(name: str | None = "auto", device: str | None = None) -> tuple[DepthModel | None, str]:
    """(adapter, why it was chosen) or (None, why none is used).

    name: "auto" (the first available adapter, else None with every adapter's reason), None or "none"
    (never), or a registered name (that adapter; DepthModelError when it is unknown or unavailable).
    """
    if name is None or name == "none":
        return None, "depth model disabled (depth_model='none')"
    if name != "auto":
        model = get_depth_model(name, device)
        ok, why = model.available()
        if not ok:
            raise DepthModelError(
                f"depth model {name!r} is not usable: {why}; or pass depth_model='none' "
                "(CLI: --depth-model none) for a plane at unit distance"
            )
        return model, f"{name} ({why})"
    reasons = []
    for n in list(_FACTORIES):
        model = get_depth_model(n, device)
        ok, why = model.available()
        if ok:
            return model, f"{n} ({why})"
        reasons.append(f"{n}: {why}")
    return None, "no depth model available" + (" (" + "; ".join(reasons) + ")" if reasons else "")


def run_depth_model(model: DepthModel, rgb: np.ndarray) -> DepthResult:
    """model.predict(rgb) with its output checked: a point map of the photo's size, a sane K or None."""
    h, w = rgb.shape[:2]
    res = model.predict(rgb)
    pm = np.asarray(res.pointmap_p3d, dtype=np.float32)
    if pm.shape != (h, w, 3):
        raise RuntimeError(
            f"depth model {model.name!r} returned a point map of shape {pm.shape} for a {w}x{h} "
            f"photo; an adapter must return [{h}, {w}, 3] (resize its output to the photo)"
        )
    K = None
    if res.K is not None:
        K = np.asarray(res.K, dtype=np.float64)
        if K.shape != (3, 3) or not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise RuntimeError(
                f"depth model {model.name!r} returned K = {K.tolist()}; an adapter must return "
                "None or a finite 3x3 pixel intrinsics matrix with fx, fy > 0"
            )
    return DepthResult(pm, K, res.source or model.name)


# -------------------------------------------------------------------------------------------------
# A user's depth map (`--depth FILE.npy`): read and checked before any model runs
# -------------------------------------------------------------------------------------------------

NPY_MAGIC = b"\x93NUMPY"
MAX_DEPTH_BYTES = 2 << 30  # a float32 depth map of 500 MP; larger files are not depth maps of a photo


def load_depth_file(path: str | Path) -> np.ndarray:
    """A .npy depth map (metres along the view axis, [H, W]) -> float32 array, or InputError naming the problem and
    the fix. Never unpickles: a file that is not .npy (text, an image, a pickle) is refused as such."""
    from sam3d_core.inputs.imageio import InputError

    p = Path(path).expanduser()
    name = str(p)
    try:
        with open(p, "rb") as f:
            head = f.read(len(NPY_MAGIC))
        size = p.stat().st_size
    except (OSError, ValueError) as e:  # missing, a folder, no permission, a NUL byte
        why = "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read ({type(e).__name__})"
        raise InputError(
            f"depth file {name} {why}; give a .npy depth map (metres, the photo's size)", "depth"
        ) from None
    if head != NPY_MAGIC:
        raise InputError(
            f"depth file {name} is not a NumPy .npy file (it does not start with the .npy header); save the depth "
            "map with numpy.save(path, depth) as a float array [H, W] in metres",
            "depth",
            {"path": name},
        )
    if size > MAX_DEPTH_BYTES:
        raise InputError(f"depth file {name} is {size} bytes, too large for a depth map of a photo", "depth")
    try:
        d = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(
            f"depth file {name} cannot be read as a numeric .npy array ({str(e)[:120]}); save it with "
            "numpy.save(path, depth) as a float array [H, W] in metres",
            "depth",
            {"path": name},
        ) from None
    if not isinstance(d, np.ndarray) or d.dtype.kind not in "fiu" or d.ndim not in (2, 3):
        raise InputError(
            f"depth file {name} holds a {getattr(d, 'dtype', type(d))} array of shape {getattr(d, 'shape', '?')}; "
            "expected a float array [H, W] in metres",
            "depth",
            {"path": name},
        )
    return d.astype(np.float32)


def check_depth_map(depth: np.ndarray, width: int, height: int) -> np.ndarray:
    """A depth map for a width x height photo -> float32 [H, W], or InputError: the photo's size, and every value
    finite and > 0 (metres along the view axis). Checked before any model runs."""
    from sam3d_core.inputs.imageio import InputError

    d = np.asarray(depth, dtype=np.float32)
    if d.ndim == 3 and d.shape[2] == 1:
        d = d[:, :, 0]
    if d.shape != (height, width):
        got = f"{d.shape[1]}x{d.shape[0]}" if d.ndim == 2 else f"of shape {list(d.shape)}"
        raise InputError(
            f"depth map is {got} but the photo is {width}x{height}; give a depth map of the photo's size "
            "(metres along the view axis)",
            "depth",
            {"depth_shape": list(d.shape), "photo_size": [width, height]},
        )
    nan, inf = int(np.isnan(d).sum()), int(np.isinf(d).sum())
    low = int((d[np.isfinite(d)] <= 0).sum())
    if nan or inf or low:
        parts = [f"{n} {w}" for n, w in ((nan, "NaN"), (inf, "infinite"), (low, "zero or negative")) if n]
        raise InputError(
            f"depth map has {', '.join(parts)} value(s) of {d.size}; every pixel needs a depth in metres > 0: fill "
            "the holes (e.g. with the nearest valid depth), or leave out --depth",
            "depth",
            {"nan": nan, "inf": inf, "non_positive": low},
        )
    return d


# -------------------------------------------------------------------------------------------------
# MoGe output -> our frames (pure functions)
# -------------------------------------------------------------------------------------------------


def opencv_pointmap_to_pytorch3d(points: np.ndarray) -> np.ndarray:
    """[H, W, 3] OpenCV camera frame -> [H, W, 3] float32 PyTorch3D camera frame, as the official pipeline.

    The official code rotates with PyTorch3D's `Transform3d` (R = diag(-1, -1, 1)): a 4x4 homogeneous
    product [x, y, z, 1] @ M followed by a divide by w. Finite points just flip x and y. A pixel with any
    non-finite coordinate (MoGe's +inf) gets inf * 0 = NaN in every output coordinate and in w, so it
    comes out all-NaN. That matters downstream: the point-map statistics (nanmedian) skip NaN but count inf.
    """
    p = np.asarray(points, dtype=np.float32)
    if p.ndim != 3 or p.shape[-1] != 3:
        raise ValueError(f"points: got shape {p.shape}, expected [H, W, 3] (OpenCV camera frame)")
    flip = frames.frame_matrix("opencv", "pytorch3d")
    assert np.array_equal(flip, np.diag(np.diag(flip)))  # a sign flip per axis, so per-axis products are exact
    out = p * np.diag(flip).astype(np.float32)  # [H, W, 3]
    out[~np.isfinite(p).all(axis=-1)] = np.nan  # the homogeneous product's 0 * inf
    return out


def normalized_to_pixel_intrinsics(K_norm: np.ndarray, width: int, height: int) -> np.ndarray:
    """MoGe's normalised intrinsics (image = [0, 1]^2, so fx is in image widths and cx = 0.5 is the centre)
    -> [3, 3] pixel intrinsics of a width x height image. Both put pixel centres at (i + 0.5) / size."""
    k = np.asarray(K_norm, dtype=np.float64)
    if k.shape != (3, 3) or not np.isfinite(k).all() or not np.allclose(k[2], [0.0, 0.0, 1.0]):
        raise ValueError(f"K_norm: got {k.tolist()}, expected a finite 3x3 [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]")
    return np.diag([float(width), float(height), 1.0]) @ k


def moge_to_pytorch3d(points: np.ndarray, intrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MoGe v1 `infer` output (points [H, W, 3] OpenCV frame, +inf invalid; intrinsics normalised 3x3)
    -> (point map [H, W, 3] float32 PyTorch3D frame, invalid all-NaN; K [3, 3] in pixels)."""
    pm = opencv_pointmap_to_pytorch3d(points)
    h, w = pm.shape[:2]
    return pm, normalized_to_pixel_intrinsics(intrinsics, w, h)


# -------------------------------------------------------------------------------------------------
# Weights: import, find, verify, load
# -------------------------------------------------------------------------------------------------


def depth_dir() -> Path:
    from sam3d_core.weights.store import data_dir

    return data_dir() / "depth"


def _refuse(path: Path, why: str) -> Exception:
    from sam3d_core.weights.store import CheckpointError

    return CheckpointError(f"{path}: {why}; {MOGE_WHERE_TO_GET}")


def _find_checkpoint(src: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) of a file or of a folder such as a Hugging Face snapshot."""
    if src.is_file():
        cfg = src.parent / "config.json"
        return src, (cfg if src.suffix == ".safetensors" and cfg.is_file() else None)
    if not src.is_dir():
        raise _refuse(src, "no such file or folder")
    for name in ("model.pt", "model.pth", "model.safetensors"):
        if (src / name).is_file():
            return _find_checkpoint(src / name)
    found = sorted(p for ext in ("*.pt", "*.pth", "*.safetensors") for p in src.glob(ext))
    if len(found) != 1:
        raise _refuse(
            src,
            f"expected one model.pt (or .pth / .safetensors + config.json) in the folder, "
            f"found {[p.name for p in found] or 'none'}",
        )
    return _find_checkpoint(found[0])


def _read_moge(path: Path, config_path: Path | None) -> tuple[dict, dict]:
    """(model_config, state dict) of a MoGe v1 checkpoint, without running pickled code."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from sam3d_core.weights.store import torch_load_refusal

    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path))  # a JSON header and raw buffers: no code
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except SafetensorError as e:
        raise _refuse(path, f"cannot be read as safetensors ({str(e)[:200]}); truncated or corrupt download?") from None
    except Exception as e:  # UnpicklingError (code, or not a pickle), RuntimeError, EOFError, KeyError, zip errors
        why = torch_load_refusal(path, e).removeprefix(path.name + " ")
        raise _refuse(path, why) from None
    if isinstance(obj, dict) and "model" in obj and "model_config" in obj:  # MoGe's own model.pt layout
        config, state = obj["model_config"], obj["model"]
    elif config_path is not None:
        try:
            config, state = json.loads(config_path.read_text(encoding="utf-8")), obj
        except (OSError, ValueError, RecursionError) as e:
            raise _refuse(config_path, f"is not readable JSON ({str(e)[:160]})") from None
    else:
        raise _refuse(
            path,
            "is neither MoGe's model.pt ({'model': ..., 'model_config': ...}) nor a state dict "
            "with a config.json beside it",
        )
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise _refuse(path, "its 'model' entry is not a state dict (a dict of tensors)")
    if not isinstance(config, dict) or not isinstance(config.get("encoder"), str):
        raise _refuse(
            path,
            "its model_config has no encoder name: not a MoGe v1 checkpoint (MoGe-2 checkpoints "
            "are not supported: the official pipeline uses MoGe v1)",
        )
    if not any(k.startswith("backbone.") for k in state) or not any(k.startswith("head.") for k in state):
        raise _refuse(path, f"no {MOGE_PREFIXES} tensors (e.g. {next(iter(state))!r}): not a MoGe v1 state dict")
    try:
        json.dumps(config)
    except TypeError as e:
        raise _refuse(path, f"its model_config is not plain data ({e})") from e
    return config, state


def import_depth_weights(
    src: str | Path, name: str = MOGE_DEFAULT_WEIGHTS, *, overwrite: bool = False, root: Path | None = None
) -> Path:
    """Convert MoGe v1 weights (model.pt, a folder holding it, or .safetensors + config.json) into
    `<root>/<name>/` (root: `depth_dir()`), recording the sha256 of the source and of every file written."""
    from safetensors.torch import save_file

    from sam3d_core.weights.store import check_model_name, sha256_file, staged_folder

    name = check_model_name(name, "depth weights name")
    src = Path(src).expanduser()
    path, config_path = _find_checkpoint(src)
    config, state = _read_moge(path, config_path)
    root = depth_dir() if root is None else Path(root)
    with staged_folder(root, name, overwrite) as tmp:
        weights, cfg = tmp / "model.safetensors", tmp / "config.json"
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights), metadata={"format": "pt"})
        cfg.write_text(json.dumps(config, indent=2))
        manifest = {
            "kind": "moge",
            "version": "v1",
            "encoder": config["encoder"],
            "source": str(path.resolve()),
            "source_file": {"name": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size},
            "files": {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size} for f in (weights, cfg)},
            "imported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root / name


def list_depth_weights(root: Path | None = None, broken: bool = False) -> list[dict]:
    """Imported depth-model weights: name, kind, folder, bytes, source file name. A folder whose manifest cannot
    be read is left out; `broken=True` lists only those (name, folder, problem)."""
    from sam3d_core.weights.store import folder_bytes, scan_models

    root = depth_dir() if root is None else Path(root)
    out = []
    for folder, data, problem in scan_models(root):
        if broken or data is None:
            if broken and data is None:
                out.append({"name": folder.name, "folder": str(folder), "problem": problem})
            continue
        source = data.get("source_file")
        out.append(
            {
                "name": folder.name,
                "kind": data.get("kind", "?"),
                "folder": str(folder),
                "bytes": folder_bytes(data),
                "source": source.get("name") if isinstance(source, dict) else None,
            }
        )
    return out


def depth_weights_dir(name: str | Path, root: Path | None = None) -> Path:
    """The folder of imported depth weights: a name is looked up only in `root` (default `depth_dir()`); a path
    (a Path, or text with a separator) is the folder itself."""
    from sam3d_core.weights.store import check_model_name

    if isinstance(name, Path) or any(sep in str(name) for sep in ("/", "\\")):
        return Path(name).expanduser()
    return (depth_dir() if root is None else Path(root)) / check_model_name(name, "depth weights name")


def verify_depth_weights(name: str | Path, root: Path | None = None) -> list[str]:
    """Problems of imported depth weights (empty = intact): files missing, truncated or changed."""
    from sam3d_core.weights.store import verify_folder

    return verify_folder(depth_weights_dir(name, root))


def remove_depth_weights(name: str, root: Path | None = None) -> Path:
    """Delete imported depth weights `name` (a name): the files its manifest lists, then the empty folder."""
    from sam3d_core.weights.store import remove_model_folder

    return remove_model_folder(depth_dir() if root is None else Path(root), name, "depth weights")


def load_depth_state(name: str | Path, root: Path | None = None) -> tuple[dict, dict, str]:
    """(model_config, state dict, sha256 of model.safetensors) of imported weights, after checking hashes."""
    from safetensors.torch import load_file

    from sam3d_core.weights.store import CheckpointError, read_manifest, verify_folder

    folder = depth_weights_dir(name, root)
    if not (folder / "manifest.json").is_file():
        raise CheckpointError(f"no imported depth weights {str(name)!r} in {folder.parent}; {MOGE_WHERE_TO_GET}")
    problems = verify_folder(folder)
    if problems:
        raise CheckpointError(
            f"{folder} failed its integrity check: "
            + "; ".join(problems)
            + f". Re-import it with `sam3d weights import-depth FILE --name {folder.name} "
            "--overwrite`."
        )
    manifest = read_manifest(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        digest = manifest["files"]["model.safetensors"]["sha256"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{folder}: {type(e).__name__} reading config.json or the manifest; re-import it"
        ) from None
    return config, load_file(str(folder / "model.safetensors")), digest


# -------------------------------------------------------------------------------------------------
# MoGe v1
# -------------------------------------------------------------------------------------------------


class MoGeAdapter(DepthModel):
    """MoGe v1 as the official pipeline calls it: the full photo in [0, 1], `infer(force_projection=False)`
    under fp16 autocast on CUDA (float32 on the CPU), output converted by `moge_to_pytorch3d`."""

    name = "moge"

    def __init__(self, device: str | None = None, weights: str = MOGE_DEFAULT_WEIGHTS, root: Path | None = None):
        self.device, self.weights, self.root = device, weights, root
        self._net = None
        self._sha256 = ""

    def available(self) -> tuple[bool, str]:
        missing = []
        if importlib.util.find_spec("moge") is None:
            missing.append(f"the moge package is not installed ({MOGE_INSTALL_HINT})")
        from sam3d_core.weights.store import CheckpointError, read_manifest

        try:
            folder = depth_weights_dir(self.weights, self.root)
        except CheckpointError as e:
            return False, str(e)
        if not (folder / "manifest.json").is_file():
            missing.append(f"no MoGe weights imported in {folder} ({MOGE_WHERE_TO_GET})")
        else:
            try:
                read_manifest(folder)  # a broken folder is skipped (the plane is used), never fatal
            except CheckpointError as e:
                missing.append(f"the MoGe weights in {folder} are broken: {e}")
        if missing:
            return False, "; ".join(missing)
        return True, f"MoGe v1, weights {self.weights!r} in {folder}"

    def _load(self):
        import torch

        from sam3d_core.weights.store import CheckpointError

        try:
            from moge.model.v1 import MoGeModel
        except ImportError as e:
            raise ImportError(f"moge could not be imported ({e}); {MOGE_INSTALL_HINT}") from e
        config, state, self._sha256 = load_depth_state(self.weights, self.root)
        net = MoGeModel(**config)  # builds its DINOv2 with pretrained=False: nothing is downloaded
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"MoGe weights {self.weights!r} do not fit MoGeModel({config.get('encoder')}): "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}); another MoGe version? {MOGE_INSTALL_HINT}"
            )
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._net = net.eval().to(device)

    def predict(self, rgb: np.ndarray) -> DepthResult:
        import torch

        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"rgb: got {rgb.dtype} {rgb.shape}, expected uint8 [H, W, 3]")
        if self._net is None:
            self._load()
        device = next(self._net.parameters()).device
        # [3, H, W] in [0, 1], rounded as the official image_to_float (uint8 -> float64 / 255 -> float32); a copy:
        # Photo.rgb is read-only
        image = (torch.from_numpy(np.array(rgb)).permute(2, 0, 1).double() / 255).float().to(device)
        cuda = device.type == "cuda"
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.float16, enabled=cuda):
            out = self._net.infer(image, force_projection=False, use_fp16=cuda)
        points = out["points"].float().cpu().numpy()  # [H, W, 3] OpenCV frame, +inf invalid
        pm, K = moge_to_pytorch3d(points, out["intrinsics"].float().cpu().numpy())
        return DepthResult(pm, K, f"moge ({self.weights}, sha256 {self._sha256[:12]})")


register_depth_model("moge", lambda device: MoGeAdapter(device=device))
