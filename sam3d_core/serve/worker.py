"""The `sam3d serve` worker: holds the model, answers protocol requests on stdin/stdout.

Threads: a reader thread parses requests from stdin and answers the cheap ones (hello, status,
cancel, shutdown) at once; one job thread runs reconstruct jobs one at a time, in arrival order (the
GPU is used by one job at a time); the main thread waits for shutdown (or stdin EOF) and exits.

Only protocol lines ever reach stdout: at start the real stdout is kept for the protocol and file
descriptor 1 is pointed at stderr, so stray prints (ours, a library's, C code's) land in the log.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sam3d_core.export.output import (  # the output policy: what may be written where, all or nothing
    OutputError,
    OutputFolder,
    os_error_message,
    output_file,
    output_folder,
    save_mask_png,
)
from sam3d_core.pipeline.errors import is_out_of_memory
from sam3d_core.serve import protocol as P

log = logging.getLogger("sam3d.serve")

CAPABILITIES = [
    "reconstruct",
    "cancel",
    "status",
    "shutdown",
    "open_photo",
    "segment",
    "segment_all",
    "segment_concept",  # SAM 3: a noun phrase and/or exemplar boxes -> every instance, streamed ("instance" events)
    "stage2",
    "texture_bake",
    "output_policy",  # `overwrite` fields, numbered suffixes, all-or-nothing writes (docs/protocol.md, Output files)
    "projected_texture",  # without stage 2: a mesh textured from the photo; `voxels: true` for the voxels
    "refine_layout",  # reconstruct's `refine_layout` field: the pose moved onto the point map (pipeline/layout.py)
]


def load_mask_file(path: str, ctx):
    from sam3d_core.inputs.imageio import load_mask

    return load_mask(Path(path).expanduser(), ctx.photo)


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


def load_model(
    model: str | None, device: str | None, low_vram: bool = False, max_voxels: int | None = None
) -> LoadedModel:
    """The best model available (`Pipeline.load`); a failure becomes a structured error."""
    from sam3d_core.pipeline.reconstruct import Pipeline
    from sam3d_core.weights.store import CheckpointError

    try:
        pipe, which = Pipeline.load(model, device, low_vram=low_vram, max_voxels=max_voxels)
    except (CheckpointError, FileNotFoundError) as e:
        err = P.ProtocolError(
            "missing_weights",
            f"could not load model {model!r}: {e}. Import the official "
            "weights with `sam3d weights import FOLDER`, or start the worker with --model tiny",
            {"model": model},
        )
        return LoadedModel(None, f"no model ({e})", err)
    except Exception as e:  # a bad --device, a broken install: report it to every request
        log.exception("loading the model failed")
        if is_out_of_memory(e):
            err = P.ProtocolError(
                "out_of_memory",
                f"the GPU ran out of memory loading model {model or 'default'!r}: "
                "close other programs using the GPU and restart the worker, or start it with "
                "--low-vram or --device cpu (slow)",
                {"model": model, "device": device},
            )
            return LoadedModel(None, f"no model ({e})", err)
        err = P.ProtocolError(
            "internal",
            f"could not load model {model or 'default'!r} on device "
            f"{device or 'default'!r}: {type(e).__name__}: {e}. Check the worker log and the "
            "--model / --device options, then restart the worker",
            {"model": model, "device": device},
        )
        return LoadedModel(None, f"no model ({e})", err)
    return LoadedModel(pipe, which)


def _bad_input(e) -> BadInput:
    """An imageio.InputError (or a ValueError from the model's checks) as the protocol's bad_input."""
    details = dict(getattr(e, "details", {}) or {})
    if getattr(e, "field", None):
        details.setdefault("field", e.field)
    return BadInput(str(e), **details)


class Worker:
    def __init__(self, model: LoadedModel, out: BinaryIO, loader=None, device: str | None = None):
        """`loader`: a function returning the LoadedModel, run on a thread when `serve` starts (the model then
        loads while the user opens a photo and clicks: open_photo / segment are answered meanwhile, hello once
        the model is there, reconstruct jobs wait for it). Without it, `model` is the loaded model."""
        self.model = model
        self._loader = loader
        self._device = device  # for photos opened before the model has loaded (a depth model runs there)
        self._ready = threading.Event()
        if loader is None:
            self._ready.set()
        self._out = out
        self._write_lock = threading.Lock()
        self._cv = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._ids: set[str] = set()  # ids of queued or running jobs
        self._stop = threading.Event()
        self._shutdown_id: str | None = None
        self.jobs_done = 0
        self._photos: dict = {}  # (path, mtime, fov) -> PhotoContext
        self._photo_lock = threading.Lock()
        self._icv = threading.Condition()
        self._iqueue: collections.deque[dict] = collections.deque()
        self._seg = None  # SegmentSession, made on the first segment request

    # -- output --------------------------------------------------------------------------------
    def send(self, msg: dict) -> None:
        try:
            data = P.encode(msg)
        except (TypeError, ValueError) as e:  # a bug in an answer: say so rather than leave the request unanswered
            log.exception("could not encode an answer")
            data = P.encode(
                P.error(
                    msg.get("id") if isinstance(msg.get("id"), str) else None,
                    "internal",
                    f"the worker could not encode its answer ({type(e).__name__}: {str(e)[:200]}); please report "
                    "this with the worker log",
                )
            )
        with self._write_lock:
            try:
                self._out.write(data)
                self._out.flush()
            except (BrokenPipeError, ValueError, OSError):  # the client is gone; stdin EOF will follow
                pass

    # -- reader thread -------------------------------------------------------------------------
    def read_loop(self, stdin: BinaryIO) -> None:
        """Read request lines until EOF or shutdown. Every line gets an answer; no line stops the reader (a line
        longer than P.MAX_LINE_BYTES is skipped to its end without being held in memory, then answered)."""
        try:
            while not self._stop.is_set():
                try:
                    line = stdin.readline(P.MAX_LINE_BYTES + 1)
                except (OSError, ValueError) as e:  # stdin closed or broken: as EOF
                    log.info("reading stdin failed (%s): stopping", e)
                    return
                if not line:
                    return
                if len(line) > P.MAX_LINE_BYTES and not line.endswith(b"\n"):
                    size = len(line) + _skip_line(stdin)
                    self.send(
                        P.error(
                            None,
                            "bad_request",
                            f"message of {size} bytes is longer than the limit of {P.MAX_LINE_BYTES}; "
                            "send file paths, not pixel data",
                            {"bytes": size, "limit": P.MAX_LINE_BYTES},
                        )
                    )
                    continue
                if not line.strip():
                    continue
                try:
                    self.handle_line(line)
                except Exception:  # handle_line answers everything itself; this is the last guard of the reader
                    log.exception("handling a request line failed")
        finally:
            if not self._stop.is_set():
                log.info("stdin closed: stopping")
                self._begin_stop(None)

    def handle_line(self, line: bytes) -> None:
        try:
            req = P.decode_request(line)
        except P.ProtocolError as e:
            log.warning("rejected request: %s", e.message[:300])
            self.send(e.to_message())
            return
        except Exception as e:  # MemoryError or a parser bug: still an answer, and the reader goes on
            log.warning("unreadable request line (%s)", type(e).__name__)
            self.send(
                P.error(
                    None,
                    "bad_request",
                    f"message could not be read ({type(e).__name__}); send one JSON object per line (docs/protocol.md)",
                )
            )
            return
        handler = getattr(self, f"_on_{req['type']}")
        try:
            handler(req)
        except P.ProtocolError as e:
            self.send(e.to_message(req["id"]))
        except Exception as e:  # a bug in a handler must not stop the reader thread
            log.exception("request %s failed", req["id"])
            self.send(
                P.error(
                    req["id"],
                    "internal",
                    f"unexpected error handling {req['type']}: "
                    f"{type(e).__name__}: {e}. The worker is still running; please report this "
                    "with the worker log",
                    {"exception": type(e).__name__},
                )
            )

    def _model_info(self) -> dict:
        pipe = self.model.pipe
        return {
            "model": self.model.description,
            "weights": pipe.weights if pipe is not None else None,
            "device": str(pipe.device) if pipe is not None else None,
            "dtype": str(pipe.stage1.dtype).removeprefix("torch.") if pipe is not None else None,
            "low_vram": bool(pipe.low_vram) if pipe is not None else None,
            "ready": pipe is not None,
            "loading": not self._ready.is_set(),
            "model_error": None
            if self.model.error is None
            else {"code": self.model.error.code, "message": self.model.error.message},
        }

    def _on_hello(self, req: dict) -> None:
        if not self._ready.is_set():  # "hello" means ready: answer it when the model is there
            threading.Thread(target=self._hello_when_ready, args=(req,), name="sam3d-hello", daemon=True).start()
            return
        self._hello(req)

    def _hello_when_ready(self, req: dict) -> None:
        self._ready.wait()
        self._hello(req)

    def _hello(self, req: dict) -> None:
        from sam3d_core.version import __version__

        self.send(
            P.response(
                "hello",
                req["id"],
                protocol=P.PROTOCOL_VERSION,
                worker=f"sam3d {__version__}",
                pid=os.getpid(),
                capabilities=CAPABILITIES,
                **self._model_info(),
            )
        )

    def _on_status(self, req: dict) -> None:
        with self._cv:
            running = self._running
            run = (
                None
                if running is None
                else {"id": running.id, "stage": running.stage, "step": running.step, "total": running.total}
            )
            queued = [j.id for j in self._queue]
        state = "stopping" if self._stop.is_set() else ("busy" if run or queued else "idle")
        self.send(
            P.response(
                "status",
                req["id"],
                state=state,
                running=run,
                queued=queued,
                jobs_done=self.jobs_done,
                **self._model_info(),
            )
        )

    def _on_reconstruct(self, req: dict) -> None:
        if self._ready.is_set() and self.model.error is not None:
            raise self.model.error
        with self._cv:
            if req["id"] in self._ids:
                raise P.ProtocolError(
                    "bad_request",
                    f"a job with id {req['id']!r} is already queued or running; use a new id for every request",
                )
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
                self._ready.wait()  # a job sent while the model loads starts once it is there
                error = self.model.error
                final = error.to_message(job.id) if error is not None else self.run_job(job)
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
            if is_out_of_memory(e):
                _free_gpu_memory()
                log.warning("job %s: out of memory during %s", job.id, job.stage)
                return P.error(
                    job.id,
                    "out_of_memory",
                    (
                        f"the GPU ran out of memory during {job.stage}, also after a retry in low-VRAM mode (one stage "
                        "on the GPU at a time): close other programs using the GPU (another Blender render, a browser "
                        "with hardware acceleration) and retry, or lower texture_size and faces"
                    ),
                    {"stage": job.stage, "device": self._model_info()["device"]},
                )
            log.exception("job %s failed", job.id)
            return P.error(
                job.id,
                "internal",
                (
                    f"unexpected error during {job.stage}: {type(e).__name__}: {e}. The worker is still running; "
                    "please report this with the worker log"
                ),
                {
                    "stage": job.stage,
                    "exception": type(e).__name__,
                    "traceback": traceback.format_exc().splitlines()[-8:],
                },
            )

    def _photo(self, path: str, fov: float | None = None):
        """The photo's context (checked image, intrinsics, point map), cached by path, mtime and fov."""
        from sam3d_core.inputs.imageio import InputError

        p = Path(path).expanduser()
        if not p.is_absolute():
            p = Path(os.getcwd()) / p
        try:
            key = (str(p), p.stat().st_mtime_ns, fov)
        except OSError:
            raise BadInput(
                f"photo file {str(p)!r} does not exist; check the path (send absolute paths: the "
                f"worker's working folder is {os.getcwd()!r})",
                field="photo",
                path=str(p),
            ) from None
        with self._photo_lock:
            ctx = self._photos.get(key)
        if ctx is None:
            from sam3d_core.pipeline.reconstruct import open_photo

            pipe = self.model.pipe
            device = pipe.device if pipe is not None else (self._device or _default_device())
            try:
                ctx = open_photo(p, fov_deg=fov, device=device)  # also while the model loads
            except InputError as e:
                raise _bad_input(e) from None
            with self._photo_lock:
                self._photos[key] = ctx
                while len(self._photos) > 4:  # a few photos: the artist switches between them
                    self._photos.pop(next(iter(self._photos)))
        return ctx

    def _reconstruct(self, job: Job) -> dict:
        from sam3d_core.inputs.imageio import InputError

        pipe = self.model.pipe
        req = job.request

        def stage(name: str, step: int = 0, total: int = 1) -> None:
            if job.cancel.is_set() and name != "export":  # a cancel during export lets the result out
                raise Cancelled
            if (name, step) != (job.stage, job.step):
                job.stage, job.step, job.total = name, step, total
                self.send(P.progress(job.id, name, step, total))

        seed = 42 if req.get("seed") is None else req["seed"]
        fast = bool(req.get("fast", False))
        if fast and not pipe.stage1.cfg.flow.is_shortcut_model:
            raise BadInput(
                f"fast (shortcut) mode needs a shortcut model; {self.model.description} is not one. Send fast: false",
                field="fast",
            )
        name = req.get("name") or "object_0"
        if not name.replace("_", "").replace("-", "").isalnum() or len(name) > 100:
            raise BadInput(
                f"name {name[:100]!r}: use letters, digits, '_' and '-' only, at most 100 (it names the output files)",
                field="name",
            )
        # 1. inputs: the photo (cached per photo) and the mask, checked
        stage("preprocess")
        ctx = self._photo(req["photo"], req.get("fov"))
        mask_path = Path(req["mask"]).expanduser()
        if not mask_path.is_file():
            raise BadInput(
                f"mask file {str(mask_path)!r} does not exist; check the path (send absolute paths)",
                field="mask",
                path=str(mask_path),
            )
        try:
            mask = pipe.load_mask(ctx, mask_path)
        except InputError as e:
            raise _bad_input(e) from None
        # the output folder, before any GPU work: writable, room for the files, nothing of the user's replaced
        stage2 = req.get("stage2", True) is not False
        voxels = bool(req.get("voxels", False))  # without stage 2: the voxels, not the projected-texture mesh
        texture_size, faces = req.get("texture_size") or 1024, req.get("faces") or 20000
        try:
            folder = pipe.check_output(
                Path(req["out"]).expanduser(),
                texture_size=texture_size,
                faces=faces,
                stage2=stage2,
                voxels=voxels,
                overwrite=bool(req.get("overwrite", False)),
                inputs=[ctx.photo.path, mask_path],
            )
        except OutputError as e:
            raise BadInput(str(e), field="out", **e.details) from None
        vram = req.get("vram") or "auto"
        if vram != "auto":  # stays in effect for later jobs until another preset is sent
            pipe.set_low_vram(vram == "low")
        # 2.-6. stage 1, stage 2, mesh clean-up, bake, placement (progress events per stage and step)
        try:
            results = pipe.reconstruct(
                ctx,
                [mask],
                names=[name],
                seed=seed,
                steps=req.get("steps"),
                fast=fast,
                texture_size=texture_size,
                faces=faces,
                stage2=stage2,
                voxels=voxels,
                refine_layout=req.get("refine_layout"),
                progress=stage,
            )
        except InputError as e:
            raise _bad_input(e) from None
        # 7. files: NAME.glb, NAME.ply, NAME_mask.png, NAME_latents.safetensors, scene.glb, scene.json, all or
        # nothing (export/output.py)
        stage("export")
        outdir = folder.path
        try:
            scene = pipe.export(ctx, results, folder, latents=True)  # latents: the picks become training pairs
        except OutputError as e:
            raise BadInput(str(e), field="out", **e.details) from None
        except OSError as e:
            why = os_error_message(e, f"writing to {outdir}") or f"could not write to {outdir} ({e})"
            raise BadInput(f"{why}; nothing was written", field="out", path=str(outdir)) from None
        obj = scene["objects"][0]
        files = {k: str(outdir / obj[k]) for k in ("mesh_glb", "gaussians_ply", "glb", "mask", "latents") if k in obj}
        if job.cancel.is_set():
            log.info("job %s: cancel arrived during export; the result is kept", job.id)
        return P.response(
            "result",
            job.id,
            **files,
            scene=str(outdir / scene["scene_json"]),
            scene_glb=str(outdir / scene["scene_glb"]) if "scene_glb" in scene else None,
            num_voxels=obj["num_voxels"],
            pose=obj["pose"],
            mask_iou=obj["mask_iou"],
            blender={"object_matrix_world": obj["blender_matrix_world"], "camera": scene["blender_camera"]},
            camera={
                "K": scene["K"],
                "width": scene["width"],
                "height": scene["height"],
                "intrinsics_source": scene["intrinsics_source"],
            },
            settings=obj["settings"],
            timings=obj["timings"],
            model=self.model.description,
            weights=pipe.weights,
        )

    # -- interactive lane: open_photo, segment, segment_all (answered while a reconstruct job runs) -----------
    def _on_open_photo(self, req: dict) -> None:
        self._interactive(req)

    def _on_segment(self, req: dict) -> None:
        self._interactive(req)

    def _on_segment_all(self, req: dict) -> None:
        self._interactive(req)

    def _on_segment_concept(self, req: dict) -> None:
        self._interactive(req)

    def _interactive(self, req: dict) -> None:
        if self._ready.is_set() and self.model.error is not None:
            raise self.model.error
        with self._icv:
            self._iqueue.append(req)
            self._icv.notify_all()

    def interactive_loop(self) -> None:
        while True:
            with self._icv:
                while not self._iqueue and not self._stop.is_set():
                    self._icv.wait(0.5)
                if self._stop.is_set():
                    return
                req = self._iqueue.popleft()
            try:
                msg = getattr(self, f"_do_{req['type']}")(req)
            except BadInput as e:
                msg = P.error(req["id"], "bad_input", str(e), e.details)
            except P.ProtocolError as e:
                msg = e.to_message(req["id"])
            except Exception as e:
                if is_out_of_memory(e):
                    _free_gpu_memory()
                    msg = P.error(
                        req["id"],
                        "out_of_memory",
                        "the GPU ran out of memory while segmenting: close other programs using the GPU and retry",
                        {"stage": req["type"]},
                    )
                else:
                    log.exception("request %s failed", req["id"])
                    msg = P.error(
                        req["id"],
                        "internal",
                        f"unexpected error during {req['type']}: "
                        f"{type(e).__name__}: {e}. The worker is still running; please report this "
                        "with the worker log",
                        {"exception": type(e).__name__, "traceback": traceback.format_exc().splitlines()[-8:]},
                    )
            self.send(msg)

    def _segmenter(self):
        if self._seg is None:
            from sam3d_core.segment.session import SegmentSession

            self._seg = SegmentSession()
        return self._seg

    def _segment_info(self) -> dict:
        d = self._segmenter().describe()
        return {"name": d.get("name"), "fallback": bool(d.get("fallback")), "reason": d.get("reason")}

    def _do_open_photo(self, req: dict) -> dict:
        ctx = self._photo(req["photo"], req.get("fov"))
        rec = ctx.camera_record()
        return P.response(
            "photo",
            req["id"],
            photo=str(ctx.photo.path),
            width=ctx.width,
            height=ctx.height,
            K=rec["K"],
            intrinsics_source=rec["intrinsics_source"],
            blender_camera=rec["blender_camera"],
            notes=list(ctx.photo.notes),
            segmenter=self._segment_info(),
        )

    def _do_segment(self, req: dict) -> dict:
        from sam3d_core.inputs.imageio import InputError

        ctx = self._photo(req["photo"])
        try:  # checked before any work: never the photo or the previous mask, never a file that is not ours
            folder, stem, suffix = output_file(
                req["out"],
                overwrite=bool(req.get("overwrite", False)),
                inputs=[ctx.photo.path, req.get("previous")],
                what="mask file",
            )
        except OutputError as e:
            raise BadInput(str(e), field="out", **e.details) from None
        seg = self._segmenter()
        t0 = time.perf_counter()
        previous = None
        if req.get("previous"):
            try:
                previous = load_mask_file(req["previous"], ctx)
            except InputError as e:
                raise _bad_input(e) from None
        try:
            seg.open(ctx.photo.rgb, key=str(ctx.photo.path))
            mask, score, backend, _ = seg.predict(req.get("points") or [], req.get("box"), previous=previous)
        except ValueError as e:
            raise BadInput(str(e), field="points") from None
        out = self._write_masks(folder, [(stem, suffix, mask)], "out")[0]
        return P.response(
            "result",
            req["id"],
            mask=str(out),
            area=int(mask.sum()),
            score=None if score is None else float(score),
            segmenter=backend,
            seconds=round(time.perf_counter() - t0, 4),
        )

    @staticmethod
    def _write_masks(folder: OutputFolder, masks: list, field: str) -> list[Path]:
        """(stem, suffix, mask) triples -> their paths, written all or nothing under the output policy."""
        try:
            with folder.writer() as w:
                names = []
                for stem, suffix, mask in masks:
                    name = w.claim(stem, (suffix,)) + suffix
                    save_mask_png(mask, w.staged(name))
                    names.append(name)
        except OutputError as e:
            raise BadInput(str(e), field=field, **e.details) from None
        except OSError as e:
            why = os_error_message(e, f"writing masks to {folder.path}") or f"could not write to {folder.path} ({e})"
            raise BadInput(f"{why}; nothing was written", field=field, path=str(folder.path)) from None
        return [folder.path / n for n in names]

    def _mask_folder(self, req: dict, ctx):
        """The request's out_dir under the output policy (new, empty or ours; the photo is never written over)."""
        try:
            return output_folder(
                Path(req["out_dir"]).expanduser(),
                overwrite=bool(req.get("overwrite", False)),
                inputs=[ctx.photo.path],
                what="mask folder",
            )
        except OutputError as e:
            raise BadInput(str(e), field="out_dir", **e.details) from None

    def _do_segment_all(self, req: dict) -> dict:
        ctx = self._photo(req["photo"])
        folder = self._mask_folder(req, ctx)
        seg = self._segmenter()
        seg.open(ctx.photo.rgb, key=str(ctx.photo.path))
        masks = seg.segment_all()[: req.get("max_objects") or 10]
        paths = self._write_masks(folder, [(f"mask_{i}", ".png", m) for i, m in enumerate(masks)], "out_dir")
        return P.response(
            "result",
            req["id"],
            masks=[str(p) for p in paths],
            areas=[int(m.sum()) for m in masks],
            segmenter=self._segment_info()["name"],
        )

    def _do_segment_concept(self, req: dict) -> dict:
        """SAM 3: every instance of a noun phrase and/or exemplar boxes. Each instance's mask is written (on its own,
        under the output policy) and announced with an "instance" event as it is ready; the result lists them all."""
        from sam3d_core.segment.backends import ConceptUnavailable
        from sam3d_core.weights.store import CheckpointError

        ctx = self._photo(req["photo"])
        text = (req.get("text") or "").strip() or None
        boxes = req.get("boxes") or []
        folder = self._mask_folder(req, ctx)
        t0 = time.perf_counter()
        try:
            found = self._segmenter().segment_concept(
                ctx.photo.rgb,
                text=text,
                boxes=boxes,
                min_score=0.5 if req.get("min_score") is None else float(req["min_score"]),
                max_objects=req.get("max_objects"),
                key=str(ctx.photo.path),
            )
        except ConceptUnavailable as e:
            raise P.ProtocolError("missing_weights", str(e), {"backend": "sam3"}) from None
        except CheckpointError as e:  # an imported SAM 3 that fails its checks
            raise P.ProtocolError(
                "missing_weights", f"the SAM 3 checkpoint cannot be used: {e}", {"backend": "sam3"}
            ) from None
        except ValueError as e:
            raise BadInput(str(e), field="boxes" if boxes else "text") from None
        name = found[0].backend if found else self._segmenter().concept_segmenter.name
        records = []
        for i, c in enumerate(found):
            (path,) = self._write_masks(folder, [(f"instance_{i}", ".png", c.mask)], "out_dir")
            rec = {
                "index": i,
                "mask": str(path),
                "score": round(float(c.score), 5),
                "box": [round(float(v), 2) for v in c.detected_box],
                "area": int(c.area),
            }
            records.append(rec)
            self.send(P.response("instance", req["id"], **rec, segmenter=name))
        return P.response(
            "result",
            req["id"],
            masks=[r["mask"] for r in records],
            scores=[r["score"] for r in records],
            boxes=[r["box"] for r in records],
            areas=[r["area"] for r in records],
            text=text,
            segmenter=name,
            score_kind=found[0].score_kind if found else None,
            seconds=round(time.perf_counter() - t0, 4),
        )

    # -- main thread ---------------------------------------------------------------------------
    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            self.model = self._loader()
            if self.model.pipe is not None:
                self.model.pipe.warm_up()  # the mesh worker processes, before the first object needs them
        finally:
            self._ready.set()
        log.info("model: %s (%.1f s, loaded while serving)", self.model.description, time.perf_counter() - t0)

    def serve(self, stdin: BinaryIO, stop_timeout: float = 60.0) -> int:
        if self._loader is not None and not self._ready.is_set():
            threading.Thread(target=self._load, name="sam3d-load", daemon=True).start()
        jobs = threading.Thread(target=self.job_loop, name="sam3d-job", daemon=True)
        reader = threading.Thread(target=self.read_loop, args=(stdin,), name="sam3d-reader", daemon=True)
        interactive = threading.Thread(target=self.interactive_loop, name="sam3d-interactive", daemon=True)
        jobs.start()
        interactive.start()
        reader.start()
        self._stop.wait()
        with self._icv:
            self._icv.notify_all()
        jobs.join(stop_timeout)  # the running job, cancelled, ends at its next step
        if jobs.is_alive():
            log.warning("the running job did not stop within %.0f s; exiting anyway", stop_timeout)
        if self._shutdown_id is not None:
            self.send(
                P.response(
                    "status",
                    self._shutdown_id,
                    state="stopped",
                    running=None,
                    queued=[],
                    jobs_done=self.jobs_done,
                    **self._model_info(),
                )
            )
        log.info("worker stopped")
        return 0


def _skip_line(stdin: BinaryIO, chunk: int = 1 << 16) -> int:
    """Read and drop the rest of an over-long line (up to and including its newline); returns the bytes dropped."""
    dropped = 0
    while True:
        part = stdin.readline(chunk)
        dropped += len(part)
        if not part or part.endswith(b"\n"):
            return dropped


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _free_gpu_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort
        pass


def main(
    model: str | None = None,
    device: str | None = None,
    stdin: BinaryIO | None = None,
    low_vram: bool = False,
    max_voxels: int | None = None,
) -> int:
    """Run the worker on this process's stdin/stdout until `shutdown` or stdin EOF. Returns the exit code."""
    out = protect_stdout()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="sam3d serve: %(message)s", force=True)
    log.info("loading the model; protocol v%d on stdin/stdout, pid %d", P.PROTOCOL_VERSION, os.getpid())
    loader = functools.partial(load_model, model, device, low_vram=low_vram, max_voxels=max_voxels)
    worker = Worker(LoadedModel(None, "loading"), out, loader=loader, device=device)
    code = worker.serve(stdin if stdin is not None else sys.stdin.buffer)
    out.flush()
    if stdin is None:  # the real process: leave without interpreter finalisation (see below)
        sys.stderr.flush()
        logging.shutdown()
        # Daemon threads (the reader, the interactive lane, a job that did not stop in time) may still be inside
        # torch or a blocking read; finalising the interpreter under them can abort the process ("terminate called
        # without an active exception", seen about once in ten fast start-stop cycles). Everything is written.
        os._exit(code)
    return code
