"""The app's panel: the photo with its selection tools, the objects, the settings, and the actions.

It does not assume it owns the application: it makes no QApplication, no menu bar and no main window, so a
host that loads PySide6 plugins (Maya, Houdini, Nuke; docs/app.md) can dock it. The standalone window
(window.py) puts it next to the 3D view. Every worker request goes through WorkerLink (non-blocking);
every message for the user goes to the status line (`status_text`), never to a traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, Signal
from PySide6.QtGui import QImage, QImageReader, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMenu,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from sam3d_core.app import blender, records
from sam3d_core.app.photo_view import MASK_COLORS, PhotoView, load_mask, mask_overlay
from sam3d_core.app.records import Candidate, JobSettings, ObjectItem
from sam3d_core.app.worker import WorkerLink, find_worker_python
from sam3d_core.serve import installer

DEFAULT_FOV_DEG = 60.0  # the worker's fallback (inputs/camera.py), until its open_photo answer arrives
MAX_RECENT = 8
VRAM = ("auto", "low", "medium", "high")


def _default_K(width: int, height: int) -> list[list[float]]:
    import math

    fx = 0.5 * width / math.tan(math.radians(DEFAULT_FOV_DEG) / 2)
    return [[fx, 0.0, width / 2.0], [0.0, fx, height / 2.0], [0.0, 0.0, 1.0]]


class Panel(QWidget):
    results_changed = Signal(list)  # the worker results to show in 3D (kept objects, previewed candidates)
    photo_opened = Signal(object, object)  # QImage, K (3x3 rows)
    status_changed = Signal(str, str)  # message, level (INFO | WARNING | ERROR)

    def __init__(
        self, settings: QSettings | None = None, parent: QWidget | None = None, worker_env: dict | None = None
    ):
        super().__init__(parent)
        self.settings = settings or QSettings("sam3d", "sam3d-app")
        self.worker_env = worker_env  # the worker's environment (None: this process's)
        self.link = WorkerLink(self)
        self.link.state_changed.connect(self._on_worker_state)
        self.photo: str = ""
        self.image: QImage | None = None
        self.K: list[list[float]] | None = None
        self.scale = 1.0  # worker pixels per displayed pixel (the worker may downscale large photos)
        self.segmenter: dict = {}
        self.items: list[ObjectItem] = []
        self.history: list[tuple[list, tuple | None]] = [([], None)]  # clicks and box after each edit
        self.hist_pos = 0
        self.draft_mask = ""
        self._seg_gen = 0
        self._preview: dict[str, int] = {}  # item uid -> candidate index shown
        self.status_text, self.status_level = "", "INFO"
        self.setup_dialog = None
        self._build()
        self._load_settings()

    # ------------------------------------------------------------------------------------------
    # Layout

    def _build(self) -> None:
        root = QVBoxLayout(self)
        tools = QHBoxLayout()
        self.open_button = QPushButton("Open photo ...")
        self.open_button.clicked.connect(self._ask_photo)
        self.recent_button = QToolButton()
        self.recent_button.setText("Recent")
        self.recent_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.recent_menu = QMenu(self)
        self.recent_button.setMenu(self.recent_menu)
        self.find_button = QPushButton("Find all objects")
        self.find_button.clicked.connect(self.find_all)
        self.undo_button = QPushButton("Undo")
        self.undo_button.clicked.connect(self.undo)
        self.redo_button = QPushButton("Redo")
        self.redo_button.clicked.connect(self.redo)
        self.clear_button = QPushButton("Clear clicks")
        self.clear_button.clicked.connect(self.clear_prompts)
        self.add_button = QPushButton("Add object")
        self.add_button.clicked.connect(lambda: self.add_object())
        self.mask_button = QPushButton("Add mask file ...")
        self.mask_button.clicked.connect(self._ask_mask)
        for w in (self.open_button, self.recent_button, self.find_button, self.undo_button, self.redo_button,
                  self.clear_button, self.add_button, self.mask_button):  # fmt: skip
            tools.addWidget(w)
        tools.addStretch(1)
        root.addLayout(tools)
        root.addLayout(self._find_row())
        split = QSplitter(Qt.Orientation.Vertical)
        self.view = PhotoView()
        self.view.clicked.connect(self.add_click)
        self.view.boxed.connect(lambda *b: self.set_box(b))
        self.view.file_dropped.connect(self.open_photo)
        split.addWidget(self.view)
        lower = QWidget()
        low = QHBoxLayout(lower)
        low.setContentsMargins(0, 0, 0, 0)
        low.addWidget(self._objects_box(), 3)
        low.addWidget(self._settings_box(), 2)
        split.addWidget(lower)
        split.setStretchFactor(0, 3)
        root.addWidget(split, 1)
        self.weights_label = QLabel("")
        self.weights_label.setWordWrap(True)
        self.weights_label.setStyleSheet("color: #e0a030")
        root.addWidget(self.weights_label)
        status = QHBoxLayout()
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        status.addWidget(self.status_label, 1)
        self.worker_label = QLabel("worker: stopped")
        status.addWidget(self.worker_label)
        self.restart_button = QPushButton("Restart worker")
        self.restart_button.clicked.connect(self.restart_worker)
        status.addWidget(self.restart_button)
        root.addLayout(status)
        for keys, slot in (("Ctrl+Z", self.undo), ("Ctrl+Shift+Z", self.redo), ("Ctrl+Y", self.redo)):
            QShortcut(QKeySequence(keys), self, slot, context=Qt.ShortcutContext.WidgetWithChildrenShortcut)

    def _find_row(self) -> QHBoxLayout:
        """The Find field (SAM 3): a word, and/or the drawn box as an example -> one object row per instance."""
        row = QHBoxLayout()
        row.addWidget(QLabel("Find:"))
        self.find_edit = QLineEdit()
        self.find_edit.setPlaceholderText("every instance of a word, e.g. chair (SAM 3); a drawn box is an example")
        self.find_edit.returnPressed.connect(lambda: self.find_concept())
        row.addWidget(self.find_edit, 1)
        self.find_concept_button = QPushButton("Find")
        self.find_concept_button.clicked.connect(lambda: self.find_concept())
        row.addWidget(self.find_concept_button)
        return row

    def _objects_box(self) -> QGroupBox:
        box = QGroupBox("Objects")
        lay = QVBoxLayout(box)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Object", "Status", "Progress"])
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.itemSelectionChanged.connect(self._on_selection)
        lay.addWidget(self.table)
        row = QHBoxLayout()
        self.reconstruct_button = QPushButton("Reconstruct")
        self.reconstruct_button.clicked.connect(self.reconstruct)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(lambda: self.cancel())
        self.reroll_button = QPushButton("Re-roll")
        self.reroll_button.clicked.connect(lambda: self.reroll())
        self.best_n = QSpinBox()
        self.best_n.setRange(2, 8)
        self.best_n.setValue(3)
        self.best_button = QPushButton("Best of N")
        self.best_button.clicked.connect(lambda: self.best_of(n=self.best_n.value()))
        self.remove_button = QPushButton("Remove")
        self.remove_button.clicked.connect(lambda: self.remove())
        for w in (self.reconstruct_button, self.cancel_button, self.reroll_button, self.best_n, self.best_button,
                  self.remove_button):  # fmt: skip
            row.addWidget(w)
        lay.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(QLabel("Candidates:"))
        self.candidate_combo = QComboBox()
        self.candidate_combo.currentIndexChanged.connect(self._on_candidate_preview)
        row.addWidget(self.candidate_combo, 1)
        self.keep_button = QPushButton("Keep")
        self.keep_button.clicked.connect(lambda: self.keep_candidate(index=self.candidate_combo.currentIndex()))
        self.reject_button = QPushButton("Reject all")
        self.reject_button.clicked.connect(lambda: self.reject_candidates())
        row.addWidget(self.keep_button)
        row.addWidget(self.reject_button)
        lay.addLayout(row)
        row = QHBoxLayout()
        self.export_button = QPushButton("Export ...")
        self.export_button.clicked.connect(self._ask_export)
        self.blender_button = QPushButton("Open in Blender ...")
        self.blender_button.clicked.connect(self._ask_blender)
        row.addWidget(self.export_button)
        row.addWidget(self.blender_button)
        lay.addLayout(row)
        return box

    def _settings_box(self) -> QGroupBox:
        box = QGroupBox("Settings")
        form = QFormLayout(box)
        self.w_steps = QSpinBox()
        self.w_steps.setRange(0, 1000)
        self.w_steps.setSpecialValueText("model's")
        self.w_seed = QSpinBox()
        self.w_seed.setRange(0, 2**31 - 1)
        self.w_fast = QCheckBox("fast mode (shortcut model)")
        self.w_textured = QCheckBox("textured mesh (off: coarse shape only)")
        self.w_texture = QSpinBox()
        self.w_texture.setRange(64, 8192)
        self.w_faces = QSpinBox()
        self.w_faces.setRange(100, 2_000_000)
        self.w_vram = QComboBox()
        self.w_vram.addItems(VRAM)
        self.w_model = QLineEdit()
        self.w_model.setPlaceholderText("best available (or 'tiny', an imported name)")
        self.w_device = QComboBox()
        self.w_device.addItems(["auto", "cuda", "cpu"])
        self.w_voxels = QSpinBox()
        self.w_voxels.setRange(0, 1_000_000)
        self.w_voxels.setSpecialValueText("model's")
        self.w_python = QLineEdit()
        self.w_python.setPlaceholderText("found automatically")
        self.w_output = QLineEdit()
        self.w_output.setPlaceholderText("a temporary folder")
        self.w_log = QLineEdit()
        self.w_log.setPlaceholderText(str(records.default_log_path(installer.data_dir())))
        self.w_blender = QLineEdit()
        self.w_blender.setPlaceholderText("blender on PATH, or a Python with bpy")
        setup = QPushButton("Set up worker ...")
        setup.clicked.connect(self.offer_setup)
        for label, w in (("Steps", self.w_steps), ("Seed", self.w_seed), ("", self.w_fast), ("", self.w_textured),
                         ("Texture size", self.w_texture), ("Faces", self.w_faces), ("GPU memory", self.w_vram),
                         ("Model", self.w_model), ("Device", self.w_device), ("Max voxels", self.w_voxels),
                         ("Worker Python", self.w_python), ("", setup), ("Output folder", self.w_output),
                         ("Preference log", self.w_log), ("Blender", self.w_blender)):  # fmt: skip
            form.addRow(label, w)
        return box

    # ------------------------------------------------------------------------------------------
    # Settings (persist in QSettings)

    _KEYS = {"steps": 0, "seed": 42, "fast": False, "textured": True, "texture_size": 1024, "faces": 20000,
             "vram": "auto", "model": "", "device": "auto", "max_voxels": 0, "worker_python": "", "output_dir": "",
             "preference_log": "", "blender": ""}  # fmt: skip

    def _widgets(self) -> dict:
        return {"steps": self.w_steps, "seed": self.w_seed, "fast": self.w_fast, "textured": self.w_textured,
                "texture_size": self.w_texture, "faces": self.w_faces, "vram": self.w_vram, "model": self.w_model,
                "device": self.w_device, "max_voxels": self.w_voxels, "worker_python": self.w_python,
                "output_dir": self.w_output, "preference_log": self.w_log, "blender": self.w_blender}  # fmt: skip

    def _load_settings(self) -> None:
        for key, w in self._widgets().items():
            value = self.settings.value(key, self._KEYS[key])
            if isinstance(w, QSpinBox):
                w.setValue(int(value))
                w.valueChanged.connect(lambda v, k=key: self.settings.setValue(k, int(v)))
            elif isinstance(w, QCheckBox):
                w.setChecked(str(value).lower() in ("true", "1"))
                w.toggled.connect(lambda v, k=key: self.settings.setValue(k, bool(v)))
            elif isinstance(w, QComboBox):
                w.setCurrentText(str(value))
                w.currentTextChanged.connect(lambda v, k=key: self.settings.setValue(k, v))
            else:
                w.setText(str(value or ""))
                w.textChanged.connect(lambda v, k=key: self.settings.setValue(k, v))
        self._refresh_recent()

    def set_setting(self, key: str, value) -> None:
        """Change a setting as the user would (the widget, hence QSettings)."""
        w = self._widgets()[key]
        if isinstance(w, QSpinBox):
            w.setValue(int(value))
        elif isinstance(w, QCheckBox):
            w.setChecked(bool(value))
        elif isinstance(w, QComboBox):
            w.setCurrentText(str(value))
        else:
            w.setText(str(value))

    def job_settings(self) -> JobSettings:
        return JobSettings(self.w_steps.value(), self.w_seed.value(), self.w_fast.isChecked(),
                           self.w_textured.isChecked(), self.w_texture.value(), self.w_faces.value(),
                           self.w_vram.currentText())  # fmt: skip

    def preference_log_path(self) -> str:
        return self.w_log.text().strip() or str(records.default_log_path(installer.data_dir()))

    def work_dir(self) -> Path:
        base = Path(self.w_output.text().strip() or Path(tempfile.gettempdir()) / "sam3d_app").expanduser()
        path = base / (Path(self.photo).stem or "photo")
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------------------------------------
    # Messages

    def report(self, message: str, level: str = "INFO") -> None:
        self.status_text, self.status_level = message, level
        color = {"ERROR": "#ff6b6b", "WARNING": "#e0a030"}.get(level, "")
        self.status_label.setStyleSheet(f"color: {color}" if color else "")
        self.status_label.setText(message)
        self.status_changed.emit(message, level)

    # ------------------------------------------------------------------------------------------
    # The worker

    def start_worker(self) -> bool:
        """Start the worker with the settings; False (and the first-run offer) when no environment is found."""
        found = find_worker_python(self.w_python.text().strip())
        if found is None:
            if self.w_python.text().strip():
                self.report(f"the Worker Python {self.w_python.text().strip()!r} does not exist; fix it in Settings",
                            "ERROR")  # fmt: skip
            else:
                self.report(
                    "no worker environment (Python with sam3d and torch) was found: Set up worker ...", "WARNING"
                )
                self.offer_setup()
            return False
        extra = ("--max-voxels", self.w_voxels.value()) if self.w_voxels.value() else ()
        self.link.start(found.python, self.w_model.text().strip(), self.w_device.currentText(), extra, self.worker_env)
        self.worker_label.setToolTip(f"{found.python} ({found.source})")
        return True

    def ensure_worker(self) -> bool:
        if self.link.state in ("starting", "ready"):
            return True
        if self.link.state == "crashed":
            self.report("the worker stopped; press Restart worker (finished objects are kept)", "ERROR")
            return False
        return self.start_worker()

    def restart_worker(self) -> None:
        self.link.stop()
        if self.start_worker():
            self.report("restarting the worker ...")
            if self.photo:
                self._request_photo_info()

    def offer_setup(self) -> None:
        from sam3d_core.app.setup_dialog import SetupDialog

        self.setup_dialog = SetupDialog(self, env=self.worker_env)
        self.setup_dialog.installed.connect(self._on_installed)
        self.setup_dialog.show()

    def _on_installed(self, python: str) -> None:
        self.set_setting("worker_python", python)
        self.report(f"worker environment ready: {python}")
        self.restart_worker()

    def _on_worker_state(self, state: str, message: str) -> None:
        self.worker_label.setText(f"worker: {state}")
        if state == "ready":
            hello = self.link.hello or {}
            random = str(hello.get("weights", "")).startswith("random")
            self.weights_label.setText(
                f"No weights imported: {hello.get('model')}. Import the official weights with `sam3d weights "
                "import FOLDER` to get real shapes."
                if random
                else f"Model: {hello.get('model')}"
            )
            if self.status_level != "ERROR":
                self.report(message)
        elif state in ("failed", "crashed"):
            self.report(message + ("; press Restart worker (finished objects are kept)" if state == "crashed" else ""),
                        "ERROR")  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # The photo

    def _ask_photo(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open photo", "", "Images (*.png *.jpg *.jpeg *.tif *.tiff *.bmp *.webp)"
        )
        if path:
            self.open_photo(path)

    def open_photo(self, path: str) -> bool:
        """Show a photo (EXIF rotation applied, as the worker reads it); the worker refines its camera."""
        path = os.path.abspath(os.path.expanduser(path))
        reader = QImageReader(path)
        reader.setAutoTransform(True)
        image = reader.read()
        if image.isNull():
            self.report(f"cannot read the photo {path}: {reader.errorString()}; open a PNG, JPEG, TIFF or BMP image",
                        "ERROR")  # fmt: skip
            return False
        for it in self.items:
            for job_id in list(it.jobs):
                self.link.cancel(job_id)
        self.photo, self.image, self.items, self.scale = path, image, [], 1.0
        self.K = _default_K(image.width(), image.height())
        self.history, self.hist_pos, self.draft_mask, self._preview = [([], None)], 0, "", {}
        self.view.set_photo(image)
        self._remember(path)
        self.refresh()
        self.photo_opened.emit(image, self.K)
        self.report(f"opened {os.path.basename(path)} ({image.width()}x{image.height()}); click an object")
        if self.ensure_worker():
            self._request_photo_info()
        return True

    def _request_photo_info(self) -> None:
        photo = self.photo

        def done(msg: dict) -> None:
            if photo != self.photo:
                return
            if msg.get("type") != "photo":
                self.report(f"the worker cannot read the photo: {msg.get('message', msg.get('type'))}", "ERROR")
                return
            self.scale = msg["width"] / max(self.image.width(), 1)
            self.K = [[v / self.scale if i < 2 else v for v in row] for i, row in enumerate(msg["K"])]
            self.segmenter = msg.get("segmenter") or {}
            notes = "; ".join(msg.get("notes") or [])
            seg = self.segmenter
            fallback = f" (selection: {seg.get('name')}: {seg.get('reason')})" if seg.get("fallback") else ""
            self.report(f"camera from {msg.get('intrinsics_source')}{fallback}" + (f"; {notes}" if notes else ""),
                        "WARNING" if fallback else "INFO")  # fmt: skip
            self.photo_opened.emit(self.image, self.K)
            self.refresh()

        self.link.submit({"type": "open_photo", "photo": photo}, on_done=done)

    def _remember(self, path: str) -> None:
        recent = [p for p in (self.settings.value("recent", []) or []) if p != path]
        self.settings.setValue("recent", [path, *recent][:MAX_RECENT])
        self._refresh_recent()

    def recent(self) -> list[str]:
        value = self.settings.value("recent", []) or []
        return [value] if isinstance(value, str) else list(value)

    def _refresh_recent(self) -> None:
        self.recent_menu.clear()
        for p in self.recent():
            self.recent_menu.addAction(p, lambda p=p: self.open_photo(p))

    # ------------------------------------------------------------------------------------------
    # Selection: clicks, box, undo / redo, masks

    @property
    def prompts(self) -> tuple[list, tuple | None]:
        return self.history[self.hist_pos]

    def _edit(self, points: list, box) -> None:
        self.history = self.history[: self.hist_pos + 1] + [(points, box)]
        self.hist_pos += 1
        self._segment()

    def add_click(self, x: float, y: float, label: int = 1) -> None:
        if not self.photo:
            self.report("open a photo first", "ERROR")
            return
        points, box = self.prompts
        self._edit([*points, (float(x), float(y), int(label))], box)

    def set_box(self, box) -> None:
        points, _ = self.prompts
        self._edit(list(points), tuple(float(v) for v in box))

    def clear_prompts(self) -> None:
        if self.prompts != ([], None):
            self._edit([], None)

    def undo(self) -> None:
        if self.hist_pos > 0:
            self.hist_pos -= 1
            self._segment()

    def redo(self) -> None:
        if self.hist_pos + 1 < len(self.history):
            self.hist_pos += 1
            self._segment()

    def _segment(self) -> None:
        points, box = self.prompts
        self.view.set_prompts(points, box)
        self._seg_gen += 1
        if not points and box is None:
            self.draft_mask = ""
            self.refresh()
            return
        if not self.ensure_worker():
            return
        gen, s = self._seg_gen, self.scale
        out = str(self.work_dir() / f"draft_{gen}.png")

        def done(msg: dict) -> None:
            if gen != self._seg_gen:
                return  # a newer click superseded this answer
            if msg.get("type") != "result" or not msg.get("mask"):
                self.report(f"selection failed: {msg.get('message', msg.get('type'))}", "ERROR")
                return
            self.draft_mask = msg["mask"]
            score = msg.get("score")
            self.report(f"selected {msg.get('area')} px" + (f", score {score:.2f}" if score is not None else "")
                        + f" ({msg.get('segmenter')}); Add object to keep it")  # fmt: skip
            self.refresh()

        self.link.submit(
            {"type": "segment", "photo": self.photo, "out": out,
             "points": [[x * s, y * s, label] for x, y, label in points],
             "box": None if box is None else [v * s for v in box]},
            on_done=done,
        )  # fmt: skip

    def add_object(self, name: str = "") -> ObjectItem | None:
        """The current selection becomes an object of the list; the clicks are cleared."""
        if not self.draft_mask or not os.path.isfile(self.draft_mask):
            self.report("no mask yet: click on the object in the photo first (and wait for its outline)", "ERROR")
            return None
        item = self._add_item(self.draft_mask, name)
        self.history, self.hist_pos, self.draft_mask = [([], None)], 0, ""
        self.view.set_prompts([], None)
        self.refresh()
        self.report(f"added {item.name}; click the next object or press Reconstruct")
        return item

    def _ask_mask(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Add mask", "", "Images (*.png *.jpg *.jpeg *.tif *.tiff *.bmp)")
        if path:
            self.add_mask_file(path)

    def add_mask_file(self, path: str, name: str = "") -> ObjectItem | None:
        """A mask image made elsewhere (white = object, the photo's size) becomes an object."""
        if not self.photo:
            self.report("open a photo first", "ERROR")
            return None
        mask = load_mask(path)
        if mask is None:
            self.report(f"cannot read the mask {path}: not an image; use a PNG (white = object)", "ERROR")
            return None
        want = (self.image.height(), self.image.width())
        if mask.shape != want:
            self.report(f"mask is {mask.shape[1]}x{mask.shape[0]} pixels but the photo is {want[1]}x{want[0]}; the "
                        "mask must have the photo's size (resize it, nearest neighbour)", "ERROR")  # fmt: skip
            return None
        item = self._add_item(path, name)
        self.refresh()
        self.report(f"added {item.name} from {os.path.basename(path)}")
        return item

    def _add_item(self, mask: str, name: str) -> ObjectItem:
        name = records.unique_name(name or f"object_{len(self.items)}", [it.name for it in self.items])
        dst = self.work_dir() / f"mask_{uuid.uuid4().hex[:8]}.png"
        shutil.copyfile(mask, dst)  # jobs read it later: a copy that later clicks do not overwrite
        item = ObjectItem(name, str(dst))
        self.items.append(item)
        return item

    def find_all(self) -> None:
        if not self.photo:
            self.report("open a photo first", "ERROR")
            return
        if not self.ensure_worker():
            return
        photo = self.photo

        def done(msg: dict) -> None:
            if photo != self.photo:
                return
            if msg.get("type") != "result":
                self.report(f"finding objects failed: {msg.get('message', msg.get('type'))}", "ERROR")
                return
            for path in msg.get("masks") or []:
                self._add_item(path, "")
            self.refresh()
            self.report(f"found {len(msg.get('masks') or [])} object(s) ({msg.get('segmenter')})")

        out = str(self.work_dir() / f"all_{uuid.uuid4().hex[:6]}")
        self.link.submit({"type": "segment_all", "photo": photo, "out_dir": out}, on_done=done)
        self.report("finding objects ...")

    def find_concept(self, text: str | None = None, min_score: float = 0.5) -> bool:
        """SAM 3: every instance of `text` (default: the Find field) and/or of what the drawn box shows; each
        instance becomes an object row as it arrives (remove the unwanted ones, then Reconstruct)."""
        text = (self.find_edit.text() if text is None else text).strip()
        _, box = self.prompts
        if not self.photo:
            self.report("open a photo first", "ERROR")
            return False
        if not text and box is None:
            self.report("type what to find (e.g. chair) in the Find field, or draw a box around one instance", "ERROR")
            return False
        if not self.ensure_worker():
            return False
        photo, s, base = self.photo, self.scale, re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:40] or "found"
        added: list[ObjectItem] = []

        def event(msg: dict) -> None:
            if msg.get("type") == "instance" and msg.get("mask") and photo == self.photo:
                added.append(self._add_item(msg["mask"], f"{base}_{len(added)}"))
                self.refresh()

        def done(msg: dict) -> None:
            if photo != self.photo:
                return
            if msg.get("type") != "result":
                self.report(f"finding failed: {msg.get('message', msg.get('type'))}", "ERROR")
                return
            what = text or "the box's kind of object"
            self.report(f"found {len(added)} {what} ({msg.get('segmenter')})"
                        + ("; remove the rows you do not want, then Reconstruct" if added else
                           f"; none scored above {min_score}"), "INFO" if added else "WARNING")  # fmt: skip

        out = str(self.work_dir() / f"find_{uuid.uuid4().hex[:6]}")
        req = {"type": "segment_concept", "photo": photo, "out_dir": out, "text": text or None,
               "boxes": [] if box is None else [[*(v * s for v in box), 1]], "min_score": min_score}  # fmt: skip
        self.link.submit(req, on_event=event, on_done=done)
        self.report(f"finding {text or 'what the box shows'} ...")
        return True

    # ------------------------------------------------------------------------------------------
    # Reconstruction, cancel, re-roll, best of N

    def item(self, uid_or_name: str | None = None) -> ObjectItem | None:
        if uid_or_name is None:
            rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
            return self.items[rows[0].row()] if rows and rows[0].row() < len(self.items) else None
        return next((it for it in self.items if uid_or_name in (it.uid, it.name)), None)

    def select(self, name: str) -> None:
        for row, it in enumerate(self.items):
            if it.name == name:
                self.table.selectRow(row)

    def reconstruct(self) -> int:
        """Send every object without a result (or whose last job failed) to the worker; returns how many."""
        todo = [it for it in self.items if it.status in ("MASKED", "ERROR", "CANCELLED") and it.kept is None]
        if not todo:
            self.report("nothing to reconstruct: add objects first (click them on the photo)", "ERROR")
            return 0
        if not self.ensure_worker():
            return 0
        for it in todo:
            self._submit(it, it.seed if it.seed is not None else self.w_seed.value(), "add")
        self.report(f"reconstructing {len(todo)} object(s) ...")
        return len(todo)

    def _submit(self, item: ObjectItem, seed: int, mode: str) -> None:
        out = str(self.work_dir() / f"{item.safe_name}_seed{seed}_{uuid.uuid4().hex[:6]}")
        req = self.job_settings().request(self.photo, item.mask, out, item.safe_name, seed)
        item.status, item.stage, item.step, item.total, item.message = "QUEUED", "", 0, 0, ""
        holder: dict = {}

        def event(msg: dict) -> None:
            if msg.get("type") == "progress":
                item.status, item.stage = "RUNNING", str(msg.get("stage", ""))
                item.step, item.total = int(msg.get("step", 0)), int(msg.get("total", 0))
                self._refresh_row(item)

        def done(msg: dict) -> None:
            item.jobs.discard(holder.get("id"))
            self._job_done(item, seed, mode, msg)

        job = self.link.submit(req, on_event=event, on_done=done)
        if job is not None:
            holder["id"] = job.id
            item.jobs.add(job.id)
        self.refresh()

    def _job_done(self, item: ObjectItem, seed: int, mode: str, msg: dict) -> None:
        if item not in self.items:
            return
        busy = bool(item.jobs)
        if msg.get("type") == "cancelled":
            item.message = f"cancelled ({msg.get('stage', '?')})"
            item.status = "CANCELLED" if item.kept is None and not busy else item.status
            if item.kept is not None and not busy:
                item.status = "DONE"
        elif msg.get("type") != "result":
            item.message = msg.get("message") or f"the worker answered {msg.get('type')}"
            item.status = "ERROR" if not busy else item.status
            if item.kept is not None and not busy:
                item.status = "DONE"  # an earlier result stays; the message says what failed
            # The job's failure and the link's crash arrive in either order: whichever comes last keeps the hint.
            hint = "; press Restart worker (finished objects are kept)" if self.link.state == "crashed" else ""
            self.report(f"{item.name}: {item.message}{hint}", "ERROR")
        else:
            cand = Candidate(msg, int((msg.get("settings") or {}).get("seed", seed)))
            if mode == "candidate":
                item.candidates.append(cand)
                item.message = f"{len(item.candidates)}/{item.expected} candidates"
            else:
                old = item.kept
                if mode == "reroll" and old is not None:
                    self._log("reroll", item, None, [old.info()])
                item.kept, item.seed = cand, cand.seed
                item.message = f"seed {cand.seed}" + ("" if msg.get("mesh_glb") else " (stage-1 voxels)")
            item.status = "DONE" if not busy else "RUNNING"
            item.stage = ""
        self.refresh()

    def cancel(self, name: str | None = None) -> int:
        """Cancel the jobs of one object (the selected one; all objects when none is selected)."""
        target = self.item(name)
        chosen = [target] if target is not None else self.items
        n = 0
        for it in chosen:
            for job_id in list(it.jobs):
                self.link.cancel(job_id)
                n += 1
        self.report(f"cancelling {n} job(s) ..." if n else "nothing to cancel")
        return n

    def reroll(self, name: str | None = None) -> bool:
        """Reconstruct an object again with the next seed; the new result replaces it (logged as a re-roll)."""
        item = self.item(name)
        if item is None or item.kept is None:
            self.report("select a reconstructed object to re-roll", "ERROR")
            return False
        if not self.ensure_worker():
            return False
        seed = (item.seed if item.seed is not None else self.w_seed.value()) + 1
        self._submit(item, seed, "reroll")
        self.report(f"re-rolling {item.name} with seed {seed} ...")
        return True

    def best_of(self, name: str | None = None, n: int = 3) -> bool:
        """N reconstructions with consecutive seeds; pick one with Keep (logged as best of N)."""
        item = self.item(name)
        if item is None:
            self.report("select an object for best of N", "ERROR")
            return False
        if not self.ensure_worker():
            return False
        item.candidates, item.expected = [], n
        base = item.seed if item.seed is not None else self.w_seed.value()
        for i in range(n):
            self._submit(item, base + 1 + i, "candidate")
        self.report(f"{n} candidates of {item.name} ...")
        return True

    def keep_candidate(self, name: str | None = None, index: int = 0) -> bool:
        item = self.item(name)
        if item is None or not 0 <= index < len(item.candidates):
            self.report("no candidate to keep: run Best of N first and wait for the candidates", "ERROR")
            return False
        chosen = item.candidates[index]
        rejected = [c for i, c in enumerate(item.candidates) if i != index]
        self._log("best_of_n", item, chosen.info(), [c.info() for c in rejected])
        item.kept, item.seed, item.candidates, item.expected = chosen, chosen.seed, [], 0
        item.message = f"kept seed {chosen.seed} of {len(rejected) + 1}"
        self._preview.pop(item.uid, None)
        self.refresh()
        self.report(f"{item.name}: {item.message}")
        return True

    def reject_candidates(self, name: str | None = None) -> bool:
        item = self.item(name)
        if item is None or not item.candidates:
            self.report("no candidates to reject", "ERROR")
            return False
        self._log("best_of_n", item, None, [c.info() for c in item.candidates])
        item.candidates, item.expected, item.message = [], 0, "candidates rejected"
        self.refresh()
        return True

    def remove(self, name: str | None = None) -> None:
        item = self.item(name)
        if item is None:
            return
        for job_id in list(item.jobs):
            self.link.cancel(job_id)
        self.items.remove(item)
        self.refresh()

    def _log(self, kind: str, item: ObjectItem, chosen: dict | None, rejected: list[dict]) -> None:
        record = records.preference_record(kind, self.photo, item.mask, chosen, rejected, model=self.link.model_text)
        try:
            records.append_record(self.preference_log_path(), record)
        except OSError as e:
            self.report(f"could not write the preference log {self.preference_log_path()} ({e}); check Settings",
                        "ERROR")  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # Export and Blender

    def _ask_export(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export to an empty folder")
        if folder:
            self.export(folder)

    def export(self, folder: str) -> dict | None:
        try:
            record = records.export_scene(self.items, self.photo, folder, self.link.model_text)
        except (records.ExportError, OSError, ValueError) as e:
            self.report(f"export failed: {e}", "ERROR")
            return None
        self.report(f"exported {len(record['objects'])} object(s) to {folder}: scene.json"
                    + (", scene.glb" if "scene_glb" in record else ""))  # fmt: skip
        return record

    def _ask_blender(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder for the export and the .blend")
        if folder:
            self.open_in_blender(folder)

    def open_in_blender(self, folder: str) -> str | None:
        """Export, then write scene.blend with the add-on's scene builder; returns (and shows) the open command."""
        runner = blender.find_runner(self.w_blender.text().strip())
        if runner is None:
            self.report("Blender was not found: set Settings > Blender to the blender executable", "ERROR")
            return None
        if self.export(folder) is None:
            return None
        blend = os.path.join(folder, "scene.blend")
        try:
            blender.write_blend(runner, os.path.join(folder, "scene.json"), blend)
        except (OSError, RuntimeError, FileNotFoundError) as e:
            self.report(str(e), "ERROR")
            return None
        command = blender.open_command(blend, runner)
        self.report(f"wrote {blend}; open it with: {command}")
        return command

    # ------------------------------------------------------------------------------------------
    # Display

    def shown_results(self) -> list[dict]:
        out = []
        for it in self.items:
            if it.candidates:
                i = min(self._preview.get(it.uid, 0), len(it.candidates) - 1)
                out.append(it.candidates[i].result)
            elif it.kept is not None:
                out.append(it.kept.result)
        return out

    def refresh(self) -> None:
        self.table.blockSignals(True)
        selected = self.item()
        self.table.setRowCount(len(self.items))
        for row, it in enumerate(self.items):
            self.table.setItem(row, 0, QTableWidgetItem(it.name))
            self.table.setItem(row, 1, QTableWidgetItem(it.status + (f": {it.message}" if it.message else "")))
            bar = self.table.cellWidget(row, 2)
            if not isinstance(bar, QProgressBar):
                bar = QProgressBar()
                self.table.setCellWidget(row, 2, bar)
            self._fill_bar(bar, it)
        if selected in self.items:
            self.table.selectRow(self.items.index(selected))
        self.table.blockSignals(False)
        overlays = []
        for i, it in enumerate(self.items):
            mask = load_mask(it.mask)
            if mask is not None:
                overlays.append(mask_overlay(mask, MASK_COLORS[i % len(MASK_COLORS)], 90))
        if self.draft_mask:
            mask = load_mask(self.draft_mask)
            if mask is not None and self.image is not None and mask.shape == (self.image.height(), self.image.width()):
                overlays.append(mask_overlay(mask, (0, 255, 255), 120))
        self.view.set_overlays(overlays)
        self._refresh_candidates()
        self.results_changed.emit(self.shown_results())

    def _refresh_row(self, item: ObjectItem) -> None:
        if item in self.items:
            row = self.items.index(item)
            self.table.setItem(row, 1, QTableWidgetItem(item.status))
            bar = self.table.cellWidget(row, 2)
            if isinstance(bar, QProgressBar):
                self._fill_bar(bar, item)

    @staticmethod
    def _fill_bar(bar: QProgressBar, it: ObjectItem) -> None:
        if it.status == "RUNNING" and it.total:
            bar.setRange(0, it.total)
            bar.setValue(it.step)
            bar.setFormat(f"{it.stage} %v/%m")
        else:
            done = it.status == "DONE"
            bar.setRange(0, 1)
            bar.setValue(1 if done else 0)
            bar.setFormat({"RUNNING": it.stage or "running", "QUEUED": "queued"}.get(it.status, it.status.lower()))

    def _refresh_candidates(self) -> None:
        item = self.item()
        self.candidate_combo.blockSignals(True)
        self.candidate_combo.clear()
        if item is not None:
            for c in item.candidates:
                iou = c.result.get("mask_iou")
                self.candidate_combo.addItem(f"seed {c.seed}" + (f", mask IoU {iou:.2f}" if iou is not None else ""))
            self.candidate_combo.setCurrentIndex(min(self._preview.get(item.uid, 0), max(len(item.candidates) - 1, 0)))
        self.candidate_combo.blockSignals(False)

    def _on_selection(self) -> None:
        self._refresh_candidates()

    def _on_candidate_preview(self, index: int) -> None:
        item = self.item()
        if item is not None and index >= 0:
            self._preview[item.uid] = index
            self.results_changed.emit(self.shown_results())

    def shutdown(self) -> None:
        """Stop the worker (the host or the window is closing)."""
        self.link.stop()
