r"""ExPO: the method -- prompts and objectives, and nothing about models or tokenizers.

GRPO learns only from questions where the policy is *sometimes* right: if all G rollouts of a question fail, every
advantage is zero and the question teaches nothing. ExPO (Zhou, Li, Zhang, Leqi; arXiv 2507.02834) gets a learning
signal from those questions too: it shows the *current* policy the question together with its correct answer, asks it
to explain how to get there, and then trains on that self-explanation *as if it had been produced from the question
alone*. Being the policy's own text, the explanation is likely under the policy (unlike an expert's solution); being
conditioned on the right answer, it is more often right than the policy's own attempts.

ExP-GRPO, in the paper's notation, for a question q with gold answer a*:

    o_1..o_G ~ pi_old(. | q)                      G answer-free rollouts          (rollout.py, prompt: solve_prompt)
    e~       ~ pi_theta(. | q, a*)                one self-explanation            (rollout.py, prompt: explain_prompt)
    A_i      = (r_i - mean(r)) / (std(r) + eps)                                   group_advantages
    J(theta) = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - beta_KL k3_it ]
               + beta * 1/|E| sum_{tokens t of the step's targets E} log pi_theta(e~_t | q, e~<t)
                                                                                  grpo_loss  +  beta * -sft_loss
    rho_it   = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    k3_it    = exp(ref - logp) - (ref - logp) - 1  (an unbiased estimate of KL(pi_theta || pi_ref))

The self-explanation term is scored under solve_prompt(q): the answer hint is *not* in its context (train.py scores
`explanation_target(e~, a*)` after solve_prompt). It is not a member of the group -- no advantage, no ratio, no
clipping -- just a log-likelihood weighted by beta (0.04 in the paper; 0 gives GRPO; 0.5 did worse than GRPO), which
`beta_at` may anneal to 0. The paper writes the sequence log-likelihood; we take its token mean over all the step's
targets (E above, at temperature 1), so that beta weighs a target token alike in long and short explanations and keeps
its meaning when the batch or the budget changes. The same term on the dataset's expert solutions instead of e~ is
the "GRPO SFT-GT-CoT" baseline. ExP-DPO uses `dpo_loss` with e~ as the chosen response and one of the policy's own
wrong answers as the rejected one. Every target ends in the chat template's turn-end token (rollout.turn_end_id).

All loss functions take per-token log-probs `logp` [rows, tokens] and a 0/1 `mask` [rows, tokens] that marks the
completion tokens; padding positions may hold any finite values and never change a loss or receive a gradient.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

import reward

# --------------------------------------------------------------------------------------------------------- prompts

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
HINT = ("\n\nThe correct final answer is {answer}. Explain step by step how to reach it, as if you were solving the "
        "problem yourself, without saying that the answer was given to you.")


def solve_prompt(question: str) -> str:
    """The answer-free user message: rollouts are sampled from it and every target is scored under it."""
    return f"{question}\n\n{INSTRUCTION}"


def explain_prompt(question: str, answer: str) -> str:
    """The self-explanation user message: `solve_prompt(question)` plus the gold answer and the request to explain."""
    # exercise 7: the self-explanation prompt and its training target
    return solve_prompt(question) + HINT.format(answer=answer)


# A target must not talk about a hint the model never sees at test time. Two tests catch that: any five consecutive
# words of HINT itself ("the correct final answer is", "as if you were solving the"), and the usual ways of saying
# that the answer was handed over.
_HINT_WORDS = 5
_LEAK = re.compile(
    r"(given|provided|stated|expected|known) (final )?answer (is|was|of)|answer (was|is) (given|provided|known)"
    r"|(we are|we were|i was|we have been) told|given that the (final |correct )?answer|as given|(the|a) hint"
    r"|since the (final |correct )?answer is|back(wards)? from the (final |correct )?answer"
    r"|you (said|gave|told|provided|have already)|already (been )?(provided|given)",
    re.IGNORECASE,
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _ngrams(words: list[str], n: int) -> set[str]:
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


_HINT_NGRAMS = set().union(*(_ngrams(_words(part), _HINT_WORDS) for part in HINT.split("{answer}")))


def mentions_hint(explanation: str) -> bool:
    """True when an explanation repeats the hint's wording or talks about having been given the answer."""
    return _LEAK.search(explanation) is not None or not _HINT_NGRAMS.isdisjoint(
        _ngrams(_words(explanation), _HINT_WORDS))


# What may close the final box: outer braces, `$` / `$$`, `\]`, `\)`, `**` emphasis, with whitespace between them.
_CLOSERS = re.compile(r"\}(?:\s*(?:\}|\$|\\\]|\\\)|\*\*))*\.?")


