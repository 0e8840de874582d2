"""What the expert store formats cost in quality, on real weights: SmolLM2-135M cut into 16 experts
with all 16 active per token (the dense model again, exactly up to the router's near-uniform
weights), its experts stored as int4 blocks (a session each), int8-channel and int4-channel, the
rest of the package int4. Perplexity on this repository's docs, and top-1 agreement with the
int8-channel package (the closest to the float weights). (The benchmark's top-4 MoEfied model is
for routing, not text: dropping 12 of 16 clusters without fine-tuning breaks its language model.)"""

from __future__ import annotations

import numpy as np

from .decode import real_text_ids
from .models import OUT

FORMATS = {"int8-channel": 8, "int4 blocks, session per expert": None, "int4-channel": 4}


def store_quality(tokens: int = 1024, window: int = 256) -> dict:
    from edgeinfer.runtimes import resolve_provider

    from edgeinfer.moe.decoder import MoEDecoder
    from edgeinfer.package import open_package

    from .weights import MOEFY_EXPERTS, build_moefied

    out, tops, ids = {}, {}, None
    for name, bits in FORMATS.items():
        pkg = OUT / f"pkg-smollm2-moefied-all16-{bits or 'int4'}"
        if not (pkg / "edgeinfer.json").is_file():
            build_moefied(pkg, bits, top_k=MOEFY_EXPERTS)
        ids = ids or real_text_ids(pkg, tokens)
        dec = MoEDecoder(open_package(pkg, verify=False), resolve_provider("cpu"), max_context=window + 1,
                         prefetch=False, readers=0)
        nll, top, n = 0.0, [], 0
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1]
            if len(chunk) < 2:
                break
            dec.reset()
            logits = dec.forward(chunk[:-1], logits_to_keep=len(chunk) - 1).astype(np.float64)
            logp = logits - logits.max(axis=-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(axis=-1, keepdims=True))
            nll -= logp[np.arange(len(chunk) - 1), chunk[1:]].sum()
            top.append(logits.argmax(axis=-1))
            n += len(chunk) - 1
        store = dec.cache.store
        dec.close()
        tops[name] = np.concatenate(top)
        out[name] = {"perplexity": float(np.exp(nll / n)), "tokens": n, "record_bytes": store.record_size,
                     "expert_store_bytes": int(store.index["total_bytes"])}
    ref = tops["int8-channel"]
    for name in out:
        out[name]["top1_agreement_with_int8_channel"] = float(np.mean(tops[name] == ref))
    return out
