"""`make addon` vendors the worker's stdlib client and protocol into the add-on, unchanged."""

from __future__ import annotations

from conftest import ROOT


def test_vendored_client_is_the_worker_client():
    from sam3d_blender.worker_client import client, protocol

    src = (ROOT / "sam3d_core" / "serve" / "protocol.py").read_text()
    assert protocol.PROTOCOL_VERSION == int(src.split("PROTOCOL_VERSION = ")[1].split()[0])
    assert client.WorkerClient.__module__.endswith("worker_client.client")
