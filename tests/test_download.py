"""Opt-in downloads against a local HTTP server on 127.0.0.1 (fake files); the real internet is never touched."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import json
import socket
import threading

import pytest

from sam3d_core.cli.weights import add_download_parser
from sam3d_core.weights import download as dl

TOKEN = "hf_test_token"
COMMIT = "c0ffee" * 6 + "abcd"
SHUTDOWN_S = 60.0  # the server stops by itself after this many seconds, whatever the test does


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Hugging Face's resolve URLs (302 to a CDN path, X-Linked-Etag / -Size, X-Repo-Commit) and a plain file host.

    /facebook/sam-3d-objects/resolve/<rev>/checkpoints/<name>  -> 401 without the token, else 302 to /cdn/<name>
    /cdn/<name>, /sam/<name>                                   -> the bytes, honouring Range
    """

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, code: int, headers: dict, body: bytes = b"") -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        st = self.server.state
        st.log.append((self.command, self.path, self.headers.get("Authorization"), self.headers.get("Range")))
        parts = self.path.strip("/").split("/")
        if parts[:3] == ["facebook", "sam-3d-objects", "resolve"] and len(parts) == 6:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._send(401, {}, b"gated")
            name = parts[5]
            if name not in st.files:
                return self._send(404, {}, b"missing")
            data = st.files[name]
            etag = st.etags.get(name, hashlib.sha256(data).hexdigest())
            return self._send(
                302,
                {
                    "Location": f"/cdn/{name}",
                    "X-Linked-Etag": f'"{etag}"',
                    "X-Linked-Size": len(data),
                    "X-Repo-Commit": COMMIT,
                },
            )
        if len(parts) == 2 and parts[0] in ("cdn", "sam") and parts[1] in st.files:
            return self._serve(st, st.files[parts[1]])
        self._send(404, {}, b"missing")

    def _serve(self, st, data: bytes) -> None:
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return self._send(416, {"Content-Range": f"bytes */{len(data)}"})
        body = data[start:]
        code = 206 if rng else 200
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if rng else {}
        if st.drop_after is not None and self.command == "GET":  # announce everything, send a part, hang up
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: st.drop_after])
            st.drop_after = None
            self.close_connection = True
            return
        st.served += 0 if self.command == "HEAD" else len(body)
        self._send(code, headers, body)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    httpd.daemon_threads = True
    st = argparse.Namespace(files={}, etags={}, log=[], drop_after=None, served=0)
    httpd.state = st
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(SHUTDOWN_S, httpd.shutdown)
    watchdog.daemon = True
    watchdog.start()
    st.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield st
    finally:
        watchdog.cancel()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def fake_official(st, names=("pipeline.yaml", "ss_generator.ckpt", "ss_decoder.ckpt")) -> dict[str, bytes]:
    st.files = {n: (n.encode() * 997)[: 3000 + 1111 * i] for i, n in enumerate(names)}
    return st.files


def test_official_download_checks_hashes_and_keeps_the_token_off_the_cdn(server, tmp_path):
    files = fake_official(server)
    out = dl.download_official(tmp_path / "ckpt", token=TOKEN, endpoint=server.url, files=tuple(files), timeout=5)
    for name, data in files.items():
        assert (out / name).read_bytes() == data
    record = json.loads((out / "download.json").read_text())
    assert record["commit"] == COMMIT
    assert {n: r["sha256"] for n, r in record["files"].items()} == {
        n: hashlib.sha256(d).hexdigest() for n, d in files.items()
    }
    resolve = [e for e in server.log if "/resolve/" in e[1]]
    cdn = [e for e in server.log if e[1].startswith("/cdn/")]
    assert resolve and all(auth == f"Bearer {TOKEN}" for _, _, auth, _ in resolve)
    assert cdn and all(auth is None for _, _, auth, _ in cdn)
    assert all(f"/resolve/{COMMIT}/" in path for _, path, _, _ in resolve[1:])  # pinned after the first answer
    assert not list(out.glob("*.part"))


def test_resume_from_a_part_file(server, tmp_path):
    data = bytes(range(256)) * 64
    server.files = {"sam_vit_b_01ec64.pth": data}
    dest = tmp_path / "sam"
    dest.mkdir()
    (dest / "sam_vit_b_01ec64.pth.part").write_bytes(data[:5000])
    got = dl.download_sam("vit_b", dest, base_url=server.url + "/sam/", timeout=5)
    assert got.path.read_bytes() == data and got.resumed_from == 5000
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert server.log[-1][3] == "bytes=5000-" and server.served == len(data) - 5000
    again = dl.download_sam("vit_b", dest, base_url=server.url + "/sam/", timeout=5)
    assert again.skipped and len(server.log) == 1  # already complete: no request


