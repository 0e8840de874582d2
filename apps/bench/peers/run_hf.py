"""Benchmark peer: Hugging Face transformers on torch CPU, or optimum's
ORTModelForCausalLM (onnxruntime), greedy, exactly N new tokens.

    .venv/bin/python          apps/bench/peers/run_hf.py --backend torch --model build/bench/smollm2-hf ...
    .venv-optimum/bin/python  apps/bench/peers/run_hf.py --backend optimum --model build/bench/smollm2-optimum ...

Both go through ``model.generate`` (greedy, min = max new tokens, KV cache on),
the way their users run them. A stopping criterion records the time at which
each new token is produced: ttft_s = first token after the prompt pass,
decode_tok_s = tokens 2..N over the time after the first. One JSON line on
stdout at the end, as the other runners (peers/README.md).
"""

from __future__ import annotations

import json
import resource
import sys
import time

from runner_cli import parse_args, read_ids


def main(argv=None) -> int:
    backend = "torch"
    if argv is None:
        argv = sys.argv[1:]
    if "--backend" in argv:
        i = argv.index("--backend")
        backend, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    args = parse_args(__doc__.splitlines()[0], "HF folder (torch) or optimum ONNX export folder", argv)
    import torch
    from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList

    torch.set_num_threads(args.threads)
    t_load = time.perf_counter()
    if backend == "torch":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        version = f"transformers {__import__('transformers').__version__} / torch {torch.__version__}"
    elif backend == "optimum":
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        model = ORTModelForCausalLM.from_pretrained(args.model, session_options=so, use_cache=True)
        version = f"optimum-onnx / onnxruntime {ort.__version__}"
    else:
        raise SystemExit(f"unknown backend {backend!r}: torch or optimum")
    load_s = time.perf_counter() - t_load
    if args.prompt_ids_file:
        ids = read_ids(args.prompt_ids_file)
    else:
        tok = AutoTokenizer.from_pretrained(args.model)
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True) if args.chat else args.prompt
        ids = tok(text)["input_ids"]

    class Stamps(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def generate():
        stamps = Stamps()
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 stopping_criteria=StoppingCriteriaList([stamps]), pad_token_id=0)
        t = stamps.times
        new = out[0, len(ids):].tolist()
        if len(new) != args.new_tokens:
            raise RuntimeError(f"expected {args.new_tokens} tokens, got {len(new)}")
        decode = (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else 0.0
        return {"ttft_s": t[0] - t0, "decode_tok_s": decode, "total_s": t[-1] - t0}, new

    for _ in range(args.warmup):
        generate()
    runs, tokens = [], None
    for _ in range(args.repeats):
        run, new = generate()
        runs.append(run)
        tokens = tokens or new
    print(json.dumps({"engine": f"hf-{backend}", "version": version, "model": str(args.model),
                      "threads": args.threads, "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
                      "runs": runs, "tokens": tokens,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load_s": load_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
