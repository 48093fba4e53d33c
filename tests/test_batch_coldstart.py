"""Cold start: the worker loads the model on a thread at start, so a photo can be opened (and clicked) meanwhile;
`hello` still means "ready" and a reconstruct job sent early waits for the model."""

from __future__ import annotations

import io
import os
import threading
import time

import numpy as np
from PIL import Image

from sam3d_core.serve import protocol as P
from sam3d_core.serve.worker import LoadedModel, Worker, load_model


def _answers(out: io.BytesIO) -> dict[str, dict]:
    """Final answers so far, by request id (progress events skipped)."""
    msgs = [P.decode_response(line) for line in out.getvalue().splitlines()]
    return {m["id"]: m for m in msgs if m["type"] != "progress"}


def _wait_for(out: io.BytesIO, ids: set[str], timeout: float = 300) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while not ids <= set(_answers(out)):
        assert time.monotonic() < deadline, f"no answer to {ids - set(_answers(out))} in {timeout} s"
        time.sleep(0.02)
    return _answers(out)


def test_photo_requests_are_answered_while_the_model_loads(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[10:40, 15:50] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    gate, calls = threading.Event(), []

    def loader() -> LoadedModel:  # a slow model load, released by the test
        calls.append(time.monotonic())
        assert gate.wait(300)
        return load_model("tiny", "cpu", max_voxels=100)

    out = io.BytesIO()
    worker = Worker(LoadedModel(None, "loading"), out, loader=loader, device="cpu")
    read_fd, write_fd = os.pipe()
    stdin, feed = os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb", buffering=0)
    server = threading.Thread(target=worker.serve, args=(stdin,), daemon=True)
    server.start()

    def send(**req) -> None:
        feed.write(P.encode(P.request(**req)))

    photo, msk = str(tmp_path / "photo.png"), str(tmp_path / "mask.png")
    send(type="hello", id="h")
    send(type="reconstruct", id="r", photo=photo, mask=msk, out=str(tmp_path / "out"), steps=1, texture_size=64)
    send(type="open_photo", id="p", photo=photo)
    send(type="status", id="s")
    early = _wait_for(out, {"p", "s"})
    assert early["p"]["type"] == "photo" and early["p"]["width"] == 64  # opened while the model loads
    assert early["s"]["loading"] is True and early["s"]["ready"] is False
    assert "h" not in early and "r" not in early  # hello means "ready"; the job waits for the model
    assert len(calls) == 1 and not gate.is_set()
    gate.set()
    done = _wait_for(out, {"h", "r"})
    assert done["h"]["ready"] is True and done["h"]["loading"] is False and "tiny" in done["h"]["model"]
    assert done["r"]["type"] == "result", done["r"]
    assert os.path.isfile(done["r"]["mesh_glb"])
    send(type="shutdown", id="x")
    server.join(60)
    assert not server.is_alive()
    assert _answers(out)["x"]["state"] == "stopped"
    feed.close()
