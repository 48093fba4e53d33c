"""`make addon`: the zip's layout, Blender's own validation, installing into bpy, register/unregister."""

from __future__ import annotations

import sys
import zipfile

import pytest
from conftest import MODULE, ROOT, load_build_module

build = load_build_module()


def test_zip_has_the_manifest_next_to_init_and_the_vendored_client(addon_zip):
    names = zipfile.ZipFile(addon_zip).namelist()
    assert "blender_manifest.toml" in names and "__init__.py" in names  # both at the archive's top
    assert {"worker_client/client.py", "worker_client/protocol.py", "core/camera.py", "demo_scene.py"} <= set(names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/." in n]
    vendored = zipfile.ZipFile(addon_zip).read("worker_client/client.py").decode()
    assert vendored.endswith((ROOT / "sam3d_core" / "serve" / "client.py").read_text())


def test_blender_validates_the_zip(addon_zip):
    ok, text = build.validate(addon_zip)
    assert ok, text


def test_validation_catches_a_bad_manifest(tmp_path):
    bad = tmp_path / "blender_manifest.toml"
    text = (ROOT / "blender_manifest.toml").read_text()
    bad.write_text(
        text.replace('tagline = "', 'tagline = "A tagline that ends with a full stop.', 1).replace(
            ' 3D objects"', ' 3D objects."', 1
        )
    )
    out = build.build_zip(tmp_path / "bad.zip", manifest=bad)
    ok, report = build.validate(out)
    assert not ok and "tagline" in report


def test_manifest_declares_licence_version_and_permissions():
    import tomllib

    m = tomllib.loads((ROOT / "blender_manifest.toml").read_text())
    assert m["license"] == ["SPDX:GPL-3.0-or-later"] and m["blender_version_min"] >= "4.2.0"
    assert set(m["permissions"]) == {"files", "network"} and "local" in m["permissions"]["network"]


def test_installed_addon_registers_and_unregisters(addon):
    import bpy  # noqa: I001 (bpy first: it puts addon_utils on sys.path)
    import addon_utils

    assert hasattr(bpy.types.Scene, "sam3d") and hasattr(bpy.ops.sam3d, "reconstruct")
    assert MODULE in bpy.context.preferences.addons
    addon_utils.disable(MODULE, default_set=True)
    try:
        assert not hasattr(bpy.types.Scene, "sam3d")
        assert MODULE not in bpy.context.preferences.addons
        with pytest.raises((AttributeError, KeyError)):
            bpy.ops.sam3d.reconstruct.get_rna_type()
    finally:
        addon_utils.enable(MODULE, default_set=True)
    assert hasattr(bpy.types.Scene, "sam3d") and MODULE in sys.modules
    assert bpy.context.preferences.addons[MODULE].preferences.bl_rna.identifier == "SAM3D_Preferences"
