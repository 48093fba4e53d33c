"""The worker process and the jobs in flight, polled from a timer on Blender's main thread.

Nothing here waits on the worker: requests are sent with `WorkerClient.submit` (never blocks), and
`tick()`, called by a `bpy.app.timers` timer, polls every task's job (`Job.poll`) and applies what
arrived. Only `tick()` touches bpy, so no bpy call ever runs off the main thread. Scripts and tests
that run without Blender's event loop call `tick()` themselves (`run_until_idle`).
"""

from __future__ import annotations

import os
import tempfile
import time

import bpy

from . import preferences
from .core import setup
from .worker_client.client import WorkerClient

CLIENT_NAME = "sam3d-blender 0.1"
TICK_S = 0.1


class SetupError(Exception):
    """The worker cannot be started (no interpreter, bad path): the message says what to set."""


class WorkerSession:
    """One worker process for this Blender session, started on first use."""

    def __init__(self):
        self.client: WorkerClient | None = None
        self.hello: dict | None = None
        self.state = "stopped"  # stopped | starting | ready | failed
        self.error = ""
        self.python = ""
        self._hello_job = None
        self._key: tuple = ()

    def start(self, prefs) -> None:
        """Start the worker if it is not running (non-blocking). Raises SetupError with the fix."""
        python, source = preferences.worker_python(prefs)
        if not python:
            self.state, self.error = "failed", source
            raise SetupError(source)
        cmd = setup.worker_command(python, prefs.model if prefs else "", prefs.device if prefs else "")
        key = (tuple(cmd), preferences.weights_dir(prefs))
        if self.client is not None and self.client.alive() and key == self._key and self.state != "failed":
            return
        self.stop()
        try:
            self.client = WorkerClient(cmd[0], args=cmd[1:], env=setup.worker_env(key[1]), log=_log)
        except OSError as e:
            self.state, self.error = "failed", f"cannot start the worker {cmd[0]!r} ({e}); check the Worker Python"
            raise SetupError(self.error) from None
        self.python, self._key, self.state, self.error, self.hello = python, key, "starting", "", None
        self._hello_job = self.client.submit({"type": "hello", "client": CLIENT_NAME})

    def poll(self) -> str:
        """Advance the state from the hello answer or the process's death; returns the state."""
        if self.state == "starting" and self._hello_job.done():
            msg = self._hello_job.final
            if msg.get("type") == "hello" and msg.get("ready", True):
                self.hello, self.state = msg, "ready"
            else:
                self.hello = msg if msg.get("type") == "hello" else None
                err = (msg.get("model_error") or {}) if msg.get("type") == "hello" else msg
                self.state, self.error = "failed", err.get("message") or "the worker did not start"
        if self.state in ("starting", "ready") and self.client is not None and not self.client.alive():
            tail = "; ".join(list(self.client.log_tail)[-3:])
            self.state = "failed"
            self.error = f"the sam3d worker exited (code {self.client.returncode}). Last log lines: {tail}"
        return self.state

    def capable(self, name: str) -> bool:
        return bool(self.hello) and name in (self.hello.get("capabilities") or [])

    def submit(self, request: dict):
        return self.client.submit(request)

    def stop(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            try:
                client.close(timeout=5)
            except Exception:  # a worker that will not stop is killed by close(); nothing else to do
                pass
        self.state, self.hello, self._hello_job = "stopped", None, None


def _log(line: str) -> None:
    print(f"[sam3d worker] {line}")


SESSION = WorkerSession()
TASKS: list = []


def add_task(task) -> None:
    TASKS.append(task)
    if not bpy.app.timers.is_registered(_timer):
        bpy.app.timers.register(_timer, first_interval=TICK_S, persistent=True)


def tick() -> bool:
    """Poll the worker and every task once; True while tasks remain. Main thread only."""
    SESSION.poll()
    for task in list(TASKS):
        try:
            finished = task.tick()
        except Exception as e:  # a bug in one task must not stop the timer for the others
            finished = True
            task.fail(f"{type(e).__name__}: {e}")
        if finished:
            TASKS.remove(task)
    return bool(TASKS)


def _timer() -> float | None:
    return TICK_S if tick() else None


def run_until_idle(timeout: float = 60.0, poll_s: float = 0.02) -> bool:
    """For scripts and tests without Blender's event loop: tick until no task is left (False on timeout)."""
    deadline = time.monotonic() + timeout
    while tick():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


_PRIVATE_DIR: list[str] = []  # this Blender session's private temporary folder, made on first use


def private_dir() -> str:
    """A folder only this user can enter, with an unpredictable name (tempfile.mkdtemp), made once per session:
    no other user can plant a link where our masks are written."""
    if not _PRIVATE_DIR or not os.path.isdir(_PRIVATE_DIR[0]):
        _PRIVATE_DIR[:] = [tempfile.mkdtemp(prefix="sam3d_blender_")]
    return _PRIVATE_DIR[0]


def work_dir(scene: bpy.types.Scene, photo: str, prefs=None) -> str:
    """Folder for one photo's masks and objects: the preference, else next to the .blend, else a private temporary
    folder (never a predictable path in the shared temporary folder)."""
    stem = os.path.splitext(os.path.basename(photo))[0] or "photo"
    if prefs is not None and prefs.output_dir:
        base = bpy.path.abspath(prefs.output_dir)
    elif bpy.data.filepath:
        base = os.path.join(os.path.dirname(bpy.data.filepath), "sam3d")
    else:
        base = private_dir()
    path = os.path.join(base, stem)
    os.makedirs(path, exist_ok=True)
    return path


def shutdown() -> None:
    if bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)
    TASKS.clear()
    SESSION.stop()
