"""Provider registry, provider selection and session creation shared by every provider module.

Each provider module (cpu, cuda, tensorrt, directml, coreml, qnn, openvino,
xnnpack) says how its provider is registered, which options its sessions get,
and what it needs from a package (``accepts``). Providers come two ways:

- *classic*: compiled into the installed onnxruntime package and listed by
  ``ort.get_available_providers()`` (CPU, CUDA in onnxruntime-gpu, OpenVINO in
  onnxruntime-openvino, ...); sessions name them in ``providers=[...]``;
- *plugin*: a separate library (onnxruntime-qnn, and the CUDA plugin of newer
  onnxruntime-gpu builds) registered with ``ort.register_execution_provider_library``;
  its devices come from ``ort.get_ep_devices()`` and sessions get them with
  ``SessionOptions.add_provider_for_devices``. ``get_available_providers()``
  does not say whether a plugin can run here, so it is never used for them.

``resolve_provider`` turns ``auto`` or a name into an :class:`ExecutionTarget`;
``create_session`` makes a session on it, falling back to the CPU (logged) when
the user allowed it and the provider cannot take the graph.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from edgeinfer.errors import MemoryBudgetError, PackageError, ProviderError
from edgeinfer.package import Manifest

from . import coreml, cpu, cuda, directml, openvino, qnn, tensorrt, xnnpack
from .provider import Provider

log = logging.getLogger("edgeinfer")


@dataclass
class ExecutionTarget:
    """A resolved provider with the options its sessions are created with. Not frozen: it is one
    record per loaded model, and ``fallbacks`` grows as sessions are created on it."""

    name: str  # short name: cpu, cuda, ...
    ort_name: str  # onnxruntime's provider name
    options: dict = field(default_factory=dict)
    threads: int | None = None
    devices: tuple = ()  # OrtEpDevice objects of a plugin provider; empty for classic ones
    allow_fallback: bool = False  # a session the provider cannot create runs on the CPU instead (logged)
    cpu_fallback: bool = True  # False: every node must run on the provider (session.disable_cpu_ep_fallback)
    reason: str = ""  # why this provider: "requested", "auto: ...", "fallback: ..."
    fallbacks: list = field(default_factory=list, compare=False)  # sessions that fell back to the CPU

    @property
    def device_memory(self) -> str:
        """Where IO-bound buffers (the KV cache) live: on the GPU for CUDA/TensorRT, else host memory."""
        return PROVIDERS[self.name].device_memory

    @property
    def description(self) -> str:
        return f"{self.name} ({self.reason})" if self.reason else self.name


# short name -> its Provider record (runtimes/provider.py); the order is the one `info` lists
PROVIDERS: dict[str, Provider] = {m.PROVIDER.name: m.PROVIDER
                                  for m in (cpu, cuda, tensorrt, directml, coreml, qnn, openvino, xnnpack)}
# auto: preference by the package's target (the manifest's "target"; older packages are cpu)
AUTO_ORDER = {
    "cpu": ["cpu"],
    "gpu": ["tensorrt", "cuda", "directml", "coreml"],
    # The npu graphs are standard ops: the CPU runs them exactly (QDQ simulated), so it is the last resort.
    "npu": ["qnn", "openvino", "coreml", "cpu"],
}

_registered_plugins: dict[str, str] = {}  # ort name -> library path, once per process


def package_target(spec: Manifest | None) -> str:
    return spec.target if spec is not None else "cpu"


def plugin_devices(p: Provider) -> list:
    """Register P's plugin library once (if it ships one here) and return its devices."""
    lib = p.plugin_library()
    if lib is None:
        return []
    if p.ort_name not in _registered_plugins:
        try:
            ort.register_execution_provider_library(p.ort_name, lib)
        except Exception as e:  # already registered by someone else in this process is fine
            if "already registered" not in str(e).lower():
                log.debug("registering %s from %s failed: %s", p.ort_name, lib, e)
                return []
        _registered_plugins[p.ort_name] = lib
    return [d for d in ort.get_ep_devices() if d.ep_name == p.ort_name]


def _classic(p: Provider) -> bool:
    return p.plugin_library() is None and p.ort_name in ort.get_available_providers()


def available_providers() -> list[str]:
    """Short names of the providers that can run here (classic ones listed by onnxruntime, plugin
    ones with at least one device)."""
    return [name for name, m in PROVIDERS.items() if _classic(m) or plugin_devices(m)]


def provider_report() -> list[dict]:
    """Every known provider: available or not, how it is registered, its devices, what it needs."""
    rows = []
    for name, m in PROVIDERS.items():
        devices = plugin_devices(m)
        kind = "plugin" if m.plugin_library() else "classic"
        rows.append({"name": name, "onnxruntime_name": m.ort_name, "device": m.device_kind,
                     "available": bool(devices) or _classic(m), "registration": kind,
                     "devices": [_describe_device(d) for d in devices], "needs": m.needs, "install": m.install})
    return rows


def ep_devices() -> list[dict]:
    """All devices onnxruntime reports (after registering the plugin providers found here)."""
    for m in PROVIDERS.values():
        plugin_devices(m)
    return [_describe_device(d) for d in ort.get_ep_devices()]


def _describe_device(d) -> dict:
    hw = d.device
    return {"ep": d.ep_name, "ep_vendor": d.ep_vendor, "type": str(hw.type).rsplit(".", 1)[-1],
            "vendor": hw.vendor, "metadata": dict(d.ep_metadata)}


