"""Sparse-MoE benchmark: decode speed under expert-memory budgets, with reads that hit the disk.

    python apps/bench/moe.py all          # build the models if needed, measure, write docs/moe.md
    python apps/bench/moe.py all --quick  # 100/50/25% budgets, one round, 12 tokens (2.6 min measured)
    python apps/bench/moe.py build --model random-int8  # only export one package
    python apps/bench/moe.py ffn-options  # how to run an expert from cached weights: the options, timed

The model is a Qwen3-MoE-shaped decoder with random weights, built from a config
without transformers (a lazy state dict generates each tensor when the exporter
asks for it, so the fp32 experts never sit in memory together): 24 layers x 48
experts, top-4, int4 experts of ~1.5 MB; ~1.7 GB of expert store. Random routers
route near-uniformly: the worst case for a cache. Each model comes twice: int4
experts (``random``, ``moefied``: a prepacked session per loaded expert) and
int8-channel experts (``random-int8``, ``moefied-int8``: ``--expert-bits 8``, fed to
one shared graph), everything else equal. The MoEfied model needs SmolLM2-135M's
transformers folder in build/smollm2-hf.

Every configuration runs in its own process (so peak RSS is its own), after the
page cache is dropped, with experts read through O_DIRECT: every miss is a real
disk read. Tokens are a fixed random sequence fed one at a time (a random model
decoding greedily would repeat itself and flatter the cache).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import subprocess
import sys
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "moe-bench"
PKG = OUT / "pkg-int4"
DOC = ROOT / "docs" / "moe.md"

CONFIG = dict(model_type="qwen3_moe", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
              num_key_value_heads=4, head_dim=64, intermediate_size=3072, moe_intermediate_size=768,
              num_experts=48, num_experts_per_tok=4, norm_topk_prob=True, vocab_size=320, rms_norm_eps=1e-6,
              max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=False, hidden_act="silu")


class RandomWeights(Mapping):
    """A state dict whose tensors are generated on access (seeded by name): nothing is kept."""

    def __init__(self, cfg: dict):
        h, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
        hd, heads, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        e, inter = cfg["num_experts"], cfg["moe_intermediate_size"]
        self.shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,),
                       "lm_head.weight": (cfg["vocab_size"], h)}
        for i in range(n_layers):
            p = f"model.layers.{i}."
            self.shapes.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.k_proj.weight": (kv * hd, h),
                p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, heads * hd),
                p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                p + "mlp.gate.weight": (e, h), p + "mlp.experts.gate_up_proj": (e, 2 * inter, h),
                p + "mlp.experts.down_proj": (e, h, inter)})

    def __getitem__(self, key: str) -> np.ndarray:
        shape = self.shapes[key]
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        if len(shape) == 1:  # norms: around one
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if key == "model.embed_tokens.weight":
            # Token identity must dominate the residual stream, or every token routes alike: with
            # embeddings as small as the random layers' outputs, 24 layers in, all tokens chose the
            # same ~8 of 48 experts (measured) -- a cache's best case, not the uniform worst case.
            return rng.standard_normal(shape, dtype=np.float32)
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    def __contains__(self, key) -> bool:  # without generating the tensor
        return key in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def build(out: Path = PKG, expert_bits: int | None = None) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tokenizer
    from edgeinfer.export import export_model
    from edgeinfer.export.sources import SourceModel

    tok = make_tokenizer(CONFIG["vocab_size"])
    src = SourceModel(name="random-qwen3-moe-24x48", kind="hf-folder", location="random (apps/bench/moe.py)",
                      config=dict(CONFIG), state_dict=RandomWeights(CONFIG),
                      tokenizer_json=tok.backend_tokenizer.to_str(), chat_template=None,
                      special={"bos_token_id": 1, "eos_token_ids": [2], "pad_token_id": 0})
    t0 = time.perf_counter()
    res = export_model(src, out, "int4", max_context=512, force=True, progress=True, expert_bits=expert_bits)
    store = res.manifest["moe"]["expert_store"]
    print(f"exported {out} in {time.perf_counter() - t0:.0f} s: {res.size_bytes / 1e9:.2f} GB, expert store "
          f"{store['total_bytes'] / 1e9:.2f} GB ({store['record_size']} bytes per expert)")


SMOL = ROOT / "build" / "smollm2-hf"
MOEFIED = OUT / "pkg-smollm2-moefied-int4"
MOEFY_EXPERTS, MOEFY_TOP_K = 16, 4
PRECISION = "int4"


def balanced_clusters(vectors: np.ndarray, k: int, iters: int = 15, seed: int = 0) -> np.ndarray:
    """Equal-size clusters of VECTORS' rows (k-means, then a greedy balanced assignment): cluster ids."""
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(len(x), k, replace=False)]
    size = len(x) // k
    for _ in range(iters):
        sim = x @ centroids.T
        order = np.argsort(-sim, axis=None)  # most similar (neuron, cluster) pairs first
        assign = np.full(len(x), -1)
        room = np.full(k, size)
        for flat in order:
            n, c = divmod(int(flat), k)
            if assign[n] < 0 and room[c] > 0:
                assign[n] = c
                room[c] -= 1
        centroids = np.stack([x[assign == c].mean(axis=0) for c in range(k)])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return assign


