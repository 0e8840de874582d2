"""Tokenizer of a package: encode/decode with the ``tokenizers`` library, render
the chat template in a Jinja sandbox, and turn token ids into text pieces as
they stream (never splitting a multi-byte character)."""

from __future__ import annotations

from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .errors import GenerationError, PackageError
from .package import Package

MAX_TOKENIZER_BYTES = 64 * 1024 * 1024


class TextTokenizer:
    def __init__(self, pkg: Package):
        meta = pkg.tokenizer
        path = pkg.path(meta.file)
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise PackageError(f"tokenizer file '{path.name}' is over {MAX_TOKENIZER_BYTES} bytes: refusing it.")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except BaseException as e:  # a malformed file can make the Rust side panic (a BaseException; fuzzing)
            if not _is_library_failure(e):
                raise
            msg = str(e)[:200]
            raise PackageError(f"tokenizer file '{path.name}' cannot be read ({msg}): re-export the package.") from None
        self.bos_token_id = meta.bos_token_id
        self.eos_token_ids = set(meta.eos_token_ids)
        self.bos_token = meta.bos_token or ""
        self.eos_token = meta.eos_token or ""
        self.chat_template = meta.chat_template
        self.vocab_size = self.tokenizer.get_vocab_size()
        # llguidance's views of this tokenizer, (vocab size, eos ids) -> LLTokenizer (edgeinfer.constraints)
        self.ll_tokenizers: dict = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise GenerationError("the prompt must be text (a str).")
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except BaseException as e:  # tokenizers rejects e.g. unpaired surrogates; a panic is a BaseException
            if not _is_library_failure(e):
                raise
            raise GenerationError(f"the prompt is not valid Unicode text ({str(e)[:80]}): remove unpaired "
                                  "surrogates or binary data.") from None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise GenerationError("this package has no chat template: pass a plain prompt instead of messages.")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise GenerationError("each chat message must be a dict with string 'role' and 'content'.")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, self.bos_token,
                                    self.eos_token)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes its own special tokens (e.g. a BOS): do not add them twice.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def stream(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


def _is_library_failure(e: BaseException) -> bool:
    """An error of the tokenizers library (incl. a Rust panic, which pyo3 raises as a BaseException),
    as opposed to an interrupt or exit that must propagate."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool, bos_token: str,
                         eos_token: str, tools: list[dict] | None = None) -> str:
    """Render a package's (untrusted) chat template in the immutable Jinja sandbox (with TOOLS, the
    OpenAI tool list, for templates that render tools; edgeinfer/tool_calls.py)."""
    extra = {"tools": tools} if tools is not None else {}
    try:
        return _environment().from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
            eos_token=eos_token, **extra)
    except TemplateError as e:
        raise GenerationError(f"the package's chat template failed: {e}") from None
    except Exception as e:  # a template can raise any Python error while rendering (found by fuzzing)
        raise GenerationError(f"the package's chat template failed ({type(e).__name__}: {str(e)[:120]}).") from None


class IncrementalDecoder:
    """Text pieces for a growing list of ids; holds back incomplete UTF-8."""

    def __init__(self, tok: TextTokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(prefix_text):]


_ENV: ImmutableSandboxedEnvironment | None = None


def _environment() -> ImmutableSandboxedEnvironment:
    global _ENV
    if _ENV is None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _ENV = env
    return _ENV
