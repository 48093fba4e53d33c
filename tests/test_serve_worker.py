"""A real `sam3d serve` worker subprocess (tiny random model, CPU) driven through WorkerClient."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3d_core.serve import protocol as P
from sam3d_core.serve.client import JobCancelled, WorkerClient, WorkerError

REPO = Path(__file__).resolve().parent.parent
WORKER_ARGS = ("-m", "sam3d_core.serve", "--max-voxels", "200")  # few voxels: stage 2 stays quick on a CPU


def _start(home: Path, logs: list[str]) -> WorkerClient:
    env = {**os.environ, "SAM3D_HOME": str(home)}  # an empty data folder: no imported weights -> tiny model
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return WorkerClient(sys.executable, args=WORKER_ARGS, env=env, cwd=str(REPO), log=logs.append)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("serve_inputs")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(d / "photo.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[10:40, 15:50] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(d / "empty_mask.png")
    Image.fromarray(np.full((24, 32), 255, np.uint8)).save(d / "small_mask.png")
    (d / "not_an_image.png").write_text("hello")
    return {p.stem: p for p in d.iterdir()} | {"dir": d}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    logs: list[str] = []
    client = _start(tmp_path_factory.mktemp("sam3d_home"), logs)
    client.logs = logs
    yield client
    rc = client.close()
    assert rc == 0, "\n".join(logs)
    assert client.protocol_errors == []  # every stdout line of the whole session parsed as a protocol message


def _reconstruct(client: WorkerClient, files, out: Path, **opts):
    return client.reconstruct(str(files["photo"]), str(files["mask"]), str(out), **opts)


def test_hello_handshake(worker):
    hello = worker.hello(timeout=120)
    assert hello["v"] == P.PROTOCOL_VERSION and hello["protocol"] == P.PROTOCOL_VERSION
    assert hello["ready"] and hello["model_error"] is None
    assert hello["weights"] == "random:0+random:1" and "tiny" in hello["model"] and hello["device"] == "cpu"
    assert {"reconstruct", "cancel"} <= set(hello["capabilities"])
    assert worker.status()["state"] == "idle"


def test_reconstruct_reports_progress_and_writes_glb(worker, files, tmp_path):
    job = _reconstruct(worker, files, tmp_path / "out", seed=3, steps=2, stage2=False, voxels=True)
    events = list(job.events(timeout=120))
    final = events[-1]
    assert final["type"] == "result", final
    progress = [(e["stage"], e["step"], e["total"]) for e in events[:-1]]
    assert all(e["type"] == "progress" and e["id"] == job.id for e in events[:-1])
    assert progress == [("preprocess", 0, 1), ("stage1", 0, 2), ("stage1", 1, 2), ("stage1", 2, 2), ("export", 0, 1)]
    glb = Path(final["glb"])
    assert glb.is_absolute() and glb.is_file() and glb.read_bytes()[:4] == b"glTF"
    assert Path(final["scene"]).is_file() and final["num_voxels"] > 0
    assert set(final["pose"]) >= {"rotation_wxyz", "translation", "scale", "matrix"}
    assert final["settings"]["seed"] == 3 and final["settings"]["stage1"]["steps"] == 2
    assert job.result() is final and job.poll() == []


def test_reconstruct_textured_mesh_with_blender_placement(worker, files, tmp_path):
    """Stage 2, clean-up, UV bake and placement: a textured GLB, the Gaussians and ready Blender matrices."""
    import trimesh

    job = _reconstruct(worker, files, tmp_path / "out", seed=1, steps=2, texture_size=64, faces=500, name="cup")
    events = list(job.events(timeout=300))
    final = events[-1]
    assert final["type"] == "result", final
    stages = [e["stage"] for e in events[:-1]]
    assert stages.index("stage1") < stages.index("stage2") < stages.index("postprocess") < stages.index("bake")
    assert stages[-1] == "export"
    mesh = trimesh.load(final["mesh_glb"], force="mesh")
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals) and mesh.visual.uv is not None
    assert mesh.visual.material.baseColorTexture.size == (64, 64)
    assert Path(final["gaussians_ply"]).is_file() and Path(final["mask"]).is_file()
    m = np.array(final["blender"]["object_matrix_world"])
    assert m.shape == (4, 4) and np.allclose(m[3], [0, 0, 0, 1])
    cam = final["blender"]["camera"]
    assert cam["resolution_x"] == 64 and cam["resolution_y"] == 48 and cam["lens_mm"] > 0
    assert 0.0 <= final["mask_iou"] <= 1.0
    assert Path(final["mesh_glb"]).name == "cup.glb" and Path(final["scene_glb"]).is_file()


def test_reconstruct_without_stage2_projects_the_photo(worker, files, tmp_path):
    """stage2: false -> stage 1's shape with the photo projected as its texture: mesh_glb, no Gaussians."""
    import trimesh

    job = _reconstruct(worker, files, tmp_path / "out", seed=1, steps=1, stage2=False, texture_size=64, faces=300)
    events = list(job.events(timeout=300))
    final = events[-1]
    assert final["type"] == "result", final
    stages = [e["stage"] for e in events[:-1]]
    assert "stage2" not in stages and stages.index("stage1") < stages.index("postprocess") < stages.index("bake")
    mesh = trimesh.load(final["mesh_glb"], force="mesh")
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals) and len(mesh.faces) <= 300
    assert mesh.visual.material.baseColorTexture.size == (64, 64)
    assert "gaussians_ply" not in final and "glb" not in final and final["settings"]["texture"].startswith("projected")
    assert "projected_texture" in worker.hello()["capabilities"]


