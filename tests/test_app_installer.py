"""The first-run installer: plans, the checks that refuse before anything is written, a cut network and a
cancel that leave nothing behind, and (slow) a real worker environment made from the package registries."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sam3d_core.serve import installer as I
from sam3d_core.version import __version__

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9/simple"  # the discard port: nothing listens, the connection is refused


def _offline_env() -> dict:
    """pip with no configuration and no local wheels: only the (unreachable) index given on its command line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_RETRIES"] = "0"
    return env


def test_versions_and_names_agree_with_the_project():
    assert I.PACKAGE_VERSION == __version__
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^TORCH\s*\?=\s*(\S+)", makefile, re.M).group(1) == I.TORCH_VERSION
    assert re.search(r'^name = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1) == I.DIST_NAME
    assert I.source_checkout() == ROOT


def test_gpu_detection_and_the_torch_build():
    table = "| NVIDIA-SMI 550.54   Driver Version: 550.54   CUDA Version: 12.4 |"
    gpu = I.parse_nvidia_smi(table, "NVIDIA GeForce RTX 4090\n")
    assert gpu == I.GpuInfo("nvidia", "NVIDIA GeForce RTX 4090", (12, 4))
    assert I.parse_nvidia_smi("", "") == I.GpuInfo("none")
    plan = I.torch_plan(gpu, platform="linux")
    assert (plan.build, plan.index_url, plan.requirement) == ("cu118", f"{I.PYTORCH_INDEX}/cu118", "torch==2.13.0")
    assert I.torch_plan(I.GpuInfo("nvidia", "H100", (12, 9)), platform="linux").build == "cu128"
    assert I.torch_plan(I.GpuInfo("nvidia", "x", (13, 0)), platform="win32").build == "cu128"
    assert I.torch_plan(I.GpuInfo("none"), platform="linux").index_url == f"{I.PYTORCH_INDEX}/cpu"
    assert I.torch_plan(I.GpuInfo("apple", "Apple silicon"), platform="darwin").index_url is None
    with pytest.raises(I.InstallError, match="update the NVIDIA driver"):
        I.torch_plan(I.GpuInfo("nvidia", "old", (10, 2)), platform="linux")
    plan = I.plan_install("/tmp/x", gpu=I.GpuInfo("none"))
    assert plan.package == f"{ROOT}[export,segment]"  # from this checkout, with the extras the worker needs


def test_refuses_a_taken_target_and_too_little_disk(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    plan = I.plan_install(tmp_path / "mine", gpu=I.GpuInfo("none"), replace=True)
    with pytest.raises(I.InstallError, match="is not a sam3d worker environment; it is never replaced") as e:
        I.install(plan)
    assert e.value.kind == "target" and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(I.InstallError, match=r"only [\d.]+ GB free in .*free some disk space") as e:
        I.check_disk(tmp_path, need_gb=1e9)
    assert e.value.kind == "disk"


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_no_network_before_anything_is_written(tmp_path):
    plan = I.plan_install(tmp_path / "env", gpu=I.GpuInfo("none"), index_url=UNREACHABLE, torch_index=UNREACHABLE)
    with pytest.raises(I.InstallError) as e:
        I.install(plan, env=_offline_env())
    assert e.value.kind == "network"
    assert f"cannot reach the package index {UNREACHABLE}" in e.value.message
    assert "connect this computer to the internet" in e.value.message
    assert _left(tmp_path) == ["env-install.log"]  # the log stays, nothing else


def test_network_cut_during_the_install_leaves_nothing(tmp_path):
    """The venv is made, then pip cannot download: the message names the fix and the folder is removed."""
    plan = I.plan_install(tmp_path / "env", gpu=I.GpuInfo("none"), index_url=UNREACHABLE, torch_index=UNREACHABLE)
    steps = []
    with pytest.raises(I.InstallError) as e:
        I.install(plan, env=_offline_env(), check_network=False, progress=lambda s, f, m: steps.append(s))
    assert e.value.kind == "network", e.value.message
    assert e.value.message.startswith("no network while installing torch==2.13.0 (cannot reach the package index")
    assert "connect this computer to the internet" in e.value.message
    assert {"venv", "torch"} <= set(steps)
    assert _left(tmp_path) == ["env-install.log"]
    log = (tmp_path / "env-install.log").read_text()
    assert "FAILED: no network" in log and "Connection refused" in log


def test_cancel_removes_the_partial_environment(tmp_path):
    cancel = threading.Event()

    def progress(step, fraction, message):
        if step == "torch":
            cancel.set()

    plan = I.plan_install(tmp_path / "env", gpu=I.GpuInfo("none"), torch_index=None)
    with pytest.raises(I.InstallError, match="cancelled") as e:
        I.install(plan, progress=progress, cancel=cancel, check_network=False)
    assert e.value.kind == "cancelled"
    assert _left(tmp_path) == ["env-install.log"]


@pytest.mark.slow
def test_installer_makes_a_working_worker_environment(tmp_path):
    """From the package registries (pip's configuration as it is here; CPU torch), into a temporary folder, then
    `sam3d doctor` with the new environment's own command. About 45 s with a warm pip cache on 2 cores."""
    plan = I.plan_install(tmp_path / "worker-env", gpu=I.GpuInfo("none"), torch_index=None)
    fractions = []
    result = I.install(plan, progress=lambda s, f, m: fractions.append(f))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert _left(tmp_path) == ["worker-env", "worker-env-install.log"]
    assert result.python == str(tmp_path / "worker-env" / "bin" / "python")
    assert I.installed_python(tmp_path / "worker-env") == result.python
    exe = tmp_path / "worker-env" / "bin" / "sam3d"  # its script points at the final folder, not the temporary one
    out = subprocess.run([str(exe), "doctor", "--json"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["sam3d"] == __version__ and info["torch"].startswith(I.TORCH_VERSION)
    assert info["executable"] == result.python and info["cuda"] is False
    marker = json.loads((tmp_path / "worker-env" / I.MARKER).read_text())
    assert marker["plan"]["package"] == f"{ROOT}[export,segment]" and marker["doctor"]["torch"] == info["torch"]
    with pytest.raises(I.InstallError, match="already exists \\(a sam3d worker environment\\)"):
        I.install(plan)
    print(f"install took {result.seconds} s: {result.steps}", file=sys.stderr)
