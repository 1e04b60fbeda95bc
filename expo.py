r"""ExPO: the method -- prompts and objectives, and nothing about models or tokenizers.

GRPO learns nothing from a question whose G rollouts all fail. ExPO (arXiv 2507.02834) shows the *current* policy the
question with its correct answer, asks it to explain, and trains on that self-explanation *as if it had been produced
from the question alone*: the policy's own text, so likely under it, and more often right than its own attempts.

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

ExPO's relatives (`--explain_loss fkl / rkl`) write the term as a KL to the policy shown the answer
(variants/distill.py): the step passes -KL per token where the paper's term has log pi, and the same token mean.

All loss functions take per-token log-probs `logp` [rows, tokens] and a 0/1 `mask` [rows, tokens] that marks the
completion tokens; padding positions may hold any finite values and never change a loss or receive a gradient. Each
loss is a *sum* over its rows divided by a denominator, the step's (`Denominators`: counted once over the whole
step's batch, every micro-batch and rank), so that micro-batch losses add up to the step's loss with no re-weighting;
`microbatch_loss` is one micro-batch's share of the whole ExP-GRPO objective, on plain tensors.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch
import torch.nn.functional as F

import reward

# --------------------------------------------------------------------------------------------------------- prompts

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# What the self-explanation prompt adds to the solve prompt (--explain_hint). "brief", the default, asks for a short
# solution that ends in the answer: a small model's explanation then finishes within the budget (docs/record.md: "The
# demo, made to show the mechanism"). "step_by_step" is the hint of the runs recorded before it: most of its
# explanations ran to a 128-token budget.
HINTS = {
    "brief": ("\n\nThe correct final answer is {answer}. Write a short solution that reaches it, in two or three "
              "sentences, as if you were solving the problem yourself, and end with \\boxed{{{answer}}}."),
    "step_by_step": ("\n\nThe correct final answer is {answer}. Explain step by step how to reach it, as if you were "
                     "solving the problem yourself, without saying that the answer was given to you."),
}


def solve_prompt(question: str) -> str:
    """The answer-free user message: rollouts are sampled from it and every target is scored under it."""
    return f"{question}\n\n{INSTRUCTION}"


def explain_prompt(question: str, answer: str, hint: str = "brief") -> str:
    """The self-explanation user message: `solve_prompt(question)` plus the gold answer and the request to explain
    (`HINTS[hint]`)."""
    # exercise 7: the self-explanation prompt and its training target
    return solve_prompt(question) + HINTS[hint].format(answer=answer)


# A target must not talk about a hint the model never sees at test time: five consecutive words of a hint itself, or
# the usual ways of saying that the answer was handed over.
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


_HINT_NGRAMS = set().union(*(_ngrams(_words(part), _HINT_WORDS) for hint in HINTS.values()
                              for part in hint.split("{answer}")))


def mentions_hint(explanation: str) -> bool:
    """True when an explanation repeats the hint's wording or talks about having been given the answer."""
    return _LEAK.search(explanation) is not None or not _HINT_NGRAMS.isdisjoint(
        _ngrams(_words(explanation), _HINT_WORDS))


# What may close the final box: outer braces, `$` / `$$`, `\]`, `\)`, `**` emphasis, with whitespace between them.
_CLOSERS = re.compile(r"\}(?:\s*(?:\}|\$|\\\]|\\\)|\*\*))*\.?")


def explanation_target(explanation: str, answer: str, truncated: bool = False) -> str:
    r"""The training target made from a self-explanation: stripped, its final answer set to \boxed{answer}.

    Its last balanced \boxed{...} gets the gold answer; what closes the box and its math stays (`}`, `$`, `$$`, `\]`,
    `\)`, `**`, whitespace, one `.`), the prose after is cut: "so $\boxed{7}$. Done" -> "so $\boxed{gold}$.". Without
    a box, "The answer is \boxed{gold}." is appended on a line of its own; to a cut-off explanation (`truncated`),
    after its finished lines only: "48 + 8 = 56.\nSo 56 + 1 = 5" -> "48 + 8 = 56.\nThe answer is \boxed{gold}."."""
    # exercise 7: the self-explanation prompt and its training target
    text = explanation.strip()
    span = reward.boxed_span(text)
    if span is None:
        finished = text[: text.rfind("\n") + 1].rstrip() if truncated else text  # "" without a finished line
        return f"{finished}\nThe answer is \\boxed{{{answer}}}.".lstrip()
    start, end = span
    tail = _CLOSERS.match(text, end).group(0)  # the closers of the box and its math, not the prose after them
    return text[:start] + answer + tail


