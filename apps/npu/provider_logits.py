"""Teacher-forced logits of a package on one execution provider, for cross-environment checks.

Runs in any venv with edgeinfer's runtime (e.g. .venv-openvino, whose onnxruntime is
onnxruntime-openvino): prefill the first SPLIT ids, step the rest one token at a
time, save the logits of every position to OUT (.npy), and print one JSON line
with the provider, the onnxruntime version and, where onnxruntime reports it, the
nodes each provider took.

    .venv-openvino/bin/python apps/npu/provider_logits.py PACKAGE --provider openvino \\
        --ids 5,6,7,8 --split 3 --out /tmp/ov.npy
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnxruntime as ort

import edgeinfer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("package")
    p.add_argument("--provider", default="auto")
    p.add_argument("--ids", required=True, help="comma-separated token ids")
    p.add_argument("--split", type=int, required=True, help="ids prefilled in one forward; the rest are stepped")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ids = [int(t) for t in args.ids.split(",")]
    model = edgeinfer.load(args.package, provider=args.provider)
    dec = model.decoder
    rows = [dec.forward(ids[:args.split], logits_to_keep=args.split)]
    rows += [dec.step(t)[None].copy() for t in ids[args.split:]]
    np.save(args.out, np.concatenate(rows))
    placement = {}
    graphs = [g.session for g in (getattr(dec, "prefill_graph", None), getattr(dec, "decode_graph", None)) if g]
    for session in graphs:
        if hasattr(session, "get_provider_graph_assignment_info"):
            for sub in session.get_provider_graph_assignment_info():
                placement[sub.ep_name] = placement.get(sub.ep_name, 0) + len(sub.get_nodes())
    print(json.dumps({"provider": model.target.name, "reason": model.target.reason, "onnxruntime": ort.__version__,
                      "session_providers": graphs[0].get_providers() if graphs else [], "placement": placement}))


if __name__ == "__main__":
    main()
