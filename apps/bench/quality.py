"""Quality of edgeinfer's packages against llama.cpp on the very same GGUF: regenerates docs/quality.md.

    .venv/bin/python apps/bench/quality.py                          # SmolLM2-135M and Gemma-3-270M, ~10 min
    .venv/bin/python apps/bench/quality.py --models smollm2-135m --precisions source,fp32,int4
    .venv/bin/python apps/bench/quality.py --out build/quality/quality.md   # leave docs/ alone

For each model: the packages of every --precisions (exported under build/quality/ if missing, always
with an explicit --precision; a precision the exporter refuses is skipped and the table says why)
and llama.cpp (llama-cpp-python, logits_all=True) on the GGUF file the alias resolves to. All
engines score the same token ids — the fp32 package's tokenization of the text, fed to llama.cpp
as ids, so tokenization cannot differ — with edgeinfer.perplexity's rule (non-overlapping windows
from an empty cache, every prediction after a window's first token, log-softmax in float64).
Top-1 agreement is with the fp32 package (the GGUF's weights dequantized to float). Then a few chat
questions with one right answer, greedy, per engine.

The text: news prose from gensim's test data (gensim/test/test_data/lee_background.cor, the Lee
corpus), which no one here wrote; installed with ``pip install --no-deps gensim==4.4.0`` if missing
(gensim itself is never imported).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "quality"
EDGEINFER = ROOT / ".venv" / "bin" / "edgeinfer"
TEXT_PACKAGE, TEXT_VERSION = "gensim", "4.4.0"
TEXT_FILE = "gensim/test/test_data/lee_background.cor"

# alias -> (short name of the build folders, chat template?)
MODELS = {"smollm2-135m": ("smollm2", True), "gemma3-270m": ("gemma3", False)}

# (question, accepted answers): right if one of them is a word among the answer's first ANSWER_WORDS words
QUESTIONS = [
    ("How many days are in a week?", ["7", "seven"]),
    ("What is 2 plus 2?", ["4", "four"]),
    ("What is the capital of France?", ["Paris"]),
    ("How many legs does a spider have?", ["8", "eight"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("How many hours are in a day?", ["24", "twenty-four", "twenty four"]),
    ("What is the opposite of hot?", ["cold"]),
    ("What do bees make?", ["honey"]),
]
ANSWER_WORDS = 20
NEW_TOKENS = 40


# -- the text ------------------------------------------------------------------------------------------
def evaluation_text(install: bool = True) -> tuple[str, dict]:
    """The Lee corpus from gensim's wheel (one news story per line), and where it came from."""
    try:
        dist = importlib.metadata.distribution(TEXT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        if not install:
            raise SystemExit(f"the evaluation text ships in {TEXT_PACKAGE}=={TEXT_VERSION}: "
                             f"pip install --no-deps {TEXT_PACKAGE}=={TEXT_VERSION}") from None
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        f"{TEXT_PACKAGE}=={TEXT_VERSION}"], check=True)
        dist = importlib.metadata.distribution(TEXT_PACKAGE)
    path = Path(dist.locate_file(TEXT_FILE))
    raw = path.read_bytes()
    text = "\n\n".join(line.strip() for line in raw.decode("utf-8").splitlines() if line.strip())
    return text, {"package": TEXT_PACKAGE, "version": dist.version, "file": TEXT_FILE,
                  "sha256": hashlib.sha256(raw).hexdigest()}


# -- engines -------------------------------------------------------------------------------------------
def export_package(alias: str, short: str, precision: str, max_context: int) -> tuple[Path | None, str | None]:
    """The package of ALIAS at PRECISION under build/quality/ (exported if missing), or the
    exporter's one-line refusal."""
    out = BUILD / f"{short}-{precision}"
    if (out / "edgeinfer.json").exists():
        return out, None
    BUILD.mkdir(parents=True, exist_ok=True)
    cmd = [str(EDGEINFER), "export", alias, "-o", str(out), "--precision", precision,
           "--max-context", str(max_context), "--force"]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in r.stdout.splitlines() + r.stderr.splitlines():
        if line.startswith(("note:", "warning:", "wrote")):
            print("  " + line, file=sys.stderr)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()] or ["(no message)"]
        return None, lines[-1].removeprefix("edgeinfer: error: ")
    return out, None


