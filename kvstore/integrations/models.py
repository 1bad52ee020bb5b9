"""Llama-architecture test models by name: a config (``"tiny"``, ``"1b"``, ``"8b"``) and seeded random weights.

Owns nothing but the shapes: no download, no tokenizer. ``"tiny"`` is for CPU tests (float32, peaky logits so
greedy choices are clear); ``"1b"`` and ``"8b"`` have the layer, head and vocabulary shapes of Llama 3.2 1B and
Llama 3.1 8B, with random weights (``initializer_range`` 0.02), for GPU benchmarks and bf16 tests. Override any
``LlamaConfig`` field by keyword, e.g. ``llama_config("8b", num_hidden_layers=4)``.
"""

from __future__ import annotations

from typing import Any, cast

import torch

try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kvstore.integrations.models needs Hugging Face transformers: pip install 'kvstore-llm[hf]'"
    ) from exc

from kvstore.errors import ConfigError

__all__ = ["LLAMA_SHAPES", "llama_config", "build_model"]

_NO_SPECIAL_TOKENS: dict[str, Any] = {
    # never stop early: fixed-length generations compare token by token
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}

LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "initializer_range": 0.1,  # peakier logits than the default 0.02: clear greedy choices
    },
    "1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": True,
    },
    "8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": False,
    },
}


def llama_config(shape: str = "tiny", **overrides: Any) -> LlamaConfig:
    """A ``LlamaConfig`` of the named shape (a key of :data:`LLAMA_SHAPES`), fields overridden by keyword."""
    if shape not in LLAMA_SHAPES:
        raise ConfigError(f"shape={shape!r} is not a known Llama shape; use one of {sorted(LLAMA_SHAPES)}")
    fields = {**_NO_SPECIAL_TOKENS, **LLAMA_SHAPES[shape], **overrides}
    try:
        return LlamaConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"llama_config({shape!r}, ...): {exc}") from exc


def build_model(
    shape: str = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides: Any,
) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` of :func:`llama_config` ``(shape, **overrides)`` with seeded random weights, in eval mode.

    The weights are created directly on ``device`` in ``dtype`` (an 8B model never passes through CPU float32).
    The same seed gives the same weights on the same kind of device.
    """
    config = llama_config(shape, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    return cast(LlamaForCausalLM, model.eval())
