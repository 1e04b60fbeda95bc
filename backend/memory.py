"""Memory-bounded scoring: how the trainer's fp32 [rows, T, vocab] tensors stay small, without changing a value.

A log-softmax over a 49k-token vocabulary at 256 tokens is 50 MB a row in fp32, and backward keeps what it needs of
it; for a step's 40 rows that would be the largest tensor of the update. `by_rows` runs the math a few rows at a time
and, when a gradient is needed, under activation checkpointing, so a chunk's fp32 copy is recomputed in the backward
pass instead of stored. rollout.token_logprobs (`chunk_logprobs`) and variants/distill.token_kl (`vocab_kl`) call it
in one line each; `entropy` is the log's per-token entropy of the sampling distribution. A first reading skips this.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def by_rows(fn, tensors: tuple[torch.Tensor, ...], *args, rows_per_chunk: int = 4) -> torch.Tensor:
    """fn(*(x[rows] for x in tensors), *args) for `rows_per_chunk` rows at a time, concatenated along rows: the same
    values and gradient as fn on all rows at once, with fn's intermediates for a few rows alive at a time."""
    grad = any(x.requires_grad for x in tensors)
    out = []
    for rows in torch.arange(len(tensors[0])).split(rows_per_chunk):
        part = [x[rows] for x in tensors]
        out.append(checkpoint(fn, *part, *args, use_reentrant=False) if grad else fn(*part, *args))
    return torch.cat(out)


def _entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = logits.float() / temperature  # [rows, T, V]
    return torch.logsumexp(scaled, -1) - (torch.softmax(scaled, -1) * scaled).sum(-1)


@torch.no_grad()
def entropy(logits: torch.Tensor, temperature: float, rows_per_chunk: int = 4) -> torch.Tensor:
    """Per-token entropy [N, T] of softmax(logits [N, T, V] / temperature), in fp32, without a gradient."""
    return by_rows(_entropy, (logits,), temperature, rows_per_chunk=rows_per_chunk)
