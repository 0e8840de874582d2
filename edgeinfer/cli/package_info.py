"""What a package holds: ``edgeinfer info [PACKAGE]`` (its manifest summary and this machine's execution
providers) and ``edgeinfer verify PACKAGE`` (every file against its sha256). Both take what ``run`` takes:
a package folder, a cache name or an alias."""

from __future__ import annotations

import json

from edgeinfer import __version__


def add_info_command(sub) -> None:
    i = sub.add_parser("info", help="show a package's manifest summary and the execution providers here")
    i.add_argument("package", nargs="?")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)


def add_verify_command(sub) -> None:
    v = sub.add_parser("verify", help="check every file of a package against its sha256")
    v.add_argument("package")
    v.set_defaults(func=cmd_verify)


def cmd_info(args) -> int:
    import onnxruntime as ort

    from edgeinfer.runtimes import available_providers, ep_devices, provider_report

    info: dict = {"edgeinfer": __version__, "onnxruntime": ort.__version__, "providers": available_providers(),
                  "onnxruntime_providers": ort.get_available_providers(), "provider_details": provider_report(),
                  "devices": ep_devices()}
    if args.package:
        from edgeinfer.package import open_package
        from edgeinfer.package_cache import resolve_model

        pkg = open_package(resolve_model(args.package), verify=False)  # a folder, cache name or alias, as run
        m = pkg.spec
        info["package"] = {
            "path": str(pkg.root), "name": m.name, "kind": m.kind, "family": m.family,
            "format_version": pkg.format_version, "quantization": m.quantization,
            "architecture": {k: v for k, v in m.architecture.items() if k != "sliding_windows"},
            "max_context": m.kv_cache.max_context,
            "graphs": [{"path": g.path, "role": g.role, "layers": list(g.layers) if g.layers else None}
                       for g in m.graphs],
            "exits": [e.to_dict() for e in m.exits], "size_mb": round(pkg.size_bytes / 1e6, 1),
            "chat_template": bool(m.tokenizer.chat_template), "target": m.target,
            "static": m.static.to_dict() if m.static else None,
        }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    if "package" in info:
        p = info["package"]
        print(f"package      {p['path']}")
        print(f"model        {p['name']} ({p['family']}, {p['kind']})")
        print(f"format       {p['format_version']}")
        print(f"weights      {describe_weights(p['quantization'] or {})}")
        print(f"architecture {json.dumps(p['architecture'])}")
        print(f"context      {p['max_context']}")
        print("graphs       " + ", ".join(f"{g['path']} " + (f"layers {g['layers']}" if g["layers"] else g["role"])
                                          for g in p["graphs"]))
        print(f"size         {p['size_mb']} MB")
        static = p.get("static") or {}
        print(f"target       {p['target']}" + (f" (fixed shapes: prefill chunk {static['chunk']}, context "
                                                f"{static['max_context']})" if static else ""))
    print(f"edgeinfer    {info['edgeinfer']} (onnxruntime {info['onnxruntime']})")
    print(f"providers    {', '.join(info['providers'])}  (onnxruntime lists: "
          f"{', '.join(info['onnxruntime_providers'])})")
    for row in info["provider_details"]:
        state = "available" if row["available"] else "not here"
        print(f"  {row['name']:<9} {row['onnxruntime_name']:<26} {row['device']:<4} {row['registration']:<8} "
              f"{state:<10} needs: {row['needs']['note']}" + ("" if row["available"] else f"  [{row['install']}]"))
    print("devices      " + ("; ".join(f"{d['ep']} on {d['type']} ({d['vendor']})" for d in info["devices"])
                             or "none reported"))
    return 0


def describe_weights(q: dict) -> str:
    """One line on how a package stores its weights (``info``)."""
    if q.get("weights") != "source":
        return json.dumps(q)
    types = ", ".join(f"{t} x{n}" for t, n in q.get("source_types", {}).items())
    line = f"source: the GGUF file's own weights, carried over exactly ({types})"
    if q.get("requantized"):
        line += "; re-quantized to int8 (no exact form): " + ", ".join(f"{t} x{n}" for t, n in q["requantized"].items())
    if q.get("narrow_types"):
        line += f"; {q['narrow_types']} (for int8 activations)"
    if q.get("lm_head_scheme"):
        line += f"; LM head re-quantized to {q.get('lm_head_bits')}-bit blocks (--lm-head-bits)"
    level = q.get("accuracy_level")
    return line + ("; int8 activations in the matmuls (accuracy level 4)" if level == 4 else
                   f"; accuracy level {level}")


def cmd_verify(args) -> int:
    from edgeinfer.package import open_package
    from edgeinfer.package_cache import resolve_model

    pkg = open_package(resolve_model(args.package), verify=True)
    print(f"{args.package}: {len(pkg.files)} files match their sha256")
    return 0