def test_the_layout_refinement_field_reaches_the_pipeline(worker, files, tmp_path):
    """refine_layout: absent = auto (the worker's photo has no depth: not run, and says why); true = tried, skipped
    on the fallback plane; both recorded in the result's settings (pipeline/layout.py)."""
    records = {}
    for key, extra in (("auto", {}), ("on", {"refine_layout": True})):
        job = _reconstruct(worker, files, tmp_path / key, steps=1, stage2=False, voxels=True, **extra)
        final = job.result(timeout=300)
        assert final["type"] == "result", final
        records[key] = final["settings"]["layout_refine"]
    assert records["auto"] == {"mode": "auto", "ran": False, "why": "no depth: the point map is the fallback plane"}
    assert records["on"]["mode"] == "on" and records["on"]["ran"] is False and "fallback" in records["on"]["skipped"]
    assert "refine_layout" in worker.hello()["capabilities"]


def test_open_photo_and_segment_requests(worker, files, tmp_path):
    pytest.importorskip("sam3d_core.segment.session", reason="the worker's segment lane needs segment.session")
    info = worker.open_photo(str(files["photo"])).result(timeout=60)
    assert info["type"] == "photo" and (info["width"], info["height"]) == (64, 48)
    assert info["intrinsics_source"] == "default_fov" and len(info["K"]) == 3
    assert info["blender_camera"]["resolution_x"] == 64 and info["segmenter"]["name"]
    res = worker.segment(
        str(files["photo"]), str(tmp_path / "m.png"), points=[[32, 25, 1]], box=[15, 10, 50, 40]
    ).result(timeout=60)
    mask = np.asarray(Image.open(res["mask"]))
    assert mask.shape == (48, 64) and res["area"] == int((mask > 127).sum()) > 0
    again = worker.segment(
        str(files["photo"]), str(tmp_path / "m2.png"), points=[[32, 25, 1], [20, 15, 0]], previous=res["mask"]
    ).result(timeout=60)
    assert Path(again["mask"]).is_file()
    with pytest.raises(WorkerError) as info:
        worker.segment(str(files["photo"]), str(tmp_path / "m3.png"), points=[[640, 25, 1]]).result(timeout=60)
    assert info.value.code == "bad_input" and "outside" in info.value.message
    every = worker.segment_all(str(files["photo"]), str(tmp_path / "all"), max_objects=3).result(timeout=60)
    assert len(every["masks"]) <= 3 and all(Path(p).is_file() for p in every["masks"])


def test_cancel_running_and_queued_jobs(worker, files, tmp_path):
    long = _reconstruct(worker, files, tmp_path / "long", steps=25)
    queued = _reconstruct(worker, files, tmp_path / "queued", steps=2)
    after = _reconstruct(worker, files, tmp_path / "after", steps=2, stage2=False, voxels=True)
    status = worker.status()
    assert status["state"] == "busy" and status["queued"][-1] == after.id
    assert status["running"] is None or status["running"]["id"] == long.id
    queued.cancel()  # still queued behind `long`: removed without running
    for ev in long.events(timeout=120):
        if ev["type"] == "progress" and ev["stage"] == "stage1" and ev["step"] >= 1:
            long.cancel()
            break
    with pytest.raises(JobCancelled):
        long.result(timeout=60)
    assert long.final["type"] == "cancelled" and long.final["stage"] == "stage1"
    steps_seen = [e["step"] for e in long.poll() if e["type"] == "progress" and e["stage"] == "stage1"]
    assert not steps_seen or max(steps_seen) < 25  # stopped within the sampling loop
    with pytest.raises(JobCancelled):
        queued.result(timeout=10)
    assert queued.final["stage"] == "queued"
    assert not (tmp_path / "long").exists() and not (tmp_path / "queued").exists()
    assert Path(after.result(timeout=120)["glb"]).is_file()  # the worker goes on with the next job


