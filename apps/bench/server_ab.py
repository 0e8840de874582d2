"""A change against a base: `edgeinfer serve --parallel P` from two source trees, side by side, driven
by batching.py's load script in interleaved rounds (ABBA) of 1 and C clients.

    git worktree add /tmp/base HEAD~1
    .venv/bin/python apps/bench/server_ab.py --trees base=/tmp/base,new=. --rounds 4 --requests 4

Each tree's server runs this checkout's .venv with the tree first on PYTHONPATH (its `edgeinfer`
package). Prints each round's aggregate tokens/s and, per tree, the medians and the ratio of C clients
to one. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from batching import PY, ROOT, free_port, load, wait_ready


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", required=True, help="NAME=FOLDER,NAME=FOLDER: source trees to compare")
    ap.add_argument("--package", default="smollm2-135m")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    trees = {name: Path(folder).resolve() for name, folder in (t.split("=", 1) for t in args.trees.split(","))}
    logs = ROOT / "build" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    procs, urls = {}, {}
    try:
        for name, tree in trees.items():
            port = free_port()
            cmd = [str(PY), "-c", "import sys; from edgeinfer.cli.main import main; sys.exit(main())", "serve",
                   args.package, "--port", str(port), "--parallel", str(args.parallel), "--max-queue",
                   str(args.clients + 1), "--threads", str(args.threads)]
            procs[name] = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1"),
                                           stderr=open(logs / f"server-ab-{name}.log", "w"), cwd=tree)
            urls[name] = f"http://127.0.0.1:{port}"
        for name in trees:
            wait_ready(urls[name], procs[name])
            load(urls[name], args.clients, 1, 16)  # warm-up
        res: dict = {name: {1: [], args.clients: []} for name in trees}
        names = list(trees)
        for rnd in range(args.rounds):
            for name in (names if rnd % 2 == 0 else names[::-1]):
                for c in (1, args.clients):
                    out = load(urls[name], c, args.requests, args.max_tokens)
                    if out["errors"]:
                        raise SystemExit(f"{name}: {out['errors'][0]}")
                    res[name][c].append(out["aggregate_tok_s"])
            print(f"round {rnd + 1}: " + "; ".join(
                f"{n}: {res[n][1][-1]:.0f} / {res[n][args.clients][-1]:.0f} tok/s" for n in names), flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
    med = statistics.median
    for name in names:
        one, many = res[name][1], res[name][args.clients]
        per_round = med([b / a for a, b in zip(one, many)])
        print(f"{name}: 1 client {med(one):.1f} tok/s, {args.clients} clients {med(many):.1f} tok/s, "
              f"{med(many) / med(one):.2f}× (median of per-round ratios {per_round:.2f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
