"""`sam3d batch`: a folder of tiny photos with the tiny model on the CPU, in one process and in two real torchrun
processes (gloo); a killed run resumes where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3d_core.cli.batch import summary_table
from sam3d_core.cli.reconstruct import EXAMPLE_MASK, EXAMPLE_PHOTO
from sam3d_core.pipeline.batch import PARTIAL_PREFIX, find_photos, photo_state

pytest.importorskip("trimesh")
pytest.importorskip("cv2")  # the basic segmenter, for the photo without masks

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "tiny", "--device", "cpu", "--steps", "1", "--texture-size", "64", "--faces", "200"]
ARGS += ["--max-voxels", "100", "--max-objects", "1", "--depth-model", "none"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """a.png + a_mask.png; b.jpg + b_mask_cup.png + b_mask_2.png (two objects); c.png (segmented); broken.png."""
    d = tmp_path_factory.mktemp("photos")
    im, m = Image.open(EXAMPLE_PHOTO).convert("RGB"), Image.open(EXAMPLE_MASK).convert("L")
    im.resize((150, 100)).save(d / "a.png")
    m.resize((150, 100)).save(d / "a_mask.png")
    im.crop((100, 50, 500, 350)).resize((160, 120)).save(d / "b.jpg", quality=95)
    m.crop((100, 50, 500, 350)).resize((160, 120)).save(d / "b_mask_cup.png")
    box = np.zeros((120, 160), np.uint8)
    box[10:60, 10:70] = 255
    Image.fromarray(box).save(d / "b_mask_2.png")
    im.crop((200, 100, 520, 340)).resize((128, 96)).save(d / "c.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    return d


def _cli(photos: Path, out: Path, *extra: str, procs: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sam3d_core.cli", "batch", str(photos), "--out", str(out), *ARGS, *extra]
    if procs > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "sam3d_core.cli"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _finish(p: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def test_photos_masks_and_object_names(photos):
    jobs = find_photos(photos)
    assert [j.photo.name for j in jobs] == ["a.png", "b.jpg", "broken.png", "c.png"]  # masks are not photos
    assert [m.name for m in jobs[0].masks] == ["a_mask.png"] and jobs[0].object_names() == ["object_0"]
    assert [m.name for m in jobs[1].masks] == ["b_mask_2.png", "b_mask_cup.png"]
    assert jobs[1].object_names() == ["object_0", "cup"]
    assert jobs[3].masks == () and [j.name for j in jobs] == ["a", "b", "broken", "c"]


def test_same_stem_photos_get_their_own_folders(tmp_path):
    for name in ("kitchen.jpg", "kitchen.png", "kitchen_mask.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    jobs = find_photos(tmp_path)
    assert [(j.name, len(j.masks)) for j in jobs] == [("kitchen.jpg", 1), ("kitchen.png", 1)]
    with pytest.raises(FileNotFoundError, match="missing: no such folder"):
        find_photos(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no photos"):
        find_photos(tmp_path / "empty")


@pytest.fixture(scope="module")
def one_process(photos, tmp_path_factory):
    """One process, killed once the first photo is written, then run again to the end."""
    out = tmp_path_factory.mktemp("one") / "out"
    p = _cli(photos, out)
    deadline = time.monotonic() + 600
    while not any((out / n / "scene.json").is_file() for n in ("a", "b", "c")) and p.poll() is None:
        assert time.monotonic() < deadline, "the first photo took more than 10 minutes"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done_at_kill = {n: photo_state(out, n) for n in ("a", "b", "c")}
    stamps = {n: (out / n / "scene.json").stat().st_mtime_ns for n, s in done_at_kill.items() if s == "done"}
    (out / f"{PARTIAL_PREFIX}b-left-by-a-crash").mkdir(exist_ok=True)  # as a kill during the writing leaves
    code, stdout, stderr = _finish(_cli(photos, out))
    return out, done_at_kill, stamps, code, stdout, stderr


def test_a_killed_run_resumes_where_it_stopped(one_process):
    out, done_at_kill, stamps, code, stdout, stderr = one_process
    finished = sum(s == "done" for s in done_at_kill.values())
    assert finished in (1, 2), done_at_kill  # killed in the middle
    assert code == 2, stderr  # broken.png failed (and only it)
    summary = json.loads((out / "batch_summary.json").read_text())
    status = {r["photo"]: r["status"] for r in summary["photos"]}
    for name, state in done_at_kill.items():
        photo = {"a": "a.png", "b": "b.jpg", "c": "c.png"}[name]
        assert status[photo] == ("skipped" if state == "done" else "done")
    assert status["broken.png"] == "failed"
    broken = next(r for r in summary["photos"] if r["photo"] == "broken.png")
    assert "broken.png" in broken["error"] and "broken.png" in stdout
    for name, stamp in stamps.items():  # finished photos were not written again
        assert (out / name / "scene.json").stat().st_mtime_ns == stamp
    assert not list(out.glob(PARTIAL_PREFIX + "*"))  # the crash's temporary folder is gone
    scene = json.loads((out / "b" / "scene.json").read_text())
    assert [o["name"] for o in scene["objects"]] == ["object_0", "cup"]
    assert not list((out / "b").glob("*.ply"))  # Gaussians only with --ply
    assert len(json.loads((out / "c" / "scene.json").read_text())["objects"]) == 1  # segmented


def _comparable(scene: dict) -> dict:
    """scene.json without the measured times (and the seconds inside the mesh report)."""
    objects = [{k: v for k, v in o.items() if k not in ("timings", "mesh_report")} for o in scene["objects"]]
    return {**scene, "objects": objects}


def test_two_torchrun_processes_equal_one_process(photos, one_process, tmp_path):
    single = one_process[0]
    out = tmp_path / "out"
    code, stdout, stderr = _finish(_cli(photos, out, procs=2))
    assert code != 0 and "broken.png" in stdout  # rank 0 reports the failed photo
    summary = json.loads((out / "batch_summary.json").read_text())
    ranks = {r["photo"]: r.get("rank") for r in summary["photos"]}
    assert sorted(ranks) == ["a.png", "b.jpg", "broken.png", "c.png"] and set(ranks.values()) == {0, 1}
    for name in ("a", "b", "c"):
        files = sorted(p.name for p in (single / name).iterdir())
        assert files == sorted(p.name for p in (out / name).iterdir())
        for f in files:
            if f.endswith(".json"):
                a, b = (json.loads((d / name / f).read_text()) for d in (single, out))
                assert _comparable(a) == _comparable(b)
            else:
                assert (single / name / f).read_bytes() == (out / name / f).read_bytes(), f"{name}/{f}"


def test_a_folder_that_is_not_ours_is_left_alone(photos, tmp_path):
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "keep.txt").write_text("mine")
    only_a = tmp_path / "only_a"
    only_a.mkdir()
    for name in ("a.png", "a_mask.png"):
        (only_a / name).write_bytes((photos / name).read_bytes())
    code, stdout, _ = _finish(_cli(only_a, out))
    assert code == 2 and "not a finished photo" in stdout
    assert sorted(p.name for p in (out / "a").iterdir()) == ["keep.txt"]


def test_summary_table_counts():
    records = [
        {"photo": "a.png", "status": "done", "objects": 2, "seconds": 4.0},
        {"photo": "b.png", "status": "skipped", "objects": None, "seconds": 0.0},
        {"photo": "c.png", "status": "failed", "objects": None, "seconds": 0.1, "error": "c.png: unreadable"},
    ]
    table = summary_table(records)
    assert table.splitlines()[0].split() == ["photo", "status", "objects", "seconds", "note"]
    assert "c.png: unreadable" in table
    assert table.splitlines()[-1] == "1 done (2 objects, 2.0 s per object), 1 skipped (done before), 1 failed"