@pytest.mark.parametrize(
    "photo, mask, words",
    [
        ("missing", "mask", ["does not exist"]),
        ("not_an_image", "mask", ["not_an_image.png"]),
        ("photo", "empty_mask", ["empty"]),
        ("photo", "small_mask", ["32x24", "64x48"]),
    ],
)
def test_bad_input_is_reported_and_worker_survives(worker, files, tmp_path, photo, mask, words):
    path = {k: str(files[k]) if k in files else str(files["dir"] / f"{k}.png") for k in (photo, mask)}
    job = worker.reconstruct(path[photo], path[mask], str(tmp_path / "out"), steps=2, stage2=False)
    with pytest.raises(WorkerError) as info:
        job.result(timeout=60)
    assert info.value.code == "bad_input"
    for w in words:
        assert w in info.value.message
    assert worker.status()["state"] in ("idle", "busy") and worker.alive()


def test_bad_requests(worker):
    job = worker.submit({"type": "texture"})
    with pytest.raises(WorkerError) as info:
        job.result(timeout=10)
    assert info.value.code == "bad_request" and "texture" in info.value.message
    job = worker.submit({"v": 99, "type": "hello"})
    with pytest.raises(WorkerError) as info:
        job.result(timeout=10)
    assert info.value.code == "version_mismatch" and info.value.details["got"] == 99
    job = worker.submit({"type": "reconstruct", "photo": "p.png"})
    with pytest.raises(WorkerError) as info:
        job.result(timeout=10)
    assert info.value.code == "bad_request" and '"mask"' in info.value.message
    # a line that is not JSON: answered with id null, and the worker keeps serving
    worker._proc.stdin.write(b"this is not json\n")
    worker._proc.stdin.flush()
    assert worker.status()["state"] == "idle"
    assert any(m["type"] == "error" and m["id"] is None and m["code"] == "bad_request" for m in worker.stray)


def test_missing_weights_and_out_of_memory_in_process(tmp_path, monkeypatch):
    """Paths a CPU test cannot reach with a real model: driven through a Worker object in this process."""
    import io

    import torch

    from sam3d_core.serve.worker import Job, LoadedModel, Worker, load_model

    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    missing = load_model("official", "cpu")
    assert missing.pipe is None and missing.error.code == "missing_weights"
    assert "sam3d weights import" in missing.error.message
    out = io.BytesIO()
    w = Worker(missing, out)
    w.handle_line(b'{"v":1,"id":"h","type":"hello"}')
    w.handle_line(b'{"v":1,"id":"r","type":"reconstruct","photo":"p","mask":"m","out":"o"}')
    hello, err = (P.decode_response(line) for line in out.getvalue().splitlines())
    assert hello["ready"] is False and hello["model_error"]["code"] == "missing_weights"
    assert err["id"] == "r" and err["code"] == "missing_weights"

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    from sam3d_core.pipeline.reconstruct import Pipeline

    pipe, which = Pipeline.load("tiny", "cpu", max_voxels=100)
    pipe.stage1.sample = oom
    w = Worker(LoadedModel(pipe, which), io.BytesIO())
    photo = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(photo)
    m = np.zeros((40, 40), np.uint8)
    m[10:30, 10:30] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    req = P.request("reconstruct", id="j", photo=str(photo), mask=str(tmp_path / "m.png"), out=str(tmp_path))
    msg = w.run_job(Job("j", req))
    assert msg["type"] == "error" and msg["code"] == "out_of_memory" and msg["details"]["stage"] == "stage1"
    assert "low-VRAM" in msg["message"]


def test_worker_killed_mid_job_is_reported(files, tmp_path):
    logs: list[str] = []
    client = _start(tmp_path / "home", logs)
    try:
        job = _reconstruct(client, files, tmp_path / "out", steps=25)
        first = next(job.events(timeout=120))
        assert first["type"] == "progress"
        client.kill()
        with pytest.raises(WorkerError) as info:
            job.result(timeout=30)
        e = info.value
        assert e.code == "internal" and "exited unexpectedly" in e.message and "Restart" in e.message
        assert e.details["returncode"] is not None and e.details["returncode"] != 0
        assert not client.alive()
        late = client.submit({"type": "status"})  # fails at once, without blocking
        assert late.done() and late.final["code"] == "internal"
    finally:
        client.close(timeout=5)
    assert client.protocol_errors == []


def test_shutdown_cancels_the_running_job(worker, files, tmp_path):
    # Runs last in this module (pytest keeps file order): it stops the shared worker.
    job = _reconstruct(worker, files, tmp_path / "out", steps=25)
    assert next(job.events(timeout=120))["type"] == "progress"
    t0 = time.perf_counter()
    assert worker.close(timeout=60) == 0, "\n".join(worker.logs)
    assert job.final["type"] == "cancelled" and time.perf_counter() - t0 < 30
    assert not worker.alive()
