"""The 3D view: the results over the photo, seen from the photo's matched camera; drag = orbit, Shift+drag or
middle-drag = pan, wheel = zoom, double-click = back to the photo's camera. Drawn by render.py (numpy)."""

from __future__ import annotations

import math

import numpy as np
from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QColor, QImage, QPainter
from PySide6.QtWidgets import QSizePolicy, QWidget

from sam3d_core.app import glb, render
from sam3d_core.app.photo_view import array_to_image, image_to_array
from sam3d_core.geometry import frames


class View3D(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(320, 220)
        self.camera = render.OrbitCamera()
        self.textured = True
        self.photo: np.ndarray | None = None  # [H, W, 3]
        self.K: np.ndarray | None = None
        self.objects: list[render.Drawable] = []
        self.errors: list[str] = []
        self._mesh_cache: dict[str, glb.MeshData] = {}
        self._frame: QImage | None = None
        self._mouse: QPointF | None = None

    # -- content ---------------------------------------------------------------------------------
    def set_photo(self, photo: QImage | None, K) -> None:
        self.photo = image_to_array(photo) if photo is not None else None
        self.K = np.asarray(K, np.float64) if K is not None else None
        self.objects, self._frame = [], None
        self.camera.home()
        self.update()

    def set_results(self, results: list[dict]) -> None:
        """Show these worker results (reconstruct answers): the textured mesh placed by its pose, or the
        stage-1 voxels (already placed)."""
        self.objects, self.errors = [], []
        for res in results:
            try:
                self.objects.append(self._drawable(res))
            except (OSError, ValueError, KeyError) as e:
                self.errors.append(f"{res.get('mesh_glb') or res.get('glb')}: {e}")
        if self.objects:
            centre = np.concatenate([d.vertices for d in self.objects]).mean(0)
            self.camera.pivot = centre
        self._frame = None
        self.update()

    def _drawable(self, res: dict) -> render.Drawable:
        path = res.get("mesh_glb") or res.get("glb")
        mesh = self._mesh_cache.get(path)
        if mesh is None:
            mesh = self._mesh_cache[path] = glb.load_mesh(path)
        verts = mesh.vertices
        if res.get("mesh_glb"):  # stored y-up in the model's local frame: place it as scene.glb does
            verts = frames.transform_points(frames.gltf_node_matrix(np.asarray(res["pose"]["matrix"])), verts)
        texture = None
        if mesh.texture is not None:
            img = QImage.fromData(mesh.texture)
            texture = image_to_array(img) if not img.isNull() else None
        return render.Drawable(verts, mesh.faces, mesh.colors, mesh.uvs, texture)

    def set_textured(self, on: bool) -> None:
        self.textured, self._frame = on, None
        self.update()

    def home(self) -> None:
        self.camera.home()
        self._frame = None
        self.update()

    # -- drawing ---------------------------------------------------------------------------------
    def render_array(self, width: int, height: int) -> np.ndarray:
        """The view at this size as RGB uint8 [height, width, 3] (what paintEvent draws)."""
        if self.photo is None or self.K is None:
            return np.broadcast_to(render.BACKGROUND, (height, width, 3)).copy()
        h, w = self.photo.shape[:2]
        depths = [-d.vertices[:, 2].min() for d in self.objects] or [1.0]
        drawables = [render.backdrop(self.photo, self.K, 3.0 * max(max(depths), 1e-2)), *self.objects]
        k_view = render.fit_intrinsics(self.K, w, h, width, height)
        return render.render(drawables, k_view, width, height, self.camera.matrix(), self.textured)

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        if self._frame is None or self._frame.size() != self.size():
            self._frame = array_to_image(self.render_array(max(self.width(), 1), max(self.height(), 1)))
        p = QPainter(self)
        p.drawImage(0, 0, self._frame)
        p.setPen(QColor(220, 220, 220))
        text = (
            "photo camera" if self.camera.is_home() else "drag: orbit, Shift+drag: pan, wheel: zoom, double-click: home"
        )
        p.drawText(
            8, self.height() - 8, f"{len(self.objects)} object(s), {'textured' if self.textured else 'mesh'}; {text}"
        )
        for i, err in enumerate(self.errors[:3]):
            p.setPen(QColor(255, 120, 120))
            p.drawText(8, 18 + 16 * i, err[:140])

    # -- mouse -----------------------------------------------------------------------------------
    def mousePressEvent(self, event) -> None:  # noqa: N802
        self._mouse = event.position()

    def mouseMoveEvent(self, event) -> None:  # noqa: N802
        if self._mouse is None:
            return
        d = event.position() - self._mouse
        self._mouse = event.position()
        pan = event.buttons() & Qt.MouseButton.MiddleButton or event.modifiers() & Qt.KeyboardModifier.ShiftModifier
        if pan:
            scale = max(abs(self.camera.pivot[2]), 0.1) / max(self.height(), 1)
            self.camera.pan = self.camera.pan + np.array([d.x(), -d.y()]) * scale
        else:
            self.orbit(d.x() * 0.01, d.y() * 0.01)
            return
        self._frame = None
        self.update()

    def mouseReleaseEvent(self, event) -> None:  # noqa: N802
        self._mouse = None

    def mouseDoubleClickEvent(self, event) -> None:  # noqa: N802
        self.home()

    def wheelEvent(self, event) -> None:  # noqa: N802
        self.zoom(event.angleDelta().y() / 120.0)

    def orbit(self, dyaw: float, dpitch: float) -> None:
        self.camera.yaw += dyaw
        self.camera.pitch = float(np.clip(self.camera.pitch + dpitch, -math.pi / 2 + 0.05, math.pi / 2 - 0.05))
        self._frame = None
        self.update()

    def zoom(self, notches: float) -> None:
        self.camera.dolly += 0.1 * notches * max(abs(self.camera.pivot[2]), 0.1)
        self._frame = None
        self.update()
