"""First run in Blender: the add-on asks for online access before any download, runs the vendored installer,
and finds the environment it made. (The full install itself is tested in tests/test_app_installer.py.)"""

from __future__ import annotations

import os
import sys
import time
import zipfile

import bpy
import pytest
from conftest import MODULE

UNREACHABLE = "http://127.0.0.1:9/simple"


@pytest.fixture
def online(addon):
    system = bpy.context.preferences.system
    saved = system.use_online_access
    yield system
    system.use_online_access = saved


def test_the_installer_is_vendored_into_the_extension(addon, addon_zip):
    with zipfile.ZipFile(addon_zip) as z:
        assert "worker_client/installer.py" in z.namelist()
    installer = sys.modules[MODULE].install.installer
    # installed from the zip (outside any checkout): sam3d comes from the package index, at the add-on's version
    assert installer.source_checkout() is None
    plan = installer.plan_install("/tmp/unused", gpu=installer.GpuInfo("none"))
    assert plan.package == f"sam3d-kit[export,segment]=={installer.PACKAGE_VERSION}"


def test_no_download_without_online_access(addon, online, tmp_path):
    online.use_online_access = False
    assert not bpy.app.online_access
    target = tmp_path / "env"
    with pytest.raises(RuntimeError):  # the operator reports the error and cancels
        bpy.ops.sam3d.install_worker(target=str(target))
    status = bpy.context.window_manager["sam3d_install_status"]
    assert "online access is off" in status and "Allow Online Access" in status
    assert list(tmp_path.iterdir()) == []


def test_no_network_gives_the_fix_and_leaves_nothing(addon, online, tmp_path):
    online.use_online_access = True
    install = addon.install
    install.start(None, str(tmp_path / "env"), index_url=UNREACHABLE, torch_index=UNREACHABLE)
    deadline = time.monotonic() + 120
    while install.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not install.running()
    install._timer()  # what Blender's timer does next: the status for the preferences
    status = bpy.context.window_manager["sam3d_install_status"]
    assert f"cannot reach the package index {UNREACHABLE}" in status and "nothing was left installed" in status
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env-install.log"]


def test_setup_finds_the_environment_the_first_run_made(addon, tmp_path):
    from sam3d_blender.core import setup

    env_dir = tmp_path / "home" / "worker-env"
    python = env_dir / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    environ = {"SAM3D_HOME": str(tmp_path / "home"), "PATH": ""}
    assert setup.find_worker_python(None, environ) == []  # no marker: not a finished environment
    (env_dir / "sam3d-worker-env.json").write_text("{}")
    found = setup.find_worker_python(None, environ)
    assert [(c.python, c.source) for c in found] == [(str(python), "the worker environment made at first run")]
    assert os.path.isfile(found[0].python)
