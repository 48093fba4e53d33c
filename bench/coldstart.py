"""Cold start: worker start to the first finished object, with an empty and with a warm kernel cache (issue 15).

    python bench/coldstart.py [--model official] [--device cuda] [--runs empty,warm] [--cache-dir DIR]
                              [--steps N] [--texture-size 1024] [--faces 20000] [--out result.json]

Each run starts a fresh worker process (`python -m sam3d_core.serve`, what the Blender add-on and the app start)
with TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR (compiled GPU kernels on disk) in --cache-dir: "empty"
deletes them first, "warm" keeps what the previous run left there. At once, as an artist who opens a photo and
clicks immediately, it sends: open_photo (the photo is checked while the model loads), hello (answered when the
model is loaded) and a reconstruct job of the bundled example (photo + mask); then a second object, for the warm
time beside the cold one. Times from the worker's start, in seconds:

  photo_s         open_photo answered (the user can click while the weights load)
  ready_s         hello answered: model loaded (and the mesh worker processes started)
  first_object_s  the first object's result (files written)
  second_object_s the next object, warm (its own duration)
plus the worker's per-step timings of both objects and the first object's cost above the second one's
(compilation, CUDA graph capture, cuDNN autotuning, lazy initialisation).

--model official needs the imported weights (`sam3d weights import`); --model tiny runs anywhere (CPU check).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sam3d_core.cli.reconstruct import EXAMPLE_MASK, EXAMPLE_PHOTO  # noqa: E402
from sam3d_core.serve.client import WorkerClient  # noqa: E402


def one_run(args, label: str, cache: Path) -> dict:
    if label == "empty":
        shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    worker_args = ["-m", "sam3d_core.serve"]
    for flag, value in (("--model", args.model), ("--device", args.device), ("--max-voxels", args.max_voxels)):
        if value is not None:
            worker_args += [flag, str(value)]
    logs: list[str] = []
    opts = {"texture_size": args.texture_size, "faces": args.faces}
    if args.steps is not None:
        opts["steps"] = args.steps
    out = Path(tempfile.mkdtemp(prefix="sam3d-coldstart-"))
    t0 = time.perf_counter()
    client = WorkerClient(sys.executable, args=worker_args, env=env, cwd=str(REPO), log=logs.append)
    try:
        photo_job = client.open_photo(str(EXAMPLE_PHOTO))
        hello_job = client.submit({"type": "hello", "client": "bench/coldstart.py"})
        first = client.reconstruct(str(EXAMPLE_PHOTO), str(EXAMPLE_MASK), str(out / "first"), seed=1, **opts)
        photo_job.result(timeout=args.timeout)
        photo_s = time.perf_counter() - t0
        hello = hello_job.result(timeout=args.timeout)
        ready_s = time.perf_counter() - t0
        r1 = first.result(timeout=args.timeout)
        first_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        r2 = client.reconstruct(str(EXAMPLE_PHOTO), str(EXAMPLE_MASK), str(out / "second"), seed=2, **opts).result(
            timeout=args.timeout
        )
        second_s = time.perf_counter() - t1
    finally:
        client.close()
        shutil.rmtree(out, ignore_errors=True)
    sizes = {d: sum(f.stat().st_size for f in (cache / d).rglob("*") if f.is_file()) for d in ("triton", "inductor")}
    return {
        "cache": label,
        "model": hello.get("model"),
        "device": hello.get("device"),
        "photo_s": round(photo_s, 2),
        "ready_s": round(ready_s, 2),
        "first_object_s": round(first_s, 2),
        "first_object_job_s": round(first_s - ready_s, 2),
        "second_object_s": round(second_s, 2),
        "first_object_timings": r1.get("timings"),
        "second_object_timings": r2.get("timings"),
        "kernel_cache_mb_after": {k: round(v / 1e6, 1) for k, v in sizes.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="official")
    ap.add_argument("--device", default=None)
    ap.add_argument("--runs", default="empty,warm", help="comma-separated: empty (cache cleared first), warm")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "sam3d-coldstart-cache")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's 25 + 25)")
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--faces", type=int, default=20000)
    ap.add_argument("--max-voxels", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    runs = []
    for label in args.runs.split(","):
        run = one_run(args, label.strip(), args.cache_dir)
        runs.append(run)
        print(json.dumps(run), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "runs": runs}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
