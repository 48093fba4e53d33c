"""A client of the `sam3d serve` worker for Blender and the desktop app. STDLIB ONLY.

    client = WorkerClient(python_exe)                 # starts the worker subprocess (non-blocking)
    job = client.submit({"type": "reconstruct", "photo": p, "mask": m, "out": d, "steps": 25})
    for msg in job.poll(): ...                        # non-blocking: for a Blender timer
    for msg in job.events(): ...                      # blocking iterator: progress..., then the final message
    job.cancel()
    result = job.result(timeout=600)                  # the final "result" message, or raises WorkerError
    client.close()

A reader thread parses the worker's stdout and hands each message to its job; another keeps the
last lines of the worker's log (stderr). If the worker process dies, every pending job ends with an
"internal" error saying so and how to restart it; later submits fail the same way at once.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from . import protocol as P

DEFAULT_ARGS = ("-m", "sam3d_core.cli.main", "serve")
RESTART_HINT = (
    "Restart it (close this WorkerClient and create a new one); the worker's last log lines, in "
    "this error's details (log_tail), say why it stopped"
)


class WorkerError(Exception):
    """A job ended with an error message (or the worker died): `code`, `message`, `details`."""

    def __init__(self, code: str, message: str, details: dict | None = None):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.details = dict(details or {})


class JobCancelled(WorkerError):
    def __init__(self, message: str = "the job was cancelled", details: dict | None = None):
        super().__init__("cancelled", message, details)


class Job:
    """A submitted request: its events as they arrive, and its final message."""

    def __init__(self, client: WorkerClient | None, request: dict):
        self.id: str = request["id"]
        self.request = request
        self._client = client
        self._cv = threading.Condition()
        self._pending: collections.deque[dict] = collections.deque()
        self._final: dict | None = None
        self.last_progress: dict | None = None  # the latest progress event (for a progress bar)

    # -- fed by the client's reader thread -------------------------------------------------------
    def _push(self, msg: dict) -> None:
        with self._cv:
            if self._final is not None:
                return  # a late message after the end (e.g. the crash error after a result): ignore
            if msg.get("type") == "progress":
                self.last_progress = msg
            elif msg.get("type") in P.FINAL_TYPES:
                self._final = msg
            self._pending.append(msg)
            self._cv.notify_all()

    # -- the caller's side -----------------------------------------------------------------------
    def done(self) -> bool:
        return self._final is not None

    @property
    def final(self) -> dict | None:
        """The message that ended the job (result, error, cancelled, hello or status), once it came."""
        return self._final

    def poll(self) -> list[dict]:
        """The messages received since the last poll/events call. Never blocks."""
        with self._cv:
            out = list(self._pending)
            self._pending.clear()
        return out

    def events(self, timeout: float | None = None) -> Iterator[dict]:
        """Yield messages as they arrive, the final one last. `timeout`: most seconds to wait for each
        message (TimeoutError when exceeded); None waits as long as needed."""
        while True:
            with self._cv:
                if not self._pending and self._final is None:
                    if not self._cv.wait_for(lambda: self._pending or self._final is not None, timeout):
                        raise TimeoutError(f"no message for job {self.id} within {timeout} s")
                if not self._pending:  # the final message was already taken by poll()
                    return
                msg = self._pending.popleft()
            yield msg
            if msg is self._final:
                return

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has ended (True) or `timeout` seconds passed (False)."""
        with self._cv:
            return self._cv.wait_for(lambda: self._final is not None, timeout)

    def result(self, timeout: float | None = None) -> dict:
        """The final message of a successful job; raises WorkerError (JobCancelled) or TimeoutError."""
        if not self.wait(timeout):
            raise TimeoutError(f"job {self.id} did not finish within {timeout} s")
        msg = self._final
        if msg["type"] == "error":
            raise WorkerError(msg.get("code", "internal"), msg.get("message", ""), msg.get("details"))
        if msg["type"] == "cancelled":
            raise JobCancelled(f"job {self.id} was cancelled (during {msg.get('stage', '?')})", msg)
        return msg

    def cancel(self) -> None:
        """Ask the worker to stop this job (at its next sampling step). Never blocks; the job then ends
        with a "cancelled" message (or its result, if it finished first)."""
        if self._client is not None and not self.done():
            self._client.cancel(self.id)