class MoefiedWeights(Mapping):
    """SmolLM2-135M with each MLP cut into experts (MoEfication): neurons clustered by their gate
    vectors, the router made of the clusters' mean gate vectors.

    MoEfication sums the selected experts unweighted; the runtime weights them by renormalized
    softmax probabilities. Scaling the router by a tiny factor keeps its ranking (the same experts
    are chosen) but makes the probabilities nearly equal, so each selected expert's weight is ~1/k;
    down projections are multiplied by k. With k = all experts this is the dense model again."""

    def __init__(self, sd: dict, layers: int, experts: int, top_k: int):
        self.sd, self.layers, self.experts, self.top_k = sd, layers, experts, top_k
        self.keys = [k for k in sd if ".mlp." not in k]
        for i in range(layers):
            p = f"model.layers.{i}.mlp."
            self.keys += [p + "gate.weight", p + "experts.gate_up_proj", p + "experts.down_proj"]
        self._split: dict[int, tuple] = {}

    def _layer(self, i: int):
        if i not in self._split:
            p = f"model.layers.{i}.mlp."
            gate, up = self.sd[p + "gate_proj.weight"], self.sd[p + "up_proj.weight"]
            down = self.sd[p + "down_proj.weight"]
            assign = balanced_clusters(gate, self.experts, seed=i)
            groups = [np.nonzero(assign == c)[0] for c in range(self.experts)]
            router = (1e-3 * np.stack([gate[g].mean(axis=0) for g in groups])).astype(np.float32)
            gate_up = np.stack([np.concatenate([gate[g], up[g]]) for g in groups]).astype(np.float32)
            down_e = np.stack([down[:, g] * self.top_k for g in groups]).astype(np.float32)
            self._split = {i: (router, gate_up, down_e)}  # one layer at a time
        return self._split[i]

    def __getitem__(self, key: str) -> np.ndarray:
        if ".mlp." not in key:
            return self.sd[key]
        i = int(key.split(".")[2])
        part = {"gate.weight": 0, "experts.gate_up_proj": 1, "experts.down_proj": 2}[key.split(".mlp.")[1]]
        return self._layer(i)[part]

    def __contains__(self, key) -> bool:
        return key in self.keys

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def build_moefied(out: Path = MOEFIED, expert_bits: int | None = None) -> None:
    from edgeinfer.export import export_model
    from edgeinfer.export.sources import load_source

    # The transformers folder if apps/bench/peers/prepare_hf.py made one, else the alias (the same GGUF).
    src = load_source(str(SMOL) if (SMOL / "config.json").exists() else "smollm2-135m")
    cfg = src.config
    inter = int(cfg["intermediate_size"]) // MOEFY_EXPERTS
    src.config = dict(model_type="mixtral", hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
                      num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
                      head_dim=cfg.get("head_dim"), intermediate_size=inter, num_local_experts=MOEFY_EXPERTS,
                      num_experts_per_tok=MOEFY_TOP_K, vocab_size=cfg["vocab_size"], rms_norm_eps=cfg["rms_norm_eps"],
                      max_position_embeddings=cfg["max_position_embeddings"],
                      rope_parameters=cfg.get("rope_parameters"),
                      rope_theta=cfg.get("rope_theta", 100000.0), tie_word_embeddings=cfg["tie_word_embeddings"],
                      hidden_act="silu")
    src.state_dict = MoefiedWeights(src.state_dict, int(cfg["num_hidden_layers"]), MOEFY_EXPERTS, MOEFY_TOP_K)
    src.name = "smollm2-135m-moefied"
    res = export_model(src, out, PRECISION, max_context=1024, force=True, progress=True, expert_bits=expert_bits)
    store = res.manifest["moe"]["expert_store"]
    print(f"exported {out}: expert store {store['total_bytes'] / 1e6:.1f} MB ({store['record_size']} bytes per expert)")


