"""The worker's `segment_concept` request (SAM 3): validation, the "no SAM 3" answer, and streamed instances.

The last test runs a real worker with the tiny SAM 3 of tests/fixtures/sam3_tiny; it needs Meta's sam3 in the
Python running the tests (see tests/test_segment_sam3.py) and skips elsewhere.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from sam3d_core.segment import weights as W
from sam3d_core.segment.sam3 import import_error
from sam3d_core.serve import protocol as P
from sam3d_core.serve.client import WorkerClient, WorkerError
from sam3d_core.weights.store import CheckpointError

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "sam3_tiny"
META = json.loads((FIXTURE / "cases.json").read_text())
WORKER_ARGS = ("-m", "sam3d_core.serve", "--max-voxels", "200")


def _start(home: Path, logs: list[str]) -> WorkerClient:
    env = {**os.environ, "SAM3D_HOME": str(home)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return WorkerClient(sys.executable, args=WORKER_ARGS, env=env, cwd=str(REPO), log=logs.append)


def test_segment_concept_requests_are_validated():
    ok = P.request("segment_concept", photo="/p.png", out_dir="/o", text="chair", boxes=[[1, 2, 30, 40, 0]])
    assert ok["type"] == "segment_concept"
    P.request("segment_concept", photo="/p.png", out_dir="/o", boxes=[[1, 2, 30, 40]], min_score=0.0, max_objects=3)
    for bad, field in (
        ({}, "text"),
        ({"text": "   "}, "text"),
        ({"text": "chair", "boxes": [[1, 2, 3]]}, "boxes"),
        ({"text": "chair", "boxes": [[1, 2, 3, 4, 2]]}, "boxes"),
        ({"text": "chair", "boxes": [[1, 2, 3, True]]}, "boxes"),
        ({"text": "chair", "min_score": 1.0}, "min_score"),
        ({"text": "chair", "max_objects": 0}, "max_objects"),
        ({"text": "x" * 201}, "text"),
        ({"text": 3}, "text"),
    ):
        with pytest.raises(P.ProtocolError) as e:
            P.request("segment_concept", photo="/p.png", out_dir="/o", **bad)
        assert e.value.code == "bad_request" and e.value.details["field"] == field, (bad, e.value.message)
    with pytest.raises(P.ProtocolError, match="out_dir"):
        P.request("segment_concept", photo="/p.png", text="chair")
    event = P.decode_response(P.encode(P.response("instance", "r1", index=0, mask="/o/i.png", score=0.9)))
    assert event["type"] == "instance" and "instance" not in P.FINAL_TYPES  # an event: the request goes on


def test_no_sam3_is_answered_missing_weights_and_the_worker_goes_on(tmp_path):
    logs: list[str] = []
    client = _start(tmp_path / "home", logs)
    try:
        with pytest.raises(WorkerError) as e:
            client.segment_concept(str(FIXTURE / "photo.png"), str(tmp_path / "o"), text="chair").result(timeout=120)
        assert e.value.code == "missing_weights" and "facebook/sam3" in e.value.message, e.value.message
        assert "import-sam" in e.value.message
        assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written
        assert "segment_concept" in client.hello(timeout=120)["capabilities"]
        with pytest.raises(WorkerError) as e:  # a bad request is answered too, before anything loads
            client.submit({"type": "segment_concept", "photo": str(FIXTURE / "photo.png"), "out_dir": "/o"}).result(
                timeout=30
            )
        assert e.value.code == "bad_request"
    finally:
        assert client.close() == 0, "\n".join(logs)
    assert client.protocol_errors == []


@pytest.mark.skipif(import_error() is not None, reason=f"Meta's sam3 cannot be imported here ({import_error()})")
def test_instances_stream_one_event_each_then_the_result(tmp_path):
    try:
        bpe = W.find_bpe()
    except CheckpointError as e:
        pytest.skip(str(e))
    home = tmp_path / "home"
    W.import_sam_checkpoint(FIXTURE / "sam3_tiny.safetensors", name="sam3_tiny", root=home / "segment", bpe=bpe)
    logs: list[str] = []
    client = _start(home, logs)
    try:
        job = client.segment_concept(
            str(FIXTURE / "photo.png"), str(tmp_path / "found"), text="red mug", boxes=[[-10, 40, 60, 130, 1]],
            min_score=META["threshold"],
        )  # fmt: skip
        msgs = list(job.events(timeout=300))
        # click refinement still works on any one instance: its mask is the previous mask of a click prompt
        first = msgs[0]
        x0, y0, x1, y1 = first["box"]
        cx, cy = min(max((x0 + x1) / 2, 0), 159), min(max((y0 + y1) / 2, 0), 119)
        refined = client.segment(
            str(FIXTURE / "photo.png"), str(tmp_path / "refined.png"), points=[[cx, cy, 1]], previous=first["mask"]
        ).result(timeout=120)
        assert Path(refined["mask"]).is_file() and refined["area"] > 0
    finally:
        assert client.close() == 0, "\n".join(logs)
    *events, final = msgs
    assert final["type"] == "result", final
    assert [m["type"] for m in events] == ["instance"] * len(final["masks"])
    case = next(c for c in META["cases"] if c["name"] == "combined")
    assert len(events) == case["kept"] and [e["index"] for e in events] == list(range(case["kept"]))
    assert [e["mask"] for e in events] == final["masks"] and final["segmenter"].startswith("sam3")
    data = load_file(str(FIXTURE / "cases.safetensors"))
    order = np.argsort(-data["combined.scores"].numpy(), kind="stable")
    assert final["scores"] == [round(float(s), 5) for s in data["combined.scores"].numpy()[order]]
    for e, ref in zip(events, data["combined.masks"].numpy()[order], strict=True):
        got = np.asarray(Image.open(e["mask"])) > 127
        assert np.array_equal(got, ref.astype(bool)) and e["area"] == int(got.sum())