def self_explanation_targets(explanations: list[str], answers: list[str], truncated: list[bool], solved=None,
                             drop_leaks: bool = True, drop_truncated: bool = False, drop_wrong: bool = False,
                             questions: list[str] | None = None) -> tuple[list[str | None], dict[str, float]]:
    """The likelihood targets made from sampled self-explanations, one per question (training and lab/analyze.py):
    `explanation_target(text, gold, truncated)`, or None where a filter drops it, in this order: `solved`
    (--explain_on failed: True where the question's group had a success), `drop_leaks` (`mentions_hint`),
    `drop_truncated` (cut off by the budget), `drop_wrong` (its own answer is not the gold, or restates the question).
    Returns (targets, counts: explanations, cut off (whatever the filters do), reaching the gold alone (and as a
    share), targets made from finished explanations, dropped by each filter)."""
    correct = [reward.score(t, a, q) for t, a, q in zip(explanations, answers, questions or [None] * len(answers))]
    reasons = ["solved" if solved is not None and solved[i] else "leak" if drop_leaks and mentions_hint(text) else
               "truncated" if drop_truncated and truncated[i] else "wrong" if drop_wrong and not correct[i] else None
               for i, text in enumerate(explanations)]  # the first filter that drops each, or None
    targets = [None if why else explanation_target(text, answer, cut)
               for text, answer, cut, why in zip(explanations, answers, truncated, reasons)]
    counts = {"explanations": len(explanations), "explain_cut_off": sum(map(bool, truncated)),
              "explain_reached": sum(correct), "explain_correct": sum(correct) / max(1, len(correct)),
              "targets_finished": sum(t is not None and not cut for t, cut in zip(targets, truncated)),
              "explain_dropped": reasons.count("leak"), "explain_dropped_truncated": reasons.count("truncated"),
              "explain_dropped_wrong": reasons.count("wrong")}
    if solved is not None:
        counts["explain_dropped_solved"] = reasons.count("solved")
    return targets, counts


# ------------------------------------------------------------------------------------------------------ advantages


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "std") -> torch.Tensor:
    """Group-normalised advantages; a question's G rows are contiguous. Example, one success in 4 (unbiased std 0.5):
        rewards [1, 0, 0, 0] -> mean 0.25 -> centred [0.75, -0.25, -0.25, -0.25] -> "std": [1.5, -0.5, -0.5, -0.5]
    An all-equal group gives zeros: the question teaches GRPO nothing, which is the gap ExPO fills.
    `scale="none"` keeps r - mean (Dr. GRPO: no division by the std, which over-weights nearly-solved questions).
    Raises ValueError for rewards that do not split into groups (6 for G = 4), "std" with G = 1, an unknown scale.
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


class Denominators(NamedTuple):
    """The step's denominators, counted once over the whole step's batch (every micro-batch, every rank)."""
    pg: float  # of grpo_loss: `pg_denominator` of all the step's rollouts
    target_tokens: float  # of sft_loss: the tokens of all the step's likelihood targets


def pg_denominator(mask: torch.Tensor, norm: str, max_tokens: int | None = None) -> float:
    """What grpo_loss divides its sum by, for the rollouts of `mask` [rows, tokens]: rows ("seq", each row first
    averaged over its tokens), tokens ("token"), or rows x max_tokens ("constant", Dr. GRPO: pass the budget; default
    the padded width). Example, masks [[1, 1, 1, 0], [1, 0, 0, 0]]: seq 2, token 4, constant 8 (10 with max_tokens 5).
    """
    sizes = {"seq": mask.shape[0], "token": mask.sum(), "constant": mask.shape[0] * (max_tokens or mask.shape[1])}
    if norm not in sizes:
        raise ValueError(f"norm must be one of {LOSS_NORMS}, not {norm!r}")
    return float(sizes[norm])


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, kl_coef: float = 0.0, norm: str = "seq",
              max_tokens: int | None = None, denominator: float | None = None,
              token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO surrogate, negated to be minimised, plus kl_coef * k3: a sum over completion tokens divided by
    `denominator` (the step's, `pg_denominator`; None: this batch's own), so that micro-batches add up to the step.

    Per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + kl_coef k3, with rho = exp(logp - old_logp). `norm` "seq"
    averages each row's tokens first (DeepSeekMath); "token" and "constant" sum them (DAPO, Dr. GRPO). Detached
    `token_weights` (TIS) weigh the surrogate. Padding never counts, in value or gradient (its log-ratio is zeroed
    before exp: inf * 0 is nan). Returns (loss, sums over tokens: `tokens`, `kl`, `clipped` where the gradient is cut).

    Worked example, one token, A = 1, eps = 0.2: rho = 1.5 is clipped to 1.2, and min(1.5, 1.2) = 1.2 does not depend
    on logp: no gradient (the update has gone far enough). With A = -1 the min picks -1.5, which does: a bad token
    that became more likely is still pushed down.
    """
    # exercise 5: the clipped GRPO surrogate
    if kl_coef and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")
    valid, mask = mask.bool(), mask.to(logp.dtype)
    ratio = torch.exp(torch.where(valid, logp - old_logp, 0.0))  # zeroed before exp: padding garbage cannot overflow
    adv = advantages.to(logp.dtype)[:, None]  # [rows, 1]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if token_weights is not None:
        surrogate = surrogate * torch.where(valid, token_weights, 0.0)
    kl = torch.zeros_like(logp) if ref_logp is None else k3_kl(logp, ref_logp, valid)
    per_token = (-surrogate + kl_coef * kl if kl_coef else -surrogate) * mask  # [rows, tokens]
    total = (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() if norm == "seq" else per_token.sum()  # seq: row means
    loss = total / max(pg_denominator(mask, norm, max_tokens) if denominator is None else denominator, 1.0)
    with torch.no_grad():
        clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
        stats = {"tokens": float(mask.sum()), "clipped": float((clipped * mask).sum()), "kl": float((kl * mask).sum())}
    return loss, stats


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) [rows, tokens]: exp(d) - d - 1 with d = ref_logp - logp.

    Unbiased for the KL when tokens are sampled from pi_theta, never negative, 0 where logp == ref_logp and at padding
    (`valid` False) whatever is there. Example: logp = log 0.5, ref_logp = log 0.25 -> d = -log 2 -> 0.1931."""
    # exercise 6: the k3 KL estimator
    delta = torch.where(valid, ref_logp - logp, 0.0)  # zero before exp: padding garbage cannot overflow
    return torch.exp(delta) - delta - 1


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, denominator: float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the masked tokens [rows, tokens], summed and divided by `denominator` (the step's
    target tokens; None: these rows'): a token mean over all the step's targets, not a mean of per-row means.
    Example: log-probs [[log .5] * 3, [log .1, *, *]], masks [[1, 1, 1], [1, 0, 0]] -> (3 * 0.693 + 2.303) / 4 = 1.096.
    """
    # exercise 8: one denominator per step, and exact gradient accumulation
    if denominator is None:
        denominator = float(mask.sum())
    return -(torch.where(mask.bool(), logp, 0.0)).sum() / max(denominator, 1.0)


