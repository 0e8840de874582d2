"""``edgeinfer serve``: a local OpenAI-compatible HTTP server (Starlette + uvicorn,
the ``serve`` extra).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming SSE
or not), ``GET /v1/models``, ``GET /health``. One model: one generation at a time (the
model's lock), or with ``parallel`` N up to N decoded together (continuous batching,
edgeinfer/batching/); at most ``max_queue`` requests run or wait, the next gets 429.
A client that disconnects cancels its generation.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid

from .errors import ContextLengthError, EdgeInferError
from .tool_calls import CallStream, openai_request, parse_tool_calls

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # pragma: no cover - depends on the install
    raise EdgeInferError("the server needs the serve extra: pip install 'edgeinfer[serve]'.") from e

MAX_BODY_BYTES = 1 << 20
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind}}, status_code=self.status)


class ServerState:
    def __init__(self, model, api_key: str | None, max_queue: int, max_tokens_limit: int):
        self.model = model
        self.api_key = api_key
        self.max_queue = max_queue
        self.max_tokens_limit = max_tokens_limit
        self.decoding: dict = {}  # the decoding strategy (and options) every request uses
        self.in_flight = 0  # running + waiting
        self.cancelled = 0
        self.served = 0


def create_app(model, api_key: str | None = None, max_queue: int = 8, max_tokens_limit: int | None = None,
               strategy: str = "plain", strategy_options: dict | None = None) -> Starlette:
    """The ASGI app serving MODEL (an ``edgeinfer.Model``). Every request decodes with STRATEGY
    (and its options): e.g. ``speculative`` with a little model attached to MODEL."""
    state = ServerState(model, api_key, max_queue, max_tokens_limit or model.max_context)
    opts = {k: v for k, v in (strategy_options or {}).items() if v is not None}
    state.decoding = {"strategy": strategy, **opts}
    if strategy != "plain" or opts:  # check the strategy and its options now, not on the first request
        from .strategies import make_strategy

        little = getattr(model, "little", None)  # a stub model in tests may have none
        make_strategy(strategy, model.decoder, opts, little.decoder if little is not None else None)

    async def health(request: Request):
        pc = getattr(model, "prompt_cache", None)  # edgeinfer/prompt_cache/: hits, misses, saved, ...
        return JSONResponse({"status": "ok", "model": model.name, "in_flight": state.in_flight,
                             "served": state.served, "cancelled": state.cancelled,
                             "prompt_cache": dict(pc.cache.stats) if pc is not None else None})

    async def models(request: Request):
        _auth(request, state)
        return JSONResponse({"object": "list", "data": [
            {"id": model.name, "object": "model", "created": 0, "owned_by": "edgeinfer"}]})

    async def chat(request: Request):
        return await _complete(request, state, chat=True)

    async def completions(request: Request):
        return await _complete(request, state, chat=False)

    app = Starlette(routes=[
        Route("/health", health), Route("/v1/models", models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ])
    app.state.edgeinfer = state
    return app


def _auth(request: Request, state: ServerState) -> None:
    if state.api_key and request.headers.get("authorization") != f"Bearer {state.api_key}":
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'.", "authentication_error")


async def _read_json(request: Request) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes.")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes.")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    return data


def _number(data: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    v = data.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be a number in [{lo}, {hi}].")
    if integer and int(v) != v:
        raise ApiError(400, f"'{key}' must be an integer.")
    return int(v) if integer else float(v)


# Request fields this server acts on; others that OpenAI defines are accepted only at their no-op value, and
# anything else is refused: a request option is never silently ignored.
_FIELDS = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
           "seed", "n", "stream", "stream_options", "response_format", "tools", "tool_choice",
           "parallel_tool_calls", "user", "metadata"}
_NO_OP = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,), "top_logprobs": (0,),
          "logit_bias": ({},), "echo": (False,), "best_of": (1,), "suffix": ("",), "store": (False,)}


def _refuse_unsupported(data: dict) -> None:
    for key, value in data.items():
        if key in _FIELDS or value is None:
            continue
        if key in _NO_OP:
            if any(value == v and type(value) is type(v) for v in _NO_OP[key]) or (
                    key in ("frequency_penalty", "presence_penalty") and value == 0 and not isinstance(value, bool)):
                continue
            raise ApiError(400, f"'{key}' = {json.dumps(value)[:40]} is not supported by this server: leave it out.")
        raise ApiError(400, f"'{key}' is not a request field this server knows: leave it out.")


def _params(data: dict, state: ServerState) -> dict:
    _refuse_unsupported(data)
    if data.get("n", 1) != 1:
        raise ApiError(400, "only n = 1 is supported.")
    stop = data.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 8:
        raise ApiError(400, "'stop' must be a string or a list of up to 8 non-empty strings.")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer.")
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    return {
        "max_new_tokens": _number({"max_tokens": max_tokens}, "max_tokens", 256, 1, state.max_tokens_limit, True),
        "temperature": _number(data, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(data, "top_p", 1.0, 1e-6, 1.0),
        "stop": stop, "seed": seed,
    }


def _prompt(data: dict, chat: bool):
    if chat:
        msgs = data.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "'messages' must be a non-empty list.")
        out = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "each message needs a string 'role' and 'content'.")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}]
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise ApiError(400, "each message needs a string 'role' and 'content'.")
            out.append({"role": m["role"], "content": content})
        return out
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string.")
    return prompt


async def _complete(request: Request, state: ServerState, chat: bool):
    try:
        _auth(request, state)
        data = await _read_json(request)
        params = _params(data, state)
        try:  # response_format, tools, tool_choice, tool messages (edgeinfer/tool_calls.py)
            tool_prompt, constraint, plan = openai_request(data, state.model.tokenizer, chat)
        except EdgeInferError as e:
            raise ApiError(400, str(e)) from None
        prompt = tool_prompt if tool_prompt is not None else _prompt(data, chat)
        include_usage = _include_usage(data)
        if state.in_flight >= state.max_queue:
            raise ApiError(429, f"the server is busy ({state.in_flight} requests queued or running): retry later.",
                           "rate_limit_error")
        try:
            gen = state.model.generate(prompt, **params, **constraint, **state.decoding)
        except ContextLengthError as e:
            raise ApiError(400, str(e)) from None
        except EdgeInferError as e:
            raise ApiError(400, str(e)) from None
    except ApiError as e:
        return e.response()
    state.in_flight += 1
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if data.get("stream"):
        return StreamingResponse(_stream(gen, state, rid, created, chat, request, plan, include_usage),
                                 media_type="text/event-stream")
    try:
        async for _ in gen.async_batches():
            if await request.is_disconnected():
                gen.cancel()
        res = gen.result
    except EdgeInferError as e:
        return ApiError(400, str(e)).response()
    finally:
        _finish(state, gen)
    text = res.text
    usage = _usage(res)
    finish = "length" if res.finish_reason == "length" else "stop"
    if chat:
        message = {"role": "assistant", "content": text}
        if plan is not None and plan.parse_calls and finish != "length":  # a call cut short is no call
            content, calls = parse_tool_calls(text)
            if calls:
                message, finish = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                         "model": state.model.name, "choices": [choice], "usage": usage})


def _usage(res) -> dict:
    """OpenAI's usage record; cached_tokens: prompt tokens whose KV was reused (a previous turn, a slot's
    prefix, the prompt cache), not computed."""
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.new_tokens,
            "total_tokens": res.prompt_tokens + res.new_tokens,
            "prompt_tokens_details": {"cached_tokens": res.reused_prompt_tokens}}


def _finish(state: ServerState, gen) -> None:
    state.in_flight -= 1
    if gen.result is None or gen.result.finish_reason == "cancelled":
        state.cancelled += 1
    else:
        state.served += 1


def _include_usage(data: dict) -> bool:
    """``stream_options``: OpenAI's ``include_usage`` (a last chunk with the token counts) is the one option."""
    options = data.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(
            options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' takes only {\"include_usage\": true|false}.")
    return bool(options.get("include_usage"))


async def _stream(gen, state: ServerState, rid: str, created: int, chat: bool, request: Request, plan=None,
                  include_usage: bool = False):
    def chunk(delta: str | None, finish: str | None, tool_calls: list | None = None) -> str:
        if chat:
            choice = {"index": 0, "delta": {} if delta is None else {"content": delta}, "finish_reason": finish}
            if tool_calls is not None:
                choice["delta"] = {"tool_calls": tool_calls}
            if (delta is not None or tool_calls is not None) and first[0]:
                choice["delta"]["role"] = "assistant"
                first[0] = False
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": state.model.name,
                                      "choices": [choice]}) + "\n\n"

    first = [True]
    calls = CallStream() if plan is not None and plan.parse_calls else None  # holds back a tool call
    try:
        async for batch in gen.async_batches():  # the tokens ready since the last chunk: one chunk
            text = "".join((calls.feed(ev.text) if calls is not None else ev.text) for ev in batch if ev.text)
            if text:
                yield chunk(text, None)
        res = gen.result
        finish = "length" if res.finish_reason == "length" else "stop"
        if calls is not None:
            tail, found = calls.finish()
            if found and finish != "length":
                if tail:
                    yield chunk(tail, None)
                for i, c in enumerate(found):
                    yield chunk(None, None, [{"index": i, **c}])
                finish = "tool_calls"
            elif calls.buffer:
                yield chunk(calls.buffer, None)
        yield chunk(None, finish)
        if include_usage:  # OpenAI's usage chunk: no choices
            usage = _usage(res)
            yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                          "created": created, "model": state.model.name, "choices": [],
                                          "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away (cancelled): the generation is closed with the iterator
        _finish(state, gen)


