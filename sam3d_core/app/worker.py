"""The app's link to the worker: finding its Python, starting `sam3d serve`, and handing each job's messages
to callbacks on the Qt main thread (a QTimer polls the stdlib client's jobs; nothing here blocks).

A worker that dies ends its pending jobs with the client's "internal" error (their callbacks say so) and
the link goes to state "crashed"; `restart()` starts a new one. Finished results live in the app, not in
the worker, so they survive.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from PySide6.QtCore import QObject, QTimer, Signal

from sam3d_core.serve import installer
from sam3d_core.serve.client import Job, WorkerClient

CLIENT_NAME = "sam3d-app 0.1"
SERVE_ARGS = ("-m", "sam3d_core.cli", "serve")
POLL_MS = 50


@dataclass(frozen=True)
class WorkerPython:
    python: str
    source: str  # where it was found, for the window's status line


def find_worker_python(configured: str = "", environ: dict | None = None) -> WorkerPython | None:
    """The interpreter to run the worker with, or None (then the app offers the first-run setup).

    Order: the app's setting; $SAM3D_PYTHON; the private environment the first run made
    (installer.default_target()); this interpreter, when torch is installed next to the app.
    """
    env = os.environ if environ is None else environ
    if configured:
        return WorkerPython(configured, "the app's settings") if os.path.isfile(configured) else None
    if env.get("SAM3D_PYTHON") and os.path.isfile(env["SAM3D_PYTHON"]):
        return WorkerPython(env["SAM3D_PYTHON"], "$SAM3D_PYTHON")
    private = installer.installed_python(installer.default_target(env))
    if private:
        return WorkerPython(private, "the worker environment made at first run")
    if importlib.util.find_spec("torch") is not None:  # finds the package without importing it
        return WorkerPython(sys.executable, "the app's own Python")
    return None


class WorkerLink(QObject):
    """One worker process; `submit` sends a request and calls back with its messages on the main thread."""

    state_changed = Signal(str, str)  # state (stopped | starting | ready | failed | crashed), message
    log_line = Signal(str)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.client: WorkerClient | None = None
        self.hello: dict | None = None
        self.state, self.message = "stopped", ""
        self.command: list[str] = []
        self.env: dict | None = None
        self._hello_job: Job | None = None
        self._jobs: dict[str, tuple[Job, Callable | None, Callable | None]] = {}
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self.poll)

    # -- life ------------------------------------------------------------------------------------
    def start(self, python: str, model: str = "", device: str = "", extra: tuple = (), env: dict | None = None):
        """Start the worker (non-blocking); the state becomes "ready" when its model has loaded."""
        self.stop()
        self.command = [python, *SERVE_ARGS]
        if model:
            self.command += ["--model", model]
        if device and device != "auto":
            self.command += ["--device", device]
        self.command += [str(a) for a in extra]
        self.env = env
        try:
            self.client = WorkerClient(self.command[0], args=self.command[1:], env=env, log=self._on_log)
        except OSError as e:
            self._set("failed", f"cannot start the worker {python!r} ({e}); choose another Worker Python in Settings")
            return
        self._hello_job = self.client.submit({"type": "hello", "client": CLIENT_NAME})
        self._set("starting", "starting the worker (loading the model) ...")
        self._timer.start()

    def restart(self) -> None:
        if self.command:
            self.start(self.command[0], extra=tuple(self.command[1 + len(SERVE_ARGS) :]), env=self.env)

    def stop(self) -> None:
        self._timer.stop()
        client, self.client = self.client, None
        self.hello = None
        if client is not None:
            try:
                client.close(timeout=5)
            except Exception:  # a worker that will not stop is killed by close(); nothing more to do
                pass
        self._flush_jobs()
        if self.state != "stopped":
            self._set("stopped", "the worker is stopped")

    def capable(self, name: str) -> bool:
        return bool(self.hello) and name in (self.hello.get("capabilities") or [])

    @property
    def model_text(self) -> str:
        return str(self.hello.get("model", "")) if self.hello else ""

    # -- requests --------------------------------------------------------------------------------
    def submit(self, request: dict, on_event: Callable | None = None, on_done: Callable | None = None) -> Job | None:
        """Send a request; on_event(msg) for each progress event, on_done(final) once. None when no worker runs
        (on_done is then called at once with an error message)."""
        if self.client is None:
            msg = {"type": "error", "code": "internal", "message": "the sam3d worker is not running; start it (Worker)"}
            if on_done is not None:
                on_done(msg)
            return None
        job = self.client.submit(request)
        self._jobs[job.id] = (job, on_event, on_done)
        return job

    def cancel(self, job_id: str) -> None:
        entry = self._jobs.get(job_id)
        if entry is not None:
            entry[0].cancel()

    def pending(self) -> int:
        return len(self._jobs)

    # -- polling (main thread) -------------------------------------------------------------------
    def poll(self) -> None:
        if self.state == "starting" and self._hello_job is not None and self._hello_job.done():
            msg = self._hello_job.final
            if msg.get("type") == "hello" and msg.get("ready", True):
                self.hello = msg
                self._set("ready", f"worker ready: {msg.get('model')} on {msg.get('device')}")
            else:
                self.hello = msg if msg.get("type") == "hello" else None
                err = (msg.get("model_error") or {}) if msg.get("type") == "hello" else msg
                self._set("failed", err.get("message") or "the worker did not start")
        self._flush_jobs()
        if self.client is not None and self.state in ("starting", "ready") and not self.client.alive():
            tail = " | ".join(list(self.client.log_tail)[-3:])
            self._set("crashed", f"the sam3d worker stopped (exit code {self.client.returncode}): {tail}")

    def _flush_jobs(self) -> None:
        for job_id, (job, on_event, on_done) in list(self._jobs.items()):
            for msg in job.poll():
                if msg is job.final:
                    break
                if on_event is not None:
                    on_event(msg)
            if job.done():
                del self._jobs[job_id]
                if on_done is not None:
                    on_done(job.final)

    def _set(self, state: str, message: str) -> None:
        self.state, self.message = state, message
        self.state_changed.emit(state, message)

    def _on_log(self, line: str) -> None:  # the client's stderr thread: hand over through a queued signal
        self.log_line.emit(line)