def resolve_provider(name: str = "auto", threads: int | None = None, spec: Manifest | None = None,
                     allow_fallback: bool = False, cpu_fallback: bool = True) -> ExecutionTarget:
    """The provider a package runs on.

    NAME: ``auto`` (the best available provider for the package's target) or a short name.
    ALLOW_FALLBACK: an unavailable or unsuitable provider — or one that cannot create a session — gives
    a logged fallback to the CPU instead of a ProviderError.
    CPU_FALLBACK: False makes every node run on the provider (a session it cannot fully take fails).
    """
    name = (name or "auto").lower()
    target = package_target(spec)
    if name != "auto" and name not in PROVIDERS:
        raise ProviderError(f"unknown execution provider '{name}': choose one of auto, {', '.join(PROVIDERS)}.")
    have = available_providers()
    if name == "auto":
        order = AUTO_ORDER.get(target, ["cpu"])
        skipped = []
        for short in order:
            refusal = _refusal(short, have, spec)
            if refusal is None and _emulated(short):
                refusal = f"{short} runs on an emulator here"
                skipped.append(refusal)
            if refusal is None:
                log.info("provider auto: picked %s for a %s package", short, target)
                why = f"auto for a {target} package" + (f"; {', '.join(skipped)}" if skipped else "")
                return _target(short, threads, allow_fallback, cpu_fallback, why)
            log.debug("provider auto: not %s: %s", short, refusal)
        return _fallback_or_raise(f"this package was exported for {target} and none of its providers "
                                  f"({', '.join(order)}) is available here (available: {', '.join(have)})",
                                  threads, allow_fallback, hint=_target_hint(target))
    refusal = _refusal(name, have, spec)
    if refusal is not None:
        return _fallback_or_raise(refusal, threads, allow_fallback,
                                  hint=PROVIDERS[name].install if name not in have else _target_hint(target))
    return _target(name, threads, allow_fallback, cpu_fallback, "requested")


def _emulated(short: str) -> bool:
    """A provider whose device is an emulation (QNN's HTP on x86): never chosen by auto."""
    provider = PROVIDERS[short]
    return provider.emulated(plugin_devices(provider))


def _refusal(short: str, have: list[str], spec: Manifest | None) -> str | None:
    if short not in have:
        return f"{short} is not available here (available: {', '.join(have)})"
    return PROVIDERS[short].accepts(spec)


def _target_hint(target: str) -> str:
    return {"gpu": "export with --target cpu for this machine", "npu": "the package also runs on the cpu"}.get(
        target, "")


def _fallback_or_raise(why: str, threads, allow_fallback: bool, hint: str = "") -> ExecutionTarget:
    if allow_fallback:
        log.warning("edgeinfer: %s: falling back to the cpu provider", why)
        return _target("cpu", threads, True, True, f"fallback: {why}")
    extra = f"; {hint}" if hint else ""
    raise ProviderError(f"{why}: pass --fallback (allow_fallback=True) to run on the cpu instead{extra}.")


def _target(short: str, threads, allow_fallback: bool, cpu_fallback: bool, reason: str) -> ExecutionTarget:
    provider = PROVIDERS[short]
    devices = tuple(plugin_devices(provider))
    return ExecutionTarget(short, provider.ort_name, provider.provider_options(), threads, devices=devices,
                           allow_fallback=allow_fallback, cpu_fallback=cpu_fallback, reason=reason)


def create_session(path: Path, target: ExecutionTarget, spec: Manifest | None = None) -> ort.InferenceSession:
    """One inference session for a graph of a (verified) package (SPEC, its manifest: for package-specific settings)."""
    provider = PROVIDERS[target.name]
    so = provider.session_options(target.threads)
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    for key, value in provider.session_config(spec).items():
        so.add_session_config_entry(key, value)
    if target.name != "cpu" and not target.cpu_fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        if target.devices:
            so.add_provider_for_devices(list(target.devices), provider.provider_options())
            return ort.InferenceSession(os.fspath(path), sess_options=so)
        providers = [(target.ort_name, target.options)] + provider.companions()
        if target.name != "cpu":
            providers.append(("CPUExecutionProvider", {}))
        return ort.InferenceSession(os.fspath(path), sess_options=so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if OUT_OF_MEMORY.search(msg):  # not the package's fault: say so, and what to do
            raise MemoryBudgetError(f"the machine ran out of memory loading graph '{path.name}' ({msg}): close "
                                    "other programs, or load a smaller model or a shorter max_context.") from None
        if target.name == "cpu":
            raise PackageError(f"graph '{path.name}' could not be loaded by onnxruntime ({msg}): "
                               "the package is corrupt or was built for another runtime.") from None
        if target.allow_fallback:
            log.warning("edgeinfer: the %s provider could not load '%s' (%s): falling back to the cpu provider",
                        target.name, path.name, msg)
            target.fallbacks.append(path.name)
            return create_session(path, _target("cpu", target.threads, False, True, "fallback"), spec)
        raise ProviderError(f"the {target.name} provider could not load graph '{path.name}' ({msg}): pass "
                            "--fallback (allow_fallback=True) to run on the cpu instead.") from None


OUT_OF_MEMORY = re.compile(r"bad_alloc|bad allocation|failed to allocate|out of memory", re.IGNORECASE)


def node_placement(session: ort.InferenceSession) -> dict[str, int]:
    """Nodes per provider in SESSION (after graph optimization and partitioning)."""
    counts: dict[str, int] = {}
    for sub in session.get_provider_graph_assignment_info():
        counts[sub.ep_name] = counts.get(sub.ep_name, 0) + len(sub.get_nodes())
    return counts
