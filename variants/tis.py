"""Truncated importance sampling (TIS) for a bf16 sampler: a research add-on beside the paper's step.

Rollouts drawn from a bf16 copy of the policy (backend/decode.py, `--sampler_dtype bf16`) are slightly off-policy for
the trainer, fp32 or under bf16 autocast (`--train_dtype`: another rounding than the copy's, so the mismatch does not
vanish). `sampler_mismatch` measures by how much (logged every step as mismatch_*); `tis_weights`, with
`--tis_cap C`, weights each rollout token's surrogate by min(pi_old / pi_sampler, C) to correct for it. Both join the
step in one line, `correction`, in `train.Trainer.rollout_inputs`, where the sampler's log-probs are at hand; its
weights enter `expo.grpo_loss` as `token_weights`. A first reading skips this file.
"""
from __future__ import annotations

import torch


def tis_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights [rows, tokens]: min(pi_old / pi_sampler, cap) per token, detached.

    Rollouts drawn from a bf16 copy of the policy are slightly off-policy for the fp32 trainer; weighting each token's
    surrogate by this ratio, capped so that rare large ratios cannot blow up the variance, corrects for it (Yao et al.
    2025; TRL's vllm_importance_sampling_correction). Example: old log 0.5, sampler log 0.4 -> 1.25; with cap 1.2 ->
    1.2. 0 at padding.
    """
    log_ratio = torch.where(mask.bool(), old_logp - sampler_logp, 0.0)
    return torch.where(mask.bool(), log_ratio.exp().clamp(max=cap), 0.0).detach()


def sampler_mismatch(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the sampler's distribution is from the trainer's, on the tokens the sampler drew: sums over the masked
    tokens of d = log pi_trainer - log pi_sampler and of k3 = exp(d) - d - 1 (an unbiased estimate of
    KL(sampler || trainer) per token), and the largest ratio exp(d). Sums, so that micro-batches add up."""
    valid = mask.bool()
    d = torch.where(valid, trainer_logp.detach() - sampler_logp, 0.0)
    return {"log_ratio": float(d.sum()), "k3": float((d.exp() - d - 1).sum()),
            "max_ratio": float(d.exp()[valid].max()) if valid.any() else 1.0}




def correction(old_logp: torch.Tensor, sampler_logp: torch.Tensor | None, mask: torch.Tensor, cap: float):
    """What the step takes from this file, in one call: (the TIS weights with cap > 0, else None; the mismatch's
    sums), or (None, {}) for rollouts that carry no sampler log-probs (fixed texts in tests)."""
    if sampler_logp is None:
        return None, {}
    weights = tis_weights(old_logp, sampler_logp, mask, cap) if cap else None
    return weights, sampler_mismatch(old_logp, sampler_logp, mask)
