"""Constrained decoding: a JSON Schema, "any JSON object", a regex, a choice among strings or a
context-free grammar (Lark, or GBNF) becomes a per-step token mask applied before sampling.

The grammar engine is llguidance (a small dependency), imported only when a constraint is asked
for; docs/structured-output.md says why it and not xgrammar or outlines-core.

:func:`compile_constraint` checks and compiles the request once (one sentence naming the problem
when it is wrong). A :class:`TokenMask` follows one generation: ``allowed(history)`` is the mask of
the tokens the constraint admits after ``history`` (prompt + generated + any draft being verified).
It keeps the tokens its matcher has consumed and, when a strategy asks about a different
continuation (a rejected draft), rolls the matcher back to the common prefix instead of starting
over, so lookup/speculative decoding under a constraint give exactly constrained greedy's tokens.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import numpy as np

from .errors import GenerationError

JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
# Compact JSON: no free whitespace. A small model let loose on flexible whitespace can spend its whole
# budget on newlines; the schema's own structure is all the output needs.
JSON_OPTIONS = {"whitespace_flexible": False}
CONSTRAINT_PARAMS = ("json_schema", "json_object", "regex", "grammar", "choices")


class ConstraintError(GenerationError):
    """A constraint that is malformed, cannot be compiled, or admits no output."""


@dataclass
class Constraint:
    """A compiled constraint: llguidance's grammar text and what it came from."""

    kind: str  # json_schema | json_object | regex | grammar | choices
    grammar: str
    tokenizer: object  # llguidance.LLTokenizer
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    compile_s: float = 0.0

    def start(self, prompt_tokens: int) -> TokenMask:
        return TokenMask(self, prompt_tokens)


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError:
        raise ConstraintError("structured output needs the llguidance library (an edgeinfer dependency): "
                              "pip install llguidance.") from None
    return llguidance


def constraint_params(params: dict) -> dict:
    """Pop the constraint keywords (json_schema, json_object, regex, grammar, choices) out of PARAMS."""
    return {k: params.pop(k) for k in CONSTRAINT_PARAMS if k in params}


def ll_tokenizer(text_tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
    """llguidance's view of a package tokenizer (built once per tokenizer: ~0.3 s for 49k tokens)."""
    cache = text_tokenizer.ll_tokenizers
    key = (vocab_size, eos_token_ids)
    if key not in cache:
        ll = _llguidance()
        if not eos_token_ids:
            raise ConstraintError("this package's tokenizer names no end-of-sequence token, which constrained "
                                  "decoding needs to end the output: re-export the package.")
        cache[key] = ll.LLTokenizer(text_tokenizer.tokenizer.to_str(), n_vocab=vocab_size,
                                    eos_token=list(eos_token_ids))
    return cache[key]


def compile_constraint(text_tokenizer, vocab_size: int, json_schema=None, json_object: bool = False,
                       regex: str | None = None, grammar: str | None = None,
                       choices: list[str] | None = None, eos_token_ids=None) -> Constraint | None:
    """Check and compile at most one constraint for a package's tokenizer; None when none is given.

    json_schema: a dict, or its JSON text. json_object: any JSON object. regex: the whole output
    matches it (Rust regex syntax, no lookaround). grammar: Lark (llguidance's dialect, rule
    ``start``) or GBNF (llama.cpp's, rule ``root``; detected by ``::=``). choices: exactly one of
    these strings. eos_token_ids: the tokens that end the output (default: the tokenizer's).
    """
    given = {k: v for k, v in (("json_schema", json_schema), ("json_object", json_object or None),
                               ("regex", regex), ("grammar", grammar), ("choices", choices)) if v is not None}
    if not given:
        return None
    if len(given) > 1:
        raise ConstraintError(f"give one constraint, not {' and '.join(given)}.")
    (kind, value), = given.items()
    ll = _llguidance()
    t0 = time.perf_counter()
    grammar_text = _grammar_text(ll, kind, value)
    eos = tuple(sorted(text_tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids))
    lltok = ll_tokenizer(text_tokenizer, vocab_size, eos)
    is_error, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar_text, lltok)
    if is_error:
        raise ConstraintError(f"the {_what(kind)} cannot be compiled: {_first_line(messages[0])}.")
    c = Constraint(kind, grammar_text, lltok, vocab_size, eos)
    mask = c.start(0)
    first = mask.allowed([])
    # An empty language shows as a matcher that fails at once (an empty regex) or, for a grammar,
    # as a start rule that derives no finite string (the matcher would only find out tokens later).
    lark = _lark_text(grammar_text) if kind == "grammar" else ""
    if not first.any() or mask.matcher.is_error() or (lark and lark_derives_nothing(lark)):
        raise ConstraintError(f"the {_what(kind)} admits no string at all: check it.")
    c.compile_s = time.perf_counter() - t0
    return c


