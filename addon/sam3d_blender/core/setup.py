"""Finding the worker's Python, the command that starts the worker, and the "Check setup" report. Stdlib only.

The worker runs in its own Python environment (torch and friends), never inside Blender. The add-on
needs that environment's interpreter: given in the preferences, or found here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ENV_PYTHON = "SAM3D_PYTHON"  # an interpreter that can `import sam3d_core` (overrides auto-detection)
SERVE_ARGS = ("-m", "sam3d_core.cli", "serve")

# Run with the worker's Python for "Check setup": `sam3d doctor --json` prints one JSON line (versions, GPU,
# memory). The probe itself lives in the library, so nothing here imports the worker's packages.
PROBE_ARGS = ("-m", "sam3d_core.cli.doctor", "--json")


@dataclass(frozen=True)
class Candidate:
    python: str
    source: str  # where it was found, for the report


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _shebang_python(script: str) -> str | None:
    try:
        with open(script, "rb") as f:
            first = f.readline(400).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if first.startswith("#!"):
        exe = first[2:].strip().split()[0]
        if os.path.basename(exe).startswith("python") and os.path.isfile(exe):
            return exe
    return None


def find_worker_python(addon_dir: str | None = None, environ: dict | None = None) -> list[Candidate]:
    """Interpreters that may run the worker, best first; only ones that exist as files.

    Order: $SAM3D_PYTHON; the `.venv` of a sam3d checkout that holds this add-on (development); the
    interpreter of the `sam3d` command on PATH (a pip install). Whether one can really import sam3d_core
    is for `PROBE_CODE` to say.
    """
    env = os.environ if environ is None else environ
    out: list[Candidate] = []

    def add(path, source: str) -> None:
        if path and os.path.isfile(path) and all(os.path.realpath(c.python) != os.path.realpath(path) for c in out):
            out.append(Candidate(str(path), source))

    add(env.get(ENV_PYTHON), f"${ENV_PYTHON}")
    if addon_dir:
        for parent in Path(addon_dir).resolve().parents:
            if (parent / "sam3d_core").is_dir():
                add(_venv_python(parent / ".venv"), f"the checkout at {parent}")
                break
    exe = shutil.which("sam3d", path=env.get("PATH"))
    if exe:
        add(_shebang_python(exe), f"the sam3d command ({exe})")
    add(_private_env_python(env), "the worker environment made at first run")
    return out


def _private_env_python(env) -> str | None:
    """The environment the first-run setup made (worker_client/installer.py), when there is one."""
    try:
        from ..worker_client import installer  # vendored by addon/build.py
    except ImportError:
        return None
    return installer.installed_python(installer.default_target(env))


def worker_command(python: str, model: str = "", device: str = "") -> list[str]:
    """The worker's command line. Empty model/device: the worker's defaults (best model, cuda if present)."""
    cmd = [python, *SERVE_ARGS]
    if model:
        cmd += ["--model", model]
    if device and device != "auto":
        cmd += ["--device", device]
    return cmd


def worker_env(weights_dir: str = "", base: dict | None = None) -> dict:
    """Environment for the worker: $SAM3D_HOME points at the weights folder when one is set."""
    env = dict(os.environ if base is None else base)
    if weights_dir:
        env["SAM3D_HOME"] = os.path.abspath(os.path.expanduser(weights_dir))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def imported_models(weights_dir: str) -> list[dict]:
    """Models imported with `sam3d weights import` under a sam3d data folder: name, folder, size in bytes."""
    root = Path(os.path.expanduser(weights_dir)) / "models"
    out = []
    for manifest in sorted(root.glob("*/manifest.json")) if root.is_dir() else []:
        try:
            files = json.loads(manifest.read_text()).get("files", {})
            size = sum(int(r.get("bytes", 0)) for r in files.values())
        except (OSError, ValueError, AttributeError):
            size = -1  # unreadable manifest: still listed, flagged by the size
        out.append({"name": manifest.parent.name, "folder": str(manifest.parent), "bytes": size})
    return out


def parse_probe(stdout: str) -> dict:
    """The probe's JSON line (the last line that parses); {} when there is none."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return {}


def setup_report(
    python: str, probe: dict, hello: dict | None, models: Sequence[dict], weights_dir: str, error: str = ""
) -> list[str]:
    """Readable lines for "Check setup": interpreter, GPU and memory, weights found, worker version, model."""
    lines = [f"Worker Python: {python or 'not found'}"]
    if not python:
        lines.append("  Set it in the preferences, or set $SAM3D_PYTHON, or install sam3d (pip install sam3d)")
    if probe:
        lines.append(
            f"  Python {probe.get('python', '?')}, sam3d {probe.get('sam3d', 'NOT importable')}, "
            f"torch {probe.get('torch', 'NOT importable')}"
        )
        for key in ("sam3d_error", "torch_error"):
            if probe.get(key):
                lines.append(f"  {key.split('_')[0]} import failed: {probe[key]}")
        if probe.get("cuda"):
            lines.append(
                f"GPU: {probe.get('gpu')}, {probe.get('gpu_memory_gb')} GB ({probe.get('gpu_free_gb')} GB free)"
            )
        elif "torch" in probe:
            lines.append("GPU: none visible to torch; the worker runs on the CPU (slow, tiny model only)")
    where = weights_dir or "the default sam3d data folder"
    if models:
        lines.append(
            f"Weights in {where}: "
            + ", ".join(
                f"{m['name']} ({m['bytes'] / 1e9:.1f} GB)" if m["bytes"] >= 0 else f"{m['name']} (manifest unreadable)"
                for m in models
            )
        )
    else:
        lines.append(
            f"Weights: none imported in {where}; import them with `sam3d weights import FOLDER` "
            "(until then the worker uses a tiny random-weight model)"
        )
    if hello:
        lines.append(
            f"Worker: {hello.get('worker', '?')}, protocol {hello.get('protocol')}, "
            f"device {hello.get('device')}, {hello.get('dtype')}"
        )
        lines.append(f"Model: {hello.get('model')}")
        if hello.get("model_error"):
            lines.append(f"  Model error: {hello['model_error'].get('message')}")
        lines.append("Capabilities: " + ", ".join(hello.get("capabilities") or []))
    if error:
        lines.append(f"Problem: {error}")
    return lines
