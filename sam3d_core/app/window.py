"""The standalone window: the panel beside the 3D view, a menu, and `run()` for `sam3d app`."""

from __future__ import annotations

import sys

from PySide6.QtCore import QSettings, Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QApplication, QMainWindow, QSplitter, QWidget

from sam3d_core.app.panel import Panel
from sam3d_core.app.view3d import View3D


class MainWindow(QMainWindow):
    def __init__(
        self, settings: QSettings | None = None, parent: QWidget | None = None, worker_env: dict | None = None
    ):
        super().__init__(parent)
        self.setWindowTitle("SAM 3D Objects")
        self.panel = Panel(settings, worker_env=worker_env)
        self.view3d = View3D()
        self.panel.results_changed.connect(self.view3d.set_results)
        self.panel.photo_opened.connect(self._on_photo)
        self.panel.status_changed.connect(lambda msg, level: self.statusBar().showMessage(msg))
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.panel)
        split.addWidget(self.view3d)
        split.setSizes([560, 640])
        self.setCentralWidget(split)
        self.setAcceptDrops(True)
        self._menus()
        self.resize(1280, 800)

    def _menus(self) -> None:
        file = self.menuBar().addMenu("&File")
        for text, keys, slot in (
            ("&Open photo ...", QKeySequence.StandardKey.Open, self.panel._ask_photo),
            ("&Export ...", "Ctrl+E", self.panel._ask_export),
            ("Open in &Blender ...", "Ctrl+B", self.panel._ask_blender),
            ("&Quit", QKeySequence.StandardKey.Quit, self.close),
        ):
            action = QAction(text, self)
            action.setShortcut(keys)
            action.triggered.connect(slot)
            file.addAction(action)
        file.insertMenu(file.actions()[1], self.panel.recent_menu).setText("Open &recent")
        view = self.menuBar().addMenu("&View")
        home = QAction("Photo camera (home)", self)
        home.setShortcut("Home")
        home.triggered.connect(self.view3d.home)
        textured = QAction("Textured", self, checkable=True, checked=True)
        textured.toggled.connect(self.view3d.set_textured)
        view.addAction(home)
        view.addAction(textured)
        worker = self.menuBar().addMenu("&Worker")
        for text, slot in (("Restart", self.panel.restart_worker), ("Set up worker ...", self.panel.offer_setup)):
            action = QAction(text, self)
            action.triggered.connect(slot)
            worker.addAction(action)

    def _on_photo(self, image, K) -> None:
        self.view3d.set_photo(image, K)
        self.view3d.set_results(self.panel.shown_results())

    def dragEnterEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802
        urls = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if urls:
            self.panel.open_photo(urls[0])

    def closeEvent(self, event) -> None:  # noqa: N802
        self.panel.shutdown()
        super().closeEvent(event)


def run(photo: str | None = None, settings_file: str | None = None) -> int:
    """Open the window (and the photo); returns when it closes. Uses the running QApplication when there is one."""
    app = QApplication.instance() or QApplication(sys.argv[:1])
    settings = QSettings(settings_file, QSettings.Format.IniFormat) if settings_file else None
    window = MainWindow(settings)
    window.show()
    if photo:
        window.panel.open_photo(photo)
    else:
        window.panel.start_worker()
    return app.exec()
