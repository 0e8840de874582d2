"""Quality of an npu (static QDQ) package against an fp32 package of the same model.

Teacher-forced over a fixed text: perplexity of each package, next-token argmax
agreement, mean KL(fp32 || npu). Free-running: greedy continuations of a few
prompts from both packages, token agreement up to the first divergence and
position by position. Also the nodes each provider took in the npu graphs.

    .venv/bin/python apps/npu/npu_quality.py build/smollm2-npu build/smollm2-fp32 --provider cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from edgeinfer.runtimes import node_placement

import edgeinfer
from edgeinfer.perplexity import log_softmax  # float64, the same as `edgeinfer perplexity`

PROMPTS = ["The capital of France is", "Here is a short poem about the sea:\n",
           "def is_prime(n):\n", "The three most important inventions of the twentieth century are"]


def teacher_forced(model, ids: list[int]) -> np.ndarray:
    model.reset()
    return model.decoder.forward(ids, logits_to_keep=len(ids))


def greedy(model, ids: list[int], n: int) -> list[int]:
    return model.complete(ids, max_new_tokens=n, ignore_eos=True).tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("npu_package")
    p.add_argument("reference_package")
    p.add_argument("--provider", default="cpu", help="provider of the npu package")
    p.add_argument("--text", default=str(Path(__file__).with_name("eval_text.txt")))
    p.add_argument("--tokens", type=int, default=256, help="teacher-forced tokens of the text")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="greedy prompts to compare (0 = none)")
    args = p.parse_args()
    t0 = time.perf_counter()
    npu = edgeinfer.load(args.npu_package, provider=args.provider)
    load_s = time.perf_counter() - t0
    ref = edgeinfer.load(args.reference_package, provider="cpu")
    ids = npu.tokenizer.encode(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False)
    ids = ids[: min(args.tokens, npu.max_context - 1)]
    t0 = time.perf_counter()
    a = teacher_forced(npu, ids)
    npu_tf_s = time.perf_counter() - t0
    b = teacher_forced(ref, ids)
    la, lb = log_softmax(a[:-1]), log_softmax(b[:-1])
    target = np.array(ids[1:])
    nll = lambda lp: float(-lp[np.arange(len(target)), target].mean())  # noqa: E731
    kl = float((np.exp(lb) * (lb - la)).sum(-1).mean())
    report = {
        "npu_package": args.npu_package, "provider": npu.target.name, "load_s": round(load_s, 1),
        "text_tokens": len(ids), "ppl_npu": round(float(np.exp(nll(la))), 3),
        "ppl_fp32": round(float(np.exp(nll(lb))), 3),
        "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).mean()), 4), "mean_kl": round(kl, 5),
        "teacher_forced_s": round(npu_tf_s, 2),
    }
    same_prefix, positionwise = [], []
    for prompt in PROMPTS[:args.prompts]:
        pids = npu.tokenizer.encode(prompt)
        x, y = greedy(npu, pids, args.new_tokens), greedy(ref, pids, args.new_tokens)
        first = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
        same_prefix.append(first)
        positionwise.append(float(np.mean([u == v for u, v in zip(x, y)])))
    report["greedy_identical_prefix_tokens"] = same_prefix
    report["greedy_positionwise_agreement"] = round(float(np.mean(positionwise)), 3) if positionwise else None
    report["new_tokens_per_prompt"] = args.new_tokens
    dec = npu.decoder
    # a static (npu) package (any package can be compared); older onnxruntime builds do not report placement
    if hasattr(dec, "prefill_graph") and hasattr(dec.prefill_graph.session, "get_provider_graph_assignment_info"):
        report["placement"] = {"prefill": node_placement(dec.prefill_graph.session),
                               "decode": node_placement(dec.decode_graph.session)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
