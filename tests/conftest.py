"""Shared fixtures: tiny random models of each family, saved as Hugging Face
folders with a tokenizer trained on the spot, and exported packages of them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a small model that ran on a phone.",
] * 20

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def tiny_config(family: str):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    if family == "llama":
        return LlamaConfig(**TINY, tie_word_embeddings=True)
    if family == "qwen2":
        return Qwen2Config(**TINY, tie_word_embeddings=False)
    if family == "qwen3":
        return Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=True)
    if family == "gemma3":
        return Gemma3TextConfig(**TINY, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                             "sliding_attention"])
    if family == "gpt2":  # no hand-built graph: exercises the optimum fallback
        from transformers import GPT2Config

        return GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    raise ValueError(family)


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_input_names=["input_ids", "attention_mask"],
                                   chat_template="{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
                                                 "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def build_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    return build_from_config(tiny_config(family), folder, seed)


def build_from_config(cfg, folder: Path, seed: int = 0) -> Path:
    """A random causal LM from CFG, saved with a tokenizer trained on the spot."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 0
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # move norms and biases off their trivial init so parity means something
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    make_tokenizer(cfg.vocab_size).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> HF folder of a tiny random model (built once per session)."""
    root = tmp_path_factory.mktemp("tiny-hf")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny_model(family, root / family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_packages(tmp_path_factory, tiny_models):
    """(family, precision, stages) -> exported package folder."""
    from edgeinfer.export import export_model

    root = tmp_path_factory.mktemp("tiny-pkg")
    cache: dict = {}

    def get(family: str, precision: str = "fp32", stages: tuple = ()) -> Path:
        key = (family, precision, stages)
        if key not in cache:
            out = root / f"{family}-{precision}-{'-'.join(map(str, stages)) or 'one'}"
            export_model(str(tiny_models(family)), out, precision, stages=list(stages), max_context=256,
                         progress=False)
            cache[key] = out
        return cache[key]

    return get