def real_text_ids(pkg: Path, n: int) -> list[int]:
    """N tokens of English prose (this repository's docs), through the package's tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(pkg / "tokenizer.json"))
    text = "\n\n".join((ROOT / p).read_text() for p in ("docs/architecture.md", "README.md", "docs/security.md"))
    ids = tok.encode(text).ids
    return ids[:n]


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def disk_bandwidth(pkg: Path, reads: int = 300) -> dict:
    """O_DIRECT reads of whole expert records at random record offsets: GB/s and ms per read."""
    manifest = json.loads((pkg / "edgeinfer.json").read_text())
    store = manifest["moe"]["expert_store"]
    offsets = [off for recs in store["layers"].values() for off, _ in recs]
    size = store["record_size"]
    fd = os.open(pkg / store["file"], os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, size)
    rnd = random.Random(0)
    t0 = time.perf_counter()
    for _ in range(reads):
        os.preadv(fd, [buf], rnd.choice(offsets))
    dt = time.perf_counter() - t0
    os.close(fd)
    return {"gb_s": reads * size / dt / 1e9, "ms_per_read": dt / reads * 1e3, "read_bytes": size, "reads": reads}


def run_one(pkg: Path, mode: str, frac: float, tokens: int, warmup: int, text: bool = False,
            readers: int = 1, threads: int | None = None) -> dict:
    """One configuration, in this process: decode WARMUP then TOKENS random tokens one at a time."""
    from edgeinfer.runtimes import resolve_provider

    from edgeinfer.bench import peak_rss_mb
    from edgeinfer.moe.decoder import MoEDecoder
    from edgeinfer.package import open_package

    pkg_ = open_package(pkg, verify=False)
    store = pkg_.manifest["moe"]["expert_store"]
    from edgeinfer.moe.budget import resident_records

    total = store["total_bytes"] * resident_records(store)  # all experts in memory, as the cache counts them
    budget = int(total * frac)
    dec = MoEDecoder(pkg_, resolve_provider("cpu", threads), max_context=512, memory_budget=budget,
                     prefetch=mode.startswith("prefetch"), direct_io=True, readers=readers)
    dec.cache.build_ahead = mode == "prefetch_build"  # the reader also builds sessions
    rss_loaded = peak_rss_mb()
    # Start from a full cache (all experts when resident, else the first ones of every layer up to the
    # budget): the warm-up then only has to adapt it, and the timed tokens see the steady state.
    cache = dec.cache
    per_layer = min(len(r) for r in store["layers"].values())
    for e in range(per_layer):
        for layer in store["layers"]:
            if cache.count >= cache.capacity:
                break
            cache.acquire(int(layer), [e])
            cache.release(int(layer), [e])
    if text:  # real prose: routing with real locality
        ids = real_text_ids(pkg, 8 + warmup + tokens)
    else:
        rng = np.random.default_rng(1234)
        ids = rng.integers(3, pkg_.manifest["architecture"]["vocab_size"], size=8 + warmup + tokens).tolist()
    dec.forward(ids[:8])
    for t in ids[8:8 + warmup]:
        dec.step(t)
    before = dec.expert_stats()
    t0 = time.perf_counter()
    for t in ids[8 + warmup:]:
        dec.step(t)
    dt = time.perf_counter() - t0
    stats = dec.expert_stats(before)
    stats.tokens = tokens
    s = stats.as_dict()
    record = store["record_size"]
    dense_bytes = sum(f["size"] for rel, f in pkg_.manifest["files"].items() if not rel.startswith("experts/"))
    dec.close()
    return {"mode": mode, "threads": threads, "readers": readers,
            "budget_fraction": frac, "budget_bytes": budget, "tokens": tokens, "tok_s": tokens / dt,
            "ms_per_token": dt / tokens * 1e3, "stats": s,
            "missed_bytes_per_token": (s["needed"] - s["hits"]) * record / tokens,
            "peak_rss_mb": peak_rss_mb(), "rss_after_load_mb": rss_loaded, "dense_bytes": dense_bytes,
            "resident_expert_bytes": dec.cache.resident_bytes}


def ffn_options(pkg: Path, runs: int = 100, rounds: int = 5) -> dict:
    """Ways to run one cached expert (decode: one row), timed on the bench model's expert shape with
    one compute thread (as the streaming runs compute). Loading and calling are timed for every option
    in each of ROUNDS interleaved rounds; medians reported (the machine is shared)."""
    import onnxruntime as ort
    from edgeinfer.export.quantize import BlockQuantized
    from edgeinfer.runtimes import resolve_provider

    from edgeinfer.moe.decoder import MoEDecoder
    from edgeinfer.moe.store import ExpertStore
    from edgeinfer.package import open_package

    dec = MoEDecoder(open_package(pkg, verify=False), resolve_provider("cpu", 1), max_context=64, prefetch=False)
    cache = dec.cache
    store: ExpertStore = cache.store
    h = np.random.default_rng(0).standard_normal((1, CONFIG["hidden_size"])).astype(np.float32)
    records = [store.read(0, e) for e in range(8)]

    def timed(fn, n=runs):
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e3

    def session_option(config: dict, arena: bool = True):
        """Builds one expert's session with these options; returns a function that runs it."""
        def build(tensors):
            so = cache.session_options()
            so.enable_cpu_mem_arena = so.enable_mem_pattern = arena
            for k, v in config.items():
                so.add_session_config_entry(k, v)
            so.add_external_initializers(list(tensors), [ort.OrtValue.ortvalue_from_numpy(a) for a in tensors.values()])
            s = ort.InferenceSession(cache.ffn_graph, so, providers=["CPUExecutionProvider"])
            return lambda: s.run(None, {"expert_in": h})
        return build

    # session: what the int4 store does (prepacked); noprepack: the same without prepacking (what is left
    # is creating the session itself: graph, kernels, planning); lean: no arena, memory patterns, spinning.
    options = {"session": (session_option({}), runs),
               "noprepack": (session_option({"session.disable_prepacking": "1"}), 5),
               "lean": (session_option({"session.intra_op.allow_spinning": "0"}, arena=False), runs)}
    int8 = _int8_channel_option(h)
    if int8 is not None:
        options["int8_channel"] = (int8[0], runs)
    times: dict = {k: ([], []) for k in options}
    for _ in range(rounds):
        for name, (build, n) in options.items():
            src = int8[2] if name == "int8_channel" else records
            t0 = time.perf_counter()
            for t in src:
                run = build(t)
            times[name][0].append((time.perf_counter() - t0) / len(src) * 1e3)
            times[name][1].append(timed(run, n))
    out = {}
    for name, (builds, calls) in times.items():
        out[f"{name}_build_ms"], out[f"{name}_run_ms"] = float(np.median(builds)), float(np.median(calls))
    if int8 is not None:
        out["int8_channel_record_bytes"] = int8[1]
    # The same graph with the weights as graph inputs: MatMulNBits then unpacks them on every call.
    tensors = records[0]
    import onnx

    model = onnx.load_from_string(cache.ffn_graph)
    names = {t.name for t in model.graph.initializer}
    for init in [t for t in model.graph.initializer if t.name in tensors]:
        model.graph.initializer.remove(init)
        dt = onnx.TensorProto.UINT8 if tensors[init.name].dtype == np.uint8 else onnx.TensorProto.FLOAT
        model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, dt, list(tensors[init.name].shape)))
    fed = ort.InferenceSession(model.SerializeToString(), cache.session_options(), providers=["CPUExecutionProvider"])
    feeds = {"expert_in": h, **{k: v for k, v in tensors.items() if k in names}}
    out["weights_as_inputs_ms"] = timed(lambda: fed.run(None, feeds), n=10)
    out.update(_qmoe_option(h, timed))
    # numpy on weights dequantized once (8x the bytes of int4 in the cache).
    inter, hid = CONFIG["moe_intermediate_size"], CONFIG["hidden_size"]
    bs = 32

    def deq(prefix, n, k):
        q = BlockQuantized(tensors[prefix + ".qweight"], tensors[prefix + ".scales"], np.zeros((n, 0), np.uint8), 4,
                           bs, n, k)
        return np.ascontiguousarray(q.dequantize().T)

    wgu, wd = deq("gate_up", 2 * inter, hid), deq("down", hid, inter)

    def numpy_ffn():
        gu = h @ wgu
        g, u = gu[:, :inter], gu[:, inter:]
        return (g / (1 + np.exp(-g)) * u) @ wd

    out["numpy_fp32_ms"] = float(np.median([timed(numpy_ffn) for _ in range(rounds)]))
    out["numpy_dequantize_ms"] = timed(lambda: (deq("gate_up", 2 * inter, hid), deq("down", hid, inter)), n=5)
    out["record_bytes"] = store.record_size
    out["numpy_fp32_bytes"] = wgu.nbytes + wd.nbytes
    out["loadavg"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    dec.close()
    return out


def _qmoe_option(h: np.ndarray, timed) -> dict:
    """onnxruntime's fused com.microsoft.QMoE (CPU kernel in 1.31, SwiGLU with fused gate/up only)
    with the weights as graph inputs: the top-k experts of a layer gathered into one tensor per call.
    Timed per expert on random weights of the bench's shapes (the time does not depend on the values)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k, hid, inter = CONFIG["num_experts_per_tok"], CONFIG["hidden_size"], CONFIG["moe_intermediate_size"]
    rng = np.random.default_rng(0)
    out = {}
    for bits in (4, 8):
        per_byte = 8 // bits
        shapes = {"w1": (k, 2 * inter, hid // per_byte), "s1": (k, 2 * inter), "w2": (k, hid, inter // per_byte),
                  "s2": (k, hid)}
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hid]),
                  helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, k])]
        inputs += [helper.make_tensor_value_info(n, TensorProto.UINT8 if n[0] == "w" else TensorProto.FLOAT, list(s))
                   for n, s in shapes.items()]
        node = helper.make_node("QMoE", ["x", "r", "w1", "s1", "", "w2", "s2"], ["y"], domain="com.microsoft", k=k,
                                expert_weight_bits=bits, activation_type="swiglu", swiglu_fusion=1,
                                normalize_routing_weights=1)
        graph = helper.make_graph([node], "qmoe", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                          [1, hid])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        from edgeinfer.runtimes import cpu as cpu_runtime

        try:
            sess = ort.InferenceSession(model.SerializeToString(), cpu_runtime.session_options(1),
                                        providers=["CPUExecutionProvider"])
            feeds = {"x": h, "r": np.ones((1, k), np.float32)}
            for n, s in shapes.items():
                feeds[n] = (rng.integers(0, 255, s, dtype=np.uint8) if n[0] == "w"
                            else np.full(s, 0.01, np.float32))
            out[f"qmoe_int{bits}_run_ms"] = timed(lambda s=sess, f=feeds: s.run(None, f), n=10) / k
        except Exception as e:  # an onnxruntime without the CPU kernel: say so in the table
            out[f"qmoe_int{bits}_error"] = str(e).strip().splitlines()[0][:120]
    return out


def _int8_channel_option(h: np.ndarray):
    """The int8-channel package's expert (if that package is built): a function that makes a read record
    runnable on the shared graph (OrtValues bound to its weight inputs) and returns its runner; the
    record size; eight read records."""
    import onnxruntime as ort
    from edgeinfer.runtimes import resolve_provider

    from edgeinfer.moe.decoder import MoEDecoder
    from edgeinfer.package import open_package

    if not (PKG_INT8 / "edgeinfer.json").is_file():
        return None
    dec = MoEDecoder(open_package(PKG_INT8, verify=False), resolve_provider("cpu", 1), max_context=64, prefetch=False)
    cache = dec.cache
    records = [cache.store.read(0, e) for e in range(8)]
    out = np.zeros_like(h)
    x = ort.OrtValue.ortvalue_from_numpy(h)
    y = ort.OrtValue.ortvalue_from_numpy(out)

    def build(tensors):
        b = cache.shared_session.io_binding()
        b.bind_ortvalue_input("expert_in", x)
        b.bind_ortvalue_output("expert_out", y)
        for name, a in tensors.items():
            b.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(a))
        return lambda: cache.shared_session.run_with_iobinding(b)

    return build, cache.store.record_size, records


def _subprocess_run(model: str, mode: str, frac: float, tokens: int, warmup: int, threads: int | None) -> dict:
    dropped = drop_page_cache()
    cmd = [sys.executable, __file__, "run-one", "--model", model, "--mode", mode, "--frac", str(frac),
           "--tokens", str(tokens), "--warmup", str(warmup)] + (["--threads", str(threads)] if threads else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} {frac}: {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["page_cache_dropped"] = dropped
    print(f"  {mode:9s} {frac:4.0%}: {out['tok_s']:6.2f} tok/s, hit rate {out['stats']['hit_rate']}, "
          f"read {out['stats']['bytes_read_per_token'] / 1e6:.1f} MB/token, wait {out['stats']['wait_s']:.2f} s, "
          f"accuracy {out['stats']['prefetch_accuracy']}, peak RSS {out['peak_rss_mb']:.0f} MB", flush=True)
    return out


PKG_INT8 = OUT / "pkg-int4-int8experts"
MOEFIED_INT8 = OUT / "pkg-smollm2-moefied-int4-int8experts"
# name -> (package, builder, expert_bits): int4 experts (a prepacked session per loaded expert) and
# int8-channel experts (weights fed to one shared graph), on the same weights.
MODELS = {"random": PKG, "random-int8": PKG_INT8, "moefied": MOEFIED, "moefied-int8": MOEFIED_INT8}
EXPERT_BITS = {"random": None, "random-int8": 8, "moefied": None, "moefied-int8": 8}


def build_model(model: str) -> None:
    (build if model.startswith("random") else build_moefied)(MODELS[model], EXPERT_BITS[model])


def bench_configs(model: str, mode: str) -> list[tuple[str, float, int | None]]:
    """(experts mode, budget fraction, compute threads) to run. MODE: quick (the issue's 100/50/25%
    budgets), default (+75%), full (+90% and read-and-build-ahead, for int4 experts: int8-channel ones
    have nothing to build)."""
    # Streaming configurations compute on one thread: loading an expert is CPU work and on 2 cores a
    # second spinning compute thread takes the core the loads need (measured: docs/moe.md, "compute
    # threads"); all-resident keeps every core.
    streaming = max(1, (os.cpu_count() or 2) - 1)
    configs = [("resident", 1.0, None), ("prefetch", 0.9, streaming), ("prefetch", 0.75, streaming),
               ("prefetch", 0.5, streaming), ("prefetch_build", 0.5, streaming), ("naive", 0.5, streaming),
               ("prefetch", 0.25, streaming), ("prefetch_build", 0.25, streaming), ("naive", 0.25, streaming)]
    if mode == "full" and EXPERT_BITS[model] is None:
        return configs
    keep = (1.0, 0.5, 0.25) if mode == "quick" else (1.0, 0.75, 0.5, 0.25)
    return [c for c in configs if c[0] != "prefetch_build" and c[1] in keep]


def measure_all(models: list[str], tokens: int, warmup: int, repeats: int, mode: str = "default") -> None:
    """Every configuration of every model once per round, rounds interleaved, each run its own
    process after the page cache is dropped; writes results-<model>.json."""
    OUT.mkdir(parents=True, exist_ok=True)
    loadavg = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    disks, runs = {}, {m: [] for m in models}
    for model in models:
        pkg = MODELS[model]
        if not (pkg / "edgeinfer.json").is_file():
            build_model(model)
        drop_page_cache()
        bw = disks[model] = disk_bandwidth(pkg)
        print(f"{model} disk: {bw['gb_s']:.2f} GB/s, {bw['ms_per_read']:.2f} ms per {bw['read_bytes'] / 1e6:.2f} MB "
              "O_DIRECT read")
    for r in range(repeats):
        print(f"round {r + 1}/{repeats}")
        for model in models:
            print(f"== {model}")
            for exp_mode, frac, threads in bench_configs(model, mode):
                runs[model].append(_subprocess_run(model, exp_mode, frac, tokens, warmup, threads))
            (OUT / f"runs-{model}.json").write_text(json.dumps(runs[model], indent=1))  # kept if what follows fails
    from edgeinfer.moe.budget import resident_records

    for model in models:
        pkg = MODELS[model]
        # Measured again after the runs; the bound uses the faster of the two (other jobs on a shared
        # machine only ever slow the disk down), both are kept.
        drop_page_cache()
        after = disk_bandwidth(pkg)
        before = disks[model]
        disks[model] = dict(max(before, after, key=lambda d: d["gb_s"]), before=before["gb_s"], after=after["gb_s"])
        manifest = json.loads((pkg / "edgeinfer.json").read_text())
        options = None
        if model == "random":
            print("expert FFN options")
            options = ffn_options(pkg)
        store = manifest["moe"]["expert_store"]
        result = {"model": model, "expert_format": store["precision"], "resident_records": resident_records(store),
                  "loadavg": loadavg, "config": CONFIG if model.startswith("random") else manifest["moe"],
                  "expert_store_bytes": store["total_bytes"], "record_bytes": store["record_size"],
                  "disk": disks[model], "runs": runs[model], "ffn_options": options, "cpu_count": os.cpu_count(),
                  "tokens": tokens, "warmup": warmup}
        (OUT / f"results-{model}.json").write_text(json.dumps(result, indent=1))


def summarize(result: dict) -> list[dict]:
    """Median per configuration, with the bound and our fraction of it."""
    groups: dict = {}
    for r in result["runs"]:
        groups.setdefault((r["mode"], r["budget_fraction"]), []).append(r)
    resident = float(np.median([r["tok_s"] for r in groups[("resident", 1.0)]]))
    bw = result["disk"]["gb_s"] * 1e9
    rows = []
    for (mode, frac), rs in groups.items():
        med = sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2]
        missed = float(np.median([r["missed_bytes_per_token"] for r in rs]))
        bound = min(resident, bw / missed) if missed > 0 else resident
        rows.append({"mode": mode, "frac": frac, "threads": med.get("threads"), "tok_s": med["tok_s"],
                     "all_tok_s": [r["tok_s"] for r in rs],
                     "hit_rate": med["stats"]["hit_rate"], "read_mb_tok": med["stats"]["bytes_read_per_token"] / 1e6,
                     "missed_mb_tok": missed / 1e6, "accuracy": med["stats"]["prefetch_accuracy"],
                     "wait_ms_tok": med["stats"]["wait_s"] / med["tokens"] * 1e3,
                     "read_ms_tok": med["stats"]["read_s"] / med["tokens"] * 1e3,
                     "build_ms_tok": med["stats"]["build_s"] / med["tokens"] * 1e3,
                     "late": med["stats"]["late_prefetches"], "misses": med["stats"]["misses"],
                     "bound": bound, "of_bound": med["tok_s"] / bound, "of_resident": med["tok_s"] / resident,
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "budget_mb": med["budget_bytes"] / 1e6,
                     "dense_mb": med["dense_bytes"] / 1e6})
    return rows


MODE_NAMES = {"resident": "all resident", "prefetch": "cache + read-ahead",
              "prefetch_build": "cache + read-and-build ahead", "naive": "cache, on demand"}


def _table(result: dict) -> list[str]:
    rows = summarize(result)
    lines = [
        "| experts | compute threads | budget | tok/s: median (runs) | of all-resident | hit rate | missed MB/token "
        "| read MB/token | prefetch accuracy | wait ms/token | read ms/token | build ms/token | bound tok/s "
        "| of bound | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"resident": 0, "prefetch": 1, "prefetch_build": 2, "naive": 3}
    for r in sorted(rows, key=lambda r: (-r["frac"], order[r["mode"]])):
        name = MODE_NAMES[r["mode"]]
        lines.append(f"| {name} | {r['threads'] or 'all'} | {r['frac']:.0%} ({r['budget_mb']:.0f} MB) | "
                     f"**{r['tok_s']:.2f}** ({' / '.join(f'{t:.2f}' for t in r['all_tok_s'])}) | "
                     f"{r['of_resident']:.2f} | {r['hit_rate']} | {r['missed_mb_tok']:.1f} | {r['read_mb_tok']:.1f} | "
                     f"{r['accuracy'] if r['accuracy'] is not None else '–'} | {r['wait_ms_tok']:.1f} | "
                     f"{r['read_ms_tok']:.1f} | {r['build_ms_tok']:.1f} | {r['bound']:.2f} | {r['of_bound']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    dense = rows[0]["dense_mb"]
    lines += ["", f"Dense weights (graphs, embeddings, head, routers) on disk: {dense:.0f} MB. Disk measured in the "
              f"script: {result['disk']['gb_s']:.2f} GB/s ("
              + (f"the faster of before/after the runs: {result['disk']['before']:.2f} / "
                 f"{result['disk']['after']:.2f}; " if "before" in result["disk"] else "")
              + f"{result['disk']['ms_per_read']:.2f} ms per "
              f"{result['disk']['read_bytes'] / 1e6:.2f} MB O_DIRECT random read, one reader). "
              f"{len(result['runs']) // len(rows)} runs per configuration, interleaved; median shown "
              f"(all runs' tok/s in `build/moe-bench/results-{result['model']}.json`)."]
    return lines


def findings(result: dict) -> list[str]:
    """What the table says, computed from it: gain over on-demand, the overlap there was, the budget that
    keeps 0.9x of all-resident speed."""
    rows = {(r["mode"], r["frac"]): r for r in summarize(result)}
    resident = rows[("resident", 1.0)]
    c_ms = 1000 / resident["tok_s"]
    out = []
    for frac in (0.5, 0.25):
        p, n, pb = rows.get(("prefetch", frac)), rows.get(("naive", frac)), rows.get(("prefetch_build", frac))
        if not (p and n):
            continue
        load_ms = n["read_ms_tok"] + n["build_ms_tok"]  # on demand, loads are serial with compute
        overlap = (c_ms + load_ms) / max(c_ms, load_ms)
        out.append(f"- {frac:.0%} budget: read-ahead {p['tok_s']:.2f} tok/s vs on-demand {n['tok_s']:.2f} "
                   f"(**{p['tok_s'] / n['tok_s']:.2f}x**); hit rate {p['hit_rate']} vs {n['hit_rate']}. "
                   f"Overlap available: compute {c_ms:.0f} ms/token (all-resident) beside "
                   f"{load_ms:.0f} ms/token of loading (read {n['read_ms_tok']:.0f} + build "
                   f"{n['build_ms_tok']:.0f}), so hiding all of it could gain at most {overlap:.2f}x. "
                   f"Against the disk-only bound ({p['bound']:.2f} tok/s) read-ahead reaches "
                   f"**{p['of_bound']:.2f}** of it."
                   + (f" Building ahead in the reader too: {pb['tok_s']:.2f} tok/s ({pb['tok_s'] / n['tok_s']:.2f}x "
                      "on-demand)." if pb else ""))
    ok = [r for r in rows.values() if r["mode"] == "prefetch" and r["tok_s"] >= 0.9 * resident["tok_s"]]
    smallest = min((r["frac"] for r in ok), default=None)
    out.append(f"- Smallest measured budget with read-ahead at >= 0.9x all-resident speed (all-resident ran on "
               "all cores, streaming on one: see the notes): "
               f"{f'{smallest:.0%}' if smallest is not None else 'none of those measured'}.")
    return out


def _threads_table(rows: list[dict]) -> list[str]:
    """The compute-thread experiment: random model, 50% budget, both modes, interleaved rounds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["mode"], r["threads"]), []).append(r)
    lines = ["## Compute threads while experts stream", "",
             "Random model, 50% budget, interleaved rounds (each run its own process, page cache dropped), "
             "recorded in `build/moe-bench/threads.jsonl`:", "",
             "| experts | compute threads | tok/s (runs) | hit rate | wait s | read s | build s |",
             "|---|---|---|---|---|---|---|"]
    for (mode, threads), rs in sorted(groups.items()):
        name = {"prefetch": "cache + read-and-build ahead", "naive": "cache, on demand"}[mode]
        lines.append(f"| {name} | {threads} | {', '.join(str(r['tok_s']) for r in rs)} | {rs[0]['hit']} | "
                     f"{', '.join(str(r['wait_s']) for r in rs)} | {', '.join(str(r['read_s']) for r in rs)} | "
                     f"{', '.join(str(r['build_s']) for r in rs)} |")
    lines += ["", "With two compute threads the pool's spinning worker takes the second core, and the background "
              "reader, whose session builds are CPU work, has none left: prefetch then gains nothing. With one "
              "compute thread the reader builds on the other core while the decoder computes, and prefetch runs "
              "~2x faster than with two threads (and faster than on-demand with either). Pass `threads=1` "
              "(`--threads 1`) when streaming experts on a 2-core machine; the tables above do.", ""]
    return lines


