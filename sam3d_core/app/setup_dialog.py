"""First run: no worker environment was found; offer to make one (installer.py) with progress and its log."""

from __future__ import annotations

import threading

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from sam3d_core.serve import installer


class SetupDialog(QDialog):
    """Shows the plan, runs the install on a thread when asked, and emits `installed(python)` when done."""

    installed = Signal(str)
    _progress = Signal(str, float, str)
    _finished = Signal(object)  # InstallResult or InstallError

    def __init__(self, parent: QWidget | None = None, plan_options: dict | None = None, env: dict | None = None):
        super().__init__(parent)
        self.setWindowTitle("Set up the sam3d worker")
        self.plan_options = dict(plan_options or {})
        self.env = env
        self.cancel_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.result: installer.InstallResult | None = None
        self.error: installer.InstallError | None = None
        try:
            self.plan: installer.InstallPlan | None = installer.plan_install(**self.plan_options)
            text = (
                "No Python environment with sam3d and torch was found for the worker. The app can make a "
                f"private one now:\n\n{self.plan.describe()}.\n\nThis downloads from the internet."
            )
        except installer.InstallError as e:
            self.plan, text = None, f"Cannot set up the worker here: {e.message}"
        layout = QVBoxLayout(self)
        self.info = QLabel(text)
        self.info.setWordWrap(True)
        layout.addWidget(self.info)
        row = QHBoxLayout()
        row.addWidget(QLabel("Folder:"))
        self.target = QLineEdit(self.plan.target if self.plan else "")
        row.addWidget(self.target)
        layout.addLayout(row)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        layout.addWidget(self.bar)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.status)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(500)
        layout.addWidget(self.log)
        buttons = QHBoxLayout()
        self.start_button = QPushButton("Create the worker environment")
        self.start_button.setEnabled(self.plan is not None)
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self._progress.connect(self._on_progress)
        self._finished.connect(self._on_finished)
        self.resize(640, 420)

    def start(self) -> None:
        if self.plan is None or self.thread is not None:
            return
        opts = {**self.plan_options, "target": self.target.text().strip() or self.plan.target}
        try:
            self.plan = installer.plan_install(**opts)
        except installer.InstallError as e:
            self.status.setText(f"Problem: {e.message}")
            return
        self.start_button.setEnabled(False)
        self.target.setEnabled(False)
        self.cancel_event.clear()
        self.thread = threading.Thread(target=self._run, name="sam3d-install", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            result = installer.install(
                self.plan, progress=lambda *a: self._progress.emit(*a), cancel=self.cancel_event, env=self.env
            )
        except installer.InstallError as e:
            result = e
        self._finished.emit(result)

    def cancel(self) -> None:
        if self.thread is not None:
            self.cancel_event.set()
            self.status.setText("Cancelling: removing what was installed so far ...")
        else:
            self.reject()

    def _on_progress(self, step: str, fraction: float, message: str) -> None:
        self.bar.setValue(int(fraction * 1000))
        self.status.setText(f"{step}: {message}")
        self.log.appendPlainText(message)

    def _on_finished(self, outcome) -> None:
        self.thread = None
        if isinstance(outcome, installer.InstallError):
            self.error = outcome
            self.status.setText(f"Problem: {outcome.message}\nNothing was left installed. Log: {outcome.log}")
            self.start_button.setEnabled(outcome.kind != "target")
            self.target.setEnabled(True)
            return
        self.result = outcome
        self.bar.setValue(1000)
        self.status.setText(f"Done in {outcome.seconds:.0f} s: {outcome.python} (torch {outcome.doctor.get('torch')})")
        self.cancel_button.setText("Close")
        self.installed.emit(outcome.python)

    def wait(self, timeout: float | None = None) -> bool:
        """For scripts and tests: block until the install thread has ended (its signals still need the event loop)."""
        thread = self.thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True
