"""Tool calling: OpenAI ``tools`` / ``tool_choice`` turned into a prompt and a grammar, and the
model's reply parsed back into ``tool_calls``.

Two formats (docs/structured-output.md):

* **template**: the package's chat template renders ``tools`` itself and the model writes
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (Qwen2.5, Hermes and the other
  templates that use these tags); tool results go back as ``role: tool`` messages the template renders.
* **generic**, for templates without tools (SmolLM2): a system message lists the functions as JSON
  and asks for ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; an assistant turn's
  calls are written back in that form, and a ``tool`` message becomes a user turn holding
  ``<tool_response>...</tool_response>``.

Either way the call itself is constrained by a grammar (edgeinfer.constraints): ``required`` or a
named function admits only calls, with arguments that match the function's JSON Schema; ``auto``
admits a call or text that does not start with ``<`` (or, with ``response_format``, JSON of that
schema); ``none`` admits no call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from .errors import GenerationError

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class ToolError(GenerationError):
    """A malformed ``tools`` / ``tool_choice`` / tool message."""


@dataclass
class ToolPlan:
    """How one request is prompted and constrained, and whether calls are parsed from the reply."""

    prompt_ids: list[int]
    grammar: str | None  # Lark, for edgeinfer.constraints (None: unconstrained)
    parse_calls: bool
    style: str  # "template" | "generic"
    functions: list[dict] = field(default_factory=list)


def check_tools(tools) -> list[dict]:
    """OpenAI ``tools`` -> the function dicts (name, description, parameters)."""
    if not isinstance(tools, list) or not tools:
        raise ToolError("'tools' must be a non-empty list of {\"type\": \"function\", \"function\": {...}}.")
    out, names = [], set()
    for t in tools:
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ToolError("each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., "
                            "\"parameters\": {...}}}; other tool types are not supported.")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise ToolError("each function needs a 'name' (a string of 1 to 64 characters).")
        if name in names:
            raise ToolError(f"the function name '{name}' appears twice in 'tools'.")
        names.add(name)
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"the parameters of function '{name}' must be a JSON Schema object.")
        desc = f.get("description", "")
        if not isinstance(desc, str):
            raise ToolError(f"the description of function '{name}' must be a string.")
        out.append({"name": name, "description": desc, "parameters": params})
    return out


def check_tool_choice(tool_choice, functions: list[dict]) -> tuple[str, str | None]:
    """(mode, function name): mode is auto | none | required; a named function is required."""
    if tool_choice is None:
        return ("auto" if functions else "none"), None
    if tool_choice in ("auto", "none", "required"):
        if tool_choice != "none" and not functions:
            raise ToolError(f"tool_choice '{tool_choice}' needs 'tools'.")
        return tool_choice, None
    if (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
            and isinstance(tool_choice.get("function"), dict)):
        name = tool_choice["function"].get("name")
        if name not in {f["name"] for f in functions}:
            raise ToolError(f"tool_choice names function '{name}', which is not in 'tools'.")
        return "required", name
    raise ToolError("tool_choice must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                    "\"function\": {\"name\": ...}}.")


def template_style(chat_template: str | None) -> str:
    """'template' when the chat template renders tools and writes <tool_call> tags, else 'generic'."""
    t = chat_template or ""
    return "template" if "tools" in t and OPEN in t else "generic"


def call_schema(functions: list[dict]) -> dict:
    """JSON Schema of one call {"name": ..., "arguments": {...}} to any of FUNCTIONS."""
    def one(f):
        args = dict(f["parameters"])
        if args.get("type") == "object" and "additionalProperties" not in args:
            args["additionalProperties"] = False  # a small model invents extra arguments otherwise
        return {"type": "object", "properties": {"name": {"enum": [f["name"]]}, "arguments": args},
                "required": ["name", "arguments"], "additionalProperties": False}

    schemas = [one(f) for f in functions]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    # json.dumps's separators: how the prompt shows calls and how Qwen-style templates write them.
    return {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}


def call_grammar(functions: list[dict], mode: str, name: str | None, style: str, parallel: bool = True,
                 text_schema: dict | None = None) -> str | None:
    """Lark grammar of the reply for tool_choice MODE (None: no constraint)."""
    if mode == "none":
        return None
    chosen = [f for f in functions if name is None or f["name"] == name]
    nl = "\\n" if style == "template" else ""
    call = f'call: "{OPEN}{nl}" %json {json.dumps(call_schema(chosen))} "{nl}{CLOSE}"'
    calls = 'call ("\\n" call)*' if parallel else "call"
    if mode == "required":
        return f"start: {calls}\n{call}"
    if text_schema is not None:
        text = {**text_schema, "x-guidance": {"whitespace_flexible": False}}
        return f"start: answer | {calls}\nanswer: %json {json.dumps(text)}\n{call}"
    return f"start: TEXT | {calls}\nTEXT: /[^<](?s:.*)/\n{call}"


def normalize_messages(raw: list) -> list[dict]:
    """OpenAI chat messages (text parts, assistant tool_calls, tool results) -> plain dicts."""
    if not isinstance(raw, list) or not raw:
        raise ToolError("'messages' must be a non-empty list.")
    out = []
    for m in raw:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ToolError("each message needs a string 'role'.")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        calls = m.get("tool_calls")
        if content is None and m["role"] == "assistant" and calls:
            content = ""
        if not isinstance(content, str):
            raise ToolError("each message needs a string 'content' (or, from the assistant, 'tool_calls').")
        msg = {"role": m["role"], "content": content}
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list):
                raise ToolError("'tool_calls' is a list, on assistant messages only.")
            msg["tool_calls"] = [_call_from_message(c) for c in calls]
        if m["role"] == "tool":
            msg["tool_call_id"] = str(m.get("tool_call_id") or "")
            if isinstance(m.get("name"), str):
                msg["name"] = m["name"]
        out.append(msg)
    return out


def _call_from_message(c) -> dict:
    f = c.get("function") if isinstance(c, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        raise ToolError("each tool call needs {\"function\": {\"name\": ..., \"arguments\": ...}}.")
    args = f.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ToolError(f"the arguments of the call to '{f['name']}' are not valid JSON.") from None
    return {"id": str(c.get("id") or ""), "type": "function", "function": {"name": f["name"], "arguments": args}}


def render_prompt(tokenizer, messages: list[dict], functions: list[dict], mode: str) -> tuple[list[int], str]:
    """Prompt token ids for MESSAGES with FUNCTIONS offered (unless MODE is none), and the style used."""
    from .tokenizer import render_chat_template

    if not tokenizer.chat_template:
        raise ToolError("this package has no chat template, which tool calling needs.")
    style = template_style(tokenizer.chat_template)
    offered = functions if mode != "none" else []
    if style == "template":
        tools = [{"type": "function", "function": f} for f in offered] or None
        text = render_chat_template(tokenizer.chat_template, messages, True, tokenizer.bos_token,
                                    tokenizer.eos_token, tools=tools)
        return tokenizer.encode(text, add_special_tokens=False), style
    plain = []
    for m in messages:
        if m["role"] == "tool":
            plain.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m.get("tool_calls"):
            written = "".join(OPEN + json.dumps({"name": c["function"]["name"],
                                                 "arguments": c["function"]["arguments"]}) + CLOSE
                              for c in m["tool_calls"])
            plain.append({"role": "assistant", "content": m["content"] + written})
        else:
            plain.append({"role": m["role"], "content": m["content"]})
    if offered:
        listing = "\n".join(json.dumps(f) for f in offered)
        instructions = ("You can call these functions:\n<tools>\n" + listing + "\n</tools>\n"
                        f"To call one, reply with {OPEN}{{\"name\": <function name>, \"arguments\": "
                        f"<arguments as a JSON object>}}{CLOSE} and nothing else. A function's result comes "
                        "back in <tool_response></tool_response>.")
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": plain[0]["content"] + "\n\n" + instructions}
        else:
            plain.insert(0, {"role": "system", "content": instructions})
    return tokenizer.encode_chat(plain), style


def plan_tools(tokenizer, raw_messages: list, tools=None, tool_choice=None, parallel_tool_calls=False,
               text_schema: dict | None = None) -> ToolPlan:
    """Everything a chat request with tools (or tool messages) needs: prompt ids, grammar, parsing.
    One call per reply unless PARALLEL_TOOL_CALLS (a 135M model asked to may repeat its call until
    max_tokens)."""
    if not isinstance(parallel_tool_calls, bool):
        raise ToolError("'parallel_tool_calls' must be true or false.")
    functions = check_tools(tools) if tools is not None else []
    mode, name = check_tool_choice(tool_choice, functions)
    messages = normalize_messages(raw_messages)
    ids, style = render_prompt(tokenizer, messages, functions, mode)
    grammar = call_grammar(functions, mode, name, style, parallel_tool_calls, text_schema)
    return ToolPlan(ids, grammar, mode != "none", style, functions)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content outside the calls or None, OpenAI tool_calls) of a reply; [] when it holds no whole call."""
    calls, rest, pos = [], [], 0
    while True:
        start = text.find(OPEN, pos)
        end = text.find(CLOSE, start + len(OPEN)) if start >= 0 else -1
        if start < 0 or end < 0:
            break
        try:
            obj = json.loads(text[start + len(OPEN):end])
        except ValueError:
            break
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            break
        rest.append(text[pos:start])
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(obj.get("arguments", {}))}})
        pos = end + len(CLOSE)
    if not calls:
        return text, []
    rest.append(text[pos:])
    content = "".join(rest).strip()
    return content or None, calls


