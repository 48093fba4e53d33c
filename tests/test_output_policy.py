"""The output policy (sam3d_core/export/output.py) on real files: nothing the user has is ever replaced, inputs are
never written over, `--overwrite` replaces only our own earlier results, names are names, and a job that fails
part-way writes nothing. Pipeline.export runs on real tiny-model results (CPU); the CLI cases run `sam3d` itself."""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3d_core.cli.main import main
from sam3d_core.pipeline.reconstruct import Pipeline

# The policy's own names are imported inside the tests that use them, so that every case of issue 11 that goes
# through the public commands also runs (and fails) on code from before the policy existed.

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--device", "cpu", "--steps", "1", "--texture-size", "64", "--faces", "300"]
TINY += ["--max-voxels", "100", "--depth-model", "none"]


def cli(argv: list[str]) -> int:
    """`sam3d ARGV` in this process: its exit code (argparse's own errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _glb_json(path: Path) -> dict:
    data = path.read_bytes()
    assert data[:4] == b"glTF"
    length = struct.unpack("<I", data[12:16])[0]
    return json.loads(data[20 : 20 + length])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny pipeline, one photo and one reconstructed object (stage 2, textured): real results to export."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(d / "photo.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[10:40, 15:50] = 255
    Image.fromarray(mask).save(d / "mask.png")
    pipe, _ = Pipeline.load("tiny", "cpu", max_voxels=100)
    ctx = pipe.open_photo(d / "photo.png", depth_model="none")
    results = pipe.reconstruct(ctx, [d / "mask.png"], steps=1, texture_size=64, faces=300)
    assert results[0].mesh is not None and results[0].gaussians is not None
    return pipe, ctx, results, d


# ------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("bad", ["", ".", "..", "../victim", "a/b", "a\\b", "a\0b", "x" * 101, ".hidden", "-rf", "a:b"])
def test_a_name_is_never_a_path(bad):
    from sam3d_core.export.output import OutputError, check_name

    with pytest.raises(OutputError) as e:
        check_name(bad, "object name")
    assert "object name" in str(e.value)


@pytest.mark.parametrize("good", ["cup", "object_0", "sam2.1_hiera_tiny", "moge-vitl", "Tasse_2"])
def test_plain_names_pass(good):
    from sam3d_core.export.output import check_name

    assert check_name(good) == good


# ------------------------------------------------------------------------------------------------
# Pipeline.export


def test_export_adds_beside_the_users_files_and_replaces_none(made, tmp_path):
    pipe, ctx, results, _ = made
    out = tmp_path / "out"
    out.mkdir()
    (out / "object_0.glb").write_bytes(b"the user's own model")
    (out / "scene.json").write_text('{"my": "scene notes"}')
    (out / "notes.txt").write_text("keep me")
    before = _files(out)
    scene = pipe.export(ctx, results, out)
    after = _files(out)
    for name, data in before.items():
        assert after[name] == data, f"{name} was replaced"
    assert scene["scene_json"] == "scene_1.json" and scene["scene_glb"] == "scene_1.glb"
    obj = scene["objects"][0]
    assert (obj["mesh_glb"], obj["gaussians_ply"], obj["mask"]) == (
        "object_0_1.glb",
        "object_0_1.ply",
        "object_0_1_mask.png",
    )
    assert set(after) - set(before) == {"scene_1.json", "scene_1.glb", "object_0_1.glb", "object_0_1.ply"} | {
        "object_0_1_mask.png"
    }
    assert json.loads((out / "scene_1.json").read_text())["objects"][0]["mesh_glb"] == "object_0_1.glb"
    assert not [p for p in out.iterdir() if p.name.startswith(".sam3d")]  # no temporary left


def test_overwrite_replaces_only_our_own_earlier_results(made, tmp_path):
    pipe, ctx, results, _ = made
    out = tmp_path / "out"
    pipe.export(ctx, results, out)  # our earlier results: scene.json lists them
    old = {p.name: p.stat().st_ino for p in out.iterdir()}
    (out / "extra.glb").write_bytes(b"the user's, not listed by scene.json")
    extra = replace(results[0], name="extra")
    scene = pipe.export(ctx, [results[0], extra], out, overwrite=True)
    assert scene["scene_json"] == "scene.json"
    assert [o["mesh_glb"] for o in scene["objects"]] == ["object_0.glb", "extra_1.glb"]
    for name in ("scene.json", "scene.glb", "object_0.glb", "object_0.ply", "object_0_mask.png"):
        assert (out / name).stat().st_ino != old[name], f"{name} was not replaced"
    assert (out / "extra.glb").read_bytes() == b"the user's, not listed by scene.json"


def test_overwrite_does_not_take_a_scene_json_that_is_not_ours(made, tmp_path):
    pipe, ctx, results, _ = made
    out = tmp_path / "out"
    out.mkdir()
    (out / "scene.json").write_text('{"objects": ["object_0.glb"], "by": "another program"}')
    (out / "object_0.glb").write_bytes(b"theirs")
    scene = pipe.export(ctx, results, out, overwrite=True)
    assert scene["scene_json"] == "scene_1.json" and scene["objects"][0]["mesh_glb"] == "object_0_1.glb"
    assert (out / "object_0.glb").read_bytes() == b"theirs"


def test_an_input_is_never_written_over_even_when_listed_as_ours(made, tmp_path):
    pipe, ctx, results, d = made
    out = tmp_path / "out"
    pipe.export(ctx, results, out)
    mask_input = out / "object_0_mask.png"  # an earlier result, now this job's mask input
    data = mask_input.read_bytes()
    scene = pipe.export(ctx, results, out, overwrite=True, inputs=[d / "photo.png", mask_input])
    assert mask_input.read_bytes() == data
    assert scene["objects"][0]["mask"] == "object_0_1_mask.png"


def test_objects_named_scene_or_camera_keep_the_scene_glb_whole(made, tmp_path):
    """An object named "scene" used to overwrite scene.glb (and the add-on then imported the scene's camera as
    the object); one named "camera" made the export fail after all the work."""
    pipe, ctx, results, _ = made
    objs = [replace(results[0], name="scene"), replace(results[0], name="camera")]
    scene = pipe.export(ctx, objs, tmp_path / "out")
    out = tmp_path / "out"
    assert scene["scene_glb"] == "scene.glb"
    assert [o["mesh_glb"] for o in scene["objects"]] == ["scene_1.glb", "camera.glb"]
    doc = _glb_json(out / "scene.glb")
    assert sum("camera" in n for n in doc["nodes"]) == 1 and len(doc["meshes"]) == 2
    names = sorted(n["name"] for n in doc["nodes"])
    assert names == ["camera", "camera_1", "scene_1"]
    for o in scene["objects"]:  # each object file is one mesh, no camera
        single = _glb_json(out / o["mesh_glb"])
        assert len(single["nodes"]) == 1 and "cameras" not in single


def test_an_object_name_that_is_a_path_is_refused_and_nothing_is_written(made, tmp_path):
    pipe, ctx, results, _ = made
    out = tmp_path / "deep" / "out"
    with pytest.raises(ValueError, match="object name '../../escape'"):
        pipe.export(ctx, [replace(results[0], name="../../escape")], out)
    assert not (tmp_path / "escape.glb").exists() and not (tmp_path / "deep").exists()


def test_check_output_refuses_a_file_a_missing_parent_file_and_a_full_disk(made, tmp_path):
    from sam3d_core.export.output import OutputError, output_folder

    pipe, _, _, _ = made
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        pipe.check_output(tmp_path / "a_file")
    with pytest.raises(OutputError, match="a_file is a file, not a folder"):
        pipe.check_output(tmp_path / "a_file" / "out")
    folder = output_folder(tmp_path / "new" / "out")
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(OutputError, match="MB free, but about") as e:
        folder.check_room(free + (1 << 30))
    assert e.value.details["free_bytes"] <= free + (1 << 20)
    assert not (tmp_path / "new").exists()  # a check creates nothing


# ------------------------------------------------------------------------------------------------
# Single files (masks)


def test_masks_carry_our_marker_and_a_taken_name_gets_a_suffix(tmp_path):
    from sam3d_core.export.output import OutputError, is_our_png, output_file, save_mask_png

    m = np.zeros((8, 8), bool)
    m[2:5, 2:5] = True
    save_mask_png(m, tmp_path / "ours.png")
    assert is_our_png(tmp_path / "ours.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "theirs.png")
    assert not is_our_png(tmp_path / "theirs.png")
    folder, stem, suffix = output_file(tmp_path / "theirs.png")
    with folder.writer() as w:
        name = w.claim(stem, (suffix,)) + suffix
        save_mask_png(m, w.staged(name))
    assert name == "theirs_1.png" and not is_our_png(tmp_path / "theirs.png")
    with pytest.raises(OutputError, match="was not written by sam3d"):
        output_file(tmp_path / "theirs.png", overwrite=True)
    folder, stem, suffix = output_file(tmp_path / "ours.png", overwrite=True)
    with folder.writer() as w:
        assert w.claim(stem, (suffix,)) == "ours"  # ours: replaced in place


def test_cli_segment_never_replaces_the_photo(tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((48, 64, 3)) * 255).astype(np.uint8)).save(photo)
    data = photo.read_bytes()
    assert cli(["segment", str(photo), "--point", "30,20", "--out", str(photo)]) == 2
    err = capsys.readouterr().err
    assert "is one of this job's inputs" in err and err.count("\n") == 1
    assert photo.read_bytes() == data
    assert cli(["segment", str(photo), "--point", "30,20", "--out", str(photo), "--overwrite"]) == 2
    assert photo.read_bytes() == data


def test_cli_segment_adds_beside_a_users_mask(tmp_path, capsys):
    from sam3d_core.export.output import is_our_png

    pytest.importorskip("cv2")
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((48, 64, 3)) * 255).astype(np.uint8)).save(photo)
    (tmp_path / "mask.png").write_bytes(b"the user's mask")
    argv = ["segment", str(photo), "--point", "30,20", "--box", "10,10,50,40", "--backend", "basic"]
    assert cli([*argv, "--out", str(tmp_path / "mask.png")]) == 0
    assert (tmp_path / "mask.png").read_bytes() == b"the user's mask"
    assert is_our_png(tmp_path / "mask_1.png") and "mask_1.png" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# The CLI end to end


def test_cli_reconstruct_keeps_the_users_files_in_out(tmp_path, capsys):
    from sam3d_core.cli.reconstruct import EXAMPLE_MASK, EXAMPLE_PHOTO

    out = tmp_path / "out"
    out.mkdir()
    (out / "object_0.glb").write_bytes(b"an artist's model")
    (out / "scene.json").write_text('{"an": "artist file"}')
    before = _files(out)
    assert cli(["reconstruct", str(EXAMPLE_PHOTO), "--mask", str(EXAMPLE_MASK), "--out", str(out), *TINY]) == 0
    after = _files(out)
    assert all(after[k] == v for k, v in before.items())
    assert {"scene_1.json", "scene_1.glb", "object_0_1.glb", "object_0_1.ply"} <= set(after)
    assert "added beside them" in capsys.readouterr().err


def test_cli_empty_out_and_out_that_is_a_file_fail_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from sam3d_core.cli.reconstruct import EXAMPLE_MASK, EXAMPLE_PHOTO

    monkeypatch.chdir(tmp_path)
    (tmp_path / "scene.json").write_text("the user's")
    base = ["reconstruct", str(EXAMPLE_PHOTO), "--mask", str(EXAMPLE_MASK), *TINY]
    assert cli([*base, "--out", ""]) == 2
    err = capsys.readouterr().err
    assert "argument --out: is empty; give a path" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.json"]
    (tmp_path / "result").write_text("a file")
    assert cli([*base, "--out", str(tmp_path / "result")]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "model:" not in err  # refused before the model was loaded
    assert (tmp_path / "result").read_text() == "a file"


def _read_only_dir(path: Path) -> Path:
    """A folder nobody can write into, also as root (chmod, else the immutable flag); skips where neither works."""
    path.mkdir()
    path.chmod(0o555)
    try:
        (path / ".probe").write_text("x")
    except OSError:
        return path
    (path / ".probe").unlink()
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return path
    pytest.skip("cannot make a read-only folder here (root without chattr)")


def test_cli_read_only_out_fails_before_the_model_loads(tmp_path, capsys):
    from sam3d_core.cli.reconstruct import EXAMPLE_MASK, EXAMPLE_PHOTO

    ro = _read_only_dir(tmp_path / "ro")
    try:
        rc = cli(["reconstruct", str(EXAMPLE_PHOTO), "--mask", str(EXAMPLE_MASK), "--out", str(ro / "out"), *TINY])
        err = capsys.readouterr().err
        assert rc == 2 and "cannot write into --out folder" in err and "model:" not in err
        assert err.count("\n") == 1
    finally:
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
        ro.chmod(0o755)


def _limit_file_size(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_cli_run_that_fails_writing_leaves_nothing(tmp_path):
    """A full disk in the middle of the files (a file-size limit: the GLB fits, the PLY does not) used to leave
    object_0.glb and a truncated object_0.ply; now nothing is left, and the error is one line."""
    from sam3d_core.cli.reconstruct import EXAMPLE_MASK, EXAMPLE_PHOTO

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAM3D_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "sam3d_core.cli", "reconstruct", str(EXAMPLE_PHOTO), "--mask", str(EXAMPLE_MASK)]
    cmd += ["--out", str(out), *TINY]
    run = subprocess.run(
        cmd, env=env, cwd=tmp_path, capture_output=True, text=True, preexec_fn=_limit_file_size(150_000), timeout=600
    )
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("sam3d: error:") and "file-size limit" in last
    assert "Traceback" not in run.stderr
    assert not out.exists()  # the folder this run would have made is gone too
