"""GPT-2 language models built from a ``GPT2Config`` and trained from scratch.

``gpt2_lm(size)`` returns a ``transformers.GPT2LMHeadModel`` with fresh weights (no
pretrained GPT-2 is available here). ``"124M"`` is the GPT-2 small configuration that
nanoGPT reproduces (12 layers, 12 heads, width 768, context 1024, vocabulary 50257,
input and output embeddings tied: 124,439,808 parameters); the other sizes are small
models of the same architecture for CPU benchmarks and tests. Dropout defaults to GPT-2's
0.1 on embeddings, residuals and attention, as in ``GPT2Config``.
"""

from __future__ import annotations

from typing import Any

GPT2_SIZES: dict[str, dict[str, int]] = {
    "124M": {"n_layer": 12, "n_head": 12, "n_embd": 768},
    "small": {"n_layer": 6, "n_head": 6, "n_embd": 384},
    "mini": {"n_layer": 2, "n_head": 4, "n_embd": 128},
    "tiny": {"n_layer": 1, "n_head": 2, "n_embd": 32},
}
GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256  # <|endoftext|>


def gpt2_config(
    size: str = "124M",
    *,
    vocab_size: int = GPT2_VOCAB_SIZE,
    n_positions: int = 1024,
    dropout: float = 0.1,
    **overrides: Any,
):
    """A ``GPT2Config`` for one of ``GPT2_SIZES``; ``overrides`` set any other field."""
    from transformers import GPT2Config

    if size not in GPT2_SIZES:
        raise ValueError(f"unknown GPT-2 size {size!r}; choose from {', '.join(GPT2_SIZES)}")
    fields: dict[str, Any] = {
        **GPT2_SIZES[size],
        "vocab_size": vocab_size,
        "n_positions": n_positions,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "bos_token_id": min(GPT2_EOT, vocab_size - 1),
        "eos_token_id": min(GPT2_EOT, vocab_size - 1),
        "tie_word_embeddings": True,
    }
    fields.update(overrides)
    return GPT2Config(**fields)


def gpt2_lm(
    size: str = "124M",
    *,
    vocab_size: int = GPT2_VOCAB_SIZE,
    n_positions: int = 1024,
    dropout: float = 0.1,
    **overrides: Any,
):
    """A freshly initialised ``GPT2LMHeadModel`` (seed torch before calling for a fixed init)."""
    from transformers import GPT2LMHeadModel

    config = gpt2_config(
        size, vocab_size=vocab_size, n_positions=n_positions, dropout=dropout, **overrides
    )
    return GPT2LMHeadModel(config)
