"""The `sam3d serve` worker: holds the model, answers protocol requests on stdin/stdout.

Threads: a reader thread parses requests from stdin and answers the cheap ones (hello, status,
cancel, shutdown) at once; one job thread runs reconstruct jobs one at a time, in arrival order (the
GPU is used by one job at a time); the main thread waits for shutdown (or stdin EOF) and exits.

Only protocol lines ever reach stdout: at start the real stdout is kept for the protocol and file
descriptor 1 is pointed at stderr, so stray prints (ours, a library's, C code's) land in the log.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sam3d_core.serve import protocol as P

log = logging.getLogger("sam3d.serve")

SCENE_JSON = "scene.json"
GLB_NAME = "object_0_voxels.glb"


class Cancelled(Exception):
    """Raised inside a job (from the progress callback) when its cancel flag is set."""


class BadInput(Exception):
    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = details


def protect_stdout() -> BinaryIO:
    """Keep the real stdout for protocol lines only; send everything else written to fd 1 to stderr.

    Returns a buffered binary file on a duplicate of the original stdout descriptor (flush after writing).
    """
    sys.stdout.flush()
    proto_fd = os.dup(1)
    os.dup2(2, 1)  # C-level and subprocess writes to fd 1 now go to stderr
    sys.stdout = sys.stderr  # Python-level prints too
    return os.fdopen(proto_fd, "wb")


@dataclass
class Job:
    id: str
    request: dict
    cancel: threading.Event = field(default_factory=threading.Event)
    stage: str = "queued"
    step: int = 0
    total: int = 0


@dataclass
class LoadedModel:
    pipe: object | None  # Stage1Pipeline, or None when loading failed
    description: str  # human text: which model, and why
    error: P.ProtocolError | None = None


def load_model(model: str | None, device: str | None) -> LoadedModel:
    """The best model available, as `sam3d stage1` picks it; a failure becomes a structured error."""
    from sam3d_core.convert import CheckpointError
    from sam3d_core.stage1 import Stage1Pipeline

    try:
        pipe, which = Stage1Pipeline.best_available(model, device)
    except (CheckpointError, FileNotFoundError) as e:
        err = P.ProtocolError("missing_weights", f"could not load model {model!r}: {e}. Import the official "
                              "weights with `sam3d weights import FOLDER`, or start the worker with --model tiny",
                              {"model": model})
        return LoadedModel(None, f"no model ({e})", err)
    except Exception as e:  # a bad --device, a broken install: report it to every request
        log.exception("loading the model failed")
        if _is_oom(e):
            err = P.ProtocolError("out_of_memory", f"the GPU ran out of memory loading model {model or 'default'!r}: "
                                  "close other programs using the GPU and restart the worker, or start it with "
                                  "--device cpu (slow)", {"model": model, "device": device})
            return LoadedModel(None, f"no model ({e})", err)
        err = P.ProtocolError("internal", f"could not load model {model or 'default'!r} on device "
                              f"{device or 'default'!r}: {type(e).__name__}: {e}. Check the worker log and the "
                              "--model / --device options, then restart the worker", {"model": model,
                                                                                      "device": device})
        return LoadedModel(None, f"no model ({e})", err)
    return LoadedModel(pipe, which)


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _load_image(path: Path, what: str, mode: str):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise BadInput(f"{what} file {str(path)!r} does not exist; check the path (use an absolute path: the "
                       f"worker's working folder is {os.getcwd()!r})", field=what, path=str(path))
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadInput(f"{what} file {str(path)!r} is not a readable image ({e}); save it as PNG or JPEG",
                       field=what, path=str(path)) from None


def load_inputs(photo: str, mask: str):
    """Photo (RGB uint8) and mask (bool, > 127 of its grey value), checked like the protocol promises."""
    image = _load_image(Path(photo), "photo", "RGB")
    m = _load_image(Path(mask), "mask", "L") > 127
    if m.shape != image.shape[:2]:
        raise BadInput(f"mask is {m.shape[1]}x{m.shape[0]} pixels but the photo is {image.shape[1]}x"
                       f"{image.shape[0]}; the mask must have the photo's size (resize it, nearest neighbour)",
                       field="mask", mask_size=[m.shape[1], m.shape[0]],
                       photo_size=[image.shape[1], image.shape[0]])
    if not m.any():
        raise BadInput(f"mask {mask!r} is empty (no pixel brighter than 127); paint the object white on black",
                       field="mask", path=mask)
    return image, m


class Worker:
    def __init__(self, model: LoadedModel, out: BinaryIO):
        self.model = model
        self._out = out
        self._write_lock = threading.Lock()
        self._cv = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._ids: set[str] = set()  # ids of queued or running jobs
        self._stop = threading.Event()
        self._shutdown_id: str | None = None
        self.jobs_done = 0

    # -- output --------------------------------------------------------------------------------
    def send(self, msg: dict) -> None:
        data = P.encode(msg)
        with self._write_lock:
            try:
                self._out.write(data)
                self._out.flush()
            except (BrokenPipeError, ValueError, OSError):  # the client is gone; stdin EOF will follow
                pass

    # -- reader thread -------------------------------------------------------------------------
    def read_loop(self, stdin: BinaryIO) -> None:
        try:
            for line in stdin:
                if not line.strip():
                    continue
                self.handle_line(line)
                if self._stop.is_set():
                    return
        finally:
            if not self._stop.is_set():
                log.info("stdin closed: stopping")
                self._begin_stop(None)

    def handle_line(self, line: bytes) -> None:
        try:
            req = P.decode_request(line)
        except P.ProtocolError as e:
            log.warning("rejected request: %s", e.message)
            self.send(e.to_message())
            return
        handler = getattr(self, f"_on_{req['type']}")
        try:
            handler(req)
        except P.ProtocolError as e:
            self.send(e.to_message(req["id"]))
        except Exception as e:  # a bug in a handler must not stop the reader thread
            log.exception("request %s failed", req["id"])
            self.send(P.error(req["id"], "internal", f"unexpected error handling {req['type']}: "
                              f"{type(e).__name__}: {e}. The worker is still running; please report this "
                              "with the worker log", {"exception": type(e).__name__}))

    def _model_info(self) -> dict:
        pipe = self.model.pipe
        return {
            "model": self.model.description,
            "weights": getattr(pipe, "weights_id", None),
            "device": str(pipe.device) if pipe is not None else None,
            "dtype": str(pipe.dtype).removeprefix("torch.") if pipe is not None else None,
            "ready": pipe is not None,
            "model_error": None if self.model.error is None else {
                "code": self.model.error.code, "message": self.model.error.message},
        }

    def _on_hello(self, req: dict) -> None:
        from sam3d_core import __version__

        self.send(P.response("hello", req["id"], protocol=P.PROTOCOL_VERSION, worker=f"sam3d {__version__}",
                             pid=os.getpid(), capabilities=["reconstruct", "cancel", "status", "shutdown"],
                             **self._model_info()))

    def _on_status(self, req: dict) -> None:
        with self._cv:
            running = self._running
            run = None if running is None else {"id": running.id, "stage": running.stage, "step": running.step,
                                                "total": running.total}
            queued = [j.id for j in self._queue]
        state = "stopping" if self._stop.is_set() else ("busy" if run or queued else "idle")
        self.send(P.response("status", req["id"], state=state, running=run, queued=queued,
                             jobs_done=self.jobs_done, **self._model_info()))

    def _on_reconstruct(self, req: dict) -> None:
        if self.model.error is not None:
            raise self.model.error
        with self._cv:
            if req["id"] in self._ids:
                raise P.ProtocolError("bad_request", f"a job with id {req['id']!r} is already queued or running; "
                                      "use a new id for every request")
            self._ids.add(req["id"])
            self._queue.append(Job(req["id"], req))
            self._cv.notify_all()

    def _on_cancel(self, req: dict) -> None:
        target = req["target"]
        with self._cv:
            if self._running is not None and self._running.id == target:
                self._running.cancel.set()  # the job thread answers "cancelled" at its next step
                log.info("cancelling running job %s", target)
                return
            for job in self._queue:
                if job.id == target:
                    self._queue.remove(job)
                    self._ids.discard(target)
                    break
            else:
                log.info("cancel for %r: no such queued or running job (ignored)", target)
                return
        log.info("removed queued job %s", target)
        self.send(P.response("cancelled", target, stage="queued"))

    def _on_shutdown(self, req: dict) -> None:
        self._begin_stop(req["id"])

    def _begin_stop(self, reply_id: str | None) -> None:
        with self._cv:
            if self._stop.is_set():
                return
            self._shutdown_id = reply_id
            dropped = list(self._queue)
            self._queue.clear()
            if self._running is not None:
                self._running.cancel.set()
            self._stop.set()
            self._cv.notify_all()
        for job in dropped:
            self.send(P.response("cancelled", job.id, stage="queued"))

    # -- job thread ----------------------------------------------------------------------------
    def job_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop.is_set():
                    self._cv.wait()
                if self._stop.is_set():
                    return
                job = self._queue.popleft()
                self._running = job
            try:
                final = self.run_job(job)
            finally:
                with self._cv:  # before the answer goes out, so a status sent after it never sees this job
                    self._running = None
                    self._ids.discard(job.id)
                    self.jobs_done += 1
            self.send(final)

    def run_job(self, job: Job) -> dict:
        """Run one reconstruct job; returns its final message (result, error or cancelled)."""
        t0 = time.perf_counter()
        log.info("job %s: start", job.id)
        try:
            msg = self._reconstruct(job)
            log.info("job %s: done in %.1f s", job.id, time.perf_counter() - t0)
            return msg
        except Cancelled:
            log.info("job %s: cancelled during %s", job.id, job.stage)
            return P.response("cancelled", job.id, stage=job.stage)
        except BadInput as e:
            log.info("job %s: bad input: %s", job.id, e)
            return P.error(job.id, "bad_input", str(e), e.details)
        except Exception as e:
            if _is_oom(e):
                _free_gpu_memory()
                log.warning("job %s: out of memory during %s", job.id, job.stage)
                return P.error(job.id, "out_of_memory", (
                    f"the GPU ran out of memory during {job.stage}: close other programs using the GPU "
                    "(another Blender render, a browser with hardware acceleration) and retry, or use fewer or "
                    "fast steps. A low-memory retry mode is planned but not implemented yet."),
                    {"stage": job.stage, "device": self._model_info()["device"]})
            log.exception("job %s failed", job.id)
            return P.error(job.id, "internal", (
                f"unexpected error during {job.stage}: {type(e).__name__}: {e}. The worker is still running; "
                "please report this with the worker log"),
                {"stage": job.stage, "exception": type(e).__name__,
                 "traceback": traceback.format_exc().splitlines()[-8:]})

    def _reconstruct(self, job: Job) -> dict:
        import json

        import numpy as np

        from sam3d_core.camera import fallback_pointmap
        from sam3d_core.export.voxels import save_voxels_glb

        pipe = self.model.pipe
        req = job.request

        def stage(name: str, step: int = 0, total: int = 1) -> None:
            if job.cancel.is_set():
                raise Cancelled
            job.stage, job.step, job.total = name, step, total
            self.send(P.progress(job.id, name, step, total))

        seed = 42 if req.get("seed") is None else req["seed"]
        fast = bool(req.get("fast", False))
        sampler = pipe.cfg.sampler
        n_steps = req.get("steps") or (sampler.shortcut_steps if fast else sampler.steps)
        if fast and not pipe.cfg.flow.is_shortcut_model:
            raise BadInput(f"fast (shortcut) mode needs a shortcut model; {self.model.description} is not one. "
                           "Send fast: false", field="fast")

        # 1. inputs + preprocessing (crop around the mask, point map normalisation)
        stage("preprocess")
        image, mask = load_inputs(req["photo"], req["mask"])
        pointmap, K = fallback_pointmap(*image.shape[:2])
        try:
            inputs = pipe.prepare(image, mask, pointmap)
        except ValueError as e:
            raise BadInput(str(e)) from None
        # 2. condition tokens
        stage("condition")
        cond = pipe.encode(inputs)
        # 3. flow sampling, one event per step; 4. occupancy and pose decoding (inside `sample`)
        stage("sample", 0, n_steps)

        def on_step(i: int, n: int) -> None:
            stage("sample", i, n)
            if i == n:
                stage("decode")

        out = pipe.sample(inputs, cond, seed=seed, steps=req.get("steps"), shortcut=fast, progress=on_step)
        # 5. export: the voxel GLB and scene.json, as `sam3d stage1` writes them
        stage("export")
        outdir = Path(req["out"]).expanduser().resolve()
        pose = out.pose
        rot, trans, scale = (pose.rotation[0].cpu().numpy(), pose.translation[0].cpu().numpy(),
                             pose.scale[0].cpu().numpy())
        try:
            outdir.mkdir(parents=True, exist_ok=True)
            glb = save_voxels_glb(outdir / GLB_NAME, out.coords[:, 1:].cpu().numpy(), rot, trans, scale)
            obj = {"glb": glb.name, "num_voxels": int(len(out.coords)),
                   "rotation_wxyz": pose.quaternion[0].tolist(), "translation": trans.tolist(),
                   "scale": scale.tolist(), "settings": out.settings}
            record = {
                "frame": "PyTorch3D camera (x left, y up, z forward); the GLB is in glTF camera space (camera at "
                         "the origin looking down -z)",
                "intrinsics": np.asarray(K).tolist(), "image_size": list(image.shape[:2]),
                "objects": [obj], "model": self.model.description,
            }
            scene = outdir / SCENE_JSON
            scene.write_text(json.dumps(record, indent=2))
        except OSError as e:
            raise BadInput(f"could not write to the output folder {str(outdir)!r} ({e}); choose a writable folder",
                           field="out", path=str(outdir)) from None
        if job.cancel.is_set():  # cancelled during export: the files are written; report the result anyway
            log.info("job %s: cancel arrived after the result was written", job.id)
        return P.response("result", job.id, glb=str(glb), scene=str(scene), num_voxels=obj["num_voxels"],
                          pose={"rotation_wxyz": obj["rotation_wxyz"], "translation": obj["translation"],
                                "scale": obj["scale"], "frame": "pytorch3d_camera"},
                          settings=out.settings, model=self.model.description)

    # -- main thread ---------------------------------------------------------------------------
    def serve(self, stdin: BinaryIO, stop_timeout: float = 60.0) -> int:
        jobs = threading.Thread(target=self.job_loop, name="sam3d-job", daemon=True)
        reader = threading.Thread(target=self.read_loop, args=(stdin,), name="sam3d-reader", daemon=True)
        jobs.start()
        reader.start()
        self._stop.wait()
        jobs.join(stop_timeout)  # the running job, cancelled, ends at its next step
        if jobs.is_alive():
            log.warning("the running job did not stop within %.0f s; exiting anyway", stop_timeout)
        if self._shutdown_id is not None:
            self.send(P.response("status", self._shutdown_id, state="stopped", running=None, queued=[],
                                 jobs_done=self.jobs_done, **self._model_info()))
        log.info("worker stopped")
        return 0


def _free_gpu_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort
        pass


def main(model: str | None = None, device: str | None = None, stdin: BinaryIO | None = None) -> int:
    """Run the worker on this process's stdin/stdout until `shutdown` or stdin EOF. Returns the exit code."""
    out = protect_stdout()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="sam3d serve: %(message)s", force=True)
    t0 = time.perf_counter()
    loaded = load_model(model, device)
    log.info("model: %s (%.1f s); protocol v%d on stdin/stdout, pid %d", loaded.description,
             time.perf_counter() - t0, P.PROTOCOL_VERSION, os.getpid())
    worker = Worker(loaded, out)
    code = worker.serve(stdin if stdin is not None else sys.stdin.buffer)
    out.flush()
    return code
