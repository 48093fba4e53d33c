"""The desktop app's Find field (SAM 3), offscreen, against a real worker: without SAM 3 its message reaches the
status line; with the tiny SAM 3 of tests/fixtures/sam3_tiny (where Meta's sam3 imports in this Python) each
instance arrives as an object row, a row can be removed, and the rest are reconstructed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6")

from PySide6.QtCore import QSettings  # noqa: E402

from sam3d_core.segment.sam3 import import_error  # noqa: E402
from tests.test_app import configure, qapp, settled, shoot, wait, worker_env  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "sam3_tiny"
META = json.loads((FIXTURE / "cases.json").read_text())


@pytest.fixture
def panel(qapp, tmp_path):  # noqa: F811
    from sam3d_core.app.window import MainWindow

    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    w = MainWindow(settings, worker_env=worker_env(tmp_path))
    configure(w.panel, tmp_path)
    w.resize(1100, 700)
    w.show()
    yield w.panel
    w.close()
    qapp.processEvents()


def test_find_without_sam3_says_how_to_get_it(qapp, panel, tmp_path):  # noqa: F811
    assert not panel.find_concept("cup")  # no photo yet
    assert panel.status_level == "ERROR" and "open a photo first" in panel.status_text
    assert panel.open_photo(str(FIXTURE / "photo.png"))
    assert not panel.find_concept("  ")  # neither a word nor a box
    assert "type what to find" in panel.status_text
    panel.find_edit.setText("cup")
    assert panel.find_concept()
    wait(qapp, lambda: panel.status_text.startswith("finding failed"), "the worker's answer", panel)
    assert "no SAM 3 weights are imported" in panel.status_text and "facebook/sam3" in panel.status_text
    assert panel.items == []
    shoot(panel.window(), "find_no_sam3", tmp_path)


@pytest.mark.skipif(import_error() is not None, reason=f"Meta's sam3 cannot be imported here ({import_error()})")
def test_find_lists_every_instance_then_reconstructs_them(qapp, panel, tmp_path):  # noqa: F811
    from sam3d_core.segment import weights as W
    from sam3d_core.weights.store import CheckpointError

    try:
        bpe = W.find_bpe()
    except CheckpointError as e:
        pytest.skip(str(e))
    home = tmp_path / "home"  # worker_env's SAM3D_HOME
    W.import_sam_checkpoint(FIXTURE / "sam3_tiny.safetensors", name="tiny3", root=home / "segment", bpe=bpe)
    case = next(c for c in META["cases"] if c["name"] == "combined")
    assert panel.open_photo(str(FIXTURE / "photo.png")) and panel.scale == 1.0
    x0, y0, x1, y1, _ = case["boxes"][0]
    panel.history, panel.hist_pos = [([], (max(x0, 0.0), y0, x1, min(y1, 120.0)))], 0  # a drawn box, no request yet
    panel.find_edit.setText(case["text"])
    assert panel.find_concept(min_score=META["threshold"])
    wait(qapp, lambda: panel.status_text.startswith(("found", "finding failed")), "the instances", panel)
    assert [it.name for it in panel.items] == [f"red_mug_{i}" for i in range(case["kept"])], panel.status_text
    shoot(panel.window(), "find_rows", tmp_path)
    panel.remove(panel.items[-1].name)
    assert panel.reconstruct() == case["kept"] - 1
    wait(qapp, lambda: settled(panel), "the reconstructions", panel)
    assert all(it.status == "DONE" and it.kept is not None for it in panel.items), [it.message for it in panel.items]
