"""Small models for the demo, the examples and the tests."""

from __future__ import annotations

from torch import nn


def digits_cnn() -> nn.Module:
    """A 38k-parameter CNN for 8x8 digits: two 3x3 convolutions, a pool, two linear layers."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def digits_mlp(hidden: int = 128) -> nn.Module:
    """The 64-``hidden``-10 MLP of the pruning benchmarks."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def tiny_llama(
    vocab_size: int = 256,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 344,
    max_length: int = 512,
) -> nn.Module:
    """A Llama-style causal language model (``transformers.LlamaForCausalLM``), randomly initialised.

    Seed with ``torch.manual_seed`` first for a reproducible initialisation. Nothing is
    downloaded: the architecture comes from a ``LlamaConfig`` built here.
    """
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Llama model needs transformers: pip install 'secondorder[examples]'"
        ) from error
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_length,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)