READING_NOTES = [
    "## Reading the numbers",
    "",
    "- An int4 expert costs CPU as well as disk to load: besides its read it needs its session built "
    "(*build ms/token*; onnxruntime prepacks the int4 weights), ~2 ms on a free core and several under "
    "load, more than its read (1.1-1.5 ms). On "
    "2 cores that work competes with the decode for CPU, so read-ahead can only hide it as far as the "
    "second core is free, and no budget below 100% comes near the disk-only bound. The int8-channel store "
    "removes that work (*build ms/token* near 0: wrapping arrays), leaving the read of 1.6x the bytes; "
    "what is left is reading, which the disk, not a core, does.",
    "- All experts resident, int8-channel experts compute slower than prepacked int4 ones "
    "(DynamicQuantizeMatMul packs the weights on every call: ~0.16 against ~0.06 ms per expert call, "
    "table at the end): where every expert fits in memory, int4 (the default) is the faster store; "
    "`--expert-bits 8` is for packages meant to stream their experts. The all-resident rows above are too "
    "noisy to show it (two compute threads with a spinning pool lose most when another job takes a core: "
    "the same configuration ranged 1.5-2.4x between rounds); measured apart, 3 interleaved rounds at load "
    "average ~1.5 (`apps/bench/moe.py run-one --model random|random-int8 --mode resident --frac 1 "
    "--tokens 24 --warmup 16`): int4 49.4 / 64.5 / 61.6 tok/s, int8-channel 35.2 / 38.3 / 38.8.",
    "- What still keeps int8-channel streaming under the issue's 0.8x of the bound at 50% and 25%: the "
    "reader, now that loading is only reading. It reads one layer ahead at queue depth 1, wrong guesses "
    "(15%) cost reads and evict experts that are needed later (*read MB/token* well above *missed "
    "MB/token*), and its reads took ~2-4 ms per 2.4 MB record on this shared disk, against ~1.1 ms for the "
    "lone read of the disk measurement. A second reader thread (`run-one --readers 2`, 2 interleaved "
    "rounds, random-int8): 7.57 / 8.13 tok/s against 7.01 / 9.01 at 50%, 6.00 / 6.48 against 5.47 / 5.24 "
    "at 25%: within the noise at 50%, maybe +15% at 25%; not made the default.",
    "- One compute thread stays the better choice with int8-channel experts, though their loads need "
    "little CPU (the reader still copies and waits on the second core): `run-one --model random-int8 "
    "--mode prefetch`, 2 interleaved rounds, 1 against 2 threads: 6.06 / 8.63 against 4.42 / 6.34 tok/s at "
    "50%, 4.15 / 5.15 against 4.32 / 3.22 at 25%. A shorter GIL switch interval (0.5 ms) for the reader "
    "changed nothing measurable.",
    "- Options of the table at the end not taken: disabling prepacking makes the build cheap but every "
    "call ~100x slower; what it leaves of the build (creating the session: graph, kernels, plans) is the "
    "most that an ORT-format graph or `session.use_ort_model_bytes_*` could save (not measured), and the "
    "prepack itself remains. onnxruntime's fused QMoE has a CPU kernel and takes weights as inputs, but "
    "runs slower per expert than DynamicQuantizeMatMul and needs a layer's experts gathered into one tensor "
    "(a copy per call). Batching a layer's top-k into one call would save 3 onnxruntime run overheads per "
    "layer; not measured, not done.",
    "- Load averages are given per table. When the machine is shared with other jobs the same "
    "configuration varies up to 2x between rounds (all runs shown; with two, the median is the faster). "
    "Differences between read-ahead and on-demand smaller than that are not established.",
    "- *read-ahead* (the default): the background reader only reads records; the decode thread makes a "
    "read-ahead expert runnable when it first uses it (int4: builds its session; int8-channel: wraps its "
    "arrays). Its *hit rate* counts those as hits (no disk wait); *read-and-build ahead* (`--full`, int4 "
    "only) builds in the reader too. Wrong guesses cost reads and evict experts: *read MB/token* above "
    "*missed MB/token* is that waste.",
    "- All-resident ran with every core, the streaming rows with one compute thread (see the thread "
    "table): on the small MoEfied model one thread is itself faster than two, so its streaming rows "
    "can exceed 1.0x all-resident.",
    "- Budgets are fractions of all experts resident, counted as the cache counts them: two store records "
    "per int4 expert (onnxruntime keeps the record's arrays and its prepacked copy; 2.3-2.6 MB measured per "
    "1.47 MB record), one per int8-channel expert (the arrays are the graph's inputs, nothing else is "
    "kept). Peak RSS stays below budget + dense weights + ~150 MB (Python, onnxruntime, KV).",
    "- The random model's routing is not perfectly uniform (on demand, a 50% budget hits ~70%, where "
    "uniform routing would give 50%): its residual stream is dominated by the token embedding, so "
    "routing follows the token.",
    "- Prefill runs each chosen expert once over the prompt rows that chose it, pinning one expert at a "
    "time; decode runs the chosen top-k on prebuilt bindings (for int8-channel experts the binding also "
    "binds the cached record's arrays to the shared graph's weight inputs).",
]


