"""ExPO's relatives: its self-explanation term as a KL to a teacher pi_T, the policy shown the answer.

    fkl = 1/|E| sum_t KL(pi_T(. | q, a*, e~<t) || pi_theta(. | q, e~<t))   along the self-explanation   vocab_kl(T, S)
    rkl = 1/|O| sum_t KL(pi_theta(. | q, o<t) || pi_T(. | q, a*, o<t))     along the G rollouts (no e~)  vocab_kl(S, T)

At T = 1, fkl's gradient is the NLL's expected gradient when e~ is drawn from pi_T (tested), with less variance; rkl
is on-policy self-distillation (OPSD / SDFT) beside GRPO. The teacher is the same model after the *explain* prompt
(`--teacher current`, detached, or `initial`, frozen) reading the tokens the student reads after the answer-free
prompt (`with_prompts`). The step calls in here in one line each (train.py: `rollout_targets` for rkl,
`teacher_view`, and `target_kl`, whose -KL takes the place of the paper's log pi in expo.microbatch_loss: `kl_loss`
says what that computes); a first reading skips this file. What the comparison found: the README's results.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

import expo
import rollout
from backend import memory

EXPLAIN_LOSSES = ("nll", "fkl", "rkl")  # --explain_loss: nll is the paper's term


def vocab_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) at each position over the whole vocabulary, from logits [rows, T, V] of any dtype -> fp32 [rows, T].

    sum_v p(v) (log p(v) - log q(v)), with p = softmax(logits_p) and q = softmax(logits_q); 0 where p == q, never
    negative. Gradients flow into both arguments: the caller detaches the teacher. ExPO's relatives use it both ways
    (`--explain_loss`): fkl = vocab_kl(teacher, student) along the self-explanation, rkl = vocab_kl(student, teacher)
    along the student's own rollouts. Example, one position with logits_p [0, 0] (p = [.5, .5]) and logits_q
    [log 3, 0] (q = [.75, .25]): .5 log(.5/.75) + .5 log(.5/.25) = 0.1438; the other way round, 0.1308.
    """
    # exercise 11: the KL to a teacher, on plain tensors
    logp, logq = F.log_softmax(logits_p.float(), dim=-1), F.log_softmax(logits_q.float(), dim=-1)  # [rows, T, V]
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, reverse: bool = False,
             rows_per_chunk: int = 4) -> torch.Tensor:
    """Per-token full-vocabulary KL [N, T] between a teacher's and the student's next-token distributions, from their
    logits [N, T, V] over the same completion tokens: KL(teacher || student) (forward), or with `reverse`
    KL(student || teacher). The teacher's logits must carry no gradient (compute them under no_grad).

    Computed a few rows at a time (backend/memory.py), as rollout.token_logprobs is."""
    pair = (student_logits, teacher_logits) if reverse else (teacher_logits, student_logits)
    return memory.by_rows(vocab_kl, pair, rows_per_chunk=rows_per_chunk)  # [N, T]


def kl_loss(kl: torch.Tensor, mask: torch.Tensor, denominator: float | None = None) -> torch.Tensor:
    """The relatives' term: per-token KLs [rows, T] summed over the masked tokens and divided by the step's target
    tokens (None: these rows' own), the rule of expo.sft_loss with the KL where it has -log pi. The step passes
    `-target_kl` to expo.microbatch_loss as its target log-probs, which computes exactly this."""
    return expo.sft_loss(-kl, mask, denominator)


# ------------------------------------------------------------------------------------------- the teacher in the step


def with_prompts(tokenizer, batch: rollout.Rollouts, user_texts: list[str]) -> rollout.Rollouts:
    """The same completions after other user messages, one per row: what a teacher with privileged information (the
    answer in its prompt) scores, token for token, beside the student's prompt."""
    ids, mask = rollout.left_pad(rollout.encode_prompts(tokenizer, user_texts), tokenizer.pad_token_id,
                                 batch.prompt_ids.device)
    return dataclasses.replace(batch, prompt_ids=ids, prompt_mask=mask)


def logits(model, part: rollout.Rollouts) -> torch.Tensor:
    """Completion logits [n, w, V] of a micro-batch `part = batch.select(rows)`."""
    return rollout.completion_logits(model, part.prompt_ids, part.prompt_mask, part.completion_ids)


def teacher_view(trainer, batch, targets: rollout.Rollouts | None) -> rollout.Rollouts | None:
    """For --explain_loss fkl / rkl, the targets' tokens after the teacher's prompt: the same question *with* its
    answer (expo.explain_prompt), the privileged context the student's prompt lacks. None for nll."""
    if trainer.cfg.explain_loss == "nll" or targets is None:
        return None
    hinted = [expo.explain_prompt(batch[i].question, batch[i].answer, trainer.cfg.explain_hint)
              for i in targets.prompt_index.tolist()]
    return with_prompts(trainer.tokenizer, targets, hinted)


def rollout_targets(roll: rollout.Rollouts, solved: list[bool], explain_on: str) -> rollout.Rollouts | None:
    """rkl's targets: the policy's own rollouts (with --explain_on failed, only the all-wrong groups'), or None."""
    rows = [i for i, q in enumerate(roll.prompt_index.tolist()) if explain_on == "all" or not solved[q]]
    return roll.select(rows) if rows else None


def teacher_model(trainer):
    """(A context giving) the teacher's weights: the current policy (--teacher current), or the frozen initial one."""
    return trainer.reference() if trainer.cfg.teacher == "initial" else contextlib.nullcontext(trainer.model)


def target_kl(trainer, part: rollout.Rollouts, teacher_part: rollout.Rollouts) -> torch.Tensor:
    """The per-token KL [m, w] of a micro-batch of targets in --explain_loss's direction: the student after the
    answer-free prompt (`part`), the teacher after the hinted one (`teacher_part`, the same tokens); the teacher's
    logits are constants (no_grad)."""
    with torch.no_grad(), teacher_model(trainer) as teacher:
        teacher_logits = logits(teacher, teacher_part)  # [m, w, V]
    return token_kl(logits(trainer.model, part), teacher_logits, reverse=trainer.cfg.explain_loss == "rkl")
