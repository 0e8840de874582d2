"""Tool calling and response_format (edgeinfer/tool_calls.py, edgeinfer/server.py): prompts in the
template's own tool format or the generic one, calls constrained to the functions' schemas and parsed
back into OpenAI tool_calls (also streamed), bad requests answered with 400. The slow tests drive the
real SmolLM2 package with the official openai client."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

import edgeinfer
from edgeinfer.server import create_app
from edgeinfer.tool_calls import (
    CallStream,
    ToolError,
    check_tool_choice,
    check_tools,
    parse_tool_calls,
    plan_tools,
    template_style,
)

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")

from test_server import RunningServer  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"]}}}
# A template in the Hermes / Qwen2.5 style: it renders `tools` and writes calls in <tool_call> tags.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "</tools>\nCall with <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n{% elif m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}"
    "<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n"
    "</tool_call>"
    "{% endfor %}<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random Llama with room for tool listings (its trained-on-the-spot tokenizer is ~bytes)."""
    from conftest import TINY, build_from_config
    from edgeinfer.export import export_model
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("tools")
    build_from_config(LlamaConfig(**{**TINY, "max_position_embeddings": 2048}, tie_word_embeddings=True),
                      root / "hf")
    export_model(str(root / "hf"), root / "pkg", "fp32", max_context=2048, progress=False)
    return edgeinfer.load(root / "pkg")


@pytest.fixture
def server(model):
    srv = RunningServer(create_app(model))
    yield srv
    srv.stop()


def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_tool_and_tool_choice_checks():
    fns = check_tools([WEATHER, TIME])
    assert [f["name"] for f in fns] == ["get_weather", "get_time"]
    assert check_tool_choice(None, fns) == ("auto", None)
    assert check_tool_choice({"type": "function", "function": {"name": "get_time"}}, fns) == ("required", "get_time")
    for bad, match in [([{"type": "code_interpreter"}], "other tool types"), ([WEATHER, WEATHER], "appears twice"),
                       ([], "non-empty list"), ([{"type": "function", "function": {"name": ""}}], "'name'")]:
        with pytest.raises(ToolError, match=match):
            check_tools(bad)
    with pytest.raises(ToolError, match="not in 'tools'"):
        check_tool_choice({"type": "function", "function": {"name": "nope"}}, fns)
    with pytest.raises(ToolError, match="tool_choice must be"):
        check_tool_choice("sometimes", fns)
    with pytest.raises(ToolError, match="needs 'tools'"):
        check_tool_choice("required", [])


def test_parse_tool_calls_and_call_stream():
    text = 'Sure.<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n<tool_call>\n{"name": "g"}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["f", "g"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1} and calls[0]["id"] != calls[1]["id"]
    assert parse_tool_calls('<tool_call>{"name": "f", "argu') == ('<tool_call>{"name": "f", "argu', [])
    s = CallStream()
    assert s.feed("<tool") == "" and s.feed('_call>{"name": "f", "arguments": {}}</tool_call>') == ""
    assert s.finish()[1][0]["function"]["name"] == "f"
    s = CallStream()
    assert s.feed("<to") == "" and s.feed("p> is a tag") == "<top> is a tag" and s.feed(" more") == " more"
    assert s.finish() == ("", [])


def test_generic_format_prompt_lists_tools_and_feeds_results_back(model):
    tok = model.tokenizer
    assert template_style(tok.chat_template) == "generic" and template_style(HERMES_TEMPLATE) == "template"
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": -3}'}]
    plan = plan_tools(tok, msgs, [WEATHER], "auto")
    text = tok.decode(plan.prompt_ids, skip_special_tokens=False)
    assert plan.style == "generic" and '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}</tool_call>' in text
    assert '<tool_response>\n{"temp": -3}\n</tool_response>' in text
    none = plan_tools(tok, msgs, [WEATHER], "none")
    assert none.grammar is None and "<tools>" not in tok.decode(none.prompt_ids, skip_special_tokens=False)