def write_doc(results: dict[str, dict]) -> None:
    """docs/moe.md from the results of the models measured (results-<model>.json)."""
    rnd = results.get("random") or results.get("random-int8")
    if rnd is None:
        raise SystemExit("no results for the random model: run 'all' first")
    opt = (results.get("random") or {}).get("ffn_options") or {}
    lines = [
        "# Sparse MoE: streaming experts under a memory budget",
        "",
        "Generated by `python apps/bench/moe.py all` (raw numbers: `build/moe-bench/results-*.json`; 7.5 min "
        "on this 2-core machine for the four packages x 6 configurations x 2 rounds, once they are built; "
        "`all --quick`: 100/50/25% budgets, one round, 12 tokens, 2.6 min).",
        "",
        *_load_cost_summary(results),
        "",
        "## Random MoE, near-uniform routing",
        "",
        f"Random Qwen3-MoE-shaped decoder, {CONFIG['num_hidden_layers']} layers x {CONFIG['num_experts']} "
        f"experts, top-{CONFIG['num_experts_per_tok']}, hidden {CONFIG['hidden_size']}, expert width "
        f"{CONFIG['moe_intermediate_size']}, int4 attention and head. Random routers spread tokens over "
        "all experts, close to the worst case for caching (not perfectly uniform: see below). Each run: its "
        "own process, page cache dropped, experts read with O_DIRECT, "
        f"{rnd['warmup']} tokens of warm-up (the cache fills), then {rnd['tokens']} random "
        "tokens decoded one at a time.",
        "",
    ]
    for model in ("random", "random-int8"):
        if model in results:
            lines += _model_section(results[model])
    lines += [
        "Bound = min(all-resident tok/s, disk GB/s ÷ missed bytes per token), missed = experts needed but not "
        "cached when the layer asked (each costs one record read, by the reader or the decoder). "
        "*read ms/token* and *build ms/token* add up both threads' time to read records and to make them "
        "runnable (int4: build a session, onnxruntime prepacks the weights; int8-channel: wrap the arrays); "
        "*wait* is what the decode thread stood still for experts.",
        "",
    ]
    moefied = [results[m] for m in ("moefied", "moefied-int8") if m in results]
    if moefied:
        m = moefied[0]["config"]
        lines += [
            "## MoEfied SmolLM2-135M on real text (routing with real locality)",
            "",
            f"SmolLM2-135M's MLPs cut into {m['num_experts']} experts of {m['expert_intermediate']} neurons "
            f"(balanced k-means on the gate vectors), top-{m['top_k']}, router = the clusters' mean gate vectors, "
            "int4 attention and head. Without fine-tuning the MoEfied model's text is worse than the dense "
            "model's; the point here is the routing of real hidden states. Tokens: this repository's docs, fed "
            "one at a time.",
            "",
        ]
        for r in moefied:
            lines += _model_section(r)
    threads_file = OUT / "threads.jsonl"
    if threads_file.is_file():
        lines += _threads_table([json.loads(x) for x in threads_file.read_text().splitlines() if x.strip()])
    lines += READING_NOTES + ["", *_options_table(opt), ""]
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")


