"""First run: create the worker's private Python environment (torch for this machine's GPU or CPU, then sam3d).
STDLIB ONLY: the desktop app and the Blender add-on (a copy vendored by addon/build.py) run it without torch.

    plan = installer.plan_install()                  # target folder, torch build, package, space needed
    result = installer.install(plan, progress=print_progress, cancel=event)   # minutes: downloads torch
    result.python                                    # give this interpreter to the worker's client

What it does, in order (each step's output goes to the log file next to the target folder):
1. checks before anything is written: the target is free (or `replace`), its folder is writable, enough free
   disk space, the package index answers (an error names the fix: connect, set a proxy, choose a mirror);
2. `python -m venv` into a temporary folder beside the target (same file system, so the rename is atomic);
3. torch alone, the build for this machine (`torch_plan`: a CUDA build for an NVIDIA GPU, the CPU build
   otherwise), from PyTorch's index unless told otherwise;
4. sam3d (the distribution DIST_NAME, with the export and segment extras) from the package index, or from a
   source checkout when this file lives in one (development, and the tests);
5. `sam3d doctor --json` in the new environment: sam3d and torch import, and the device is what was planned;
6. the temporary folder is renamed into place and the paths the scripts in bin/ recorded are rewritten.

Any failure or a cancel removes the temporary folder: nothing half-installed stays behind, only the log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The distribution on the package index (`sam3d` there is another project's); the command stays `sam3d`.
DIST_NAME = "sam3d-kit"
PACKAGE_VERSION = "0.1.0"  # = sam3d_core.version.__version__ (tested): the worker speaks this client's protocol
EXTRAS = ("export", "segment")  # the textured mesh (trimesh, xatlas, scipy) and click selection (OpenCV)
TORCH_VERSION = "2.13.0"  # = the Makefile's TORCH (tested): the release the project is tested with
PYPI_INDEX = "https://pypi.org/simple"
PYTORCH_INDEX = "https://download.pytorch.org/whl"
# PyTorch's CUDA builds, newest first: (the driver's CUDA version it needs, index name)
CUDA_BUILDS = (((12, 8), "cu128"), ((12, 6), "cu126"), ((11, 8), "cu118"))
ENV_FOLDER = "worker-env"
MARKER = "sam3d-worker-env.json"  # written into a finished environment: what was installed, and when
SUPPORTED_PYTHONS = ((3, 10), (3, 11), (3, 12), (3, 13))


class InstallError(Exception):
    """The environment could not be made. `message` names the problem and the fix; `log` is the log file."""

    def __init__(self, message: str, log: str | None = None, kind: str = "failed"):
        super().__init__(message + (f" (log: {log})" if log else ""))
        self.message, self.log, self.kind = message, log, kind  # kind: network, disk, target, cancelled, failed


@dataclass(frozen=True)
class GpuInfo:
    kind: str  # "nvidia", "apple" (Metal) or "none"
    name: str = ""
    cuda: tuple[int, int] | None = None  # the newest CUDA version the NVIDIA driver supports


@dataclass(frozen=True)
class TorchPlan:
    requirement: str  # e.g. "torch==2.13.0"
    index_url: str | None  # None: pip's configured index (PyPI unless the user's pip.conf says otherwise)
    build: str  # "cu128", "cpu", "default" (the index's own build: CUDA on Linux, Metal on macOS)
    download_gb: float  # roughly, for the question to the user
    disk_gb: float  # free space needed for the whole environment, with a margin


@dataclass(frozen=True)
class InstallPlan:
    target: str  # the environment's folder
    torch: TorchPlan
    package: str  # the pip requirement of sam3d: "sam3d-kit[export,segment]==0.1.0" or "/path/checkout[...]"
    index_url: str | None  # for the package and its dependencies; None: pip's configured index
    gpu: GpuInfo
    base_python: str  # the interpreter the environment is made from
    replace: bool = False  # True: an existing environment at target is replaced (only after the new one works)

    def describe(self) -> str:
        gpu = f"{self.gpu.kind} {self.gpu.name}".strip() if self.gpu.kind != "none" else "no GPU found"
        return (
            f"a private Python environment in {self.target} ({gpu}; torch {self.torch.build} build, about "
            f"{self.torch.download_gb:.1f} GB to download, {self.torch.disk_gb:.1f} GB of disk), then {self.package}"
        )


@dataclass
class InstallResult:
    target: str
    python: str
    doctor: dict  # `sam3d doctor --json` in the new environment
    log: str
    seconds: float
    steps: dict = field(default_factory=dict)  # step -> seconds


# ----------------------------------------------------------------------------------------------
# Where things are


def data_dir(environ: dict | None = None) -> Path:
    """sam3d's per-user data folder (the same rule as sam3d_core.weights.store.data_dir)."""
    env = os.environ if environ is None else environ
    if env.get("SAM3D_HOME"):
        return Path(env["SAM3D_HOME"]).expanduser()
    if sys.platform == "win32":
        return Path(env.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "sam3d"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "sam3d"
    return Path(env.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "sam3d"


def default_target(environ: dict | None = None) -> Path:
    return data_dir(environ) / ENV_FOLDER


def env_python(target: str | os.PathLike) -> Path:
    return Path(target) / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def installed_python(target: str | os.PathLike | None = None) -> str | None:
    """The interpreter of a finished private environment (its marker written), else None."""
    target = Path(target) if target is not None else default_target()
    py = env_python(target)
    return str(py) if (target / MARKER).is_file() and py.is_file() else None


def source_checkout(start: str | os.PathLike | None = None) -> Path | None:
    """The sam3d source checkout holding this file (or `start`), when there is one: pip installs from it."""
    for parent in Path(start or __file__).resolve().parents:
        pyproject = parent / "pyproject.toml"
        if (parent / "sam3d_core").is_dir() and pyproject.is_file():
            try:
                text = pyproject.read_text(encoding="utf-8")
            except OSError:
                return None
            return parent if re.search(rf'^name\s*=\s*"{re.escape(DIST_NAME)}"', text, re.M) else None
    return None


# ----------------------------------------------------------------------------------------------
# What to install


def detect_gpu(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> GpuInfo:
    """The machine's GPU, without torch: `nvidia-smi` for NVIDIA (name and the driver's CUDA version),
    Apple silicon for Metal. `run` is subprocess.run (a parameter so the parser is testable)."""
    if sys.platform == "darwin":
        import platform

        return GpuInfo("apple", "Apple silicon") if platform.machine() == "arm64" else GpuInfo("none")
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return GpuInfo("none")
    try:
        out = run([exe], capture_output=True, text=True, timeout=20)
        names = run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return GpuInfo("none")
    return parse_nvidia_smi(out.stdout if out.returncode == 0 else "", names.stdout if names.returncode == 0 else "")


def parse_nvidia_smi(table: str, names: str) -> GpuInfo:
    """GpuInfo from `nvidia-smi`'s table ("CUDA Version: 12.4") and its `--query-gpu=name` lines."""
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", table)
    name = names.strip().splitlines()[0].strip() if names.strip() else ""
    if m is None and not name:
        return GpuInfo("none")
    return GpuInfo("nvidia", name or "NVIDIA GPU", (int(m.group(1)), int(m.group(2))) if m else None)


def torch_plan(gpu: GpuInfo, platform: str = sys.platform, version: str = TORCH_VERSION) -> TorchPlan:
    """The torch build for this machine: PyTorch's CUDA index for an NVIDIA GPU (the newest build the driver
    runs), its CPU index without one (Linux and Windows; PyPI's Linux wheel would bring 3 GB of CUDA
    libraries), PyPI's own build on macOS (Metal)."""
    req = f"torch=={version}"
    if platform == "darwin":
        return TorchPlan(req, None, "default", 0.1, 1.5)
    if gpu.kind == "nvidia":
        if gpu.cuda is None:  # the driver did not say: the oldest supported build runs on most drivers
            build = CUDA_BUILDS[-1][1]
        else:
            build = next((b for need, b in CUDA_BUILDS if gpu.cuda >= need), None)
            if build is None:
                raise InstallError(
                    f"the NVIDIA driver supports CUDA {gpu.cuda[0]}.{gpu.cuda[1]}, older than any PyTorch build "
                    f"(CUDA {CUDA_BUILDS[-1][0][0]}.{CUDA_BUILDS[-1][0][1]} or newer): update the NVIDIA driver",
                    kind="gpu",
                )
        return TorchPlan(req, f"{PYTORCH_INDEX}/{build}", build, 3.0, 8.0)
    return TorchPlan(req, f"{PYTORCH_INDEX}/cpu", "cpu", 0.3, 2.0)


def plan_install(
    target: str | os.PathLike | None = None,
    *,
    gpu: GpuInfo | None = None,
    package: str | None = None,
    index_url: str | None = None,
    torch_index: str | None = "auto",
    torch_version: str = TORCH_VERSION,
    base_python: str | None = None,
    replace: bool = False,
) -> InstallPlan:
    """Decide what to install, without writing anything.

    package: a pip requirement or a local path (wheel, source folder); default: this file's source checkout
    when it is in one, else DIST_NAME==PACKAGE_VERSION from the index. torch_index: "auto" = the plan's
    (torch_plan), None = pip's configured index, or a URL. index_url: None = pip's configured index.
    """
    gpu = gpu if gpu is not None else detect_gpu()
    tp = torch_plan(gpu, version=torch_version)
    if torch_index != "auto":
        tp = TorchPlan(tp.requirement, torch_index, tp.build if torch_index else "default", tp.download_gb, tp.disk_gb)
    extras = f"[{','.join(EXTRAS)}]"
    if package is None:
        checkout = source_checkout()
        package = f"{checkout}{extras}" if checkout else f"{DIST_NAME}{extras}=={PACKAGE_VERSION}"
    target = Path(target) if target is not None else default_target()
    return InstallPlan(
        str(target.expanduser().absolute()), tp, package, index_url, gpu, base_python or sys.executable, replace
    )


# ----------------------------------------------------------------------------------------------
# Checks before anything is written


def check_target(plan: InstallPlan) -> Path:
    """The target's parent folder (created when missing); raises InstallError when the target is taken."""
    target = Path(plan.target)
    if target.exists() and not plan.replace:
        what = "a sam3d worker environment" if (target / MARKER).is_file() else "a file or folder we did not make"
        raise InstallError(
            f"{target} already exists ({what}); choose another folder, or remove it first", kind="target"
        )
    if target.exists() and not (target / MARKER).is_file():
        raise InstallError(
            f"{target} exists and is not a sam3d worker environment; it is never replaced: choose another folder",
            kind="target",
        )
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InstallError(
            f"cannot create the folder {parent} ({e}); choose a writable folder", kind="target"
        ) from None
    if not os.access(parent, os.W_OK):
        raise InstallError(f"the folder {parent} is not writable; choose a writable folder", kind="target")
    return parent


def check_disk(folder: str | os.PathLike, need_gb: float) -> float:
    """Free GB in `folder`; raises InstallError naming the fix when fewer than `need_gb`."""
    free = shutil.disk_usage(folder).free / 1e9
    if free < need_gb:
        raise InstallError(
            f"only {free:.1f} GB free in {folder}, and the worker environment needs about {need_gb:.1f} GB: "
            "free some disk space, or choose a folder on another disk",
            kind="disk",
        )
    return free


def check_python(python: str) -> tuple[int, int]:
    """The base interpreter's version; raises InstallError when torch has no wheels for it or venv is missing."""
    try:
        out = subprocess.run(
            [python, "-c", "import sys, venv, ensurepip; print(sys.version_info[0], sys.version_info[1])"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise InstallError(f"cannot run the Python {python!r} ({e}); choose another base interpreter") from None
    if out.returncode != 0:
        raise InstallError(
            f"the Python {python!r} cannot make virtual environments "
            f"({(out.stderr.strip().splitlines() or ['?'])[-1]}); install its venv module "
            "(Debian/Ubuntu: apt install python3-venv) or choose another Python"
        )
    version = tuple(int(v) for v in out.stdout.split()[:2])
    if version not in SUPPORTED_PYTHONS:
        raise InstallError(
            f"Python {version[0]}.{version[1]} ({python}) has no torch {TORCH_VERSION} wheels; use Python "
            + ", ".join(f"{a}.{b}" for a, b in SUPPORTED_PYTHONS)
        )
    return version  # type: ignore[return-value]


NO_NETWORK_FIX = (
    "connect this computer to the internet (or set HTTPS_PROXY for a proxy), or give a reachable package "
    "index (a mirror), then try again"
)


def check_index(url: str | None, timeout: float = 15.0) -> None:
    """Raise InstallError (kind "network") when an http(s) package index does not answer; other URLs
    (file:, pip's configured index when `url` is None) are left to pip."""
    if not url or not url.startswith(("http://", "https://")):
        return
    try:
        req = urllib.request.Request(url.rstrip("/") + "/", method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout):
            pass
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            raise InstallError(
                f"the package index {url} answers HTTP {e.code}; try again later", kind="network"
            ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise InstallError(
            f"cannot reach the package index {url} ({reason}): {NO_NETWORK_FIX}", kind="network"
        ) from None


# ----------------------------------------------------------------------------------------------
# The install


_NETWORK_SIGNS = (
    "Failed to establish a new connection",
    "NewConnectionError",
    "Name or service not known",
    "Temporary failure in name resolution",
    "nodename nor servname",
    "Network is unreachable",
    "Connection refused",
    "ProxyError",
    "Read timed out",
    "ConnectTimeoutError",
    "getaddrinfo failed",
)
_DISK_SIGNS = ("No space left on device", "[Errno 28]", "Disk quota exceeded")

Progress = Callable[[str, float, str], None]  # (step, fraction 0..1 of the whole install, message)


class _Run:
    """One install: the log file, progress, cancel, and the subprocesses it runs."""

    # step -> (start, end) fractions of the whole install, for the progress bar
    SPAN = {"checks": (0.0, 0.02), "venv": (0.02, 0.08), "torch": (0.08, 0.7), "sam3d": (0.7, 0.93),
            "doctor": (0.93, 0.98), "finish": (0.98, 1.0)}  # fmt: skip

    def __init__(self, log_path: Path, progress: Progress | None, cancel: threading.Event | None, env: dict | None):
        self.log_path = log_path
        self.log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.progress = progress
        self.cancel = cancel or threading.Event()
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env.pop("PYTHONPATH", None)  # the new environment must stand on its own
        self.env.pop("PYTHONHOME", None)
        self.env.pop("VIRTUAL_ENV", None)
        self.steps: dict[str, float] = {}
        self._step, self._t0, self._lines = "", time.monotonic(), 0

    def write(self, text: str) -> None:
        self.log.write(text.rstrip("\n") + "\n")
        self.log.flush()

    def step(self, name: str, message: str) -> None:
        now = time.monotonic()
        if self._step:
            self.steps[self._step] = round(now - self._t0, 2)
        self._step, self._t0, self._lines = name, now, 0
        self.write(f"== {time.strftime('%H:%M:%S')} {name}: {message}")
        self.report(0.0, message)

    def report(self, within: float, message: str) -> None:
        lo, hi = self.SPAN.get(self._step, (0.0, 1.0))
        if self.progress is not None:
            try:
                self.progress(self._step, lo + (hi - lo) * min(max(within, 0.0), 1.0), message)
            except Exception:  # a broken progress callback must not break the install
                pass

    def run(self, cmd: Sequence[str], what: str, cwd: str | None = None, index: str | None = None) -> list[str]:
        """Run a command, its output into the log line by line (progress on pip's lines); returns the lines.
        Raises InstallError (classified) on failure, InstallError(kind="cancelled") on cancel."""
        self.write("$ " + " ".join(map(str, cmd)))
        if self.cancel.is_set():
            raise InstallError("the install was cancelled", kind="cancelled")
        kwargs = {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)} if sys.platform == "win32" else {}
        proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace", env=self.env, cwd=cwd, bufsize=1, **kwargs,
        )  # fmt: skip
        lines: list[str] = []
        watcher = threading.Thread(target=self._kill_on_cancel, args=(proc,), daemon=True)
        watcher.start()
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            self.write(line)
            if line.startswith(("Collecting", "Downloading", "Building", "Installing", "Successfully")):
                self._lines += 1
                self.report(1.0 - 0.9**self._lines, line.strip()[:120])  # creeps towards the step's end
        rc = proc.wait()
        if self.cancel.is_set():
            raise InstallError("the install was cancelled", kind="cancelled")
        if rc != 0:
            raise self.classify(lines, what, rc, index)
        return lines

    def _kill_on_cancel(self, proc: subprocess.Popen) -> None:
        while proc.poll() is None:
            if self.cancel.wait(0.2):
                proc.kill()
                return

    def classify(self, lines: list[str], what: str, rc: int, index: str | None = None) -> InstallError:
        text = "\n".join(lines)
        if "from versions: none" in text and index:  # pip found nothing at all: is the index there?
            try:
                check_index(index)
            except InstallError as e:
                return InstallError(f"no network while {what} ({e.message})", str(self.log_path), kind="network")
        if any(s in text for s in _DISK_SIGNS):
            return InstallError(
                f"the disk filled up while {what}: free some disk space (or choose a folder on another disk) "
                "and try again",
                str(self.log_path),
                kind="disk",
            )
        if any(s in text for s in _NETWORK_SIGNS) or ("from versions: none" in text and "WARNING: Retrying" in text):
            return InstallError(f"no network while {what}: {NO_NETWORK_FIX}", str(self.log_path), kind="network")
        tail = " | ".join(line.strip() for line in lines if line.strip())[-400:] or f"exit code {rc}"
        return InstallError(f"{what} failed (exit code {rc}): {tail}", str(self.log_path))

    def close(self) -> None:
        if self._step:
            self.steps[self._step] = round(time.monotonic() - self._t0, 2)
        self.log.close()


def install(
    plan: InstallPlan,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    env: dict | None = None,
    check_network: bool = True,
) -> InstallResult:
    """Make the environment of `plan` (module docstring). Blocks for minutes: run it on a worker thread.

    progress(step, fraction, message) is called from this thread. `cancel`: set it to stop (the running pip
    is killed, nothing stays behind). `env`: the environment of the pip subprocesses (default: this
    process's, so the user's proxy and pip settings apply). Raises InstallError.
    """
    t_start = time.monotonic()
    target = Path(plan.target)
    parent = check_target(plan)
    log_path = parent / f"{target.name}-install.log"
    run = _Run(log_path, progress, cancel, env)
    tmp: Path | None = None
    try:
        run.step("checks", "checking the folder, the disk space and the network")
        run.write(f"plan: {json.dumps(asdict(plan))}")
        check_disk(parent, plan.torch.disk_gb)
        check_python(plan.base_python)
        if check_network:
            check_index(plan.torch.index_url)
            check_index(plan.index_url or (PYPI_INDEX if not _pip_index_configured(run.env) else None))
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=parent))
        run.step("venv", f"creating the environment ({plan.base_python})")
        _chmod_like_mkdir(tmp)
        run.run([plan.base_python, "-m", "venv", "--prompt", target.name, str(tmp)], "creating the virtual environment")
        py = env_python(tmp)
        pip = [str(py), "-m", "pip", "install", "--no-input", "--progress-bar", "off", "--no-compile"]
        run.step("torch", f"installing {plan.torch.requirement} ({plan.torch.build} build)")
        torch_cmd = [*pip, plan.torch.requirement]
        if plan.torch.index_url:
            torch_cmd += ["--index-url", plan.torch.index_url]
        run.run(torch_cmd, f"installing {plan.torch.requirement}", index=plan.torch.index_url)
        run.step("sam3d", f"installing {plan.package}")
        pkg_cmd = [*pip, plan.package]
        if plan.index_url:
            pkg_cmd += ["--index-url", plan.index_url]
        run.run(pkg_cmd, f"installing {plan.package}", cwd=str(parent), index=plan.index_url)
        run.step("doctor", "checking the new environment (sam3d doctor)")
        doctor = _doctor(run, py)
        if plan.torch.build.startswith("cu") and not doctor.get("cuda"):
            doctor["warning"] = "torch was installed with CUDA but sees no GPU: update the NVIDIA driver"
            run.write(f"WARNING: {doctor['warning']}")
        run.step("finish", f"moving it into place: {target}")
        _write_marker(tmp, plan, doctor)
        built, tmp = tmp, None  # from here on the folder is the target's (or back where it was on failure)
        _move_into_place(built, target, plan.replace)
        _rewrite_paths(target, str(built))
        run.report(1.0, f"done: {env_python(target)}")
    except InstallError as e:
        run.write(f"FAILED: {e.message}")
        if e.log is None:
            e.log = str(log_path)
        raise
    except Exception as e:  # a bug here must still leave nothing behind and say where the log is
        run.write(f"FAILED: {type(e).__name__}: {e}")
        raise InstallError(f"{type(e).__name__}: {e}", str(log_path)) from e
    finally:
        run.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return InstallResult(str(target), str(env_python(target)), doctor, str(log_path),
                         round(time.monotonic() - t_start, 1), run.steps)  # fmt: skip


def _pip_index_configured(env: dict) -> bool:
    """True when the user's pip takes its packages from an index of their own (PIP_INDEX_URL or an
    `index-url` in a pip config file): then pip, not this module, decides where it goes."""
    if env.get("PIP_INDEX_URL") or env.get("PIP_NO_INDEX"):
        return True
    home = Path.home()
    files = [env.get("PIP_CONFIG_FILE"), "/etc/pip.conf", "/etc/xdg/pip/pip.conf", home / ".pip" / "pip.conf",
             Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "pip" / "pip.conf",
             home / "Library" / "Application Support" / "pip" / "pip.conf",
             Path(env.get("APPDATA") or home) / "pip" / "pip.ini"]  # fmt: skip
    for f in files:
        try:
            if f and f != os.devnull and re.search(r"^\s*index-url\s*=", Path(f).read_text(errors="replace"), re.M):
                return True
        except OSError:
            continue
    return False


def _doctor(run: _Run, python: Path) -> dict:
    """`sam3d doctor --json` in the new environment; raises InstallError when sam3d or torch do not import."""
    lines = run.run([python, "-m", "sam3d_core.cli.doctor", "--json"], "checking the new environment")
    info = {}
    for line in reversed(lines):
        try:
            info = json.loads(line)
            break
        except ValueError:
            continue
    if not isinstance(info, dict) or "sam3d" not in info or "torch" not in info:
        raise InstallError(
            f"the new environment cannot import sam3d and torch ({info.get('torch_error', 'no report')}); "
            "see the log, and report it with the log attached",
            str(run.log_path),
        )
    return info


def _chmod_like_mkdir(folder: Path) -> None:
    """mkdtemp makes a folder only its owner may enter; give it the permissions a plain mkdir would."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)


def _write_marker(folder: Path, plan: InstallPlan, doctor: dict) -> None:
    record = {"version": 1, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "plan": asdict(plan),
              "doctor": doctor}  # fmt: skip
    (folder / MARKER).write_text(json.dumps(record, indent=1), encoding="utf-8")


def _move_into_place(built: Path, target: Path, replace: bool) -> None:
    """Rename the finished folder to `target`; an existing environment (replace) is moved aside first and
    removed only once the new one is in place (put back if the rename fails)."""
    old = None
    if target.exists():
        if not replace or not (target / MARKER).is_file():  # checked before the install; the folder appeared since
            shutil.rmtree(built, ignore_errors=True)
            raise InstallError(f"{target} appeared during the install; it is left as it is: choose another folder")
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    try:
        os.replace(built, target)
    except OSError as e:
        shutil.rmtree(built, ignore_errors=True)
        if old is not None:
            os.replace(old, target)
        raise InstallError(f"could not move the new environment to {target} ({e}); nothing was changed") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _rewrite_paths(target: Path, old: str) -> None:
    """The venv's scripts (pip, sam3d, activate) recorded the temporary folder's path; point them at `target`.

    Only files in bin/ (Scripts/ on Windows) and pyvenv.cfg hold it; the interpreter finds its environment
    from its own location. Windows launchers (.exe) carry the path before an appended zip, which readers
    locate from the end of the file, so the replacement keeps them working.
    """
    new = str(target)
    scripts = env_python(target).parent
    for path in [*sorted(scripts.iterdir()), target / "pyvenv.cfg"]:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 4 << 20:
            continue
        data = path.read_bytes()
        if old.encode() in data:
            path.write_bytes(data.replace(old.encode(), new.encode()))
