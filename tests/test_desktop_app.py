"""The desktop chat window, for real: offscreen Qt, a prompt typed and sent
programmatically, the streamed reply in the window, a screenshot, and the UI
thread's longest stall measured while the model generates."""

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")
from PySide6.QtCore import Qt, QTimer  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from apps.desktop.chat_app import ChatWindow  # noqa: E402


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def wait_until(app, predicate, timeout=60.0):
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline:
        app.processEvents()
        time.sleep(0.002)
    return predicate()


def test_chat_window_streams_a_reply_without_freezing(app, tiny_packages, tmp_path, record_property):
    import edgeinfer

    pkg = tiny_packages("llama", "int4")
    ref = edgeinfer.load(pkg).complete([{"role": "user", "content": "Paris is the capital of"}], max_new_tokens=120,
                                       temperature=0.0)
    win = ChatWindow(str(pkg), max_new_tokens=120)
    win.show()
    assert wait_until(app, lambda: win.input.isEnabled())
    # A slow device: make each step take a while, so that streaming is visible and stalls would show.
    step = win.worker.model.decoder.step
    win.worker.model.decoder.step = lambda t: (time.sleep(0.01), step(t))[1]

    gaps, last = [], [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(5)
    QTest.keyClicks(win.input, "Paris is the capital of")
    QTest.keyClick(win.input, Qt.Key_Return)
    assert wait_until(app, lambda: win.busy)
    seen_partial = wait_until(app, lambda: 0 < len(win.reply) < len(ref.text) or not win.busy)
    assert wait_until(app, lambda: not win.busy)
    timer.stop()
    assert seen_partial
    assert win.last_result["text"] == ref.text
    assert ref.text in win.transcript.toPlainText()
    assert "tok/s" in win.statusBar().currentMessage()
    shot = tmp_path / "chat.png"
    img = win.grab()
    assert img.save(str(shot)) and shot.stat().st_size > 1000
    arr = np.frombuffer(img.toImage().constBits(), dtype=np.uint8)
    assert arr.std() > 5  # not a blank window
    stall = max(gaps)
    record_property("ui_max_stall_ms", stall * 1000)
    print(f"\nUI thread: longest gap between 5 ms timer ticks while generating: {stall * 1000:.1f} ms")
    assert stall < 0.1
    win.close()


def test_stop_button_cancels(app, tiny_packages):
    win = ChatWindow(str(tiny_packages("llama", "int4")), max_new_tokens=200)
    win.show()
    assert wait_until(app, lambda: win.input.isEnabled())
    step = win.worker.model.decoder.step
    win.worker.model.decoder.step = lambda t: (time.sleep(0.01), step(t))[1]
    win.input.setText("Once upon a time")
    win.send()
    assert wait_until(app, lambda: len(win.reply) > 0 or not win.busy)
    win.stop_button.click()
    assert wait_until(app, lambda: not win.busy, timeout=5)
    assert win.last_result["finish_reason"] == "cancelled" and win.last_result["new_tokens"] < 200
    win.close()


def test_system_prompt_leads_the_chat_and_is_restored_after_a_restart(app, tiny_packages, tmp_path):
    import edgeinfer
    from edgeinfer.prompt_cache import PromptCache

    pkg = str(tiny_packages("llama", "int4"))
    system = "You answer questions about the story below.\n\n" + " ".join(["Once upon a time a fox met a crow."] * 8)
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Who met the crow?"}]
    ref = edgeinfer.load(pkg).complete(msgs, max_new_tokens=10, temperature=0.0)
    assert ref.prompt_tokens > 40
    results = []
    for _ in range(2):  # the app started twice on the same cache folder
        win = ChatWindow(pkg, max_new_tokens=10, prompt_cache=PromptCache(tmp_path, min_tokens=16))
        win.show()
        assert wait_until(app, lambda w=win: w.input.isEnabled())
        win.system.setPlainText(system)
        win.input.setText("Who met the crow?")
        win.send()
        assert wait_until(app, lambda w=win: w.last_result is not None and not w.busy)
        results.append(win.last_result)
        win.worker.model.prompt_cache.cache.wait()
        win.close()
    assert [r["text"] for r in results] == [ref.text, ref.text]
    assert results[0]["restored_tokens"] == 0 and results[1]["restored_tokens"] == ref.prompt_tokens - 2
    assert list(tmp_path.glob("*.kv"))