def _lark_text(grammar_text: str) -> str:
    """The Lark source inside llguidance's grammar text (which is Lark itself, or JSON holding it)."""
    if not grammar_text.lstrip().startswith("{"):
        return grammar_text
    try:
        return json.loads(grammar_text)["grammars"][0].get("lark_grammar") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""


def _what(kind: str) -> str:
    return {"json_schema": "JSON schema", "json_object": "JSON object constraint", "regex": "regex",
            "grammar": "grammar", "choices": "list of choices"}[kind]


def _first_line(msg: str) -> str:
    """The library's message in one line: its first line and its 'error: ...' line, if any."""
    lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    detail = next((ln for ln in lines[1:] if ln.startswith("error:")), "")
    out = lines[0].rstrip(":") + (f" ({detail[6:].strip()})" if detail else "")
    return out.rstrip(".")[:300]


def _grammar_text(ll, kind: str, value) -> str:
    if kind == "json_schema":
        schema = value
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ConstraintError(f"the JSON schema is not valid JSON ({e}).") from None
        if hasattr(schema, "model_json_schema"):  # a pydantic model class
            schema = schema.model_json_schema()
        check_json_schema(schema)
        return _json_grammar(ll, schema)
    if kind == "json_object":
        if value is not True:
            raise ConstraintError("json_object must be True or left out.")
        return _json_grammar(ll, {"type": "object"})
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise ConstraintError("regex must be a non-empty string.")
        return ll.LLMatcher.grammar_from_regex(value)
    if kind == "grammar":
        if not isinstance(value, str) or not value.strip():
            raise ConstraintError("grammar must be non-empty text (Lark, or GBNF with '::=' rules).")
        if "::=" in value:
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                value = gbnf_to_lark(value)
            except Exception as e:  # the converter raises plain Python errors on malformed input
                raise ConstraintError(f"the GBNF grammar does not parse ({type(e).__name__}: "
                                      f"{_first_line(str(e))}).") from None
        return ll.LLMatcher.grammar_from_lark(value)
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(s, str) and s for s in value)):
        raise ConstraintError("choices must be a non-empty list of non-empty strings.")
    # Lark string literals take JSON escapes, so json.dumps quotes any choice safely.
    return ll.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in value))


def _json_grammar(ll, schema) -> str:
    try:
        return ll.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"the JSON schema cannot be compiled: {_first_line(str(e))}.") from None


