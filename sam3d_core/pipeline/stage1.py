"""Stage 1: photo + mask (+ point map) -> coarse shape (64^3 voxels) and layout (pose in the camera frame).

`Stage1Pipeline` (over `models.stages.Stage1Model`) loads
once and runs any number of objects as a numbered recipe. Expensive conditioning (`encode`) is split
from the cheap-per-call sampling so callers can reuse condition tokens (re-rolls, best-of-N).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sam3d_core.config import Stage1Config
from sam3d_core.geometry.layout import Pose, decode_pose
from sam3d_core.models.ss_vae import (
    cap_voxels,
    occupied_voxels,
    prune_interior,
    shape_latent_to_grid,
)
from sam3d_core.models.stages import Stage1Model, cast_for_inference, init_random_weights
from sam3d_core.pipeline.preprocess import preprocess_stage1
from sam3d_core.pipeline.sampling import FlowGraphs, sample_stage1, stage1_noise

Progress = Callable[[int, int], None]
GRAPH_SETS = 2  # captured CUDA-graph sets kept (each holds its batch's condition cache: ~1.5 GB per object)


def _one_object(coords: torch.Tensor, index: int) -> torch.Tensor:
    """The rows of object `index` of batched coords [M, 4], with batch index 0 (as a one-object run has)."""
    own = coords[coords[:, 0] == index].clone()
    own[:, 0] = 0
    return own


@dataclass
class Stage1Output:
    """One object's stage-1 result. Coordinates are on the 64^3 grid of the object's local frame."""

    latents: dict[str, torch.Tensor]  # the sample at t = 1: shape [1, 4096, 8] and the 4 pose latents
    coords: torch.Tensor  # [N, 4] int32 (batch, x, y, z): surface voxels, capped at max_voxels
    coords_original: torch.Tensor  # [M, 4] int32: every voxel with a positive logit
    downsample_factor: int
    pose: Pose  # object -> PyTorch3D camera frame
    pointmap_scale: torch.Tensor  # [1, 3]
    pointmap_shift: torch.Tensor  # [1, 3]
    settings: dict = field(default_factory=dict)  # seed, steps, cfg, mode, weights id: provenance
    # [64, 64, 64] float16 on the CPU: the decoder's occupancy logits (axes x, y, z of coords), the surface of
    # the projected-texture mesh when there is no stage 2 (export/project.py); None where not kept
    logits: torch.Tensor | None = None


class Stage1Pipeline:
    """Loads stage 1 once; `__call__` reconstructs one object's coarse shape and layout."""

    def __init__(
        self,
        model: Stage1Model,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        weights_id: str = "unknown",
        compile: bool = False,
        cuda_graphs: bool | None = None,
    ):
        self.model = cast_for_inference(model.to(device=device), dtype).eval().requires_grad_(False)
        # CUDA graphs remove the launch overhead that dominates batch-1 sampling (same kernels, same result).
        self.cuda_graphs = torch.device(device).type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[tuple[int, int], FlowGraphs] = {}  # (batch, tokens) -> graphs, the last GRAPH_SETS used
        if compile:  # fuses the norm / modulation / activation glue of the MoT blocks (exact, slower start)
            gen = self.model.generator
            gen.forward_cfg = torch.compile(gen.forward_cfg, fullgraph=True, dynamic=False)
        self.cfg = model.cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.weights_id = weights_id

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        check_hashes: bool = True,
        compile: bool = False,
    ) -> Stage1Pipeline:
        """Load an imported model (see `sam3d weights import`) with its hashes checked."""
        from sam3d_core.weights.hub import load_stage1_state

        cfg, state, digest = load_stage1_state(name_or_dir, check_hashes=check_hashes)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
        with torch.device("meta"):
            model = Stage1Model(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        return cls(model, device, dtype, weights_id=f"sha256:{digest}", compile=compile)

    @classmethod
    def best_available(
        cls, model: str | None = None, device: str | None = None, compile: bool = False
    ) -> tuple[Stage1Pipeline, str]:
        """The best model there is, and a sentence saying which: `model` if named ('tiny' for the random
        test model), else the imported 'official' weights when a GPU is present, else the tiny model."""
        from sam3d_core.registry import stage1_preset
        from sam3d_core.weights import hub

        names = [m["name"] for m in hub.list_models()]
        if model is None and "official" in names and torch.cuda.is_available():
            model = "official"
        if model is None and hub.bundled_default_dir() is not None:
            pipe = cls.from_pretrained(hub.DEFAULT_MODEL, device=device, compile=compile)
            return pipe, "the bundled default model (ours, small, trained on furniture)"
        if model and model != "tiny":
            return cls.from_pretrained(model, device=device, compile=compile), f"imported model {model!r}"
        why = "no imported weights" if not names else "no GPU for the official model (use --model official)"
        pipe = cls.from_random(stage1_preset("tiny"), seed=0, device=device or "cpu")
        return pipe, f"tiny random-weight model ({why}; output shapes are meaningless)"

    @classmethod
    def from_random(
        cls,
        cfg: Stage1Config,
        seed: int = 0,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
    ) -> Stage1Pipeline:
        """A random-weight pipeline (tests, and the demo when no weights are installed)."""
        with torch.device(device):
            model = init_random_weights(Stage1Model(cfg), seed)
        return cls(model, device, dtype, weights_id=f"random:{seed}", compile=compile)

    def prepare(self, image: np.ndarray, mask: np.ndarray, pointmap: np.ndarray | torch.Tensor) -> dict:
        """Check and preprocess one object's inputs (HWC uint8 photo, HW mask, HWC point map)."""
        inputs = preprocess_stage1(image, mask, pointmap, self.cfg.preprocess)
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.no_grad()
    def encode(self, inputs: dict, shared: dict | None = None) -> torch.Tensor:
        """Condition tokens [1, N, C] of preprocessed inputs (the expensive, reusable part).

        shared: a dict kept per photo (e.g. `PhotoContext.shared`); the full-image RGB tokens, which do not
        depend on the object's mask, are computed for the first object and reused for the others."""
        return self.model.condition_embedder.encode(inputs, self.dtype, shared)

    def _flow_graphs(self, cond: torch.Tensor) -> FlowGraphs | None:
        if not self.cuda_graphs:
            return None
        key = (cond.shape[0], cond.shape[1])
        graphs = self._graphs.pop(key, None) or FlowGraphs(self.model.generator, *key, device=self.device)
        self._graphs[key] = graphs  # most recent last: one object and a batch of a photo's objects both stay
        while len(self._graphs) > GRAPH_SETS:
            del self._graphs[next(iter(self._graphs))]
        return graphs

    @torch.no_grad()
    def sample(
        self,
        inputs: dict,
        cond: torch.Tensor,
        *,
        seed: int | None = None,
        steps: int | None = None,
        cfg_strength: float | None = None,
        shortcut: bool = False,
        progress: Progress | None = None,
    ) -> Stage1Output:
        """Steps 3-6 of `__call__`: noise, flow sampling, occupancy decoding, pose decoding."""
        return self.sample_batch(
            [inputs], cond, seeds=[seed], steps=steps, cfg_strength=cfg_strength, shortcut=shortcut, progress=progress
        )[0]

    @torch.no_grad()
    def sample_batch(
        self,
        inputs: Sequence[dict],
        cond: torch.Tensor | Sequence[torch.Tensor],
        *,
        seeds: Sequence[int | None],
        steps: int | None = None,
        cfg_strength: float | None = None,
        shortcut: bool = False,
        progress: Progress | None = None,
    ) -> list[Stage1Output]:
        """Steps 3-6 for several objects at once (one photo's): one batched sampling run, one Stage1Output each.

        inputs: one `prepare` dict per object; cond: their condition tokens, [B, N, C] or a list of [1, N, C];
        seeds: one per object (None: a random one). Object i's noise comes from its own generator seeded with
        seeds[i], as when it runs alone, and its voxel cap draws from that generator too; the samplers share
        one network time per step (see SSFlowModel.forward_cfg), so in float32 on a CPU each object's result
        equals its one-at-a-time result bit for bit (tests/test_batch.py).
        """
        cfg = self.cfg
        b = len(inputs)
        cond = cond if isinstance(cond, torch.Tensor) else torch.cat(list(cond))
        if b < 1 or len(seeds) != b or cond.shape[0] != b:
            raise ValueError(
                f"sample_batch: got {b} inputs, {len(seeds)} seeds and {cond.shape[0]} condition rows; "
                "pass one of each per object"
            )
        # 3. Noise: per object, one draw per latent in sorted-name order from its own generator (official order).
        gens, noises = [], []
        for seed in seeds:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(seed) if seed is not None else int(torch.seed() % 2**31))
            gens.append(gen)
            noises.append(stage1_noise(1, cfg.flow, gen, self.device))
        noise = {k: torch.cat([n[k] for n in noises]) for k in noises[0]}
        # 4. Flow sampling (25-step CFG 7 by default; the shortcut mode is few-step without CFG), all objects at once.
        latents = sample_stage1(
            self.model.generator,
            cond,
            noise,
            cfg.sampler,
            shortcut=shortcut,
            steps=steps,
            cfg_strength=cfg_strength,
            progress=progress,
            graphs=self._flow_graphs(cond),
        )
        # 5. Occupancy: 16^3 x 8 latent -> 64^3 logits -> surface voxels (interior pruned per object).
        grid = shape_latent_to_grid(latents["shape"].to(self.dtype))  # [B, 8, 16, 16, 16]
        logits = self.model.decoder(grid)  # [B, 1, 64, 64, 64]
        coords_all = occupied_voxels(logits)  # [M, 4], grouped by object
        pruned_all = prune_interior(coords_all)
        settings = {
            "steps": steps or (cfg.sampler.shortcut_steps if shortcut else cfg.sampler.steps),
            "cfg_strength": 0.0 if shortcut else (cfg.sampler.cfg_strength if cfg_strength is None else cfg_strength),
            "mode": "shortcut" if shortcut else "flow",
            "weights": self.weights_id,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        outs = []
        for i in range(b):
            coords_original = _one_object(coords_all, i)
            # ... capped at max_voxels, the random subset drawn from the object's own generator.
            coords, factor = cap_voxels(_one_object(pruned_all, i), cfg.max_voxels, generator=gens[i])
            # 6. Layout: pose latents -> rotation, translation, scale in the PyTorch3D camera frame.
            own = {k: v[i : i + 1] for k, v in latents.items()}
            scale, shift = inputs[i]["pointmap_scale"], inputs[i]["pointmap_shift"]
            pose = decode_pose({k: v.float() for k, v in own.items()}, scale.float(), shift.float(), factor)
            own_logits = logits[i, 0].clamp(-6e4, 6e4).to("cpu", torch.float16)  # [64, 64, 64]: 0.5 MB
            outs.append(
                Stage1Output(
                    own, coords, coords_original, factor, pose, scale, shift, {"seed": seeds[i], **settings}, own_logits
                )
            )
        return outs

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        pointmap: np.ndarray | torch.Tensor,
        *,
        seed: int | None = None,
        steps: int | None = None,
        cfg_strength: float | None = None,
        shortcut: bool = False,
        progress: Progress | None = None,
    ) -> Stage1Output:
        # 1. Check and preprocess (crop around the mask, pad, resize, point-map normalisation).
        inputs = self.prepare(image, mask, pointmap)
        # 2. Condition tokens from the cropped and full views.
        cond = self.encode(inputs)
        # 3.-6. Sample, decode occupancy and pose.
        return self.sample(
            inputs, cond, seed=seed, steps=steps, cfg_strength=cfg_strength, shortcut=shortcut, progress=progress
        )
