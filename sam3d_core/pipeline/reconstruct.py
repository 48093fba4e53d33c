"""Photo -> placed, textured objects: the end-to-end pipeline that the CLI, the worker and `make demo` share.

    pipe, which = Pipeline.load()                        # best model available, and a sentence saying which
    photo = pipe.open_photo("photo.jpg")                 # checks, intrinsics, point map: once per photo
    results = pipe.reconstruct(photo, [mask_a, mask_b], seed=42, progress=print_progress)
    files = pipe.export(photo, results, "out/")          # object GLBs + PLYs, scene GLB, scene.json

Per object, numbered steps: 1. mask checks, 2. stage 1 (coarse voxels + pose), 3. stage 2 (SLAT ->
Gaussians + dense mesh), 3b. layout refinement (the pose moved onto the point map when that comes from depth;
pipeline/layout.py), 4. mesh clean-up, decimation and UV unwrap, 5. texture bake from the dense
mesh's colours, 6. placement (pose matrices in every convention) and the reprojection IoU against the
mask. Without stage 2 (a model without one, `Pipeline(stage1, None)`, or `stage2=False`), steps 4-5 make the
mesh from stage 1's occupancy logits and texture it by projecting the photo (export/project.py); with
`voxels` (`Pipeline.voxels_only`) the stage-1 voxels are written instead. Everything geometric stays in the
model's local frame (z up) with the pose beside it; the frames module turns the pose into glTF node and
Blender object matrices (docs/architecture.md, Frames).

Low-VRAM mode keeps every network on the CPU and moves one stage at a time to the GPU (bf16), so a
whole object fits in a few GB; after a CUDA out-of-memory error, `reconstruct` retries the object once
in that mode before giving up with a clear error.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from sam3d_core.export.output import OutputFolder, output_folder
from sam3d_core.export.project import CARVE_GROW
from sam3d_core.geometry import frames
from sam3d_core.geometry.layout import matrix_to_quaternion
from sam3d_core.inputs.imageio import InputError, Photo, load_mask, load_photo
from sam3d_core.models.ss_vae import shape_latent_to_grid
from sam3d_core.pipeline.errors import EmptyMeshError, GPUOutOfMemory, is_out_of_memory

log = logging.getLogger("sam3d.pipeline")

# progress(stage, step, total): stage names as in docs/protocol.md
Progress = Callable[[str, int, int], None]
TINY_MAX_VOXELS = 2000
MAX_BATCH = 10  # objects per batched stage-1 / stage-2 run (a 10-object photo is one batch)
# GPU memory one more object in a batch may take (official configuration, bf16: the stage-1 condition K/V cache is
# ~1.5 GB per object, plus both stages' activations); a batch is cut to what the free memory holds.
BATCH_OBJECT_BYTES = 3 * 2**30
FINISH_THREADS = 4  # objects whose clean-up, UVs and bake run at the same time


def _pin_weights(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Put a CPU module's parameters and buffers in pinned (page-locked) memory; their tensors by name, or None
    when pinning fails (no CUDA, or the OS limit on locked memory): uploads then read pageable memory."""
    try:
        host = {}
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            t.data = t.data.pin_memory()
            host[name] = t.data
        return host
    except RuntimeError as e:
        log.warning("low-VRAM mode: could not pin the weights (%s); uploads will be slower", e)
        return None


def _point_at(model: torch.nn.Module, host: dict[str, torch.Tensor]) -> None:
    """Every parameter and buffer of `model` back on its host tensor (no copy: the weights did not change)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        t.data = host[name]


def default_mesh_workers() -> int:
    """Worker processes for the mesh chain: this process's share of the cores (torchrun's LOCAL_WORLD_SIZE
    processes share a host) minus one for its own thread, at most 16; 0 (run it in-process) below 4 cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return 0 if share < 4 else min(share - 1, 16)


def default_file_workers() -> int:
    """Threads that write a job's files: this process's share of the cores, at most 8 (past that the disk, not
    the encoding, sets the pace)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1), 8))


def run_side_by_side(jobs: Sequence[Callable[[], object]], workers: int) -> None:
    """Run independent jobs on up to `workers` threads (in this thread when that is 1 or there is one job). Every
    job has finished when this returns or raises, so a caller's clean-up never races a write still going on; the
    first failure in the jobs' order is raised."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(min(workers, len(jobs)), thread_name_prefix="sam3d-files") as pool:
        futures = [pool.submit(job) for job in jobs]
    for future in futures:  # the with block has waited for all of them
        future.result()


@dataclass
class PhotoContext:
    """One photo, checked, with its camera: computed once and shared by all its objects."""

    photo: Photo
    K: np.ndarray  # 3x3 pixel intrinsics (OpenCV convention)
    intrinsics_source: str  # "user", "exif", "default_fov"
    pointmap: np.ndarray  # [H, W, 3] PyTorch3D camera frame
    pointmap_source: str  # "user", "depth", "fallback plane"
    shared: dict = field(default_factory=dict, repr=False)  # per-photo tensors reused by every object

    @property
    def width(self) -> int:
        return self.photo.width

    @property
    def height(self) -> int:
        return self.photo.height

    def camera_record(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "K": np.asarray(self.K).tolist(),
            "intrinsics_source": self.intrinsics_source,
            "pointmap_source": self.pointmap_source,
            "blender_camera": frames.blender_camera(self.K, self.width, self.height),
            "gltf_camera": frames.gltf_camera(self.K, self.width, self.height),
        }