def microbatch_loss(logp: torch.Tensor | None, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                    advantages: torch.Tensor | None, mask: torch.Tensor | None, target_logp: torch.Tensor | None,
                    target_mask: torch.Tensor | None, *, denominators: Denominators, beta: float,
                    clip_eps: float = 0.2, kl_coef: float = 0.0, norm: str = "seq",
                    token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """One micro-batch's share of the step's loss: grpo_loss over its rollouts [rows, tokens] + beta * sft_loss over
    its targets [targets, tokens], each over the step's denominator, so that micro-batch losses sum to the step's and
    one backward each accumulates exactly its gradient. Either side may be None (no rows with a gradient; no targets).
    Returns (loss, stats as sums)."""
    # exercise 8: one denominator per step, and exact gradient accumulation
    loss, stats = torch.zeros(()), {}
    if logp is not None:
        pg, stats = grpo_loss(logp, old_logp=old_logp, ref_logp=ref_logp, advantages=advantages, mask=mask,
                              clip_eps=clip_eps, kl_coef=kl_coef, norm=norm, denominator=denominators.pg,
                              token_weights=token_weights)
        loss, stats["loss_pg"] = pg, pg.item()
    if target_logp is not None:
        nll = sft_loss(target_logp, target_mask, denominators.target_tokens)
        loss = loss + beta * nll
        stats.update(loss_sft=nll.item(), target_tokens=float(target_mask.sum()))
    return loss, stats


def sequence_logp(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(response | prompt) per row: the sum of its masked token log-probs. [rows, tokens] -> [rows]."""
    return torch.where(mask.bool(), logp, 0.0).sum(dim=1)


def dpo_loss(policy_chosen_logp: torch.Tensor, policy_rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor, beta: float, denominator: float | None = None) -> torch.Tensor:
    """DPO on sequence log-probs [pairs]: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), summed over pairs
    and divided by `denominator` (the step's pairs; None: these pairs, a mean).

    At equal margins the loss is log 2 ~ 0.693; it falls as the policy raises the chosen response (ExP-DPO: the
    self-explanation) over the rejected one, against the reference; exact at any margin (-495 -> 495, not inf).
    """
    # exercise 9: the DPO loss
    margin = (policy_chosen_logp - ref_chosen_logp) - (policy_rejected_logp - ref_rejected_logp)
    if denominator is None:
        denominator = float(margin.numel())
    return -F.logsigmoid(beta * margin).sum() / max(denominator, 1.0)


def beta_at(step: int, total_steps: int, beta: float, schedule: str = "constant") -> float:
    """Weight of the self-explanation (or expert-SFT) term at `step`: constant, or linear from beta to 0."""
    if schedule == "constant":
        return beta
    if schedule == "linear":
        return beta * max(0.0, 1.0 - step / max(1, total_steps))
    raise ValueError(f"beta schedule must be 'constant' or 'linear', not {schedule!r}")
