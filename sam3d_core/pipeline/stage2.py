"""Stage 2: photo + mask + stage-1 voxels -> structured latent (SLAT) -> 3D Gaussians and a textured mesh.

`Stage2Pipeline` (over `models.stages.Stage2Model`) loads once
and runs any number of objects as a numbered recipe, with the expensive conditioning (`encode`) split
from the per-call sampling and decoding. Everything stage 2 returns lies in the object's local frame
([-0.5, 0.5]^3, z up), as in the official code; placing it in the scene with the stage-1 pose is a
separate step (not done here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sam3d_core.config import Stage2Config
from sam3d_core.geometry.flexicubes import MeshResult, extract_mesh
from sam3d_core.geometry.gaussians import Gaussians
from sam3d_core.models.stages import Stage2Model, init_random_weights
from sam3d_core.pipeline.preprocess import preprocess_stage2
from sam3d_core.pipeline.sampling import denormalize_slat, sample_stage2, stage2_noise

Progress = Callable[[int, int], None]
DECODERS = ("gaussian", "mesh")


@dataclass
class Stage2Output:
    """One object's stage-2 result, in the object's local frame ([-0.5, 0.5]^3, z up; not yet posed).

    `coords` are the stage-1 voxels on the 64^3 grid; `slat_feats` the de-normalised structured latent
    (decoder space). `gaussians` / `mesh` are None when that decoder was not asked for.
    """

    coords: torch.Tensor  # [N, 4] int32 (batch, x, y, z)
    slat_feats: torch.Tensor  # [N, 8] float32
    gaussians: Gaussians | None  # N * num_gaussians points
    mesh: MeshResult | None  # vertices [V, 3] in [-0.5, 0.5], faces [F, 3] int64, vertex_attrs [V, 6]
    settings: dict = field(default_factory=dict)  # seed, steps, cfg, weights id: provenance


def check_coords(coords: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """Validate stage-1 voxels: [N, 4] integers (batch, x, y, z) of ONE object -> int32 [N, 4] (CPU)."""
    if isinstance(coords, np.ndarray):
        coords = torch.from_numpy(np.array(coords, copy=True))
    if not isinstance(coords, torch.Tensor):
        raise ValueError(f"coords: got {type(coords).__name__}, expected an int tensor [N, 4] (Stage1Output.coords)")
    if coords.ndim != 2 or coords.shape[1] != 4 or coords.is_floating_point() or coords.dtype == torch.bool:
        raise ValueError(
            f"coords: got {coords.dtype} {tuple(coords.shape)}, expected integer [N, 4] (batch, x, y, z); "
            f"pass Stage1Output.coords"
        )
    if coords.shape[0] == 0:
        raise ValueError("coords: got 0 voxels, expected at least 1; stage 1 found no occupied voxel for this object")
    coords = coords.detach().cpu()
    xyz = coords[:, 1:]
    if int(xyz.min()) < 0 or int(xyz.max()) >= resolution:
        raise ValueError(
            f"coords: x, y, z span {int(xyz.min())}..{int(xyz.max())}, expected 0..{resolution - 1} "
            f"(the {resolution}^3 stage-1 grid)"
        )
    if bool((coords[:, 0] != coords[0, 0]).any()):
        raise ValueError("coords: the batch column holds several objects; run stage 2 once per object")
    if len(torch.unique(coords, dim=0)) != len(coords):
        raise ValueError("coords: some voxels appear twice; pass unique voxels (torch.unique(coords, dim=0))")
    coords = coords.to(torch.int32).clone()
    coords[:, 0] = 0  # one object: batch index 0, as the condition tokens
    return coords


class Stage2Pipeline:
    """Loads stage 2 once; `__call__` turns one object's stage-1 voxels into Gaussians and a mesh."""

    def __init__(
        self,
        model: Stage2Model,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        weights_id: str = "unknown",
    ):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype: got {dtype}, expected torch.float32, torch.bfloat16 or torch.float16")
        # Half precision: every weight in `dtype`; the decoders' outputs and FlexiCubes stay float32.
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.cfg = model.cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.weights_id = weights_id

    @classmethod
    def from_pretrained(
        cls, name_or_dir: str, device: str | None = None, check_hashes: bool = True, dtype: torch.dtype | None = None
    ) -> Stage2Pipeline:
        """Load the stage-2 weights of an imported model (see `sam3d weights import`), hashes checked.
        dtype: default bfloat16 on CUDA, float32 on the CPU."""
        from sam3d_core.weights.hub import load_stage2_state

        cfg, state, digest = load_stage2_state(name_or_dir, check_hashes=check_hashes)
        with torch.device("meta"):
            model = Stage2Model(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
        return cls(model, device, dtype, weights_id=f"sha256:{digest}")

    @classmethod
    def from_random(
        cls, cfg: Stage2Config, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Stage2Pipeline:
        """A random-weight pipeline (tests, and the demo when no weights are installed)."""
        with torch.device(device):
            model = init_random_weights(Stage2Model(cfg), seed)
        return cls(model, device, dtype, weights_id=f"random:{seed}")

    def prepare(self, image: np.ndarray, mask: np.ndarray) -> dict:
        """Check and preprocess one object's inputs (HWC uint8 photo, HW mask): crop, pad, resize."""
        inputs = preprocess_stage2(image, mask, self.cfg.preprocess)
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.no_grad()
    def encode(self, inputs: dict, shared: dict | None = None) -> torch.Tensor:
        """Condition tokens [1, N, C] of preprocessed inputs (the expensive, reusable part).

        shared: a dict kept per photo (e.g. `PhotoContext.shared`); the full-image RGB tokens, which do not
        depend on the object's mask, are computed for the first object and reused for the others."""
        return self.model.condition_embedder.encode(inputs, self.dtype, shared)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        coords: torch.Tensor,
        *,
        seed: int | None = None,
        steps: int | None = None,
        cfg_strength: float | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """Steps 3-4 of `__call__`: noise, flow sampling, de-normalisation -> SLAT feats [N, 8] (decoder space)."""
        return self.sample_batch(
            cond, [coords], seeds=[seed], steps=steps, cfg_strength=cfg_strength, progress=progress
        )[0]

    @torch.no_grad()
    def sample_batch(
        self,
        cond: torch.Tensor | Sequence[torch.Tensor],
        coords: Sequence[torch.Tensor],
        *,
        seeds: Sequence[int | None],
        steps: int | None = None,
        cfg_strength: float | None = None,
        progress: Progress | None = None,
    ) -> list[torch.Tensor]:
        """Steps 3-4 for several objects in one varlen batch: SLAT feats [N_i, 8] (decoder space) per object.

        cond: [B, Nc, C] or a list of [1, Nc, C]; coords: one [N_i, 4] per object (batch column ignored);
        seeds: one per object. Object i's noise is one randn of [1, N_i, 8] from its own generator, as alone;
        the voxels of all objects go through the flow model as one sparse batch (attention within each
        object), with one network time per step, so in float32 on a CPU each object's feats equal its
        one-at-a-time feats bit for bit (objects of at least a dozen voxels; tests/test_batch.py).
        """
        cond = cond if isinstance(cond, torch.Tensor) else torch.cat(list(cond))
        b = len(coords)
        if b < 1 or len(seeds) != b or cond.shape[0] != b:
            raise ValueError(
                f"sample_batch: got {len(coords)} coordinate sets, {len(seeds)} seeds and {cond.shape[0]} condition "
                "rows; pass one of each per object"
            )
        counts = [int(c.shape[0]) for c in coords]
        batched = torch.cat([c.to(device=self.device, dtype=torch.int32) for c in coords])  # [sum N_i, 4]
        batched[:, 0] = torch.repeat_interleave(
            torch.arange(b, dtype=torch.int32, device=self.device), torch.tensor(counts, device=self.device)
        )
        # 3. Noise (one randn of [1, N_i, 8] per object, as the official torch.manual_seed + randn) and sampling.
        noise = []
        for seed, n in zip(seeds, counts, strict=True):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(seed) if seed is not None else int(torch.seed() % 2**31))
            noise.append(stage2_noise(n, self.cfg.flow.latent_channels, gen, self.device))
        feats = sample_stage2(
            self.model.generator,
            cond,
            batched,
            torch.cat(noise),
            self.cfg.sampler,
            steps=steps,
            cfg_strength=cfg_strength,
            progress=progress,
        )
        # 4. De-normalise with the SLAT statistics.
        return list(denormalize_slat(feats.float(), self.cfg).split(counts))

    @torch.no_grad()
    def decode_mesh(self, slat_feats: torch.Tensor, coords: torch.Tensor) -> MeshResult:
        """Step 6: the mesh decoder (two 2x subdivisions to 256^3) and FlexiCubes."""
        fine_coords, fine_feats = self.model.decoder_mesh(slat_feats.to(self.dtype), coords)
        return extract_mesh(fine_coords, fine_feats.float(), resolution=4 * self.cfg.mesh.resolution)

    @torch.no_grad()
    def decode(
        self, slat: torch.Tensor, coords: torch.Tensor, decode: Sequence[str] = DECODERS
    ) -> tuple[Gaussians | None, MeshResult | None]:
        """Steps 5-6 for one object: SLAT feats [N, 8] on coords [N, 4] (batch index 0) -> (Gaussians, mesh)."""
        # 5. Gaussians: num_gaussians per voxel around the voxel centres.
        gaussians = self.model.decoder_gs(slat.to(self.dtype), coords) if "gaussian" in decode else None
        # 6. Mesh: fine SDF features on the 256^3 grid -> FlexiCubes.
        mesh = self.decode_mesh(slat, coords) if "mesh" in decode else None
        return gaussians, mesh

    def _settings(self, seed: int, steps: int | None, cfg_strength: float | None) -> dict:
        sampler = self.cfg.sampler
        return {
            "seed": seed,
            "steps": steps or sampler.steps,
            "cfg_strength": sampler.cfg_strength if cfg_strength is None else cfg_strength,
            "weights": self.weights_id,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @torch.no_grad()
    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        coords: np.ndarray | torch.Tensor,
        *,
        seed: int | None = None,
        steps: int | None = None,
        cfg_strength: float | None = None,
        decode: Sequence[str] = DECODERS,
        progress: Progress | None = None,
        shared: dict | None = None,
    ) -> Stage2Output:
        """One object: photo (uint8 [H, W, 3]), mask ([H, W], nonzero = object) and its stage-1 voxels
        (`Stage1Output.coords`, [N, 4] int on the 64^3 grid) -> Stage2Output in the object's local frame."""
        return self.batch(
            image,
            [mask],
            [coords],
            seeds=[seed],
            steps=steps,
            cfg_strength=cfg_strength,
            decode=decode,
            progress=progress,
            shared=shared,
        )[0]

    @torch.no_grad()
    def batch(
        self,
        image: np.ndarray,
        masks: Sequence[np.ndarray],
        coords: Sequence[np.ndarray | torch.Tensor],
        *,
        seeds: Sequence[int | None],
        steps: int | None = None,
        cfg_strength: float | None = None,
        decode: Sequence[str] = DECODERS,
        progress: Progress | None = None,
        shared: dict | None = None,
    ) -> list[Stage2Output]:
        """Several objects of one photo: one mask, one stage-1 voxel set and one seed each -> one Stage2Output
        each, sampled together (`sample_batch`) and decoded one after the other (the decoders' 256^3 stage is
        the memory peak). Equal to one `__call__` per object (bit for bit in float32 on a CPU)."""
        decode = self.check_decode(decode)
        # 1. Check and preprocess (the same crop, pad and resize as stage 1, without a point map).
        prepared = [self.prepare_object(image, m, c) for m, c in zip(masks, coords, strict=True)]
        seeds = [int(s) if s is not None else int(torch.seed() % 2**31) for s in seeds]  # recorded in the settings
        # 2. Condition tokens: DINO on the cropped and full views of the image and of the mask.
        cond = torch.cat([self.encode(inputs, shared) for inputs, _ in prepared])
        # 3.-4. Noise, flow sampling (fast path: the condition's keys and values computed once), de-normalisation.
        own = [c for _, c in prepared]
        slats = self.sample_batch(cond, own, seeds=seeds, steps=steps, cfg_strength=cfg_strength, progress=progress)
        outs = []
        for seed, c, slat in zip(seeds, own, slats, strict=True):
            # 5.-6. Gaussians and the mesh.
            gaussians, mesh = self.decode(slat, c, decode)
            outs.append(Stage2Output(c, slat, gaussians, mesh, self._settings(seed, steps, cfg_strength)))
        return outs

    @staticmethod
    def check_decode(decode: Sequence[str] | str) -> tuple[str, ...]:
        decode = (decode,) if isinstance(decode, str) else tuple(decode)
        unknown = [d for d in decode if d not in DECODERS]
        if unknown:
            raise ValueError(f"decode: got {unknown}, expected a subset of {DECODERS}")
        return decode

    def prepare_object(self, image: np.ndarray, mask: np.ndarray, coords: np.ndarray | torch.Tensor) -> tuple:
        """Check one object's stage-1 voxels and preprocess its views -> (inputs, coords [N, 4] int32 on the device)."""
        coords = check_coords(coords, self.cfg.flow.resolution).to(self.device)
        return self.prepare(image, mask), coords
