"""Render-pack training views rendered on the training device: the DataLoader's workers only draw each view's
scene (numbers and a background crop), the training process renders a whole micro-batch in a few batched calls.

    source = ViewPlans(RenderPackDataset(pack, seed))         # workers: source[i] -> plan_view(dataset, i)
    batch = collate_plans([source[i] for i in indices])       # PlanBatch: the crops stacked in one uint8 tensor
    views = DeviceViews(source.dataset, "cuda")(batch)        # RenderedViews: tensors on the device

Why: on the CPU a view costs ~90 ms (two thirds of it rasterisation), so 15 loader processes gave 110 views/s
while the GPU idled; `render_views` rasterises a batch in one kernel launch. The recipe is RenderPackDataset's,
drawn by the same functions (`plan_view` / `draw_attempt` call data.synth's and the dataset's); what changes is
that every random choice is made before anything is rendered, with its own generator per (seed, index, attempt):

1. All views in one `render_views` call, each with its first try of flying occluders (or its object behind),
   amodal passes where there are occluders, backgrounds as drawn.
2. An occluded view keeps its first try that `occlusion_accepted` passes, else goes without occluder (as
   `render_scene`): the later tries of the views the first call rejected are measured in one `target_masks`
   raster call (silhouettes only), and those views are rendered again with what they keep.
3. The mask noise (`masknoise.mask_noise_batch`, the cv2 recipe as tensor ops) and the usability rule of
   `pack._usable`. A view that fails gets its next attempt (`draw_attempt(index, ..., a)`, drawn here: about 1 %
   of the views at 384 px) and the failures are rendered together, up to MAX_ATTEMPTS rounds.
4. The point maps: NaN off the surfaces, a wall behind, or the no-depth fallback plane with the pose rescaled so
   that the visible surface's median depth is 1 (`draw_pointmap_kind`, as __getitem__).

A view is a function of (seed, index): the same in any batch, process or run (resume, DDP), and its masks are
the same bits on a CPU and a GPU (exact rasteriser, elementwise noise); colours and points within rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from sam3d_core.data.masknoise import mask_noise_batch
from sam3d_core.data.pack import MAX_ATTEMPTS, MIN_MASK_FRACTION, RenderPackDataset, draw_pointmap_kind, flat_fov_deg
from sam3d_core.data.render import Light, Placed, RenderMesh, Shot, render_views, target_masks
from sam3d_core.data.synth import (
    CropBox,
    NoiseParams,
    crop_background,
    draw_behind,
    draw_crop,
    draw_mask_noise,
    draw_occluders,
    occlusion_accepted,
    sample_scene,
)


class PoseRef(NamedTuple):
    """A pack object placed by a pose (row-vector rotation [3, 3], translation [3], scale): Placed without mesh."""

    obj: int
    rotation: np.ndarray
    translation: np.ndarray
    scale: float

    @classmethod
    def of(cls, obj: int, placed: Placed) -> PoseRef:
        return cls(obj, np.asarray(placed.rotation, np.float64), np.asarray(placed.translation, np.float64),
                   float(np.mean(placed.scale)))  # fmt: skip


@dataclass
class Attempt:
    """One drawn scene of a view (one pass of RenderPackDataset.__getitem__'s loop, nothing rendered yet).
    tries: "occluded": the candidate occluder sets in order; "occluder": the one object behind; "alone": none."""

    K: np.ndarray  # [3, 3]
    target: PoseRef
    light: Light
    mode: str
    tries: list[list[PoseRef]]
    background: int
    crop: CropBox
    noise: NoiseParams | None
    spots: list[tuple[float, int]]  # each hole: (u: floor(u * count) picks the mask pixel, radius)


@dataclass
class ViewPlan:
    """A view of the pack to render on the device: the target, its occluder candidates, the point-map kind and the
    first attempt with its background crop [size, size, 3] uint8 (later attempts are drawn when needed)."""

    index: int
    obj: int
    picks: list[int]
    kind: str  # "nan" | "wall" | "flat" (pack.draw_pointmap_kind)
    wall: float
    first: Attempt
    crop: np.ndarray | None = None


@dataclass
class PlanBatch:
    """A micro-batch of plans as the loader hands it over: the crops of the first attempts in one tensor
    [B, size, size, 3] uint8 (shared memory between processes), the plans without them."""

    plans: list[ViewPlan]
    backgrounds: torch.Tensor

    def __len__(self) -> int:
        return len(self.plans)


def collate_plans(plans: list[ViewPlan]) -> PlanBatch:
    """The loader's collate for ViewPlans (picklable: a module-level function)."""
    crops = torch.from_numpy(np.stack([p.crop for p in plans]))
    return PlanBatch([_without_crop(p) for p in plans], crops)


def _without_crop(p: ViewPlan) -> ViewPlan:
    return ViewPlan(p.index, p.obj, p.picks, p.kind, p.wall, p.first, None)


def plan_view(ds: RenderPackDataset, index: int) -> ViewPlan:
    """The scene description of view `index` (deterministic in the dataset's seed and `index`): the target and
    occluder candidates (the same as ds[index] draws), the point-map kind, the first attempt and its crop."""
    rng = np.random.default_rng([ds.seed, int(index)])
    obj, picks = ds.pick_objects(rng)
    kind, wall = draw_pointmap_kind(rng, ds.settings)
    first = draw_attempt(ds, int(index), obj, picks, 0)
    return ViewPlan(int(index), obj, picks, kind, wall, first, crop(ds, first))


def draw_attempt(ds: RenderPackDataset, index: int, obj: int, picks: list[int], attempt: int) -> Attempt:
    """Attempt `attempt` at view `index`, one pass of ds.__getitem__'s loop with nothing rendered: camera, pose,
    light and mode (`sample_scene`), background and crop, every try of flying occluders (or the object behind),
    the mask noise and where its holes go; a function of (seed, index, attempt), so any process draws the same."""
    s, cfg = ds.settings, ds.scene_config()
    rng = np.random.default_rng([ds.seed, int(index), 1, int(attempt)])
    others = ds.others(picks)
    scene = sample_scene(rng, ds._render_mesh(obj), ds.pack.meta["objects"][obj]["size_m"], others, cfg)
    b = int(rng.integers(0, ds.pack.num_backgrounds))
    box = draw_crop(rng, ds.background(b).shape[:2], s.size, s.size)
    tries: list[list[PoseRef]] = []
    if scene.mode == "occluded":  # every try now: the device measures them all and keeps the first accepted
        for _ in range(cfg.occluder_tries):
            tries.append([PoseRef.of(picks[i], p) for i, p in draw_occluders(rng, scene, others, cfg)])
    elif scene.mode == "occluder":
        i, p = draw_behind(rng, scene, others)
        tries.append([PoseRef.of(picks[i], p)])
    noise = draw_mask_noise(rng, s.size, s.size) if rng.uniform() < s.p_mask_noise else None
    spots = [(float(rng.uniform()), int(rng.integers(1, 4))) for _ in range(noise.holes if noise else 0)]
    return Attempt(scene.K, PoseRef.of(obj, scene.target), scene.light, scene.mode, tries, b, box, noise, spots)


def crop(ds: RenderPackDataset, attempt: Attempt) -> np.ndarray:
    """The attempt's background crop [size, size, 3] uint8."""
    return crop_background(ds.background(attempt.background), attempt.crop, ds.settings.size, ds.settings.size)


class ViewPlans:
    """A RenderPackDataset seen as index -> ViewPlan (what MicroBatches reads in the loader's workers)."""

    def __init__(self, dataset: RenderPackDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> ViewPlan:
        return plan_view(self.dataset, index)


@dataclass
class RenderedViews:
    """A micro-batch of finished views on the device. rgb [B, H, W, 3] uint8; mask [B, H, W] bool (with its noise:
    the model's input); amodal [B, H, W] bool; pointmap [B, H, W, 3] float32 (NaN where unknown); K [B, 3, 3],
    rotation [B, 3, 3], translation [B, 3], scale [B] float64 (the target's pose, rescaled on flat views)."""

    rgb: torch.Tensor
    mask: torch.Tensor
    amodal: torch.Tensor
    pointmap: torch.Tensor
    K: torch.Tensor
    rotation: torch.Tensor
    translation: torch.Tensor
    scale: torch.Tensor
    objects: list[int]
    ids: list[str]
    modes: list[str]  # "alone" | "occluded" | "occluder", as rendered
    attempts: list[int]  # which attempt of its view was kept (0 = the first)


def usable_masks(masks: torch.Tensor) -> torch.Tensor:
    """pack._usable for a batch: masks [B, H, W] bool -> [B] bool (>= 0.2 % of the image, a box >= 8 px)."""
    b, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    r, c = torch.arange(h, device=masks.device), torch.arange(w, device=masks.device)
    tall = torch.where(rows, r, -1).max(1).values - torch.where(rows, r, h).min(1).values >= 8
    wide = torch.where(cols, c, -1).max(1).values - torch.where(cols, c, w).min(1).values >= 8
    return (masks.flatten(1).sum(1) >= MIN_MASK_FRACTION * h * w) & tall & wide


class DeviceViews:
    """PlanBatch -> RenderedViews on `device` (see the module doc). The pack's meshes are uploaded on first use
    and stay on the device; the dataset (the same seed and settings as the workers') draws later attempts."""

    def __init__(self, dataset: RenderPackDataset, device: str | torch.device):
        self.ds, self.device = dataset, torch.device(device)
        self.size = dataset.settings.size
        self._meshes: dict[int, RenderMesh] = {}

    def mesh(self, obj: int) -> RenderMesh:
        if obj not in self._meshes:
            m = self.ds._render_mesh(obj)
            self._meshes[obj] = RenderMesh(
                m.vertices.to(self.device), m.faces.to(self.device), m.colors.to(self.device)
            )
        return self._meshes[obj]

    def placed(self, ref: PoseRef) -> Placed:
        return Placed(self.mesh(ref.obj), ref.rotation, ref.translation, ref.scale)

    def __call__(self, batch: PlanBatch) -> RenderedViews:
        plans = batch.plans
        attempts = [p.first for p in plans]
        rows: list[tuple[int, int]] = [(-1, -1)] * len(plans)  # view -> (round, row in it)
        rounds: list[tuple] = []
        todo, a = list(range(len(plans))), 0
        while todo:
            atts = [attempts[i] for i in todo]
            if a == 0:
                bg = batch.backgrounds.to(self.device, non_blocking=True)
            else:
                bg = torch.from_numpy(np.stack([crop(self.ds, x) for x in atts])).to(self.device)
            views, modes = self.render(atts, bg)
            noisy = mask_noise_batch(views.mask, [x.noise for x in atts], [x.spots for x in atts])
            ok = usable_masks(noisy).tolist()
            rounds.append((views, noisy, modes, a))
            for k, i in enumerate(todo):
                if ok[k]:
                    rows[i] = (len(rounds) - 1, k)
            todo, a = [i for i, good in zip(todo, ok, strict=True) if not good], a + 1
            if todo and a >= MAX_ATTEMPTS:
                p = plans[todo[0]]
                raise ValueError(f"pack object {p.obj}: no usable view in {MAX_ATTEMPTS} draws (index {p.index})")
            for i in todo:
                attempts[i] = draw_attempt(self.ds, plans[i].index, plans[i].obj, plans[i].picks, a)
        return self._finish(plans, attempts, rounds, rows)

    def render(self, atts: list[Attempt], backgrounds: torch.Tensor):
        """The attempts' views -> (ViewBatch of tensors, the mode each view was rendered in). As render_scene:
        an occluded view keeps its first try whose visibility `occlusion_accepted` passes, else goes without
        occluder. Batched in up to three raster calls: every view with its first try (most are accepted there);
        the later tries of the rejected ones as silhouettes (`target_masks`, measured against the amodal masks
        of the first call); those views again with the try they keep."""
        n = self.size
        chosen: list[list[PoseRef]] = [x.tries[0] if x.tries else [] for x in atts]
        modes = [x.mode for x in atts]
        views = render_views(self._shots(atts, chosen, backgrounds, range(len(atts))), n, n, to_numpy=False)
        occluded = [k for k, x in enumerate(atts) if x.mode == "occluded"]
        if not occluded:
            return views, modes
        visible = views.mask[occluded].flatten(1).sum(1).tolist()
        amodal = dict(zip(occluded, views.amodal[occluded].flatten(1).sum(1).tolist(), strict=True))
        rejected = [k for k, v in zip(occluded, visible, strict=True) if not occlusion_accepted(v, amodal[k], n * n)]
        if not rejected:
            return views, modes
        shots = [Shot([self.placed(atts[k].target), *map(self.placed, t)], atts[k].K) for k in rejected
                 for t in atts[k].tries[1:]]  # fmt: skip
        counts = iter(target_masks(shots, n, n).flatten(1).sum(1).tolist() if shots else [])
        for k in rejected:
            later = [(t, next(counts)) for t in atts[k].tries[1:]]
            first = next((t for t, v in later if occlusion_accepted(v, amodal[k], n * n)), None)
            chosen[k], modes[k] = (first, "occluded") if first is not None else ([], "alone")
        again = render_views(self._shots(atts, chosen, backgrounds, rejected), n, n, to_numpy=False)
        rows = torch.tensor(rejected, device=self.device)
        for name in ("rgb", "mask", "amodal", "depth", "pointmap", "coverage"):
            getattr(views, name)[rows] = getattr(again, name)
        return views, modes

    def _shots(self, atts: list[Attempt], chosen: list[list[PoseRef]], backgrounds: torch.Tensor, which) -> list:
        return [
            Shot([self.placed(atts[k].target), *map(self.placed, chosen[k])], atts[k].K, atts[k].light, backgrounds[k])
            for k in which
        ]

    def _finish(self, plans: list[ViewPlan], attempts: list[Attempt], rounds: list[tuple], rows) -> RenderedViews:
        """The kept rows of every round in view order, the point-map kinds and the targets' poses."""
        dev, n = self.device, self.size

        def take(get) -> torch.Tensor:
            if len(rounds) == 1:
                return get(rounds[0])
            parts = [get(r) for r in rounds]
            offsets = np.cumsum([0] + [len(p) for p in parts])
            return torch.cat(parts)[torch.tensor([offsets[r] + k for r, k in rows], device=dev)]

        rgb = take(lambda r: r[0].rgb)
        noisy, seen, amodal = take(lambda r: r[1]), take(lambda r: r[0].mask), take(lambda r: r[0].amodal)
        coverage, points = take(lambda r: r[0].coverage), take(lambda r: r[0].pointmap)
        modes = [rounds[r][2][k] for r, k in rows]
        K = torch.from_numpy(np.stack([x.K for x in attempts])).to(dev)  # [B, 3, 3] float64
        rotation = torch.from_numpy(np.stack([x.target.rotation for x in attempts])).to(dev)
        translation = torch.from_numpy(np.stack([x.target.translation for x in attempts])).to(dev)
        scale = torch.tensor([self.ds.pack.meta["objects"][p.obj]["size_m"] for p in plans], dtype=torch.float64,
                             device=dev)  # fmt: skip
        kinds = [p.kind for p in plans]
        pointmap = torch.where(coverage[..., None], points, float("nan"))
        wall = [i for i, k in enumerate(kinds) if k == "wall"]
        if wall:
            # the wall's depth as __getitem__'s np.full(..., float32) holds it
            depth = [float(attempts[i].target.translation[2]) * plans[i].wall for i in wall]
            depth = torch.tensor(depth, dtype=torch.float32).double().to(dev)
            pointmap[wall] = torch.where(coverage[wall, ..., None], points[wall], plane_pointmap(depth, K[wall], n, n))
        flat = [i for i, k in enumerate(kinds) if k == "flat"]
        if flat:
            from sam3d_core.inputs.camera import intrinsics_from_fov

            k_flat = np.stack([intrinsics_from_fov(n, n, flat_fov_deg(n, attempts[i].K)) for i in flat])
            pointmap[flat] = plane_pointmap(torch.ones(len(flat), dtype=torch.float64, device=dev),
                                            torch.from_numpy(k_flat).to(dev), n, n)  # fmt: skip
            unit = median_depth(points[flat][..., 2], seen[flat] & coverage[flat])
            unit = torch.where(unit.isnan(), translation[flat, 2], unit.double())  # nothing seen: the target's depth
            translation[flat] = translation[flat] / unit[:, None]
            scale[flat] = scale[flat] / unit
        ids = [f"pack:{p.obj}:{p.index}" for p in plans]
        return RenderedViews(rgb, noisy, amodal, pointmap, K, rotation, translation, scale, [p.obj for p in plans],
                             ids, modes, [rounds[r][3] for r, _ in rows])  # fmt: skip


def plane_pointmap(depth: torch.Tensor, K: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`inputs.camera.pointmap_from_depth` of constant depth images, batched: depth [n] float64 (as float32 values),
    K [n, 3, 3] float64 -> [n, H, W, 3] float32 PyTorch3D camera points (the same float64 steps, the same bits)."""
    dev = depth.device
    u = (torch.arange(width, device=dev, dtype=torch.float64)[None] + 0.5 - K[:, 0, 2:3]) / K[:, 0, 0:1]  # [n, W]
    v = (torch.arange(height, device=dev, dtype=torch.float64)[None] + 0.5 - K[:, 1, 2:3]) / K[:, 1, 1:2]  # [n, H]
    d = depth[:, None, None].expand(-1, height, width)
    pts = torch.stack([u[:, None, :] * d, v[:, :, None] * d, d], -1)
    return (pts * torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64, device=dev)).float()  # OpenCV -> PyTorch3D


def median_depth(z: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """np.median of z[i][where[i]] per row (the mean of the two middle values for an even count, in z's dtype):
    z [n, H, W] float, where [n, H, W] bool -> [n] (NaN where nothing is selected)."""
    vals = torch.where(where, z, float("inf")).flatten(1).sort(1).values
    count = where.flatten(1).sum(1)
    lo = vals.gather(1, ((count - 1).clamp(min=0) // 2)[:, None])[:, 0]
    hi = vals.gather(1, (count // 2).clamp(max=vals.shape[1] - 1)[:, None])[:, 0]
    return torch.where(count > 0, (lo + hi) / 2, float("nan"))


__all__ = [
    "DeviceViews", "PlanBatch", "RenderedViews", "ViewPlan", "ViewPlans", "collate_plans", "draw_attempt", "plan_view",
    "usable_masks",
]  # fmt: skip
