"""The OpenAI-compatible server, on loopback, driven by the official openai client."""

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

import edgeinfer
from edgeinfer.decoders.base import PREFILL_TAIL
from edgeinfer.server import create_app

openai = pytest.importorskip("openai")


class RunningServer:
    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def model(tiny_packages):
    return edgeinfer.load(tiny_packages("llama", "int4"))


@pytest.fixture
def server(model):
    app = create_app(model, api_key="sekret", max_queue=2)
    srv = RunningServer(app)
    yield srv, app.state.edgeinfer
    srv.stop()


def client(srv, key="sekret"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_chat_completion_with_openai_client(server, model):
    srv, _ = server
    msgs = [{"role": "user", "content": "Paris is the capital of"}]
    ref = model.complete(msgs, max_new_tokens=12, temperature=0.0)
    r = client(srv).chat.completions.create(model="x", messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == ref.new_tokens and r.usage.prompt_tokens == ref.prompt_tokens
    # the model's cache held this prompt already (the call above): all but the last two tokens reused
    assert r.usage.prompt_tokens_details.cached_tokens == ref.prompt_tokens - PREFILL_TAIL


def test_streaming_chat_and_completions(server, model):
    srv, _ = server
    msgs = [{"role": "user", "content": "Once upon a time"}]
    ref = model.complete(msgs, max_new_tokens=16, temperature=0.0)
    stream = client(srv).chat.completions.create(model="x", messages=msgs, max_tokens=16, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == ref.text
    ref2 = model.complete("def add(a, b):", max_new_tokens=8, temperature=0.0)
    r = client(srv).completions.create(model="x", prompt="def add(a, b):", max_tokens=8, temperature=0)
    assert r.choices[0].text == ref2.text
    models = client(srv).models.list()
    assert [m.id for m in models.data] == [model.name]
    # stream_options.include_usage: a last chunk with the counts (OpenAI's shape: no choices)
    stream = client(srv).chat.completions.create(model="x", messages=msgs, max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.new_tokens
    assert all(c.usage is None for c in chunks[:-1])
    bad = httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": "Bearer sekret"},
                     json={"messages": msgs, "stream": True, "stream_options": {"include_obfuscation": True}})
    assert bad.status_code == 400 and "stream_options" in bad.json()["error"]["message"]


def test_auth_and_bad_requests(server):
    srv, _ = server
    with pytest.raises(openai.AuthenticationError):
        client(srv, key="wrong").chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    h = {"Authorization": "Bearer sekret"}
    r = httpx.post(srv.url + "/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    for bad in ({"messages": []}, {"messages": [{"role": "user", "content": "hi"}], "temperature": -1},
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9},
                {"messages": [{"role": "user", "content": "hi"}], "top_p": float("nan")}):
        r = httpx.post(srv.url + "/v1/chat/completions", content=json.dumps(bad), headers=h)
        assert r.status_code == 400, bad
    r = httpx.post(srv.url + "/v1/completions", content=b"x" * (2 << 20), headers=h)
    assert r.status_code == 413
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_queue_full_gives_429(server):
    srv, state = server
    h = {"Authorization": "Bearer sekret"}
    body = json.dumps({"prompt": "The quick brown fox", "max_tokens": 200, "temperature": 0})
    codes = []

    def hit():
        codes.append(httpx.post(srv.url + "/v1/completions", content=body, headers=h, timeout=60).status_code)

    threads = [threading.Thread(target=hit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(codes)) == [200, 429] and codes.count(200) >= 2
    assert state.in_flight == 0


def test_client_disconnect_cancels_generation(server, model, monkeypatch):
    srv, state = server
    step = model.decoder.step
    monkeypatch.setattr(model.decoder, "step", lambda t: (time.sleep(0.01), step(t))[1])  # a slow device
    h = {"Authorization": "Bearer sekret"}
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True})
    before = state.cancelled
    with httpx.stream("POST", srv.url + "/v1/completions", content=body, headers=h, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # hang up mid-stream
    deadline = time.time() + 5
    while state.cancelled == before and time.time() < deadline:
        time.sleep(0.02)
    assert state.cancelled == before + 1 and state.in_flight == 0
    monkeypatch.undo()
    # The model is free and correct again.
    ref = model.complete("Paris is", max_new_tokens=6, temperature=0.0)
    r = client(srv).completions.create(model="x", prompt="Paris is", max_tokens=6, temperature=0)
    assert r.choices[0].text == ref.text


def test_serve_warns_loudly_when_exposed_without_a_key(tiny_packages):
    """The warning comes before anything is bound; the address is not this machine's, so nothing ever is."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "edgeinfer.cli", "serve", str(tiny_packages("llama", "int4")),
                             "--host", "192.0.2.1", "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
    finally:
        proc.kill()
        proc.wait()
    assert first.startswith("WARNING: serving on 192.0.2.1 without --api-key")  # a TEST-NET address: never bound


def test_request_options_are_never_silently_ignored(tiny_packages):
    """A field the server does not act on is refused with a 400 naming it, unless it has its no-op value."""
    from starlette.testclient import TestClient

    from edgeinfer.server import create_app

    client = TestClient(create_app(edgeinfer.load(tiny_packages("llama", "fp32"))))
    base = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    ok = client.post("/v1/chat/completions", json={**base, "frequency_penalty": 0, "logprobs": False, "user": "u"})
    assert ok.status_code == 200, ok.text
    for extra, name in (({"frequency_penalty": 0.5}, "frequency_penalty"), ({"logprobs": True}, "logprobs"),
                        ({"logit_bias": {"5": 10}}, "logit_bias"), ({"mirostat": 2}, "mirostat")):
        r = client.post("/v1/chat/completions", json={**base, **extra})
        assert r.status_code == 400 and name in r.json()["error"]["message"], r.text
