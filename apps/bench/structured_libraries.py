"""Which constraint library: per-token mask cost and compile time of llguidance, xgrammar and
outlines-core on the same schema, the same token walk and the same vocabularies (a package's
tokenizer.json: SmolLM2's 49k, Gemma-3's 262k). The choice behind edgeinfer/constraints.py;
see docs/structured-output.md.

    .venv/bin/python -m apps.bench.structured_libraries packages/smollm2-135m-int4 packages/gemma3-270m-int4

Needs all three libraries installed (xgrammar pulls torch and transformers; measurement only).
Each library walks the tokens of one valid JSON instance and computes the next-token mask at every
step; the libraries are interleaved per round (A, B, C, A, B, C ...) and medians are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "mood": {"enum": ["happy", "sad", "neutral"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["street", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "city", "mood", "tags", "address"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "city": "London", "mood": "happy",
            "tags": ["mathematician", "writer", "analytical engine"],
            "address": {"street": "12 St James's Square", "zip": "SW1Y 4JH"}}


def load_vocab(package: str):
    import llguidance
    from tokenizers import Tokenizer

    from edgeinfer.package import open_package

    pkg = open_package(package, verify=False)
    path = pkg.path(pkg.tokenizer.get("file", "tokenizer.json"))
    tok = Tokenizer.from_file(str(path))
    eos = list(pkg.tokenizer.get("eos_token_ids") or [])
    n_vocab = int(pkg.manifest["architecture"].get("vocab_size") or tok.get_vocab_size())
    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(path.read_text(), n_vocab=n_vocab, eos_token=eos)
    ll_s = time.perf_counter() - t0
    ids = tok.encode(json.dumps(INSTANCE, separators=(",", ":")), add_special_tokens=False).ids
    return tok, lltok, eos, n_vocab, ids, ll_s


class LLGuidance:
    name = "llguidance"

    def __init__(self, lltok, n_vocab):
        import llguidance
        import llguidance.numpy as lln

        self.ll, self.lln, self.lltok = llguidance, lln, lltok
        self.mask = lln.allocate_token_bitmask(1, n_vocab)

    def compile(self):
        g = self.ll.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
        self.m = self.ll.LLMatcher(self.lltok, g, log_level=0)
        assert not self.m.is_error(), self.m.get_error()

    def step(self, token):
        self.lln.fill_next_token_bitmask(self.m, self.mask)
        if token is not None:
            assert self.m.consume_token(token), self.m.get_error()


class XGrammar:
    name = "xgrammar"

    def __init__(self, lltok, n_vocab, eos):
        import torch  # noqa: F401  (xgrammar's bitmask is a torch tensor)
        import xgrammar as xgr

        self.xgr = xgr
        vocab = [b"" if lltok.is_special_token(i) else lltok.decode_bytes([i]) for i in range(lltok.vocab_size)]
        t0 = time.perf_counter()
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=n_vocab, stop_token_ids=eos)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.setup_s = time.perf_counter() - t0
        self.mask = xgr.allocate_token_bitmask(1, n_vocab)

    def compile(self):
        g = self.compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
        self.m = self.xgr.GrammarMatcher(g)

    def step(self, token):
        self.m.fill_next_token_bitmask(self.mask)
        if token is not None:
            assert self.m.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, lltok, n_vocab, eos):
        import outlines_core

        self.oc = outlines_core
        vocab: dict[bytes, list[int]] = {}
        for i in range(lltok.vocab_size):
            if i in eos or lltok.is_special_token(i):
                continue
            vocab.setdefault(lltok.decode_bytes([i]), []).append(i)
        t0 = time.perf_counter()
        self.vocab = outlines_core.Vocabulary(eos[0], vocab)
        self.setup_s = time.perf_counter() - t0
        self.mask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)

    def compile(self):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
        self.g = self.oc.Guide(self.oc.Index(regex, self.vocab))

    def step(self, token):
        self.g.write_mask_into(self.mask.ctypes.data, self.mask.size, self.mask.itemsize)
        if token is not None:
            self.g.advance(token, return_tokens=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for package in args.packages:
        tok, lltok, eos, n_vocab, ids, ll_setup = load_vocab(package)
        libs = [LLGuidance(lltok, n_vocab), XGrammar(lltok, n_vocab, eos), OutlinesCore(lltok, n_vocab, eos)]
        setup = {"llguidance": ll_setup, "xgrammar": libs[1].setup_s, "outlines-core": libs[2].setup_s}
        compile_s = {lib.name: [] for lib in libs}
        per_token = {lib.name: [] for lib in libs}
        for _ in range(args.rounds):
            for lib in libs:
                t0 = time.perf_counter()
                lib.compile()
                compile_s[lib.name].append(time.perf_counter() - t0)
                times = []
                for t in ids + [None]:
                    t1 = time.perf_counter()
                    lib.step(t)
                    times.append(time.perf_counter() - t1)
                per_token[lib.name].append(statistics.median(times))
                per_token[lib.name + "/max"] = per_token.get(lib.name + "/max", []) + [max(times)]
        print(f"{package}: vocabulary {n_vocab}, {len(ids)} tokens of JSON, {args.rounds} interleaved rounds")
        print(f"  {'library':<14} {'tokenizer setup':>16} {'schema compile':>15} {'mask+advance median':>20} "
              f"{'worst step':>11}")
        for lib in libs:
            n = lib.name
            med, worst = statistics.median(per_token[n]), statistics.median(per_token[n + "/max"])
            print(f"  {n:<14} {setup[n] * 1e3:>13.0f} ms {statistics.median(compile_s[n]) * 1e3:>12.1f} ms "
                  f"{med * 1e6:>17.0f} us {worst * 1e3:>8.2f} ms")


if __name__ == "__main__":
    main()
