"""A small desktop chat window that embeds the edgeinfer runtime in-process.

    .venv/bin/python apps/desktop/chat_app.py [PACKAGE]      (or: make desktop)

Pick a package folder, type, press Enter: the reply streams into the window
while the model runs on a worker thread (the UI thread never waits on it);
Stop cancels; the status bar shows tokens/s. The conversation's KV cache is
reused from turn to turn. "JSON output" constrains replies to JSON: any object, or
the JSON Schema typed into the field beside it (docs/structured-output.md). The
system prompt field leads every conversation; a long one (a document, instructions)
is saved in the prompt cache and restored after a restart instead of being computed
again (docs/prompt-cache.md).
"""

from __future__ import annotations

import html
import json
import sys
import time
from pathlib import Path

from PySide6.QtCore import QObject, QThread, Signal, Slot
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMainWindow,
    QPlainTextEdit,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

import edgeinfer


class Worker(QObject):
    """Lives on a worker thread: loads packages and runs generations."""

    loaded = Signal(str)
    failed = Signal(str)
    piece = Signal(str)
    finished = Signal(dict)

    def __init__(self, prompt_cache=True):
        super().__init__()
        self.model = None
        self.generation = None
        self.prompt_cache = prompt_cache  # what edgeinfer.load(prompt_cache=...) takes

    @Slot(str)
    def load(self, path: str) -> None:
        try:
            self.model = edgeinfer.load(path, prompt_cache=self.prompt_cache)
            self.loaded.emit(self.model.name)
        except edgeinfer.EdgeInferError as e:
            self.failed.emit(str(e))

    @Slot(list, int, dict)
    def generate(self, messages: list, max_new_tokens: int, constraint: dict) -> None:
        try:
            self.generation = self.model.chat(messages, max_new_tokens=max_new_tokens, temperature=0.0,
                                              **constraint)
            for ev in self.generation:
                if ev.text:
                    self.piece.emit(ev.text)
            r = self.generation.result
            self.finished.emit({"text": r.text, "new_tokens": r.new_tokens, "decode_tok_s": r.decode_tok_s,
                                "ttft_s": r.ttft_s, "finish_reason": r.finish_reason,
                                "restored_tokens": r.stats.get("prompt_cache", {}).get("restored_tokens", 0)})
        except edgeinfer.EdgeInferError as e:
            self.failed.emit(str(e))
            self.finished.emit({"text": "", "new_tokens": 0, "decode_tok_s": 0.0, "ttft_s": 0.0,
                                "finish_reason": "error"})

    def stop(self) -> None:  # called from the UI thread: only sets a flag
        if self.generation is not None:
            self.generation.cancel()


