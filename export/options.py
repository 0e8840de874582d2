"""Which export options each pipeline takes. ``export_model`` has one set of options for five
pipelines (dense decoder, sparse MoE, npu, the optimum fallback, encoder-decoder); an option
given to a pipeline that does not use it is refused in one sentence, never silently ignored.
"""

from __future__ import annotations

from edgeinfer.errors import ExportError

# the options a caller may give, with the values that mean "not given"
DEFAULTS = {"max_context": None, "stages": None, "exits": None, "lm_head_bits": None, "block_size": 32,
            "accuracy_level": 4, "symmetric": None, "prefill_chunk": None, "calibration": None,
            "activation_bits": 16, "exit_adapters": False, "adapter_rank": None, "expert_bits": None,
            "quant_method": None, "exit_vocab": None, "exact_blocks": False}

# pipeline -> (what it builds, in a sentence's words; the options it takes or refuses itself with its own message)
PIPELINES = {
    "decoder": ("a dense decoder package", set(DEFAULTS) - {"prefill_chunk", "activation_bits"}),
    "moe": ("a sparse-MoE package", {"max_context", "stages", "exits", "lm_head_bits", "block_size",
                                     "accuracy_level", "symmetric", "expert_bits"}),
    "npu": ("an npu (static QDQ) package", {"max_context", "prefill_chunk", "calibration", "activation_bits"}),
    "monolithic": ("a package through optimum (one monolithic graph)", {"max_context", "stages", "exits",
                                                                          "block_size"}),
    "encoder-decoder": ("an encoder-decoder package", {"stages", "exits", "block_size", "accuracy_level",
                                                       "quant_method", "exit_adapters"}),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def refuse_unused(pipeline: str, given: dict) -> None:
    """One ExportError naming the options in GIVEN (the caller's, before any default was filled in)
    that PIPELINE does not use."""
    what, takes = PIPELINES[pipeline]
    unused = [flag(k) for k, v in given.items() if k in DEFAULTS and v != DEFAULTS[k] and k not in takes]
    if unused:
        verb, them = ("does", "it") if len(unused) == 1 else ("do", "them")
        raise ExportError(f"{', '.join(unused)} {verb} not apply to {what}: drop {them}.")