@dataclass
class ObjectResult:
    """One object: geometry in the model's local frame (z up), and its pose in the camera frame."""

    name: str
    mask: np.ndarray  # [H, W] bool
    pose_matrix: np.ndarray  # [4, 4] local -> PyTorch3D camera (column vectors)
    rotation_wxyz: list[float]
    translation: list[float]
    scale: list[float]
    num_voxels: int
    mesh: object | None  # export.gltf.TexturedMesh (local frame) or None: voxels only (`voxels`)
    gaussians: object | None  # gaussians.Gaussians (local frame) or None
    mask_iou: float | None  # silhouette of the placed mesh (or voxels) vs the mask
    settings: dict = field(default_factory=dict)  # seeds, steps, weights hashes, dtype: provenance
    timings: dict = field(default_factory=dict)  # seconds per stage
    report: dict = field(default_factory=dict)  # mesh clean-up counts
    voxels: np.ndarray | None = None  # [N, 3] int stage-1 voxels (grid coords)
    # Training targets (preference pairs): ss_latent [8, 16, 16, 16], rotation [3, 3], translation [3], scale [3],
    # slat_coords [N, 3], slat_feats [N, 8] (numpy); written by export(latents=True) as NAME_latents.safetensors
    latents: dict | None = None


def _with_latents(finish: Callable, latents: dict) -> Callable:
    """Wrap a `_finish_steps` partial so that its ObjectResult carries the latents."""

    def run(progress: Progress | None = None) -> ObjectResult:
        res = finish(progress)
        res.latents = latents
        return res

    return run


def save_latents(path: Path, latents: dict, K: np.ndarray) -> None:
    """NAME_latents.safetensors: the arrays of `ObjectResult.latents` (float32; slat_coords int64) and, in the
    metadata, the photo's K (JSON) and the format tag "sam3d-latents" version 1 (read by sam3d_core.data)."""
    from safetensors.numpy import save_file

    arrays = {
        k: np.ascontiguousarray(v, dtype=np.int64 if k == "slat_coords" else np.float32) for k, v in latents.items()
    }
    meta = {"format": "sam3d-latents", "version": "1", "K": json.dumps(np.asarray(K, np.float64).tolist())}
    save_file(arrays, str(path), metadata=meta)


def _device_default() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def open_photo(
    photo: str | Path | Photo,
    *,
    K: np.ndarray | None = None,
    fov_deg: float | None = None,
    depth: np.ndarray | None = None,
    pointmap: np.ndarray | None = None,
    depth_model: str | None = "auto",
    device: str | torch.device = "cpu",
) -> PhotoContext:
    """Check the photo and fix its camera once.

    Point map, the first that applies: `pointmap` ("user"); `depth` back-projected with K ("depth"); a
    depth model's (`sam3d_core.inputs.depth`; source: the model's, e.g. "moge (...)"); else a plane at unit
    distance ("fallback plane": layout in relative units). `depth_model`: "auto" (the first available
    adapter; none installed = the plane, cheaply), None or "none" (never), or a registered name (that
    adapter; InputError when it is unknown or unusable).
    Intrinsics, the first that applies: `K` or `fov_deg` ("user"); the photo's EXIF focal length
    ("exif"); the depth model's K when its point map is used ("depth_model"); a 60 degree horizontal
    field of view ("default_fov").
    """
    from sam3d_core.inputs.camera import pointmap_from_depth, resolve_intrinsics
    from sam3d_core.inputs.depth import DepthModelError, check_depth_map, load_depth_model, run_depth_model

    ph = photo if isinstance(photo, Photo) else load_photo(photo)
    K, source = resolve_intrinsics(ph, K=K, fov=fov_deg)
    h, w = ph.height, ph.width
    named = depth_model not in (None, "none", "auto")
    if named and (pointmap is not None or depth is not None):
        given = "point map" if pointmap is not None else "depth map"
        raise InputError(
            f"depth_model={depth_model!r} was asked for but a {given} was given too; pass one of "
            "them (depth_model='none' or 'auto' uses the given one)",
            field="depth_model",
        )
    if pointmap is not None:
        pm = np.asarray(pointmap, dtype=np.float32)
        if pm.shape != (h, w, 3):
            raise InputError(
                f"point map has shape {pm.shape} but the photo is {w}x{h}; expected [{h}, {w}, 3] "
                "in the PyTorch3D camera frame (x left, y up, z forward)",
                field="pointmap",
            )
        pm_source = "user"
    elif depth is not None:
        d = check_depth_map(depth, w, h)  # the photo's size; finite and > 0 everywhere, before any model runs
        pm, pm_source = pointmap_from_depth(d, K), "depth"
    else:
        try:
            model, _ = load_depth_model(depth_model, device=str(device))
        except DepthModelError as e:
            raise InputError(str(e), field="depth_model", details={"depth_model": depth_model}) from None
        if model is not None:
            res = run_depth_model(model, ph.rgb)
            pm, pm_source = res.pointmap_p3d, res.source
            if source == "default_fov" and res.K is not None:  # user K and EXIF stay first
                K, source = res.K, "depth_model"
        else:
            pm, pm_source = pointmap_from_depth(np.ones((h, w), np.float32), K), "fallback plane"
    return PhotoContext(ph, np.asarray(K, dtype=np.float64), source, pm, pm_source)


def _refine_layout(ctx: PhotoContext, mask: np.ndarray, voxels: np.ndarray, pose4: np.ndarray, asked: bool | None):
    """Step 3b of one object: (pose4, the new row-vector rotation or None when the pose is unchanged, the record
    for settings["layout_refine"]). asked None = auto: on unless the point map is the no-depth fallback plane."""
    from sam3d_core.pipeline.layout import refine_placement

    mode = "auto" if asked is None else ("on" if asked else "off")
    if asked is False:
        return pose4, None, {"mode": mode, "ran": False, "why": "turned off"}
    if asked is None and ctx.pointmap_source == "fallback plane":
        return pose4, None, {"mode": mode, "ran": False, "why": "no depth: the point map is the fallback plane"}
    new4, rotation, report = refine_placement(pose4, voxels, mask, ctx.pointmap, ctx.K)
    record = {"mode": mode, "ran": "skipped" not in report, "pointmap": ctx.pointmap_source, **report}
    return (new4, rotation, record) if report["accepted"] else (pose4, None, record)