STORE_FORMATS = {
    "int4": "int4 experts (block 32, symmetric), a session per loaded expert (onnxruntime prepacks it)",
    "int8-channel": "int8-channel experts (one scale per output channel), fed to one shared graph "
                    "(`--expert-bits 8`)",
}


def _load_cost_summary(results: dict[str, dict]) -> list[str]:
    """The int4 and int8-channel stores side by side, computed from the runs: what a load costs, and
    tokens/s at each budget (the better of read-ahead and on-demand, and each against its bound)."""
    lines = ["## What loading an expert costs, and the store format for streaming", ""]
    opt = (results.get("random") or {}).get("ffn_options") or {}
    if opt.get("int8_channel_build_ms") is not None:
        disk = results["random"]["disk"]
        ms_per_byte = disk["ms_per_read"] / disk["read_bytes"]
        lines += [
            f"An int4 expert (a {opt['record_bytes'] / 1e6:.2f} MB record, ~{disk['ms_per_read']:.1f} ms to read "
            f"here) needs its own onnxruntime session: {opt['session_build_ms']:.1f} ms of CPU, of which "
            f"{opt['noprepack_build_ms']:.1f} ms remain with prepacking disabled (creating the session "
            f"itself; calls then cost {opt['noprepack_run_ms']:.1f} ms instead of {opt['session_run_ms']:.2f}). "
            f"Leaner session options do not change it ({opt['lean_build_ms']:.1f} ms: table at the end), "
            "MatMulNBits fed int4 weights as inputs unpacks them on every call, and whatever the build costs "
            "is CPU work that competes with the decode on 2 cores. An *int8-channel* expert "
            f"(`--expert-bits 8`: int8, one scale per output channel; {opt['int8_channel_record_bytes'] / 1e6:.2f} "
            f"MB, ~{opt['int8_channel_record_bytes'] * ms_per_byte:.1f} ms to read) needs no session: one "
            "shared `DynamicQuantizeMatMul` graph takes its weights as inputs, bound without a copy "
            f"({opt['int8_channel_build_ms'] * 1e3:.0f} us per load); a call costs "
            f"{opt['int8_channel_run_ms']:.2f} ms (the int8 GEMM packs its operand every call). Its record is "
            "1.6x the int4 bytes on disk, but a cached expert holds only its record, where an int4 one holds "
            "the record and onnxruntime's prepacked copy (counted as two records): the same memory holds "
            f"{2 * opt['record_bytes'] / opt['int8_channel_record_bytes']:.2f}x as many int8-channel experts.",
            "",
        ]
    pairs = [(a, b) for a, b in (("random", "random-int8"), ("moefied", "moefied-int8"))
             if a in results and b in results]
    if not pairs:
        return lines
    lines += ["| model | budget | int4 tok/s (of bound) | int8-channel tok/s (of bound) | int8-channel / int4 | "
              "build ms/token int4 → int8-channel |", "|---|---|---|---|---|---|"]
    for a, b in pairs:
        ra = {(r["mode"], r["frac"]): r for r in summarize(results[a])}
        rb = {(r["mode"], r["frac"]): r for r in summarize(results[b])}
        for frac in sorted({f for _, f in ra} & {f for _, f in rb}, reverse=True):
            x, y = _best_at(ra, frac), _best_at(rb, frac)
            if x is None or y is None:
                continue
            lines.append(f"| {a} | {frac:.0%} ({x['budget_mb']:.0f} / {y['budget_mb']:.0f} MB) | "
                         f"{x['tok_s']:.2f} ({x['of_bound']:.2f}, {MODE_NAMES[x['mode']]}) | "
                         f"{y['tok_s']:.2f} ({y['of_bound']:.2f}, {MODE_NAMES[y['mode']]}) | "
                         f"**{y['tok_s'] / x['tok_s']:.2f}x** | {x['build_ms_tok']:.0f} → {y['build_ms_tok']:.1f} |")
    lines += ["", "Budgets are fractions of each store's all-resident memory, so an int8-channel budget is the "
              "smaller one in bytes (both shown). Best of read-ahead and on-demand per budget; every row is in the "
              "tables below."]
    return lines


