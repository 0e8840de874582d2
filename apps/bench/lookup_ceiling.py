"""How fast can prompt-lookup decoding be on this machine? A replay, not a race.

    .venv/bin/python apps/bench/lookup_ceiling.py build/bench/smollm2-135m-int4-a4-exits
    .venv/bin/python apps/bench/lookup_ceiling.py PKG --row-cost 0.05   # a memory-bound decode's cost

Decodes each prompt of apps/bench/prompts/{chat,editing}.json greedily (64 tokens),
measures what one full-depth pass over N positions costs against one single-token
step on PKG (or takes ``--row-cost``: the cost of each extra row, in steps), then
replays the greedy text through the lookup proposer: every round proposes from the
n-gram index, counts how many proposed tokens greedy decoding would accept, and
charges the measured cost. No timing noise enters the result, so it isolates the
two things that bound lookup: how much the text copies its context, and what a
verification row costs. Policies replayed: always verify everything proposed
(up to 8), always at most 3, and edgeinfer's DraftLengthPolicy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import edgeinfer
from edgeinfer.strategies.lookup import DraftLengthPolicy, NgramIndex

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategies import verify_cost  # noqa: E402

PROMPTS = Path(__file__).resolve().parent / "prompts"


def row_cost(model, rows: int = 9) -> float:
    """Cost of each extra verified row, in single-token steps (strategies.verify_cost over ROWS positions)."""
    return (verify_cost(model, rows=(rows,), repeats=9)[str(rows)] - 1.0) / (rows - 1)


def replay(prompt: list[int], text: list[int], choose, cost_per_row: float, max_len: int = 8) -> float:
    """Speed-up over plain decoding of TEXT when lookup drafts are verified as CHOOSE says."""
    index = NgramIndex(2, 4)
    index.extend(prompt + text[:1])
    policy = DraftLengthPolicy(max_len)
    policy.c_step, policy.c_token = 1.0, cost_per_row
    i, cost = 0, 1.0  # the first token comes from the prompt's pass
    while i + 1 < len(text):
        proposal = index.propose(max_len)
        draft = proposal[:choose(proposal, policy)]
        accepted = 0
        while accepted < len(draft) and i + 1 + accepted < len(text) and draft[accepted] == text[i + 1 + accepted]:
            accepted += 1
        cost += 1.0 + cost_per_row * len(draft)
        if draft:
            policy.observe_verify(len(draft), accepted, 1.0 + cost_per_row * len(draft))
        emitted = text[i + 1:i + 2 + accepted]
        index.extend(emitted)
        i += len(emitted)
    return len(text) / cost


POLICIES = {"verify all (≤ 8)": lambda p, pol: len(p), "verify ≤ 3": lambda p, pol: min(3, len(p)),
            "DraftLengthPolicy": lambda p, pol: pol.choose(len(p)) if p else 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--row-cost", type=float, default=None, help="cost of an extra verified row, in steps")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    model = edgeinfer.load(args.package, threads=2)
    per_row = args.row_cost if args.row_cost is not None else row_cost(model)
    out = {"package": args.package, "row_cost": per_row, "sets": {}}
    for name in ("chat", "editing"):
        texts = []
        for p in json.loads((PROMPTS / f"{name}.json").read_text()):
            msgs = [{"role": "user", "content": p}] if model.tokenizer.chat_template else p
            model.reset()
            res = model.complete(msgs, max_new_tokens=args.new_tokens, ignore_eos=True)
            texts.append((model.encode(msgs), res.tokens))
        out["sets"][name] = {policy: statistics.median(replay(pr, tx, fn, per_row) for pr, tx in texts)
                             for policy, fn in POLICIES.items()}
    print(f"cost of each extra verified row: {per_row:.3f} steps ({args.package})")
    print("| prompts | " + " | ".join(POLICIES) + " |")
    print("|---|" + "---|" * len(POLICIES))
    for name, r in out["sets"].items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}×" for v in r.values()) + " |")
    print(json.dumps(out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
