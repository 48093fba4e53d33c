"""The worker protocol module (stdlib only) and the worker's stdout discipline, without a model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sam3d_core.serve import protocol as P

REPO = Path(__file__).resolve().parent.parent


def test_encode_is_one_utf8_line_and_round_trips():
    msg = P.request("reconstruct", id="r1", photo="/tmp/caf\u00e9\nx.png", mask="/m.png", out="/o", steps=2)
    line = P.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # newlines inside strings are escaped
    assert "caf\u00e9".encode() in line  # UTF-8, not \u escapes
    assert P.decode_request(line) == msg
    assert P.decode_request(line.decode()) == msg


def test_unknown_fields_are_tolerated():
    req = P.decode_request(b'{"v":1,"id":"a","type":"hello","client":"blender 4.2","future":{"x":1}}')
    assert req["future"] == {"x": 1}
    ev = P.decode_response(b'{"v":1,"id":"a","type":"progress","stage":"sample","step":1,"total":2,"eta_s":3}')
    assert ev["eta_s"] == 3


@pytest.mark.parametrize(
    "line, code, request_id",
    [
        (b'{"v":1,"id":"a","type":"frobnicate"}', "bad_request", "a"),
        (b'{"v":2,"id":"b","type":"hello"}', "version_mismatch", "b"),
        (b'{"v":0,"id":"b","type":"hello"}', "version_mismatch", "b"),
        (b'{"id":"c","type":"hello"}', "bad_request", "c"),
        (b'{"v":"1","id":"c","type":"hello"}', "bad_request", "c"),
        (b'{"v":1,"type":"hello"}', "bad_request", None),
        (b'{"v":1,"id":7,"type":"hello"}', "bad_request", None),
        (b"not json", "bad_request", None),
        (b"[1, 2]", "bad_request", None),
        (b'{"v":1,"id":"n","type":"reconstruct","photo":"p","mask":"m","out":"o","steps":NaN}', "bad_request", None),
        (b"\xff\xfe", "bad_request", None),
        (b'{"v":1,"id":"d","type":"reconstruct","mask":"m","out":"o"}', "bad_request", "d"),
        (b'{"v":1,"id":"d","type":"reconstruct","photo":"","mask":"m","out":"o"}', "bad_request", "d"),
        (b'{"v":1,"id":"e","type":"reconstruct","photo":"p","mask":"m","out":"o","steps":"5"}', "bad_request", "e"),
        (b'{"v":1,"id":"e","type":"reconstruct","photo":"p","mask":"m","out":"o","steps":0}', "bad_request", "e"),
        (b'{"v":1,"id":"e","type":"reconstruct","photo":"p","mask":"m","out":"o","seed":true}', "bad_request", "e"),
        (b'{"v":1,"id":"e","type":"reconstruct","photo":"p","mask":"m","out":"o","fast":1}', "bad_request", "e"),
        (b'{"v":1,"id":"f","type":"cancel"}', "bad_request", "f"),
    ],
)
def test_invalid_requests_get_structured_errors(line, code, request_id):
    with pytest.raises(P.ProtocolError) as info:
        P.decode_request(line)
    e = info.value
    assert e.code == code and e.request_id == request_id and e.message
    answer = P.decode_response(P.encode(e.to_message()))
    assert answer["type"] == "error" and answer["code"] == code and answer["id"] == request_id


def test_version_mismatch_says_how_to_fix():
    with pytest.raises(P.ProtocolError) as info:
        P.decode_request(b'{"v":2,"id":"b","type":"hello"}')
    assert info.value.details == {"expected": 1, "got": 2}
    assert "update" in info.value.message


def test_valid_requests_and_defaults():
    for t in ("hello", "status", "shutdown"):
        assert P.request(t)["type"] == t and P.request(t)["id"]
    assert P.request("cancel", target="r1")["target"] == "r1"
    req = P.request("reconstruct", photo="p", mask="m", out="o", seed=None, steps=None)  # null = default
    assert P.decode_request(P.encode(req)) == req


def test_responses_validate():
    ok = [
        P.progress("a", "stage1", 1, 25),
        P.error("a", "bad_input", "photo missing", {"x": float("nan")}),
        P.response("result", "a", glb="/o/x.glb"),
        P.response("cancelled", "a"),
        P.response("hello", "a"),
    ]
    for msg in ok:
        assert P.decode_response(P.encode(msg)) == json.loads(P.encode(msg))
    with pytest.raises(ValueError):
        P.progress("a", "texture", 1, 2)
    with pytest.raises(ValueError):
        P.error("a", "oops", "x")
    with pytest.raises(P.ProtocolError):
        P.decode_response(b'{"v":1,"id":"a","type":"reconstruct"}')
    with pytest.raises(P.ProtocolError):
        P.decode_response(b'{"v":1,"id":"a","type":"error","code":"nope","message":"x"}')
    with pytest.raises(ValueError):
        P.encode({"v": 1, "id": "a", "type": "result", "x": float("inf")})


def test_protocol_and_client_are_stdlib_only():
    # -I -S: no site-packages at all, so any import of torch/numpy/PIL (or other non-stdlib) would fail.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import sam3d_core.serve.protocol, sam3d_core.serve.client;"
        "print(sorted(m for m in sys.modules if m.startswith('sam3d_core')))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(REPO)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(
        ["sam3d_core", "sam3d_core.serve", "sam3d_core.serve.client", "sam3d_core.serve.protocol", "sam3d_core.version"]
    )
    # and with the full environment, nothing heavy is pulled in either
    code = (
        "import sys; import sam3d_core.serve.client;"
        "print([m for m in ('torch', 'numpy', 'PIL', 'trimesh') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_worker_stdout_carries_only_protocol_lines():
    code = (
        "import os, sys\n"
        "from sam3d_core.serve.worker import protect_stdout\n"
        "from sam3d_core.serve import protocol as P\n"
        "out = protect_stdout()\n"
        "print('a stray print')\n"
        "os.write(1, b'a C-level write\\n')\n"
        "sys.__stdout__.write('via sys.__stdout__\\n'); sys.__stdout__.flush()\n"
        "out.write(P.encode(P.response('status', 'x', state='idle')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and P.decode_response(lines[0])["type"] == "status"
    for text in ("a stray print", "a C-level write", "via sys.__stdout__"):
        assert text in out.stderr


def test_serve_subcommand_parser():
    import argparse

    from sam3d_core.cli.serve import add_serve_parser, cmd_serve

    parser = argparse.ArgumentParser(prog="sam3d")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--model", "tiny", "--device", "cpu"])
    assert (args.func, args.model, args.device) == (cmd_serve, "tiny", "cpu")


def test_client_reports_a_worker_that_fails_to_start():
    from sam3d_core.serve.client import WorkerClient, WorkerError

    logs: list[str] = []
    client = WorkerClient(
        sys.executable, args=("-c", "import sys; sys.stderr.write('boom: no torch\\n'); sys.exit(3)"), log=logs.append
    )
    with pytest.raises(WorkerError) as info:
        client.hello(timeout=30)
    e = info.value
    assert e.code == "internal" and "exited unexpectedly (with code 3)" in e.message
    assert e.details["returncode"] == 3 and "boom: no torch" in e.details["log_tail"]
    assert logs == ["boom: no torch"] and not client.alive() and client.close() == 3


def test_reconstruct_options_are_validated():
    base = {"photo": "/p.png", "mask": "/m.png", "out": "/o"}
    for ok in ({"vram": "low"}, {"texture_size": 64, "faces": 100, "stage2": False, "name": "cup"}, {"voxels": True}):
        assert P.request("reconstruct", **base, **ok)["type"] == "reconstruct"
    for bad, field in (
        ({"vram": "huge"}, "vram"),
        ({"texture_size": 9}, "texture_size"),
        ({"faces": 10**7}, "faces"),
        ({"stage2": "yes"}, "stage2"),
        ({"voxels": 1}, "voxels"),
    ):
        with pytest.raises(P.ProtocolError) as info:
            P.request("reconstruct", **base, **bad)
        assert info.value.code == "bad_request" and info.value.details["field"] == field


def test_segment_requests_are_validated():
    assert P.request("segment", photo="/p.png", out="/m.png", points=[[1, 2, 1]])["type"] == "segment"
    for bad in ({"points": [[1, 2, 5]]}, {"points": [], "box": None}, {"box": [1, 2, 3]}):
        with pytest.raises(P.ProtocolError):
            P.request("segment", photo="/p.png", out="/m.png", **bad)
    with pytest.raises(P.ProtocolError, match="out_dir"):
        P.request("segment_all", photo="/p.png")
