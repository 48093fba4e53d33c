"""The photo with its masks and the selection tools: click = object, Shift+click or right-click = not object,
drag = box. Coordinates sent out are photo pixels (x right, y down, origin top-left), as the worker wants."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QImage, QPainter, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

MASK_COLORS = ((80, 200, 255), (255, 90, 160), (255, 170, 0), (120, 230, 90), (190, 140, 255), (255, 230, 60))
DRAG_PX = 5  # a press that moves further than this is a box, not a click


def image_to_array(image: QImage) -> np.ndarray:
    """QImage -> RGB uint8 [H, W, 3] (a copy)."""
    img = image.convertToFormat(QImage.Format.Format_RGB888)
    h, w, stride = img.height(), img.width(), img.bytesPerLine()
    buf = np.frombuffer(img.constBits(), np.uint8, count=stride * h).reshape(h, stride)
    return buf[:, : w * 3].reshape(h, w, 3).copy()


def array_to_image(rgb: np.ndarray) -> QImage:
    """RGB(A) uint8 [H, W, 3|4] -> QImage (owning its pixels)."""
    rgb = np.ascontiguousarray(rgb, np.uint8)
    h, w, c = rgb.shape
    fmt = QImage.Format.Format_RGBA8888 if c == 4 else QImage.Format.Format_RGB888
    return QImage(rgb.data, w, h, w * c, fmt).copy()


def load_mask(path: str) -> np.ndarray | None:
    """A mask PNG -> bool [H, W] (grey > 127, as the worker reads it), None when unreadable."""
    img = QImage(path)
    if img.isNull():
        return None
    return image_to_array(img).max(axis=2) > 127


def mask_overlay(mask: np.ndarray, color, alpha: int = 110, edge_px: int = 3) -> QImage:
    """A mask as a translucent fill with an opaque outline (edge_px wide, so it survives the view's downscale)."""
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask] = (*color, alpha)
    inner = mask.copy()
    for _ in range(edge_px):
        inner &= np.roll(inner, 1, 0) & np.roll(inner, -1, 0) & np.roll(inner, 1, 1) & np.roll(inner, -1, 1)
    rgba[mask & ~inner] = (*color, 255)
    return array_to_image(rgba)


class PhotoView(QWidget):
    clicked = Signal(float, float, int)  # x, y in photo pixels, label 1 = object, 0 = not object
    boxed = Signal(float, float, float, float)  # x0, y0, x1, y1 in photo pixels
    file_dropped = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(320, 220)
        self.setAcceptDrops(True)
        self.photo: QImage | None = None
        self.overlays: list[QImage] = []  # the objects' masks, then the draft
        self.points: list[tuple[float, float, int]] = []
        self.box: tuple[float, float, float, float] | None = None
        self.hint = "Open a photo (File > Open, or drop one here)"
        self._press: tuple[QPointF, bool] | None = None
        self._drag: QPointF | None = None

    # -- content ---------------------------------------------------------------------------------
    def set_photo(self, image: QImage | None) -> None:
        self.photo, self.overlays, self.points, self.box = image, [], [], None
        self.update()

    def set_prompts(self, points, box) -> None:
        self.points, self.box = list(points), box
        self.update()

    def set_overlays(self, overlays: list[QImage]) -> None:
        self.overlays = overlays
        self.update()

    # -- geometry --------------------------------------------------------------------------------
    def photo_rect(self) -> QRectF:
        if self.photo is None:
            return QRectF()
        w, h = self.photo.width(), self.photo.height()
        s = min(self.width() / w, self.height() / h)
        return QRectF((self.width() - w * s) / 2, (self.height() - h * s) / 2, w * s, h * s)

    def to_photo(self, p: QPointF) -> tuple[float, float] | None:
        r = self.photo_rect()
        if r.isEmpty() or not r.contains(p):
            return None
        return (p.x() - r.x()) / r.width() * self.photo.width(), (p.y() - r.y()) / r.height() * self.photo.height()

    def to_widget(self, x: float, y: float) -> QPointF:
        r = self.photo_rect()
        return QPointF(r.x() + x / self.photo.width() * r.width(), r.y() + y / self.photo.height() * r.height())

    # -- painting --------------------------------------------------------------------------------
    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        p = QPainter(self)
        p.fillRect(self.rect(), QColor(30, 31, 34))
        if self.photo is None:
            p.setPen(QColor(170, 170, 170))
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, self.hint)
            return
        r = self.photo_rect()
        p.drawImage(r, self.photo)
        for overlay in self.overlays:
            p.drawImage(r, overlay)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        for x, y, label in self.points:
            c = self.to_widget(x, y)
            p.setPen(QPen(QColor(0, 0, 0), 2))
            p.setBrush(QColor(60, 220, 90) if label else QColor(235, 60, 60))
            p.drawEllipse(c, 6, 6)
        box = self.box
        if self._drag is not None and self._press is not None:
            a, b = self.to_photo(self._press[0]), self.to_photo(self._drag)
            box = (*a, *b) if a and b else box
        if box is not None:
            p.setPen(QPen(QColor(255, 255, 255), 2, Qt.PenStyle.DashLine))
            p.setBrush(Qt.BrushStyle.NoBrush)
            p.drawRect(QRectF(self.to_widget(box[0], box[1]), self.to_widget(box[2], box[3])).normalized())

    # -- mouse and drops -------------------------------------------------------------------------
    def mousePressEvent(self, event) -> None:  # noqa: N802
        if self.photo is None or self.to_photo(event.position()) is None:
            return
        exclude = event.button() == Qt.MouseButton.RightButton or bool(
            event.modifiers() & Qt.KeyboardModifier.ShiftModifier
        )
        self._press, self._drag = (event.position(), exclude), None

    def mouseMoveEvent(self, event) -> None:  # noqa: N802
        if self._press is not None and (event.position() - self._press[0]).manhattanLength() > DRAG_PX:
            self._drag = event.position()
            self.update()

    def mouseReleaseEvent(self, event) -> None:  # noqa: N802
        if self._press is None:
            return
        start, exclude = self._press
        self._press = None
        a = self.to_photo(start)
        if self._drag is not None:
            self._drag = None
            b = self.to_photo(event.position()) or self._clamp(event.position())
            x0, x1 = sorted((a[0], b[0]))
            y0, y1 = sorted((a[1], b[1]))
            if x1 - x0 >= 2 and y1 - y0 >= 2:
                self.boxed.emit(x0, y0, x1, y1)
            self.update()
        elif a is not None:
            self.clicked.emit(a[0], a[1], 0 if exclude else 1)

    def _clamp(self, p: QPointF) -> tuple[float, float]:
        r = self.photo_rect()
        q = QPointF(min(max(p.x(), r.left()), r.right() - 1e-3), min(max(p.y(), r.top()), r.bottom() - 1e-3))
        return self.to_photo(q)

    def dragEnterEvent(self, event) -> None:  # noqa: N802
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802
        urls = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if urls:
            self.file_dropped.emit(urls[0])
            event.acceptProposedAction()