class ChatWindow(QMainWindow):
    request_load = Signal(str)
    request_generate = Signal(list, int, dict)

    def __init__(self, package: str | None = None, max_new_tokens: int = 256, prompt_cache=True):
        super().__init__()
        self.setWindowTitle("edgeinfer chat")
        self.resize(720, 520)
        self.max_new_tokens = max_new_tokens
        self.messages: list[dict] = []
        self.reply = ""
        self.busy = False
        self.last_result: dict | None = None

        self.path_label = QLabel("no model loaded")
        open_button = QPushButton("Open package…")
        open_button.clicked.connect(self.pick_package)
        top = QHBoxLayout()
        top.addWidget(open_button)
        top.addWidget(self.path_label, 1)
        self.system = QPlainTextEdit()
        self.system.setPlaceholderText("System prompt (optional): instructions or a document every reply sees")
        self.system.setMaximumHeight(72)
        self.transcript = QTextBrowser()
        self.input = QLineEdit()
        self.input.setPlaceholderText("Ask something and press Enter")
        self.input.returnPressed.connect(self.send)
        self.send_button = QPushButton("Send")
        self.send_button.clicked.connect(self.send)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        self.json_toggle = QCheckBox("JSON output")
        self.json_toggle.toggled.connect(lambda on: self.schema.setEnabled(on))
        self.schema = QLineEdit()
        self.schema.setPlaceholderText('JSON Schema, e.g. {"type": "object", ...} (empty: any JSON object)')
        self.schema.setEnabled(False)
        structured = QHBoxLayout()
        structured.addWidget(self.json_toggle)
        structured.addWidget(self.schema, 1)
        bottom = QHBoxLayout()
        bottom.addWidget(self.input, 1)
        bottom.addWidget(self.send_button)
        bottom.addWidget(self.stop_button)
        layout = QVBoxLayout()
        layout.addLayout(top)
        layout.addWidget(self.system)
        layout.addWidget(self.transcript, 1)
        layout.addLayout(structured)
        layout.addLayout(bottom)
        central = QWidget()
        central.setLayout(layout)
        self.setCentralWidget(central)
        self.statusBar().showMessage("open a model package to start")

        self.thread = QThread(self)
        self.worker = Worker(prompt_cache)
        self.worker.moveToThread(self.thread)
        self.request_load.connect(self.worker.load)
        self.request_generate.connect(self.worker.generate)
        self.worker.loaded.connect(self.on_loaded)
        self.worker.failed.connect(self.on_failed)
        self.worker.piece.connect(self.on_piece)
        self.worker.finished.connect(self.on_finished)
        self.thread.start()
        self.set_enabled(False)
        if package:
            self.load(package)

    # -- actions -----------------------------------------------------------------
    def pick_package(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Model package folder")
        if path:
            self.load(path)

    def load(self, path: str) -> None:
        self.path_label.setText(f"loading {Path(path).name}…")
        self.statusBar().showMessage("loading…")
        self.request_load.emit(path)

    def send(self) -> None:
        text = self.input.text().strip()
        if not text or self.busy or self.worker.model is None:
            return
        constraint = self.constraint()
        if constraint is None:
            return
        self.input.clear()
        self.messages.append({"role": "user", "content": text})
        self.transcript.append(f"<p><b>You:</b> {html.escape(text)}</p>")
        self.transcript.append("<p><b>Model:</b> </p>")
        self.reply = ""
        self.busy = True
        self.started = time.perf_counter()
        self.set_enabled(False)
        self.stop_button.setEnabled(True)
        self.statusBar().showMessage("generating…")
        system = self.system.toPlainText().strip()
        lead = [{"role": "system", "content": system}] if system else []
        self.request_generate.emit(lead + self.messages, self.max_new_tokens, constraint)

    def stop(self) -> None:
        self.worker.stop()

    def constraint(self) -> dict | None:
        """The reply's constraint from the JSON toggle and schema field ({} = free text; None = a bad schema,
        said in the status bar; the runtime checks the schema itself when the reply starts)."""
        if not self.json_toggle.isChecked():
            return {}
        text = self.schema.text().strip()
        if not text:
            return {"json_object": True}
        try:
            return {"json_schema": json.loads(text)}
        except ValueError as e:
            self.statusBar().showMessage(f"the schema is not valid JSON ({e}).")
            return None

    # -- worker signals (run on the UI thread) ---------------------------------
    def on_loaded(self, name: str) -> None:
        self.path_label.setText(name)
        self.statusBar().showMessage(f"{name} ready")
        self.messages.clear()
        self.set_enabled(True)

    def on_failed(self, message: str) -> None:
        self.statusBar().showMessage(message)
        self.path_label.setText("no model loaded" if self.worker.model is None else self.path_label.text())
        self.set_enabled(self.worker.model is not None)

    def on_piece(self, text: str) -> None:
        self.reply += text
        cursor = self.transcript.textCursor()
        cursor.movePosition(cursor.MoveOperation.End)
        cursor.insertText(text)
        self.transcript.ensureCursorVisible()

    def on_finished(self, result: dict) -> None:
        self.busy = False
        self.last_result = result
        if result["finish_reason"] != "error":
            self.messages.append({"role": "assistant", "content": result["text"]})
        self.set_enabled(True)
        self.stop_button.setEnabled(False)
        if result["finish_reason"] == "error":  # on_failed already said what went wrong
            return
        restored = result.get("restored_tokens", 0)
        self.statusBar().showMessage(f"{result['new_tokens']} tokens, {result['decode_tok_s']:.1f} tok/s, "
                                     f"first token {result['ttft_s'] * 1000:.0f} ms ({result['finish_reason']})"
                                     + (f", {restored} prompt tokens from the prompt cache" if restored else ""))

    def set_enabled(self, on: bool) -> None:
        self.input.setEnabled(on)
        self.send_button.setEnabled(on)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self.worker.stop()
        self.thread.quit()
        self.thread.wait(5000)
        super().closeEvent(event)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    app = QApplication(argv)
    window = ChatWindow(argv[1] if len(argv) > 1 else None)
    window.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