def explanation_target(explanation: str, answer: str) -> str:
    r"""The training target made from a self-explanation: its final answer set to \boxed{answer}.

    The explanation is stripped of surrounding whitespace. The content of its last balanced \boxed{...} is replaced
    by the gold answer; what closes the math and emphasis around the box is kept (the box's `}`, outer braces, `$`,
    `$$`, `\]`, `\)`, `**`, with any whitespace between them, and one `.` right after them), and the prose after
    those is cut: "so $\boxed{7}$. Done" -> "so $\boxed{gold}$."; "\[ \boxed{7} \] Thus" -> "\[ \boxed{gold} \]";
    "**\boxed{7}**" -> "**\boxed{gold}**". An explanation without a box gets one line appended after a single
    newline: "\nThe answer is \boxed{gold}.".
    """
    # exercise 7: the self-explanation prompt and its training target
    text = explanation.strip()
    span = reward.boxed_span(text)
    if span is None:
        return f"{text}\nThe answer is \\boxed{{{answer}}}."
    start, end = span
    tail = _CLOSERS.match(text, end).group(0)  # the closers of the box and its math, not the prose after them
    return text[:start] + answer + tail


def explanation_targets(explanations: list[str], answers: list[str], drop_leaks: bool = True):
    """Targets for a batch of explanations; leaking ones become None when `drop_leaks`. Returns (targets, n_dropped)."""
    targets, dropped = [], 0
    for text, answer in zip(explanations, answers):
        if drop_leaks and mentions_hint(text):
            targets.append(None)
            dropped += 1
        else:
            targets.append(explanation_target(text, answer))
    return targets, dropped


# ------------------------------------------------------------------------------------------------------ advantages


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "std") -> torch.Tensor:
    """Group-normalised advantages; the G rows of one question are contiguous.

    Example, one success in a group of 4 (unbiased std 0.5):
        rewards [1, 0, 0, 0] -> mean 0.25 -> centred [0.75, -0.25, -0.25, -0.25] -> "std": [1.5, -0.5, -0.5, -0.5]
    An all-equal group gives zeros: the question teaches GRPO nothing, which is the gap ExPO fills.
    `scale="none"` keeps r - mean (Dr. GRPO: no division by the std, which over-weights nearly-solved questions).
    Raises ValueError when the rewards do not split into groups of `group_size` (6 rewards, G = 4), when
    `scale="std"` has groups of 1 (no std), and for an unknown `scale`.
    """
    # exercise 4: group-normalised advantages
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)  # [questions, G]
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "std":
        if group_size < 2:
            raise ValueError("scale='std' needs a group of at least 2")
        centred = centred / (groups.std(dim=1, keepdim=True) + 1e-4)
    elif scale != "none":
        raise ValueError(f"scale must be 'std' or 'none', not {scale!r}")
    return centred.view(-1)  # [rows]


# ---------------------------------------------------------------------------------------------------------- losses