def serve(package: str, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None, max_queue: int = 8,
          provider: str = "auto", threads: int | None = None, max_context: int | None = None,
          little: str | None = None, strategy: str = "plain", strategy_options: dict | None = None,
          parallel: int = 1, prompt_cache: bool = True, prompt_cache_dir: str | None = None,
          prompt_cache_bytes=None, kv_dtype: str | None = None) -> None:
    """Serve PACKAGE; long prompts' KV is saved to the prompt cache and restored after a restart unless
    PROMPT_CACHE is False (docs/prompt-cache.md); with PARALLEL > 1 into and from the KV slots, which
    also reuse prefixes among themselves (docs/batching.md)."""
    import uvicorn

    from . import load
    from .cli.cache import serve_option

    if parallel > 1 and (strategy != "plain" or little):
        raise EdgeInferError(f"--parallel decodes several requests together with plain decoding: drop --strategy "
                             f"{strategy}{' and --little' if little else ''}, or serve with --parallel 1.")
    if parallel > max_queue:
        raise EdgeInferError(f"--max-queue {max_queue} is below --parallel {parallel}: the queue counts running "
                             "requests too, so raise --max-queue.")
    if host not in LOOPBACK and not api_key:
        print(f"WARNING: serving on {host} without --api-key: anyone who can reach this address can use the "
              "model. Bind to 127.0.0.1 or set --api-key.", file=sys.stderr)
    cache = serve_option(prompt_cache, prompt_cache_dir, prompt_cache_bytes)  # before loading: bad options fail fast
    model = load(package, provider=provider, threads=threads, max_context=max_context, little=little,
                 parallel=parallel, prompt_cache=cache, kv_dtype=kv_dtype)
    app = create_app(model, api_key=api_key, max_queue=max_queue, strategy=strategy,
                     strategy_options=strategy_options)
    together = f", {parallel} requests decoded together" if parallel > 1 else ""
    print(f"edgeinfer: serving {model.name} on http://{host}:{port}/v1{together}", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")
