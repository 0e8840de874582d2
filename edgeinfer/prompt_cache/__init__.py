"""The persistent prompt cache (docs/prompt-cache.md): a prompt prefix's KV saved to disk and the
longest saved prefix of a new prompt restored before its prefill. cache.py holds the folder, its
keys and bound, and the model binding; entry.py the file format."""

from .cache import BoundPromptCache, PromptCache, PromptCacheError, as_prompt_cache, prompts_dir, skip_unsupported

__all__ = ["BoundPromptCache", "PromptCache", "PromptCacheError", "as_prompt_cache", "prompts_dir",
           "skip_unsupported"]