def test_template_format_is_the_templates_own(model, monkeypatch):
    tok = model.tokenizer
    monkeypatch.setattr(tok, "chat_template", HERMES_TEMPLATE)
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}}]},
            {"role": "tool", "tool_call_id": "c", "content": "cold"}]
    plan = plan_tools(tok, msgs, [WEATHER], "required")
    text = tok.decode(plan.prompt_ids, skip_special_tokens=False)
    assert plan.style == "template" and "Tools:\n<tools>\n" in text and "<tool_response>\ncold\n" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>' in text
    # the template's own call layout (newlines inside the tags) is what the grammar asks for
    res = model.complete("Weather?", max_new_tokens=200, grammar=plan.grammar)  # (the tiny model's context)
    assert res.text.startswith("<tool_call>\n{") and res.text.endswith("}\n</tool_call>")
    assert parse_tool_calls(res.text)[1][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_server_tool_calls_match_the_schema(server, tool_choice):
    msgs = [{"role": "user", "content": "What is the weather in Paris, or the time?"}]
    r = client(server).chat.completions.create(model="x", messages=msgs, tools=[WEATHER, TIME],
                                               tool_choice=tool_choice, max_tokens=200, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_time" and isinstance(args["zone"], str) and len(args["zone"]) <= 8
    else:
        assert call.function.name in ("get_weather", "get_time")
        if call.function.name == "get_weather":
            assert args["city"] in ("Paris", "Rome", "Oslo") and args["unit"] in ("C", "F")


def test_server_streams_tool_call_deltas(server):
    msgs = [{"role": "user", "content": "Weather in Rome?"}]
    kw = dict(model="x", messages=msgs, tools=[WEATHER], tool_choice="required", max_tokens=200, temperature=0)
    whole = client(server).chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = list(client(server).chat.completions.create(**kw, stream=True))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].index == 0 and deltas[0][0].function.name == "get_weather"
    assert json.loads(deltas[0][0].function.arguments) == json.loads(whole.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_server_response_format(server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    c = client(server)
    msgs = [{"role": "user", "content": "JSON please"}]
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=100, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"ok", "n"} and isinstance(obj["ok"], bool) and 0 <= obj["n"] <= 9
    stream = c.chat.completions.create(model="x", messages=msgs, max_tokens=100, temperature=0, stream=True,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": schema}})
    joined = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert json.loads(joined) == obj
    # an object is "{" and "}" at least (the smallest, "{}", may end in two tokens): one is always cut short
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=1, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("body,match", [
    ({"response_format": {"type": "xml"}}, "response_format type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}, "not valid"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string",
                                                                            "pattern": "(?=x)"}}}}, "compiled"),
    ({"tools": [{"type": "retrieval"}]}, "tool types"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "not in 'tools'"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [{"role": "tool", "content": None}]}, "content"),
])
def test_server_refuses_bad_structured_requests(server, body, match):
    data = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body}
    r = httpx.post(server.url + "/v1/chat/completions", json=data, timeout=30)
    assert r.status_code == 400 and match in r.json()["error"]["message"], r.text
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "tools": [WEATHER]}, timeout=30)
    assert r.status_code == 400 and "chat feature" in r.json()["error"]["message"]


# -- the real SmolLM2 package, with the official openai client ------------------------------------------

REAL = Path(__file__).resolve().parents[1] / "packages" / "smollm2-135m-int4"
REVIEWS = ["The pizza was cold and the waiter was rude.", "Best concert of my life, the band was amazing!",
           "The hotel room was clean but small.", "I waited two hours for a delivery that never came.",
           "This phone's battery lasts forever, I love it.", "The movie was okay, nothing special.",
           "Terrible customer support, they hung up on me.", "Fresh bread, friendly staff, fair prices.",
           "The train was late again this morning.", "My new shoes are comfortable and look great.",
           "The app crashes every time I open it.", "A quiet park with lots of trees and benches.",
           "The soup was too salty to eat.", "Fast shipping and the package was well protected.",
           "The lecture was long and boring.", "Our guide was funny and knew everything about the city.",
           "The printer jams on every second page.", "Decent coffee, but the music was too loud.",
           "The museum had a wonderful new exhibition.", "My laptop overheats when I play games."]


@pytest.fixture(scope="module")
def real_server():
    if not (REAL / "edgeinfer.json").exists():  # exported once (about 10 s): the suite never skips these
        from edgeinfer.export import export_model

        export_model("smollm2-135m", REAL, "int4", force=True, progress=False)
    srv = RunningServer(create_app(edgeinfer.load(REAL)))
    yield srv
    srv.stop()


@pytest.mark.slow
def test_real_smollm2_parse_with_pydantic_on_20_prompts(real_server):
    from enum import Enum

    from pydantic import BaseModel, Field

    class Sentiment(str, Enum):
        positive = "positive"
        negative = "negative"
        neutral = "neutral"

    class Review(BaseModel):
        sentiment: Sentiment
        stars: int = Field(ge=1, le=5)
        summary: str = Field(max_length=60)

    c = client(real_server)
    parsed = []
    for text in REVIEWS:
        msgs = [{"role": "user", "content": f"Review: {text}\nReturn the sentiment, stars (1-5) and a short "
                                            "summary as JSON."}]
        r = c.chat.completions.parse(model="x", messages=msgs, response_format=Review, max_tokens=100,
                                     temperature=0)
        assert r.choices[0].finish_reason == "stop"
        parsed.append(Review.model_validate_json(r.choices[0].message.content))
        assert r.choices[0].message.parsed == parsed[-1]
    assert len({p.summary for p in parsed}) > 10  # replies to different prompts, not one canned answer
    stream = c.chat.completions.create(model="x", messages=msgs, temperature=0, max_tokens=100, stream=True,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "Review", "strict": True,
                                           "schema": openai.lib._pydantic.to_strict_json_schema(Review)}})
    assert Review.model_validate_json("".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices))


@pytest.mark.slow
def test_real_smollm2_tool_call_round_trip(real_server):
    c = client(real_server)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    msgs = [{"role": "user", "content": "What is the weather in Rome?"}]
    r = c.chat.completions.create(model="x", messages=msgs, tools=tools, tool_choice="required", max_tokens=60,
                                  temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert "Rome" in json.loads(call.function.arguments)["city"]
    msgs += [r.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "sunny"})}]
    r = c.chat.completions.create(model="x", messages=msgs, tools=tools, max_tokens=60, temperature=0)
    reply = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and not reply.tool_calls, reply
    assert "sunny" in reply.content.lower() or "21" in reply.content