class LlamaCpp:
    """llama.cpp (llama-cpp-python) on a GGUF file, fed token ids: logits of every position, greedy."""

    def __init__(self, gguf: Path, context: int, threads: int):
        import llama_cpp
        import llama_cpp.llama as llama_module

        self.version = f"llama-cpp-python {llama_cpp.__version__}"
        # llama-cpp-python 0.3.36 does not expose use_extra_bufts, and its AMX weight buffers crash
        # (SIGSEGV in ggml_backend_amx_mul_mat) on this machine's AMX Xeons: load with the plain CPU
        # buffers (no AMX/repacked copies of the weights; the same GGUF weights, other kernels).
        default_params = llama_module.llama_cpp.llama_model_default_params

        def plain_buffers():
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_module.llama_cpp.llama_model_default_params = plain_buffers
        try:
            self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=context, n_batch=context, n_ubatch=context,
                                       n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
        finally:
            llama_module.llama_cpp.llama_model_default_params = default_params
        self.settings = "use_extra_bufts=False (no AMX/repacked weight buffers), logits_all=True"
        self.vocab_size = self.llm.n_vocab()
        self.size_mb = gguf.stat().st_size / 1e6

    def logits(self, window: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(window)
        return np.array(self.llm.scores[:len(window)], dtype=np.float32)

    def greedy(self, ids: list[int], new_tokens: int, eos: set[int]) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(new_tokens):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if tok in eos:
                break
            out.append(tok)
            if self.llm.n_tokens >= self.llm.n_ctx():
                break
            self.llm.eval([tok])
        return out


def question_prompt(model, question: str, chat: bool) -> list[int]:
    """Prompt ids for QUESTION: the package's chat template, or a Question/Answer line for a base model."""
    if chat:
        return model.encode([{"role": "user", "content": question}])
    return model.encode(f"Question: {question}\nAnswer:")


def answer_is_right(answer: str, accepted: list[str]) -> bool:
    """One of ACCEPTED is a word (or words) among the first ANSWER_WORDS words of ANSWER."""
    head = " ".join(answer.split()[:ANSWER_WORDS]).lower()
    return any(re.search(rf"(?<![\w-]){re.escape(a.lower())}(?![\w-])", head) for a in accepted)


def ask(generate, tokenizer, chat: bool) -> list[dict]:
    """GENERATE(question) -> token ids, for each question; the decoded answers and whether each is right."""
    rows = []
    for q, accepted in QUESTIONS:
        text = tokenizer.decode(generate(q)).strip()
        if not chat:
            text = text.split("\n")[0].strip()  # a base model goes on with more questions
        rows.append({"question": q, "answer": text, "right": answer_is_right(text, accepted)})
    return rows


# -- one model -----------------------------------------------------------------------------------------
def evaluate_packages(packages: dict[str, Path], text: str, windows_n: int, context: int, threads: int | None,
                      chat: bool, reference: str = "fp32", llamacpp: Path | None = None) -> dict:
    """Score every package (name -> folder) and llama.cpp on LLAMACPP (a GGUF) over the first WINDOWS_N
    windows of TEXT; agreement is with package REFERENCE. Returns {"windows", "scored_tokens", "engines"}."""
    import edgeinfer
    from edgeinfer.perplexity import adds_bos, make_windows, model_logits, score_windows

    ref = edgeinfer.load(packages[reference], threads=threads)
    bos = adds_bos(ref.tokenizer)
    windows = make_windows(ref.tokenizer.encode(text, add_special_tokens=False), context, bos)[:windows_n]
    tokenizer, eos, vocab_size = ref.tokenizer, set(ref.tokenizer.eos_token_ids), ref.decoder.vocab_size
    del ref
    engines: dict[str, dict] = {}
    ref_scores = None
    for name in [reference] + [n for n in packages if n != reference]:
        model = edgeinfer.load(packages[name], threads=threads)
        t0 = time.perf_counter()
        scores = score_windows(model_logits(model), windows, progress=None, desc=name)
        wall = time.perf_counter() - t0
        ref_scores = scores if name == reference else ref_scores
        answers = ask(_greedy_of(model, chat), tokenizer, chat)
        size = sum(f["size"] for f in model.package.manifest["files"].values()) / 1e6
        engines[f"edgeinfer {name}"] = _row(scores, ref_scores, name == reference, wall, size, answers,
                                            model.package.manifest.get("quantization"))
        print(f"[{name}] ppl {scores.perplexity:.3f}, {sum(a['right'] for a in answers)}/{len(answers)} right",
              file=sys.stderr, flush=True)
        del model
        gc.collect()
    if llamacpp is not None:
        prompts = _prompt_ids(packages[reference], chat, threads)
        peer = LlamaCpp(llamacpp, context, threads)
        if peer.vocab_size != vocab_size:
            print(f"warning: llama.cpp has {peer.vocab_size} logits, the packages {vocab_size}", file=sys.stderr)
        t0 = time.perf_counter()
        scores = score_windows(peer.logits, windows, progress=None, desc="llama.cpp")
        wall = time.perf_counter() - t0
        answers = ask(lambda q: peer.greedy(prompts[q], NEW_TOKENS, eos), tokenizer, chat)
        engines["llama.cpp"] = _row(scores, ref_scores, False, wall, peer.size_mb, answers,
                                    {"weights": "the GGUF's own", "settings": peer.settings},
                                    version=peer.version)
        print(f"[llama.cpp] ppl {scores.perplexity:.3f}, {sum(a['right'] for a in answers)}/{len(answers)} right",
              file=sys.stderr, flush=True)
        del peer
    return {"windows": len(windows), "context": context, "bos": bos is not None,
            "scored_tokens": len(ref_scores.nll), "engines": engines}


def _greedy_of(model, chat: bool):
    def generate(question: str) -> list[int]:
        ids = question_prompt(model, question, chat)
        return model.complete(ids, max_new_tokens=NEW_TOKENS, temperature=0.0).tokens
    return generate


def _prompt_ids(package: Path, chat: bool, threads: int) -> dict[str, list[int]]:
    import edgeinfer

    model = edgeinfer.load(package, threads=threads)
    return {q: question_prompt(model, q, chat) for q, _ in QUESTIONS}


def _row(scores, ref_scores, is_reference: bool, wall: float, size_mb: float, answers: list[dict],
         quantization, version: str | None = None) -> dict:
    return {"perplexity": scores.perplexity, "mean_nll": float(scores.nll.mean()),
            "top1_agreement": None if is_reference else scores.agreement(ref_scores),
            "scoring_tok_s": scores.tokens_fed / scores.seconds if scores.seconds else 0.0,
            "wall_s": wall, "size_mb": size_mb, "answers": answers,
            "right": sum(a["right"] for a in answers), "asked": len(answers),
            "quantization": quantization, "version": version}


# -- the page ------------------------------------------------------------------------------------------
def markdown(rep: dict) -> str:
    m = rep["machine"]
    t = rep["text"]
    lines = [
        "# Quality: edgeinfer packages and llama.cpp on the same GGUF",
        "",
        f"Generated by `{rep['command']}` on {rep['date'][:16].replace('T', ' ')} UTC — {m['cpu']}, "
        f"{m['cpus']} CPU threads (load average {m['loadavg']} at the start), Python {m['python']}; "
        f"{rep['threads']} threads per engine; {rep['total_s'] / 60:.1f} minutes in all. Versions: "
        + ", ".join(f"{k} {v}" for k, v in rep["versions"].items()) + ".",
        "",
        f"**Text:** `{t['file']}` from the PyPI package `{t['package']}=={t['version']}` (the Lee corpus of "
        f"news stories, test data of an NLP library; no one here wrote it; sha256 {t['sha256'][:16]}…), "
        "stories joined by blank lines.",
        "",
        "**Scoring** (edgeinfer.perplexity, the same code and the same token ids for every engine): the text is "
        "tokenized once by the fp32 package's tokenizer (no special tokens) and cut into consecutive, "
        f"non-overlapping windows of {rep['context']} tokens, each led by BOS if the tokenizer adds one to a "
        "prompt; each window runs from an empty cache in one batched pass; every prediction after a window's "
        "first token is scored (context − 1 per window; llama-perplexity scores only each window's second "
        "half). Perplexity = exp(mean NLL), log-softmax in float64. Top-1 agreement: the fraction of scored "
        "positions where the engine's argmax equals the fp32 package's. llama.cpp is fed the same ids "
        "(`Llama.eval`, `logits_all=True`), so tokenization cannot differ. tok/s: tokens through the model "
        "per second of logits computation in these batched passes (a by-product, not a decode speed).",
        "",
        f"**Chat questions:** {len(QUESTIONS)} questions with one right answer, greedy, at most {NEW_TOKENS} new "
        f"tokens; right if an accepted answer is a word among the first {ANSWER_WORDS} words of the reply. "
        "Instruct models get their chat template; a base model gets `Question: …\\nAnswer:` and its first line "
        "counts. llama.cpp gets the same prompt ids.",
    ]
    for alias, res in rep["models"].items():
        lines += ["", f"## {alias}: {res['description']}", "",
                  f"{res['windows']} windows × {res['context']} tokens = {res['scored_tokens']} scored tokens"
                  f"{' (BOS-led windows)' if res['bos'] else ''}. GGUF: `{res['gguf']}`.", "",
                  "| engine | weights | size MB | perplexity | vs llama.cpp | top-1 agreement with fp32 | "
                  "tok/s (scoring) | questions right |",
                  "|---|---|---|---|---|---|---|---|"]
        peer = res["engines"].get("llama.cpp")
        for name, e in res["engines"].items():
            rel = f"{100 * (e['perplexity'] / peer['perplexity'] - 1):+.2f}%" if peer and name != "llama.cpp" else "–"
            agree = "–" if e["top1_agreement"] is None else f"{e['top1_agreement']:.3f}"
            lines.append(f"| {name} | {_weights(e['quantization'])} | {e['size_mb']:.0f} | {e['perplexity']:.2f} | "
                         f"{rel} | {agree} | {e['scoring_tok_s']:.0f} | {e['right']}/{e['asked']} |")
        for prec, why in res.get("refused", {}).items():
            lines.append(f"| edgeinfer {prec} | refused by the exporter: {_cell(why, 200)} | | | | | | |")
        if peer:
            lines += ["", f"llama.cpp: {peer['version']}, {peer['quantization'].get('settings')}."]
        names = [n for n, e in res["engines"].items() if e["answers"]]
        if names:
            lines += ["", "| question | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for i, (q, _) in enumerate(QUESTIONS):
                cells = []
                for n in names:
                    a = res["engines"][n]["answers"][i]
                    cells.append(f"{'✓' if a['right'] else '✗'} {_cell(a['answer'])}")
                lines.append(f"| {q} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _weights(q) -> str:
    """A short description of a package's quantization entry (or the peer's)."""
    if not isinstance(q, dict):
        return str(q or "?")
    parts = [str(q.get("weights", "?"))]
    if q.get("block_size"):
        parts.append(f"block {q['block_size']}")
    if q.get("scheme"):
        parts.append(str(q["scheme"]))
    if q.get("lm_head_bits"):
        parts.append(f"LM head {q['lm_head_bits']}-bit")
    return ", ".join(parts)


def _cell(text: str, n: int = 60) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= n else text[:n - 1] + "…"


def _cpu() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def _versions() -> dict:
    out = {}
    for dist in ("edgeinfer", "onnxruntime", "numpy", "tokenizers", "llama_cpp_python"):
        try:
            out[dist.replace("_", "-")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        out["edgeinfer commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                                 capture_output=True).stdout.strip() or "?"
    except OSError:
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="aliases, comma-separated")
    ap.add_argument("--precisions", default="source,fp32,int8,int4",
                    help="edgeinfer precisions to export and score (fp32 is always included: the reference)")
    ap.add_argument("--windows", type=int, default=12, help="windows of the text to score (default 12: "
                    "about 3,000 tokens)")
    ap.add_argument("--context", type=int, default=256, help="tokens per window")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llamacpp", action="store_true", help="edgeinfer packages only")
    ap.add_argument("--out", default=str(ROOT / "docs" / "quality.md"), help="markdown page to write")
    ap.add_argument("--json", default=str(BUILD / "quality.json"), help="raw results to write")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    precisions = list(dict.fromkeys(["fp32", *[p.strip() for p in args.precisions.split(",") if p.strip()]]))
    text, source = evaluation_text()
    rep = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python apps/bench/quality.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                          " " + " ".join(argv if argv is not None else sys.argv[1:])),
           "machine": {"cpu": _cpu(), "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                       "loadavg": f"{os.getloadavg()[0]:.2f}"},
           "threads": args.threads, "context": args.context, "versions": _versions(), "text": source,
           "models": {}}
    from edgeinfer.export.aliases import ALIASES, resolve_alias

    for alias in [a.strip() for a in args.models.split(",") if a.strip()]:
        short, chat = MODELS[alias]
        packages, refused = {}, {}
        for prec in precisions:
            pkg, why = export_package(alias, short, prec, max_context=max(1024, args.context))
            if pkg is None:
                print(f"[{alias}] precision {prec} refused by the exporter: {why}", file=sys.stderr)
                refused[prec] = why
            else:
                packages[prec] = pkg
        if "fp32" not in packages:
            raise SystemExit(f"{alias}: the fp32 reference package could not be exported ({refused.get('fp32')})")
        gguf = resolve_alias(alias)
        res = evaluate_packages(packages, text, args.windows, args.context, args.threads, chat,
                                llamacpp=None if args.no_llamacpp else gguf)
        res.update({"description": ALIASES[alias].description, "gguf": str(Path(gguf).name), "refused": refused})
        rep["models"][alias] = res
    rep["total_s"] = time.perf_counter() - t_start
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rep, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(markdown(rep))
    print(f"wrote {args.out} and {args.json} in {rep['total_s'] / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