LOSS_NORMS = ("seq", "token", "constant")


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, norm: str, max_tokens: int | None) -> torch.Tensor:
    """Average a masked [rows, tokens] tensor; `norm` decides the denominator (see grpo_loss)."""
    if norm == "seq":
        return (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if norm == "token":
        return per_token.sum() / mask.sum().clamp(min=1)
    if norm == "constant":
        return per_token.sum() / (per_token.shape[0] * (max_tokens or per_token.shape[1]))
    raise ValueError(f"norm must be one of {LOSS_NORMS}, not {norm!r}")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, kl_coef: float = 0.0, norm: str = "seq",
              max_tokens: int | None = None,
              token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO surrogate (negated, to minimise) plus kl_coef * k3, averaged over completion tokens.

    Per token: -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) + kl_coef * k3, with rho = exp(logp - old_logp).
    `norm`: "seq"      mean over each row's tokens, then over rows (DeepSeekMath; long answers weigh less per token);
            "token"    sum over all tokens / number of tokens (DAPO);
            "constant" sum / (rows * max_tokens), max_tokens defaulting to the padded length; pass the generation
                       budget to get Dr. GRPO's constant that does not depend on the batch.
    `token_weights` [rows, tokens] (detached), when given, multiplies each token's clipped surrogate (not the KL term):
    the truncated importance weight of `tis_weights`. `ref_logp` may be None when kl_coef == 0. Padding never counts:
    not in the loss value (which is logged), not in the gradient, and a log-ratio of any size there must not overflow
    (zero it *before* exp: inf * 0 is nan).
    Returns (loss, stats), stats as plain floats over completion tokens: `clip_frac` the share where the min takes
    the clipped branch (rho > 1 + eps with A > 0, or rho < 1 - eps with A < 0: where the gradient is cut; not merely
    |rho - 1| > eps), `kl` the mean k3 (0 without ref_logp), `ratio` the mean rho.

    Worked example, one token, A = 1, eps = 0.2: logp - old_logp = log 1.5 -> rho = 1.5 -> clipped to 1.2, and
    min(1.5, 1.2) = 1.2 does not depend on logp: the gradient is 0 (the update has gone far enough). With A = -1 the
    min picks -1.5, which does depend on logp: a bad token that became more likely is still pushed down.
    """
    # exercise 5: the clipped GRPO surrogate
    valid = mask.bool()
    mask = mask.to(logp.dtype)
    log_ratio = torch.where(valid, logp - old_logp, 0.0)  # zero before exp: padding garbage cannot overflow
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logp.dtype)[:, None]  # [rows, 1]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if token_weights is not None:
        surrogate = surrogate * torch.where(valid, token_weights, 0.0)
    per_token = -surrogate
    kl = torch.zeros_like(logp) if ref_logp is None else k3_kl(logp, ref_logp, valid)
    if kl_coef:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        per_token = per_token + kl_coef * kl
    loss = _reduce(per_token * mask, mask, norm, max_tokens)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
        stats = {"clip_frac": float((clipped * mask).sum() / n), "kl": float((kl * mask).sum() / n),
                 "ratio": float((ratio * mask).sum() / n)}
    return loss, stats


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


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) [rows, tokens]: exp(d) - d - 1 with d = ref_logp - logp.

    Unbiased for the KL when tokens are sampled from pi_theta, never negative, exactly 0 where logp == ref_logp, and 0
    at padding (`valid` False), whatever garbage is there. Example: logp = log 0.5, ref_logp = log 0.25 ->
    d = -log 2 -> 0.5 + 0.6931 - 1 = 0.1931.
    """
    # exercise 6: the k3 KL estimator
    delta = torch.where(valid, ref_logp - logp, 0.0)  # zero before exp: padding garbage cannot overflow
    return torch.exp(delta) - delta - 1


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood of the masked tokens: ExP-GRPO's extra term is beta * sft_loss(targets).

    Every masked token of every row weighs the same (a row of 3 tokens counts 3 times a row of 1; not a mean of
    per-row means). Example: log-probs [[log .5, log .5, log .5], [log .1, *, *]] with masks [[1, 1, 1], [1, 0, 0]]
    -> (3 * 0.693 + 2.303) / 4 = 1.096.
    """
    # exercise 8: the self-explanation term and exact gradient accumulation
    mask = mask.to(logp.dtype)
    return -(torch.where(mask.bool(), logp, 0.0)).sum() / mask.sum().clamp(min=1)


def sequence_logp(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(response | prompt) per row: the sum of its masked token log-probs. [rows, tokens] -> [rows]."""
    return torch.where(mask.bool(), logp, 0.0).sum(dim=1)


def dpo_loss(policy_chosen_logp: torch.Tensor, policy_rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO on sequence log-probs [pairs]: mean of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).

    At equal margins the loss is log 2 ~ 0.693; it falls as the policy raises the chosen response (for ExP-DPO, the
    self-explanation) relative to the rejected one (the policy's own wrong answer), measured against the reference.
    It must stay exact at any margin: at beta * margin = -495 the loss is 495 (log(sigmoid(-495)) is log 0 in fp32).
    """
    # exercise 9: the DPO loss
    margin = (policy_chosen_logp - ref_chosen_logp) - (policy_rejected_logp - ref_rejected_logp)
    return -F.logsigmoid(beta * margin).mean()


def beta_at(step: int, total_steps: int, beta: float, schedule: str = "constant") -> float:
    """Weight of the self-explanation (or expert-SFT) term at `step`: constant, or linear from beta to 0."""
    if schedule == "constant":
        return beta
    if schedule == "linear":
        return beta * max(0.0, 1.0 - step / max(1, total_steps))
    raise ValueError(f"beta schedule must be 'constant' or 'linear', not {schedule!r}")


def accumulation_weight(norm: str, micro_mask: torch.Tensor, total_rows: int, total_tokens: int) -> float:
    """Scale for a micro-batch loss so that the micro-batch losses *sum* to the full-batch loss exactly.

    A micro-batch loss is normalised by its own rows or tokens; re-weighting by its share of the full batch's rows
    ("seq", "constant") or tokens ("token", and sft_loss) makes gradient accumulation equal one big batch.
    """
    # exercise 8: the self-explanation term and exact gradient accumulation
    if norm == "token":
        return float(micro_mask.sum()) / max(1, total_tokens)
    return micro_mask.shape[0] / max(1, total_rows)
