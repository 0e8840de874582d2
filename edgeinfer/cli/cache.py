"""The prompt cache on the command line: ``run --prompt-cache``, ``serve --no-prompt-cache``,
``edgeinfer cache list|clear`` (edgeinfer/prompt_cache/ holds the cache itself)."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeinfer.prompt_cache import PromptCache

# edgeinfer/prompt_cache/ (numpy) is imported only by the commands that use it: `edgeinfer --help` stays quick.
DEFAULT_BOUND = "1 GiB"


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-cache", nargs="?", const=True, default=None, metavar="DIR",
                   help="save a long prompt's KV to disk and restore the longest saved prefix of the next "
                        "prompt (default folder: ~/.cache/edgeinfer/prompts or $EDGEINFER_HOME/prompts)")
    p.add_argument("--prompt-cache-bytes", default=None, metavar="SIZE",
                   help=f"bound of the prompt cache folder, e.g. 512MB (default {DEFAULT_BOUND}; "
                        "least recently used entries are evicted)")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false", default=True,
                   help="do not save long prompts' KV to disk (default: saved, and restored after a restart)")
    p.add_argument("--prompt-cache-dir", default=None, metavar="DIR", help="prompt cache folder (default "
                   "~/.cache/edgeinfer/prompts or $EDGEINFER_HOME/prompts)")
    p.add_argument("--prompt-cache-bytes", default=None, metavar="SIZE",
                   help=f"bound of the prompt cache folder, e.g. 512MB (default {DEFAULT_BOUND})")


def run_option(args) -> PromptCache | None:
    """What ``run`` passes to load(prompt_cache=...); a bound without the cache is refused."""
    from edgeinfer.prompt_cache import PromptCache

    value = getattr(args, "prompt_cache", None)
    size = getattr(args, "prompt_cache_bytes", None)
    if value is None:
        if size is not None:
            from edgeinfer.prompt_cache import PromptCacheError

            raise PromptCacheError("--prompt-cache-bytes bounds the prompt cache: add --prompt-cache.")
        return None
    return PromptCache(None if value is True else value, **({"max_bytes": size} if size is not None else {}))


def serve_option(enabled: bool, folder: str | None, size) -> PromptCache | None:
    """What ``serve`` loads its model with: the cache unless turned off; options without it are refused."""
    from edgeinfer.prompt_cache import PromptCache

    if not enabled:
        if folder is not None or size is not None:
            from edgeinfer.prompt_cache import PromptCacheError

            raise PromptCacheError("--prompt-cache-dir and --prompt-cache-bytes configure the prompt cache that "
                                   "--no-prompt-cache turns off: give one or the other.")
        return None
    return PromptCache(folder, **({"max_bytes": size} if size is not None else {}))


def add_cache_command(sub) -> None:
    c = sub.add_parser("cache", help="the prompt cache: list or clear saved prompt prefixes")
    csub = c.add_subparsers(dest="cache_command")
    ls = csub.add_parser("list", help="list saved prompt prefixes, most recently used first")
    ls.add_argument("--dir", default=None, help="the cache folder (default ~/.cache/edgeinfer/prompts)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_cache_list)
    cl = csub.add_parser("clear", help="remove every saved prompt prefix")
    cl.add_argument("--dir", default=None, help="the cache folder (default ~/.cache/edgeinfer/prompts)")
    cl.set_defaults(func=cmd_cache_clear)
    c.set_defaults(func=lambda args: (c.print_help(), 2)[1])


def cmd_cache_list(args) -> int:
    from edgeinfer.prompt_cache import PromptCache

    cache = PromptCache(args.dir)
    entries = cache.entries()
    if args.json:
        print(json.dumps([{"file": str(e.path), "model": e.model, "tokens": e.tokens, "size_bytes": e.size_bytes,
                           "last_used": e.last_used, "problem": e.problem or None} for e in entries], indent=1))
        return 0
    if not entries:
        print(f"no saved prompts in {cache.root}")
        return 0
    rows = [("MODEL", "TOKENS", "SIZE", "LAST USED", "FILE")]
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        rows.append((e.model, str(e.tokens), f"{e.size_bytes / 1e6:.1f} MB", when,
                     e.path.name + (f"  (unusable: {e.problem})" if e.problem else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    total = sum(e.size_bytes for e in entries)
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {total / 1e6:.1f} MB in {cache.root}")
    return 0


def cmd_cache_clear(args) -> int:
    from edgeinfer.prompt_cache import PromptCache

    cache = PromptCache(args.dir)
    n, size = cache.clear()
    print(f"removed {n} saved prompt(s), {size / 1e6:.1f} MB, from {cache.root}")
    return 0