def _best_at(rows: dict, frac: float) -> dict | None:
    """The fastest of all-resident, read-ahead and on-demand at budget FRAC."""
    found = [rows[k] for k in (("resident", frac), ("prefetch", frac), ("naive", frac)) if k in rows]
    return max(found, key=lambda r: r["tok_s"]) if found else None


def _model_section(result: dict) -> list[str]:
    fmt = result.get("expert_format", "int4")
    return [
        f"### {STORE_FORMATS.get(fmt, fmt)}",
        "",
        f"{result['expert_store_bytes'] / 1e9:.2f} GB of expert store, {result['record_bytes'] / 1e6:.2f} MB per "
        f"expert record; a cached expert counts {result.get('resident_records', 2)} record(s) of memory. "
        f"Machine load average at the start of the runs: {result.get('loadavg', '?')}.",
        "",
        *_table(result),
        "",
        *findings(result),
        "",
    ]


def _options_table(opt: dict) -> list[str]:
    if not opt:
        return []
    rows = [
        ("a session per expert, int4 weights as external initializers, prepacked (int4 store)",
         opt["session_run_ms"], f"{opt['session_build_ms']:.2f} ms (build)", opt["record_bytes"], 2),
    ]
    if "noprepack_build_ms" in opt:
        rows += [
            ("the same session with `session.disable_prepacking=1`", opt["noprepack_run_ms"],
             f"{opt['noprepack_build_ms']:.2f} ms (build)", opt["record_bytes"], 1),
            ("the same session, no arena / memory patterns / spinning", opt["lean_run_ms"],
             f"{opt['lean_build_ms']:.2f} ms (build)", opt["record_bytes"], 2),
        ]
    rows.append(("one shared graph, int4 weights fed as inputs (MatMulNBits unpacks them every call)",
                 opt["weights_as_inputs_ms"], "0", opt["record_bytes"], 1))
    if "int8_channel_run_ms" in opt:
        rows.append(("one shared graph, int8-channel weights bound as inputs (DynamicQuantizeMatMul; "
                     "`--expert-bits 8`)", opt["int8_channel_run_ms"],
                     f"{opt['int8_channel_build_ms']:.3f} ms (wrap as OrtValues, bind)",
                     opt["int8_channel_record_bytes"], 1))
    for bits in (4, 8):
        if f"qmoe_int{bits}_run_ms" in opt:
            name = (f"onnxruntime's fused QMoE (int{bits}, SwiGLU), a layer's top-{CONFIG['num_experts_per_tok']} "
                    "gathered as inputs; per expert")
            record = opt["record_bytes"] if bits == 4 else opt.get("int8_channel_record_bytes", 0)
            rows.append((name, opt[f"qmoe_int{bits}_run_ms"], "a copy into the gathered tensor", record, 1))
    rows.append(("numpy matmul on weights dequantized to fp32 at load", opt["numpy_fp32_ms"],
                 f"{opt['numpy_dequantize_ms']:.1f} ms (dequantize)", opt["numpy_fp32_bytes"], 1))
    lines = [
        "## Expert FFN from cached weights: the options",
        "",
        f"One expert (gate/up {2 * CONFIG['moe_intermediate_size']}x{CONFIG['hidden_size']}, down "
        f"{CONFIG['hidden_size']}x{CONFIG['moe_intermediate_size']}), one token, measured by "
        "`python apps/bench/moe.py ffn-options` (load average at the time: "
        f"{opt.get('loadavg', '?')}). Per load = the CPU work after the read; the read itself is the "
        "record's bytes at the disk's speed (above).",
        "",
        "| option | per call | per load (CPU) | record on disk | cached bytes |",
        "|---|---|---|---|---|",
    ]
    for name, call, load, record, resident in rows:
        lines.append(f"| {name} | {call:.3f} ms | {load} | {record / 1e6:.2f} MB | "
                     f"{'~' if resident == 2 else ''}{resident * record / 1e6:.2f} MB |")
    return lines