class Pipeline:
    """Stage 1 + stage 2 + post-processing, loaded once, for any number of photos and objects."""

    def __init__(self, stage1, stage2=None, *, description: str = "", low_vram: bool = False):
        self.stage1 = stage1
        self.stage2 = stage2
        self.description = description
        self.device = stage1.device
        self.low_vram = False
        self.overlap = True  # several objects: CPU post-processing of one overlaps the next one's GPU stages
        # Objects sampled together: MAX_BATCH on a GPU (1 in low-VRAM mode); 1 on a CPU, where a batch brings
        # nothing (compute-bound: 10 tiny objects took 84.5 s batched, 74.8 s one at a time; docs/benchmarks.md).
        self.max_batch = MAX_BATCH if self.device.type == "cuda" else 1
        # Stage 2 batched too. On a GPU one object's conditional and unconditional halves are equal-length
        # attention segments (cuDNN's dense kernel); a batch of objects of different sizes takes the varlen
        # kernel instead, so whether batching stage 2 pays is measured (bench/e2e.py --no-batch-stage2).
        self.batch_stage2 = True
        self.uv_piece_faces = 5000  # xatlas charts pieces of this many faces on its threads (unwrap_uv)
        # models without stage 2: the occupancy is cut down to the mask's silhouette cone before its surface is
        # taken (export/project.SilhouetteCarve: what projects outside the mask, unless occluded there, goes)
        self.carve = True
        self.carve_grow = CARVE_GROW  # voxels the solid grows by first, so that the outline can bring parts back
        # Without stage 2: False makes a mesh from stage 1's occupancy textured by projecting the photo
        # (export/project.py); True writes the stage-1 voxels (NAME_voxels.glb), as before that existed.
        self.voxels_only = False
        self.mesh_workers = default_mesh_workers()  # processes for decimation, clean-up and UVs (0: in-process)
        self.file_workers = default_file_workers()  # threads writing the files of an export (1: one after another)
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._warm: list | None = None  # the warm-up tasks sent to the mesh workers
        self._host_weights: dict[int, dict[str, torch.Tensor]] = {}  # low-VRAM: pinned CPU copy of each stage
        if low_vram:
            self.set_low_vram(True)

    # ---------------------------------------------------------------------------------------------
    # Loading
    # ---------------------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model: str | None = None,
        device: str | None = None,
        *,
        low_vram: bool = False,
        compile: bool = False,
        stage2: bool = True,
        max_voxels: int | None = None,
    ) -> tuple[Pipeline, str]:
        """The best model there is, and a sentence saying which.

        `model`: an imported model name (`sam3d weights import`), 'tiny' (random weights, tests), or None:
        the imported 'official' model when it is there and a GPU is present, else the tiny model.
        `max_voxels`: cap on stage-1 voxels (default: the model's, 42000 officially; 2000 for the tiny model).
        """
        from sam3d_core.pipeline.stage1 import Stage1Pipeline
        from sam3d_core.pipeline.stage2 import Stage2Pipeline
        from sam3d_core.registry import stage1_preset, stage2_preset
        from sam3d_core.weights import hub

        device = device or _device_default()
        names = [m["name"] for m in hub.list_models()]
        if model is None and "official" in names and torch.device(device).type == "cuda":
            model = "official"
        default_why = None
        if model is None and hub.bundled_default_dir() is not None:
            model = hub.DEFAULT_MODEL
            default_why = "no imported weights" if not names else "no GPU for the official model (use --model official)"
        if model and model != "tiny":
            s1 = Stage1Pipeline.from_pretrained(model, device=device, compile=compile)
            if max_voxels:
                s1.cfg = replace(s1.cfg, max_voxels=max_voxels)
            has2 = hub.has_stage(model, "stage2")
            s2 = Stage2Pipeline.from_pretrained(model, device=device) if stage2 and has2 else None
            which = f"imported model {model!r}"
            if model == hub.DEFAULT_MODEL and hub.resolve_model_dir(model) == hub.bundled_default_dir():
                which = (
                    "the bundled default model (ours, small, trained on furniture; texture projected from the photo"
                    + (f"; {default_why}: `sam3d weights import` for SAM 3D" if default_why else "")
                    + ")"
                )
            return cls(s1, s2, description=which, low_vram=low_vram), which
        why = (
            "asked for"
            if model == "tiny"
            else "no imported weights"
            if not names
            else "no GPU for the official model (use --model official)"
        )
        which = f"tiny random-weight model ({why}; shapes are meaningless)"
        # The random model's occupancy is noise: cap its voxels so that stage 2 stays quick on a CPU.
        tiny1 = replace(stage1_preset("tiny"), max_voxels=max_voxels or TINY_MAX_VOXELS)
        s1 = Stage1Pipeline.from_random(tiny1, seed=0, device=device)
        s2 = Stage2Pipeline.from_random(stage2_preset("tiny"), seed=1, device=device) if stage2 else None
        return cls(s1, s2, description=which, low_vram=low_vram), which

    @property
    def weights(self) -> str:
        ids = [self.stage1.weights_id] + ([self.stage2.weights_id] if self.stage2 else [])
        return "+".join(ids)

    def set_low_vram(self, on: bool) -> None:
        """Low-VRAM mode: networks live on the CPU (in pinned memory) and each stage visits the GPU alone."""
        if on == self.low_vram or self.device.type != "cuda":
            self.low_vram = on and self.device.type == "cuda"
            return
        self.low_vram = on
        if on:  # captured CUDA graphs point at GPU weights that are about to move
            self.stage1.cuda_graphs, self.stage1._graphs = False, {}
        for stage in (self.stage1, self.stage2):
            if stage is not None:
                stage.model.to("cpu" if on else self.device)
                stage.device = torch.device("cpu" if on else self.device)
                if on:
                    self._host_weights[id(stage)] = _pin_weights(stage.model)
        if not on:
            self._host_weights.clear()
        torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _on_gpu(self, stage):
        """Move one stage's networks to the GPU for the duration (low-VRAM mode only). The upload reads the
        weights from pinned memory (asynchronous, about twice as fast as from pageable memory); on the way
        back the weights are not copied: every tensor points at its pinned host copy again."""
        if not self.low_vram or stage is None:
            yield
            return
        host = self._host_weights.get(id(stage))
        stage.model.to(self.device, non_blocking=host is not None)
        stage.device = self.device
        try:
            yield
        finally:
            if host is not None:
                _point_at(stage.model, host)
            else:
                stage.model.to("cpu")
            stage.device = torch.device("cpu")
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------------------
    # Photo
    # ---------------------------------------------------------------------------------------------

    def open_photo(
        self,
        photo: str | Path | Photo,
        *,
        K: np.ndarray | None = None,
        fov_deg: float | None = None,
        depth: np.ndarray | None = None,
        pointmap: np.ndarray | None = None,
        depth_model: str | None = "auto",
    ) -> PhotoContext:
        """Check the photo and fix its camera once (`open_photo`, a depth model on this pipeline's device)."""
        return open_photo(
            photo, K=K, fov_deg=fov_deg, depth=depth, pointmap=pointmap, depth_model=depth_model, device=self.device
        )

    def load_mask(self, ctx: PhotoContext, mask) -> np.ndarray:
        return load_mask(mask, ctx.photo)

    # ---------------------------------------------------------------------------------------------
    # Objects
    # ---------------------------------------------------------------------------------------------

    def reconstruct(
        self,
        ctx: PhotoContext,
        masks: Sequence,
        *,
        names: Sequence[str] | None = None,
        seed: int = 42,
        steps: int | None = None,
        fast: bool = False,
        texture_size: int = 1024,
        faces: int = 20000,
        stage2: bool = True,
        gaussians: bool = True,
        voxels: bool | None = None,
        refine_layout: bool | None = None,
        progress: Progress | None = None,
        on_object: Callable[[ObjectResult], None] | None = None,
    ) -> list[ObjectResult]:
        """Reconstruct every mask of one photo (object i gets seed + i). `on_object` sees each object as it
        finishes, in order, so a cancel or an error later keeps what finished. gaussians=False skips the
        Gaussian decoder (ObjectResult.gaussians is None: no PLY). Without stage 2 (stage2=False or none loaded)
        the mesh is stage 1's surface with the photo projected as its texture, or with voxels=True (default:
        `voxels_only`) no mesh, the stage-1 voxels only. refine_layout: move each pose onto the photo's point map
        (`pipeline.layout.refine_placement`; kept only when the silhouette fits the mask better); None (default)
        = when the point map comes from depth (a depth file, a user point map or a depth model), not for the
        fallback plane. ObjectResult.settings["layout_refine"] says what was asked and what happened.

        The objects go through stage 1 and stage 2 together, up to `max_batch` at a time (one batched sampling
        run per stage, each object with its own seed: the same result as one at a time, bit for bit in float32
        on a CPU; tests/test_batch.py); their meshes are then decoded one by one and each one's clean-up,
        UVs and bake run on a thread while the next is decoded (`overlap`), the CPU-heavy part in a pool of
        worker processes (`mesh_workers`). A CUDA out-of-memory error in a batch falls back to one object at
        a time, and then to low-VRAM mode (`_gpu_steps_with_retry`)."""
        masks = [self.load_mask(ctx, m) for m in masks]  # every mask checked: size, empty, tiny, inverted
        names = list(names) if names is not None else [f"object_{i}" for i in range(len(masks))]
        if len(names) != len(masks):
            raise ValueError(f"got {len(names)} names for {len(masks)} masks; give one name per mask")
        results: list[ObjectResult] = []
        voxels = self.voxels_only if voxels is None else bool(voxels)
        if (stage2 and self.stage2 is not None) or not voxels:
            self.warm_up(wait=False)  # the mesh worker processes start while the networks run

        def deliver(res: ObjectResult) -> None:
            results.append(res)
            if on_object is not None:
                on_object(res)

        # Objects' clean-up, UVs and bake run on threads while later objects are decoded (not in low-VRAM mode:
        # the bake's GPU lookup would share the GPU with a stage; not for one object). Progress calls are then
        # serialised by a lock, as they come from several threads.
        overlap = self.overlap and len(masks) > 1 and not self.low_vram
        if overlap and progress is not None:
            lock, user_progress = threading.Lock(), progress

            def progress(stage: str, step: int, total: int) -> None:
                with lock:
                    user_progress(stage, step, total)

        opts = dict(
            steps=steps,
            fast=fast,
            texture_size=texture_size,
            faces=faces,
            stage2=stage2,
            gaussians=gaussians,
            voxels=voxels,
            refine_layout=refine_layout,
            progress=progress,
        )
        threads = min(len(masks), FINISH_THREADS)
        from sam3d_core.export.uv import import_chain

        # here, before the finishing threads and their side threads start (export/uv.CHAIN_MODULES says why)
        import_chain()
        pool = ThreadPoolExecutor(threads, thread_name_prefix="sam3d-finish") if overlap else None
        pending: collections.deque = collections.deque()  # finishes running on the pool, in object order
        try:
            batch = self._batch_limit()
            for lo in range(0, len(masks), batch):
                chunk = range(lo, min(lo + batch, len(masks)))
                seeds = [seed + i for i in chunk]
                for finish in self._gpu_steps_chunk(
                    ctx, [masks[i] for i in chunk], [names[i] for i in chunk], seeds, opts
                ):
                    if pool is not None and not self.low_vram:
                        pending.append(pool.submit(finish))
                        while pending and pending[0].done():  # hand over what finished, in order
                            deliver(pending.popleft().result())
                        continue
                    while pending:  # a retry switched to low-VRAM mode: finish in order, then no overlap
                        deliver(pending.popleft().result())
                    deliver(finish())
            while pending:
                deliver(pending.popleft().result())
        finally:
            while pending:  # a later object failed: keep the ones that finish
                try:
                    deliver(pending.popleft().result())
                except Exception:  # noqa: S110 - the later object's error is the one raised
                    pass
            if pool is not None:
                pool.shutdown()
        return results

    def _batch_limit(self) -> int:
        """Objects per batched run: 1 in low-VRAM mode; else max_batch, cut on a GPU to the objects its free
        memory holds (BATCH_OBJECT_BYTES each); an out-of-memory error still falls back to one at a time."""
        if self.low_vram:
            return 1
        limit = max(int(self.max_batch), 1)
        if self.device.type == "cuda" and torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(self.device)
            limit = max(1, min(limit, int(free // BATCH_OBJECT_BYTES)))
        return limit

    def _gpu_steps_chunk(self, ctx: PhotoContext, masks: list, names: list, seeds: list, opts: dict):
        """Yield `finish` of each object of a chunk: batched (`_gpu_steps_batch`) when there are several, one at
        a time after a CUDA out-of-memory error in the batch (for the objects not yet yielded)."""
        done = 0
        if len(masks) > 1 and not self.low_vram:
            try:
                for finish in self._gpu_steps_batch(ctx, masks, names, seeds, **opts):
                    done += 1
                    yield finish
                return
            except Exception as e:
                if not is_out_of_memory(e) or self.device.type != "cuda":
                    raise
                log.warning("CUDA out of memory with %d objects in one batch: continuing one at a time", len(masks))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        for mask, name, seed in zip(masks[done:], names[done:], seeds[done:], strict=True):
            yield self._gpu_steps_with_retry(ctx, mask, dict(name=name, seed=seed, **opts))

    def _gpu_steps_with_retry(self, ctx: PhotoContext, mask: np.ndarray, kwargs: dict):
        """`_gpu_steps`, retried once in low-VRAM mode after a CUDA out-of-memory error."""
        try:
            return self._gpu_steps(ctx, mask, **kwargs)
        except Exception as e:
            if not is_out_of_memory(e) or self.low_vram or self.device.type != "cuda":
                raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.set_low_vram(True)
        try:
            finish = self._gpu_steps(ctx, mask, **kwargs)

            def marked(progress: Progress | None = None) -> ObjectResult:
                res = finish(progress)
                res.settings["low_vram_retry"] = True
                return res

            return marked
        except Exception as e2:
            if is_out_of_memory(e2):
                raise GPUOutOfMemory(
                    "CUDA ran out of memory even in low-VRAM mode (one stage on the GPU at a time, bf16). "
                    "Close other programs that use the GPU, lower --texture-size and --faces, or run on "
                    "the CPU with --device cpu (slow)"
                ) from e2
            raise

    def _gpu_steps(self, ctx: PhotoContext, mask: np.ndarray, *, name: str, seed: int, **opts):
        """Steps 1-3 (the GPU stages) of one object now; returns `finish(progress=None)`, steps 4-6 (mostly CPU),
        which may run on another thread while the next object's GPU stages run."""
        return list(self._gpu_steps_batch(ctx, [mask], [name], [seed], **opts))[0]

    def _gpu_steps_batch(
        self,
        ctx: PhotoContext,
        masks: list,
        names: list[str],
        seeds: list[int],
        *,
        steps: int | None,
        fast: bool,
        texture_size: int,
        faces: int,
        stage2: bool,
        gaussians: bool = True,
        voxels: bool = False,
        refine_layout: bool | None = None,
        progress: Progress | None,
    ):
        """Steps 1-3 of several objects of one photo: both stages sampled as one batch, then each object's
        decoders; yields one `finish(progress=None)` (steps 4-6) per object, in order, as its mesh is decoded."""
        report = progress or (lambda stage, step, total: None)
        n = len(masks)
        t = time.perf_counter()
        shared: dict[str, float] = {"batch_objects": n}  # the batch's wall times, recorded with every object

        def lap(stage: str) -> float:
            nonlocal t
            now = time.perf_counter()
            seconds, t = now - t, now
            return seconds

        # 1. Checks (each mask against the photo) and stage-1 preprocessing.
        report("preprocess", 0, 1)
        masks = [np.asarray(m, dtype=bool) for m in masks]
        for mask in masks:
            if mask.shape != (ctx.height, ctx.width):
                raise InputError(
                    f"mask is {mask.shape[1]}x{mask.shape[0]} pixels but the photo is "
                    f"{ctx.width}x{ctx.height}; the mask must have the photo's size",
                    field="mask",
                )
        rgb = ctx.photo.rgb
        # 2. Stage 1: coarse voxels and the pose in the camera frame, every object in one sampling run.
        with self._on_gpu(self.stage1):
            s1 = self.stage1
            inputs = [s1.prepare(rgb, m, ctx.pointmap) for m in masks]
            cond = torch.cat([s1.encode(i, ctx.shared) for i in inputs])  # the full-image tokens once per photo
            shared["preprocess"] = lap("preprocess")
            sampler = s1.cfg.sampler
            report("stage1", 0, steps or (sampler.shortcut_steps if fast else sampler.steps))
            opts1 = dict(steps=steps, shortcut=fast, progress=lambda i, k: report("stage1", i, k))
            if n == 1:  # (the same computation as a batch of one)
                outs1 = [s1.sample(inputs[0], cond, seed=seeds[0], **opts1)]
            else:
                outs1 = s1.sample_batch(inputs, cond, seeds=seeds, **opts1)
            del cond, inputs
        shared["stage1_batch"] = lap("stage1")
        records, latents = [], []  # latents: the training targets of each candidate (`export(latents=True)`)
        # without stage 2, each object's occupancy logits [64, 64, 64] and cap factor: its projected-texture mesh
        shapes = [(o.logits, o.downsample_factor) if o.logits is not None and not voxels else None for o in outs1]
        for out1, seed in zip(outs1, seeds, strict=True):
            pose = out1.pose
            rotation = pose.rotation[0].double().cpu().numpy()
            translation = pose.translation[0].double().cpu().numpy()
            scale = pose.scale[0].double().cpu().numpy()
            settings = {"seed": seed, "stage1": dict(out1.settings), "texture_size": texture_size, "faces": faces}
            latents.append(
                {
                    "ss_latent": shape_latent_to_grid(out1.latents["shape"].float())[0].cpu().numpy(),
                    "rotation": rotation,
                    "translation": translation,
                    "scale": scale,
                }
            )
            records.append(
                (pose, frames.pose_matrix(rotation, translation, scale), out1.coords[:, 1:].cpu().numpy(), settings)
            )

        def finish_of(i: int, dense, gauss, seconds: dict, shape=None) -> Callable[[Progress | None], ObjectResult]:
            pose, pose4, voxels, settings = records[i]
            timings = {
                "preprocess": round(shared["preprocess"] / n, 4),
                "stage1": round(shared["stage1_batch"] / n, 4),
                **{k: round(v, 4) for k, v in seconds.items()},
                "batch_objects": n,
                "stage1_batch": round(shared["stage1_batch"], 4),
            }
            if "stage2_batch" in shared:
                timings["stage2_batch"] = round(shared["stage2_batch"], 4)
            finish = partial(
                self._finish_steps,
                ctx,
                masks[i],
                names[i],
                texture_size,
                faces,
                dense,
                gauss,
                pose,
                pose4,
                voxels,
                settings,
                timings,
                report,
                shape=shape,
                layout=refine_layout,
            )
            return _with_latents(finish, latents[i])

        if not (stage2 and self.stage2 is not None):
            for i in range(n):
                yield finish_of(i, None, None, {}, shape=shapes[i])
            return
        # 3. Stage 2: SLAT on the stage-1 voxels, every object in one sampling run; then per object the
        # Gaussian and mesh decoders, yielding its finish as soon as its mesh exists.
        s2 = self.stage2
        decode = ("gaussian", "mesh") if gaussians else ("mesh",)
        decoded = []
        with self._on_gpu(s2):
            prepared = [s2.prepare_object(rgb, m, r1.coords) for m, r1 in zip(masks, outs1, strict=True)]
            cond2 = torch.cat([s2.encode(inp, ctx.shared) for inp, _ in prepared])
            coords = [c for _, c in prepared]
            report("stage2", 0, (None if fast else steps) or s2.cfg.sampler.steps)
            opts2 = dict(steps=None if fast else steps, progress=lambda i, k: report("stage2", i, k))
            if n == 1 or not self.batch_stage2:  # (the same result either way)
                slats = [s2.sample(cond2[i : i + 1], coords[i], seed=seeds[i], **opts2) for i in range(n)]
            else:
                slats = s2.sample_batch(cond2, coords, seeds=seeds, **opts2)
            del cond2
            shared["stage2_batch"] = lap("stage2")
            sampling = shared["stage2_batch"] / n
            for i in range(n):
                gauss, dense = s2.decode(slats[i], coords[i], decode)
                latents[i]["slat_coords"] = coords[i][:, 1:].long().cpu().numpy()
                latents[i]["slat_feats"] = slats[i].float().cpu().numpy()
                records[i][3]["stage2"] = s2._settings(seeds[i], None if fast else steps, None)
                if dense is None or len(dense.faces) == 0:
                    raise EmptyMeshError(
                        "stage 2 produced an empty mesh for this object; try another seed or a tighter mask"
                    )
                item = (i, dense, gauss, {"stage2": sampling + lap("decode")})
                if self.low_vram:
                    decoded.append(item)  # finished after stage 2 leaves the GPU
                else:
                    yield finish_of(*item)
        for item in decoded:
            yield finish_of(*item)

    def _finish_steps(
        self,
        ctx,
        mask,
        name,
        texture_size,
        faces,
        dense,
        gaussians,
        pose,
        pose4,
        voxels,
        settings,
        timings,
        report,
        progress: Progress | None = None,
        shape: tuple | None = None,
        layout: bool | None = None,
    ) -> ObjectResult:
        report = progress or report
        t = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timings[stage] = round(now - t, 4)
            t = now

        # 3b. Layout refinement: the pose moved onto the point map (before the texture projection and placement
        # use it); the geometry stays in its local frame.
        pose4, rotation, settings["layout_refine"] = _refine_layout(ctx, mask, voxels, pose4, layout)
        lap("layout")
        mesh, clean_report = None, {}
        if dense is not None:
            # 4. Clean-up, decimation, UVs. 5. Texture bake from the dense mesh's vertex colours.
            mesh, clean_report = self._finish_mesh(dense, name, texture_size, faces, report, lap)
        elif shape is not None:
            # 4. Stage 1's surface, cleaned, decimated, unwrapped. 5. Its texture projected from the photo.
            mesh, clean_report = self._finish_projected(ctx, mask, name, texture_size, faces, shape, pose4, report, lap)
            settings["texture"] = "projected from the photo (no stage 2)"
        # 6. Placement check: the silhouette of the placed geometry against the mask.
        report("export", 0, 1)
        translation, scale = pose4[:3, 3], np.linalg.norm(pose4[:3, :3], axis=0)
        if mesh is not None:
            v_local, f_local = mesh.vertices, mesh.faces
        else:
            from sam3d_core.export.voxels import voxel_surface

            v_local, f_local = voxel_surface(voxels, 64)
        v_cam = frames.transform_points(pose4, v_local)
        silhouette = frames.render_silhouette(v_cam, f_local, ctx.K, ctx.width, ctx.height)
        iou = frames.mask_iou(silhouette, mask)
        lap("placement")
        if rotation is None:
            quat = pose.quaternion[0].double().cpu().tolist()
        else:
            quat = matrix_to_quaternion(torch.from_numpy(rotation)).tolist()
        return ObjectResult(
            name=name,
            mask=mask,
            pose_matrix=pose4,
            rotation_wxyz=quat,
            translation=translation.tolist(),
            scale=scale.tolist(),
            num_voxels=len(voxels),
            mesh=mesh,
            gaussians=gaussians,
            mask_iou=iou,
            settings=settings,
            timings=timings,
            report=clean_report,
            voxels=voxels,
        )

    def _finish_mesh(self, dense, name: str, texture_size: int, faces: int, report: Progress, lap):
        from sam3d_core.export.bake import VertexColorSource, bake_texture
        from sam3d_core.export.gltf import TexturedMesh
        from sam3d_core.export.uv import decimate_and_unwrap

        report("postprocess", 0, 1)
        # On a GPU the colour lookup, the UV raster and the mesh split run there; on a CPU the scipy search is
        # the faster lookup. The CPU chain (decimation in parts, clean-up, UVs) runs in the worker processes
        # while this thread builds the bake's colour lookup.
        gpu = self.device if self.device.type == "cuda" else None
        with ThreadPoolExecutor(1, thread_name_prefix="sam3d-chain") as side:
            chain = side.submit(
                decimate_and_unwrap,
                dense.vertices.detach(),
                dense.faces.detach(),
                target_faces=faces,
                texture_size=texture_size,
                executor=self._mesh_pool(),
                uv_piece_faces=self.uv_piece_faces,
            )
            v = dense.vertices.detach().float().cpu().numpy()
            f = dense.faces.detach().cpu().numpy().astype(np.int64)
            colors = dense.vertex_attrs[:, :3].detach().float().clamp(0, 1).cpu().numpy()
            source = VertexColorSource(v, f, colors, device=gpu)
            uv, clean_report = chain.result()
        lap("postprocess")
        report("bake", 0, 1)
        # export.mesh returns glTF UVs (v = 0 on the top row), which is what the GLB stores.
        texture = bake_texture(uv.vertices, uv.faces, uv.uvs, source, size=texture_size, device=gpu)
        lap("bake")
        mesh = TexturedMesh(
            vertices=uv.vertices,
            faces=uv.faces,
            uvs=uv.uvs,
            texture=texture,
            name=name,
            metadata={"frame": "model local, stored y-up (x, z, -y)"},
        )
        return mesh, clean_report

    def _finish_projected(self, ctx, mask, name: str, texture_size: int, faces: int, shape, pose4, report, lap):
        """Steps 4-5 without stage 2: the level-0 surface of the occupancy logits through the mesh chain (clean-up,
        decimation, UVs; in the worker processes), then the photo projected into its texture (export/project.py)."""
        from sam3d_core.export.project import SilhouetteCarve, occupancy_surface, project_texture
        from sam3d_core.export.uv import decimate_and_unwrap

        report("postprocess", 0, 1)
        logits, factor = shape
        if not bool((logits > 0).any()):
            raise EmptyMeshError("stage 1 found no occupied voxel for this object; try another seed or a tighter mask")
        carve = None
        if self.carve:  # the fallback plane's depth says nothing about occluders: no point map then
            depth = None if ctx.pointmap_source == "fallback plane" else ctx.pointmap
            carve = SilhouetteCarve(pose4, ctx.K, mask, depth, grow=self.carve_grow)
        v, f = occupancy_surface(logits, downsample_factor=factor, carve=carve)
        uv, clean_report = decimate_and_unwrap(
            v,
            f,
            target_faces=faces,
            texture_size=texture_size,
            executor=self._mesh_pool(),
            uv_piece_faces=self.uv_piece_faces,
        )
        clean_report["surface_faces"] = len(f)
        clean_report["carve"] = carve.report if carve is not None else {"off": True}
        lap("postprocess")
        report("bake", 0, 1)
        rgb = ctx.photo.rgb
        mesh, clean_report["projection"] = project_texture(
            uv.vertices, uv.faces, uv.uvs, rgb, mask, pose4, ctx.K, texture_size=texture_size, name=name
        )
        lap("bake")
        return mesh, clean_report

    # ---------------------------------------------------------------------------------------------
    # Worker processes for the mesh chain
    # ---------------------------------------------------------------------------------------------

    def _mesh_pool(self) -> ProcessPoolExecutor | None:
        """The process pool of the mesh chain (`mesh_workers` processes), started on first use; None when
        mesh_workers is 0 (the chain then runs in the calling thread)."""
        from sam3d_core.export.uv import worker_init

        with self._pool_lock:
            if self._pool is None and self.mesh_workers > 0:
                self._pool = ProcessPoolExecutor(
                    self.mesh_workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init
                )
            return self._pool

    def warm_up(self, wait: bool = True) -> None:
        """Start the mesh worker processes and import their libraries now (a worker calls this at start, and
        `reconstruct` without waiting, so they are up by the time the first mesh exists)."""
        from sam3d_core.export.uv import worker_ready

        pool = self._mesh_pool()
        if pool is None or self._warm is not None:
            if wait and self._warm is not None:
                for fut in self._warm:
                    fut.result()
            return
        self._warm = [pool.submit(worker_ready) for _ in range(self.mesh_workers)]
        if wait:
            for fut in self._warm:
                fut.result()

    def close(self) -> None:
        """Stop the mesh worker processes (they also stop when this process exits)."""
        with self._pool_lock:
            pool, self._pool, self._warm = self._pool, None, None
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    # ---------------------------------------------------------------------------------------------
    # Files
    # ---------------------------------------------------------------------------------------------

    def estimate_bytes(
        self,
        objects: int = 1,
        *,
        texture_size: int = 1024,
        faces: int = 20000,
        stage2: bool = True,
        voxels: bool | None = None,
    ) -> int:
        """An upper bound of what `export` writes for `objects` objects: the room checked before the GPU work."""
        n_voxels = self.stage1.cfg.max_voxels
        per = n_voxels * 400 + (64 << 10)  # a voxel GLB (or the mask PNG) and headroom
        textured = stage2 and self.stage2 is not None
        if textured:
            per += n_voxels * self.stage2.cfg.gaussian.num_gaussians * 68  # PLY: 17 float32 per Gaussian
        if textured or not (self.voxels_only if voxels is None else voxels):  # stage 2's mesh or the projected one
            per += 2 * (texture_size * texture_size * 4 + faces * 64)  # the object GLB and its copy in scene.glb
        return objects * per + (1 << 20)

    def check_output(
        self,
        out: str | Path,
        *,
        objects: int = 1,
        texture_size: int = 1024,
        faces: int = 20000,
        stage2: bool = True,
        voxels: bool | None = None,
        overwrite: bool = False,
        inputs: Sequence[str | Path | None] = (),
    ) -> OutputFolder:
        """Before any GPU work: `out` is (or can become) a writable folder with room for the files of `objects`
        objects. Raises OutputError (a ValueError) naming the problem and the fix; creates nothing.
        Pass the result to `export`. `inputs`: files of the job (photo, masks, depth) that are never written over."""
        folder = output_folder(out, overwrite=overwrite, inputs=inputs)
        folder.check_room(
            self.estimate_bytes(objects, texture_size=texture_size, faces=faces, stage2=stage2, voxels=voxels)
        )
        return folder

    def export(
        self,
        ctx: PhotoContext,
        results: Sequence[ObjectResult],
        out: str | Path | OutputFolder,
        masks: bool = True,
        *,
        overwrite: bool = False,
        inputs: Sequence[str | Path | None] | None = None,
        latents: bool = False,
    ) -> dict:
        """Per object: `NAME.glb` (textured, local frame stored y-up as the official GLBs), `NAME.ply`
        (3DGS Gaussians in the local frame), `NAME_mask.png`; for the photo: `scene.glb` (every object
        placed, the camera at the origin), `scene.json` (poses, intrinsics, cameras, provenance).

        The output policy (sam3d_core/export/output.py): nothing is replaced but, with `overwrite`, files of our
        own earlier results; a taken name gets a numbered suffix (`NAME_1.glb`, `scene_1.json`); the files are
        renamed into place together, scene.json last, so a failed export writes nothing. The returned dict is
        scene.json's content plus "scene_json", the name it was written under. `inputs` (default: the photo)
        are never written over. latents=True also writes `NAME_latents.safetensors` (`save_latents`: the targets
        of training pairs made from the artist's picks)."""
        from sam3d_core.export.gltf import save_object_glb, save_scene_glb
        from sam3d_core.export.output import check_name, save_mask_png
        from sam3d_core.export.voxels import save_voxels_glb
        from sam3d_core.version import __version__

        if inputs is None:
            inputs = [ctx.photo.path]
        if not isinstance(out, OutputFolder):
            out = output_folder(out, overwrite=overwrite, inputs=inputs)
        objects, placed, nodes = [], [], {"camera"}
        jobs: list[Callable[[], object]] = []  # every object file, written side by side once all names are claimed
        with out.writer() as w:
            scene_stem = w.claim("scene", (".json", ".glb"), last=True)  # first: an object named scene gets scene_1
            for res in results:
                suffixes = [".glb" if res.mesh is not None else "_voxels.glb"]
                suffixes += [".ply"] * (res.gaussians is not None) + ["_mask.png"] * masks
                suffixes += ["_latents.safetensors"] * bool(latents and res.latents)
                stem = w.claim(check_name(res.name, "object name"), suffixes)
                rec = self.object_record(res)
                if res.mesh is not None:
                    jobs.append(partial(save_object_glb, w.staged(f"{stem}.glb"), res.mesh))
                    rec["mesh_glb"] = f"{stem}.glb"
                    node = next(n for n in (stem, *(f"{stem}_{i}" for i in range(1, 10**6))) if n not in nodes)
                    nodes.add(node)  # node names in scene.glb: unique, and not the camera's
                    placed.append((replace(res.mesh, name=node), frames.gltf_node_matrix(res.pose_matrix)))
                else:
                    jobs.append(partial(save_voxels_glb, w.staged(f"{stem}_voxels.glb"), res.voxels, res.pose_matrix))
                    rec["glb"] = f"{stem}_voxels.glb"
                if res.gaussians is not None:
                    jobs.append(partial(res.gaussians.save_ply, w.staged(f"{stem}.ply")))
                    rec["gaussians_ply"] = f"{stem}.ply"
                if masks:
                    jobs.append(partial(save_mask_png, res.mask, w.staged(f"{stem}_mask.png")))
                    rec["mask"] = f"{stem}_mask.png"
                if latents and res.latents:
                    jobs.append(partial(save_latents, w.staged(f"{stem}_latents.safetensors"), res.latents, ctx.K))
                    rec["latents"] = f"{stem}_latents.safetensors"
                objects.append(rec)
            # The texture PNGs, the PLY arrays and the writes release the GIL: on threads the files of a photo take
            # about as long as its largest file. The scene GLB comes after, reusing the textures' PNG encodings.
            run_side_by_side(jobs, self.file_workers)
            scene = {
                "version": 1,
                "generator": f"sam3d {__version__}",
                "photo": str(ctx.photo.path) if ctx.photo.path else None,
                **ctx.camera_record(),
                "frames": "pose: object -> PyTorch3D camera (x left, y up, z forward), column vectors; object "
                "files hold the model's local frame stored y-up (x, z, -y); scene.glb: camera at the "
                "origin looking down -z; blender_matrix_world: for the object Blender's glTF importer "
                "makes from NAME.glb",
                "objects": objects,
                "model": self.description,
                "weights": self.weights,
            }
            if placed:
                cam = frames.gltf_camera(ctx.K, ctx.width, ctx.height)
                save_scene_glb(
                    w.staged(f"{scene_stem}.glb"),
                    placed,
                    cam["perspective"],
                    extras={"camera": cam["extras"], "model": self.description, "weights": self.weights},
                )
                scene["scene_glb"] = f"{scene_stem}.glb"
            w.staged(f"{scene_stem}.json").write_text(json.dumps(scene, indent=1))
        return {**scene, "scene_json": f"{scene_stem}.json"}

    def object_record(self, res: ObjectResult) -> dict:
        """The JSON record of one object (scene.json and the worker's answers)."""
        return {
            "name": res.name,
            "num_voxels": res.num_voxels,
            "pose": {
                "rotation_wxyz": res.rotation_wxyz,
                "translation": res.translation,
                "scale": res.scale,
                "matrix": np.asarray(res.pose_matrix).tolist(),
                "frame": "pytorch3d_camera",
            },
            "gltf_node_matrix": frames.gltf_node_matrix(res.pose_matrix).tolist(),
            "blender_matrix_world": frames.blender_object_matrix(res.pose_matrix).tolist(),
            "mask_iou": None if res.mask_iou is None else round(float(res.mask_iou), 4),
            "settings": res.settings,
            "timings": res.timings,
            "mesh_report": res.report,
            "model": self.description,
        }