def check_json_schema(schema, path: str = "schema") -> None:
    """Reject what is not JSON Schema at all (the library reports what it cannot compile)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ConstraintError(f"the JSON schema is not valid: {path} must be an object or a boolean.")

    def bad(where: str, what: str):
        raise ConstraintError(f"the JSON schema is not valid: {path}.{where} must be {what}.")

    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if not types or not all(isinstance(x, str) and x in JSON_TYPES for x in types):
            bad("type", f"one of {', '.join(sorted(JSON_TYPES))} (or a list of them)")
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if key in schema:
            if not isinstance(schema[key], dict):
                bad(key, "an object of schemas")
            for name, sub in schema[key].items():
                check_json_schema(sub, f"{path}.{key}.{name}")
    if "required" in schema and (not isinstance(schema["required"], list)
                                 or not all(isinstance(x, str) for x in schema["required"])):
        bad("required", "a list of property names")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        bad("enum", "a non-empty list")
    for key in ("items", "additionalProperties", "not", "contains"):
        if key in schema:
            check_json_schema(schema[key], f"{path}.{key}")
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                bad(key, "a non-empty list of schemas")
            for i, sub in enumerate(schema[key]):
                check_json_schema(sub, f"{path}.{key}[{i}]")
    for key in ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
        v = schema.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            bad(key, "an integer >= 0")
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
        v = schema.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            bad(key, "a number")
    if "pattern" in schema and not isinstance(schema["pattern"], str):
        bad("pattern", "a string (a regex)")


_LARK_TOKEN = re.compile(r"""
    (?P<str>"(?:[^"\\]|\\.)*"i?) | (?P<re>/(?:[^/\\]|\\.)+/[imslux]*) | (?P<name>[?!]?[A-Za-z_][A-Za-z_0-9]*)
    | (?P<num>\d+(?:\.\.\d+)?) | (?P<op>[()\[\]|?*+~,]) | (?P<ws>\s+) | (?P<other>.)""", re.X)


def lark_derives_nothing(lark: str) -> bool:
    """True when the rule ``start`` of a Lark grammar derives no finite string (e.g. ``start: "a" start``).
    Only plain rules are analysed: a grammar with directives or syntax beyond them is assumed fine."""
    rules: dict[str, list[list]] = {}
    name = None
    for raw in lark.splitlines():
        line = raw.split("//")[0].rstrip()
        if not line.strip() or line.strip() == "%llguidance {}":  # the header gbnf_to_lark writes
            continue
        m = re.match(r"[?!]?([A-Za-z_][A-Za-z_0-9]*)(?:\.-?\d+)?\s*:(.*)", line)
        if m:
            name, body = m.group(1), m.group(2)
        elif line.lstrip().startswith("|") and name:
            body = line
        else:
            return False  # a directive (%import, %json ...) or syntax beyond plain rules: no verdict
        toks = []
        for t in _LARK_TOKEN.finditer(body):
            if t.lastgroup == "other":
                return False
            if t.lastgroup != "ws":
                toks.append((t.lastgroup, t.group().lstrip("?!") if t.lastgroup == "name" else t.group()))
        rules.setdefault(name, []).append(toks)
    if "start" not in rules:
        return False
    productive: set[str] = set()

    def derives(toks: list, i: int, stop: str) -> tuple[bool, int]:
        """(whether the alternatives from I up to STOP derive a finite string, the index of STOP)."""
        any_alt, alt_ok = False, True
        while i < len(toks) and toks[i][1] != stop:
            kind, val = toks[i]
            if val == "|":
                any_alt, alt_ok, i = any_alt or alt_ok, True, i + 1
                continue
            if val in ("(", "["):
                ok, i = derives(toks, i + 1, ")" if val == "(" else "]")
                ok, i = ok or val == "[", i + 1
            elif kind == "name":
                ok, i = val in productive or val not in rules, i + 1  # an undefined name: llguidance reports it
            else:
                ok, i = kind in ("str", "re"), i + 1
            if i < len(toks) and toks[i][1] in ("?", "*"):
                ok, i = True, i + 1
            elif i < len(toks) and toks[i][1] == "+":
                i += 1
            elif i < len(toks) and toks[i][1] == "~":  # x~n or x~m..n: zero repeats derive the empty string
                i += 1
                if i < len(toks) and toks[i][0] == "num":
                    ok, i = ok or toks[i][1].split("..")[0] == "0", i + 1
            alt_ok = alt_ok and ok
        return any_alt or alt_ok, i

    changed = True
    while changed:
        changed = False
        for rule, bodies in rules.items():
            if rule not in productive and any(derives(b, 0, "")[0] for b in bodies):
                productive.add(rule)
                changed = True
    return "start" not in productive


class TokenMask:
    """The constraint's state along one generation: which tokens may come next."""

    def __init__(self, constraint: Constraint, prompt_tokens: int):
        ll = _llguidance()
        self.constraint = constraint
        self.prompt_tokens = prompt_tokens
        self.matcher = ll.LLMatcher(constraint.tokenizer, constraint.grammar, log_level=0)
        self.fed: list[int] = []  # generated tokens the matcher has consumed
        self._bits = ll.numpy.allocate_token_bitmask(1, constraint.vocab_size)
        self._fill = ll.numpy.fill_next_token_bitmask
        self._allowed: np.ndarray | None = None  # mask for self.fed, while valid
        # The matcher never consumes EOS: llguidance's rollback over a consumed EOS does not restore the
        # state (seen with 1.9.1), and drafts run past EOS.
        self._eos = set(constraint.eos_token_ids)
        self._eos_only = np.zeros(constraint.vocab_size, dtype=bool)
        self._eos_only[[t for t in self._eos if t < constraint.vocab_size]] = True
        self.mask_s = 0.0  # time spent computing masks
        self.masks = 0

    def _sync(self, generated: list[int]) -> None:
        fed = self.fed
        n = len(fed)
        if len(generated) < n or generated[:n] != fed:
            n = 0
            limit = min(len(fed), len(generated))
            while n < limit and fed[n] == generated[n]:
                n += 1
        if n < len(fed):
            self.matcher.rollback(len(fed) - n)
            del fed[n:]
            self._allowed = None
        for t in generated[n:]:
            if not self.matcher.consume_token(t):
                raise GenerationError(f"token {t} is not allowed by the {_what(self.constraint.kind)} "
                                      f"({_first_line(self.matcher.get_error())}).")
            fed.append(t)
            self._allowed = None

    def allowed(self, history: list[int]) -> np.ndarray:
        """Boolean mask over the vocabulary of the tokens admitted after HISTORY."""
        generated = list(history[self.prompt_tokens:])
        end = next((i for i, t in enumerate(generated) if t in self._eos), None)
        if end is not None:  # a draft beyond the end: nothing after EOS matters (it is never emitted)
            return self._eos_only
        self._sync(generated)
        if self._allowed is None:
            t0 = time.perf_counter()
            self._fill(self.matcher, self._bits)
            bits = np.unpackbits(self._bits.view(np.uint8), count=self.constraint.vocab_size, bitorder="little")
            self._allowed = bits.view(bool)
            self.mask_s += time.perf_counter() - t0
            self.masks += 1
        return self._allowed

    def apply(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        """LOGITS with every token the constraint forbids after HISTORY at -inf."""
        allowed = self.allowed(history)
        if len(allowed) == logits.shape[-1]:  # the usual case: one pass
            return np.where(allowed, logits, np.float32(-np.inf))
        n = min(len(allowed), logits.shape[-1])
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        out[:n] = np.where(allowed[:n], logits[:n], -np.inf)
        return out

    def report(self, generated: list[int]) -> dict:
        """What the result says about the constraint: ``complete`` only when GENERATED (EOS excluded)
        is a whole string of the constraint's language."""
        body = list(generated)
        while body and body[-1] in self._eos:
            body.pop()
        self._sync(body)
        return {"kind": self.constraint.kind, "complete": bool(self.matcher.is_accepting()),
                "compile_s": round(self.constraint.compile_s, 6), "masks": self.masks,
                "mask_s": round(self.mask_s, 6)}


def cli_constraint(args) -> dict:
    """Constraint keywords from ``edgeinfer run``'s --json-schema FILE, --json-object, --regex,
    --grammar FILE and --choice (repeatable)."""
    out: dict = {}
    if getattr(args, "json_schema", None):
        out["json_schema"] = _read_text(args.json_schema, "--json-schema")
    if getattr(args, "json_object", False):
        out["json_object"] = True
    if getattr(args, "regex", None) is not None:
        out["regex"] = args.regex
    if getattr(args, "grammar", None):
        out["grammar"] = _read_text(args.grammar, "--grammar")
    if getattr(args, "choice", None):
        out["choices"] = list(args.choice)
    if len(out) > 1:
        raise ConstraintError(f"give one constraint, not {' and '.join(out)}.")
    return out


def _read_text(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConstraintError(f"{flag} {path}: cannot read the file ({e.strerror or e}).") from None
    except UnicodeDecodeError:
        raise ConstraintError(f"{flag} {path}: the file is not UTF-8 text.") from None