def _load_results() -> dict[str, dict]:
    files = {m: OUT / f"results-{m}.json" for m in MODELS}
    return {m: json.loads(f.read_text()) for m, f in files.items() if f.is_file()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["all", "build", "build-moefied", "run-one", "ffn-options", "doc"])
    ap.add_argument("--model", default="random", choices=list(MODELS))
    ap.add_argument("--models", default="random,random-int8,moefied,moefied-int8",
                    help="for 'all': which models to measure")
    ap.add_argument("--quick", action="store_true", help="for 'all': 100/50/25%% budgets only, one round, "
                    "12 tokens")
    ap.add_argument("--full", action="store_true", help="for 'all': also the 90%% budget and, for int4 experts, "
                    "building ahead in the reader")
    ap.add_argument("--no-doc", action="store_true",
                    help="for 'all': leave docs/moe.md alone (the benchmark report reads results-*.json)")
    ap.add_argument("--mode", default="prefetch", choices=["resident", "prefetch", "prefetch_build", "naive"])
    ap.add_argument("--frac", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--readers", type=int, default=1, help="background reader threads of 'prefetch'")
    ap.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    args = ap.parse_args(argv)
    if args.command == "build":  # --model picks which (default: the random int4 one)
        build_model(args.model)
    elif args.command == "build-moefied":
        build_moefied()
    elif args.command == "run-one":
        print(json.dumps(run_one(MODELS[args.model], args.mode, args.frac, args.tokens, args.warmup,
                                 text=args.model.startswith("moefied"), readers=args.readers, threads=args.threads)))
    elif args.command == "ffn-options":
        print(json.dumps(ffn_options(PKG), indent=1))
    elif args.command == "doc":
        write_doc(_load_results())
    else:
        if args.quick:
            args.repeats, args.tokens, args.warmup = 1, min(args.tokens, 12), min(args.warmup, 8)
        measure_all(args.models.split(","), args.tokens, args.warmup, args.repeats,
                    "quick" if args.quick else "full" if args.full else "default")
        if not args.no_doc:
            write_doc(_load_results())
    return 0


if __name__ == "__main__":
    sys.exit(main())
