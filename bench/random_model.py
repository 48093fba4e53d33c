"""A model folder of random weights at a preset's size, in the layout `sam3d weights import` writes, so that what
needs an imported model can be measured where the official weights cannot be downloaded (cold start: loading
and hashing ~5 GB of safetensors is part of it; bench/coldstart.py --model FOLDER).

    PYTHONPATH=$PWD python bench/random_model.py --preset official --device cuda --out /tmp/official-random
    PYTHONPATH=$PWD python bench/coldstart.py --model /tmp/official-random --device cuda --runs empty,warm

The weights are those of `Stage1Pipeline.from_random` / `Stage2Pipeline.from_random` (seeds 0 and 1, as
bench/e2e.py), float32 as the official checkpoints; the folder is written by the training output's writer
(`training/output.write_weights`: one file per component, the config JSON, a manifest with sha256), so it loads
with the hash checks of an imported model. The work the networks do does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sam3d_core.pipeline.stage1 import Stage1Pipeline  # noqa: E402
from sam3d_core.pipeline.stage2 import Stage2Pipeline  # noqa: E402
from sam3d_core.registry import stage1_preset, stage2_preset  # noqa: E402
from sam3d_core.training.output import write_weights  # noqa: E402
from sam3d_core.weights.store import CheckpointError  # noqa: E402

CARD = """# {name}: random weights at the `{preset}` size

Made by bench/random_model.py for measurements that need an imported model (bench/coldstart.py). Its outputs
are meaningless shapes; never use it for anything else.
"""


def write_random_model(out: Path, preset: str, device: str = "cpu") -> Path:
    """Write the folder `out` (it must not exist) and return it."""
    out = Path(out).resolve()
    if out.exists():  # before minutes of work (the writer would refuse it at the end)
        raise CheckpointError(f"{out} already exists; choose a new --out")
    training = {"random_weights": {"stage1_seed": 0, "stage2_seed": 1, "preset": preset}}
    card = CARD.format(name=out.name, preset=preset)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".random-model-") as tmp:
        s2 = Stage2Pipeline.from_random(stage2_preset(preset), seed=1, device=device)
        state2 = {k: v.cpu() for k, v in s2.model.state_dict().items()}
        cfg2 = s2.cfg
        del s2
        stage2 = write_weights(Path(tmp), "stage2", 2, cfg2, state2, {}, card, training)
        del state2
        s1 = Stage1Pipeline.from_random(stage1_preset(preset), seed=0, device=device)
        state1 = {k: v.cpu() for k, v in s1.model.state_dict().items()}
        base = {"name": f"random {preset}", "folder": str(stage2)}
        return write_weights(out.parent, out.name, 1, s1.cfg, state1, base, card, training)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="official")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to initialise")
    ap.add_argument("--out", type=Path, required=True, help="the new model folder (must not exist)")
    args = ap.parse_args()
    t = time.perf_counter()
    folder = write_random_model(args.out, args.preset, args.device)
    size = sum(p.stat().st_size for p in folder.iterdir()) / 1e9
    print(f"{folder}: {size:.2f} GB in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