def test_interrupted_download_resumes_on_the_next_run(server, tmp_path):
    files = fake_official(server, ("ss_decoder.ckpt",))
    server.drop_after = 1000
    with pytest.raises(dl.DownloadError, match="run the same command again") as e:
        dl.download_official(tmp_path, token=TOKEN, endpoint=server.url, files=tuple(files), timeout=5)
    assert e.value.kind == "interrupted"
    assert (tmp_path / "ss_decoder.ckpt.part").stat().st_size == 1000
    dl.download_official(tmp_path, token=TOKEN, endpoint=server.url, files=tuple(files), timeout=5)
    assert (tmp_path / "ss_decoder.ckpt").read_bytes() == files["ss_decoder.ckpt"]
    assert server.log[-1][3] == "bytes=1000-"


def test_hash_mismatch_deletes_the_download(server, tmp_path):
    files = fake_official(server, ("ss_decoder.ckpt",))
    server.etags["ss_decoder.ckpt"] = "0" * 64
    with pytest.raises(dl.DownloadError, match="differs from the published") as e:
        dl.download_official(tmp_path, token=TOKEN, endpoint=server.url, files=tuple(files), timeout=5)
    assert e.value.kind == "hash"
    assert not (tmp_path / "ss_decoder.ckpt").exists() and not (tmp_path / "ss_decoder.ckpt.part").exists()


def test_401_explains_the_licence_and_token(server, tmp_path, monkeypatch):
    files = fake_official(server, ("pipeline.yaml",))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(dl.DownloadError) as e:
        dl.download_official(tmp_path, endpoint=server.url, files=tuple(files), timeout=5)
    msg = str(e.value)
    assert e.value.kind == "auth" and "HTTP 401" in msg and "accept the licence" in msg
    assert "--token" in msg and "HF_TOKEN" in msg and "no token was sent" in msg
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the environment variable is the other way to pass it
    dl.download_official(tmp_path, endpoint=server.url, files=tuple(files), timeout=5)
    assert (tmp_path / "pipeline.yaml").read_bytes() == files["pipeline.yaml"]


def test_404(server, tmp_path):
    fake_official(server, ("pipeline.yaml",))
    with pytest.raises(dl.DownloadError, match="HTTP 404") as e:
        dl.download_official(tmp_path, token=TOKEN, endpoint=server.url, files=("nothere.ckpt",), timeout=5)
    assert e.value.kind == "not_found" and "nothere.ckpt" in str(e.value)
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        dl.download_sam("vit_l", tmp_path, base_url=server.url + "/sam/", timeout=5)


def test_connection_refused_says_offline_and_how_to_import(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(dl.DownloadError) as e:
        dl.download_official(tmp_path, token=TOKEN, endpoint=f"http://127.0.0.1:{port}", timeout=5)
    assert e.value.kind == "offline" and "offline" in str(e.value) and "sam3d weights import" in str(e.value)
    with pytest.raises(dl.DownloadError, match="import-sam") as e:
        dl.download_sam("vit_b", tmp_path, base_url=f"http://127.0.0.1:{port}/", timeout=5)


def test_not_enough_disk_space_fails_before_downloading(server, tmp_path, monkeypatch):
    files = fake_official(server)
    real = dl.shutil.disk_usage
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    with pytest.raises(dl.DownloadError, match="not enough disk space") as e:
        dl.download_official(tmp_path, token=TOKEN, endpoint=server.url, files=tuple(files), timeout=5)
    assert e.value.kind == "disk_full"
    assert not any(path.startswith("/cdn/") for _, path, _, _ in server.log)


def test_cli_download(server, tmp_path, capsys, monkeypatch):
    files = fake_official(server, ("pipeline.yaml",))
    monkeypatch.setattr(dl, "OFFICIAL_FILES", tuple(files))
    parser = argparse.ArgumentParser()
    add_download_parser(parser.add_subparsers(dest="action"))
    base = ["download", "official", "--dest", str(tmp_path / "w"), "--token", TOKEN, "--endpoint", server.url]
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal: --yes is required
    args = parser.parse_args(base)
    assert args.func(args) == 2 and "--yes" in capsys.readouterr().err
    assert not (tmp_path / "w" / "pipeline.yaml").exists()
    args = parser.parse_args([*base, "--yes"])
    assert args.func(args) == 0
    assert "sam3d weights import" in capsys.readouterr().out
    assert (tmp_path / "w" / "pipeline.yaml").read_bytes() == files["pipeline.yaml"]
    with pytest.raises(SystemExit):
        parser.parse_args(["download", "sam-vit_x"])
