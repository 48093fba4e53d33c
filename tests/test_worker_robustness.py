"""The worker never dies and never loses a file (issue 11): a real `sam3d serve` process (tiny model, CPU).

* property test: random bytes, random JSON and random nesting, a bounded number of lines
  ($SAM3D_FUZZ_LINES, default 300, seeded by $SAM3D_FUZZ_SEED): every line is answered, the worker stays alive;
* requests with bad values (NUL in a path, numbers beyond a double, only exclusion clicks) are `bad_request`;
* a segment `out` that is the photo is refused and the photo kept; an object named "scene" keeps scene.glb whole;
* a broken manifest.json in the models folder does not stop reconstructions;
* a job that fails writing (a file-size limit: the disk "fills up" after the GLB) leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import queue
import random
import struct
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3d_core.serve import protocol as P
from sam3d_core.serve.client import WorkerClient, WorkerError

REPO = Path(__file__).resolve().parent.parent
WORKER_ARGS = ("-m", "sam3d_core.serve", "--max-voxels", "100")
TIMEOUT = 300


def _env(home: Path) -> dict:
    env = {**os.environ, "SAM3D_HOME": str(home)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _broken_home(root: Path) -> Path:
    """A data folder whose only model has a cut-off manifest.json (it used to break every reconstruct)."""
    broken = root / "home" / "models" / "official"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text('{"format": 1, "files": {"ss_generator.safetensors": {"sha2')
    return root / "home"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("robust_inputs")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(d / "photo.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[10:40, 15:50] = 255
    Image.fromarray(mask).save(d / "mask.png")
    return {"photo": d / "photo.png", "mask": d / "mask.png", "dir": d}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    logs: list[str] = []
    home = _broken_home(tmp_path_factory.mktemp("robust_home"))
    client = WorkerClient(sys.executable, args=WORKER_ARGS, env=_env(home), cwd=str(REPO), log=logs.append)
    client.logs = logs
    yield client
    assert client.close() == 0, "\n".join(logs[-30:])
    assert client.protocol_errors == []


# ------------------------------------------------------------------------------------------------
# Random lines


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-(10**30), 10**30)
    if kind == 2:
        return rng.uniform(-1e308, 1e308)
    if kind in (3, 4):
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x2FFF), 0])) for _ in range(8))
    if kind == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = ["v", "id", "type", "photo", "out", "points", "box", rng.choice(["x", "é", "\0"])]
    obj = {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(6))}
    if obj.get("v") == 1 and obj.get("type") in P.REQUEST_TYPES:  # never a valid request by chance
        obj["type"] = "fuzz"
    return obj


def _nested(rng: random.Random) -> bytes:
    n = rng.choice([40, 1000, 50_000, 100_000])  # 100_000 levels: the 200 KB line that killed the reader
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}"), ('[{"a":', "}]")])
    inner = rng.choice(["1", '"x"', "[]", ""])
    close = closer * n if rng.random() < 0.7 else ""  # also unterminated
    return (opener * n + inner + close).encode()


def _fuzz_lines(rng: random.Random, count: int) -> list[bytes]:
    lines = []
    for i in range(count):
        kind = i % 6
        if kind == 0:  # random bytes, any length, invalid UTF-8 included
            line = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))).replace(b"\n", b" ")
        elif kind == 1:  # random JSON values (objects without a valid envelope, arrays, strings, numbers)
            line = json.dumps(_random_json(rng)).encode()
        elif kind == 2:
            line = _nested(rng)
        elif kind == 3:  # numbers beyond a double, lone surrogates, NaN, constants
            line = rng.choice(
                [b'{"v":1,"id":"n","type":"status","x":1e400}', b'"\\ud800"', b"[NaN]", b"-Infinity", b"1" * 5000]
            )
        elif kind == 4:  # JSON almost a request
            req = {"v": 1, "id": uuid.uuid4().hex, "type": "reconstruct", "photo": "\0", "mask": 3, "out": []}
            line = json.dumps({k: v for k, v in req.items() if rng.random() < 0.8}).encode()
        else:  # bytes that are not UTF-8 inside a JSON string
            line = b'{"v":1,"id":"' + bytes([0xFF, 0xFE, rng.randrange(0x80, 0x100)]) + b'","type":"hello"}'
        if line.strip():
            lines.append(line)
    return lines


def test_every_random_line_is_answered_and_the_worker_stays_alive(tmp_path):
    """Property test: for any line (bytes, JSON, nesting, size), one structured answer, and the reader lives on."""
    seed = int(os.environ.get("SAM3D_FUZZ_SEED", "11"))
    count = int(os.environ.get("SAM3D_FUZZ_LINES", "300"))
    rng = random.Random(seed)
    lines = _fuzz_lines(rng, count)
    lines.insert(len(lines) // 2, b"[" * (2 << 20))  # 2 MiB without a newline until the end: skipped, answered
    proc = subprocess.Popen(
        [sys.executable, *WORKER_ARGS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(os.environ.get("SAM3D_FUZZ_LOG", os.devnull), "wb"),
        env=_env(tmp_path / "home"),
        cwd=str(REPO),
    )
    answers: queue.Queue = queue.Queue()

    def read() -> None:
        for raw in proc.stdout:
            answers.put(P.decode_response(raw))  # every answer is a valid protocol line
        answers.put(None)

    end = f"end-{uuid.uuid4().hex}"

    def write() -> None:
        for line in lines:
            proc.stdin.write(line + b"\n")
        proc.stdin.write(P.encode({"v": 1, "id": end, "type": "status"}))
        proc.stdin.flush()

    threading.Thread(target=read, daemon=True).start()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    got = []
    try:
        while True:
            msg = answers.get(timeout=TIMEOUT)
            assert msg is not None, f"the worker exited (code {proc.poll()}) after {len(got)} of {len(lines)} answers"
            if msg["id"] == end:
                break
            got.append(msg)
        assert msg["type"] == "status" and msg["state"] == "idle"
        assert len(got) == len(lines), f"{len(lines)} lines, {len(got)} answers (seed {seed})"
        assert {m["type"] for m in got} == {"error"} and {m["code"] for m in got} <= {"bad_request", "version_mismatch"}
        assert proc.poll() is None
        proc.stdin.write(P.encode({"v": 1, "id": "h", "type": "hello"}))
        proc.stdin.flush()
        assert answers.get(timeout=TIMEOUT)["type"] == "hello"
    finally:
        proc.stdin.close()
        assert proc.wait(60) == 0


def test_a_200kb_nested_line_is_answered(worker):
    worker._proc.stdin.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    worker._proc.stdin.flush()
    assert worker.status()["state"] == "idle"  # answered after the nested line: the reader is alive
    err = [m for m in worker.stray if m["type"] == "error" and "levels deep" in m["message"]]
    assert err and err[-1]["code"] == "bad_request" and err[-1]["id"] is None


# ------------------------------------------------------------------------------------------------
# Bad values in well-formed requests


def _error_of(job) -> WorkerError:
    with pytest.raises(WorkerError) as info:
        job.result(timeout=TIMEOUT)
    return info.value


def test_nul_bytes_infinite_numbers_and_exclusion_only_clicks_are_bad_requests(worker, files):
    photo = str(files["photo"])
    e = _error_of(worker.reconstruct("/tmp/a\0b.png", str(files["mask"]), "/tmp/out"))
    assert e.code == "bad_request" and "NUL byte" in e.message and e.details["field"] == "photo"
    e = _error_of(worker.segment(photo, "/tmp/m.png", points=[[10, 10, 0], [20, 20, 0]]))
    assert e.code == "bad_request" and "every point excludes" in e.message
    e = _error_of(worker.reconstruct(photo, str(files["mask"]), "/tmp/out", seed=10**30))
    assert e.code == "bad_request" and "seed" in e.message
    rid = uuid.uuid4().hex
    line = json.dumps({"v": 1, "id": rid, "type": "segment", "photo": photo, "out": "/tmp/m.png", "box": "BOX"})
    worker._proc.stdin.write(line.replace('"BOX"', "[0, 0, 1e400, 1e400]").encode() + b"\n")
    worker._proc.stdin.flush()
    assert worker.status()["state"] == "idle"
    err = [m for m in worker.stray if m["type"] == "error" and "out of range" in m["message"]]
    assert err and err[-1]["code"] == "bad_request"


def test_segment_never_writes_over_the_photo(worker, files, tmp_path):
    """A segment request whose `out` is the photo used to replace the photo with the mask."""
    photo = tmp_path / "photo.png"
    photo.write_bytes(files["photo"].read_bytes())
    data = photo.read_bytes()
    e = _error_of(worker.segment(str(photo), str(photo), points=[[30, 25, 1]]))
    assert e.code == "bad_input" and "inputs" in e.message and e.details["field"] == "out"
    job = worker.submit(
        {"type": "segment", "photo": str(photo), "out": str(photo), "points": [[30, 25, 1]], "overwrite": True}
    )
    assert _error_of(job).code == "bad_input"
    assert photo.read_bytes() == data


def _glb_json(path: Path) -> dict:
    data = Path(path).read_bytes()
    length = struct.unpack("<I", data[12:16])[0]
    return json.loads(data[20 : 20 + length])


def test_broken_manifest_and_an_object_named_scene(worker, files, tmp_path):
    """With a broken manifest.json in the models folder every reconstruct used to fail (internal KeyError); an
    object named "scene" overwrote scene.glb, so the add-on imported the scene's camera as the object."""
    hello = worker.hello(timeout=TIMEOUT)
    assert hello["ready"] and "tiny" in hello["model"] and "output_policy" in hello["capabilities"]
    out = tmp_path / "out"
    res = worker.reconstruct(
        str(files["photo"]), str(files["mask"]), str(out), steps=1, texture_size=64, faces=300, name="scene"
    ).result(timeout=TIMEOUT)
    assert Path(res["scene_glb"]) == out / "scene.glb" and Path(res["mesh_glb"]) == out / "scene_1.glb"
    scene, single = _glb_json(res["scene_glb"]), _glb_json(res["mesh_glb"])
    assert sum("camera" in n for n in scene["nodes"]) == 1 and len(scene["meshes"]) == 1
    assert "cameras" not in single and len(single["nodes"]) == 1
    assert json.loads(Path(res["scene"]).read_text())["objects"][0]["mesh_glb"] == "scene_1.glb"


def test_a_job_that_fails_writing_leaves_nothing(files, tmp_path):
    """A full disk part-way through the files (a file-size limit: the GLB fits, the PLY does not) used to leave
    object_0.glb and a truncated object_0.ply, though a failed job writes nothing."""
    code = (
        "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (150000, 150000)); "
        "sys.argv = ['sam3d serve', '--max-voxels', '100']; runpy.run_module('sam3d_core.serve', run_name='__main__')"
    )
    logs: list[str] = []
    client = WorkerClient(
        sys.executable, args=("-c", code), env=_env(tmp_path / "home"), cwd=str(REPO), log=logs.append
    )
    try:
        out = tmp_path / "out"
        job = client.reconstruct(str(files["photo"]), str(files["mask"]), str(out), steps=1, texture_size=64, faces=300)
        e = _error_of(job)
        assert e.code == "bad_input" and "file-size limit" in e.message and "nothing was written" in e.message
        assert not out.exists()
        assert client.status()["state"] == "idle"  # and it keeps serving
    finally:
        assert client.close() == 0, "\n".join(logs[-20:])
