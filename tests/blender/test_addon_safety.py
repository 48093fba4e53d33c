"""The add-on never loses a user's file (issue 11): temporary masks go into a private mkdtemp folder (no predictable
path in the system temp folder, no planted link followed), a photo over the worker's pixel limit is refused before
Blender loads it, and an object named "scene" arrives as a mesh (not as the scene GLB with its camera)."""

from __future__ import annotations

import os
import stat
import struct
import tempfile
import time
import zlib

import bpy
import pytest
from conftest import MASK, PHOTO

TIMEOUT = 180.0


def _wait_ready(addon) -> None:
    s = addon.session.SESSION
    deadline = time.monotonic() + TIMEOUT
    while s.poll() == "starting" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.state == "ready", s.error


def test_masks_go_to_a_private_folder_and_never_through_a_planted_link(
    addon, clean_scene, worker_prefs, tmp_path, monkeypatch
):
    """With no output folder and an unsaved .blend the add-on used to write masks to
    <temp>/sam3d_blender/<photo>/draft_N.png, following a link planted there: its target was overwritten."""
    if bpy.data.filepath:
        pytest.skip("this session has a saved .blend; the temporary folder is not used")
    worker_prefs.output_dir = ""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))  # the "system temp folder" of this test
    monkeypatch.setattr(addon.session, "_PRIVATE_DIR", [], raising=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("an artist's file")
    planted = systmp / "sam3d_blender" / PHOTO.stem
    planted.mkdir(parents=True)
    for n in range(1, 200):  # every draft name the old predictable path could take
        os.symlink(victim, planted / f"draft_{n}.png")

    assert bpy.ops.sam3d.open_photo(filepath=str(PHOTO)) == {"FINISHED"}
    _wait_ready(addon)
    assert bpy.ops.sam3d.add_prompt(x=300, y=250, label=1) == {"FINISHED"}
    assert addon.session.run_until_idle(TIMEOUT)
    props = bpy.context.scene.sam3d
    assert props.draft_mask and os.path.isfile(props.draft_mask), props.status
    assert victim.read_text() == "an artist's file"
    draft = os.path.realpath(props.draft_mask)
    assert not draft.startswith(str(planted)) and draft.startswith(str(systmp))
    private = os.path.dirname(os.path.dirname(draft))  # <private>/<photo stem>/draft_N.png
    assert os.path.basename(private).startswith("sam3d_blender_") and private != str(systmp / "sam3d_blender")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700  # only this user can enter (mkdtemp)
    assert bpy.ops.sam3d.add_object() == {"FINISHED"}  # the draft becomes an item: a fresh copy beside it
    for item in props.items:
        assert os.path.realpath(bpy.path.abspath(item.mask)).startswith(private)
    assert victim.read_text() == "an artist's file"


def _png_header(path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def test_a_photo_over_the_pixel_limit_is_refused_before_blender_loads_it(addon, clean_scene, tmp_path):
    """A 30000 x 30000 photo, refused by the CLI and the worker, used to be opened (3.7 GB, render size 30000^2)."""
    scene = clean_scene
    scene.render.resolution_x, scene.render.resolution_y = 640, 480
    big = tmp_path / "huge.png"
    _png_header(big, 30000, 30000)
    with pytest.raises(RuntimeError, match="above the limit of 100,000,000"):  # the operator reports an ERROR
        bpy.ops.sam3d.open_photo(filepath=str(big))
    props = scene.sam3d
    assert "above the limit of 100,000,000" in props.status and props.status_level == "ERROR"
    assert not any(img.filepath and "huge.png" in img.filepath for img in bpy.data.images)
    assert (scene.render.resolution_x, scene.render.resolution_y) == (640, 480) and not props.photo


def test_an_object_named_scene_arrives_as_a_mesh(addon, clean_scene, worker_prefs):
    """The worker used to write the object "scene" as scene.glb and then the placed scene over it: the add-on
    imported the scene (with its camera) as the object."""
    worker_prefs.textured = True
    assert bpy.ops.sam3d.open_photo(filepath=str(PHOTO)) == {"FINISHED"}
    assert bpy.ops.sam3d.add_mask(filepath=str(MASK), name="scene") == {"FINISHED"}
    assert bpy.ops.sam3d.reconstruct() == {"FINISHED"}
    assert addon.session.run_until_idle(TIMEOUT)
    item = bpy.context.scene.sam3d.items["scene"]
    assert item.status == "DONE", item.message
    obj = item.object
    parts = [obj, *obj.children_recursive]
    assert any(o.type == "MESH" for o in parts) and not any(o.type == "CAMERA" for o in parts)
    assert os.path.basename(obj["sam3d_file"]) == "scene_1.glb"
    assert [o.name for o in bpy.data.objects if o.type == "CAMERA"] == [bpy.context.scene.sam3d.camera.name]