class CallStream:
    """Streaming: releases text while it cannot be the start of a tool call; holds a call back until
    the end, when ``finish()`` gives the calls (the server sends them as tool_calls deltas)."""

    def __init__(self):
        self.buffer = ""
        self.text_mode = False

    def feed(self, piece: str) -> str:
        """Text to stream now."""
        if self.text_mode:
            return piece
        self.buffer += piece
        stripped = self.buffer.lstrip()
        if stripped and not (OPEN.startswith(stripped) or stripped.startswith(OPEN)):
            self.text_mode, out, self.buffer = True, self.buffer, ""
            return out
        return ""

    def finish(self) -> tuple[str, list[dict]]:
        """(text still to stream, tool calls) at the end."""
        if self.text_mode:
            return "", []
        content, calls = parse_tool_calls(self.buffer)
        return (content or "") if calls else self.buffer, calls


def response_format_constraint(response_format) -> dict:
    """OpenAI ``response_format`` -> constraint keywords of ``Model.generate`` ({} for text)."""
    if response_format is None:
        return {}
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
            raise ToolError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": "
                            "{...}, \"strict\": true}}.")
        if not isinstance(spec.get("strict", True), (bool, type(None))):
            raise ToolError("response_format json_schema 'strict' must be true or false.")
        # strict or not, the schema is enforced: a token mask cannot do less than guarantee it.
        return {"json_schema": spec["schema"]}
    raise ToolError("response_format type must be 'text', 'json_object' or 'json_schema'.")


def openai_request(data: dict, tokenizer, chat: bool) -> tuple[list[int] | None, dict, ToolPlan | None]:
    """The structured-output part of an OpenAI request: (prompt ids when tools shape the prompt,
    constraint keywords for ``Model.generate``, the tool plan or None)."""
    constraint = response_format_constraint(data.get("response_format"))
    messages = data.get("messages") if chat else None
    with_tools = chat and ("tools" in data or "tool_choice" in data or (isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)))
    if not chat and ("tools" in data or "tool_choice" in data):
        raise ToolError("tools are a chat feature: send them to /v1/chat/completions.")
    if not with_tools:
        return None, constraint, None
    text_schema = constraint.get("json_schema") if "json_schema" in constraint else (
        {"type": "object"} if constraint.get("json_object") else None)
    plan = plan_tools(tokenizer, messages, data.get("tools"), data.get("tool_choice"),
                      data.get("parallel_tool_calls", False), text_schema if isinstance(text_schema, dict) else None)
    if plan.grammar is not None:
        constraint = {"grammar": plan.grammar}
    return plan.prompt_ids, constraint, plan