class WorkerClient:
    """Starts `python_executable -m sam3d_core.cli.main serve` and talks to it.

    `log`: called with each line of the worker's stderr (default: written to this process's stderr).
    The last lines are also kept in `log_tail`.
    """

    def __init__(
        self,
        python_executable: str,
        args: Sequence[str] = DEFAULT_ARGS,
        env: dict | None = None,
        cwd: str | None = None,
        log: Callable[[str], None] | None = None,
        log_lines: int = 200,
    ):
        self._log = log if log is not None else _to_stderr
        self.log_tail: collections.deque[str] = collections.deque(maxlen=log_lines)
        self.stray: collections.deque[dict] = collections.deque(maxlen=100)  # messages of no pending job
        self.protocol_errors: list[str] = []  # stdout lines that were not valid protocol messages
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()  # guards _jobs and writes to stdin
        self._closing = False
        self._dead_reason: str | None = None
        kwargs = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        self.command = [python_executable, *args]
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            bufsize=-1,
            **kwargs,
        )
        self._stderr_thread = threading.Thread(target=self._read_stderr, name="sam3d-client-log", daemon=True)
        self._stdout_thread = threading.Thread(target=self._read_stdout, name="sam3d-client-reader", daemon=True)
        self._stderr_thread.start()
        self._stdout_thread.start()

    # -- state -----------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def alive(self) -> bool:
        return self._dead_reason is None and self._proc.poll() is None

    # -- requests --------------------------------------------------------------------------------
    def submit(self, request: dict) -> Job:
        """Send a request ("v" and "id" filled in when absent) and return its Job. Never blocks on the
        worker; if the worker is gone the job is already failed with an "internal" error."""
        if request.get("type") == "cancel":
            raise ValueError("cancel gets no reply: use job.cancel() or client.cancel(job_id)")
        msg = {"v": P.PROTOCOL_VERSION, "id": P.new_id(), **request}
        job = Job(self, msg)
        with self._lock:
            if job.id in self._jobs:
                raise ValueError(f"request id {job.id!r} is already pending")
            if self._dead_reason is None:
                self._jobs[job.id] = job
        if self._dead_reason is not None:
            job._push(self._death_error(job.id))
        elif not self._send(msg):
            self._fail(job)
        return job

    def cancel(self, job_id: str) -> None:
        self._send({"v": P.PROTOCOL_VERSION, "id": P.new_id(), "type": "cancel", "target": job_id})

    def hello(self, timeout: float | None = 120) -> dict:
        """Handshake: the worker's answer (protocol version, model, device). Waits for the model to load."""
        return self.submit({"type": "hello", "client": "sam3d_core.serve.client"}).result(timeout)

    def status(self, timeout: float | None = 10) -> dict:
        return self.submit({"type": "status"}).result(timeout)

    def reconstruct(self, photo: str, mask: str, out: str, **options) -> Job:
        """Submit a reconstruct job (options: seed, steps, fast, texture_size, faces, name, stage2, voxels,
        refine_layout).
        Paths should be absolute."""
        return self.submit({"type": "reconstruct", "photo": photo, "mask": mask, "out": out, **options})

    def open_photo(self, photo: str, **options) -> Job:
        """The photo's size and camera (intrinsics, Blender camera) and which segmenter answers clicks."""
        return self.submit({"type": "open_photo", "photo": photo, **options})

    def segment(self, photo: str, out: str, points=(), box=None, previous: str | None = None) -> Job:
        """A mask from clicks [[x, y, 1|0], ...] and/or a box [x0, y0, x1, y1] (photo pixels), written to `out`."""
        return self.submit(
            {
                "type": "segment",
                "photo": photo,
                "out": out,
                "points": [list(p) for p in points],
                "box": None if box is None else list(box),
                "previous": previous,
            }
        )

    def segment_all(self, photo: str, out_dir: str, max_objects: int | None = None) -> Job:
        """Every object the segmenter finds, as mask PNGs in `out_dir`."""
        return self.submit({"type": "segment_all", "photo": photo, "out_dir": out_dir, "max_objects": max_objects})

    def segment_concept(
        self,
        photo: str,
        out_dir: str,
        text: str | None = None,
        boxes=(),
        min_score: float | None = None,
        max_objects: int | None = None,
    ) -> Job:
        """SAM 3: every instance of a noun phrase and/or exemplar boxes [[x0, y0, x1, y1, 1|0], ...] (photo pixels),
        as mask PNGs in `out_dir`; one "instance" event per instance, then the result listing them all."""
        return self.submit(
            {
                "type": "segment_concept",
                "photo": photo,
                "out_dir": out_dir,
                "text": text,
                "boxes": [list(b) for b in boxes],
                "min_score": min_score,
                "max_objects": max_objects,
            }
        )

    def close(self, timeout: float = 15) -> int | None:
        """Ask the worker to shut down (cancelling its jobs), wait up to `timeout` s, then kill it."""
        self._closing = True
        if self._proc.poll() is None:
            self._send({"v": P.PROTOCOL_VERSION, "id": P.new_id(), "type": "shutdown"})
            try:
                self._proc.stdin.close()
            except OSError:
                pass
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._stdout_thread.join(5)
        return self._proc.returncode

    def kill(self) -> None:
        """Kill the worker process at once (pending jobs end with an "internal" error)."""
        self._proc.kill()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------
    def _send(self, msg: dict) -> bool:
        data = P.encode(msg)
        with self._lock:
            try:
                self._proc.stdin.write(data)
                self._proc.stdin.flush()
                return True
            except (BrokenPipeError, OSError, ValueError):
                return False

    def _read_stdout(self) -> None:
        for line in self._proc.stdout:
            if not line.strip():
                continue
            try:
                msg = P.decode_response(line)
            except P.ProtocolError as e:
                text = line.decode("utf-8", "replace").rstrip("\n")
                self.protocol_errors.append(text)
                self._log(
                    f"sam3d client: ignored a worker line that is not a protocol message ({e.message}): {text[:200]}"
                )
                continue
            job = self._jobs.get(msg.get("id")) if msg.get("id") is not None else None
            if job is None:
                self.stray.append(msg)
                continue
            job._push(msg)
            if job.done():
                with self._lock:
                    self._jobs.pop(job.id, None)
        # EOF: the worker exited (or closed its stdout)
        try:
            rc = self._proc.wait(10)
        except subprocess.TimeoutExpired:
            rc = None
        self._stderr_thread.join(2)
        how = f"with code {rc}" if rc is None or rc >= 0 else f"killed by signal {-rc}"
        self._dead_reason = (
            f"the worker stopped ({how})"
            if self._closing
            else f"the sam3d worker (pid {self._proc.pid}) exited unexpectedly ({how})"
        )
        with self._lock:
            pending = list(self._jobs.values())
            self._jobs.clear()
        for job in pending:
            job._push(self._death_error(job.id))

    def _fail(self, job: Job) -> None:
        """A write failed: the worker is gone or going; the reader thread will fail the job at EOF."""
        if self._stdout_thread.is_alive():
            return
        with self._lock:
            self._jobs.pop(job.id, None)
        job._push(self._death_error(job.id))

    def _death_error(self, job_id: str) -> dict:
        reason = self._dead_reason or "the sam3d worker is not running"
        tail = list(self.log_tail)[-20:]
        return P.error(
            job_id,
            "internal",
            f"{reason} while this request was pending. {RESTART_HINT}.",
            {"returncode": self._proc.poll(), "log_tail": tail, "command": self.command},
        )

    def _read_stderr(self) -> None:
        for raw in self._proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log_tail.append(line)
            try:
                self._log(line)
            except Exception:  # a broken log callback must not stop the draining
                pass


def _to_stderr(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
    except Exception:
        pass
